//! Process scopes: the set of processes that belong to one run of a unit.
//!
//! With cgroup v2 (the normal case, in the VM and on any current host) every unit gets a leaf
//! cgroup: a process that double-forks or calls `setsid` still belongs to it, and stopping the
//! unit kills the whole cgroup. Without a cgroup v2 hierarchy the scope falls back to
//! the unit's process group, which a daemon that calls `setsid` escapes; the manager logs
//! that it runs in this degraded mode.

use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// Errors creating or using a scope.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    /// A resource limit was asked for but cannot be applied.
    #[error(
        "cannot apply {key}: the cgroup v2 `{controller}` controller is not available in {path} \
         (the controller is not delegated to the units' cgroup: run the manager in a \
         delegated cgroup v2, e.g. `systemd-run --scope -p Delegate=yes flotilla-init ...`, \
         or in the Flotilla VM; on a hybrid host whose cgroup2 has no controllers, remove \
         {key})"
    )]
    NoController {
        /// The unit key.
        key: &'static str,
        /// The controller it needs.
        controller: &'static str,
        /// The unit's cgroup.
        path: PathBuf,
    },
    /// A cgroup v2 hierarchy is mounted but this process cannot create the units' cgroup
    /// below its own: its cgroup is not delegated to it.
    #[error(
        "cannot create the units' cgroup {path}: {source}; this process's cgroup {parent} is \
         not delegated to it. Run the manager in a delegated cgroup, e.g. `systemd-run --scope \
         -p Delegate=yes flotilla-init ...` (or give its user the cgroup directory, its \
         cgroup.procs and cgroup.subtree_control)"
    )]
    NotDelegated {
        /// The cgroup that could not be created.
        path: PathBuf,
        /// This process's own cgroup.
        parent: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A cgroup file or directory could not be used.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

fn cg_err(path: &Path) -> impl FnOnce(io::Error) -> ScopeError + '_ {
    move |source| ScopeError::Cgroup {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the manager puts the cgroups of its units.
#[derive(Debug, Clone)]
pub enum ScopeRoot {
    /// A cgroup v2 directory owned by this manager; one child per unit.
    Cgroup(PathBuf),
    /// No usable cgroup v2: process groups only.
    ProcessGroup,
}

// The cgroup2 mount and a process's place in it: one copy, in the API crate, which the
// manager's and fleetd's access rules use too.
pub use flotilla_init_api::cgroup::{cgroup2_mount, find_cgroup2, own_cgroup};

/// Controllers the unit limits need.
const LIMIT_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Enable in `dir`'s children each limit controller that `dir` has (best effort).
///
/// Returns the controllers refused with `EBUSY`: `dir` holds processes (cgroup v2's
/// no-internal-process rule); any other refusal is logged with the fix.
fn enable_controllers(dir: &Path) -> Vec<&'static str> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let mut busy = Vec::new();
    for c in LIMIT_CONTROLLERS {
        if available.split_whitespace().any(|a| a == c) {
            match fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy.push(c),
                Err(e) => log::warn!(
                    "cannot enable the {c} controller below {}: {e}; units with a {c} limit \
                     will fail to start. Run the manager in a delegated cgroup \
                     (`systemd-run --scope -p Delegate=yes flotilla-init ...`)",
                    dir.display()
                ),
            }
        }
    }
    busy
}

/// True when `dir`'s `cgroup.procs` lists this process and nothing else.
fn holds_only_self(dir: &Path) -> bool {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let me = std::process::id().to_string();
    let mut pids = procs.split_whitespace();
    pids.next() == Some(me.as_str()) && pids.next().is_none()
}

/// Delegate the limit controllers from `parent` (this process's cgroup) down to `dir`.
///
/// In a delegated cgroup that holds only this process (`systemd-run --scope -p
/// Delegate=yes`), the controllers cannot be enabled while the process is in it: the process
/// moves itself into the leaf `parent/init.scope` first, as systemd's delegated services
/// do. A cgroup shared with other processes keeps them; its controllers stay unavailable and
/// a unit asking for a limit fails with the reason.
fn delegate_controllers(mount: &Path, parent: &Path, dir: &Path) {
    let busy = enable_controllers(parent);
    if !busy.is_empty() && parent != mount {
        if holds_only_self(parent) {
            let leaf = parent.join("init.scope");
            let moved = match fs::create_dir(&leaf) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(e),
            }
            .and_then(|()| fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()));
            match moved {
                Ok(()) => {
                    log::info!("moved to the leaf cgroup {}", leaf.display());
                    enable_controllers(parent);
                }
                Err(e) => log::warn!("cannot move to the leaf cgroup {}: {e}", leaf.display()),
            }
        } else {
            log::warn!(
                "the {} controller(s) cannot be delegated below {}: it holds other processes; \
                 units with limits will fail to start. Run the manager in a cgroup of its own \
                 (`systemd-run --scope -p Delegate=yes flotilla-init ...`)",
                busy.join(", "),
                parent.display()
            );
        }
    }
    enable_controllers(dir);
}

/// Moves this process into the leaf cgroup `name` below the cgroup2 root (PID 1 does this
/// with `init.scope`, as systemd, so that only leaves hold processes). Returns the leaf.
pub fn move_self_to_leaf(name: &str) -> Result<PathBuf, ScopeError> {
    let mount = find_cgroup2().ok_or_else(|| ScopeError::Cgroup {
        path: PathBuf::from("/sys/fs/cgroup"),
        source: io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem is mounted"),
    })?;
    let leaf = mount.join(name);
    match fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(cg_err(&leaf)(e)),
    }
    let procs = leaf.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(cg_err(&procs))?;
    Ok(leaf)
}

impl ScopeRoot {
    /// The manager's scopes: create `name` below this process's own cgroup v2 and delegate
    /// the limit controllers to it; process groups when no cgroup2 is mounted.
    ///
    /// Returns the root and, when falling back, the reason (for the log). A mounted cgroup2
    /// in which the cgroup cannot be created is an error ([`ScopeError::NotDelegated`]), not
    /// a silent fallback: the units would run without the cgroup's kill and limits.
    pub fn create(name: &str) -> Result<(ScopeRoot, Option<String>), ScopeError> {
        Self::try_create(name, true)
    }

    /// As [`ScopeRoot::create`], falling back to process groups on any error (the reason is
    /// returned: PID 1 logs it, the toolbox refuses to run with it); `delegate`: enable the
    /// limit controllers for the children (the toolbox sets no limits and leaves its
    /// parent's controllers alone).
    pub fn create_with(name: &str, delegate: bool) -> (ScopeRoot, Option<String>) {
        Self::try_create(name, delegate).unwrap_or_else(|e| {
            let why = match e {
                ScopeError::NotDelegated { path, source, .. } => {
                    format!("cannot create cgroup {}: {source}", path.display())
                }
                e => e.to_string(),
            };
            (ScopeRoot::ProcessGroup, Some(why))
        })
    }

    fn try_create(name: &str, delegate: bool) -> Result<(ScopeRoot, Option<String>), ScopeError> {
        let Some(mount) = find_cgroup2() else {
            return Ok((
                ScopeRoot::ProcessGroup,
                Some("no cgroup2 filesystem is mounted".into()),
            ));
        };
        let own = own_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap_or_default())
            .unwrap_or_default();
        let parent = mount.join(own);
        let dir = parent.join(name);
        fs::create_dir_all(&dir).map_err(|source| ScopeError::NotDelegated {
            path: dir.clone(),
            parent: parent.clone(),
            source,
        })?;
        // Delegate the limit controllers down to the units' cgroups. A unit asking for a
        // limit that could not be delegated gets a precise error.
        if delegate {
            delegate_controllers(&mount, &parent, &dir);
        }
        Ok((ScopeRoot::Cgroup(dir), None))
    }

    /// Prepare the scope for a new run of `unit`. Kills leftovers of an earlier run first.
    pub fn prepare(&self, unit: &str) -> Result<Scope, ScopeError> {
        match self {
            ScopeRoot::ProcessGroup => Ok(Scope::ProcessGroup { pgid: None }),
            ScopeRoot::Cgroup(root) => {
                let path = root.join(format!("{unit}.unit"));
                let fresh = match fs::create_dir(&path) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let leftover = Scope::Cgroup {
                            path: path.clone(),
                            oom_base: 0,
                            fresh: false,
                        };
                        leftover.signal(Signal::SIGKILL);
                        false
                    }
                    Err(e) => return Err(cg_err(&path)(e)),
                };
                let oom_base = oom_kills_in(&path);
                Ok(Scope::Cgroup {
                    path,
                    oom_base,
                    fresh,
                })
            }
        }
    }

    /// Remove the (empty) root cgroup; called when the manager exits.
    pub fn remove(&self) {
        if let ScopeRoot::Cgroup(root) = self {
            if let Ok(dir) = fs::read_dir(root) {
                for entry in dir.flatten() {
                    if entry.path().is_dir() {
                        let _ = fs::remove_dir(entry.path());
                    }
                }
            }
            let _ = fs::remove_dir(root);
        }
    }
}

/// Resource limits of one unit, in cgroup v2 terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// `cpu.max` as (quota, period) in microseconds.
    pub cpu_max: Option<(u64, u64)>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

impl Limits {
    /// The limits a unit asks for.
    pub fn of(unit: &flotilla_units::Unit) -> Limits {
        let s = &unit.service;
        Limits {
            memory_max: s.memory_max,
            cpu_max: s.cpu_max.map(|c| (c.quota_us, c.period_us)),
            pids_max: s.pids_max,
        }
    }

    /// Each limit as (unit key, controller, cgroup file, value).
    fn table(&self) -> Vec<(&'static str, &'static str, &'static str, String)> {
        let mut t = Vec::new();
        if let Some(m) = self.memory_max {
            t.push(("memory_max", "memory", "memory.max", m.to_string()));
        }
        if let Some((q, p)) = self.cpu_max {
            t.push(("cpu_max", "cpu", "cpu.max", format!("{q} {p}")));
        }
        if let Some(p) = self.pids_max {
            t.push(("pids_max", "pids", "pids.max", p.to_string()));
        }
        t
    }
}

/// `oom_kill` from the `memory.events` of cgroup `path` (0 when there is none).
fn oom_kills_in(path: &Path) -> u64 {
    fs::read_to_string(path.join("memory.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The processes of one unit run.
#[derive(Debug)]
pub enum Scope {
    /// A leaf cgroup.
    Cgroup {
        /// Its directory.
        path: PathBuf,
        /// `oom_kill` of its `memory.events` when this run began (the directory can outlive a run).
        oom_base: u64,
        /// Made by this run's `prepare`, not left over from an earlier run (and so never
        /// killed with `cgroup.kill`): see [`flotilla_container::runtime::CgroupDir::fresh`].
        fresh: bool,
    },
    /// The process group led by the main process (set once it is spawned).
    ProcessGroup {
        /// Process group id, the main pid.
        pgid: Option<Pid>,
    },
}

/// What a child must do, between fork and exec, to enter its scope.
pub struct ScopeEntry {
    procs: Option<OwnedFd>,
    dir: Option<OwnedFd>,
    fresh: bool,
}

impl ScopeEntry {
    /// The scope's cgroup v2 directory, for the container runtime, which starts the
    /// container's processes in it itself.
    pub fn cgroup(&self) -> Option<flotilla_container::runtime::CgroupDir<'_>> {
        use std::os::fd::AsFd;
        self.dir
            .as_ref()
            .map(|f| flotilla_container::runtime::CgroupDir {
                dir: f.as_fd(),
                fresh: self.fresh,
            })
    }

    /// Async-signal-safe: move the calling process into the scope. Call in `pre_exec` only.
    pub fn enter(&self) -> io::Result<()> {
        nix::unistd::setsid().map_err(io::Error::from)?;
        if let Some(fd) = &self.procs {
            // Writing "0" to cgroup.procs moves the writer itself.
            let n = nix::unistd::write(fd, b"0").map_err(io::Error::from)?;
            if n != 1 {
                return Err(io::Error::other("short write to cgroup.procs"));
            }
        }
        Ok(())
    }
}

impl Scope {
    /// Open what the child needs to join this scope; done before fork.
    pub fn entry(&self) -> Result<ScopeEntry, ScopeError> {
        match self {
            Scope::Cgroup { path, fresh, .. } => {
                let procs = path.join("cgroup.procs");
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .map_err(cg_err(&procs))?;
                let dir = fs::File::open(path).map_err(cg_err(path))?;
                Ok(ScopeEntry {
                    procs: Some(file.into()),
                    dir: Some(dir.into()),
                    fresh: *fresh,
                })
            }
            Scope::ProcessGroup { .. } => Ok(ScopeEntry {
                procs: None,
                dir: None,
                fresh: false,
            }),
        }
    }

    /// Apply `limits` before the process starts. A limit that cannot be applied is an error,
    /// never silently dropped.
    pub fn apply(&self, limits: &Limits) -> Result<(), ScopeError> {
        let table = limits.table();
        let Some((key, controller, _, _)) = table.first() else {
            return Ok(());
        };
        let path = match self {
            Scope::Cgroup { path, .. } => path,
            Scope::ProcessGroup { .. } => {
                return Err(ScopeError::NoController {
                    key,
                    controller,
                    path: PathBuf::from("(no cgroup v2)"),
                })
            }
        };
        for (key, controller, file, value) in table {
            let target = path.join(file);
            if !target.exists() {
                return Err(ScopeError::NoController {
                    key,
                    controller,
                    path: path.clone(),
                });
            }
            fs::write(&target, value).map_err(cg_err(&target))?;
        }
        Ok(())
    }

    /// How many processes of this run the kernel's OOM killer ended (cgroup v2
    /// `memory.events` `oom_kill`); 0 without a memory controller.
    pub fn oom_kills(&self) -> u64 {
        match self {
            Scope::Cgroup { path, oom_base, .. } => oom_kills_in(path).saturating_sub(*oom_base),
            Scope::ProcessGroup { .. } => 0,
        }
    }

    /// The scope's cgroup v2 directory; `None` for a process group.
    pub fn cgroup_path(&self) -> Option<&Path> {
        match self {
            Scope::Cgroup { path, .. } => Some(path),
            Scope::ProcessGroup { .. } => None,
        }
    }

    /// Record the main pid (process-group scopes use it as the group id).
    pub fn started(&mut self, main: Pid) {
        if let Scope::ProcessGroup { pgid } = self {
            *pgid = Some(main);
        }
    }

    /// Pids currently in the scope (best effort).
    pub fn members(&self) -> Vec<Pid> {
        match self {
            Scope::Cgroup { path, .. } => fs::read_to_string(path.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .map(Pid::from_raw)
                .collect(),
            Scope::ProcessGroup { pgid: Some(pgid) } => {
                if killpg(*pgid, None).is_ok() {
                    vec![*pgid]
                } else {
                    Vec::new()
                }
            }
            Scope::ProcessGroup { pgid: None } => Vec::new(),
        }
    }

    /// True when no process is left in the scope.
    pub fn is_empty(&self) -> bool {
        match self {
            Scope::Cgroup { path, .. } => match fs::read_to_string(path.join("cgroup.events")) {
                Ok(events) => events.lines().any(|l| l.trim() == "populated 0"),
                Err(_) => self.members().is_empty(),
            },
            Scope::ProcessGroup { .. } => self.members().is_empty(),
        }
    }

    /// Send `signal` to every process of the scope.
    pub fn signal(&self, signal: Signal) {
        match self {
            Scope::Cgroup { path, .. } => {
                if signal == Signal::SIGKILL {
                    // cgroup.kill (Linux 5.14+) kills atomically, including processes forked meanwhile.
                    if let Ok(mut f) = fs::OpenOptions::new()
                        .write(true)
                        .open(path.join("cgroup.kill"))
                    {
                        if f.write_all(b"1").is_ok() {
                            return;
                        }
                    }
                }
                for pid in self.members() {
                    let _ = kill(pid, signal);
                }
            }
            Scope::ProcessGroup { pgid: Some(pgid) } => {
                let _ = killpg(*pgid, signal);
            }
            Scope::ProcessGroup { pgid: None } => {}
        }
    }

    /// Remove the scope's cgroup once it is empty.
    pub fn remove(&self) {
        if let Scope::Cgroup { path, .. } = self {
            let _ = fs::remove_dir(path);
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Cgroup { path, .. } => write!(f, "cgroup {}", path.display()),
            Scope::ProcessGroup { pgid } => match pgid {
                Some(p) => write!(f, "process group {}", p.as_raw()),
                None => write!(f, "process group (not started)"),
            },
        }
    }
}
