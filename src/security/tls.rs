//! TLS for the listener and the client, with rustls: PEM files read under a
//! size limit, the server's configuration swappable at run time (SIGHUP),
//! mutual TLS, and the two halves a connection is split into, plain or TLS
//! alike, so that the protocol code above does not care which it has.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_util::either::Either;

/// Largest PEM file (certificate chain, key or CA bundle) read.
pub const PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// A connection's receiving side, plain TCP or TLS.
pub type ReadHalf = Either<OwnedReadHalf, tokio::io::ReadHalf<TlsStream<TcpStream>>>;
/// A connection's sending side, plain TCP or TLS.
pub type WriteHalf = Either<OwnedWriteHalf, tokio::io::WriteHalf<TlsStream<TcpStream>>>;

/// Splits a plain socket.
pub fn split_plain(socket: TcpStream) -> (ReadHalf, WriteHalf) {
    let (read, write) = socket.into_split();
    (Either::Left(read), Either::Left(write))
}

/// Splits an established TLS stream.
pub fn split_tls(stream: TlsStream<TcpStream>) -> (ReadHalf, WriteHalf) {
    let (read, write) = tokio::io::split(stream);
    (Either::Right(read), Either::Right(write))
}

/// Writes what the socket takes now, without waiting. A TLS half never
/// does (`WouldBlock`): its bytes must be encrypted in order by whoever
/// holds the stream, so its writes all go through the writer task.
pub fn try_write(half: &WriteHalf, bytes: &[u8]) -> std::io::Result<usize> {
    match half {
        Either::Left(plain) => plain.try_write(bytes),
        Either::Right(_) => Err(std::io::ErrorKind::WouldBlock.into()),
    }
}

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {size_bytes} bytes; a PEM file is at most {PEM_FILE_BYTES_MAX}")]
    TooLarge { path: PathBuf, size_bytes: u64 },
    #[error("{path}: {problem}")]
    Pem { path: PathBuf, problem: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("{0:?} is not a host name or IP address to verify the broker's certificate against")]
    ServerName(String),
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |source| TlsError::Read { path: path.to_owned(), source };
    match super::read_file_at_most(path, PEM_FILE_BYTES_MAX).map_err(read_error)? {
        (_, Some(bytes)) => Ok(bytes),
        (metadata, None) => Err(TlsError::TooLarge { path: path.to_owned(), size_bytes: metadata.len() }),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem { path: path.to_owned(), problem: error.to_string() })?;
    if certificates.is_empty() {
        return Err(TlsError::Pem { path: path.to_owned(), problem: "no CERTIFICATE section".into() });
    }
    Ok(certificates)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|error| TlsError::Pem { path: path.to_owned(), problem: format!("no usable private key ({error})") })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path)? {
        roots.add(certificate).map_err(|error| TlsError::Pem {
            path: path.to_owned(),
            problem: format!("bad CA certificate: {error}"),
        })?;
    }
    Ok(roots)
}

/// ring's suites, AES-128-GCM first: with AES instructions it is about a
/// third cheaper than AES-256-GCM (ring's first choice) for the same
/// protection against anyone but a quantum adversary, and both ends of a
/// weir connection prefer it.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::{
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS13_AES_128_GCM_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    let preferred =
        [TLS13_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256];
    // Stable: the others keep ring's order.
    provider.cipher_suites.sort_by_key(|suite| !preferred.contains(&suite.suite()));
    Arc::new(provider)
}

/// The files a TLS listener is configured from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, clients must present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Reads the files and builds the configuration: TLS 1.2 and 1.3.
    ///
    /// # Errors
    /// A file cannot be read or holds nothing usable, or the key does not
    /// match the certificate.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certificates(&self.cert)?;
        let key = private_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|error| TlsError::Config(format!("client CA {}: {error}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).map_err(|error| {
            TlsError::Config(format!("{} and {}: {error}", self.cert.display(), self.key.display()))
        })?;
        Ok(Arc::new(config))
    }
}

/// The listener's TLS configuration, replaced whole by [`Self::reload`]:
/// handshakes from then on use the new one, established connections keep
/// theirs.
pub struct ServerTls {
    files: ServerTlsFiles,
    config: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// # Errors
    /// As [`ServerTlsFiles::load`].
    pub fn new(files: ServerTlsFiles) -> Result<ServerTls, TlsError> {
        let config = files.load()?;
        Ok(ServerTls { files, config: RwLock::new(config) })
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner())))
    }

    /// Reads the files again; on an error the old configuration stays.
    ///
    /// # Errors
    /// As [`ServerTlsFiles::load`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = self.files.load()?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }
}

/// The common name of the subject of a verified client certificate, the
/// principal of a mutual-TLS connection.
pub fn peer_common_name(stream: &TlsStream<TcpStream>) -> Option<String> {
    let (_, connection) = stream.get_ref();
    let certificate = connection.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_owned())
}

/// How a client connects over TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// The CA that signed the broker's certificate (PEM); without it, the
    /// system's trusted roots.
    pub ca: Option<PathBuf>,
    /// The client's certificate chain and key, for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsOptions {
    /// Builds a connector.
    ///
    /// # Errors
    /// A file cannot be read or holds nothing usable, only one of `cert`
    /// and `key` is given, or the system has no trusted roots.
    pub fn connector(&self) -> Result<TlsConnector, TlsError> {
        let roots = match &self.ca {
            Some(ca) => roots(ca)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError::Config("no CA given (--tls-ca) and the system has no trusted roots".into()));
                }
                roots
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates(cert)?, private_key(key)?)
                .map_err(|error| TlsError::Config(format!("{} and {}: {error}", cert.display(), key.display())))?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs both its certificate and its key (--tls-cert and --tls-key)".into(),
                ));
            }
        };
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// The name the broker's certificate is verified against: the host part of
/// `addr` (`host:port`, `[v6]:port`).
///
/// # Errors
/// The host is neither a DNS name nor an IP address.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_of_the_address() {
        assert_eq!(server_name("127.0.0.1:7450").unwrap(), ServerName::try_from("127.0.0.1").unwrap());
        assert_eq!(server_name("[::1]:7450").unwrap(), ServerName::try_from("::1").unwrap());
        assert_eq!(server_name("broker.example:7450").unwrap(), ServerName::try_from("broker.example").unwrap());
        assert!(server_name("bad host:7450").is_err());
    }

    #[test]
    fn unreadable_or_empty_pem_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let files = ServerTlsFiles { cert: empty.clone(), key: empty.clone(), client_ca: None };
        assert!(matches!(files.load(), Err(TlsError::Pem { .. })));
        let missing = ServerTlsFiles { cert: dir.path().join("missing.pem"), key: empty, client_ca: None };
        assert!(matches!(missing.load(), Err(TlsError::Read { .. })));
    }
}
