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

use flotilla_container::image::ImageStores;
use nix::unistd::Pid;

use crate::launcher::LaunchIo;

/// Why the pull helper could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PullSpawnError {
    /// The helper executable is not there.
    #[error(
        "the pull helper {0} does not exist; install unitctl next to flotilla-init or give \
         flotilla-init --pull-helper PATH"
    )]
    Missing(PathBuf),
    /// fork/exec failed.
    #[error("cannot run the pull helper {path}: {source}")]
    Spawn {
        /// The helper.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// How the manager gets registry images into its store.
pub trait Puller {
    /// True when the image stores hold `image` (a registry reference).
    fn has_image(&mut self, image: &str) -> bool;

    /// Start pulling `image` for `unit`, the helper's stdout and stderr on `io`; returns its
    /// pid (a child of the manager, reaped by the event loop).
    fn spawn(&mut self, unit: &str, image: &str, io: LaunchIo) -> Result<Pid, PullSpawnError>;
}

/// The real [`Puller`]: runs `unitctl image pull` into the writable (first) store.
#[derive(Debug, Clone)]
pub struct HelperPuller {
    helper: PathBuf,
    stores: Vec<PathBuf>,
    registries: Option<PathBuf>,
}

impl HelperPuller {
    /// Pulls with `helper` into the first of `stores` (all of them are looked in for an image
    /// that is already there), with the registry settings `registries` (else the helper's
    /// default).
    pub fn new(helper: &Path, stores: &[PathBuf], registries: Option<&Path>) -> Self {
        Self {
            helper: helper.to_path_buf(),
            stores: stores.to_vec(),
            registries: registries.map(Path::to_path_buf),
        }
    }

    /// The `unitctl` next to the running executable, if the executable's path is known.
    pub fn default_helper() -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        Some(exe.parent()?.join("unitctl"))
    }
}

impl Puller for HelperPuller {
    fn has_image(&mut self, image: &str) -> bool {
        ImageStores::open(&self.stores).is_ok_and(|s| s.resolve(image).is_ok())
    }

    fn spawn(&mut self, _unit: &str, image: &str, io: LaunchIo) -> Result<Pid, PullSpawnError> {
        if !self.helper.is_file() {
            return Err(PullSpawnError::Missing(self.helper.clone()));
        }
        let mut cmd = Command::new(&self.helper);
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
            path: self.helper.clone(),
            source,
        })?;
        // Dropping the handle neither waits nor kills: the event loop reaps it.
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        Ok(Pid::from_raw(pid))
    }
}
