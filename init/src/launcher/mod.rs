//! Where a unit's main process is created: the one seam between the manager and the runtime.
//!
//! The manager asks a [`Launcher`] for a process given a unit, its scope and its output
//! pipes. [`ContainerLauncher`] (the default) runs every unit as a container;
//! [`HostLauncher`] runs plain host processes, for hosts without namespaces and for
//! comparing costs.

mod container;
mod host;

pub use container::ContainerLauncher;
pub use host::HostLauncher;

use std::os::fd::OwnedFd;

use flotilla_units::Unit;
use nix::unistd::Pid;

use crate::scope::Scope;

/// The search path units get when their `env` sets none.
pub use flotilla_container::runtime::DEFAULT_PATH;

/// Why a unit's process could not be created.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The unit asks for something this launcher cannot provide.
    #[error("{0}")]
    Unsupported(String),
    /// The scope could not be prepared.
    #[error(transparent)]
    Scope(#[from] crate::scope::ScopeError),
    /// The container could not be created.
    #[error(transparent)]
    Container(#[from] flotilla_container::runtime::ContainerError),
    /// fork/exec failed.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// argv\[0\].
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The output ends handed to the new process.
pub struct LaunchIo {
    /// Write end of the stdout pipe.
    pub stdout: OwnedFd,
    /// Write end of the stderr pipe.
    pub stderr: OwnedFd,
}

/// Creates the main process of a unit run.
pub trait Launcher {
    /// Start `unit`'s command inside `scope`; returns the main pid. The process must not
    /// inherit any descriptor other than stdin (`/dev/null`) and `io`.
    fn launch(&mut self, unit: &Unit, scope: &Scope, io: LaunchIo) -> Result<Pid, LaunchError>;

    /// Where a stop's SIGTERM goes: the main process only (a container's pid 1, which
    /// forwards it and whose exit ends the whole pid namespace), or every process of the
    /// scope (plain host processes, like systemd's `KillMode=control-group`). SIGKILL
    /// escalation always goes to the whole scope.
    fn terminate_main_only(&self) -> bool {
        false
    }
}
