//! The D-Bus server checked with a stock client (`dbus-send --peer`) and its socket policy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod api_common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use api_common::{dbus_send, Fake};
use flotilla_init::api::access::UnitCgroups;
use flotilla_init::api::{self, dbus};

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
    if !setpriv_available() {
        eprintln!("NOTICE: setpriv not found; skipping the foreign-uid check");
        return;
    }
    if !rustix::process::getuid().is_root() {
        eprintln!("NOTICE: not running as root; cannot switch uid; skipping");
        return;
    }
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
