//! Units with images and the toolbox, with real images built by `image-build` (busybox from
//! Debian's busybox-static; gcc by debootstrap, cached under /var/cache/flotilla).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::Machine;

/// One store shared by the tests of this file, with busybox and gcc built once.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| common::test_image_store(&["busybox", "gcc"]))
}

fn unitctl(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn store_arg() -> String {
    store().to_str().unwrap().to_string()
}

#[test]
fn toolbox_builds_hello_with_gcc_owned_by_the_caller() {
    let src = tempfile::tempdir().unwrap();
    fs::write(
        src.path().join("hello.c"),
        "#include <stdio.h>\nint main(void) { puts(\"hello from flotilla\"); return 0; }\n",
    )
    .unwrap();
    fs::write(
        src.path().join("Makefile"),
        "hello: hello.c\n\tgcc -O2 -o hello hello.c\n",
    )
    .unwrap();
    // The caller, as sudo reports it: files the toolbox creates must belong to them.
    fs::set_permissions(src.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let store = store_arg();
    let bind = format!("{}:/src", src.path().display());
    let out = unitctl(
        &[
            "run",
            "--store",
            &store,
            "--image",
            "gcc",
            "--bind",
            &bind,
            "--workdir",
            "/src",
            "--",
            "make",
        ],
        src.path(),
        &[("SUDO_UID", "65534"), ("SUDO_GID", "65534")],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("gcc -O2 -o hello hello.c"), "{stdout}");
    assert!(
        out.stderr.is_empty(),
        "the toolbox prints nothing of its own"
    );
    let hello = src.path().join("hello");
    let meta = fs::metadata(&hello).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    let run = Command::new(&hello).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "hello from flotilla\n"
    );
}

/// `--store` relative to the current directory works for `run` as for `image list`
/// (it failed with "overlay path ... must be absolute").
#[test]
fn toolbox_takes_a_relative_store() {
    let store = store();
    let (parent, name) = (store.parent().unwrap(), store.file_name().unwrap());
    let name = name.to_str().unwrap();
    for args in [
        &[
            "run", "--store", name, "--image", "busybox", "--", "echo", "hi",
        ][..],
        &["image", "list", "--store", name][..],
    ] {
        let out = unitctl(args, parent, &[]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = unitctl(
        &[
            "run", "--store", name, "--image", "busybox", "--", "echo", "hi",
        ],
        parent,
        &[],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
}

#[test]
fn toolbox_propagates_exit_codes_and_signals() {
    let store = store_arg();
    let dir = std::env::temp_dir();
    let code = |cmd: &str| {
        unitctl(
            &[
                "run", "--store", &store, "--image", "busybox", "--", "sh", "-c", cmd,
            ],
            &dir,
            &[],
        )
        .status
        .code()
    };
    assert_eq!(code("exit 0"), Some(0));
    assert_eq!(code("exit 7"), Some(7));
    assert_eq!(code("kill -KILL $$"), Some(128 + 9));
    let out = unitctl(
        &["run", "--store", &store, "--image", "nosuch", "--", "true"],
        &dir,
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("unitctl: ") && err.contains("nosuch"),
        "{err}"
    );
}

#[test]
fn image_unit_writes_to_its_upper_dir_and_leaves_the_image_untouched() {
    let images = store_arg();
    let m = Machine::start_with(
        &[(
            "bb",
            "[container]\nimage = \"busybox\"\ncommand = [\"/bin/sh\", \"-c\", \"echo changed > /bin/note; cat /bin/note; exec sleep 1000\"]\n",
        )],
        &["--images", &images],
    );
    m.wait_state("bb", "active");
    m.wait_until("the unit's output", || {
        m.logs("bb").contains("stdout changed")
    });
    let upper_note = fs::read_dir(m.state.join("containers/bb"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("bin/note"))
        .find(|p| p.exists());
    assert!(upper_note.is_some(), "the write must land in the upper dir");
    let resolved = flotilla_container::image::ImageStore::open(store())
        .unwrap()
        .resolve("busybox")
        .unwrap();
    assert!(resolved.layers.iter().all(|l| !l.join("bin/note").exists()));
    m.ok(&["stop", "bb"]);
    assert_eq!(m.status("bb")["result"], "success");
}

#[test]
fn unit_with_a_missing_image_fails_with_the_reason() {
    let images = store_arg();
    let m = Machine::start_with(
        &[(
            "ghost",
            "[container]\nimage = \"no-such-image\"\ncommand = [\"/bin/true\"]\n",
        )],
        &["--images", &images],
    );
    let s = m.wait_state("ghost", "failed");
    assert_eq!(s["result"], "spawn");
    assert!(
        s["message"].as_str().unwrap().contains("no-such-image"),
        "{s}"
    );
}

#[test]
fn image_list_import_rm() {
    // Export busybox's layer as a layout, import it under another name, list, remove.
    let scratch = tempfile::tempdir().unwrap();
    let own_store = scratch.path().join("store");
    let layout = scratch.path().join("layout");
    let resolved = flotilla_container::image::ImageStore::open(store())
        .unwrap()
        .resolve("busybox")
        .unwrap();
    let tar = scratch.path().join("layer.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&resolved.layers[0])
        .args(["-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    flotilla_container::image::write_oci_layout(&layout, &[tar], &resolved.config, "mybox:1.0")
        .unwrap();
    let s = own_store.to_str().unwrap();
    let dir = scratch.path();
    let out = unitctl(
        &["image", "import", layout.to_str().unwrap(), "--store", s],
        dir,
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported mybox:1.0 sha256:"));
    let out = unitctl(&["--json", "image", "list", "--store", s], dir, &[]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "mybox");
    assert_eq!(list[0]["tag"], "1.0");
    let out = unitctl(&["image", "rm", "mybox:1.0", "--store", s], dir, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = unitctl(&["--json", "image", "list", "--store", s], dir, &[]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

#[test]
fn read_only_image_root_and_capabilities_from_the_unit() {
    let images = store_arg();
    let m = Machine::start_with(
        &[(
            "locked",
            r#"
[container]
image = "busybox"
read_only = true
capabilities = ["CAP_KILL"]
command = ["/bin/sh", "-c", "grep CapEff /proc/self/status; touch /bin/x 2>/dev/null || echo root-read-only; exec sleep 1000"]
"#,
        )],
        &["--images", &images],
    );
    m.wait_until("the probe's output", || {
        m.logs("locked").contains("root-read-only")
    });
    // CAP_KILL is bit 5.
    assert!(
        m.logs("locked").contains("CapEff:\t0000000000000020"),
        "{}",
        m.logs("locked")
    );
}

#[test]
fn rlimits_and_user_namespace_from_the_unit() {
    let images = store_arg();
    let m = Machine::start_with(
        &[(
            "mapped",
            r#"
[container]
image = "busybox"
rlimits = { nofile = [100, 200] }
user_namespace = { host_id = 200000, size = 65536 }
command = ["/bin/sh", "-c", "echo soft=$(ulimit -n) hard=$(ulimit -Hn); echo map=$(cat /proc/self/uid_map); exec sleep 1000"]
"#,
        )],
        &["--images", &images],
    );
    m.wait_until("the probe's output", || m.logs("mapped").contains("map="));
    let logs = m.logs("mapped");
    assert!(logs.contains("soft=100 hard=200"), "{logs}");
    let map: Vec<String> = logs
        .split("map=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take(3)
        .map(str::to_string)
        .collect();
    assert_eq!(map, ["0", "200000", "65536"], "{logs}");
    // Seen from the host, the container's root is the mapped id.
    let pid = m.status("mapped")["pid"].as_i64().unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t200000")),
        "{status}"
    );
}

#[test]
fn images_resolve_across_stores_and_only_the_first_is_written() {
    // An empty writable store first, the shared store (busybox, gcc) second, as the system
    // store of a host image is.
    let scratch = tempfile::tempdir().unwrap();
    let writable = scratch.path().join("store");
    let (w, s) = (writable.to_str().unwrap(), store_arg());
    let dir = scratch.path();

    let out = unitctl(
        &["--json", "image", "list", "--store", w, "--store", &s],
        dir,
        &[],
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let busybox = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "busybox")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(busybox["store"], s.as_str());
    assert_eq!(busybox["writable"], false);
    assert!(writable.join("tmp").is_dir(), "the first store is created");

    // FLOTILLA_IMAGES: colon-separated, same order.
    let both = format!("{w}:{s}");
    let out = unitctl(&["image", "list"], dir, &[("FLOTILLA_IMAGES", &both)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap().ends_with("STORE"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("busybox ") && l.ends_with(s.as_str())),
        "{text}"
    );

    // Removal only from the writable store.
    let out = unitctl(
        &["image", "rm", "busybox"],
        dir,
        &[("FLOTILLA_IMAGES", &both)],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read-only store") && err.contains(&s), "{err}");

    // The toolbox and the manager find the image in the second store.
    let out = unitctl(
        &[
            "run", "--store", w, "--store", &s, "--image", "busybox", "--", "echo", "found",
        ],
        dir,
        &[],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "found\n");
    let m = Machine::start_with(
        &[(
            "bb",
            "[container]\nimage = \"busybox\"\ncommand = [\"/bin/sh\", \"-c\", \"echo from-second; exec sleep 1000\"]\n",
        )],
        &["--images", w, "--images", &s],
    );
    m.wait_until("the unit's output", || m.logs("bb").contains("from-second"));
}
