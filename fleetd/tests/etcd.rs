//! The registry contract on the etcd backend, against a real etcd (Debian's etcd-server):
//! every test starts its own etcd on 127.0.0.1 with free ports and a temporary data
//! directory, and kills it when done. Set FLOTILLA_ETCD to use another etcd binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod contract;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use contract::{submit, Env, WAIT};
use flotilla_fleetd::{Change, DesiredState, EtcdConfig, EtcdRegistry, Registry, RegistryError};

/// A throwaway etcd on loopback, killed on drop.
struct EtcdServer {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn etcd_binary() -> String {
    let bin = std::env::var("FLOTILLA_ETCD").unwrap_or_else(|_| "etcd".to_string());
    match Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => bin,
        Ok(out) => panic!(
            "`{bin} --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "cannot run etcd ({bin}: {e}): install Debian's etcd-server \
             (apt-get install etcd-server) or set FLOTILLA_ETCD to an etcd binary"
        ),
    }
}

impl EtcdServer {
    async fn start() -> EtcdServer {
        let bin = etcd_binary();
        // A port picked free can be taken by a parallel test before etcd binds it: retry.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = dir.path().join("etcd.log");
            let log_file = std::fs::File::create(&log).unwrap();
            let child = Command::new(&bin)
                .args(["--name", "test"])
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("test={peer_url}")])
                // Fast election; also allows 1 s lease TTLs (etcd's minimum TTL is 1.5
                // election timeouts).
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
            let mut server = EtcdServer {
                child,
                endpoint: client_url,
                _dir: dir,
            };
            if server.wait_ready(&log).await {
                return server;
            }
        }
        panic!("etcd did not start on free loopback ports after 5 attempts");
    }

    /// Waits until etcd answers; false if it exited (e.g. its port was taken).
    async fn wait_ready(&mut self, log: &PathBuf) -> bool {
        let deadline = Instant::now() + WAIT;
        let registry = connect(&self.endpoint, "/ready/").await;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!(
                    "etcd exited with {status}:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
                return false;
            }
            if registry.list_units().await.is_ok() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "etcd at {} did not answer within {WAIT:?}; its log:\n{}",
                self.endpoint,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn connect(endpoint: &str, prefix: &str) -> EtcdRegistry {
    let mut config = EtcdConfig::new(vec![endpoint.to_string()]).with_prefix(prefix);
    config.connect_timeout = Duration::from_secs(1);
    EtcdRegistry::connect(config).await.unwrap()
}

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
