//! The rolling OS update (issue 13, `fleetctl os update`) end to end on a REAL etcd with
//! three machines, each an in-process fleetd (engine, rollout runner, agent) over its own
//! etcd client. Each machine's init is an in-memory `LocalInit` that runs units at once
//! and records `UpdateOs`; its OS is files (os-release, kernel command line, an ESP with
//! boot entries) the agent reads every second. The harness plays the update: when a
//! machine's init is asked to update, it "reboots" it: stops its fleetd, ends its
//! presence lease, rewrites its files (the new version on trial, or the old one with the
//! new slot bad), clears its init's units, starts a new fleetd, and commits the trial once
//! the machine publishes it. Nothing is asserted on time: waits are bounded by [`WAIT`].
//! Needs etcd (Debian's etcd-server, or FLOTILLA_ETCD).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod etcd_server;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_server::{connect, EtcdServer};
use flotilla_fleetd::os::OsProbe;
use flotilla_fleetd::rollout::Runner;
use flotilla_fleetd::{
    Agent, Change, DesiredState, Engine, InitError, InitSignal, LocalInit, Machine, Registry,
    Rollout, RolloutStart, RolloutState, RolloutStep, UnitRecord,
};
use flotilla_init_api::{ActiveState, ImageEntry, SubState, SystemState, UnitInfo, Wire};
use tokio::sync::{mpsc, oneshot};

/// The bound on every wait; reaching it fails the test.
const WAIT: Duration = Duration::from_secs(240);
/// The machines' presence lease TTL: long, so that a stall of the shared test machine does
/// not expire one (a reboot ends the lease explicitly).
const MACHINE_TTL: Duration = Duration::from_secs(20);
/// The engines' lease TTL (a stopped engine resigns at once).
const ENGINE_TTL: Duration = Duration::from_secs(3);
const OLD: &str = "1.0.0";
const NEW: &str = "2.0.0";
/// How long a unit's stop takes in the test init.
const STOP_TAKES: Duration = Duration::from_millis(1500);
const REFERENCE: &str = "registry.test:5000/flotilla/os:2.0.0";

// --- the in-memory init ------------------------------------------------------------------------

#[derive(Debug, Default)]
struct InitState {
    units: BTreeMap<String, (UnitInfo, String)>,
    signals: Option<mpsc::UnboundedSender<InitSignal>>,
    /// Every `UpdateOs` source asked.
    updates: Vec<String>,
    /// The units running at each `UpdateOs`.
    running_at_update: Vec<BTreeSet<String>>,
    /// Every stop of a unit, e.g. `log` (a drain must not stop global units).
    stops: Vec<String>,
}

/// An init that runs units at once. Cheap to clone; clones share the state.
#[derive(Debug, Clone)]
struct TestInit {
    id: String,
    state: Arc<Mutex<InitState>>,
    /// Tells the harness which machine was asked to update.
    updated: mpsc::UnboundedSender<String>,
}

impl TestInit {
    fn set(&self, name: &str, active: ActiveState, sub: SubState) -> UnitInfo {
        let (info, tx) = {
            let mut s = self.state.lock().unwrap();
            let tx = s.signals.clone();
            let entry = s
                .units
                .entry(name.to_string())
                .or_insert_with(|| (UnitInfo::loaded(name), String::new()));
            entry.0.active_state = active.into();
            entry.0.sub_state = sub.into();
            entry.0.main_pid = if sub == SubState::Running { 4242 } else { 0 };
            (entry.0.clone(), tx)
        };
        if let Some(tx) = tx {
            let _ = tx.send(InitSignal::Changed(name.to_string()));
        }
        info
    }

    /// The units running now.
    fn running(&self) -> BTreeSet<String> {
        self.state
            .lock()
            .unwrap()
            .units
            .iter()
            .filter(|(_, (u, _))| u.active_state.known() == Some(ActiveState::Active))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// A reboot: nothing runs, nobody is subscribed.
    fn reboot(&self) {
        let mut s = self.state.lock().unwrap();
        s.units.clear();
        s.signals = None;
    }
}

fn no_such_unit(name: &str) -> InitError {
    InitError::Call {
        op: format!("GetUnit {name}"),
        socket: "test".into(),
        source: Box::new(flotilla_init_api::client::ClientError::Manager {
            name: flotilla_init_api::NO_SUCH_UNIT.into(),
            message: format!("unit {name} not found"),
        }),
    }
}

#[async_trait]
impl LocalInit for TestInit {
    fn describe(&self) -> String {
        format!("test init of {}", self.id)
    }
    fn generation(&self) -> u64 {
        1
    }
    fn subscribe(&self, tx: mpsc::UnboundedSender<InitSignal>) -> std::io::Result<()> {
        let _ = tx.send(InitSignal::Subscribed);
        self.state.lock().unwrap().signals = Some(tx);
        Ok(())
    }
    async fn machine_id(&self) -> Result<String, InitError> {
        Ok(self.id.clone())
    }
    async fn system_state(&self) -> Result<Wire<SystemState>, InitError> {
        Ok(SystemState::Running.into())
    }
    async fn list_units(&self) -> Result<Vec<UnitInfo>, InitError> {
        let s = self.state.lock().unwrap();
        Ok(s.units.values().map(|(u, _)| u.clone()).collect())
    }
    async fn list_images(&self) -> Result<Vec<ImageEntry>, InitError> {
        Ok(Vec::new())
    }
    async fn get_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        let s = self.state.lock().unwrap();
        s.units
            .get(name)
            .map(|(u, _)| u.clone())
            .ok_or_else(|| no_such_unit(name))
    }
    async fn cat_unit(&self, name: &str) -> Result<String, InitError> {
        let s = self.state.lock().unwrap();
        s.units
            .get(name)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| no_such_unit(name))
    }
    async fn load_unit(&self, name: &str, toml: &str) -> Result<UnitInfo, InitError> {
        let mut s = self.state.lock().unwrap();
        let entry = s
            .units
            .entry(name.to_string())
            .or_insert_with(|| (UnitInfo::loaded(name), String::new()));
        entry.1 = toml.to_string();
        Ok(entry.0.clone())
    }
    async fn start_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        Ok(self.set(name, ActiveState::Active, SubState::Running))
    }
    async fn stop_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        self.state.lock().unwrap().stops.push(name.to_string());
        Ok(self.set(name, ActiveState::Inactive, SubState::Dead))
    }
    async fn restart_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        Ok(self.set(name, ActiveState::Active, SubState::Running))
    }
    async fn remove_unit(&self, name: &str) -> Result<(), InitError> {
        self.state.lock().unwrap().stops.push(name.to_string());
        // A stop takes a while (a service's graceful shutdown): the old copy of a moved
        // unit still runs, and is reported active, meanwhile.
        tokio::time::sleep(STOP_TAKES).await;
        self.state.lock().unwrap().units.remove(name);
        Ok(())
    }
    async fn os_status(&self) -> Result<String, InitError> {
        Ok(r#"{"running":null,"version":null,"next":null,"slots":[],"rolled_back":false,"job":null}"#.into())
    }
    async fn update_os(&self, source: &str, _allow_downgrade: bool) -> Result<(), InitError> {
        let running = self.running();
        let mut s = self.state.lock().unwrap();
        s.updates.push(source.to_string());
        s.running_at_update.push(running);
        drop(s);
        let _ = self.updated.send(self.id.clone());
        Ok(())
    }
}

// --- the machines ------------------------------------------------------------------------------

/// One machine: its OS files, its init, and (while "up") its fleetd's three tasks.
struct Node {
    id: String,
    dir: PathBuf,
    init: TestInit,
    registry: Arc<dyn Registry>,
    /// The runner's reboot deadline (see `Runner::with_reboot_deadline`).
    deadline: Duration,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn os_release(&self, version: &str) {
        std::fs::write(
            self.file("os-release"),
            format!("ID=flotilla\nVERSION_ID=\"{version}\"\n"),
        )
        .unwrap();
    }

    /// The ESP's entries (file name → version) and the slot booted.
    fn boot(&self, entries: &[(&str, &str)], slot: &str) {
        let dir = self.file("esp/loader/entries");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, version) in entries {
            let s = &file["flotilla-".len().."flotilla-".len() + 1];
            std::fs::write(
                dir.join(file),
                format!(
                    "title Flotilla {version}\nversion {version}\nlinux /flotilla/{s}/vmlinuz\n\
                     initrd /flotilla/{s}/initramfs.img\noptions flotilla.slot={s}\n"
                ),
            )
            .unwrap();
        }
        std::fs::write(
            self.file("cmdline"),
            format!("console=ttyS0 flotilla.slot={slot}\n"),
        )
        .unwrap();
    }

    /// Starts this machine's fleetd: engine, rollout runner, agent.
    fn start(&mut self) {
        let engine = Engine::new(self.registry.clone(), self.id.clone(), ENGINE_TTL)
            .with_debounce(Duration::from_millis(50));
        let runner = Runner::new(self.registry.clone(), engine.status(), self.id.clone())
            .with_interval(Duration::from_millis(500))
            .with_reboot_deadline(self.deadline);
        let probe = OsProbe {
            os_release: self.file("os-release"),
            cmdline: self.file("cmdline"),
            esp: Some(self.file("esp")),
        };
        let machine = Machine {
            id: self.id.clone(),
            address: "127.0.0.1".into(),
            metadata: BTreeMap::new(),
            api: None,
            images: Vec::new(),
            os_version: String::new(),
            os: None,
        };
        let agent = Agent::new(
            self.registry.clone(),
            self.init.clone(),
            machine,
            MACHINE_TTL,
        )
        .with_os_probe(probe, Duration::from_secs(1));
        let (a, b, c) = (oneshot::channel(), oneshot::channel(), oneshot::channel());
        self.tasks.push(tokio::spawn(async move {
            let _ = engine
                .run(async {
                    let _ = a.1.await;
                })
                .await;
        }));
        self.tasks.push(tokio::spawn(runner.run(async {
            let _ = b.1.await;
        })));
        self.tasks.push(tokio::spawn(async move {
            let _ = agent
                .run(async {
                    let _ = c.1.await;
                })
                .await;
        }));
        self.stops = vec![a.0, b.0, c.0];
    }

    /// Stops its fleetd (the engine resigns) and ends its presence lease: the machine is
    /// gone from the registry, as when its host reboots.
    async fn stop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
        if let Some(lease) = self.registry.machine_lease(&self.id).await.unwrap() {
            self.registry.revoke_lease(lease).await.unwrap();
        }
    }
}

struct Cluster {
    nodes: Vec<Node>,
    updated: mpsc::UnboundedReceiver<String>,
    /// The registry the test reads and writes as an operator.
    registry: Arc<dyn Registry>,
    _etcd: EtcdServer,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    cluster_with(flotilla_fleetd::rollout::runner::DEFAULT_REBOOT_DEADLINE).await
}

async fn cluster_with(deadline: Duration) -> Cluster {
    let etcd = EtcdServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (tx, updated) = mpsc::unbounded_channel();
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let id = format!("m{i}");
        let node_dir = dir.path().join(&id);
        std::fs::create_dir_all(&node_dir).unwrap();
        let mut node = Node {
            id: id.clone(),
            dir: node_dir,
            init: TestInit {
                id,
                state: Arc::default(),
                updated: tx.clone(),
            },
            registry: Arc::new(connect(&etcd.endpoint, "/rollout/").await),
            deadline,
            stops: Vec::new(),
            tasks: Vec::new(),
        };
        node.os_release(OLD);
        node.boot(&[("flotilla-a.conf", OLD)], "a");
        node.start();
        nodes.push(node);
    }
    let registry: Arc<dyn Registry> = Arc::new(connect(&etcd.endpoint, "/rollout/").await);
    Cluster {
        nodes,
        updated,
        registry,
        _etcd: etcd,
        _dir: dir,
    }
}

impl Cluster {
    async fn wait<F, Fut>(&self, what: &str, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !cond().await {
            assert!(start.elapsed() < WAIT, "gave up waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn submit(&self, name: &str, body: &str) {
        let hash = self.registry.put_body(body).await.unwrap();
        self.registry
            .put_unit(&UnitRecord {
                name: name.into(),
                hash,
                desired: DesiredState::Launched,
            })
            .await
            .unwrap();
    }

    /// Two services and a global unit, running: web and api placed, log everywhere.
    async fn with_units(&self) {
        self.submit("web", "[container]\ncommand = [\"/bin/web\"]\n")
            .await;
        self.submit("api", "[container]\ncommand = [\"/bin/api\"]\n")
            .await;
        self.submit(
            PINNED,
            &format!(
                "[container]\ncommand = [\"/bin/pinned\"]\n[fleet]\nmachine_id = \"{PINNED_TO}\"\n"
            ),
        )
        .await;
        self.submit(
            "log",
            "[container]\ncommand = [\"/bin/log\"]\n[fleet]\nglobal = true\n",
        )
        .await;
        self.wait("the units to run", || async {
            let assigned = self.registry.list_assignments().await.unwrap().items;
            let placed = assigned.len() == 3;
            placed
                && self.nodes.iter().all(|n| n.init.running().contains("log"))
                && assigned.iter().all(|a| {
                    self.nodes
                        .iter()
                        .any(|n| n.id == a.machine && n.init.running().contains(&a.unit))
                })
        })
        .await;
        self.wait("every machine to publish its OS", || async {
            let machines = self.registry.list_machines().await.unwrap().items;
            machines.len() == 3
                && machines
                    .iter()
                    .all(|m| m.os_version == OLD && m.os.is_some())
        })
        .await;
    }

    fn node(&mut self, id: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap()
    }

    async fn rollout(&self) -> Rollout {
        self.registry.get_rollout().await.unwrap().unwrap()
    }
}

/// What the registry's watch showed, in revision order, from the rollout's start.
#[derive(Debug, Default)]
struct Watched {
    /// Machines whose step became `updating` while a service was still assigned to them
    /// or still reported active there (the drain was not done).
    early_updates: Vec<String>,
    /// The most machines in a middle step (draining to verifying) in one record.
    most_in_flight: usize,
    /// Every machine `reason` a record carried while the machine was draining.
    draining_reasons: BTreeSet<String>,
}

/// Follows every change from `from` on: assignments and reported states, and each rollout
/// record; checks each machine's step turns `updating` only once nothing but the global
/// unit `log` is assigned to or active on it.
fn monitor(
    registry: Arc<dyn Registry>,
    from: u64,
) -> (Arc<Mutex<Watched>>, tokio::task::JoinHandle<()>) {
    let watched = Arc::new(Mutex::new(Watched::default()));
    let out = watched.clone();
    let task = tokio::spawn(async move {
        let snapshot = registry.snapshot().await.unwrap();
        let mut assigned: BTreeMap<String, String> = snapshot
            .assignments
            .into_iter()
            .map(|a| (a.unit, a.machine))
            .collect();
        let mut active: BTreeSet<(String, String)> = snapshot
            .states
            .into_iter()
            .filter(|s| s.active.known() == Some(ActiveState::Active))
            .map(|s| (s.unit, s.machine))
            .collect();
        let mut steps: BTreeMap<String, RolloutStep> = BTreeMap::new();
        let mut watch = registry
            .watch(from.min(snapshot.revision + 1))
            .await
            .unwrap();
        while let Some(Ok(event)) = watch.next().await {
            match event.change {
                Change::Assigned(a) => {
                    assigned.insert(a.unit, a.machine);
                }
                Change::Unassigned { unit } => {
                    assigned.remove(&unit);
                }
                Change::StatePut(st) => {
                    let key = (st.unit, st.machine);
                    if st.active.known() == Some(ActiveState::Active) {
                        active.insert(key);
                    } else {
                        active.remove(&key);
                    }
                }
                Change::StateRemoved { unit, machine } => {
                    active.remove(&(unit, machine));
                }
                Change::RolloutPut(r) => {
                    let mut w = out.lock().unwrap();
                    let in_flight = r
                        .machines
                        .iter()
                        .filter(|m| {
                            matches!(
                                m.step,
                                RolloutStep::Draining
                                    | RolloutStep::Updating
                                    | RolloutStep::Rebooting
                                    | RolloutStep::Verifying
                            )
                        })
                        .count();
                    w.most_in_flight = w.most_in_flight.max(in_flight);
                    for m in &r.machines {
                        if let (RolloutStep::Draining, Some(why)) = (m.step, &m.reason) {
                            w.draining_reasons.insert(format!("{}: {why}", m.id));
                        }
                        let was = steps.insert(m.id.clone(), m.step);
                        if m.step != RolloutStep::Updating || was == Some(RolloutStep::Updating) {
                            continue;
                        }
                        let still: Vec<String> = assigned
                            .iter()
                            .filter(|(u, on)| **on == m.id && !pinned_there(u, on))
                            .map(|(u, _)| format!("{u} assigned"))
                            .chain(
                                active
                                    .iter()
                                    .filter(|(u, on)| {
                                        *on == m.id && u != "log" && !pinned_there(u, on)
                                    })
                                    .map(|(u, _)| format!("{u} active")),
                            )
                            .collect();
                        if !still.is_empty() {
                            w.early_updates
                                .push(format!("{}: {}", m.id, still.join(", ")));
                        }
                    }
                }
                _ => {}
            }
        }
    });
    (watched, task)
}

/// The unit pinned to m2 (`machine_id`), which fits nowhere else: it stays there while m2
/// drains, and does not hold the drain up.
const PINNED: &str = "pinned";
const PINNED_TO: &str = "m2";

fn pinned_there(unit: &str, machine: &str) -> bool {
    unit == PINNED && machine == PINNED_TO
}

/// What the harness saw while a rollout ran.
#[derive(Debug, Default)]
struct Seen {
    /// The machines updated, in order.
    updated: Vec<String>,
    /// The most machines unavailable at once: in a middle step of the record, or down.
    most_unavailable: usize,
    /// The most reboot-lock holders at once.
    most_locked: usize,
    /// The engine leaders seen.
    leaders: BTreeSet<String>,
}

/// Plays the machines' updates until the rollout ends: each machine asked to update is
/// checked (drained, global units untouched) and rebooted into `NEW` (or, if it is in
/// `bad`, back into `OLD` with the new slot bad); a trial is committed once published.
async fn play(c: &mut Cluster, bad: &[&str]) -> (Rollout, Seen) {
    play_with(c, bad, &[], &[]).await
}

/// [`play`], where the machines in `ignore` never act on their update (as if their init
/// refused it) and those in `lost` go down for the reboot and never come back.
async fn play_with(
    c: &mut Cluster,
    bad: &[&str],
    ignore: &[&str],
    lost: &[&str],
) -> (Rollout, Seen) {
    let mut seen = Seen::default();
    let start = Instant::now();
    let mut trial: BTreeSet<String> = BTreeSet::new();
    loop {
        let rollout = c.rollout().await;
        assert!(
            start.elapsed() < WAIT,
            "the rollout did not end: {seen:?}\n{rollout:?}"
        );
        let machines = c.registry.list_machines().await.unwrap().items;
        let holders = c.registry.reboot_lock_holders().await.unwrap().items;
        if let Some(l) = c.registry.leader().await.unwrap() {
            seen.leaders.insert(l.id);
        }
        let unavailable = rollout
            .machines
            .iter()
            .filter(|m| {
                matches!(
                    m.step,
                    RolloutStep::Draining
                        | RolloutStep::Updating
                        | RolloutStep::Rebooting
                        | RolloutStep::Verifying
                )
            })
            .count();
        seen.most_unavailable = seen.most_unavailable.max(unavailable);
        seen.most_locked = seen.most_locked.max(holders.len());
        if rollout.state != RolloutState::Running {
            return (rollout, seen);
        }
        // Commit a trial once the machine publishes it.
        for id in trial.clone() {
            let on_trial = machines.iter().any(|m| {
                m.id == id && m.os.as_ref().map(|o| o.update_state().as_str()) == Some("trial")
            });
            if on_trial {
                c.node(&id)
                    .boot(&[("flotilla-a.conf", OLD), ("flotilla-b.conf", NEW)], "b");
                trial.remove(&id);
            }
        }
        let asked = match tokio::time::timeout(Duration::from_millis(200), c.updated.recv()).await {
            Ok(Some(id)) => id,
            _ => continue,
        };
        println!(
            "{:>6.1}s: {asked} asked to update (record: {})",
            start.elapsed().as_secs_f64(),
            rollout
                .machines
                .iter()
                .map(|m| format!("{}={}", m.id, m.step))
                .collect::<Vec<_>>()
                .join(" ")
        );
        // Drained before its update: no service assigned there or still running there;
        // the global unit untouched.
        let assignments = c.registry.list_assignments().await.unwrap().items;
        assert!(
            assignments
                .iter()
                .all(|a| a.machine != asked || pinned_there(&a.unit, &a.machine)),
            "{asked} was asked to update with units assigned: {assignments:?}"
        );
        let node = c.node(&asked);
        assert_eq!(
            node.init.state.lock().unwrap().updates,
            vec![REFERENCE.to_string()],
            "{asked} must be asked exactly once"
        );
        let running = node.init.state.lock().unwrap().running_at_update.clone();
        let mut expected = BTreeSet::from(["log".to_string()]);
        if asked == PINNED_TO {
            expected.insert(PINNED.to_string());
        }
        assert_eq!(
            running,
            [expected],
            "{asked} was asked to update while running more than its global unit"
        );
        assert!(
            !node
                .init
                .state
                .lock()
                .unwrap()
                .stops
                .contains(&"log".to_string()),
            "the drain stopped the global unit on {asked}"
        );

        seen.updated.push(asked.clone());
        if ignore.contains(&asked.as_str()) {
            continue;
        }
        // The reboot.
        let unavailable_now = rollout
            .machines
            .iter()
            .filter(|m| m.step != RolloutStep::Waiting && m.step != RolloutStep::Done)
            .count();
        seen.most_unavailable = seen.most_unavailable.max(unavailable_now);
        node.stop().await;
        node.init.reboot();
        if lost.contains(&asked.as_str()) {
            continue;
        }
        if bad.contains(&asked.as_str()) {
            node.boot(
                &[("flotilla-a.conf", OLD), ("flotilla-b+0-3.conf", NEW)],
                "a",
            );
        } else {
            node.os_release(NEW);
            node.boot(
                &[("flotilla-a.conf", OLD), ("flotilla-b+2-1.conf", NEW)],
                "b",
            );
            trial.insert(asked.clone());
        }
        node.start();
    }
}

async fn start_rollout(c: &Cluster) -> (Arc<Mutex<Watched>>, tokio::task::JoinHandle<()>) {
    let from = c.registry.snapshot().await.unwrap().revision + 1;
    let watched = monitor(c.registry.clone(), from);
    let machines: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
    let plan = Rollout::new(REFERENCE, NEW, 1, &machines, 1);
    assert_eq!(
        c.registry.start_rollout(&plan).await.unwrap(),
        RolloutStart::Started
    );
    watched
}

/// All three machines updated one at a time, each drained (its services moved, the global
/// unit left alone) before its update and asked once; the leader's own machine reboots
/// too, so another leader continues; at the end all are at 2.0.0, committed, the record
/// `finished`, the lock free, and the services run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_goes_one_machine_at_a_time_and_finishes() {
    let mut c = cluster().await;
    c.with_units().await;
    let started = Instant::now();
    let (watched, monitor) = start_rollout(&c).await;
    let (rollout, seen) = play(&mut c, &[]).await;
    println!(
        "rollout of 3 machines finished in {:.1}s: {seen:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(rollout.state, RolloutState::Finished, "{rollout:?}");
    assert!(rollout.machines.iter().all(|m| m.step == RolloutStep::Done));
    assert_eq!(seen.updated, ["m1", "m2", "m3"], "in plan order, each once");
    assert!(seen.most_unavailable <= 1, "{seen:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    monitor.abort();
    let watched = std::mem::take(&mut *watched.lock().unwrap());
    println!("{watched:?}");
    assert!(
        watched.early_updates.is_empty(),
        "machines told to update before they were drained: {watched:?}"
    );
    assert_eq!(watched.most_in_flight, 1, "{watched:?}");
    // The pinned unit stayed on m2 while it drained, said so, and did not hold it up.
    assert!(
        watched
            .draining_reasons
            .iter()
            .any(|r| r.starts_with("m2: pinned stays: ") && r.contains("machine_id")),
        "{watched:?}"
    );
    assert!(seen.most_locked <= 1, "{seen:?}");
    assert!(seen.leaders.len() >= 2, "the leader rebooted too: {seen:?}");
    c.wait(
        "all machines at 2.0.0, committed, the lock free, services placed",
        || async {
            let machines = c.registry.list_machines().await.unwrap().items;
            let holders = c.registry.reboot_lock_holders().await.unwrap().items;
            let assigned = c.registry.list_assignments().await.unwrap().items;
            machines.len() == 3
                && machines.iter().all(|m| {
                    m.os_version == NEW
                        && m.os.as_ref().map(|o| o.update_state().as_str()) == Some("committed")
                })
                && holders.is_empty()
                && assigned.len() == 3
        },
    )
    .await;
    for n in &mut c.nodes {
        n.stop().await;
    }
}

/// m2 comes back on the old version (its new slot bad): the rollout halts naming m2, m3 is
/// never started, m1 stays updated, and nothing holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_machine_that_comes_back_on_the_old_version_halts_the_rollout() {
    let mut c = cluster().await;
    c.with_units().await;
    let (watched, monitor) = start_rollout(&c).await;
    let (rollout, seen) = play(&mut c, &["m2"]).await;
    monitor.abort();
    assert!(
        watched.lock().unwrap().early_updates.is_empty(),
        "{:?}",
        watched.lock().unwrap()
    );
    println!("halted: {rollout:?}\n{seen:?}");
    assert_eq!(rollout.state, RolloutState::Halted, "{rollout:?}");
    let halt = rollout.halted.clone().unwrap();
    assert_eq!(halt.machine, "m2", "{halt:?}");
    assert!(halt.reason.contains("rolled back"), "{halt:?}");
    assert_eq!(seen.updated, ["m1", "m2"], "nothing after m2 started");
    let steps: Vec<RolloutStep> = rollout.machines.iter().map(|m| m.step).collect();
    assert_eq!(
        steps,
        [RolloutStep::Done, RolloutStep::Failed, RolloutStep::Waiting]
    );
    // Nothing further starts: m3 is never drained or asked, however long the runner runs.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = c.rollout().await;
        assert_eq!(now.machines[2].step, RolloutStep::Waiting);
    }
    assert!(c.node("m3").init.state.lock().unwrap().updates.is_empty());
    // m2, back on the old version with its update rolled back, did not ask again.
    assert_eq!(c.node("m2").init.state.lock().unwrap().updates.len(), 1);
    c.wait("the lock to be free", || async {
        c.registry
            .reboot_lock_holders()
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
    for n in &mut c.nodes {
        n.stop().await;
    }
}

// --- fleetctl os update / os status against the API --------------------------------------------

/// The real `fleetctl` against an in-process API (embedded registry, three machine
/// records, no engine: the rollout stays as started): `os update DIR` reads the version
/// from the payload's manifest.json and plans the present machines in id order; a second
/// update is refused while it runs; `os status` shows it (JSON per the contract, and the
/// table); bad input is refused with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_os_update_starts_a_rollout_and_os_status_shows_it() {
    use flotilla_fleetd::api::{router, serve_unix, ApiState, PeerGate, ServeLimits};
    use flotilla_fleetd::EmbeddedRegistry;
    let dir = tempfile::tempdir().unwrap();
    let registry: Arc<dyn Registry> = Arc::new(
        EmbeddedRegistry::open(dir.path().join("registry"))
            .await
            .unwrap(),
    );
    let lease = registry
        .grant_lease(Duration::from_secs(600))
        .await
        .unwrap();
    for id in ["m3", "m1", "m2"] {
        let machine = Machine {
            id: id.into(),
            address: String::new(),
            metadata: BTreeMap::new(),
            api: None,
            images: Vec::new(),
            os_version: OLD.into(),
            os: None,
        };
        registry.register_machine(&machine, lease).await.unwrap();
    }
    let socket = dir.path().join("fleetd.sock");
    let (stop, stopped) = oneshot::channel::<()>();
    let served = socket.clone();
    let api = router(ApiState::new(registry.clone(), None));
    let server = tokio::spawn(async move {
        serve_unix(
            &served,
            api,
            ServeLimits::UNIX,
            PeerGate::new(None),
            async {
                let _ = stopped.await;
            },
        )
        .await
    });
    let fleetctl = |args: Vec<String>| {
        let socket = socket.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
                    .arg("--endpoint")
                    .arg(&socket)
                    .args(&args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // Wait for the socket.
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < WAIT, "the API did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let payload = dir.path().join("update");
    std::fs::create_dir_all(&payload).unwrap();
    // A directory without a manifest: refused, pointing at --version.
    let out = fleetctl(args(&["os", "update", payload.to_str().unwrap()])).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--version"), "{}", text(&out));
    let out = fleetctl(args(&[
        "os",
        "update",
        "x",
        "--version",
        "2",
        "--max-unavailable",
        "0",
    ]))
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(registry.get_rollout().await.unwrap().is_none());

    std::fs::write(
        payload.join("manifest.json"),
        format!(
            r#"{{"os":"flotilla","version":"{NEW}","kernel":"6.1.0","architecture":"x86_64","artifacts":[]}}"#
        ),
    )
    .unwrap();
    let out = fleetctl(args(&[
        "os",
        "update",
        payload.to_str().unwrap(),
        "--max-unavailable",
        "2",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("fleetctl os status"), "{}", text(&out));
    let record = registry.get_rollout().await.unwrap().unwrap();
    assert_eq!(record.version, NEW);
    assert_eq!(record.max_unavailable, 2);
    assert_eq!(
        record.reference,
        std::fs::canonicalize(&payload)
            .unwrap()
            .display()
            .to_string()
    );
    let planned: Vec<&str> = record.machines.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(planned, ["m1", "m2", "m3"], "present machines, in id order");

    // Refused while it runs, with the running one named.
    let out = fleetctl(args(&[
        "os",
        "update",
        "registry.test/os:3",
        "--version",
        "3.0.0",
    ]))
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is running"), "{}", text(&out));
    assert_eq!(registry.get_rollout().await.unwrap().unwrap(), record);

    let out = fleetctl(args(&["os", "status", "--json"])).await;
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &json["rollout"];
    assert_eq!(r["version"], NEW, "{json}");
    assert_eq!(r["max_unavailable"], 2, "{json}");
    assert_eq!(r["state"], "running", "{json}");
    assert!(r["halted"].is_null(), "{json}");
    assert_eq!(r["machines"][0]["id"], "m1", "{json}");
    assert_eq!(r["machines"][0]["step"], "waiting", "{json}");
    assert!(r["machines"][0]["reason"].is_null(), "{json}");
    assert_eq!(json["machines"].as_array().unwrap().len(), 3, "{json}");
    assert!(json["reboot_lock"].is_array(), "{json}");

    let out = fleetctl(args(&["os", "status"])).await;
    let shown = text(&out);
    println!("{shown}");
    assert!(out.status.success(), "{shown}");
    let header = shown
        .lines()
        .find(|l| l.starts_with("MACHINE") && l.contains("STEP"))
        .unwrap_or_else(|| panic!("no rollout table: {shown}"));
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>()[..4],
        ["MACHINE", "STEP", "VERSION", "UPDATE"]
    );
    assert!(
        shown.contains(": running, 0 of 3 machine(s) done"),
        "{shown}"
    );

    // --wait follows a rollout line by line and fails when it halts. The test leads and
    // moves the record as a runner would: the first rollout halts, a second one starts
    // (with --wait), m1 drains, then fails.
    let lead = registry
        .grant_lease(Duration::from_secs(600))
        .await
        .unwrap();
    assert!(matches!(
        registry.campaign("test", lead).await.unwrap(),
        flotilla_fleetd::Campaign::Won(_)
    ));
    let mut halted = record.clone();
    halted.state = RolloutState::Halted;
    assert!(registry.update_rollout(&halted, lead).await.unwrap());
    let waiting = tokio::spawn(fleetctl(args(&[
        "os",
        "update",
        "registry.test/os:3",
        "--version",
        "3.0.0",
        "--wait",
    ])));
    let second = loop {
        match registry.get_rollout().await.unwrap() {
            Some(r) if r.version == "3.0.0" => break r,
            _ => {
                assert!(start.elapsed() < WAIT, "the second rollout did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut next = second.clone();
    next.machines[0].step = RolloutStep::Draining;
    assert!(registry.update_rollout(&next, lead).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    next.machines[0].step = RolloutStep::Failed;
    next.machines[0].reason = Some("came back with version 1.0.0".into());
    next.state = RolloutState::Halted;
    next.halted = Some(flotilla_fleetd::RolloutHalt {
        machine: "m1".into(),
        reason: "came back with version 1.0.0".into(),
    });
    assert!(registry.update_rollout(&next, lead).await.unwrap());
    let out = waiting.await.unwrap();
    let shown = text(&out);
    println!("{shown}");
    assert!(!out.status.success(), "a halt exits non-zero: {shown}");
    assert!(shown.contains("m1: waiting"), "{shown}");
    assert!(shown.contains("m1: draining"), "{shown}");
    assert!(
        shown.contains("m1: failed (came back with version 1.0.0)"),
        "{shown}"
    );
    assert!(shown.contains("halted at m1"), "{shown}");

    let _ = stop.send(());
    let _ = server.await;
}

/// A machine that never reboots into its update (its init refused it) and one that goes
/// down for the reboot and never comes back each halt the rollout after the reboot
/// deadline (here 3 s), naming the machine and why; nothing after it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_machine_that_does_not_reboot_or_does_not_come_back_halts_the_rollout() {
    for (ignore, lost, why) in [
        (&["m1"][..], &[][..], "has not rebooted into it"),
        (&[][..], &["m1"][..], "did not come back from its reboot"),
    ] {
        let mut c = cluster_with(Duration::from_secs(3)).await;
        c.with_units().await;
        let (_watched, monitor) = start_rollout(&c).await;
        let (rollout, seen) = play_with(&mut c, &[], ignore, lost).await;
        monitor.abort();
        println!("{rollout:?}");
        assert_eq!(rollout.state, RolloutState::Halted, "{rollout:?}");
        let halt = rollout.halted.clone().unwrap();
        assert_eq!(halt.machine, "m1", "{halt:?}");
        assert!(halt.reason.contains(why), "{halt:?}");
        assert_eq!(seen.updated, ["m1"], "nothing after m1 started");
        assert_eq!(rollout.machines[0].step, RolloutStep::Failed);
        assert!(rollout.machines[1..]
            .iter()
            .all(|m| m.step == RolloutStep::Waiting));
        for n in &mut c.nodes {
            n.stop().await;
        }
    }
}
