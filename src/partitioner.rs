//! Which partition a key belongs to: Kafka's default partitioner, so that a
//! key lands on the same partition in weir as in a Kafka client with the
//! same partition count. Shared by the broker (publishes that name no
//! partition) and the Rust client (which routes before batching).
//!
//! Kafka computes `toPositive(murmur2(key)) % partitions`, where `murmur2`
//! is MurmurHash2 (32-bit, little-endian words) with seed `0x9747b28c` and
//! `toPositive` clears the sign bit (`org.apache.kafka.common.utils.Utils`).

/// The partition of `key` among `partitions` (at least 1).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a channel has at least one partition");
    (murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's own test vectors for `Utils.murmur2` (UtilsTest.testMurmur2),
    /// as signed 32-bit Java ints.
    #[test]
    fn murmur2_matches_kafkas_test_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32, expected, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn a_key_maps_to_the_partition_kafkas_partitioner_gives_it() {
        // (murmur2 & 0x7fffffff) % n for the vectors above.
        let foobar = (-790_332_482i32 as u32 & 0x7fff_ffff) % 6;
        assert_eq!(partition_for_key(b"foobar", 6), foobar);
        assert_eq!(partition_for_key(b"21", 1), 0);
        for partitions in 1..=64 {
            assert!(partition_for_key(b"any key", partitions) < partitions);
        }
    }
}
