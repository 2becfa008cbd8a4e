//! Mutual TLS for fleetd's TCP API: both ends show a certificate issued by the cluster CA.
//!
//! The client certificate's role is its subject's organizational unit (`OU`), which
//! `openssl req -subj "/O=flotilla/OU=operator/CN=alice"` sets:
//!
//! | `OU` | [`Role`] | may |
//! |---|---|---|
//! | `operator` | [`Role::Operator`] | everything: submit, load, start, stop, unload, destroy, and read |
//! | `reader` | [`Role::Reader`] | read: list-units, list-machines, status, cat, journal |
//! | `machine` | [`Role::Machine`] | read (a fleetd relaying a journal to another); also its TCP API's server certificate |
//!
//! A certificate with none of these, or with two different ones, has no role and is refused
//! every request (403). Certificates from another CA, and connections without a
//! certificate, fail the TLS handshake. Keys and certificates are PEM files; rustls with the
//! `ring` provider (the one etcd-client's tonic uses too).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long a client may take to finish the TLS handshake before its connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many handshakes may be under way at once; a connection beyond that is closed at
/// once (a flood of silent connections costs at most this many tasks for
/// [`HANDSHAKE_TIMEOUT`]).
pub const MAX_PENDING_HANDSHAKES: usize = 128;

/// What a client certificate allows, from its subject's `OU` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `OU=operator`: may change units and read.
    Operator,
    /// `OU=reader`: may only read.
    Reader,
    /// `OU=machine`: a fleetd's machine certificate; may only read (journal relay).
    Machine,
}

impl Role {
    /// The `OU` value that grants this role.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Reader => "reader",
            Role::Machine => "machine",
        }
    }

    /// Whether this role may change units (PUT, DELETE).
    pub fn may_change(self) -> bool {
        self == Role::Operator
    }

    fn from_ou(ou: &str) -> Option<Role> {
        [Role::Operator, Role::Reader, Role::Machine]
            .into_iter()
            .find(|r| r.ou() == ou)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.ou())
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds no item of the expected kind.
    #[error("cannot read the {what} {path}: {reason}; give a PEM file (see fleetd/README.md, \"Certificates\")")]
    Pem {
        /// Which file: `CA certificate`, `certificate`, `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// rustls refused the material (a key that does not match the certificate, a CA that is
    /// not a CA certificate, ...).
    #[error("invalid TLS setup ({what}): {source}")]
    Config {
        /// What was being built.
        what: String,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA file.
    #[error("cannot verify client certificates against the CA {path}: {reason}")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
}

/// The PEM files of one side: the cluster CA, and this side's certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate(s) the other side's certificate must chain to.
    pub ca: PathBuf,
    /// This side's certificate (chain), or none (a client without a certificate).
    pub cert: Option<PathBuf>,
    /// This side's private key (with `cert`).
    pub key: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE in it".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("CA certificate", ca)? {
        roots.add(cert).map_err(|source| TlsError::Config {
            what: format!("CA certificate {}", ca.display()),
            source,
        })?;
    }
    Ok(roots)
}

/// This side's certificate chain and key, both required.
fn identity(
    files: &TlsFiles,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => Ok(Some((read_certs("certificate", cert)?, read_key(key)?))),
        (None, None) => Ok(None),
        (Some(cert), None) => Err(TlsError::Pem {
            what: "private key",
            path: cert.clone(),
            reason: "a certificate needs its key: give the key file too".into(),
        }),
        (None, Some(key)) => Err(TlsError::Pem {
            what: "certificate",
            path: key.clone(),
            reason: "a key needs its certificate: give the certificate file too".into(),
        }),
    }
}

/// The server side: presents `files`' certificate and REQUIRES a client certificate that
/// chains to `files.ca` (a client without one, or with one from another CA, fails the
/// handshake).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let Some((chain, key)) = identity(files)? else {
        return Err(TlsError::Pem {
            what: "certificate",
            path: files.ca.clone(),
            reason: "the TLS server needs its own certificate and key (--tls-cert, --tls-key)"
                .into(),
        });
    };
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider())
            .build()
            .map_err(|e| TlsError::Verifier {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            what: "protocol versions".into(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Config {
            what: "the server certificate and key".into(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// The client side: trusts only `files.ca` and presents `files`' certificate when there is
/// one.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            what: "protocol versions".into(),
            source,
        })?
        .with_root_certificates(roots(&files.ca)?);
    let config = match identity(files)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::Config {
                what: "the client certificate and key".into(),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The role and subject of a client certificate (DER): the role is `None` when the subject
/// has no `OU` naming one, or names two different ones.
pub fn role_of(cert: &[u8]) -> (Option<Role>, String) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return (None, "an unparsable certificate".into());
    };
    let subject = parsed.subject();
    let mut roles = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok().and_then(Role::from_ou));
    let first = roles.next();
    let role = match first {
        Some(r) if roles.all(|other| other == r) => Some(r),
        _ => None,
    };
    (role, subject.to_string())
}

/// Who is on the other end of a TLS connection: what the API's handlers see (axum's
/// `ConnectInfo<Peer>`).
#[derive(Clone, Debug)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Its role, from its certificate (none: it may do nothing).
    pub role: Option<Role>,
    /// Its certificate's subject, for messages and logs (`CN=alice, OU=reader, O=flotilla`).
    pub subject: String,
}

/// A TCP listener whose connections have completed a mutual-TLS handshake. Handshakes run in
/// their own tasks (at most [`HANDSHAKE_TIMEOUT`] each), so a slow or silent client holds
/// up no one, at most [`MAX_PENDING_HANDSHAKES`] at once; a failed handshake is logged with
/// the client's address and dropped.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TlsListener {
    /// Accepts on `listener` with `config` (see [`server_config`]).
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
    ) -> Result<TlsListener, std::io::Error> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        let accept_task = tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        log::warn!("api: accept on {local} failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    log::warn!(
                        "api: refused a TLS connection from {addr}: {MAX_PENDING_HANDSHAKES} handshakes are already under way"
                    );
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            log::warn!("api: refused a TLS connection from {addr}: {e}");
                            return;
                        }
                        Err(_) => {
                            log::warn!(
                                "api: refused a TLS connection from {addr}: no handshake within {HANDSHAKE_TIMEOUT:?}"
                            );
                            return;
                        }
                    };
                    let (role, subject) = match stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                    {
                        Some(cert) => role_of(cert),
                        None => (None, "no certificate".into()),
                    };
                    let _ = tx
                        .send((
                            stream,
                            Peer {
                                addr,
                                role,
                                subject,
                            },
                        ))
                        .await;
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            accept_task,
        })
    }
}

impl TlsListener {
    /// The next connection whose handshake completed, with its peer.
    pub(crate) async fn next(
        &mut self,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<TcpStream>, Peer)> {
        match self.ready.recv().await {
            Some(ready) => Ok(ready),
            // The accept task ended (it never does while the listener lives): serve nothing more.
            None => std::future::pending().await,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Opens a TLS connection to `addr` (`HOST:PORT`), verifying that the server's certificate
/// chains to the configured CA and names HOST (a DNS name or an IP address in its
/// subjectAltName).
pub async fn connect(
    config: Arc<ClientConfig>,
    addr: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']']);
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host:?} is not a DNS name or IP address: {e}"),
        )
    })?;
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config).connect(name, tcp).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_by_ou() {
        assert_eq!(Role::from_ou("operator"), Some(Role::Operator));
        assert_eq!(Role::from_ou("reader"), Some(Role::Reader));
        assert_eq!(Role::from_ou("machine"), Some(Role::Machine));
        assert_eq!(Role::from_ou("Operator"), None);
        assert!(Role::Operator.may_change());
        assert!(!Role::Reader.may_change() && !Role::Machine.may_change());
        assert_eq!(role_of(b"not a certificate").0, None);
    }
}
