//! A client of the fleetd API (what `fleetctl` uses): HTTP/1.1 over the Unix socket, TCP,
//! or TCP with mutual TLS.

use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Changed, ErrorBody, PutUnit, UnitDetail, UnitView, PREFIX};
use crate::model::{Machine, UnitState};

/// Where the API is: a Unix socket path or a TCP `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket (`/run/flotilla/fleetd.sock`, or `unix:///path`).
    Unix(PathBuf),
    /// A TCP address (`http://host:port`): plaintext, for a fleetd run with `--insecure`.
    Tcp(String),
    /// A TLS address (`https://host:port`): the server's certificate must chain to the
    /// client's CA and name `host` ([`ApiClient::with_tls`]).
    Tls(String),
}

impl Endpoint {
    /// Parses `PATH`, `unix://PATH`, `http://HOST:PORT[/]` or `https://HOST:PORT[/]`.
    pub fn parse(text: &str) -> Result<Endpoint, ClientError> {
        for (scheme, make) in [
            ("http://", Endpoint::Tcp as fn(String) -> Endpoint),
            ("https://", Endpoint::Tls),
        ] {
            if let Some(rest) = text.strip_prefix(scheme) {
                let host = rest.split('/').next().unwrap_or_default();
                if host.is_empty() {
                    return Err(ClientError::BadEndpoint(text.to_string()));
                }
                return Ok(make(host.to_string()));
            }
        }
        if text.contains("://") && !text.starts_with("unix://") {
            return Err(ClientError::BadEndpoint(text.to_string()));
        }
        let path = text.strip_prefix("unix://").unwrap_or(text);
        if path.is_empty() {
            return Err(ClientError::BadEndpoint(text.to_string()));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
            Endpoint::Tls(a) => write!(f, "https://{a}"),
        }
    }
}

/// What a call to the API can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is neither a path nor `http://host:port`.
    #[error("invalid endpoint {0:?}: give a socket path (/run/flotilla/fleetd.sock), https://HOST:PORT or http://HOST:PORT")]
    BadEndpoint(String),
    /// An `https://` endpoint without TLS settings.
    #[error("the endpoint {0} is TLS: give the cluster CA (fleetctl --ca FILE, or FLEETCTL_CA) and, to be let in, a client certificate and key (--cert, --key)")]
    NoTls(String),
    /// Nothing answers at the endpoint.
    #[error("cluster unreachable: cannot connect to {endpoint}: {source}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("cluster unreachable: the request to {endpoint} failed: {source}")]
    Http {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The TLS handshake with an `https://` endpoint failed: one side refused the other's
    /// certificate.
    #[error("TLS with {endpoint} failed: {reason}; {hint}")]
    Tls {
        /// The endpoint.
        endpoint: String,
        /// rustls' reason (`received fatal alert: CertificateRequired`, `invalid peer
        /// certificate: UnknownIssuer`, ...).
        reason: String,
        /// What to do.
        hint: &'static str,
    },
    /// The API answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The API's `error` text.
        message: String,
    },
    /// An answer that is not the expected JSON.
    #[error("unexpected answer from {endpoint}: {reason}")]
    Decode {
        /// The endpoint.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
}

impl ClientError {
    /// True for an API answer 404 (unknown unit).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, .. })
    }
}

/// A client of one fleetd API. Each call opens its own connection.
#[derive(Clone, Debug)]
pub struct ApiClient {
    endpoint: Endpoint,
    token: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl ApiClient {
    /// A client of `endpoint` (see [`Endpoint::parse`]).
    pub fn new(endpoint: &str) -> Result<ApiClient, ClientError> {
        Ok(ApiClient {
            endpoint: Endpoint::parse(endpoint)?,
            token: None,
            tls: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` (for a TCP endpoint).
    pub fn with_token(mut self, token: impl Into<String>) -> ApiClient {
        self.token = Some(token.into());
        self
    }

    /// Talks TLS with `config` to an `https://` endpoint (see [`crate::tls::client_config`]:
    /// the cluster CA and this client's certificate).
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> ApiClient {
        self.tls = Some(config);
        self
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `GET /fleet/v1/units`.
    pub async fn list_units(&self) -> Result<Vec<UnitView>, ClientError> {
        self.call(Method::GET, "/units", None::<&()>).await
    }

    /// `GET /fleet/v1/units/{name}`.
    pub async fn get_unit(&self, name: &str) -> Result<UnitDetail, ClientError> {
        self.call(Method::GET, &format!("/units/{name}"), None::<&()>)
            .await
    }

    /// `PUT /fleet/v1/units/{name}`.
    pub async fn put_unit(&self, name: &str, req: &PutUnit) -> Result<Changed, ClientError> {
        self.call(Method::PUT, &format!("/units/{name}"), Some(req))
            .await
    }

    /// `DELETE /fleet/v1/units/{name}`.
    pub async fn delete_unit(&self, name: &str) -> Result<Changed, ClientError> {
        self.call(Method::DELETE, &format!("/units/{name}"), None::<&()>)
            .await
    }

    /// `GET /fleet/v1/units/{name}/journal?lines=N&after=SEQ`: the unit's output lines from
    /// the init of the machine it runs on (relayed by the endpoint's fleetd when that is
    /// another machine).
    pub async fn journal(
        &self,
        name: &str,
        lines: u32,
        after: u64,
    ) -> Result<Vec<flotilla_init_api::LogEntry>, ClientError> {
        self.journal_query(name, &format!("lines={lines}&after={after}"))
            .await
    }

    /// [`ApiClient::journal`] of the copy on `machine` (an id or a prefix of one, for a
    /// global unit).
    pub async fn journal_on(
        &self,
        name: &str,
        lines: u32,
        after: u64,
        machine: &str,
    ) -> Result<Vec<flotilla_init_api::LogEntry>, ClientError> {
        self.journal_query(
            name,
            &format!("lines={lines}&after={after}&machine={machine}"),
        )
        .await
    }

    /// [`ApiClient::journal_on`] as one fleetd asks another on behalf of a client: the
    /// other answers from its own init or fails, never relaying again.
    pub async fn journal_relayed(
        &self,
        name: &str,
        lines: u32,
        after: u64,
        machine: &str,
    ) -> Result<Vec<flotilla_init_api::LogEntry>, ClientError> {
        self.journal_query(
            name,
            &format!("lines={lines}&after={after}&machine={machine}&relayed=1"),
        )
        .await
    }

    async fn journal_query(
        &self,
        name: &str,
        query: &str,
    ) -> Result<Vec<flotilla_init_api::LogEntry>, ClientError> {
        self.call(
            Method::GET,
            &format!("/units/{name}/journal?{query}"),
            None::<&()>,
        )
        .await
    }

    /// `GET /fleet/v1/machines`.
    pub async fn list_machines(&self) -> Result<Vec<Machine>, ClientError> {
        self.call(Method::GET, "/machines", None::<&()>).await
    }

    /// `GET /fleet/v1/reboot-lock`: the machines that hold a slot of the reboot lock.
    pub async fn reboot_lock(&self) -> Result<Vec<crate::model::RebootLockHolder>, ClientError> {
        self.call(Method::GET, "/reboot-lock", None::<&()>).await
    }

    /// `POST /fleet/v1/os/rollout`: starts a rolling OS update (refused, 409, while one
    /// runs).
    pub async fn start_rollout(
        &self,
        request: &super::StartRollout,
    ) -> Result<crate::model::Rollout, ClientError> {
        self.call(Method::POST, "/os/rollout", Some(request)).await
    }

    /// `GET /fleet/v1/os/rollout`: the rollout (running or the last one), if any.
    pub async fn rollout(&self) -> Result<Option<crate::model::Rollout>, ClientError> {
        self.call(Method::GET, "/os/rollout", None::<&()>).await
    }

    /// `GET /fleet/v1/state`.
    pub async fn list_state(&self) -> Result<Vec<UnitState>, ClientError> {
        self.call(Method::GET, "/state", None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        route: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let endpoint = self.endpoint.to_string();
        let decode = |reason: String| ClientError::Decode {
            endpoint: endpoint.clone(),
            reason,
        };
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| decode(e.to_string()))?,
            None => Vec::new(),
        };
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost".to_string(),
            Endpoint::Tcp(a) | Endpoint::Tls(a) => a.clone(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{PREFIX}{route}"))
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| decode(format!("cannot build the request: {e}")))?;
        let unreachable = |source| ClientError::Unreachable {
            endpoint: endpoint.clone(),
            source,
        };
        let http = |source| ClientError::Http {
            endpoint: endpoint.clone(),
            source,
        };
        let response = match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(unreachable)?;
                send(TokioIo::new(stream), request).await.map_err(http)?
            }
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(unreachable)?;
                send(TokioIo::new(stream), request).await.map_err(http)?
            }
            Endpoint::Tls(addr) => {
                let Some(config) = &self.tls else {
                    return Err(ClientError::NoTls(endpoint.clone()));
                };
                let stream = match crate::tls::connect(config.clone(), addr).await {
                    Ok(stream) => stream,
                    Err(e) if e.to_string().contains("invalid peer certificate") => {
                        return Err(ClientError::Tls {
                            endpoint: endpoint.clone(),
                            reason: e.to_string(),
                            hint: "the server's certificate is not from the CA given with --ca, or does not name the host of the endpoint (its subjectAltName)",
                        })
                    }
                    Err(e) => return Err(unreachable(e)),
                };
                // In TLS 1.3 the server checks the client's certificate after the client's
                // side of the handshake: a refusal shows as an alert on the first exchange.
                send(TokioIo::new(stream), request).await.map_err(|e| {
                    let chain = error_chain(&e);
                    if chain.contains("alert") {
                        ClientError::Tls {
                            endpoint: endpoint.clone(),
                            reason: chain,
                            hint: "the fleetd refused this client: give a certificate and key issued by the cluster CA (--cert, --key)",
                        }
                    } else {
                        http(e)
                    }
                })?
            }
        };
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| {
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim())
                });
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| decode(format!("{e}")))
    }
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

async fn send<S>(
    io: TokioIo<S>,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    // The connection task drives the exchange, also while the caller reads the body.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("api client connection: {e}");
        }
    });
    sender.send_request(request).await
}
