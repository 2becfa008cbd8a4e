//! The agent: what the cluster assigns to this machine runs in the local init.
//!
//! One [`Agent`] per machine. It keeps the machine present in the registry (a lease kept
//! alive every TTL/3, the machine record on it), reads the registry once ([`Registry::snapshot`])
//! and then follows it ([`Registry::watch`] from that revision + 1), and drives the local
//! `flotilla-init` ([`LocalInit`]: over its D-Bus API, [`InitApi`]) so that init runs
//! exactly the units this machine should run:
//!
//! - units assigned to this machine, and global units whose rules fit it
//!   ([`crate::scheduler::global_fits`]), each with desired state `loaded` (loaded into init,
//!   not started) or `launched` (started);
//! - units no longer wanted here (unassigned, removed, desired `inactive`) are stopped and
//!   removed from init; except a *hand-over* (below).
//!
//! Hand-over (a planned move): when a non-global unit this agent started is assigned to
//! another machine that is present in the registry (a drain's compare-and-swap re-assignment
//! A → B while A stays up), the local copy keeps running until the registry shows the unit's
//! state reported by the new machine as `active` on the unit's current body; only then is it
//! stopped and removed here, so the service is not down for the new copy's whole start
//! (image pull, container setup). It is stopped at once instead when the new machine's copy
//! `failed`, when the new machine leaves the registry, when the unit is unassigned, removed
//! or set to `inactive`/`loaded`, when the local copy is not running any more, when a unit
//! now wanted here `replaces` the moved one or conflicts with it (either way: the two may
//! not run side by side), and at the latest after [`HANDOVER_BOUND`]
//! ([`Agent::with_handover_bound`]; then with a warning).
//! A unit assigned to a machine that is *not* present (a machine loss, a typo) is stopped at
//! once: there is nothing to hand over to. For that moment the old and the new copy of one
//! unit run on two machines: fleet's `conflicts` are between different units, so this breaks
//! no placement rule, but a service that must never run twice (one writer of a shared volume)
//! must not rely on moves being exclusive. The old copy's reported state stays in the
//! registry until it is stopped (so a drain counts the machine as drained only once no moved
//! unit still runs there). All of this is decided from the registry alone (the watch carries
//! every machine's records and reported states) and re-derived after an agent restart: a
//! unit init runs that is assigned elsewhere is simply handed over again (its bound counts
//! from the restart). Nothing waits in the agent's loop: every registry event and the
//! bound's timer reconcile again.
//!
//! Unit names in init are the plain unit names. The text loaded into init starts with a
//! marker line, [`MARKER`] followed by the body hash: that is how the agent tells the units
//! it loaded from the units the host runs from its own unit directories (which it never
//! touches, even when a cluster unit has the same name), and which body each one runs. The
//! agent keeps no state of its own: after a restart (of fleetd or of init) it re-derives
//! what it loaded from init (`ListUnits`, `CatUnit`), and takes a unit that is already
//! running as started, so a restart never starts or stops anything twice.
//!
//! States: after every action, and on init's `UnitStateChanged` signals, the unit's
//! active/sub state and main pid are reported ([`Registry::report_state`]) on the machine's
//! lease.
//!
//! Images: the machine record carries the registry images init's stores hold
//! ([`Machine::images`], from init's `ListImages`), so that the scheduler can prefer a
//! machine that needs no pull. They are read when the agent (re-)registers, and again when
//! a unit it runs becomes active with a registry image the record does not list yet (its
//! pull just ended); the record is written again only when the list changed.
//!
//! When the registry is unreachable (keep-alive, watch or reads fail), nothing in init is
//! touched: running units keep running (fleet's issue 1289), the agent logs it once, retries
//! with a backoff (250 ms doubling up to 5 s or half the TTL), and once the registry answers it re-registers
//! (a new lease if the old one expired) and reconciles from a fresh snapshot.

mod init;
#[cfg(test)]
mod seam_tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_init_api::{ActiveState, SubState, SystemState, UnitInfo, Wire};
use flotilla_units::FleetSection;
use tokio::sync::mpsc;

pub use self::init::{InitApi, InitError, InitSignal, LocalInit};
use crate::error::RegistryError;
use crate::model::{DesiredState, LeaseId, Machine, UnitRecord, UnitState, MAX_PUBLISHED_IMAGES};
use crate::registry::{Change, Event, Registry, Watch};
use crate::scheduler::{global_fits, Candidate};

/// The default lease TTL of a machine's presence.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// The first line of every unit text the agent loads into init, followed by the body hash.
pub const MARKER: &str =
    "# flotilla-fleetd: loaded by the fleetd agent from the cluster registry; body ";

/// The first retry delay after a registry error; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// The longest retry delay after a registry error.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often failed init actions are retried.
const INIT_RETRY: Duration = Duration::from_secs(1);
/// The most registry events applied before one reconcile of init.
const MAX_BATCH: usize = 1024;
/// How long at most a moved unit's old copy keeps running while the new machine has not
/// reported its copy `active` (see the module documentation): a generous bound for an image
/// pull and a container start on a slow machine; after it the old copy is stopped anyway.
pub const HANDOVER_BOUND: Duration = Duration::from_secs(120);
/// The D-Bus error of a method the server does not have (an older init).
const UNKNOWN_METHOD: &str = "org.freedesktop.DBus.Error.UnknownMethod";

/// Why the agent could not run at all. Everything else (registry or init unreachable) is
/// retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No machine id was given and the local init refused to tell it.
    #[error("cannot get the machine id from the local init: {source}; pass the machine id explicitly (fleetd --machine-id ID)")]
    MachineId {
        /// Init's answer.
        #[source]
        source: InitError,
    },
    /// The thread that follows init's signals could not be started.
    #[error("cannot start the thread that follows the local init's unit states: {0} (out of threads or memory?)")]
    Thread(#[source] std::io::Error),
}

/// The text loaded into init for a body: the marker line, then the body.
pub fn marked_text(hash: &str, body: &str) -> String {
    format!("{MARKER}{hash}\n{body}")
}

/// The body hash of a unit text the agent loaded, `None` for any other text.
pub fn marked_hash(text: &str) -> Option<&str> {
    let first = text.lines().next()?;
    let hash = first.strip_prefix(MARKER)?.trim();
    (!hash.is_empty()).then_some(hash)
}

/// What the agent last did with a unit it loaded into init.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    /// The body hash loaded.
    hash: String,
    /// `Loaded` (loaded, not started) or `Launched` (started).
    desired: DesiredState,
}

/// A unit body as the agent needs it: the text and its placement rules.
#[derive(Debug, Clone)]
struct Body {
    text: String,
    /// `None` when the body does not parse (init will refuse it, and it is not global).
    fleet: Option<FleetSection>,
    /// The store name of its registry image, if it has one.
    image: Option<String>,
}

/// Whether store name `name` is a registry image (`host[:port]/repo:tag`, the host with a
/// `.` or a `:`, or `localhost`): only those are published.
fn is_registry_image(name: &str) -> bool {
    name.split_once('/').is_some_and(|(host, rest)| {
        (host.contains('.') || host.contains(':') || host == "localhost") && !rest.is_empty()
    })
}

/// What a machine record publishes of init's images: the registry images' store names,
/// sorted, without repeats, at most [`MAX_PUBLISHED_IMAGES`].
fn published_images(images: Vec<flotilla_init_api::ImageEntry>) -> Vec<String> {
    let names: BTreeSet<String> = images
        .into_iter()
        .map(|i| i.name)
        .filter(|n| is_registry_image(n))
        .collect();
    names.into_iter().take(MAX_PUBLISHED_IMAGES).collect()
}

/// The agent of one machine. See the module documentation.
pub struct Agent {
    registry: Arc<dyn Registry>,
    init: Arc<dyn LocalInit>,
    machine: Machine,
    ttl: Duration,
    lease_file: Option<PathBuf>,
    os_probe: Option<(crate::os::OsProbe, Duration)>,
    handover_bound: Duration,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("registry", &self.registry.describe())
            .field("init", &self.init)
            .field("machine", &self.machine)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Agent {
    /// An agent for `machine` (an empty `machine.id` means: ask the local init,
    /// `GetMachineId`), on `registry`, driving the local init `init` (an [`InitApi`]),
    /// present with a lease of `ttl` ([`DEFAULT_TTL`] is 5 s; at least 1 s).
    pub fn new(
        registry: Arc<dyn Registry>,
        init: impl LocalInit + 'static,
        machine: Machine,
        ttl: Duration,
    ) -> Agent {
        Agent {
            registry,
            init: Arc::new(init),
            machine,
            ttl: ttl.max(Duration::from_secs(1)),
            lease_file: None,
            os_probe: None,
            handover_bound: HANDOVER_BOUND,
        }
    }

    /// How long at most a moved unit's old copy keeps running while its new machine has not
    /// reported the new copy `active` ([`HANDOVER_BOUND`] unless set; tests shorten it).
    #[must_use]
    pub fn with_handover_bound(mut self, bound: Duration) -> Agent {
        self.handover_bound = bound;
        self
    }

    /// Publishes the host's OS version and A/B update state in the machine record
    /// ([`Machine::os_version`], [`Machine::os`]), read with `probe` at every registration
    /// and every `refresh` after ([`crate::os::REFRESH`]; at least 1 s), rewriting the
    /// record when they changed. Without it the record carries neither.
    #[must_use]
    pub fn with_os_probe(mut self, probe: crate::os::OsProbe, refresh: Duration) -> Agent {
        self.os_probe = Some((probe, refresh.max(Duration::from_secs(1))));
        self
    }

    /// Keeps the machine's lease id in `path` (`<machine id> <lease id>`), so that a
    /// restarted fleetd takes over the lease its previous run still holds instead of waiting
    /// for it to expire: the machine never vanishes from the registry, and the engine never
    /// moves its units. A lease recorded for another machine id is not reused.
    #[must_use]
    pub fn with_lease_file(mut self, path: impl Into<PathBuf>) -> Agent {
        self.lease_file = Some(path.into());
        self
    }

    /// Runs until `shutdown` completes. Returns an error only when it cannot run at all (no
    /// machine id); unreachable registries and inits are retried. On shutdown nothing is
    /// stopped and the lease is left to expire, so a restarted agent takes over the running
    /// units; unless the host itself is going down (init's `GetSystemState` is `stopping`):
    /// then the machine leaves the cluster at once (its lease revoked), so its units are
    /// rescheduled now, not a TTL later.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut machine = self.machine;
        if machine.id.is_empty() {
            let id = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                id = machine_id_from_init(self.init.as_ref()) => id?,
            };
            machine.id = id;
        }
        let (tx, mut signals) = mpsc::unbounded_channel();
        self.init.subscribe(tx).map_err(AgentError::Thread)?;
        let mut worker = Worker {
            registry: self.registry,
            init: self.init,
            machine,
            ttl: self.ttl,
            lease: None,
            lease_file: self.lease_file,
            os_probe: self.os_probe.as_ref().map(|(p, _)| p.clone()),
            os_error: None,
            os_init_unknown: false,
            units: BTreeMap::new(),
            assignments: BTreeMap::new(),
            bodies: HashMap::new(),
            owned: BTreeMap::new(),
            adopted: None,
            reported: BTreeMap::new(),
            warned: BTreeSet::new(),
            init_dirty: false,
            machines: BTreeSet::new(),
            remote: BTreeMap::new(),
            handovers: BTreeMap::new(),
            handover_bound: self.handover_bound,
            rollout: None,
            os_asked: None,
        };
        log::info!(
            "fleetd agent for machine {} on {}, init at {}",
            worker.machine.id,
            worker.registry.describe(),
            worker.init.describe()
        );
        let mut backoff = MIN_BACKOFF;
        let mut degraded = false;
        loop {
            let established = tokio::select! {
                _ = &mut shutdown => {
                    worker.on_shutdown().await;
                    return Ok(());
                }
                r = worker.establish() => r,
            };
            let mut watch = match established {
                Ok(watch) => watch,
                Err(e) => {
                    if !degraded {
                        log::warn!(
                            "registry unreachable or refusing ({e}); keeping the {} units this agent runs as they are, retrying",
                            worker.owned.len()
                        );
                    } else {
                        log::debug!("registry still unavailable: {e}");
                    }
                    degraded = true;
                    tokio::select! {
                            _ = &mut shutdown => {
                        worker.on_shutdown().await;
                        return Ok(());
                    }
                            _ = tokio::time::sleep(backoff) => {}
                        }
                    // Never slower than half a TTL: after an outage the engine waits for
                    // re-registering machines for two TTLs only.
                    backoff = (backoff * 2).min(MAX_BACKOFF).min(worker.ttl / 2);
                    continue;
                }
            };
            if degraded {
                log::info!(
                    "registry {} reachable again: machine {} registered, units reconciled",
                    worker.registry.describe(),
                    worker.machine.id
                );
            }
            backoff = MIN_BACKOFF;
            let period = (worker.ttl / 3).max(Duration::from_millis(100));
            let mut keepalive =
                tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            let mut retry = tokio::time::interval(INIT_RETRY);
            let refresh = self
                .os_probe
                .as_ref()
                .map_or(crate::os::REFRESH, |(_, r)| *r);
            let mut next_os = tokio::time::Instant::now() + worker.os_refresh_period(refresh);
            let failure: RegistryError = loop {
                let handover_due = worker.handover_deadline();
                let step = tokio::select! {
                    _ = &mut shutdown => {
                    worker.on_shutdown().await;
                    return Ok(());
                }
                    _ = keepalive.tick() => worker.keep_alive().await,
                    event = watch.next() => match event {
                        Some(Ok(event)) => worker.on_events(event, &mut watch).await,
                        Some(Err(e)) => Err(e),
                        None => Err(RegistryError::WatchEnded { reason: "the watch stream closed".into() }),
                    },
                    Some(signal) = signals.recv() => worker.on_signal(signal).await,
                    _ = retry.tick(), if worker.init_dirty => worker.reconcile().await,
                    _ = tokio::time::sleep_until(next_os), if worker.os_probe.is_some() => {
                        let refreshed = worker.refresh_os().await;
                        next_os = tokio::time::Instant::now() + worker.os_refresh_period(refresh);
                        refreshed
                    }
                    _ = sleep_until(handover_due), if handover_due.is_some() => worker.reconcile().await,
                };
                if let Err(e) = step {
                    break e;
                }
            };
            log::warn!(
                "registry error ({failure}); keeping the {} units this agent runs as they are, reconnecting",
                worker.owned.len()
            );
            degraded = true;
        }
    }
}

/// Asks init for the machine id, waiting while init is unreachable.
async fn machine_id_from_init(init: &dyn LocalInit) -> Result<String, AgentError> {
    let mut delay = MIN_BACKOFF;
    loop {
        match init.machine_id().await {
            Ok(id) => return Ok(id),
            Err(e) if e.manager_error_name().is_some() => {
                return Err(AgentError::MachineId { source: e })
            }
            Err(e) => {
                log::warn!("waiting for the local init to tell the machine id: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Sleeps until `deadline` (forever without one; the caller's guard keeps it unpolled).
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whether init's state for a unit means it was started (and not stopped since): it runs,
/// starts, waits to restart, or failed after a start. A state this agent does not know (a
/// newer init's) is not taken as started.
fn is_started(info: &UnitInfo) -> bool {
    matches!(
        info.active_state.known(),
        Some(ActiveState::Active | ActiveState::Activating | ActiveState::Failed)
    ) || info.sub_state == SubState::AutoRestart
}

/// The state of a unit as reported: (active, sub, pid, hash).
type Reported = (
    Wire<ActiveState>,
    Wire<SubState>,
    Option<u32>,
    Option<String>,
);

/// A reported state of another machine, as far as a hand-over needs it: (active, hash).
type Remote = (Wire<ActiveState>, Option<String>);

/// A hand-over in progress: a unit this agent runs, now assigned to another machine.
#[derive(Debug, Clone)]
struct Handover {
    /// The machine the unit is assigned to now.
    to: String,
    /// When this agent first saw it (its bound counts from here).
    since: tokio::time::Instant,
    /// Decided: the local copy is being stopped (a failed stop is retried, never waited
    /// for again).
    stopping: bool,
}

/// What a hand-over of a unit comes to, given the registry's view. Pure, so the policy reads
/// in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HandoverStep {
    /// The old copy keeps running.
    Wait,
    /// Stop the old copy now, for this reason (logged).
    Stop(String),
    /// Stop the old copy now: the new copy did not become active within the bound.
    Overdue(String),
}

/// The facts a hand-over decision is taken on.
#[derive(Debug)]
struct HandoverFacts<'a> {
    /// The unit's record is launched (not removed, inactive or loaded).
    launched: bool,
    /// The unit is global (never moved: it runs wherever it fits).
    global: bool,
    /// The local copy was started by this agent and has not been seen to end.
    runs_here: bool,
    /// A unit that runs here now and may not run beside this one (`conflicts` either way,
    /// or it `replaces` this one: the reason it was moved away), if any.
    clash: Option<&'a str>,
    /// The machine the unit is assigned to now (another one).
    to: &'a str,
    /// Whether that machine is present in the registry.
    present: bool,
    /// The state that machine reports for the unit, if any.
    state: Option<&'a Remote>,
    /// The unit's current body hash.
    hash: &'a str,
    /// How long this hand-over has waited, and the bound.
    waited: Duration,
    bound: Duration,
}

/// The hand-over policy (see the module documentation): the first row that matches decides.
fn handover_step(f: &HandoverFacts<'_>) -> HandoverStep {
    let stop = HandoverStep::Stop;
    let to = f.to;
    if !f.launched {
        return stop("its desired state is not launched".into());
    }
    if f.global {
        return stop("it is a global unit".into());
    }
    if !f.runs_here {
        return stop(format!("it moved to {to} and its copy here does not run"));
    }
    if let Some(other) = f.clash {
        return stop(format!(
            "it moved to {to}, and unit {other} that runs here conflicts with it or replaces it"
        ));
    }
    if !f.present {
        return stop(format!(
            "it moved to machine {to}, which is not present in the registry"
        ));
    }
    if let Some((active, hash)) = f.state {
        let current = hash.as_deref().is_none_or(|h| h == f.hash);
        match active.known() {
            Some(ActiveState::Active) if current => {
                return stop(format!("its new copy on {to} is active (hand-over done)"));
            }
            Some(ActiveState::Failed) => {
                return stop(format!("its new copy on {to} failed"));
            }
            _ => {}
        }
    }
    if f.waited >= f.bound {
        return HandoverStep::Overdue(format!(
            "its new copy on {to} did not become active within {:?}",
            f.bound
        ));
    }
    HandoverStep::Wait
}

/// The agent's working state while it runs.
struct Worker {
    registry: Arc<dyn Registry>,
    init: Arc<dyn LocalInit>,
    machine: Machine,
    ttl: Duration,
    /// The machine's lease, once granted (kept across registry outages while it lives).
    lease: Option<LeaseId>,
    /// Where the lease id is kept across restarts ([`Agent::with_lease_file`]).
    lease_file: Option<PathBuf>,
    /// Reads the host's OS version and update state ([`Agent::with_os_probe`]).
    os_probe: Option<crate::os::OsProbe>,
    /// The probe's last failure, logged once.
    os_error: Option<String>,
    /// The local init answered `GetOsStatus` with `UnknownMethod`: the probe reads the ESP.
    os_init_unknown: bool,
    /// The registry's units, by name (from the snapshot, then the watch).
    units: BTreeMap<String, UnitRecord>,
    /// Unit → machine.
    assignments: BTreeMap<String, String>,
    /// Bodies by hash, for the units above.
    bodies: HashMap<String, Body>,
    /// The units this agent loaded into init.
    owned: BTreeMap<String, Applied>,
    /// The init connection generation `owned` was derived at.
    adopted: Option<u64>,
    /// What was last reported per unit on the current lease.
    reported: BTreeMap<String, Reported>,
    /// Units already warned about (host name clash, invalid body), so logs do not repeat.
    warned: BTreeSet<String>,
    /// Some init action failed: retry the reconcile.
    init_dirty: bool,
    /// The ids of the machines present in the registry (from the snapshot, then the watch).
    machines: BTreeSet<String>,
    /// The states other machines report, by (unit, machine): what hand-overs wait on.
    remote: BTreeMap<(String, String), Remote>,
    /// Units handed over to another machine whose local copy still runs.
    handovers: BTreeMap<String, Handover>,
    /// [`Agent::with_handover_bound`].
    handover_bound: Duration,
    /// The rollout record as last seen, and the rollout (started_at, reference) whose
    /// update this agent asked its init for: once per rollout (see [`Worker::os_update`]).
    rollout: Option<crate::model::Rollout>,
    os_asked: Option<(u64, String)>,
}

impl Worker {
    /// At shutdown: when init says the host is going down, revoke the machine's lease (its
    /// record and states go with it, and the engine moves its units at once) and forget it
    /// in the lease file. A fleetd stopped alone (restarted, upgraded) keeps the lease for
    /// its next run. Bounded by one TTL; failures are logged.
    async fn on_shutdown(&mut self) {
        let Some(lease) = self.lease else { return };
        let state = tokio::time::timeout(self.ttl, self.init.system_state()).await;
        match state {
            Ok(Ok(state)) if state == SystemState::Stopping => {}
            Ok(Ok(_)) => return,
            Ok(Err(e)) => {
                log::info!(
                    "cannot ask init whether the host is going down ({e}); keeping the lease"
                );
                return;
            }
            Err(_) => {
                log::info!("init did not say whether the host is going down; keeping the lease");
                return;
            }
        }
        log::info!(
            "the host is shutting down: machine {} leaves the cluster (lease {lease} revoked), its units move now",
            self.machine.id
        );
        match tokio::time::timeout(self.ttl, self.registry.revoke_lease(lease)).await {
            Ok(Ok(())) => {
                self.lease = None;
                if let Some(path) = &self.lease_file {
                    let _ = std::fs::remove_file(path);
                }
            }
            Ok(Err(e)) => log::warn!(
                "cannot revoke lease {lease}: {e}; it expires in {:?}",
                self.ttl
            ),
            Err(_) => log::warn!(
                "revoking lease {lease} timed out; it expires in {:?}",
                self.ttl
            ),
        }
    }

    /// The lease recorded by a previous run for this machine id, if any.
    fn saved_lease(&self) -> Option<LeaseId> {
        let text = std::fs::read_to_string(self.lease_file.as_ref()?).ok()?;
        let (id, lease) = text.trim().split_once(' ')?;
        (id == self.machine.id).then_some(())?;
        lease.parse().ok().map(LeaseId)
    }

    /// Records `lease` for the next run (best effort: without it a restart waits for the
    /// old lease to expire).
    fn save_lease(&self, lease: LeaseId) {
        let Some(path) = &self.lease_file else {
            return;
        };
        let tmp = path.with_extension("tmp");
        let text = format!("{} {}\n", self.machine.id, lease.0);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            log::warn!("cannot record the lease in {}: {e}", path.display());
        }
    }

    /// Presence (lease, machine record), a fresh snapshot, a watch from it, a reconcile.
    async fn establish(&mut self) -> Result<Watch, RegistryError> {
        if let Some(lease) = self.lease {
            match self.registry.keep_alive(lease).await {
                Ok(()) => {}
                Err(RegistryError::LeaseExpired { .. }) => self.lease = None,
                Err(e) => return Err(e),
            }
        }
        if self.lease.is_none() {
            // A previous run's lease, if it still lives: take it over.
            if let Some(saved) = self.saved_lease() {
                match self.registry.keep_alive(saved).await {
                    Ok(()) => {
                        log::info!("taking over lease {saved} of the previous run");
                        self.lease = Some(saved);
                    }
                    Err(RegistryError::LeaseExpired { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let lease = match self.lease {
            Some(lease) => lease,
            None => {
                let lease = self.registry.grant_lease(self.ttl).await?;
                self.lease = Some(lease);
                self.save_lease(lease);
                // Every state reported on the old lease is gone with it.
                self.reported.clear();
                lease
            }
        };
        if let Some(images) = self.held_images().await {
            self.machine.images = images;
        }
        self.probe_os().await;
        // A previous run's lease may still hold the id (MachineIdTaken): the caller retries
        // with a backoff until it expires.
        self.registry.register_machine(&self.machine, lease).await?;
        let snapshot = self.registry.snapshot().await?;
        let watch = self.registry.watch(snapshot.revision + 1).await?;
        self.units = snapshot
            .units
            .into_iter()
            .map(|u| (u.name.clone(), u))
            .collect();
        self.assignments = snapshot
            .assignments
            .into_iter()
            .map(|a| (a.unit, a.machine))
            .collect();
        self.machines = snapshot.machines.into_iter().map(|m| m.id).collect();
        self.remote = snapshot
            .states
            .iter()
            .filter(|s| s.machine != self.machine.id)
            .map(|s| {
                (
                    (s.unit.clone(), s.machine.clone()),
                    (s.active.clone(), s.hash.clone()),
                )
            })
            .collect();
        // Report every unit afresh: states may have vanished with a lease, or gone stale.
        self.reported.clear();
        self.reconcile().await?;
        self.rollout = self.registry.get_rollout().await?;
        self.os_update().await;
        // States of this machine for units it no longer runs (e.g. left by a previous run).
        for state in snapshot.states.iter() {
            if state.machine == self.machine.id && !self.owned.contains_key(&state.unit) {
                self.registry
                    .remove_state(&state.unit, &self.machine.id)
                    .await?;
            }
        }
        Ok(watch)
    }

    /// Reads the host's OS version and update state into the machine record; returns
    /// whether they changed.
    async fn probe_os(&mut self) -> bool {
        let Some(probe) = self.os_probe.clone() else {
            return false;
        };
        let report = match self.os_from_init(&probe).await {
            Some(Ok(report)) => report,
            Some(Err(e)) => {
                // Init did not answer (or not sensibly): what was published stays.
                if self.os_error.as_ref() != Some(&e) {
                    log::warn!("{e}");
                    self.os_error = Some(e);
                }
                return false;
            }
            // File reads and, without a given ESP, a mount: off the async threads.
            None => match tokio::task::spawn_blocking(move || probe.probe()).await {
                Ok(report) => report,
                Err(e) => {
                    log::warn!("reading the host's OS state failed: {e}");
                    return false;
                }
            },
        };
        // Each failure once, not at every refresh.
        if report.error != self.os_error {
            if let Some(e) = &report.error {
                log::warn!("{e}");
            }
            self.os_error = report.error;
        }
        let (version, os) = (report.version, report.os);
        if version == self.machine.os_version && os == self.machine.os {
            return false;
        }
        log::info!(
            "host OS version {:?}, update state {}",
            version,
            os.as_ref()
                .map_or("none (not booted from an A/B slot)", |o| o
                    .update_state()
                    .as_str())
        );
        self.machine.os_version = version;
        self.machine.os = os;
        true
    }

    /// Asks init to update the host when the rollout says this machine's step is
    /// `updating` ([`crate::rollout::should_update`]), once per rollout: not again after
    /// the reboot (the machine is then at the new version, or its A/B state shows the
    /// update), nor after a success in this run. A failure is logged and tried again at
    /// the next rollout change or OS refresh.
    async fn os_update(&mut self) {
        let Some(rollout) = self.rollout.as_ref() else {
            return;
        };
        let key = (rollout.started_at, rollout.reference.clone());
        if self.os_asked.as_ref() == Some(&key)
            || !crate::rollout::should_update(rollout, &self.machine)
        {
            return;
        }
        log::info!(
            "rollout: updating this host to {} from {}",
            rollout.version,
            rollout.reference
        );
        match self.init.update_os(&rollout.reference, false).await {
            Ok(()) => self.os_asked = Some(key),
            Err(e) => log::warn!(
                "rollout: init refused or failed the update from {}: {e}; asking again at the next change",
                rollout.reference
            ),
        }
    }

    /// The host's OS state as the local init tells it (`GetOsStatus`), when the probe has
    /// no ESP of its own; `None`: read it with the probe (an ESP given, or an init too old
    /// to know the method: `UnknownMethod`, remembered).
    async fn os_from_init(
        &mut self,
        probe: &crate::os::OsProbe,
    ) -> Option<Result<crate::os::OsReport, String>> {
        if probe.esp.is_some() || self.os_init_unknown {
            return None;
        }
        match self.init.os_status().await {
            Ok(json) => {
                let local = probe.clone();
                Some(crate::os::report_from_init(&json, move || local.version()))
            }
            Err(e) if e.manager_error_name() == Some(UNKNOWN_METHOD) => {
                log::info!(
                    "the local init does not answer GetOsStatus (an older init): reading the ESP instead"
                );
                self.os_init_unknown = true;
                None
            }
            Err(e) => Some(Err(format!(
                "cannot read the host's A/B update state from init: {e}"
            ))),
        }
    }

    /// How long until the next OS probe: `refresh`, or at most [`crate::os::TRIAL_REFRESH`]
    /// while the host runs a slot on trial (its commit is what a rollout waits for).
    fn os_refresh_period(&self, refresh: Duration) -> Duration {
        let on_trial = self
            .machine
            .os
            .as_ref()
            .is_some_and(|o| o.update_state() == crate::model::UpdateState::Trial);
        if on_trial {
            refresh.min(crate::os::TRIAL_REFRESH)
        } else {
            refresh
        }
    }

    /// Writes the machine record again if the host's OS state changed.
    async fn refresh_os(&mut self) -> Result<(), RegistryError> {
        self.os_update().await;
        if !self.probe_os().await {
            return Ok(());
        }
        match self.lease {
            Some(lease) => self.registry.register_machine(&self.machine, lease).await,
            None => Ok(()),
        }
    }

    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        match self.lease {
            Some(lease) => self.registry.keep_alive(lease).await,
            None => Err(RegistryError::LeaseExpired { lease: LeaseId(0) }),
        }
    }

    /// Applies `first` and the events that have already arrived after it (at most
    /// [`MAX_BATCH`]), then reconciles once if any of them asks for it: a burst of changes
    /// (units submitted by the hundred) costs one reconcile, not one per event.
    async fn on_events(&mut self, first: Event, watch: &mut Watch) -> Result<(), RegistryError> {
        let mut dirty = self.note(first).await?;
        for _ in 0..MAX_BATCH {
            match watch.try_next() {
                Some(Ok(event)) => dirty |= self.note(event).await?,
                // The caller reconnects, and reconciles from a fresh snapshot.
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        if dirty {
            self.reconcile().await?;
        }
        Ok(())
    }

    /// Applies one event to the agent's view; returns whether init must be reconciled.
    async fn note(&mut self, event: Event) -> Result<bool, RegistryError> {
        match event.change {
            Change::UnitPut(unit) => {
                self.units.insert(unit.name.clone(), unit);
            }
            Change::UnitRemoved { name } => {
                self.units.remove(&name);
                self.assignments.remove(&name);
            }
            Change::Assigned(a) => {
                self.assignments.insert(a.unit, a.machine);
            }
            Change::Unassigned { unit } => {
                self.assignments.remove(&unit);
            }
            Change::MachineRemoved { id } if id == self.machine.id => {
                // Our lease is gone: register again on a new one.
                return Err(RegistryError::LeaseExpired {
                    lease: self.lease.unwrap_or(LeaseId(0)),
                });
            }
            Change::MachinePut(m) if m.id == self.machine.id => return Ok(false),
            Change::RolloutPut(rollout) => {
                self.rollout = Some(*rollout);
                self.os_update().await;
                return Ok(false);
            }
            Change::StateRemoved { unit, machine } if machine == self.machine.id => {
                self.reported.remove(&unit);
                if self.owned.contains_key(&unit) {
                    self.report(&unit).await?;
                }
                return Ok(false);
            }
            // Other machines' presence and states: what hand-overs wait on.
            Change::MachinePut(m) => {
                self.machines.insert(m.id);
                return Ok(false);
            }
            Change::MachineRemoved { id } => {
                self.remote.retain(|(_, machine), _| *machine != id);
                let waited_on = self.handovers.values().any(|h| h.to == id);
                self.machines.remove(&id);
                return Ok(waited_on);
            }
            Change::StatePut(state) if state.machine != self.machine.id => {
                let waited_on = self.waits_on(&state.unit, &state.machine);
                self.remote
                    .insert((state.unit, state.machine), (state.active, state.hash));
                return Ok(waited_on);
            }
            Change::StateRemoved { unit, machine } => {
                self.remote.remove(&(unit, machine));
                return Ok(false);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    async fn on_signal(&mut self, signal: InitSignal) -> Result<(), RegistryError> {
        match signal {
            InitSignal::Changed(name) => {
                if self.owned.contains_key(&name) {
                    self.report(&name).await?;
                }
                // A handed-over copy that ended here needs no more waiting.
                if self.handovers.get(&name).is_some_and(|h| !h.stopping) {
                    return self.reconcile().await;
                }
                Ok(())
            }
            InitSignal::Subscribed => {
                // Init may have restarted: re-read what it runs, and report every state
                // afresh (signals may have been missed while unsubscribed).
                self.adopted = None;
                self.reported.clear();
                self.reconcile().await
            }
        }
    }

    /// Re-derives the units this agent loaded from init itself (their marker line).
    async fn adopt(&mut self) -> Result<(), InitError> {
        let generation = self.init.generation();
        let units = self.init.list_units().await?;
        let mut owned = BTreeMap::new();
        for info in &units {
            // One bad entry must not stop the agent from reconciling the others.
            if let Err(reason) = flotilla_units::check_name(&info.name) {
                log::warn!(
                    "the local init lists a unit with an invalid name {:?} ({reason}); skipping it",
                    info.name
                );
                continue;
            }
            let text = match self.init.cat_unit(&info.name).await {
                Ok(t) => t,
                Err(e) if e.manager_error_name().is_some() => continue,
                Err(e) => return Err(e),
            };
            if let Some(hash) = marked_hash(&text) {
                let desired = if is_started(info) {
                    DesiredState::Launched
                } else {
                    DesiredState::Loaded
                };
                owned.insert(
                    info.name.clone(),
                    Applied {
                        hash: hash.to_string(),
                        desired,
                    },
                );
            }
        }
        if self.adopted.is_none() && !owned.is_empty() {
            log::info!(
                "adopted {} units init already runs for this agent: {}",
                owned.len(),
                owned.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        self.owned = owned;
        // Any call above may have reconnected; then read again next time.
        self.adopted = Some(generation.max(self.init.generation()));
        Ok(())
    }

    /// The body for `hash`, fetched once. `None` if the registry has no such body.
    async fn body(&mut self, hash: &str) -> Result<Option<Body>, RegistryError> {
        if let Some(b) = self.bodies.get(hash) {
            return Ok(Some(b.clone()));
        }
        let Some(text) = self.registry.get_body(hash).await? else {
            return Ok(None);
        };
        let parsed = flotilla_units::parse_unit("fleet-unit", None, &text).ok();
        let image = parsed.as_ref().and_then(|u| u.container.store_name());
        let fleet = parsed.map(|u| u.fleet);
        let body = Body { text, fleet, image };
        self.bodies.insert(hash.to_string(), body.clone());
        Ok(Some(body))
    }

    /// The units this machine should run, with their bodies.
    async fn wanted(&mut self) -> Result<BTreeMap<String, (UnitRecord, Body)>, RegistryError> {
        let records: Vec<UnitRecord> = self
            .units
            .values()
            .filter(|u| u.desired != DesiredState::Inactive)
            .cloned()
            .collect();
        let mut wanted = BTreeMap::new();
        let mut running: Vec<Candidate> = Vec::new();
        let mut globals = Vec::new();
        for record in records {
            let Some(body) = self.body(&record.hash).await? else {
                log::warn!(
                    "unit {} refers to body {}, which the registry does not have; skipping it",
                    record.name,
                    record.hash
                );
                continue;
            };
            let assigned_here = self.assignments.get(&record.name) == Some(&self.machine.id);
            let global = body.fleet.as_ref().is_some_and(|f| f.global);
            if assigned_here {
                running.push(Candidate {
                    name: record.name.clone(),
                    fleet: body.fleet.clone().unwrap_or_default(),
                    image: body.image.clone(),
                });
                wanted.insert(record.name.clone(), (record, body));
            } else if global {
                globals.push((record, body));
            }
        }
        for (record, body) in globals {
            let candidate = Candidate {
                name: record.name.clone(),
                fleet: body.fleet.clone().unwrap_or_default(),
                image: body.image.clone(),
            };
            let others: Vec<&Candidate> = running.iter().collect();
            match global_fits(&candidate, &self.machine, &others) {
                Ok(()) => {
                    running.push(candidate);
                    wanted.insert(record.name.clone(), (record, body));
                }
                Err(why) => log::debug!("global unit {} does not run here: {why}", record.name),
            }
        }
        let hashes: BTreeSet<&str> = self.units.values().map(|u| u.hash.as_str()).collect();
        self.bodies.retain(|h, _| hashes.contains(h.as_str()));
        Ok(wanted)
    }

    /// Makes init run what this machine should run. Registry errors end it (the caller
    /// reconnects); init errors are logged and retried later.
    async fn reconcile(&mut self) -> Result<(), RegistryError> {
        self.init_dirty = false;
        if self.adopted != Some(self.init.generation()) {
            if let Err(e) = self.adopt().await {
                log::warn!("cannot read the units of the local init, retrying: {e}");
                self.init_dirty = true;
                return Ok(());
            }
        }
        let wanted = self.wanted().await?;
        let gone: Vec<String> = self
            .owned
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        // Hand-overs end when the unit is wanted here again or no longer runs here.
        self.handovers
            .retain(|n, _| !wanted.contains_key(n) && self.owned.contains_key(n));
        for name in gone {
            if self.hands_over(&name, &wanted).await? {
                // Its state stays reported until it stops (e.g. on a new lease).
                if !self.reported.contains_key(&name) {
                    self.report(&name).await?;
                }
                continue;
            }
            match self.init.remove_unit(&name).await {
                Ok(()) => {}
                Err(e) if e.is_no_such_unit() => {}
                Err(e) => {
                    log::warn!("cannot remove unit {name} from the local init: {e}");
                    self.init_dirty = true;
                    continue;
                }
            }
            log::info!("unit {name} no longer runs on this machine: stopped and removed");
            self.owned.remove(&name);
            self.reported.remove(&name);
            self.registry.remove_state(&name, &self.machine.id).await?;
        }
        for (name, (record, body)) in wanted {
            let before = self.owned.get(&name).cloned();
            if let Err(e) = self.apply(&record, &body).await {
                log::warn!("unit {name}: {e}");
                self.init_dirty = true;
                continue;
            }
            // Report what this reconcile changed and what is not reported on this lease
            // yet; init's signals report every later change. (Asking init for every unit
            // here made each registry event cost one call per unit this machine runs.)
            let changed = self.owned.get(&name) != before.as_ref();
            if self.owned.contains_key(&name) && (changed || !self.reported.contains_key(&name)) {
                self.report(&name).await?;
            }
        }
        Ok(())
    }

    /// Whether the hand-over of `unit` to `machine` waits on that machine's state.
    fn waits_on(&self, unit: &str, machine: &str) -> bool {
        self.handovers
            .get(unit)
            .is_some_and(|h| !h.stopping && h.to == machine)
    }

    /// When the earliest waiting hand-over reaches its bound, if any waits.
    fn handover_deadline(&self) -> Option<tokio::time::Instant> {
        self.handovers
            .values()
            .filter(|h| !h.stopping)
            // A bound too far to represent never ends a hand-over by time.
            .filter_map(|h| h.since.checked_add(self.handover_bound))
            .min()
    }

    /// Whether owned unit `name`, no longer wanted here, keeps running for a hand-over to
    /// the machine it is assigned to now (see the module documentation); `false` means:
    /// stop it now. Starts, follows and ends the hand-over record.
    async fn hands_over(
        &mut self,
        name: &str,
        wanted: &BTreeMap<String, (UnitRecord, Body)>,
    ) -> Result<bool, RegistryError> {
        if self.handovers.get(name).is_some_and(|h| h.stopping) {
            return Ok(false);
        }
        let Some(applied) = self.owned.get(name).cloned() else {
            return Ok(false);
        };
        let record = self.units.get(name).cloned();
        let to = self
            .assignments
            .get(name)
            .filter(|m| **m != self.machine.id)
            .cloned();
        // Removed units, and units that never ran here, need no decision nor log.
        let (Some(record), Some(to)) = (record, to) else {
            return Ok(false);
        };
        if applied.desired != DesiredState::Launched {
            return Ok(false);
        }
        let fleet = match self.body(&record.hash).await? {
            Some(body) => body.fleet.unwrap_or_default(),
            None => FleetSection::default(),
        };
        let clash = wanted
            .iter()
            .find(|(other, (_, body))| {
                let rules = body.fleet.as_ref();
                rules.is_some_and(|r| r.replaces.iter().any(|n| n == name))
                    || crate::scheduler::conflicts_between(name, &fleet, other, rules)
            })
            .map(|(other, _)| other.clone());
        // The local copy runs unless the last report here says it ended.
        let runs_here = self.reported.get(name).is_none_or(|r| {
            !matches!(
                r.0.known(),
                Some(ActiveState::Inactive | ActiveState::Failed)
            )
        });
        let now = tokio::time::Instant::now();
        let since = match self.handovers.get(name) {
            Some(h) => h.since,
            None => now,
        };
        let key = (name.to_string(), to.clone());
        let step = handover_step(&HandoverFacts {
            launched: record.desired == DesiredState::Launched,
            global: fleet.global,
            runs_here,
            clash: clash.as_deref(),
            to: &to,
            present: self.machines.contains(&to),
            state: self.remote.get(&key),
            hash: &record.hash,
            waited: now.saturating_duration_since(since),
            bound: self.handover_bound,
        });
        let (why, overdue) = match step {
            HandoverStep::Wait => {
                if !self.handovers.contains_key(name) {
                    log::info!(
                        "unit {name} moved to machine {to}: keeping its copy here running until the copy there is active (at most {:?})",
                        self.handover_bound
                    );
                }
                self.handovers.insert(
                    name.to_string(),
                    Handover {
                        to,
                        since,
                        stopping: false,
                    },
                );
                return Ok(true);
            }
            HandoverStep::Stop(why) => (why, false),
            HandoverStep::Overdue(why) => (why, true),
        };
        if overdue {
            log::warn!("unit {name}: stopping its copy here anyway: {why}");
        } else {
            log::info!("unit {name}: stopping its copy here: {why}");
        }
        self.handovers.insert(
            name.to_string(),
            Handover {
                to,
                since,
                stopping: true,
            },
        );
        Ok(false)
    }

    /// Loads, starts, restarts or stops one wanted unit as its record says.
    async fn apply(&mut self, record: &UnitRecord, body: &Body) -> Result<(), InitError> {
        let name = record.name.as_str();
        let previous = self.owned.get(name).cloned();
        let mut applied = match &previous {
            Some(p) if p.hash == record.hash => p.clone(),
            _ => {
                if previous.is_none() && self.held_by_host(name).await? {
                    return Ok(());
                }
                match self
                    .init
                    .load_unit(name, &marked_text(&record.hash, &body.text))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.is_invalid_unit() => {
                        if self.warned.insert(format!("{name} {}", record.hash)) {
                            log::error!("unit {name}: the local init refuses its body: {e}");
                        }
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
                log::info!("unit {name}: loaded body {}", record.hash);
                let applied = Applied {
                    hash: record.hash.clone(),
                    desired: previous
                        .as_ref()
                        .map_or(DesiredState::Loaded, |p| p.desired),
                };
                self.owned.insert(name.to_string(), applied.clone());
                applied
            }
        };
        let body_changed = previous.is_some_and(|p| p.hash != record.hash);
        match record.desired {
            DesiredState::Launched if applied.desired != DesiredState::Launched => {
                self.init.start_unit(name).await?;
                log::info!("unit {name}: started");
            }
            DesiredState::Launched if body_changed => {
                self.init.restart_unit(name).await?;
                log::info!("unit {name}: restarted on its new body");
            }
            DesiredState::Loaded if applied.desired == DesiredState::Launched => {
                self.init.stop_unit(name).await?;
                log::info!("unit {name}: stopped (desired loaded)");
            }
            _ => {}
        }
        applied.desired = record.desired;
        self.owned.insert(name.to_string(), applied);
        Ok(())
    }

    /// Whether init has a unit `name` that this agent did not load (a host unit): then the
    /// cluster unit is not run here, and the host unit is left alone.
    async fn held_by_host(&mut self, name: &str) -> Result<bool, InitError> {
        let text = match self.init.cat_unit(name).await {
            Ok(text) => text,
            Err(e) if e.is_no_such_unit() => return Ok(false),
            Err(e) => return Err(e),
        };
        if marked_hash(&text).is_some() {
            return Ok(false);
        }
        if self.warned.insert(name.to_string()) {
            log::warn!(
                "unit {name} is assigned to this machine, but the host runs a unit of that name from its own unit directory: leaving the host's unit alone, not running the cluster's"
            );
        }
        Ok(true)
    }

    /// Reports the state init has for an owned unit, if it changed since the last report.
    async fn report(&mut self, name: &str) -> Result<(), RegistryError> {
        let (Some(lease), Some(applied)) = (self.lease, self.owned.get(name)) else {
            return Ok(());
        };
        let hash = Some(applied.hash.clone());
        let info = match self.init.get_unit(name).await {
            Ok(info) => info,
            Err(e) => {
                log::debug!("cannot read the state of {name} from init: {e}");
                self.init_dirty = true;
                return Ok(());
            }
        };
        let pid = (info.main_pid != 0).then_some(info.main_pid);
        let now: Reported = (info.active_state, info.sub_state, pid, hash);
        if self.reported.get(name) == Some(&now) {
            return Ok(());
        }
        let state = UnitState {
            unit: name.to_string(),
            machine: self.machine.id.clone(),
            hash: now.3.clone(),
            active: now.0.clone(),
            sub: now.1.clone(),
            pid: now.2,
            updated_at: now_ms(),
        };
        self.registry.report_state(&state, lease).await?;
        let active = state.active == ActiveState::Active;
        self.reported.insert(name.to_string(), now);
        // A unit that became active may have just pulled its image.
        let image = self
            .units
            .get(name)
            .and_then(|u| self.bodies.get(&u.hash))
            .and_then(|b| b.image.as_ref());
        if active && image.is_some_and(|i| !self.machine.images.contains(i)) {
            self.publish_images(lease).await?;
        }
        Ok(())
    }

    /// The registry images init's stores hold, as the machine record publishes them; `None`
    /// when init cannot tell (unreachable, or an older init without `ListImages`).
    async fn held_images(&self) -> Option<Vec<String>> {
        match self.init.list_images().await {
            Ok(images) => Some(published_images(images)),
            Err(e) => {
                log::debug!("cannot list the images of the local init: {e}");
                None
            }
        }
    }

    /// Writes the machine record again (on `lease`) if the images init holds changed.
    async fn publish_images(&mut self, lease: LeaseId) -> Result<(), RegistryError> {
        let Some(images) = self.held_images().await else {
            return Ok(());
        };
        if images == self.machine.images {
            return Ok(());
        }
        log::info!(
            "machine {} holds {} registry image(s) now; publishing them",
            self.machine.id,
            images.len()
        );
        self.machine.images = images;
        self.registry.register_machine(&self.machine, lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips() {
        let text = marked_text("abc", "[container]\ncommand = [\"true\"]\n");
        assert_eq!(marked_hash(&text), Some("abc"));
        assert_eq!(marked_hash("[container]\ncommand = [\"true\"]\n"), None);
        assert_eq!(marked_hash(""), None);
        assert_eq!(marked_hash(MARKER), None);
    }
}
