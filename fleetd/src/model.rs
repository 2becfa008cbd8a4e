//! The data fleetd keeps in its registry: units, their bodies, machines, assignments,
//! reported states and the engine leader. Pure data with serde; no I/O.

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
