//! Init's `GetOsStatus() -> s` and `UpdateOs(s source, b allow_downgrade)` driven with the
//! stock D-Bus client `dbus-send`, against a real `flotilla-init` supervising (not PID 1)
//! over a loop device with the agreed GPT (sfdisk), a directory standing in for the mounted
//! ESP and files for /proc/cmdline, os-release and the trusted keys (init's hidden `--os-*`
//! options). The update runs on init's own job thread; once the entry is installed init
//! asks for the orderly reboot as Ctrl-Alt-Del does (SIGINT to itself): as a supervisor that
//! stops every unit and exits 0, it never reboots the machine it runs on.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

#[path = "common/mod.rs"]
mod common;
#[path = "../../osupdate/tests/common/mod.rs"]
mod osu;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Machine, PATIENCE};
use flotilla_osupdate::entries::{self, BootFile};
use flotilla_osupdate::{sha256_file, Slot};
use osu::MIB;
use serde_json::Value;

/// The host's files: slot A running 1.0.0 (committed entry on the ESP), trusting `key`.
struct Host {
    tmp: tempfile::TempDir,
    disk: osu::LoopDisk,
    esp: PathBuf,
    key: PathBuf,
}

impl Host {
    fn new(cmdline: &str) -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let key = osu::openssl_key(tmp.path(), "release");
        let keys = tmp.path().join("update-keys");
        std::fs::create_dir(&keys).unwrap();
        osu::openssl_pubkey(&key, &keys.join("release.pem"));
        std::fs::write(
            tmp.path().join("os-release"),
            "NAME=\"Flotilla\"\nID=flotilla\nVERSION_ID=1.0.0\n",
        )
        .unwrap();
        std::fs::write(tmp.path().join("cmdline"), cmdline).unwrap();
        let esp = tmp.path().join("esp");
        std::fs::create_dir(&esp).unwrap();
        let (v, i, _) = osu::artifacts(&tmp.path().join("v1"), 1000);
        let (vs, is) = (sha256_file(&v).unwrap().0, sha256_file(&i).unwrap().0);
        entries::install(
            &esp,
            Slot::A,
            "1.0.0",
            3,
            BootFile {
                path: &v,
                sha256: &vs,
            },
            BootFile {
                path: &i,
                sha256: &is,
            },
        )
        .unwrap();
        entries::commit(&esp, Slot::A).unwrap();
        Host {
            tmp,
            disk: osu::loop_disk(),
            esp,
            key,
        }
    }

    fn booted_from_a() -> Host {
        Host::new("console=ttyS0 panic=10 flotilla.slot=a flotilla.root=flotilla-root-a flotilla.var=flotilla-var\n")
    }

    /// A flotilla-init over these files, with `units`.
    fn init(&self, units: &[(&str, &str)]) -> Machine {
        self.init_with(units, &[])
    }

    /// [`Host::init`] with more of init's arguments.
    fn init_with(&self, units: &[(&str, &str)], more: &[&str]) -> Machine {
        let t = self.tmp.path();
        let s = |p: PathBuf| p.to_str().unwrap().to_string();
        let args = [
            "--os-esp".to_string(),
            s(self.esp.clone()),
            "--os-disk".into(),
            self.disk.dev.clone(),
            "--os-cmdline".into(),
            s(t.join("cmdline")),
            "--os-release".into(),
            s(t.join("os-release")),
            "--os-keys".into(),
            s(t.join("update-keys")),
            // The stubborn unit decides when the stop ends, not a deadline.
            "--shutdown-timeout".into(),
            "10m".into(),
        ];
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(more);
        Machine::start_with(units, &args)
    }

    /// `unitctl os update ARGS --no-reboot` over these files.
    fn unitctl_update(&self, args: &[&str]) -> std::process::Output {
        let t = self.tmp.path();
        Command::new(env!("CARGO_BIN_EXE_unitctl"))
            .args(["os", "update"])
            .args(args)
            .arg("--no-reboot")
            .arg("--esp")
            .arg(&self.esp)
            .args(["--disk", &self.disk.dev])
            .arg("--cmdline")
            .arg(t.join("cmdline"))
            .arg("--os-release")
            .arg(t.join("os-release"))
            .arg("--keys")
            .arg(t.join("update-keys"))
            .output()
            .unwrap()
    }

    /// Puts the running slot A's entry on trial (booted once, two tries left): the state
    /// right after an update's first boot, before the health check commits it.
    fn put_a_on_trial(&self) {
        let dir = self.esp.join("loader/entries");
        std::fs::rename(dir.join("flotilla-a.conf"), dir.join("flotilla-a+2-1.conf")).unwrap();
    }

    fn slot_b(&self) -> PathBuf {
        PathBuf::from(format!("/dev/{}p3", self.disk.dev))
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.esp.join("loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn head(dev: &Path, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open(dev)
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

/// `dbus-send --print-reply` of `method` with `args` on the machine's socket: (success,
/// output).
fn dbus_send(m: &Machine, method: &str, args: &[&str]) -> (bool, String) {
    let dbus_send = osu::ensure_program("dbus-send", "dbus-bin");
    let out = Command::new(dbus_send)
        .arg(format!("--peer=unix:path={}", m.api.display()))
        .arg("--print-reply")
        .arg("/org/flotilla/Manager1")
        .arg(format!("org.flotilla.Manager1.{method}"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ dbus-send {method} {}\n{text}", args.join(" "));
    (out.status.success(), text)
}

/// `GetOsStatus` through dbus-send, its string parsed as JSON.
fn os_status(m: &Machine) -> Value {
    let t0 = Instant::now();
    let (ok, text) = dbus_send(m, "GetOsStatus", &[]);
    println!(
        "GetOsStatus (a dbus-send process) answered in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    assert!(ok, "GetOsStatus failed: {text}\n{}", m.manager_log());
    let start = text.find("string \"").expect("a string reply") + "string \"".len();
    let end = text.rfind('"').unwrap();
    serde_json::from_str(&text[start..end]).unwrap()
}

/// Polls `GetOsStatus` until the job is in `state`.
fn wait_job(m: &Machine, state: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let st = os_status(m);
        if st["job"]["state"] == state {
            println!("job {state} after {:.1}s", t0.elapsed().as_secs_f64());
            return st;
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "the job is not {state}: {st}\n{}",
            m.manager_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A unit that ignores SIGTERM and runs until `$DIR/go` exists: it holds init's orderly
/// stop open until the test has looked at it.
const STUBBORN: &str = "[container]\ncommand = [\"/bin/sh\", \"-c\", \"trap '' TERM; while [ ! -e $DIR/go ]; do sleep 0.1; done\"]\n[service]\nstop_timeout = \"10m\"\n";

#[test]
fn update_os_over_dbus_writes_the_slot_and_stops_in_order() {
    let h = Host::booted_from_a();
    let mut m = h.init(&[("stubborn", STUBBORN)]);
    m.wait_state("stubborn", "active");

    let st = os_status(&m);
    assert_eq!(st["running"], "a", "{st}");
    assert_eq!(st["version"], "1.0.0", "{st}");
    assert_eq!(st["next"], "a", "{st}");
    assert_eq!(st["slots"][0]["state"], "committed", "{st}");
    assert_eq!(st["slots"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["rolled_back"], Value::Null, "{st}");
    assert_eq!(st["job"], Value::Null, "{st}");

    let good = osu::payload(
        &h.tmp.path().join("good"),
        "2.0.0",
        &h.key,
        (3 * MIB) as usize,
    );
    let t0 = Instant::now();
    let (ok, text) = dbus_send(
        &m,
        "UpdateOs",
        &[&format!("string:{}", good.display()), "boolean:false"],
    );
    assert!(ok, "UpdateOs failed: {text}");

    // Installed: the job says so and init stops its units in order (the stubborn unit
    // holds the stop open meanwhile); nothing more is accepted.
    let st = wait_job(&m, "rebooting");
    assert!(
        st["job"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Flotilla 2.0.0 (signed by sha256:"),
        "{st}"
    );
    assert!(
        st["job"]["message"]
            .as_str()
            .unwrap()
            .ends_with("written to slot b (3145728 bytes); next boot: flotilla-b+3.conf (3 tries)"),
        "{st}"
    );
    assert_eq!(st["next"], "b", "{st}");
    assert_eq!(st["slots"][1]["state"], "trying", "{st}");
    m.wait_until("init is stopping", || {
        dbus_send(&m, "GetSystemState", &[])
            .1
            .contains("\"stopping\"")
    });
    let (ok, text) = dbus_send(
        &m,
        "UpdateOs",
        &[&format!("string:{}", good.display()), "boolean:false"],
    );
    assert!(!ok && text.contains("org.flotilla.Error.Refused"), "{text}");
    std::fs::write(m.path("go"), "").unwrap();

    // The job writes slot B, installs its entry on trial, then init stops in order: the
    // supervisor's "reboot" is an exit 0 once every unit is stopped.
    let mut child = m.child.take().unwrap();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "init did not stop after the update\n{}",
            m.manager_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "UpdateOs to init's exit: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let log = m.manager_log();
    assert!(status.success(), "init exited with {status}\n{log}");
    assert!(
        log.contains("flotilla: OS update: Flotilla 2.0.0")
            && log.contains("next boot: flotilla-b+3.conf (3 tries); rebooting (orderly)"),
        "{log}"
    );
    assert!(log.contains("SIGINT: stopping all units"), "{log}");
    assert!(log.contains("all units stopped"), "{log}");

    let root = std::fs::read(good.join("root.img")).unwrap();
    assert_eq!(head(&h.slot_b(), root.len()), root);
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b+3.conf"]);
    assert_eq!(
        std::fs::read(h.esp.join("flotilla/b/vmlinuz")).unwrap(),
        std::fs::read(good.join("vmlinuz")).unwrap()
    );
}

#[test]
fn a_refused_payload_fails_the_job_and_leaves_slot_b() {
    let h = Host::booted_from_a();
    let m = h.init(&[]);
    let stranger = osu::openssl_key(h.tmp.path(), "stranger");
    let p = osu::payload(
        &h.tmp.path().join("stranger"),
        "2.0.0",
        &stranger,
        (2 * MIB) as usize,
    );
    let (ok, text) = dbus_send(
        &m,
        "UpdateOs",
        &[&format!("string:{}", p.display()), "boolean:false"],
    );
    assert!(ok, "{text}");
    let st = wait_job(&m, "failed");
    let message = st["job"]["message"].as_str().unwrap();
    assert!(message.contains("not among the 1 trusted keys"), "{st}");
    assert_eq!(st["job"]["source"], p.to_str().unwrap(), "{st}");
    assert!(
        m.manager_log().contains("flotilla: OS update failed:"),
        "{}",
        m.manager_log()
    );
    assert!(head(&h.slot_b(), (2 * MIB) as usize)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
    // Init goes on: the units' API answers, no shutdown.
    m.ok(&["list"]);

    // A source that is neither a directory nor a reference: refused at once.
    let (ok, text) = dbus_send(&m, "UpdateOs", &["string:/no/such/dir", "boolean:false"]);
    assert!(!ok);
    assert!(
        text.contains("org.flotilla.Error.Refused")
            && text.contains("/no/such/dir: no such payload directory"),
        "{text}"
    );
}

#[test]
fn a_host_not_booted_from_a_slot_answers_status_and_refuses_updates() {
    let h = Host::new("console=ttyS0 root=/dev/vda ro\n");
    // Not booted from a slot: the ESP is not looked for.
    let m = {
        let t = h.tmp.path();
        let args: Vec<String> = vec![
            "--os-cmdline".into(),
            t.join("cmdline").to_str().unwrap().into(),
            "--os-release".into(),
            t.join("os-release").to_str().unwrap().into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Machine::start_with(&[], &args)
    };
    let st = os_status(&m);
    assert_eq!(st["running"], Value::Null, "{st}");
    assert_eq!(st["version"], "1.0.0", "{st}");
    assert_eq!(st["slots"], serde_json::json!([]), "{st}");
    assert_eq!(st["job"], Value::Null, "{st}");
    let p = osu::payload(&h.tmp.path().join("good"), "2.0.0", &h.key, 1000);
    let (ok, text) = dbus_send(
        &m,
        "UpdateOs",
        &[&format!("string:{}", p.display()), "boolean:false"],
    );
    assert!(!ok);
    assert!(
        text.contains("org.flotilla.Error.Refused")
            && text.contains("not booted from a slot of the A/B disk"),
        "{text}"
    );
    assert_eq!(os_status(&m)["job"], Value::Null);
}

/// An image-less uid-0 unit without `control_api` sees the host's root and so the socket:
/// `UpdateOs` from it is refused like every other method, no job starts.
#[test]
fn a_unit_without_control_api_cannot_update_os() {
    let h = Host::booted_from_a();
    let p = osu::payload(&h.tmp.path().join("good"), "2.0.0", &h.key, 1000);
    let dbus_send = osu::ensure_program("dbus-send", "dbus-bin");
    let attacker = format!(
        "[container]\ncommand = [\"/bin/sh\", \"-c\", \"({} --peer=unix:path=$DIR/manager.sock --print-reply \
         /org/flotilla/Manager1 org.flotilla.Manager1.UpdateOs string:{} boolean:true; echo rc=$?) \
         > $DIR/attack.out 2>&1; touch $DIR/attack.done\"]\n[service]\ntype = \"oneshot\"\n",
        dbus_send.display(),
        p.display()
    );
    let m = h.init(&[("attacker", &attacker)]);
    m.wait_file(&m.path("attack.done"));
    let out = std::fs::read_to_string(m.path("attack.out")).unwrap();
    println!("attacker:\n{out}");
    assert!(
        out.contains("org.flotilla.Error.AccessDenied")
            && out.contains("unit attacker, which is not granted the control API"),
        "the unit was not refused:\n{out}\n{}",
        m.manager_log()
    );
    assert_eq!(os_status(&m)["job"], Value::Null);
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
}

/// A "registry" that accepts connections and never answers, until released: then every
/// connection is closed.
struct SilentRegistry {
    addr: std::net::SocketAddr,
    held: std::sync::Arc<std::sync::Mutex<Option<Vec<std::net::TcpStream>>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SilentRegistry {
    fn start() -> SilentRegistry {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let held = std::sync::Arc::new(std::sync::Mutex::new(Some(Vec::new())));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (h, a) = (held.clone(), accepted.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if let Some(v) = h.lock().unwrap().as_mut() {
                    v.push(stream);
                }
            }
        });
        SilentRegistry {
            addr,
            held,
            accepted,
        }
    }

    fn release(&self) {
        self.held.lock().unwrap().take();
    }
}

/// While an update pulls (from a registry that does not answer), a second `UpdateOs` is
/// refused and the status says what runs; once the registry hangs up, the job fails with
/// the pull's reason and nothing is written.
#[test]
fn a_second_update_is_refused_while_one_runs() {
    let h = Host::booted_from_a();
    let registry = SilentRegistry::start();
    let settings = h.tmp.path().join("registries.toml");
    std::fs::write(
        &settings,
        format!("[registry.\"{}\"]\ninsecure = true\n", registry.addr),
    )
    .unwrap();
    let staging = h.tmp.path().join("staging");
    let m = {
        let t = h.tmp.path();
        let s = |p: PathBuf| p.to_str().unwrap().to_string();
        let args = [
            "--os-esp".to_string(),
            s(h.esp.clone()),
            "--os-disk".into(),
            h.disk.dev.clone(),
            "--os-cmdline".into(),
            s(t.join("cmdline")),
            "--os-release".into(),
            s(t.join("os-release")),
            "--os-keys".into(),
            s(t.join("update-keys")),
            "--os-staging".into(),
            s(staging.clone()),
            "--registries".into(),
            s(settings.clone()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Machine::start_with(&[], &args)
    };
    let reference = format!("{}/flotilla/os:2.0.0", registry.addr);
    let (ok, text) = dbus_send(
        &m,
        "UpdateOs",
        &[&format!("string:{reference}"), "boolean:false"],
    );
    assert!(ok, "{text}");
    m.wait_until("the pull reaches the registry", || {
        registry.accepted.load(std::sync::atomic::Ordering::SeqCst) > 0
    });

    let good = osu::payload(&h.tmp.path().join("good"), "2.0.0", &h.key, 1000);
    let (ok, text) = dbus_send(
        &m,
        "UpdateOs",
        &[&format!("string:{}", good.display()), "boolean:false"],
    );
    assert!(!ok, "a second update was accepted: {text}");
    assert!(
        text.contains("org.flotilla.Error.Refused")
            && text.contains(&format!(
                "an OS update is already running (from {reference})"
            )),
        "{text}"
    );
    let st = os_status(&m);
    assert_eq!(st["job"]["state"], "running", "{st}");
    assert_eq!(st["job"]["source"], reference.as_str(), "{st}");

    registry.release();
    let st = wait_job(&m, "failed");
    println!("the pull failed with: {}", st["job"]["message"]);
    assert!(
        st["job"]["message"]
            .as_str()
            .unwrap()
            .contains(&registry.addr.to_string()),
        "{st}"
    );
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
    // The download directory is gone with the job.
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
}

/// PID 1 links no registry client: the whole update runs in the helper process (init's
/// `--pull-helper`, here a script that records how it was run and then runs the real
/// unitctl). Init reaps it through its event loop and takes its exit: 0 with the slot
/// installed is `rebooting`; killed by a signal is `failed` saying so; a helper that does
/// not exist is `failed` saying what to do. Nothing is written by the failed ones.
#[test]
fn the_update_runs_in_the_helper_process_init_tracks() {
    let h = Host::booted_from_a();
    let t = h.tmp.path();
    let wrapper = t.join("helper.sh");
    let record = t.join("helper-args");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$PPID $*\" >> {}\nif [ -e {} ]; then echo \"writing slot b: 10%\" >&2; kill -KILL $$; fi\nexec {} \"$@\"\n",
            record.display(),
            t.join("die").display(),
            env!("CARGO_BIN_EXE_unitctl")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let good = osu::payload(&t.join("good"), "2.0.0", &h.key, (2 * MIB) as usize);
    let source = format!("string:{}", good.display());

    // A helper that does not exist: failed, saying so; nothing written.
    let missing = t.join("no-unitctl");
    let m = h.init_with(&[], &["--pull-helper", missing.to_str().unwrap()]);
    let (ok, text) = dbus_send(&m, "UpdateOs", &[&source, "boolean:false"]);
    assert!(ok, "{text}");
    let st = wait_job(&m, "failed");
    let message = st["job"]["message"].as_str().unwrap();
    assert!(
        message.contains("the OS update helper does not exist")
            && message.contains("no-unitctl")
            && message.contains("--pull-helper"),
        "{st}"
    );
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
    drop(m);

    // A helper killed by a signal: failed, its signal and last line named.
    // (The stubborn unit holds init's orderly stop open until the test has looked.)
    let m = h.init_with(
        &[("stubborn", STUBBORN)],
        &["--pull-helper", wrapper.to_str().unwrap()],
    );
    std::fs::write(t.join("die"), "").unwrap();
    let (ok, text) = dbus_send(&m, "UpdateOs", &[&source, "boolean:false"]);
    assert!(ok, "{text}");
    let st = wait_job(&m, "failed");
    assert_eq!(
        st["job"]["message"],
        "the OS update helper was killed by SIGKILL (its last line: writing slot b: 10%)",
        "{st}"
    );
    assert_eq!(h.entries(), ["flotilla-a.conf"]);

    // The real helper: the job ends `rebooting`, after the helper ran as init's child with
    // the update's arguments.
    std::fs::remove_file(t.join("die")).unwrap();
    let (ok, text) = dbus_send(&m, "UpdateOs", &[&source, "boolean:false"]);
    assert!(ok, "{text}");
    let st = wait_job(&m, "rebooting");
    assert!(
        st["job"]["message"]
            .as_str()
            .unwrap()
            .ends_with("written to slot b (2097152 bytes); next boot: flotilla-b+3.conf (3 tries)"),
        "{st}"
    );
    let runs = std::fs::read_to_string(&record).unwrap();
    println!("the helper ran as:\n{runs}");
    let init_pid = m.child.as_ref().unwrap().id().to_string();
    let lines: Vec<&str> = runs.lines().collect();
    assert_eq!(lines.len(), 2, "{runs}");
    for line in lines {
        let (parent, args) = line.split_once(' ').unwrap();
        assert_eq!(parent, init_pid, "the helper is not init's child: {runs}");
        assert!(
            args.starts_with(&format!("--json os update {} --no-reboot", good.display()))
                && args.contains(&format!("--disk {}", h.disk.dev)),
            "{runs}"
        );
    }
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b+3.conf"]);
    std::fs::write(m.path("go"), "").unwrap();
}

/// The running slot on trial (not committed yet): an update would overwrite the other slot,
/// the committed fallback. Refused in the one update path, for `unitctl os update` and for
/// init's `UpdateOs` alike; nothing written, the entries unchanged. Once committed, the same
/// update goes through.
#[test]
fn an_update_over_a_slot_on_trial_is_refused() {
    let h = Host::booted_from_a();
    h.put_a_on_trial();
    let good = osu::payload(
        &h.tmp.path().join("good"),
        "2.0.0",
        &h.key,
        (2 * MIB) as usize,
    );
    let want = "the running slot a is on trial (not committed; its entry flotilla-a+2-1.conf): refused, nothing written, since the update would overwrite slot b, the committed fallback; commit it (`unitctl os commit`) or wait for the health check, then update";

    let out = h.unitctl_update(&[good.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("unitctl os update: {stderr}");
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
    assert!(head(&h.slot_b(), (2 * MIB) as usize)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(h.entries(), ["flotilla-a+2-1.conf"]);

    let m = h.init(&[]);
    let (ok, text) = dbus_send(
        &m,
        "UpdateOs",
        &[&format!("string:{}", good.display()), "boolean:false"],
    );
    assert!(ok, "{text}");
    let st = wait_job(&m, "failed");
    assert_eq!(st["job"]["message"], want, "{st}");
    assert_eq!(st["slots"][0]["state"], "trying", "{st}");
    assert!(head(&h.slot_b(), (2 * MIB) as usize)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(h.entries(), ["flotilla-a+2-1.conf"]);
    drop(m);

    // Committed: the same update is written.
    let out = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args(["os", "commit", "--esp"])
        .arg(&h.esp)
        .arg("--cmdline")
        .arg(h.tmp.path().join("cmdline"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = h.unitctl_update(&[good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b+3.conf"]);
}
