//! fleetd's HTTP/JSON API, modelled on fleet's v1 API, for `fleetctl` and scripts.
//!
//! Served with [axum] on a Unix socket (mode 0600: only root talks to it) and, optionally,
//! on a TCP address: over mutual TLS ([`serve_tls`]: the client certificate's role decides,
//! see [`crate::tls`]), or, only when asked for (`fleetd --insecure`), in plaintext with a
//! bearer token ([`serve_tcp`]). On the Unix socket a caller inside a unit is served only if
//! that unit is granted the control API (`[container] control_api = true`): [`PeerGate`],
//! with the rules of [`flotilla_init_api::access`]. Routes:
//!
//! | route | what |
//! |---|---|
//! | `GET /fleet/v1/units` | every unit: [`UnitView`] |
//! | `GET /fleet/v1/units/{name}` | one unit with its body: [`UnitDetail`] |
//! | `PUT /fleet/v1/units/{name}` | [`PutUnit`]: create a unit or change its desired state |
//! | `DELETE /fleet/v1/units/{name}` | remove a unit |
//! | `GET /fleet/v1/units/{name}/journal?lines=N&after=SEQ&machine=ID` | the unit's output from the init of the machine it runs on (relayed to that machine's TCP API when it is another): [`flotilla_init_api::LogEntry`] |
//! | `GET /fleet/v1/machines` | the live machines: [`crate::Machine`] |
//! | `GET /fleet/v1/state` | every reported state: [`crate::UnitState`] |
//! | `GET /fleet/v1/reboot-lock` | the reboot lock's holders: [`crate::RebootLockHolder`] |
//! | `POST /fleet/v1/os/rollout` | [`StartRollout`]: start a rolling OS update through the present machines (201 with the [`crate::Rollout`]; 409 while one runs) |
//! | `GET /fleet/v1/os/rollout` | the rollout (running or the last one), or `null` |
//! | `GET`/`HEAD /v2/{name}/blobs/sha256:{hex}` | a blob of this machine's image store, for peers' pulls (TCP only; over TLS `OU=machine` only): [`blobs`] |
//! | `POST /v2/_flotilla/claims/sha256:{hex}` | claim the fetch of an image from the registry in a rollout (same rules): [`blobs::claim`] |
//! | `DELETE /v2/_flotilla/claims/sha256:{hex}` | the holder's pull failed: release its claim (same rules): [`blobs::release`] |
//!
//! Errors are `{ "error": "..." }` ([`ErrorBody`]) with the matching status: 400 for a bad
//! request (an invalid unit file, with its `file:line:col`), 401 without the token on
//! plaintext TCP, 403 for a TLS client whose certificate's role does not allow the request
//! or a caller in a unit without the control API grant (on the Unix socket),
//! 404 for an unknown unit, 409 for a different body without `replace` (and for the journal
//! of a unit that runs on another machine this fleetd cannot relay to), 502 when that relay
//! fails, 503 when the registry or the local init fails. Every request that changes state is logged.

pub mod blobs;
pub mod client;
mod serve;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use flotilla_init_api::access;
use flotilla_init_api::peer::{self, PeerCred};
use flotilla_init_api::{ActiveState, SubState, Wire};

use crate::agent::InitApi;
use crate::engine::EngineStatus;
use crate::error::RegistryError;
use crate::model::{body_hash, DesiredState, Machine, UnitRecord, UnitState};
use crate::registry::Registry;
use crate::tls::{Peer, Role, TlsListener};

pub use self::client::{ApiClient, ClientError};
pub use self::serve::ServeLimits;

/// The default Unix socket of the API.
pub const DEFAULT_SOCKET: &str = "/run/flotilla/fleetd.sock";

/// The route prefix, as fleet has it.
pub const PREFIX: &str = "/fleet/v1";

/// The state of one unit on one machine, as its agent reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateView {
    /// The machine that reports it.
    pub machine: String,
    /// Active state (`active`, `inactive`, `failed`, ...; JSON: the string).
    pub state: Wire<ActiveState>,
    /// Sub state (`running`, `dead`, ...; JSON: the string).
    pub sub: Wire<SubState>,
    /// The main pid, while there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The body hash the machine runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// A unit as `GET /fleet/v1/units` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitView {
    /// The unit name.
    pub name: String,
    /// The desired state: `inactive`, `loaded` or `launched`.
    pub desired: DesiredState,
    /// The sha256 of its body.
    pub hash: String,
    /// The machine it is assigned to (none for global and unscheduled units).
    pub machine: Option<String>,
    /// The active state reported by that machine (`active`, `inactive`, `failed`, ...).
    pub state: Option<Wire<ActiveState>>,
    /// The sub state reported by that machine (`running`, `dead`, ...).
    pub sub: Option<Wire<SubState>>,
    /// The main pid reported by that machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Why the engine cannot place it (the leading engine's reason, published in the
    /// registry for every fleetd's API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every machine's reported state (several for global units).
    #[serde(default)]
    pub states: Vec<StateView>,
}

/// One unit with its body: `GET /fleet/v1/units/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitDetail {
    /// The unit as listed.
    #[serde(flatten)]
    pub unit: UnitView,
    /// The unit file's text.
    pub body: String,
}

/// The body of `PUT /fleet/v1/units/{name}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutUnit {
    /// The desired state. Absent: `inactive` for a new unit, unchanged for an existing one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<DesiredState>,
    /// The unit file's text: required to create a unit; for an existing unit a different
    /// body is refused (409) unless `replace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Replace the body of an existing unit.
    #[serde(default)]
    pub replace: bool,
}

/// The answer to `PUT` and `DELETE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// The unit record after the change (`None` after a delete).
    pub unit: Option<UnitRecord>,
    /// `created`, `replaced`, `updated`, `unchanged` or `deleted`.
    pub result: String,
}

/// Every error answer: `{ "error": "..." }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

/// Why a request failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A malformed request or an invalid unit file (400).
    #[error("{0}")]
    BadRequest(String),
    /// A TCP request without the right bearer token (401).
    #[error("missing or wrong bearer token: send `Authorization: Bearer <token>` (the token fleetd reads from --token-file)")]
    Unauthorized,
    /// A TLS client whose certificate's role does not allow the request, or a caller on the
    /// Unix socket that runs in a unit not granted the control API (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such unit (404).
    #[error("unit {0:?} is not in the cluster: submit it first (fleetctl submit {0}.toml)")]
    UnknownUnit(String),
    /// A different body for an existing unit without `replace` (409).
    #[error("unit {name:?} already exists with a different body ({old}): pass replace (fleetctl --replace) to replace it")]
    Conflict {
        /// The unit.
        name: String,
        /// Its current body hash, shortened.
        old: String,
    },
    /// The journal of a unit that does not run on this machine (409).
    #[error("{0}")]
    Elsewhere(String),
    /// A rollout was asked for while another one runs (409).
    #[error("a rollout of {reference} to version {version} is running (started {started_at} ms after the epoch): wait for it to finish or halt (fleetctl os status)")]
    RolloutRunning {
        /// The running rollout's payload.
        reference: String,
        /// Its target version.
        version: String,
        /// When it started.
        started_at: u64,
    },
    /// Relaying to the machine that runs the unit failed (502).
    #[error("{0}")]
    Relay(String),
    /// The local init failed (503).
    #[error("the local init failed: {0}")]
    Init(#[from] crate::agent::InitError),
    /// The registry failed (503).
    #[error("registry error: {0}")]
    Registry(#[from] RegistryError),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::UnknownUnit(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. }
            | ApiError::Elsewhere(_)
            | ApiError::RolloutRunning { .. } => StatusCode::CONFLICT,
            ApiError::Relay(_) => StatusCode::BAD_GATEWAY,
            ApiError::Init(e) if e.is_no_such_unit() => StatusCode::NOT_FOUND,
            ApiError::Init(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Registry(RegistryError::UnknownUnit { .. }) => StatusCode::NOT_FOUND,
            ApiError::Registry(RegistryError::InvalidName { .. }) => StatusCode::BAD_REQUEST,
            ApiError::Registry(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            log::warn!("api: {self}");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// Errors of serving the API.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket or address could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The socket path or TCP address.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving the API on {what} failed: {source}")]
    Serve {
        /// The socket path or TCP address.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    registry: Arc<dyn Registry>,
    engine: Option<EngineStatus>,
    token: Option<Arc<str>>,
    relay_token: Option<Arc<str>>,
    relay_tls: Option<Arc<rustls::ClientConfig>>,
    roles: bool,
    local: Option<(String, InitApi)>,
    /// The image store whose blobs `/v2/.../blobs/...` serves (TCP listeners only).
    blobs: Option<Arc<Path>>,
    /// The image claims this fleetd arbitrates (`POST /v2/_flotilla/claims/...`).
    claims: blobs::Claims,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("registry", &self.registry.describe())
            .field("engine", &self.engine.is_some())
            .field("token", &self.token.is_some())
            .field("relay_token", &self.relay_token.is_some())
            .field("relay_tls", &self.relay_tls.is_some())
            .field("roles", &self.roles)
            .field("local", &self.local.as_ref().map(|(id, _)| id))
            .field("blobs", &self.blobs)
            .finish()
    }
}

impl ApiState {
    /// The API over `registry`; `engine` (the local engine's status) adds the reasons why
    /// units cannot be placed while that engine leads.
    pub fn new(registry: Arc<dyn Registry>, engine: Option<EngineStatus>) -> ApiState {
        ApiState {
            registry,
            engine,
            token: None,
            relay_token: None,
            relay_tls: None,
            roles: false,
            local: None,
            blobs: None,
            claims: blobs::Claims::default(),
        }
    }

    /// Serves the blobs of the image store at `store` (`<store>/blobs/sha256/<hex>`) on
    /// `GET`/`HEAD /v2/<name>/blobs/sha256:<hex>` (see [`blobs`]). For TCP listeners: with
    /// [`ApiState::with_client_roles`] only `OU=machine` clients get them.
    pub fn with_blobs(mut self, store: impl Into<PathBuf>) -> ApiState {
        self.blobs = Some(Arc::from(store.into()));
        self
    }

    /// This machine's id and its init, for the journal of the units that run here.
    pub fn with_local_init(mut self, machine_id: impl Into<String>, init: InitApi) -> ApiState {
        self.local = Some((machine_id.into(), init));
        self
    }

    /// Relays what only another machine can answer (a unit's journal) to that machine's TCP
    /// API ([`crate::Machine::api`]), authenticated with `token` (the cluster's shared one).
    pub fn with_relay_token(mut self, token: impl Into<String>) -> ApiState {
        self.relay_token = Some(Arc::from(token.into()));
        self
    }

    /// Relays (see [`ApiState::with_relay_token`]) to the `https://` APIs of the other
    /// machines over mutual TLS with `config` (this machine's certificate, the cluster CA).
    pub fn with_relay_tls(mut self, config: Arc<rustls::ClientConfig>) -> ApiState {
        self.relay_tls = Some(config);
        self
    }

    /// Decides every request by the role of the client's TLS certificate (for
    /// [`serve_tls`]): reads for every role, changes (PUT, DELETE) only for operators.
    pub fn with_client_roles(mut self) -> ApiState {
        self.roles = true;
        self
    }

    /// Requires `Authorization: Bearer <token>` on every request (for TCP listeners).
    pub fn with_token(mut self, token: impl Into<String>) -> ApiState {
        self.token = Some(Arc::from(token.into()));
        self
    }
}

/// The API's routes over `state` (with the token check when `state` has a token, the role
/// check when it has [`ApiState::with_client_roles`]).
pub fn router(state: ApiState) -> Router {
    let units = format!("{PREFIX}/units");
    let unit = format!("{PREFIX}/units/{{name}}");
    let mut router = Router::new()
        .route(&units, get(list_units))
        .route(&unit, get(get_unit).put(put_unit).delete(delete_unit))
        .route(&format!("{PREFIX}/units/{{name}}/journal"), get(journal))
        .route(&format!("{PREFIX}/machines"), get(list_machines))
        .route(&format!("{PREFIX}/state"), get(list_state))
        .route(&format!("{PREFIX}/reboot-lock"), get(reboot_lock))
        .route(
            &format!("{PREFIX}/os/rollout"),
            get(get_rollout).post(start_rollout),
        )
        .route(
            &format!("{}/{{*rest}}", blobs::V2),
            get(blobs::blob).post(blobs::claim).delete(blobs::release),
        )
        .fallback(not_found);
    if state.token.is_some() {
        router = router.layer(middleware::from_fn_with_state(state.clone(), require_token));
    }
    if state.roles {
        router = router.layer(middleware::from_fn(require_role));
    }
    router.with_state(state)
}

/// Who the caller on the Unix socket is: `SO_PEERCRED` and its cgroup, read at accept.
#[derive(Clone, Debug)]
pub struct UnixPeer {
    /// The peer's credentials, or why they could not be read.
    cred: Result<PeerCred, String>,
    /// The peer's cgroup v2 path when its pid is visible (`Ok(None)`: no cgroup v2).
    cgroup: Result<Option<String>, String>,
}

impl UnixPeer {
    /// Who is on the other end of `stream`: its credentials and, when its pid is visible, its
    /// cgroup.
    pub(crate) fn of(stream: &tokio::net::UnixStream) -> Self {
        let cred = peer::peer_cred(stream).map_err(|e| e.to_string());
        let cgroup = match &cred {
            Ok(PeerCred { pid: Some(pid), .. }) => {
                peer::cgroup_of(*pid).map_err(|e| format!("reading /proc/{pid}/cgroup: {e}"))
            }
            _ => Ok(None),
        };
        UnixPeer { cred, cgroup }
    }
}

/// Who may use the Unix socket. A caller whose pid fleetd can see is placed by its cgroup:
/// in no unit's cgroup (`<name>.unit`), or in fleetd's own unit, it is served; in another
/// unit it is served only if the local init says that unit runs with the control API grant.
/// A caller fleetd cannot see (pid 0: another pid namespace, e.g. the host's `fleetctl`
/// when fleetd runs as a unit) is served: the manager keeps units without the grant away
/// from this socket (it refuses to start one whose bind mount exposes it, see
/// [`flotilla_init_api::access`]).
#[derive(Clone, Debug)]
pub struct PeerGate {
    init: Option<InitApi>,
    /// fleetd's own cgroup (its callers in the same unit are itself or its children).
    own_cgroup: Option<String>,
    /// The socket it guards (named in refusals; set by [`serve_unix`]).
    socket: PathBuf,
}

impl PeerGate {
    /// A gate that asks `init` about callers in other units (without it they are refused).
    pub fn new(init: Option<InitApi>) -> PeerGate {
        PeerGate {
            init,
            own_cgroup: peer::cgroup_of(std::process::id() as i32).ok().flatten(),
            socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }

    /// `Err(why)` when the caller must be refused.
    async fn admit(&self, caller: &UnixPeer) -> Result<(), String> {
        let cred = caller
            .cred
            .as_ref()
            .map_err(|e| format!("access denied: cannot read the caller's credentials: {e}"))?;
        let Some(pid) = cred.pid else {
            return Ok(());
        };
        let cgroup = caller
            .cgroup
            .as_ref()
            .map_err(|e| format!("access denied: cannot identify the caller (pid {pid}): {e}"))?;
        let Some((unit_cgroup, unit)) = cgroup.as_deref().and_then(access::unit_in_cgroup) else {
            return Ok(());
        };
        if self
            .own_cgroup
            .as_deref()
            .is_some_and(|own| access::within(own, &unit_cgroup))
        {
            return Ok(());
        }
        let socket = self.socket.as_path();
        let Some(init) = &self.init else {
            return Err(access::unit_refusal(pid, &unit, socket));
        };
        match init.unit_control_api(&unit).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(access::unit_refusal(pid, &unit, socket)),
            Err(e) => Err(format!(
                "access denied: the caller (pid {pid}) runs in unit {unit}, and its control API \
                 grant cannot be checked: {e}"
            )),
        }
    }
}

async fn check_peer(
    State(gate): State<PeerGate>,
    ConnectInfo(caller): ConnectInfo<UnixPeer>,
    request: Request,
    next: Next,
) -> Response {
    match gate.admit(&caller).await {
        Ok(()) => next.run(request).await,
        Err(why) => {
            log::warn!(
                "api: refused {} {} on the Unix socket: {why}",
                request.method(),
                request.uri().path()
            );
            ApiError::Forbidden(why).into_response()
        }
    }
}

/// Serves `router` on the Unix socket `path` (a stale socket file is replaced; the socket
/// is mode 0600) within `limits` until `shutdown` completes; `gate` decides which callers are
/// served.
pub async fn serve_unix(
    path: &Path,
    router: Router,
    limits: ServeLimits,
    mut gate: PeerGate,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let what = path.display().to_string();
    let bind_err = |source| ServeError::Bind {
        what: what.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    log::info!(
        "api: listening on {what} (at most {} connections)",
        limits.max_connections
    );
    gate.socket = path.to_path_buf();
    let router = router.layer(middleware::from_fn_with_state(gate, check_peer));
    serve::serve(listener, router, limits, &what, shutdown).await;
    let _ = std::fs::remove_file(PathBuf::from(path));
    Ok(())
}

/// Serves `router` on the TCP address `addr` within `limits` until `shutdown` completes.
/// Give it a router whose state has a token.
pub async fn serve_tcp(
    addr: &str,
    router: Router,
    limits: ServeLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = serve::bind_tcp(addr)
        .await
        .map_err(|source| ServeError::Bind {
            what: addr.to_string(),
            source,
        })?;
    log::info!(
        "api: listening on tcp {addr} (bearer token required; at most {} connections, \
         {:?} for a request head, closed after {:?} idle)",
        limits.max_connections,
        limits.header_read_timeout,
        limits.idle_timeout
    );
    serve::serve(listener, router, limits, addr, shutdown).await;
    Ok(())
}

/// Serves `router` over mutual TLS on `addr` until `shutdown` completes: only clients with a
/// certificate from the cluster CA get past the handshake ([`crate::tls::server_config`]).
/// Give it a router whose state has [`ApiState::with_client_roles`].
pub async fn serve_tls(
    addr: &str,
    router: Router,
    config: Arc<rustls::ServerConfig>,
    limits: ServeLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let bind_err = |source| ServeError::Bind {
        what: addr.to_string(),
        source,
    };
    let tcp = serve::bind_tcp(addr).await.map_err(bind_err)?;
    let listener = TlsListener::new(tcp, config).map_err(bind_err)?;
    log::info!(
        "api: listening on tcp {addr} (mutual TLS: a client certificate from the cluster CA \
         required; at most {} connections, {:?} for a request head, closed after {:?} idle)",
        limits.max_connections,
        limits.header_read_timeout,
        limits.idle_timeout
    );
    serve::serve(listener, router, limits, addr, shutdown).await;
    Ok(())
}

/// Lets a TLS client's request through when its certificate's role allows it: reads (GET,
/// HEAD) for every role, changes for operators only.
async fn require_role(request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|ConnectInfo(peer)| peer.clone());
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let refuse = |why: String| {
        log::warn!("api: refused {method} {path}: {why}");
        ApiError::Forbidden(why).into_response()
    };
    let Some(peer) = peer else {
        return refuse("no client certificate on this connection".into());
    };
    let reading = method == Method::GET || method == Method::HEAD;
    // Image blobs only for machines: a reader must not get image contents that the
    // registry protects with credentials.
    let v2 = path.starts_with(&format!("{}/", blobs::V2));
    if v2 && peer.role == Some(Role::Machine) {
        // Blobs (GET, HEAD) and image claims (POST): the machines' own traffic.
        return next.run(request).await;
    }
    if v2 {
        return refuse(format!(
            "the client certificate ({}) is {}: image blobs are served to machines only (OU=machine)",
            peer.subject,
            peer.role
                .map(|r| format!("a {r} (OU={r})"))
                .unwrap_or_else(|| "without a role".into())
        ));
    }
    match peer.role {
        None => refuse(format!(
            "the client certificate ({}) names no role: issue it with OU=operator, OU=reader or OU=machine (see fleetd/README.md, \"Certificates\")",
            peer.subject
        )),
        Some(role) if reading || role.may_change() => next.run(request).await,
        Some(role) => refuse(format!(
            "the client certificate ({}) is a {role} (OU={role}): it may list and read units, not change them; use an operator certificate (OU=operator)",
            peer.subject
        )),
    }
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(token) = state.token.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        next.run(request).await
    } else {
        log::warn!(
            "api: refused {} {} without a valid token",
            request.method(),
            request.uri().path()
        );
        ApiError::Unauthorized.into_response()
    }
}

/// Compares without an early exit, so the time does not tell how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: format!(
                "no route {method} {}: see {PREFIX}/units, {PREFIX}/machines, {PREFIX}/state",
                uri.path()
            ),
        }),
    )
        .into_response()
}

/// Why units cannot be placed: this fleetd's engine knows while it leads; otherwise what
/// the leader published in the registry.
async fn reasons(state: &ApiState) -> Result<BTreeMap<String, String>, ApiError> {
    match state.engine.as_ref().filter(|e| e.is_leader()) {
        Some(engine) => Ok(engine.unschedulable()),
        None => Ok(state.registry.get_reasons().await?),
    }
}

/// Builds the views of `units` from one snapshot, with `reasons` (see [`reasons`]).
fn views(
    snapshot: &crate::registry::Snapshot,
    reasons: &BTreeMap<String, String>,
) -> Vec<UnitView> {
    let assigned: BTreeMap<&str, &str> = snapshot
        .assignments
        .iter()
        .map(|a| (a.unit.as_str(), a.machine.as_str()))
        .collect();
    let mut states: BTreeMap<&str, Vec<&UnitState>> = BTreeMap::new();
    for s in &snapshot.states {
        states.entry(s.unit.as_str()).or_default().push(s);
    }
    snapshot
        .units
        .iter()
        .map(|u| {
            let machine = assigned.get(u.name.as_str()).map(|m| m.to_string());
            let all: Vec<StateView> = states
                .get(u.name.as_str())
                .map(|v| {
                    v.iter()
                        .map(|s| StateView {
                            machine: s.machine.clone(),
                            state: s.active.clone(),
                            sub: s.sub.clone(),
                            pid: s.pid,
                            hash: s.hash.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let here = machine
                .as_deref()
                .and_then(|m| all.iter().find(|s| s.machine == m));
            UnitView {
                name: u.name.clone(),
                desired: u.desired,
                hash: u.hash.clone(),
                state: here.map(|s| s.state.clone()),
                sub: here.map(|s| s.sub.clone()),
                pid: here.and_then(|s| s.pid),
                machine,
                reason: reasons.get(&u.name).cloned(),
                states: all,
            }
        })
        .collect()
}

async fn list_units(State(state): State<ApiState>) -> Result<Json<Vec<UnitView>>, ApiError> {
    let snapshot = state.registry.snapshot().await?;
    Ok(Json(views(&snapshot, &reasons(&state).await?)))
}

async fn get_unit(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<UnitDetail>, ApiError> {
    let snapshot = state.registry.snapshot().await?;
    let unit = views(&snapshot, &reasons(&state).await?)
        .into_iter()
        .find(|u| u.name == name)
        .ok_or_else(|| ApiError::UnknownUnit(name.clone()))?;
    let body = state.registry.get_body(&unit.hash).await?.ok_or_else(|| {
        ApiError::Registry(RegistryError::MissingBody {
            name: name.clone(),
            hash: unit.hash.clone(),
        })
    })?;
    Ok(Json(UnitDetail { unit, body }))
}

/// Checks a unit file the way init will: a bad file is a 400 with its `file:line:col`.
fn validate(name: &str, body: &str) -> Result<(), ApiError> {
    flotilla_units::check_name(name)
        .map_err(|reason| ApiError::BadRequest(format!("invalid unit name {name:?}: {reason}")))?;
    let label = format!("{name}.toml");
    flotilla_units::parse_unit(name, Some(Path::new(&label)), body)
        .map(|_| ())
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

async fn put_unit(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<PutUnit>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "bad request body ({e}): send {{\"desired\": \"inactive|loaded|launched\", \"body\": \"<unit text>\"}}"
        ))
    })?;
    let registry = &state.registry;
    let existing = registry.get_unit(&name).await?;
    let (record, result, status) = match (existing, req.body) {
        (None, None) => return Err(ApiError::UnknownUnit(name)),
        (None, Some(text)) => {
            validate(&name, &text)?;
            let hash = registry.put_body(&text).await?;
            let record = UnitRecord {
                name: name.clone(),
                hash,
                desired: req.desired.unwrap_or(DesiredState::Inactive),
            };
            registry.put_unit(&record).await?;
            (record, "created", StatusCode::CREATED)
        }
        (Some(old), Some(text)) if body_hash(&text) != old.hash => {
            if !req.replace {
                return Err(ApiError::Conflict {
                    name,
                    old: old.hash.chars().take(12).collect(),
                });
            }
            validate(&name, &text)?;
            let hash = registry.put_body(&text).await?;
            let record = UnitRecord {
                name: name.clone(),
                hash,
                desired: req.desired.unwrap_or(old.desired),
            };
            registry.put_unit(&record).await?;
            remove_unused_body(registry.as_ref(), &old.hash).await;
            (record, "replaced", StatusCode::OK)
        }
        (Some(old), _) => match req.desired {
            Some(desired) if desired != old.desired => {
                let record = registry.set_desired(&name, desired).await?;
                (record, "updated", StatusCode::OK)
            }
            _ => (old, "unchanged", StatusCode::OK),
        },
    };
    log::info!(
        "api: PUT {PREFIX}/units/{name}: {result}, desired {}, body {}",
        record.desired,
        record.hash.get(..12).unwrap_or(&record.hash)
    );
    Ok((
        status,
        Json(Changed {
            unit: Some(record),
            result: result.into(),
        }),
    )
        .into_response())
}

/// Removes a body no unit refers to any more (best effort: a failure only leaves it behind).
async fn remove_unused_body(registry: &dyn Registry, hash: &str) {
    match registry.list_units().await {
        Ok(units) if units.items.iter().all(|u| u.hash != hash) => {
            if let Err(e) = registry.remove_body(hash).await {
                log::warn!("api: could not remove the unused body {hash}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => log::warn!("api: could not check whether body {hash} is still used: {e}"),
    }
}

async fn delete_unit(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Changed>, ApiError> {
    let registry = &state.registry;
    let Some(old) = registry.get_unit(&name).await? else {
        return Err(ApiError::UnknownUnit(name));
    };
    if !registry.remove_unit(&name).await? {
        return Err(ApiError::UnknownUnit(name));
    }
    remove_unused_body(registry.as_ref(), &old.hash).await;
    log::info!("api: DELETE {PREFIX}/units/{name}: deleted");
    Ok(Json(Changed {
        unit: None,
        result: "deleted".into(),
    }))
}

async fn list_machines(State(state): State<ApiState>) -> Result<Json<Vec<Machine>>, ApiError> {
    Ok(Json(state.registry.list_machines().await?.items))
}

/// The machines that hold a slot of the reboot lock.
async fn reboot_lock(
    State(state): State<ApiState>,
) -> Result<Json<Vec<crate::model::RebootLockHolder>>, ApiError> {
    Ok(Json(state.registry.reboot_lock_holders().await?.items))
}

/// The body of `POST /fleet/v1/os/rollout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRollout {
    /// The update payload: an OCI reference, or a directory that exists on every machine.
    pub reference: String,
    /// The version the machines reach (the payload manifest's `version`).
    pub version: String,
    /// How many machines may be unavailable at once (at least 1).
    pub max_unavailable: u32,
}

/// Starts a rollout through the machines present now, in id order.
async fn start_rollout(
    State(state): State<ApiState>,
    body: Result<Json<StartRollout>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "bad request body ({e}): send {{\"reference\": \"<OCI reference or directory>\", \"version\": \"<target version>\", \"max_unavailable\": N}}"
        ))
    })?;
    if req.reference.trim().is_empty() || req.version.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "a rollout needs a reference (the update payload) and a version (its manifest's)"
                .into(),
        ));
    }
    if req.max_unavailable == 0 {
        return Err(ApiError::BadRequest(
            "max_unavailable must be at least 1 (how many machines may be down at once)".into(),
        ));
    }
    let machines: Vec<String> = state
        .registry
        .list_machines()
        .await?
        .items
        .into_iter()
        .map(|m| m.id)
        .collect();
    if machines.is_empty() {
        return Err(ApiError::BadRequest(
            "no machine is present in the cluster: nothing to update".into(),
        ));
    }
    let rollout = crate::model::Rollout::new(
        &req.reference,
        &req.version,
        req.max_unavailable,
        &machines,
        crate::registry::now_ms(),
    );
    match state.registry.start_rollout(&rollout).await? {
        crate::registry::RolloutStart::Started => {
            log::info!(
                "api: POST {PREFIX}/os/rollout: started the rollout of {} to version {} through {} machine(s), at most {} unavailable",
                rollout.reference,
                rollout.version,
                machines.len(),
                rollout.max_unavailable
            );
            Ok((StatusCode::CREATED, Json(rollout)).into_response())
        }
        crate::registry::RolloutStart::Running(current) => Err(ApiError::RolloutRunning {
            reference: current.reference,
            version: current.version,
            started_at: current.started_at,
        }),
    }
}

/// The rollout record, or `null`.
async fn get_rollout(
    State(state): State<ApiState>,
) -> Result<Json<Option<crate::model::Rollout>>, ApiError> {
    Ok(Json(state.registry.get_rollout().await?))
}

async fn list_state(State(state): State<ApiState>) -> Result<Json<Vec<UnitState>>, ApiError> {
    let snapshot = state.registry.snapshot().await?;
    Ok(Json(snapshot.states))
}

/// The default number of journal lines, as fleet's `journal --lines`.
pub const DEFAULT_JOURNAL_LINES: u32 = 10;

async fn journal(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<flotilla_init_api::LogEntry>>, ApiError> {
    let (mut lines, mut after) = (DEFAULT_JOURNAL_LINES, 0u64);
    let (mut machine, mut relayed) = (None, false);
    for pair in query.as_deref().unwrap_or_default().split('&') {
        let bad = || {
            ApiError::BadRequest(format!(
                "bad query {pair:?}: use lines=N&after=SEQ&machine=ID"
            ))
        };
        match pair.split_once('=') {
            Some(("lines", v)) => lines = v.parse().map_err(|_| bad())?,
            Some(("after", v)) => after = v.parse().map_err(|_| bad())?,
            Some(("machine", v)) if !v.is_empty() => machine = Some(v.to_string()),
            Some(("relayed", "1")) => relayed = true,
            _ if pair.is_empty() => {}
            _ => return Err(bad()),
        }
    }
    let snapshot = state.registry.snapshot().await?;
    let unit = views(&snapshot, &BTreeMap::new())
        .into_iter()
        .find(|u| u.name == name)
        .ok_or_else(|| ApiError::UnknownUnit(name.clone()))?;
    // The machines the unit runs on (several for a global unit), narrowed by `machine=`.
    let mut on: Vec<String> = match &unit.machine {
        Some(m) => vec![m.clone()],
        None => unit.states.iter().map(|s| s.machine.clone()).collect(),
    };
    if let Some(wanted) = &machine {
        on.retain(|m| m == wanted || m.starts_with(wanted.as_str()));
    }
    let here = state.local.as_ref().map(|(id, _)| id.as_str());
    if let (Some((id, init)), true) = (&state.local, on.len() == 1 || machine.is_none()) {
        if on.iter().any(|m| m == id) {
            return Ok(Json(init.logs(&name, after, lines).await?));
        }
    }
    let describe = |id: &String| match snapshot.machines.iter().find(|m| &m.id == id) {
        Some(m) if !m.address.is_empty() => format!("{id} ({})", m.address),
        _ => id.clone(),
    };
    let target = match on.as_slice() {
        [] if machine.is_some() => {
            return Err(ApiError::Elsewhere(format!(
                "unit {name:?} does not run on a machine {:?}",
                machine.unwrap_or_default()
            )))
        }
        [] => {
            return Err(ApiError::Elsewhere(format!(
                "unit {name:?} runs on no machine: start it first (fleetctl start {name})"
            )))
        }
        [one] => one,
        several => {
            let list: Vec<String> = several.iter().map(describe).collect();
            return Err(ApiError::Elsewhere(format!(
                "unit {name:?} runs on several machines: {}; pick one (fleetctl journal --machine ID {name})",
                list.join(", ")
            )));
        }
    };
    let peer = snapshot.machines.iter().find(|m| &m.id == target);
    let elsewhere = |why: &str| {
        ApiError::Elsewhere(format!(
            "unit {name:?} runs on {}, not on this machine{}: {why}",
            describe(target),
            here.map(|h| format!(" ({h})")).unwrap_or_default()
        ))
    };
    let url = peer.and_then(|m| m.api.as_deref());
    // An https peer over mutual TLS with this machine's certificate; an http one (--insecure)
    // with the cluster's token.
    let client = match (url, &state.relay_tls, &state.relay_token) {
        (Some(url), Some(tls), _) if url.starts_with("https://") => {
            client::ApiClient::new(url).map(|c| c.with_tls(tls.clone()))
        }
        (Some(url), _, Some(token)) if url.starts_with("http://") => {
            client::ApiClient::new(url).map(|c| c.with_token(token.to_string()))
        }
        _ => {
            return Err(elsewhere(
                "its journal is there, and this fleetd cannot relay to it (both need --listen, with the cluster's TLS certificates, or --insecure and the cluster's --token-file); ask that machine's fleetd (fleetctl --endpoint ...)",
            ))
        }
    };
    let url = url.unwrap_or_default();
    if relayed {
        return Err(elsewhere("not relayed twice"));
    }
    let client =
        client.map_err(|e| ApiError::Relay(format!("machine {target}'s API {url:?}: {e}")))?;
    client
        .journal_relayed(&name, lines, after, target)
        .await
        .map(Json)
        .map_err(|e| {
            ApiError::Relay(format!(
                "unit {name:?} runs on {}; relaying to its fleetd at {url} failed: {e}",
                describe(target)
            ))
        })
}
