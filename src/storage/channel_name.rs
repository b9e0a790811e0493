//! Channel names: validated once, then carried as a type so that no path is
//! ever built from an unchecked string.

use std::fmt;

/// Longest channel name, in bytes (all allowed characters are ASCII).
pub const CHANNEL_NAME_BYTES_MAX: usize = 255;

/// A valid channel name: 1 to 255 characters of `[A-Za-z0-9._-]`, and
/// neither `.` nor `..`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelName(String);

/// A channel name that breaks the naming rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid channel name {shown:?}: {problem}; a channel name is 1 to 255 characters of A-Z a-z 0-9 . _ - and is not \".\" or \"..\""
)]
#[non_exhaustive]
pub struct ChannelNameError {
    /// The name as given, cut to a printable length.
    pub shown: String,
    pub problem: &'static str,
}

impl ChannelName {
    /// Validates `name`.
    ///
    /// # Errors
    /// [`ChannelNameError`] stating the rule.
    pub fn new(name: &str) -> Result<ChannelName, ChannelNameError> {
        let fail = |problem| Err(ChannelNameError { shown: name.chars().take(64).collect(), problem });
        if name.is_empty() {
            return fail("it is empty");
        }
        if name.len() > CHANNEL_NAME_BYTES_MAX {
            return fail("it is longer than 255 characters");
        }
        if name == "." || name == ".." {
            return fail("it is a path component");
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
            return fail("it contains a character outside the allowed set");
        }
        Ok(ChannelName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        assert!(ChannelName::new("orders.v2_eu-west").is_ok());
        assert!(ChannelName::new(&"a".repeat(255)).is_ok());
        assert!(ChannelName::new(&"a".repeat(256)).is_err());
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é", "a\0b", "a\\b"] {
            assert!(ChannelName::new(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(ChannelName::new("...").is_ok());
    }
}
