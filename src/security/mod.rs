//! Who may talk to the broker, and how much: TLS for the transport
//! (`tls`), principals with per-channel permissions (`principal`), and
//! quotas per principal (`quota`). The [`Authenticator`] turns a HELLO's
//! credential (and a mutual-TLS certificate) into a [`Principal`]; SIGHUP
//! reloads its credentials in place, and connections whose principal the
//! reload changed are closed. docs/SECURITY.md has the threat model.

pub mod principal;
pub mod quota;
pub mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq;

pub use principal::{CredentialsError, Operation, Pattern, Permissions, Principal};
pub use quota::{ConnectionSlot, Quotas, Usage};

use principal::Users;

/// The principal of the shared `auth_token` of broker.toml: every
/// permission, no quotas.
pub const LEGACY_PRINCIPAL: &str = "default";
/// The principal of every connection to a broker with no authentication
/// configured.
pub const ANONYMOUS_PRINCIPAL: &str = "anonymous";
/// The metrics label of principals not named in the credentials file
/// (certificate principals without one), so that labels stay bounded.
pub const OTHER_PRINCIPALS_LABEL: &str = "other";
/// Names a credentials file may not give a user.
pub const RESERVED_PRINCIPALS: [&str; 3] = [LEGACY_PRINCIPAL, ANONYMOUS_PRINCIPAL, OTHER_PRINCIPALS_LABEL];

/// Most argon2 verifications running at once, each about 20 ms of CPU and
/// at most [`principal::ARGON2_MEMORY_KIB_MAX`] KiB: HELLOs beyond wait.
pub const VERIFICATIONS_CONCURRENT_MAX: usize = 4;

/// A PHC string verified when a HELLO names no known user, so that an
/// unknown name costs as much as a wrong token and does not show.
const DECOY_TOKEN_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$ZQd3eQrRJ7bJ0o0cPz7sUJ8mHbJ9z6mGqGkF4aX2b1c";

/// Where the broker's principals come from (broker.toml).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// The legacy shared token: the principal `default`.
    pub auth_token: Option<String>,
    pub credentials_file: Option<PathBuf>,
    /// Whether clients present certificates a CA of ours signed.
    pub mutual_tls: bool,
}

impl AuthSettings {
    /// Whether any client may connect without a credential.
    pub fn is_open(&self) -> bool {
        self.auth_token.is_none() && self.credentials_file.is_none() && !self.mutual_tls
    }
}

/// The principals, as of the last (re)load.
struct Principals {
    users: Users,
    by_name: HashMap<String, Arc<Principal>>,
}

/// Turns credentials into principals.
pub struct Authenticator {
    /// Bounds the argon2 verifications running at once.
    pub verifications: tokio::sync::Semaphore,
    settings: AuthSettings,
    principals: RwLock<Arc<Principals>>,
    legacy: Arc<Principal>,
    anonymous: Arc<Principal>,
    /// Counts the reloads, for connections to check their principal after
    /// each (see [`Authenticator::is_current`]).
    reloads: tokio::sync::watch::Sender<u64>,
}

fn everything(name: &str) -> Arc<Principal> {
    Arc::new(Principal {
        name: name.to_owned(),
        permissions: Permissions::all(),
        usage: Arc::new(Usage::unlimited()),
        labelled: true,
    })
}

impl Authenticator {
    /// # Errors
    /// The credentials file cannot be read or is refused.
    pub fn new(settings: AuthSettings) -> Result<Authenticator, CredentialsError> {
        let principals = Authenticator::load(&settings, None)?;
        Ok(Authenticator {
            verifications: tokio::sync::Semaphore::new(VERIFICATIONS_CONCURRENT_MAX),
            settings,
            principals: RwLock::new(Arc::new(principals)),
            legacy: everything(LEGACY_PRINCIPAL),
            anonymous: everything(ANONYMOUS_PRINCIPAL),
            reloads: tokio::sync::watch::Sender::new(0),
        })
    }

    fn load(settings: &AuthSettings, previous: Option<&Principals>) -> Result<Principals, CredentialsError> {
        let users = match &settings.credentials_file {
            Some(path) => Users::load(path)?,
            None => Users::default(),
        };
        let by_name = users
            .by_name
            .values()
            .map(|user| {
                // A principal whose quotas did not change keeps its buckets
                // and connection count across a reload.
                // A changed one starts afresh, but keeps counting the
                // connections the principal has open.
                let old = previous.and_then(|previous| previous.by_name.get(&user.name));
                // An entry that did not change keeps its principal: the
                // connections holding it stay (see `is_current`).
                let unchanged = previous.and_then(|previous| previous.users.by_name.get(&user.name)) == Some(user);
                if let Some(old) = old.filter(|_| unchanged) {
                    return (user.name.clone(), Arc::clone(old));
                }
                let usage = match old {
                    Some(old) if old.usage.quotas == user.quotas => Arc::clone(&old.usage),
                    Some(old) => Arc::new(old.usage.with_quotas(user.quotas)),
                    None => Arc::new(Usage::new(user.quotas)),
                };
                let principal =
                    Principal { name: user.name.clone(), permissions: user.permissions.clone(), usage, labelled: true };
                (user.name.clone(), Arc::new(principal))
            })
            .collect();
        Ok(Principals { users, by_name })
    }

    /// Reads the credentials file again; on an error nothing changes.
    /// Connections whose user was removed or changed (token, permissions,
    /// quotas) find out through [`Authenticator::reloads`] and
    /// [`Authenticator::is_current`].
    ///
    /// # Errors
    /// As [`Authenticator::new`].
    pub fn reload(&self) -> Result<usize, CredentialsError> {
        let current = self.current();
        let principals = Authenticator::load(&self.settings, Some(&current))?;
        let count = principals.by_name.len();
        *self.principals.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(principals);
        self.reloads.send_modify(|reloads| *reloads += 1);
        Ok(count)
    }

    /// Changes with every successful reload.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Whether `principal` is still what the credentials say: false for a
    /// user the last reload removed or changed. The shared token's, the
    /// anonymous and the certificate principals of a broker without a
    /// credentials file do not come from that file and stay current.
    pub fn is_current(&self, principal: &Arc<Principal>) -> bool {
        if Arc::ptr_eq(principal, &self.legacy)
            || Arc::ptr_eq(principal, &self.anonymous)
            || self.settings.credentials_file.is_none()
        {
            return true;
        }
        self.current().by_name.get(&principal.name).is_some_and(|current| Arc::ptr_eq(current, principal))
    }

    fn current(&self) -> Arc<Principals> {
        Arc::clone(&self.principals.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether authenticating can be slow (an argon2 evaluation, which
    /// only a credentials file brings): then it runs on the blocking pool,
    /// at most [`VERIFICATIONS_CONCURRENT_MAX`] at once.
    pub fn verifies_hashes(&self) -> bool {
        self.settings.credentials_file.is_some()
    }

    /// The principal of a HELLO carrying `credential` (empty, the legacy
    /// token, or `name:token`) on a connection whose verified client
    /// certificate, if any, names `certificate_name`. Costs an argon2
    /// evaluation for a `name:token` credential.
    ///
    /// # Errors
    /// Why it was refused, for the log (the client is told less).
    pub fn authenticate(&self, credential: &[u8], certificate_name: Option<&str>) -> Result<Arc<Principal>, String> {
        if self.settings.is_open() {
            return Ok(Arc::clone(&self.anonymous));
        }
        let principals = self.current();
        if credential.is_empty() {
            let Some(name) = certificate_name else { return Err("no credential".into()) };
            if self.settings.credentials_file.is_none() {
                // Any certificate our CA signed, with every permission.
                return Ok(Arc::new(Principal {
                    name: name.to_owned(),
                    permissions: Permissions::all(),
                    usage: Arc::new(Usage::unlimited()),
                    labelled: false,
                }));
            }
            return principals
                .by_name
                .get(name)
                .cloned()
                .ok_or_else(|| format!("certificate name {name:?} is not a user of the credentials file"));
        }
        if let Some(expected) = &self.settings.auth_token
            && bool::from(expected.as_bytes().ct_eq(credential))
        {
            return Ok(Arc::clone(&self.legacy));
        }
        if self.settings.credentials_file.is_none() {
            // No users: nothing to verify, and no names to hide.
            return Err("wrong credential".into());
        }
        let (name, token) = match std::str::from_utf8(credential).ok().and_then(|text| text.split_once(':')) {
            Some((name, token)) => (name, token),
            None => ("", ""),
        };
        let user = principals.users.by_name.get(name);
        let hash = user.and_then(|user| user.token_hash.as_deref());
        let verified = principal::verify_token(token.as_bytes(), hash.unwrap_or(DECOY_TOKEN_HASH));
        match principals.by_name.get(name) {
            Some(principal) if verified && hash.is_some() => Ok(Arc::clone(principal)),
            _ => Err("wrong credential".into()),
        }
    }
}

/// Reads a file of at most `max_bytes` (never allocating more), with the
/// metadata of the same open file. `Ok((metadata, None))` when it is
/// larger.
pub(crate) fn read_file_at_most(
    path: &std::path::Path,
    max_bytes: u64,
) -> std::io::Result<(std::fs::Metadata, Option<Vec<u8>>)> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let metadata = file.metadata()?;
    let mut bytes = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    Ok((metadata, (bytes.len() as u64 <= max_bytes).then_some(bytes)))
}

/// The metrics label of a principal.
pub fn principal_label(principal: &Principal) -> &str {
    if principal.labelled { &principal.name } else { OTHER_PRINCIPALS_LABEL }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_users(text: &str) -> (tempfile::TempDir, Authenticator) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let settings =
            AuthSettings { auth_token: Some("legacy".into()), credentials_file: Some(path), mutual_tls: true };
        (dir, Authenticator::new(settings).unwrap())
    }

    #[test]
    fn the_decoy_hash_parses() {
        assert!(argon2::password_hash::PasswordHash::new(DECOY_TOKEN_HASH).is_ok());
    }

    #[test]
    fn credentials_map_to_principals() {
        let hash = principal::hash_token("t0ken").unwrap();
        let (_dir, auth) = with_users(&format!(
            "[[users]]\nname = \"app\"\ntoken_hash = \"{hash}\"\npublish = [\"a.*\"]\n[[users]]\nname = \"cert\"\n"
        ));
        assert_eq!(auth.authenticate(b"app:t0ken", None).unwrap().name, "app");
        assert!(auth.authenticate(b"app:wrong", None).is_err());
        assert!(auth.authenticate(b"nobody:t0ken", None).is_err());
        assert!(auth.authenticate(b"", None).is_err());
        assert_eq!(auth.authenticate(b"legacy", None).unwrap().name, LEGACY_PRINCIPAL);
        // A user without a token hash is reachable only by certificate.
        assert!(auth.authenticate(b"cert:", None).is_err());
        assert_eq!(auth.authenticate(b"", Some("cert")).unwrap().name, "cert");
        assert!(auth.authenticate(b"", Some("stranger")).is_err());
    }

    #[test]
    fn an_open_broker_lets_everyone_in_as_anonymous() {
        let auth = Authenticator::new(AuthSettings::default()).unwrap();
        let principal = auth.authenticate(b"whatever", None).unwrap();
        assert_eq!(principal.name, ANONYMOUS_PRINCIPAL);
        assert!(principal.permissions.allows(Operation::Admin, "x"));
    }
}
