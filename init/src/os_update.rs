//! The host's A/B update, one implementation for `unitctl os` and for init's D-Bus methods
//! `GetOsStatus() -> s` and `UpdateOs(s source, b allow_downgrade)`.
//!
//! - [`status_json`]: the JSON document of `unitctl os status --json`; init adds `job`
//!   ([`OsUpdater::status_json`]).
//! - [`Source`]: a payload directory or a registry reference. The update itself (the pull,
//!   then `flotilla_osupdate::host::update`: the trial, signature, downgrade, slot write,
//!   entry on trial) is `unitctl os update`'s.
//! - [`OsUpdater`]: init's job. PID 1 links no registry client, so [`OsUpdater::start`]
//!   answers at once and runs the whole update in a helper process, `unitctl os update
//!   SOURCE --no-reboot --json`, the way the manager pulls unit images
//!   (`crate::manager::HelperPuller`): a thread of the job waits for it (its exit is reaped
//!   by the event loop and handed over through [`ExitWatch`]) and shows its stderr lines as
//!   the job's message. Once it exited 0 and the new slot is the next boot, the job calls
//!   the reboot hook (flotilla-init: SIGINT to itself, the orderly reboot of Ctrl-Alt-Del,
//!   or as a supervisor an orderly stop and exit). Nothing here panics; a failure is the
//!   job's `failed` state (the helper's last line) and a logged error.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_osupdate::entries::{self, EntryState, SlotEntry};
use flotilla_osupdate::host::{self, EspMount, Host, HostError, HostStatus, ESP_PARTITION};
use flotilla_osupdate::payload::TRUSTED_KEYS_DIR;
use nix::unistd::Pid;
use serde_json::{json, Value};

/// Where an update from a registry reference is downloaded: on `/var`, not in RAM.
pub const STAGING: &str = "/var/lib/flotilla/os-update";
/// Where init mounts the ESP for a status or an update (the trial uses its own directory).
pub const INIT_ESP_MOUNT: &str = "/run/flotilla/esp-os";

/// Why an OS status or update failed.
#[derive(Debug, thiserror::Error)]
pub enum OsUpdateError {
    /// The update library: the host's files, the payload (refused), the entries, the slot.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Mounting the ESP.
    #[error("cannot mount the ESP: {0}")]
    Esp(#[from] flotilla_osupdate::IoError),
    /// The source argument is neither a payload directory nor a registry reference.
    #[error("{0}")]
    Source(String),
    /// The request is refused as things are (a job runs, the host is not booted from a slot).
    #[error("{0}")]
    Refused(String),
    /// The update helper (`unitctl os update`) could not be run, failed or said nothing
    /// usable.
    #[error("{0}")]
    Helper(String),
}

/// Where the host's parts are: the real ones by default, other files in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// `/sys/class/block`.
    pub sys_block: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
    /// `/proc/cmdline`.
    pub cmdline: PathBuf,
    /// `/usr/lib/os-release`.
    pub os_release: PathBuf,
    /// The trusted keys.
    pub keys: PathBuf,
    /// The slots' disk (kernel name); `None`: the running slot's.
    pub disk: Option<String>,
    /// A mounted ESP; `None`: mount the disk's `flotilla-esp` partition when needed.
    pub esp: Option<PathBuf>,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sys_block: PathBuf::from("/sys/class/block"),
            dev: PathBuf::from("/dev"),
            cmdline: PathBuf::from("/proc/cmdline"),
            os_release: PathBuf::from("/usr/lib/os-release"),
            keys: PathBuf::from(TRUSTED_KEYS_DIR),
            disk: None,
            esp: None,
        }
    }
}

impl HostPaths {
    /// The host, its ESP unset.
    fn host(&self) -> Host {
        Host {
            sys_block: self.sys_block.clone(),
            dev: self.dev.clone(),
            cmdline: self.cmdline.clone(),
            os_release: self.os_release.clone(),
            keys: self.keys.clone(),
            disk: self.disk.clone(),
            esp: self.esp.clone().unwrap_or_default(),
        }
    }

    /// The host with its ESP: the given one, else the disk's ESP partition mounted on
    /// `mount_dir`, read-only if asked (returned: it is unmounted when dropped).
    pub fn open(
        &self,
        mount_dir: &Path,
        read_only: bool,
    ) -> Result<(Host, Option<EspMount>), OsUpdateError> {
        let mut host = self.host();
        if self.esp.is_some() {
            return Ok((host, None));
        }
        let part = host.partition(ESP_PARTITION)?;
        let mount = EspMount::mount(&part.dev, mount_dir, read_only)?;
        host.esp = mount.dir().to_path_buf();
        Ok((host, Some(mount)))
    }

    /// The host's state (the ESP mounted read-only for the read); on a host not booted from
    /// a slot (direct kernel boot) no running slot and no entries, the ESP not looked for.
    pub fn status(&self, mount_dir: &Path) -> Result<HostStatus, OsUpdateError> {
        let bare = self.host();
        match bare.running_slot() {
            Ok(_) => {}
            Err(HostError::NotAb { .. }) if self.esp.is_none() => {
                let version = flotilla_osupdate::payload::os_release_version(&bare.os_release)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|_| "unknown".into());
                return Ok(HostStatus {
                    running: None,
                    version,
                    entries: entries::Status {
                        entries: Vec::new(),
                        next: None,
                    },
                });
            }
            Err(HostError::NotAb { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let (host, mount) = self.open(mount_dir, true)?;
        let st = host::status(&host);
        if let Some(m) = mount {
            if let Err(e) = m.unmount() {
                log::warn!("{e}");
            }
        }
        Ok(st?)
    }
}

/// The other slot's entry when an update to it was rolled back.
pub fn rolled_back(st: &HostStatus) -> Option<&SlotEntry> {
    entries::rolled_back(&st.entries, st.running?, &st.version)
}

/// The document `unitctl os status --json` prints: `running` (slot or null), `version`,
/// `next`, `slots` (`slot`, `version`, `state` committed|trying|bad, `tries_left`,
/// `tries_done`, `entry`) and `rolled_back` (`{slot, version, entry}` or null).
pub fn status_json(st: &HostStatus) -> Value {
    let slots: Vec<Value> = st
        .entries
        .entries
        .iter()
        .map(|e| {
            let (state, left, done) = match e.state() {
                EntryState::Committed => ("committed", None, None),
                EntryState::Trying { left, done } => ("trying", Some(left), Some(done)),
                EntryState::Bad { done } => ("bad", Some(0), Some(done)),
            };
            json!({
                "slot": e.slot.as_str(),
                "version": e.version,
                "state": state,
                "tries_left": left,
                "tries_done": done,
                "entry": e.file,
            })
        })
        .collect();
    json!({
        "running": st.running.map(|s| s.as_str()),
        "version": st.version,
        "next": st.entries.next.map(|s| s.as_str()),
        "slots": slots,
        "rolled_back": rolled_back(st).map(|e| json!({
            "slot": e.slot.as_str(),
            "version": e.version,
            "entry": e.file,
        })),
    })
}

/// Where an update's payload comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A payload directory.
    Dir(PathBuf),
    /// A registry reference of an OS update image.
    Reference(String),
}

impl Source {
    /// An existing path is a directory; something that looks like a path (`/`, `.`, no `/`
    /// at all) but does not exist is an error; anything else is a registry reference.
    pub fn parse(arg: &str) -> Result<Source, OsUpdateError> {
        let path = Path::new(arg);
        if path.exists() {
            if !path.is_dir() {
                return Err(OsUpdateError::Source(format!("{arg} is not a directory: give the payload directory (OUT/update/) or a registry reference HOST[:PORT]/REPO:TAG")));
            }
            return Ok(Source::Dir(path.to_path_buf()));
        }
        if arg.starts_with('/') || arg.starts_with('.') || !arg.contains('/') {
            return Err(OsUpdateError::Source(format!("{arg}: no such payload directory, and not a registry reference (HOST[:PORT]/REPO[:TAG] or ...@sha256:<hex>)")));
        }
        Ok(Source::Reference(arg.to_string()))
    }
}

/// `bytes` for people (`1.5 MiB`).
pub fn human_size(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

/// The state of init's OS update job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Pulling, verifying or writing.
    Running,
    /// Refused or failed; the message says why. A new `UpdateOs` may start.
    Failed,
    /// Written and installed as the next boot; the orderly reboot was asked for.
    Rebooting,
}

impl JobState {
    /// The word in the JSON (`running`, `failed`, `rebooting`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Failed => "failed",
            JobState::Rebooting => "rebooting",
        }
    }
}

/// Init's OS update job, as `GetOsStatus` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The source asked for.
    pub source: String,
    /// Its state.
    pub state: JobState,
    /// What it is doing, or why it failed, or what it installed.
    pub message: String,
}

impl Job {
    /// `{"source", "state", "message"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "source": self.source,
            "state": self.state.as_str(),
            "message": self.message,
        })
    }
}

/// How init updates its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsConfig {
    /// The host's parts.
    pub paths: HostPaths,
    /// The registry settings file handed to the helper; `None`: the helper's default.
    pub registries: Option<PathBuf>,
    /// Where a reference is downloaded.
    pub staging: PathBuf,
    /// Where the ESP is mounted when [`HostPaths::esp`] is `None`.
    pub esp_mount: PathBuf,
    /// The update helper (`unitctl`): the first of these that exists when a job starts.
    pub helpers: Vec<PathBuf>,
}

impl Default for OsConfig {
    fn default() -> Self {
        OsConfig {
            paths: HostPaths::default(),
            registries: None,
            staging: PathBuf::from(STAGING),
            esp_mount: PathBuf::from(INIT_ESP_MOUNT),
            helpers: crate::manager::HelperPuller::default_helpers(),
        }
    }
}

/// What the job calls once the new slot is the next boot.
pub type RebootHook = Box<dyn Fn() + Send + Sync>;

/// How a child ended: its exit code, or the signal that killed it.
pub type ChildEnd = (Option<i32>, Option<i32>);

/// Hands the exits of helper processes the job started over to the job: the event loop
/// reaps every child (`waitpid(-1)`), so the job's thread cannot wait for its own. The
/// manager calls [`ExitWatch::deliver`] for each pid that is not one of its units'. Cheap
/// to clone.
#[derive(Clone, Default)]
pub struct ExitWatch {
    waiting: Arc<Mutex<HashMap<i32, mpsc::Sender<ChildEnd>>>>,
}

impl ExitWatch {
    /// Hands the end of `pid` to whoever waits for it; false when nobody does.
    pub fn deliver(&self, pid: Pid, end: ChildEnd) -> bool {
        match locked(&self.waiting).remove(&pid.as_raw()) {
            Some(tx) => {
                // The job may have given up waiting: nothing to tell then.
                let _ = tx.send(end);
                true
            }
            None => false,
        }
    }

    /// Runs `cmd` and registers its pid before the event loop can reap it (the lock is held
    /// across the spawn); returns the child and where its end arrives.
    fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(std::process::Child, mpsc::Receiver<ChildEnd>)> {
        let mut waiting = locked(&self.waiting);
        let child = cmd.spawn()?;
        let (tx, rx) = mpsc::channel();
        waiting.insert(i32::try_from(child.id()).unwrap_or(i32::MAX), tx);
        Ok((child, rx))
    }
}

struct Inner {
    config: OsConfig,
    job: Mutex<Option<Job>>,
    /// Held while init mounts the ESP on `config.esp_mount`, and while the helper runs (it
    /// mounts the ESP read-write itself: a read-only mount of the same device meanwhile is
    /// refused by the kernel).
    esp: Mutex<()>,
    /// The last status read: answered while the ESP is held (a slot write takes minutes; a
    /// status must not wait for it).
    last: Mutex<Option<HostStatus>>,
    reboot: RebootHook,
    exits: ExitWatch,
}

/// Init's OS update: the status with the job, and the job. Cheap to clone, thread-safe.
#[derive(Clone)]
pub struct OsUpdater {
    inner: Arc<Inner>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves a whole value behind (assignments only).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The helper's last line without unitctl's own prefix.
fn helper_line(line: &str) -> String {
    let line = line.trim();
    line.strip_prefix("unitctl: ").unwrap_or(line).to_string()
}

/// Why the helper failed: its last line when it exited non-zero, how it ended when it was
/// killed (its last line is then progress, not a reason).
fn helper_failure(end: ChildEnd, last: &str) -> String {
    match end {
        (Some(_), _) if !last.is_empty() => last.to_string(),
        (Some(c), _) => format!("the OS update helper exited with code {c} and said nothing"),
        (_, Some(s)) => {
            let sig = nix::sys::signal::Signal::try_from(s)
                .map(|s| s.as_str())
                .unwrap_or("?");
            if last.is_empty() {
                format!("the OS update helper was killed by {sig}")
            } else {
                format!("the OS update helper was killed by {sig} (its last line: {last})")
            }
        }
        _ => "the OS update helper ended".to_string(),
    }
}

/// The job's message from the helper's `--json` report.
fn installed_message(report: &Value) -> Option<String> {
    let s = |k: &str| report.get(k).and_then(Value::as_str);
    let from = report
        .get("pulled")
        .filter(|p| !p.is_null())
        .map(|p| {
            let f = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("?");
            format!(
                " (pulled {} {} from {})",
                f("reference"),
                f("digest"),
                f("registry")
            )
        })
        .unwrap_or_default();
    Some(format!(
        "Flotilla {} (signed by {}){from} written to slot {} ({} bytes); next boot: {} ({} tries)",
        s("version")?,
        s("key")?,
        s("slot")?,
        report.get("bytes").and_then(Value::as_u64)?,
        s("entry")?,
        report.get("tries").and_then(Value::as_u64)?,
    ))
}

impl OsUpdater {
    /// An updater of the host `config` describes; `reboot` is called (from the job's
    /// thread) once the update is installed.
    pub fn new(config: OsConfig, reboot: RebootHook) -> OsUpdater {
        OsUpdater {
            inner: Arc::new(Inner {
                config,
                job: Mutex::new(None),
                esp: Mutex::new(()),
                last: Mutex::new(None),
                reboot,
                exits: ExitWatch::default(),
            }),
        }
    }

    /// Where the reaper hands the helper's exit over: give it to the manager
    /// (`Manager::set_exit_watch`) that reaps init's children.
    pub fn exit_watch(&self) -> ExitWatch {
        self.inner.exits.clone()
    }

    /// The job, if one was started since init started.
    pub fn job(&self) -> Option<Job> {
        locked(&self.inner.job).clone()
    }

    /// [`status_json`] of the host plus `job` (null when none was started): read now, or
    /// while the job holds the ESP the last one read. Blocks on the ESP's mount: call it off
    /// the event loop.
    pub fn status_json(&self) -> Result<Value, OsUpdateError> {
        let st = self.status()?;
        let mut doc = status_json(&st);
        if let Value::Object(map) = &mut doc {
            map.insert(
                "job".into(),
                self.job().map_or(Value::Null, |j| j.to_json()),
            );
        }
        Ok(doc)
    }

    /// The host's status: read now, or while the job holds the ESP the last one read.
    fn status(&self) -> Result<HostStatus, OsUpdateError> {
        let cfg = &self.inner.config;
        let esp = match self.inner.esp.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                if let Some(st) = locked(&self.inner.last).clone() {
                    return Ok(st);
                }
                locked(&self.inner.esp)
            }
        };
        let st = cfg.paths.status(&cfg.esp_mount)?;
        drop(esp);
        *locked(&self.inner.last) = Some(st.clone());
        Ok(st)
    }

    /// Starts an update from `source` in the helper process and returns at once. Refused
    /// while a job runs or the host reboots into one, on a host not booted from a slot, and
    /// for a source that is neither a directory nor a reference.
    pub fn start(&self, source: &str, allow_downgrade: bool) -> Result<(), OsUpdateError> {
        let mut job = locked(&self.inner.job);
        if let Some(j) = job.as_ref() {
            match j.state {
                JobState::Running => {
                    return Err(OsUpdateError::Refused(format!(
                        "an OS update is already running (from {}): refused; wait for it to end (GetOsStatus, `unitctl os status`)",
                        j.source
                    )))
                }
                JobState::Rebooting => {
                    return Err(OsUpdateError::Refused(format!(
                        "the host is rebooting into the update from {}: refused",
                        j.source
                    )))
                }
                JobState::Failed => {}
            }
        }
        match self.inner.config.paths.host().running_slot() {
            Ok(_) => {}
            Err(e @ HostError::NotAb { .. }) => {
                return Err(OsUpdateError::Refused(format!(
                    "not booted from a slot of the A/B disk: {e}"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        Source::parse(source)?;
        *job = Some(Job {
            source: source.to_string(),
            state: JobState::Running,
            message: "starting".into(),
        });
        drop(job);
        let me = self.clone();
        let owned = source.to_string();
        let spawned = std::thread::Builder::new()
            .name("os-update".into())
            .spawn(move || me.run_job(&owned, allow_downgrade));
        if let Err(e) = spawned {
            let why = format!("cannot start the OS update thread: {e} (out of threads or memory?)");
            self.set(JobState::Failed, why.clone());
            return Err(OsUpdateError::Refused(why));
        }
        log::info!("OS update from {source} started");
        Ok(())
    }

    fn set(&self, state: JobState, message: String) {
        if let Some(j) = locked(&self.inner.job).as_mut() {
            j.state = state;
            j.message = message;
        }
    }

    /// The job's thread: the update, then the reboot hook; a failure (or a panic) becomes
    /// the `failed` state with its reason.
    fn run_job(&self, source: &str, allow_downgrade: bool) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.update(source, allow_downgrade)
        }));
        match outcome {
            Ok(Ok(done)) => {
                log::info!("flotilla: OS update: {done}; rebooting (orderly)");
                self.set(JobState::Rebooting, done);
                (self.inner.reboot)();
            }
            Ok(Err(e)) => {
                let why = e.to_string();
                log::error!("flotilla: OS update failed: {why}");
                self.set(JobState::Failed, why);
            }
            Err(_) => {
                let why = "internal error: the OS update panicked; please report this (nothing is booted differently unless `unitctl os status` says so)".to_string();
                log::error!("flotilla: OS update failed: {why}");
                self.set(JobState::Failed, why);
            }
        }
    }

    /// `unitctl os update SOURCE --no-reboot --json` with this host's paths.
    fn helper_command(&self, helper: &Path, source: &str, allow_downgrade: bool) -> Command {
        let cfg = &self.inner.config;
        let p = &cfg.paths;
        let mut cmd = Command::new(helper);
        cmd.args(["--json", "os", "update", source, "--no-reboot"]);
        if allow_downgrade {
            cmd.arg("--allow-downgrade");
        }
        if let Some(r) = &cfg.registries {
            cmd.arg("--registries").arg(r);
        }
        cmd.arg("--staging").arg(&cfg.staging);
        cmd.arg("--sys-block").arg(&p.sys_block);
        cmd.arg("--dev").arg(&p.dev);
        cmd.arg("--cmdline").arg(&p.cmdline);
        cmd.arg("--os-release").arg(&p.os_release);
        cmd.arg("--keys").arg(&p.keys);
        if let Some(d) = &p.disk {
            cmd.arg("--disk").arg(d);
        }
        if let Some(e) = &p.esp {
            cmd.arg("--esp").arg(e);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec this only calls signal(2) and sigprocmask(2) (both
        // async-signal-safe); it allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                flotilla_container::runtime::reset_signals();
                Ok(())
            });
        }
        cmd
    }

    /// Runs the helper and waits for it: its stderr lines are the job's message meanwhile,
    /// its stdout is the `--json` report. Returns how it ended, its last stderr line and its
    /// stdout.
    fn run_helper(
        &self,
        source: &str,
        allow_downgrade: bool,
    ) -> Result<(ChildEnd, String, String), OsUpdateError> {
        let helpers = &self.inner.config.helpers;
        let Some(helper) = helpers.iter().find(|h| h.is_file()) else {
            return Err(OsUpdateError::Helper(format!(
                "the OS update helper does not exist (tried {}); install unitctl next to flotilla-init or give flotilla-init --pull-helper PATH",
                helpers
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let mut cmd = self.helper_command(helper, source, allow_downgrade);
        let (mut child, ended) = self.inner.exits.spawn(&mut cmd).map_err(|e| {
            OsUpdateError::Helper(format!(
                "cannot run the OS update helper {}: {e}",
                helper.display()
            ))
        })?;
        log::info!(
            "OS update helper {} runs as pid {}",
            helper.display(),
            child.id()
        );
        let mut last = String::new();
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let line = helper_line(&line);
                if line.is_empty() {
                    continue;
                }
                self.set(JobState::Running, line.clone());
                last = line;
            }
        }
        let mut report = String::new();
        if let Some(mut out) = child.stdout.take() {
            // The report is small and written last: stderr's end comes first.
            let _ = out.read_to_string(&mut report);
        }
        // The event loop reaps it; its end arrives here (dropping `child` neither waits nor
        // kills).
        let end = ended.recv().map_err(|_| {
            OsUpdateError::Helper(
                "the OS update helper's exit was not reported (init is stopping?)".into(),
            )
        })?;
        Ok((end, last, report))
    }

    fn update(&self, source: &str, allow_downgrade: bool) -> Result<String, OsUpdateError> {
        // A status answered while the helper holds the ESP is the last one read: read it now.
        let before = self.status()?;
        let (end, last, report) = {
            let _esp = locked(&self.inner.esp);
            self.run_helper(source, allow_downgrade)?
        };
        if end != (Some(0), None) {
            return Err(OsUpdateError::Helper(helper_failure(end, &last)));
        }
        let done = serde_json::from_str::<Value>(&report)
            .ok()
            .as_ref()
            .and_then(installed_message)
            .ok_or_else(|| {
                OsUpdateError::Helper(format!(
                    "the OS update helper exited 0 but its report is not understood: {}",
                    report.trim()
                ))
            })?;
        // Reboot only into what is installed: the other slot must now boot next.
        let after = self.status()?;
        let target = before.running.map(|s| s.other());
        if target.is_none() || after.entries.next != target {
            return Err(OsUpdateError::Helper(format!(
                "the OS update helper said \"{done}\" but the next boot is {}, not the other slot: not rebooting; see `unitctl os status`",
                after.entries.next.map_or("none", |s| s.as_str())
            )));
        }
        Ok(done)
    }
}
