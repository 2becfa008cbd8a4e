//! Bad input through the real `flotilla-init`, `unitctl` and `dbus-send`: control
//! characters in unit files and over the API, a unit that prints a NUL, a unit file that is
//! not UTF-8. None of them may break the API for the other units.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::process::{Command, Output};

use common::Machine;

const GOOD: &str = "[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n";
/// Valid TOML: the NUL is written as an escape.
const NUL_DESCRIPTION: &str =
    "[unit]\ndescription = \"web\\u0000x\"\n[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n";

fn dbus_send(m: &Machine, args: &[&str]) -> Output {
    Command::new("dbus-send")
        .arg(format!("--peer=unix:path={}", m.api.display()))
        .arg("--print-reply")
        .args(args)
        .output()
        .expect("dbus-send (package dbus-bin) must be installed")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A unit file with a NUL in its description sits in the unit directory; another unit is
/// loaded with one over `unitctl load` and over `dbus-send LoadUnit`. Each is refused with
/// its position and a named error, and listing the other units keeps working.
#[test]
fn a_nul_in_a_unit_is_refused_everywhere_and_listing_keeps_working() {
    let m = Machine::start(&[("web", GOOD), ("evil", NUL_DESCRIPTION)]);
    m.wait_until("web to be loaded", || {
        m.unitctl(&["status", "web"]).status.success()
    });

    let list = m.unitctl(&["list"]);
    assert!(
        list.status.success(),
        "unitctl list: {}",
        text(&list.stderr)
    );
    assert!(text(&list.stdout).contains("web"), "{}", text(&list.stdout));
    let out = dbus_send(
        &m,
        &["/org/flotilla/Manager1", "org.flotilla.Manager1.ListUnits"],
    );
    assert!(out.status.success(), "ListUnits: {}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("web\u{0}x"));
    let reload = m.unitctl(&["reload"]);
    let err = text(&reload.stderr);
    assert!(
        err.contains("evil.toml:2:19: `description` contains the control character U+0000 (NUL)"),
        "{err}"
    );

    let file = m.path("nul.toml");
    fs::write(&file, NUL_DESCRIPTION).unwrap();
    let load = m.unitctl(&["load", file.to_str().unwrap()]);
    assert!(!load.status.success());
    let err = text(&load.stderr);
    assert!(
        err.contains(":2:19: `description` contains the control character U+0000 (NUL)"),
        "{err}"
    );

    let out = dbus_send(
        &m,
        &[
            "/org/flotilla/Manager1",
            "org.flotilla.Manager1.LoadUnit",
            "string:evil2",
            &format!("string:{NUL_DESCRIPTION}"),
        ],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("org.flotilla.Error.InvalidUnit"), "{err}");
    assert!(err.contains("control character U+0000 (NUL)"), "{err}");
    assert!(!err.contains("org.freedesktop.zbus.Error"), "{err}");
    assert!(!m.unitctl(&["status", "evil2"]).status.success());
}

/// A unit prints a NUL byte and an escape sequence: `unitctl logs` and `LogsAfter` still
/// answer (D-Bus cannot carry the NUL; it arrives as U+FFFD).
#[test]
fn a_unit_printing_a_nul_does_not_break_its_logs() {
    let m = Machine::start(&[(
        "noisy",
        "[container]\ncommand = [\"/bin/sh\", \"-c\", \"printf 'before\\\\000after\\\\n'; echo done; exec sleep 1000\"]\n",
    )]);
    m.wait_until("noisy to print", || {
        m.unitctl(&["logs", "noisy"]).status.success()
            && text(&m.unitctl(&["logs", "noisy"]).stdout).contains("done")
    });
    let logs = m.unitctl(&["logs", "noisy"]);
    assert!(logs.status.success(), "{}", text(&logs.stderr));
    assert!(
        text(&logs.stdout).contains("before\u{FFFD}after"),
        "{}",
        text(&logs.stdout)
    );
    let list = m.unitctl(&["list"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
}

/// `unitctl load` of a file that is not UTF-8 names the line and column of the bad byte.
#[test]
fn a_unit_file_that_is_not_utf8_is_refused_with_its_position() {
    let m = Machine::start(&[("web", GOOD)]);
    let file = m.path("latin1.toml");
    fs::write(
        &file,
        b"[unit]\ndescription = \"caf\xe9\"\n[container]\ncommand = [\"/bin/true\"]\n",
    )
    .unwrap();
    let load = m.unitctl(&["load", file.to_str().unwrap()]);
    assert!(!load.status.success());
    let err = text(&load.stderr);
    assert!(
        err.contains(&format!(
            "{}:2:19: the file is not valid UTF-8: byte 0xe9",
            file.display()
        )),
        "{err}"
    );
}

/// A misspelt capability is refused by `unitctl load` (and over D-Bus) with its
/// file:line:column and the closest name, before anything starts: the unit is not loaded and
/// the running unit keeps its process. (Before names were checked at parse, the unit loaded
/// and failed only when started.)
#[test]
fn a_misspelt_capability_is_refused_at_load_and_the_running_units_are_undisturbed() {
    const MISSPELT: &str = "[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n\
                            capabilities = [\"CAP_KILL\", \"CAP_NET_ADMN\"]\n";
    let m = Machine::start(&[("web", GOOD)]);
    let before = m.wait_state("web", "active");
    let pid = before["pid"].as_i64().unwrap();

    let file = m.path("misspelt.toml");
    fs::write(&file, MISSPELT).unwrap();
    let load = m.unitctl(&["load", file.to_str().unwrap()]);
    let err = text(&load.stderr);
    assert!(!load.status.success(), "loaded: {err}");
    // The manager names the file as it would store it (state/units/misspelt.toml).
    assert!(
        err.contains("misspelt.toml:3:29: unknown capability \"CAP_NET_ADMN\""),
        "{err}"
    );
    assert!(err.contains("did you mean \"CAP_NET_ADMIN\"?"), "{err}");

    let out = dbus_send(
        &m,
        &[
            "/org/flotilla/Manager1",
            "org.flotilla.Manager1.LoadUnit",
            "string:misspelt",
            &format!("string:{MISSPELT}"),
        ],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "loaded over D-Bus: {}",
        text(&out.stdout)
    );
    assert!(
        err.contains("misspelt.toml:3:29: unknown capability \"CAP_NET_ADMN\""),
        "{err}"
    );

    // Not loaded, so there is nothing to start; the running unit is untouched.
    let list = m.ok(&["list"]);
    assert!(!list.contains("misspelt"), "{list}");
    assert!(!m.unitctl(&["start", "misspelt"]).status.success());
    let after = m.status("web");
    assert_eq!(after["state"], "active", "{after}");
    assert_eq!(after["pid"].as_i64(), Some(pid), "{after}");
    assert!(common::alive(i32::try_from(pid).unwrap()));
}

/// `unitctl ARGS` with a patience bound: a command still running after
/// [`common::PATIENCE`] is killed and the test fails (an import blocked on a FIFO would
/// otherwise hang the test forever).
fn unitctl_bounded(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > common::PATIENCE {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "unitctl {args:?} still running after {:?}: blocked (stderr: {})",
                common::PATIENCE,
                text(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A one-layer OCI layout at `dir/layout`, written as image-build does; returns its path.
fn small_layout(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/hello"), "hello\n").unwrap();
    common::oci_layout_of(
        &root,
        dir,
        &flotilla_container::image::RuntimeConfig::default(),
        "small:1",
    )
}

/// The blob files of a layout: (manifest blob, layer blob), found from its JSON.
fn blobs_of(layout: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = blob(index["manifests"][0]["digest"].as_str().unwrap());
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    let layer = blob(m["layers"][0]["digest"].as_str().unwrap());
    (manifest, layer)
}

fn mkfifo(path: &std::path::Path) {
    fs::remove_file(path).unwrap();
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
}

fn import(layout: &std::path::Path, store: &std::path::Path) -> Output {
    unitctl_bounded(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ])
}

/// A FIFO where the manifest blob, the index or a layer blob should be, and a layer blob
/// that is a symlink to /dev/zero: each import is refused at once with a message naming
/// the file and what it is (before, `open(2)` on the FIFO blocked forever with the store
/// lock held, and /dev/zero was read without end). The store stays usable.
#[test]
fn special_files_in_a_layout_are_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");

    let layout = small_layout(&dir.path().join("a"));
    let (manifest, _) = blobs_of(&layout);
    mkfifo(&manifest);
    let out = import(&layout, &store);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "refusing the manifest blob {}: it is a FIFO (named pipe), not a regular file",
            manifest.display()
        )),
        "{err}"
    );

    let layout = small_layout(&dir.path().join("b"));
    mkfifo(&layout.join("index.json"));
    let err = text(&import(&layout, &store).stderr);
    assert!(
        err.contains("refusing the index") && err.contains("a FIFO (named pipe)"),
        "{err}"
    );

    let layout = small_layout(&dir.path().join("c"));
    let (_, layer) = blobs_of(&layout);
    mkfifo(&layer);
    let err = text(&import(&layout, &store).stderr);
    assert!(
        err.contains("refusing the layer 1/1 blob") && err.contains("a FIFO (named pipe)"),
        "{err}"
    );

    let layout = small_layout(&dir.path().join("d"));
    let (_, layer) = blobs_of(&layout);
    fs::remove_file(&layer).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &layer).unwrap();
    let err = text(&import(&layout, &store).stderr);
    assert!(
        err.contains("refusing the layer 1/1 blob") && err.contains("a symbolic link"),
        "{err}"
    );

    // The lock was released: a good layout imports into the same store.
    let good = small_layout(&dir.path().join("e"));
    let out = import(&good, &store);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Malformed OCI JSON names the file, serde's line and column and what was expected
/// (before: `serde failed`).
#[test]
fn malformed_oci_json_says_where_and_what() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let layout = small_layout(dir.path());
    let index = layout.join("index.json");
    fs::write(
        &index,
        "{\n  \"schemaVersion\": 2,\n  \"manifests\": [ {\"digest\": 5} ]\n}\n",
    )
    .unwrap();
    let err = text(&import(&layout, &store).stderr);
    assert!(
        err.contains(&format!(
            "invalid index {}: line 3, column",
            index.display()
        )),
        "{err}"
    );
    assert!(err.contains("invalid type: integer `5`, expected"), "{err}");
    assert!(!err.contains("serde failed"), "{err}");

    fs::write(&index, "{\"schemaVersion\": 2, \"manifests\": [").unwrap();
    let err = text(&import(&layout, &store).stderr);
    assert!(err.contains("line 1, column"), "{err}");
    assert!(err.contains("EOF while parsing a list"), "{err}");
}
