//! The D-Bus server: `org.flotilla.Manager1` on a private, peer-to-peer Unix socket.
//!
//! Like systemd's private socket there is no bus daemon: every client connects straight to
//! the socket, authenticates (SASL EXTERNAL) and talks to the one object
//! [`OBJECT_PATH`](super::OBJECT_PATH). Only root and the uid the manager runs as may connect
//! (checked with `SO_PEERCRED` before the handshake; the socket is also mode 0600). A caller
//! inside a unit is served only if the unit is granted the control API (`[container]
//! control_api = true`); any other caller from a unit gets `org.flotilla.Error.AccessDenied`
//! on every method and no signals (the rules: [`super::access`]).
//!
//! Threads: one accepts connections; one per connection performs the handshake and then waits
//! for the connection to close (zbus runs each connection's own executor thread); one turns
//! the manager's [`Event`]s into `UnitStateChanged` signals on every live connection. Method
//! bodies hand the blocking [`ApiHandle::call`] to the `blocking` thread pool, so a slow answer
//! never stalls a connection's executor: calls from two clients (or two calls on one
//! connection) proceed concurrently.
//!
//! Check it with a stock client:
//! `dbus-send --peer=unix:path=SOCK --print-reply /org/flotilla/Manager1 org.flotilla.Manager1.ListUnits`.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use zbus::blocking::connection::Builder;
use zbus::blocking::Connection;
use zbus::Guid;

use crate::os_update::OsUpdater;

use super::access::{self, Placement, UnitCgroups};
use super::peer::{self, PeerCred};
use super::OBJECT_PATH;
use super::{ApiError, ApiHandle, Event, Request, Response};

/// Why the D-Bus server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    /// The socket's parent directory is missing and could not be created.
    #[error("cannot create the API socket directory {path}: {source} (create it or choose another socket path)")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Something that is not a socket sits where the socket should go.
    #[error("{path} exists and is not a socket; remove it or choose another API socket path")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A live server already answers on the socket.
    #[error(
        "another manager is already listening on {path}; stop it or choose another API socket path"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path could not be inspected or a stale socket could not be removed.
    #[error("cannot remove the stale API socket {path}: {source} (remove it by hand)")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `bind`/`listen` failed.
    #[error(
        "cannot listen on the API socket {path}: {source} (check that its directory is writable)"
    )]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The socket could not be restricted to its owner.
    #[error("cannot chmod 0600 the API socket {path}: {source}")]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A server thread could not be started.
    #[error("cannot start the API {what} thread for {path}: {source} (out of threads or memory?)")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Errors returned to D-Bus callers, named `org.flotilla.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.flotilla.Error")]
enum MethodError {
    /// A transport-level failure, passed through.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// [`ApiError::NoSuchUnit`].
    NoSuchUnit(String),
    /// [`ApiError::InvalidUnit`].
    InvalidUnit(String),
    /// [`ApiError::Refused`].
    Refused(String),
    /// An argument is not a valid D-Bus string (a NUL byte or invalid UTF-8 inside).
    InvalidArgument(String),
    /// The caller runs in a unit that is not granted the control API (or cannot be
    /// identified); see [`super::access`].
    AccessDenied(String),
}

/// A string argument whose decoding failure becomes a named error
/// (`org.flotilla.Error.InvalidArgument`) instead of zbus's own `org.freedesktop.zbus.Error`:
/// a raw client may send a NUL byte or invalid UTF-8 inside a D-Bus string.
#[derive(Debug)]
struct WireString(Result<String, String>);

impl zbus::zvariant::Type for WireString {
    const SIGNATURE: &'static zbus::zvariant::Signature = &zbus::zvariant::Signature::Str;
}

impl<'de> serde::Deserialize<'de> for WireString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(WireString(
            <String as serde::Deserialize>::deserialize(d).map_err(|e| e.to_string()),
        ))
    }
}

impl WireString {
    /// The string, or the named error for argument `what` (e.g. `the unit name`).
    fn get(self, what: &str) -> Result<String, MethodError> {
        self.0.map_err(|reason| {
            MethodError::InvalidArgument(format!(
                "{what} is not a valid D-Bus string ({reason}); send UTF-8 text without NUL bytes"
            ))
        })
    }
}

impl From<ApiError> for MethodError {
    fn from(e: ApiError) -> Self {
        let message = super::wire::text(e.to_string());
        match e {
            ApiError::NoSuchUnit(_) => MethodError::NoSuchUnit(message),
            ApiError::InvalidUnit(_) => MethodError::InvalidUnit(message),
            ApiError::Refused(_) => MethodError::Refused(message),
        }
    }
}

fn unexpected(method: &str, answer: &Response) -> MethodError {
    MethodError::Refused(format!(
        "internal error: the manager answered {method} with {answer:?}; please report this"
    ))
}

/// The D-Bus object. A private module, so that the `Manager1Signals` trait the interface
/// macro generates stays out of the public API.
mod object {
    use super::{unexpected, MethodError, WireString};
    use crate::api::{
        wire, ApiHandle, ImageEntry, LogEntry, ReloadReport, Request, Response, UnitInfo,
    };
    use crate::os_update::OsUpdater;

    /// The object served at [`OBJECT_PATH`]; forwards every call to the manager.
    pub(super) struct Manager1 {
        pub(super) handle: ApiHandle,
        /// Why this connection's caller is refused, if it is (answered to every method).
        pub(super) denied: Option<String>,
        /// The host's OS update (`GetOsStatus`, `UpdateOs`); `None`: not served.
        pub(super) os: Option<OsUpdater>,
    }

    impl Manager1 {
        /// Refuse the call if the caller was refused at connect time.
        fn admitted(&self, method: &str) -> Result<(), MethodError> {
            match &self.denied {
                None => Ok(()),
                Some(why) => {
                    log::warn!("control API: refused {method}: {why}");
                    Err(MethodError::AccessDenied(why.clone()))
                }
            }
        }

        /// Run the blocking manager call on the `blocking` pool, off the connection's executor.
        async fn call(&self, request: Request) -> Result<Response, MethodError> {
            if self.denied.is_some() {
                // The request's name only (a LoadUnit would log the whole unit text).
                let debug = format!("{request:?}");
                let name = debug.split([' ', '(', '{']).next().unwrap_or_default();
                self.admitted(name)?;
            }
            let handle = self.handle.clone();
            Ok(blocking::unblock(move || handle.call(request)).await?)
        }

        async fn unit(&self, method: &str, request: Request) -> Result<(UnitInfo,), MethodError> {
            match self.call(request).await? {
                Response::Unit(u) => Ok((wire::unit(u),)),
                other => Err(unexpected(method, &other)),
            }
        }

        /// The OS updater, or the refusal of a server started without one.
        fn os(&self, method: &str) -> Result<OsUpdater, MethodError> {
            self.admitted(method)?;
            self.os.clone().ok_or_else(|| {
                MethodError::Refused(format!(
                    "{method}: this manager does not manage the host's OS (its server was started without it)"
                ))
            })
        }

        async fn logs_request(
            &self,
            method: &str,
            name: String,
            after_seq: u64,
            lines: u32,
        ) -> Result<Vec<LogEntry>, MethodError> {
            match self
                .call(Request::Logs {
                    name,
                    lines,
                    after_seq,
                })
                .await?
            {
                Response::Logs(l) => Ok(wire::logs(l)),
                other => Err(unexpected(method, &other)),
            }
        }
    }

    #[zbus::interface(name = "org.flotilla.Manager1")]
    impl Manager1 {
        /// All known units.
        async fn list_units(&self) -> Result<Vec<UnitInfo>, MethodError> {
            match self.call(Request::ListUnits).await? {
                Response::Units(u) => Ok(wire::units(u)),
                other => Err(unexpected("ListUnits", &other)),
            }
        }

        /// Every image in the manager's image stores: store name (`name:tag`) and manifest
        /// digest, sorted by name (`a(ss)`). Read-only, like `ListUnits`.
        async fn list_images(&self) -> Result<Vec<ImageEntry>, MethodError> {
            match self.call(Request::ListImages).await? {
                Response::Images(images) => Ok(images
                    .into_iter()
                    .map(|i| ImageEntry {
                        name: wire::text(i.name),
                        digest: wire::text(i.digest),
                    })
                    .collect()),
                other => Err(unexpected(flotilla_init_api::LIST_IMAGES, &other)),
            }
        }

        /// One unit.
        async fn get_unit(&self, name: WireString) -> Result<(UnitInfo,), MethodError> {
            let name = name.get("the unit name")?;
            self.unit("GetUnit", Request::GetUnit(name)).await
        }

        /// Start a unit; answers with its state right after the start was queued.
        async fn start_unit(&self, name: WireString) -> Result<(UnitInfo,), MethodError> {
            let name = name.get("the unit name")?;
            self.unit("StartUnit", Request::StartUnit(name)).await
        }

        /// Stop a unit.
        async fn stop_unit(&self, name: WireString) -> Result<(UnitInfo,), MethodError> {
            let name = name.get("the unit name")?;
            self.unit("StopUnit", Request::StopUnit(name)).await
        }

        /// Stop then start a unit.
        async fn restart_unit(&self, name: WireString) -> Result<(UnitInfo,), MethodError> {
            let name = name.get("the unit name")?;
            self.unit("RestartUnit", Request::RestartUnit(name)).await
        }

        /// Add or replace a unit from its TOML text.
        async fn load_unit(
            &self,
            name: WireString,
            toml: WireString,
        ) -> Result<(UnitInfo,), MethodError> {
            let name = name.get("the unit name")?;
            let toml = toml.get("the unit text")?;
            self.unit("LoadUnit", Request::LoadUnit { name, toml })
                .await
        }

        /// Stop and forget a unit.
        async fn remove_unit(&self, name: WireString) -> Result<(), MethodError> {
            let name = name.get("the unit name")?;
            match self.call(Request::RemoveUnit(name)).await? {
                Response::Done => Ok(()),
                other => Err(unexpected("RemoveUnit", &other)),
            }
        }

        /// Re-read the unit directories.
        async fn reload(&self, restart_changed: bool) -> Result<(ReloadReport,), MethodError> {
            match self.call(Request::Reload { restart_changed }).await? {
                Response::Reload(r) => Ok((ReloadReport {
                    added: wire::names(r.added),
                    changed: wire::names(r.changed),
                    removed: wire::names(r.removed),
                    restarted: wire::names(r.restarted),
                    errors: wire::names(r.errors),
                },)),
                other => Err(unexpected("Reload", &other)),
            }
        }

        /// The last `lines` captured output lines of a unit.
        async fn logs(&self, name: WireString, lines: u32) -> Result<Vec<LogEntry>, MethodError> {
            let name = name.get("the unit name")?;
            self.logs_request("Logs", name, 0, lines).await
        }

        /// The last `lines` captured output lines of a unit with `seq > after_seq`.
        async fn logs_after(
            &self,
            name: WireString,
            after_seq: u64,
            lines: u32,
        ) -> Result<Vec<LogEntry>, MethodError> {
            let name = name.get("the unit name")?;
            self.logs_request("LogsAfter", name, after_seq, lines).await
        }

        /// The unit file's text.
        async fn cat_unit(&self, name: WireString) -> Result<String, MethodError> {
            let name = name.get("the unit name")?;
            match self.call(Request::CatUnit(name)).await? {
                Response::Text(t) => Ok(wire::text(t)),
                other => Err(unexpected("CatUnit", &other)),
            }
        }

        /// `running`, or `stopping` once an orderly shutdown is stopping the units (as
        /// systemd's `SystemState`): a client stopped then knows the host is going down.
        async fn get_system_state(&self) -> Result<String, MethodError> {
            match self.call(Request::SystemState).await? {
                Response::Text(t) => Ok(t),
                other => Err(unexpected("GetSystemState", &other)),
            }
        }

        /// The machine id of this host (`/etc/machine-id`, trimmed). Answered by the server
        /// itself: it is not manager state.
        async fn get_machine_id(&self) -> Result<String, MethodError> {
            self.admitted("GetMachineId")?;
            let path = std::path::Path::new(crate::api::MACHINE_ID_PATH);
            let id = blocking::unblock(move || crate::api::read_machine_id(path)).await?;
            Ok(wire::text(id))
        }

        /// Whether unit `name` runs with the control API grant (`[container] control_api`, as
        /// it was when the unit was last started); false when it does not run. fleetd asks
        /// this about the callers it finds in a unit's cgroup.
        async fn get_unit_control_api(&self, name: String) -> Result<bool, MethodError> {
            match self.call(Request::ControlApiGranted(name)).await? {
                Response::Granted(granted) => Ok(granted),
                other => Err(unexpected("GetUnitControlApi", &other)),
            }
        }

        /// `GetOsStatus() -> s`: the host's A/B state as JSON, the document `unitctl os
        /// status --json` prints (`running`, `version`, `next`, `slots`, `rolled_back`) plus
        /// `job` (`null` or `{"source", "state": "running"|"failed"|"rebooting",
        /// "message"}`). A host not booted from a slot answers `running: null` and no slots.
        /// Read-only; answered by the server off the event loop (the ESP is mounted for the
        /// moment).
        async fn get_os_status(&self) -> Result<String, MethodError> {
            let os = self.os(flotilla_init_api::GET_OS_STATUS)?;
            let doc = blocking::unblock(move || os.status_json())
                .await
                .map_err(|e| MethodError::Refused(wire::text(e.to_string())))?;
            Ok(wire::text(doc.to_string()))
        }

        /// `UpdateOs(s source, b allow_downgrade)`: starts an OS update from a payload
        /// directory or an OCI reference and returns at once (refused while one runs, on a
        /// host not booted from a slot, and while the manager shuts down). The job runs on
        /// its own thread; once the new slot is the next boot the host reboots in order.
        async fn update_os(
            &self,
            source: WireString,
            allow_downgrade: bool,
        ) -> Result<(), MethodError> {
            let os = self.os(flotilla_init_api::UPDATE_OS)?;
            let source = source.get("the update source")?;
            match self.call(Request::SystemState).await? {
                Response::Text(t) if t == crate::api::SYSTEM_RUNNING => {}
                Response::Text(_) => {
                    return Err(MethodError::Refused(
                        "the manager is shutting down: OS update refused".into(),
                    ))
                }
                other => return Err(unexpected(flotilla_init_api::UPDATE_OS, &other)),
            }
            blocking::unblock(move || os.start(&source, allow_downgrade))
                .await
                .map_err(|e| MethodError::Refused(wire::text(e.to_string())))
        }

        /// A unit's active or sub state changed.
        #[zbus(signal)]
        pub(super) async fn unit_state_changed(
            emitter: &zbus::object_server::SignalEmitter<'_>,
            name: &str,
            active_state: &str,
            sub_state: &str,
        ) -> zbus::Result<()>;
    }
}

use object::Manager1;

/// Live client connections, keyed by a per-server id.
type Connections = Arc<Mutex<Vec<(u64, Connection)>>>;

fn lock(conns: &Connections) -> MutexGuard<'_, Vec<(u64, Connection)>> {
    // A panic while holding the lock cannot leave the list inconsistent (push/retain only).
    conns
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running D-Bus server. Dropping it stops accepting, disconnects the clients and removes
/// the socket file; the signal thread ends when the manager drops its event sender.
pub struct Server {
    socket: PathBuf,
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
    connections: Connections,
    accept_thread: Option<JoinHandle<()>>,
    _signal_thread: JoinHandle<()>,
}

impl Server {
    /// The path of the socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How many clients are connected right now.
    pub fn connections(&self) -> usize {
        lock(&self.connections).len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a thread blocked in accept(2) with EINVAL.
        let _ = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Both);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let conns: Vec<Connection> = lock(&self.connections).drain(..).map(|(_, c)| c).collect();
        for conn in conns {
            let _ = conn.close();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

/// Listen on `socket` and serve `org.flotilla.Manager1`, forwarding calls to `handle` and
/// turning `events` into `UnitStateChanged` signals. Callers are mapped to units through
/// `units` and refused unless their unit is granted the control API.
///
/// Creates the parent directory (0755) if missing and replaces a stale socket file; refuses
/// to replace a socket a live server still answers on, or a file that is not a socket.
/// `GetOsStatus` and `UpdateOs` are refused (no OS updater: see [`serve_with_os`]).
pub fn serve(
    socket: &Path,
    handle: ApiHandle,
    events: Receiver<Event>,
    units: UnitCgroups,
) -> Result<Server, DbusError> {
    serve_with_os(socket, handle, events, units, None)
}

/// [`serve`], with `os` answering `GetOsStatus` and `UpdateOs`.
pub fn serve_with_os(
    socket: &Path,
    handle: ApiHandle,
    events: Receiver<Event>,
    units: UnitCgroups,
    os: Option<OsUpdater>,
) -> Result<Server, DbusError> {
    let path = socket.to_path_buf();
    prepare_path(&path)?;
    let listener = UnixListener::bind(&path).map_err(|source| DbusError::Bind {
        path: path.clone(),
        source,
    })?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        let _ = fs::remove_file(&path);
        DbusError::Chmod {
            path: path.clone(),
            source,
        }
    })?;
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let connections: Connections = Arc::new(Mutex::new(Vec::new()));

    let spawn_error = |what, source| {
        let _ = fs::remove_file(&path);
        DbusError::Spawn {
            what,
            path: path.clone(),
            source,
        }
    };
    let signal_thread = {
        let connections = Arc::clone(&connections);
        thread::Builder::new()
            .name("api-signals".into())
            .spawn(move || signal_loop(events, connections))
            .map_err(|e| spawn_error("signal", e))?
    };
    let accept_thread = {
        let listener = Arc::clone(&listener);
        let stop = Arc::clone(&stop);
        let connections = Arc::clone(&connections);
        let path = path.clone();
        thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept_loop(&listener, &path, &stop, handle, &units, os, connections))
            .map_err(|e| spawn_error("accept", e))?
    };
    log::info!("control API listening on {}", path.display());
    Ok(Server {
        socket: path,
        listener,
        stop,
        connections,
        accept_thread: Some(accept_thread),
        _signal_thread: signal_thread,
    })
}

/// Make sure the parent exists and nothing but a stale socket is in the way.
fn prepare_path(path: &Path) -> Result<(), DbusError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|source| DbusError::CreateDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(DbusError::InUse {
                    path: path.to_path_buf(),
                });
            }
            fs::remove_file(path).map_err(|source| DbusError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(DbusError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DbusError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn accept_loop(
    listener: &UnixListener,
    path: &Path,
    stop: &AtomicBool,
    handle: ApiHandle,
    units: &UnitCgroups,
    os: Option<OsUpdater>,
    connections: Connections,
) {
    let guid = Guid::generate();
    let next_id = Arc::new(AtomicU64::new(0));
    let own_uid = rustix::process::getuid();
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if stop.load(Ordering::SeqCst) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("control API: accept on {} failed: {e}", path.display());
                // Out of fds and the like: back off instead of spinning.
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let cred = match peer::peer_cred(&stream) {
            Ok(cred) if cred.uid == 0 || cred.uid == own_uid.as_raw() => cred,
            Ok(cred) => {
                log::warn!(
                    "control API: refused a connection from uid {} (pid {}) on {}: only root and uid {} may connect",
                    cred.uid,
                    cred.pid.unwrap_or(0),
                    path.display(),
                    own_uid.as_raw()
                );
                continue;
            }
            Err(e) => {
                log::warn!(
                    "control API: refused a connection on {}: cannot read its credentials: {e}",
                    path.display()
                );
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let guid = guid.clone();
        let handle = handle.clone();
        let os = os.clone();
        let connections = Arc::clone(&connections);
        let caller = Caller {
            cred,
            units: units.clone(),
            socket: path.to_path_buf(),
        };
        let spawned = thread::Builder::new()
            .name(format!("api-conn-{id}"))
            .spawn(move || serve_connection(id, stream, guid, handle, os, caller, connections));
        if let Err(e) = spawned {
            log::warn!("control API: cannot start a connection thread: {e}");
        }
    }
}

/// A connected caller, before it is admitted.
struct Caller {
    cred: PeerCred,
    units: UnitCgroups,
    socket: PathBuf,
}

impl Caller {
    /// `Err(why)` when the caller is inside a unit that is not granted the control API, or
    /// cannot be attributed (the rules: [`access`]).
    fn admit(&self, handle: &ApiHandle) -> Result<(), String> {
        let Some(pid) = self.cred.pid else {
            // A pid namespace this manager cannot see: not one of its units, which all live
            // in pid namespaces below the manager's.
            return Ok(());
        };
        let cannot = |what: String| {
            format!(
                "access denied: cannot identify the caller (pid {pid}) on {}: {what}",
                self.socket.display()
            )
        };
        match &self.units {
            UnitCgroups::Below(root) => {
                let cgroup = peer::cgroup_of(pid)
                    .map_err(|e| cannot(format!("reading /proc/{pid}/cgroup: {e}")))?
                    .ok_or_else(|| cannot("it is in no cgroup v2".into()))?;
                match access::place(root, &cgroup) {
                    Placement::Outside => Ok(()),
                    Placement::Unknown => Err(cannot(format!(
                        "its cgroup {cgroup} is below the units' cgroup {root} but in no unit's"
                    ))),
                    Placement::Unit(unit) => {
                        match handle.call(Request::ControlApiGranted(unit.clone())) {
                            Ok(Response::Granted(true)) => Ok(()),
                            Ok(_) | Err(_) => Err(access::unit_refusal(pid, &unit, &self.socket)),
                        }
                    }
                }
            }
            UnitCgroups::None => match peer::in_own_pid_namespace(pid) {
                Ok(true) => Ok(()),
                Ok(false) => Err(cannot(
                    "it runs in another pid namespace, and without cgroup v2 the manager \
                     cannot tell which unit it belongs to (run the manager with a writable \
                     cgroup v2 hierarchy)"
                        .into(),
                )),
                Err(e) => Err(cannot(format!("reading /proc/{pid}/ns/pid: {e}"))),
            },
        }
    }
}

/// Admit the caller, handshake, register the connection for signals (admitted callers
/// only), and wait until the client goes away.
fn serve_connection(
    id: u64,
    stream: UnixStream,
    guid: Guid<'static>,
    handle: ApiHandle,
    os: Option<OsUpdater>,
    caller: Caller,
    connections: Connections,
) {
    let denied = caller.admit(&handle).err();
    if let Some(why) = &denied {
        log::warn!(
            "control API: refused the caller pid {} (uid {}): {why}",
            caller.cred.pid.unwrap_or(0),
            caller.cred.uid
        );
    }
    let admitted = denied.is_none();
    let built = Builder::async_io_unix_stream(stream)
        .server(guid)
        .map(|b| b.p2p())
        .and_then(|b| b.serve_at(OBJECT_PATH, Manager1 { handle, denied, os }))
        .and_then(|b| b.build());
    let conn = match built {
        Ok(c) => c,
        Err(e) => {
            log::warn!("control API: client handshake failed: {e}");
            return;
        }
    };
    if admitted {
        lock(&connections).push((id, conn.clone()));
    }
    conn.closed();
    lock(&connections).retain(|(i, _)| *i != id);
}

fn signal_loop(events: Receiver<Event>, connections: Connections) {
    for event in events.iter() {
        let Event::UnitStateChanged {
            name,
            active_state,
            sub_state,
        } = event;
        let conns: Vec<Connection> = lock(&connections)
            .iter()
            .filter(|(_, c)| !c.is_closed())
            .map(|(_, c)| c.clone())
            .collect();
        for conn in conns {
            let sent = zbus::object_server::SignalEmitter::new(conn.inner(), OBJECT_PATH).and_then(
                |emitter| {
                    zbus::block_on(Manager1::unit_state_changed(
                        &emitter,
                        &name,
                        active_state.as_str(),
                        sub_state.as_str(),
                    ))
                },
            );
            if let Err(e) = sent {
                log::debug!("control API: cannot emit UnitStateChanged({name}): {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MethodError;
    use zbus::DBusError as _;

    #[test]
    fn error_names_are_the_apis() {
        for (error, name) in [
            (
                MethodError::NoSuchUnit(String::new()),
                flotilla_init_api::NO_SUCH_UNIT,
            ),
            (
                MethodError::InvalidUnit(String::new()),
                flotilla_init_api::INVALID_UNIT,
            ),
            (
                MethodError::Refused(String::new()),
                flotilla_init_api::REFUSED,
            ),
            (
                MethodError::InvalidArgument(String::new()),
                flotilla_init_api::INVALID_ARGUMENT,
            ),
            (
                MethodError::AccessDenied(String::new()),
                flotilla_init_api::ACCESS_DENIED,
            ),
        ] {
            assert_eq!(error.name().as_str(), name);
        }
    }
}
