//! The embedded registry: one machine, in-process, persisted in a directory.
//!
//! Layout of the directory (fleetd's default is `/var/lib/flotilla/fleetd`):
//!
//! ```text
//! lock             flock(2)ed while a registry has the directory open
//! state.json       everything but the bodies: revision, units, machines, assignments,
//!                  states, leader, leases; replaced atomically (tmp + fsync + rename + fsync dir)
//! bodies/<sha256>  one file per unit body, written once (tmp + fsync + rename)
//! ```
//!
//! Every change is written before it becomes visible (to readers and watchers); a change
//! that cannot be written fails and leaves the registry as it was. Leases keep their TTL
//! across a restart and get a fresh deadline when the registry is opened again, as etcd's do.
//! Watch history is kept in memory only (the last [`HISTORY_LIMIT`] events): after a restart,
//! a watch must start from a fresh read.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::error::{check_hash, check_key_part, RegistryError, Result};
use crate::model::{
    body_hash, Assignment, DesiredState, Leader, LeaseId, Machine, RebootLockHolder, Revision,
    Rollout, RolloutState, UnitRecord, UnitState,
};
use crate::registry::{
    now_ms, ttl_seconds, Campaign, Cas, Change, Event, Listing, RebootLock, Registry, RolloutStart,
    Snapshot, Watch,
};

/// fleetd's default directory for the embedded registry.
pub const DEFAULT_DIR: &str = "/var/lib/flotilla/fleetd";

/// How many events the embedded registry keeps for watches that start in the past.
pub const HISTORY_LIMIT: usize = 10_000;

const STATE_FILE: &str = "state.json";
const BODIES_DIR: &str = "bodies";
const FORMAT: u32 = 1;

/// The single-machine registry. See the [module documentation](self).
pub struct EmbeddedRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    core: Mutex<Core>,
    /// Wakes the lease reaper when deadlines change or the registry is dropped.
    wake: Arc<Notify>,
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

/// What is persisted in `state.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Data {
    format: u32,
    revision: Revision,
    next_lease: i64,
    units: BTreeMap<String, UnitRecord>,
    bodies: BTreeSet<String>,
    machines: BTreeMap<String, Leased<Machine>>,
    assignments: BTreeMap<String, String>,
    /// unit → machine → state.
    states: BTreeMap<String, BTreeMap<String, Leased<UnitState>>>,
    leader: Option<Leader>,
    /// The leader's published unschedulable reasons (unit → reason), on its lease.
    #[serde(default)]
    reasons: Option<Leased<BTreeMap<String, String>>>,
    /// lease → TTL in whole seconds.
    leases: BTreeMap<LeaseId, u64>,
    /// The reboot lock's slots: machine id → its hold (the lease is the holder's).
    #[serde(default)]
    reboot_locks: BTreeMap<String, RebootLockHolder>,
    /// The rolling OS update (running, or the last one that ended).
    #[serde(default)]
    rollout: Option<Rollout>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Leased<T> {
    value: T,
    lease: LeaseId,
}

struct Core {
    data: Data,
    bodies: BTreeMap<String, String>,
    deadlines: HashMap<LeaseId, Instant>,
    history: VecDeque<Event>,
    /// Events with a revision up to this one are no longer in `history`.
    compacted: Revision,
    watchers: Vec<mpsc::UnboundedSender<Result<Event>>>,
}

/// One change in progress: a copy of the data that becomes current only once written.
struct Tx {
    data: Data,
    deadlines: HashMap<LeaseId, Instant>,
    changes: Vec<Change>,
    dirty: bool,
}

impl Tx {
    /// Starts a change on a copy of the current data.
    fn begin(core: &Core) -> Tx {
        Tx {
            data: core.data.clone(),
            deadlines: core.deadlines.clone(),
            changes: Vec::new(),
            dirty: false,
        }
    }

    fn change(&mut self, change: Change) {
        self.changes.push(change);
        self.dirty = true;
    }

    /// The revision the changes of this transaction will get.
    fn next_revision(&self) -> Revision {
        self.data.revision + 1
    }

    fn check_lease(&self, lease: LeaseId) -> Result<()> {
        if self.data.leases.contains_key(&lease) {
            Ok(())
        } else {
            Err(RegistryError::LeaseExpired { lease })
        }
    }

    /// Ends a lease and removes every key attached to it.
    fn revoke(&mut self, lease: LeaseId) {
        if self.data.leases.remove(&lease).is_none() {
            return;
        }
        self.deadlines.remove(&lease);
        self.dirty = true;
        // In key order, as etcd deletes a lease's keys: leader, machines, states.
        if self.data.leader.as_ref().is_some_and(|l| l.lease == lease) {
            self.data.leader = None;
            self.change(Change::LeaderRemoved);
        }
        if self.data.reasons.as_ref().is_some_and(|r| r.lease == lease) {
            self.data.reasons = None;
        }
        // No watch event, as in etcd (the reboot lock is read on demand).
        self.data.reboot_locks.retain(|_, hold| hold.lease != lease);
        let machines: Vec<String> = self
            .data
            .machines
            .iter()
            .filter(|(_, m)| m.lease == lease)
            .map(|(id, _)| id.clone())
            .collect();
        for id in machines {
            self.data.machines.remove(&id);
            self.change(Change::MachineRemoved { id });
        }
        let mut removed = Vec::new();
        for (unit, by_machine) in &mut self.data.states {
            by_machine.retain(|machine, s| {
                let keep = s.lease != lease;
                if !keep {
                    removed.push((unit.clone(), machine.clone()));
                }
                keep
            });
        }
        self.data
            .states
            .retain(|_, by_machine| !by_machine.is_empty());
        for (unit, machine) in removed {
            self.change(Change::StateRemoved { unit, machine });
        }
    }
}

impl EmbeddedRegistry {
    /// Opens (creating if needed) the registry in `dir`, taking its lock. Must be called
    /// inside a tokio runtime: a task on it expires leases.
    pub async fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            RegistryError::Config(
                "the embedded registry must be opened inside a tokio runtime (it runs a task \
                 that expires leases)"
                    .to_string(),
            )
        })?;
        let dir = dir.as_ref().to_path_buf();
        let bodies_dir = dir.join(BODIES_DIR);
        fs::create_dir_all(&bodies_dir).map_err(|source| RegistryError::Io {
            action: "create directory",
            path: bodies_dir.clone(),
            source,
        })?;
        let lock = lock_dir(&dir)?;

        let state_path = dir.join(STATE_FILE);
        let fresh = !state_path.exists();
        let data = if fresh {
            Data {
                format: FORMAT,
                revision: 1,
                next_lease: 1,
                ..Data::default()
            }
        } else {
            load_data(&state_path)?
        };
        let bodies = load_bodies(&bodies_dir, &data.bodies)?;
        let now = Instant::now();
        let deadlines = data
            .leases
            .iter()
            .map(|(lease, ttl)| (*lease, now + Duration::from_secs(*ttl)))
            .collect();
        let compacted = if fresh { 0 } else { data.revision };
        let core = Core {
            data,
            bodies,
            deadlines,
            history: VecDeque::new(),
            compacted,
            watchers: Vec::new(),
        };
        let inner = Arc::new(Inner {
            dir,
            core: Mutex::new(core),
            wake: Arc::new(Notify::new()),
            _lock: lock,
        });
        runtime.spawn(reap_leases(Arc::downgrade(&inner), inner.wake.clone()));
        Ok(EmbeddedRegistry { inner })
    }

    /// The directory the registry lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // Changes are made on a copy and swapped in whole, so a poisoned lock still guards
        // consistent data.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on a copy of the data after expiring due leases; if it succeeds and changed
    /// something, writes the copy and makes it current, then tells the watchers.
    fn mutate<R>(&self, f: impl FnOnce(&mut Tx) -> Result<R>) -> Result<R> {
        let mut core = self.lock();
        self.expire_due(&mut core)?;
        let mut tx = Tx::begin(&core);
        let result = f(&mut tx)?;
        self.commit(&mut core, tx)?;
        Ok(result)
    }

    /// Reads after expiring due leases.
    fn read<R>(&self, f: impl FnOnce(&Core) -> R) -> Result<R> {
        let mut core = self.lock();
        self.expire_due(&mut core)?;
        Ok(f(&core))
    }

    fn commit(&self, core: &mut Core, mut tx: Tx) -> Result<()> {
        if !tx.dirty {
            return Ok(());
        }
        if !tx.changes.is_empty() {
            tx.data.revision += 1;
        }
        save_data(&self.dir, &tx.data)?;
        let revision = tx.data.revision;
        let deadlines_changed = tx.deadlines != core.deadlines;
        core.data = tx.data;
        core.deadlines = tx.deadlines;
        for change in tx.changes {
            core.publish(Event { revision, change });
        }
        if deadlines_changed {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Revokes every lease whose deadline has passed, one revision per lease.
    fn expire_due(&self, core: &mut Core) -> Result<()> {
        let now = Instant::now();
        let mut due: Vec<LeaseId> = core
            .deadlines
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(lease, _)| *lease)
            .collect();
        due.sort();
        for lease in due {
            log::debug!("embedded registry: lease {lease} expired");
            let mut tx = Tx::begin(core);
            tx.revoke(lease);
            self.commit(core, tx)?;
        }
        Ok(())
    }
}

impl Core {
    fn publish(&mut self, event: Event) {
        self.watchers
            .retain(|watcher| watcher.send(Ok(event.clone())).is_ok());
        self.history.push_back(event);
        while self.history.len() > HISTORY_LIMIT {
            let Some(oldest) = self.history.pop_front() else {
                break;
            };
            self.compacted = oldest.revision;
            // Keep revisions whole: drop the rest of the oldest revision too.
            while self
                .history
                .front()
                .is_some_and(|e| e.revision == self.compacted)
            {
                self.history.pop_front();
            }
        }
    }
}

/// Expires leases at their deadlines, so that watchers see expiries without anyone reading.
async fn reap_leases(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let mut core = inner.lock();
            if let Err(e) = inner.expire_due(&mut core) {
                log::error!("embedded registry: expiring leases: {e}");
            }
            core.deadlines.values().min().copied()
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| RegistryError::Io {
            action: "open lock file",
            path: path.clone(),
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(RegistryError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(e) => Err(RegistryError::Io {
            action: "lock",
            path,
            source: e.into(),
        }),
    }
}

fn load_data(path: &Path) -> Result<Data> {
    let text = fs::read(path).map_err(|source| RegistryError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let data: Data = serde_json::from_slice(&text).map_err(|e| RegistryError::Corrupt {
        location: path.display().to_string(),
        detail: format!("{e}; restore it from a backup, or move it away to start empty"),
    })?;
    if data.format != FORMAT {
        return Err(RegistryError::Corrupt {
            location: path.display().to_string(),
            detail: format!(
                "format {} is not the supported format {FORMAT}; use the fleetd that wrote it",
                data.format
            ),
        });
    }
    Ok(data)
}

/// Loads the listed bodies, checking each against its hash, and removes files that are not
/// listed (leftovers of an interrupted write or removal).
fn load_bodies(dir: &Path, listed: &BTreeSet<String>) -> Result<BTreeMap<String, String>> {
    let mut bodies = BTreeMap::new();
    for hash in listed {
        let path = dir.join(hash);
        let body = fs::read_to_string(&path).map_err(|source| RegistryError::Io {
            action: "read unit body",
            path: path.clone(),
            source,
        })?;
        if body_hash(&body) != *hash {
            return Err(RegistryError::Corrupt {
                location: path.display().to_string(),
                detail: "the body does not match its sha256; restore the file, or remove it from \
                         the registry (fleetctl destroy the units that use it)"
                    .to_string(),
            });
        }
        bodies.insert(hash.clone(), body);
    }
    let entries = fs::read_dir(dir).map_err(|source| RegistryError::Io {
        action: "list",
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let listed_body = name.to_str().is_some_and(|n| listed.contains(n));
        if !listed_body {
            let path = entry.path();
            if let Err(e) = fs::remove_file(&path) {
                log::warn!(
                    "embedded registry: cannot remove leftover {}: {e}",
                    path.display()
                );
            }
        }
    }
    Ok(bodies)
}

fn save_data(dir: &Path, data: &Data) -> Result<()> {
    let json = serde_json::to_vec(data).map_err(|e| RegistryError::Corrupt {
        location: dir.join(STATE_FILE).display().to_string(),
        detail: format!("cannot encode the registry state: {e}"),
    })?;
    write_atomic(dir, STATE_FILE, &json)
}

/// Writes `dir/name` so that it is either the old or the new content after a crash.
fn write_atomic(dir: &Path, name: &str, content: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| RegistryError::Io {
            action,
            path,
            source,
        }
    };
    let mut file = File::create(&tmp).map_err(io("create", &tmp))?;
    file.write_all(content).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))?;
    Ok(())
}

fn leader_of(data: &Data) -> Option<Leader> {
    data.leader.clone()
}

fn listing<T>(core: &Core, items: Vec<T>) -> Listing<T> {
    Listing {
        revision: core.data.revision,
        items,
    }
}

fn all_states(data: &Data) -> Vec<UnitState> {
    data.states
        .values()
        .flat_map(|by_machine| by_machine.values().map(|s| s.value.clone()))
        .collect()
}

#[async_trait]
impl Registry for EmbeddedRegistry {
    fn describe(&self) -> String {
        format!("embedded registry at {}", self.inner.dir.display())
    }

    async fn put_body(&self, body: &str) -> Result<String> {
        let hash = body_hash(body);
        let inner = &self.inner;
        let mut core = inner.lock();
        inner.expire_due(&mut core)?;
        if core.data.bodies.contains(&hash) {
            return Ok(hash);
        }
        // The file first: state.json never lists a body that is not on disk.
        write_atomic(&inner.dir.join(BODIES_DIR), &hash, body.as_bytes())?;
        let mut tx = Tx::begin(&core);
        tx.data.bodies.insert(hash.clone());
        tx.change(Change::BodyPut { hash: hash.clone() });
        inner.commit(&mut core, tx)?;
        core.bodies.insert(hash.clone(), body.to_string());
        Ok(hash)
    }

    async fn get_body(&self, hash: &str) -> Result<Option<String>> {
        check_hash(hash)?;
        self.inner.read(|core| core.bodies.get(hash).cloned())
    }

    async fn list_bodies(&self) -> Result<Vec<String>> {
        self.inner
            .read(|core| core.data.bodies.iter().cloned().collect())
    }

    async fn remove_body(&self, hash: &str) -> Result<bool> {
        check_hash(hash)?;
        let inner = &self.inner;
        // All under one lock, so that a concurrent put of the same body cannot interleave.
        let mut core = inner.lock();
        inner.expire_due(&mut core)?;
        if !core.data.bodies.contains(hash) {
            return Ok(false);
        }
        let mut tx = Tx::begin(&core);
        tx.data.bodies.remove(hash);
        tx.change(Change::BodyRemoved {
            hash: hash.to_string(),
        });
        // state.json first: it never lists a body that is not on disk.
        inner.commit(&mut core, tx)?;
        core.bodies.remove(hash);
        let path = inner.dir.join(BODIES_DIR).join(hash);
        if let Err(e) = fs::remove_file(&path) {
            // Not listed any more: removed as a leftover at the next open.
            log::warn!(
                "embedded registry: cannot remove body file {}: {e}",
                path.display()
            );
        }
        Ok(true)
    }

    async fn put_unit(&self, unit: &UnitRecord) -> Result<()> {
        check_key_part("unit name", &unit.name)?;
        check_hash(&unit.hash)?;
        self.inner.mutate(|tx| {
            if !tx.data.bodies.contains(&unit.hash) {
                return Err(RegistryError::MissingBody {
                    name: unit.name.clone(),
                    hash: unit.hash.clone(),
                });
            }
            tx.data.units.insert(unit.name.clone(), unit.clone());
            tx.change(Change::UnitPut(unit.clone()));
            Ok(())
        })
    }

    async fn get_unit(&self, name: &str) -> Result<Option<UnitRecord>> {
        check_key_part("unit name", name)?;
        self.inner.read(|core| core.data.units.get(name).cloned())
    }

    async fn list_units(&self) -> Result<Listing<UnitRecord>> {
        self.inner
            .read(|core| listing(core, core.data.units.values().cloned().collect()))
    }

    async fn remove_unit(&self, name: &str) -> Result<bool> {
        check_key_part("unit name", name)?;
        self.inner.mutate(|tx| {
            if tx.data.units.remove(name).is_none() {
                return Ok(false);
            }
            tx.change(Change::UnitRemoved {
                name: name.to_string(),
            });
            if tx.data.assignments.remove(name).is_some() {
                tx.change(Change::Unassigned {
                    unit: name.to_string(),
                });
            }
            Ok(true)
        })
    }

    async fn set_desired(&self, name: &str, desired: DesiredState) -> Result<UnitRecord> {
        check_key_part("unit name", name)?;
        self.inner.mutate(|tx| {
            let Some(unit) = tx.data.units.get_mut(name) else {
                return Err(RegistryError::UnknownUnit {
                    name: name.to_string(),
                });
            };
            unit.desired = desired;
            let unit = unit.clone();
            tx.change(Change::UnitPut(unit.clone()));
            Ok(unit)
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl_seconds(ttl)?;
        self.inner.mutate(|tx| {
            let lease = LeaseId(tx.data.next_lease);
            tx.data.next_lease += 1;
            tx.data.leases.insert(lease, secs);
            tx.deadlines
                .insert(lease, Instant::now() + Duration::from_secs(secs));
            tx.dirty = true;
            Ok(lease)
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let inner = &self.inner;
        let mut core = inner.lock();
        inner.expire_due(&mut core)?;
        let Some(ttl) = core.data.leases.get(&lease).copied() else {
            return Err(RegistryError::LeaseExpired { lease });
        };
        // Deadlines are not persisted: nothing to write.
        core.deadlines
            .insert(lease, Instant::now() + Duration::from_secs(ttl));
        inner.wake.notify_one();
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.mutate(|tx| {
            tx.revoke(lease);
            Ok(())
        })
    }

    async fn register_machine(&self, machine: &Machine, lease: LeaseId) -> Result<()> {
        check_key_part("machine id", &machine.id)?;
        self.inner.mutate(|tx| {
            tx.check_lease(lease)?;
            if let Some(existing) = tx.data.machines.get(&machine.id) {
                if existing.lease != lease {
                    return Err(RegistryError::MachineIdTaken {
                        id: machine.id.clone(),
                        holder: existing.lease,
                    });
                }
            }
            tx.data.machines.insert(
                machine.id.clone(),
                Leased {
                    value: machine.clone(),
                    lease,
                },
            );
            tx.change(Change::MachinePut(machine.clone()));
            Ok(())
        })
    }

    async fn get_machine(&self, id: &str) -> Result<Option<Machine>> {
        check_key_part("machine id", id)?;
        self.inner
            .read(|core| core.data.machines.get(id).map(|m| m.value.clone()))
    }

    async fn list_machines(&self) -> Result<Listing<Machine>> {
        self.inner.read(|core| {
            listing(
                core,
                core.data
                    .machines
                    .values()
                    .map(|m| m.value.clone())
                    .collect(),
            )
        })
    }

    async fn assign(&self, unit: &str, machine: &str, expected: Option<&str>) -> Result<Cas> {
        check_key_part("unit name", unit)?;
        check_key_part("machine id", machine)?;
        if let Some(expected) = expected {
            check_key_part("machine id", expected)?;
        }
        self.inner.mutate(|tx| {
            if !tx.data.units.contains_key(unit) {
                return Err(RegistryError::UnknownUnit {
                    name: unit.to_string(),
                });
            }
            let current = tx.data.assignments.get(unit).cloned();
            if current.as_deref() != expected {
                return Ok(Cas::Conflict { current });
            }
            tx.data
                .assignments
                .insert(unit.to_string(), machine.to_string());
            tx.change(Change::Assigned(Assignment {
                unit: unit.to_string(),
                machine: machine.to_string(),
            }));
            Ok(Cas::Done)
        })
    }

    async fn unassign(&self, unit: &str, expected: &str) -> Result<Cas> {
        check_key_part("unit name", unit)?;
        check_key_part("machine id", expected)?;
        self.inner.mutate(|tx| {
            let current = tx.data.assignments.get(unit).cloned();
            if current.as_deref() != Some(expected) {
                return Ok(Cas::Conflict { current });
            }
            tx.data.assignments.remove(unit);
            tx.change(Change::Unassigned {
                unit: unit.to_string(),
            });
            Ok(Cas::Done)
        })
    }

    async fn get_assignment(&self, unit: &str) -> Result<Option<String>> {
        check_key_part("unit name", unit)?;
        self.inner
            .read(|core| core.data.assignments.get(unit).cloned())
    }

    async fn list_assignments(&self) -> Result<Listing<Assignment>> {
        self.inner.read(|core| {
            listing(
                core,
                core.data
                    .assignments
                    .iter()
                    .map(|(unit, machine)| Assignment {
                        unit: unit.clone(),
                        machine: machine.clone(),
                    })
                    .collect(),
            )
        })
    }

    async fn report_state(&self, state: &UnitState, lease: LeaseId) -> Result<()> {
        check_key_part("unit name", &state.unit)?;
        check_key_part("machine id", &state.machine)?;
        self.inner.mutate(|tx| {
            tx.check_lease(lease)?;
            tx.data
                .states
                .entry(state.unit.clone())
                .or_default()
                .insert(
                    state.machine.clone(),
                    Leased {
                        value: state.clone(),
                        lease,
                    },
                );
            tx.change(Change::StatePut(state.clone()));
            Ok(())
        })
    }

    async fn remove_state(&self, unit: &str, machine: &str) -> Result<bool> {
        check_key_part("unit name", unit)?;
        check_key_part("machine id", machine)?;
        self.inner.mutate(|tx| {
            let Some(by_machine) = tx.data.states.get_mut(unit) else {
                return Ok(false);
            };
            if by_machine.remove(machine).is_none() {
                return Ok(false);
            }
            if by_machine.is_empty() {
                tx.data.states.remove(unit);
            }
            tx.change(Change::StateRemoved {
                unit: unit.to_string(),
                machine: machine.to_string(),
            });
            Ok(true)
        })
    }

    async fn list_states(&self) -> Result<Listing<UnitState>> {
        self.inner
            .read(|core| listing(core, all_states(&core.data)))
    }

    async fn campaign(&self, id: &str, lease: LeaseId) -> Result<Campaign> {
        check_key_part("machine id", id)?;
        self.inner.mutate(|tx| {
            tx.check_lease(lease)?;
            if let Some(current) = &tx.data.leader {
                return Ok(if current.id == id && current.lease == lease {
                    Campaign::Won(current.clone())
                } else {
                    Campaign::Lost(current.clone())
                });
            }
            let leader = Leader {
                id: id.to_string(),
                lease,
                term: tx.next_revision(),
            };
            tx.data.leader = Some(leader.clone());
            tx.change(Change::LeaderPut(leader.clone()));
            Ok(Campaign::Won(leader))
        })
    }

    async fn put_reasons(
        &self,
        reasons: &BTreeMap<String, String>,
        lease: LeaseId,
    ) -> Result<bool> {
        self.inner.mutate(|tx| {
            if tx.data.leader.as_ref().is_none_or(|l| l.lease != lease) {
                return Ok(false);
            }
            tx.data.reasons = Some(Leased {
                value: reasons.clone(),
                lease,
            });
            tx.dirty = true;
            Ok(true)
        })
    }

    async fn get_reasons(&self) -> Result<BTreeMap<String, String>> {
        self.inner.read(|core| {
            core.data
                .reasons
                .as_ref()
                .map(|r| r.value.clone())
                .unwrap_or_default()
        })
    }

    async fn leader(&self) -> Result<Option<Leader>> {
        self.inner.read(|core| leader_of(&core.data))
    }

    async fn resign(&self, id: &str, lease: LeaseId) -> Result<bool> {
        check_key_part("machine id", id)?;
        self.inner.mutate(|tx| {
            let holds = tx
                .data
                .leader
                .as_ref()
                .is_some_and(|l| l.id == id && l.lease == lease);
            if holds {
                tx.data.leader = None;
                tx.change(Change::LeaderRemoved);
            }
            Ok(holds)
        })
    }

    async fn acquire_reboot_lock(
        &self,
        machine: &str,
        lease: LeaseId,
        max_holders: u32,
    ) -> Result<RebootLock> {
        check_key_part("machine id", machine)?;
        self.inner.mutate(|tx| {
            tx.check_lease(lease)?;
            let locks = &mut tx.data.reboot_locks;
            if let Some(hold) = locks.get_mut(machine) {
                if hold.lease != lease {
                    hold.lease = lease;
                    tx.dirty = true;
                }
                return Ok(RebootLock::Acquired);
            }
            if locks.len() >= usize::try_from(max_holders).unwrap_or(usize::MAX) {
                return Ok(RebootLock::Held(locks.values().cloned().collect()));
            }
            locks.insert(
                machine.to_string(),
                RebootLockHolder {
                    machine: machine.to_string(),
                    lease,
                    since: now_ms(),
                },
            );
            tx.dirty = true;
            Ok(RebootLock::Acquired)
        })
    }

    async fn release_reboot_lock(&self, machine: &str) -> Result<bool> {
        check_key_part("machine id", machine)?;
        self.inner.mutate(|tx| {
            let held = tx.data.reboot_locks.remove(machine).is_some();
            tx.dirty |= held;
            Ok(held)
        })
    }

    async fn reboot_lock_holders(&self) -> Result<Listing<RebootLockHolder>> {
        self.inner
            .read(|core| listing(core, core.data.reboot_locks.values().cloned().collect()))
    }

    async fn machine_lease(&self, id: &str) -> Result<Option<LeaseId>> {
        self.inner
            .read(|core| core.data.machines.get(id).map(|m| m.lease))
    }

    async fn start_rollout(&self, rollout: &Rollout) -> Result<RolloutStart> {
        self.inner.mutate(|tx| {
            if let Some(current) = tx
                .data
                .rollout
                .as_ref()
                .filter(|r| r.state == RolloutState::Running)
            {
                return Ok(RolloutStart::Running(Box::new(current.clone())));
            }
            tx.data.rollout = Some(rollout.clone());
            tx.change(Change::RolloutPut(Box::new(rollout.clone())));
            Ok(RolloutStart::Started)
        })
    }

    async fn update_rollout(&self, rollout: &Rollout, lease: LeaseId) -> Result<bool> {
        self.inner.mutate(|tx| {
            let leads = tx.data.leader.as_ref().is_some_and(|l| l.lease == lease);
            let same = tx.data.rollout.as_ref().is_some_and(|r| r.same_as(rollout));
            if !leads || !same {
                return Ok(false);
            }
            if tx.data.rollout.as_ref() != Some(rollout) {
                tx.data.rollout = Some(rollout.clone());
                tx.change(Change::RolloutPut(Box::new(rollout.clone())));
            }
            Ok(true)
        })
    }

    async fn get_rollout(&self) -> Result<Option<Rollout>> {
        self.inner.read(|core| core.data.rollout.clone())
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        self.inner.read(|core| {
            let data = &core.data;
            Snapshot {
                revision: data.revision,
                units: data.units.values().cloned().collect(),
                machines: data.machines.values().map(|m| m.value.clone()).collect(),
                assignments: data
                    .assignments
                    .iter()
                    .map(|(unit, machine)| Assignment {
                        unit: unit.clone(),
                        machine: machine.clone(),
                    })
                    .collect(),
                states: all_states(data),
                leader: leader_of(data),
            }
        })
    }

    async fn watch(&self, from: Revision) -> Result<Watch> {
        let inner = &self.inner;
        let mut core = inner.lock();
        inner.expire_due(&mut core)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let from = if from == 0 {
            core.data.revision + 1
        } else {
            from
        };
        if from <= core.compacted {
            // The receiver is right here: sending cannot fail.
            let _ = tx.send(Err(RegistryError::Compacted {
                requested: from,
                compacted: core.compacted,
            }));
            return Ok(Watch::unbounded(rx));
        }
        for event in core.history.iter().filter(|e| e.revision >= from) {
            let _ = tx.send(Ok(event.clone()));
        }
        core.watchers.push(tx);
        Ok(Watch::unbounded(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_files_are_removed_and_listed_bodies_checked() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| RegistryError::Io {
            action: "create",
            path: PathBuf::from("tempdir"),
            source,
        })?;
        let good = "x = 1\n";
        let hash = body_hash(good);
        write_atomic(dir.path(), &hash, good.as_bytes())?;
        write_atomic(dir.path(), "junk", b"junk")?;
        let listed: BTreeSet<String> = [hash.clone()].into();
        let bodies = load_bodies(dir.path(), &listed)?;
        assert_eq!(bodies.get(&hash).map(String::as_str), Some(good));
        assert!(!dir.path().join("junk").exists());

        write_atomic(dir.path(), &hash, b"tampered")?;
        let err = load_bodies(dir.path(), &listed).err();
        assert!(
            matches!(err, Some(RegistryError::Corrupt { .. })),
            "{err:?}"
        );
        Ok(())
    }
}
