//! A throwaway etcd for tests (`tests/etcd.rs`, `tests/engine.rs`): each [`EtcdServer`]
//! runs its own `etcd` on 127.0.0.1 with free ports, a temporary data directory and a fast
//! election (which also allows 1 s lease TTLs), and is killed on drop. Set FLOTILLA_ETCD to
//! use another etcd binary. [`EtcdServer::start_tls`] serves clients over TLS and requires
//! their certificates (`--client-cert-auth`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_fleetd::tls::TlsFiles;
use flotilla_fleetd::{EtcdConfig, EtcdRegistry, Registry};

/// The bound on waiting for etcd to answer.
const WAIT: Duration = Duration::from_secs(30);

/// A throwaway etcd on loopback, killed on drop.
pub struct EtcdServer {
    child: Child,
    /// The client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub endpoint: String,
    /// The client's TLS files, for a TLS etcd.
    pub tls: Option<TlsFiles>,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
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
    /// Starts an etcd and waits until it answers.
    #[allow(dead_code)] // not in every test binary
    pub async fn start() -> EtcdServer {
        EtcdServer::start_with(None).await
    }

    /// Starts an etcd that serves clients over TLS with `server` (`ca`: the CA it trusts for
    /// client certificates, `cert`, `key`: its own) and refuses clients without a
    /// certificate from that CA (`--client-cert-auth`); waits until it answers `client`.
    #[allow(dead_code)] // only tests/mtls.rs
    pub async fn start_tls(server: &TlsFiles, client: TlsFiles) -> EtcdServer {
        EtcdServer::start_with(Some((server, client))).await
    }

    async fn start_with(tls: Option<(&TlsFiles, TlsFiles)>) -> EtcdServer {
        let bin = etcd_binary();
        let scheme = if tls.is_some() { "https" } else { "http" };
        // A port picked free can be taken by a parallel test before etcd binds it: retry.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("{scheme}://127.0.0.1:{client}");
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
                .args(match &tls {
                    Some((server, _)) => vec![
                        "--client-cert-auth".into(),
                        "--trusted-ca-file".into(),
                        server.ca.clone().into_os_string(),
                        "--cert-file".into(),
                        server.cert.clone().unwrap().into_os_string(),
                        "--key-file".into(),
                        server.key.clone().unwrap().into_os_string(),
                    ],
                    None => vec![],
                })
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
            let mut server = EtcdServer {
                child,
                endpoint: client_url,
                tls: tls.as_ref().map(|(_, client)| client.clone()),
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
        let registry = connect_tls(&self.endpoint, "/ready/", self.tls.clone()).await;
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

/// A client on `endpoint` with keys under `prefix`.
#[allow(dead_code)] // not in every test binary
pub async fn connect(endpoint: &str, prefix: &str) -> EtcdRegistry {
    connect_tls(endpoint, prefix, None).await
}

/// A client on `endpoint` with keys under `prefix`, over TLS with `tls`.
pub async fn connect_tls(endpoint: &str, prefix: &str, tls: Option<TlsFiles>) -> EtcdRegistry {
    let mut config = EtcdConfig::new(vec![endpoint.to_string()]).with_prefix(prefix);
    config.connect_timeout = Duration::from_secs(1);
    config.tls = tls;
    EtcdRegistry::connect(config).await.unwrap()
}
