//! Jobs: queueing starts, stops and restarts (with what they pull in or take along), and the
//! shutdown with its deadline.

use std::collections::BTreeSet;
use std::fs;
use std::time::Instant;

use nix::sys::signal::Signal;

use super::{later, ActiveState, Job, Manager, FORCE_GRACE, KILL_RETRY};

impl Manager {
    /// Queue a start of `name` and everything it requires or wants.
    pub(super) fn queue_start(&mut self, name: &str, manual: bool) {
        let mut todo = vec![name.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if self.ensure(&n).is_err() {
                continue; // a missing dependency fails its dependant when it is examined
            }
            if let Some(unit) = self.units.get(&n) {
                todo.extend(unit.unit.requires.iter().cloned());
                todo.extend(unit.unit.wants.iter().cloned());
            }
            let cfg = &self.cfg.logs;
            let Some(slot) = self.slots.get_mut(&n) else {
                continue;
            };
            if manual && n == name {
                slot.limits_reset();
            }
            match (slot.active(), slot.job()) {
                (ActiveState::Inactive | ActiveState::Failed, _) => {
                    slot.start_queued(&self.events, cfg)
                }
                (ActiveState::Deactivating, _) | (_, Some(Job::Stop)) => slot.restart_queued(),
                _ => {}
            }
        }
    }

    /// Queue a stop (or restart) of `name`; a stop also stops the units that require it.
    pub(super) fn queue_stop(&mut self, name: &str, job: Job) {
        let mut targets = vec![name.to_string()];
        if job == Job::Stop {
            let mut i = 0;
            while let Some(n) = targets.get(i).cloned() {
                i += 1;
                for (other, u) in &self.units {
                    if u.unit.requires.contains(&n) && !targets.contains(other) {
                        targets.push(other.clone());
                    }
                }
            }
        }
        for n in targets {
            let own_job = if n == name { job } else { Job::Stop };
            let Some(slot) = self.slots.get_mut(&n) else {
                continue;
            };
            if slot.has_processes() {
                slot.stop_queued(own_job);
            } else if own_job == Job::Restart {
                // Nothing runs, but an exited oneshot is still active: it is stopped first,
                // so that the start runs it again (as systemd does).
                if slot.active() == ActiveState::Active {
                    slot.stopped_exited(&self.events, &self.cfg.logs);
                }
                self.queue_start(&n, true);
            } else if slot.active() != ActiveState::Inactive || slot.job().is_some() {
                slot.stopped_idle(&self.events, &self.cfg.logs);
            }
        }
    }

    pub(super) fn remove(&mut self, name: &str) {
        if let Some(slot) = self.slots.get_mut(name) {
            slot.removal_queued();
        }
        self.queue_stop(name, Job::Stop);
        if let (Some(dir), Some(unit)) = (&self.cfg.api_units_dir, self.units.get(name)) {
            if unit.path.as_deref().is_some_and(|p| p.starts_with(dir)) {
                if let Some(p) = &unit.path {
                    let _ = fs::remove_file(p);
                }
            }
        }
    }

    /// Begin an orderly shutdown: stop every unit, refuse new starts. What is still running
    /// when the configured `shutdown_timeout` has passed is killed.
    pub fn shutdown(&mut self) {
        self.shutdown_at(Instant::now());
    }

    /// [`Manager::shutdown`] asked at `now` (the shutdown deadline counts from it).
    pub fn shutdown_at(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.shutdown_deadline = Some(later(now, self.cfg.shutdown_timeout));
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for n in names {
            self.queue_stop(&n, Job::Stop);
        }
    }

    /// True once a shutdown was asked for and every unit has stopped, or the shutdown
    /// deadline killed what was left and a short grace for those processes to end passed.
    pub fn shutdown_complete(&self) -> bool {
        self.shutdown_complete_at(Instant::now())
    }

    /// [`Manager::shutdown_complete`] as seen at `now`.
    pub fn shutdown_complete_at(&self, now: Instant) -> bool {
        self.shutting_down
            && (self.slots.values().all(|s| !s.has_processes())
                || self.forced_at.is_some_and(|t| now >= later(t, FORCE_GRACE)))
    }

    /// True if the shutdown deadline passed and the units left were killed.
    pub fn shutdown_forced(&self) -> bool {
        self.forced_at.is_some()
    }

    /// The shutdown deadline passed: kill every process of every unit still running
    /// (cgroup.kill), whatever order or stop_timeout it would wait for.
    pub(super) fn force_stop(&mut self, now: Instant) {
        self.forced_at = Some(now);
        let left: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.has_processes())
            .map(|(n, _)| n.clone())
            .collect();
        log::error!(
            "shutdown deadline ({:?}) passed with {} unit(s) still running ({}); killing \
             them (a longer --shutdown-timeout gives units more time)",
            self.cfg.shutdown_timeout,
            left.len(),
            left.join(", ")
        );
        for name in left {
            let Some(slot) = self.slots.get_mut(&name) else {
                continue;
            };
            for pid in [slot.pull_pid(), slot.prepull_cancelled(&self.cfg.logs)]
                .into_iter()
                .flatten()
            {
                self.procs.signal_main(&name, pid, Signal::SIGKILL);
                self.pids.remove(&pid);
            }
            slot.force_killed(&self.events, &self.cfg.logs, now, later(now, KILL_RETRY));
            if let Some(scope) = slot.scope() {
                self.procs.signal_scope(&name, scope, Signal::SIGKILL);
            }
            if let Some(pid) = slot.main_pid() {
                self.procs.signal_main(&name, pid, Signal::SIGKILL);
            }
        }
    }
}
