//! The agent's handle on the local init. [`LocalInit`] is what the agent needs of it (the
//! seam its tests drive with an in-memory fake); [`InitApi`] is the real one:
//! `org.flotilla.Manager1` over its D-Bus socket, through the blocking typed client of
//! `flotilla-init-api`, called from tokio with `spawn_blocking`.
//!
//! The connection is made lazily and made again after a transport error, so the agent
//! survives an init that restarts; [`InitApi::generation`] counts connections, which tells
//! the agent when to re-read what init runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use flotilla_init_api::client::{Client, ClientError};
use flotilla_init_api::{
    Event as InitEvent, ImageEntry, LogEntry, SystemState, UnitInfo, Wire, INVALID_UNIT,
    LIST_IMAGES, NO_SUCH_UNIT,
};
use tokio::sync::mpsc;

/// Why a call to the local init failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The call reached init and was refused, or never reached it.
    #[error("{op} on the local init at {}: {source}", socket.display())]
    Call {
        /// What was asked, e.g. `LoadUnit web`.
        op: String,
        /// The init API socket.
        socket: PathBuf,
        /// What the client said (boxed: zbus errors are large).
        #[source]
        source: Box<ClientError>,
    },
    /// The blocking task that made the call did not finish (panicked or was cancelled).
    /// Also what an in-memory [`LocalInit`] answers when it plays an unreachable init.
    #[error("{op} on the local init at {}: the calling task ended abnormally ({reason})", socket.display())]
    Task {
        /// What was asked.
        op: String,
        /// The init API socket.
        socket: PathBuf,
        /// The join error.
        reason: String,
    },
}

impl InitError {
    /// The D-Bus error name when init itself refused the call.
    pub fn manager_error_name(&self) -> Option<&str> {
        match self {
            InitError::Call { source, .. } => source.manager_error_name(),
            InitError::Task { .. } => None,
        }
    }

    /// Whether init answered that there is no such unit.
    pub fn is_no_such_unit(&self) -> bool {
        self.manager_error_name() == Some(NO_SUCH_UNIT)
    }

    /// Whether init rejected the unit's text or name (retrying the same text cannot help).
    pub fn is_invalid_unit(&self) -> bool {
        self.manager_error_name() == Some(INVALID_UNIT)
    }
}

#[derive(Default)]
struct Conn {
    client: Option<Client>,
    generation: u64,
}

/// A handle on the local init's API at a socket path. Cheap to clone; every clone shares
/// one connection.
#[derive(Clone)]
pub struct InitApi {
    socket: PathBuf,
    conn: Arc<Mutex<Conn>>,
}

impl std::fmt::Debug for InitApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitApi")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

fn lock(conn: &Mutex<Conn>) -> MutexGuard<'_, Conn> {
    // The guarded data is an Option and a counter: a panic cannot leave it inconsistent.
    conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl InitApi {
    /// A handle on the init API at `socket` (e.g. `/run/flotilla/manager.sock`). Nothing is
    /// connected until the first call.
    pub fn new(socket: impl Into<PathBuf>) -> InitApi {
        InitApi {
            socket: socket.into(),
            conn: Arc::new(Mutex::new(Conn::default())),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How many connections have been made so far: it changes when the connection was
    /// lost and made again (init may have restarted).
    pub fn generation(&self) -> u64 {
        lock(&self.conn).generation
    }

    fn call_blocking<T>(
        &self,
        op: &str,
        f: impl FnOnce(&Client) -> Result<T, ClientError>,
    ) -> Result<T, InitError> {
        let error = |source| InitError::Call {
            op: op.to_string(),
            socket: self.socket.clone(),
            source: Box::new(source),
        };
        let client = {
            let mut conn = lock(&self.conn);
            match &conn.client {
                Some(c) => c.clone(),
                None => {
                    let c = Client::connect(&self.socket).map_err(error)?;
                    conn.generation += 1;
                    conn.client = Some(c.clone());
                    c
                }
            }
        };
        f(&client).map_err(|e| {
            if !matches!(e, ClientError::Manager { .. }) {
                // The transport broke: connect again on the next call.
                lock(&self.conn).client = None;
            }
            error(e)
        })
    }

    async fn call<T, F>(&self, op: String, f: F) -> Result<T, InitError>
    where
        T: Send + 'static,
        F: FnOnce(&Client) -> Result<T, ClientError> + Send + 'static,
    {
        let this = self.clone();
        let op2 = op.clone();
        tokio::task::spawn_blocking(move || this.call_blocking(&op2, f))
            .await
            .map_err(|e| InitError::Task {
                op,
                socket: self.socket.clone(),
                reason: e.to_string(),
            })?
    }

    /// The host's machine id (`GetMachineId`: `/etc/machine-id`, trimmed).
    pub async fn machine_id(&self) -> Result<String, InitError> {
        self.call("GetMachineId".into(), |c| c.machine_id()).await
    }

    /// The manager's state (`GetSystemState`): `running`, or `stopping` once the host's
    /// orderly shutdown is stopping its units.
    pub async fn system_state(&self) -> Result<Wire<SystemState>, InitError> {
        self.call("GetSystemState".into(), |c| c.system_state())
            .await
    }

    /// Every unit init knows.
    pub async fn list_units(&self) -> Result<Vec<UnitInfo>, InitError> {
        self.call("ListUnits".into(), |c| c.list_units()).await
    }

    /// Every image in init's image stores (`ListImages`): store name and manifest digest.
    pub async fn list_images(&self) -> Result<Vec<ImageEntry>, InitError> {
        self.call(LIST_IMAGES.into(), |c| c.list_images()).await
    }

    /// One unit's state.
    pub async fn get_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        let n = name.to_string();
        self.call(format!("GetUnit {name}"), move |c| c.get_unit(&n))
            .await
    }

    /// Whether unit `name` runs with the control API grant (`GetUnitControlApi`): what the
    /// API asks about a caller it finds in another unit's cgroup.
    pub async fn unit_control_api(&self, name: &str) -> Result<bool, InitError> {
        let n = name.to_string();
        self.call(format!("GetUnitControlApi {name}"), move |c| {
            c.unit_control_api(&n)
        })
        .await
    }

    /// The text of a unit's file.
    pub async fn cat_unit(&self, name: &str) -> Result<String, InitError> {
        let n = name.to_string();
        self.call(format!("CatUnit {name}"), move |c| c.cat_unit(&n))
            .await
    }

    /// `LoadUnit(name, toml)`: adds or replaces the unit (a running unit keeps running on
    /// its old definition until its next start).
    pub async fn load_unit(&self, name: &str, toml: &str) -> Result<UnitInfo, InitError> {
        let (n, t) = (name.to_string(), toml.to_string());
        self.call(format!("LoadUnit {name}"), move |c| c.load_unit(&n, &t))
            .await
    }

    /// Starts a unit.
    pub async fn start_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        let n = name.to_string();
        self.call(format!("StartUnit {name}"), move |c| c.start_unit(&n))
            .await
    }

    /// Stops a unit.
    pub async fn stop_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        let n = name.to_string();
        self.call(format!("StopUnit {name}"), move |c| c.stop_unit(&n))
            .await
    }

    /// Restarts a unit (to run a new definition).
    pub async fn restart_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        let n = name.to_string();
        self.call(format!("RestartUnit {name}"), move |c| c.restart_unit(&n))
            .await
    }

    /// The last `lines` captured output lines of a unit with a sequence number above
    /// `after_seq` (`0`: the last `lines`).
    pub async fn logs(
        &self,
        name: &str,
        after_seq: u64,
        lines: u32,
    ) -> Result<Vec<LogEntry>, InitError> {
        let n = name.to_string();
        self.call(format!("LogsAfter {name}"), move |c| {
            c.logs_after(&n, after_seq, lines)
        })
        .await
    }

    /// The host's A/B update state as JSON (`GetOsStatus`, see
    /// `flotilla_init_api::client::Client::os_status`).
    pub async fn os_status(&self) -> Result<String, InitError> {
        self.call(flotilla_init_api::GET_OS_STATUS.into(), |c| c.os_status())
            .await
    }

    /// Starts an OS update from `source` (`UpdateOs`): init verifies, writes the other slot
    /// and reboots into it; returns once the job started.
    pub async fn update_os(&self, source: &str, allow_downgrade: bool) -> Result<(), InitError> {
        let s = source.to_string();
        self.call(format!("UpdateOs {source}"), move |c| {
            c.update_os(&s, allow_downgrade)
        })
        .await
    }

    /// Stops and forgets a unit (its API-loaded file is deleted).
    pub async fn remove_unit(&self, name: &str) -> Result<(), InitError> {
        let n = name.to_string();
        self.call(format!("RemoveUnit {name}"), move |c| c.remove_unit(&n))
            .await
    }
}

/// What the agent needs of the local init: the calls it makes, and a feed of
/// [`InitSignal`]s. [`InitApi`] is the real implementation; the agent's tests use an
/// in-memory one, so its decisions are tested without a built `flotilla-init`.
#[async_trait]
pub trait LocalInit: std::fmt::Debug + Send + Sync {
    /// Where this init is, for log lines (the socket path).
    fn describe(&self) -> String;
    /// Changes whenever the connection to init was made again (init may have restarted
    /// and forgotten nothing, or everything): the agent then re-reads what init runs.
    fn generation(&self) -> u64;
    /// Starts delivering [`InitSignal`]s to `tx`: [`InitSignal::Subscribed`] each time a
    /// subscription is (re)made, then [`InitSignal::Changed`] per unit state change; ends
    /// once `tx` is closed.
    fn subscribe(&self, tx: mpsc::UnboundedSender<InitSignal>) -> std::io::Result<()>;
    /// The host's machine id (`GetMachineId`).
    async fn machine_id(&self) -> Result<String, InitError>;
    /// The manager's state (`GetSystemState`).
    async fn system_state(&self) -> Result<Wire<SystemState>, InitError>;
    /// Every unit init knows (`ListUnits`).
    async fn list_units(&self) -> Result<Vec<UnitInfo>, InitError>;
    /// Every image in init's image stores (`ListImages`).
    async fn list_images(&self) -> Result<Vec<ImageEntry>, InitError>;
    /// One unit's state (`GetUnit`).
    async fn get_unit(&self, name: &str) -> Result<UnitInfo, InitError>;
    /// The text of a unit's file (`CatUnit`).
    async fn cat_unit(&self, name: &str) -> Result<String, InitError>;
    /// Adds or replaces a unit (`LoadUnit`).
    async fn load_unit(&self, name: &str, toml: &str) -> Result<UnitInfo, InitError>;
    /// Starts a unit (`StartUnit`).
    async fn start_unit(&self, name: &str) -> Result<UnitInfo, InitError>;
    /// Stops a unit (`StopUnit`).
    async fn stop_unit(&self, name: &str) -> Result<UnitInfo, InitError>;
    /// Restarts a unit (`RestartUnit`).
    async fn restart_unit(&self, name: &str) -> Result<UnitInfo, InitError>;
    /// Stops and forgets a unit (`RemoveUnit`).
    async fn remove_unit(&self, name: &str) -> Result<(), InitError>;
    /// The host's A/B update state as JSON (`GetOsStatus`).
    async fn os_status(&self) -> Result<String, InitError>;
    /// Starts an OS update from `source` (`UpdateOs`); returns once the job started.
    async fn update_os(&self, source: &str, allow_downgrade: bool) -> Result<(), InitError>;
}

#[async_trait]
impl LocalInit for InitApi {
    fn describe(&self) -> String {
        self.socket.display().to_string()
    }
    fn generation(&self) -> u64 {
        InitApi::generation(self)
    }
    fn subscribe(&self, tx: mpsc::UnboundedSender<InitSignal>) -> std::io::Result<()> {
        spawn_signal_thread(self.socket.clone(), tx)
    }
    async fn machine_id(&self) -> Result<String, InitError> {
        InitApi::machine_id(self).await
    }
    async fn system_state(&self) -> Result<Wire<SystemState>, InitError> {
        InitApi::system_state(self).await
    }
    async fn list_units(&self) -> Result<Vec<UnitInfo>, InitError> {
        InitApi::list_units(self).await
    }
    async fn list_images(&self) -> Result<Vec<ImageEntry>, InitError> {
        InitApi::list_images(self).await
    }
    async fn get_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        InitApi::get_unit(self, name).await
    }
    async fn cat_unit(&self, name: &str) -> Result<String, InitError> {
        InitApi::cat_unit(self, name).await
    }
    async fn load_unit(&self, name: &str, toml: &str) -> Result<UnitInfo, InitError> {
        InitApi::load_unit(self, name, toml).await
    }
    async fn start_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        InitApi::start_unit(self, name).await
    }
    async fn stop_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        InitApi::stop_unit(self, name).await
    }
    async fn restart_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        InitApi::restart_unit(self, name).await
    }
    async fn remove_unit(&self, name: &str) -> Result<(), InitError> {
        InitApi::remove_unit(self, name).await
    }
    async fn os_status(&self) -> Result<String, InitError> {
        InitApi::os_status(self).await
    }
    async fn update_os(&self, source: &str, allow_downgrade: bool) -> Result<(), InitError> {
        InitApi::update_os(self, source, allow_downgrade).await
    }
}

/// What the signal feed tells the agent ([`LocalInit::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitSignal {
    /// A `UnitStateChanged` for this unit.
    Changed(String),
    /// A (new) subscription is in place: init may have restarted in between.
    Subscribed,
}

/// Starts a thread that subscribes to init's `UnitStateChanged` signals on a connection of
/// its own and forwards them; it subscribes again (every second) when the connection breaks,
/// and ends once the receiver is dropped and a signal or reconnection notices it.
fn spawn_signal_thread(
    socket: PathBuf,
    tx: mpsc::UnboundedSender<InitSignal>,
) -> std::io::Result<()> {
    thread::Builder::new()
        .name("fleetd-init-signals".into())
        .spawn(move || {
            while !tx.is_closed() {
                let subscribed = Client::connect(&socket).and_then(|c| {
                    let s = c.subscribe()?;
                    Ok((c, s))
                });
                match subscribed {
                    Ok((_client, changes)) => {
                        if tx.send(InitSignal::Subscribed).is_err() {
                            return;
                        }
                        for change in changes {
                            match change {
                                Ok(InitEvent::UnitStateChanged { name, .. }) => {
                                    if tx.send(InitSignal::Changed(name)).is_err() {
                                        return;
                                    }
                                }
                                Err(e) => {
                                    log::debug!("init signals on {}: {e}", socket.display());
                                    break;
                                }
                            }
                        }
                        log::debug!("init signal connection on {} ended", socket.display());
                    }
                    Err(e) => log::debug!("cannot subscribe to init signals: {e}"),
                }
                thread::sleep(Duration::from_secs(1));
            }
        })
        .map(|_| ())
}
