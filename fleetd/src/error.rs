//! The errors of the registry.

use std::path::PathBuf;

use crate::model::{LeaseId, Revision};

/// Everything a registry operation can fail with. Each message says what failed, on what,
/// and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A unit name, machine id or hash that cannot be used as part of a registry key.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// What the value names: `unit name`, `machine id`, `body hash`.
        what: &'static str,
        /// The value as given.
        value: String,
        /// Why it was rejected and what would be accepted.
        reason: &'static str,
    },

    /// A lease time-to-live that cannot be used.
    #[error("invalid lease TTL {ttl_ms} ms: a TTL must be at least 1 s (it is rounded up to whole seconds)")]
    InvalidTtl {
        /// The TTL asked for, in milliseconds.
        ttl_ms: u128,
    },

    /// `put_unit` with a body hash that is not stored.
    #[error("unit {name:?} refers to body {hash}, which is not in the registry: put the body first (put_body), then the unit")]
    MissingBody {
        /// The unit name.
        name: String,
        /// The body hash it refers to.
        hash: String,
    },

    /// An operation on a unit that is not in the registry.
    #[error("unit {name:?} is not in the registry: submit it first")]
    UnknownUnit {
        /// The unit name.
        name: String,
    },

    /// A lease that expired, was revoked, or never existed.
    #[error("lease {lease} has expired or was revoked: grant a new lease and register again")]
    LeaseExpired {
        /// The lease.
        lease: LeaseId,
    },

    /// `register_machine` for an id that another live lease holds.
    #[error("machine id {id:?} is already registered by another live lease ({holder}): another fleetd runs with the same machine id, or a previous run's lease has not expired yet (retry after its TTL)")]
    MachineIdTaken {
        /// The machine id.
        id: String,
        /// The lease that holds it.
        holder: LeaseId,
    },

    /// A watch from a revision whose history is gone.
    #[error("cannot watch from revision {requested}: the history up to revision {compacted} was compacted; read the registry again and watch from that read's revision + 1")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The last revision no longer in the history.
        compacted: Revision,
    },

    /// A watch that the registry ended.
    #[error("the registry ended the watch ({reason}): read the registry again and watch from that read's revision + 1")]
    WatchEnded {
        /// Why, as far as known.
        reason: String,
    },

    /// A read-modify-write that kept losing against concurrent writers.
    #[error("{what}: gave up after {attempts} attempts because of concurrent updates; retry")]
    Contention {
        /// What was being updated.
        what: String,
        /// How many attempts were made.
        attempts: u32,
    },

    /// A file system operation of the embedded registry failed.
    #[error("embedded registry: cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `write`, `create directory`.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The embedded registry's directory is used by another process.
    #[error("embedded registry {} is in use by another process (lock file {}): stop the other fleetd or give this one another state directory", dir.display(), dir.join("lock").display())]
    Locked {
        /// The registry directory.
        dir: PathBuf,
    },

    /// Stored data that cannot be decoded or does not match its address.
    #[error("corrupt registry data at {location}: {detail}")]
    Corrupt {
        /// A file path or etcd key.
        location: String,
        /// What is wrong, and what to do if it is not obvious.
        detail: String,
    },

    /// An etcd request failed.
    #[error("etcd at {endpoints}: {op} failed: {source}; check that etcd is running and reachable from this machine")]
    Etcd {
        /// What was being done, e.g. `put unit "web"`.
        op: String,
        /// The endpoints the client uses, comma-separated.
        endpoints: String,
        /// The client error.
        #[source]
        source: Box<etcd_client::Error>,
    },

    /// A registry that cannot be set up as configured (etcd endpoints or prefix, runtime).
    #[error("invalid registry configuration: {0}")]
    Config(String),
}

/// The result type of registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Checks a name that becomes one component of a registry key (unit name, machine id).
pub(crate) fn check_key_part(what: &'static str, value: &str) -> Result<()> {
    let reason = if value.is_empty() {
        Some("it must not be empty")
    } else if value.len() > 255 {
        Some("it must be at most 255 bytes long")
    } else if value.contains('/') {
        Some("it must not contain '/'")
    } else if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("it must not contain whitespace or control characters")
    } else if value == "." || value == ".." {
        Some("it must not be '.' or '..'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(RegistryError::InvalidName {
            what,
            value: value.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a body hash (64 lowercase hex digits).
pub(crate) fn check_hash(hash: &str) -> Result<()> {
    if crate::model::is_body_hash(hash) {
        Ok(())
    } else {
        Err(RegistryError::InvalidName {
            what: "body hash",
            value: hash.to_string(),
            reason: "a body hash is the lowercase hex sha256 of the body: 64 characters 0-9a-f",
        })
    }
}
