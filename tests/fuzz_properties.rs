//! The fuzz targets' properties (`fuzz/`, issue 11) as proptests, so that
//! every `cargo test` exercises them, not only a fuzzing run by hand.
//!
//! The targets' bodies live in the fuzz crate's library, `fuzz/src/`, as
//! one `check(data: &[u8])` per target; this file includes that library as
//! the module `weir_fuzz` and feeds the same functions. A `check` fails by
//! panicking, as under libFuzzer; proptest catches the panic and shrinks.
//!
//! For each target (`frame`, `record`, `segment_recovery`, `config`):
//! - `check` on arbitrary bytes;
//! - `check` on one of the target's seeds (`weir_fuzz::seeds`, valid inputs
//!   made by weir's encoders) after 1 to 8 random mutations: a byte
//!   overwritten, up to 16 random bytes inserted, up to 16 bytes deleted,
//!   the input truncated. The seeds get past the checksums and framing, the
//!   mutations then damage them as a fuzzer would;
//! - for `config` also: lines of `key = value` with the keys of its fuzz
//!   dictionary (`fuzz/dictionaries/config.dict`), which make mostly valid
//!   configs, so that the print-and-parse-back property gets exercised.
//!
//! Plain tests run every seed unmutated and replay every regression input
//! in `tests/fixtures/fuzz/<target>/` through its target.
//!
//! Cases per proptest by default: [`CASES_FAST`] for `frame`, `record` and
//! `config`, [`CASES_SEGMENT_RECOVERY`] for `segment_recovery` (each of its
//! cases writes, opens and reopens a log on disk). `WEIR_FUZZ_CASES=N`
//! runs N cases in every proptest instead, for a longer search:
//! `WEIR_FUZZ_CASES=20000 cargo test --release --test fuzz_properties`.
//! Shrinking a failure stops after [`SHRINK_TIME_MS_MAX`] unless
//! `PROPTEST_MAX_SHRINK_TIME` says otherwise.
//!
//! A failure prints its minimal input as its length and hex
//! (`input = 184 bytes: 00000000387...`); the hex becomes a regression
//! input with `echo HEX | xxd -r -p > tests/fixtures/fuzz/<target>/<name>`.
//! The random seed of a failing run is saved by proptest in
//! `tests/fuzz_properties.proptest-regressions` and tried first on the next
//! run; `PROPTEST_RNG_SEED=N` fixes the seed of a whole run.

#[path = "../fuzz/src/lib.rs"]
mod weir_fuzz;

use std::fmt;
use std::panic::catch_unwind;
use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};

/// Cases per proptest for the targets that run in memory.
const CASES_FAST: u32 = 10_000;
/// Cases per proptest for `segment_recovery`.
const CASES_SEGMENT_RECOVERY: u32 = 1000;
/// Proptest's limit on shrinking, when `PROPTEST_MAX_SHRINK_TIME` is unset:
/// a `segment_recovery` case costs milliseconds, and shrinking a 4 KiB
/// input byte by byte would take many minutes.
const SHRINK_TIME_MS_MAX: u32 = 60_000;
/// Length of an arbitrary input, at most.
const ARBITRARY_BYTES_MAX: usize = 4096;
/// Mutations applied to a seed, at most.
const MUTATIONS_MAX: usize = 8;
/// Bytes one mutation inserts or deletes, at most.
const SPLICE_BYTES_MAX: usize = 16;
/// `key = value` lines in a generated config, at most.
const CONFIG_LINES_MAX: usize = 24;

/// A target's body: panics when one of its properties does not hold.
type Check = fn(&[u8]);

/// The targets, by the names of their directories in `tests/fixtures/fuzz/`.
const TARGETS: [(&str, Check); 4] = [
    ("frame", weir_fuzz::frame::check),
    ("record", weir_fuzz::record::check),
    ("segment_recovery", weir_fuzz::segment_recovery::check),
    ("config", weir_fuzz::config::check),
];

fn seeds_of(target: &str) -> Vec<Vec<u8>> {
    match target {
        "frame" => weir_fuzz::seeds::frame(),
        "record" => weir_fuzz::seeds::record(),
        "segment_recovery" => weir_fuzz::seeds::segment_recovery().expect("the segment seeds are written"),
        "config" => weir_fuzz::seeds::config(),
        _ => panic!("no fuzz target is named {target}"),
    }
}

fn cases_config(cases_default: u32) -> ProptestConfig {
    let cases = match std::env::var("WEIR_FUZZ_CASES") {
        Ok(value) => value.parse().unwrap_or_else(|_| panic!("WEIR_FUZZ_CASES={value} is not a number")),
        Err(_) => cases_default,
    };
    let defaults = ProptestConfig::default();
    let max_shrink_time = if defaults.max_shrink_time == 0 { SHRINK_TIME_MS_MAX } else { defaults.max_shrink_time };
    ProptestConfig { cases, max_shrink_time, ..defaults }
}

/// An input of a target; printed as its length and hex, the form a
/// regression file is made from.
#[derive(Clone)]
struct Input(Vec<u8>);

impl fmt::Debug for Input {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} bytes: ", self.0.len())?;
        self.0.iter().try_for_each(|byte| write!(formatter, "{byte:02x}"))
    }
}

fn arbitrary_bytes() -> impl Strategy<Value = Input> {
    vec(any::<u8>(), 0..=ARBITRARY_BYTES_MAX).prop_map(Input)
}

/// One change to an input. Positions are [`Index`]es, scaled to the length
/// of the input at the time the mutation applies.
#[derive(Clone, Debug)]
enum Mutation {
    Overwrite { at: Index, byte: u8 },
    Insert { at: Index, bytes: Vec<u8> },
    Delete { at: Index, len: usize },
    Truncate { at: Index },
}

/// A mutation whose new bytes come from `byte`.
fn mutation(byte: impl Strategy<Value = u8> + Clone) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (any::<Index>(), byte.clone()).prop_map(|(at, byte)| Mutation::Overwrite { at, byte }),
        3 => (any::<Index>(), vec(byte, 1..=SPLICE_BYTES_MAX)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<Index>(), 1..=SPLICE_BYTES_MAX).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len();
        match mutation {
            Mutation::Overwrite { at, byte } if len > 0 => bytes[at.index(len)] = *byte,
            Mutation::Insert { at, bytes: inserted } => {
                let position = at.index(len + 1);
                bytes.splice(position..position, inserted.iter().copied());
            }
            Mutation::Delete { at, len: deleted } if len > 0 => {
                let position = at.index(len);
                bytes.drain(position..len.min(position + deleted));
            }
            Mutation::Truncate { at } => bytes.truncate(at.index(len + 1)),
            Mutation::Overwrite { .. } | Mutation::Delete { .. } => {}
        }
    }
    bytes
}

/// One of `seeds`, mutated with new bytes from `byte`; shrinks towards
/// fewer mutations and the first seed.
fn mutated(seeds: Vec<Vec<u8>>, byte: impl Strategy<Value = u8> + Clone) -> impl Strategy<Value = Input> {
    (select(seeds), vec(mutation(byte), 1..=MUTATIONS_MAX)).prop_map(|(seed, mutations)| Input(apply(seed, &mutations)))
}

/// The bytes a config is mutated with: printable ASCII and line ends. Any
/// byte would make most inputs invalid UTF-8, which the target skips.
fn config_byte() -> impl Strategy<Value = u8> + Clone {
    prop_oneof![1 => Just(b'\n'), 15 => 0x20..=0x7eu8]
}

/// The keys of broker.toml, from the config target's fuzz dictionary: its
/// quoted entries that are plain lower-case names.
fn config_keys() -> Vec<String> {
    include_str!("../fuzz/dictionaries/config.dict")
        .lines()
        .filter_map(|line| line.strip_prefix('"')?.strip_suffix('"'))
        .filter(|entry| entry.bytes().all(|byte| byte.is_ascii_lowercase() || byte == b'_'))
        .filter(|entry| !matches!(*entry, "true" | "false"))
        .map(str::to_owned)
        .collect()
}

/// Values of broker.toml's kinds (the fsync policies, booleans, addresses,
/// integers in TOML's spellings), besides the generated ones.
const CONFIG_VALUES: [&str; 10] = [
    "\"always\"",
    "\"interval\"",
    "\"never\"",
    "true",
    "false",
    "\"127.0.0.1:0\"",
    "\"[::1]:0\"",
    "1_000",
    "0x10",
    "1e3",
];

fn config_value() -> impl Strategy<Value = String> {
    prop_oneof![
        select(&CONFIG_VALUES[..]).prop_map(str::to_owned),
        (0..=4096u64).prop_map(|value| value.to_string()),
        any::<i64>().prop_map(|value| value.to_string()),
        "[a-z0-9./:]{0,12}".prop_map(|text| format!("\"{text}\"")),
    ]
}

/// `key = value` lines, some under a `[channels.<name>]` table.
fn config_text() -> impl Strategy<Value = Input> {
    let line = (select(config_keys()), config_value()).prop_map(|(key, value)| format!("{key} = {value}\n"));
    let table = "[a-z]{1,8}".prop_map(|channel| format!("[channels.{channel}]\n"));
    let lines = vec(prop_oneof![8 => line, 1 => table], 0..=CONFIG_LINES_MAX);
    lines.prop_map(|lines| Input(lines.concat().into_bytes()))
}

proptest! {
    #![proptest_config(cases_config(CASES_FAST))]

    #[test]
    fn frame_properties_hold_on_arbitrary_bytes(input in arbitrary_bytes()) {
        weir_fuzz::frame::check(&input.0);
    }

    #[test]
    fn frame_properties_hold_on_mutated_seeds(input in mutated(seeds_of("frame"), any::<u8>())) {
        weir_fuzz::frame::check(&input.0);
    }

    #[test]
    fn record_properties_hold_on_arbitrary_bytes(input in arbitrary_bytes()) {
        weir_fuzz::record::check(&input.0);
    }

    #[test]
    fn record_properties_hold_on_mutated_seeds(input in mutated(seeds_of("record"), any::<u8>())) {
        weir_fuzz::record::check(&input.0);
    }

    #[test]
    fn config_properties_hold_on_arbitrary_bytes(input in arbitrary_bytes()) {
        weir_fuzz::config::check(&input.0);
    }

    #[test]
    fn config_properties_hold_on_mutated_seeds(input in mutated(seeds_of("config"), config_byte())) {
        weir_fuzz::config::check(&input.0);
    }

    #[test]
    fn config_properties_hold_on_lines_of_known_keys(input in config_text()) {
        weir_fuzz::config::check(&input.0);
    }
}

proptest! {
    #![proptest_config(cases_config(CASES_SEGMENT_RECOVERY))]

    #[test]
    fn segment_recovery_properties_hold_on_arbitrary_bytes(input in arbitrary_bytes()) {
        weir_fuzz::segment_recovery::check(&input.0);
    }

    #[test]
    fn segment_recovery_properties_hold_on_mutated_seeds(input in mutated(seeds_of("segment_recovery"), any::<u8>())) {
        weir_fuzz::segment_recovery::check(&input.0);
    }
}

/// Runs `check` on `data`; the panic message if it fails.
fn run_check(check: Check, data: &[u8]) -> Result<(), String> {
    catch_unwind(|| check(data)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|message| (*message).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

#[test]
fn every_seed_passes_its_target() {
    for (target, check) in TARGETS {
        for (i, seed) in seeds_of(target).iter().enumerate() {
            if let Err(message) = run_check(check, seed) {
                panic!("{target} seed {i} fails: {message}");
            }
        }
    }
}

#[test]
fn every_fuzz_regression_input_passes_its_target() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, check) in TARGETS {
        let dir = fixtures.join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut paths: Vec<_> = entries.map(|entry| entry.expect("a fixture directory entry").path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            replayed += 1;
            if let Err(message) = run_check(check, &data) {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                failures.push(format!("{target}/{name}: {message}"));
            }
        }
    }
    // A directory that names no target would be skipped without a word.
    for entry in std::fs::read_dir(&fixtures).expect("tests/fixtures/fuzz is listed") {
        let path = entry.expect("a fixture directory entry").path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        assert!(
            !path.is_dir() || TARGETS.iter().any(|(target, _)| *target == name),
            "tests/fixtures/fuzz/{name}/ is named after no fuzz target"
        );
    }
    assert!(replayed > 0, "no regression input found in {}", fixtures.display());
    assert!(failures.is_empty(), "{} of {replayed} regression inputs fail:\n{}", failures.len(), failures.join("\n"));
}
