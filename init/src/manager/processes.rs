//! What the manager does to a unit's processes once they exist: the second half of the seam
//! whose first half is [`crate::launcher::Launcher`].
//!
//! Every signal the manager sends, every "is the scope empty?" it asks and every scope it
//! makes or removes goes through [`ProcessControl`]. [`SystemProcesses`] does it for real
//! (the unit scopes of a [`ScopeRoot`], `kill(2)`); a test double records the calls instead,
//! so a manager can run on fake pids that never reach a real process (as youki's `Syscall`
//! trait and its test helper do for the container runtime).

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::scope::{Limits, Scope, ScopeError, ScopeRoot};

/// The manager's hands on processes. Called only from the manager, in its event loop.
pub trait ProcessControl {
    /// The root the unit scopes are made in (callers of the control API are mapped to units
    /// by it).
    fn root(&self) -> &ScopeRoot;

    /// Prepare the scope for a new run of `unit` (leftovers of an earlier run are killed).
    fn prepare(&mut self, unit: &str) -> Result<Scope, ScopeError>;

    /// Apply `limits` to `scope` before the process starts.
    fn apply(&mut self, unit: &str, scope: &Scope, limits: &Limits) -> Result<(), ScopeError>;

    /// Send `signal` to every process of `unit`'s `scope`.
    fn signal_scope(&mut self, unit: &str, scope: &Scope, signal: Signal);

    /// Send `signal` to `unit`'s main process `pid` only.
    fn signal_main(&mut self, unit: &str, pid: Pid, signal: Signal);

    /// True when no process of `unit` is left in `scope`.
    fn is_empty(&mut self, unit: &str, scope: &Scope) -> bool;

    /// How many processes of this run of `unit` the kernel's OOM killer ended.
    fn oom_kills(&mut self, unit: &str, scope: &Scope) -> u64;

    /// Remove `unit`'s (empty) scope.
    fn remove(&mut self, unit: &str, scope: &Scope);

    /// Remove the root (after shutdown).
    fn remove_root(&mut self);
}

/// The real [`ProcessControl`]: scopes below a [`ScopeRoot`], signals with `kill(2)`,
/// `killpg(2)` or `cgroup.kill`.
#[derive(Debug)]
pub struct SystemProcesses {
    root: ScopeRoot,
}

impl SystemProcesses {
    /// Unit scopes below `root`.
    pub fn new(root: ScopeRoot) -> Self {
        Self { root }
    }
}

impl ProcessControl for SystemProcesses {
    fn root(&self) -> &ScopeRoot {
        &self.root
    }

    fn prepare(&mut self, unit: &str) -> Result<Scope, ScopeError> {
        self.root.prepare(unit)
    }

    fn apply(&mut self, _unit: &str, scope: &Scope, limits: &Limits) -> Result<(), ScopeError> {
        scope.apply(limits)
    }

    fn signal_scope(&mut self, _unit: &str, scope: &Scope, signal: Signal) {
        scope.signal(signal);
    }

    fn signal_main(&mut self, _unit: &str, pid: Pid, signal: Signal) {
        let _ = nix::sys::signal::kill(pid, signal);
    }

    fn is_empty(&mut self, _unit: &str, scope: &Scope) -> bool {
        scope.is_empty()
    }

    fn oom_kills(&mut self, _unit: &str, scope: &Scope) -> u64 {
        scope.oom_kills()
    }

    fn remove(&mut self, _unit: &str, scope: &Scope) {
        scope.remove();
    }

    fn remove_root(&mut self) {
        self.root.remove();
    }
}
