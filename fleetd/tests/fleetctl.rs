//! `fleetctl` against a real `fleetd` (embedded registry, 30 s TTL) driving a real
//! `flotilla-init` supervisor (`--launcher host`), all as processes, on one machine.
//!
//! As in `agent.rs`, the init binary is not a target of this crate: run `cargo build -p
//! flotilla-init` first (or set `FLOTILLA_INIT_BIN`). Waits are bounded by [`WAIT`] and only
//! fail a test that would otherwise hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla_fleetd::api::{ApiClient, ClientError, PutUnit};
use flotilla_fleetd::DesiredState;
use flotilla_init_api::client::Client;
use flotilla_init_api::{ActiveState, UnitInfo};
use serde_json::Value;

use support::spawn_init;

/// The bound on every wait.
const WAIT: Duration = Duration::from_secs(30);
/// fleetd's lease TTL (`--ttl`), in seconds. No case here lets the machine's lease expire:
/// renewed every 10 s, it outlives a stall of the machine shorter than about 20 s, so the
/// machine (and its units' placement) stays put while a shared machine is slow.
const TTL_SECS: &str = "30";
const SLEEP: &str = "[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n";

fn wait_until(what: &str, cond: impl FnMut() -> bool, log: impl Fn() -> String) {
    support::wait_until(what, WAIT, Duration::from_millis(100), cond, log);
}

/// A `flotilla-init` supervisor and a `fleetd` on it, killed on drop (with everything in
/// init's cgroup).
struct Cluster {
    dir: tempfile::TempDir,
    init: Option<Child>,
    fleetd: Option<Child>,
    init_socket: PathBuf,
    api: PathBuf,
    cgroup: String,
}

impl Cluster {
    fn start(fleetd_args: &[&str]) -> Cluster {
        Self::start_with_nofile(fleetd_args, None)
    }

    /// As [`Cluster::start`], with fleetd's RLIMIT_NOFILE set to `nofile` (soft and hard)
    /// when given, as on a host whose init keeps the kernel's default of 1024.
    fn start_with_nofile(fleetd_args: &[&str], nofile: Option<u64>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let unit_dir = dir.path().join("units");
        fs::create_dir_all(&unit_dir).unwrap();
        let init_socket = dir.path().join("manager.sock");
        let cgroup = format!(
            "flotilla-fleetctl-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let init = spawn_init(&[], dir.path(), &unit_dir, &init_socket, &cgroup);
        let api = dir.path().join("fleetd.sock");
        let mut cluster = Cluster {
            init: Some(init),
            fleetd: None,
            init_socket,
            api,
            cgroup,
            dir,
        };
        wait_until(
            "init to answer",
            || {
                Client::connect(&cluster.init_socket)
                    .and_then(|c| c.list_units())
                    .is_ok()
            },
            || cluster.logs(),
        );
        let mut command = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_fleetd"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_fleetd")),
        };
        let fleetd = command
            // Not the host's /run/flotilla/peers.toml.
            .arg("--peers-file")
            .arg(cluster.dir.path().join("peers.toml"))
            .arg("--state")
            .arg(cluster.dir.path().join("registry"))
            .arg("--api")
            .arg(&cluster.api)
            .arg("--init-api")
            .arg(&cluster.init_socket)
            .args(["--ttl", TTL_SECS, "--metadata", "role=test,region=eu"])
            .args(fleetd_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(cluster.dir.path().join("fleetd.log")).unwrap())
            .spawn()
            .unwrap();
        cluster.fleetd = Some(fleetd);
        wait_until(
            "fleetd to list this machine",
            || {
                let out = cluster.fleetctl(&["list-machines", "--json"]);
                out.status.success()
                    && serde_json::from_slice::<Value>(&out.stdout)
                        .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 1))
            },
            || cluster.logs(),
        );
        cluster
    }

    fn logs(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!(
            "--- fleetd.log\n{}\n--- init.log\n{}",
            read("fleetd.log"),
            read("init.log")
        )
    }

    fn fleetctl(&self, args: &[&str]) -> Output {
        fleetctl(self.api.to_str().unwrap(), args)
    }

    /// `fleetctl ARGS`, which must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.fleetctl(args);
        assert!(
            out.status.success(),
            "fleetctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn write(&self, file: &str, text: &str) -> String {
        let path = self.dir.path().join(file);
        fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    fn init_unit(&self, name: &str) -> Option<UnitInfo> {
        Client::connect(&self.init_socket)
            .unwrap()
            .list_units()
            .unwrap()
            .into_iter()
            .find(|u| u.name == name)
    }

    /// SIGTERM fleetd, which must exit 0.
    fn terminate(&mut self) {
        let mut fleetd = self.fleetd.take().unwrap();
        let pid = rustix::process::Pid::from_raw(fleetd.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = fleetd.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > WAIT {
                let _ = fleetd.kill();
                panic!("fleetd did not exit on SIGTERM\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "fleetd exited {status}\n{}", self.logs());
        assert!(self.logs().contains("stopped"), "{}", self.logs());
    }

    fn machine_id(&self) -> String {
        Client::connect(&self.init_socket)
            .unwrap()
            .machine_id()
            .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        support::stop_machine(self.fleetd.take(), self.init.take(), &self.cgroup);
    }
}

fn fleetctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn units(cluster: &Cluster) -> Vec<Value> {
    cluster
        .json(&["list-units", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn start_list_stop_destroy() {
    let mut c = Cluster::start(&[]);
    let file = c.write("hello.toml", SLEEP);
    let out = c.ok(&["start", "--block-timeout", "30s", &file]);
    assert!(out.contains("hello"), "{out}");

    // Blocking means: active when start returns.
    let id = c.machine_id();
    let list = units(&c);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "hello");
    assert_eq!(list[0]["machine"], id.as_str());
    assert_eq!(list[0]["desired"], "launched");
    assert_eq!(list[0]["state"], "active");
    let info = c.init_unit("hello").expect("hello is loaded into init");
    assert_eq!(info.active_state, ActiveState::Active);
    assert!(info.main_pid != 0);

    let table = c.ok(&["list-units"]);
    assert!(table.starts_with("UNIT"), "{table}");
    assert!(
        table.contains("hello") && table.contains("running"),
        "{table}"
    );
    assert_eq!(c.ok(&["cat", "hello"]), SLEEP);
    let echo = c.write(
        "echo.toml",
        "[container]\ncommand = [\"/bin/sh\", \"-c\", \"echo one; echo two; exec sleep 1000\"]\n",
    );
    c.ok(&["start", "--block-timeout", "30s", &echo]);
    wait_until(
        "the journal to show two lines",
        || {
            let out = c.ok(&["journal", "-n", "1", "echo"]);
            out.contains("two") && !out.contains("one")
        },
        || c.logs(),
    );
    assert!(c.ok(&["journal", "echo"]).contains("stdout one"));
    c.ok(&["destroy", "echo"]);
    wait_until(
        "echo to be removed",
        || c.init_unit("echo").is_none(),
        || c.logs(),
    );
    let status = c.ok(&["status", "hello"]);
    assert!(status.contains("desired launched"), "{status}");

    // The machine: the id from init, the metadata from --metadata.
    let machines = c.json(&["list-machines", "--json"]);
    assert_eq!(machines[0]["id"], id.as_str());
    assert_eq!(machines[0]["metadata"]["role"], "test");
    assert_eq!(machines[0]["metadata"]["region"], "eu");
    assert!(machines[0].get("address").is_some(), "{machines}");

    c.ok(&["stop", "--block-timeout", "30s", "hello"]);
    assert_eq!(
        c.init_unit("hello").unwrap().active_state,
        ActiveState::Inactive
    );
    let list = units(&c);
    assert_eq!(list[0]["desired"], "loaded");
    assert_ne!(list[0]["state"], "active");

    c.ok(&["destroy", "hello"]);
    wait_until(
        "hello to be removed from init",
        || c.init_unit("hello").is_none(),
        || c.logs(),
    );
    assert!(units(&c).is_empty());
    let out = c.fleetctl(&["status", "hello"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown unit"),
        "{out:?}"
    );
    c.terminate();
}

#[test]
fn a_changed_body_needs_replace() {
    let c = Cluster::start(&[]);
    let dir = c.dir.path().join("v2");
    fs::create_dir_all(&dir).unwrap();
    let v1 = c.write("web.toml", SLEEP);
    c.ok(&["submit", &v1]);
    let v2 = dir.join("web.toml");
    fs::write(&v2, SLEEP.replace("1000", "2000")).unwrap();
    let out = c.fleetctl(&["submit", v2.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("different body") && err.contains("replace"),
        "{err}"
    );
    c.ok(&["submit", "--replace", v2.to_str().unwrap()]);
    assert!(c.ok(&["cat", "web"]).contains("2000"));
    let files = c.json(&["list-unit-files", "--json"]);
    assert_eq!(files[0]["desired"], "inactive");

    // The API checks bodies itself: 400 with file:line:col.
    let client = ApiClient::new(c.api.to_str().unwrap()).unwrap();
    let put = PutUnit {
        desired: Some(DesiredState::Launched),
        body: Some("[container]\ncommand = 5\n".into()),
        replace: false,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match runtime.block_on(client.put_unit("bad", &put)) {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.contains("bad.toml:2:"), "{message}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[test]
fn a_bad_unit_file_fails_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    fs::write(&file, "[container]\ncommand = 5\n").unwrap();
    // The file is checked before anything is sent: no cluster needed.
    let out = fleetctl(
        dir.path().join("none.sock").to_str().unwrap(),
        &["start", file.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2:", file.display())),
        "no file:line:col in {err}"
    );
}

/// `fleetctl submit FILE` of a unit with a misspelt capability names the user's FILE with
/// line and column, with the help on its own line, and sends nothing (no cluster needed).
#[test]
fn submit_of_a_broken_file_names_it_with_the_help_on_its_own_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("misspelt.toml");
    fs::write(
        &file,
        "[container]\ncommand = [\"/bin/true\"]\ncapabilities = [\"CAP_KILL\", \"CAP_NET_ADMN\"]\n",
    )
    .unwrap();
    let out = fleetctl(
        dir.path().join("none.sock").to_str().unwrap(),
        &["submit", file.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "fleetctl: {}:3:29: unknown capability \"CAP_NET_ADMN\"\n  help: did you mean \
             \"CAP_NET_ADMIN\"? (use capability names as in capabilities(7), e.g. \
             \"CAP_NET_BIND_SERVICE\" or \"NET_ADMIN\")\n",
            file.display()
        )
    );
}

#[test]
fn unsatisfiable_metadata_says_why() {
    let c = Cluster::start(&[]);
    let file = c.write(
        "picky.toml",
        &format!("{SLEEP}[fleet]\nmachine_metadata = [\"role=nope\"]\n"),
    );
    let out = c.fleetctl(&["start", "--block-timeout", "5s", &file]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be placed") && err.contains("role"),
        "{err}\n{}",
        c.logs()
    );
    assert!(c.init_unit("picky").is_none());
}

#[test]
fn a_wrong_endpoint_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let out = fleetctl(socket.to_str().unwrap(), &["list-units"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cluster unreachable: cannot connect to {}",
            socket.display()
        )),
        "{err}"
    );
}

#[test]
fn tcp_requires_the_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token_dir = tempfile::tempdir().unwrap();
    let token = token_dir.path().join("token");
    fs::write(&token, "s3cret-token\n").unwrap();
    let listen = format!("127.0.0.1:{port}");
    let c = Cluster::start(&[
        "--listen",
        &listen,
        "--insecure",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let url = format!("http://{listen}");
    let without = fleetctl(&url, &["list-machines"]);
    assert_eq!(without.status.code(), Some(1));
    let err = String::from_utf8_lossy(&without.stderr);
    assert!(err.contains("bearer token"), "{err}\n{}", c.logs());
    let wrong = token_dir.path().join("wrong");
    fs::write(&wrong, "guess\n").unwrap();
    let out = fleetctl(
        &url,
        &["--token-file", wrong.to_str().unwrap(), "list-machines"],
    );
    assert_eq!(out.status.code(), Some(1));
    let out = fleetctl(
        &url,
        &[
            "--token-file",
            token.to_str().unwrap(),
            "list-machines",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}\n{}", c.logs());
    let machines: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(machines[0]["address"], "127.0.0.1");
}

/// The counter of a `journal` line printed by the ticker unit (`... stdout tick N`).
fn tick(line: &str) -> Option<u64> {
    let (_, n) = line.trim_end().rsplit_once(" tick ")?;
    n.parse().ok()
}

/// The ticker's newest counter in init's own log (0 before its first line).
fn last_tick(c: &Cluster) -> u64 {
    Client::connect(&c.init_socket)
        .unwrap()
        .logs("ticker", 1000)
        .unwrap()
        .iter()
        .filter_map(|e| e.line.strip_prefix("tick ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Kills a child process on drop (a failing test leaves no `journal -f` behind).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `journal -n 2` prints exactly the unit's last two lines; `journal -f` keeps printing
/// the lines the unit writes after it started, each once, in order.
#[test]
fn journal_tails_and_follows() {
    let c = Cluster::start(&[]);
    let file = c.write(
        "ticker.toml",
        "[container]\ncommand = [\"/bin/sh\", \"-c\", \"i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.3; done\"]\n",
    );
    c.ok(&["start", "--block-timeout", "30s", &file]);
    wait_until(
        "the ticker to print 3 lines",
        || last_tick(&c) >= 3,
        || c.logs(),
    );

    // -n 2: two lines, consecutive, and the newest one at the time of the call.
    let before = last_tick(&c);
    let out = c.ok(&["journal", "-n", "2", "ticker"]);
    let after = last_tick(&c);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let ticks: Vec<u64> = lines.iter().map(|l| tick(l).expect(l)).collect();
    assert_eq!(ticks[1], ticks[0] + 1, "{out}");
    assert!(
        (before..=after).contains(&ticks[1]),
        "journal -n 2 printed {ticks:?}, the newest line was tick {before} before and tick {after} after\n{out}"
    );

    // -f: lines written after the command started arrive while it runs.
    let started = last_tick(&c);
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .arg("--endpoint")
            .arg(&c.api)
            .args(["journal", "-f", "ticker"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut seen: Vec<u64> = Vec::new();
    while seen.iter().filter(|&&t| t > started).count() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line.unwrap(),
            Err(e) => panic!(
                "journal -f printed {seen:?} and then nothing ({e}); the ticker was at {started} when it started\n{}",
                c.logs()
            ),
        };
        if let Some(t) = tick(&line) {
            assert!(
                seen.last().is_none_or(|&l| t > l),
                "journal -f printed tick {t} after {seen:?}"
            );
            seen.push(t);
        }
    }
    drop(child);
}

/// A free loopback port and a token file for a TCP listener.
fn tcp_setup() -> (String, tempfile::TempDir, PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token_dir = tempfile::tempdir().unwrap();
    let token = token_dir.path().join("token");
    fs::write(&token, "s3cret-token\n").unwrap();
    (format!("127.0.0.1:{port}"), token_dir, token)
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The attack: 1000 idle, unauthenticated TCP connections to a fleetd whose descriptor
/// limit (768 here) is below that (before: all accepted until fleetd ran out of
/// descriptors, and then the local Unix socket stopped answering too). Now at most the cap (256) are accepted, the
/// rest wait in the kernel's backlog, and `fleetctl` over the Unix socket still answers.
/// The timeouts are long here so that only the cap is tested.
#[test]
fn a_tcp_connection_flood_does_not_lock_out_the_unix_socket() {
    let (listen, _token_dir, token) = tcp_setup();
    let c = Cluster::start_with_nofile(
        &[
            "--listen",
            &listen,
            "--insecure",
            "--token-file",
            token.to_str().unwrap(),
            "--listen-header-timeout",
            "600",
            "--listen-idle-timeout",
            "600",
        ],
        Some(768),
    );
    let pid = c.fleetd.as_ref().unwrap().id();
    let before = open_fds(pid);
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    // Bounded: 1000 connections, each connect bounded; beyond the backlog one may time out.
    let mut flood = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            flood.push(s);
        }
    }
    assert!(flood.len() >= 900, "only {} connections made", flood.len());
    // Give fleetd the chance to accept all it will: wait until its count of descriptors
    // has reached the cap and stays put for half a second (without a cap it grows to the
    // flood's size or to its limit).
    let cap = 256;
    let mut last = 0;
    wait_until(
        "fleetd to stop accepting",
        || {
            let now = open_fds(pid);
            let stable = now == last && now >= before + cap - 8;
            last = now;
            std::thread::sleep(Duration::from_millis(500));
            stable
        },
        || c.logs(),
    );
    // The local socket answers while the flood holds.
    for _ in 0..3 {
        let out = c.fleetctl(&["list-machines", "--json"]);
        assert!(
            out.status.success(),
            "the Unix socket did not answer under the flood: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.logs()
        );
    }
    let fds = open_fds(pid);
    assert!(
        fds <= before + cap + 16,
        "fleetd holds {fds} descriptors (had {before}; cap {cap})\n{}",
        c.logs()
    );
    assert!(!c.logs().contains("accept failed"), "{}", c.logs());
    assert!(
        c.logs().contains("connections open, the cap"),
        "{}",
        c.logs()
    );
    // Once the flood goes, fleetd lets go of the connections and TCP serves again.
    drop(flood);
    wait_until(
        "fleetd to close the flood's connections",
        || open_fds(pid) <= before + 8,
        || c.logs(),
    );
    let url = format!("http://{listen}");
    wait_until(
        "the TCP API to answer again",
        || {
            fleetctl(
                &url,
                &["--token-file", token.to_str().unwrap(), "list-machines"],
            )
            .status
            .success()
        },
        || c.logs(),
    );
}

/// Read from `s` until EOF or an error (the server closed it); false if it stayed open for
/// the whole patience bound.
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. an error response before the close
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true, // reset
        }
    }
}

/// A connection that sends nothing (or half a request head) is closed after the header
/// timeout; the idle timeout is long here, so only the header timeout is tested.
#[test]
fn a_silent_tcp_connection_is_closed_after_the_header_timeout() {
    let (listen, _token_dir, token) = tcp_setup();
    let c = Cluster::start(&[
        "--listen",
        &listen,
        "--insecure",
        "--token-file",
        token.to_str().unwrap(),
        "--listen-header-timeout",
        "2",
        "--listen-idle-timeout",
        "600",
    ]);
    let mut silent = std::net::TcpStream::connect(&listen).unwrap();
    assert!(
        closed_by_server(&mut silent),
        "a silent connection stayed open\n{}",
        c.logs()
    );
    let mut half = std::net::TcpStream::connect(&listen).unwrap();
    std::io::Write::write_all(&mut half, b"GET /fleet/v1/machines HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert!(
        closed_by_server(&mut half),
        "a half request head stayed open\n{}",
        c.logs()
    );
}

/// A request whose body is trickled and then stalls (a complete head, so the header timeout
/// is over) is closed after the idle timeout.
#[test]
fn a_stalled_tcp_request_body_is_closed_after_the_idle_timeout() {
    let (listen, _token_dir, token) = tcp_setup();
    let c = Cluster::start(&[
        "--listen",
        &listen,
        "--insecure",
        "--token-file",
        token.to_str().unwrap(),
        "--listen-header-timeout",
        "600",
        "--listen-idle-timeout",
        "2",
    ]);
    let mut s = std::net::TcpStream::connect(&listen).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"PUT /fleet/v1/units/web HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-token\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"desired\":",
    )
    .unwrap();
    assert!(
        closed_by_server(&mut s),
        "a stalled request stayed open\n{}",
        c.logs()
    );
}

/// Template instances `.`, `..` and the empty one are refused at submit: by `fleetctl`
/// (checking the file, with its path) and by the API itself (400), so `%i` in a bind path can
/// never name the directory holding every instance's.
#[test]
fn dot_and_empty_instances_are_refused() {
    let c = Cluster::start(&[]);
    for (file, needle) in [
        ("data@..toml", "instance name `.` is not allowed"),
        ("data@...toml", "instance name `..` is not allowed"),
        ("data@.toml", "is a template, not a unit"),
    ] {
        let path = c.write(file, SLEEP);
        let out = c.fleetctl(&["submit", &path]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        assert!(err.contains(needle) && err.contains(&path), "{file}: {err}");
    }
    let client = ApiClient::new(c.api.to_str().unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, needle) in [
        ("data@.", "instance name `.` is not allowed"),
        ("data@..", "instance name `..` is not allowed"),
        ("data@", "is a template, not a unit"),
    ] {
        let put = PutUnit {
            desired: Some(DesiredState::Launched),
            body: Some(SLEEP.into()),
            replace: false,
        };
        match runtime.block_on(client.put_unit(name, &put)) {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status, 400, "{name}: {message}");
                assert!(message.contains(needle), "{name}: {message}");
            }
            other => panic!("{name}: expected a 400, got {other:?}"),
        }
    }
    assert!(c
        .json(&["list-unit-files", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
}

/// A unit on this machine runs `fleetctl` against fleetd's Unix socket to start a unit that
/// binds the host's `/` read-write (issue 10). fleetd sees the caller's pid (init runs
/// units in the host's pid namespace here), finds its cgroup `<root>/attacker.unit`, and
/// asks init whether `attacker` is granted the control API. Then `curl` (a stock HTTP
/// client) asks for the machines. Returns their output.
fn fleetctl_from_a_unit(cluster: &Cluster, granted: bool) -> String {
    let evil = cluster.write(
        "evil.toml",
        "[container]\ncontrol_api = true\ncommand = [\"/bin/sleep\", \"1000\"]\n\
         mounts = [{ host = \"/\", path = \"/mnt\" }]\n",
    );
    let dir = cluster.dir.path().display().to_string();
    let grant = if granted { "control_api = true\n" } else { "" };
    let attacker = format!(
        "[container]\n{grant}command = [\"/bin/sh\", \"-c\", \"{} --endpoint {} start --no-block {evil} \
         > {dir}/attack.out 2>&1; echo rc=$? >> {dir}/attack.out; \
         curl -s -w ' http=%%{{http_code}}' --unix-socket {api} http://fleetd/fleet/v1/machines \
         >> {dir}/attack.out; touch {dir}/attack.done\"]\n\
         [service]\ntype = \"oneshot\"\n",
        env!("CARGO_BIN_EXE_fleetctl"),
        cluster.api.display(),
        api = cluster.api.display(),
    );
    let init = Client::connect(&cluster.init_socket).unwrap();
    init.load_unit("attacker", &attacker).unwrap();
    init.start_unit("attacker").unwrap();
    let done = cluster.dir.path().join("attack.done");
    wait_until(
        "the attacker's fleetctl to finish",
        || done.exists(),
        || cluster.logs(),
    );
    fs::read_to_string(cluster.dir.path().join("attack.out")).unwrap()
}

#[test]
fn a_unit_without_the_grant_is_refused_on_the_unix_socket() {
    let cluster = Cluster::start(&[]);
    let out = fleetctl_from_a_unit(&cluster, false);
    assert!(!out.contains("rc=0"), "fleetctl succeeded:\n{out}");
    assert!(
        out.contains("http=403")
            && out.contains("unit attacker, which is not granted the control API")
            && out.contains("control_api = true"),
        "the refusal does not say why and how to grant it:\n{out}\n{}",
        cluster.logs()
    );
    // Nothing was submitted, and the refusal is logged.
    assert!(units(&cluster).iter().all(|u| u["name"] != "evil"));
    assert!(cluster.init_unit("evil").is_none());
    assert!(cluster
        .logs()
        .contains("api: refused PUT /fleet/v1/units/evil"));
    // Callers outside any unit (this test) are still served.
    cluster.ok(&["list-machines"]);
}

#[test]
fn a_unit_with_the_grant_drives_fleetd() {
    let cluster = Cluster::start(&[]);
    let out = fleetctl_from_a_unit(&cluster, true);
    assert!(
        out.contains("rc=0") && out.contains("http=200"),
        "{out}\n{}",
        cluster.logs()
    );
    assert!(units(&cluster).iter().any(|u| u["name"] == "evil"));
}
