//! The control API seen from inside init: requests the manager answers, events it emits.
//!
//! The D-Bus server ([`dbus`]) turns method calls into [`Request`]s, hands them to the
//! manager's event loop through an [`ApiHandle`] and waits for the reply; the manager
//! publishes [`Event`]s that the server turns into D-Bus signals. This module is the one
//! seam between transport and state: nothing here knows about D-Bus.

pub mod dbus;
pub mod wire;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

// The client-side API lives in `flotilla-init-api`; these are re-exported so the manager's
// code (and code written against `flotilla_init::api`) names them as before.
pub use flotilla_init_api::{
    access, client, peer, ActiveState, Event, ImageEntry, LoadState, LogEntry, LogStream,
    ReloadReport, SubState, SystemState, UnitInfo, UnitResult, Wire, DEFAULT_SOCKET, INTERFACE,
    OBJECT_PATH,
};

/// Where `GetMachineId` reads the machine id (rendered by the boot, see machine-id(5)).
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";

/// The machine id in the file at `path`: its text without surrounding whitespace. Fails
/// with [`ApiError::Refused`] when the file cannot be read or holds nothing.
pub fn read_machine_id(path: &std::path::Path) -> Result<String, ApiError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ApiError::Refused(format!(
            "cannot read the machine id from {}: {e}; create it (32 hex digits, see machine-id(5))",
            path.display()
        ))
    })?;
    let id = text.trim();
    if id.is_empty() {
        return Err(ApiError::Refused(format!(
            "{} is empty; write the machine id into it (32 hex digits, see machine-id(5))",
            path.display()
        )));
    }
    Ok(id.to_string())
}

/// A request to the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// All known units.
    ListUnits,
    /// One unit (templates are instantiated on demand).
    GetUnit(String),
    /// Start a unit and what it requires/wants.
    StartUnit(String),
    /// Stop a unit (and the units that require it).
    StopUnit(String),
    /// Stop then start.
    RestartUnit(String),
    /// Add or replace a unit from TOML text; persisted in the state directory.
    LoadUnit {
        /// Unit name (file stem).
        name: String,
        /// The unit file's text.
        toml: String,
    },
    /// Stop and forget a unit; removes a unit loaded over the API from the state directory.
    RemoveUnit(String),
    /// Re-read the unit directories.
    Reload {
        /// Restart running units whose definition changed.
        restart_changed: bool,
    },
    /// Captured output: the last `lines` entries with `seq > after_seq`.
    Logs {
        /// Unit name.
        name: String,
        /// How many entries at most (the newest ones).
        lines: u32,
        /// Only entries after this sequence number (0 = from the start of the tail).
        after_seq: u64,
    },
    /// The unit file's text.
    CatUnit(String),
    /// The manager's state, as systemd's `SystemState`: [`SYSTEM_RUNNING`] or, once an
    /// orderly shutdown began, [`SYSTEM_STOPPING`].
    SystemState,
    /// Every image in the manager's image stores (`ListImages`).
    ListImages,
    /// Whether the unit runs with the control API grant (`[container] control_api`, as it
    /// was when the unit was last started); false when it does not run.
    ControlApiGranted(String),
}

/// [`Request::SystemState`] while units run normally ([`SystemState::Running`]).
pub const SYSTEM_RUNNING: &str = SystemState::Running.as_str();
/// [`Request::SystemState`] once a shutdown (power-off, reboot, SIGTERM) is stopping units
/// ([`SystemState::Stopping`]).
pub const SYSTEM_STOPPING: &str = SystemState::Stopping.as_str();

/// The manager's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to `ListUnits`.
    Units(Vec<UnitInfo>),
    /// Answer to `GetUnit`, `StartUnit`, `StopUnit`, `RestartUnit`, `LoadUnit`.
    Unit(UnitInfo),
    /// Answer to `RemoveUnit`.
    Done,
    /// Answer to `Reload`.
    Reload(ReloadReport),
    /// Answer to `Logs`.
    Logs(Vec<LogEntry>),
    /// Answer to `CatUnit` and `SystemState`.
    Text(String),
    /// Answer to `ControlApiGranted`.
    Granted(bool),
    /// Answer to `ListImages`.
    Images(Vec<ImageEntry>),
}

/// Why a request was refused. Each maps to a D-Bus error name `org.flotilla.Error.<Variant>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No unit (and no template) by that name.
    #[error("unit {0} not found; `unitctl list` shows the loaded units")]
    NoSuchUnit(String),
    /// The unit text or name is invalid.
    #[error("{0}")]
    InvalidUnit(String),
    /// The request cannot be carried out now (e.g. the manager is shutting down).
    #[error("{0}")]
    Refused(String),
}

/// A request together with where to send its answer.
pub struct Envelope {
    /// The request.
    pub request: Request,
    /// Where the manager sends the reply; a dropped receiver is not an error.
    pub reply: Sender<Result<Response, ApiError>>,
}

/// Client side of the manager's request queue; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ApiHandle {
    tx: Sender<Envelope>,
    waker: Arc<OwnedFd>,
}

/// Manager side of the request queue: poll [`ApiQueue::fd`] for readability, then drain.
pub struct ApiQueue {
    rx: Receiver<Envelope>,
    waker: Arc<OwnedFd>,
}

/// Create a connected handle/queue pair. The queue's fd becomes readable when a request waits.
pub fn channel() -> std::io::Result<(ApiHandle, ApiQueue)> {
    let waker = Arc::new(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?);
    let (tx, rx) = mpsc::channel();
    Ok((
        ApiHandle {
            tx,
            waker: Arc::clone(&waker),
        },
        ApiQueue { rx, waker },
    ))
}

impl ApiHandle {
    /// Send a request and block until the manager answers.
    pub fn call(&self, request: Request) -> Result<Response, ApiError> {
        let (reply, answer) = mpsc::channel();
        self.tx
            .send(Envelope { request, reply })
            .map_err(|_| ApiError::Refused("the manager is shutting down".into()))?;
        // An eventfd write only fails on counter overflow, which cannot happen with +1 writes
        // drained by the manager; the request is queued either way.
        let _ = rustix::io::write(&*self.waker, &1u64.to_ne_bytes());
        answer
            .recv()
            .map_err(|_| ApiError::Refused("the manager dropped the request".into()))?
    }
}

impl ApiQueue {
    /// The eventfd to watch for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.waker.as_fd()
    }

    /// Take every waiting request (resets the eventfd).
    pub fn drain(&self) -> Vec<Envelope> {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&*self.waker, &mut buf);
        self.rx.try_iter().collect()
    }
}
