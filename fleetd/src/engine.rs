//! The engine: fleet's leader-elected scheduler.
//!
//! Every fleetd runs an [`Engine`]; exactly one of them leads at a time (a lease-based
//! election over [`Registry::campaign`]). The leader reads one [`Snapshot`], watches every
//! change after it, keeps an in-memory model of units, machines and assignments up to date
//! from the watch, and after each burst of relevant changes runs the pure
//! [`scheduler::schedule`] and writes its decisions with compare-and-swap
//! ([`Registry::assign`], [`Registry::unassign`]). It never reads the whole registry on a
//! timer: only at the start of a leadership and after a watch error.
//!
//! Units that fit no machine are kept, with the reason, in an in-memory map that
//! [`EngineStatus::unschedulable`] exposes (the API reads it through a cloned
//! [`EngineStatus`]). Only the leader's map is filled; followers' maps are empty.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch as signal;
use tokio::time::Instant;

use crate::error::RegistryError;
use crate::model::{DesiredState, LeaseId, Machine, UnitRecord};
use crate::registry::{Campaign, Cas, Change, Event, Registry, Snapshot};
use crate::scheduler::{self, Candidate, Decision};
use flotilla_units::FleetSection;

/// The default lease TTL of the engine's leadership (as fleet's and the machine presence's).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// The default debounce window: the changes of one burst within it give one scheduling pass.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// The first delay before retrying after a registry error; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// The longest delay between retries after registry errors.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why the engine stopped for good (it retries everything else).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The registry refused the engine's configuration (an invalid machine id or lease TTL):
    /// retrying cannot help.
    #[error("the engine of machine {machine:?} cannot run: {source}")]
    Config {
        /// The engine's machine id.
        machine: String,
        /// What the registry said.
        #[source]
        source: RegistryError,
    },
}

/// What the engine shows to the rest of fleetd (the API): whether it leads and which units
/// fit no machine, with why. Cheap to clone; all clones see the same state.
#[derive(Clone, Debug, Default)]
pub struct EngineStatus {
    inner: Arc<Mutex<StatusInner>>,
}

#[derive(Debug, Default)]
struct StatusInner {
    leader: Option<(LeaseId, u64)>,
    unschedulable: BTreeMap<String, String>,
    /// Units that stay on a draining machine: unit → (machine, why).
    staying: BTreeMap<String, (String, String)>,
}

impl EngineStatus {
    fn lock(&self) -> MutexGuard<'_, StatusInner> {
        // The state is plain data, always consistent: a panic elsewhere cannot corrupt it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this engine leads (schedules) now.
    pub fn is_leader(&self) -> bool {
        self.lock().leader.is_some()
    }

    /// The term (fencing token, see [`crate::Leader::term`]) of this engine's leadership, if
    /// it leads.
    pub fn term(&self) -> Option<u64> {
        self.lock().leader.map(|(_, term)| term)
    }

    /// The units the last scheduling pass could not place, with the reason (unit name →
    /// reason, e.g. `no machine fits (a: conflicts with web@1; ...)`, or a unit file error).
    /// Empty unless this engine leads.
    pub fn unschedulable(&self) -> BTreeMap<String, String> {
        self.lock().unschedulable.clone()
    }

    /// The lease this engine leads on, if it leads (the rollout runner writes the rollout
    /// record with it, so a deposed leader cannot).
    pub fn lease(&self) -> Option<LeaseId> {
        self.lock().leader.map(|(lease, _)| lease)
    }

    /// The units the last pass left on a draining machine because no other machine fits
    /// them: unit → (machine, why). Empty unless this engine leads.
    pub fn staying(&self) -> BTreeMap<String, (String, String)> {
        self.lock().staying.clone()
    }

    /// Why `unit` could not be placed, if the last pass could not place it.
    pub fn reason(&self, unit: &str) -> Option<String> {
        self.lock().unschedulable.get(unit).cloned()
    }

    fn set_leader(&self, leader: Option<(LeaseId, u64)>) {
        let mut inner = self.lock();
        inner.leader = leader;
        if leader.is_none() {
            inner.unschedulable.clear();
            inner.staying.clear();
        }
    }

    fn set_unschedulable(
        &self,
        reasons: BTreeMap<String, String>,
        staying: BTreeMap<String, (String, String)>,
    ) {
        let mut inner = self.lock();
        inner.unschedulable = reasons;
        inner.staying = staying;
    }
}

/// fleet's engine: campaigns for the leadership and, while it leads, schedules the cluster's
/// units onto its machines. See the [module docs](self).
pub struct Engine {
    registry: Arc<dyn Registry>,
    machine_id: String,
    lease_ttl: Duration,
    debounce: Duration,
    status: EngineStatus,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("registry", &self.registry.describe())
            .field("machine_id", &self.machine_id)
            .field("lease_ttl", &self.lease_ttl)
            .field("debounce", &self.debounce)
            .finish()
    }
}

/// How a leadership or a wait for one ended.
enum Ended {
    /// The lease is gone (expired, revoked, or the registry stopped answering): get a new one.
    LeaseLost,
    /// The leader key changed (resigned, taken over): campaign again on the same lease.
    LeaderChanged,
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Clears the leadership in an [`EngineStatus`] when dropped.
struct ResetOnDrop(EngineStatus);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        self.0.set_leader(None);
    }
}

/// Parsed `[fleet]` sections with the store name of the unit's registry image (or why not)
/// by (unit name, body hash).
type Parsed = BTreeMap<(String, String), Result<(FleetSection, Option<String>), String>>;

/// The engine's in-memory model of the registry, kept current from the watch.
#[derive(Default)]
struct Model {
    units: BTreeMap<String, UnitRecord>,
    machines: BTreeMap<String, Machine>,
    assignments: BTreeMap<String, String>,
    /// Parsed `[fleet]` sections by (unit name, body hash): a body never changes under its
    /// hash, but specifiers (`%n`, `%i`) make its meaning depend on the unit's name.
    parsed: Parsed,
    /// Until then (two TTLs after the engine's lease was granted), units of a machine that
    /// is missing are held where they are: a term often starts after a registry outage,
    /// when etcd expires at once every lease whose keep-alive had not arrived, and those
    /// machines are only re-registering. An outage longer than a third of the TTL also costs
    /// the engine its own lease (its keep-alive times out), so a lease kept alive for two
    /// TTLs means no outage that expired leases: then a missing machine is really gone and
    /// its units move at once, also right after the leader's own machine was lost.
    grace_until: Option<Instant>,
    /// The last pass held units (a pass is due when the grace ends).
    held: bool,
    /// The machines a running rollout is draining (see [`crate::rollout::draining`]).
    draining: std::collections::BTreeSet<String>,
}

impl Model {
    fn from_snapshot(snapshot: Snapshot, parsed: Parsed) -> Model {
        Model {
            units: snapshot
                .units
                .into_iter()
                .map(|u| (u.name.clone(), u))
                .collect(),
            machines: snapshot
                .machines
                .into_iter()
                .map(|m| (m.id.clone(), m))
                .collect(),
            assignments: snapshot
                .assignments
                .into_iter()
                .map(|a| (a.unit, a.machine))
                .collect(),
            parsed,
            grace_until: None,
            held: false,
            draining: std::collections::BTreeSet::new(),
        }
    }

    /// Applies one change; returns whether it matters for scheduling.
    fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::UnitPut(unit) => {
                let old = self.units.insert(unit.name.clone(), unit.clone());
                old.as_ref() != Some(unit)
            }
            Change::UnitRemoved { name } => {
                self.assignments.remove(name);
                self.units.remove(name).is_some()
            }
            Change::MachinePut(machine) => {
                let old = self.machines.insert(machine.id.clone(), machine.clone());
                old.as_ref() != Some(machine)
            }
            Change::MachineRemoved { id } => self.machines.remove(id).is_some(),
            Change::Assigned(a) => {
                self.assignments.insert(a.unit.clone(), a.machine.clone())
                    != Some(a.machine.clone())
            }
            Change::Unassigned { unit } => self.assignments.remove(unit).is_some(),
            Change::BodyPut { hash } => {
                // A body that was missing is back: parse it again.
                let before = self.parsed.len();
                self.parsed.retain(|(_, h), p| h != hash || p.is_ok());
                self.parsed.len() != before
            }
            Change::BodyRemoved { .. }
            | Change::StatePut(_)
            | Change::StateRemoved { .. }
            | Change::LeaderPut(_)
            | Change::LeaderRemoved => false,
            Change::RolloutPut(rollout) => {
                let draining = crate::rollout::draining(Some(rollout));
                let changed = draining != self.draining;
                self.draining = draining;
                changed
            }
        }
    }
}

/// Whether an error means the engine cannot run at all (rather than "retry later").
fn is_permanent(e: &RegistryError) -> bool {
    matches!(
        e,
        RegistryError::InvalidName { .. }
            | RegistryError::InvalidTtl { .. }
            | RegistryError::Config(_)
    )
}

impl Engine {
    /// An engine for machine `machine_id` on `registry`, campaigning with leases of
    /// `lease_ttl` ([`DEFAULT_LEASE_TTL`] is fleet's default), kept alive every `lease_ttl / 3`.
    pub fn new(
        registry: Arc<dyn Registry>,
        machine_id: impl Into<String>,
        lease_ttl: Duration,
    ) -> Engine {
        Engine {
            registry,
            machine_id: machine_id.into(),
            lease_ttl,
            debounce: DEFAULT_DEBOUNCE,
            status: EngineStatus::default(),
        }
    }

    /// Sets the debounce window ([`DEFAULT_DEBOUNCE`]): a scheduling pass runs this long
    /// after the first relevant change of a burst, once for the whole burst.
    pub fn with_debounce(mut self, debounce: Duration) -> Engine {
        self.debounce = debounce;
        self
    }

    /// A handle on the engine's state (leadership, unschedulable units) that stays valid
    /// while and after the engine runs.
    pub fn status(&self) -> EngineStatus {
        self.status.clone()
    }

    /// The units the last scheduling pass could not place, with why (see
    /// [`EngineStatus::unschedulable`]).
    pub fn unschedulable(&self) -> BTreeMap<String, String> {
        self.status.unschedulable()
    }

    /// Runs the engine until `shutdown` completes: campaigns, schedules while leading, and
    /// campaigns again after losing the leadership or its lease. Registry errors are logged
    /// and retried. On shutdown it resigns and revokes its lease, so another engine takes
    /// over at once. Dropping the future instead leaves the lease to expire (after its TTL).
    ///
    /// Fails only if the registry rejects the engine's configuration (machine id, TTL).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), EngineError> {
        // If this future is dropped mid-run, the status must not claim a leadership.
        let _reset = ResetOnDrop(self.status.clone());
        let current: Arc<Mutex<Option<LeaseId>>> = Arc::default();
        let result = tokio::select! {
            r = self.main_loop(current.clone()) => r,
            () = shutdown => Ok(()),
        };
        let lease = *current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lease) = lease {
            if self.status.is_leader() {
                log::info!(
                    "engine {}: shutting down, resigning the leadership",
                    self.machine_id
                );
            }
            if let Err(e) = self.registry.resign(&self.machine_id, lease).await {
                log::warn!("engine {}: resign failed: {e}", self.machine_id);
            }
            if let Err(e) = self.registry.revoke_lease(lease).await {
                log::warn!(
                    "engine {}: revoking lease {lease} failed: {e}",
                    self.machine_id
                );
            }
        }
        self.status.set_leader(None);
        result
    }

    fn config_error(&self, source: RegistryError) -> EngineError {
        EngineError::Config {
            machine: self.machine_id.clone(),
            source,
        }
    }

    /// Grants leases and campaigns on them, forever.
    async fn main_loop(&self, current: Arc<Mutex<Option<LeaseId>>>) -> Result<(), EngineError> {
        let mut backoff = MIN_BACKOFF;
        loop {
            let lease = match self.registry.grant_lease(self.lease_ttl).await {
                Ok(lease) => lease,
                Err(e) if is_permanent(&e) => return Err(self.config_error(e)),
                Err(e) => {
                    log::warn!(
                        "engine {}: cannot get a lease from {}: {e}; retrying in {backoff:?}",
                        self.machine_id,
                        self.registry.describe()
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let granted = Instant::now();
            backoff = MIN_BACKOFF;
            *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
            let (lost_tx, lost_rx) = signal::channel(false);
            let _keeper = AbortOnDrop(
                tokio::spawn(keep_alive(
                    self.registry.clone(),
                    lease,
                    self.lease_ttl / 3,
                    self.machine_id.clone(),
                    lost_tx,
                ))
                .abort_handle(),
            );
            self.on_lease(lease, granted, lost_rx).await?;
            // The lease is lost (or unusable): make sure it is gone before starting over, so
            // that a leader key on it does not linger until its TTL if the registry answers.
            if let Err(e) = self.registry.revoke_lease(lease).await {
                log::debug!(
                    "engine {}: revoking lost lease {lease}: {e}",
                    self.machine_id
                );
            }
            *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Campaigns on `lease` (granted at `granted`) until it is lost: leads when it wins,
    /// waits for the leader to go when it loses.
    async fn on_lease(
        &self,
        lease: LeaseId,
        granted: Instant,
        mut lost: signal::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let mut backoff = MIN_BACKOFF;
        loop {
            if *lost.borrow() {
                return Ok(());
            }
            // Watch before campaigning, so that a leader that goes right after we lost is seen.
            let mut watch = match self.registry.watch(0).await {
                Ok(w) => w,
                Err(e) => {
                    log::warn!("engine {}: cannot watch the registry: {e}", self.machine_id);
                    if sleep_or_lost(backoff, &mut lost).await {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let ended = match self.registry.campaign(&self.machine_id, lease).await {
                Ok(Campaign::Won(leader)) => {
                    backoff = MIN_BACKOFF;
                    drop(watch);
                    log::info!(
                        "engine {}: became the leader (term {}, lease {lease})",
                        self.machine_id,
                        leader.term
                    );
                    self.status.set_leader(Some((lease, leader.term)));
                    let ended = self.lead(lease, granted, &mut lost).await;
                    self.status.set_leader(None);
                    log::info!(
                        "engine {}: no longer the leader ({})",
                        self.machine_id,
                        match ended {
                            Ended::LeaseLost => "its lease was lost",
                            Ended::LeaderChanged => "the leader key changed",
                        }
                    );
                    ended
                }
                Ok(Campaign::Lost(leader)) => {
                    backoff = MIN_BACKOFF;
                    log::info!(
                        "engine {}: {} leads (term {}); following",
                        self.machine_id,
                        leader.id,
                        leader.term
                    );
                    // Wait for the leadership to end (resigned, its lease revoked or expired).
                    loop {
                        tokio::select! {
                            () = until_lost(&mut lost) => break Ended::LeaseLost,
                            event = watch.next() => match event {
                                Some(Ok(Event { change: Change::LeaderRemoved, .. })) => {
                                    log::info!(
                                        "engine {}: leader {} is gone; campaigning",
                                        self.machine_id,
                                        leader.id
                                    );
                                    break Ended::LeaderChanged;
                                }
                                Some(Ok(_)) => {}
                                Some(Err(e)) => {
                                    log::warn!("engine {}: watch failed: {e}", self.machine_id);
                                    break Ended::LeaderChanged;
                                }
                                None => break Ended::LeaderChanged,
                            }
                        }
                    }
                }
                Err(e) if is_permanent(&e) => return Err(self.config_error(e)),
                Err(RegistryError::LeaseExpired { .. }) => Ended::LeaseLost,
                Err(e) => {
                    log::warn!("engine {}: campaign failed: {e}", self.machine_id);
                    if sleep_or_lost(backoff, &mut lost).await {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if let Ended::LeaseLost = ended {
                return Ok(());
            }
        }
    }

    /// Schedules while leading on `lease`; returns when the leadership ends.
    async fn lead(
        &self,
        lease: LeaseId,
        granted: Instant,
        lost: &mut signal::Receiver<bool>,
    ) -> Ended {
        let mut backoff = MIN_BACKOFF;
        let mut parsed = BTreeMap::new();
        // The reasons last published in the registry for every fleetd's API (None: not yet
        // this term).
        let mut published: Option<BTreeMap<String, String>> = None;
        // See `Model::grace_until`: counted from the lease, not from the term.
        let grace_until = granted + self.lease_ttl * 2;
        loop {
            if *lost.borrow() {
                return Ended::LeaseLost;
            }
            let snapshot = match self.registry.snapshot().await {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("engine {}: cannot read the registry: {e}", self.machine_id);
                    if sleep_or_lost(backoff, lost).await {
                        return Ended::LeaseLost;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if !snapshot
                .leader
                .as_ref()
                .is_some_and(|l| l.id == self.machine_id && l.lease == lease)
            {
                return Ended::LeaderChanged;
            }
            let from = snapshot.revision + 1;
            let mut watch = match self.registry.watch(from).await {
                Ok(w) => w,
                Err(e) => {
                    log::warn!("engine {}: cannot watch the registry: {e}", self.machine_id);
                    if sleep_or_lost(backoff, lost).await {
                        return Ended::LeaseLost;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let mut model = Model::from_snapshot(snapshot, std::mem::take(&mut parsed));
            model.grace_until = Some(grace_until);
            // Read after the snapshot: a write in between is also on the watch.
            match self.registry.get_rollout().await {
                Ok(rollout) => model.draining = crate::rollout::draining(rollout.as_ref()),
                Err(e) => {
                    log::warn!("engine {}: cannot read the rollout: {e}", self.machine_id);
                    if sleep_or_lost(backoff, lost).await {
                        return Ended::LeaseLost;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
            // The first pass runs at once; later ones after a debounce.
            let mut due: Option<Instant> = Some(Instant::now());
            let resnapshot = loop {
                let wake = due.unwrap_or_else(Instant::now);
                tokio::select! {
                    biased;
                    () = until_lost(lost) => return Ended::LeaseLost,
                    event = watch.next() => match event {
                        Some(Ok(event)) => {
                            match &event.change {
                                Change::LeaderRemoved => return Ended::LeaderChanged,
                                Change::LeaderPut(l) if l.id != self.machine_id || l.lease != lease => {
                                    return Ended::LeaderChanged
                                }
                                change => {
                                    if model.apply(change) {
                                        // A pass soon (a pending one at the end of the
                                        // grace period is brought forward).
                                        let soon = Instant::now() + self.debounce;
                                        due = Some(due.map_or(soon, |d| d.min(soon)));
                                    }
                                }
                            }
                        }
                        Some(Err(e)) => {
                            log::info!(
                                "engine {}: watch ended ({e}); reading the registry again",
                                self.machine_id
                            );
                            break false;
                        }
                        None => break false,
                    },
                    () = tokio::time::sleep_until(wake), if due.is_some() => {
                        due = None;
                        let result = self.pass(&mut model).await;
                        if result.is_ok() {
                            match self.publish_reasons(lease, &mut published).await {
                                Ok(true) => {}
                                Ok(false) => return Ended::LeaderChanged,
                                // Retried after the next pass, which comes soon.
                                Err(()) => due = Some(Instant::now() + MIN_BACKOFF),
                            }
                        }
                        match result {
                            Ok(true) => {
                                // Someone else changed an assignment: its change is on the
                                // watch; schedule again after it.
                                due = Some(Instant::now() + self.debounce);
                            }
                            Ok(false) => {
                                backoff = MIN_BACKOFF;
                                if model.held {
                                    due = model.grace_until;
                                }
                            }
                            Err(e) => {
                                log::warn!(
                                    "engine {}: scheduling pass failed: {e}; retrying",
                                    self.machine_id
                                );
                                break true;
                            }
                        }
                    }
                }
            };
            parsed = model.parsed;
            if resnapshot && sleep_or_lost(backoff, lost).await {
                return Ended::LeaseLost;
            }
            if resnapshot {
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Publishes the last pass's unschedulable reasons in the registry when they differ from
    /// `published` (what this term published last), so that every fleetd's API shows them.
    /// `Ok(false)`: the registry says this lease no longer leads; `Err`: not written (logged).
    async fn publish_reasons(
        &self,
        lease: LeaseId,
        published: &mut Option<BTreeMap<String, String>>,
    ) -> Result<bool, ()> {
        let reasons = self.status.unschedulable();
        if published.as_ref() == Some(&reasons) {
            return Ok(true);
        }
        match self.registry.put_reasons(&reasons, lease).await {
            Ok(true) => {
                *published = Some(reasons);
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                log::warn!(
                    "engine {}: cannot publish the unschedulable reasons: {e}",
                    self.machine_id
                );
                Err(())
            }
        }
    }

    /// One scheduling pass over the model; writes the decisions. Returns whether a
    /// compare-and-swap found the registry changed by someone else.
    async fn pass(&self, model: &mut Model) -> Result<bool, RegistryError> {
        // Parse the bodies not parsed yet; forget those no unit uses any more.
        let wanted: Vec<&UnitRecord> = model
            .units
            .values()
            .filter(|u| matches!(u.desired, DesiredState::Launched | DesiredState::Loaded))
            .collect();
        // Each body fetched once per pass, however many new units share it.
        let mut bodies: BTreeMap<String, Option<String>> = BTreeMap::new();
        for unit in &wanted {
            let key = (unit.name.clone(), unit.hash.clone());
            if model.parsed.contains_key(&key) {
                continue;
            }
            if !bodies.contains_key(&unit.hash) {
                let body = self.registry.get_body(&unit.hash).await?;
                bodies.insert(unit.hash.clone(), body);
            }
            let parsed = match bodies.get(&unit.hash).and_then(Option::as_ref) {
                Some(body) => flotilla_units::parse_unit(&unit.name, None, body)
                    .map(|u| (u.fleet, u.container.store_name()))
                    .map_err(|e| format!("the unit file does not parse: {e}")),
                None => Err(format!("its body {} is not in the registry", unit.hash)),
            };
            model.parsed.insert(key, parsed);
        }
        let in_use: std::collections::BTreeSet<(&str, &str)> = model
            .units
            .values()
            .map(|u| (u.name.as_str(), u.hash.as_str()))
            .collect();
        let mut parsed = std::mem::take(&mut model.parsed);
        parsed.retain(|(name, hash), _| in_use.contains(&(name.as_str(), hash.as_str())));

        let mut reasons = BTreeMap::new();
        let mut units = Vec::new();
        let mut globals = Vec::new();
        for unit in wanted {
            match parsed.get(&(unit.name.clone(), unit.hash.clone())) {
                Some(Ok((fleet, image))) => {
                    let candidate = Candidate {
                        name: unit.name.clone(),
                        fleet: fleet.clone(),
                        image: image.clone(),
                    };
                    if fleet.global {
                        globals.push(candidate);
                    } else {
                        units.push(candidate);
                    }
                }
                Some(Err(reason)) => {
                    reasons.insert(unit.name.clone(), reason.clone());
                }
                None => {}
            }
        }
        model.parsed = parsed;
        let machines: Vec<Machine> = model.machines.values().cloned().collect();
        // In the grace period, units on missing machines are neither taken off nor placed.
        let mut assigned = model.assignments.clone();
        model.held = false;
        if model.grace_until.is_some_and(|g| Instant::now() < g) {
            let held: std::collections::BTreeSet<String> = assigned
                .iter()
                .filter(|(_, m)| !model.machines.contains_key(*m))
                .map(|(u, _)| u.clone())
                .collect();
            if !held.is_empty() {
                log::info!(
                    "engine {}: holding {} unit(s) of missing machines for the grace period",
                    self.machine_id,
                    held.len()
                );
                model.held = true;
                assigned.retain(|u, _| !held.contains(u));
                units.retain(|c| !held.contains(&c.name));
            }
        }
        let decisions =
            scheduler::schedule_draining(&machines, &units, &assigned, &globals, &model.draining);

        // Unassignments first, then assignments (a replaced unit leaves its machine before
        // the replacing one is put there); within each phase the writes go out concurrently
        // (etcd commits concurrent proposals together), up to WRITES_IN_FLIGHT at a time.
        let mut unassigns = Vec::new();
        let mut assigns = Vec::new();
        let mut staying = BTreeMap::new();
        for decision in decisions {
            match decision {
                Decision::Assign { unit, machine } => assigns.push((unit, machine)),
                // A planned move: one compare-and-swap from the draining machine (below,
                // with the model's current assignment as the expected one).
                Decision::Move { unit, from, to } => {
                    log::info!(
                        "engine {}: moving {unit} off the draining {from} to {to}",
                        self.machine_id
                    );
                    assigns.push((unit, to));
                }
                Decision::Stays {
                    unit,
                    machine,
                    reason,
                } => {
                    if self.status.staying().get(&unit).map(|(_, r)| r) != Some(&reason) {
                        log::info!(
                            "engine {}: {unit} stays on the draining {machine}: {reason}",
                            self.machine_id
                        );
                    }
                    staying.insert(unit, (machine, reason));
                }
                Decision::Unassign {
                    unit,
                    machine,
                    reason,
                } => unassigns.push((unit, machine, reason)),
                Decision::Unschedulable { unit, reason } => {
                    reasons.insert(unit, reason);
                }
            }
        }
        let mut conflict = false;
        let writes = unassigns
            .into_iter()
            .map(|(unit, machine, reason)| Write {
                unit,
                machine,
                expected: None,
                reason: Some(reason),
            })
            .collect();
        for (write, result) in self.write_all(writes).await {
            let Write {
                unit,
                machine,
                reason,
                ..
            } = write;
            match result {
                Ok(Cas::Done) => {
                    log::info!(
                        "engine {}: {unit} taken off {machine}: {}",
                        self.machine_id,
                        reason.unwrap_or_default()
                    );
                    model.assignments.remove(&unit);
                }
                Ok(Cas::Conflict { current }) => {
                    conflict = true;
                    set_assignment(&mut model.assignments, unit, current);
                }
                Err(RegistryError::UnknownUnit { .. }) => conflict = true,
                Err(e) => return Err(e),
            }
        }
        let writes = assigns
            .into_iter()
            .filter_map(|(unit, machine)| {
                let expected = model.assignments.get(&unit).cloned();
                (expected.as_deref() != Some(machine.as_str())).then_some(Write {
                    unit,
                    machine,
                    expected: Some(expected),
                    reason: None,
                })
            })
            .collect();
        for (write, result) in self.write_all(writes).await {
            let Write { unit, machine, .. } = write;
            match result {
                Ok(Cas::Done) => {
                    log::info!("engine {}: {unit} → {machine}", self.machine_id);
                    model.assignments.insert(unit, machine);
                }
                Ok(Cas::Conflict { current }) => {
                    conflict = true;
                    log::info!(
                        "engine {}: {unit} was assigned to {current:?} meanwhile",
                        self.machine_id
                    );
                    set_assignment(&mut model.assignments, unit, current);
                }
                // Removed meanwhile: the watch brings its removal.
                Err(RegistryError::UnknownUnit { .. }) => conflict = true,
                Err(e) => return Err(e),
            }
        }
        for (unit, reason) in &reasons {
            if self.status.reason(unit).as_ref() != Some(reason) {
                log::info!(
                    "engine {}: {unit} cannot be placed: {reason}",
                    self.machine_id
                );
            }
        }
        self.status.set_unschedulable(reasons, staying);
        Ok(conflict)
    }
}

/// One compare-and-swap of a pass: `assign(unit, machine, expected)` when `expected` is
/// set, else `unassign(unit, machine)`.
struct Write {
    unit: String,
    machine: String,
    /// `Some(current assignment)` for an assign; `None` for an unassign.
    expected: Option<Option<String>>,
    /// Why the unit is taken off (unassign only), for the log.
    reason: Option<String>,
}

/// How many compare-and-swaps a pass keeps in flight at once.
const WRITES_IN_FLIGHT: usize = 64;

impl Engine {
    /// Sends `writes` concurrently (at most [`WRITES_IN_FLIGHT`] at a time); returns each
    /// with its result, in the given order (a write whose task was cancelled, which only
    /// happens when the runtime shuts down, is left out).
    async fn write_all(&self, writes: Vec<Write>) -> Vec<(Write, Result<Cas, RegistryError>)> {
        let mut out = Vec::with_capacity(writes.len());
        let mut writes = writes.into_iter().peekable();
        while writes.peek().is_some() {
            let mut tasks = tokio::task::JoinSet::new();
            for (i, write) in writes.by_ref().take(WRITES_IN_FLIGHT).enumerate() {
                let registry = self.registry.clone();
                tasks.spawn(async move {
                    let result = match &write.expected {
                        Some(expected) => {
                            registry
                                .assign(&write.unit, &write.machine, expected.as_deref())
                                .await
                        }
                        None => registry.unassign(&write.unit, &write.machine).await,
                    };
                    (i, write, result)
                });
            }
            let mut chunk = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(done) => chunk.push(done),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(e) => log::warn!("engine {}: a write was cancelled: {e}", self.machine_id),
                }
            }
            chunk.sort_by_key(|(i, _, _)| *i);
            out.extend(chunk.into_iter().map(|(_, w, r)| (w, r)));
        }
        out
    }
}

fn set_assignment(
    assignments: &mut BTreeMap<String, String>,
    unit: String,
    current: Option<String>,
) {
    match current {
        Some(machine) => {
            assignments.insert(unit, machine);
        }
        None => {
            assignments.remove(&unit);
        }
    }
}

/// Returns once the lease is reported lost (or its keeper is gone).
async fn until_lost(lost: &mut signal::Receiver<bool>) {
    let _ = lost.wait_for(|l| *l).await;
}

/// Sleeps `delay`, or less if the lease is lost meanwhile; returns whether it was lost.
async fn sleep_or_lost(delay: Duration, lost: &mut signal::Receiver<bool>) -> bool {
    let woken = tokio::select! {
        () = until_lost(lost) => true,
        () = tokio::time::sleep(delay) => false,
    };
    woken || *lost.borrow()
}

/// Keeps `lease` alive every `every`; on the first failure (the lease is gone, or the
/// registry does not answer) reports it lost and ends: the engine must stop scheduling at
/// once, as it cannot tell whether its leadership still holds.
async fn keep_alive(
    registry: Arc<dyn Registry>,
    lease: LeaseId,
    every: Duration,
    machine_id: String,
    lost: signal::Sender<bool>,
) {
    let every = every.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        // An answer that takes longer than the interval is as good as none.
        match tokio::time::timeout(every, registry.keep_alive(lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                log::warn!("engine {machine_id}: lease {lease} lost: {e}");
                let _ = lost.send(true);
                return;
            }
            Err(_) => {
                log::warn!(
                    "engine {machine_id}: keeping lease {lease} alive took over {every:?}; \
                     treating it as lost"
                );
                let _ = lost.send(true);
                return;
            }
        }
    }
}
