//! The broker.toml parser: `Config::parse` (what `Config::load` runs on a
//! file's text once it has checked its size and read it as UTF-8).
//!
//! Input: the text of a broker.toml; bytes that are not UTF-8 are skipped,
//! as `Config::load` refuses them before parsing.
//!
//! Errors are fine. What fails: a panic, in parsing, validation, the error
//! messages, or the conversions the broker makes from a valid config
//! (`default_log_config`, `store_config`); and a valid config that
//! `to_toml` (`weir serve --print-config`) prints as text that does not
//! parse back to the same config.

use weir::config::Config;

/// Parses `data` as a broker.toml and checks what a valid config prints.
///
/// # Panics
/// When a property does not hold: that is the finding.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = match Config::parse(text) {
        Ok(config) => config,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    let _ = config.default_log_config();
    let _ = config.store_config();
    let printed = config.to_toml();
    let reparsed = Config::parse(&printed)
        .unwrap_or_else(|error| panic!("the printed config does not parse: {error}\n--- printed:\n{printed}"));
    assert_eq!(reparsed, config, "the printed config parses to another config\n--- printed:\n{printed}");
}
