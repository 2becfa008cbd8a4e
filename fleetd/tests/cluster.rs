//! Cluster tests on one host, after fleet's functional suite: a real etcd and three
//! "machines" (network namespaces, each with its own `flotilla-init` supervisor and
//! `fleetd`), driven with the real `fleetctl`. See `cluster/mod.rs` for the harness. Units
//! run `/bin/sleep 100000` with init's host launcher.
//!
//! Every wait polls (`fleetctl list-units --json`, each init's unit list) up to a generous
//! bound; nothing asserts on timing. The lease TTL is chosen per test so that a stalled
//! machine (the tests share 2 cores with builds and with each other) cannot expire a lease
//! the test does not mean to expire: [`STEADY_TTL_SECS`] where no machine leaves,
//! [`EXPIRY_TTL_SECS`] where one does (or etcd goes away). Needs root; run `cargo build -p
//! flotilla-init` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

// `mod cluster;` would be ambiguous with this file's own name: name the path.
#[path = "cluster/mod.rs"]
mod harness;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use harness::{Cluster, Node, FLEETD_PORT};
use serde_json::Value;

const SLEEP: &str = "[container]\ncommand = [\"/bin/sleep\", \"100000\"]\n";

fn body(fleet: &str) -> String {
    format!("{SLEEP}\n[fleet]\n{fleet}\n")
}

/// The three machines: m1 web/eu, m2 db/eu, m3 web/us.
const METADATA: [&str; 3] = [
    "role=web,region=eu",
    "role=db,region=eu",
    "role=web,region=us",
];

/// `(machine, pid)` of `unit`'s only active copy; panics if it runs more than once.
fn single(c: &Cluster, unit: &str) -> Option<(String, u32)> {
    let running = c.running(unit);
    assert!(
        running.len() <= 1,
        "{unit} runs more than once: {running:?}\n{}",
        c.logs()
    );
    running.into_iter().next()
}

/// Waits until each of `units` is active in exactly one init, on the machine `list-units`
/// names; returns unit → (machine, pid).
fn wait_placed(c: &Cluster, units: &[&str]) -> BTreeMap<String, (String, u32)> {
    let mut placed = BTreeMap::new();
    c.wait(&format!("{units:?} to be active once each"), || {
        placed.clear();
        let Some(list) = c.units() else { return false };
        for unit in units {
            let running = c.running(unit);
            let listed = list.iter().find(|u| u["name"] == *unit);
            match (running.as_slice(), listed) {
                ([(m, pid)], Some(u)) if u["machine"] == m.as_str() && u["state"] == "active" => {
                    placed.insert(unit.to_string(), (m.clone(), *pid));
                }
                _ => return false,
            }
        }
        true
    });
    placed
}

/// Watches for `for_` that every unit in `expected` keeps running, once, with the same pid
/// on the same machine (checks every 250 ms; a check fails the test at once).
fn hold(c: &Cluster, expected: &BTreeMap<String, (String, u32)>, for_: Duration) {
    let start = Instant::now();
    while start.elapsed() < for_ {
        for (unit, want) in expected {
            let running = c.running(unit);
            assert_eq!(
                running,
                vec![want.clone()],
                "{unit} was touched\n{}",
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The lease TTL of the tests where no machine leaves and etcd stays up, in seconds:
/// renewed every 10 s, a lease outlives a stall of its machine shorter than about 20 s, so
/// exact placements and "nothing moved" hold on a stalled machine.
const STEADY_TTL_SECS: u64 = 30;

/// The lease TTL of the tests that lose a machine (its lease expires) or etcd, in seconds:
/// short enough that a lost machine's units move within seconds and the engine's grace
/// after an outage (two TTLs) is short; renewed every 2 s, the other machines' leases
/// outlive a stall shorter than about 4 s (at the former 2 s TTL: about 1.3 s).
const EXPIRY_TTL_SECS: u64 = 6;

/// How long [`fleetd_restart_keeps_units`] watches that nothing is touched after the
/// restart (the former three TTLs of 2 s; its proof is the lease, not the wait).
const HOLD: Duration = Duration::from_secs(6);

/// Scenarios 1, 2 and 7 on one cluster: lifecycle; five mutually conflicting units;
/// metadata AND/OR, machine_of, replaces and one-way conflicts.
#[test]
fn lifecycle_conflicts_and_placement_rules() {
    let c = Cluster::start_with_ttl(&METADATA, STEADY_TTL_SECS);

    // submit, start, stop, destroy: the unit runs in exactly one machine's init.
    let hello = c.write("hello.toml", SLEEP);
    c.ok(&["submit", &hello]);
    let list = c.units().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["desired"], "inactive");
    c.ok(&["start", "--block-timeout", "60s", "hello"]);
    let (machine, _) = single(&c, "hello").expect("hello is active when start returns");
    let placed = wait_placed(&c, &["hello"]);
    assert_eq!(placed["hello"].0, machine);
    c.ok(&["stop", "--block-timeout", "60s", "hello"]);
    assert!(single(&c, "hello").is_none());
    let list = c.units().unwrap();
    assert_eq!(list[0]["desired"], "loaded");
    assert_eq!(list[0]["machine"], machine.as_str());
    c.ok(&["destroy", "hello"]);
    c.wait("hello to leave every init", || {
        c.nodes.iter().all(|n| {
            n.init_units()
                .is_some_and(|us| us.iter().all(|u| u.name != "hello"))
        })
    });
    assert!(c.units().unwrap().is_empty());

    // Five mutually conflicting units on three machines: three run, on different
    // machines; two say why not.
    let conflict = body("conflicts = [\"conflict@*\"]");
    let files: Vec<String> = (1..=5)
        .map(|i| c.write(&format!("conflict@{i}.toml"), &conflict))
        .collect();
    let mut args = vec!["start", "--no-block"];
    args.extend(files.iter().map(String::as_str));
    c.ok(&args);
    let names: Vec<String> = (1..=5).map(|i| format!("conflict@{i}")).collect();
    // Only the leading engine knows the reasons: ask every machine's fleetd.
    let mut reasons = BTreeMap::new();
    c.wait("3 conflict units active, 2 with a reason", || {
        let running: Vec<(String, u32)> = names.iter().flat_map(|n| c.running(n)).collect();
        let machines: BTreeSet<&String> = running.iter().map(|(m, _)| m).collect();
        if running.len() != 3 || machines.len() != 3 {
            return false;
        }
        reasons.clear();
        for node in &c.nodes {
            let Some(list) = c.units_on(node) else {
                continue;
            };
            for u in list {
                if let Some(reason) = u["reason"].as_str() {
                    reasons.insert(u["name"].as_str().unwrap().to_string(), reason.to_string());
                }
            }
        }
        reasons.len() == 2
    });
    for (unit, reason) in &reasons {
        assert!(c.running(unit).is_empty(), "{unit} runs and has a reason");
        assert!(reason.contains("conflicts with conflict@"), "{reason}");
    }
    // Every machine's fleetd knows the reasons (the leader publishes them in the
    // registry): `status` and `list-units` on each, the followers included.
    let (unit, reason) = reasons.iter().next().unwrap();
    for node in &c.nodes {
        c.wait(&format!("the reason on {}", node.id), || {
            c.units_on(node).is_some_and(|l| {
                l.iter()
                    .any(|u| u["name"] == unit.as_str() && u["reason"] == reason.as_str())
            })
        });
        let status = c.ok_on(node, &["status", unit]);
        assert!(status.contains(reason.as_str()), "{}: {status}", node.id);
    }
    let mut args = vec!["destroy"];
    args.extend(names.iter().map(String::as_str));
    c.ok(&args);

    // Metadata: different keys AND, values of one key OR; machine_of follows its target.
    let and = c.write(
        "meta-and.toml",
        &body("machine_metadata = [\"role=web\", \"region=us\"]"),
    );
    let or = c.write(
        "meta-or.toml",
        &body("machine_metadata = [\"role=db\", \"role=web\", \"region=eu\"]"),
    );
    let follower = c.write("follower.toml", &body("machine_of = [\"meta-and\"]"));
    c.ok(&["start", "--no-block", &follower, &and, &or]);
    let placed = wait_placed(&c, &["meta-and", "meta-or", "follower"]);
    assert_eq!(placed["meta-and"].0, "m3");
    assert!(["m1", "m2"].contains(&placed["meta-or"].0.as_str()));
    assert_eq!(placed["follower"].0, "m3");
    c.ok(&["destroy", "meta-and", "meta-or", "follower"]);

    // replaces: the new unit takes the old one's machine, the old one moves away.
    let old = c.write("old.toml", SLEEP);
    c.ok(&["start", "--block-timeout", "60s", &old]);
    let before = wait_placed(&c, &["old"])["old"].0.clone();
    let new = c.write("new.toml", &body("replaces = [\"old\"]"));
    c.ok(&["start", "--no-block", &new]);
    c.wait("new on old's machine, old elsewhere", || {
        let (new, old) = (c.running("new"), c.running("old"));
        new.len() == 1 && old.len() == 1 && new[0].0 == before && old[0].0 != before
    });
    wait_placed(&c, &["old", "new"]);
    c.ok(&["destroy", "old", "new"]);

    // A one-way conflict holds both ways. `picky` (on m3) conflicts with `plain`, which says
    // nothing of picky: plain, fit for m1 and m3, still keeps off m3. And `shy`, declaring a
    // conflict with the running `bold` (on m3), keeps off m3 too. Three ballast units on m1
    // make m3 the least loaded of the two, so only the conflicts keep them off it.
    let on_m1 = body("machine_metadata = [\"role=web\", \"region=eu\"]");
    start_all(&c, &["ballast@1", "ballast@2", "ballast@3"], &on_m1);
    let picky = c.write(
        "picky.toml",
        &body("conflicts = [\"plain\"]\nmachine_metadata = [\"region=us\"]"),
    );
    let bold = c.write("bold.toml", &body("machine_metadata = [\"region=us\"]"));
    c.ok(&["start", "--block-timeout", "60s", &picky, &bold]);
    let placed = wait_placed(&c, &["picky", "bold"]);
    assert_eq!(
        (placed["picky"].0.as_str(), placed["bold"].0.as_str()),
        ("m3", "m3")
    );
    let plain = c.write("plain.toml", &body("machine_metadata = [\"role=web\"]"));
    let shy = c.write(
        "shy.toml",
        &body("conflicts = [\"bold\"]\nmachine_metadata = [\"role=web\"]"),
    );
    c.ok(&["start", "--block-timeout", "60s", &plain, &shy]);
    let placed = wait_placed(&c, &["plain", "shy"]);
    assert_eq!(placed["plain"].0, "m1", "plain went next to picky");
    assert_eq!(placed["shy"].0, "m1", "shy went next to bold");
}

/// Scenario 3: a machine is lost (its fleetd, init and units killed): its units become
/// active on the others, once each; the others' units keep their pids.
#[test]
fn machine_loss_moves_its_units() {
    let mut c = Cluster::start_with_ttl(&METADATA, EXPIRY_TTL_SECS);
    let units = ["a", "b", "c", "d"];
    let before = start_all(&c, &units, SLEEP);
    let lost = before["a"].0.clone();
    let i = c.nodes.iter().position(|n| n.id == lost).unwrap();
    c.kill_node(i);
    c.wait("the lost machine to leave list-machines", || {
        c.try_json(&["list-machines", "--json"])
            .is_some_and(|v| v.as_array().is_some_and(|a| a.len() == 2))
    });
    let after = wait_placed(&c, &units);
    for (unit, (machine, pid)) in &before {
        assert_ne!(after[unit].0, lost, "{unit} is still on the lost machine");
        if *machine != lost {
            assert_eq!(after[unit], (machine.clone(), *pid), "{unit} was moved");
        }
    }
    // And it stays that way (nothing started twice later).
    hold(&c, &after, c.ttl(2));
}

/// Scenario 4: etcd killed for 30 s (unreachable) and restarted on its data directory, then frozen
/// (SIGSTOP) for four TTLs: while etcd is away, running units keep running with the same
/// pids; after the restart they still do; after the freeze every unit runs exactly once.
///
/// After a *freeze* the same pids are not guaranteed (see `etcd_freeze_keeps_pids`): the
/// restart case is strict, the freeze case checks "untouched during, no duplicates after".
#[test]
fn etcd_outage_leaves_units_alone() {
    let mut c = Cluster::start_with_ttl(&METADATA, EXPIRY_TTL_SECS);
    let before = start_abc(&c);

    // Unreachable for 30 s (killed), then restarted on the same data directory: every unit
    // keeps its process throughout, and etcd renews every lease when it comes back (its
    // leader promotion), so no machine is lost.
    c.etcd.kill();
    hold(&c, &before, Duration::from_secs(30));
    c.etcd.start();
    c.wait_machines(3);
    assert_eq!(wait_placed(&c, &UNITS), before);
    hold(&c, &before, c.ttl(3));

    // Frozen: nothing is touched while etcd does not answer.
    c.etcd.freeze();
    hold(&c, &before, c.ttl(4));
    c.etcd.resume();
    c.wait_machines(3);
    wait_placed(&c, &UNITS);
}

/// Scenario 4, strictly: the same pids after etcd was frozen for four TTLs. A frozen etcd's
/// clock keeps running, so on SIGCONT it expires every machine lease whose keep-alive has
/// not arrived yet and the machine keys vanish; the engine, whose own lease was lost in the
/// outage, holds units of missing machines for two TTLs after its new lease is granted,
/// until the agents have registered again.
#[test]
fn etcd_freeze_keeps_pids() {
    let c = Cluster::start_with_ttl(&METADATA, EXPIRY_TTL_SECS);
    let before = start_abc(&c);
    c.etcd.freeze();
    hold(&c, &before, c.ttl(4));
    c.etcd.resume();
    c.wait_machines(3);
    hold(&c, &before, c.ttl(3));
    assert_eq!(wait_placed(&c, &UNITS), before);
}

/// Scenario 5: one machine's fleetd restarted (SIGTERM, then a new one): no unit is
/// stopped, moved or started twice. The new fleetd takes over the lease its previous run
/// recorded in `--state` (`agent.lease`), so its machine never vanishes from the registry:
/// etcd shows the new run registering the machine again on the same lease (a fleetd on a
/// new lease could not register until the old lease expired, and then on the new one).
#[test]
fn fleetd_restart_keeps_units() {
    let mut c = Cluster::start_with_ttl(&METADATA, STEADY_TTL_SECS);
    let before = start_abc(&c);
    let i = c.nodes.iter().position(|n| n.id == before["a"].0).unwrap();
    let id = c.nodes[i].id.clone();
    let (lease, written) = c.machine_record(&id).expect("the machine has a record");
    c.restart_fleetd(i);
    let mut record = None;
    c.wait(
        &format!("{id}'s new fleetd to register the machine"),
        || {
            record = c.machine_record(&id);
            record.is_some_and(|(_, at)| at > written)
        },
    );
    assert_eq!(
        record.map(|(l, _)| l),
        Some(lease),
        "{id} registered again on another lease than its previous run's\n{}",
        c.logs()
    );
    hold(&c, &before, HOLD);
    c.wait_machines(3);
    assert_eq!(wait_placed(&c, &UNITS), before);
    hold(&c, &before, HOLD);
}

const UNITS: [&str; 3] = ["a", "b", "c"];

/// Starts units a, b and c (blocking) and returns where they run.
fn start_abc(c: &Cluster) -> BTreeMap<String, (String, u32)> {
    start_all(c, &UNITS, SLEEP)
}

/// Writes `units`, each with `body`, starts them (blocking) and returns where they run.
fn start_all(c: &Cluster, units: &[&str], body: &str) -> BTreeMap<String, (String, u32)> {
    let files: Vec<String> = units
        .iter()
        .map(|u| c.write(&format!("{u}.toml"), body))
        .collect();
    let mut args = vec!["start", "--block-timeout", "60s"];
    args.extend(files.iter().map(String::as_str));
    c.ok(&args);
    wait_placed(c, units)
}

/// Scenario 6: a global unit runs on every machine, one with metadata on every matching
/// machine, also on a machine that joins later.
#[test]
fn global_units_and_a_late_machine() {
    let mut c = Cluster::start_with_ttl(&METADATA[..2], STEADY_TTL_SECS);
    let all = c.write("everywhere.toml", &body("global = true"));
    let web = c.write(
        "web-only.toml",
        &body("global = true\nmachine_metadata = [\"role=web\"]"),
    );
    c.ok(&["start", "--no-block", &all, &web]);
    fn on(c: &Cluster, unit: &str) -> BTreeSet<String> {
        c.running(unit).into_iter().map(|(m, _)| m).collect()
    }
    let set = |ms: &[&str]| -> BTreeSet<String> { ms.iter().map(|m| m.to_string()).collect() };
    c.wait("globals on m1, m2 / m1", || {
        on(&c, "everywhere") == set(&["m1", "m2"]) && on(&c, "web-only") == set(&["m1"])
    });
    let i = c.add_node(METADATA[2]);
    assert_eq!(c.nodes[i].id, "m3");
    c.wait_machines(3);
    c.wait("globals on m1, m2, m3 / m1, m3", || {
        on(&c, "everywhere") == set(&["m1", "m2", "m3"]) && on(&c, "web-only") == set(&["m1", "m3"])
    });
    // list-units reports every machine's state of a global unit.
    c.wait("list-units to show 3 states for everywhere", || {
        c.units().is_some_and(|l| {
            l.iter().any(|u| {
                u["name"] == "everywhere"
                    && u["states"]
                        .as_array()
                        .is_some_and(|s| s.iter().filter(|s| s["state"] == "active").count() == 3)
            })
        })
    });
}

/// The machine ids `list-machines` shows on `node`'s fleetd, `None` if it failed.
fn machines_on(c: &Cluster, node: &Node) -> Option<BTreeSet<String>> {
    let out = c.fleetctl_on(node, &["list-machines", "--json"]);
    if !out.status.success() {
        return None;
    }
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    list.as_array()?
        .iter()
        .map(|m| m["id"].as_str().map(str::to_string))
        .collect()
}

/// Whether `list-units` on `node`'s fleetd shows `unit` assigned to `machine` and active.
fn listed_active_on(c: &Cluster, node: &Node, unit: &str, machine: &str) -> bool {
    c.units_on(node).is_some_and(|l| {
        l.iter()
            .any(|u| u["name"] == unit && u["machine"] == machine && u["state"] == "active")
    })
}

/// Cuts the link of the machine that runs all of `units` (its veth down; its init and
/// fleetd keep running), waits until every unit is active once on the other machines while
/// the cut machine keeps its own copies with the same pids (etcd unreachable never stops
/// running units: fleet's issue 1289), restores the link and waits until the machine has
/// registered again and its agent has stopped and removed its stale copies. Then every
/// unit runs exactly once, where the engine moved it, and stays there. Returns where.
fn cut_and_heal(c: &Cluster, units: &[&str]) -> BTreeMap<String, (String, u32)> {
    let before = wait_placed(c, units);
    let cut_id = before[units[0]].0.clone();
    assert!(
        before.values().all(|(m, _)| *m == cut_id),
        "{units:?} do not run on one machine: {before:?}"
    );
    let i = c.nodes.iter().position(|n| n.id == cut_id).unwrap();
    let cut = &c.nodes[i];
    // Where fleetctl goes while the link is down: a machine that still reaches etcd.
    let witness = c.nodes.iter().find(|n| n.id != cut_id).unwrap();
    let survivors: BTreeSet<String> = c
        .nodes
        .iter()
        .filter(|n| n.id != cut_id)
        .map(|n| n.id.clone())
        .collect();

    c.cut_link(i);
    let cut_copies_run = || {
        for (unit, (_, pid)) in &before {
            assert_eq!(
                cut.active_pid(unit),
                Some(*pid),
                "the cut machine's copy of {unit} was touched while etcd was unreachable\n{}",
                c.logs()
            );
        }
    };
    let mut moved = BTreeMap::new();
    c.wait(
        &format!("{units:?} to become active on other machines"),
        || {
            cut_copies_run();
            if machines_on(c, witness).as_ref() != Some(&survivors) {
                return false;
            }
            moved.clear();
            for unit in units {
                let elsewhere: Vec<(String, u32)> = c
                    .running(unit)
                    .into_iter()
                    .filter(|(m, _)| *m != cut_id)
                    .collect();
                assert!(
                    elsewhere.len() <= 1,
                    "{unit} runs twice elsewhere: {elsewhere:?}"
                );
                match elsewhere.into_iter().next() {
                    Some((m, pid)) if listed_active_on(c, witness, unit, &m) => {
                        moved.insert(unit.to_string(), (m, pid));
                    }
                    _ => return false,
                }
            }
            true
        },
    );
    // Both sides stay as they are while the link is down.
    let start = Instant::now();
    while start.elapsed() < c.ttl(2) {
        cut_copies_run();
        for (unit, copy) in &moved {
            assert!(
                c.running(unit).contains(copy),
                "the moved copy of {unit} was touched\n{}",
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    c.restore_link(i);
    let all: BTreeSet<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
    c.wait(
        "the cut machine to register again and stop its stale copies",
        || {
            machines_on(c, cut).as_ref() == Some(&all)
                && cut
                    .init_units()
                    .is_some_and(|us| us.iter().all(|u| !units.contains(&u.name.as_str())))
                && moved.iter().all(|(unit, copy)| {
                    c.running(unit) == vec![copy.clone()] && listed_active_on(c, cut, unit, &copy.0)
                })
        },
    );
    c.wait_machines(3);
    // And the engine leaves them where it moved them.
    hold(c, &moved, c.ttl(3));
    assert_eq!(wait_placed(c, units), moved);
    moved
}

/// Issue 5: the link of the machine running a unit is cut. Its lease expires and the unit
/// becomes active on another machine, while the cut machine keeps its copy running; once
/// the link is back, the machine registers again (three machines listed) and its agent
/// stops its now unassigned copy: the unit runs exactly once. See [`cut_and_heal`].
#[test]
fn link_cut_moves_units_and_heals() {
    let c = Cluster::start_with_ttl(&METADATA, EXPIRY_TTL_SECS);
    let file = c.write("mover.toml", SLEEP);
    c.ok(&["start", "--block-timeout", "60s", &file]);
    let after = cut_and_heal(&c, &["mover"]);
    assert_eq!(after.len(), 1);
}

/// Issue 5: a unit with `machine_of` another, and the link of their machine is cut: both
/// move, together, to one other machine; after the link is back each runs exactly once
/// there. See [`cut_and_heal`].
#[test]
fn link_cut_moves_machine_of_together() {
    let c = Cluster::start_with_ttl(&METADATA, EXPIRY_TTL_SECS);
    let target = c.write("target.toml", SLEEP);
    let follower = c.write("follower.toml", &body("machine_of = [\"target\"]"));
    c.ok(&["start", "--block-timeout", "60s", &target, &follower]);
    let after = cut_and_heal(&c, &["target", "follower"]);
    assert_eq!(
        after["follower"].0,
        after["target"].0,
        "follower did not follow target: {after:?}\n{}",
        c.logs()
    );
}

/// `fleetctl journal` works from any machine: a fleetd relays the request to the TCP API of
/// the machine that runs the unit (each fleetd publishes its API URL with its machine and
/// holds the cluster's token); for a global unit `--machine` picks the copy, and without it
/// the journal is ambiguous unless a copy runs on the machine asked.
#[test]
fn journal_is_relayed_from_any_machine() {
    let c = Cluster::start_with_ttl(&METADATA, STEADY_TTL_SECS);
    let talker = c.write(
        "talker.toml",
        "[container]\ncommand = [\"/bin/sh\", \"-c\", \"echo hello from the talker; exec sleep 100000\"]\n[fleet]\nmachine_metadata = [\"region=us\"]\n",
    );
    let chorus = c.write(
        "chorus.toml",
        "[container]\ncommand = [\"/bin/sh\", \"-c\", \"echo chorus line; exec sleep 100000\"]\n[fleet]\nglobal = true\nmachine_metadata = [\"role=web\"]\n",
    );
    c.ok(&["start", "--block-timeout", "60s", &talker, &chorus]);
    assert_eq!(wait_placed(&c, &["talker"])["talker"].0, "m3");
    let (m1, m2, m3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    // Every machine lists the others' API URLs.
    let machines = c.ok_on(m2, &["list-machines", "--json"]);
    let machines: Value = serde_json::from_str(&machines).unwrap();
    for node in &c.nodes {
        let m = machines
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == node.id.as_str())
            .unwrap();
        assert_eq!(m["api"], format!("http://{}:{FLEETD_PORT}", node.ip));
    }
    // talker runs on m3: asked on m1 (and on m2), the journal comes from m3's init.
    for node in [m1, m2, m3] {
        c.wait(&format!("talker's journal through {}", node.id), || {
            c.fleetctl_on(node, &["journal", "talker"])
                .status
                .success()
                .then(|| c.ok_on(node, &["journal", "talker"]))
                .is_some_and(|out| out.contains("hello from the talker"))
        });
    }
    // chorus runs on m1 and m3. On m2, which runs no copy, it is ambiguous...
    c.wait("chorus on m1 and m3", || c.running("chorus").len() == 2);
    let out = c.fleetctl_on(m2, &["journal", "chorus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("several machines") && err.contains("--machine"),
        "{err}"
    );
    // ... and --machine picks a copy, relayed; on m1 its own copy needs no choice.
    for (node, args) in [
        (m2, vec!["journal", "--machine", "m3", "chorus"]),
        (m2, vec!["journal", "--machine", "m1", "chorus"]),
        (m1, vec!["journal", "chorus"]),
    ] {
        c.wait(&format!("{args:?} on {}", node.id), || {
            let out = c.fleetctl_on(node, &args);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("chorus line")
        });
    }
    let out = c.fleetctl_on(m1, &["journal", "--machine", "m2", "chorus"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not run on a machine \"m2\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
