//! The control API from inside a unit (issue 10): a uid-0 unit without an image sees the
//! host's root read-only, and with it the manager's socket; read-only does not stop
//! `connect(2)`. These tests run the attack: such a unit drives the socket with the stock
//! clients (`unitctl`, `dbus-send`) to load and start a unit that binds the host's `/`
//! read-write. Without `[container] control_api = true` the manager refuses and nothing is
//! loaded; with it the same script succeeds (so the tests see the difference).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::path::Path;

use common::Machine;

/// The unit the attacker tries to load: it binds the host's `/` read-write and proves it
/// by writing a file through that bind.
fn evil_unit(dir: &Path) -> String {
    format!(
        "[container]\ncontrol_api = true\ncommand = [\"/bin/sh\", \"-c\", \"echo owned > /mnt{}/evil-ran\"]\n\
         mounts = [{{ host = \"/\", path = \"/mnt\" }}]\n",
        dir.display()
    )
}

/// An image-less uid-0 unit that runs `script` (its output in `$DIR/attack.out`, then
/// `$DIR/attack.done`), with or without the grant.
fn attacker(script: &str, granted: bool) -> String {
    let grant = if granted { "control_api = true\n" } else { "" };
    format!(
        "[container]\n{grant}command = [\"/bin/sh\", \"-c\", \"({script}) > $DIR/attack.out 2>&1; touch $DIR/attack.done\"]\n\
         [service]\ntype = \"oneshot\"\n"
    )
}

/// `unitctl` (the real binary, visible through the read-only host root) loads and starts
/// the evil unit; `dbus-send`, the stock D-Bus client, tries `StartUnit` on its own.
fn unitctl_script() -> String {
    let unitctl = env!("CARGO_BIN_EXE_unitctl");
    format!(
        "{unitctl} --api $DIR/manager.sock load $DIR/evil.toml; echo load-rc=$?; \
         {unitctl} --api $DIR/manager.sock start evil; echo start-rc=$?; \
         dbus-send --peer=unix:path=$DIR/manager.sock --print-reply /org/flotilla/Manager1 \
         org.flotilla.Manager1.StartUnit string:evil; echo dbus-rc=$?"
    )
}

/// `dbus-send` alone: `LoadUnit` with the evil unit's text, then `StartUnit`.
fn dbus_send_script() -> String {
    "dbus-send --peer=unix:path=$DIR/manager.sock --print-reply /org/flotilla/Manager1 \
     org.flotilla.Manager1.LoadUnit string:evil \\\"string:$(cat $DIR/evil.toml)\\\"; \
     echo load-rc=$?; \
     dbus-send --peer=unix:path=$DIR/manager.sock --print-reply /org/flotilla/Manager1 \
     org.flotilla.Manager1.StartUnit string:evil; echo start-rc=$?"
        .to_string()
}

/// Start a machine with the attacker unit, wait until its script is done; returns the
/// machine and the script's output.
fn run_attack(script: &str, granted: bool) -> (Machine, String) {
    let m = Machine::start_with(&[("attacker", &attacker(script, granted))], &["--no-start"]);
    fs::write(m.path("evil.toml"), evil_unit(m.dir.path())).unwrap();
    m.ok(&["start", "attacker"]);
    m.wait_file(&m.path("attack.done"));
    let out = fs::read_to_string(m.path("attack.out")).unwrap();
    (m, out)
}

fn assert_refused(m: &Machine, out: &str) {
    assert!(
        out.contains("org.flotilla.Error.AccessDenied"),
        "the attacker was not refused:\n{out}\nmanager log:\n{}",
        m.manager_log()
    );
    assert!(
        out.contains("unit attacker, which is not granted the control API")
            && out.contains("control_api = true"),
        "the refusal does not say why and how to grant it:\n{out}"
    );
    assert!(
        !out.contains("load-rc=0") && !out.contains("start-rc=0"),
        "{out}"
    );
    // Nothing was loaded or started, and the bind of `/` never happened.
    let list = m.ok(&["list"]);
    assert!(!list.contains("evil"), "evil was loaded:\n{list}");
    assert!(!m.path("evil-ran").exists());
    assert!(
        m.manager_log().contains("control API: refused"),
        "the refusal was not logged:\n{}",
        m.manager_log()
    );
}

#[test]
fn an_ungranted_unit_cannot_load_or_start_units_with_unitctl() {
    let (m, out) = run_attack(&unitctl_script(), false);
    assert_refused(&m, &out);
    assert!(!out.contains("dbus-rc=0"), "{out}");
}

#[test]
fn an_ungranted_unit_cannot_load_or_start_units_with_dbus_send() {
    let (m, out) = run_attack(&dbus_send_script(), false);
    assert_refused(&m, &out);
}

#[test]
fn a_granted_unit_can_drive_the_manager() {
    let (m, out) = run_attack(&unitctl_script(), true);
    assert!(
        out.contains("load-rc=0") && out.contains("start-rc=0"),
        "{out}"
    );
    m.wait_file(&m.path("evil-ran"));
    assert!(m.ok(&["list"]).contains("evil"));
}

#[test]
fn a_granted_unit_can_drive_the_manager_with_dbus_send() {
    let (m, out) = run_attack(&dbus_send_script(), true);
    assert!(
        out.contains("load-rc=0") && out.contains("start-rc=0"),
        "{out}"
    );
    m.wait_file(&m.path("evil-ran"));
}

/// A unit without the grant whose mount exposes a control socket (`--control-socket`,
/// fleetd's by default) is not started: fleetd, in its own pid namespace, could not tell
/// it from the host. The socket, its directory and the directories above it all count;
/// with the grant the same unit starts.
#[test]
fn an_ungranted_unit_may_not_bind_a_control_socket() {
    let ctl = tempfile::tempdir().unwrap();
    let sock_dir = ctl.path().join("run");
    fs::create_dir_all(&sock_dir).unwrap();
    let socket = sock_dir.join("fleetd.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let bind = |host: &Path, granted: bool| {
        let grant = if granted { "control_api = true\n" } else { "" };
        format!(
            "[container]\n{grant}command = [\"/bin/sh\", \"-c\", \"touch $DIR/ran-$FLOTILLA_UNIT; sleep 600\"]\n\
             mounts = [{{ host = \"$DIR\", path = \"$DIR\" }}, {{ host = \"{}\", path = \"/mnt\" }}]\n",
            host.display()
        )
    };
    let units = [
        ("sock", bind(&socket, false)),
        ("dir", bind(&sock_dir, false)),
        ("above", bind(ctl.path(), false)),
        ("granted", bind(&sock_dir, true)),
    ];
    let refs: Vec<(&str, &str)> = units.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let m = Machine::start_with(
        &refs,
        &["--no-start", "--control-socket", socket.to_str().unwrap()],
    );
    for name in ["dir", "above", "sock"] {
        let _ = m.unitctl(&["start", name]);
        let status = m.wait_state(name, "failed");
        let message = status["message"].as_str().unwrap_or_default().to_string();
        assert!(
            message.contains("exposes the control socket")
                && message.contains(socket.to_str().unwrap())
                && message.contains("control_api = true"),
            "{name}: {status}"
        );
        assert!(!m.path(&format!("ran-{name}")).exists(), "{name} ran");
    }
    m.ok(&["start", "granted"]);
    m.wait_file(&m.path("ran-granted"));
    m.wait_state("granted", "active");
}
