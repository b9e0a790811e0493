//! Principals: the credentials file (users, token hashes, permissions,
//! quotas), read under limits and refused when others may read it, and the
//! permission check on channel and group names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng};
use serde::Deserialize;

use super::quota::{Quotas, Usage};

/// Largest credentials file read.
pub const CREDENTIALS_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Most users in a credentials file; it also bounds the `principal` label
/// of metrics.
pub const PRINCIPALS_MAX: usize = 1000;
/// Most patterns in one permission list of one user.
pub const PATTERNS_PER_LIST_MAX: usize = 1000;
/// Longest token `weir credentials hash` takes: what HELLO can carry
/// after the name and its colon.
pub const PRINCIPAL_TOKEN_BYTES_MAX: usize = crate::protocol::AUTH_TOKEN_BYTES_MAX - PRINCIPAL_NAME_BYTES_MAX - 1;
/// Longest user name; a name is 1 to this many bytes of `A-Z a-z 0-9 . _ -
/// @` (no `:`, which separates it from the token in HELLO).
pub const PRINCIPAL_NAME_BYTES_MAX: usize = 255;

/// What a request asks to do, checked against the principal's lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// PUBLISH and PUBLISH_BATCH.
    Publish,
    /// SUBSCRIBE and FETCH.
    Subscribe,
    /// CREATE_CHANNEL, ALTER_CHANNEL, DELETE_CHANNEL, LIST_GROUPS, and the
    /// creation of a channel by a first publish or subscribe.
    Admin,
    /// Joining (or naming) a consumer group.
    Group,
}

impl Operation {
    pub const ALL: [Operation; 4] = [Operation::Publish, Operation::Subscribe, Operation::Admin, Operation::Group];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Admin => "admin",
            Operation::Group => "group",
        }
    }
}

/// A channel or group name pattern: `*` (every name), `prefix.*` (every
/// name that starts with `prefix.`), or an exact name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    All,
    /// Holds the prefix with its final dot.
    Prefix(String),
    Exact(String),
}

impl Pattern {
    /// # Errors
    /// Empty, or a `*` anywhere but alone or after a final dot.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text == "*" {
            return Ok(Pattern::All);
        }
        if let Some(prefix) = text.strip_suffix('*') {
            if !prefix.ends_with('.') || prefix.len() < 2 || prefix.contains('*') {
                return Err(format!("{text:?}: `*` may only stand alone or follow a final dot (orders.*)"));
            }
            return Ok(Pattern::Prefix(prefix.to_owned()));
        }
        if text.is_empty() || text.contains('*') {
            return Err(format!("{text:?} is neither a name, a prefix pattern (orders.*) nor *"));
        }
        Ok(Pattern::Exact(text.to_owned()))
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
            Pattern::Exact(exact) => name == exact,
        }
    }
}

/// What a principal may do, per operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<Pattern>,
    pub subscribe: Vec<Pattern>,
    pub admin: Vec<Pattern>,
    pub groups: Vec<Pattern>,
}

impl Permissions {
    /// Everything: the legacy shared token, an anonymous broker, or a
    /// certificate principal without a credentials file.
    pub fn all() -> Permissions {
        Permissions {
            publish: vec![Pattern::All],
            subscribe: vec![Pattern::All],
            admin: vec![Pattern::All],
            groups: vec![Pattern::All],
        }
    }

    fn list(&self, operation: Operation) -> &[Pattern] {
        match operation {
            Operation::Publish => &self.publish,
            Operation::Subscribe => &self.subscribe,
            Operation::Admin => &self.admin,
            Operation::Group => &self.groups,
        }
    }

    /// Whether `operation` is allowed on the channel (or group) `name`.
    pub fn allows(&self, operation: Operation, name: &str) -> bool {
        self.list(operation).iter().any(|pattern| pattern.matches(name))
    }

    /// Whether the principal may know who reads the channel `name` (its
    /// subscriptions' durable and group names): `subscribe` or `admin`.
    pub fn reads(&self, name: &str) -> bool {
        self.allows(Operation::Subscribe, name) || self.allows(Operation::Admin, name)
    }

    /// Whether the principal may know that the channel `name` exists: any
    /// channel permission on it.
    pub fn sees(&self, name: &str) -> bool {
        [Operation::Publish, Operation::Subscribe, Operation::Admin].into_iter().any(|op| self.allows(op, name))
    }
}

/// Who a connection is, once HELLO is accepted.
#[derive(Debug)]
pub struct Principal {
    pub name: String,
    pub permissions: Permissions,
    /// The principal's quotas and what it uses of them, shared by its
    /// connections (and kept across a reload that leaves its quotas alone).
    pub usage: Arc<Usage>,
    /// Whether its name may label metrics (users of the credentials file,
    /// and the fixed names); else its refusals count under `other`.
    pub labelled: bool,
}

/// One user of the credentials file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    /// An argon2 PHC string (`weir credentials hash`). Absent: the user can
    /// only connect with a client certificate whose common name is `name`.
    token_hash: Option<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    quotas: Quotas,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

/// Why a credentials file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("cannot read credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials file {path} is {size_bytes} bytes; at most {CREDENTIALS_FILE_BYTES_MAX}")]
    TooLarge { path: PathBuf, size_bytes: u64 },
    #[error(
        "credentials file {path} has mode {mode:o}: it must not be readable or writable by group or others (chmod 600)"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("credentials file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A user's entry, checked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct User {
    pub name: String,
    /// The PHC string, checked to parse.
    pub token_hash: Option<String>,
    pub permissions: Permissions,
    pub quotas: Quotas,
}

/// The users of a credentials file, by name.
#[derive(Debug, Default)]
pub(crate) struct Users {
    pub by_name: HashMap<String, User>,
}

fn valid_principal_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= PRINCIPAL_NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

impl Users {
    /// Reads and checks a credentials file.
    ///
    /// # Errors
    /// The file cannot be read, is too large, others may read or write it,
    /// or an entry is invalid.
    pub fn load(path: &Path) -> Result<Users, CredentialsError> {
        let read_error = |source| CredentialsError::Read { path: path.to_owned(), source };
        let (metadata, bytes) = super::read_file_at_most(path, CREDENTIALS_FILE_BYTES_MAX).map_err(read_error)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(CredentialsError::Exposed { path: path.to_owned(), mode });
            }
        }
        let Some(bytes) = bytes else {
            return Err(CredentialsError::TooLarge { path: path.to_owned(), size_bytes: metadata.len() });
        };
        let text = String::from_utf8(bytes)
            .map_err(|_| CredentialsError::Invalid { path: path.to_owned(), message: "not UTF-8".into() })?;
        Users::parse(&text).map_err(|message| CredentialsError::Invalid { path: path.to_owned(), message })
    }

    /// # Errors
    /// A message naming the offending user and field.
    pub fn parse(text: &str) -> Result<Users, String> {
        let file: CredentialsFile = toml::from_str(text).map_err(|error| error.message().to_owned())?;
        if file.users.len() > PRINCIPALS_MAX {
            return Err(format!("{} users; at most {PRINCIPALS_MAX}", file.users.len()));
        }
        let mut by_name = HashMap::with_capacity(file.users.len());
        for entry in file.users {
            let name = entry.name;
            if !valid_principal_name(&name) || super::RESERVED_PRINCIPALS.contains(&name.as_str()) {
                return Err(format!(
                    "user {name:?}: a name is 1 to {PRINCIPAL_NAME_BYTES_MAX} bytes of A-Z a-z 0-9 . _ - @, and not one of {:?}",
                    super::RESERVED_PRINCIPALS
                ));
            }
            if let Some(hash) = &entry.token_hash {
                check_token_hash(hash).map_err(|problem| format!("user {name}: token_hash {problem}"))?;
            }
            let patterns = |field: &str, list: Vec<String>| -> Result<Vec<Pattern>, String> {
                if list.len() > PATTERNS_PER_LIST_MAX {
                    return Err(format!(
                        "user {name}: {field} has {} patterns; at most {PATTERNS_PER_LIST_MAX}",
                        list.len()
                    ));
                }
                list.iter().map(|text| Pattern::parse(text).map_err(|e| format!("user {name}: {field}: {e}"))).collect()
            };
            let permissions = Permissions {
                publish: patterns("publish", entry.publish)?,
                subscribe: patterns("subscribe", entry.subscribe)?,
                admin: patterns("admin", entry.admin)?,
                groups: patterns("groups", entry.groups)?,
            };
            entry.quotas.validate().map_err(|message| format!("user {name}: quotas.{message}"))?;
            let user = User { name: name.clone(), token_hash: entry.token_hash, permissions, quotas: entry.quotas };
            if by_name.insert(name.clone(), user).is_some() {
                return Err(format!("user {name} appears twice"));
            }
        }
        Ok(Users { by_name })
    }
}

/// A hash of `token` to put in a credentials file: argon2id with its
/// default parameters and a random salt, as a PHC string.
///
/// # Errors
/// The hasher failed (it does not, for a token of sane length).
pub fn hash_token(token: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(token.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| error.to_string())
}

/// Most memory an argon2 token hash may ask per verification (64 MiB):
/// every verification of a HELLO costs that much, and a hash with more
/// would let the credentials file turn HELLOs into a memory hog.
pub const ARGON2_MEMORY_KIB_MAX: u32 = 64 * 1024;
/// Most passes an argon2 token hash may ask.
pub const ARGON2_PASSES_MAX: u32 = 10;
/// Most lanes an argon2 token hash may ask.
pub const ARGON2_LANES_MAX: u32 = 4;

/// Checks that a PHC string is an argon2id hash within the parameter
/// bounds above.
fn check_token_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|error| format!("is not a PHC string ({error})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!("uses {}; weir verifies argon2id (weir credentials hash)", parsed.algorithm));
    }
    let params = argon2::Params::try_from(&parsed).map_err(|error| format!("has bad parameters ({error})"))?;
    if params.m_cost() > ARGON2_MEMORY_KIB_MAX
        || params.t_cost() > ARGON2_PASSES_MAX
        || params.p_cost() > ARGON2_LANES_MAX
    {
        return Err(format!(
            "asks m={}, t={}, p={}; at most m={ARGON2_MEMORY_KIB_MAX}, t={ARGON2_PASSES_MAX}, p={ARGON2_LANES_MAX}",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

/// Whether `token` matches the PHC string `hash` (compared in constant
/// time by the hasher). Costs one argon2 evaluation: call it off the
/// async threads.
pub fn verify_token(token: &[u8], hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default().verify_password(token, &parsed).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_names_dot_prefixes_and_everything() {
        let prefix = Pattern::parse("orders.*").unwrap();
        assert!(prefix.matches("orders.eu"));
        assert!(prefix.matches("orders.eu.paid"));
        assert!(!prefix.matches("orders"));
        assert!(!prefix.matches("ordersx"));
        assert!(!prefix.matches("audit.orders.eu"));
        let exact = Pattern::parse("audit").unwrap();
        assert!(exact.matches("audit"));
        assert!(!exact.matches("audit.x"));
        assert!(Pattern::parse("*").unwrap().matches("anything"));
        for bad in ["", "orders*", "or*ders", ".*", "*.orders", "a.*.*"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn a_credentials_file_is_parsed_and_checked() {
        let hash = hash_token("s3cret").unwrap();
        let text = format!(
            "[[users]]\nname = \"orders-service\"\ntoken_hash = \"{hash}\"\npublish = [\"orders.*\"]\nsubscribe = [\"audit\"]\ngroups = [\"billing\"]\n[users.quotas]\npublish_messages_per_sec = 100\n\n[[users]]\nname = \"cert-only\"\nadmin = [\"*\"]\n"
        );
        let users = Users::parse(&text).unwrap();
        let orders = &users.by_name["orders-service"];
        assert!(orders.permissions.allows(Operation::Publish, "orders.eu"));
        assert!(!orders.permissions.allows(Operation::Subscribe, "orders.eu"));
        assert!(orders.permissions.allows(Operation::Group, "billing"));
        assert_eq!(orders.quotas.publish_messages_per_sec, Some(100));
        assert!(users.by_name["cert-only"].token_hash.is_none());
        assert!(verify_token(b"s3cret", orders.token_hash.as_deref().unwrap()));
        assert!(!verify_token(b"s3creT", orders.token_hash.as_deref().unwrap()));
    }

    #[test]
    fn bad_entries_are_refused_with_the_user_named() {
        for (text, expected) in [
            ("[[users]]\nname = \"a:b\"\n", "a:b"),
            ("[[users]]\nname = \"default\"\n", "default"),
            ("[[users]]\nname = \"x\"\ntoken_hash = \"plain\"\n", "user x: token_hash"),
            (
                "[[users]]\nname = \"x\"\ntoken_hash = \"$argon2id$v=19$m=1048576,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$ZQd3eQrRJ7bJ0o0cPz7sUJ8mHbJ9z6mGqGkF4aX2b1c\"\n",
                "asks m=1048576",
            ),
            (
                "[[users]]\nname = \"x\"\ntoken_hash = \"$argon2i$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$ZQd3eQrRJ7bJ0o0cPz7sUJ8mHbJ9z6mGqGkF4aX2b1c\"\n",
                "uses argon2i",
            ),
            ("[[users]]\nname = \"x\"\npublish = [\"a*\"]\n", "user x: publish"),
            ("[[users]]\nname = \"x\"\n[[users]]\nname = \"x\"\n", "twice"),
            ("[[users]]\nname = \"x\"\nsurprise = 1\n", "surprise"),
            ("[[users]]\nname = \"x\"\n[users.quotas]\npublish_bytes_per_sec = 0\n", "publish_bytes_per_sec"),
        ] {
            let error = Users::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn a_credentials_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Users::load(&path), Err(CredentialsError::Exposed { mode: 0o644, .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Users::load(&path).unwrap().by_name.is_empty());
    }
}
