//! The state machine: advancing units through time ([`Manager::tick`]), starting what its
//! ordering allows, stopping with escalation, and what a child's exit means
//! ([`Manager::on_exit`]).

use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use flotilla_units::{RestartPolicy, ServiceType, Unit};
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::output::Pipe;
use super::{
    later, source_hash, ActiveState, Job, Manager, Run, SubState, UnitResult, FORCE_GRACE,
    KILL_RETRY, SCOPE_POLL,
};
use crate::api::LogStream;
use crate::launcher::LaunchIo;
use crate::logs::{LineBuffer, MANAGER_STREAM};
use crate::scope::Limits;

impl Manager {
    pub(super) fn fail(&mut self, name: &str, outcome: UnitResult, message: String) {
        if let Some(slot) = self.slots.get_mut(name) {
            slot.failed(&self.events, &self.cfg.logs, outcome, message);
        }
    }

    /// Advance every unit whose situation allows it; returns the next timer deadline.
    pub fn tick(&mut self, now: Instant) -> Option<Instant> {
        if self.forced_at.is_none() && self.shutdown_deadline.is_some_and(|d| d <= now) {
            self.force_stop(now);
        }
        // Starting one unit can unblock another: repeat until nothing moves.
        for _ in 0..64 {
            if !self.step(now) {
                break;
            }
        }
        let shutdown = match self.forced_at {
            Some(t) => Some(later(t, FORCE_GRACE)),
            None => self.shutdown_deadline,
        };
        self.slots
            .values()
            .filter_map(|s| s.deadline())
            .chain(shutdown)
            .min()
    }

    pub(super) fn step(&mut self, now: Instant) -> bool {
        let mut moved = false;
        let names: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.job().is_some() || s.deadline().is_some() || s.remove_when_stopped())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            moved |= self.step_unit(&name, now);
        }
        moved
    }

    pub(super) fn step_unit(&mut self, name: &str, now: Instant) -> bool {
        let Some(slot) = self.slots.get(name) else {
            return false;
        };
        let due = slot.deadline().is_some_and(|d| d <= now);
        match (slot.active(), slot.sub(), slot.job()) {
            (ActiveState::Activating, SubState::Waiting, Some(Job::Start)) => {
                self.try_start(name, now)
            }
            (ActiveState::Activating, SubState::AutoRestart, _) if due => {
                if let Some(s) = self.slots.get_mut(name) {
                    s.timer_handled();
                }
                if self.spawn(name, now) {
                    if let Some(s) = self.slots.get_mut(name) {
                        s.restart_counted();
                    }
                }
                true
            }
            (ActiveState::Deactivating, _, _) => self.continue_stop(name, now),
            (ActiveState::Activating, SubState::Pull, Some(Job::Stop | Job::Restart)) => {
                self.stop_pull(name)
            }
            (_, _, Some(Job::Stop | Job::Restart)) if slot.main_pid().is_some() => {
                self.stop_or_prepull(name, now)
            }
            (ActiveState::Active, SubState::Exited, Some(Job::Stop | Job::Restart)) => {
                let restart = slot.job() == Some(Job::Restart);
                if let Some(s) = self.slots.get_mut(name) {
                    s.became_dead(&self.events);
                }
                if restart {
                    self.queue_start(name, true);
                }
                true
            }
            _ if slot.remove_when_stopped() && slot.is_down() && slot.job().is_none() => {
                self.slots.remove(name);
                self.units.remove(name);
                self.recompute_graph();
                true
            }
            _ => {
                // A leftover scope of a finished run: remove it once empty.
                if due && slot.main_pid().is_none() {
                    self.reap_scope(name, now);
                }
                false
            }
        }
    }

    /// A queued start whose ordering allows it now is spawned; returns true if it moved.
    pub(super) fn try_start(&mut self, name: &str, now: Instant) -> bool {
        if let Some(cycle) = self.cycles.get(name) {
            let msg = format!("ordering cycle {cycle}; break it by removing one after/before");
            self.fail(name, UnitResult::Cycle, msg);
            return true;
        }
        let Some(unit) = self.units.get(name) else {
            return false;
        };
        for dep in &unit.unit.requires {
            match self.slots.get(dep) {
                None => {
                    let msg = format!("requires {dep}, which does not exist");
                    self.fail(name, UnitResult::Dependency, msg);
                    return true;
                }
                Some(d) if d.active() == ActiveState::Failed && d.job().is_none() => {
                    let msg = format!("required unit {dep} failed");
                    self.fail(name, UnitResult::Dependency, msg);
                    return true;
                }
                Some(_) => {}
            }
        }
        if let Some(preds) = self.preds.get(name) {
            for p in preds {
                let Some(ps) = self.slots.get(p) else {
                    continue;
                };
                let waiting = matches!(
                    ps.active(),
                    ActiveState::Activating | ActiveState::Deactivating
                ) || ps.job() == Some(Job::Start);
                if waiting {
                    return false;
                }
                let oneshot = self
                    .units
                    .get(p)
                    .is_some_and(|u| u.service.kind == ServiceType::Oneshot);
                // A failed required unit was refused above (`requires`); a failed oneshot
                // it is ordered after is refused here.
                if ps.active() == ActiveState::Failed && oneshot {
                    let msg = format!("{p}, which it is ordered after, failed");
                    self.fail(name, UnitResult::Dependency, msg);
                    return true;
                }
            }
        }
        self.spawn(name, now);
        true
    }

    /// Start the unit's process now; returns true if it runs.
    pub(super) fn spawn(&mut self, name: &str, now: Instant) -> bool {
        let Some(unit) = self.units.get(name).cloned() else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(name) else {
            return false;
        };
        let window = unit.service.start_limit_interval;
        if let Err(starts) = slot.start_counted(now, window, unit.service.start_limit_burst) {
            let msg = format!(
                "started {starts} times within {window:?} (start_limit_burst); `unitctl start {name}` tries again"
            );
            self.fail(name, UnitResult::StartLimitHit, msg);
            return false;
        }
        // A restart's pull done while the old copy ran is not done again.
        let prepulled = slot.prepull_image().map(str::to_string);
        self.cancel_prepull(name);
        match self.pull_needed(&unit) {
            Some(image) if prepulled.as_deref() != Some(image.as_str()) => {
                self.begin_pull(name, &image, now)
            }
            _ => self.launch_now(name, &unit, now),
        }
    }

    /// Track `pipe` for the event loop.
    pub(super) fn add_pipe(&mut self, p: Pipe) {
        let idx = match self.pipes.iter().position(Option::is_none) {
            Some(i) => {
                if let Some(s) = self.pipes.get_mut(i) {
                    *s = Some(p);
                }
                i
            }
            None => {
                self.pipes.push(Some(p));
                self.pipes.len() - 1
            }
        };
        self.new_pipes.push(idx);
    }

    /// Launch `unit`'s main process now (after any pull); returns true if it runs.
    pub(super) fn launch_now(&mut self, name: &str, unit: &Unit, now: Instant) -> bool {
        match self.launch(unit) {
            Ok((pid, scope, pipes)) => {
                let Some(slot) = self.slots.get_mut(name) else {
                    return false;
                };
                let run = Run {
                    pid,
                    scope,
                    source: source_hash(&unit.source),
                    control_api: unit.container.control_api,
                    oneshot: unit.service.kind == ServiceType::Oneshot,
                };
                slot.started(&self.events, &self.cfg.logs, run, now);
                self.pids.insert(pid, name.to_string());
                for p in pipes {
                    self.add_pipe(p);
                }
                true
            }
            Err((outcome, msg)) => {
                self.fail(name, outcome, msg);
                false
            }
        }
    }

    pub(super) fn launch(
        &mut self,
        unit: &Unit,
    ) -> Result<(Pid, crate::scope::Scope, Vec<Pipe>), (UnitResult, String)> {
        if let Some(refusal) = self.exposed_control_socket(unit) {
            return Err((UnitResult::Spawn, refusal));
        }
        let resources = |e: crate::scope::ScopeError| (UnitResult::Resources, e.to_string());
        let mut scope = self.procs.prepare(&unit.name).map_err(resources)?;
        if let Err(e) = self.procs.apply(&unit.name, &scope, &Limits::of(unit)) {
            self.procs.remove(&unit.name, &scope);
            return Err(resources(e));
        }
        let spawn_err = |e: String| (UnitResult::Spawn, e);
        let (io, readers) = output_pipes().map_err(spawn_err)?;
        let pid = match self.launcher.launch(unit, &scope, io) {
            Ok(pid) => pid,
            Err(e) => {
                // A setup given up on (timeout) may have left a process behind in the scope.
                self.procs.signal_scope(&unit.name, &scope, Signal::SIGKILL);
                self.procs.remove(&unit.name, &scope);
                return Err(spawn_err(e.to_string()));
            }
        };
        scope.started(pid);
        let pipes = readers
            .into_iter()
            .map(|(fd, stream)| Pipe {
                fd,
                unit: unit.name.clone(),
                stream,
                buf: LineBuffer::default(),
                helper: false,
            })
            .collect();
        Ok((pid, scope, pipes))
    }

    /// The refusal when an ungranted `unit` binds a path that exposes a control socket.
    pub(super) fn exposed_control_socket(&self, unit: &Unit) -> Option<String> {
        if unit.container.control_api {
            return None;
        }
        // Compared as written, never resolved here: a lookup on a hung filesystem would hang
        // the event loop, and a source with a symlink in it is refused at start anyway (bind
        // sources are opened without following symlinks; `..` is refused when parsing).
        unit.container.mounts.iter().find_map(|m| {
            crate::api::access::exposed_socket(&m.host, &self.control_sockets)
                .map(|socket| crate::api::access::bind_refusal(&unit.name, &m.host, socket))
        })
    }

    /// A stop job whose ordering allows it sends SIGTERM; returns true if it moved.
    pub(super) fn try_stop(&mut self, name: &str, now: Instant) -> bool {
        // Units ordered after this one and also stopping go first (never around a cycle).
        let blocked = self.stop_preds.iter().any(|(succ, preds)| {
            preds.contains(name)
                && self.slots.get(succ).is_some_and(|s| {
                    matches!(s.job(), Some(Job::Stop | Job::Restart)) && !s.is_down()
                        || s.active() == ActiveState::Deactivating
                })
        });
        if blocked {
            return false;
        }
        let timeout = self
            .units
            .get(name)
            .map(|u| u.service.stop_timeout)
            .unwrap_or(Duration::from_secs(10));
        let Some(slot) = self.slots.get_mut(name) else {
            return false;
        };
        match (
            self.launcher.terminate_main_only(),
            slot.main_pid(),
            slot.scope(),
        ) {
            (true, Some(pid), _) => self.procs.signal_main(name, pid, Signal::SIGTERM),
            (_, _, Some(scope)) => self.procs.signal_scope(name, scope, Signal::SIGTERM),
            _ => {}
        }
        slot.stopping(&self.events, &self.cfg.logs, later(now, timeout));
        true
    }

    pub(super) fn continue_stop(&mut self, name: &str, now: Instant) -> bool {
        let cfg = self.cfg.logs.clone();
        let timeout = self.units.get(name).map(|u| u.service.stop_timeout);
        let forced = self.forced_at.is_some();
        let Some(slot) = self.slots.get_mut(name) else {
            return false;
        };
        let procs = &mut self.procs;
        let empty = slot.scope().is_none_or(|s| procs.is_empty(name, s));
        if slot.main_pid().is_none() && empty {
            if let Some(s) = slot.scope_removed() {
                procs.remove(name, &s);
            }
            let killed = slot.sub() == SubState::StopSigkill;
            let restart = slot.job() == Some(Job::Restart);
            let (outcome, message) = if killed && forced {
                (
                    UnitResult::Timeout,
                    "still running at the shutdown deadline; killed with SIGKILL".into(),
                )
            } else if killed {
                (
                    UnitResult::Timeout,
                    format!(
                        "did not stop within stop_timeout {:?} after SIGTERM; killed with SIGKILL",
                        timeout.unwrap_or_default()
                    ),
                )
            } else {
                (UnitResult::Success, String::new())
            };
            slot.stopped(&self.events, &cfg, outcome, message);
            if restart && !self.shutting_down {
                self.queue_start(name, true);
            }
            return true;
        }
        if slot.kill_at().is_some_and(|k| k <= now) {
            slot.escalated(&self.events, &cfg);
            if let Some(s) = slot.scope() {
                procs.signal_scope(name, s, Signal::SIGKILL);
            }
            slot.kill_sent(later(now, KILL_RETRY));
        }
        // Look again at the escalation time, or soon if only the scope's rest is left.
        slot.stop_pending(later(now, SCOPE_POLL));
        false
    }

    pub(super) fn reap_scope(&mut self, name: &str, now: Instant) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        slot.timer_handled();
        let Some(scope) = slot.scope() else { return };
        if self.procs.is_empty(name, scope) {
            if let Some(scope) = slot.scope_removed() {
                self.procs.remove(name, &scope);
            }
        } else {
            self.procs.signal_scope(name, scope, Signal::SIGKILL);
            slot.scope_lingers(later(now, SCOPE_POLL));
        }
    }

    /// A child process ended (from waitpid).
    pub fn on_exit(&mut self, status: WaitStatus, now: Instant) {
        let (pid, code, signal) = match status {
            WaitStatus::Exited(pid, code) => (pid, Some(code), None),
            WaitStatus::Signaled(pid, sig, _) => (pid, None, Some(sig as i32)),
            _ => return,
        };
        let Some(name) = self.pids.remove(&pid) else {
            if !self
                .exit_watch
                .as_ref()
                .is_some_and(|w| w.deliver(pid, (code, signal)))
            {
                log::debug!("reaped orphan {}", pid.as_raw());
            }
            return;
        };
        if self.slots.get(&name).and_then(|s| s.pull_pid()) == Some(pid) {
            self.pull_exited(&name, code, signal, now);
            return;
        }
        if self.slots.get(&name).and_then(|s| s.prepull_pid()) == Some(pid) {
            self.prepull_exited(&name, code, signal, now);
            return;
        }
        // The old copy ended: a pull still under way for its pending restart is now the
        // start's business (a pull that is done stays done for that start).
        if self
            .slots
            .get(&name)
            .and_then(|s| s.prepull_pid())
            .is_some()
        {
            self.cancel_prepull(&name);
        }
        let Some(unit) = self.units.get(&name).cloned() else {
            return;
        };
        let cfg = self.cfg.logs.clone();
        let shutting_down = self.shutting_down;
        let Some(slot) = self.slots.get_mut(&name) else {
            return;
        };
        slot.main_exited(code, signal, now);
        let how = match (code, signal) {
            (Some(c), _) => format!("code={c}"),
            (_, Some(s)) => format!(
                "signal={}",
                Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?")
            ),
            _ => String::new(),
        };
        slot.log.push(
            &cfg,
            MANAGER_STREAM,
            &format!("Main process exited, {how}."),
        );
        let procs = &mut self.procs;
        let oom_kills = slot.scope().map_or(0, |s| procs.oom_kills(&name, s));
        // Whatever the main process left behind goes with it (systemd's KillMode=control-group).
        if let Some(scope) = slot.scope() {
            procs.signal_scope(&name, scope, Signal::SIGKILL);
        }
        if slot.active() == ActiveState::Deactivating {
            return; // the stop goes on (looked at `now`)
        }
        let success = code == Some(0);
        slot.note_run_length(now, unit.service.restart_max_sec);
        let stop_asked = matches!(slot.job(), Some(Job::Stop)) || shutting_down;
        let restart = !stop_asked
            && match unit.service.restart {
                RestartPolicy::No => false,
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !success,
            };
        let (outcome, message) = match (code, signal) {
            (Some(0), _) => (UnitResult::Success, String::new()),
            _ if oom_kills > 0 => (
                UnitResult::OomKill,
                format!(
                    "the kernel's OOM killer ended {oom_kills} process(es) of the unit: it reached \
                     memory_max ({how})"
                ),
            ),
            (Some(c), _) => (
                UnitResult::ExitCode,
                format!("main process exited with code {c}"),
            ),
            (_, _) => (UnitResult::Signal, format!("main process killed by {how}")),
        };
        if slot.job() == Some(Job::Restart) {
            slot.exited_for_restart(&self.events, outcome, message);
            self.queue_start(&name, true);
        } else if restart {
            let delay = backoff_delay(&unit, slot.backoff_step());
            let at = later(now, delay);
            slot.restart_scheduled(&self.events, &cfg, (outcome, message), at, delay);
        } else if success {
            let oneshot = unit.service.kind == ServiceType::Oneshot;
            slot.finished(&self.events, oneshot, now);
        } else {
            // Failed; the leftover scope is removed at `now`.
            slot.exited_failed(&self.events, &cfg, outcome, message, now);
        }
    }
}

/// The restart delay after `step` restarts in a row: `restart_sec` doubled each step, capped
/// at `restart_max_sec`.
pub(super) fn backoff_delay(unit: &Unit, step: u32) -> Duration {
    let base = unit.service.restart_sec;
    let factor = 1u32.checked_shl(step.min(20)).unwrap_or(u32::MAX);
    base.checked_mul(factor)
        .unwrap_or(unit.service.restart_max_sec)
        .min(unit.service.restart_max_sec.max(base))
}

/// A stdout and a stderr pipe: the write ends (blocking) for the child, the read ends
/// (non-blocking, close-on-exec) for the event loop.
pub(super) fn output_pipes() -> Result<(LaunchIo, [(OwnedFd, LogStream); 2]), String> {
    let flags = OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let (out_r, out_w) = nix::unistd::pipe2(flags).map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) = nix::unistd::pipe2(flags).map_err(|e| format!("pipe: {e}"))?;
    // The child's ends must block normally.
    for w in [&out_w, &err_w] {
        let _ = nix::fcntl::fcntl(w, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()));
    }
    let io = LaunchIo {
        stdout: out_w,
        stderr: err_w,
    };
    Ok((io, [(out_r, LogStream::Stdout), (err_r, LogStream::Stderr)]))
}
