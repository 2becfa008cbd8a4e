//! Flotilla's control API as its clients see it: the D-Bus names of the manager
//! (`org.flotilla.Manager1` on a peer-to-peer Unix socket), the wire types and the states
//! they carry, the typed blocking [`client`], and the access rules a server applies to its
//! callers ([`access`], [`peer`], [`cgroup`]).
//!
//! `flotilla-init` serves this API; `unitctl`, fleetd's agent and the tests use it through
//! this crate alone, so a client does not depend on the manager.
//!
//! States cross the wire as systemd's strings (D-Bus signature `s`); in Rust they are enums
//! ([`ActiveState`], [`SubState`], [`LoadState`], [`UnitResult`], [`SystemState`],
//! [`LogStream`]) wrapped in [`Wire`], which keeps a string this client does not know (from
//! a newer manager) as [`Wire::Unknown`] instead of failing the call.

pub mod access;
pub mod cgroup;
pub mod client;
pub mod peer;
mod state;
mod types;

pub use state::{
    ActiveState, LoadState, LogStream, StateName, SubState, SystemState, UnitResult, UnknownState,
    Wire,
};
pub use types::{Event, ImageEntry, LogEntry, ReloadReport, UnitInfo};

/// D-Bus object path of the manager.
pub const OBJECT_PATH: &str = "/org/flotilla/Manager1";
/// D-Bus interface name of the manager.
pub const INTERFACE: &str = "org.flotilla.Manager1";
/// Default path of the manager's control socket.
pub const DEFAULT_SOCKET: &str = "/run/flotilla/manager.sock";
/// The manager's method that lists the images of its image stores (`a(ss)`: store name,
/// manifest digest; see [`ImageEntry`]). Read-only, allowed to every admitted caller like
/// `ListUnits`.
pub const LIST_IMAGES: &str = "ListImages";
/// The manager's method that reads the host's A/B update state (`s`: JSON, see
/// [`client::Client::os_status`]). Read-only.
pub const GET_OS_STATUS: &str = "GetOsStatus";
/// The manager's method that starts an OS update (`sb`: source, allow downgrade; see
/// [`client::Client::update_os`]).
pub const UPDATE_OS: &str = "UpdateOs";
/// The name of the manager's signal sent when a unit's active or sub state changes.
pub const UNIT_STATE_CHANGED: &str = "UnitStateChanged";

/// The prefix of every error name the manager answers with (`org.flotilla.Error.<Kind>`).
pub const ERROR_PREFIX: &str = "org.flotilla.Error";
/// No unit (and no template) by that name.
pub const NO_SUCH_UNIT: &str = "org.flotilla.Error.NoSuchUnit";
/// The unit's text or name is invalid: sending the same again cannot help.
pub const INVALID_UNIT: &str = "org.flotilla.Error.InvalidUnit";
/// The request cannot be carried out now (e.g. the manager is shutting down).
pub const REFUSED: &str = "org.flotilla.Error.Refused";
/// An argument is not a valid D-Bus string (a NUL byte or invalid UTF-8 inside).
pub const INVALID_ARGUMENT: &str = "org.flotilla.Error.InvalidArgument";
/// The caller runs in a unit that is not granted the control API.
pub const ACCESS_DENIED: &str = "org.flotilla.Error.AccessDenied";
