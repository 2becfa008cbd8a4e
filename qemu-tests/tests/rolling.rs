//! Issue 13's cluster part in QEMU: three VMs booted from their own copies of a v1
//! `disk.img` (OVMF, systemd-boot) form a fleet cluster on etcd (mutual TLS); a service (one
//! instance, restart always) and a global unit run; the operator rolls the signed v2 update
//! through the cluster from the host (`fleetctl os update REF --max-unavailable 1`, the
//! payload an OCI artifact in a registry on the cluster's bridge) while the host probes the
//! service on the VMs' addresses five times a second and counts the machines present once a
//! second.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use qemu_tests::cluster::GLOBAL_UNIT;
use qemu_tests::rolling::{build_releases, RollingCluster, RolloutRun, SERVICE_UNIT};

/// The trial before a machine commits its new slot (provisioned `[os] commit_after`,
/// kept in `/var`): short, to keep the test short; a real host keeps the default (30 s).
const PROVISION_OS: &str = "[os]\ncommit_after = \"5s\"\n";
/// Patience for the whole rollout of three machines under TCG on a shared host (one
/// machine: drain, pull and write ~30 MB, reboot through the firmware, commit); only a
/// bound for waiting.
const ROLLOUT_PATIENCE: Duration = Duration::from_secs(2400);
/// Patience for the cluster to settle (units placed, machine records updated).
const SETTLE: Duration = Duration::from_secs(300);

/// Prints what the prober saw: rounds, the unanswered ones with their misses, the most
/// machines missing at once.
fn report(run: &RolloutRun, total: usize) {
    let unanswered = run.unanswered();
    println!(
        "rollout to {} at max-unavailable {}: {} after {:.1} s; {} probe rounds, {} unanswered, \
         at most {} of {total} machines missing at a count ({} counts, {} failed)",
        run.version,
        run.max_unavailable,
        run.state,
        run.secs,
        run.rounds.len(),
        unanswered.len(),
        run.most_missing(total),
        run.counts.len(),
        run.uncounted(),
    );
    for r in &unanswered {
        println!("  unanswered at {:.1} s: {}", r.at, r.misses.join("; "));
    }
    let mut present = None;
    for c in &run.counts {
        if c.present != present {
            println!("  [{:>7.1} s] machines present: {:?}", c.at, c.present);
            present = c.present;
        }
    }
    let mut answered = None;
    for r in &run.rounds {
        if let Some(vm) = r.answered.filter(|_| r.answered != answered) {
            println!("  [{:>7.1} s] the service answers on vm{vm}", r.at);
            answered = r.answered;
        }
    }
}

/// Three disk-booted v1 VMs; a service and a global unit; `fleetctl os update` to v2 with
/// `--max-unavailable 1` from the host. The rollout finishes; at no poll is more than one
/// machine missing from the registry; the service answered in every probe round; all
/// three machines report 2.0.0 committed; the global unit runs on all three again and the
/// service on one.
#[test]
fn three_disk_booted_vms_roll_to_v2_while_a_service_keeps_answering() {
    let t = tempfile::tempdir().unwrap();
    let releases = build_releases(t.path(), &["1.0.0", "2.0.0"]).unwrap();
    for r in &releases {
        println!(
            "image-build os --os-version {} --sign: {:.1} s",
            r.version, r.build_secs
        );
    }
    let cluster = RollingCluster::start(t.path(), &releases[0], 3, PROVISION_OS).unwrap();
    let reference = cluster.publish(&releases[1]).unwrap();

    // Every machine runs v1 (list-machines' VERSION).
    let listed = cluster
        .poll_json("3 machines on 1.0.0", &["list-machines", "--json"], |m| {
            m.as_array()
                .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["os_version"] == "1.0.0"))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", consoles(&cluster)));
    assert_eq!(listed.as_array().map(Vec::len), Some(3));
    let (_, table, _) = cluster.fleetctl(&["list-machines"]).unwrap();
    println!("{table}");

    cluster
        .start_units(&[("everywhere", GLOBAL_UNIT), ("svc", SERVICE_UNIT)])
        .unwrap();
    let placed = poll(SETTLE, || {
        let a = cluster.active_units().unwrap();
        (a.iter().filter(|(u, _)| u == "everywhere").count() == 3
            && a.iter().filter(|(u, _)| u == "svc").count() == 1)
            .then_some(a)
    })
    .unwrap_or_else(|| panic!("units not placed: {:?}", cluster.active_units()));
    println!("placed: {placed:?}");
    poll(SETTLE, || (1..=3).find(|n| cluster.probe(*n).is_ok()))
        .expect("the service never answered");

    let settings = cluster.registries_file().unwrap();
    let run = cluster
        .roll(
            &reference,
            "2.0.0",
            1,
            &["--registries", settings.to_str().unwrap()],
            ROLLOUT_PATIENCE,
        )
        .unwrap();
    report(&run, 3);
    println!(
        "whole three-VM rolling update (max-unavailable 1): {:.1} s",
        run.secs
    );
    assert_eq!(
        run.state,
        "finished",
        "the rollout did not finish: {:#}\n{}",
        run.status,
        consoles(&cluster)
    );
    let machines = run.status["rollout"]["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 3, "{:#}", run.status);
    assert!(
        machines.iter().all(|m| m["step"] == "done"),
        "{:#}",
        run.status
    );
    // Every machine went through the rollout one at a time.
    assert!(
        run.most_missing(3) <= 1,
        "more than one machine missing at a count (max-unavailable 1): {:?}",
        run.counts
            .iter()
            .filter(|c| c.present.is_some_and(|p| p < 2))
            .collect::<Vec<_>>()
    );
    // Each machine did leave (its reboot): the counting saw it.
    assert!(
        run.most_missing(3) == 1,
        "no machine was ever missing: {:?}",
        run.counts
    );
    // The service moved while it was probed (its machine was drained like every other),
    // so the probes below watched hand-overs, not one copy that never moved.
    let mut answering: Vec<usize> = run.rounds.iter().filter_map(|r| r.answered).collect();
    answering.sort();
    answering.dedup();
    assert!(
        answering.len() >= 2,
        "the service answered only on {answering:?} during the rollout: {:#?}",
        run.steps
    );
    let unanswered = run.unanswered();
    assert!(
        unanswered.is_empty(),
        "the service did not answer in {} of {} probe rounds: {:?}\nsteps: {:#?}",
        unanswered.len(),
        run.rounds.len(),
        unanswered,
        run.steps
    );

    // All three on 2.0.0, committed by health; the units back where they belong.
    let after = cluster
        .poll_json(
            "3 machines on 2.0.0 committed",
            &["os", "status", "--json"],
            |s| {
                s["machines"].as_array().is_some_and(|m| {
                    m.len() == 3
                        && m.iter()
                            .all(|m| m["os_version"] == "2.0.0" && m["update"] == "committed")
                })
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", consoles(&cluster)));
    let (_, table, _) = cluster.fleetctl(&["os", "status"]).unwrap();
    println!("{table}");
    for m in after["machines"].as_array().unwrap() {
        assert_eq!(m["os"]["booted"], "b", "{m:#}");
    }
    let units = poll(SETTLE, || {
        let a = cluster.active_units().unwrap();
        (a.iter().filter(|(u, _)| u == "everywhere").count() == 3
            && a.iter().filter(|(u, _)| u == "svc").count() == 1)
            .then_some(a)
    })
    .unwrap_or_else(|| panic!("units after the rollout: {:?}", cluster.active_units()));
    println!("after: {units:?}");
    for (n, vm) in cluster.vms().iter().enumerate() {
        let console = vm.console();
        assert!(
            console.contains("booted slot b"),
            "vm{} never booted slot b:\n{console}",
            n + 1
        );
    }
}

/// Asks `probe` every second until it answers `Some`, for at most `patience`.
fn poll<T>(patience: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if start.elapsed() > patience {
            return None;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The last lines of every VM's console, for a failure's message.
fn consoles(cluster: &RollingCluster) -> String {
    let mut out = String::new();
    for (n, vm) in cluster.vms().iter().enumerate() {
        let console = vm.console();
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        out.push_str(&format!(
            "--- vm{} ({}), last lines:\n{tail}\n",
            n + 1,
            vm.log_path().display()
        ));
    }
    out
}
