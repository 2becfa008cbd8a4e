//! Unit states in systemd's vocabulary (the API's enums), and the runtime record of one unit.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::api::Event;
use crate::logs::{LogConfig, UnitLog, MANAGER_STREAM};
use crate::scope::Scope;

// The manager's states are the API's enums (`flotilla-init-api`): one definition of the
// vocabulary for the state machine, the wire and every client. Each keeps `as_str()`.
pub use flotilla_init_api::{ActiveState, SubState, UnitResult};

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

/// Where state changes are published (the API's `UnitStateChanged`), if anywhere.
pub type Events = Option<Sender<Event>>;

/// Runtime record of one unit.
///
/// The state (`active`, `sub`, when it changed, the stop's kill time) and the main process
/// (its pid, then how it ended) change only through the transition methods below, each of
/// which publishes a state change: a caller cannot set a state without its companions, nor
/// forget the event.
#[derive(Debug)]
pub struct Slot {
    /// The unit's name (for the events).
    name: String,
    /// Active state.
    active: ActiveState,
    /// Sub state.
    sub: SubState,
    /// Pending job.
    pub job: Option<Job>,
    /// Main process.
    main_pid: Option<Pid>,
    /// Processes of the current (or last) run.
    pub scope: Option<Scope>,
    /// Exit code of the last main process.
    exit_code: Option<i32>,
    /// Signal that killed the last main process.
    exit_signal: Option<i32>,
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
    kill_at: Option<Instant>,
    /// Result of the last transition.
    pub outcome: UnitResult,
    /// Detail for `outcome`.
    pub message: String,
    /// Time of the last state change, µs since the epoch.
    since_us: u64,
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
            name: name.to_string(),
            active: ActiveState::Inactive,
            sub: SubState::Dead,
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
            outcome: UnitResult::Success,
            message: String::new(),
            since_us: crate::logs::now_us(),
            load_error: None,
            remove_when_stopped: false,
            log: UnitLog::new(name),
        }
    }

    /// True while a process of the unit may exist.
    pub fn has_processes(&self) -> bool {
        self.main_pid.is_some() || self.active == ActiveState::Deactivating
    }

    /// True when the unit has settled in a non-running state.
    pub fn is_down(&self) -> bool {
        matches!(self.active, ActiveState::Inactive | ActiveState::Failed)
            && self.main_pid.is_none()
    }

    /// Active state.
    pub fn active(&self) -> ActiveState {
        self.active
    }

    /// Sub state.
    pub fn sub(&self) -> SubState {
        self.sub
    }

    /// Time of the last state change, µs since the epoch.
    pub fn since_us(&self) -> u64 {
        self.since_us
    }

    /// While stopping: when to (re)send SIGKILL.
    pub fn kill_at(&self) -> Option<Instant> {
        self.kill_at
    }

    /// The main process, while it runs.
    pub fn main_pid(&self) -> Option<Pid> {
        self.main_pid
    }

    /// Exit code of the last main process.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    /// Signal that killed the last main process.
    pub fn exit_signal(&self) -> Option<i32> {
        self.exit_signal
    }

    /// The main process ended (with exit `code`, or killed by `signal`); the state is decided
    /// next (what ends the run is the caller's: a stop, a restart, a failure).
    pub fn main_exited(&mut self, code: Option<i32>, signal: Option<i32>) {
        self.main_pid = None;
        self.exit_code = code;
        self.exit_signal = signal;
    }

    /// Enter `a`/`s` and publish it (nothing when it is the state already).
    fn set_state(&mut self, events: &Events, a: ActiveState, s: SubState) {
        if self.active == a && self.sub == s {
            return;
        }
        self.active = a;
        self.sub = s;
        self.since_us = crate::logs::now_us();
        if let Some(tx) = events {
            let _ = tx.send(Event::UnitStateChanged {
                name: self.name.clone(),
                active_state: a.into(),
                sub_state: s.into(),
            });
        }
    }

    /// A start was queued (the unit was inactive or failed): activating (waiting).
    pub fn start_queued(&mut self, events: &Events, logs: &LogConfig) {
        self.job = Some(Job::Start);
        self.outcome = UnitResult::Success;
        self.message.clear();
        self.log.push(logs, MANAGER_STREAM, "Start queued.");
        self.set_state(events, ActiveState::Activating, SubState::Waiting);
    }

    /// Nothing of the unit runs and nothing is pending: inactive (dead). The timer is left
    /// as it is (a leftover scope may still need removing).
    pub fn became_dead(&mut self, events: &Events) {
        self.job = None;
        self.kill_at = None;
        self.set_state(events, ActiveState::Inactive, SubState::Dead);
    }

    /// A stop ended (the scope is empty and removed): inactive (dead) with `outcome`.
    pub fn stopped(
        &mut self,
        events: &Events,
        logs: &LogConfig,
        outcome: UnitResult,
        message: String,
    ) {
        self.deadline = None;
        self.outcome = outcome;
        self.message = message;
        self.log.push(logs, MANAGER_STREAM, "Stopped.");
        self.became_dead(events);
    }

    /// A stop of a unit with no process: a failed unit stays failed, any other becomes
    /// inactive (dead).
    pub fn stopped_idle(&mut self, events: &Events, logs: &LogConfig) {
        self.job = None;
        self.deadline = None;
        self.log.push(logs, MANAGER_STREAM, "Stopped.");
        if self.active == ActiveState::Failed {
            self.set_state(events, ActiveState::Failed, SubState::Failed);
        } else {
            self.became_dead(events);
        }
    }

    /// An active oneshot that has exited is stopped so that a restart runs it again.
    pub fn stopped_exited(&mut self, events: &Events, logs: &LogConfig) {
        self.log.push(logs, MANAGER_STREAM, "Stopped.");
        self.became_dead(events);
    }

    /// The unit failed with `outcome`: failed (failed), nothing pending.
    pub fn failed(
        &mut self,
        events: &Events,
        logs: &LogConfig,
        outcome: UnitResult,
        message: String,
    ) {
        self.job = None;
        self.deadline = None;
        self.outcome = outcome;
        self.log.push(
            logs,
            MANAGER_STREAM,
            &format!("Failed: {}: {message}", outcome.as_str()),
        );
        log::warn!("{}: failed: {}: {message}", self.name, outcome.as_str());
        self.message = message;
        self.set_state(events, ActiveState::Failed, SubState::Failed);
    }

    /// The main process `pid` runs in `scope` since `now`: active (running), or activating
    /// (start) for a oneshot.
    pub fn started(&mut self, events: &Events, logs: &LogConfig, run: Run, now: Instant) {
        self.main_pid = Some(run.pid);
        self.running_source = Some(run.source);
        self.control_api = run.control_api;
        self.scope = Some(run.scope);
        self.started_at = Some(now);
        self.exit_code = None;
        self.exit_signal = None;
        self.job = None;
        self.deadline = None;
        self.log.push(
            logs,
            MANAGER_STREAM,
            &format!("Started, main pid {}.", run.pid.as_raw()),
        );
        if run.oneshot {
            self.set_state(events, ActiveState::Activating, SubState::Start);
        } else {
            self.set_state(events, ActiveState::Active, SubState::Running);
        }
    }

    /// SIGTERM was sent: deactivating (stop-sigterm) until the scope is empty, SIGKILL at
    /// `kill_at`.
    pub fn stopping(&mut self, events: &Events, logs: &LogConfig, kill_at: Instant) {
        self.kill_at = Some(kill_at);
        self.deadline = self.kill_at;
        self.log.push(logs, MANAGER_STREAM, "Stopping (SIGTERM).");
        self.set_state(events, ActiveState::Deactivating, SubState::StopSigterm);
    }

    /// `stop_timeout` passed after SIGTERM: deactivating (stop-sigkill).
    pub fn escalated(&mut self, events: &Events, logs: &LogConfig) {
        if self.sub == SubState::StopSigterm {
            self.log.push(
                logs,
                MANAGER_STREAM,
                "stop_timeout passed; sending SIGKILL.",
            );
            self.set_state(events, ActiveState::Deactivating, SubState::StopSigkill);
        }
    }

    /// SIGKILL was sent (again); the next one at `kill_at`.
    pub fn kill_sent(&mut self, kill_at: Instant) {
        self.kill_at = Some(kill_at);
    }

    /// The shutdown deadline killed the unit at `now`: deactivating (stop-sigkill), looked at
    /// again at once, SIGKILL repeated at `kill_at`.
    pub fn force_killed(
        &mut self,
        events: &Events,
        logs: &LogConfig,
        now: Instant,
        kill_at: Instant,
    ) {
        self.log.push(
            logs,
            MANAGER_STREAM,
            "Shutdown deadline passed; killing every process of the unit (SIGKILL).",
        );
        self.job = Some(Job::Stop);
        self.kill_at = Some(kill_at);
        self.deadline = Some(now);
        self.set_state(events, ActiveState::Deactivating, SubState::StopSigkill);
    }

    /// The main process exited 0 at `now` and nothing restarts it: active (exited) for a
    /// oneshot, else inactive (dead). The leftover scope is looked at `now`.
    pub fn finished(&mut self, events: &Events, oneshot: bool, now: Instant) {
        self.job = None;
        self.deadline = Some(now);
        if oneshot {
            self.set_state(events, ActiveState::Active, SubState::Exited);
        } else {
            self.became_dead(events);
        }
    }

    /// The restart policy restarts the unit at `at`, after `delay`: activating
    /// (auto-restart), one backoff step further.
    pub fn restart_scheduled(
        &mut self,
        events: &Events,
        logs: &LogConfig,
        at: Instant,
        delay: Duration,
    ) {
        self.backoff_step = self.backoff_step.saturating_add(1);
        self.deadline = Some(at);
        self.log.push(
            logs,
            MANAGER_STREAM,
            &format!("Scheduled restart in {delay:?}."),
        );
        self.set_state(events, ActiveState::Activating, SubState::AutoRestart);
    }
}

/// What a started run is, for [`Slot::started`].
#[derive(Debug)]
pub struct Run {
    /// The main process.
    pub pid: Pid,
    /// Its processes.
    pub scope: Scope,
    /// Fingerprint of the unit file text it was started from.
    pub source: u64,
    /// Started with `[container] control_api = true`.
    pub control_api: bool,
    /// A oneshot (active only once it exited 0).
    pub oneshot: bool,
}
