//! The engine loop (leader election and scheduling) against both registry backends: the
//! embedded one and a real etcd (each etcd case starts its own, see `etcd_server/`).
//! "Machines" are machine records on leases; no agents or init are involved. Waits poll the
//! registry with a generous bound ([`WAIT`]) that only fails a test that would otherwise hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod etcd_server;

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_server::{connect, EtcdServer};
use flotilla_fleetd::{
    Change, DesiredState, EmbeddedRegistry, Engine, EngineError, EngineStatus, LeaseId, Machine,
    Registry, Snapshot, UnitRecord,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The bound on every wait; reaching it fails the test.
const WAIT: Duration = Duration::from_secs(30);

/// The engines' lease TTL: short, so that a dropped leader's lease expires quickly.
const ENGINE_TTL: Duration = Duration::from_secs(2);

/// The TTL of the machine leases no case lets expire, kept alive every third of it while
/// the machine "lives": a stall of the test process (a shared 2-core machine) shorter than
/// about 40 s cannot expire one, so the exact placements these cases assert hold.
const MACHINE_TTL: Duration = Duration::from_secs(60);

/// The TTL of the one machine lease a case lets expire (`lost_machine_units_are_reassigned`'s
/// m3): its units move within it after its keep-alives stop; until then (kept alive every
/// 2 s) a stall shorter than about 4 s cannot expire it.
const LOST_MACHINE_TTL: Duration = Duration::from_secs(6);

/// A registry with three handles on it (three etcd clients; the same embedded registry).
struct Cluster {
    handles: Vec<Arc<dyn Registry>>,
    _guard: Box<dyn Any + Send + Sync>,
}

impl Cluster {
    fn registry(&self, i: usize) -> Arc<dyn Registry> {
        self.handles[i].clone()
    }
}

async fn embedded() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let registry: Arc<dyn Registry> = Arc::new(EmbeddedRegistry::open(dir.path()).await.unwrap());
    Cluster {
        handles: vec![registry.clone(), registry.clone(), registry],
        _guard: Box::new(dir),
    }
}

async fn etcd() -> Cluster {
    let server = EtcdServer::start().await;
    let mut handles: Vec<Arc<dyn Registry>> = Vec::new();
    for _ in 0..3 {
        handles.push(Arc::new(connect(&server.endpoint, "/engine/").await));
    }
    Cluster {
        handles,
        _guard: Box::new(server),
    }
}

/// A running engine; aborted (its lease left to expire) when dropped.
struct Running {
    id: String,
    status: EngineStatus,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), EngineError>>,
}

impl Running {
    fn start(registry: Arc<dyn Registry>, id: &str) -> Running {
        let engine = Engine::new(registry, id, ENGINE_TTL).with_debounce(Duration::from_millis(50));
        let status = engine.status();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine.run(async move {
            let _ = stopped.await;
        }));
        Running {
            id: id.to_string(),
            status,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the engine gracefully (it resigns and revokes its lease).
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A task that keeps a machine's lease alive until dropped.
struct Alive(JoinHandle<()>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Registers machine `id` on a fresh lease ([`MACHINE_TTL`]) kept alive until the returned
/// guard is dropped.
async fn add_machine(r: &Arc<dyn Registry>, id: &str) -> (LeaseId, Alive) {
    add_machine_with_ttl(r, id, MACHINE_TTL).await
}

/// Registers machine `id` on a fresh lease of `ttl`, kept alive every `ttl / 3` until the
/// returned guard is dropped.
async fn add_machine_with_ttl(r: &Arc<dyn Registry>, id: &str, ttl: Duration) -> (LeaseId, Alive) {
    let lease = r.grant_lease(ttl).await.unwrap();
    let machine = Machine {
        id: id.to_string(),
        address: format!("10.0.0.{}", id.len()),
        metadata: BTreeMap::new(),
        api: None,
        images: Vec::new(),
        os_version: String::new(),
        os: None,
    };
    r.register_machine(&machine, lease).await.unwrap();
    let keeper = r.clone();
    let alive = Alive(tokio::spawn(async move {
        loop {
            tokio::time::sleep(ttl / 3).await;
            let _ = keeper.keep_alive(lease).await;
        }
    }));
    (lease, alive)
}

/// Submits unit `name` (launched) with the given `[fleet]` lines.
async fn submit(r: &Arc<dyn Registry>, name: &str, fleet: &str) {
    let body = format!("[container]\ncommand = [\"/bin/true\"]\n\n[fleet]\n{fleet}\n");
    submit_body(r, name, &body).await;
}

async fn submit_body(r: &Arc<dyn Registry>, name: &str, body: &str) {
    let hash = r.put_body(body).await.unwrap();
    r.put_unit(&UnitRecord {
        name: name.to_string(),
        hash,
        desired: DesiredState::Launched,
    })
    .await
    .unwrap();
}

fn assignments(s: &Snapshot) -> BTreeMap<String, String> {
    s.assignments
        .iter()
        .map(|a| (a.unit.clone(), a.machine.clone()))
        .collect()
}

/// Polls the registry until `done` holds; fails after [`WAIT`].
async fn wait_for(r: &Arc<dyn Registry>, what: &str, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = r.snapshot().await.unwrap();
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} for {what}; registry: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until exactly one of `engines` leads and the registry names it; returns its index.
async fn wait_one_leader(r: &Arc<dyn Registry>, engines: &[&Running]) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let leader = r.leader().await.unwrap();
        let leading: Vec<usize> = (0..engines.len())
            .filter(|&i| engines[i].status.is_leader())
            .collect();
        if let ([i], Some(l)) = (leading.as_slice(), &leader) {
            if l.id == engines[*i].id {
                return *i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} for one leader; leading: {leading:?}, registry: {leader:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the engine's unschedulable map satisfies `done`.
async fn wait_reasons(
    status: &EngineStatus,
    what: &str,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let reasons = status.unschedulable();
        if done(&reasons) {
            return reasons;
        }
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} for {what}; reasons: {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- cases ------------------------------------------------------------------------------------

/// Two engines on one registry: exactly one leads; units are placed, each exactly once.
async fn two_engines_one_leader_each_unit_placed_once(c: Cluster) {
    let r = c.registry(2);
    let _machines = [
        add_machine(&r, "m1").await,
        add_machine(&r, "m2").await,
        add_machine(&r, "m3").await,
    ];
    let a = Running::start(c.registry(0), "e1");
    let b = Running::start(c.registry(1), "e2");
    wait_one_leader(&r, &[&a, &b]).await;

    let mut watch = r.watch(0).await.unwrap();
    for i in 0..6 {
        submit(&r, &format!("web@{i}"), "").await;
    }
    let s = wait_for(&r, "6 units placed", |s| s.assignments.len() == 6).await;
    let placed = assignments(&s);
    for m in ["m1", "m2", "m3"] {
        assert_eq!(placed.values().filter(|v| *v == m).count(), 2, "{placed:?}");
    }
    // Every unit was assigned exactly once, never moved or taken off.
    let mut assigned: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let event = tokio::time::timeout(WAIT, watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event.change {
            Change::Assigned(a) => *assigned.entry(a.unit).or_default() += 1,
            Change::Unassigned { unit } => panic!("{unit} was unassigned"),
            _ => {}
        }
        if event.revision >= s.revision {
            break;
        }
    }
    assert_eq!(assigned.len(), 6, "{assigned:?}");
    assert!(assigned.values().all(|n| *n == 1), "{assigned:?}");
    // Still exactly one leader.
    wait_one_leader(&r, &[&a, &b]).await;
    b.stop().await;
    a.stop().await;
}

/// The leader goes away without resigning (its task is dropped, its lease expires): the
/// other engine takes over and schedules new units; then it stops gracefully (resigns) and
/// a third engine takes over at once.
async fn leader_dropped_the_other_takes_over(c: Cluster) {
    let r = c.registry(2);
    let _machines = [add_machine(&r, "m1").await, add_machine(&r, "m2").await];
    let mut engines = [
        Some(Running::start(c.registry(0), "e1")),
        Some(Running::start(c.registry(1), "e2")),
    ];
    let leader = {
        let both: Vec<&Running> = engines.iter().flatten().collect();
        wait_one_leader(&r, &both).await
    };
    submit(&r, "before", "").await;
    wait_for(&r, "before placed", |s| s.assignments.len() == 1).await;

    drop(engines[leader].take());
    let survivor = engines[1 - leader].take().unwrap();
    wait_one_leader(&r, &[&survivor]).await;
    submit(&r, "after", "").await;
    wait_for(&r, "after placed", |s| s.assignments.len() == 2).await;

    let third = Running::start(c.registry(0), "e3");
    // e3 follows while the survivor leads.
    wait_one_leader(&r, &[&survivor, &third]).await;
    assert!(survivor.status.is_leader());
    survivor.stop().await;
    wait_one_leader(&r, &[&third]).await;
    submit(&r, "third", "").await;
    wait_for(&r, "third placed", |s| s.assignments.len() == 3).await;
    third.stop().await;
}

/// The leader's lease is revoked under it: it stops leading, campaigns again on a new
/// lease, and scheduling goes on (led by whichever engine wins).
async fn revoked_leader_lease_recampaigns(c: Cluster) {
    let r = c.registry(2);
    let _machines = [add_machine(&r, "m1").await];
    let a = Running::start(c.registry(0), "e1");
    let b = Running::start(c.registry(1), "e2");
    wait_one_leader(&r, &[&a, &b]).await;
    let old = r.leader().await.unwrap().unwrap();
    r.revoke_lease(old.lease).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if r.leader()
            .await
            .unwrap()
            .is_some_and(|l| l.lease != old.lease)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new leadership after revoking {old:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = r.leader().await.unwrap().unwrap();
    assert!(now.term > old.term, "{old:?} then {now:?}");
    wait_one_leader(&r, &[&a, &b]).await;
    submit(&r, "web", "").await;
    wait_for(&r, "web placed", |s| s.assignments.len() == 1).await;
    a.stop().await;
    b.stop().await;
}

/// A machine whose lease expires: its units move to the remaining machines.
async fn lost_machine_units_are_reassigned(c: Cluster) {
    let r = c.registry(1);
    let (_, m1) = add_machine(&r, "m1").await;
    let (_, m2) = add_machine(&r, "m2").await;
    let (_, m3) = add_machine_with_ttl(&r, "m3", LOST_MACHINE_TTL).await;
    let engine = Running::start(c.registry(0), "e1");
    for i in 0..6 {
        submit(&r, &format!("svc{i}"), "").await;
    }
    let s = wait_for(&r, "6 units placed", |s| s.assignments.len() == 6).await;
    assert_eq!(
        assignments(&s).values().filter(|m| *m == "m3").count(),
        2,
        "{s:#?}"
    );

    drop(m3); // no more keep-alives: the lease expires after LOST_MACHINE_TTL
    let s = wait_for(&r, "m3's units moved", |s| {
        s.machines.len() == 2
            && s.assignments.len() == 6
            && s.assignments.iter().all(|a| a.machine != "m3")
    })
    .await;
    let placed = assignments(&s);
    assert_eq!(
        placed.values().filter(|m| *m == "m1").count(),
        3,
        "{placed:?}"
    );
    assert_eq!(
        placed.values().filter(|m| *m == "m2").count(),
        3,
        "{placed:?}"
    );
    engine.stop().await;
    drop((m1, m2));
}

/// fleet's functional case: 5 mutually conflicting units on 3 machines → 3 placed, 2 with a
/// reason naming the conflict. A unit whose file does not parse is reported with the error.
async fn five_conflicting_units_on_three_machines(c: Cluster) {
    let r = c.registry(1);
    let _machines = [
        add_machine(&r, "m1").await,
        add_machine(&r, "m2").await,
        add_machine(&r, "m3").await,
    ];
    let engine = Running::start(c.registry(0), "e1");
    for i in 1..=5 {
        submit(&r, &format!("conflict@{i}"), "conflicts = [\"conflict@*\"]").await;
    }
    submit_body(&r, "broken", "[container]\ncommand = 42\n").await;
    let s = wait_for(&r, "3 units placed", |s| s.assignments.len() == 3).await;
    let placed = assignments(&s);
    let machines: std::collections::BTreeSet<&String> = placed.values().collect();
    assert_eq!(machines.len(), 3, "one per machine: {placed:?}");

    let reasons = wait_reasons(&engine.status, "3 reasons", |r| r.len() == 3).await;
    let conflicting: Vec<(&String, &String)> = reasons
        .iter()
        .filter(|(u, _)| u.starts_with("conflict@"))
        .collect();
    assert_eq!(conflicting.len(), 2, "{reasons:?}");
    for (unit, reason) in conflicting {
        assert!(
            !placed.contains_key(unit),
            "{unit} placed and unschedulable"
        );
        assert!(reason.contains("conflicts with conflict@"), "{reason}");
        assert_eq!(engine.status.reason(unit).as_deref(), Some(reason.as_str()));
    }
    let broken = &reasons["broken"];
    assert!(broken.contains("does not parse"), "{broken}");
    assert!(!placed.contains_key("broken"));
    engine.stop().await;
}

/// Without any restart, the watch drives the engine: a unit submitted later is placed, a
/// unit waiting for a machine is placed when it joins, and a unit set inactive is taken off.
async fn later_changes_are_scheduled_from_the_watch(c: Cluster) {
    let r = c.registry(1);
    let _m1 = add_machine(&r, "m1").await;
    let engine = Running::start(c.registry(0), "e1");
    wait_one_leader(&r, &[&engine]).await;
    submit(&r, "early", "").await;
    wait_for(&r, "early placed", |s| s.assignments.len() == 1).await;

    submit(&r, "late", "").await;
    let s = wait_for(&r, "late placed", |s| assignments(s).contains_key("late")).await;
    assert_eq!(assignments(&s)["late"], "m1");

    submit(&r, "pinned", "machine_id = \"m2\"").await;
    let reasons = wait_reasons(&engine.status, "pinned unschedulable", |r| {
        r.contains_key("pinned")
    })
    .await;
    assert!(
        reasons["pinned"].contains("machine_id is m2"),
        "{reasons:?}"
    );
    let _m2 = add_machine(&r, "m2").await;
    let s = wait_for(&r, "pinned placed", |s| {
        assignments(s).contains_key("pinned")
    })
    .await;
    assert_eq!(assignments(&s)["pinned"], "m2");
    wait_reasons(&engine.status, "no reasons", |r| r.is_empty()).await;

    r.set_desired("late", DesiredState::Inactive).await.unwrap();
    wait_for(&r, "late taken off", |s| {
        !assignments(s).contains_key("late")
    })
    .await;
    assert!(engine.status.is_leader());
    engine.stop().await;
}

macro_rules! engine_tests {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::embedded().await).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::etcd().await).await;
                }
            )*
        }
    };
}

engine_tests!(
    two_engines_one_leader_each_unit_placed_once,
    leader_dropped_the_other_takes_over,
    revoked_leader_lease_recampaigns,
    lost_machine_units_are_reassigned,
    five_conflicting_units_on_three_machines,
    later_changes_are_scheduled_from_the_watch,
);
