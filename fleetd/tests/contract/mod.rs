//! The registry contract: every case runs against every backend (`tests/embedded.rs`,
//! `tests/etcd.rs`) through `contract_tests!`. Cases assert behaviour, never time: waits are
//! bounded by a generous [`WAIT`] and only fail a test that would otherwise hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_fleetd::{
    body_hash, Campaign, Cas, Change, DesiredState, Event, LeaseId, Machine, RebootLock, Registry,
    RegistryError, Rollout, RolloutHalt, RolloutStart, RolloutState, RolloutStep, UnitRecord,
    UnitState, Watch,
};
use flotilla_init_api::{ActiveState, SubState};

/// The bound on every wait; reaching it fails the test.
pub const WAIT: Duration = Duration::from_secs(30);

/// A lease TTL for leases that are kept alive (renewed every 250 ms).
pub const LONG_TTL: Duration = Duration::from_secs(5);

/// What a case runs against.
pub struct Env {
    /// The registry under test.
    pub registry: Arc<dyn Registry>,
    /// A second handle on the same registry (a second etcd client; the same embedded one).
    pub other: Arc<dyn Registry>,
    /// A short TTL for leases that are meant to expire.
    pub ttl: Duration,
    /// Keeps the backend alive (temp dir, etcd process).
    pub _guard: Box<dyn Any + Send + Sync>,
}

/// Runs every contract case as a test; `$setup` is an expression giving a future of [`Env`].
#[macro_export]
macro_rules! contract_tests {
    ($setup:expr) => {
        $crate::contract_tests!(@cases $setup;
            units_and_bodies_round_trip,
            desired_state_changes,
            content_addressing,
            machines_register_list_and_expire,
            machine_id_held_by_another_lease,
            assignment_cas_two_concurrent_assigners,
            reassign_only_from_expected_machine,
            leader_one_winner_then_takeover_after_expiry,
            leader_resign,
            reasons_belong_to_the_leader,
            watch_sees_changes_in_order_from_revision,
            watch_from_zero_sees_only_new_changes,
            reported_states_vanish_with_their_lease,
            snapshot_is_one_consistent_read,
            invalid_input_is_rejected,
            reboot_lock_admits_at_most_n_under_concurrent_acquires,
            reboot_lock_release_and_reacquire,
            reboot_lock_is_freed_when_the_holders_lease_ends,
            rollout_starts_once_under_concurrent_starts,
            rollout_is_moved_on_only_by_the_leader,
        );
    };
    (@cases $setup:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let env = $setup.await;
                contract::$case(&env).await;
            }
        )*
    };
}

// --- helpers ---------------------------------------------------------------------------------

/// A task that keeps a lease alive until dropped.
pub struct KeepAlive(tokio::task::JoinHandle<()>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps `lease` alive every 250 ms until the returned guard is dropped.
pub fn keep_alive(registry: &Arc<dyn Registry>, lease: LeaseId) -> KeepAlive {
    let registry = registry.clone();
    KeepAlive(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Err(e) = registry.keep_alive(lease).await {
                eprintln!("keep-alive of lease {lease} failed: {e}");
            }
        }
    }))
}

/// The next event of a watch, failing the test on an error, an end or after [`WAIT`].
pub async fn next_event(watch: &mut Watch) -> Event {
    match tokio::time::timeout(WAIT, watch.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

/// Events up to and including the first one that matches `done`.
pub async fn events_until(watch: &mut Watch, done: impl Fn(&Change) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = next_event(watch).await;
        let finished = done(&event.change);
        events.push(event);
        if finished {
            return events;
        }
    }
}

/// Waits (watching from `from`) until `machine` is removed.
pub async fn wait_machine_removed(registry: &Arc<dyn Registry>, from: u64, machine: &str) {
    let mut watch = registry.watch(from).await.expect("watch");
    events_until(
        &mut watch,
        |c| matches!(c, Change::MachineRemoved { id } if id == machine),
    )
    .await;
}

pub fn unit(name: &str, hash: &str, desired: DesiredState) -> UnitRecord {
    UnitRecord {
        name: name.to_string(),
        hash: hash.to_string(),
        desired,
    }
}

pub fn machine(id: &str) -> Machine {
    Machine {
        id: id.to_string(),
        address: format!("127.0.0.{}", id.len()),
        metadata: BTreeMap::from([("region".to_string(), "test".to_string())]),
        api: Some(format!("http://127.0.0.{}:4002", id.len())),
        images: Vec::new(),
        os_version: String::new(),
        os: None,
    }
}

pub fn state(unit: &str, machine: &str) -> UnitState {
    UnitState {
        unit: unit.to_string(),
        machine: machine.to_string(),
        hash: None,
        active: ActiveState::Active.into(),
        sub: SubState::Running.into(),
        pid: Some(42),
        updated_at: 1_700_000_000_000,
    }
}

/// Stores a body and a unit using it.
pub async fn submit(r: &Arc<dyn Registry>, name: &str, desired: DesiredState) -> UnitRecord {
    let hash = r
        .put_body(&format!(
            "# {name}\n[container]\ncommand = [\"/bin/true\"]\n"
        ))
        .await
        .unwrap();
    let record = unit(name, &hash, desired);
    r.put_unit(&record).await.unwrap();
    record
}

fn kinds(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| match &e.change {
            Change::UnitPut(u) => format!("unit+ {} {}", u.name, u.desired),
            Change::UnitRemoved { name } => format!("unit- {name}"),
            Change::BodyPut { .. } => "body+".to_string(),
            Change::BodyRemoved { .. } => "body-".to_string(),
            Change::MachinePut(m) => format!("machine+ {}", m.id),
            Change::MachineRemoved { id } => format!("machine- {id}"),
            Change::Assigned(a) => format!("assign {} {}", a.unit, a.machine),
            Change::Unassigned { unit } => format!("unassign {unit}"),
            Change::StatePut(s) => format!("state+ {} {}", s.unit, s.machine),
            Change::StateRemoved { unit, machine } => format!("state- {unit} {machine}"),
            Change::LeaderPut(l) => format!("leader+ {}", l.id),
            Change::LeaderRemoved => "leader-".to_string(),
            Change::RolloutPut(r) => format!("rollout {}", r.state),
        })
        .collect()
}

// --- cases -------------------------------------------------------------------------------------

pub async fn units_and_bodies_round_trip(env: &Env) {
    let r = &env.registry;
    let body = "[unit]\ndescription = \"Web — ünïcode\"\n[container]\ncommand = [\"/bin/true\"]\n";
    let hash = r.put_body(body).await.unwrap();
    assert_eq!(hash, body_hash(body));
    assert_eq!(r.get_body(&hash).await.unwrap().as_deref(), Some(body));
    assert_eq!(r.list_bodies().await.unwrap(), vec![hash.clone()]);

    let web = unit("web", &hash, DesiredState::Launched);
    r.put_unit(&web).await.unwrap();
    let db = unit("db", &hash, DesiredState::Inactive);
    r.put_unit(&db).await.unwrap();
    assert_eq!(r.get_unit("web").await.unwrap(), Some(web.clone()));
    assert_eq!(env.other.get_unit("web").await.unwrap(), Some(web.clone()));
    let listed = r.list_units().await.unwrap();
    assert_eq!(listed.items, vec![db.clone(), web.clone()]);
    assert!(listed.revision > 0);

    let missing = body_hash("not stored");
    match r
        .put_unit(&unit("ghost", &missing, DesiredState::Loaded))
        .await
    {
        Err(RegistryError::MissingBody { name, hash }) => {
            assert_eq!((name.as_str(), hash.as_str()), ("ghost", missing.as_str()));
        }
        other => panic!("expected MissingBody, got {other:?}"),
    }
    assert_eq!(r.get_unit("ghost").await.unwrap(), None);
    assert_eq!(r.get_body(&missing).await.unwrap(), None);

    assert!(r.remove_unit("web").await.unwrap());
    assert!(!r.remove_unit("web").await.unwrap());
    assert_eq!(r.get_unit("web").await.unwrap(), None);
    assert_eq!(r.list_units().await.unwrap().items, vec![db]);

    assert!(r.remove_body(&hash).await.unwrap());
    assert!(!r.remove_body(&hash).await.unwrap());
    assert_eq!(r.get_body(&hash).await.unwrap(), None);
    assert!(r.list_bodies().await.unwrap().is_empty());
}

pub async fn desired_state_changes(env: &Env) {
    let r = &env.registry;
    submit(r, "web", DesiredState::Inactive).await;
    let updated = r.set_desired("web", DesiredState::Loaded).await.unwrap();
    assert_eq!(updated.desired, DesiredState::Loaded);
    assert_eq!(
        r.get_unit("web").await.unwrap().map(|u| u.desired),
        Some(DesiredState::Loaded)
    );
    let updated = env
        .other
        .set_desired("web", DesiredState::Launched)
        .await
        .unwrap();
    assert_eq!(updated.desired, DesiredState::Launched);
    assert_eq!(
        r.list_units().await.unwrap().items[0].desired,
        DesiredState::Launched
    );
    r.set_desired("web", DesiredState::Inactive).await.unwrap();
    assert_eq!(
        r.get_unit("web").await.unwrap().map(|u| u.desired),
        Some(DesiredState::Inactive)
    );
    match r.set_desired("nope", DesiredState::Launched).await {
        Err(RegistryError::UnknownUnit { name }) => assert_eq!(name, "nope"),
        other => panic!("expected UnknownUnit, got {other:?}"),
    }
}

pub async fn content_addressing(env: &Env) {
    let r = &env.registry;
    let body = "[container]\ncommand = [\"/bin/sleep\", \"60\"]\n";
    let first = r.put_body(body).await.unwrap();
    let revision = r.snapshot().await.unwrap().revision;
    let second = env.other.put_body(body).await.unwrap();
    assert_eq!(first, second);
    // Stored once: the second put wrote nothing.
    assert_eq!(r.snapshot().await.unwrap().revision, revision);
    assert_eq!(r.list_bodies().await.unwrap(), vec![first.clone()]);

    r.put_unit(&unit("a", &first, DesiredState::Launched))
        .await
        .unwrap();
    r.put_unit(&unit("b", &first, DesiredState::Launched))
        .await
        .unwrap();
    let other_body = r
        .put_body("[container]\ncommand = [\"/bin/false\"]\n")
        .await
        .unwrap();
    assert_ne!(other_body, first);
    let mut expected = vec![first.clone(), other_body];
    expected.sort();
    assert_eq!(r.list_bodies().await.unwrap(), expected);
    let units = r.list_units().await.unwrap().items;
    assert!(units.iter().all(|u| u.hash == first));
}

pub async fn machines_register_list_and_expire(env: &Env) {
    let r = &env.registry;
    let kept = r.grant_lease(LONG_TTL).await.unwrap();
    let _keeper = keep_alive(r, kept);
    let expiring = r.grant_lease(env.ttl).await.unwrap();
    assert_ne!(kept, expiring);
    r.register_machine(&machine("m1"), kept).await.unwrap();
    env.other
        .register_machine(&machine("m2"), expiring)
        .await
        .unwrap();
    let listed = r.list_machines().await.unwrap();
    assert_eq!(listed.items, vec![machine("m1"), machine("m2")]);
    assert_eq!(r.get_machine("m2").await.unwrap(), Some(machine("m2")));

    // Updating one's own record on the same lease is fine.
    let mut moved = machine("m1");
    moved.address = "127.0.0.9".to_string();
    r.register_machine(&moved, kept).await.unwrap();
    assert_eq!(r.get_machine("m1").await.unwrap(), Some(moved.clone()));

    // m2's lease is not kept alive: it expires and m2 disappears; m1 stays.
    wait_machine_removed(r, listed.revision + 1, "m2").await;
    assert_eq!(r.list_machines().await.unwrap().items, vec![moved]);
    assert_eq!(r.get_machine("m2").await.unwrap(), None);
    match r.keep_alive(expiring).await {
        Err(RegistryError::LeaseExpired { lease }) => assert_eq!(lease, expiring),
        other => panic!("expected LeaseExpired, got {other:?}"),
    }
    assert!(matches!(
        r.register_machine(&machine("m3"), expiring).await,
        Err(RegistryError::LeaseExpired { .. })
    ));

    // Revoking ends it at once; revoking again is fine.
    r.revoke_lease(kept).await.unwrap();
    assert!(r.list_machines().await.unwrap().items.is_empty());
    r.revoke_lease(kept).await.unwrap();
}

pub async fn machine_id_held_by_another_lease(env: &Env) {
    let r = &env.registry;
    let first = r.grant_lease(LONG_TTL).await.unwrap();
    let second = r.grant_lease(LONG_TTL).await.unwrap();
    r.register_machine(&machine("m1"), first).await.unwrap();
    match env.other.register_machine(&machine("m1"), second).await {
        Err(RegistryError::MachineIdTaken { id, holder }) => {
            assert_eq!(id, "m1");
            assert_eq!(holder, first);
        }
        other => panic!("expected MachineIdTaken, got {other:?}"),
    }
    // Once the holder's lease is gone, the id is free again.
    r.revoke_lease(first).await.unwrap();
    env.other
        .register_machine(&machine("m1"), second)
        .await
        .unwrap();
    r.revoke_lease(second).await.unwrap();
}

pub async fn assignment_cas_two_concurrent_assigners(env: &Env) {
    let r = &env.registry;
    let names: Vec<String> = (0..10).map(|i| format!("unit{i}")).collect();
    for name in &names {
        submit(r, name, DesiredState::Launched).await;
    }
    for name in &names {
        let (a, b) = tokio::join!(
            r.assign(name, "m1", None),
            env.other.assign(name, "m2", None)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let winner = match (&a, &b) {
            (Cas::Done, Cas::Conflict { current }) => {
                assert_eq!(current.as_deref(), Some("m1"));
                "m1"
            }
            (Cas::Conflict { current }, Cas::Done) => {
                assert_eq!(current.as_deref(), Some("m2"));
                "m2"
            }
            _ => panic!("exactly one assigner must win: {a:?} / {b:?}"),
        };
        assert_eq!(
            r.get_assignment(name).await.unwrap().as_deref(),
            Some(winner)
        );
    }
    assert_eq!(r.list_assignments().await.unwrap().items.len(), names.len());

    match r.assign("nope", "m1", None).await {
        Err(RegistryError::UnknownUnit { name }) => assert_eq!(name, "nope"),
        other => panic!("expected UnknownUnit, got {other:?}"),
    }
}

pub async fn reassign_only_from_expected_machine(env: &Env) {
    let r = &env.registry;
    submit(r, "web", DesiredState::Launched).await;
    assert_eq!(r.assign("web", "m1", None).await.unwrap(), Cas::Done);
    let taken = Cas::Conflict {
        current: Some("m1".to_string()),
    };
    assert_eq!(r.assign("web", "m2", None).await.unwrap(), taken);
    assert_eq!(r.assign("web", "m2", Some("m3")).await.unwrap(), taken);
    assert_eq!(r.assign("web", "m2", Some("m1")).await.unwrap(), Cas::Done);
    assert_eq!(
        r.get_assignment("web").await.unwrap().as_deref(),
        Some("m2")
    );

    assert_eq!(
        r.unassign("web", "m1").await.unwrap(),
        Cas::Conflict {
            current: Some("m2".to_string())
        }
    );
    assert_eq!(r.unassign("web", "m2").await.unwrap(), Cas::Done);
    assert_eq!(r.get_assignment("web").await.unwrap(), None);
    assert_eq!(
        r.assign("web", "m3", Some("m2")).await.unwrap(),
        Cas::Conflict { current: None }
    );
    assert_eq!(
        r.unassign("web", "m2").await.unwrap(),
        Cas::Conflict { current: None }
    );

    // Removing a unit removes its assignment with it.
    assert_eq!(r.assign("web", "m3", None).await.unwrap(), Cas::Done);
    assert!(r.remove_unit("web").await.unwrap());
    assert!(r.list_assignments().await.unwrap().items.is_empty());
}

pub async fn leader_one_winner_then_takeover_after_expiry(env: &Env) {
    let r = &env.registry;
    // Two candidates at once: exactly one leads, and the other is told who.
    let l1 = r.grant_lease(LONG_TTL).await.unwrap();
    let l2 = env.other.grant_lease(LONG_TTL).await.unwrap();
    let (c1, c2) = tokio::join!(r.campaign("c1", l1), env.other.campaign("c2", l2));
    let (winner, loser_saw) = match (c1.unwrap(), c2.unwrap()) {
        (Campaign::Won(w), Campaign::Lost(l)) | (Campaign::Lost(l), Campaign::Won(w)) => (w, l),
        other => panic!("exactly one candidate must win: {other:?}"),
    };
    assert_eq!(winner, loser_saw);
    assert_eq!(r.leader().await.unwrap(), Some(winner.clone()));
    // Campaigning again on the same lease keeps the same leadership.
    let again = if winner.id == "c1" {
        r.campaign("c1", l1).await
    } else {
        env.other.campaign("c2", l2).await
    };
    assert_eq!(again.unwrap(), Campaign::Won(winner.clone()));
    r.revoke_lease(l1).await.unwrap();
    r.revoke_lease(l2).await.unwrap();
    assert_eq!(r.leader().await.unwrap(), None);

    // "a" leads on a lease it does not renew; "b" waits. When the lease lapses, b wins.
    let la = r.grant_lease(env.ttl).await.unwrap();
    let lb = env.other.grant_lease(LONG_TTL).await.unwrap();
    let _keep_b = keep_alive(&env.other, lb);
    let a = match r.campaign("a", la).await.unwrap() {
        Campaign::Won(l) => l,
        lost => panic!("nobody leads, a must win: {lost:?}"),
    };
    assert!(a.term > winner.term, "{a:?} after {winner:?}");
    assert_eq!(
        env.other.campaign("b", lb).await.unwrap(),
        Campaign::Lost(a.clone())
    );
    let mut watch = env.other.watch(a.term).await.unwrap();
    events_until(&mut watch, |c| matches!(c, Change::LeaderRemoved)).await;
    assert_eq!(r.leader().await.unwrap(), None);
    match env.other.campaign("b", lb).await.unwrap() {
        Campaign::Won(b) => {
            assert_eq!((b.id.as_str(), b.lease), ("b", lb));
            assert!(b.term > a.term, "{b:?} after {a:?}");
            assert_eq!(r.leader().await.unwrap(), Some(b));
        }
        lost => panic!("the remaining candidate must win: {lost:?}"),
    }
    assert!(matches!(
        r.keep_alive(la).await,
        Err(RegistryError::LeaseExpired { .. })
    ));
    r.revoke_lease(lb).await.unwrap();
}

pub async fn leader_resign(env: &Env) {
    let r = &env.registry;
    let la = r.grant_lease(LONG_TTL).await.unwrap();
    let lb = r.grant_lease(LONG_TTL).await.unwrap();
    let won = match r.campaign("a", la).await.unwrap() {
        Campaign::Won(l) => l,
        lost => panic!("nobody leads yet: {lost:?}"),
    };
    assert_eq!((won.id.as_str(), won.lease), ("a", la));
    assert!(matches!(
        env.other.campaign("b", lb).await.unwrap(),
        Campaign::Lost(l) if l == won
    ));
    // Only the holder, on its lease, can resign.
    assert!(!r.resign("b", lb).await.unwrap());
    assert!(!r.resign("a", lb).await.unwrap());
    assert_eq!(r.leader().await.unwrap(), Some(won.clone()));
    assert!(r.resign("a", la).await.unwrap());
    assert_eq!(r.leader().await.unwrap(), None);
    assert!(!r.resign("a", la).await.unwrap());
    match env.other.campaign("b", lb).await.unwrap() {
        Campaign::Won(l) => assert!(l.term > won.term),
        lost => panic!("b must win after a resigned: {lost:?}"),
    }
    r.revoke_lease(la).await.unwrap();
    r.revoke_lease(lb).await.unwrap();
}

/// The leader publishes why units cannot be placed; only the lease holding the leadership
/// can write them, every handle reads them, and they go with the leader's lease.
pub async fn reasons_belong_to_the_leader(env: &Env) {
    let r = &env.registry;
    assert!(r.get_reasons().await.unwrap().is_empty());
    let la = r.grant_lease(LONG_TTL).await.unwrap();
    let lb = r.grant_lease(LONG_TTL).await.unwrap();
    let reasons = BTreeMap::from([(
        "picky".to_string(),
        "no machine fits (m1: metadata role=web is not one of db)".to_string(),
    )]);
    // Nobody leads yet: nothing is written.
    assert!(!r.put_reasons(&reasons, la).await.unwrap());
    assert!(matches!(
        r.campaign("a", la).await.unwrap(),
        Campaign::Won(_)
    ));
    assert!(r.put_reasons(&reasons, la).await.unwrap());
    assert_eq!(env.other.get_reasons().await.unwrap(), reasons);
    // Another lease cannot overwrite them.
    assert!(!env.other.put_reasons(&BTreeMap::new(), lb).await.unwrap());
    assert_eq!(r.get_reasons().await.unwrap(), reasons);
    // Replaced whole by the leader; gone with its lease.
    assert!(r.put_reasons(&BTreeMap::new(), la).await.unwrap());
    assert!(env.other.get_reasons().await.unwrap().is_empty());
    assert!(r.put_reasons(&reasons, la).await.unwrap());
    r.revoke_lease(la).await.unwrap();
    assert!(env.other.get_reasons().await.unwrap().is_empty());
    assert_eq!(r.leader().await.unwrap(), None);
    r.revoke_lease(lb).await.unwrap();
}

pub async fn watch_sees_changes_in_order_from_revision(env: &Env) {
    let r = &env.registry;
    let start = r.snapshot().await.unwrap().revision + 1;

    let web = submit(r, "web", DesiredState::Inactive).await;
    r.assign("web", "m1", None).await.unwrap();
    r.set_desired("web", DesiredState::Launched).await.unwrap();
    let lease = r.grant_lease(LONG_TTL).await.unwrap();
    r.register_machine(&machine("m1"), lease).await.unwrap();
    r.report_state(&state("web", "m1"), lease).await.unwrap();
    r.campaign("m1", lease).await.unwrap();
    assert!(r.remove_unit("web").await.unwrap());
    // Revoking a lease removes everything on it at once ...
    r.revoke_lease(lease).await.unwrap();
    // ... and so does an expiry.
    let short = r.grant_lease(env.ttl).await.unwrap();
    r.register_machine(&machine("m2"), short).await.unwrap();

    let mut watch = env.other.watch(start).await.unwrap();
    let events = events_until(
        &mut watch,
        |c| matches!(c, Change::MachineRemoved { id } if id == "m2"),
    )
    .await;
    assert_eq!(
        kinds(&events),
        [
            "body+",
            "unit+ web inactive",
            "assign web m1",
            "unit+ web launched",
            "machine+ m1",
            "state+ web m1",
            "leader+ m1",
            "unit- web",
            "unassign web",
            "leader-",
            "machine- m1",
            "state- web m1",
            "machine+ m2",
            "machine- m2",
        ]
    );
    assert!(matches!(&events[0].change, Change::BodyPut { hash } if *hash == web.hash));
    assert_eq!(events[1].change, Change::UnitPut(web.clone()));
    assert_eq!(events[5].change, Change::StatePut(state("web", "m1")));
    assert_eq!(events[0].revision, start);
    // One revision per operation; removing a unit with its assignment is one revision, and
    // so is ending a lease.
    let revisions: Vec<u64> = events.iter().map(|e| e.revision).collect();
    let r0 = start;
    assert_eq!(
        revisions,
        [
            r0,
            r0 + 1,
            r0 + 2,
            r0 + 3,
            r0 + 4,
            r0 + 5,
            r0 + 6,
            r0 + 7,
            r0 + 7,
            r0 + 8,
            r0 + 8,
            r0 + 8,
            r0 + 9,
            r0 + 10,
        ]
    );

    // Watching from the middle starts exactly there.
    let mut middle = r.watch(events[3].revision).await.unwrap();
    assert_eq!(next_event(&mut middle).await, events[3]);
    assert_eq!(next_event(&mut middle).await, events[4]);
}

pub async fn watch_from_zero_sees_only_new_changes(env: &Env) {
    let r = &env.registry;
    submit(r, "old", DesiredState::Launched).await;
    let mut watch = r.watch(0).await.unwrap();
    let mut other_watch = env.other.watch(0).await.unwrap();
    r.set_desired("old", DesiredState::Loaded).await.unwrap();
    for w in [&mut watch, &mut other_watch] {
        let event = next_event(w).await;
        assert!(
            matches!(&event.change, Change::UnitPut(u) if u.name == "old" && u.desired == DesiredState::Loaded),
            "{event:?}"
        );
    }
    drop(other_watch);
    // A dropped watch does not disturb the others.
    r.set_desired("old", DesiredState::Inactive).await.unwrap();
    let event = next_event(&mut watch).await;
    assert!(matches!(&event.change, Change::UnitPut(u) if u.desired == DesiredState::Inactive));
}

pub async fn reported_states_vanish_with_their_lease(env: &Env) {
    let r = &env.registry;
    let kept = r.grant_lease(LONG_TTL).await.unwrap();
    let _keeper = keep_alive(r, kept);
    let expiring = r.grant_lease(env.ttl).await.unwrap();
    r.register_machine(&machine("m1"), kept).await.unwrap();
    r.register_machine(&machine("m2"), expiring).await.unwrap();
    r.report_state(&state("web", "m1"), kept).await.unwrap();
    env.other
        .report_state(&state("web", "m2"), expiring)
        .await
        .unwrap();
    let mut db = state("db", "m2");
    db.active = ActiveState::Failed.into();
    db.sub = SubState::Failed.into();
    db.pid = None;
    db.hash = Some(body_hash("db"));
    r.report_state(&db, expiring).await.unwrap();
    let listed = r.list_states().await.unwrap();
    assert_eq!(
        listed.items,
        vec![db.clone(), state("web", "m1"), state("web", "m2")]
    );

    wait_machine_removed(r, listed.revision + 1, "m2").await;
    assert_eq!(
        r.list_states().await.unwrap().items,
        vec![state("web", "m1")]
    );
    assert!(matches!(
        r.report_state(&state("web", "m2"), expiring).await,
        Err(RegistryError::LeaseExpired { .. })
    ));

    assert!(r.remove_state("web", "m1").await.unwrap());
    assert!(!r.remove_state("web", "m1").await.unwrap());
    r.report_state(&state("web", "m1"), kept).await.unwrap();
    r.revoke_lease(kept).await.unwrap();
    assert!(r.list_states().await.unwrap().items.is_empty());
    assert!(r.list_machines().await.unwrap().items.is_empty());
}

pub async fn snapshot_is_one_consistent_read(env: &Env) {
    let r = &env.registry;
    let web = submit(r, "web", DesiredState::Launched).await;
    let lease = r.grant_lease(LONG_TTL).await.unwrap();
    r.register_machine(&machine("m1"), lease).await.unwrap();
    r.assign("web", "m1", None).await.unwrap();
    r.report_state(&state("web", "m1"), lease).await.unwrap();
    let leader = match r.campaign("m1", lease).await.unwrap() {
        Campaign::Won(l) => l,
        lost => panic!("{lost:?}"),
    };
    let snapshot = env.other.snapshot().await.unwrap();
    assert_eq!(snapshot.units, vec![web]);
    assert_eq!(snapshot.machines, vec![machine("m1")]);
    assert_eq!(snapshot.assignments.len(), 1);
    assert_eq!(snapshot.assignments[0].machine, "m1");
    assert_eq!(snapshot.states, vec![state("web", "m1")]);
    assert_eq!(snapshot.leader, Some(leader));
    // Nothing changed since: every read sees the same revision.
    assert_eq!(r.list_units().await.unwrap().revision, snapshot.revision);
    assert_eq!(r.list_machines().await.unwrap().revision, snapshot.revision);
    r.revoke_lease(lease).await.unwrap();
}

pub async fn invalid_input_is_rejected(env: &Env) {
    let r = &env.registry;
    assert!(matches!(
        r.grant_lease(Duration::ZERO).await,
        Err(RegistryError::InvalidTtl { .. })
    ));
    for bad in ["", "a/b", "with space", "..", "tab\t"] {
        match r.get_unit(bad).await {
            Err(e @ RegistryError::InvalidName { .. }) => {
                assert!(e.to_string().contains("unit name"), "{e}")
            }
            other => panic!("{bad:?} must be rejected, got {other:?}"),
        }
    }
    assert!(matches!(
        r.get_body("not-a-hash").await,
        Err(RegistryError::InvalidName { .. })
    ));
    assert!(matches!(
        r.register_machine(&machine("a/b"), LeaseId(1)).await,
        Err(RegistryError::InvalidName { .. })
    ));
    let missing = LeaseId(0x7777_0000);
    assert!(matches!(
        r.keep_alive(missing).await,
        Err(RegistryError::LeaseExpired { .. })
    ));
    assert!(matches!(
        r.register_machine(&machine("m1"), missing).await,
        Err(RegistryError::LeaseExpired { .. })
    ));
    r.revoke_lease(missing).await.unwrap();
}

// --- the reboot lock -----------------------------------------------------------------------------

/// The ids of the machines that hold a reboot-lock slot.
async fn lock_holders(r: &Arc<dyn Registry>) -> Vec<String> {
    let listing = r.reboot_lock_holders().await.unwrap();
    listing.items.into_iter().map(|h| h.machine).collect()
}

/// Several machines (half of them through the second handle: on etcd, a second client)
/// acquire at once, round after round: at most N ever hold a slot, exactly N when enough
/// asked, and those refused are told who holds them.
pub async fn reboot_lock_admits_at_most_n_under_concurrent_acquires(env: &Env) {
    let lease = env.registry.grant_lease(LONG_TTL).await.unwrap();
    let _keeper = keep_alive(&env.registry, lease);
    for (round, max) in [(0, 1u32), (1, 2), (2, 3), (3, 2), (4, 1)] {
        let machines: Vec<String> = (0..8).map(|i| format!("r{round}m{i}")).collect();
        let mut tasks = Vec::new();
        for (i, id) in machines.iter().enumerate() {
            let r = if i % 2 == 0 {
                env.registry.clone()
            } else {
                env.other.clone()
            };
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let outcome = r.acquire_reboot_lock(&id, lease, max).await;
                (id, outcome)
            }));
        }
        let mut acquired = Vec::new();
        let mut refused = Vec::new();
        for task in tasks {
            let (id, outcome) = task.await.unwrap();
            match outcome.unwrap() {
                RebootLock::Acquired => acquired.push(id),
                RebootLock::Held(by) => refused.push((id, by)),
            }
        }
        acquired.sort();
        let max = usize::try_from(max).unwrap();
        assert_eq!(
            acquired.len(),
            max,
            "round {round}: {max} of 8 concurrent acquires must win, got {acquired:?}"
        );
        assert_eq!(lock_holders(&env.registry).await, acquired, "round {round}");
        assert_eq!(lock_holders(&env.other).await, acquired, "round {round}");
        for (id, by) in refused {
            assert_eq!(by.len(), max, "{id} was refused by {by:?}");
            for holder in &by {
                assert!(acquired.contains(&holder.machine), "{id}: {by:?}");
                assert_eq!(holder.lease, lease);
            }
        }
        for id in &acquired {
            assert!(env.registry.release_reboot_lock(id).await.unwrap(), "{id}");
        }
        assert!(lock_holders(&env.registry).await.is_empty());
    }
    env.registry.revoke_lease(lease).await.unwrap();
}

/// Acquiring again is idempotent (no second slot), a release frees the slot for the next
/// machine, only holders release, and max 0 admits nobody.
pub async fn reboot_lock_release_and_reacquire(env: &Env) {
    let (r, o) = (&env.registry, &env.other);
    let la = r.grant_lease(LONG_TTL).await.unwrap();
    let lb = o.grant_lease(LONG_TTL).await.unwrap();
    let _ka = keep_alive(r, la);
    let _kb = keep_alive(o, lb);
    assert_eq!(
        r.acquire_reboot_lock("a", la, 0).await.unwrap(),
        RebootLock::Held(Vec::new()),
        "max 0: nobody may hold a slot"
    );
    assert_eq!(
        r.acquire_reboot_lock("a", la, 2).await.unwrap(),
        RebootLock::Acquired
    );
    let first = r.reboot_lock_holders().await.unwrap().items;
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].machine.as_str(), first[0].lease), ("a", la));
    assert!(first[0].since > 0);
    // Again, also with max 1 and through the other handle: still one slot, the same hold.
    for _ in 0..3 {
        assert_eq!(
            o.acquire_reboot_lock("a", la, 1).await.unwrap(),
            RebootLock::Acquired
        );
    }
    assert_eq!(r.reboot_lock_holders().await.unwrap().items, first);
    assert_eq!(
        o.acquire_reboot_lock("b", lb, 2).await.unwrap(),
        RebootLock::Acquired
    );
    match o.acquire_reboot_lock("c", lb, 2).await.unwrap() {
        RebootLock::Held(by) => assert_eq!(
            by.iter().map(|h| h.machine.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        ),
        other => panic!("both slots are taken, c must be refused: {other:?}"),
    }
    // Only a holder's release frees anything, and only once.
    assert!(!r.release_reboot_lock("c").await.unwrap());
    assert!(o.release_reboot_lock("a").await.unwrap());
    assert!(!r.release_reboot_lock("a").await.unwrap());
    assert_eq!(lock_holders(r).await, ["b"]);
    assert_eq!(
        o.acquire_reboot_lock("c", lb, 2).await.unwrap(),
        RebootLock::Acquired
    );
    assert_eq!(lock_holders(r).await, ["b", "c"]);
    // A holder that comes back on a new lease (a restarted fleetd) keeps its one slot, now
    // on the new lease.
    let lb2 = o.grant_lease(LONG_TTL).await.unwrap();
    let _kb2 = keep_alive(o, lb2);
    assert_eq!(
        r.acquire_reboot_lock("b", lb2, 2).await.unwrap(),
        RebootLock::Acquired
    );
    let holders = r.reboot_lock_holders().await.unwrap().items;
    assert_eq!(holders.len(), 2);
    assert_eq!((holders[0].machine.as_str(), holders[0].lease), ("b", lb2));
    // A gone lease cannot hold a slot.
    let missing = LeaseId(0x7777_0001);
    assert!(matches!(
        r.acquire_reboot_lock("d", missing, 5).await,
        Err(RegistryError::LeaseExpired { .. })
    ));
    assert!(matches!(
        r.acquire_reboot_lock("a/b", la, 5).await,
        Err(RegistryError::InvalidName { .. })
    ));
    for lease in [la, lb, lb2] {
        r.revoke_lease(lease).await.unwrap();
    }
    assert!(lock_holders(r).await.is_empty());
}

/// A machine that dies holding a slot (its presence lease is no longer kept alive) frees it
/// when the lease expires, with no release; a revoked lease frees it at once.
pub async fn reboot_lock_is_freed_when_the_holders_lease_ends(env: &Env) {
    let (r, o) = (&env.registry, &env.other);
    let dying = o.grant_lease(env.ttl).await.unwrap();
    o.register_machine(&machine("m1"), dying).await.unwrap();
    assert_eq!(
        o.acquire_reboot_lock("m1", dying, 1).await.unwrap(),
        RebootLock::Acquired
    );
    let listed = r.list_machines().await.unwrap();
    let kept = r.grant_lease(LONG_TTL).await.unwrap();
    let _keeper = keep_alive(r, kept);
    r.register_machine(&machine("m2"), kept).await.unwrap();
    match r.acquire_reboot_lock("m2", kept, 1).await.unwrap() {
        RebootLock::Held(by) => {
            assert_eq!(by.len(), 1);
            assert_eq!((by[0].machine.as_str(), by[0].lease), ("m1", dying));
        }
        other => panic!("m1 holds the only slot: {other:?}"),
    }
    // m1 dies: nobody keeps its lease alive. Its machine record and its slot go together.
    wait_machine_removed(r, listed.revision + 1, "m1").await;
    assert!(lock_holders(r).await.is_empty(), "m1's slot must be freed");
    assert_eq!(
        r.acquire_reboot_lock("m2", kept, 1).await.unwrap(),
        RebootLock::Acquired
    );
    assert_eq!(lock_holders(o).await, ["m2"]);
    // Revoking the holder's lease frees the slot at once.
    r.revoke_lease(kept).await.unwrap();
    assert!(lock_holders(o).await.is_empty());
    let third = o.grant_lease(LONG_TTL).await.unwrap();
    assert_eq!(
        o.acquire_reboot_lock("m3", third, 1).await.unwrap(),
        RebootLock::Acquired
    );
    o.revoke_lease(third).await.unwrap();
}

// --- the rollout record ----------------------------------------------------------------------------

fn rollout(reference: &str, started_at: u64) -> Rollout {
    Rollout::new(
        reference,
        "2.0.0",
        1,
        &["m1".to_string(), "m2".to_string()],
        started_at,
    )
}

/// Of concurrent starts exactly one writes the record; the others learn the running one.
/// Once it ended (finished or halted) the next start replaces it. Watchers see each write.
pub async fn rollout_starts_once_under_concurrent_starts(env: &Env) {
    let (r, o) = (&env.registry, &env.other);
    assert_eq!(r.get_rollout().await.unwrap(), None);
    let from = r.snapshot().await.unwrap().revision + 1;
    let mut watch = r.watch(from).await.unwrap();
    let tasks: Vec<_> = (0..6u64)
        .map(|i| {
            let handle = if i % 2 == 0 { r.clone() } else { o.clone() };
            tokio::spawn(async move {
                let mine = rollout(&format!("oci://reg/os:{i}"), 1000 + i);
                (mine.clone(), handle.start_rollout(&mine).await.unwrap())
            })
        })
        .collect();
    let mut started = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (mine, RolloutStart::Started) => started.push(mine),
            (_, RolloutStart::Running(current)) => refused.push(*current),
        }
    }
    assert_eq!(started.len(), 1, "exactly one start wins: {started:?}");
    let winner = started.remove(0);
    assert_eq!(refused.len(), 5);
    assert!(refused.iter().all(|c| *c == winner), "{refused:?}");
    assert_eq!(r.get_rollout().await.unwrap().as_ref(), Some(&winner));
    let events = events_until(&mut watch, |c| matches!(c, Change::RolloutPut(_))).await;
    assert!(
        matches!(&events.last().unwrap().change, Change::RolloutPut(p) if **p == winner),
        "{events:?}"
    );

    // A halted rollout is replaced by the next start.
    let lease = r.grant_lease(LONG_TTL).await.unwrap();
    let _ka = keep_alive(r, lease);
    assert!(matches!(
        r.campaign("m1", lease).await.unwrap(),
        Campaign::Won(_)
    ));
    let mut halted = winner.clone();
    halted.state = RolloutState::Halted;
    halted.halted = Some(RolloutHalt {
        machine: "m1".into(),
        reason: "came back on 1.0.0".into(),
    });
    halted.machines[0].step = RolloutStep::Failed;
    assert!(r.update_rollout(&halted, lease).await.unwrap());
    let next = rollout("oci://reg/os:next", 5000);
    assert_eq!(o.start_rollout(&next).await.unwrap(), RolloutStart::Started);
    assert_eq!(r.get_rollout().await.unwrap(), Some(next.clone()));
    // ... and the old rollout's leader cannot write over the new one.
    assert!(!r.update_rollout(&halted, lease).await.unwrap());
    assert_eq!(r.get_rollout().await.unwrap(), Some(next));
    r.resign("m1", lease).await.unwrap();
    r.revoke_lease(lease).await.unwrap();
}

/// Only the leader's lease moves a rollout on: a deposed leader's write is refused, the
/// new leader's lands; the record survives both leaders' leases.
pub async fn rollout_is_moved_on_only_by_the_leader(env: &Env) {
    let (r, o) = (&env.registry, &env.other);
    let plan = rollout("oci://reg/os:2", 42);
    assert_eq!(r.start_rollout(&plan).await.unwrap(), RolloutStart::Started);
    let la = r.grant_lease(env.ttl).await.unwrap();
    let lb = o.grant_lease(LONG_TTL).await.unwrap();
    let _kb = keep_alive(o, lb);
    // Nobody leads yet: nobody writes.
    let mut draining = plan.clone();
    draining.machines[0].step = RolloutStep::Draining;
    assert!(!r.update_rollout(&draining, la).await.unwrap());
    assert!(matches!(
        r.campaign("a", la).await.unwrap(),
        Campaign::Won(_)
    ));
    assert!(
        !o.update_rollout(&draining, lb).await.unwrap(),
        "b does not lead"
    );
    assert!(r.update_rollout(&draining, la).await.unwrap());
    assert_eq!(o.get_rollout().await.unwrap(), Some(draining.clone()));
    // A start while it runs is refused, with the running one.
    assert_eq!(
        o.start_rollout(&rollout("oci://reg/os:3", 43))
            .await
            .unwrap(),
        RolloutStart::Running(Box::new(draining.clone()))
    );
    // a's lease ends (it died): b takes over and continues from the record.
    let from = r.snapshot().await.unwrap().revision + 1;
    wait_leader_gone(r, from).await;
    assert!(matches!(
        o.campaign("b", lb).await.unwrap(),
        Campaign::Won(_)
    ));
    let mut updating = o.get_rollout().await.unwrap().unwrap();
    assert_eq!(updating, draining, "the record outlives its leader's lease");
    updating.machines[0].step = RolloutStep::Updating;
    assert!(
        !r.update_rollout(&updating, la).await.unwrap(),
        "a is deposed"
    );
    assert!(o.update_rollout(&updating, lb).await.unwrap());
    assert_eq!(r.get_rollout().await.unwrap(), Some(updating));
    o.resign("b", lb).await.unwrap();
}

/// Waits until the leader key is gone (its lease expired).
async fn wait_leader_gone(r: &Arc<dyn Registry>, from: u64) {
    let mut watch = r.watch(from).await.unwrap();
    if r.leader().await.unwrap().is_none() {
        return;
    }
    events_until(&mut watch, |c| matches!(c, Change::LeaderRemoved)).await;
}
