//! The registry: where fleetd keeps the cluster's units, machines, scheduling decisions and
//! reported states. One trait, [`Registry`], with two backends: [`crate::EmbeddedRegistry`]
//! (one machine, in-process, persisted in a directory) and [`crate::EtcdRegistry`] (etcd v3).
//! Both pass the same contract tests (`tests/contract/`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::{RegistryError, Result};
use crate::model::{
    Assignment, DesiredState, Leader, LeaseId, Machine, RebootLockHolder, Revision, Rollout,
    UnitRecord, UnitState,
};

/// Items read at one revision: watch from `revision + 1` to see every later change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing<T> {
    /// The registry revision the items were read at.
    pub revision: Revision,
    /// The items, sorted by key (unit name, machine id, ...).
    pub items: Vec<T>,
}

/// Everything but the unit bodies, read at one revision: what the engine starts from
/// before it watches from `revision + 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The registry revision everything was read at.
    pub revision: Revision,
    /// Units, by name.
    pub units: Vec<UnitRecord>,
    /// Live machines, by id.
    pub machines: Vec<Machine>,
    /// Assignments, by unit name.
    pub assignments: Vec<Assignment>,
    /// Reported states, by unit name, then machine id.
    pub states: Vec<UnitState>,
    /// The engine leader, if there is one.
    pub leader: Option<Leader>,
}

/// The outcome of a compare-and-swap on an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cas {
    /// The assignment was written (or removed) as asked.
    Done,
    /// The assignment was not what the caller expected; nothing was written.
    Conflict {
        /// The machine the unit is assigned to now, if any.
        current: Option<String>,
    },
}

/// The outcome of a campaign for the engine leadership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Campaign {
    /// The caller is the leader (it just became leader, or already was on this lease).
    Won(Leader),
    /// Someone else leads; campaign again after its leadership ends (watch for
    /// [`Change::LeaderRemoved`]).
    Lost(Leader),
}

/// The outcome of [`Registry::acquire_reboot_lock`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RebootLock {
    /// The machine holds a slot (it just took one, or already held one).
    Acquired,
    /// Every slot is taken (or there are none): the machines that hold them, by id. Try
    /// again after one of them releases its slot or its lease ends.
    Held(Vec<RebootLockHolder>),
}

/// The outcome of [`Registry::start_rollout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutStart {
    /// The rollout was written: it runs.
    Started,
    /// Another rollout is running; nothing was written.
    Running(Box<Rollout>),
}

/// One change under the registry's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A unit was created or changed.
    UnitPut(UnitRecord),
    /// A unit was removed.
    UnitRemoved {
        /// The unit name.
        name: String,
    },
    /// A unit body was stored.
    BodyPut {
        /// Its hash.
        hash: String,
    },
    /// A unit body was removed.
    BodyRemoved {
        /// Its hash.
        hash: String,
    },
    /// A machine registered or changed its record.
    MachinePut(Machine),
    /// A machine disappeared: its lease expired or was revoked.
    MachineRemoved {
        /// The machine id.
        id: String,
    },
    /// A unit was assigned (or reassigned) to a machine.
    Assigned(Assignment),
    /// A unit's assignment was removed.
    Unassigned {
        /// The unit name.
        unit: String,
    },
    /// A machine reported a unit's state.
    StatePut(UnitState),
    /// A reported state was removed, or vanished with its machine's lease.
    StateRemoved {
        /// The unit name.
        unit: String,
        /// The machine id.
        machine: String,
    },
    /// A new leadership began.
    LeaderPut(Leader),
    /// The leadership ended (resigned, or its lease ended).
    LeaderRemoved,
    /// The rollout record was written (started, or moved on by the leader).
    RolloutPut(Box<Rollout>),
}

/// A change and the revision it happened at. Several changes can share one revision (a lease
/// expiry removes all keys attached to it at once); revisions never go backwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The revision of the change.
    pub revision: Revision,
    /// What changed.
    pub change: Change,
}

/// A stream of [`Event`]s from [`Registry::watch`], in revision order.
///
/// After an `Err` item the watch ends (`next` returns `None`): read the registry again and
/// start a new watch from that read's revision + 1. Dropping the watch cancels it.
#[derive(Debug)]
pub struct Watch {
    rx: WatchRx,
    task: Option<tokio::task::AbortHandle>,
}

#[derive(Debug)]
enum WatchRx {
    Bounded(mpsc::Receiver<Result<Event>>),
    Unbounded(mpsc::UnboundedReceiver<Result<Event>>),
}

impl Watch {
    /// A watch fed through an unbounded channel (the embedded backend: its sender must never
    /// block while it holds the registry's lock).
    pub(crate) fn unbounded(rx: mpsc::UnboundedReceiver<Result<Event>>) -> Self {
        Watch {
            rx: WatchRx::Unbounded(rx),
            task: None,
        }
    }

    /// A watch fed by a task through a bounded channel; the task is aborted when the watch
    /// is dropped.
    pub(crate) fn with_task(
        rx: mpsc::Receiver<Result<Event>>,
        task: tokio::task::AbortHandle,
    ) -> Self {
        Watch {
            rx: WatchRx::Bounded(rx),
            task: Some(task),
        }
    }

    /// The next event, an error (after which the watch ends), or `None` once it has ended.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        match &mut self.rx {
            WatchRx::Bounded(rx) => rx.recv().await,
            WatchRx::Unbounded(rx) => rx.recv().await,
        }
    }

    /// The next event if one has already arrived, without waiting: `None` when there is
    /// none yet (or the watch has ended; [`Watch::next`] tells which).
    pub fn try_next(&mut self) -> Option<Result<Event>> {
        match &mut self.rx {
            WatchRx::Bounded(rx) => rx.try_recv().ok(),
            WatchRx::Unbounded(rx) => rx.try_recv().ok(),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The registry fleetd's engine, agents and API work on.
///
/// Async because the etcd client is; object-safe (through `async_trait`) because fleetd picks
/// the backend at run time (`--etcd` or not) and the engine, agent and API share one
/// `Arc<dyn Registry>`: with generics every one of them would carry a type parameter for a
/// choice made once at startup, and a boxed future per call costs nothing next to an fsync or
/// an etcd round trip.
///
/// Conventions: names (unit names, machine ids) are non-empty, at most 255 bytes, without
/// `/`, whitespace or control characters. "Removed" results say whether something was there.
/// Leased keys (machines, reported states, the leader) vanish when their lease expires or is
/// revoked, and watchers see that as removals.
#[async_trait]
pub trait Registry: Send + Sync {
    /// A short description for logs and errors, e.g. `embedded registry at /var/lib/...`.
    fn describe(&self) -> String;

    // --- unit bodies (content-addressed) -------------------------------------------------

    /// Stores a unit body under its sha256 and returns the hash. Storing a body that is
    /// already there changes nothing (no new revision).
    async fn put_body(&self, body: &str) -> Result<String>;

    /// The body stored under `hash`, if any.
    async fn get_body(&self, hash: &str) -> Result<Option<String>>;

    /// The hashes of all stored bodies, sorted.
    async fn list_bodies(&self) -> Result<Vec<String>>;

    /// Removes a body. The caller makes sure no unit refers to it any more.
    async fn remove_body(&self, hash: &str) -> Result<bool>;

    // --- units -----------------------------------------------------------------------------

    /// Creates or replaces a unit record. Fails with [`RegistryError::MissingBody`] unless its
    /// body is stored.
    async fn put_unit(&self, unit: &UnitRecord) -> Result<()>;

    /// The unit record named `name`, if any.
    async fn get_unit(&self, name: &str) -> Result<Option<UnitRecord>>;

    /// All unit records, by name.
    async fn list_units(&self) -> Result<Listing<UnitRecord>>;

    /// Removes a unit and its assignment, in one revision. Reported states stay until their
    /// machines remove them (or their leases end); the body stays until removed.
    async fn remove_unit(&self, name: &str) -> Result<bool>;

    /// Sets a unit's desired state and returns the updated record. Fails with
    /// [`RegistryError::UnknownUnit`] if there is no such unit.
    async fn set_desired(&self, name: &str, desired: DesiredState) -> Result<UnitRecord>;

    // --- leases ------------------------------------------------------------------------------

    /// Grants a lease that lives `ttl` (rounded up to whole seconds, at least 1 s) unless
    /// kept alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease for another full TTL. Fails with [`RegistryError::LeaseExpired`] if it
    /// is gone: then everything attached to it is gone too.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Ends a lease now, removing every key attached to it. Revoking a lease that is already
    /// gone is not an error.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    // --- machines ------------------------------------------------------------------------------

    /// Publishes a machine, attached to `lease`: it disappears when the lease ends. Updating
    /// the record on the same lease is allowed; an id held by another live lease fails with
    /// [`RegistryError::MachineIdTaken`].
    async fn register_machine(&self, machine: &Machine, lease: LeaseId) -> Result<()>;

    /// The machine with id `id`, if it is live.
    async fn get_machine(&self, id: &str) -> Result<Option<Machine>>;

    /// All live machines, by id.
    async fn list_machines(&self) -> Result<Listing<Machine>>;

    /// The presence lease machine `id` is registered on, if it is live (the rollout runner
    /// takes a reboot-lock slot for a machine on it, so the slot ends with the machine).
    async fn machine_lease(&self, id: &str) -> Result<Option<LeaseId>>;

    // --- assignments ----------------------------------------------------------------------------

    /// Assigns `unit` to `machine` if the unit's current assignment is `expected` (`None`:
    /// unassigned), atomically: of two concurrent assigners expecting the same thing, exactly
    /// one gets [`Cas::Done`]. Fails with [`RegistryError::UnknownUnit`] if the unit does not
    /// exist.
    async fn assign(&self, unit: &str, machine: &str, expected: Option<&str>) -> Result<Cas>;

    /// Removes `unit`'s assignment if it is still assigned to `expected`.
    async fn unassign(&self, unit: &str, expected: &str) -> Result<Cas>;

    /// The machine `unit` is assigned to, if any.
    async fn get_assignment(&self, unit: &str) -> Result<Option<String>>;

    /// All assignments, by unit name.
    async fn list_assignments(&self) -> Result<Listing<Assignment>>;

    // --- reported states ---------------------------------------------------------------------------

    /// Records the state of a unit on a machine, attached to `lease` (the machine's): it
    /// vanishes with the lease.
    async fn report_state(&self, state: &UnitState, lease: LeaseId) -> Result<()>;

    /// Removes the state of `unit` reported by `machine`.
    async fn remove_state(&self, unit: &str, machine: &str) -> Result<bool>;

    /// All reported states, by unit name, then machine id.
    async fn list_states(&self) -> Result<Listing<UnitState>>;

    // --- engine leader ----------------------------------------------------------------------------

    /// Tries to become the leader as machine `id` on `lease`: wins if nobody leads (or the
    /// caller already does on this lease), else returns the current leader. Never blocks; to
    /// wait, watch for [`Change::LeaderRemoved`] and campaign again.
    async fn campaign(&self, id: &str, lease: LeaseId) -> Result<Campaign>;

    /// The current leader, if any.
    async fn leader(&self) -> Result<Option<Leader>>;

    /// Gives up the leadership if `id` on `lease` still holds it. Returns whether it did.
    async fn resign(&self, id: &str, lease: LeaseId) -> Result<bool>;

    /// Publishes why units cannot be placed (unit → reason), replacing what was published,
    /// attached to `lease`, and only while `lease` holds the leadership (so the reasons
    /// vanish with their leader and a deposed one cannot overwrite its successor's). Returns
    /// whether it was written. Makes no watch event.
    async fn put_reasons(&self, reasons: &BTreeMap<String, String>, lease: LeaseId)
        -> Result<bool>;

    /// What the leader last published with [`Registry::put_reasons`] (empty when nothing).
    async fn get_reasons(&self) -> Result<BTreeMap<String, String>>;

    // --- the reboot lock -------------------------------------------------------------------------

    /// Takes one of the cluster's reboot-lock slots for `machine`, attached to `lease` (the
    /// machine's presence lease): at most `max_holders` machines hold a slot at once, also
    /// under concurrent acquires from several machines (`max_holders = 0`: nobody may take
    /// one). A machine that already holds a slot keeps it ([`RebootLock::Acquired`], no
    /// second slot; on another lease, the hold moves to `lease`). The slot is freed by
    /// [`Registry::release_reboot_lock`] or when the lease ends (revoked, or expired because
    /// its machine died). Fails with [`RegistryError::LeaseExpired`] if `lease` is gone.
    /// Makes no watch event.
    async fn acquire_reboot_lock(
        &self,
        machine: &str,
        lease: LeaseId,
        max_holders: u32,
    ) -> Result<RebootLock>;

    /// Frees `machine`'s reboot-lock slot. Returns whether it held one. Makes no watch event.
    async fn release_reboot_lock(&self, machine: &str) -> Result<bool>;

    /// The machines that hold a reboot-lock slot, by id.
    async fn reboot_lock_holders(&self) -> Result<Listing<RebootLockHolder>>;

    // --- the rolling OS update -----------------------------------------------------------------

    /// Writes `rollout` as the cluster's rollout record if there is none or the current one
    /// is not running (finished or halted: it is replaced); else answers
    /// [`RolloutStart::Running`] with the running one and writes nothing, also under
    /// concurrent starts (create-only / compare-and-swap). Watchers see
    /// [`Change::RolloutPut`].
    async fn start_rollout(&self, rollout: &Rollout) -> Result<RolloutStart>;

    /// Replaces the rollout record with `rollout` (its next state) only while `lease` holds
    /// the engine leadership and the stored record is the same rollout
    /// ([`Rollout::same_as`]): a deposed leader cannot overwrite its successor's steps and
    /// nobody overwrites a newer rollout. Returns whether it was written. Watchers see
    /// [`Change::RolloutPut`].
    async fn update_rollout(&self, rollout: &Rollout, lease: LeaseId) -> Result<bool>;

    /// The rollout record (running or the last one that ended), if any.
    async fn get_rollout(&self) -> Result<Option<Rollout>>;

    // --- consistent reads and watches -----------------------------------------------------------------

    /// Units, machines, assignments, states and leader, all read at one revision.
    async fn snapshot(&self) -> Result<Snapshot>;

    /// Every change under the registry's keys from revision `from` on (inclusive), in order;
    /// `from = 0` means from the next change. Pass a read's revision + 1 to miss nothing
    /// after that read. A revision whose history is gone yields
    /// [`RegistryError::Compacted`] as the stream's first item.
    async fn watch(&self, from: Revision) -> Result<Watch>;
}

/// Now, in milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Rounds a TTL up to whole seconds (etcd's granularity), rejecting zero.
pub(crate) fn ttl_seconds(ttl: Duration) -> Result<u64> {
    if ttl.is_zero() {
        return Err(RegistryError::InvalidTtl {
            ttl_ms: ttl.as_millis(),
        });
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Ok(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(1)).ok(), Some(1));
        assert_eq!(ttl_seconds(Duration::from_millis(1500)).ok(), Some(2));
        assert_eq!(ttl_seconds(Duration::from_secs(5)).ok(), Some(5));
        assert!(ttl_seconds(Duration::ZERO).is_err());
    }
}
