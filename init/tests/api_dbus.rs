//! The D-Bus server checked with a stock client (`dbus-send --peer`) and its socket policy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod api_common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use api_common::{dbus_send, Fake};
use flotilla_init::api::{self, dbus};
use flotilla_init_api::access::UnitCgroups;

#[test]
fn dbus_send_list_units() {
    let fake = Fake::start();
    let out = dbus_send(
        &fake.socket,
        &["/org/flotilla/Manager1", "org.flotilla.Manager1.ListUnits"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dbus-send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "\"web\"",
        "\"db\"",
        "\"active\"",
        "\"running\"",
        "\"inactive\"",
        "\"Web server\"",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
}

#[test]
fn dbus_send_get_unit_and_error() {
    let fake = Fake::start();
    let out = dbus_send(
        &fake.socket,
        &[
            "/org/flotilla/Manager1",
            "org.flotilla.Manager1.GetUnit",
            "string:web",
        ],
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"Web server\""), "{stdout}");

    let out = dbus_send(
        &fake.socket,
        &[
            "/org/flotilla/Manager1",
            "org.flotilla.Manager1.GetUnit",
            "string:nosuch",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("org.flotilla.Error.NoSuchUnit"), "{stderr}");
    assert!(stderr.contains("unit nosuch not found"), "{stderr}");
}

#[test]
fn dbus_send_introspect() {
    let fake = Fake::start();
    let out = dbus_send(
        &fake.socket,
        &[
            "/org/flotilla/Manager1",
            "org.freedesktop.DBus.Introspectable.Introspect",
        ],
    );
    assert!(out.status.success());
    let xml = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "org.flotilla.Manager1",
        "UnitStateChanged",
        "ListUnits",
        "LogsAfter",
        "CatUnit",
        "LoadUnit",
        "RemoveUnit",
        "Reload",
    ] {
        assert!(xml.contains(needle), "{needle} missing from:\n{xml}");
    }
}

#[test]
fn socket_is_private_and_dir_created() {
    let fake = Fake::start();
    let meta = std::fs::metadata(&fake.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let dir = std::fs::metadata(fake.socket.parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o755);
    assert_eq!(fake.server.socket(), fake.socket.as_path());
}

fn setpriv_available() -> bool {
    Command::new("setpriv").arg("--version").output().is_ok()
}

#[test]
fn other_uid_is_refused() {
    assert!(
        setpriv_available(),
        "setpriv is missing: install the Debian package util-linux"
    );
    assert!(
        rustix::process::getuid().is_root(),
        "needs root: the host integration tests run as root (sudo ./scripts/test) (to switch uid)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("manager.sock");
    let fake = Fake::start_at(dir, socket.clone());
    let as_nobody = |socket: &std::path::Path| {
        Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "dbus-send",
            ])
            .arg(format!("--peer=unix:path={}", socket.display()))
            .args([
                "--print-reply",
                "/org/flotilla/Manager1",
                "org.flotilla.Manager1.ListUnits",
            ])
            .output()
            .unwrap()
    };
    // Mode 0600: nobody cannot even connect.
    let out = as_nobody(&socket);
    eprintln!(
        "uid 65534 on a 0600 socket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "uid 65534 got through a 0600 socket");
    // Even with the mode opened up, the SO_PEERCRED check refuses the peer.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&socket);
    eprintln!(
        "uid 65534 on a 0666 socket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "uid 65534 was served: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\"web\""));
    // Root still gets through.
    let out = dbus_send(
        &fake.socket,
        &["/org/flotilla/Manager1", "org.flotilla.Manager1.ListUnits"],
    );
    assert!(out.status.success());
}

#[test]
fn stale_socket_replaced_live_one_and_non_socket_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("manager.sock");
    // A stale socket file (its listener is gone).
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let (handle, _queue) = api::channel().unwrap();
    let (_tx, rx) = std::sync::mpsc::channel();
    let server = dbus::serve(&socket, handle.clone(), rx, UnitCgroups::None).unwrap();

    // A second server on the same live socket is refused.
    let (_tx2, rx2) = std::sync::mpsc::channel();
    let err = dbus::serve(&socket, handle.clone(), rx2, UnitCgroups::None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("already listening"), "{err}");

    // Dropping the server removes the socket file.
    drop(server);
    assert!(!socket.exists());

    std::fs::write(&socket, "not a socket").unwrap();
    let (_tx3, rx3) = std::sync::mpsc::channel();
    let err = dbus::serve(&socket, handle, rx3, UnitCgroups::None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("is not a socket"), "{err}");
}

/// Defence in depth: a unit whose description holds a NUL and an escape sequence (which
/// the parser refuses, but say one got through), and a log line with a NUL (a unit may
/// print anything) must not break the replies. D-Bus cannot carry a NUL: before, one such
/// unit made `ListUnits` fail for every unit, with `org.freedesktop.zbus.Error`.
#[test]
fn one_bad_unit_does_not_break_listing_or_logs() {
    let fake = Fake::start();
    {
        let mut model = fake.model.lock().unwrap();
        model.units.insert(
            "evil".into(),
            api_common::unit("evil", "bad\0desc\u{1b}[2J", "active", "running"),
        );
        model.logs.get_mut("web").unwrap()[14].line = "nul\0here".into();
    }
    let out = dbus_send(
        &fake.socket,
        &["/org/flotilla/Manager1", "org.flotilla.Manager1.ListUnits"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ListUnits failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "\"web\"",
        "\"evil\"",
        "\"Web server\"",
        "bad\u{FFFD}desc\u{FFFD}[2J",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
    let out = dbus_send(
        &fake.socket,
        &[
            "/org/flotilla/Manager1",
            "org.flotilla.Manager1.GetUnit",
            "string:evil",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let list = fake.unitctl(&["list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("web") && text.contains("evil"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "the escape reached the terminal: {text:?}"
    );

    let logs = fake.unitctl(&["logs", "web", "-n", "1"]);
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("nul\u{FFFD}here"),
        "{}",
        String::from_utf8_lossy(&logs.stdout)
    );
}

/// A raw D-Bus method call (little endian) on `socket`: `member` with one string argument
/// whose bytes are `arg` (which may hold a NUL or invalid UTF-8, as no stock client sends).
/// Returns the raw bytes of the reply.
fn raw_call(socket: &std::path::Path, member: &str, arg: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    fn pad(buf: &mut Vec<u8>, to: usize) {
        while buf.len() % to != 0 {
            buf.push(0);
        }
    }
    fn string(buf: &mut Vec<u8>, s: &[u8]) {
        pad(buf, 4);
        buf.extend_from_slice(&u32::try_from(s.len()).unwrap().to_le_bytes());
        buf.extend_from_slice(s);
        buf.push(0);
    }
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let uid: String = rustix::process::getuid()
        .as_raw()
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    s.write_all(format!("\0AUTH EXTERNAL {uid}\r\n").as_bytes())
        .unwrap();
    let mut line = [0u8; 256];
    let n = s.read(&mut line).unwrap();
    assert!(
        line[..n].starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&line[..n])
    );
    s.write_all(b"BEGIN\r\n").unwrap();

    let mut body = Vec::new();
    string(&mut body, arg);
    let mut fields = Vec::new();
    for (code, sig, value) in [
        (1u8, b'o', "/org/flotilla/Manager1"),
        (2, b's', "org.flotilla.Manager1"),
        (3, b's', member),
    ] {
        pad(&mut fields, 8);
        fields.extend_from_slice(&[code, 1, sig, 0]);
        string(&mut fields, value.as_bytes());
    }
    pad(&mut fields, 8);
    fields.extend_from_slice(&[8, 1, b'g', 0, 1, b's', 0]);
    let mut msg = vec![b'l', 1, 0, 1];
    msg.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    msg.extend_from_slice(&7u32.to_le_bytes());
    msg.extend_from_slice(&u32::try_from(fields.len()).unwrap().to_le_bytes());
    msg.extend_from_slice(&fields);
    pad(&mut msg, 8);
    msg.extend_from_slice(&body);
    s.write_all(&msg).unwrap();
    let mut reply = vec![0u8; 4096];
    let n = s.read(&mut reply).unwrap();
    reply.truncate(n);
    reply
}

/// A NUL byte or invalid UTF-8 inside a string argument (valid on the wire as bytes, invalid
/// as a D-Bus string) is answered with a named error saying what to fix, not zbus's
/// generic `org.freedesktop.zbus.Error`.
#[test]
fn a_nul_or_invalid_utf8_argument_gets_a_named_error() {
    let fake = Fake::start();
    for (arg, reason) in [
        (&b"we\0b"[..], "interior null bytes"),
        (&b"caf\xe9"[..], "utf-8"),
    ] {
        let reply = raw_call(&fake.socket, "GetUnit", arg);
        let text = String::from_utf8_lossy(&reply).to_lowercase();
        assert!(
            text.contains("org.flotilla.error.invalidargument"),
            "{text:?}"
        );
        assert!(
            text.contains("the unit name is not a valid d-bus string"),
            "{text:?}"
        );
        assert!(text.contains(reason), "{text:?}");
    }
    // A good name over the same raw path still works (the client is sound).
    let reply = raw_call(&fake.socket, "GetUnit", b"web");
    assert!(String::from_utf8_lossy(&reply).contains("Web server"));
}
