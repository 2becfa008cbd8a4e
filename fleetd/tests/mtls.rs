//! The cluster boundary over mutual TLS, attacked the way an attacker would: real `fleetd`
//! and `fleetctl` processes, a real `flotilla-init` supervisor per machine, a real etcd
//! with `--client-cert-auth`, and certificates issued BY THE TEST with the `openssl` CLI
//! (the same commands as fleetd/README.md, "Certificates").
//!
//! As in `fleetctl.rs`, the init binary is not a target of this crate: run `cargo build -p
//! flotilla-init` first (or set `FLOTILLA_INIT_BIN`). Waits are bounded by [`WAIT`] and only
//! fail a test that would otherwise hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod etcd_server;
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use flotilla_fleetd::tls::TlsFiles;
use flotilla_fleetd::Registry;
use flotilla_init_api::client::Client;
use qemu_tests::pki::{Ca, Cert, Usage};
use serde_json::Value;

use etcd_server::{connect_tls, free_port, EtcdServer};
use support::spawn_init;

/// The bound on every wait.
const WAIT: Duration = Duration::from_secs(60);
/// fleetd's lease TTL (`--ttl`), in seconds. No case here lets a machine's lease expire:
/// renewed every 10 s, it outlives a stall of the machine shorter than about 20 s.
const TTL_SECS: &str = "30";
const SLEEP: &str = "[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n";

fn wait_until(what: &str, cond: impl FnMut() -> bool, log: impl Fn() -> String) {
    support::wait_until(what, WAIT, Duration::from_millis(100), cond, log);
}

/// A new CA in `dir/name` (issued with the `openssl` commands of fleetd/README.md, through
/// `qemu_tests::pki`, which the VM cluster uses too).
fn new_ca(dir: &Path, name: &str) -> Ca {
    let dir = dir.join(name);
    fs::create_dir_all(&dir).unwrap();
    Ca::new(&dir, name).unwrap()
}

/// A client certificate `/O=flotilla/OU={role}/CN={name}`.
fn client(ca: &Ca, name: &str, role: &str) -> Cert {
    ca.issue(name, role, Usage::Client).unwrap()
}

/// A machine's (or etcd's) certificate: server and client, for 127.0.0.1.
fn node(ca: &Ca, name: &str, role: &str) -> Cert {
    ca.issue(name, role, Usage::Node("127.0.0.1")).unwrap()
}

/// The TLS files of a side holding `cert`, trusting `ca`.
fn files(ca: &Ca, cert: &Cert) -> TlsFiles {
    TlsFiles {
        ca: ca.cert(),
        cert: Some(cert.cert.clone()),
        key: Some(cert.key.clone()),
    }
}

/// `fleetctl --endpoint ENDPOINT [--ca CA --cert C --key K] ARGS`.
fn fleetctl(endpoint: &str, ca: Option<&Path>, cert: Option<&Cert>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    cmd.arg("--endpoint").arg(endpoint);
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    if let Some(c) = cert {
        cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
    }
    cmd.args(args)
        .env_remove("FLEETCTL_CA")
        .env_remove("FLEETCTL_CERT")
        .env_remove("FLEETCTL_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One machine: a `flotilla-init` supervisor and a `fleetd` on it, killed on drop (with
/// everything in init's cgroup).
struct Node {
    dir: PathBuf,
    init: Option<Child>,
    fleetd: Option<Child>,
    api: PathBuf,
    cgroup: String,
}

impl Node {
    /// Starts init and fleetd (`fleetd_args` added) in `dir`; waits until fleetd's Unix
    /// socket lists `machines` machines.
    fn start(dir: &Path, fleetd_args: &[String], machines: usize) -> Node {
        fs::create_dir_all(dir.join("units")).unwrap();
        let init_socket = dir.join("manager.sock");
        let cgroup = format!(
            "flotilla-mtls-test-{}-{}",
            std::process::id(),
            dir.to_string_lossy().replace('/', "-")
        );
        let init = spawn_init(&[], dir, &dir.join("units"), &init_socket, &cgroup);
        let mut node = Node {
            dir: dir.to_path_buf(),
            init: Some(init),
            fleetd: None,
            api: dir.join("fleetd.sock"),
            cgroup,
        };
        wait_until(
            "init to answer",
            || {
                Client::connect(&init_socket)
                    .and_then(|c| c.list_units())
                    .is_ok()
            },
            || node.logs(),
        );
        let fleetd = Command::new(env!("CARGO_BIN_EXE_fleetd"))
            .arg("--state")
            .arg(dir.join("registry"))
            .arg("--api")
            .arg(&node.api)
            .arg("--init-api")
            .arg(&init_socket)
            // A missing file is fine; a test may write one first.
            .arg("--config")
            .arg(dir.join("fleetd.toml"))
            // Not the host's /run/flotilla/peers.toml.
            .arg("--peers-file")
            .arg(dir.join("peers.toml"))
            .args(["--ttl", TTL_SECS, "--metadata", "role=test"])
            .args(fleetd_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("fleetd.log")).unwrap())
            .spawn()
            .unwrap();
        node.fleetd = Some(fleetd);
        let socket = node.api.to_str().unwrap().to_string();
        wait_until(
            "fleetd to list the machines",
            || {
                let out = fleetctl(&socket, None, None, &["list-machines", "--json"]);
                out.status.success()
                    && serde_json::from_slice::<Value>(&out.stdout)
                        .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == machines))
            },
            || node.logs(),
        );
        node
    }

    fn logs(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "--- {} fleetd.log\n{}\n--- init.log\n{}",
            self.dir.display(),
            read("fleetd.log"),
            read("init.log")
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        support::stop_machine(self.fleetd.take(), self.init.take(), &self.cgroup);
    }
}

/// The units the cluster lists, as JSON, through the node's Unix socket.
fn unit_names(node: &Node) -> Vec<String> {
    let out = fleetctl(
        node.api.to_str().unwrap(),
        None,
        None,
        &["list-units", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect()
}

/// The TLS flags of a fleetd holding `cert` from `ca`.
fn tls_flags(ca: &Ca, cert: &Cert) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        ca.cert().to_string_lossy().into(),
        "--tls-cert".into(),
        cert.cert.to_string_lossy().into(),
        "--tls-key".into(),
        cert.key.to_string_lossy().into(),
    ]
}

/// Operators change units; readers and machines read and are refused changes with 403 and
/// a message that says why; a certificate without a role may do nothing.
#[test]
fn operator_changes_units_reader_only_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "cluster");
    let machine = node(&ca, "node1", "machine");
    let alice = client(&ca, "alice", "operator");
    let bob = client(&ca, "bob", "reader");
    let intern = client(&ca, "carol", "intern");
    let listen = format!("127.0.0.1:{}", free_port());
    // The settings as provisioning writes them: fleetd.toml's listen and tls_* keys.
    let dir = tmp.path().join("m1");
    fs::create_dir_all(&dir).unwrap();
    let setting = |p: &Path| toml::Value::String(p.to_string_lossy().into()).to_string();
    fs::write(
        dir.join("fleetd.toml"),
        format!(
            "listen = \"{listen}\"\ntls_ca = {}\ntls_cert = {}\ntls_key = {}\n",
            setting(&ca.cert()),
            setting(&machine.cert),
            setting(&machine.key)
        ),
    )
    .unwrap();
    let node = Node::start(&dir, &[], 1);
    let url = format!("https://{listen}");
    let unit = tmp.path().join("web.toml");
    fs::write(&unit, SLEEP).unwrap();
    let unit = unit.to_str().unwrap();
    let ca_file = ca.cert();
    let as_ = |who: &Cert, args: &[&str]| fleetctl(&url, Some(&ca_file), Some(who), args);

    // The operator submits and starts (blocking until init runs it), over mutual TLS.
    let out = as_(&alice, &["start", "--block-timeout", "60s", unit]);
    assert!(out.status.success(), "{}\n{}", text(&out), node.logs());
    // The machine list says the API is https.
    let out = as_(&alice, &["list-machines", "--json"]);
    let machines: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        machines[0]["api"],
        format!("https://{listen}"),
        "{machines}"
    );

    // The reader reads: list-units, status, cat, journal.
    for verb in [
        &["list-units"][..],
        &["status", "web"],
        &["cat", "web"],
        &["journal", "web"],
        &["list-machines"],
    ] {
        let out = as_(&bob, verb);
        assert!(out.status.success(), "reader {verb:?}: {}", text(&out));
    }
    let out = as_(&bob, &["list-units"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("web"));

    // The reader tries to change the cluster: every change is a 403 that says why.
    let other = tmp.path().join("evil.toml");
    fs::write(&other, SLEEP).unwrap();
    for verb in [
        &["submit", other.to_str().unwrap()][..],
        &["stop", "--no-block", "web"],
        &["destroy", "web"],
        // A rolling OS update reboots every machine: an operator's action too.
        &[
            "os",
            "update",
            "reg.example/flotilla/os:2.0.0",
            "--version",
            "2.0.0",
        ],
    ] {
        for (who, role) in [(&bob, "reader"), (&machine, "machine")] {
            let out = as_(who, verb);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{role} {verb:?}: {}",
                text(&out)
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("is a {role} (OU={role})"))
                    && err.contains("use an operator certificate"),
                "{role} {verb:?}: {err}"
            );
        }
    }
    // ... and nothing changed: no rollout was started.
    assert_eq!(unit_names(&node), ["web"]);
    let out = as_(&bob, &["os", "status", "--json"]);
    assert!(out.status.success(), "os status: {}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["rollout"].is_null(), "{status}");
    let out = as_(&alice, &["list-units", "--json"]);
    let units: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(units[0]["desired"], "launched", "{units}");
    assert!(node.logs().contains("refused PUT"), "{}", node.logs());

    // A certificate of the cluster CA without a role may not even read.
    let out = as_(&intern, &["list-units"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("names no role"), "{err}");

    // The operator destroys.
    let out = as_(&alice, &["destroy", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(unit_names(&node).is_empty());
}

/// The attacks on the handshake: no certificate, an operator certificate from another CA
/// (the attacker knows the cluster CA's certificate, which is public), plaintext HTTP to
/// the TLS port, a server that is not the cluster's. All fail and nothing changes.
#[test]
fn clients_without_a_cluster_certificate_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "cluster");
    let evil_ca = new_ca(tmp.path(), "evil");
    let machine = node(&ca, "node1", "machine");
    let alice = client(&ca, "alice", "operator");
    let mallory = client(&evil_ca, "mallory", "operator");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = tls_flags(&ca, &machine);
    args.extend(["--listen".into(), listen.clone()]);
    let node = Node::start(&tmp.path().join("m1"), &args, 1);
    let url = format!("https://{listen}");
    let unit = tmp.path().join("web.toml");
    fs::write(&unit, SLEEP).unwrap();
    let unit = unit.to_str().unwrap();
    let ca_file = ca.cert();

    let attempts: Vec<(&str, Output)> = vec![
        (
            "no client certificate",
            fleetctl(&url, Some(&ca_file), None, &["submit", unit]),
        ),
        (
            "an operator certificate from another CA",
            fleetctl(&url, Some(&ca_file), Some(&mallory), &["submit", unit]),
        ),
        (
            "plaintext HTTP to the TLS port",
            fleetctl(&format!("http://{listen}"), None, None, &["submit", unit]),
        ),
    ];
    for (what, out) in &attempts {
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(out));
    }
    for (what, out) in &attempts[..2] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the fleetd refused this client"),
            "{what}: {err}"
        );
    }
    assert!(unit_names(&node).is_empty(), "{}", node.logs());
    let logs = node.logs();
    assert!(
        logs.matches("refused a TLS connection").count() >= 2,
        "the refused handshakes are logged:\n{logs}"
    );

    // An https endpoint without the CA is a usage error, before any connection.
    let out = fleetctl(&url, None, Some(&alice), &["list-units"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca FILE"),
        "{}",
        text(&out)
    );
    // The operator does not trust a server whose certificate is from another CA.
    let out = fleetctl(&url, Some(&evil_ca.cert()), Some(&alice), &["list-units"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UnknownIssuer"),
        "{}",
        text(&out)
    );
    // The real operator gets in.
    let out = fleetctl(&url, Some(&ca_file), Some(&alice), &["submit", unit]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(unit_names(&node), ["web"]);
}

/// `--listen` without TLS and without `--insecure` stops fleetd at startup with a clear
/// message; so do half-given TLS flags.
#[test]
fn plaintext_listen_needs_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    fs::write(&token, "s3cret\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let fleetd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fleetd"))
            .arg("--config")
            .arg(tmp.path().join("none.toml"))
            .arg("--peers-file")
            .arg(tmp.path().join("peers.toml"))
            .arg("--state")
            .arg(tmp.path().join("registry"))
            .arg("--api")
            .arg(tmp.path().join("fleetd.sock"))
            .args(["--machine-id", "m1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // fleetd must exit by itself; one that starts serving instead is killed and reported.
    let refused = |args: &[&str]| {
        let mut child = fleetd(args);
        let mut exited = false;
        wait_until(
            "fleetd to refuse to start",
            || {
                exited = child.try_wait().unwrap().is_some();
                exited || {
                    let started = std::net::TcpStream::connect(&listen).is_ok();
                    if started {
                        let _ = child.kill();
                    }
                    started
                }
            },
            String::new,
        );
        let out = child.wait_with_output().unwrap();
        assert!(
            exited,
            "fleetd {args:?} served the API instead of refusing: {}",
            text(&out)
        );
        out
    };
    let token = token.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--listen", &listen, "--token-file", token],
            "refusing to serve the API on plaintext TCP",
        ),
        (
            vec!["--listen", &listen],
            "refusing to serve the API on plaintext TCP",
        ),
        (
            vec!["--listen", &listen, "--tls-ca", token],
            "mutual TLS needs all of --tls-ca",
        ),
        (
            vec!["--listen", &listen, "--insecure"],
            "--insecure --listen needs --token-file",
        ),
    ] {
        let out = refused(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // Nothing listens: the refusal came before the API was served.
    assert!(std::net::TcpStream::connect(&listen).is_err());
    let help = Command::new(env!("CARGO_BIN_EXE_fleetd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--insecure") && help.contains("INSECURE: serve --listen in plaintext"),
        "{help}"
    );
}

/// etcd with `--client-cert-auth`: a client without a certificate, or with one from another
/// CA, is refused; two fleetds with machine certificates share it, and a unit's journal is
/// relayed from one fleetd to the other over mutual TLS.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_and_the_journal_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "cluster");
    let evil_ca = new_ca(tmp.path(), "evil");
    let etcd_cert = node(&ca, "etcd", "etcd");
    let m1 = node(&ca, "m1", "machine");
    let m2 = node(&ca, "m2", "machine");
    let alice = client(&ca, "alice", "operator");
    let mallory = node(&evil_ca, "mallory", "machine");
    let etcd = EtcdServer::start_tls(&files(&ca, &etcd_cert), files(&ca, &m1)).await;
    assert!(etcd.endpoint.starts_with("https://"));

    // Without a client certificate, or with one from another CA, etcd refuses.
    let no_cert = TlsFiles {
        ca: ca.cert(),
        cert: None,
        key: None,
    };
    let foreign = TlsFiles {
        ca: ca.cert(),
        cert: Some(mallory.cert.clone()),
        key: Some(mallory.key.clone()),
    };
    for (what, tls) in [("no certificate", no_cert), ("another CA's", foreign)] {
        let registry = connect_tls(&etcd.endpoint, "/flotilla/", Some(tls)).await;
        let result = registry.list_units().await;
        assert!(result.is_err(), "etcd let in a client with {what}");
    }
    // A machine certificate of the cluster gets in.
    let registry = connect_tls(&etcd.endpoint, "/flotilla/", Some(files(&ca, &m1))).await;
    registry.list_units().await.unwrap();
    // fleetd refuses an https etcd without TLS settings, at startup.
    let out = Command::new(env!("CARGO_BIN_EXE_fleetd"))
        .args(["--etcd", &etcd.endpoint, "--machine-id", "x"])
        .arg("--config")
        .arg(tmp.path().join("none.toml"))
        .arg("--api")
        .arg(tmp.path().join("x.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--etcd-ca"),
        "{}",
        text(&out)
    );

    // Two machines, each with its machine certificate for etcd and for the TCP API.
    let mut nodes = Vec::new();
    for (i, (id, cert)) in [("m1", &m1), ("m2", &m2)].into_iter().enumerate() {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut flags = tls_flags(&ca, cert);
        for (flag, value) in [
            ("--etcd", etcd.endpoint.clone()),
            ("--etcd-ca", ca.cert().to_string_lossy().into()),
            ("--etcd-cert", cert.cert.to_string_lossy().into()),
            ("--etcd-key", cert.key.to_string_lossy().into()),
            ("--listen", listen.clone()),
            ("--machine-id", id.into()),
        ] {
            flags.extend([flag.to_string(), value]);
        }
        let dir = tmp.path().join(id);
        nodes.push((
            tokio::task::spawn_blocking(move || Node::start(&dir, &flags, i + 1))
                .await
                .unwrap(),
            listen,
        ));
    }
    let (n1, listen1) = &nodes[0];
    let url1 = format!("https://{listen1}");
    let unit = tmp.path().join("ticker.toml");
    fs::write(
        &unit,
        "[container]\ncommand = [\"/bin/sh\", \"-c\", \"echo hello from m2; exec sleep 1000\"]\n\n[fleet]\nmachine_id = \"m2\"\n",
    )
    .unwrap();
    let ca_file = ca.cert();
    let unit = unit.to_str().unwrap().to_string();
    let url = url1.clone();
    let alice2 = alice.clone();
    let out = tokio::task::spawn_blocking(move || {
        fleetctl(
            &url,
            Some(&ca_file),
            Some(&alice2),
            &["start", "--block-timeout", "60s", &unit],
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        text(&out),
        n1.logs(),
        nodes[1].0.logs()
    );
    // Asked at m1, the journal of the unit on m2 comes from m2 over mutual TLS (m1 shows
    // its machine certificate, which may read).
    let ca_file = ca.cert();
    let mut last = None;
    let found = tokio::task::spawn_blocking(move || {
        for _ in 0..300 {
            let out = fleetctl(&url1, Some(&ca_file), Some(&alice), &["journal", "ticker"]);
            if out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("hello from m2")
            {
                return Ok(());
            }
            last = Some(text(&out));
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last)
    })
    .await
    .unwrap();
    assert!(
        found.is_ok(),
        "{found:?}\n{}\n{}",
        n1.logs(),
        nodes[1].0.logs()
    );
    // m2 saw a TLS client: m1's certificate (no token is involved any more).
    drop(nodes);
}

/// A client that connects and never starts the handshake (slowloris) is dropped after the
/// handshake timeout, while a real client is served meanwhile.
#[test]
fn a_silent_client_is_dropped() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "cluster");
    let machine = node(&ca, "node1", "machine");
    let alice = client(&ca, "alice", "operator");
    let listen = format!("127.0.0.1:{}", free_port());
    // No init: the API answers from the registry alone.
    let fleetd = Command::new(env!("CARGO_BIN_EXE_fleetd"))
        .arg("--config")
        .arg(tmp.path().join("none.toml"))
        .arg("--peers-file")
        .arg(tmp.path().join("peers.toml"))
        .arg("--state")
        .arg(tmp.path().join("registry"))
        .arg("--api")
        .arg(tmp.path().join("fleetd.sock"))
        .arg("--init-api")
        .arg(tmp.path().join("no-init.sock"))
        .args(["--machine-id", "m1", "--listen", &listen])
        .args(tls_flags(&ca, &machine))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(tmp.path().join("fleetd.log")).unwrap())
        .spawn()
        .unwrap();
    let _fleetd = KillOnDrop(fleetd);
    let log = || fs::read_to_string(tmp.path().join("fleetd.log")).unwrap_or_default();
    wait_until(
        "fleetd to listen",
        || std::net::TcpStream::connect(&listen).is_ok(),
        log,
    );
    let mut silent = std::net::TcpStream::connect(&listen).unwrap();
    // Meanwhile a real client is served.
    let out = fleetctl(
        &format!("https://{listen}"),
        Some(&ca.cert()),
        Some(&alice),
        &["list-machines"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), log());
    // The server closes the silent connection (bounded only so a failure cannot hang).
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    let read = silent.read(&mut buf);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the silent connection is still open: {read:?}\n{}",
        log()
    );
    // The socket closes as the handshake is given up; the log line follows.
    wait_until(
        "fleetd to log the dropped handshake",
        || log().contains("no handshake within"),
        log,
    );
}

/// A child process killed (and reaped) on drop, also when a test panics.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl -s ARGS URL`, the status code appended on a last line of its own; `(status, body)`.
fn curl(args: &[&str], url: &str) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "--path-as-is", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    let mut body = out.stdout;
    let pos = body.iter().rposition(|b| *b == b'\n').unwrap();
    let status = String::from_utf8_lossy(&body[pos + 1..]).parse().unwrap();
    body.truncate(pos);
    (status, body)
}

/// Layers from peers: fleetd serves its image store's blobs on `GET`/`HEAD
/// /v2/<name>/blobs/sha256:<hex>` over mutual TLS to machine certificates only: the bytes
/// with `Content-Length` and `Docker-Content-Digest`; 404 for a blob it does not have (or a
/// symlink planted in the store, not followed), 400 for a digest that is not whole lower-case
/// sha256; a reader's and an operator's certificates get 403; the Unix socket serves none.
#[test]
fn image_blobs_are_served_to_machines_only() {
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "cluster");
    let machine = node(&ca, "node1", "machine");
    let peer = client(&ca, "node2", "machine");
    let bob = client(&ca, "bob", "reader");
    let alice = client(&ca, "alice", "operator");
    let listen = format!("127.0.0.1:{}", free_port());
    let store = tmp.path().join("images");
    let blobs = store.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    // A blob of 300 KiB (more than one read of the stream).
    let content: Vec<u8> = (0..300 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let hex = flotilla_container::image::hex(&Sha256::digest(&content));
    fs::write(blobs.join(&hex), &content).unwrap();
    // A symlink in the store to a file outside it: never followed.
    let secret = tmp.path().join("secret");
    fs::write(&secret, b"not a blob").unwrap();
    let linked = flotilla_container::image::hex(&Sha256::digest(b"not a blob"));
    std::os::unix::fs::symlink(&secret, blobs.join(&linked)).unwrap();

    let mut args = tls_flags(&ca, &machine);
    args.extend(["--listen".into(), listen.clone(), "--images".into()]);
    args.push(store.to_string_lossy().into());
    let dir = tmp.path().join("m1");
    let node = Node::start(&dir, &args, 1);
    let ca_file = ca.cert();
    let as_ = |who: &Cert, extra: &[&str], path: &str| {
        let mut a: Vec<&str> = vec!["--cacert", ca_file.to_str().unwrap()];
        a.extend(["--cert", who.cert.to_str().unwrap()]);
        a.extend(["--key", who.key.to_str().unwrap()]);
        a.extend(extra);
        curl(&a, &format!("https://{listen}{path}"))
    };
    let path = format!("/v2/team/app/blobs/sha256:{hex}");

    // A machine gets the bytes, with their length and digest.
    let (status, body) = as_(&peer, &[], &path);
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        node.logs()
    );
    assert!(body == content, "the blob's bytes ({} bytes)", body.len());
    let (status, head) = as_(&peer, &["-I"], &path);
    assert_eq!(status, 200);
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(
        head.contains(&format!("content-length: {}", content.len()))
            && head.contains(&format!("docker-content-digest: sha256:{hex}")),
        "{head}"
    );
    // Any repository name: content-addressed.
    let (status, _) = as_(&peer, &[], &format!("/v2/other/blobs/sha256:{hex}"));
    assert_eq!(status, 200);

    // Absent, a symlink, a bad digest.
    let absent = "0".repeat(64);
    let (status, body) = as_(&peer, &[], &format!("/v2/team/app/blobs/sha256:{absent}"));
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("not in this machine's image store"));
    let (status, body) = as_(&peer, &[], &format!("/v2/team/app/blobs/sha256:{linked}"));
    assert_eq!(status, 404, "a symlink is not followed");
    assert!(!String::from_utf8_lossy(&body).contains("not a blob"));
    for bad in [
        format!("sha256:{}", hex.to_uppercase()),
        format!("sha256:{}", &hex[..63]),
        "sha256:../../../../etc/passwd".to_string(),
        format!("sha512:{hex}"),
    ] {
        let (status, body) = as_(&peer, &[], &format!("/v2/team/app/blobs/{bad}"));
        assert_eq!(status, 400, "{bad}: {}", String::from_utf8_lossy(&body));
        assert!(
            String::from_utf8_lossy(&body).contains("bad blob digest"),
            "{bad}"
        );
    }

    // A reader and an operator are refused: image contents are for machines.
    for (who, role) in [(&bob, "reader"), (&alice, "operator")] {
        let (status, body) = as_(who, &[], &path);
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 403, "{role}: {body}");
        assert!(
            body.contains(&format!("is a {role} (OU={role})"))
                && body.contains("served to machines only"),
            "{role}: {body}"
        );
    }
    // The Unix socket serves no blobs.
    let (status, body) = curl(
        &["--unix-socket", node.api.to_str().unwrap()],
        &format!("http://fleetd{path}"),
    );
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("serves no image blobs"));
}

/// `unitctl image pull` over mutual TLS from a peer: a machine's certificate gets every blob
/// from the fleetd that holds them (its report's `sources` names that peer, the registry's
/// log shows no second GET); a reader's certificate is refused there (403) and the pull
/// quietly takes the blobs from the registry.
#[test]
fn unitctl_pulls_blobs_from_a_peer_over_mutual_tls() {
    use flotilla_container::image::{write_oci_layout, RuntimeConfig};
    use qemu_tests::registry::{push, TestRegistry};
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "cluster");
    let machine = node(&ca, "node1", "machine");
    let peer = client(&ca, "node2", "machine");
    let bob = client(&ca, "bob", "reader");

    // An image in a registry on loopback (plain HTTP, marked insecure).
    let registry = TestRegistry::start(&tmp.path().join("registry"), None, None).unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("hello"), "hello from a peer\n".repeat(10_000)).unwrap();
    let tar = tmp.path().join("layer.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let layout = tmp.path().join("layout");
    write_oci_layout(&layout, &[tar], &RuntimeConfig::default(), "app:1").unwrap();
    let image = format!("{}/team/app:1", registry.host());
    push(&layout, &image, &["--dest-tls-verify=false"]).unwrap();
    let settings = tmp.path().join("registries.toml");
    fs::write(
        &settings,
        format!("[registry.\"{}\"]\ninsecure = true\n", registry.host()),
    )
    .unwrap();
    let blob_gets = || {
        registry
            .log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .filter(|l| l.contains("\" 200 "))
            .count()
    };
    let pull = |store: &Path, extra: &[String]| {
        let out = Command::new(support::init_binary().with_file_name("unitctl"))
            .args(["--json", "image", "pull", &image, "--store"])
            .arg(store)
            .arg("--registries")
            .arg(&settings)
            .args(extra)
            .env_remove("FLOTILLA_PEERS")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };

    // The first store pulls from the registry; a fleetd serves it.
    let store = tmp.path().join("images");
    let report = pull(&store, &["--no-peers".to_string()]);
    let first = blob_gets();
    assert_eq!(first, 2, "config and layer: {}", registry.log());
    assert_eq!(
        report["sources"][registry.host()],
        report["downloaded_bytes"]
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = tls_flags(&ca, &machine);
    args.extend(["--listen".into(), listen.clone(), "--images".into()]);
    args.push(store.to_string_lossy().into());
    let node = Node::start(&tmp.path().join("m1"), &args, 1);
    let url = format!("https://{listen}");
    let ca_file = ca.cert();
    let with = |who: &Cert| -> Vec<String> {
        vec![
            "--peer".into(),
            url.clone(),
            "--peer-ca".into(),
            ca_file.to_string_lossy().into(),
            "--peer-cert".into(),
            who.cert.to_string_lossy().into(),
            "--peer-key".into(),
            who.key.to_string_lossy().into(),
        ]
    };

    // A machine's certificate: every blob from the peer.
    let report = pull(&tmp.path().join("b"), &with(&peer));
    assert_eq!(
        blob_gets(),
        first,
        "no blob from the registry: {}",
        registry.log()
    );
    assert_eq!(
        report["sources"],
        serde_json::json!({ url.clone(): report["downloaded_bytes"] }),
        "{report}\n{}",
        node.logs()
    );

    // A reader's certificate: refused by the peer (403), the registry serves.
    let report = pull(&tmp.path().join("c"), &with(&bob));
    assert_eq!(blob_gets(), first + 2, "{}", registry.log());
    assert_eq!(
        report["sources"][registry.host()],
        report["downloaded_bytes"]
    );
    assert!(
        node.logs().contains("served to machines only"),
        "{}",
        node.logs()
    );
}
