//! The unit manager: one owner of all unit state, driven by the event loop.
//!
//! Every input arrives as a method call from [`crate::event_loop`]: API requests, child
//! exits, pipe output, and the passage of time ([`Manager::tick`]). The manager never blocks
//! and never panics; anything that goes wrong becomes a unit state with a result and a
//! message, and a line in the unit's log.

mod jobs;
mod load;
mod machine;
mod output;
mod processes;
mod pull;
mod requests;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use flotilla_units::{Catalog, Unit};
use nix::unistd::Pid;

use crate::api::Event;
use crate::launcher::Launcher;
use crate::logs::LogConfig;
use crate::scope::ScopeRoot;
use output::Pipe;
pub use processes::{ProcessControl, SystemProcesses};
pub use pull::{HelperPuller, ListImagesError, PullSpawnError, Puller};
pub use state::{ActiveState, Events, Job, Run, Slot, SubState, UnitResult};

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
    /// How registry images are pulled before a start; `None`: never (a missing image fails
    /// the start).
    puller: Option<Box<dyn Puller>>,
    /// Where the exits of children that are not units' (init's OS update helper) go.
    exit_watch: Option<crate::os_update::ExitWatch>,
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
            puller: None,
            exit_watch: None,
        };
        let report = m.reload(false);
        for e in &report.errors {
            log::error!("{e}");
        }
        m
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

    /// Pull units' registry images with `puller` before their start (see `[container]
    /// pull`); without one no image is ever pulled.
    pub fn set_puller(&mut self, puller: Box<dyn Puller>) {
        self.puller = Some(puller);
    }

    /// Hand the exits of children that belong to no unit to `watch` (init's OS update job
    /// waits there for its helper); without one they are reaped as orphans.
    pub fn set_exit_watch(&mut self, watch: crate::os_update::ExitWatch) {
        self.exit_watch = Some(watch);
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

    /// Queue a start of every loaded unit (what happens at boot).
    pub fn start_all(&mut self) {
        let names: Vec<String> = self.units.keys().cloned().collect();
        for n in names {
            self.queue_start(&n, true);
        }
    }

    /// Remove the manager's cgroup tree (after shutdown).
    pub fn cleanup(&mut self) {
        for (name, slot) in self.slots.iter_mut() {
            if let Some(s) = slot.scope_removed() {
                self.procs.remove(name, &s);
            }
        }
        self.procs.remove_root();
    }

    /// True when no start is pending: every unit queued to start has started, finished or
    /// failed (a unit waiting to be restarted counts as settled).
    pub fn settled(&self) -> bool {
        self.slots.values().all(|s| {
            s.job() != Some(Job::Start)
                && !matches!(
                    (s.active(), s.sub()),
                    (
                        ActiveState::Activating,
                        SubState::Waiting | SubState::Pull | SubState::Start
                    )
                )
        })
    }

    /// Number of units in state `active`.
    pub fn active_count(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.active() == ActiveState::Active)
            .count()
    }

    /// The units' health, for a slot on trial ([`crate::trial`]): settled, the first unit
    /// that is failed or waiting to be restarted, and the restarts done so far.
    pub fn health(&self) -> crate::trial::Health {
        let failing = self
            .slots
            .iter()
            .find_map(|(name, s)| match (s.active(), s.sub()) {
                (ActiveState::Failed, _) => Some(format!("unit {name} failed")),
                (_, SubState::AutoRestart) => Some(format!("unit {name} is waiting to restart")),
                _ => None,
            });
        crate::trial::Health {
            settled: self.settled(),
            failing,
            restarts: self.slots.values().map(|s| u64::from(s.restarts())).sum(),
        }
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
