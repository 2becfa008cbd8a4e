//! Unit states in systemd's vocabulary (the API's enums), and the runtime record of one unit.

use std::collections::VecDeque;
use std::time::Instant;

use nix::unistd::Pid;

use crate::logs::UnitLog;
use crate::scope::Scope;

// The manager's states are the API's enums (`flotilla-init-api`): one definition of the
// vocabulary for the state machine, the wire and every client. Each keeps `as_str()`.
pub use flotilla_init_api::{ActiveState as Active, SubState as Sub, UnitResult as Outcome};

/// What was asked of the unit and is not done yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Start it (possibly waiting for ordering).
    Start,
    /// Stop it (waiting for units ordered after it to stop first).
    Stop,
    /// Stop it, then start it again.
    Restart,
}

/// Runtime record of one unit.
#[derive(Debug)]
pub struct Slot {
    /// Active state.
    pub active: Active,
    /// Sub state.
    pub sub: Sub,
    /// Pending job.
    pub job: Option<Job>,
    /// Main process.
    pub main_pid: Option<Pid>,
    /// Processes of the current (or last) run.
    pub scope: Option<Scope>,
    /// Exit code of the last main process.
    pub exit_code: Option<i32>,
    /// Signal that killed the last main process.
    pub exit_signal: Option<i32>,
    /// Restarts done by the restart policy since the last manual start.
    pub restarts: u32,
    /// Restarts in a row without a run longer than `restart_max_sec` (drives the backoff).
    pub backoff_step: u32,
    /// Start times within the start-limit window.
    pub start_times: VecDeque<Instant>,
    /// Fingerprint of the unit file text the current process was started from.
    pub running_source: Option<u64>,
    /// The current run was started with `[container] control_api = true`.
    pub control_api: bool,
    /// When the current run started.
    pub started_at: Option<Instant>,
    /// Timer: when the unit next needs looking at (restart, escalation, scope re-check).
    pub deadline: Option<Instant>,
    /// While stopping: when to (re)send SIGKILL.
    pub kill_at: Option<Instant>,
    /// Result of the last transition.
    pub outcome: Outcome,
    /// Detail for `outcome`.
    pub message: String,
    /// Time of the last state change, µs since the epoch.
    pub since_us: u64,
    /// The file on disk could not be parsed; the definition in force is the previous one.
    pub load_error: Option<String>,
    /// Drop the unit once it is stopped.
    pub remove_when_stopped: bool,
    /// Captured output.
    pub log: UnitLog,
}

impl Slot {
    /// A new, inactive unit.
    pub fn new(name: &str) -> Self {
        Self {
            active: Active::Inactive,
            sub: Sub::Dead,
            job: None,
            main_pid: None,
            scope: None,
            exit_code: None,
            exit_signal: None,
            restarts: 0,
            backoff_step: 0,
            start_times: VecDeque::new(),
            running_source: None,
            control_api: false,
            started_at: None,
            deadline: None,
            kill_at: None,
            outcome: Outcome::Success,
            message: String::new(),
            since_us: crate::logs::now_us(),
            load_error: None,
            remove_when_stopped: false,
            log: UnitLog::new(name),
        }
    }

    /// True while a process of the unit may exist.
    pub fn has_processes(&self) -> bool {
        self.main_pid.is_some() || self.active == Active::Deactivating
    }

    /// True when the unit has settled in a non-running state.
    pub fn is_down(&self) -> bool {
        matches!(self.active, Active::Inactive | Active::Failed) && self.main_pid.is_none()
    }
}
