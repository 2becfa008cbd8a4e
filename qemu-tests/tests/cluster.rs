//! A fleet cluster of three host-image VMs under TCG (`qemu_tests::cluster`): each VM's NIC
//! is a tap on one host bridge, etcd (Debian's etcd-server) runs on the host at the bridge's
//! address, and each VM is provisioned (fw_cfg) with its address, metadata and `[fleet] etcd`
//! naming that etcd (the image's own fleetd unit reads it). Checked through the guests' debug
//! shells with the image's own `fleetctl` and `unitctl`, the way an operator would. All of
//! it over mutual TLS: etcd checks the machines' certificates, the fleetds relay journals to
//! each other with them, and the host's fleetctl needs an operator's certificate to change
//! anything.
//!
//! The power-off check proves that the machine's fleetd withdrew: from before the power
//! button until the machine is gone, the host keeps the machine's etcd lease alive itself
//! (`etcdctl lease keep-alive`, installed from Debian's `etcd-client` if missing), so the
//! lease cannot expire and only a revocation by the machine can take it out of the cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use qemu_tests::cluster::{
    active_units, fleetctl_json, machines, poll, write_file, ClusterNet, FLEETD_PORT, GLOBAL_UNIT,
    SERVICE_UNIT,
};
use qemu_tests::ensure_program;
use qemu_tests::registry::{push, RegistryOptions, TestRegistry};
use qemu_tests::{Shell, Vm};

mod common;

use common::{shell, wait_marker};

const CMD: Duration = Duration::from_secs(60);
/// The bound on a cluster-wide change (placement, reschedule) under TCG.
const SETTLE: Duration = Duration::from_secs(180);
/// The machines' lease TTL (provisioning's `[fleet] ttl`), in seconds. The power-off check
/// does not rely on it: the host keeps the powered-off machine's lease alive
/// ([`LeaseKeeper`]), so it cannot expire whatever the TTL.
const TTL_SECS: u64 = 20;
/// fleetd's default key prefix in etcd (the VMs' fleetd unit does not change it).
const PREFIX: &str = "/flotilla/";

/// The main pid of `unit` in this VM's init.
fn main_pid(sh: &mut Shell, unit: &str) -> String {
    let pid = sh
        .ok(
            &format!("unitctl status {unit} | sed -n 's/.*Main PID: //p'"),
            CMD,
        )
        .unwrap();
    assert!(!pid.trim().is_empty(), "{unit} has no main pid");
    pid.trim().to_string()
}

/// `etcdctl` against the cluster's etcd, as the operator (a client certificate of the
/// cluster CA: etcd runs with `--client-cert-auth`).
fn etcdctl(net: &ClusterNet) -> Command {
    let bin = ensure_program("etcdctl", "etcd-client").unwrap();
    let op = net.operator();
    let mut cmd = Command::new(bin);
    cmd.env("ETCDCTL_API", "3")
        .args(["--endpoints", net.endpoint(), "--cacert"])
        .arg(net.ca_cert())
        .arg("--cert")
        .arg(&op.cert)
        .arg("--key")
        .arg(&op.key);
    cmd
}

/// The id of the lease machine `id`'s registry record is written with, in hex (as etcdctl
/// takes it).
fn machine_lease(net: &ClusterNet, id: &str) -> String {
    let out = etcdctl(net)
        .args(["get", &format!("{PREFIX}machines/{id}"), "-w", "json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "etcdctl get: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let lease = json["kvs"][0]["lease"]
        .as_i64()
        .unwrap_or_else(|| panic!("machine {id} has no record with a lease: {json:#}"));
    assert_ne!(lease, 0, "machine {id}'s record has no lease: {json:#}");
    format!("{:x}", lease as u64)
}

/// `etcdctl lease keep-alive` of one lease, run by the test: while it runs the lease cannot
/// expire, only be revoked. Its output lines arrive on `lines`; killed on drop.
struct LeaseKeeper {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LeaseKeeper {
    /// Starts keeping `lease` alive and waits for etcd's first answer (the lease's TTL).
    fn start(net: &ClusterNet, lease: &str) -> LeaseKeeper {
        let mut child = etcdctl(net)
            .args(["lease", "keep-alive", lease])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut keeper = LeaseKeeper {
            child,
            lines,
            seen: Vec::new(),
        };
        keeper.wait_line("keepalived with TTL", CMD);
        keeper
    }

    /// Waits (bounded by `patience`) for an output line holding `pattern`.
    fn wait_line(&mut self, pattern: &str, patience: Duration) {
        let until = std::time::Instant::now() + patience;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(pattern);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "etcdctl lease keep-alive never said {pattern:?} in {patience:?}; it said {} \
                     line(s), the last: {:?}",
                    self.seen.len(),
                    self.seen.last()
                ),
            }
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three VMs join one etcd; a global unit runs on all three and a service on one worker;
/// a global unit submitted by tag runs the same digest everywhere after the tag moves, each
/// blob fetched from the registry once ([`pinned_image_runs_everywhere`]); the worker running the service is powered off (ACPI): its fleetd takes the machine out
/// of the cluster on the way down, the service moves to the other worker, and the global
/// unit keeps running, untouched, on the two machines left.
#[test]
fn three_vms_share_units_and_a_service_moves_on_power_off() {
    let t = tempfile::tempdir().unwrap();
    let image = common::build_image(&qemu_tests::images::host_spec(), t.path());
    let mut net = ClusterNet::new(t.path(), 3).unwrap();
    // The registry on the host's bridge address, insecure (plain HTTP) in every VM's
    // provisioned registries.toml; the two releases' layouts are written now.
    let registry = TestRegistry::start_with(
        &t.path().join("registry"),
        &RegistryOptions {
            ip: Some(&net.host_ip()),
            ..Default::default()
        },
    )
    .unwrap();
    net.insecure_registry(&registry.host());
    let layouts = [
        busybox_layout(&t.path().join("v1"), "release one\n"),
        busybox_layout(&t.path().join("v2"), "release two\n"),
    ];
    let roles = ["edge", "worker", "worker"];
    let vms: Vec<Vm> = (1..=3)
        .map(|n| net.boot(&image, n, roles[n - 1], TTL_SECS).unwrap())
        .collect();
    for vm in &vms {
        wait_marker(vm);
    }
    let mut shells: Vec<Shell> = vms.iter().map(shell).collect();
    let ids: Vec<String> = shells
        .iter_mut()
        .map(|sh| {
            sh.ok("cat /etc/machine-id", CMD)
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();

    // Every machine is registered: init's machine id, the provisioned address and metadata.
    let listed = poll(
        "3 machines in list-machines",
        SETTLE,
        || machines(&mut shells[0]),
        |m| m.len() == 3,
    )
    .unwrap();
    let expected: Vec<(String, String)> = (1..=3)
        .map(|n| (net.vm_ip(n), ids[n - 1].clone()))
        .collect();
    assert_eq!(listed, expected);
    let full = fleetctl_json(&mut shells[0], "list-machines")
        .unwrap()
        .unwrap();
    for (n, role) in roles.iter().enumerate() {
        let m = full
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == ids[n].as_str())
            .unwrap();
        assert_eq!(m["metadata"]["role"], *role, "{full:#}");
    }

    // Submit and start from vm1 (the edge machine: the service may not land there).
    write_file(&mut shells[0], "/tmp/everywhere.toml", GLOBAL_UNIT).unwrap();
    write_file(&mut shells[0], "/tmp/svc.toml", SERVICE_UNIT).unwrap();
    shells[0]
        .ok(
            "fleetctl start --block-timeout 120s /tmp/everywhere.toml /tmp/svc.toml",
            Duration::from_secs(180),
        )
        .unwrap();
    let placed = poll(
        "everywhere on 3 machines and svc on one",
        SETTLE,
        || active_units(&mut shells[0]),
        |a| {
            a.iter().filter(|(u, _)| u == "everywhere").count() == 3
                && a.iter().any(|(u, _)| u == "svc")
        },
    )
    .unwrap();
    let svc_machine = &placed.iter().find(|(u, _)| u == "svc").unwrap().1;
    let host = ids.iter().position(|id| id == svc_machine).unwrap();
    assert_ne!(host, 0, "svc placed on the edge machine: {placed:?}");
    // It runs as a container in that VM's init, with its output in the unit's log.
    let status = shells[host].ok("unitctl status svc", CMD).unwrap();
    assert!(status.contains("active (running)"), "{status}");
    let logs = shells[host].ok("unitctl logs svc", CMD).unwrap();
    assert!(logs.contains("service up"), "{logs}");
    // Its journal from the edge machine: vm1's fleetd relays to the worker's.
    let journal = shells[0].ok("fleetctl journal svc", CMD).unwrap();
    assert!(
        journal.contains(&format!("service up on vm{}", host + 1)),
        "{journal}"
    );
    for sh in shells.iter_mut() {
        let status = sh.ok("unitctl status everywhere", CMD).unwrap();
        assert!(status.contains("active (running)"), "{status}");
    }
    // From the host, as an operator's workstation would: the static fleetctl against a VM's
    // TCP API over mutual TLS with an operator's certificate; refused without one, and a
    // reader's may list but not submit.
    let fleetctl = qemu_tests::static_binaries().unwrap().join("fleetctl");
    let endpoint = format!("https://{}:{FLEETD_PORT}", net.vm_ip(2));
    let ca = net.ca_cert();
    let as_client = |cert: Option<&qemu_tests::pki::Cert>, args: &[&str]| {
        let mut cmd = std::process::Command::new(&fleetctl);
        cmd.args(["--endpoint", &endpoint, "--ca"]).arg(&ca);
        if let Some(c) = cert {
            cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
        }
        let out = cmd.args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, listed, err) = as_client(Some(net.operator()), &["list-units", "--json"]);
    assert!(ok, "{listed}{err}");
    assert!(
        listed.contains("\"svc\"") && listed.contains("everywhere"),
        "{listed}"
    );
    let (ok, _, err) = as_client(None, &["list-units"]);
    assert!(!ok && err.contains("TLS"), "{err}");
    let reader = net.reader();
    let (ok, listed, err) = as_client(Some(reader), &["list-units"]);
    assert!(ok && listed.contains("svc"), "{listed}{err}");
    let evil = t.path().join("evil.toml");
    std::fs::write(&evil, "[container]\ncommand = [\"/bin/true\"]\n").unwrap();
    let (ok, _, err) = as_client(Some(reader), &["submit", evil.to_str().unwrap()]);
    assert!(!ok && err.contains("reader"), "{err}");

    // The machine's TLS key (0600 in /etc/flotilla) is the host's: a unit over the host's
    // root, even as uid 0, finds it hidden; only the granted fleetd unit reads it.
    let on_host = shells[0]
        .ok("grep -c \"BEGIN PRIVATE\" /etc/flotilla/fleetd.key", CMD)
        .unwrap();
    assert!(on_host.trim().ends_with('1'), "{on_host}");
    write_file(&mut shells[0], "/tmp/peek.toml", PEEK_UNIT).unwrap();
    shells[0]
        .ok("unitctl load /tmp/peek.toml && unitctl start peek", CMD)
        .unwrap();
    let peek = poll(
        "the peek unit's output",
        CMD,
        || shells[0].ok("unitctl logs peek", CMD),
        |out| out.contains("peek-done"),
    )
    .unwrap();
    assert!(peek.contains("key-lines=0"), "{peek}");

    // Images: a global unit submitted by tag from the operator's workstation runs the same
    // digest on every machine after the tag moves, each blob fetched from the registry once.
    pinned_image_runs_everywhere(
        &registry,
        &layouts,
        &mut shells,
        &as_client,
        net.operator(),
        t.path(),
    );

    let other = if host == 1 { 2 } else { 1 };
    let pids_before = [
        main_pid(&mut shells[0], "everywhere"),
        main_pid(&mut shells[other], "everywhere"),
    ];

    // From here on the host keeps the service machine's lease alive: it cannot expire, so
    // the machine can only leave the cluster because its own fleetd revokes the lease.
    let lease = machine_lease(&net, &ids[host]);
    let mut keeper = LeaseKeeper::start(&net, &lease);

    // Power the service's VM off: an orderly ACPI shutdown.
    vms[host].qmp("system_powerdown").unwrap();
    let exited = vms[host].wait_exit(Duration::from_secs(120)).unwrap();
    assert!(
        exited.is_some(),
        "vm{} still runs:\n{}",
        host + 1,
        vms[host].console()
    );
    // Its fleetd saw init `stopping` and revoked its lease before the VM went down: the
    // lease the host keeps alive is gone (etcdctl's keep-alive ends on its own), and with it
    // the machine. An expiry cannot explain either.
    keeper.wait_line("expired or revoked", SETTLE);
    let left = poll(
        "the powered-off machine to leave list-machines",
        SETTLE,
        || machines(&mut shells[0]),
        |m| !m.is_empty() && !m.iter().any(|(_, id)| *id == ids[host]),
    )
    .unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    drop(keeper);
    let moved = poll(
        "svc active on the other worker",
        SETTLE,
        || active_units(&mut shells[0]),
        |a| a.contains(&("svc".to_string(), ids[other].clone())),
    )
    .unwrap();
    assert!(
        !moved.iter().any(|(_, m)| *m == ids[host]),
        "the powered-off machine still shows units: {moved:?}"
    );
    let status = shells[other].ok("unitctl status svc", CMD).unwrap();
    assert!(status.contains("active (running)"), "{status}");
    assert_eq!(machines(&mut shells[0]).unwrap().len(), 2);
    // The global unit still runs on the two machines left, with the same processes.
    let mut everywhere: Vec<&String> = moved
        .iter()
        .filter(|(u, _)| u == "everywhere")
        .map(|(_, m)| m)
        .collect();
    everywhere.sort();
    let mut left = vec![&ids[0], &ids[other]];
    left.sort();
    assert_eq!(everywhere, left, "{moved:?}");
    let pids_after = [
        main_pid(&mut shells[0], "everywhere"),
        main_pid(&mut shells[other], "everywhere"),
    ];
    assert_eq!(pids_before, pids_after, "the global unit was restarted");
}

/// An OCI layout (in `dir/layout`) of a static busybox whose `/hello` says `hello`.
fn busybox_layout(dir: &Path, hello: &str) -> PathBuf {
    qemu_tests::registry::busybox_layout(dir, hello).unwrap().0
}

/// Pushes `layout` as `REGISTRY/team/app:TAG`; returns the digest the registry now answers
/// for the tag (`sha256sum` of `skopeo inspect --raw`, which fetches no blob) and the digests
/// of the blobs its manifest names (config and layers).
fn push_app(registry: &TestRegistry, layout: &Path, tag: &str) -> (String, Vec<String>) {
    let dest = format!("{}/team/app:{tag}", registry.host());
    push(layout, &dest, &["--dest-tls-verify=false"]).unwrap();
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{dest}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {dest}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    for layer in manifest["layers"].as_array().unwrap() {
        blobs.push(layer["digest"].as_str().unwrap().to_string());
    }
    let mut sum = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        sum.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    }
    let sum = sum.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&sum.stdout);
    let hex = hex.split_whitespace().next().unwrap();
    assert_eq!(hex.len(), 64, "sha256sum said {hex:?}");
    (format!("sha256:{hex}"), blobs)
}

/// The global unit `app` of [`pinned_image_runs_everywhere`], on image `image`.
fn app_unit(image: &str) -> String {
    format!(
        "[container]\nimage = \"{image}\"\n\
         command = [\"/bin/sh\", \"-c\", \"cat /hello; exec sleep 100000\"]\n\
         [fleet]\nglobal = true\n"
    )
}

/// The `fleetctl` of the operator's workstation (the host) against a VM's TCP API:
/// `(certificate, args) -> (success, stdout, stderr)`.
type AsClient<'a> = dyn Fn(Option<&qemu_tests::pki::Cert>, &[&str]) -> (bool, String, String) + 'a;

/// Issue 12's three-VM check. Release one is pushed as `team/app:1`; the operator's
/// `fleetctl start` on the host (operator certificate, its own `--registries` naming the
/// registry insecure: the workstation resolves the tag) submits a global unit by that tag,
/// pinned to release one's digest; all three VMs pull it (their provisioned registries.toml,
/// and the other machines' fleetds as peers) and print `release one`; the registry served
/// each blob once for the three. The tag moves to release two; vm2 removes the image's tags
/// from its store and restarts the unit (a restart pulls first): it prints `release one`
/// again, never `release two`, and every VM's store holds `…/team/app:sha256-<release one>`
/// and not release two.
fn pinned_image_runs_everywhere(
    registry: &TestRegistry,
    layouts: &[PathBuf; 2],
    shells: &mut [Shell],
    as_client: &AsClient<'_>,
    operator: &qemu_tests::pki::Cert,
    dir: &Path,
) {
    // The pull's HTTP client needs CA certificates even for this plain-HTTP registry
    // (oci-client builds an HTTPS-capable client); the machines have only the image's own
    // bundle (image-build's `[root] ca_bundle`): nothing is written into /etc here.
    for sh in shells.iter_mut() {
        let bundle = sh
            .ok("readlink /etc/ssl/certs/ca-certificates.crt", CMD)
            .unwrap();
        assert!(
            bundle.contains("/usr/share/ca-certificates/ca-certificates.crt"),
            "{bundle}"
        );
    }
    let (d1, blobs1) = push_app(registry, &layouts[0], "1");
    let image = format!("{}/team/app:1", registry.host());
    let settings = dir.join("registries.toml");
    std::fs::write(
        &settings,
        format!("[registry.\"{}\"]\ninsecure = true\n", registry.host()),
    )
    .unwrap();
    let unit = dir.join("app.toml");
    std::fs::write(&unit, app_unit(&image)).unwrap();
    let (ok, out, err) = as_client(
        Some(operator),
        &[
            "start",
            "--registries",
            settings.to_str().unwrap(),
            "--block-timeout",
            "240s",
            unit.to_str().unwrap(),
        ],
    );
    if !ok {
        // The machines' own account: the unit's log holds the pull helper's output.
        let logs: Vec<String> = shells
            .iter_mut()
            .map(|sh| sh.run("unitctl logs app", CMD).unwrap().output)
            .collect();
        panic!("fleetctl start app: {out}{err}\nthe VMs' unitctl logs app:\n{logs:#?}");
    }
    assert!(
        out.contains(&format!("pinned to {d1}")),
        "fleetctl start did not pin the tag: {out}{err}"
    );
    let placed = poll(
        "app active on 3 machines",
        SETTLE,
        || active_units(&mut shells[0]),
        |a| a.iter().filter(|(u, _)| u == "app").count() == 3,
    )
    .unwrap();
    for (n, sh) in shells.iter_mut().enumerate() {
        let logs = poll(
            &format!("app's output on vm{}", n + 1),
            SETTLE,
            || sh.ok("unitctl logs app", CMD),
            |l| l.contains("release"),
        )
        .unwrap();
        assert!(logs.contains("release one"), "vm{}: {logs}", n + 1);
    }
    // Layers from peers, with the image claim: one registry fetch per blob for three VMs.
    for blob in &blobs1 {
        assert_eq!(
            registry.blob_gets(blob),
            1,
            "GETs of {blob} at the registry (app on {placed:?}); its log:\n{}",
            registry.log()
        );
    }

    // The tag moves. vm2 forgets the image (its tags; the running copy keeps its layers)
    // and restarts its copy, which pulls the unit's image again before it stops: the pinned
    // digest, release one (a tag would now be release two).
    let (d2, blobs2) = push_app(registry, &layouts[1], "1");
    assert_ne!(d1, d2);
    let list = shells[1].ok("unitctl image list", CMD).unwrap();
    let tags: Vec<String> = list
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() > 2 && cols[0].ends_with("/team/app"))
                .then(|| format!("{}:{}", cols[0], cols[1]))
        })
        .collect();
    assert!(!tags.is_empty(), "vm2's store: {list}");
    for tag in &tags {
        shells[1]
            .ok(&format!("unitctl image rm {tag}"), CMD)
            .unwrap();
    }
    let pid = main_pid(&mut shells[1], "app");
    let before = shells[1].ok("unitctl logs app", CMD).unwrap();
    let runs_before = before.matches("release").count();
    shells[1].ok("unitctl restart app", CMD).unwrap();
    let (_, _, logs) = poll(
        "app restarted on vm2 and its output",
        SETTLE,
        || {
            let status = shells[1].ok("unitctl status app", CMD)?;
            let now = shells[1].ok("unitctl status app | sed -n 's/.*Main PID: //p'", CMD)?;
            let logs = shells[1].ok("unitctl logs app", CMD)?;
            Ok((status, now.trim().to_string(), logs))
        },
        |(status, now, logs)| {
            // The new run's line: one more in a log that keeps the runs, or a log that
            // starts over.
            let runs = logs.matches("release").count();
            status.contains("active (running)")
                && !now.is_empty()
                && *now != pid
                && runs >= 1
                && (runs > runs_before || !logs.contains(before.trim()))
        },
    )
    .unwrap();
    assert!(
        !logs.contains("release two") && logs.contains("release one"),
        "vm2 after the restart: {logs}"
    );
    let (h1, h2) = (&d1["sha256:".len()..], &d2["sha256:".len()..]);
    for (n, sh) in shells.iter_mut().enumerate() {
        let list = sh.ok("unitctl image list", CMD).unwrap();
        assert!(
            // The table: NAME, TAG, DIGEST (short), ...
            list.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 2
                    && cols[0].ends_with("/team/app")
                    && cols[1] == format!("sha256-{h1}")
            }) && !list.contains(&h2[..12]),
            "vm{}'s store: {list}",
            n + 1
        );
    }
    for blob in blobs2.iter().filter(|b| !blobs1.contains(b)) {
        assert_eq!(registry.blob_gets(blob), 0, "release two's {blob} fetched");
    }
}

/// An image-less unit looking for the machine's TLS key.
const PEEK_UNIT: &str = r#"[container]
command = ["/bin/sh", "-c", "echo key-lines=$(grep -c \"BEGIN PRIVATE\" /etc/flotilla/fleetd.key); echo peek-done"]
[service]
type = "oneshot"
"#;
