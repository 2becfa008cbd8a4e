//! The manager's state machine, deterministic: a fake launcher and a fake [`ProcessControl`]
//! whose processes are records. Launching returns a fake pid and records the start; signals
//! are recorded, never delivered (a fake pid cannot reach a real process); a scope is empty
//! once the test has ended its process. Exits arrive through [`Manager::on_exit`] and time
//! passes only through [`Manager::tick`] with virtual instants, so every assertion names an
//! exact time. No root, no sleeping, no real child.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use flotilla_units::Unit;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::{
    ActiveState, Config, ListImagesError, Manager, ProcessControl, PullSpawnError, Puller,
    SubState, UnitResult,
};
use crate::api::{ApiError, ImageEntry, Request, Response};
use crate::launcher::{LaunchError, LaunchIo, Launcher};
use crate::logs::LogConfig;
use crate::scope::{Limits, Scope, ScopeError, ScopeRoot};

/// Where a recorded signal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    /// Every process of the unit's scope.
    Scope,
    /// The main process only.
    Main,
}

/// What the fakes saw, at virtual time (since the test's start).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Launch(String, Duration),
    Signal(String, To, Signal, Duration),
    /// The pull helper started for (unit, image).
    Pull(String, String, Duration),
}

#[derive(Default)]
struct World {
    now: Duration,
    next_pid: i32,
    events: Vec<Ev>,
    /// Unit → pid of its process that runs (its scope is populated).
    running: BTreeMap<String, Pid>,
    /// Units whose scope keeps a process after the main one ended (a forked child).
    lingering: BTreeSet<String>,
    /// Images the fake store holds.
    images: BTreeSet<String>,
    /// Unit → pid of its pull helper that runs.
    pulling: BTreeMap<String, (Pid, String)>,
}

/// A pull helper that is a record: the test ends it with [`Harness::pulled`].
struct FakePuller {
    world: Rc<RefCell<World>>,
}

impl Puller for FakePuller {
    fn has_image(&mut self, image: &str) -> bool {
        self.world.borrow().images.contains(image)
    }
    fn images(&mut self) -> Result<Vec<ImageEntry>, ListImagesError> {
        let w = self.world.borrow();
        Ok(w.images
            .iter()
            .map(|i| ImageEntry {
                name: i.clone(),
                digest: format!("sha256:{}", i.len()),
            })
            .collect())
    }
    fn spawn(&mut self, unit: &str, image: &str, _io: LaunchIo) -> Result<Pid, PullSpawnError> {
        let mut w = self.world.borrow_mut();
        w.next_pid += 1;
        let pid = Pid::from_raw(4_000_000 + w.next_pid);
        let now = w.now;
        w.events.push(Ev::Pull(unit.into(), image.into(), now));
        w.pulling.insert(unit.into(), (pid, image.into()));
        Ok(pid)
    }
}

/// A command the fake launcher refuses to run (the unit fails `spawn`).
const UNLAUNCHABLE: &str = "/nonexistent";

struct FakeLauncher {
    world: Rc<RefCell<World>>,
    main_only: bool,
}

impl Launcher for FakeLauncher {
    fn launch(&mut self, unit: &Unit, _scope: &Scope, _io: LaunchIo) -> Result<Pid, LaunchError> {
        if unit.container.command.first().map(String::as_str) == Some(UNLAUNCHABLE) {
            return Err(LaunchError::Unsupported(format!(
                "{UNLAUNCHABLE}: no such file"
            )));
        }
        let mut w = self.world.borrow_mut();
        w.next_pid += 1;
        // Never a real process: nothing is delivered to it anyway.
        let pid = Pid::from_raw(4_000_000 + w.next_pid);
        let now = w.now;
        w.events.push(Ev::Launch(unit.name.clone(), now));
        w.running.insert(unit.name.clone(), pid);
        Ok(pid)
    }

    fn terminate_main_only(&self) -> bool {
        self.main_only
    }
}

struct FakeProcs {
    world: Rc<RefCell<World>>,
    root: ScopeRoot,
}

impl FakeProcs {
    fn record(&mut self, unit: &str, to: To, signal: Signal) {
        let mut w = self.world.borrow_mut();
        let now = w.now;
        w.events.push(Ev::Signal(unit.to_string(), to, signal, now));
    }
}

impl ProcessControl for FakeProcs {
    fn root(&self) -> &ScopeRoot {
        &self.root
    }
    fn prepare(&mut self, _unit: &str) -> Result<Scope, ScopeError> {
        Ok(Scope::ProcessGroup { pgid: None })
    }
    fn apply(&mut self, _unit: &str, _scope: &Scope, _limits: &Limits) -> Result<(), ScopeError> {
        Ok(())
    }
    fn signal_scope(&mut self, unit: &str, _scope: &Scope, signal: Signal) {
        self.record(unit, To::Scope, signal);
    }
    fn signal_main(&mut self, unit: &str, _pid: Pid, signal: Signal) {
        self.record(unit, To::Main, signal);
    }
    fn is_empty(&mut self, unit: &str, _scope: &Scope) -> bool {
        let w = self.world.borrow();
        !w.running.contains_key(unit) && !w.lingering.contains(unit)
    }
    fn oom_kills(&mut self, _unit: &str, _scope: &Scope) -> u64 {
        0
    }
    fn remove(&mut self, _unit: &str, _scope: &Scope) {}
    fn remove_root(&mut self) {}
}

/// A manager over unit files in a temporary directory, on fake processes and virtual time.
struct Harness {
    m: Manager,
    world: Rc<RefCell<World>>,
    t0: Instant,
    dir: tempfile::TempDir,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A unit file: `[container]` with a command, then `extra` (TOML sections).
fn unit(extra: &str) -> String {
    format!("[container]\ncommand = [\"/bin/true\"]\n{extra}\n")
}

impl Harness {
    fn new(units: &[(&str, &str)]) -> Harness {
        Self::with(units, false, secs(90))
    }

    fn with(units: &[(&str, &str)], main_only: bool, shutdown_timeout: Duration) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in units {
            std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
        }
        let world = Rc::new(RefCell::new(World::default()));
        let cfg = Config {
            unit_dirs: vec![dir.path().to_path_buf()],
            api_units_dir: None,
            logs: LogConfig::default(),
            shutdown_timeout,
        };
        let launcher = FakeLauncher {
            world: world.clone(),
            main_only,
        };
        let procs = FakeProcs {
            world: world.clone(),
            root: ScopeRoot::ProcessGroup,
        };
        let mut m = Manager::with_processes(cfg, Box::new(launcher), Box::new(procs), None);
        m.set_puller(Box::new(FakePuller {
            world: world.clone(),
        }));
        Harness {
            m,
            world,
            t0: Instant::now(),
            dir,
        }
    }

    fn set_now(&mut self, at: Duration) -> Instant {
        self.world.borrow_mut().now = at;
        self.t0 + at
    }

    /// Advance virtual time to `at`; returns the manager's next deadline (as virtual time).
    fn tick(&mut self, at: Duration) -> Option<Duration> {
        let now = self.set_now(at);
        self.m.tick(now).map(|d| d.duration_since(self.t0))
    }

    fn request(&mut self, at: Duration, req: Request) -> Result<(), ApiError> {
        self.set_now(at);
        self.m.handle(req).map(|_| ())
    }

    /// The main process of `unit` ends with `status` at `at` (as waitpid reports it).
    fn end(&mut self, unit: &str, at: Duration, status: impl Fn(Pid) -> WaitStatus) {
        let pid = self.world.borrow_mut().running.remove(unit).unwrap();
        let now = self.set_now(at);
        self.m.on_exit(status(pid), now);
    }

    /// The pull helper of `unit` exits with `code` at `at` (0: the image is in the store).
    fn pulled(&mut self, unit: &str, at: Duration, code: i32) {
        let (pid, image) = self.world.borrow_mut().pulling.remove(unit).unwrap();
        if code == 0 {
            self.world.borrow_mut().images.insert(image);
        }
        let now = self.set_now(at);
        self.m.on_exit(WaitStatus::Exited(pid, code), now);
    }

    fn exit(&mut self, unit: &str, at: Duration, code: i32) {
        self.end(unit, at, |pid| WaitStatus::Exited(pid, code));
    }

    fn killed(&mut self, unit: &str, at: Duration, sig: Signal) {
        self.end(unit, at, |pid| WaitStatus::Signaled(pid, sig, false));
    }

    fn state(&self, unit: &str) -> (ActiveState, SubState, UnitResult) {
        let s = &self.m.slots[unit];
        (s.active(), s.sub(), s.outcome())
    }

    fn message(&self, unit: &str) -> String {
        self.m.slots[unit].message().to_string()
    }

    /// Everything recorded since the last call.
    fn take(&mut self) -> Vec<Ev> {
        std::mem::take(&mut self.world.borrow_mut().events)
    }

    fn rewrite(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(format!("{name}.toml")), text).unwrap();
    }
}

fn launch(unit: &str, at: Duration) -> Ev {
    Ev::Launch(unit.into(), at)
}

fn sig(unit: &str, to: To, s: Signal, at: Duration) -> Ev {
    Ev::Signal(unit.into(), to, s, at)
}

/// After a main process ends, whatever it left in its scope gets SIGKILL.
fn reap(unit: &str, at: Duration) -> Ev {
    sig(unit, To::Scope, Signal::SIGKILL, at)
}

const RUNNING: (ActiveState, SubState, UnitResult) =
    (ActiveState::Active, SubState::Running, UnitResult::Success);
const DEAD: (ActiveState, SubState, UnitResult) =
    (ActiveState::Inactive, SubState::Dead, UnitResult::Success);

#[test]
fn start_follows_after_and_before() {
    let oneshot = "[service]\ntype = \"oneshot\"";
    let mut h = Harness::new(&[
        ("db", &unit(oneshot)),
        (
            "migrate",
            &unit(&format!("[unit]\nbefore = [\"app\"]\n{oneshot}")),
        ),
        ("app", &unit("[unit]\nafter = [\"db\"]")),
        ("other", &unit("")),
    ]);
    h.m.start_all();
    assert_eq!(h.tick(ms(0)), None);
    // app waits for db (after) and migrate (before app); the rest start at once.
    assert_eq!(
        h.take(),
        [
            launch("db", ms(0)),
            launch("migrate", ms(0)),
            launch("other", ms(0))
        ]
    );
    assert_eq!(
        h.state("app"),
        (
            ActiveState::Activating,
            SubState::Waiting,
            UnitResult::Success
        )
    );
    assert_eq!(
        h.state("db"),
        (
            ActiveState::Activating,
            SubState::Start,
            UnitResult::Success
        )
    );

    h.exit("db", ms(5), 0);
    h.tick(ms(5));
    assert_eq!(h.take(), [reap("db", ms(5))]);
    assert_eq!(
        h.state("db"),
        (ActiveState::Active, SubState::Exited, UnitResult::Success)
    );
    assert_eq!(
        h.state("app"),
        (
            ActiveState::Activating,
            SubState::Waiting,
            UnitResult::Success
        )
    );

    h.exit("migrate", ms(8), 0);
    h.tick(ms(8));
    assert_eq!(h.take(), [reap("migrate", ms(8)), launch("app", ms(8))]);
    assert_eq!(h.state("app"), RUNNING);
}

#[test]
fn required_failure_fails_the_dependant_wanted_failure_does_not() {
    let failing_oneshot = "[service]\ntype = \"oneshot\"";
    let mut h = Harness::new(&[
        ("need", &unit(failing_oneshot)),
        ("want", &unit(failing_oneshot)),
        (
            "app",
            &unit("[unit]\nrequires = [\"need\"]\nafter = [\"need\"]"),
        ),
        ("helper", &unit("[unit]\nwants = [\"want\"]")),
        ("orphan", &unit("[unit]\nrequires = [\"ghost\"]")),
    ]);
    // Starting the dependants pulls in what they require or want.
    h.request(ms(0), Request::StartUnit("app".into())).unwrap();
    h.request(ms(0), Request::StartUnit("helper".into()))
        .unwrap();
    h.request(ms(0), Request::StartUnit("orphan".into()))
        .unwrap();
    h.tick(ms(0));
    assert_eq!(
        h.take(),
        [
            launch("helper", ms(0)),
            launch("need", ms(0)),
            launch("want", ms(0))
        ]
    );
    let orphan = h.state("orphan");
    assert_eq!(
        orphan,
        (
            ActiveState::Failed,
            SubState::Failed,
            UnitResult::Dependency
        )
    );
    assert!(
        h.message("orphan").contains("ghost"),
        "{}",
        h.message("orphan")
    );

    h.exit("need", ms(3), 1);
    h.exit("want", ms(3), 1);
    h.tick(ms(3));
    assert_eq!(
        h.state("need"),
        (ActiveState::Failed, SubState::Failed, UnitResult::ExitCode)
    );
    assert_eq!(
        h.state("want"),
        (ActiveState::Failed, SubState::Failed, UnitResult::ExitCode)
    );
    assert_eq!(
        h.state("app"),
        (
            ActiveState::Failed,
            SubState::Failed,
            UnitResult::Dependency
        )
    );
    assert!(h.message("app").contains("need"), "{}", h.message("app"));
    assert_eq!(h.state("helper"), RUNNING);
    // app never ran.
    assert_eq!(h.take(), [reap("need", ms(3)), reap("want", ms(3))]);
}

#[test]
fn a_required_unit_that_cannot_start_fails_the_dependant_a_wanted_one_does_not() {
    let broken = format!("[container]\ncommand = [\"{UNLAUNCHABLE}\"]\n");
    let mut h = Harness::new(&[
        ("need", &broken),
        ("want", &broken),
        (
            "app",
            &unit("[unit]\nrequires = [\"need\"]\nafter = [\"need\"]"),
        ),
        (
            "helper",
            &unit("[unit]\nwants = [\"want\"]\nafter = [\"want\"]"),
        ),
    ]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(
        h.state("need"),
        (ActiveState::Failed, SubState::Failed, UnitResult::Spawn)
    );
    assert_eq!(
        h.state("want"),
        (ActiveState::Failed, SubState::Failed, UnitResult::Spawn)
    );
    assert_eq!(
        h.state("app"),
        (
            ActiveState::Failed,
            SubState::Failed,
            UnitResult::Dependency
        )
    );
    assert!(h.message("app").contains("need"), "{}", h.message("app"));
    assert_eq!(h.state("helper"), RUNNING);
    // A failed launch kills what a given-up setup may have left in the scope.
    assert_eq!(
        h.take(),
        [
            sig("need", To::Scope, Signal::SIGKILL, ms(0)),
            sig("want", To::Scope, Signal::SIGKILL, ms(0)),
            launch("helper", ms(0))
        ]
    );
}

#[test]
fn stopping_a_unit_first_stops_the_units_that_require_it() {
    let mut h = Harness::new(&[
        ("db", &unit("")),
        (
            "app",
            &unit("[unit]\nrequires = [\"db\"]\nafter = [\"db\"]"),
        ),
        (
            "cache",
            &unit("[unit]\nrequires = [\"app\"]\nafter = [\"app\"]"),
        ),
        ("tool", &unit("[unit]\nwants = [\"db\"]\nafter = [\"db\"]")),
    ]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take().len(), 4);

    h.request(secs(1), Request::StopUnit("db".into())).unwrap();
    h.tick(secs(1));
    // cache requires app, which requires db: the three stop, in reverse start order.
    assert_eq!(
        h.take(),
        [sig("cache", To::Scope, Signal::SIGTERM, secs(1))]
    );
    assert_eq!(h.state("db"), RUNNING);
    h.killed("cache", ms(1100), Signal::SIGTERM);
    h.tick(ms(1100));
    assert_eq!(h.state("cache"), DEAD);
    assert_eq!(
        h.take(),
        [
            reap("cache", ms(1100)),
            sig("app", To::Scope, Signal::SIGTERM, ms(1100))
        ]
    );
    h.killed("app", ms(1200), Signal::SIGTERM);
    h.tick(ms(1200));
    assert_eq!(
        h.take(),
        [
            reap("app", ms(1200)),
            sig("db", To::Scope, Signal::SIGTERM, ms(1200))
        ]
    );
    h.killed("db", ms(1300), Signal::SIGTERM);
    h.tick(ms(1300));
    assert_eq!(h.take(), [reap("db", ms(1300))]);
    for u in ["db", "app", "cache"] {
        assert_eq!(h.state(u), DEAD, "{u}");
    }
    // Wanting is not requiring: tool keeps running.
    assert_eq!(h.state("tool"), RUNNING);
}

#[test]
fn an_ordering_cycle_fails_its_units_with_cycle() {
    let mut h = Harness::new(&[
        ("a", &unit("[unit]\nafter = [\"b\"]")),
        ("b", &unit("[unit]\nafter = [\"c\"]")),
        ("c", &unit("[unit]\nafter = [\"a\"]")),
        ("free", &unit("")),
    ]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take(), [launch("free", ms(0))]);
    for u in ["a", "b", "c"] {
        assert_eq!(
            h.state(u),
            (ActiveState::Failed, SubState::Failed, UnitResult::Cycle),
            "{u}"
        );
        assert!(h.message(u).contains("ordering cycle"), "{}", h.message(u));
    }
}

#[test]
fn restart_backoff_doubles_is_capped_and_resets_after_a_long_run() {
    let mut h = Harness::new(&[(
        "flaky",
        &unit(
            "[service]\nrestart = \"on-failure\"\nrestart_sec = \"100ms\"\n\
             restart_max_sec = \"1s\"\nstart_limit_burst = 100",
        ),
    )]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take(), [launch("flaky", ms(0))]);
    let mut t = ms(0);
    // Each run lasts 10 ms, then fails: the delays double from restart_sec up to restart_max_sec.
    for delay in [100, 200, 400, 800, 1000, 1000] {
        t += ms(10);
        h.exit("flaky", t, 1);
        let due = t + ms(delay);
        assert_eq!(h.tick(t), Some(due), "restart after {delay} ms");
        assert_eq!(
            h.state("flaky"),
            (
                ActiveState::Activating,
                SubState::AutoRestart,
                UnitResult::ExitCode
            )
        );
        assert_eq!(h.tick(due - ms(1)), Some(due));
        assert_eq!(h.take(), [reap("flaky", t)], "nothing before {due:?}");
        t = due;
        h.tick(t);
        assert_eq!(h.take(), [launch("flaky", t)]);
        assert_eq!(h.state("flaky").0, ActiveState::Active);
    }
    assert_eq!(h.m.slots["flaky"].restarts(), 6);
    // A run longer than restart_max_sec starts the doubling over.
    t += ms(1001);
    h.exit("flaky", t, 1);
    assert_eq!(h.tick(t), Some(t + ms(100)));
}

#[test]
fn too_many_starts_hit_the_start_limit_until_a_manual_start() {
    let mut h = Harness::new(&[(
        "crashy",
        &unit(
            "[service]\nrestart = \"always\"\nrestart_sec = \"100ms\"\n\
             start_limit_burst = 3\nstart_limit_interval = \"10s\"",
        ),
    )]);
    h.m.start_all();
    h.tick(ms(0));
    // Starts at 0, 100 ms (after 100), 300 ms (after 200); the fourth (at 700) is refused.
    for (ended, next) in [(0, 100), (100, 300)] {
        h.exit("crashy", ms(ended), 0);
        assert_eq!(h.tick(ms(ended)), Some(ms(next)));
        h.tick(ms(next));
    }
    h.exit("crashy", ms(300), 0);
    assert_eq!(h.tick(ms(300)), Some(ms(700)));
    assert_eq!(h.tick(ms(700)), None);
    let launches: Vec<Ev> = h
        .take()
        .into_iter()
        .filter(|e| matches!(e, Ev::Launch(..)))
        .collect();
    assert_eq!(
        launches,
        [
            launch("crashy", ms(0)),
            launch("crashy", ms(100)),
            launch("crashy", ms(300))
        ]
    );
    let hit = (
        ActiveState::Failed,
        SubState::Failed,
        UnitResult::StartLimitHit,
    );
    assert_eq!(h.state("crashy"), hit);
    assert!(h.message("crashy").contains("start_limit_burst"));
    assert_eq!(h.tick(secs(60)), None);
    assert_eq!(h.take(), []);
    // A manual start clears the count.
    h.request(secs(61), Request::StartUnit("crashy".into()))
        .unwrap();
    h.tick(secs(61));
    assert_eq!(h.take(), [launch("crashy", secs(61))]);
    assert_eq!(h.state("crashy"), RUNNING);
}

#[test]
fn a_stop_escalates_to_sigkill_after_stop_timeout() {
    let mut h = Harness::new(&[
        ("stubborn", &unit("[service]\nstop_timeout = \"2s\"")),
        ("polite", &unit("[service]\nstop_timeout = \"2s\"")),
    ]);
    h.m.start_all();
    h.tick(ms(0));
    h.take();
    h.request(secs(1), Request::StopUnit("stubborn".into()))
        .unwrap();
    h.request(secs(1), Request::StopUnit("polite".into()))
        .unwrap();
    assert_eq!(h.tick(secs(1)), Some(secs(3)));
    assert_eq!(
        h.take(),
        [
            sig("polite", To::Scope, Signal::SIGTERM, secs(1)),
            sig("stubborn", To::Scope, Signal::SIGTERM, secs(1))
        ]
    );
    let sigterm = (
        ActiveState::Deactivating,
        SubState::StopSigterm,
        UnitResult::Success,
    );
    assert_eq!(h.state("stubborn"), sigterm);
    // polite obeys.
    h.killed("polite", ms(1500), Signal::SIGTERM);
    h.tick(ms(1500));
    assert_eq!(h.state("polite"), DEAD);
    assert_eq!(h.tick(ms(2999)), Some(secs(3)));
    assert_eq!(h.take(), [reap("polite", ms(1500))]);
    // stubborn does not: SIGKILL at exactly stop_timeout, repeated every second.
    assert_eq!(h.tick(secs(3)), Some(secs(4)));
    let sigkill = (
        ActiveState::Deactivating,
        SubState::StopSigkill,
        UnitResult::Success,
    );
    assert_eq!(h.state("stubborn"), sigkill);
    assert_eq!(h.tick(secs(4)), Some(secs(5)));
    assert_eq!(
        h.take(),
        [
            sig("stubborn", To::Scope, Signal::SIGKILL, secs(3)),
            sig("stubborn", To::Scope, Signal::SIGKILL, secs(4))
        ]
    );
    h.killed("stubborn", ms(4100), Signal::SIGKILL);
    h.tick(ms(4100));
    assert_eq!(
        h.state("stubborn"),
        (ActiveState::Inactive, SubState::Dead, UnitResult::Timeout)
    );
    assert!(h.message("stubborn").contains("stop_timeout"));
}

#[test]
fn a_container_launcher_stop_sends_sigterm_to_the_main_process_only() {
    let mut h = Harness::with(&[("c", &unit(""))], true, secs(90));
    h.m.start_all();
    h.tick(ms(0));
    h.take();
    h.request(secs(1), Request::StopUnit("c".into())).unwrap();
    assert_eq!(h.tick(secs(1)), Some(secs(11)));
    assert_eq!(h.take(), [sig("c", To::Main, Signal::SIGTERM, secs(1))]);
    // The escalation still goes to the whole scope.
    h.tick(secs(11));
    assert_eq!(h.take(), [sig("c", To::Scope, Signal::SIGKILL, secs(11))]);
}

#[test]
fn a_oneshot_that_exited_is_active_and_a_restart_runs_it_again() {
    let mut h = Harness::new(&[("job", &unit("[service]\ntype = \"oneshot\""))]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(
        h.state("job"),
        (
            ActiveState::Activating,
            SubState::Start,
            UnitResult::Success
        )
    );
    h.exit("job", secs(1), 0);
    h.tick(secs(1));
    assert_eq!(
        h.state("job"),
        (ActiveState::Active, SubState::Exited, UnitResult::Success)
    );
    // A start of an active oneshot does nothing; a restart runs it again.
    h.request(secs(2), Request::StartUnit("job".into()))
        .unwrap();
    h.tick(secs(2));
    assert_eq!(h.take(), [launch("job", ms(0)), reap("job", secs(1))]);
    h.request(secs(3), Request::RestartUnit("job".into()))
        .unwrap();
    h.tick(secs(3));
    assert_eq!(h.take(), [launch("job", secs(3))]);
    assert_eq!(
        h.state("job"),
        (
            ActiveState::Activating,
            SubState::Start,
            UnitResult::Success
        )
    );
    assert_eq!(h.m.slots["job"].restarts(), 0);
}

#[test]
fn reload_adds_changes_removes_and_keeps_a_broken_file_old_definition() {
    let mut h = Harness::new(&[
        ("keep", &unit("")),
        ("change", &unit("")),
        ("gone", &unit("")),
        ("broken", &unit("")),
    ]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take().len(), 4);
    let broken_source = h.m.units["broken"].source.clone();

    h.rewrite("change", &unit("[service]\nstop_timeout = \"3s\""));
    std::fs::remove_file(h.dir.path().join("gone.toml")).unwrap();
    h.rewrite("new", &unit(""));
    h.rewrite("broken", "[container\ncommand = [");
    h.set_now(secs(1));
    let r = h.m.reload(false);
    assert_eq!(r.added, ["new"]);
    assert_eq!(r.changed, ["change"]);
    assert_eq!(r.removed, ["gone"]);
    assert_eq!(r.restarted, Vec::<String>::new());
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(r.errors[0].contains("broken.toml"), "{:?}", r.errors);
    // The broken file leaves the old definition in force, marked with the error.
    assert_eq!(h.m.units["broken"].source, broken_source);
    assert!(h.m.slots["broken"].load_error().is_some());
    h.tick(secs(1));
    // A removed unit is stopped, then dropped; an added one is not started; a changed one
    // runs on until a restart is asked for.
    assert_eq!(h.take(), [sig("gone", To::Scope, Signal::SIGTERM, secs(1))]);
    h.killed("gone", secs(2), Signal::SIGTERM);
    h.tick(secs(2));
    assert!(!h.m.slots.contains_key("gone"));
    assert_eq!(h.state("new"), DEAD);
    assert_eq!(h.state("change"), RUNNING);

    // restart_changed restarts what runs from an older definition, also one changed by an
    // earlier reload without a restart.
    h.set_now(secs(3));
    let r = h.m.reload(true);
    assert_eq!(r.changed, Vec::<String>::new());
    assert_eq!(r.restarted, ["change"]);
    h.tick(secs(3));
    h.killed("change", secs(4), Signal::SIGTERM);
    h.tick(secs(4));
    assert_eq!(
        h.take(),
        [
            reap("gone", secs(2)),
            sig("change", To::Scope, Signal::SIGTERM, secs(3)),
            reap("change", secs(4)),
            launch("change", secs(4))
        ]
    );
    assert_eq!(h.m.units["change"].service.stop_timeout, secs(3));
    assert_eq!(h.state("keep"), RUNNING);
}

#[test]
fn shutdown_stops_units_in_reverse_start_order() {
    let mut h = Harness::new(&[
        ("db", &unit("")),
        ("app", &unit("[unit]\nafter = [\"db\"]")),
        ("web", &unit("[unit]\nafter = [\"app\"]")),
    ]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(
        h.take(),
        [
            launch("db", ms(0)),
            launch("app", ms(0)),
            launch("web", ms(0))
        ]
    );
    let t = h.set_now(secs(10));
    h.m.shutdown_at(t);
    let refused = h.request(secs(10), Request::StartUnit("db".into()));
    assert!(matches!(refused, Err(ApiError::Refused(_))), "{refused:?}");
    h.tick(secs(10));
    // Each SIGTERM waits for the unit ordered after it to be gone.
    let term = |u: &str, at: u64| sig(u, To::Scope, Signal::SIGTERM, secs(at));
    let reap_at = |u: &str, at: u64| reap(u, secs(at));
    assert_eq!(h.take(), [term("web", 10)]);
    assert!(!h.m.shutdown_complete_at(h.t0 + secs(10)));
    h.killed("web", secs(11), Signal::SIGTERM);
    h.tick(secs(11));
    assert_eq!(h.take(), [reap_at("web", 11), term("app", 11)]);
    assert!(!h.m.shutdown_complete_at(h.t0 + secs(11)));
    h.killed("app", secs(12), Signal::SIGTERM);
    h.tick(secs(12));
    assert_eq!(h.take(), [reap_at("app", 12), term("db", 12)]);
    assert!(!h.m.shutdown_complete_at(h.t0 + secs(12)));
    h.killed("db", secs(13), Signal::SIGTERM);
    h.tick(secs(13));
    assert_eq!(h.take(), [reap_at("db", 13)]);
    for u in ["web", "app", "db"] {
        assert_eq!(h.state(u), DEAD, "{u}");
    }
    let at = secs(13);
    assert!(h.m.shutdown_complete_at(h.t0 + at));
    assert!(!h.m.shutdown_forced());
}

#[test]
fn a_forced_shutdown_kills_what_is_left_at_the_deadline() {
    let mut h = Harness::with(
        &[("stuck", &unit("[service]\nstop_timeout = \"60s\""))],
        false,
        secs(5),
    );
    h.m.start_all();
    h.tick(ms(0));
    h.take();
    let t = h.set_now(secs(1));
    h.m.shutdown_at(t);
    // The shutdown deadline (1 s + 5 s) comes before stuck's stop_timeout.
    assert_eq!(h.tick(secs(1)), Some(secs(6)));
    assert_eq!(
        h.take(),
        [sig("stuck", To::Scope, Signal::SIGTERM, secs(1))]
    );
    h.tick(secs(6));
    assert!(h.m.shutdown_forced());
    assert_eq!(
        h.take(),
        [
            sig("stuck", To::Scope, Signal::SIGKILL, secs(6)),
            sig("stuck", To::Main, Signal::SIGKILL, secs(6))
        ]
    );
    let sigkill = (
        ActiveState::Deactivating,
        SubState::StopSigkill,
        UnitResult::Success,
    );
    assert_eq!(h.state("stuck"), sigkill);
    // A process stuck in the kernel cannot hold the shutdown past a 5 s grace.
    assert!(!h.m.shutdown_complete_at(h.t0 + secs(10)));
    assert!(h.m.shutdown_complete_at(h.t0 + secs(11)));
    h.killed("stuck", secs(7), Signal::SIGKILL);
    h.tick(secs(7));
    assert_eq!(
        h.state("stuck"),
        (ActiveState::Inactive, SubState::Dead, UnitResult::Timeout)
    );
    assert!(h.message("stuck").contains("shutdown deadline"));
}

#[test]
fn a_stop_waits_for_the_whole_scope_not_just_the_main_process() {
    let mut h = Harness::new(&[("forker", &unit("[service]\nstop_timeout = \"1s\""))]);
    h.m.start_all();
    h.tick(ms(0));
    h.take();
    h.request(secs(1), Request::StopUnit("forker".into()))
        .unwrap();
    h.tick(secs(1));
    // The main process obeys SIGTERM, a child it forked does not.
    h.world.borrow_mut().lingering.insert("forker".into());
    h.killed("forker", ms(1500), Signal::SIGTERM);
    // Only the scope's rest is left: it is looked at every 20 ms, still deactivating.
    assert_eq!(h.tick(ms(1500)), Some(ms(1520)));
    assert_eq!(h.tick(ms(1520)), Some(ms(1540)));
    let sigterm = (
        ActiveState::Deactivating,
        SubState::StopSigterm,
        UnitResult::Success,
    );
    assert_eq!(h.state("forker"), sigterm);
    // At stop_timeout the rest gets SIGKILL, repeated every second while it stays.
    assert_eq!(h.tick(secs(2)), Some(ms(2020)));
    assert_eq!(h.tick(secs(3)), Some(ms(3020)));
    assert_eq!(
        h.take(),
        [
            sig("forker", To::Scope, Signal::SIGTERM, secs(1)),
            reap("forker", ms(1500)),
            sig("forker", To::Scope, Signal::SIGKILL, secs(2)),
            sig("forker", To::Scope, Signal::SIGKILL, secs(3))
        ]
    );
    h.world.borrow_mut().lingering.clear();
    assert_eq!(h.tick(ms(3020)), None);
    assert_eq!(
        h.state("forker"),
        (ActiveState::Inactive, SubState::Dead, UnitResult::Timeout)
    );
}

/// A stop while a restart is pending (activating, auto-restart) cancels the restart: the unit
/// is inactive (dead) at once, keeps the result of its last run, no timer is left and nothing
/// is launched at the time the restart was due.
#[test]
fn a_stop_during_auto_restart_cancels_the_restart() {
    let mut h = Harness::new(&[(
        "flaky",
        &unit("[service]\nrestart = \"on-failure\"\nrestart_sec = \"1s\""),
    )]);
    h.m.start_all();
    h.tick(ms(0));
    h.exit("flaky", ms(10), 1);
    assert_eq!(h.tick(ms(10)), Some(ms(1010)));
    assert_eq!(
        h.state("flaky"),
        (
            ActiveState::Activating,
            SubState::AutoRestart,
            UnitResult::ExitCode
        )
    );
    h.request(ms(500), Request::StopUnit("flaky".into()))
        .unwrap();
    assert_eq!(h.tick(ms(500)), None);
    assert_eq!(
        h.state("flaky"),
        (ActiveState::Inactive, SubState::Dead, UnitResult::ExitCode)
    );
    assert_eq!(h.tick(secs(5)), None);
    assert_eq!(h.take(), [launch("flaky", ms(0)), reap("flaky", ms(10))]);
}

/// A stop of a failed unit leaves it failed, with its result and message; a stop of an
/// inactive unit changes nothing either. Neither sends a signal or leaves a timer.
#[test]
fn a_stop_of_a_failed_unit_keeps_it_failed() {
    let mut h = Harness::new(&[("broken", &unit("")), ("idle", &unit(""))]);
    h.request(ms(0), Request::StartUnit("broken".into()))
        .unwrap();
    h.tick(ms(0));
    h.exit("broken", ms(10), 3);
    h.tick(ms(10));
    let failed = (ActiveState::Failed, SubState::Failed, UnitResult::ExitCode);
    assert_eq!(h.state("broken"), failed);
    assert_eq!(h.message("broken"), "main process exited with code 3");
    h.take();

    h.request(ms(20), Request::StopUnit("broken".into()))
        .unwrap();
    h.request(ms(20), Request::StopUnit("idle".into())).unwrap();
    assert_eq!(h.tick(ms(20)), None);
    assert_eq!(h.state("broken"), failed);
    assert_eq!(h.message("broken"), "main process exited with code 3");
    assert_eq!(h.state("idle"), DEAD);
    assert_eq!(h.take(), []);
    // A start clears the failure.
    h.request(ms(30), Request::StartUnit("broken".into()))
        .unwrap();
    h.tick(ms(30));
    assert_eq!(h.state("broken"), RUNNING);
    assert_eq!(h.message("broken"), "");
}

/// A unit that requires a unit that failed and is ordered after it fails by the `requires`
/// check, with its message (the ordering check only refuses the failed oneshots a unit is
/// ordered after), and never launches.
#[test]
fn a_failed_required_unit_fails_the_dependant_by_requires() {
    let broken = format!("[container]\ncommand = [\"{UNLAUNCHABLE}\"]\n");
    let mut h = Harness::new(&[
        ("need", &broken),
        (
            "app",
            &unit("[unit]\nrequires = [\"need\"]\nafter = [\"need\"]"),
        ),
    ]);
    h.request(ms(0), Request::StartUnit("app".into())).unwrap();
    assert_eq!(h.tick(ms(0)), None);
    assert_eq!(
        h.state("need"),
        (ActiveState::Failed, SubState::Failed, UnitResult::Spawn)
    );
    assert_eq!(
        h.state("app"),
        (
            ActiveState::Failed,
            SubState::Failed,
            UnitResult::Dependency
        )
    );
    assert_eq!(h.message("app"), "required unit need failed");
    assert_eq!(h.take(), [sig("need", To::Scope, Signal::SIGKILL, ms(0))]);
}

const IMAGE: &str = "127.0.0.1:5000/team/app:1";

/// A unit whose image is a registry reference, with `extra` in `[container]` and `service`
/// as its `[service]`.
fn registry_unit(extra: &str, service: &str) -> String {
    format!(
        "[container]\nimage = \"{IMAGE}\"\ncommand = [\"/bin/app\"]\n{extra}\n[service]\n{service}\n"
    )
}

fn pull(unit: &str, at: Duration) -> Ev {
    Ev::Pull(unit.into(), IMAGE.into(), at)
}

const PULLING: (ActiveState, SubState, UnitResult) =
    (ActiveState::Activating, SubState::Pull, UnitResult::Success);

/// `pull = "missing"` (the default): a start pulls the image the store lacks, activating
/// (pull) while the helper runs, then launches; once the image is there a restart does not
/// pull again.
#[test]
fn a_missing_registry_image_is_pulled_then_the_unit_launches() {
    let mut h = Harness::new(&[("web", &registry_unit("", ""))]);
    h.m.start_all();
    assert_eq!(h.tick(ms(0)), None);
    assert_eq!(h.take(), [pull("web", ms(0))]);
    assert_eq!(h.state("web"), PULLING);
    assert!(!h.m.settled(), "a pulling unit is a pending start");
    let log: Vec<String> = h.m.slots["web"]
        .log
        .tail(10, 0)
        .into_iter()
        .map(|e| e.line)
        .collect();
    assert!(
        log.iter().any(|l| l.contains("activating (pull)")),
        "{log:?}"
    );
    // Still pulling later on: nothing is launched before the helper ends.
    h.tick(secs(30));
    assert_eq!(h.take(), []);
    h.pulled("web", secs(31), 0);
    assert_eq!(h.take(), [launch("web", secs(31))]);
    assert_eq!(h.state("web"), RUNNING);
    h.request(secs(40), Request::RestartUnit("web".into()))
        .unwrap();
    h.tick(secs(40));
    h.killed("web", secs(41), Signal::SIGTERM);
    h.tick(secs(41));
    let evs = h.take();
    assert!(!evs.iter().any(|e| matches!(e, Ev::Pull(..))), "{evs:?}");
    assert_eq!(evs.last(), Some(&launch("web", secs(41))));
    assert_eq!(h.state("web"), RUNNING);
}

/// A failed pull fails the unit with result `pull` and the helper's answer; with a restart
/// policy the backoff applies as for any failure, and the next start pulls again.
#[test]
fn a_failed_pull_fails_the_unit_with_pull_and_backs_off() {
    let mut h = Harness::new(&[
        ("once", &registry_unit("", "")),
        (
            "retry",
            &registry_unit(
                "",
                "restart = \"on-failure\"\nrestart_sec = \"100ms\"\nrestart_max_sec = \"1s\"",
            ),
        ),
    ]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take(), [pull("once", ms(0)), pull("retry", ms(0))]);
    h.pulled("once", ms(10), 1);
    assert_eq!(
        h.state("once"),
        (ActiveState::Failed, SubState::Failed, UnitResult::Pull)
    );
    assert!(
        h.message("once").contains("pull helper exited with code 1"),
        "{}",
        h.message("once")
    );
    h.pulled("retry", ms(10), 1);
    assert_eq!(
        h.state("retry"),
        (
            ActiveState::Activating,
            SubState::AutoRestart,
            UnitResult::Pull
        )
    );
    assert_eq!(h.tick(ms(10)), Some(ms(110)));
    assert_eq!(h.tick(ms(110)), None);
    assert_eq!(h.take(), [pull("retry", ms(110))]);
    h.pulled("retry", ms(120), 1);
    assert_eq!(h.tick(ms(120)), Some(ms(320)), "the delay doubled");
    h.tick(ms(320));
    h.pulled("retry", ms(330), 0);
    assert_eq!(h.take(), [pull("retry", ms(320)), launch("retry", ms(330))]);
    assert_eq!(h.state("retry").1, SubState::Running);
    assert_eq!(h.m.slots["retry"].restarts(), 2);
}

/// `pull = "never"` launches without pulling (a missing image fails in the launcher, as
/// for a local name); a local image name is never pulled whatever the policy.
#[test]
fn pull_never_and_local_names_never_pull() {
    let mut h = Harness::new(&[
        ("never", &registry_unit("pull = \"never\"", "")),
        (
            "local",
            "[container]\nimage = \"app:1\"\npull = \"always\"\ncommand = [\"/bin/app\"]\n",
        ),
    ]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take(), [launch("local", ms(0)), launch("never", ms(0))]);
}

/// `pull = "always"` pulls before every start, even with the image in the store (a restart
/// of the running unit pulls before it stops the old copy, and its start does not pull
/// twice).
#[test]
fn pull_always_pulls_before_every_start() {
    let mut h = Harness::new(&[("web", &registry_unit("pull = \"always\"", ""))]);
    h.world.borrow_mut().images.insert(IMAGE.into());
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take(), [pull("web", ms(0))]);
    h.pulled("web", ms(10), 0);
    assert_eq!(h.take(), [launch("web", ms(10))]);
    h.request(ms(20), Request::RestartUnit("web".into()))
        .unwrap();
    h.tick(ms(20));
    // The restart pulls while the old copy runs, then stops it; the start pulls no more.
    assert_eq!(h.take(), [pull("web", ms(20))]);
    assert_eq!(h.state("web"), RUNNING);
    h.pulled("web", ms(30), 0);
    h.tick(ms(30));
    assert_eq!(h.take(), [sig("web", To::Scope, Signal::SIGTERM, ms(30))]);
    h.killed("web", ms(40), Signal::SIGTERM);
    h.tick(ms(40));
    assert_eq!(h.take(), [reap("web", ms(40)), launch("web", ms(40))]);
    assert_eq!(h.state("web"), RUNNING);
}

/// A stop during a pull kills the helper (SIGKILL) and the unit is stopped at once; the
/// helper's exit, reaped later, changes nothing.
#[test]
fn a_stop_during_a_pull_kills_the_helper() {
    let mut h = Harness::new(&[("web", &registry_unit("", "restart = \"always\""))]);
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take(), [pull("web", ms(0))]);
    h.request(ms(50), Request::StopUnit("web".into())).unwrap();
    assert_eq!(h.tick(ms(50)), None);
    assert_eq!(h.take(), [sig("web", To::Main, Signal::SIGKILL, ms(50))]);
    assert_eq!(h.state("web"), DEAD);
    let (pid, _) = h.world.borrow_mut().pulling.remove("web").unwrap();
    let now = h.set_now(ms(60));
    h.m.on_exit(WaitStatus::Signaled(pid, Signal::SIGKILL, false), now);
    assert_eq!(h.tick(ms(60)), None);
    assert_eq!(h.state("web"), DEAD);
    assert_eq!(h.take(), []);
}

const IMAGE2: &str = "127.0.0.1:5000/team/app:2";

fn pull2(unit: &str, at: Duration) -> Ev {
    Ev::Pull(unit.into(), IMAGE2.into(), at)
}

/// The log lines of `unit`.
fn log_lines(h: &Harness, unit: &str) -> Vec<String> {
    h.m.slots[unit]
        .log
        .tail(100, 0)
        .into_iter()
        .map(|e| e.line)
        .collect()
}

/// A running unit whose body moves to an image the store lacks, restarted by a reload: the
/// new image is pulled while the old copy keeps running (active (running), same main pid, no
/// signal), then the old copy is stopped and the new one launched without a second pull.
#[test]
fn a_restart_pulls_the_new_image_before_it_stops_the_old_copy() {
    let mut h = Harness::new(&[("web", &registry_unit("", ""))]);
    h.world.borrow_mut().images.insert(IMAGE.into());
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take(), [launch("web", ms(0))]);
    let old_pid = h.m.slots["web"].main_pid();
    h.rewrite("web", &registry_unit("", "").replace(IMAGE, IMAGE2));
    h.set_now(secs(1));
    let report = h.m.reload(true);
    assert_eq!(report.restarted, ["web"]);
    assert_eq!(h.tick(secs(1)), None, "the pull has no timer");
    assert_eq!(h.take(), [pull2("web", secs(1))]);
    assert_eq!(h.state("web"), RUNNING);
    assert!(
        h.m.settled(),
        "a running unit pulling for its restart is settled"
    );
    // However long the pull takes, the old copy runs on untouched.
    assert_eq!(h.tick(secs(60)), None);
    assert_eq!(h.take(), []);
    assert_eq!(h.m.slots["web"].main_pid(), old_pid);
    let log = log_lines(&h, "web");
    assert!(
        log.iter().any(
            |l| l.contains(&format!("Pulling image {IMAGE2} for the restart"))
                && l.contains("the old copy keeps running")
        ),
        "{log:?}"
    );
    h.pulled("web", secs(61), 0);
    h.tick(secs(61));
    assert_eq!(h.take(), [sig("web", To::Scope, Signal::SIGTERM, secs(61))]);
    h.killed("web", secs(62), Signal::SIGTERM);
    h.tick(secs(62));
    assert_eq!(h.take(), [reap("web", secs(62)), launch("web", secs(62))]);
    assert_eq!(h.state("web"), RUNNING);
    assert_ne!(h.m.slots["web"].main_pid(), old_pid);
}

/// A failed pull for a restart never takes the running unit down: the old copy keeps
/// running (active (running), result `pull`, the message says so), the restart stays
/// pending and the pull is tried again with the unit's restart backoff (doubling), or at once
/// when the restart is asked again; once it succeeds the restart proceeds.
#[test]
fn a_failed_pull_for_a_restart_keeps_the_old_copy_and_retries_with_backoff() {
    let service = "restart_sec = \"100ms\"\nrestart_max_sec = \"1s\"";
    let mut h = Harness::new(&[("web", &registry_unit("", service))]);
    h.world.borrow_mut().images.insert(IMAGE.into());
    h.m.start_all();
    h.tick(ms(0));
    assert_eq!(h.take(), [launch("web", ms(0))]);
    let old_pid = h.m.slots["web"].main_pid();
    h.rewrite("web", &registry_unit("", service).replace(IMAGE, IMAGE2));
    h.request(
        ms(10),
        Request::Reload {
            restart_changed: true,
        },
    )
    .unwrap();
    h.tick(ms(10));
    assert_eq!(h.take(), [pull2("web", ms(10))]);
    h.pulled("web", ms(20), 1);
    assert_eq!(
        h.tick(ms(20)),
        Some(ms(120)),
        "tried again after restart_sec"
    );
    assert_eq!(
        h.state("web"),
        (ActiveState::Active, SubState::Running, UnitResult::Pull)
    );
    let msg = h.message("web");
    assert!(
        msg.contains(&format!("pulling {IMAGE2} for the restart failed"))
            && msg.contains("the pull helper exited with code 1")
            && msg.contains("the old copy keeps running"),
        "{msg}"
    );
    assert_eq!(h.m.slots["web"].main_pid(), old_pid);
    assert_eq!(h.tick(ms(119)), Some(ms(120)));
    assert_eq!(h.take(), [], "no signal, no pull before the retry");
    h.tick(ms(120));
    assert_eq!(h.take(), [pull2("web", ms(120))]);
    h.pulled("web", ms(130), 1);
    assert_eq!(h.tick(ms(130)), Some(ms(330)), "the delay doubled");
    // Asking for the restart again tries the pull at once (the backoff goes on).
    h.request(ms(200), Request::RestartUnit("web".into()))
        .unwrap();
    assert_eq!(h.tick(ms(200)), None);
    assert_eq!(h.take(), [pull2("web", ms(200))]);
    h.pulled("web", ms(210), 1);
    assert_eq!(h.tick(ms(210)), Some(ms(610)), "the delay doubled again");
    h.tick(ms(610));
    assert_eq!(h.take(), [pull2("web", ms(610))]);
    h.pulled("web", ms(620), 0);
    h.tick(ms(620));
    assert_eq!(h.take(), [sig("web", To::Scope, Signal::SIGTERM, ms(620))]);
    h.killed("web", ms(630), Signal::SIGTERM);
    h.tick(ms(630));
    assert_eq!(h.take(), [reap("web", ms(630)), launch("web", ms(630))]);
    assert_eq!(h.state("web"), RUNNING);
    assert_eq!(h.message("web"), "");
}

/// A stop while a restart pulls kills the helper and stops the old copy; the helper's exit,
/// reaped later, changes nothing and nothing is launched. A shutdown does the same.
#[test]
fn a_stop_or_shutdown_during_a_restarts_pull_kills_the_helper() {
    let mut h = Harness::new(&[
        (
            "web",
            &registry_unit("pull = \"always\"", "restart = \"always\""),
        ),
        ("api", &registry_unit("pull = \"always\"", "")),
    ]);
    h.world.borrow_mut().images.insert(IMAGE.into());
    h.m.start_all();
    h.tick(ms(0));
    for u in ["api", "web"] {
        h.pulled(u, ms(1), 0);
    }
    h.tick(ms(1));
    h.take();
    for u in ["api", "web"] {
        h.request(ms(10), Request::RestartUnit(u.into())).unwrap();
    }
    h.tick(ms(10));
    assert_eq!(h.take(), [pull("api", ms(10)), pull("web", ms(10))]);
    h.request(ms(20), Request::StopUnit("web".into())).unwrap();
    h.tick(ms(20));
    assert_eq!(
        h.take(),
        [
            sig("web", To::Main, Signal::SIGKILL, ms(20)),
            sig("web", To::Scope, Signal::SIGTERM, ms(20)),
        ]
    );
    let (pid, _) = h.world.borrow_mut().pulling.remove("web").unwrap();
    let now = h.set_now(ms(25));
    h.m.on_exit(WaitStatus::Signaled(pid, Signal::SIGKILL, false), now);
    h.killed("web", ms(30), Signal::SIGTERM);
    h.tick(ms(30));
    assert_eq!(h.state("web"), DEAD);
    assert_eq!(h.take(), [reap("web", ms(30))], "nothing launched");
    h.m.shutdown_at(h.t0 + ms(40));
    h.tick(ms(40));
    assert_eq!(
        h.take(),
        [
            sig("api", To::Main, Signal::SIGKILL, ms(40)),
            sig("api", To::Scope, Signal::SIGTERM, ms(40)),
        ]
    );
    h.killed("api", ms(50), Signal::SIGTERM);
    h.tick(ms(50));
    assert!(h.m.shutdown_complete_at(h.t0 + ms(50)));
    assert_eq!(h.take(), [reap("api", ms(50))], "nothing launched");
}

/// The old copy ends by itself while its restart pulls: the helper is killed and the
/// restart's start pulls (the unit is down anyway), then launches.
#[test]
fn the_old_copy_ending_during_a_restarts_pull_hands_the_pull_to_the_start() {
    let mut h = Harness::new(&[("web", &registry_unit("", ""))]);
    h.world.borrow_mut().images.insert(IMAGE.into());
    h.m.start_all();
    h.tick(ms(0));
    h.take();
    h.rewrite("web", &registry_unit("", "").replace(IMAGE, IMAGE2));
    h.request(
        ms(10),
        Request::Reload {
            restart_changed: true,
        },
    )
    .unwrap();
    h.tick(ms(10));
    assert_eq!(h.take(), [pull2("web", ms(10))]);
    let (helper, _) = h.world.borrow_mut().pulling.remove("web").unwrap();
    h.exit("web", ms(20), 1);
    h.tick(ms(20));
    assert_eq!(
        h.take(),
        [
            sig("web", To::Main, Signal::SIGKILL, ms(20)),
            reap("web", ms(20)),
            pull2("web", ms(20)),
        ]
    );
    assert_eq!(h.state("web"), PULLING);
    // The killed helper's exit is an orphan's: the new pull goes on.
    let now = h.set_now(ms(21));
    h.m.on_exit(WaitStatus::Signaled(helper, Signal::SIGKILL, false), now);
    assert_eq!(h.state("web"), PULLING);
    h.pulled("web", ms(30), 0);
    assert_eq!(h.take(), [launch("web", ms(30))]);
}

/// `ListImages` answers what the puller's stores hold, and a pulled image shows up in it.
#[test]
fn list_images_answers_the_stores_images() {
    let mut h = Harness::new(&[("web", &registry_unit("", ""))]);
    h.world.borrow_mut().images.insert("app:1".into());
    let names = |h: &mut Harness| match h.m.handle(Request::ListImages).unwrap() {
        Response::Images(i) => i.into_iter().map(|e| e.name).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(names(&mut h), ["app:1"]);
    h.m.start_all();
    h.tick(ms(0));
    h.pulled("web", ms(10), 0);
    assert_eq!(names(&mut h), ["127.0.0.1:5000/team/app:1", "app:1"]);
}
