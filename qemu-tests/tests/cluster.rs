//! A fleet cluster of three host-image VMs under TCG: each VM's NIC is a tap on one host
//! bridge, etcd (Debian's etcd-server) runs on the host at the bridge's address, and each VM
//! is provisioned (fw_cfg) with its address, metadata and a `fleetd` unit that names that
//! etcd. Checked through the guests' debug shells with the image's own `fleetctl` and
//! `unitctl`, the way an operator would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::{BootOptions, Shell, Vm};
use serde_json::Value;

mod common;

use common::{shell, wait_marker};

const CMD: Duration = Duration::from_secs(60);
/// The bound on a cluster-wide change (placement, reschedule) under TCG.
const SETTLE: Duration = Duration::from_secs(180);
/// The machines' lease TTL (`fleetd --ttl`), in seconds.
const TTL_SECS: u64 = 3;

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

/// A host bridge with one tap per VM and etcd listening on the bridge's address; all of
/// it removed on drop.
struct Network {
    bridge: String,
    taps: Vec<String>,
    /// `10.x.y` of the bridge's /24.
    subnet: String,
    etcd: Option<Child>,
    etcd_log: PathBuf,
    /// etcd's client URL on the bridge.
    endpoint: String,
}

impl Network {
    fn new(dir: &Path, vms: usize) -> Network {
        let pid = std::process::id();
        // 10.201-202.x.0/24: apart from fleetd's cluster tests (10.100-199.x).
        let subnet = format!("10.{}.{}", 201 + pid % 2, (pid / 2) % 250);
        let tag = format!("{:x}", pid % 0xfffff);
        let mut net = Network {
            bridge: format!("fqb{tag}"),
            taps: (1..=vms).map(|n| format!("fqt{tag}-{n}")).collect(),
            subnet,
            etcd: None,
            etcd_log: dir.join("etcd.log"),
            endpoint: String::new(),
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host_ip()),
            "dev",
            &net.bridge,
        ]);
        ip(&["link", "set", &net.bridge, "up"]);
        for tap in &net.taps {
            ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
            ip(&["link", "set", tap, "master", &net.bridge, "up"]);
        }
        net.start_etcd(dir);
        net
    }

    /// The host's address on the bridge (etcd's, and the VMs' gateway).
    fn host_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// VM `n`'s address (1-based).
    fn vm_ip(&self, n: usize) -> String {
        format!("{}.{}", self.subnet, 10 + n)
    }

    fn start_etcd(&mut self, dir: &Path) {
        let (client, peer) = (
            qemu_tests::free_port().unwrap(),
            qemu_tests::free_port().unwrap(),
        );
        self.endpoint = format!("http://{}:{client}", self.host_ip());
        let listen = format!("{},http://127.0.0.1:{client}", self.endpoint);
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(&self.etcd_log).unwrap();
        let bin = std::env::var("FLOTILLA_ETCD").unwrap_or_else(|_| "etcd".to_string());
        let child = Command::new(&bin)
            .args(["--name", "vms"])
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("vms={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e} (install etcd-server or set FLOTILLA_ETCD)")
            });
        self.etcd = Some(child);
        let start = Instant::now();
        while !qemu_tests::http_get(client, "/health").is_ok_and(|r| r.contains("true")) {
            assert!(
                start.elapsed() < CMD,
                "etcd did not become healthy:\n{}",
                std::fs::read_to_string(&self.etcd_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// VM `n`'s `-nic`: its tap, with a MAC of its own (QEMU's default is the same for all).
    fn nic(&self, n: usize) -> String {
        format!(
            "tap,ifname={},script=no,downscript=no,model=virtio-net-pci,mac=52:54:00:f1:00:{n:02x}",
            self.taps[n - 1]
        )
    }

    /// VM `n`'s provisioning: hostname `vm<n>`, its address, `role` metadata, and fleetd
    /// pointed at the host's etcd.
    fn provisioning(&self, n: usize, role: &str) -> String {
        format!(
            r#"hostname = "vm{n}"
[network]
address = "{ip}/24"
gateway = "{gw}"
[metadata]
role = "{role}"
[[units]]
name = "fleetd.toml"
contents = """
[unit]
description = "fleetd, member of the cluster on {endpoint}"
[container]
command = ["/usr/bin/fleetd", "--etcd", "{endpoint}", "--ttl", "{TTL_SECS}", "--address", "{ip}"]
network = "host"
mounts = [
    {{ host = "/run/flotilla", path = "/run/flotilla" }},
    {{ host = "/var/lib/flotilla/fleetd", path = "/var/lib/flotilla/fleetd", create = true }},
]
[service]
restart = "always"
"""
"#,
            ip = self.vm_ip(n),
            gw = self.host_ip(),
            endpoint = self.endpoint,
        )
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        for dev in self.taps.iter().chain([&self.bridge]) {
            let _ = Command::new("ip")
                .args(["link", "del", dev])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Boots VM `n` on the network with its provisioning, from its own copy of `image`.
fn boot(image: &Path, net: &Network, n: usize, role: &str) -> Vm {
    let image =
        &qemu_tests::images::machine_copy(image, &image.with_file_name(format!("vm{n}"))).unwrap();
    let config = image.join(format!("provision-vm{n}.toml"));
    std::fs::write(&config, net.provisioning(n, role)).unwrap();
    Vm::boot_with(
        image,
        &BootOptions {
            extra_args: vec![
                "-fw_cfg".into(),
                format!("name=opt/org.flotilla/config,file={}", config.display()),
            ],
            nic: Some(net.nic(n)),
            debug_shell: true,
            ..BootOptions::default()
        },
    )
    .unwrap()
}

/// `fleetctl ... --json` in a guest, parsed; None while it fails (e.g. no leader yet).
fn json(sh: &mut Shell, cmd: &str) -> Option<Value> {
    let out = sh.run(&format!("fleetctl {cmd} --json"), CMD).unwrap();
    (out.status == 0)
        .then(|| serde_json::from_str(&out.output).ok())
        .flatten()
}

/// The `(unit, machine)` pairs that are `active` in `list-units` (a global unit has one
/// state per machine).
fn active(sh: &mut Shell) -> Vec<(String, String)> {
    let Some(Value::Array(units)) = json(sh, "list-units") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for u in &units {
        let name = u["name"].as_str().unwrap_or_default();
        for s in u["states"].as_array().into_iter().flatten() {
            if s["state"] == "active" {
                let machine = s["machine"].as_str().unwrap_or_default();
                out.push((name.to_string(), machine.to_string()));
            }
        }
    }
    out.sort();
    out
}

/// Polls `cond` in `sh` until it holds; panics with `what` and the last answer.
fn wait<T: std::fmt::Debug>(
    sh: &mut Shell,
    what: &str,
    mut probe: impl FnMut(&mut Shell) -> T,
    cond: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let v = probe(sh);
        if cond(&v) {
            return v;
        }
        assert!(
            start.elapsed() < SETTLE,
            "gave up waiting for {what}; last: {v:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Writes `text` to `path` in the guest (a here-document through the shell).
fn write_file(sh: &mut Shell, path: &str, text: &str) {
    sh.ok(&format!("cat > {path} <<'EOF'\n{text}EOF"), CMD)
        .unwrap();
}

const GLOBAL: &str = r#"[unit]
description = "on every machine"
[container]
command = ["/bin/sh", "-c", "echo global unit up; exec sleep 100000"]
[fleet]
global = true
"#;

const SERVICE: &str = r#"[unit]
description = "one instance, on a worker"
[container]
command = ["/bin/sh", "-c", "echo service up; exec sleep 100000"]
[service]
restart = "always"
[fleet]
machine_metadata = ["role=worker"]
"#;

/// Three VMs join one etcd; a global unit runs on all three and a service on one worker;
/// the worker running the service is powered off (ACPI) and the service moves to the other
/// worker, while the global unit keeps running on the two machines left.
#[test]
fn three_vms_share_units_and_a_service_moves_on_power_off() {
    let t = tempfile::tempdir().unwrap();
    let image = common::build_image(&qemu_tests::images::host_spec(), t.path());
    let net = Network::new(t.path(), 3);
    let roles = ["edge", "worker", "worker"];
    let vms: Vec<Vm> = (1..=3)
        .map(|n| boot(&image, &net, n, roles[n - 1]))
        .collect();
    for vm in &vms {
        wait_marker(vm);
    }
    let mut shells: Vec<Shell> = vms.iter().map(shell).collect();
    for (i, sh) in shells.iter_mut().enumerate() {
        let status = sh.ok("unitctl status fleetd", CMD).unwrap();
        assert!(status.contains("active"), "vm{}: {status}", i + 1);
    }

    // Every machine is registered, with its provisioned address and metadata.
    let machines = wait(
        &mut shells[0],
        "3 machines in list-machines",
        |sh| json(sh, "list-machines"),
        |v| {
            v.as_ref()
                .and_then(Value::as_array)
                .is_some_and(|a| a.len() == 3)
        },
    )
    .unwrap();
    let mut seen: Vec<(String, String)> = machines
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["address"].as_str().unwrap_or_default().to_string(),
                m["metadata"]["role"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    seen.sort();
    let expected: Vec<(String, String)> = (1..=3)
        .map(|n| (net.vm_ip(n), roles[n - 1].to_string()))
        .collect();
    assert_eq!(seen, expected, "{machines:#}");
    // Machine ids by VM, from each VM's own init.
    let ids: Vec<String> = shells
        .iter_mut()
        .map(|sh| {
            let list = json(sh, "list-machines").unwrap();
            let me = sh.ok("hostname", CMD).unwrap();
            let n: usize = me.trim().trim_start_matches("vm").parse().unwrap();
            list.as_array()
                .unwrap()
                .iter()
                .find(|m| m["address"] == net.vm_ip(n))
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();

    // Submit and start from vm1 (an edge machine: the service may not land there).
    write_file(&mut shells[0], "/tmp/everywhere.toml", GLOBAL);
    write_file(&mut shells[0], "/tmp/svc.toml", SERVICE);
    shells[0]
        .ok(
            "fleetctl start --block-timeout 120s /tmp/everywhere.toml /tmp/svc.toml",
            Duration::from_secs(180),
        )
        .unwrap();
    let placed = wait(
        &mut shells[0],
        "everywhere on 3 machines and svc on a worker",
        active,
        |a| {
            a.iter().filter(|(u, _)| u == "everywhere").count() == 3
                && a.iter().any(|(u, _)| u == "svc")
        },
    );
    let svc_machine = placed
        .iter()
        .find(|(u, _)| u == "svc")
        .map(|(_, m)| m.clone())
        .unwrap();
    let host = ids.iter().position(|id| *id == svc_machine).unwrap();
    assert_ne!(host, 0, "svc placed on the edge machine: {placed:?}");
    // It runs as a container in that VM's init, with its output in the unit's log.
    let status = shells[host].ok("unitctl status svc", CMD).unwrap();
    assert!(status.contains("active (running)"), "{status}");
    let logs = shells[host].ok("unitctl logs svc", CMD).unwrap();
    assert!(logs.contains("service up"), "{logs}");
    for sh in shells.iter_mut() {
        let status = sh.ok("unitctl status everywhere", CMD).unwrap();
        assert!(status.contains("active (running)"), "{status}");
    }

    // Power the service's VM off: an orderly ACPI shutdown.
    let other = if host == 1 { 2 } else { 1 };
    vms[host].qmp("system_powerdown").unwrap();
    let exited = vms[host].wait_exit(Duration::from_secs(120)).unwrap();
    assert!(
        exited.is_some(),
        "vm{} still runs:\n{}",
        host + 1,
        vms[host].console()
    );
    let moved = wait(
        &mut shells[0],
        "svc active on the other worker",
        active,
        |a| a.contains(&("svc".to_string(), ids[other].clone())),
    );
    assert!(
        !moved.iter().any(|(_, m)| *m == ids[host]),
        "the powered-off machine still shows units: {moved:?}"
    );
    let status = shells[other].ok("unitctl status svc", CMD).unwrap();
    assert!(status.contains("active (running)"), "{status}");
    let machines = json(&mut shells[0], "list-machines").unwrap();
    assert_eq!(machines.as_array().unwrap().len(), 2, "{machines:#}");
    // The global unit still runs on the two machines left, untouched.
    let everywhere: Vec<String> = moved
        .iter()
        .filter(|(u, _)| u == "everywhere")
        .map(|(_, m)| m.clone())
        .collect();
    let mut left = vec![ids[0].clone(), ids[other].clone()];
    left.sort();
    assert_eq!(everywhere, left, "{moved:?}");
}
