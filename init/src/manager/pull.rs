//! Pulling a unit's registry image before its start.
//!
//! PID 1 links no registry client (no async runtime, HTTP or TLS stack): the manager runs a
//! helper process, `unitctl image pull REF --store DIR [--registries FILE]`, and tracks it
//! like a unit's process (its exit arrives through [`super::Manager::on_exit`], its output is
//! read by the event loop into the unit's log). [`Puller`] is the seam: [`HelperPuller`]
//! does it for real, the deterministic tests record it instead.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::Instant;

use flotilla_container::image::ImageStores;
use flotilla_units::{PullPolicy, RestartPolicy, Unit};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::machine::{backoff_delay, output_pipes};
use super::output::Pipe;
use super::{later, Job, Manager, SubState, UnitResult};
use crate::api::ImageEntry;
use crate::launcher::LaunchIo;
use crate::logs::{LineBuffer, MANAGER_STREAM};

/// Where the host image installs `unitctl`.
pub const INSTALLED_HELPER: &str = "/usr/bin/unitctl";

/// Why the pull helper could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PullSpawnError {
    /// The helper executable is not there (none of the paths tried).
    #[error(
        "the pull helper does not exist (tried {}); install unitctl next to flotilla-init \
         or give flotilla-init --pull-helper PATH",
        .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Missing(Vec<PathBuf>),
    /// fork/exec failed.
    #[error("cannot run the pull helper {path}: {source}")]
    Spawn {
        /// The helper.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The image stores could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list the images of the stores {}: {source}; check that they are readable (`unitctl image list`)",
    .stores.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
pub struct ListImagesError {
    /// The stores.
    pub stores: Vec<PathBuf>,
    /// The store's error.
    #[source]
    pub source: flotilla_container::image::ImageError,
}

/// How the manager gets registry images into its store.
pub trait Puller {
    /// True when the image stores hold `image` (a registry reference).
    fn has_image(&mut self, image: &str) -> bool;

    /// Every image of the stores (store name, manifest digest), sorted by name; a name in
    /// a later store shadowed by the same name in an earlier one is left out.
    fn images(&mut self) -> Result<Vec<ImageEntry>, ListImagesError>;

    /// Start pulling `image` for `unit`, the helper's stdout and stderr on `io`; returns its
    /// pid (a child of the manager, reaped by the event loop).
    fn spawn(&mut self, unit: &str, image: &str, io: LaunchIo) -> Result<Pid, PullSpawnError>;
}

/// The real [`Puller`]: runs `unitctl image pull` into the writable (first) store.
#[derive(Debug, Clone)]
pub struct HelperPuller {
    /// The helper: the first of these that exists when a pull starts.
    helpers: Vec<PathBuf>,
    stores: Vec<PathBuf>,
    registries: Option<PathBuf>,
}

impl HelperPuller {
    /// Pulls with the first of `helpers` that exists into the first of `stores` (all of them
    /// are looked in for an image that is already there), with the registry settings
    /// `registries` (else the helper's default).
    pub fn new(helpers: &[PathBuf], stores: &[PathBuf], registries: Option<&Path>) -> Self {
        Self {
            helpers: helpers.to_vec(),
            stores: stores.to_vec(),
            registries: registries.map(Path::to_path_buf),
        }
    }

    /// Where the helper is by default: the `unitctl` next to the running executable, then
    /// [`INSTALLED_HELPER`] (PID 1 of the host image runs from the initramfs, chrooted into
    /// the root, so its own path leads nowhere there).
    pub fn default_helpers() -> Vec<PathBuf> {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("unitctl")));
        beside
            .into_iter()
            .chain([PathBuf::from(INSTALLED_HELPER)])
            .collect()
    }
}

impl Puller for HelperPuller {
    fn has_image(&mut self, image: &str) -> bool {
        ImageStores::open(&self.stores).is_ok_and(|s| s.resolve(image).is_ok())
    }

    fn images(&mut self) -> Result<Vec<ImageEntry>, ListImagesError> {
        let error = |source| ListImagesError {
            stores: self.stores.clone(),
            source,
        };
        // The image tables only: this runs on the event loop, and opening every image's
        // manifest and config took 170 ms for 500 images (debug build).
        let stores = ImageStores::open(&self.stores).map_err(error)?;
        Ok(stores
            .tags()
            .map_err(error)?
            .into_iter()
            .map(|(name, digest)| ImageEntry { name, digest })
            .collect())
    }

    fn spawn(&mut self, _unit: &str, image: &str, io: LaunchIo) -> Result<Pid, PullSpawnError> {
        let Some(helper) = self.helpers.iter().find(|h| h.is_file()).cloned() else {
            return Err(PullSpawnError::Missing(self.helpers.clone()));
        };
        let mut cmd = Command::new(&helper);
        cmd.args(["image", "pull", image]);
        if let Some(store) = self.stores.first() {
            cmd.arg("--store").arg(store);
        }
        if let Some(r) = &self.registries {
            cmd.arg("--registries").arg(r);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(io.stdout))
            .stderr(Stdio::from(io.stderr));
        // SAFETY: between fork and exec this only calls signal(2) and sigprocmask(2) (both
        // async-signal-safe); it allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                flotilla_container::runtime::reset_signals();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| PullSpawnError::Spawn {
            path: helper,
            source,
        })?;
        // Dropping the handle neither waits nor kills: the event loop reaps it.
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        Ok(Pid::from_raw(pid))
    }
}

/// The pull step of a start: a transition between activating (waiting) and the launch.
impl Manager {
    /// The registry image `unit` must pull before this start, by its `pull` policy.
    pub(super) fn pull_needed(&mut self, unit: &Unit) -> Option<String> {
        let image = unit.container.registry_image()?;
        let puller = self.puller.as_mut()?;
        let pull = match unit.container.pull {
            PullPolicy::Never => false,
            PullPolicy::Always => true,
            PullPolicy::Missing => !puller.has_image(image),
        };
        pull.then(|| image.to_string())
    }

    /// Start the pull helper for `name`'s `image`: activating (pull). Returns true if it
    /// runs (or the failure scheduled a restart).
    pub(super) fn begin_pull(&mut self, name: &str, image: &str, now: Instant) -> bool {
        let pid = match self.spawn_helper(name, image) {
            Ok(Some(pid)) => pid,
            Ok(None) => return false,
            Err(msg) => return self.pull_failed(name, msg, now),
        };
        if let Some(slot) = self.slots.get_mut(name) {
            slot.pulling(&self.events, &self.cfg.logs, image, pid);
        }
        true
    }

    /// Run the pull helper for `name`'s `image`, its output read into the unit's log; `None`
    /// without a puller, `Err` with what went wrong.
    fn spawn_helper(&mut self, name: &str, image: &str) -> Result<Option<Pid>, String> {
        let (io, readers) = output_pipes()?;
        let Some(puller) = self.puller.as_mut() else {
            return Ok(None);
        };
        let pid = puller.spawn(name, image, io).map_err(|e| e.to_string())?;
        self.pids.insert(pid, name.to_string());
        for (fd, stream) in readers {
            self.add_pipe(Pipe {
                fd,
                unit: name.to_string(),
                stream,
                buf: LineBuffer::default(),
                helper: true,
            });
        }
        Ok(Some(pid))
    }

    /// What went wrong with `name`'s pull helper that ended with exit `code` or `signal`:
    /// its last line (its error) when it exited, how it ended when it was killed (its last
    /// line is then progress, not a reason).
    fn helper_failure(&self, name: &str, code: Option<i32>, signal: Option<i32>) -> String {
        let last = self
            .slots
            .get(name)
            .map(|s| s.pull_last_line().to_string())
            .unwrap_or_default();
        // unitctl's own prefix says nothing here.
        let last = last.strip_prefix("unitctl: ").unwrap_or(&last).to_string();
        match (code, signal) {
            (Some(_), _) if !last.is_empty() => last,
            (Some(c), _) => format!("the pull helper exited with code {c}"),
            (_, Some(s)) => {
                let sig = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
                if last.is_empty() {
                    format!("the pull helper was killed by {sig}")
                } else {
                    format!("the pull helper was killed by {sig} (its last line: {last})")
                }
            }
            _ => "the pull helper ended".to_string(),
        }
    }

    /// The pull helper of `name` ended (exit `code` or `signal`): the start goes on, or the
    /// unit fails with result `pull`.
    pub(super) fn pull_exited(
        &mut self,
        name: &str,
        code: Option<i32>,
        signal: Option<i32>,
        now: Instant,
    ) {
        self.drain_helper_pipes(name);
        let Some(unit) = self.units.get(name).cloned() else {
            return;
        };
        if code == Some(0) {
            if let Some(slot) = self.slots.get_mut(name) {
                slot.log.push(&self.cfg.logs, MANAGER_STREAM, "Pull done.");
            }
            self.launch_now(name, &unit, now);
            return;
        }
        let image = unit.container.image.as_deref().unwrap_or_default();
        let msg = format!(
            "pulling {image}: {}",
            self.helper_failure(name, code, signal)
        );
        self.pull_failed(name, msg, now);
    }

    /// A pull of `name` failed with `msg`: the restart policy's backoff applies as for any
    /// failure, else failed (pull). Returns true if a restart was scheduled.
    pub(super) fn pull_failed(&mut self, name: &str, msg: String, now: Instant) -> bool {
        let Some(unit) = self.units.get(name).cloned() else {
            return false;
        };
        let restart = !self.shutting_down && unit.service.restart != RestartPolicy::No;
        let cfg = self.cfg.logs.clone();
        let Some(slot) = self.slots.get_mut(name) else {
            return false;
        };
        // A stop asked while the helper ended wins over the restart policy.
        if restart && !matches!(slot.job(), Some(Job::Stop | Job::Restart)) {
            let delay = backoff_delay(&unit, slot.backoff_step());
            let at = later(now, delay);
            slot.restart_scheduled(&self.events, &cfg, (UnitResult::Pull, msg), at, delay);
            true
        } else {
            slot.failed(&self.events, &cfg, UnitResult::Pull, msg);
            false
        }
    }

    /// A stop or restart job of `name`, whose main process runs, moves on: a restart of a
    /// running unit whose new body needs a pull first pulls while the old copy keeps running
    /// (and waits for that pull, or for the retry after a failed one); anything else stops
    /// the old copy (killing a pull helper left from a restart). Returns true if it moved.
    pub(super) fn stop_or_prepull(&mut self, name: &str, now: Instant) -> bool {
        let Some(slot) = self.slots.get(name) else {
            return false;
        };
        let restart_of_running = slot.job() == Some(Job::Restart)
            && slot.sub() == SubState::Running
            && !self.shutting_down;
        if !restart_of_running {
            self.cancel_prepull(name);
            return self.try_stop(name, now);
        }
        if slot.prepull_pid().is_some() || slot.prepull_retry_at().is_some_and(|t| t > now) {
            return false;
        }
        let Some(unit) = self.units.get(name).cloned() else {
            return false;
        };
        match self.pull_needed(&unit) {
            Some(image) if !self.slots.get(name).is_some_and(|s| s.prepulled(&image)) => {
                self.begin_prepull(name, &image, now)
            }
            _ => self.try_stop(name, now),
        }
    }

    /// Start the pull helper for the pending restart of `name` (running): the old copy keeps
    /// running meanwhile. Returns true (the unit moved: the pull runs, or it failed and is
    /// tried again later).
    fn begin_prepull(&mut self, name: &str, image: &str, now: Instant) -> bool {
        match self.spawn_helper(name, image) {
            Ok(Some(pid)) => {
                if let Some(slot) = self.slots.get_mut(name) {
                    slot.prepulling(&self.cfg.logs, image, pid);
                }
                true
            }
            // No puller: nothing is pulled, the restart goes on as before.
            Ok(None) => self.try_stop(name, now),
            Err(msg) => {
                self.prepull_failed(name, image, msg, now);
                true
            }
        }
    }

    /// The pull helper for the pending restart of `name` ended (exit `code` or `signal`):
    /// the restart proceeds, or the old copy keeps running and the pull is tried again.
    pub(super) fn prepull_exited(
        &mut self,
        name: &str,
        code: Option<i32>,
        signal: Option<i32>,
        now: Instant,
    ) {
        self.drain_helper_pipes(name);
        let Some(slot) = self.slots.get(name) else {
            return;
        };
        let image = slot.prepull_image().unwrap_or_default().to_string();
        if code == Some(0) {
            if let Some(slot) = self.slots.get_mut(name) {
                slot.prepull_done(&self.cfg.logs);
            }
            return;
        }
        let answer = self.helper_failure(name, code, signal);
        self.prepull_failed(name, &image, answer, now);
    }

    /// The pull for the pending restart of `name` failed (`answer`): the old copy keeps
    /// running, the restart stays pending, and the pull is tried again after the unit's
    /// restart backoff. A registry outage never takes a running unit down.
    fn prepull_failed(&mut self, name: &str, image: &str, answer: String, now: Instant) {
        let Some(unit) = self.units.get(name) else {
            return;
        };
        let cfg = self.cfg.logs.clone();
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        let delay = backoff_delay(unit, slot.backoff_step());
        let msg =
            format!("pulling {image} for the restart failed: {answer}; the old copy keeps running");
        slot.prepull_failed(&cfg, msg, later(now, delay), delay);
    }

    /// The pending restart of `name` no longer pulls first: a helper still running is
    /// killed (its exit is then reaped as an orphan's).
    pub(super) fn cancel_prepull(&mut self, name: &str) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        if let Some(pid) = slot.prepull_cancelled(&self.cfg.logs) {
            self.procs.signal_main(name, pid, Signal::SIGKILL);
            self.pids.remove(&pid);
        }
    }

    /// A stop (or restart) of `name` while its image is pulled: the helper is killed.
    pub(super) fn stop_pull(&mut self, name: &str) -> bool {
        let Some(slot) = self.slots.get_mut(name) else {
            return false;
        };
        let restart = slot.job() == Some(Job::Restart);
        if let Some(pid) = slot.pull_pid() {
            self.procs.signal_main(name, pid, Signal::SIGKILL);
            // Its exit is reaped as an orphan's: it no longer belongs to a start.
            self.pids.remove(&pid);
        }
        slot.pull_stopped(&self.events, &self.cfg.logs);
        if restart && !self.shutting_down {
            self.queue_start(name, true);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A helper that is not there fails the pull with a message that says what to do, and
    /// nothing is found in a store that does not exist.
    #[test]
    fn a_missing_helper_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("no-unitctl");
        let mut p = HelperPuller::new(&[helper], &[dir.path().join("store")], None);
        assert!(!p.has_image("127.0.0.1:5000/app:1"));
        let (_r1, w1) = nix::unistd::pipe().unwrap();
        let (_r2, w2) = nix::unistd::pipe().unwrap();
        let io = LaunchIo {
            stdout: w1,
            stderr: w2,
        };
        let e = p.spawn("web", "127.0.0.1:5000/app:1", io).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PullSpawnError::Missing(_)), "{msg}");
        assert!(
            msg.contains("no-unitctl") && msg.contains("--pull-helper"),
            "{msg}"
        );
    }
}
