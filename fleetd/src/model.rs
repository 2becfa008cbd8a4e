//! The data fleetd keeps in its registry: units, their bodies, machines, assignments,
//! reported states, the engine leader and the rolling OS update. Pure data with serde; no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use flotilla_init_api::{ActiveState, SubState, Wire};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A registry revision: a counter that grows with every change to the registry (etcd's
/// store revision). Reads return the revision they saw; a watch started from that revision
/// plus one misses nothing that happened after the read.
pub type Revision = u64;

/// What the cluster should do with a unit, as fleet has it.
///
/// `inactive`: known to the cluster (submitted) but not scheduled; `loaded`: scheduled to a
/// machine and loaded into its init, not started; `launched`: scheduled and started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Submitted, not scheduled.
    Inactive,
    /// Scheduled and loaded on its machine, not started.
    Loaded,
    /// Scheduled and started.
    Launched,
}

impl DesiredState {
    /// The name fleet uses: `inactive`, `loaded` or `launched`.
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Inactive => "inactive",
            DesiredState::Loaded => "loaded",
            DesiredState::Launched => "launched",
        }
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`DesiredState`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown desired state {0:?}: use inactive, loaded or launched")]
pub struct ParseDesiredStateError(pub String);

impl FromStr for DesiredState {
    type Err = ParseDesiredStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inactive" => Ok(DesiredState::Inactive),
            "loaded" => Ok(DesiredState::Loaded),
            "launched" => Ok(DesiredState::Launched),
            other => Err(ParseDesiredStateError(other.to_string())),
        }
    }
}

/// A unit as the cluster knows it: its name, which body it runs and what should happen to it.
/// The body itself is stored once, content-addressed, under its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    /// Unit name, e.g. `web` or `worker@3`.
    pub name: String,
    /// Lowercase hex sha256 of the unit body (see [`body_hash`]).
    pub hash: String,
    /// What the cluster should do with the unit.
    pub desired: DesiredState,
}

/// A machine that runs fleetd, as it publishes itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The machine id (`/etc/machine-id` of the host, from its init).
    pub id: String,
    /// The address other machines and operators reach it at (may be empty).
    pub address: String,
    /// Metadata used by `machine_metadata` placement rules, e.g. `region=us-east`.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The URL of this machine's TCP API (`fleetd --listen`), where the other fleetds relay
    /// requests only this machine can answer (a unit's journal); `None` without `--listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The registry images its init's image stores hold (store names, `host/repo:tag`,
    /// sorted, at most [`MAX_PUBLISHED_IMAGES`]): the scheduler prefers, among equally
    /// loaded machines that fit, one that already holds a unit's image. Empty (and left out
    /// of the JSON) when it holds none or its agent does not publish them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// The host's OS version: `VERSION_ID` of its os-release. Empty (and left out of the
    /// JSON) when unknown or when its agent does not publish it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os_version: String,
    /// The host's A/B update state; `None` (left out) on a host not booted from a slot of
    /// the A/B disk (a direct kernel boot, a development host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsState>,
}

/// A host's A/B update state, as its agent reads it (`flotilla_osupdate::host::status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsState {
    /// The slot the host booted: `a` or `b`.
    pub booted: String,
    /// The slot the loader boots next, if any entry exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// The slots' boot entries, `a` then `b` (a slot without an entry is absent).
    #[serde(default)]
    pub slots: Vec<OsSlot>,
}

/// One slot's boot entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsSlot {
    /// `a` or `b`.
    pub slot: String,
    /// The version its entry boots.
    pub version: String,
    /// `committed`, `trying` (on trial: boot counting) or `bad` (no tries left).
    pub state: String,
    /// Tries left while `trying`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tries_left: Option<u32>,
}

/// A one-word summary of an [`OsState`] (`fleetctl list-machines`' UPDATE column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateState {
    /// Booted a committed slot; nothing pending.
    Committed,
    /// Booted a slot on trial: the update has not been committed yet.
    Trial,
    /// The other slot holds an update on trial that boots next: waiting for a reboot.
    RebootPending,
    /// The other slot is marked bad (an update that failed its tries, or a rollback) and
    /// the booted one stays.
    RolledBack,
    /// The booted slot has no entry (the loader state does not match what runs).
    Unknown,
}

impl UpdateState {
    /// `committed`, `trial`, `reboot-pending`, `rolled-back` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Committed => "committed",
            UpdateState::Trial => "trial",
            UpdateState::RebootPending => "reboot-pending",
            UpdateState::RolledBack => "rolled-back",
            UpdateState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for UpdateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl OsState {
    /// The entry of `slot`, if it has one.
    pub fn slot(&self, slot: &str) -> Option<&OsSlot> {
        self.slots.iter().find(|s| s.slot == slot)
    }

    /// The summary of this state.
    pub fn update_state(&self) -> UpdateState {
        let Some(booted) = self.slot(&self.booted) else {
            return UpdateState::Unknown;
        };
        let other = self.slots.iter().find(|s| s.slot != self.booted);
        if booted.state == "trying" {
            return UpdateState::Trial;
        }
        let next_is_other = self.next.as_deref().is_some_and(|n| n != self.booted);
        if next_is_other && other.is_some_and(|o| o.state == "trying") {
            return UpdateState::RebootPending;
        }
        if booted.state == "bad" || other.is_some_and(|o| o.state == "bad") {
            return UpdateState::RolledBack;
        }
        UpdateState::Committed
    }
}

/// At most this many image names are published in a machine record (the record is read by
/// every engine pass and sent on every machine change; a machine with more keeps the first
/// ones by name).
pub const MAX_PUBLISHED_IMAGES: usize = 500;

/// A scheduling decision: unit → the machine it runs on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The unit name.
    pub unit: String,
    /// The id of the machine it is assigned to.
    pub machine: String,
}

/// The state of a unit on one machine, as that machine's agent reports it (init's active and
/// sub states, e.g. `active`/`running`, `failed`/`failed`; stored as their strings, so a
/// state a newer init reports is kept as its text).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    /// The unit name.
    pub unit: String,
    /// The id of the machine that reports it.
    pub machine: String,
    /// The hash of the body the machine runs, to tell a stale body from the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Active state: `active`, `inactive`, `activating`, `deactivating`, `failed`.
    pub active: Wire<ActiveState>,
    /// Sub state: `running`, `dead`, `exited`, `auto-restart`, ...
    pub sub: Wire<SubState>,
    /// The main process id, while there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When the agent observed this state, in milliseconds since the Unix epoch.
    pub updated_at: u64,
}

/// A lease: a time-to-live that its holder keeps renewing. Keys written with a lease
/// (machines, reported states, the leader) disappear when it expires or is revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The engine leader: which machine holds the leadership, on which lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// The machine id of the leader.
    pub id: String,
    /// The lease the leadership is attached to; it ends when the lease does.
    pub lease: LeaseId,
    /// The revision at which this leadership began: it grows with every new leadership, so
    /// it can serve as a fencing token.
    pub term: Revision,
}

/// A machine's hold on one slot of the cluster's reboot lock (a semaphore: at most
/// `max_holders` machines hold it at once; see [`crate::Registry::acquire_reboot_lock`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootLockHolder {
    /// The id of the machine that holds the slot.
    pub machine: String,
    /// The lease the hold is attached to (the machine's presence lease): the slot is freed
    /// when the lease ends.
    pub lease: LeaseId,
    /// When the machine acquired the slot, in milliseconds since the Unix epoch.
    pub since: u64,
}

/// A rolling OS update of the cluster (`fleetctl os update`, issue 13): the plan, where
/// each machine is, and how it ended. One record in the registry; the API creates it
/// ([`crate::Registry::start_rollout`]), the leader's runner ([`crate::rollout`]) moves it
/// on ([`crate::Registry::update_rollout`]); it stays after it ended until the next one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The update payload: an OCI reference or a directory that exists on every machine.
    pub reference: String,
    /// The OS version the machines reach (the payload's `manifest.json` `version`).
    pub version: String,
    /// How many machines may be unavailable at once (at least 1 is used).
    pub max_unavailable: u32,
    /// When it was started, in milliseconds since the Unix epoch; with `reference` it
    /// tells one rollout from the next ([`Rollout::same_as`]).
    pub started_at: u64,
    /// Running, finished or halted.
    pub state: RolloutState,
    /// Why it halted: the machine whose update failed, and why.
    pub halted: Option<RolloutHalt>,
    /// The planned machines, in the order they are updated, with their steps.
    pub machines: Vec<RolloutMachine>,
}

impl Rollout {
    /// A new running rollout of `reference` to `version` through `machines` (in order).
    pub fn new(
        reference: &str,
        version: &str,
        max_unavailable: u32,
        machines: &[String],
        started_at: u64,
    ) -> Rollout {
        Rollout {
            reference: reference.to_string(),
            version: version.to_string(),
            max_unavailable,
            started_at,
            state: RolloutState::Running,
            halted: None,
            machines: machines
                .iter()
                .map(|id| RolloutMachine {
                    id: id.clone(),
                    step: RolloutStep::Waiting,
                    reason: None,
                    since: started_at,
                })
                .collect(),
        }
    }

    /// Whether `other` is the same rollout (another state of it), not a later one.
    pub fn same_as(&self, other: &Rollout) -> bool {
        self.started_at == other.started_at
            && self.reference == other.reference
            && self.version == other.version
    }

    /// The step of machine `id`, if it is planned.
    pub fn machine(&self, id: &str) -> Option<&RolloutMachine> {
        self.machines.iter().find(|m| m.id == id)
    }
}

/// Whether a rollout goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Machines are being updated.
    Running,
    /// Every machine is at the new version.
    Finished,
    /// A machine failed; nothing further starts.
    Halted,
}

impl RolloutState {
    /// The name in JSON and in `fleetctl os status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Finished => "finished",
            RolloutState::Halted => "halted",
        }
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where and why a rollout halted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutHalt {
    /// The machine whose update failed.
    pub machine: String,
    /// Why.
    pub reason: String,
}

/// One planned machine of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutMachine {
    /// The machine id.
    pub id: String,
    /// Where it is.
    pub step: RolloutStep,
    /// Why it failed, or what holds it up (a unit that stays while it drains).
    pub reason: Option<String>,
    /// When it entered this step, in milliseconds since the Unix epoch (the runner gives
    /// a machine that does not come back from its reboot a deadline from it).
    #[serde(default)]
    pub since: u64,
}

/// A machine's step in a rollout (see [`crate::rollout::Step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutStep {
    /// Not started.
    Waiting,
    /// Holds a reboot-lock slot; its units move away.
    Draining,
    /// Told to write the update and reboot.
    Updating,
    /// Gone for the reboot.
    Rebooting,
    /// Back on the new version, not committed yet.
    Verifying,
    /// At the new version, committed.
    Done,
    /// The update did not take.
    Failed,
}

impl RolloutStep {
    /// The name in JSON and in `fleetctl os status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStep::Waiting => "waiting",
            RolloutStep::Draining => "draining",
            RolloutStep::Updating => "updating",
            RolloutStep::Rebooting => "rebooting",
            RolloutStep::Verifying => "verifying",
            RolloutStep::Done => "done",
            RolloutStep::Failed => "failed",
        }
    }
}

impl fmt::Display for RolloutStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lowercase hex sha256 of a unit body: the address the body is stored under.
pub fn body_hash(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    let mut out = String::with_capacity(64);
    for byte in digest.iter() {
        out.push(hex_digit(byte >> 4));
        out.push(hex_digit(byte & 0x0f));
    }
    out
}

fn hex_digit(nibble: u8) -> char {
    char::from_digit(u32::from(nibble), 16).unwrap_or('0')
}

/// Whether `hash` looks like a [`body_hash`]: 64 lowercase hex digits.
pub fn is_body_hash(hash: &str) -> bool {
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            body_hash(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(is_body_hash(&body_hash("x")));
        assert!(!is_body_hash("E3B0"));
    }

    /// A machine record without `images` (an older fleetd's) still reads, and one that
    /// holds none is written as before.
    #[test]
    fn machine_images_are_optional_in_the_json() {
        let old = r#"{"id":"m1","address":"10.0.0.1","metadata":{}}"#;
        let m: Machine = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.images.is_empty());
        let json = serde_json::to_string(&m).unwrap_or_default();
        assert!(!json.contains("images"), "{json}");
        let with = Machine {
            images: vec!["r.example/app:1".into()],
            ..m
        };
        let json = serde_json::to_string(&with).unwrap_or_default();
        assert!(json.contains(r#""images":["r.example/app:1"]"#), "{json}");
    }

    fn os(booted: &str, next: Option<&str>, slots: &[(&str, &str, &str)]) -> OsState {
        OsState {
            booted: booted.into(),
            next: next.map(Into::into),
            slots: slots
                .iter()
                .map(|(slot, version, state)| OsSlot {
                    slot: (*slot).into(),
                    version: (*version).into(),
                    state: (*state).into(),
                    tries_left: None,
                })
                .collect(),
        }
    }

    #[test]
    fn update_state_summaries() {
        let one = os("a", Some("a"), &[("a", "1.0.0", "committed")]);
        assert_eq!(one.update_state(), UpdateState::Committed);
        let pending = os(
            "a",
            Some("b"),
            &[("a", "1.0.0", "committed"), ("b", "2.0.0", "trying")],
        );
        assert_eq!(pending.update_state(), UpdateState::RebootPending);
        let trial = os(
            "b",
            Some("b"),
            &[("a", "1.0.0", "committed"), ("b", "2.0.0", "trying")],
        );
        assert_eq!(trial.update_state(), UpdateState::Trial);
        let failed = os(
            "a",
            Some("a"),
            &[("a", "1.0.0", "committed"), ("b", "2.0.0", "bad")],
        );
        assert_eq!(failed.update_state(), UpdateState::RolledBack);
        let both = os(
            "b",
            Some("b"),
            &[("a", "1.0.0", "committed"), ("b", "2.0.0", "committed")],
        );
        assert_eq!(both.update_state(), UpdateState::Committed);
        assert_eq!(os("b", None, &[]).update_state(), UpdateState::Unknown);
    }

    /// The OS fields are left out when empty, and an older record reads without them.
    #[test]
    fn machine_os_is_optional_in_the_json() {
        let old = r#"{"id":"m1","address":"","metadata":{}}"#;
        let m: Machine = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.os_version.is_empty() && m.os.is_none());
        let json = serde_json::to_string(&m).unwrap_or_default();
        assert!(!json.contains("os"), "{json}");
        let with = Machine {
            os_version: "2.0.0".into(),
            os: Some(os("b", Some("b"), &[("b", "2.0.0", "trying")])),
            ..m
        };
        let json = serde_json::to_string(&with).unwrap_or_default();
        assert!(json.contains(r#""os_version":"2.0.0""#), "{json}");
        assert!(json.contains(r#""booted":"b""#), "{json}");
        let back: Machine = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, with);
    }

    #[test]
    fn desired_state_text_round_trips() {
        for s in [
            DesiredState::Inactive,
            DesiredState::Loaded,
            DesiredState::Launched,
        ] {
            assert_eq!(s.as_str().parse::<DesiredState>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).ok(),
                Some(format!("\"{}\"", s.as_str()))
            );
        }
        assert!("started".parse::<DesiredState>().is_err());
    }
}
