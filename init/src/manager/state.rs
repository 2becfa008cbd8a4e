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

/// Where a unit is, with the data that exists only in that state.
///
/// Each state is one `(ActiveState, SubState)` pair; the stop's SIGKILL time and whether
/// SIGKILL was sent live inside the stopping state, so they cannot outlast it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// inactive (dead).
    Dead,
    /// failed (failed).
    Failed,
    /// activating (waiting): a start waits for its ordering.
    Waiting,
    /// activating (pull): the pull helper `pid` fetches the unit's registry image.
    Pulling {
        /// The helper process.
        pid: Pid,
    },
    /// activating (start): a oneshot's main process runs.
    Starting,
    /// active (running).
    Running,
    /// active (exited): a oneshot that finished.
    Exited,
    /// activating (auto-restart): the restart policy starts it again at the timer.
    AutoRestart,
    /// deactivating: SIGTERM was sent; SIGKILL is (re)sent at `kill_at`. `escalated`:
    /// stop-sigkill once it was, else stop-sigterm.
    Stopping {
        /// When to (re)send SIGKILL.
        kill_at: Instant,
        /// SIGKILL was sent (stop-sigkill).
        escalated: bool,
    },
}

impl State {
    fn active(self) -> ActiveState {
        match self {
            State::Dead => ActiveState::Inactive,
            State::Failed => ActiveState::Failed,
            State::Waiting | State::Pulling { .. } | State::Starting | State::AutoRestart => {
                ActiveState::Activating
            }
            State::Running | State::Exited => ActiveState::Active,
            State::Stopping { .. } => ActiveState::Deactivating,
        }
    }

    fn sub(self) -> SubState {
        match self {
            State::Dead => SubState::Dead,
            State::Failed => SubState::Failed,
            State::Waiting => SubState::Waiting,
            State::Pulling { .. } => SubState::Pull,
            State::Starting => SubState::Start,
            State::Running => SubState::Running,
            State::Exited => SubState::Exited,
            State::AutoRestart => SubState::AutoRestart,
            State::Stopping {
                escalated: false, ..
            } => SubState::StopSigterm,
            State::Stopping {
                escalated: true, ..
            } => SubState::StopSigkill,
        }
    }
}

/// The pull that a restart of a running unit does first: the new body's image is fetched
/// while the old copy keeps running, and only then is the old copy stopped. It lives beside
/// the [`State`] (the unit stays active (running)) while a restart job is pending.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PrePull {
    /// No pull was done or is under way for the pending restart.
    None,
    /// The pull helper `pid` fetches `image`.
    Running {
        /// The helper process.
        pid: Pid,
        /// The image it fetches.
        image: String,
    },
    /// The last pull failed: the old copy keeps running, tried again at `retry_at`.
    Failed {
        /// When the pull is tried again.
        retry_at: Instant,
    },
    /// `image` was fetched: the restart proceeds, and its start does not pull it again.
    Done {
        /// The image now in the store.
        image: String,
    },
}

/// The current run: exists from the start of its main process until its scope is removed
/// (the main process may have ended while the scope still holds processes).
#[derive(Debug)]
struct CurrentRun {
    /// The main process, until it exits.
    main_pid: Option<Pid>,
    /// The run's processes.
    scope: Scope,
    /// When it started.
    started_at: Instant,
    /// Fingerprint of the unit file text it was started from.
    source: u64,
    /// Started with `[container] control_api = true`.
    control_api: bool,
}

/// Runtime record of one unit.
///
/// The state, the pending job, the timer, the current run and the result of the last
/// transition change only through the transition methods below, each of which publishes a
/// state change: a caller cannot set a state without its companions, nor forget the event.
#[derive(Debug)]
pub struct Slot {
    /// The unit's name (for the events).
    name: String,
    /// Where the unit is.
    state: State,
    /// Pending job.
    job: Option<Job>,
    /// The current run, while a process of it may exist.
    run: Option<CurrentRun>,
    /// Exit code of the last main process.
    exit_code: Option<i32>,
    /// Signal that killed the last main process.
    exit_signal: Option<i32>,
    /// Restarts done by the restart policy since the last manual start.
    restarts: u32,
    /// Restarts in a row without a run longer than `restart_max_sec` (drives the backoff).
    backoff_step: u32,
    /// Start times within the start-limit window.
    start_times: VecDeque<Instant>,
    /// Timer: when the unit next needs looking at (restart, escalation, scope re-check).
    deadline: Option<Instant>,
    /// Result of the last transition.
    outcome: UnitResult,
    /// Detail for `outcome`.
    message: String,
    /// Time of the last state change, µs since the epoch.
    since_us: u64,
    /// The file on disk could not be parsed; the definition in force is the previous one.
    load_error: Option<String>,
    /// Drop the unit once it is stopped.
    remove_when_stopped: bool,
    /// The last line the pull helper wrote.
    pull_last_line: String,
    /// The pull a pending restart of the running unit does before it stops the old copy.
    prepull: PrePull,
    /// Captured output.
    pub log: UnitLog,
}

impl Slot {
    /// A new, inactive unit.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            state: State::Dead,
            job: None,
            run: None,
            exit_code: None,
            exit_signal: None,
            restarts: 0,
            backoff_step: 0,
            start_times: VecDeque::new(),
            deadline: None,
            outcome: UnitResult::Success,
            message: String::new(),
            since_us: crate::logs::now_us(),
            load_error: None,
            remove_when_stopped: false,
            pull_last_line: String::new(),
            prepull: PrePull::None,
            log: UnitLog::new(name),
        }
    }

    /// True while a process of the unit (or its pull helper) may exist.
    pub fn has_processes(&self) -> bool {
        self.main_pid().is_some()
            || self.pull_pid().is_some()
            || self.active() == ActiveState::Deactivating
    }

    /// The pull helper, while it fetches the unit's image.
    pub fn pull_pid(&self) -> Option<Pid> {
        match self.state {
            State::Pulling { pid } => Some(pid),
            _ => None,
        }
    }

    /// The last line the pull helper wrote (its error, once it failed).
    pub fn pull_last_line(&self) -> &str {
        &self.pull_last_line
    }

    /// The pull helper wrote `line` (kept in the unit's log as a manager line).
    pub fn pull_output(&mut self, logs: &LogConfig, line: &str) {
        if !line.trim().is_empty() {
            self.pull_last_line = line.trim().to_string();
        }
        self.log
            .push(logs, MANAGER_STREAM, &format!("pull: {line}"));
    }

    /// The pull helper `pid` fetches `image`: activating (pull).
    pub fn pulling(&mut self, events: &Events, logs: &LogConfig, image: &str, pid: Pid) {
        self.pull_last_line.clear();
        self.job = None;
        self.deadline = None;
        self.log.push(
            logs,
            MANAGER_STREAM,
            &format!(
                "Pulling image {image} (activating (pull)), helper pid {}.",
                pid.as_raw()
            ),
        );
        self.set_state(events, State::Pulling { pid });
    }

    /// A stop killed the pull helper: inactive (dead), nothing pending.
    pub fn pull_stopped(&mut self, events: &Events, logs: &LogConfig) {
        self.job = None;
        self.deadline = None;
        self.outcome = UnitResult::Success;
        self.message.clear();
        self.log
            .push(logs, MANAGER_STREAM, "Pull stopped; helper killed.");
        self.became_dead(events);
    }

    /// The pull helper that fetches the image of a pending restart while the old copy runs.
    pub fn prepull_pid(&self) -> Option<Pid> {
        match self.prepull {
            PrePull::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// The image the pending restart's pull fetches or fetched.
    pub fn prepull_image(&self) -> Option<&str> {
        match &self.prepull {
            PrePull::Running { image, .. } | PrePull::Done { image } => Some(image),
            _ => None,
        }
    }

    /// After a failed pull for a pending restart: when it is tried again.
    pub fn prepull_retry_at(&self) -> Option<Instant> {
        match self.prepull {
            PrePull::Failed { retry_at } => Some(retry_at),
            _ => None,
        }
    }

    /// True if the pending restart's pull fetched `image` (its start need not pull it).
    pub fn prepulled(&self, image: &str) -> bool {
        matches!(&self.prepull, PrePull::Done { image: i } if i == image)
    }

    /// The pull helper `pid` fetches `image` for the pending restart; the old copy keeps
    /// running (active (running)) until it is done.
    pub fn prepulling(&mut self, logs: &LogConfig, image: &str, pid: Pid) {
        self.pull_last_line.clear();
        self.deadline = None;
        let old = self.main_pid().map_or(0, Pid::as_raw);
        self.log.push(
            logs,
            MANAGER_STREAM,
            &format!(
                "Pulling image {image} for the restart, helper pid {}; the old copy keeps \
                 running (main pid {old}).",
                pid.as_raw()
            ),
        );
        self.prepull = PrePull::Running {
            pid,
            image: image.to_string(),
        };
    }

    /// The pending restart's pull ended well: the restart proceeds (stop, then a start that
    /// does not pull the image again).
    pub fn prepull_done(&mut self, logs: &LogConfig) {
        if let PrePull::Running { image, .. } = &self.prepull {
            self.prepull = PrePull::Done {
                image: image.clone(),
            };
        }
        self.outcome = UnitResult::Success;
        self.message.clear();
        self.log.push(
            logs,
            MANAGER_STREAM,
            "Pull done; stopping the old copy for the restart.",
        );
    }

    /// The pending restart's pull failed with `message`: the old copy keeps running (still
    /// active (running), result `pull`), and the pull is tried again at `at`, after `delay`,
    /// one backoff step further. The restart job stays pending.
    pub fn prepull_failed(
        &mut self,
        logs: &LogConfig,
        message: String,
        at: Instant,
        delay: Duration,
    ) {
        self.prepull = PrePull::Failed { retry_at: at };
        self.backoff_step = self.backoff_step.saturating_add(1);
        self.deadline = Some(at);
        self.outcome = UnitResult::Pull;
        self.log.push(
            logs,
            MANAGER_STREAM,
            &format!("{message}; trying the pull again in {delay:?}."),
        );
        log::warn!("{}: {message}; trying again in {delay:?}", self.name);
        self.message = message;
    }

    /// The pending restart no longer pulls (a stop, the old copy ended, the start took
    /// over): returns the helper to kill if one still runs.
    pub fn prepull_cancelled(&mut self, logs: &LogConfig) -> Option<Pid> {
        let pid = self.prepull_pid();
        if matches!(self.prepull, PrePull::Failed { .. })
            && self.deadline == self.prepull_retry_at()
        {
            self.deadline = None;
        }
        self.prepull = PrePull::None;
        if pid.is_some() {
            self.log.push(
                logs,
                MANAGER_STREAM,
                "Pull for the restart stopped; helper killed.",
            );
        }
        pid
    }

    /// True when the unit has settled in a non-running state.
    pub fn is_down(&self) -> bool {
        matches!(self.state, State::Dead | State::Failed) && self.main_pid().is_none()
    }

    /// Active state.
    pub fn active(&self) -> ActiveState {
        self.state.active()
    }

    /// Sub state.
    pub fn sub(&self) -> SubState {
        self.state.sub()
    }

    /// Pending job.
    pub fn job(&self) -> Option<Job> {
        self.job
    }

    /// Timer: when the unit next needs looking at.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Result of the last transition.
    pub fn outcome(&self) -> UnitResult {
        self.outcome
    }

    /// Detail for [`Slot::outcome`].
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Restarts done by the restart policy since the last manual start.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Restarts in a row without a run longer than `restart_max_sec`.
    pub fn backoff_step(&self) -> u32 {
        self.backoff_step
    }

    /// Time of the last state change, µs since the epoch.
    pub fn since_us(&self) -> u64 {
        self.since_us
    }

    /// While stopping: when to (re)send SIGKILL.
    pub fn kill_at(&self) -> Option<Instant> {
        match self.state {
            State::Stopping { kill_at, .. } => Some(kill_at),
            _ => None,
        }
    }

    /// The main process, while it runs.
    pub fn main_pid(&self) -> Option<Pid> {
        self.run.as_ref().and_then(|r| r.main_pid)
    }

    /// The processes of the current run, until its scope is removed.
    pub fn scope(&self) -> Option<&Scope> {
        self.run.as_ref().map(|r| &r.scope)
    }

    /// When the current run started.
    pub fn started_at(&self) -> Option<Instant> {
        self.run.as_ref().map(|r| r.started_at)
    }

    /// Fingerprint of the unit file text the current run was started from.
    pub fn running_source(&self) -> Option<u64> {
        self.run.as_ref().map(|r| r.source)
    }

    /// The current run was started with `[container] control_api = true`.
    pub fn control_api_granted(&self) -> bool {
        self.run.as_ref().is_some_and(|r| r.control_api)
    }

    /// Why the unit's file could not be loaded (the definition in force is the previous one).
    pub fn load_error(&self) -> Option<&str> {
        self.load_error.as_deref()
    }

    /// A definition of the unit was installed: no load error.
    pub fn definition_loaded(&mut self) {
        self.load_error = None;
    }

    /// The unit's file could not be loaded (`error`); the previous definition stays in force.
    pub fn load_failed(&mut self, error: String) {
        self.load_error = Some(error);
    }

    /// The unit is dropped once it is stopped.
    pub fn remove_when_stopped(&self) -> bool {
        self.remove_when_stopped
    }

    /// Drop the unit once it is stopped.
    pub fn removal_queued(&mut self) {
        self.remove_when_stopped = true;
    }

    /// Exit code of the last main process.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    /// Signal that killed the last main process.
    pub fn exit_signal(&self) -> Option<i32> {
        self.exit_signal
    }

    /// A manual start: the restart counter, the backoff and the start limit begin anew.
    pub fn limits_reset(&mut self) {
        self.restarts = 0;
        self.backoff_step = 0;
        self.start_times.clear();
    }

    /// A start at `now`, if the start limit allows it (fewer than `burst` starts within
    /// `window`); else the number of starts within the window.
    pub fn start_counted(
        &mut self,
        now: Instant,
        window: Duration,
        burst: u32,
    ) -> Result<(), usize> {
        while self
            .start_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.start_times.pop_front();
        }
        if self.start_times.len() >= burst as usize {
            return Err(self.start_times.len());
        }
        self.start_times.push_back(now);
        Ok(())
    }

    /// The restart policy started the unit again.
    pub fn restart_counted(&mut self) {
        self.restarts = self.restarts.saturating_add(1);
    }

    /// A stop or restart (`job`) was asked while a process of the unit may exist. A restart
    /// asked again while the last pull for it failed tries the pull at once.
    pub fn stop_queued(&mut self, job: Job) {
        if let (Job::Restart, PrePull::Failed { retry_at }) = (job, &self.prepull) {
            if self.deadline == Some(*retry_at) {
                self.deadline = None;
            }
            self.prepull = PrePull::None;
        }
        self.job = Some(job);
    }

    /// A start was asked while the unit stops: it starts again once stopped.
    pub fn restart_queued(&mut self) {
        self.job = Some(Job::Restart);
    }

    /// The main process ended at `now` (with exit `code`, or killed by `signal`). While
    /// stopping, the stop is looked at `now`; otherwise what ends the run is decided next by
    /// the caller (a restart, a failure, a finish).
    pub fn main_exited(&mut self, code: Option<i32>, signal: Option<i32>, now: Instant) {
        if let Some(run) = &mut self.run {
            run.main_pid = None;
        }
        self.exit_code = code;
        self.exit_signal = signal;
        if matches!(self.state, State::Stopping { .. }) {
            self.deadline = Some(now);
        }
    }

    /// The main process ran longer than `restart_max_sec` by `now`: the backoff starts over.
    pub fn note_run_length(&mut self, now: Instant, restart_max_sec: Duration) {
        if self
            .started_at()
            .is_some_and(|t| now.duration_since(t) > restart_max_sec)
        {
            self.backoff_step = 0;
        }
    }

    /// The run's scope was found empty and removed: the run is over. Returns the scope.
    pub fn scope_removed(&mut self) -> Option<Scope> {
        self.run.take().map(|r| r.scope)
    }

    /// The leftover scope of a finished run still holds processes: looked at again at `at`.
    pub fn scope_lingers(&mut self, at: Instant) {
        self.deadline = Some(at);
    }

    /// The timer was handled (a due restart, a leftover scope): nothing to look at until a
    /// transition sets it again.
    pub fn timer_handled(&mut self) {
        self.deadline = None;
    }

    /// Enter `state` and publish it (no event when the active and sub states stay the same).
    fn set_state(&mut self, events: &Events, state: State) {
        let (a, s) = (state.active(), state.sub());
        let same = self.active() == a && self.sub() == s;
        self.state = state;
        if same {
            return;
        }
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
        self.set_state(events, State::Waiting);
    }

    /// Nothing of the unit runs and nothing is pending: inactive (dead). The timer is left
    /// as it is (a leftover scope may still need removing).
    pub fn became_dead(&mut self, events: &Events) {
        self.job = None;
        self.set_state(events, State::Dead);
    }

    /// The main process ended with `outcome` while a restart job was pending: inactive
    /// (dead), to be started again by the caller.
    pub fn exited_for_restart(&mut self, events: &Events, outcome: UnitResult, message: String) {
        self.outcome = outcome;
        self.message = message;
        self.became_dead(events);
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
        if self.state != State::Failed {
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
        self.set_state(events, State::Failed);
    }

    /// The main process failed (`outcome`) at `now` and nothing restarts it: failed (failed);
    /// the leftover scope is looked at `now`.
    pub fn exited_failed(
        &mut self,
        events: &Events,
        logs: &LogConfig,
        outcome: UnitResult,
        message: String,
        now: Instant,
    ) {
        self.failed(events, logs, outcome, message);
        self.deadline = Some(now);
    }

    /// The main process `pid` runs in `scope` since `now`: active (running), or activating
    /// (start) for a oneshot.
    pub fn started(&mut self, events: &Events, logs: &LogConfig, run: Run, now: Instant) {
        self.log.push(
            logs,
            MANAGER_STREAM,
            &format!("Started, main pid {}.", run.pid.as_raw()),
        );
        self.run = Some(CurrentRun {
            main_pid: Some(run.pid),
            scope: run.scope,
            started_at: now,
            source: run.source,
            control_api: run.control_api,
        });
        self.exit_code = None;
        self.exit_signal = None;
        self.job = None;
        self.deadline = None;
        self.prepull = PrePull::None;
        if run.oneshot {
            self.set_state(events, State::Starting);
        } else {
            self.set_state(events, State::Running);
        }
    }

    /// SIGTERM was sent: deactivating (stop-sigterm) until the scope is empty, SIGKILL at
    /// `kill_at`.
    pub fn stopping(&mut self, events: &Events, logs: &LogConfig, kill_at: Instant) {
        self.deadline = Some(kill_at);
        self.log.push(logs, MANAGER_STREAM, "Stopping (SIGTERM).");
        self.set_state(
            events,
            State::Stopping {
                kill_at,
                escalated: false,
            },
        );
    }

    /// `stop_timeout` passed after SIGTERM: deactivating (stop-sigkill).
    pub fn escalated(&mut self, events: &Events, logs: &LogConfig) {
        if let State::Stopping {
            kill_at,
            escalated: false,
        } = self.state
        {
            self.log.push(
                logs,
                MANAGER_STREAM,
                "stop_timeout passed; sending SIGKILL.",
            );
            self.set_state(
                events,
                State::Stopping {
                    kill_at,
                    escalated: true,
                },
            );
        }
    }

    /// SIGKILL was sent (again); the next one at `next` (only while stopping).
    pub fn kill_sent(&mut self, next: Instant) {
        if let State::Stopping { kill_at, .. } = &mut self.state {
            *kill_at = next;
        }
    }

    /// A stop is not over at `now`: looked at again at the SIGKILL time, or by `poll_at` if
    /// only the rest of the scope is left (the main process ended).
    pub fn stop_pending(&mut self, poll_at: Instant) {
        self.deadline = if self.main_pid().is_none() {
            Some(self.kill_at().map_or(poll_at, |k| k.min(poll_at)))
        } else {
            self.kill_at()
        };
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
        self.deadline = Some(now);
        self.set_state(
            events,
            State::Stopping {
                kill_at,
                escalated: true,
            },
        );
    }

    /// The main process exited 0 at `now` and nothing restarts it: active (exited) for a
    /// oneshot, else inactive (dead), with success. The leftover scope is looked at `now`.
    pub fn finished(&mut self, events: &Events, oneshot: bool, now: Instant) {
        self.job = None;
        self.deadline = Some(now);
        self.outcome = UnitResult::Success;
        self.message.clear();
        if oneshot {
            self.set_state(events, State::Exited);
        } else {
            self.became_dead(events);
        }
    }

    /// The main process ended with `outcome`; the restart policy restarts the unit at `at`,
    /// after `delay`: activating (auto-restart), one backoff step further.
    pub fn restart_scheduled(
        &mut self,
        events: &Events,
        logs: &LogConfig,
        (outcome, message): (UnitResult, String),
        at: Instant,
        delay: Duration,
    ) {
        self.outcome = outcome;
        self.message = message;
        self.backoff_step = self.backoff_step.saturating_add(1);
        self.deadline = Some(at);
        self.log.push(
            logs,
            MANAGER_STREAM,
            &format!("Scheduled restart in {delay:?}."),
        );
        self.set_state(events, State::AutoRestart);
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
