//! The unit manager: one owner of all unit state, driven by the event loop.
//!
//! Every input arrives as a method call from [`crate::event_loop`]: API requests, child
//! exits, pipe output, and the passage of time ([`Manager::tick`]). The manager never blocks
//! and never panics; anything that goes wrong becomes a unit state with a result and a
//! message, and a line in the unit's log.

mod processes;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use flotilla_units::{Catalog, RestartPolicy, ServiceType, Unit};
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::api::{ApiError, Event, ReloadReport, Request, Response, UnitInfo};
use crate::launcher::{LaunchIo, Launcher};
use crate::logs::{LineBuffer, LogConfig, MANAGER_STREAM};
use crate::scope::{Limits, ScopeRoot};
pub use processes::{ProcessControl, SystemProcesses};
pub use state::{Active, Job, Outcome, Slot, Sub};

/// How often a stopping unit's scope is re-checked for emptiness.
const SCOPE_POLL: Duration = Duration::from_millis(20);
/// How often SIGKILL is repeated while a scope refuses to empty.
const KILL_RETRY: Duration = Duration::from_secs(1);
/// After the shutdown deadline killed what was left: how long to wait for those processes to
/// end before the shutdown completes anyway (one stuck in the kernel cannot hold it up).
const FORCE_GRACE: Duration = Duration::from_secs(5);
/// How long a shutdown may take by default before every remaining process is killed
/// (systemd's `DefaultTimeoutStopSec`).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(90);

/// Static settings of a manager.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unit directories, in order; a later one overrides an earlier one.
    pub unit_dirs: Vec<PathBuf>,
    /// Where units loaded over the API are kept (also read as the last unit directory).
    pub api_units_dir: Option<PathBuf>,
    /// Log settings.
    pub logs: LogConfig,
    /// How long a shutdown may take: then every unit's processes are killed (the unit
    /// cgroups' `cgroup.kill`) and the shutdown completes ([`DEFAULT_SHUTDOWN_TIMEOUT`]).
    pub shutdown_timeout: Duration,
}

/// One output pipe being read.
#[derive(Debug)]
struct Pipe {
    fd: OwnedFd,
    unit: String,
    stream: &'static str,
    buf: LineBuffer,
}

/// The unit manager.
pub struct Manager {
    cfg: Config,
    units: BTreeMap<String, Unit>,
    slots: BTreeMap<String, Slot>,
    /// Predecessors in start order of each unit (after ∪ reverse before).
    preds: BTreeMap<String, BTreeSet<String>>,
    /// Units in an ordering cycle → the cycle, for the failure message.
    cycles: BTreeMap<String, String>,
    /// `preds` without the edges that close ordering cycles: what stops wait on.
    stop_preds: BTreeMap<String, BTreeSet<String>>,
    /// The `(a, b)` "a after b" edges left out of `stop_preds` (logged when they change).
    ignored_edges: Vec<(String, String)>,
    /// Templates of the last catalog, for instantiating on demand.
    catalog: Catalog,
    launcher: Box<dyn Launcher>,
    /// Every signal, scope and emptiness check goes through here (the test seam).
    procs: Box<dyn ProcessControl>,
    events: Option<Sender<Event>>,
    pids: HashMap<Pid, String>,
    pipes: Vec<Option<Pipe>>,
    new_pipes: Vec<usize>,
    shutting_down: bool,
    /// Control sockets an ungranted unit must not bind (as given and resolved).
    control_sockets: Vec<PathBuf>,
    /// When the shutdown deadline passes (set by [`Manager::shutdown`]).
    shutdown_deadline: Option<Instant>,
    /// When the units left at the shutdown deadline were killed.
    forced_at: Option<Instant>,
}

/// Fingerprint of a unit file's text (to tell which definition a process was started from).
fn source_hash(source: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut h);
    h.finish()
}

/// Add `d` to `t`, saturating instead of overflowing.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

impl Manager {
    /// Load the unit directories. Nothing is started until [`Manager::start_all`].
    pub fn new(
        cfg: Config,
        launcher: Box<dyn Launcher>,
        scopes: ScopeRoot,
        events: Option<Sender<Event>>,
    ) -> Self {
        Self::with_processes(
            cfg,
            launcher,
            Box::new(SystemProcesses::new(scopes)),
            events,
        )
    }

    /// As [`Manager::new`], with `procs` doing what the manager does to processes (a test
    /// double records it instead: see [`ProcessControl`]).
    pub fn with_processes(
        cfg: Config,
        launcher: Box<dyn Launcher>,
        procs: Box<dyn ProcessControl>,
        events: Option<Sender<Event>>,
    ) -> Self {
        let mut m = Manager {
            cfg,
            units: BTreeMap::new(),
            slots: BTreeMap::new(),
            preds: BTreeMap::new(),
            cycles: BTreeMap::new(),
            stop_preds: BTreeMap::new(),
            ignored_edges: Vec::new(),
            catalog: Catalog::default(),
            launcher,
            procs,
            events,
            pids: HashMap::new(),
            pipes: Vec::new(),
            new_pipes: Vec::new(),
            shutting_down: false,
            control_sockets: Vec::new(),
            shutdown_deadline: None,
            forced_at: None,
        };
        let report = m.reload(false);
        for e in &report.errors {
            log::error!("{e}");
        }
        m
    }

    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.cfg.unit_dirs.clone();
        if let Some(api) = &self.cfg.api_units_dir {
            if api.is_dir() {
                dirs.push(api.clone());
            }
        }
        dirs
    }

    /// Refuse to start a unit without `[container] control_api = true` if one of its bind
    /// mounts exposes one of `sockets` (the socket or a directory above it): such a unit could
    /// reach a server that cannot identify it (fleetd in its own pid namespace). See
    /// [`crate::api::access`].
    pub fn protect_control_sockets(&mut self, sockets: &[PathBuf]) {
        let mut all = Vec::new();
        for s in sockets {
            all.push(s.clone());
            // The resolved form too: the socket's directory may be reached through a symlink.
            if let (Some(dir), Some(file)) = (s.parent(), s.file_name()) {
                if let Ok(real) = std::fs::canonicalize(dir) {
                    all.push(real.join(file));
                }
            }
        }
        all.dedup();
        self.control_sockets = all;
    }

    /// How callers on the control socket are mapped to units (by the units' cgroups).
    pub fn unit_cgroups(&self) -> crate::api::access::UnitCgroups {
        use crate::api::access::UnitCgroups;
        match self.procs.root() {
            ScopeRoot::Cgroup(dir) => crate::api::peer::cgroup_path_of_dir(dir)
                .map_or(UnitCgroups::None, UnitCgroups::Below),
            ScopeRoot::ProcessGroup => UnitCgroups::None,
        }
    }

    /// The refusal when an ungranted `unit` binds a path that exposes a control socket.
    fn exposed_control_socket(&self, unit: &Unit) -> Option<String> {
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

    /// Queue a start of every loaded unit (what happens at boot).
    pub fn start_all(&mut self) {
        let names: Vec<String> = self.units.keys().cloned().collect();
        for n in names {
            self.queue_start(&n, true);
        }
    }

    // ----- API -----

    /// Answer one API request.
    pub fn handle(&mut self, req: Request) -> Result<Response, ApiError> {
        let changes_state = matches!(
            req,
            Request::StartUnit(_) | Request::RestartUnit(_) | Request::LoadUnit { .. }
        );
        if self.shutting_down && changes_state {
            return Err(ApiError::Refused("the manager is shutting down".into()));
        }
        match req {
            Request::ListUnits => Ok(Response::Units(
                self.slots.keys().filter_map(|n| self.info(n)).collect(),
            )),
            Request::GetUnit(name) => self.ensure(&name).map(Response::Unit),
            Request::StartUnit(name) => {
                self.ensure(&name)?;
                self.queue_start(&name, true);
                self.unit_response(&name)
            }
            Request::StopUnit(name) => {
                self.known(&name)?;
                self.queue_stop(&name, Job::Stop);
                self.unit_response(&name)
            }
            Request::RestartUnit(name) => {
                self.ensure(&name)?;
                self.queue_stop(&name, Job::Restart);
                self.unit_response(&name)
            }
            Request::LoadUnit { name, toml } => match self.load_from_api(&name, &toml)? {
                Some(template) => Ok(Response::Unit(template)),
                None => self.unit_response(&name),
            },
            Request::RemoveUnit(name) => {
                self.known(&name)?;
                self.remove(&name);
                Ok(Response::Done)
            }
            Request::Reload { restart_changed } => {
                Ok(Response::Reload(self.reload(restart_changed)))
            }
            Request::Logs {
                name,
                lines,
                after_seq,
            } => {
                let slot = self
                    .slots
                    .get(&name)
                    .ok_or_else(|| ApiError::NoSuchUnit(name.clone()))?;
                Ok(Response::Logs(slot.log.tail(lines as usize, after_seq)))
            }
            Request::CatUnit(name) => {
                self.ensure(&name)?;
                self.units
                    .get(&name)
                    .map(|u| Response::Text(u.source.clone()))
                    .ok_or(ApiError::NoSuchUnit(name))
            }
            Request::ControlApiGranted(name) => Ok(Response::Granted(
                self.slots
                    .get(&name)
                    .is_some_and(|s| s.scope.is_some() && s.control_api),
            )),
            Request::SystemState => Ok(Response::Text(
                if self.shutting_down {
                    crate::api::SYSTEM_STOPPING
                } else {
                    crate::api::SYSTEM_RUNNING
                }
                .to_string(),
            )),
        }
    }

    fn unit_response(&self, name: &str) -> Result<Response, ApiError> {
        self.info(name)
            .map(Response::Unit)
            .ok_or_else(|| ApiError::NoSuchUnit(name.to_string()))
    }

    fn known(&self, name: &str) -> Result<(), ApiError> {
        if self.slots.contains_key(name) {
            Ok(())
        } else {
            Err(ApiError::NoSuchUnit(name.to_string()))
        }
    }

    /// Make sure `name` has a slot, instantiating a template if needed.
    fn ensure(&mut self, name: &str) -> Result<UnitInfo, ApiError> {
        if !self.slots.contains_key(name) {
            match self.catalog.resolve(name) {
                Some(Ok(unit)) => {
                    self.insert_unit(unit);
                    self.recompute_graph();
                }
                Some(Err(e)) => return Err(ApiError::InvalidUnit(e.to_string())),
                None => return Err(ApiError::NoSuchUnit(name.to_string())),
            }
        }
        self.info(name)
            .ok_or_else(|| ApiError::NoSuchUnit(name.to_string()))
    }

    fn insert_unit(&mut self, unit: Unit) {
        let name = unit.name.clone();
        self.slots
            .entry(name.clone())
            .or_insert_with(|| Slot::new(&name));
        self.units.insert(name, unit);
    }

    fn recompute_graph(&mut self) {
        self.preds = flotilla_units::predecessor_map(&self.units);
        self.cycles.clear();
        for cycle in flotilla_units::ordering_cycles(&self.units) {
            let text = flotilla_units::format_cycle(&cycle);
            for n in &cycle {
                self.cycles.insert(n.clone(), text.clone());
            }
        }
        // Running units can form a cycle (a reload or LoadUnit added an edge): stops must
        // not wait on each other around it, so they follow the graph without its closing
        // edges, dropped the same way every time.
        let (stop_preds, ignored) = flotilla_units::break_cycles(&self.preds);
        if ignored != self.ignored_edges {
            for (a, b) in &ignored {
                let cycle = self.cycles.get(a).map_or("", String::as_str);
                log::warn!(
                    "ordering cycle {cycle}: stops ignore that {a} is ordered after {b} \
                     ({b} may stop before {a}); remove one after/before to fix it"
                );
            }
        }
        self.stop_preds = stop_preds;
        self.ignored_edges = ignored;
    }

    /// The client-visible record of a unit.
    pub fn info(&self, name: &str) -> Option<UnitInfo> {
        let slot = self.slots.get(name)?;
        let unit = self.units.get(name);
        Some(UnitInfo {
            name: name.to_string(),
            description: unit
                .and_then(|u| u.unit.description.clone())
                .unwrap_or_default(),
            load_state: if slot.load_error.is_some() {
                "error".into()
            } else {
                "loaded".into()
            },
            active_state: slot.active.as_str().into(),
            sub_state: slot.sub.as_str().into(),
            main_pid: slot
                .main_pid
                .map(|p| u32::try_from(p.as_raw()).unwrap_or(0))
                .unwrap_or(0),
            restarts: slot.restarts,
            exit_code: slot.exit_code.unwrap_or(-1),
            exit_signal: slot.exit_signal.unwrap_or(0),
            since_us: slot.since_us,
            result: slot.outcome.as_str().into(),
            message: match &slot.load_error {
                Some(e) if slot.message.is_empty() => e.clone(),
                _ => slot.message.clone(),
            },
        })
    }

    /// Store and install a unit, or a template (`name@`): then its state as `LoadUnit`
    /// answers it (a template has no state of its own: loaded, inactive, dead).
    fn load_from_api(&mut self, name: &str, text: &str) -> Result<Option<UnitInfo>, ApiError> {
        flotilla_units::check_name(name)
            .map_err(|e| ApiError::InvalidUnit(format!("invalid unit name {name:?}: {e}")))?;
        let dir = self.cfg.api_units_dir.clone();
        let path = dir.as_ref().map(|d| d.join(format!("{name}.toml")));
        if flotilla_units::split_instance(name).is_some_and(|(_, i)| i.is_empty()) {
            let prefix = name.trim_end_matches('@');
            let t = flotilla_units::Template::new(prefix, path.as_deref(), text.to_string())
                .map_err(|e| ApiError::InvalidUnit(e.to_string()))?;
            self.persist(path.as_deref(), text)?;
            self.catalog.templates.insert(prefix.to_string(), t);
            return Ok(Some(UnitInfo {
                name: name.to_string(),
                description: String::new(),
                load_state: "loaded".into(),
                active_state: Active::Inactive.as_str().into(),
                sub_state: Sub::Dead.as_str().into(),
                main_pid: 0,
                restarts: 0,
                exit_code: -1,
                exit_signal: 0,
                since_us: 0,
                result: Outcome::Success.as_str().into(),
                message: format!("a template: start an instance such as {prefix}@1"),
            }));
        }
        let unit = flotilla_units::parse_unit(name, path.as_deref(), text)
            .map_err(|e| ApiError::InvalidUnit(e.to_string()))?;
        self.persist(path.as_deref(), text)?;
        self.define(unit);
        self.recompute_graph();
        Ok(None)
    }

    fn persist(&self, path: Option<&Path>, text: &str) -> Result<(), ApiError> {
        let Some(path) = path else { return Ok(()) };
        let tmp = path.with_extension("toml.tmp");
        let res = path
            .parent()
            .map(fs::create_dir_all)
            .transpose()
            .and_then(|_| fs::write(&tmp, text))
            .and_then(|_| fs::rename(&tmp, path));
        res.map_err(|e| {
            ApiError::Refused(format!(
                "cannot store the unit at {}: {e}; check that the state directory is writable",
                path.display()
            ))
        })
    }

    /// Install a (new) definition. A running unit keeps running; the new definition is
    /// used from its next start.
    fn define(&mut self, unit: Unit) {
        if let Some(slot) = self.slots.get_mut(&unit.name) {
            slot.load_error = None;
        }
        self.insert_unit(unit);
    }

    /// Re-read the unit directories.
    pub fn reload(&mut self, restart_changed: bool) -> ReloadReport {
        let catalog = Catalog::load_dirs(&self.dirs());
        let mut report = ReloadReport::default();
        let mut broken: BTreeSet<String> = BTreeSet::new();
        for e in &catalog.errors {
            report.errors.push(e.to_string());
            if let Some(name) = &e.unit {
                broken.insert(name.clone());
                if let Some(slot) = self.slots.get_mut(name) {
                    slot.load_error = Some(e.to_string());
                    slot.log
                        .push(&self.cfg.logs, MANAGER_STREAM, &format!("reload: {e}"));
                }
            }
        }
        for (name, unit) in &catalog.units {
            match self.units.get(name) {
                None => report.added.push(name.clone()),
                Some(old) if old.source != unit.source || old.path != unit.path => {
                    report.changed.push(name.clone())
                }
                Some(_) => {}
            }
        }
        // Instances of templates are re-instantiated from the new template.
        let mut instances = Vec::new();
        for name in self.units.keys() {
            if catalog.units.contains_key(name) || broken.contains(name) {
                continue;
            }
            match catalog.resolve(name) {
                Some(Ok(u)) => instances.push(u),
                Some(Err(e)) => {
                    report.errors.push(e.to_string());
                    broken.insert(name.clone());
                }
                None => report.removed.push(name.clone()),
            }
        }
        for u in &instances {
            if self.units.get(&u.name).map(|o| &o.source) != Some(&u.source) {
                report.changed.push(u.name.clone());
            }
        }
        let mut catalog = catalog;
        for unit in std::mem::take(&mut catalog.units)
            .into_values()
            .chain(instances)
        {
            self.define(unit);
        }
        for name in &report.removed {
            self.remove(name);
        }
        // Keep only the templates: the units themselves live in `self.units`.
        self.catalog = Catalog {
            templates: catalog.templates,
            ..Catalog::default()
        };
        self.recompute_graph();
        if restart_changed {
            // Restart every running unit whose process was started from another definition,
            // including one installed by an earlier reload without a restart.
            let stale: Vec<String> = self
                .slots
                .iter()
                .filter(|(n, s)| {
                    s.main_pid.is_some()
                        && s.running_source != self.units.get(*n).map(|u| source_hash(&u.source))
                })
                .map(|(n, _)| n.clone())
                .collect();
            for name in stale {
                self.queue_stop(&name, Job::Restart);
                report.restarted.push(name);
            }
        }
        report
    }

    // ----- jobs -----

    /// Queue a start of `name` and everything it requires or wants.
    fn queue_start(&mut self, name: &str, manual: bool) {
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
                slot.restarts = 0;
                slot.backoff_step = 0;
                slot.start_times.clear();
            }
            match (slot.active, slot.job) {
                (Active::Inactive | Active::Failed, _) => {
                    slot.job = Some(Job::Start);
                    slot.outcome = Outcome::Success;
                    slot.message.clear();
                    slot.log.push(cfg, MANAGER_STREAM, "Start queued.");
                    Self::set_state(
                        &self.events,
                        n.as_str(),
                        slot,
                        Active::Activating,
                        Sub::Waiting,
                    );
                }
                (Active::Deactivating, _) | (_, Some(Job::Stop)) => slot.job = Some(Job::Restart),
                _ => {}
            }
        }
    }

    /// Queue a stop (or restart) of `name`; a stop also stops the units that require it.
    fn queue_stop(&mut self, name: &str, job: Job) {
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
                slot.job = Some(own_job);
            } else if own_job == Job::Restart {
                // Nothing runs, but an exited oneshot is still active: it is stopped first,
                // so that the start runs it again (as systemd does).
                if slot.active == Active::Active {
                    slot.log.push(&self.cfg.logs, MANAGER_STREAM, "Stopped.");
                    Self::set_state(&self.events, &n, slot, Active::Inactive, Sub::Dead);
                }
                self.queue_start(&n, true);
            } else if slot.active != Active::Inactive || slot.job.is_some() {
                slot.job = None;
                slot.deadline = None;
                let settled = if slot.active == Active::Failed {
                    (Active::Failed, Sub::Failed)
                } else {
                    (Active::Inactive, Sub::Dead)
                };
                slot.log.push(&self.cfg.logs, MANAGER_STREAM, "Stopped.");
                Self::set_state(&self.events, &n, slot, settled.0, settled.1);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(slot) = self.slots.get_mut(name) {
            slot.remove_when_stopped = true;
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
    fn force_stop(&mut self, now: Instant) {
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
            slot.log.push(
                &self.cfg.logs,
                MANAGER_STREAM,
                "Shutdown deadline passed; killing every process of the unit (SIGKILL).",
            );
            if let Some(scope) = &slot.scope {
                self.procs.signal_scope(&name, scope, Signal::SIGKILL);
            }
            if let Some(pid) = slot.main_pid {
                self.procs.signal_main(&name, pid, Signal::SIGKILL);
            }
            slot.job = Some(Job::Stop);
            slot.kill_at = Some(later(now, KILL_RETRY));
            slot.deadline = Some(now);
            Self::set_state(
                &self.events,
                &name,
                slot,
                Active::Deactivating,
                Sub::StopSigkill,
            );
        }
    }

    // ----- the state machine -----

    fn set_state(events: &Option<Sender<Event>>, name: &str, slot: &mut Slot, a: Active, s: Sub) {
        if slot.active == a && slot.sub == s {
            return;
        }
        slot.active = a;
        slot.sub = s;
        slot.since_us = crate::logs::now_us();
        if let Some(tx) = events {
            let _ = tx.send(Event::UnitStateChanged {
                name: name.to_string(),
                active_state: a.as_str().into(),
                sub_state: s.as_str().into(),
            });
        }
    }

    fn fail(&mut self, name: &str, outcome: Outcome, message: String) {
        let cfg = &self.cfg.logs;
        if let Some(slot) = self.slots.get_mut(name) {
            slot.job = None;
            slot.deadline = None;
            slot.outcome = outcome;
            slot.log.push(
                cfg,
                MANAGER_STREAM,
                &format!("Failed: {}: {message}", outcome.as_str()),
            );
            log::warn!("{name}: failed: {}: {message}", outcome.as_str());
            slot.message = message;
            Self::set_state(&self.events, name, slot, Active::Failed, Sub::Failed);
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
            .filter_map(|s| s.deadline)
            .chain(shutdown)
            .min()
    }

    fn step(&mut self, now: Instant) -> bool {
        let mut moved = false;
        let names: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.job.is_some() || s.deadline.is_some() || s.remove_when_stopped)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            moved |= self.step_unit(&name, now);
        }
        moved
    }

    fn step_unit(&mut self, name: &str, now: Instant) -> bool {
        let Some(slot) = self.slots.get(name) else {
            return false;
        };
        let due = slot.deadline.is_some_and(|d| d <= now);
        match (slot.active, slot.sub, slot.job) {
            (Active::Activating, Sub::Waiting, Some(Job::Start)) => self.try_start(name, now),
            (Active::Activating, Sub::AutoRestart, _) if due => {
                if let Some(s) = self.slots.get_mut(name) {
                    s.deadline = None;
                }
                if self.spawn(name, now) {
                    if let Some(s) = self.slots.get_mut(name) {
                        s.restarts = s.restarts.saturating_add(1);
                    }
                }
                true
            }
            (Active::Activating, Sub::AutoRestart, Some(Job::Stop | Job::Restart)) => {
                let restart = slot.job == Some(Job::Restart);
                if let Some(s) = self.slots.get_mut(name) {
                    s.deadline = None;
                    s.job = None;
                    Self::set_state(&self.events, name, s, Active::Inactive, Sub::Dead);
                }
                if restart {
                    self.queue_start(name, true);
                }
                true
            }
            (Active::Deactivating, _, _) => self.continue_stop(name, now),
            (_, _, Some(Job::Stop | Job::Restart)) if slot.main_pid.is_some() => {
                self.try_stop(name, now)
            }
            (Active::Active, Sub::Exited, Some(Job::Stop | Job::Restart)) => {
                let restart = slot.job == Some(Job::Restart);
                if let Some(s) = self.slots.get_mut(name) {
                    s.job = None;
                    Self::set_state(&self.events, name, s, Active::Inactive, Sub::Dead);
                }
                if restart {
                    self.queue_start(name, true);
                }
                true
            }
            _ if slot.remove_when_stopped && slot.is_down() && slot.job.is_none() => {
                self.slots.remove(name);
                self.units.remove(name);
                self.recompute_graph();
                true
            }
            _ => {
                // A leftover scope of a finished run: remove it once empty.
                if due && slot.main_pid.is_none() {
                    self.reap_scope(name, now);
                }
                false
            }
        }
    }

    /// A queued start whose ordering allows it now is spawned; returns true if it moved.
    fn try_start(&mut self, name: &str, now: Instant) -> bool {
        if let Some(cycle) = self.cycles.get(name) {
            let msg = format!("ordering cycle {cycle}; break it by removing one after/before");
            self.fail(name, Outcome::Cycle, msg);
            return true;
        }
        let Some(unit) = self.units.get(name) else {
            return false;
        };
        for dep in &unit.unit.requires {
            match self.slots.get(dep) {
                None => {
                    let msg = format!("requires {dep}, which does not exist");
                    self.fail(name, Outcome::Dependency, msg);
                    return true;
                }
                Some(d) if d.active == Active::Failed && d.job.is_none() => {
                    let msg = format!("required unit {dep} failed");
                    self.fail(name, Outcome::Dependency, msg);
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
                let waiting = matches!(ps.active, Active::Activating | Active::Deactivating)
                    || ps.job == Some(Job::Start);
                if waiting {
                    return false;
                }
                let oneshot = self
                    .units
                    .get(p)
                    .is_some_and(|u| u.service.kind == ServiceType::Oneshot);
                let required = unit.unit.requires.contains(p);
                if ps.active == Active::Failed && (required || oneshot) {
                    let msg = format!("{p}, which it is ordered after, failed");
                    self.fail(name, Outcome::Dependency, msg);
                    return true;
                }
            }
        }
        self.spawn(name, now);
        true
    }

    /// Start the unit's process now; returns true if it runs.
    fn spawn(&mut self, name: &str, now: Instant) -> bool {
        let Some(unit) = self.units.get(name).cloned() else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(name) else {
            return false;
        };
        let window = unit.service.start_limit_interval;
        while slot
            .start_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            slot.start_times.pop_front();
        }
        if slot.start_times.len() >= unit.service.start_limit_burst as usize {
            let msg = format!(
                "started {} times within {:?} (start_limit_burst); `unitctl start {name}` tries again",
                slot.start_times.len(),
                window
            );
            self.fail(name, Outcome::StartLimitHit, msg);
            return false;
        }
        slot.start_times.push_back(now);
        match self.launch(&unit) {
            Ok((pid, scope, pipes)) => {
                let Some(slot) = self.slots.get_mut(name) else {
                    return false;
                };
                slot.main_pid = Some(pid);
                slot.running_source = Some(source_hash(&unit.source));
                slot.control_api = unit.container.control_api;
                slot.scope = Some(scope);
                slot.started_at = Some(now);
                slot.exit_code = None;
                slot.exit_signal = None;
                slot.job = None;
                slot.deadline = None;
                slot.log.push(
                    &self.cfg.logs,
                    MANAGER_STREAM,
                    &format!("Started, main pid {}.", pid.as_raw()),
                );
                let sub = match unit.service.kind {
                    ServiceType::Simple => (Active::Active, Sub::Running),
                    ServiceType::Oneshot => (Active::Activating, Sub::Start),
                };
                Self::set_state(&self.events, name, slot, sub.0, sub.1);
                self.pids.insert(pid, name.to_string());
                for p in pipes {
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
                true
            }
            Err((outcome, msg)) => {
                self.fail(name, outcome, msg);
                false
            }
        }
    }

    fn launch(
        &mut self,
        unit: &Unit,
    ) -> Result<(Pid, crate::scope::Scope, Vec<Pipe>), (Outcome, String)> {
        if let Some(refusal) = self.exposed_control_socket(unit) {
            return Err((Outcome::Spawn, refusal));
        }
        let resources = |e: crate::scope::ScopeError| (Outcome::Resources, e.to_string());
        let mut scope = self.procs.prepare(&unit.name).map_err(resources)?;
        if let Err(e) = self.procs.apply(&unit.name, &scope, &Limits::of(unit)) {
            self.procs.remove(&unit.name, &scope);
            return Err(resources(e));
        }
        let spawn_err = |e: String| (Outcome::Spawn, e);
        let flags = OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let (out_r, out_w) =
            nix::unistd::pipe2(flags).map_err(|e| spawn_err(format!("pipe: {e}")))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(flags).map_err(|e| spawn_err(format!("pipe: {e}")))?;
        // The child's ends must block normally.
        for w in [&out_w, &err_w] {
            let _ = nix::fcntl::fcntl(w, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()));
        }
        let io = LaunchIo {
            stdout: out_w,
            stderr: err_w,
        };
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
        let pipe = |fd, stream| Pipe {
            fd,
            unit: unit.name.clone(),
            stream,
            buf: LineBuffer::default(),
        };
        Ok((
            pid,
            scope,
            vec![pipe(out_r, "stdout"), pipe(err_r, "stderr")],
        ))
    }

    /// A stop job whose ordering allows it sends SIGTERM; returns true if it moved.
    fn try_stop(&mut self, name: &str, now: Instant) -> bool {
        // Units ordered after this one and also stopping go first (never around a cycle).
        let blocked = self.stop_preds.iter().any(|(succ, preds)| {
            preds.contains(name)
                && self.slots.get(succ).is_some_and(|s| {
                    matches!(s.job, Some(Job::Stop | Job::Restart)) && !s.is_down()
                        || s.active == Active::Deactivating
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
            slot.main_pid,
            &slot.scope,
        ) {
            (true, Some(pid), _) => self.procs.signal_main(name, pid, Signal::SIGTERM),
            (_, _, Some(scope)) => self.procs.signal_scope(name, scope, Signal::SIGTERM),
            _ => {}
        }
        slot.kill_at = Some(later(now, timeout));
        slot.deadline = slot.kill_at;
        slot.log
            .push(&self.cfg.logs, MANAGER_STREAM, "Stopping (SIGTERM).");
        Self::set_state(
            &self.events,
            name,
            slot,
            Active::Deactivating,
            Sub::StopSigterm,
        );
        true
    }

    fn continue_stop(&mut self, name: &str, now: Instant) -> bool {
        let cfg = self.cfg.logs.clone();
        let timeout = self.units.get(name).map(|u| u.service.stop_timeout);
        let forced = self.forced_at.is_some();
        let Some(slot) = self.slots.get_mut(name) else {
            return false;
        };
        let procs = &mut self.procs;
        let empty = slot.scope.as_ref().is_none_or(|s| procs.is_empty(name, s));
        if slot.main_pid.is_none() && empty {
            if let Some(s) = slot.scope.take() {
                procs.remove(name, &s);
            }
            let killed = slot.sub == Sub::StopSigkill;
            slot.deadline = None;
            slot.kill_at = None;
            let restart = slot.job == Some(Job::Restart);
            slot.job = None;
            if killed && forced {
                slot.outcome = Outcome::Timeout;
                slot.message = "still running at the shutdown deadline; killed with SIGKILL".into();
            } else if killed {
                slot.outcome = Outcome::Timeout;
                slot.message = format!(
                    "did not stop within stop_timeout {:?} after SIGTERM; killed with SIGKILL",
                    timeout.unwrap_or_default()
                );
            } else {
                slot.outcome = Outcome::Success;
                slot.message.clear();
            }
            slot.log.push(&cfg, MANAGER_STREAM, "Stopped.");
            Self::set_state(&self.events, name, slot, Active::Inactive, Sub::Dead);
            if restart && !self.shutting_down {
                self.queue_start(name, true);
            }
            return true;
        }
        if slot.kill_at.is_some_and(|k| k <= now) {
            if slot.sub == Sub::StopSigterm {
                slot.log.push(
                    &cfg,
                    MANAGER_STREAM,
                    "stop_timeout passed; sending SIGKILL.",
                );
                Self::set_state(
                    &self.events,
                    name,
                    slot,
                    Active::Deactivating,
                    Sub::StopSigkill,
                );
            }
            if let Some(s) = &slot.scope {
                procs.signal_scope(name, s, Signal::SIGKILL);
            }
            slot.kill_at = Some(later(now, KILL_RETRY));
        }
        // Look again at the escalation time, or soon if only the scope's rest is left.
        slot.deadline = if slot.main_pid.is_none() {
            let poll = later(now, SCOPE_POLL);
            Some(slot.kill_at.map_or(poll, |k| k.min(poll)))
        } else {
            slot.kill_at
        };
        false
    }

    fn reap_scope(&mut self, name: &str, now: Instant) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        slot.deadline = None;
        let Some(scope) = &slot.scope else { return };
        if self.procs.is_empty(name, scope) {
            self.procs.remove(name, scope);
            slot.scope = None;
        } else {
            self.procs.signal_scope(name, scope, Signal::SIGKILL);
            slot.deadline = Some(later(now, SCOPE_POLL));
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
            log::debug!("reaped orphan {}", pid.as_raw());
            return;
        };
        let Some(unit) = self.units.get(&name).cloned() else {
            return;
        };
        let cfg = self.cfg.logs.clone();
        let shutting_down = self.shutting_down;
        let Some(slot) = self.slots.get_mut(&name) else {
            return;
        };
        slot.main_pid = None;
        slot.exit_code = code;
        slot.exit_signal = signal;
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
        let oom_kills = slot.scope.as_ref().map_or(0, |s| procs.oom_kills(&name, s));
        // Whatever the main process left behind goes with it (systemd's KillMode=control-group).
        if let Some(scope) = &slot.scope {
            procs.signal_scope(&name, scope, Signal::SIGKILL);
        }
        if slot.active == Active::Deactivating {
            slot.deadline = Some(now);
            return;
        }
        let success = code == Some(0);
        let ran_long = slot
            .started_at
            .is_some_and(|t| now.duration_since(t) > unit.service.restart_max_sec);
        if ran_long {
            slot.backoff_step = 0;
        }
        let stop_asked = matches!(slot.job, Some(Job::Stop)) || shutting_down;
        let restart = !stop_asked
            && match unit.service.restart {
                RestartPolicy::No => false,
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !success,
            };
        let (outcome, message) = match (code, signal) {
            (Some(0), _) => (Outcome::Success, String::new()),
            _ if oom_kills > 0 => (
                Outcome::OomKill,
                format!(
                    "the kernel's OOM killer ended {oom_kills} process(es) of the unit: it reached \
                     memory_max ({how})"
                ),
            ),
            (Some(c), _) => (
                Outcome::ExitCode,
                format!("main process exited with code {c}"),
            ),
            (_, _) => (Outcome::Signal, format!("main process killed by {how}")),
        };
        slot.outcome = outcome;
        slot.message = message;
        if slot.job == Some(Job::Restart) {
            slot.job = None;
            Self::set_state(&self.events, &name, slot, Active::Inactive, Sub::Dead);
            self.queue_start(&name, true);
        } else if restart {
            let base = unit.service.restart_sec;
            let factor = 1u32
                .checked_shl(slot.backoff_step.min(20))
                .unwrap_or(u32::MAX);
            let delay = base
                .checked_mul(factor)
                .unwrap_or(unit.service.restart_max_sec)
                .min(unit.service.restart_max_sec.max(base));
            slot.backoff_step = slot.backoff_step.saturating_add(1);
            slot.deadline = Some(later(now, delay));
            slot.log.push(
                &cfg,
                MANAGER_STREAM,
                &format!("Scheduled restart in {delay:?}."),
            );
            Self::set_state(
                &self.events,
                &name,
                slot,
                Active::Activating,
                Sub::AutoRestart,
            );
        } else if success {
            slot.job = None;
            slot.deadline = Some(now);
            let state = match unit.service.kind {
                ServiceType::Oneshot => (Active::Active, Sub::Exited),
                ServiceType::Simple => (Active::Inactive, Sub::Dead),
            };
            Self::set_state(&self.events, &name, slot, state.0, state.1);
        } else {
            slot.deadline = Some(now);
            let msg = slot.message.clone();
            self.fail(&name, outcome, msg);
            if let Some(s) = self.slots.get_mut(&name) {
                s.deadline = Some(now); // remove the leftover scope
            }
        }
    }

    // ----- output pipes -----

    /// Pipes opened since the last call: `(token, fd)` pairs to watch for input.
    pub fn take_new_pipes(&mut self) -> Vec<(usize, BorrowedFd<'_>)> {
        let idx = std::mem::take(&mut self.new_pipes);
        idx.into_iter()
            .filter_map(|i| {
                self.pipes
                    .get(i)
                    .and_then(|p| p.as_ref())
                    .map(|p| (i, p.fd.as_fd()))
            })
            .collect()
    }

    /// Read what pipe `token` has; closes it at end of file.
    pub fn on_output(&mut self, token: usize) {
        let mut chunk = [0u8; 16 * 1024];
        let Some(Some(pipe)) = self.pipes.get_mut(token) else {
            return;
        };
        let mut lines = Vec::new();
        let mut eof = false;
        loop {
            match nix::unistd::read(&pipe.fd, &mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => lines.extend(pipe.buf.feed(chunk.get(..n).unwrap_or_default())),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
            if lines.len() > 256 {
                break; // let other pipes have a turn; epoll reports this one again
            }
        }
        if eof {
            lines.extend(pipe.buf.finish());
        }
        let unit = pipe.unit.clone();
        let stream = pipe.stream;
        if eof {
            if let Some(p) = self.pipes.get_mut(token) {
                *p = None;
            }
        }
        let cfg = &self.cfg.logs;
        if let Some(slot) = self.slots.get_mut(&unit) {
            for l in lines {
                if let Some(err) = slot.log.push(cfg, stream, &l) {
                    log::error!("{err}");
                }
            }
        }
    }

    /// Remove the manager's cgroup tree (after shutdown).
    pub fn cleanup(&mut self) {
        for (name, slot) in self.slots.iter_mut() {
            if let Some(s) = slot.scope.take() {
                self.procs.remove(name, &s);
            }
        }
        self.procs.remove_root();
    }

    /// True when no start is pending: every unit queued to start has started, finished or
    /// failed (a unit waiting to be restarted counts as settled).
    pub fn settled(&self) -> bool {
        self.slots.values().all(|s| {
            s.job != Some(Job::Start)
                && !matches!(
                    (s.active, s.sub),
                    (Active::Activating, Sub::Waiting | Sub::Start)
                )
        })
    }

    /// Number of units in state `active`.
    pub fn active_count(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.active == Active::Active)
            .count()
    }

    /// Number of units known.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no unit is known.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}
