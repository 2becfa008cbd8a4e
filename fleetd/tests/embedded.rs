//! The registry contract on the embedded backend, and what only it has: persistence in a
//! directory, its lock, and its watch history.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod contract;

use std::sync::Arc;
use std::time::Duration;

use contract::{machine, submit, Env, WAIT};
use flotilla_fleetd::{Cas, Change, DesiredState, EmbeddedRegistry, Registry, RegistryError};

async fn setup() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let registry: Arc<dyn Registry> = Arc::new(EmbeddedRegistry::open(dir.path()).await.unwrap());
    Env {
        other: registry.clone(),
        registry,
        ttl: Duration::from_secs(1),
        _guard: Box::new(dir),
    }
}

contract_tests!(setup());

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (revision, web, old_lease) = {
        let r: Arc<dyn Registry> = Arc::new(EmbeddedRegistry::open(dir.path()).await.unwrap());
        let web = submit(&r, "web", DesiredState::Inactive).await;
        r.set_desired("web", DesiredState::Launched).await.unwrap();
        assert_eq!(r.assign("web", "m1", None).await.unwrap(), Cas::Done);
        let lease = r.grant_lease(Duration::from_secs(60)).await.unwrap();
        r.register_machine(&machine("m1"), lease).await.unwrap();
        (r.snapshot().await.unwrap().revision, web, lease)
    };

    let r: Arc<dyn Registry> = Arc::new(EmbeddedRegistry::open(dir.path()).await.unwrap());
    let snapshot = r.snapshot().await.unwrap();
    assert_eq!(snapshot.revision, revision);
    let mut launched = web.clone();
    launched.desired = DesiredState::Launched;
    assert_eq!(snapshot.units, vec![launched]);
    assert_eq!(snapshot.assignments.len(), 1);
    // Leases survive a restart with a fresh deadline, as etcd's do.
    assert_eq!(snapshot.machines, vec![machine("m1")]);
    assert!(r.get_body(&web.hash).await.unwrap().is_some());

    // The watch history did not survive: watching the past is refused, the future works.
    let mut past = r.watch(revision).await.unwrap();
    match tokio::time::timeout(WAIT, past.next()).await.unwrap() {
        Some(Err(e @ RegistryError::Compacted { .. })) => {
            assert!(e.to_string().contains("read the registry again"), "{e}")
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut future = r.watch(revision + 1).await.unwrap();
    let new_lease = r.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(new_lease, old_lease, "lease ids are never reused");
    r.revoke_lease(old_lease).await.unwrap();
    let event = tokio::time::timeout(WAIT, future.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.revision, revision + 1);
    assert_eq!(event.change, Change::MachineRemoved { id: "m1".into() });
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = EmbeddedRegistry::open(dir.path()).await.unwrap();
    match EmbeddedRegistry::open(dir.path()).await {
        Err(e @ RegistryError::Locked { .. }) => {
            let message = e.to_string();
            assert!(message.contains("in use by another process"), "{message}");
            assert!(
                message.contains(&dir.path().display().to_string()),
                "{message}"
            );
        }
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("expected Locked, got a second registry"),
    }
}

#[tokio::test]
async fn a_corrupt_state_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    drop(EmbeddedRegistry::open(dir.path()).await.unwrap());
    std::fs::write(dir.path().join("state.json"), "{ not json").unwrap();
    match EmbeddedRegistry::open(dir.path()).await {
        Err(e @ RegistryError::Corrupt { .. }) => {
            let message = e.to_string();
            assert!(message.contains("state.json"), "{message}");
            assert!(message.contains("restore it from a backup"), "{message}");
        }
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("expected Corrupt, got a registry"),
    }
}
