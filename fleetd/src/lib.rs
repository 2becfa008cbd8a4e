//! fleetd: the cluster half of Flotilla. Every machine runs one; together they spread units
//! across machines with fleet's placement rules, over a shared registry.
//!
//! This crate holds the **registry**: the [`Registry`] trait and its two backends,
//! [`EmbeddedRegistry`] (one machine, persisted in a directory, the default) and
//! [`EtcdRegistry`] (etcd v3, for a cluster); the engine's pure placement logic,
//! [`scheduler`] (fleet's rules); the [`Engine`], the [`Agent`], and the HTTP/JSON [`api`]
//! with its client. The binaries `fleetd` and `fleetctl` put them together.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flotilla_fleetd::RegistryError> {
//! use std::time::Duration;
//! use flotilla_fleetd::{body_hash, DesiredState, EmbeddedRegistry, Registry, UnitRecord};
//!
//! let registry = EmbeddedRegistry::open("/var/lib/flotilla/fleetd").await?;
//! let hash = registry.put_body("[container]\ncommand = [\"/bin/true\"]\n").await?;
//! registry
//!     .put_unit(&UnitRecord { name: "web".into(), hash, desired: DesiredState::Launched })
//!     .await?;
//! let snapshot = registry.snapshot().await?;
//! let mut watch = registry.watch(snapshot.revision + 1).await?;
//! while let Some(event) = watch.next().await {
//!     println!("{:?}", event?);
//! }
//! # Ok(()) }
//! ```

pub mod agent;
pub mod api;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod etcd;
pub mod model;
pub mod os;
pub mod peers;
pub mod registry;
pub mod rollout;
pub mod scheduler;
pub mod tls;

pub use agent::{Agent, AgentError, InitApi, InitError, InitSignal, LocalInit, HANDOVER_BOUND};
pub use embedded::EmbeddedRegistry;
pub use engine::{Engine, EngineError, EngineStatus, DEFAULT_LEASE_TTL};
pub use error::{RegistryError, Result};
pub use etcd::{EtcdConfig, EtcdRegistry};
pub use model::{
    body_hash, Assignment, DesiredState, Leader, LeaseId, Machine, RebootLockHolder, Revision,
    Rollout, RolloutHalt, RolloutMachine, RolloutState, RolloutStep, UnitRecord, UnitState,
};
pub use registry::{
    Campaign, Cas, Change, Event, Listing, RebootLock, Registry, RolloutStart, Snapshot, Watch,
};
