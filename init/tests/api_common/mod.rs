//! A fake manager for the API transport tests: answers [`Request`]s from a small in-memory
//! model and publishes [`Event`]s, behind a real D-Bus server on a temporary socket.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use flotilla_init::api::dbus::{self, Server};
use flotilla_init::api::{self, ApiError, Envelope, Request, Response};
use flotilla_init_api::{Event, LogEntry, LogStream, ReloadReport, StateName, UnitInfo, Wire};

/// A state from its wire text (the fake's model is written in the wire's words).
fn st<T: StateName>(text: &str) -> Wire<T> {
    Wire::from_text(text)
}

/// Unit that answers `GetUnit` 200 ms late (from a separate thread, so answers overlap).
pub const SLOW: &str = "slow";
/// Unit that fails shortly after a start.
pub const BROKEN: &str = "broken";
/// Unit whose start is refused.
pub const LOCKED: &str = "locked";

pub fn unit(name: &str, description: &str, active: &str, sub: &str) -> UnitInfo {
    UnitInfo {
        name: name.into(),
        description: description.into(),
        load_state: st("loaded"),
        active_state: st(active),
        sub_state: st(sub),
        main_pid: if active == "active" { 4242 } else { 0 },
        restarts: 0,
        exit_code: -1,
        exit_signal: 0,
        since_us: 1_700_000_000_123_456,
        result: st("success"),
        message: String::new(),
    }
}

/// The fake manager's state; tests may change it through [`Fake::model`].
pub struct Model {
    pub units: BTreeMap<String, UnitInfo>,
    pub texts: BTreeMap<String, String>,
    pub logs: BTreeMap<String, Vec<LogEntry>>,
    /// Units that turn `failed` at the next `GetUnit` (a start that dies).
    pub failing: Vec<String>,
    pub reload_errors: Vec<String>,
    /// Units whose stop never completes (they stay `deactivating`).
    pub stuck: Vec<String>,
    /// Every request seen, in order.
    pub seen: Vec<Request>,
}

impl Model {
    fn new() -> Model {
        let mut units = BTreeMap::new();
        for u in [
            unit("web", "Web server", "active", "running"),
            unit("db", "Database", "inactive", "dead"),
            unit(BROKEN, "Always fails", "inactive", "dead"),
            unit(SLOW, "Answers late", "active", "running"),
            unit(LOCKED, "Cannot be started", "inactive", "dead"),
        ] {
            units.insert(u.name.clone(), u);
        }
        let mut texts = BTreeMap::new();
        texts.insert(
            "web".to_string(),
            "[unit]\ndescription = \"Web server\"\n".to_string(),
        );
        let mut logs = BTreeMap::new();
        logs.insert(
            "web".to_string(),
            (1..=15)
                .map(|i| LogEntry {
                    seq: i,
                    time_us: 1_700_000_000_000_000 + i * 1000,
                    stream: if i % 2 == 0 {
                        LogStream::Stderr
                    } else {
                        LogStream::Stdout
                    }
                    .into(),
                    line: format!("line {i}"),
                })
                .collect(),
        );
        Model {
            units,
            texts,
            logs,
            failing: Vec::new(),
            reload_errors: Vec::new(),
            stuck: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn set_state(&mut self, name: &str, active: &str, sub: &str, events: &Sender<Event>) {
        if let Some(u) = self.units.get_mut(name) {
            u.active_state = st(active);
            u.sub_state = st(sub);
            u.main_pid = if active == "active" || active == "activating" {
                4242
            } else {
                0
            };
            let _ = events.send(Event::UnitStateChanged {
                name: name.into(),
                active_state: st(active),
                sub_state: st(sub),
            });
        }
    }

    fn get(&self, name: &str) -> Result<UnitInfo, ApiError> {
        self.units
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::NoSuchUnit(name.into()))
    }

    fn answer(&mut self, request: Request, events: &Sender<Event>) -> Result<Response, ApiError> {
        self.seen.push(request.clone());
        match request {
            Request::ListUnits => Ok(Response::Units(self.units.values().cloned().collect())),
            Request::SystemState => Ok(Response::Text(flotilla_init::api::SYSTEM_RUNNING.into())),
            Request::ControlApiGranted(_) => Ok(Response::Granted(false)),
            Request::ListImages => Ok(Response::Images(vec![flotilla_init_api::ImageEntry {
                name: "registry.example:5000/team/app:1".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
            }])),
            Request::GetUnit(name) => {
                if let Some(i) = self.failing.iter().position(|n| *n == name) {
                    self.failing.remove(i);
                    self.set_state(&name, "failed", "failed", events);
                    if let Some(u) = self.units.get_mut(&name) {
                        u.result = st("exit-code");
                        u.message = "main process exited with code 1".into();
                        u.exit_code = 1;
                    }
                }
                self.get(&name).map(Response::Unit)
            }
            Request::StartUnit(name) => {
                self.get(&name)?;
                if name == LOCKED {
                    return Err(ApiError::Refused("the manager is shutting down".into()));
                }
                if name == BROKEN {
                    self.set_state(&name, "activating", "start", events);
                    self.failing.push(name.clone());
                } else {
                    self.set_state(&name, "active", "running", events);
                }
                self.get(&name).map(Response::Unit)
            }
            Request::StopUnit(name) => {
                self.get(&name)?;
                if self.stuck.contains(&name) {
                    self.set_state(&name, "deactivating", "stop-sigterm", events);
                } else {
                    self.set_state(&name, "inactive", "dead", events);
                }
                self.get(&name).map(Response::Unit)
            }
            Request::RestartUnit(name) => {
                self.get(&name)?;
                self.set_state(&name, "active", "running", events);
                self.get(&name).map(Response::Unit)
            }
            Request::LoadUnit { name, toml } => {
                if name.is_empty() || name.contains('/') {
                    return Err(ApiError::InvalidUnit(format!("invalid unit name {name:?}")));
                }
                if toml.contains("# the fake refuses this") {
                    return Err(ApiError::InvalidUnit(format!(
                        "<state>/units/{name}.toml:1:1: refused\n  help: remove the line"
                    )));
                }
                if !toml.contains("[unit]") {
                    return Err(ApiError::InvalidUnit(format!(
                        "{name}: line 1, column 1: missing [unit] table"
                    )));
                }
                let mut u = unit(&name, "", "inactive", "dead");
                u.description = "loaded over the API".into();
                self.units.insert(name.clone(), u);
                self.texts.insert(name.clone(), toml);
                self.get(&name).map(Response::Unit)
            }
            Request::RemoveUnit(name) => {
                self.get(&name)?;
                self.units.remove(&name);
                self.texts.remove(&name);
                Ok(Response::Done)
            }
            Request::Reload { restart_changed } => Ok(Response::Reload(ReloadReport {
                added: vec!["new".into()],
                changed: vec!["web".into()],
                removed: vec![],
                restarted: if restart_changed {
                    vec!["web".into()]
                } else {
                    vec![]
                },
                errors: self.reload_errors.clone(),
            })),
            Request::Logs {
                name,
                lines,
                after_seq,
            } => {
                self.get(&name)?;
                let all: Vec<LogEntry> = self
                    .logs
                    .get(&name)
                    .map(|l| l.iter().filter(|e| e.seq > after_seq).cloned().collect())
                    .unwrap_or_default();
                let skip = all.len().saturating_sub(lines as usize);
                Ok(Response::Logs(all.into_iter().skip(skip).collect()))
            }
            Request::CatUnit(name) => {
                self.get(&name)?;
                Ok(Response::Text(
                    self.texts.get(&name).cloned().unwrap_or_default(),
                ))
            }
        }
    }
}

/// Bookkeeping for the late answers to `GetUnit(SLOW)`.
#[derive(Default)]
pub struct Slow {
    /// Slow requests received and not answered yet.
    pub in_flight: AtomicUsize,
    /// The most slow requests ever pending at once.
    pub max_in_flight: AtomicUsize,
    /// While set, slow answers are held back (at most 10 s).
    pub hold: AtomicBool,
}

/// A fake manager serving on a temporary socket. Dropping it stops everything.
pub struct Fake {
    pub model: Arc<Mutex<Model>>,
    pub slow: Arc<Slow>,
    pub events: Sender<Event>,
    pub server: Server,
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Fake {
    pub fn start() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        // A socket directory that does not exist yet: serve() creates it.
        let socket = dir.path().join("run").join("manager.sock");
        Self::start_at(dir, socket)
    }

    pub fn start_at(dir: tempfile::TempDir, socket: PathBuf) -> Fake {
        let (handle, queue) = api::channel().unwrap();
        let (events, events_rx) = mpsc::channel();
        // No caller of the fake is inside one of its (non-existent) units' cgroups.
        let units =
            api::access::UnitCgroups::Below(format!("flotilla-fake-{}", std::process::id()));
        let server = dbus::serve(&socket, handle, events_rx, units).unwrap();
        let model = Arc::new(Mutex::new(Model::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(Slow::default());
        let thread = {
            let slow_state = Arc::clone(&slow);
            let model = Arc::clone(&model);
            let stop = Arc::clone(&stop);
            let events = events.clone();
            thread::spawn(move || {
                let timeout = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                while !stop.load(Ordering::SeqCst) {
                    let fd = queue.fd();
                    let mut fds = [rustix::event::PollFd::new(
                        &fd,
                        rustix::event::PollFlags::IN,
                    )];
                    let _ = rustix::event::poll(&mut fds, Some(&timeout));
                    for Envelope { request, reply } in queue.drain() {
                        let slow = request == Request::GetUnit(SLOW.into());
                        let answer = model.lock().unwrap().answer(request, &events);
                        if slow {
                            // Answer late from another thread so the loop keeps serving.
                            let slow = Arc::clone(&slow_state);
                            let now = slow.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            slow.max_in_flight.fetch_max(now, Ordering::SeqCst);
                            thread::spawn(move || {
                                thread::sleep(Duration::from_millis(200));
                                let deadline = Instant::now() + Duration::from_secs(10);
                                while slow.hold.load(Ordering::SeqCst) && Instant::now() < deadline
                                {
                                    thread::sleep(Duration::from_millis(5));
                                }
                                slow.in_flight.fetch_sub(1, Ordering::SeqCst);
                                let _ = reply.send(answer);
                            });
                        } else {
                            let _ = reply.send(answer);
                        }
                    }
                }
            })
        };
        Fake {
            model,
            slow,
            events,
            server,
            socket,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Run `unitctl` against this fake.
    pub fn unitctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_unitctl"))
            .arg("--api")
            .arg(&self.socket)
            .args(args)
            .env_remove("FLOTILLA_API")
            .output()
            .unwrap()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Run `dbus-send --peer` against `socket` with the given trailing arguments.
pub fn dbus_send(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("dbus-send")
        .arg(format!("--peer=unix:path={}", socket.display()))
        .arg("--print-reply")
        .args(args)
        .output()
        .expect("dbus-send (Debian package dbus-bin) must be installed")
}
