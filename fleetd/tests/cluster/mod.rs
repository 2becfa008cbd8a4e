//! A fleet cluster on one host for `tests/cluster.rs`: one real etcd and N "machines", each
//! a network namespace with its own `flotilla-init` supervisor (`--launcher host`, or its
//! container launcher with an image store per machine: [`Cluster::start_with_containers`])
//! and its own `fleetd`, all real processes.
//!
//! The network: a bridge in the root namespace with the first address of a private /24
//! (`10.<100 + pid % 100>.<cluster>.0/24`: unique per cluster within a process; two
//! concurrent test processes clash only if their pids are equal mod 100); machine `n`
//! is the namespace `flt-<pid>-<cluster>m<n>` with a veth whose peer is attached to the
//! bridge, address `.<10 + n>`, and no default route, so a machine can reach only its own
//! loopback, the bridge (etcd) and the other machines. etcd listens on the bridge address
//! and on loopback. fleetd runs under `ip netns exec`; init runs under `nsenter --net=...`
//! because `ip netns exec` remounts `/sys`, which would hide the cgroup tree init needs.
//!
//! Everything is torn down on drop, also when a test panics: the processes are killed (and
//! every init's cgroup), the namespaces, veths and the bridge deleted.
//!
//! Needs root, iproute2 (`ip`), util-linux (`nsenter`), Debian's `etcd-server`, and `cargo
//! build -p flotilla-init` first (or `FLOTILLA_INIT_BIN`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    dead_code
)]

use crate::support::{kill_cgroup, spawn_init_with};
use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flotilla_fleetd::{EtcdConfig, EtcdRegistry, Registry};
use flotilla_init_api::client::Client;
use flotilla_init_api::{ActiveState, UnitInfo};
use serde_json::Value;

/// The bound on every wait; only a test that would otherwise hang fails on it.
pub const WAIT: Duration = Duration::from_secs(60);
/// The machines' lease TTL (`fleetd --ttl`) of [`Cluster::start`], in seconds (the
/// benchmark's; tests choose theirs with [`Cluster::start_with_ttl`]).
pub const TTL_SECS: u64 = 2;

/// The port of every fleetd's TCP API (on its machine's address).
pub const FLEETD_PORT: u16 = 4002;
/// The cluster's shared API token, in the cluster's directory.
const TOKEN_FILE: &str = "fleetd.token";

/// Clusters started by this process so far: makes names and subnets unique.
static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip ARGS`, ignoring failure (teardown).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let _ = rustix::process::kill_process(pid, sig);
}

fn kill(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Polls `cond` every 200 ms until it holds; panics with `what` and `logs()` after [`WAIT`].
pub fn wait_until(what: &str, cond: impl FnMut() -> bool, logs: impl Fn() -> String) {
    crate::support::wait_until(what, WAIT, Duration::from_millis(200), cond, logs);
}

/// The cluster's etcd: on the bridge address and loopback, with a data directory that
/// survives [`Etcd::kill`] so that [`Etcd::start`] brings the same cluster back.
pub struct Etcd {
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
    bridge_ip: String,
    client_port: u16,
    peer_port: u16,
    /// The endpoint the machines use: `http://<bridge ip>:<port>`.
    pub endpoint: String,
}

impl Etcd {
    /// Starts etcd (again, on the same ports and data) and waits until it answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "etcd already runs");
        let client = format!(
            "http://{}:{p},http://127.0.0.1:{p}",
            self.bridge_ip,
            p = self.client_port
        );
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let bin = std::env::var("FLOTILLA_ETCD").unwrap_or_else(|_| "etcd".to_string());
        let child = Command::new(&bin)
            .args(["--name", "cluster"])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("cluster={peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e} (install etcd-server or set FLOTILLA_ETCD)")
            });
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{}", self.client_port);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("etcd exited with {status}:\n{}", self.logs());
            }
            let ok = runtime.block_on(async {
                let mut config = EtcdConfig::new(vec![endpoint.clone()]).with_prefix("/ready/");
                config.connect_timeout = Duration::from_secs(1);
                match EtcdRegistry::connect(config).await {
                    Ok(r) => r.list_units().await.is_ok(),
                    Err(_) => false,
                }
            });
            if ok {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "etcd did not answer:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Freezes etcd (SIGSTOP): it neither answers nor expires leases until [`Etcd::resume`].
    pub fn freeze(&self) {
        signal(self.child.as_ref().unwrap(), rustix::process::Signal::STOP);
    }

    /// Resumes a frozen etcd (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.as_ref().unwrap(), rustix::process::Signal::CONT);
    }

    /// Kills etcd (SIGKILL); its data directory stays for [`Etcd::start`].
    pub fn kill(&mut self) {
        kill(self.child.take());
    }

    /// etcd's log.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c, rustix::process::Signal::CONT);
        }
        kill(self.child.take());
    }
}

/// One machine: a network namespace with its init and fleetd.
pub struct Node {
    /// The machine id (`m<n>`), as `fleetd --machine-id`.
    pub id: String,
    /// The machine's address on the bridge.
    pub ip: String,
    /// `fleetd --metadata`.
    pub metadata: String,
    /// `fleetd --ttl`, in seconds.
    pub ttl_secs: u64,
    /// The network namespace (`ip netns`).
    pub netns: String,
    veth: String,
    dir: PathBuf,
    /// init's API socket.
    pub init_socket: PathBuf,
    /// fleetd's API socket (`fleetctl --endpoint`).
    pub api: PathBuf,
    cgroup: String,
    /// init's launcher arguments (`--launcher host`, or the container launcher's).
    launcher: Vec<String>,
    /// Whether its init's pulls read the peers file (false: every pull goes to the registry).
    peers: bool,
    init: Option<Child>,
    fleetd: Option<Child>,
}

impl Node {
    /// The units init has, `None` when init does not answer (killed).
    pub fn init_units(&self) -> Option<Vec<UnitInfo>> {
        self.init.as_ref()?;
        Client::connect(&self.init_socket)
            .and_then(|c| c.list_units())
            .ok()
    }

    /// The pid of `unit` when init runs it (`active` with a main pid).
    pub fn active_pid(&self, unit: &str) -> Option<u32> {
        self.init_units()?
            .into_iter()
            .find(|u| u.name == unit && u.active_state == ActiveState::Active && u.main_pid != 0)
            .map(|u| u.main_pid)
    }

    /// Whether init and fleetd both run.
    pub fn is_up(&self) -> bool {
        self.init.is_some() && self.fleetd.is_some()
    }

    fn logs(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "--- {} fleetd.log\n{}\n--- {} init.log\n{}",
            self.id,
            read("fleetd.log"),
            self.id,
            read("init.log")
        )
    }

    /// The peers file this machine's fleetd keeps and its init's pulls read.
    pub fn peers_file(&self) -> PathBuf {
        self.dir.join("peers.toml")
    }

    fn start_init(&mut self) {
        let units = self.dir.join("units");
        fs::create_dir_all(&units).unwrap();
        // Without peers, FLOTILLA_PEERS names a file no one writes: the registry only.
        let peers = if self.peers {
            self.peers_file()
        } else {
            self.dir.join("no-peers.toml")
        };
        let nsenter = [
            "env".to_string(),
            format!("FLOTILLA_PEERS={}", peers.display()),
            "nsenter".to_string(),
            format!("--net=/run/netns/{}", self.netns),
            "--".to_string(),
        ];
        let child = spawn_init_with(
            &nsenter,
            &self.dir,
            &units,
            &self.init_socket,
            &self.cgroup,
            &self.launcher,
        );
        self.init = Some(child);
        wait_until(
            &format!("{}'s init to answer", self.id),
            || self.init_units().is_some(),
            || self.logs(),
        );
    }

    /// A file standing in for the host's OS for this machine's fleetd: `os-release` (none
    /// at first: no version), `cmdline` (`console=ttyS0`: not booted from an A/B slot),
    /// `esp` (a directory for `loader/entries/`).
    pub fn os_file(&self, name: &str) -> PathBuf {
        self.dir.join("os").join(name)
    }

    fn start_fleetd(&mut self, etcd: &str) {
        fs::create_dir_all(self.os_file("esp")).unwrap();
        if !self.os_file("cmdline").exists() {
            fs::write(self.os_file("cmdline"), "console=ttyS0\n").unwrap();
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("fleetd.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(env!("CARGO_BIN_EXE_fleetd"))
            .args(["--etcd", etcd, "--machine-id", &self.id])
            .args(["--metadata", &self.metadata, "--address", &self.ip])
            .args(["--ttl", &self.ttl_secs.to_string()])
            .arg("--state")
            .arg(self.dir.join("registry"))
            .arg("--init-api")
            .arg(&self.init_socket)
            .arg("--api")
            .arg(&self.api)
            // Every fleetd also serves the cluster's TCP API, with the shared token, so that
            // each can relay to the others (the journal of a unit on another machine).
            .args(["--listen", &format!("{}:{FLEETD_PORT}", self.ip)])
            .args(["--insecure", "--token-file"])
            .arg(self.dir.with_file_name(TOKEN_FILE))
            .arg("--config")
            .arg(self.dir.join("no-fleetd.toml"))
            // Layers from peers: this machine's store serves the others, and the peers file
            // its init's `unitctl image pull` reads (FLOTILLA_PEERS, see `start_init`).
            .arg("--images")
            .arg(self.dir.join("images"))
            .arg("--peers-file")
            .arg(self.peers_file())
            // The host's OS as files the test writes (`Node::os_file`), read every second.
            .arg("--os-release")
            .arg(self.os_file("os-release"))
            .arg("--os-cmdline")
            .arg(self.os_file("cmdline"))
            .arg("--os-esp")
            .arg(self.os_file("esp"))
            .args(["--os-refresh", "1"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.fleetd = Some(child);
    }
}

/// One etcd and N machines on a private bridge; everything torn down on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// The cluster's etcd.
    pub etcd: Etcd,
    /// The machines, `nodes[i].id == format!("m{}", i + 1)`.
    pub nodes: Vec<Node>,
    bridge: String,
    subnet: String,
    tag: String,
    /// Every machine's `fleetd --ttl`, in seconds.
    ttl_secs: u64,
    /// Whether the machines run units in containers (see [`Cluster::start_with_containers`]).
    containers: bool,
    /// Whether the machines' pulls ask their peers (see [`Cluster::start_without_peers`]).
    peers: bool,
}

impl Cluster {
    /// Starts etcd and one machine per `metadata` entry (`fleetd --metadata`, e.g.
    /// `"role=web,region=eu"`), and waits until `list-machines` shows them all. The machines'
    /// lease TTL is [`TTL_SECS`].
    pub fn start(metadata: &[&str]) -> Cluster {
        Cluster::start_with_ttl(metadata, TTL_SECS)
    }

    /// [`Cluster::start`] with every machine's lease TTL (`fleetd --ttl`, also its engine's)
    /// `ttl_secs`, machines added later included. A machine's lease is renewed every third
    /// of it, so a stall of the machine shorter than about two thirds of it cannot expire it.
    pub fn start_with_ttl(metadata: &[&str], ttl_secs: u64) -> Cluster {
        Cluster::start_inner(metadata, ttl_secs, false)
    }

    /// [`Cluster::start_with_ttl`] with machines whose init runs units in containers (its
    /// container launcher): each machine has its own image store (`m<n>/images`), pulls a
    /// unit's registry image with the `unitctl` beside `flotilla-init`, and reads the
    /// registry settings at [`Cluster::registries`] (write them before a unit needs a pull).
    pub fn start_with_containers(metadata: &[&str], ttl_secs: u64) -> Cluster {
        Cluster::start_inner(metadata, ttl_secs, true)
    }

    /// [`Cluster::start_with_containers`] whose machines pull alone: their inits read no
    /// peers file, so every pull fetches every blob from the registry (the fleetds still
    /// serve their blobs and keep their peers files).
    pub fn start_without_peers(metadata: &[&str], ttl_secs: u64) -> Cluster {
        Cluster::start_with(metadata, ttl_secs, true, false)
    }

    fn start_inner(metadata: &[&str], ttl_secs: u64, containers: bool) -> Cluster {
        Cluster::start_with(metadata, ttl_secs, containers, true)
    }

    fn start_with(metadata: &[&str], ttl_secs: u64, containers: bool, peers: bool) -> Cluster {
        let pid = std::process::id();
        let n = CLUSTERS.fetch_add(1, Ordering::SeqCst);
        assert!(n < 250, "too many clusters in one test process");
        let subnet = format!("10.{}.{}", 100 + pid % 100, n);
        let tag = format!("{pid:x}{n:02x}");
        let bridge = format!("fb{tag}");
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TOKEN_FILE), format!("cluster-{tag}\n")).unwrap();
        // The bridge first: etcd binds its address. Drop deletes whatever was created.
        let mut cluster = Cluster {
            etcd: Etcd {
                child: None,
                data: dir.path().join("etcd"),
                log: dir.path().join("etcd.log"),
                bridge_ip: format!("{subnet}.1"),
                client_port: free_port(),
                peer_port: free_port(),
                endpoint: String::new(),
            },
            dir,
            nodes: Vec::new(),
            bridge,
            subnet,
            tag,
            ttl_secs,
            containers,
            peers,
        };
        cluster.etcd.endpoint = format!(
            "http://{}:{}",
            cluster.etcd.bridge_ip, cluster.etcd.client_port
        );
        ip(&["link", "add", &cluster.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", cluster.etcd.bridge_ip),
            "dev",
            &cluster.bridge,
        ]);
        ip(&["link", "set", &cluster.bridge, "up"]);
        cluster.etcd.start();
        for m in metadata {
            cluster.add_node(m);
        }
        cluster.wait_machines(metadata.len());
        cluster
    }

    /// Adds machine `m<N+1>` with `metadata` and starts its init and fleetd (without
    /// waiting for it to register). Returns its index in `nodes`.
    pub fn add_node(&mut self, metadata: &str) -> usize {
        let i = self.nodes.len();
        let n = i + 1;
        assert!(n < 16, "at most 15 machines");
        let netns = format!("flt-{}-{}m{n}", std::process::id(), self.tag);
        let veth = format!("fv{}{n:x}", self.tag);
        let peer = format!("fp{}{n:x}", self.tag);
        let node_ip = format!("{}.{}", self.subnet, 10 + n);
        let dir = self.dir.path().join(format!("m{n}"));
        fs::create_dir_all(&dir).unwrap();
        let launcher: Vec<String> = if self.containers {
            let images = dir.join("images");
            vec![
                "--launcher".into(),
                "container".into(),
                "--images".into(),
                images.to_str().unwrap().into(),
                "--registries".into(),
                self.registries().to_str().unwrap().into(),
            ]
        } else {
            vec!["--launcher".into(), "host".into()]
        };
        self.nodes.push(Node {
            id: format!("m{n}"),
            ip: node_ip.clone(),
            metadata: metadata.to_string(),
            ttl_secs: self.ttl_secs,
            netns: netns.clone(),
            veth: veth.clone(),
            init_socket: dir.join("manager.sock"),
            api: dir.join("fleetd.sock"),
            cgroup: format!("flotilla-cluster-test-{}-m{n}", self.tag),
            launcher,
            peers: self.peers,
            dir,
            init: None,
            fleetd: None,
        });
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &netns,
        ]);
        ip(&["link", "set", &veth, "master", &self.bridge, "up"]);
        ip(&["-n", &netns, "link", "set", &peer, "name", "eth0"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let etcd = self.etcd.endpoint.clone();
        let node = &mut self.nodes[i];
        node.start_init();
        node.start_fleetd(&etcd);
        i
    }

    /// The bridge's address: etcd's, and where a service the machines reach listens (a test
    /// registry).
    pub fn bridge_ip(&self) -> &str {
        &self.etcd.bridge_ip
    }

    /// The registry settings file of a cluster of [`Cluster::start_with_containers`]
    /// (`registries.toml` in the cluster's directory; absent until a test writes it).
    pub fn registries(&self) -> PathBuf {
        self.dir.path().join("registries.toml")
    }

    /// A real registry (`docker-registry`) in `dir` on the cluster's bridge, where the
    /// machines reach it, marked insecure (plain HTTP) in [`Cluster::registries`].
    pub fn start_registry(&self, dir: &std::path::Path) -> qemu_tests::registry::TestRegistry {
        let registry = qemu_tests::registry::TestRegistry::start_with(
            dir,
            &qemu_tests::registry::RegistryOptions {
                ip: Some(self.bridge_ip()),
                ..Default::default()
            },
        )
        .unwrap();
        fs::write(
            self.registries(),
            format!("[registry.\"{}\"]\ninsecure = true\n", registry.host()),
        )
        .unwrap();
        registry
    }

    /// Machine `i`'s image store (with [`Cluster::start_with_containers`]).
    pub fn images(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("images")
    }

    /// `n` times the machines' lease TTL.
    pub fn ttl(&self, n: u32) -> Duration {
        Duration::from_secs(self.ttl_secs) * n
    }

    /// The lease machine `id`'s registry record is written with and the revision it was
    /// last written at, read from etcd itself; `None` while the machine has no record.
    pub fn machine_record(&self, id: &str) -> Option<(i64, i64)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut client = etcd_client::Client::connect([self.etcd.endpoint.as_str()], None)
                .await
                .unwrap();
            let got = client
                .get(format!("/flotilla/machines/{id}"), None)
                .await
                .unwrap();
            got.kvs().first().map(|kv| (kv.lease(), kv.mod_revision()))
        })
    }

    /// Waits until `list-machines` shows `n` machines.
    pub fn wait_machines(&self, n: usize) {
        wait_until(
            &format!("{n} machines to register"),
            || {
                self.try_json(&["list-machines", "--json"])
                    .is_some_and(|v| v.as_array().is_some_and(|a| a.len() == n))
            },
            || self.logs(),
        );
    }

    /// Every log: etcd's, and each machine's fleetd and init.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&n.logs());
            out.push('\n');
        }
        let etcd = self.etcd.logs();
        let tail: Vec<&str> = etcd.lines().rev().take(30).collect();
        out.push_str("--- etcd.log (last 30 lines)\n");
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Writes `text` to `file` in the cluster's directory; returns its path.
    pub fn write(&self, file: &str, text: &str) -> String {
        let path = self.dir.path().join(file);
        fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// The first machine whose fleetd runs: where `fleetctl` goes.
    fn endpoint(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.fleetd.is_some())
            .expect("a machine with a running fleetd")
    }

    /// The `release…` line `unit`'s copy on `machine` printed (from its image's `/hello`),
    /// read from the journal through fleetctl.
    pub fn hello_on(&self, unit: &str, machine: &str) -> Option<String> {
        let out = self.fleetctl(&["journal", "--machine", machine, "-n", "100", unit]);
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.split_once(" stdout ").map(|(_, text)| text.to_string()))
            .filter(|t| t.starts_with("release"))
    }

    /// `fleetctl --endpoint <a live machine's socket> ARGS`.
    pub fn fleetctl(&self, args: &[&str]) -> Output {
        self.fleetctl_on(self.endpoint(), args)
    }

    /// `fleetctl --endpoint <node's socket> ARGS`.
    pub fn fleetctl_on(&self, node: &Node, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .arg("--endpoint")
            .arg(&node.api)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `fleetctl ARGS` on `node`'s fleetd, which must succeed; returns stdout.
    pub fn ok_on(&self, node: &Node, args: &[&str]) -> String {
        let out = self.fleetctl_on(node, args);
        assert!(
            out.status.success(),
            "fleetctl {args:?} on {} failed: {}\n{}",
            node.id,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `fleetctl list-units --json` on `node`'s fleetd, `None` if it failed.
    pub fn units_on(&self, node: &Node) -> Option<Vec<Value>> {
        node.fleetd.as_ref()?;
        let out = self.fleetctl_on(node, &["list-units", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
    }

    /// `fleetctl ARGS`, which must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.fleetctl(args);
        assert!(
            out.status.success(),
            "fleetctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `fleetctl ARGS` parsed as JSON, `None` if it failed.
    pub fn try_json(&self, args: &[&str]) -> Option<Value> {
        let out = self.fleetctl(args);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `fleetctl list-units --json`, `None` if it failed.
    pub fn units(&self) -> Option<Vec<Value>> {
        self.try_json(&["list-units", "--json"])
            .and_then(|v| v.as_array().cloned())
    }

    /// Where `unit` is active: `(machine id, pid)` for every live init that runs it.
    pub fn running(&self, unit: &str) -> Vec<(String, u32)> {
        self.nodes
            .iter()
            .filter_map(|n| n.active_pid(unit).map(|pid| (n.id.clone(), pid)))
            .collect()
    }

    /// Polls until `cond` holds (bounded by [`WAIT`], with every log on failure).
    pub fn wait(&self, what: &str, cond: impl FnMut() -> bool) {
        wait_until(what, cond, || self.logs());
    }

    /// Powers machine `i` off: kills its fleetd, its init and everything init started.
    pub fn kill_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        kill(node.fleetd.take());
        kill(node.init.take());
        kill_cgroup(&node.cgroup);
    }

    /// Restarts machine `i`'s fleetd: SIGTERM (which must exit 0), then a new one.
    pub fn restart_fleetd(&mut self, i: usize) {
        let etcd = self.etcd.endpoint.clone();
        let node = &mut self.nodes[i];
        let mut child = node.fleetd.take().unwrap();
        signal(&child, rustix::process::Signal::TERM);
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > WAIT {
                let _ = child.kill();
                panic!("fleetd {} did not exit on SIGTERM", node.id);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "fleetd {} exited {status}", node.id);
        node.start_fleetd(&etcd);
    }

    /// Cuts machine `i` off the network: its host-side veth goes down, so the machine's
    /// fleetd reaches neither etcd nor the other machines (its packets are dropped, not
    /// refused), while its init and fleetd keep running. Undo with [`Cluster::restore_link`].
    pub fn cut_link(&self, i: usize) {
        ip(&["link", "set", &self.nodes[i].veth, "down"]);
    }

    /// Brings machine `i`'s link back after [`Cluster::cut_link`].
    pub fn restore_link(&self, i: usize) {
        ip(&["link", "set", &self.nodes[i].veth, "up"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            kill(node.fleetd.take());
            kill(node.init.take());
            kill_cgroup(&node.cgroup);
            ip_quiet(&["link", "del", &node.veth]);
            ip_quiet(&["netns", "del", &node.netns]);
        }
        self.etcd.kill();
        ip_quiet(&["link", "del", &self.bridge]);
    }
}
