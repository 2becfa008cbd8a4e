//! The agent's decisions against an in-memory [`LocalInit`] (no `flotilla-init`, no root):
//! the embedded registry in a temporary directory, a fake init that records every call and
//! plays units running, failing and an init that cannot be reached. Waits follow the fake's
//! and the registry's changes (no polling on the clock); [`PATIENCE`] only bounds a test
//! that would otherwise hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_init_api::client::ClientError;
use flotilla_init_api::{
    ActiveState, ImageEntry, SubState, SystemState, UnitInfo, UnitResult, Wire, NO_SUCH_UNIT,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::{marked_hash, Agent, InitError, InitSignal, LocalInit, HANDOVER_BOUND};
use crate::embedded::EmbeddedRegistry;
use crate::model::{DesiredState, LeaseId, Machine, UnitRecord, UnitState};
use crate::registry::{Change, Registry};

/// The bound on every wait (a stalled, shared machine is slow, never this slow).
const PATIENCE: Duration = Duration::from_secs(60);
/// The agents' lease TTL: long, so that no keep-alive timing matters here.
const TTL: Duration = Duration::from_secs(30);
/// The lease TTL of the machines the tests play ([`Peer`]).
const PEER_TTL: Duration = Duration::from_secs(3600);
const BODY: &str = "[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n";
const MACHINE: &str = "m1";

/// What the fake init holds.
#[derive(Debug, Default)]
struct FakeState {
    /// Units by name: their state and file text.
    units: BTreeMap<String, (UnitInfo, String)>,
    /// Whether calls reach it.
    unreachable: bool,
    /// Bumped when it becomes reachable again (a new connection).
    generation: u64,
    /// Every call that reached it and changes something, e.g. `StartUnit web`.
    calls: Vec<String>,
    /// The agent's signal feed.
    signals: Option<mpsc::UnboundedSender<InitSignal>>,
    next_pid: u32,
    /// The images its stores hold (a start of a unit with a registry image adds it, as
    /// init's pull would).
    images: Vec<ImageEntry>,
    /// `ListImages` is refused as an older init without it would.
    no_list_images: bool,
    /// `GetOsStatus`'s answer; `None`: [`DIRECT_BOOT`].
    os_status: Option<String>,
    /// `GetOsStatus` is refused as an older init without it would.
    no_os_status: bool,
}

/// What init answers `GetOsStatus` on a host not booted from a slot (the shape of
/// `flotilla_init::os_update::OsUpdater::status_json`).
const DIRECT_BOOT: &str =
    r#"{"running":null,"version":"1.0.0","next":null,"slots":[],"rolled_back":null,"job":null}"#;

/// An A/B host booted from slot a (1.5.0, committed) with 2.0.0 in slot b on trial, next.
const BOOTED_A: &str = r#"{"running":"a","version":"1.5.0","next":"b","slots":[{"slot":"a","version":"1.5.0","state":"committed","tries_left":null,"tries_done":null,"entry":"flotilla-a.conf"},{"slot":"b","version":"2.0.0","state":"trying","tries_left":3,"tries_done":0,"entry":"flotilla-b+3.conf"}],"rolled_back":null,"job":{"source":"r.example/os:2.0.0","state":"rebooting","message":"written"}}"#;

fn unknown_method(op: &str) -> InitError {
    InitError::Call {
        op: op.into(),
        socket: "fake".into(),
        source: Box::new(ClientError::Manager {
            name: "org.freedesktop.DBus.Error.UnknownMethod".into(),
            message: format!("Unknown method '{op}'"),
        }),
    }
}

/// An in-memory init. Cheap to clone; clones share the state.
#[derive(Debug, Clone)]
struct FakeInit {
    state: Arc<Mutex<FakeState>>,
    /// Bumped on every change, so that a test waits for the next one.
    changed: Arc<watch::Sender<u64>>,
}

fn info(name: &str) -> UnitInfo {
    UnitInfo::loaded(name)
}

fn unreachable(op: &str) -> InitError {
    InitError::Call {
        op: op.into(),
        socket: "fake".into(),
        source: Box::new(ClientError::Unreachable {
            socket: "fake".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "fake: down"),
        }),
    }
}

fn no_such_unit(op: &str, name: &str) -> InitError {
    InitError::Call {
        op: op.into(),
        socket: "fake".into(),
        source: Box::new(ClientError::Manager {
            name: NO_SUCH_UNIT.into(),
            message: format!("unit {name} not found"),
        }),
    }
}

impl FakeInit {
    fn new() -> FakeInit {
        FakeInit {
            state: Arc::new(Mutex::new(FakeState {
                generation: 1,
                next_pid: 100,
                ..FakeState::default()
            })),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Applies `f` to the state, then tells waiters and (for `signal`) the agent.
    fn change<T>(&self, signal: Option<&str>, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let (out, tx) = {
            let mut s = self.lock();
            (f(&mut s), s.signals.clone())
        };
        if let (Some(name), Some(tx)) = (signal, tx) {
            let _ = tx.send(InitSignal::Changed(name.into()));
        }
        self.changed.send_modify(|n| *n += 1);
        out
    }

    /// One call: refused while unreachable, recorded when `record`.
    fn call<T>(
        &self,
        op: String,
        signal: Option<&str>,
        f: impl FnOnce(&mut FakeState) -> Result<T, InitError>,
    ) -> Result<T, InitError> {
        if self.lock().unreachable {
            return Err(unreachable(&op));
        }
        self.change(signal, |s| {
            let out = f(s);
            if out.is_ok() {
                s.calls.push(op);
            }
            out
        })
    }

    fn set_state(s: &mut FakeState, name: &str, active: ActiveState, sub: SubState) -> UnitInfo {
        let pid = if sub == SubState::Running {
            s.next_pid += 1;
            s.next_pid
        } else {
            0
        };
        let Some((u, _)) = s.units.get_mut(name) else {
            return info(name);
        };
        u.active_state = active.into();
        u.sub_state = sub.into();
        u.main_pid = pid;
        u.clone()
    }

    fn unit(&self, name: &str) -> Option<UnitInfo> {
        self.lock().units.get(name).map(|(u, _)| u.clone())
    }

    fn calls_for(&self, name: &str) -> Vec<String> {
        let suffix = format!(" {name}");
        self.lock()
            .calls
            .iter()
            .filter(|c| c.ends_with(&suffix))
            .cloned()
            .collect()
    }

    /// The unit's process fails (exit code 1), as init would report it.
    fn fail(&self, name: &str) {
        self.change(Some(name), |s| {
            Self::set_state(s, name, ActiveState::Failed, SubState::Failed);
            if let Some((u, _)) = s.units.get_mut(name) {
                u.result = UnitResult::ExitCode.into();
                u.exit_code = 1;
            }
        });
    }

    /// Init goes away, or comes back (a new connection, a new subscription).
    fn set_reachable(&self, reachable: bool) {
        let tx = self.change(None, |s| {
            s.unreachable = !reachable;
            if reachable {
                s.generation += 1;
            }
            s.signals.clone()
        });
        if let (true, Some(tx)) = (reachable, tx) {
            let _ = tx.send(InitSignal::Subscribed);
        }
    }

    /// A start, stop or restart (`method`) of a loaded unit: it ends in `active`/`sub` at once.
    fn job(
        &self,
        method: &str,
        name: &str,
        active: ActiveState,
        sub: SubState,
    ) -> Result<UnitInfo, InitError> {
        let op = format!("{method} {name}");
        self.call(op.clone(), Some(name), |s| {
            let Some((_, text)) = s.units.get(name) else {
                return Err(no_such_unit(&op, name));
            };
            // A start pulls the unit's registry image into the store, as init does.
            let image = flotilla_units::parse_unit(name, None, text)
                .ok()
                .and_then(|u| u.container.store_name());
            if let (Some(image), ActiveState::Active) = (image, active) {
                if !s.images.iter().any(|i| i.name == image) {
                    s.images.push(ImageEntry {
                        name: image,
                        digest: format!("sha256:{}", "0".repeat(64)),
                    });
                }
            }
            Ok(Self::set_state(s, name, active, sub))
        })
    }

    /// Waits until `probe` holds for the fake's state.
    async fn wait(&self, what: &str, probe: impl Fn(&FakeState) -> bool) {
        let mut rx = self.changed.subscribe();
        let waited = tokio::time::timeout(PATIENCE, async {
            loop {
                if probe(&self.lock()) {
                    return;
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "gave up waiting for {what}; init has {:?}",
            self.lock()
        );
    }
}

#[async_trait]
impl LocalInit for FakeInit {
    fn describe(&self) -> String {
        "fake init".into()
    }
    fn generation(&self) -> u64 {
        self.lock().generation
    }
    fn subscribe(&self, tx: mpsc::UnboundedSender<InitSignal>) -> std::io::Result<()> {
        let _ = tx.send(InitSignal::Subscribed);
        self.lock().signals = Some(tx);
        Ok(())
    }
    async fn machine_id(&self) -> Result<String, InitError> {
        self.call("GetMachineId".into(), None, |_| Ok(MACHINE.to_string()))
    }
    async fn system_state(&self) -> Result<Wire<SystemState>, InitError> {
        self.call("GetSystemState".into(), None, |_| {
            Ok(SystemState::Running.into())
        })
    }
    async fn list_units(&self) -> Result<Vec<UnitInfo>, InitError> {
        self.call("ListUnits".into(), None, |s| {
            Ok(s.units.values().map(|(u, _)| u.clone()).collect())
        })
    }
    async fn list_images(&self) -> Result<Vec<ImageEntry>, InitError> {
        self.call("ListImages".into(), None, |s| {
            if s.no_list_images {
                return Err(InitError::Call {
                    op: "ListImages".into(),
                    socket: "fake".into(),
                    source: Box::new(ClientError::Manager {
                        name: "org.freedesktop.DBus.Error.UnknownMethod".into(),
                        message: "Unknown method 'ListImages'".into(),
                    }),
                });
            }
            Ok(s.images.clone())
        })
    }
    async fn get_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        if self.lock().unreachable {
            return Err(unreachable("GetUnit"));
        }
        self.unit(name)
            .ok_or_else(|| no_such_unit(&format!("GetUnit {name}"), name))
    }
    async fn cat_unit(&self, name: &str) -> Result<String, InitError> {
        if self.lock().unreachable {
            return Err(unreachable("CatUnit"));
        }
        let text = self.lock().units.get(name).map(|(_, t)| t.clone());
        text.ok_or_else(|| no_such_unit(&format!("CatUnit {name}"), name))
    }
    async fn load_unit(&self, name: &str, toml: &str) -> Result<UnitInfo, InitError> {
        self.call(format!("LoadUnit {name}"), None, |s| {
            let entry = s
                .units
                .entry(name.to_string())
                .or_insert_with(|| (info(name), String::new()));
            entry.1 = toml.to_string();
            Ok(entry.0.clone())
        })
    }
    async fn start_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        self.job("StartUnit", name, ActiveState::Active, SubState::Running)
    }
    async fn stop_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        self.job("StopUnit", name, ActiveState::Inactive, SubState::Dead)
    }
    async fn restart_unit(&self, name: &str) -> Result<UnitInfo, InitError> {
        self.job("RestartUnit", name, ActiveState::Active, SubState::Running)
    }
    async fn os_status(&self) -> Result<String, InitError> {
        self.call("GetOsStatus".into(), None, |s| {
            if s.no_os_status {
                return Err(unknown_method("GetOsStatus"));
            }
            Ok(s.os_status.clone().unwrap_or_else(|| DIRECT_BOOT.into()))
        })
    }
    async fn update_os(&self, source: &str, allow_downgrade: bool) -> Result<(), InitError> {
        self.call(format!("UpdateOs {source} {allow_downgrade}"), None, |_| {
            Ok(())
        })
    }
    async fn remove_unit(&self, name: &str) -> Result<(), InitError> {
        let op = format!("RemoveUnit {name}");
        self.call(op.clone(), None, |s| {
            s.units
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| no_such_unit(&op, name))
        })
    }
}

/// An agent for [`MACHINE`] on a fresh embedded registry, driving `init`.
struct Running {
    registry: Arc<dyn Registry>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(init: &FakeInit) -> Running {
        Running::start_full(init, HANDOVER_BOUND, None).await
    }

    /// An agent whose hand-overs end at `bound`.
    async fn start_with(init: &FakeInit, bound: Duration) -> Running {
        Running::start_full(init, bound, None).await
    }

    /// An agent with an OS probe (refreshed hourly: only the registration's probe runs).
    async fn start_probing(init: &FakeInit, probe: Option<crate::os::OsProbe>) -> Running {
        Running::start_full(init, HANDOVER_BOUND, probe).await
    }

    async fn start_full(
        init: &FakeInit,
        bound: Duration,
        probe: Option<crate::os::OsProbe>,
    ) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let registry: Arc<dyn Registry> =
            Arc::new(EmbeddedRegistry::open(dir.path()).await.unwrap());
        Running::start_on(init, registry, dir, bound, probe)
    }

    /// Stops this agent and starts a new one on the same registry and init, as a restarted
    /// fleetd would (taking over the lease its previous run left).
    async fn restart(mut self, init: &FakeInit) -> Running {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("the agent stops on shutdown")
            .unwrap();
        let Running { registry, _dir, .. } = self;
        Running::start_on(init, registry, _dir, HANDOVER_BOUND, None)
    }

    fn start_on(
        init: &FakeInit,
        registry: Arc<dyn Registry>,
        dir: tempfile::TempDir,
        bound: Duration,
        probe: Option<crate::os::OsProbe>,
    ) -> Running {
        let machine = Machine {
            id: MACHINE.into(),
            address: "127.0.0.1".into(),
            metadata: BTreeMap::new(),
            api: None,
            images: Vec::new(),
            os_version: String::new(),
            os: None,
        };
        // As fleetd does: a restarted agent takes over its previous run's lease.
        let mut agent = Agent::new(registry.clone(), init.clone(), machine, TTL)
            .with_handover_bound(bound)
            .with_lease_file(dir.path().join("agent.lease"));
        if let Some(probe) = probe {
            agent = agent.with_os_probe(probe, Duration::from_secs(3600));
        }
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            agent
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Running {
            registry,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    async fn submit(&self, name: &str, desired: DesiredState) {
        self.submit_body(name, BODY, desired).await;
    }

    async fn submit_body(&self, name: &str, body: &str, desired: DesiredState) {
        let hash = self.registry.put_body(body).await.unwrap();
        self.registry
            .put_unit(&UnitRecord {
                name: name.into(),
                hash,
                desired,
            })
            .await
            .unwrap();
        self.registry.assign(name, MACHINE, None).await.unwrap();
    }

    /// Waits until the registry's state of `unit` on this machine satisfies `probe`
    /// (`None`: no state), following the registry's watch.
    async fn wait_state(&self, what: &str, probe: impl Fn(Option<&UnitState>) -> bool) {
        let waited = tokio::time::timeout(PATIENCE, async {
            let snapshot = self.registry.snapshot().await.unwrap();
            let mut current = snapshot
                .states
                .into_iter()
                .find(|s| s.unit == what && s.machine == MACHINE);
            let mut watch = self.registry.watch(snapshot.revision + 1).await.unwrap();
            loop {
                if probe(current.as_ref()) {
                    return;
                }
                match watch.next().await.unwrap().unwrap().change {
                    Change::StatePut(s) if s.unit == what && s.machine == MACHINE => {
                        current = Some(s)
                    }
                    Change::StateRemoved { unit, machine }
                        if unit == what && machine == MACHINE =>
                    {
                        current = None
                    }
                    _ => {}
                }
            }
        })
        .await;
        assert!(waited.is_ok(), "gave up waiting for the state of {what}");
    }

    /// Waits until this machine's record satisfies `probe`, following the registry's watch.
    async fn wait_machine(&self, what: &str, probe: impl Fn(&Machine) -> bool) -> Machine {
        let waited = tokio::time::timeout(PATIENCE, async {
            let snapshot = self.registry.snapshot().await.unwrap();
            let mut watch = self.registry.watch(snapshot.revision + 1).await.unwrap();
            let mut current = self.registry.get_machine(MACHINE).await.unwrap();
            loop {
                if let Some(m) = current.as_ref().filter(|m| probe(m)) {
                    return m.clone();
                }
                if let Change::MachinePut(m) = watch.next().await.unwrap().unwrap().change {
                    if m.id == MACHINE {
                        current = Some(m);
                    }
                }
            }
        })
        .await;
        waited.unwrap_or_else(|_| panic!("gave up waiting for the machine record: {what}"))
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("the agent stops on shutdown")
            .unwrap();
    }
}

fn running(s: &FakeState, name: &str) -> bool {
    s.units
        .get(name)
        .is_some_and(|(u, _)| u.active_state == ActiveState::Active && u.main_pid != 0)
}

#[tokio::test]
async fn an_assigned_unit_is_loaded_started_and_reported() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    agent.submit("web", DesiredState::Launched).await;
    init.wait("web running", |s| running(s, "web")).await;
    assert_eq!(init.calls_for("web"), ["LoadUnit web", "StartUnit web"]);
    let (_, text) = init.lock().units["web"].clone();
    assert_eq!(
        marked_hash(&text),
        Some(crate::model::body_hash(BODY).as_str())
    );
    assert!(text.ends_with(BODY));
    let pid = init.unit("web").unwrap().main_pid;
    agent
        .wait_state("web", |s| {
            s.is_some_and(|s| {
                s.active == ActiveState::Active && s.sub == SubState::Running && s.pid == Some(pid)
            })
        })
        .await;
    agent.stop().await;
    // Shutting the agent down leaves the unit running.
    assert_eq!(init.unit("web").unwrap().main_pid, pid);
}

#[tokio::test]
async fn an_unassigned_unit_is_stopped_and_removed() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    agent.submit("web", DesiredState::Launched).await;
    init.wait("web running", |s| running(s, "web")).await;
    agent.wait_state("web", |s| s.is_some()).await;

    agent.registry.unassign("web", MACHINE).await.unwrap();
    init.wait("web removed", |s| !s.units.contains_key("web"))
        .await;
    assert_eq!(init.calls_for("web").last().unwrap(), "RemoveUnit web");
    agent.wait_state("web", |s| s.is_none()).await;
    agent.stop().await;
}

#[tokio::test]
async fn a_unit_that_fails_in_init_is_reported_failed() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    agent.submit("web", DesiredState::Launched).await;
    init.wait("web running", |s| running(s, "web")).await;
    agent
        .wait_state("web", |s| {
            s.is_some_and(|s| s.active == ActiveState::Active)
        })
        .await;

    init.fail("web");
    agent
        .wait_state("web", |s| {
            s.is_some_and(|s| {
                s.active == ActiveState::Failed && s.sub == SubState::Failed && s.pid.is_none()
            })
        })
        .await;
    // Reporting is all: the agent does not restart a unit init has failed (init's restart
    // policy decides that).
    assert_eq!(init.calls_for("web"), ["LoadUnit web", "StartUnit web"]);
    agent.stop().await;
}

#[tokio::test]
async fn while_init_is_unreachable_running_units_are_left_alone() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    agent.submit("web", DesiredState::Launched).await;
    init.wait("web running", |s| running(s, "web")).await;
    let pid = init.unit("web").unwrap().main_pid;

    // Init goes away; meanwhile the cluster assigns another unit here.
    init.set_reachable(false);
    agent.submit("db", DesiredState::Launched).await;
    // Init comes back (a new connection): the agent re-reads what init runs, takes `web`
    // (running, with its marker) as its own and started, and catches up with `db`.
    init.set_reachable(true);
    init.wait("db running", |s| running(s, "db")).await;
    assert_eq!(init.calls_for("db"), ["LoadUnit db", "StartUnit db"]);
    // `web` was neither loaded, started, restarted nor stopped again.
    assert_eq!(init.calls_for("web"), ["LoadUnit web", "StartUnit web"]);
    assert_eq!(init.unit("web").unwrap().main_pid, pid);
    agent.stop().await;
}

#[tokio::test]
async fn a_host_unit_of_the_same_name_is_left_alone() {
    let init = FakeInit::new();
    init.change(None, |s| {
        let mut host = info("web");
        host.active_state = ActiveState::Active.into();
        host.sub_state = SubState::Running.into();
        host.main_pid = 7;
        s.units.insert("web".into(), (host, BODY.into()));
    });
    let agent = Running::start(&init).await;
    agent.submit("web", DesiredState::Launched).await;
    agent.submit("db", DesiredState::Launched).await;
    // `db` is assigned after `web`: once it runs, `web`'s assignment was seen too.
    init.wait("db running", |s| running(s, "db")).await;
    assert!(init.calls_for("web").is_empty(), "{:?}", init.lock().calls);
    assert_eq!(init.lock().units["web"].1, BODY);
    agent.stop().await;
}

#[tokio::test]
async fn a_state_from_a_newer_init_is_relayed_as_its_text() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    agent.submit("web", DesiredState::Launched).await;
    init.wait("web running", |s| running(s, "web")).await;
    // A newer init reports states this agent does not know: relayed as their text, and
    // nothing is done to the unit because of them.
    init.change(Some("web"), |s| {
        if let Some((u, _)) = s.units.get_mut("web") {
            u.active_state = Wire::Unknown("reloading".into());
            u.sub_state = Wire::Unknown("reload-notify".into());
        }
    });
    agent
        .wait_state("web", |s| {
            s.is_some_and(|s| s.active.as_str() == "reloading" && s.sub.as_str() == "reload-notify")
        })
        .await;
    assert_eq!(init.calls_for("web"), ["LoadUnit web", "StartUnit web"]);
    agent.stop().await;
}

/// The images this machine's record publishes, once `probe` holds for them (following the
/// registry's watch).
async fn wait_machine_images(
    registry: &Arc<dyn Registry>,
    what: &str,
    probe: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let waited = tokio::time::timeout(PATIENCE, async {
        let snapshot = registry.snapshot().await.unwrap();
        let mut watch = registry.watch(snapshot.revision + 1).await.unwrap();
        let mut images = registry
            .get_machine(MACHINE)
            .await
            .unwrap()
            .map(|m| m.images)
            .unwrap_or_default();
        loop {
            if probe(&images) {
                return images;
            }
            if let Change::MachinePut(m) = watch.next().await.unwrap().unwrap().change {
                if m.id == MACHINE {
                    images = m.images;
                }
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("gave up waiting for the machine record to {what}"))
}

/// The machine record publishes the registry images init holds: those there when the agent
/// registers (local names left out, sorted), then one a started unit pulled; a unit whose
/// image is already listed costs no `ListImages`.
#[tokio::test]
async fn the_machine_record_publishes_the_registry_images_init_holds() {
    let init = FakeInit::new();
    let digest = format!("sha256:{}", "1".repeat(64));
    init.change(None, |s| {
        for name in ["r.example/base:2", "gcc:latest", "10.0.0.9:5000/tools:1"] {
            s.images.push(ImageEntry {
                name: name.into(),
                digest: digest.clone(),
            });
        }
    });
    let agent = Running::start(&init).await;
    let images = wait_machine_images(&agent.registry, "list the images", |i| !i.is_empty()).await;
    assert_eq!(images, ["10.0.0.9:5000/tools:1", "r.example/base:2"]);

    let body = "[container]\nimage = \"r.example/team/web:1\"\ncommand = [\"/bin/web\"]\n";
    agent.submit_body("web", body, DesiredState::Launched).await;
    init.wait("web running", |s| running(s, "web")).await;
    let images = wait_machine_images(&agent.registry, "list web's image", |i| {
        i.contains(&"r.example/team/web:1".to_string())
    })
    .await;
    assert_eq!(
        images,
        [
            "10.0.0.9:5000/tools:1",
            "r.example/base:2",
            "r.example/team/web:1"
        ]
    );
    let lists = |init: &FakeInit| {
        init.lock()
            .calls
            .iter()
            .filter(|c| *c == "ListImages")
            .count()
    };
    let before = lists(&init);
    // A second unit of an image already listed: no ListImages for it.
    let body2 = "[container]\nimage = \"r.example/base:2\"\ncommand = [\"/bin/db\"]\n";
    agent.submit_body("db", body2, DesiredState::Launched).await;
    init.wait("db running", |s| running(s, "db")).await;
    agent
        .wait_state("db", |s| s.is_some_and(|s| s.active == ActiveState::Active))
        .await;
    assert_eq!(lists(&init), before, "{:?}", init.lock().calls);
    agent.stop().await;
}

/// An init without `ListImages` (an older one) publishes no images, and the agent runs its
/// units as before.
#[tokio::test]
async fn an_init_without_list_images_publishes_none() {
    let init = FakeInit::new();
    init.change(None, |s| s.no_list_images = true);
    let agent = Running::start(&init).await;
    let body = "[container]\nimage = \"r.example/team/web:1\"\ncommand = [\"/bin/web\"]\n";
    agent.submit_body("web", body, DesiredState::Launched).await;
    init.wait("web running", |s| running(s, "web")).await;
    agent
        .wait_state("web", |s| {
            s.is_some_and(|s| s.active == ActiveState::Active)
        })
        .await;
    let machine = agent.registry.get_machine(MACHINE).await.unwrap().unwrap();
    assert!(machine.images.is_empty(), "{machine:?}");
    agent.stop().await;
}

// --- hand-over: a planned move starts the new copy before the old one stops ---------------

/// Another machine of the cluster, played by the test on the same registry: present on its
/// own lease, reporting the states its agent would.
struct Peer {
    id: String,
    lease: LeaseId,
}

impl Peer {
    async fn join(registry: &Arc<dyn Registry>, id: &str) -> Peer {
        // Nobody keeps it alive: long enough for any test.
        let lease = registry.grant_lease(PEER_TTL).await.unwrap();
        let machine = Machine {
            id: id.into(),
            address: "127.0.0.2".into(),
            metadata: BTreeMap::new(),
            api: None,
            images: Vec::new(),
            os_version: String::new(),
            os: None,
        };
        registry.register_machine(&machine, lease).await.unwrap();
        Peer {
            id: id.into(),
            lease,
        }
    }

    /// Reports `unit` in `active` on body `hash`, as the peer's agent would.
    async fn report(
        &self,
        registry: &Arc<dyn Registry>,
        unit: &str,
        active: ActiveState,
        hash: &str,
    ) {
        let running = active == ActiveState::Active;
        let state = UnitState {
            unit: unit.into(),
            machine: self.id.clone(),
            hash: Some(hash.into()),
            active: active.into(),
            sub: if running {
                SubState::Running
            } else if active == ActiveState::Failed {
                SubState::Failed
            } else {
                SubState::Start
            }
            .into(),
            pid: running.then_some(4242),
            updated_at: 1,
        };
        registry.report_state(&state, self.lease).await.unwrap();
    }
}

/// Makes sure the agent has applied every registry change made before this call: a unit
/// submitted now runs only once the agent got to it, after all earlier events.
async fn sync(agent: &Running, init: &FakeInit, name: &str) {
    agent.submit(name, DesiredState::Launched).await;
    init.wait(name, |s| running(s, name)).await;
}

/// `web` runs here (reported active), and peer m2 joined. Returns web's pid.
async fn web_running(agent: &Running, init: &FakeInit) -> u32 {
    agent.submit("web", DesiredState::Launched).await;
    init.wait("web running", |s| running(s, "web")).await;
    agent
        .wait_state("web", |s| {
            s.is_some_and(|s| s.active == ActiveState::Active)
        })
        .await;
    init.unit("web").unwrap().main_pid
}

/// Moves `web` from this machine to `to` as the scheduler's drain does (a CAS).
async fn move_web(agent: &Running, to: &str) {
    let cas = agent
        .registry
        .assign("web", to, Some(MACHINE))
        .await
        .unwrap();
    assert_eq!(cas, crate::registry::Cas::Done);
}

/// Asserts that web's copy here still runs with `pid`, was never stopped, and its state on
/// this machine is still reported.
async fn assert_web_kept(agent: &Running, init: &FakeInit, pid: u32) {
    assert!(running(&init.lock(), "web"), "{:?}", init.lock());
    assert_eq!(init.unit("web").unwrap().main_pid, pid);
    assert_eq!(init.calls_for("web"), ["LoadUnit web", "StartUnit web"]);
    let states = agent.registry.list_states().await.unwrap().items;
    assert!(
        states
            .iter()
            .any(|s| s.unit == "web" && s.machine == MACHINE && s.active == ActiveState::Active),
        "web's state here must stay reported during the hand-over: {states:?}"
    );
}

/// Waits until web's copy here is stopped and removed, and its state here is gone.
async fn wait_web_gone(agent: &Running, init: &FakeInit) {
    init.wait("web removed", |s| !s.units.contains_key("web"))
        .await;
    assert_eq!(init.calls_for("web").last().unwrap(), "RemoveUnit web");
    agent.wait_state("web", |s| s.is_none()).await;
}

/// A unit moved to a present machine keeps running here while the new copy starts, is
/// stale or only activating, and is stopped once the new machine reports it active.
#[tokio::test]
async fn a_moved_unit_runs_here_until_its_new_copy_is_active() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    let hash = crate::model::body_hash(BODY);
    let pid = web_running(&agent, &init).await;
    let m2 = Peer::join(&agent.registry, "m2").await;

    move_web(&agent, "m2").await;
    sync(&agent, &init, "s1").await;
    assert_web_kept(&agent, &init, pid).await;

    m2.report(&agent.registry, "web", ActiveState::Activating, &hash)
        .await;
    sync(&agent, &init, "s2").await;
    assert_web_kept(&agent, &init, pid).await;

    // Active on another body (an older report) is not the hand-over.
    let stale = crate::model::body_hash("[container]\ncommand = [\"/bin/true\"]\n");
    m2.report(&agent.registry, "web", ActiveState::Active, &stale)
        .await;
    sync(&agent, &init, "s3").await;
    assert_web_kept(&agent, &init, pid).await;

    m2.report(&agent.registry, "web", ActiveState::Active, &hash)
        .await;
    wait_web_gone(&agent, &init).await;
    assert_eq!(
        init.calls_for("web"),
        ["LoadUnit web", "StartUnit web", "RemoveUnit web"]
    );
    agent.stop().await;
}

/// A unit moved to a machine that is not in the registry (a lost machine, no hand-over
/// possible) stops here at once.
#[tokio::test]
async fn a_unit_moved_to_an_absent_machine_stops_at_once() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    web_running(&agent, &init).await;
    move_web(&agent, "m3").await;
    wait_web_gone(&agent, &init).await;
    agent.stop().await;
}

/// Waits until the hand-over of web to m2 runs: web moved, the agent past the move.
async fn handing_over(agent: &Running, init: &FakeInit) -> (Peer, u32) {
    let pid = web_running(agent, init).await;
    let m2 = Peer::join(&agent.registry, "m2").await;
    move_web(agent, "m2").await;
    sync(agent, init, "s1").await;
    assert_web_kept(agent, init, pid).await;
    (m2, pid)
}

/// The new machine's copy failed: nothing to wait for, the old copy stops.
#[tokio::test]
async fn a_hand_over_ends_when_the_new_copy_fails() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    let (m2, _) = handing_over(&agent, &init).await;
    let hash = crate::model::body_hash(BODY);
    m2.report(&agent.registry, "web", ActiveState::Failed, &hash)
        .await;
    wait_web_gone(&agent, &init).await;
    agent.stop().await;
}

/// The new machine leaves the registry (its lease ends) during the hand-over: the old copy
/// stops, and the engine will place the unit again.
#[tokio::test]
async fn a_hand_over_ends_when_the_new_machine_is_gone() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    let (m2, _) = handing_over(&agent, &init).await;
    agent.registry.revoke_lease(m2.lease).await.unwrap();
    wait_web_gone(&agent, &init).await;
    agent.stop().await;
}

/// Unassigned or set inactive during a hand-over: stopped at once, as without one.
#[tokio::test]
async fn a_hand_over_ends_when_the_unit_is_unassigned_or_inactive() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    handing_over(&agent, &init).await;
    agent.registry.unassign("web", "m2").await.unwrap();
    wait_web_gone(&agent, &init).await;

    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    handing_over(&agent, &init).await;
    agent
        .registry
        .set_desired("web", DesiredState::Inactive)
        .await
        .unwrap();
    wait_web_gone(&agent, &init).await;
    agent.stop().await;
}

/// Moved back here during the hand-over: the copy here just keeps running (no restart), and
/// the other machine's report no longer stops it.
#[tokio::test]
async fn a_unit_moved_back_during_a_hand_over_keeps_running() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    let (m2, pid) = handing_over(&agent, &init).await;
    let cas = agent
        .registry
        .assign("web", MACHINE, Some("m2"))
        .await
        .unwrap();
    assert_eq!(cas, crate::registry::Cas::Done);
    let hash = crate::model::body_hash(BODY);
    m2.report(&agent.registry, "web", ActiveState::Active, &hash)
        .await;
    sync(&agent, &init, "s2").await;
    assert_web_kept(&agent, &init, pid).await;
    agent.stop().await;
}

/// A new copy that never becomes active: the old copy stops at the bound, with no registry
/// event to wake the agent (its own timer does).
#[tokio::test]
async fn a_hand_over_ends_at_its_bound() {
    let init = FakeInit::new();
    let bound = Duration::from_millis(700);
    let agent = Running::start_with(&init, bound).await;
    web_running(&agent, &init).await;
    Peer::join(&agent.registry, "m2").await;
    let moved = std::time::Instant::now();
    move_web(&agent, "m2").await;
    wait_web_gone(&agent, &init).await;
    println!(
        "hand-over bound {bound:?}: old copy removed {:?} after the move",
        moved.elapsed()
    );
    agent.stop().await;
}

/// The agent restarts in the middle of a hand-over: it re-derives it from the registry (the
/// unit runs here, is assigned to m2, m2 has not reported it active), keeps the copy
/// running, and stops it once m2 does.
#[tokio::test]
async fn a_restarted_agent_resumes_a_hand_over() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    let (m2, pid) = handing_over(&agent, &init).await;
    let agent = agent.restart(&init).await;
    sync(&agent, &init, "s2").await;
    // The new run's report of web (on its new lease) is there.
    agent
        .wait_state("web", |s| {
            s.is_some_and(|s| s.active == ActiveState::Active)
        })
        .await;
    assert_web_kept(&agent, &init, pid).await;
    let hash = crate::model::body_hash(BODY);
    m2.report(&agent.registry, "web", ActiveState::Active, &hash)
        .await;
    wait_web_gone(&agent, &init).await;
    agent.stop().await;
}

#[test]
fn the_hand_over_policy_table() {
    use super::{handover_step, HandoverFacts, HandoverStep};
    let active = (Wire::from(ActiveState::Active), Some("h".to_string()));
    let failed = (Wire::from(ActiveState::Failed), Some("h".to_string()));
    let base = || HandoverFacts {
        launched: true,
        global: false,
        runs_here: true,
        clash: None,
        to: "m2",
        present: true,
        state: None,
        hash: "h",
        waited: Duration::ZERO,
        bound: Duration::from_secs(120),
    };
    assert_eq!(handover_step(&base()), HandoverStep::Wait);
    let stops = |f: HandoverFacts<'_>| matches!(handover_step(&f), HandoverStep::Stop(_));
    assert!(stops(HandoverFacts {
        state: Some(&active),
        ..base()
    }));
    assert!(stops(HandoverFacts {
        state: Some(&failed),
        ..base()
    }));
    assert!(stops(HandoverFacts {
        present: false,
        ..base()
    }));
    assert!(stops(HandoverFacts {
        launched: false,
        ..base()
    }));
    assert!(stops(HandoverFacts {
        global: true,
        ..base()
    }));
    assert!(stops(HandoverFacts {
        runs_here: false,
        ..base()
    }));
    assert!(stops(HandoverFacts {
        clash: Some("new"),
        ..base()
    }));
    assert!(matches!(
        handover_step(&HandoverFacts {
            waited: Duration::from_secs(120),
            ..base()
        }),
        HandoverStep::Overdue(_)
    ));
}

/// A unit moved away because a unit that replaces it (or conflicts with it) takes this
/// machine stops at once: the two may not run side by side, so there is no hand-over.
#[tokio::test]
async fn a_unit_replaced_here_stops_at_once() {
    let init = FakeInit::new();
    let agent = Running::start(&init).await;
    web_running(&agent, &init).await;
    Peer::join(&agent.registry, "m2").await;
    // As the scheduler does it: the replacement first takes the machine, then web moves.
    let body = "[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n[fleet]\nreplaces = [\"web\"]\n";
    agent
        .submit_body("web2", body, DesiredState::Launched)
        .await;
    move_web(&agent, "m2").await;
    wait_web_gone(&agent, &init).await;
    init.wait("web2 running", |s| running(s, "web2")).await;
    agent.stop().await;
}

/// A probe without an ESP of its own whose files do not exist: what it publishes can only
/// come from init.
fn probe_without_files(dir: &std::path::Path) -> crate::os::OsProbe {
    crate::os::OsProbe {
        os_release: dir.join("no-os-release"),
        cmdline: dir.join("no-cmdline"),
        esp: None,
    }
}

/// Without an ESP of its own the agent publishes init's `GetOsStatus`, and its first
/// registration already carries it (the probe's refresh is an hour away).
#[tokio::test]
async fn the_os_state_comes_from_init_with_the_first_registration() {
    let init = FakeInit::new();
    init.change(None, |s| s.os_status = Some(BOOTED_A.into()));
    let dir = tempfile::tempdir().unwrap();
    let agent = Running::start_probing(&init, Some(probe_without_files(dir.path()))).await;
    let m = agent.wait_machine("registered", |_| true).await;
    assert_eq!(m.os_version, "1.5.0", "{m:?}");
    let os = m.os.expect("an A/B host publishes its update state");
    assert_eq!((os.booted.as_str(), os.next.as_deref()), ("a", Some("b")));
    assert_eq!(os.slots.len(), 2);
    assert_eq!(os.slots[1].tries_left, Some(3));
    assert_eq!(os.update_state(), crate::model::UpdateState::RebootPending);
    agent.stop().await;
}

/// A host booted into slot b on trial, then committed by its init.
fn booted_b(state: &str) -> String {
    let tries = if state == "trying" { "2" } else { "null" };
    let entry = if state == "trying" {
        "flotilla-b+2-1.conf"
    } else {
        "flotilla-b.conf"
    };
    format!(
        r#"{{"running":"b","version":"2.0.0","next":"b","slots":[{{"slot":"a","version":"1.5.0","state":"committed","tries_left":null,"tries_done":null,"entry":"flotilla-a.conf"}},{{"slot":"b","version":"2.0.0","state":"{state}","tries_left":{tries},"tries_done":null,"entry":"{entry}"}}],"rolled_back":null,"job":null}}"#
    )
}

/// While its slot is on trial the agent reads the OS state every few seconds, not at the
/// (here hourly) refresh: the commit a rolling update waits for shows at once.
#[tokio::test]
async fn a_commit_on_trial_is_published_within_seconds() {
    let init = FakeInit::new();
    init.change(None, |s| s.os_status = Some(booted_b("trying")));
    let dir = tempfile::tempdir().unwrap();
    let agent = Running::start_probing(&init, Some(probe_without_files(dir.path()))).await;
    let on_trial = |m: &Machine| {
        m.os.as_ref().map(crate::model::OsState::update_state)
            == Some(crate::model::UpdateState::Trial)
    };
    agent.wait_machine("registered on trial", on_trial).await;
    init.change(None, |s| s.os_status = Some(booted_b("committed")));
    let m = agent
        .wait_machine("the commit published", |m| {
            m.os.as_ref().map(crate::model::OsState::update_state)
                == Some(crate::model::UpdateState::Committed)
        })
        .await;
    assert_eq!(m.os_version, "2.0.0");
    agent.stop().await;
}

/// An older init (`GetOsStatus` is an unknown method): the agent reads the files itself.
#[tokio::test]
async fn an_init_without_get_os_status_falls_back_to_the_probe() {
    let init = FakeInit::new();
    init.change(None, |s| s.no_os_status = true);
    let dir = tempfile::tempdir().unwrap();
    let probe = probe_without_files(dir.path());
    std::fs::write(&probe.os_release, "ID=flotilla\nVERSION_ID=1.4.0\n").unwrap();
    std::fs::write(&probe.cmdline, "console=ttyS0 quiet\n").unwrap();
    let agent = Running::start_probing(&init, Some(probe)).await;
    let m = agent.wait_machine("registered", |_| true).await;
    assert_eq!((m.os_version.as_str(), m.os), ("1.4.0", None));
    agent.stop().await;
}
