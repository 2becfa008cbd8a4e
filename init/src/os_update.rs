//! The host's A/B update, one implementation for `unitctl os` and for init's D-Bus methods
//! `GetOsStatus() -> s` and `UpdateOs(s source, b allow_downgrade)`.
//!
//! - [`status_json`]: the JSON document of `unitctl os status --json`; init adds `job`
//!   ([`OsUpdater::status_json`]).
//! - [`Source`], [`pull_payload`], [`run_update`]: the update itself (a directory as it is, or
//!   an OCI reference pulled through `flotilla_registry` into the staging directory; then
//!   `flotilla_osupdate::host::update`: signature, downgrade, slot write, entry on trial).
//! - [`OsUpdater`]: init's job. [`OsUpdater::start`] answers at once and runs the update on
//!   a thread of its own (PID 1's event loop never waits for a registry or a 500 MB write);
//!   once the entry is installed it calls the reboot hook (flotilla-init: SIGINT to itself,
//!   the orderly reboot of Ctrl-Alt-Del, or as a supervisor an orderly stop and exit).
//!   Nothing here panics; a failure is the job's `failed` state and a logged error.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_osupdate::entries::{self, EntryState, SlotEntry};
use flotilla_osupdate::host::{
    self, EspMount, Host, HostError, HostStatus, UpdateOptions, UpdateReport, ESP_PARTITION,
};
use flotilla_osupdate::payload::TRUSTED_KEYS_DIR;
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
    /// The registry settings or the pull.
    #[error(transparent)]
    Pull(#[from] flotilla_registry::PullError),
    /// The download directory could not be made.
    #[error("cannot create the download directory {}: {source}; check that /var is mounted and writable", path.display())]
    Staging {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The request is refused as things are (a job runs, the host is not booted from a slot).
    #[error("{0}")]
    Refused(String),
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

/// A download directory under the staging directory, removed when dropped.
pub struct Staged {
    /// The directory.
    pub dir: PathBuf,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            log::warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Bytes free for root (`f_bfree`: root may use the reserved blocks) on the filesystem
/// holding `dir`; `None` when it cannot be asked.
fn free_bytes(dir: &Path) -> Option<u64> {
    let vfs = rustix::fs::statvfs(dir).ok()?;
    vfs.f_bfree.checked_mul(vfs.f_frsize)
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

/// Removes leftovers of updates whose process is gone (killed, power loss): only names
/// [`pull_payload`] makes (`<pid>-<nanos>`), whatever else the directory holds.
fn remove_leftovers(staging: &Path) {
    let Ok(rd) = std::fs::read_dir(staging) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, nanos)) = name.split_once('-') else {
            continue;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        // This process's own earlier downloads are gone too (each is removed when done).
        let ours = pid == std::process::id().to_string();
        if digits(pid) && digits(nanos) && (ours || !Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Pulls the OS update image `reference` into a fresh directory under `staging` with the
/// registry settings `settings` (read from `settings_path`): the manifest must be a
/// Flotilla OS update (`flotilla_osupdate::oci`), a download larger than the free space is
/// refused before its first byte, each file is digest-verified as it arrives. The payload's
/// signature is checked afterwards by the one update path, like a directory's.
pub fn pull_payload(
    reference: &str,
    settings: &flotilla_registry::Registries,
    settings_path: &Path,
    staging: &Path,
    progress: flotilla_registry::Progress,
) -> Result<(Staged, flotilla_registry::FilesReport), OsUpdateError> {
    use flotilla_osupdate::oci;
    let staging_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OsUpdateError::Staging { path, source }
    };
    std::fs::create_dir_all(staging).map_err(staging_error(staging))?;
    remove_leftovers(staging);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = staging.join(format!("{}-{nanos}", std::process::id()));
    // Private: only this root process writes the payload it verifies.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(staging_error(&dir))?;
    let staged = Staged { dir };
    let free = free_bytes(&staged.dir);
    let check = |reference: &str, bytes: &[u8]| {
        let layers = oci::parse_update_manifest(reference, bytes).map_err(|e| e.to_string())?;
        // A download that cannot fit is refused before its first byte.
        let need: u64 = layers.iter().map(|l| l.layer.size).sum();
        if let Some(free) = free.filter(|&f| f < need) {
            return Err(format!(
                "{reference}: the update needs {} ({need} bytes) in {} but only {} ({free} bytes) are free there: refused, nothing downloaded; free space on that filesystem",
                human_size(need),
                staging.display(),
                human_size(free)
            ));
        }
        Ok(layers
            .into_iter()
            .map(|l| flotilla_registry::ArtifactFile {
                name: l.file,
                media_type: l.layer.media_type,
                digest: l.layer.digest,
                size: l.layer.size,
            })
            .collect())
    };
    let report = flotilla_registry::pull_files(
        reference,
        settings,
        settings_path,
        &staged.dir,
        &check,
        progress,
    )?;
    Ok((staged, report))
}

/// What a registry pull of an update fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct Pulled {
    /// The reference.
    pub reference: String,
    /// The manifest's digest.
    pub digest: String,
    /// The registry (or mirror) it came from.
    pub registry: String,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Files downloaded.
    pub files: usize,
    /// Time the download took.
    pub seconds: f64,
}

/// How [`run_update`] runs.
pub struct UpdateRun<'a> {
    /// Where the payload comes from.
    pub source: &'a Source,
    /// The registry settings file (for a reference).
    pub registries: &'a Path,
    /// Where a reference is downloaded.
    pub staging: &'a Path,
    /// Downgrade and tries.
    pub opts: UpdateOptions,
    /// The pull's progress.
    pub pull_progress: flotilla_registry::Progress,
    /// Called with the CA file to use as the machine's roots, before the pull, when the
    /// machine has none (`flotilla_registry::fallback_roots`).
    pub fallback_roots: &'a mut dyn FnMut(&Path),
}

/// A payload ready to verify: a directory, or a download removed when dropped.
pub struct Fetched {
    /// The payload directory.
    pub dir: PathBuf,
    /// The download holding it (a reference's), removed when dropped.
    pub staged: Option<Staged>,
    /// What the pull fetched (a reference's).
    pub pulled: Option<Pulled>,
}

/// The source step of an update: a directory as it is; a reference pulled into the staging
/// directory, after what would refuse any payload is checked (the trusted keys, the running
/// version, the target partition). Needs no ESP.
pub fn fetch(host: &Host, run: UpdateRun<'_>) -> Result<Fetched, OsUpdateError> {
    let running = host.running_slot()?;
    match run.source {
        Source::Dir(dir) => Ok(Fetched {
            dir: dir.clone(),
            staged: None,
            pulled: None,
        }),
        Source::Reference(r) => {
            flotilla_osupdate::payload::load_trusted_keys(&host.keys).map_err(HostError::from)?;
            flotilla_osupdate::payload::os_release_version(&host.os_release)
                .map_err(HostError::from)?;
            host.partition(&running.other().partition_name())?;
            let settings = flotilla_registry::Registries::load(run.registries)?;
            if let Some(ca) = flotilla_registry::fallback_roots(r, &settings, run.registries) {
                (run.fallback_roots)(&ca);
            }
            let started = std::time::Instant::now();
            let (staged, report) =
                pull_payload(r, &settings, run.registries, run.staging, run.pull_progress)?;
            Ok(Fetched {
                dir: staged.dir.clone(),
                staged: Some(staged),
                pulled: Some(Pulled {
                    reference: r.clone(),
                    digest: report.manifest_digest,
                    registry: report.registry,
                    bytes: report.bytes,
                    files: report.files.len(),
                    seconds: started.elapsed().as_secs_f64(),
                }),
            })
        }
    }
}

/// Updates `host` (its ESP mounted) from `run.source`: [`fetch`], then the one update path
/// (`host::update`: verify, write the inactive slot, install its entry on trial). The
/// download is removed afterwards, whatever the outcome. The reboot is the caller's.
pub fn run_update(
    host: &Host,
    run: UpdateRun<'_>,
    write_progress: &mut dyn FnMut(u64, u64),
) -> Result<(UpdateReport, Option<Pulled>), OsUpdateError> {
    let opts = run.opts;
    let fetched = fetch(host, run)?;
    let report = host::update(host, &fetched.dir, opts, write_progress)?;
    Ok((report, fetched.pulled))
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
    /// The registry settings file.
    pub registries: PathBuf,
    /// Where a reference is downloaded.
    pub staging: PathBuf,
    /// Where the ESP is mounted when [`HostPaths::esp`] is `None`.
    pub esp_mount: PathBuf,
}

impl Default for OsConfig {
    fn default() -> Self {
        OsConfig {
            paths: HostPaths::default(),
            registries: PathBuf::from(flotilla_registry::DEFAULT_REGISTRIES),
            staging: PathBuf::from(STAGING),
            esp_mount: PathBuf::from(INIT_ESP_MOUNT),
        }
    }
}

/// What the job calls once the new slot is the next boot.
pub type RebootHook = Box<dyn Fn() + Send + Sync>;

struct Inner {
    config: OsConfig,
    job: Mutex<Option<Job>>,
    /// Held while the ESP is mounted on `config.esp_mount` (a status and the job share it).
    esp: Mutex<()>,
    /// The last status read: answered while the job holds the ESP (a slot write takes
    /// minutes; a status must not wait for it).
    last: Mutex<Option<HostStatus>>,
    reboot: RebootHook,
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
            }),
        }
    }

    /// The job, if one was started since init started.
    pub fn job(&self) -> Option<Job> {
        locked(&self.inner.job).clone()
    }

    /// [`status_json`] of the host plus `job` (null when none was started). Blocks on the
    /// ESP (mounted for the moment): call it off the event loop.
    pub fn status_json(&self) -> Result<Value, OsUpdateError> {
        let st = {
            let _esp = locked(&self.inner.esp);
            self.inner
                .config
                .paths
                .status(&self.inner.config.esp_mount)?
        };
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

    /// Starts an update from `source` on a thread of its own and returns at once. Refused
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
        let parsed = Source::parse(source)?;
        *job = Some(Job {
            source: source.to_string(),
            state: JobState::Running,
            message: "starting".into(),
        });
        drop(job);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("os-update".into())
            .spawn(move || me.run_job(&parsed, allow_downgrade));
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

    /// The job's thread: the update, then the reboot hook; a failure (or a panic in a
    /// library) becomes the `failed` state with its reason.
    fn run_job(&self, source: &Source, allow_downgrade: bool) {
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

    fn update(&self, source: &Source, allow_downgrade: bool) -> Result<String, OsUpdateError> {
        let cfg = &self.inner.config;
        let me = self.clone();
        let pull_progress: flotilla_registry::Progress = Arc::new(move |event| {
            if let flotilla_registry::PullEvent::Resolved {
                registry, bytes, ..
            } = event
            {
                me.set(
                    JobState::Running,
                    format!("pulling {} from {registry}", human_size(bytes)),
                );
            }
        });
        let mut no_fallback = |ca: &Path| {
            // Setting SSL_CERT_FILE in a process with threads is not safe: say so instead.
            log::warn!(
                "this machine has no CA certificates; the registry's CA {} is not used by init (add the CA to the image's bundle)",
                ca.display()
            );
        };
        let opts = UpdateOptions {
            allow_downgrade,
            ..UpdateOptions::default()
        };
        // The source step needs no ESP: a status meanwhile reads it as usual.
        let fetched = fetch(
            &cfg.paths.host(),
            UpdateRun {
                source,
                registries: &cfg.registries,
                staging: &cfg.staging,
                opts,
                pull_progress,
                fallback_roots: &mut no_fallback,
            },
        )?;
        // A status answered while the ESP is held is the last one read: read it now.
        if let Err(e) = self.status() {
            log::warn!("{e}");
        }
        let _esp = locked(&self.inner.esp);
        let (host, mount) = cfg.paths.open(&cfg.esp_mount, false)?;
        let me = self.clone();
        let mut last = u64::MAX;
        let mut write_progress = |done: u64, total: u64| {
            let pct = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
            if pct / 10 != last {
                last = pct / 10;
                me.set(JobState::Running, format!("writing the slot: {pct}%"));
            }
        };
        me.set(JobState::Running, "verifying the payload".into());
        let result = host::update(&host, &fetched.dir, opts, &mut write_progress);
        drop(fetched.staged);
        if let Some(m) = mount {
            if let Err(e) = m.unmount() {
                log::warn!("{e}");
            }
        }
        let r = result?;
        let pulled = fetched.pulled;
        let from = pulled
            .map(|p| format!(" (pulled {} {} from {})", p.reference, p.digest, p.registry))
            .unwrap_or_default();
        Ok(format!(
            "Flotilla {} (signed by {}){from} written to slot {} ({} bytes); next boot: {} ({} tries)",
            r.payload.manifest.version,
            r.payload.key,
            r.slot,
            r.write.bytes,
            r.installed.file,
            UpdateOptions::default().tries
        ))
    }
}
