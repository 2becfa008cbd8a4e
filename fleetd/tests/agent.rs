//! The agent against a real `flotilla-init` in supervisor mode (one per test, `--launcher
//! host`, its own unit dir, state dir, API socket and cgroup), on the embedded registry, and
//! on a real etcd for the outage case.
//!
//! The init binary is not a target of this crate, so `CARGO_BIN_EXE_flotilla-init` does not
//! exist here: the tests use `target/<profile>/flotilla-init` next to the test binary's
//! `deps/` directory (run `cargo build -p flotilla-init` first), or `FLOTILLA_INIT_BIN`.
//! Waits are bounded by [`WAIT`] and only fail a test that would otherwise hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod etcd_server;
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_server::EtcdServer;
use flotilla_fleetd::{
    Agent, Change, DesiredState, EmbeddedRegistry, EtcdConfig, EtcdRegistry, InitApi, Machine,
    Registry, UnitRecord, UnitState,
};
use flotilla_init_api::client::Client;
use flotilla_init_api::{ActiveState, SubState, UnitInfo};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use support::{kill_cgroup, spawn_init};

/// The bound on every wait.
const WAIT: Duration = Duration::from_secs(30);
/// The agents' lease TTL.
const TTL: Duration = Duration::from_secs(1);
const SLEEP: &str = "[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n";

/// A `flotilla-init` supervisor, killed on drop with everything in its cgroup.
struct Init {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    cgroup: String,
}

impl Init {
    /// Starts init over `units` (name, text) in its own unit directory.
    fn start(units: &[(&str, &str)]) -> Init {
        let dir = tempfile::tempdir().unwrap();
        let unit_dir = dir.path().join("units");
        fs::create_dir_all(&unit_dir).unwrap();
        for (name, text) in units {
            fs::write(unit_dir.join(format!("{name}.toml")), text).unwrap();
        }
        let socket = dir.path().join("manager.sock");
        let cgroup = format!(
            "flotilla-fleetd-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let child = spawn_init(&[], dir.path(), &unit_dir, &socket, &cgroup);
        let init = Init {
            child: Some(child),
            dir,
            socket,
            cgroup,
        };
        let start = Instant::now();
        while Client::connect(&init.socket)
            .and_then(|c| c.list_units())
            .is_err()
        {
            assert!(
                start.elapsed() < WAIT,
                "init did not answer:\n{}",
                init.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        init
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("init.log")).unwrap_or_default()
    }

    fn api(&self) -> InitApi {
        InitApi::new(&self.socket)
    }

    /// The unit as init has it, `None` if init does not know it.
    fn unit(&self, name: &str) -> Option<UnitInfo> {
        Client::connect(&self.socket)
            .unwrap()
            .list_units()
            .unwrap()
            .into_iter()
            .find(|u| u.name == name)
    }

    fn active_pid(&self, name: &str) -> Option<u32> {
        self.unit(name)
            .filter(|u| u.active_state == ActiveState::Active && u.main_pid != 0)
            .map(|u| u.main_pid)
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_cgroup(&self.cgroup);
    }
}

/// A running agent; `stop` ends it the way fleetd's shutdown would.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the agent stops on shutdown")
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn machine(id: &str, metadata: &[(&str, &str)]) -> Machine {
    Machine {
        id: id.into(),
        address: "127.0.0.1".into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        api: None,
        images: Vec::new(),
        os_version: String::new(),
        os: None,
    }
}

fn spawn(registry: &Arc<dyn Registry>, init: &Init, machine: Machine) -> Running {
    let agent = Agent::new(registry.clone(), init.api(), machine, TTL);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        agent
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running {
        stop: Some(tx),
        task,
    }
}

async fn embedded() -> (Arc<dyn Registry>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let registry: Arc<dyn Registry> = Arc::new(EmbeddedRegistry::open(dir.path()).await.unwrap());
    (registry, dir)
}

async fn submit(r: &Arc<dyn Registry>, name: &str, body: &str, desired: DesiredState) {
    let hash = r.put_body(body).await.unwrap();
    r.put_unit(&UnitRecord {
        name: name.into(),
        hash,
        desired,
    })
    .await
    .unwrap();
}

/// Polls `probe` until it gives `Some`, at most [`WAIT`].
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < WAIT, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn state(r: &Arc<dyn Registry>, unit: &str, machine: &str) -> Option<UnitState> {
    r.list_states()
        .await
        .ok()?
        .items
        .into_iter()
        .find(|s| s.unit == unit && s.machine == machine)
}

/// Waits until `unit` runs in init, and returns its pid.
async fn wait_running(init: &Init, unit: &str) -> u32 {
    wait_for(&format!("{unit} to be active in init"), || async {
        init.active_pid(unit)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_unit_runs_and_its_state_is_reported() {
    let init = Init::start(&[]);
    let (registry, _dir) = embedded().await;
    // No id given: the agent asks init (GetMachineId).
    let agent = spawn(&registry, &init, machine("", &[]));
    let id = init.api().machine_id().await.unwrap();
    wait_for("the machine to register", || async {
        registry.get_machine(&id).await.unwrap()
    })
    .await;

    submit(&registry, "web", SLEEP, DesiredState::Launched).await;
    registry.assign("web", &id, None).await.unwrap();
    let pid = wait_running(&init, "web").await;
    let reported = wait_for("web's state in the registry", || async {
        state(&registry, "web", &id)
            .await
            .filter(|s| s.active == ActiveState::Active && s.pid == Some(pid))
    })
    .await;
    assert_eq!(reported.sub, SubState::Running);
    assert_eq!(reported.hash, Some(flotilla_fleetd::body_hash(SLEEP)));
    agent.stop().await;
    // Shutting the agent down leaves the unit running.
    assert_eq!(init.active_pid("web"), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unassigned_unit_is_stopped_and_removed() {
    let init = Init::start(&[]);
    let (registry, _dir) = embedded().await;
    let agent = spawn(&registry, &init, machine("m1", &[]));
    submit(&registry, "web", SLEEP, DesiredState::Launched).await;
    registry.assign("web", "m1", None).await.unwrap();
    let pid = wait_running(&init, "web").await;

    registry.unassign("web", "m1").await.unwrap();
    wait_for("web to be removed from init", || async {
        init.unit("web").is_none().then_some(())
    })
    .await;
    wait_for("web's process to end", || async {
        (!alive(pid)).then_some(())
    })
    .await;
    wait_for("web's state to be removed", || async {
        state(&registry, "web", "m1").await.is_none().then_some(())
    })
    .await;

    // Desired inactive also takes it away.
    registry.assign("web", "m1", None).await.unwrap();
    wait_running(&init, "web").await;
    registry
        .set_desired("web", DesiredState::Inactive)
        .await
        .unwrap();
    wait_for("web to be removed from init", || async {
        init.unit("web").is_none().then_some(())
    })
    .await;
    agent.stop().await;
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_loaded_is_loaded_not_started() {
    let init = Init::start(&[]);
    let (registry, _dir) = embedded().await;
    let agent = spawn(&registry, &init, machine("m1", &[]));
    submit(&registry, "web", SLEEP, DesiredState::Loaded).await;
    registry.assign("web", "m1", None).await.unwrap();
    let reported = wait_for("web's loaded state", || async {
        state(&registry, "web", "m1").await
    })
    .await;
    assert_eq!((reported.active.as_str(), reported.pid), ("inactive", None));
    let info = init.unit("web").unwrap();
    assert_eq!(
        (info.load_state.as_str(), info.active_state.as_str()),
        ("loaded", "inactive")
    );

    // loaded → launched starts it; launched → loaded stops it and keeps it loaded.
    registry
        .set_desired("web", DesiredState::Launched)
        .await
        .unwrap();
    wait_running(&init, "web").await;
    registry
        .set_desired("web", DesiredState::Loaded)
        .await
        .unwrap();
    wait_for("web to stop and stay loaded", || async {
        init.unit("web")
            .filter(|u| u.active_state == ActiveState::Inactive)
            .map(|_| ())
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_units_run_where_their_metadata_fits() {
    let init = Init::start(&[]);
    let (registry, _dir) = embedded().await;
    let agent = spawn(&registry, &init, machine("m1", &[("role", "web")]));
    let fits = format!("{SLEEP}[fleet]\nglobal = true\nmachine_metadata = [\"role=web\"]\n");
    let other = format!("{SLEEP}[fleet]\nglobal = true\nmachine_metadata = [\"role=db\"]\n");
    submit(&registry, "other", &other, DesiredState::Launched).await;
    submit(&registry, "fits", &fits, DesiredState::Launched).await;
    wait_running(&init, "fits").await;
    wait_for("fits's state", || async {
        state(&registry, "fits", "m1")
            .await
            .filter(|s| s.active == ActiveState::Active)
    })
    .await;
    // Both were submitted before `fits` ran, and the agent handles changes in order.
    assert!(init.unit("other").is_none());
    assert!(state(&registry, "other", "m1").await.is_none());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_own_units_are_never_touched() {
    let init = Init::start(&[("host", SLEEP)]);
    let host_pid = wait_running(&init, "host").await;
    let (registry, _dir) = embedded().await;
    let agent = spawn(&registry, &init, machine("m1", &[]));
    // A cluster unit of the same name, assigned here, then taken away; and another unit.
    submit(
        &registry,
        "host",
        "[container]\ncommand = [\"/bin/sleep\", \"2000\"]\n",
        DesiredState::Launched,
    )
    .await;
    registry.assign("host", "m1", None).await.unwrap();
    submit(&registry, "web", SLEEP, DesiredState::Launched).await;
    registry.assign("web", "m1", None).await.unwrap();
    wait_running(&init, "web").await;
    registry.unassign("host", "m1").await.unwrap();
    registry.unassign("web", "m1").await.unwrap();
    wait_for("web to be removed", || async {
        init.unit("web").is_none().then_some(())
    })
    .await;
    assert_eq!(init.active_pid("host"), Some(host_pid));
    let text = Client::connect(&init.socket)
        .unwrap()
        .cat_unit("host")
        .unwrap();
    assert_eq!(text, SLEEP);
    assert!(state(&registry, "host", "m1").await.is_none());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_neither_duplicates_nor_stops_units() {
    let init = Init::start(&[]);
    let (registry, _dir) = embedded().await;
    let agent = spawn(&registry, &init, machine("m1", &[]));
    submit(&registry, "web", SLEEP, DesiredState::Launched).await;
    submit(&registry, "idle", SLEEP, DesiredState::Loaded).await;
    registry.assign("web", "m1", None).await.unwrap();
    registry.assign("idle", "m1", None).await.unwrap();
    let pid = wait_running(&init, "web").await;
    wait_for("idle's state", || async {
        state(&registry, "idle", "m1").await
    })
    .await;
    agent.stop().await;

    // The old lease is still live: the new agent waits for it (MachineIdTaken), then takes
    // over what init runs.
    let agent = spawn(&registry, &init, machine("m1", &[]));
    let reported = wait_for("the new agent to report web", || async {
        registry.get_machine("m1").await.unwrap()?;
        state(&registry, "web", "m1").await
    })
    .await;
    assert_eq!(reported.pid, Some(pid));
    assert_eq!(init.active_pid("web"), Some(pid));
    assert_eq!(init.unit("web").unwrap().restarts, 0);
    let idle = init.unit("idle").unwrap();
    assert_eq!(idle.active_state, ActiveState::Inactive);
    agent.stop().await;
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// The pid of the etcd listening on `endpoint` (found by its command line).
fn etcd_pid(endpoint: &str) -> i32 {
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--listen-client-urls" && w[1] == endpoint.as_bytes())
        {
            return pid;
        }
    }
    panic!("no etcd process listens on {endpoint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_keep_running_while_etcd_is_unreachable() {
    let etcd = EtcdServer::start().await;
    let mut config = EtcdConfig::new(vec![etcd.endpoint.clone()]).with_prefix("/agent/");
    config.connect_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(1);
    let registry: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(config).await.unwrap());
    let init = Init::start(&[]);
    let agent = spawn(&registry, &init, machine("m1", &[]));
    submit(&registry, "web", SLEEP, DesiredState::Launched).await;
    registry.assign("web", "m1", None).await.unwrap();
    let pid = wait_running(&init, "web").await;
    wait_for("web's state", || async {
        state(&registry, "web", "m1").await
    })
    .await;

    // Freeze etcd for a few TTLs: every request times out, the lease runs out.
    let etcd_pid = rustix::process::Pid::from_raw(etcd_pid(&etcd.endpoint)).unwrap();
    rustix::process::kill_process(etcd_pid, rustix::process::Signal::STOP).unwrap();
    tokio::time::sleep(TTL * 4).await;
    assert_eq!(init.active_pid("web"), Some(pid), "{}", init.log());
    let resumed = now_ms();
    rustix::process::kill_process(etcd_pid, rustix::process::Signal::CONT).unwrap();

    // Back: the machine is registered again and web reported anew, same process.
    let reported = wait_for("the agent to register and report again", || async {
        registry.get_machine("m1").await.ok()??;
        state(&registry, "web", "m1")
            .await
            .filter(|s| s.updated_at >= resumed)
    })
    .await;
    assert_eq!(reported.pid, Some(pid));
    assert_eq!(init.active_pid("web"), Some(pid));
    agent.stop().await;
}

/// Starts init with the container launcher over the image store `store` (what it answers to
/// `ListImages`), no units.
fn start_container_init(store: &std::path::Path) -> Init {
    let dir = tempfile::tempdir().unwrap();
    let unit_dir = dir.path().join("units");
    fs::create_dir_all(&unit_dir).unwrap();
    let socket = dir.path().join("manager.sock");
    let cgroup = format!(
        "flotilla-fleetd-test-{}-{}",
        std::process::id(),
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let child = std::process::Command::new(support::init_binary())
        .arg("--units")
        .arg(&unit_dir)
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--api")
        .arg(&socket)
        .arg("--images")
        .arg(store)
        .args(["--cgroup", &cgroup])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(dir.path().join("init.log")).unwrap())
        .spawn()
        .unwrap();
    let init = Init {
        child: Some(child),
        dir,
        socket,
        cgroup,
    };
    let start = Instant::now();
    while Client::connect(&init.socket)
        .and_then(|c| c.list_units())
        .is_err()
    {
        assert!(
            start.elapsed() < WAIT,
            "init did not answer:\n{}",
            init.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    init
}

/// Puts a one-layer image of a static busybox into `store` under `name`, as a pull would.
fn put_busybox_image(work: &std::path::Path, store: &std::path::Path, name: &str) {
    let busybox = qemu_tests::ensure_program("busybox", "busybox-static").unwrap();
    let root = work.join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    let tar = work.join("layer.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let layout = work.join("layout");
    let config = flotilla_container::image::RuntimeConfig {
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    flotilla_container::image::write_oci_layout(&layout, &[tar], &config, name).unwrap();
    flotilla_container::image::ImageStore::open(store)
        .unwrap()
        .import_oci_layout(&layout, Some(name), &mut |_| {})
        .unwrap();
}

/// The scheduler prefers the machine whose init already holds the unit's image: two real
/// inits (container launcher), only m2's store holds the image; m2's agent publishes it
/// (`ListImages`), and the engine places the unit there although m1 has the smaller id and
/// the same load. It runs on m2 from the store, with no pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_places_a_unit_on_the_machine_that_holds_its_image() {
    let tmp = tempfile::tempdir().unwrap();
    let image = "127.0.0.1:5000/team/app:1";
    let holder_store = tmp.path().join("store-m2");
    put_busybox_image(tmp.path(), &holder_store, image);
    let init1 = start_container_init(&tmp.path().join("store-m1"));
    let init2 = start_container_init(&holder_store);
    let (registry, _dir) = embedded().await;
    let agent1 = spawn(&registry, &init1, machine("m1", &[]));
    let agent2 = spawn(&registry, &init2, machine("m2", &[]));
    wait_for("m2 to publish its image", || async {
        registry
            .get_machine("m2")
            .await
            .unwrap()
            .filter(|m| m.images == [image])
    })
    .await;
    let m1 = wait_for("m1 to register", || async {
        registry.get_machine("m1").await.unwrap()
    })
    .await;
    assert!(m1.images.is_empty(), "{m1:?}");

    let engine = flotilla_fleetd::Engine::new(registry.clone(), "m1", Duration::from_secs(2))
        .with_debounce(Duration::from_millis(50));
    let (stop_engine, stopped) = oneshot::channel::<()>();
    let engine = tokio::spawn(engine.run(async move {
        let _ = stopped.await;
    }));
    let body = format!(
        "[container]\nimage = \"{image}\"\npull = \"never\"\n\
         command = [\"/bin/busybox\", \"sleep\", \"100000\"]\n"
    );
    submit(&registry, "web", &body, DesiredState::Launched).await;
    let on = wait_for("web to be assigned", || async {
        registry.get_assignment("web").await.unwrap()
    })
    .await;
    assert_eq!(on, "m2");
    wait_running(&init2, "web").await;
    assert!(init1.unit("web").is_none());
    let _ = stop_engine.send(());
    tokio::time::timeout(WAIT, engine)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    agent1.stop().await;
    agent2.stop().await;
}

/// A planned move hands over: `web` runs on m1 (a real init), the scheduler's drain moves it
/// to m2 with a compare-and-swap while m1 stays present, and m1's copy (its real process)
/// keeps running until m2's real init runs the new copy and m2's agent reports it active;
/// only then does m1 stop it. m2 is present (its record on a lease, as a machine whose agent
/// is slow to start it) before its agent runs, so that the window is as long as the test
/// wants; its agent then takes that lease over (the lease file, as fleetd does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_unit_runs_on_its_old_machine_until_the_new_copy_is_active() {
    let (registry, dir) = embedded().await;
    hand_over_on(registry, dir.path()).await;
}

/// The same on etcd: the other machine's record and states reach the agent through etcd's
/// watch of the whole key prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_unit_hands_over_on_etcd() {
    let etcd = EtcdServer::start().await;
    let config = EtcdConfig::new(vec![etcd.endpoint.clone()]).with_prefix("/handover/");
    let registry: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(config).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    hand_over_on(registry, dir.path()).await;
}

/// See [`a_moved_unit_runs_on_its_old_machine_until_the_new_copy_is_active`]; `dir` holds
/// m2's lease file.
async fn hand_over_on(registry: Arc<dyn Registry>, dir: &std::path::Path) {
    let init1 = Init::start(&[]);
    let init2 = Init::start(&[]);
    let agent1 = spawn(&registry, &init1, machine("m1", &[]));
    submit(&registry, "web", SLEEP, DesiredState::Launched).await;
    registry.assign("web", "m1", None).await.unwrap();
    let old_pid = wait_running(&init1, "web").await;
    wait_for("web's active state on m1", || async {
        state(&registry, "web", "m1")
            .await
            .filter(|s| s.active == ActiveState::Active && s.pid == Some(old_pid))
    })
    .await;

    // m2 is present; its agent has not started anything yet.
    let lease = registry.grant_lease(Duration::from_secs(60)).await.unwrap();
    registry
        .register_machine(&machine("m2", &[]), lease)
        .await
        .unwrap();
    let lease_file = dir.join("m2.lease");
    fs::write(&lease_file, format!("m2 {}\n", lease.0)).unwrap();

    let from = registry.snapshot().await.unwrap().revision + 1;
    let mut watch = registry.watch(from).await.unwrap();
    let moved = Instant::now();
    let cas = registry.assign("web", "m2", Some("m1")).await.unwrap();
    assert_eq!(cas, flotilla_fleetd::Cas::Done);
    // A unit assigned to m1 after the move runs only once m1's agent applied the move.
    submit(&registry, "after", SLEEP, DesiredState::Launched).await;
    registry.assign("after", "m1", None).await.unwrap();
    wait_running(&init1, "after").await;
    assert!(alive(old_pid), "m1 stopped web before m2 runs it");
    assert_eq!(init1.active_pid("web"), Some(old_pid));
    assert!(state(&registry, "web", "m1")
        .await
        .is_some_and(|s| s.active == ActiveState::Active));
    assert!(init2.unit("web").is_none());

    // m2's agent starts, takes over m2's lease, runs web.
    let agent = Agent::new(registry.clone(), init2.api(), machine("m2", &[]), TTL)
        .with_lease_file(&lease_file);
    let (stop2, rx) = oneshot::channel::<()>();
    let task2 = tokio::spawn(async move {
        agent
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    let agent2 = Running {
        stop: Some(stop2),
        task: task2,
    };

    // The registry's history: m2's active report comes before m1's copy of web reports
    // anything but active, or is removed.
    let mut new_active_at = None;
    let history = tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        loop {
            let event = watch.next().await.unwrap().unwrap();
            match event.change {
                Change::StatePut(s) if s.unit == "web" => {
                    seen.push(format!(
                        "{} {} pid {:?}",
                        s.machine,
                        s.active.as_str(),
                        s.pid
                    ));
                    if s.machine == "m2" && s.active == ActiveState::Active {
                        new_active_at.get_or_insert(moved.elapsed());
                    }
                }
                Change::StateRemoved { unit, machine } if unit == "web" => {
                    seen.push(format!("{machine} removed"));
                    if machine == "m1" {
                        return seen;
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .expect("m1's state of web is removed once m2 runs it");
    let stopped_at = moved.elapsed();
    let first_new_active = history
        .iter()
        .position(|e| e.starts_with("m2 active"))
        .unwrap_or_else(|| panic!("m2 never reported web active before m1 stopped: {history:?}"));
    let first_old_change = history
        .iter()
        .position(|e| e.starts_with("m1 ") && !e.starts_with("m1 active"))
        .unwrap();
    assert!(
        first_new_active < first_old_change,
        "m1's copy ended before m2's was active: {history:?}"
    );
    let new_pid = wait_running(&init2, "web").await;
    wait_for("m1's copy of web to end", || async {
        (!alive(old_pid) && init1.unit("web").is_none()).then_some(())
    })
    .await;
    assert!(alive(new_pid));
    assert!(init1.active_pid("after").is_some());
    println!(
        "hand-over: m2's copy active {:?} after the move, m1's copy stopped and its state removed {stopped_at:?} after it; events {history:?}",
        new_active_at.unwrap_or_default()
    );
    agent1.stop().await;
    agent2.stop().await;
}
