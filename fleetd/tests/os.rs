//! Issue 13's cluster foundations on the namespace-machine harness of `tests/cluster.rs`
//! (real etcd, real fleetds, the real `fleetctl`): each machine publishes its host's OS
//! version and A/B update state, read from files the test writes per machine
//! (`Node::os_file`: os-release, the kernel command line, an ESP directory with boot
//! entries; each fleetd reads them every second), and the reboot lock is held on a
//! machine's presence lease, so killing that machine's fleetd frees it. Needs root and
//! etcd; run `cargo build -p flotilla-init` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "cluster/mod.rs"]
mod harness;
mod support;

use std::fs;
use std::sync::Arc;
use std::time::Instant;

use flotilla_fleetd::{EtcdConfig, EtcdRegistry, LeaseId, RebootLock, Registry};
use harness::{Cluster, Node};
use serde_json::Value;

/// A machine is lost in the lock case: the lease TTL of `tests/cluster.rs`' expiry cases.
const TTL_SECS: u64 = 6;

/// Writes a systemd-boot entry of `slot` (file name `file`, e.g. `flotilla-b+3.conf`) in
/// `node`'s ESP, removing the slot's other entries (as `entries::install` does).
fn entry(node: &Node, file: &str, version: &str) {
    let dir = node.os_file("esp").join("loader/entries");
    fs::create_dir_all(&dir).unwrap();
    let slot = &file["flotilla-".len().."flotilla-".len() + 1];
    for old in fs::read_dir(&dir).unwrap() {
        let old = old.unwrap().file_name().into_string().unwrap();
        if old.starts_with(&format!("flotilla-{slot}")) {
            fs::remove_file(dir.join(old)).unwrap();
        }
    }
    fs::write(
        dir.join(file),
        format!(
            "title Flotilla {version} (slot {slot})\nsort-key flotilla\nversion {version}\n\
             linux /flotilla/{slot}/vmlinuz\ninitrd /flotilla/{slot}/initramfs.img\n\
             options flotilla.slot={slot}\n"
        ),
    )
    .unwrap();
}

fn os_release(node: &Node, version: &str) {
    fs::write(
        node.os_file("os-release"),
        format!("ID=flotilla\nNAME=Flotilla\nVERSION_ID=\"{version}\"\n"),
    )
    .unwrap();
}

fn boot_slot(node: &Node, slot: &str) {
    fs::write(
        node.os_file("cmdline"),
        format!("console=ttyS0 quiet flotilla.slot={slot} flotilla.root=flotilla-root-{slot}\n"),
    )
    .unwrap();
}

/// `machine`'s entry in `list-machines --json`.
fn listed(c: &Cluster, machine: &str) -> Option<Value> {
    let machines = c.try_json(&["list-machines", "--json"])?;
    machines
        .as_array()?
        .iter()
        .find(|m| m["id"] == machine)
        .cloned()
}

/// `machine`'s entry in `os status --json`.
fn os_status(c: &Cluster, machine: &str) -> Option<Value> {
    let status = c.try_json(&["os", "status", "--json"])?;
    status["machines"]
        .as_array()?
        .iter()
        .find(|m| m["id"] == machine)
        .cloned()
}

/// The machines that hold the reboot lock, as `os status --json` says.
fn lock_holders(c: &Cluster) -> Option<Vec<String>> {
    let status = c.try_json(&["os", "status", "--json"])?;
    Some(
        status["reboot_lock"]
            .as_array()?
            .iter()
            .map(|h| h["machine"].as_str().unwrap_or_default().to_string())
            .collect(),
    )
}

/// The whitespace-separated cells of `machine`'s row in a fleetctl table.
fn table_row(out: &str, machine: &str) -> Vec<String> {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(machine))
        .unwrap_or_else(|| panic!("no row for {machine} in\n{out}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn machines_publish_their_os_version_and_update_state() {
    let c = Cluster::start_with_ttl(&["role=web", "role=web", "role=db"], TTL_SECS);
    let (m1, m2) = (&c.nodes[0], &c.nodes[1]);
    // No os-release and no A/B boot yet: nothing published, the JSON carries neither key.
    let first = listed(&c, "m3").unwrap();
    assert!(first.get("os_version").is_none(), "{first}");
    assert!(first.get("os").is_none(), "{first}");

    // m1: a plain host with a version; m2: booted slot a (1.5.0, committed) with an update
    // to 2.0.0 installed in slot b on trial, which boots next; m3: nothing.
    os_release(m1, "1.4.0");
    os_release(m2, "1.5.0");
    entry(m2, "flotilla-a.conf", "1.5.0");
    entry(m2, "flotilla-b+3.conf", "2.0.0");
    boot_slot(m2, "a");
    c.wait("m1 and m2 to publish their OS", || {
        listed(&c, "m1").is_some_and(|m| m["os_version"] == "1.4.0")
            && listed(&c, "m2")
                .is_some_and(|m| m["os_version"] == "1.5.0" && m["os"]["next"] == "b")
    });
    let m2_record = listed(&c, "m2").unwrap();
    assert_eq!(m2_record["os"]["booted"], "a", "{m2_record}");
    let slots = m2_record["os"]["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 2, "{m2_record}");
    assert_eq!(
        (&slots[1]["slot"], &slots[1]["version"], &slots[1]["state"]),
        (&"b".into(), &"2.0.0".into(), &"trying".into())
    );
    assert_eq!(slots[1]["tries_left"], 3);
    let m1_record = listed(&c, "m1").unwrap();
    assert!(m1_record.get("os").is_none(), "{m1_record}");
    let m3_record = listed(&c, "m3").unwrap();
    assert!(m3_record.get("os_version").is_none(), "{m3_record}");

    let table = c.ok(&["list-machines"]);
    println!("{table}");
    assert_eq!(
        table_row(&table, "MACHINE")[..5],
        ["MACHINE", "IP", "VERSION", "UPDATE", "METADATA"]
    );
    assert_eq!(table_row(&table, "m1")[2..5], ["1.4.0", "-", "role=web"]);
    assert_eq!(
        table_row(&table, "m2")[2..5],
        ["1.5.0", "reboot-pending", "role=web"]
    );
    assert_eq!(table_row(&table, "m3")[2..5], ["-", "-", "role=db"]);

    // m2 "reboots" into slot b: the loader counted one try; the update is on trial.
    entry(m2, "flotilla-b+2-1.conf", "2.0.0");
    boot_slot(m2, "b");
    os_release(m2, "2.0.0");
    c.wait("m2 on trial in 2.0.0", || {
        os_status(&c, "m2").is_some_and(|m| m["update"] == "trial" && m["os_version"] == "2.0.0")
    });
    // Committed (`unitctl os commit` renames the entry).
    entry(m2, "flotilla-b.conf", "2.0.0");
    c.wait("m2 committed", || {
        os_status(&c, "m2").is_some_and(|m| m["update"] == "committed")
    });
    let status = c.ok(&["os", "status"]);
    println!("{status}");
    let row = table_row(&status, "m2");
    assert_eq!(row[1..5], ["2.0.0", "committed", "b", "b"], "{status}");
    assert!(status.contains("reboot lock: free"), "{status}");
    // A machine that stops being an A/B host (booted directly) drops the section again.
    fs::write(m2.os_file("cmdline"), "console=ttyS0\n").unwrap();
    c.wait("m2's update state to go", || {
        listed(&c, "m2").is_some_and(|m| m.get("os").is_none() && m["os_version"] == "2.0.0")
    });
}

/// The reboot lock on the machines' presence leases: m1 takes the only slot on its own
/// lease, m2 is refused and told m1 holds it, `fleetctl os status` shows it; m1's fleetd and
/// init are killed (nobody releases anything) and the slot is free once its lease expires,
/// so m2 gets it.
#[test]
fn a_machine_killed_holding_the_reboot_lock_frees_it() {
    let mut c = Cluster::start_with_ttl(&["role=web", "role=web", "role=db"], TTL_SECS);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry: Arc<dyn Registry> = Arc::new(
        runtime
            .block_on(EtcdRegistry::connect(EtcdConfig::new(vec![c
                .etcd
                .endpoint
                .clone()])))
            .unwrap(),
    );
    let lease_of = |c: &Cluster, id: &str| LeaseId(c.machine_record(id).unwrap().0);
    let (l1, l2) = (lease_of(&c, "m1"), lease_of(&c, "m2"));
    assert_eq!(
        runtime
            .block_on(registry.acquire_reboot_lock("m1", l1, 1))
            .unwrap(),
        RebootLock::Acquired
    );
    match runtime
        .block_on(registry.acquire_reboot_lock("m2", l2, 1))
        .unwrap()
    {
        RebootLock::Held(by) => assert_eq!(by[0].machine, "m1"),
        other => panic!("m1 holds the only slot: {other:?}"),
    }
    assert_eq!(lock_holders(&c).unwrap(), ["m1"]);
    assert_eq!(os_status(&c, "m1").unwrap()["reboot_lock"], true);
    assert_eq!(os_status(&c, "m2").unwrap()["reboot_lock"], false);
    let status = c.ok_on(&c.nodes[2], &["os", "status"]);
    println!("{status}");
    assert!(table_row(&status, "m1")[6].starts_with("held"), "{status}");
    assert!(status.contains("reboot lock: 1 slot(s) held"), "{status}");

    let killed = Instant::now();
    c.kill_node(0);
    c.wait("m1's slot to be freed with its lease", || {
        lock_holders(&c).is_some_and(|h| h.is_empty())
    });
    println!(
        "m1 killed → its reboot-lock slot free after {:?} (TTL {TTL_SECS} s)",
        killed.elapsed()
    );
    assert_eq!(
        runtime
            .block_on(registry.acquire_reboot_lock("m2", l2, 1))
            .unwrap(),
        RebootLock::Acquired
    );
    assert_eq!(lock_holders(&c).unwrap(), ["m2"]);
}
