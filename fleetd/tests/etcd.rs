//! The registry contract on the etcd backend, against a real etcd (Debian's etcd-server):
//! every test starts its own etcd on 127.0.0.1 with free ports and a temporary data
//! directory, and kills it when done. Set FLOTILLA_ETCD to use another etcd binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod contract;
mod etcd_server;

use std::sync::Arc;
use std::time::Duration;

use contract::{submit, Env, WAIT};
use etcd_server::{connect, free_port, EtcdServer};
use flotilla_fleetd::{Change, DesiredState, EtcdConfig, EtcdRegistry, Registry, RegistryError};

async fn setup() -> Env {
    let server = EtcdServer::start().await;
    // Two clients on the same prefix: two "machines" talking to one etcd.
    let registry: Arc<dyn Registry> = Arc::new(connect(&server.endpoint, "/test/").await);
    let other: Arc<dyn Registry> = Arc::new(connect(&server.endpoint, "/test/").await);
    Env {
        registry,
        other,
        ttl: Duration::from_secs(1),
        _guard: Box::new(server),
    }
}

contract_tests!(setup());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_are_isolated() {
    let server = EtcdServer::start().await;
    let a: Arc<dyn Registry> = Arc::new(connect(&server.endpoint, "/a/").await);
    let b: Arc<dyn Registry> = Arc::new(connect(&server.endpoint, "/a-b/").await);
    let mut watch_b = b.watch(0).await.unwrap();
    submit(&a, "web", DesiredState::Launched).await;
    assert!(b.list_units().await.unwrap().items.is_empty());
    assert!(b.list_bodies().await.unwrap().is_empty());
    submit(&b, "db", DesiredState::Launched).await;
    // b's watch sees b's changes only.
    let event = tokio::time::timeout(WAIT, watch_b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(event.change, Change::BodyPut { .. }), "{event:?}");
    let event = tokio::time::timeout(WAIT, watch_b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&event.change, Change::UnitPut(u) if u.name == "db"),
        "{event:?}"
    );
    assert_eq!(a.list_units().await.unwrap().items.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_a_compacted_revision_says_what_to_do() {
    let server = EtcdServer::start().await;
    let r = connect(&server.endpoint, "/test/").await;
    submit_plain(&r).await;
    let revision = r.list_units().await.unwrap().revision;
    let mut raw = etcd_client::Client::connect([server.endpoint.as_str()], None)
        .await
        .unwrap();
    raw.compact(i64::try_from(revision).unwrap(), None)
        .await
        .unwrap();
    let mut watch = r.watch(1).await.unwrap();
    match tokio::time::timeout(WAIT, watch.next()).await.unwrap() {
        Some(Err(e @ RegistryError::Compacted { .. })) => {
            assert!(e.to_string().contains("read the registry again"), "{e}");
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .is_none());
}

async fn submit_plain(r: &EtcdRegistry) {
    let hash = r
        .put_body("[container]\ncommand = [\"/bin/true\"]\n")
        .await
        .unwrap();
    r.put_unit(&contract::unit("web", &hash, DesiredState::Launched))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_etcd_is_named_in_the_error() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let mut config = EtcdConfig::new(vec![endpoint.clone()]);
    config.connect_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(1);
    let r = EtcdRegistry::connect(config).await.unwrap();
    let err = tokio::time::timeout(WAIT, r.list_units())
        .await
        .unwrap()
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains("list units"), "{message}");
    assert!(message.contains("check that etcd is running"), "{message}");
}

#[tokio::test]
async fn a_bad_configuration_is_refused() {
    for prefix in ["flotilla/", "/flotilla", ""] {
        let config = EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]).with_prefix(prefix);
        assert!(matches!(
            EtcdRegistry::connect(config).await,
            Err(RegistryError::Config(_))
        ));
    }
    assert!(matches!(
        EtcdRegistry::connect(EtcdConfig::new(vec![])).await,
        Err(RegistryError::Config(_))
    ));
}
