//! A typed, blocking client for the manager's D-Bus API (used by `unitctl`, fleetd's agent
//! and tests).
//!
//! States arrive as [`Wire`] values: a state string this client does not know (from a
//! newer manager) is kept as [`Wire::Unknown`], never a decoding error.
//!
//! The connection is peer-to-peer (no bus daemon), so calls carry no destination; signals
//! arrive without a sender and are matched on path, interface and member only.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use zbus::blocking::connection::Builder;
use zbus::blocking::{Connection, MessageIterator};
use zbus::message::Type as MessageType;
use zbus::zvariant::{DynamicType, Type};
use zbus::DBusError as _;

use crate::{
    Event, ImageEntry, LogEntry, ReloadReport, SystemState, UnitInfo, Wire, ACCESS_DENIED,
    INTERFACE, INVALID_UNIT, NO_SUCH_UNIT, OBJECT_PATH, UNIT_STATE_CHANGED,
};

/// Why a call to the manager failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to, or the D-Bus handshake failed.
    #[error("cannot reach the manager at {}: {source} (is flotilla-init running? pass --api PATH or set FLOTILLA_API)", socket.display())]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The manager answered with a D-Bus error (e.g. `org.flotilla.Error.NoSuchUnit`).
    #[error("{message}")]
    Manager {
        /// The D-Bus error name.
        name: String,
        /// The manager's explanation.
        message: String,
    },
    /// The connection broke or a message did not have the expected shape.
    #[error("D-Bus protocol error talking to the manager: {0}")]
    Protocol(#[from] zbus::Error),
}

impl ClientError {
    /// The D-Bus error name when the manager refused the call, e.g.
    /// `org.flotilla.Error.NoSuchUnit`.
    pub fn manager_error_name(&self) -> Option<&str> {
        match self {
            ClientError::Manager { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether the manager answered that there is no such unit ([`NO_SUCH_UNIT`]).
    pub fn is_no_such_unit(&self) -> bool {
        self.manager_error_name() == Some(NO_SUCH_UNIT)
    }

    /// Whether the manager rejected the unit's text or name ([`INVALID_UNIT`]): sending
    /// the same again cannot help.
    pub fn is_invalid_unit(&self) -> bool {
        self.manager_error_name() == Some(INVALID_UNIT)
    }

    /// Whether the manager refused the caller ([`ACCESS_DENIED`]).
    pub fn is_access_denied(&self) -> bool {
        self.manager_error_name() == Some(ACCESS_DENIED)
    }
}

/// Turn a zbus error from a call into a [`ClientError`], keeping the server's message.
fn call_error(e: zbus::Error) -> ClientError {
    match e {
        zbus::Error::MethodError(name, message, _) => ClientError::Manager {
            message: message.unwrap_or_else(|| name.to_string()),
            name: name.to_string(),
        },
        zbus::Error::FDO(fdo) => ClientError::Manager {
            name: fdo.name().to_string(),
            message: fdo.description().unwrap_or_default().to_string(),
        },
        other => ClientError::Protocol(other),
    }
}

/// A connection to the manager.
#[derive(Clone)]
pub struct Client {
    conn: Connection,
    socket: PathBuf,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connect to the manager's socket and authenticate.
    pub fn connect(socket: &Path) -> Result<Client, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            socket: socket.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(unreachable)?;
        let conn = Builder::async_io_unix_stream(stream)
            .p2p()
            .build()
            .map_err(|e| {
                unreachable(match e {
                    zbus::Error::InputOutput(io) => io::Error::new(io.kind(), io.to_string()),
                    zbus::Error::Handshake(msg) => io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("the manager refused the connection ({msg})"),
                    ),
                    other => io::Error::other(other.to_string()),
                })
            })?;
        Ok(Client {
            conn,
            socket: socket.to_path_buf(),
        })
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Call `method` with `body` and decode the reply as `R`.
    fn call<B, R>(&self, method: &str, body: &B) -> Result<R, ClientError>
    where
        B: Serialize + DynamicType,
        R: DeserializeOwned + Type,
    {
        let reply = self
            .conn
            .call_method(None::<&str>, OBJECT_PATH, Some(INTERFACE), method, body)
            .map_err(call_error)?;
        Ok(reply.body().deserialize::<R>()?)
    }

    /// All known units.
    pub fn list_units(&self) -> Result<Vec<UnitInfo>, ClientError> {
        self.call("ListUnits", &())
    }

    /// Every image in the manager's image stores (store name and manifest digest), sorted
    /// by name; empty when the manager has no image store (`--launcher host`).
    pub fn list_images(&self) -> Result<Vec<ImageEntry>, ClientError> {
        self.call(crate::LIST_IMAGES, &())
    }

    /// One unit.
    pub fn get_unit(&self, name: &str) -> Result<UnitInfo, ClientError> {
        self.call::<_, (UnitInfo,)>("GetUnit", &(name,))
            .map(|(u,)| u)
    }

    /// Start a unit; returns its state right after the start was queued.
    pub fn start_unit(&self, name: &str) -> Result<UnitInfo, ClientError> {
        self.call::<_, (UnitInfo,)>("StartUnit", &(name,))
            .map(|(u,)| u)
    }

    /// Stop a unit; returns its state right after the stop was queued.
    pub fn stop_unit(&self, name: &str) -> Result<UnitInfo, ClientError> {
        self.call::<_, (UnitInfo,)>("StopUnit", &(name,))
            .map(|(u,)| u)
    }

    /// Restart a unit; returns its state right after the restart was queued.
    pub fn restart_unit(&self, name: &str) -> Result<UnitInfo, ClientError> {
        self.call::<_, (UnitInfo,)>("RestartUnit", &(name,))
            .map(|(u,)| u)
    }

    /// Add or replace unit `name` from its TOML text.
    pub fn load_unit(&self, name: &str, toml: &str) -> Result<UnitInfo, ClientError> {
        self.call::<_, (UnitInfo,)>("LoadUnit", &(name, toml))
            .map(|(u,)| u)
    }

    /// Stop and forget a unit.
    pub fn remove_unit(&self, name: &str) -> Result<(), ClientError> {
        self.call("RemoveUnit", &(name,))
    }

    /// Re-read the unit directories, restarting changed running units if asked.
    pub fn reload(&self, restart_changed: bool) -> Result<ReloadReport, ClientError> {
        self.call::<_, (ReloadReport,)>("Reload", &(restart_changed,))
            .map(|(r,)| r)
    }

    /// The last `lines` captured output lines of a unit.
    pub fn logs(&self, name: &str, lines: u32) -> Result<Vec<LogEntry>, ClientError> {
        self.call("Logs", &(name, lines))
    }

    /// The last `lines` captured output lines of a unit with a sequence number above
    /// `after_seq`.
    pub fn logs_after(
        &self,
        name: &str,
        after_seq: u64,
        lines: u32,
    ) -> Result<Vec<LogEntry>, ClientError> {
        self.call("LogsAfter", &(name, after_seq, lines))
    }

    /// The unit file's text.
    pub fn cat_unit(&self, name: &str) -> Result<String, ClientError> {
        self.call("CatUnit", &(name,))
    }

    /// The host's machine id (`/etc/machine-id` as the manager reads it, trimmed).
    pub fn machine_id(&self) -> Result<String, ClientError> {
        self.call("GetMachineId", &())
    }

    /// The manager's state: [`SystemState::Running`] or [`SystemState::Stopping`] (an
    /// orderly shutdown is stopping the units).
    pub fn system_state(&self) -> Result<Wire<SystemState>, ClientError> {
        self.call("GetSystemState", &())
    }

    /// Whether unit `name` runs with the control API grant (`[container] control_api`, as
    /// it was when it was last started); false when it does not run.
    pub fn unit_control_api(&self, name: &str) -> Result<bool, ClientError> {
        self.call("GetUnitControlApi", &(name,))
    }

    /// The host's A/B update state as JSON: the document `unitctl os status --json` prints
    /// (booted slot, each slot's entry, next boot, a rolled-back update) plus `job`, the OS
    /// update init is carrying out for an [`Client::update_os`] (`null` when none):
    /// `{"source", "state": "running"|"failed"|"rebooting", "message"}`.
    pub fn os_status(&self) -> Result<String, ClientError> {
        self.call(crate::GET_OS_STATUS, &())
    }

    /// Starts an OS update from `source` (a payload directory on the host, or an OCI
    /// reference init pulls): init verifies it, writes the other slot, makes it the next
    /// boot (on trial) and reboots in order. Returns once the job started (refused while
    /// one runs); follow it with [`Client::os_status`]. Refused to callers without the
    /// control API grant, like every call that changes the host.
    pub fn update_os(&self, source: &str, allow_downgrade: bool) -> Result<(), ClientError> {
        self.call(crate::UPDATE_OS, &(source, allow_downgrade))
    }

    /// Subscribe to `UnitStateChanged` signals. Signals emitted after this returns are
    /// delivered; iterating blocks until the next one and ends when the connection closes.
    pub fn subscribe(&self) -> Result<StateChanges, ClientError> {
        let rule = zbus::MatchRule::builder()
            .msg_type(MessageType::Signal)
            .path(OBJECT_PATH)?
            .interface(INTERFACE)?
            .member(UNIT_STATE_CHANGED)?
            .build();
        let messages = MessageIterator::for_match_rule(rule, &self.conn, None)?;
        Ok(StateChanges { messages })
    }
}

/// A stream of `UnitStateChanged` signals from [`Client::subscribe`].
pub struct StateChanges {
    messages: MessageIterator,
}

impl Iterator for StateChanges {
    type Item = Result<Event, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let msg = match self.messages.next()? {
            Ok(m) => m,
            Err(e) => return Some(Err(ClientError::Protocol(e))),
        };
        Some(
            msg.body()
                .deserialize::<(String, Wire<_>, Wire<_>)>()
                .map(|(name, active_state, sub_state)| Event::UnitStateChanged {
                    name,
                    active_state,
                    sub_state,
                })
                .map_err(ClientError::Protocol),
        )
    }
}
