//! Where a unit's main process is created: the one seam the container runtime fills.
//!
//! The manager asks a [`Launcher`] for a process given a unit, its scope and its output
//! pipes. [`HostLauncher`] runs the command as a plain process on the host (with the unit's
//! `env` and `workdir`); it refuses, with a clear error, the keys only a container runtime
//! can honour, instead of silently ignoring them.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use flotilla_units::{Network, Unit};
use nix::unistd::Pid;

use crate::scope::Scope;

/// The search path units get when their `env` sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a unit's process could not be created.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The unit asks for something this launcher cannot provide.
    #[error("{0}")]
    Unsupported(String),
    /// The scope could not be prepared.
    #[error(transparent)]
    Scope(#[from] crate::scope::ScopeError),
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
}

/// Give the new process default signal dispositions and an empty signal mask: the manager
/// blocks the signals it reads from a signalfd, and may have inherited ignored signals; a
/// unit must see SIGTERM. Async-signal-safe; call only between fork and exec.
pub fn reset_signals() -> std::io::Result<()> {
    use nix::sys::signal::{
        sigaction, sigprocmask, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
    };
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL has no handler to be unsound.
        unsafe { sigaction(sig, &default) }.map_err(std::io::Error::from)?;
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).map_err(std::io::Error::from)
}

/// Runs units as plain processes on the host: a new session, a clean environment
/// (`PATH`, `FLOTILLA_UNIT`, then the unit's `env`), the unit's `workdir`.
#[derive(Debug, Default)]
pub struct HostLauncher;

impl HostLauncher {
    fn check_supported(unit: &Unit) -> Result<(), LaunchError> {
        let c = &unit.container;
        let unsupported = [
            (c.image.is_some(), "image"),
            (c.user.is_some(), "user"),
            (!c.mounts.is_empty(), "mounts"),
            (c.network != Network::Host, "network"),
            (c.hostname.is_some(), "hostname"),
        ];
        let keys: Vec<&str> = unsupported
            .iter()
            .filter(|(set, _)| *set)
            .map(|(_, k)| *k)
            .collect();
        if keys.is_empty() {
            Ok(())
        } else {
            Err(LaunchError::Unsupported(format!(
                "the host launcher cannot honour {}; these need the container runtime \
                 (remove them to run {} as a plain host process)",
                keys.join(", "),
                unit.name
            )))
        }
    }
}

impl Launcher for HostLauncher {
    fn launch(&mut self, unit: &Unit, scope: &Scope, io: LaunchIo) -> Result<Pid, LaunchError> {
        Self::check_supported(unit)?;
        let (program, args) = unit
            .container
            .command
            .split_first()
            .ok_or_else(|| LaunchError::Unsupported("the command is empty".into()))?;
        let entry = scope.entry()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("FLOTILLA_UNIT", &unit.name)
            .envs(&unit.container.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(io.stdout))
            .stderr(Stdio::from(io.stderr));
        if let Some(dir) = &unit.container.workdir {
            cmd.current_dir(dir);
        }
        // SAFETY: between fork and exec this only calls sigaction(2), sigprocmask(2),
        // setsid(2) and write(2) (all async-signal-safe) on an fd opened before the fork;
        // it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                reset_signals()?;
                entry.enter()
            });
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = i32::try_from(child.id()).map_err(|_| LaunchError::Spawn {
            program: program.clone(),
            source: std::io::Error::other("pid out of range"),
        })?;
        // The manager reaps with waitpid(-1); dropping `Child` neither waits nor kills.
        drop(child);
        Ok(Pid::from_raw(pid))
    }
}
