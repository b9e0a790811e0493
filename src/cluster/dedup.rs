//! Deduplication of idempotent publishes on a replicated partition
//! (docs/REPLICATION.md, "What an acknowledgement means"): the decision is
//! made when an entry is applied, from state every replica holds alike.
//!
//! That state is a function of the partition log alone: the batches of the
//! last [`REPLICATED_DEDUP_WINDOW_ENTRIES`] Raft indexes. A producer none of
//! whose publishes is in that window is forgotten, at the same index on
//! every replica, whether it has run since the group started or restarted
//! a moment ago and rebuilt the window from the log's batch headers.
//! Nothing here depends on a replica's clock, its segment boundaries or
//! its settings. Memory is bounded by the window: at most one remembered
//! publish (and one producer) per entry in it.

use std::collections::{HashMap, VecDeque};

use crate::protocol::ErrorCode;
use crate::storage::{ChannelLog, REPLICATED_DEDUP_WINDOW_ENTRIES, StorageError};

/// One publish stored for an idempotent producer.
#[derive(Clone, Copy, Debug)]
struct Remembered {
    sequence: u64,
    count: u64,
    first_offset: u64,
    timestamp_us: u64,
}

#[derive(Debug, Default)]
struct Producer {
    /// One past the last sequence stored.
    next_sequence: u64,
    /// Its publishes in the window, oldest first (sequences increase).
    recent: VecDeque<Remembered>,
}

/// What to do with one idempotent publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Store it.
    Append,
    /// A retry of a publish stored at these offsets: answer with them.
    Duplicate { first_offset: u64, count: u64, timestamp_us: u64 },
    /// Not stored, and why.
    Refuse { code: ErrorCode, message: String },
}

/// The idempotent producers of one replicated partition.
#[derive(Debug, Default)]
pub struct ProducerWindow {
    producers: HashMap<u64, Producer>,
    /// Every remembered publish as (Raft index, producer id), oldest first:
    /// what leaves the window next.
    order: VecDeque<(u64, u64)>,
}

impl ProducerWindow {
    /// The window as `log`'s batch headers hold it: the publishes of the
    /// entries after `last_index - REPLICATED_DEDUP_WINDOW_ENTRIES`.
    ///
    /// # Errors
    /// A segment could not be read.
    pub fn rebuild(log: &ChannelLog, last_index: u64) -> Result<ProducerWindow, StorageError> {
        let mut window = ProducerWindow::default();
        let after = last_index.saturating_sub(REPLICATED_DEDUP_WINDOW_ENTRIES);
        log.visit_batches_after(after, |first_offset, timestamp_us, header| {
            if let Some((producer_id, sequence)) = header.producer {
                window.remember(
                    header.raft_index,
                    producer_id,
                    sequence,
                    u64::from(header.count),
                    first_offset,
                    timestamp_us,
                );
            }
        })?;
        Ok(window)
    }

    /// The producers remembered (for logs and tests).
    pub fn producer_count(&self) -> usize {
        self.producers.len()
    }

    /// Forgets the publishes that are out of the window at entry `index`.
    fn expire(&mut self, index: u64) {
        let oldest_kept = index.saturating_sub(REPLICATED_DEDUP_WINDOW_ENTRIES) + 1;
        while let Some(&(remembered_at, producer_id)) = self.order.front() {
            if remembered_at >= oldest_kept {
                break;
            }
            self.order.pop_front();
            if let Some(producer) = self.producers.get_mut(&producer_id) {
                producer.recent.pop_front();
                if producer.recent.is_empty() {
                    self.producers.remove(&producer_id);
                }
            }
        }
    }

    /// Decides what entry `index`, a publish of `count` messages by
    /// `producer_id` from `sequence` on, does: the rules of a single node's
    /// writer (GUARANTEES.md), over the window.
    pub fn decide(&mut self, index: u64, producer_id: u64, sequence: u64, count: u64) -> Decision {
        self.expire(index);
        let Some(producer) = self.producers.get(&producer_id) else {
            // New: it starts at 0. Forgotten (or new at another sequence):
            // this may be a retry of a publish that left the window, which
            // cannot be told from a new one; refused rather than perhaps
            // stored twice.
            if sequence == 0 {
                return Decision::Append;
            }
            return Decision::Refuse {
                code: ErrorCode::UnknownProducer,
                message: format!(
                    "producer {producer_id} has no publish among the last {REPLICATED_DEDUP_WINDOW_ENTRIES} entries of this partition, so sequence {sequence} may be a retry of a publish stored earlier: nothing stored; publish as a new producer from sequence 0"
                ),
            };
        };
        if sequence > producer.next_sequence {
            return Decision::Refuse {
                code: ErrorCode::OutOfOrderSequence,
                message: format!(
                    "sequence {sequence} of producer {producer_id} is ahead of its next sequence {}: an earlier publish was not stored",
                    producer.next_sequence
                ),
            };
        }
        if sequence.checked_add(count).is_none() {
            return Decision::Refuse {
                code: ErrorCode::InvalidRequest,
                message: format!("sequence {sequence} + {count} overflows u64"),
            };
        }
        if sequence == producer.next_sequence {
            return Decision::Append;
        }
        // A retry is the same publish: same first sequence and count.
        let found = producer.recent.binary_search_by_key(&sequence, |remembered| remembered.sequence);
        match found.ok().map(|at| producer.recent[at]) {
            Some(stored) if stored.count == count => Decision::Duplicate {
                first_offset: stored.first_offset,
                count: stored.count,
                timestamp_us: stored.timestamp_us,
            },
            _ => Decision::Refuse {
                code: ErrorCode::SequenceTooOld,
                message: format!(
                    "sequence {sequence} (count {count}) of producer {producer_id} is below its next sequence {} and matches no publish of the last {REPLICATED_DEDUP_WINDOW_ENTRIES} entries of this partition",
                    producer.next_sequence
                ),
            },
        }
    }

    /// Records a publish stored by entry `index`.
    pub fn remember(
        &mut self,
        index: u64,
        producer_id: u64,
        sequence: u64,
        count: u64,
        first_offset: u64,
        timestamp_us: u64,
    ) {
        self.expire(index);
        let producer = self.producers.entry(producer_id).or_default();
        if producer.recent.back().is_some_and(|last| last.sequence >= sequence) {
            // Only an anchoring below what is remembered could do this, and
            // anchoring happens only to a producer not remembered: kept
            // sorted regardless, so that lookups stay right.
            producer.recent.clear();
            self.order.retain(|&(_, id)| id != producer_id);
        }
        producer.next_sequence = sequence.saturating_add(count);
        producer.recent.push_back(Remembered { sequence, count, first_offset, timestamp_us });
        self.order.push_back((index, producer_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = REPLICATED_DEDUP_WINDOW_ENTRIES;

    #[test]
    fn a_retry_in_the_window_is_a_duplicate_with_its_offsets() {
        let mut window = ProducerWindow::default();
        assert_eq!(window.decide(1, 7, 0, 3), Decision::Append);
        window.remember(1, 7, 0, 3, 100, 55);
        assert_eq!(window.decide(2, 7, 3, 2), Decision::Append);
        window.remember(2, 7, 3, 2, 103, 56);
        assert_eq!(window.decide(3, 7, 0, 3), Decision::Duplicate { first_offset: 100, count: 3, timestamp_us: 55 });
        assert_eq!(window.decide(4, 7, 3, 2), Decision::Duplicate { first_offset: 103, count: 2, timestamp_us: 56 });
        assert!(matches!(window.decide(5, 7, 0, 2), Decision::Refuse { code: ErrorCode::SequenceTooOld, .. }));
        assert!(matches!(window.decide(6, 7, 9, 1), Decision::Refuse { code: ErrorCode::OutOfOrderSequence, .. }));
        assert_eq!(window.decide(7, 7, 5, 1), Decision::Append);
    }

    #[test]
    fn a_producer_leaves_the_window_at_the_same_index_live_or_rebuilt() {
        let mut window = ProducerWindow::default();
        window.remember(10, 7, 0, 1, 0, 1);
        // Still in the window at 10 + W - 1: a retry is recognised.
        assert!(matches!(window.decide(10 + W - 1, 7, 0, 1), Decision::Duplicate { .. }));
        // At 10 + W it is out: the producer is forgotten; only a start from
        // sequence 0 is taken (anything else may be an old retry).
        assert!(matches!(window.decide(10 + W, 7, 1, 1), Decision::Refuse { code: ErrorCode::UnknownProducer, .. }));
        assert_eq!(window.producer_count(), 0);
        assert_eq!(window.decide(10 + W, 7, 0, 1), Decision::Append);
    }

    #[test]
    fn memory_is_bounded_by_the_window() {
        let mut window = ProducerWindow::default();
        for index in 1..=3 * W {
            window.remember(index, index % 5000, index, 1, index, 0);
        }
        assert!(window.order.len() as u64 <= W);
        assert!(window.producers.values().map(|p| p.recent.len() as u64).sum::<u64>() <= W);
    }
}
