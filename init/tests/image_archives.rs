//! `docker save` archives through `unitctl image import` and `unitctl run`, and garbage
//! collection sparing the layers of a running container. The archive is built here by hand
//! (there is no docker daemon): busybox's layer from the test image store, one layer of our
//! own, a config with their diff_ids, manifest.json, all tarred by GNU tar.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn unitctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tar_dir(dir: &Path, out: &Path) {
    let status = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of {}", dir.display());
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A legacy `docker save` archive of busybox plus a layer with `/srv/hello` (`hello`), tagged
/// `docker.io/library/dbox:1`; `tamper` changes that layer after its diff_id was taken.
fn docker_archive(work: &Path, hello: &str, tamper: bool) -> PathBuf {
    let busybox =
        flotilla_container::image::ImageStore::open(&common::test_image_store(&["busybox"]))
            .unwrap()
            .resolve("busybox")
            .unwrap();
    let arch = work.join("archive");
    fs::create_dir_all(&arch).unwrap();
    let base = arch.join("base");
    fs::create_dir_all(&base).unwrap();
    tar_dir(&busybox.layers[0], &base.join("layer.tar"));
    let own = work.join("own");
    fs::create_dir_all(own.join("srv")).unwrap();
    fs::write(own.join("srv/hello"), hello).unwrap();
    let top = arch.join("top");
    fs::create_dir_all(&top).unwrap();
    tar_dir(&own, &top.join("layer.tar"));
    let diff_ids = [
        format!("sha256:{}", sha256(&base.join("layer.tar"))),
        format!("sha256:{}", sha256(&top.join("layer.tar"))),
    ];
    if tamper {
        fs::write(own.join("srv/hello"), "tampered").unwrap();
        tar_dir(&own, &top.join("layer.tar"));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_file = arch.join("config.json");
    fs::write(&config_file, &config).unwrap();
    let config_name = format!("{}.json", sha256(&config_file));
    fs::rename(&config_file, arch.join(&config_name)).unwrap();
    fs::write(
        arch.join("manifest.json"),
        serde_json::to_vec(&serde_json::json!([{
            "Config": config_name,
            "RepoTags": ["docker.io/library/dbox:1"],
            "Layers": ["base/layer.tar", "top/layer.tar"],
        }]))
        .unwrap(),
    )
    .unwrap();
    let out = work.join("dbox.tar");
    tar_dir(&arch, &out);
    out
}

#[test]
fn docker_save_archive_imports_and_runs_and_a_tampered_one_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let s = store.to_str().unwrap();

    let bad = docker_archive(&t.path().join("bad"), "from docker save", true);
    let out = unitctl(&["image", "import", bad.to_str().unwrap(), "--store", s]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("diff_id of layer 2/2 (top/layer.tar)")
            && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(
        ok(&unitctl(&["--json", "image", "list", "--store", s])).trim(),
        "[]"
    );
    assert_eq!(fs::read_dir(store.join("layers")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(store.join("blobs/sha256")).unwrap().count(), 0);

    let good = docker_archive(&t.path().join("good"), "from docker save", false);
    let out = ok(&unitctl(&[
        "image",
        "import",
        good.to_str().unwrap(),
        "--store",
        s,
    ]));
    assert!(out.contains("imported dbox:1 sha256:"), "{out}");
    let out = ok(&unitctl(&[
        "run",
        "--store",
        s,
        "--image",
        "dbox:1",
        "--",
        "cat",
        "/srv/hello",
    ]));
    assert_eq!(out, "from docker save");
}

#[test]
fn gc_spares_the_layers_of_a_running_container_and_collects_them_after() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let s = store.to_str().unwrap();
    let archive = docker_archive(t.path(), "still here", false);
    ok(&unitctl(&[
        "image",
        "import",
        archive.to_str().unwrap(),
        "--store",
        s,
    ]));
    let layers = || fs::read_dir(store.join("layers")).unwrap().count();
    assert_eq!(layers(), 2);

    // A container on the image, waiting for a line on stdin before it reads its files.
    let mut run = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args([
            "run",
            "--store",
            s,
            "--image",
            "dbox:1",
            "--",
            "sh",
            "-c",
            "echo ready; read x; cat /srv/hello; ls /bin/busybox",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "the container did not start");

    // No tag refers to the image any more; collect twice.
    ok(&unitctl(&["image", "rm", "dbox:1", "--store", s]));
    ok(&unitctl(&["image", "prune", "--store", s]));
    assert_eq!(layers(), 2, "the running container's layers were collected");

    let mut stdin = run.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = run.wait().unwrap();
    assert_eq!(rest, "still here/bin/busybox\n");
    assert!(status.success());

    // Stopped: its lease is gone (or stale), the layers go.
    ok(&unitctl(&["image", "prune", "--store", s]));
    assert_eq!(layers(), 0);
}

#[test]
fn gc_spares_the_layers_of_a_running_unit_and_collects_them_after_it_stops() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let s = store.to_str().unwrap();
    let archive = docker_archive(t.path(), "unit still reads", false);
    ok(&unitctl(&[
        "image",
        "import",
        archive.to_str().unwrap(),
        "--store",
        s,
    ]));
    let layers = || fs::read_dir(store.join("layers")).unwrap().count();
    let m = common::Machine::start_with(
        &[(
            "web",
            "[container]\nimage = \"dbox:1\"\ncommand = [\"/bin/sh\", \"-c\", \"echo ready; while [ ! -e $DIR/go ]; do sleep 0.1; done; cat /srv/hello; echo; exec sleep 1000\"]\n",
        )],
        &["--images", s],
    );
    m.wait_state("web", "active");
    m.wait_until("the unit's first line", || {
        m.logs("web").contains("stdout ready")
    });
    // The launcher handed its lease to the container's pid 1.
    let leases: Vec<String> = fs::read_dir(store.join("leases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leases, [format!("web.{}.json", m.pid())]);

    ok(&unitctl(&["image", "rm", "dbox:1", "--store", s]));
    ok(&unitctl(&["image", "prune", "--store", s]));
    assert_eq!(layers(), 2, "the running unit's layers were collected");
    fs::write(m.path("go"), "").unwrap();
    m.wait_until("the unit reads its image's file", || {
        let logs = m.logs("web");
        logs.contains("stdout unit still reads") || logs.contains("No such file")
    });
    assert!(m.logs("web").contains("stdout unit still reads"));

    m.ok(&["stop", "web"]);
    m.wait_state("web", "inactive");
    ok(&unitctl(&["image", "prune", "--store", s]));
    assert_eq!(layers(), 0, "the stopped unit's layers stay");
}

#[test]
fn podman_save_archives_import_and_run() {
    // A real `podman save` (docker-archive: layers as `<hex>.tar`, `<id>/layer.tar`
    // symlinks to them; and oci-archive) of busybox plus our file, imported by
    // `podman import` into a store of the test's own (vfs: no overlay mounts).
    let t = tempfile::tempdir().unwrap();
    let busybox =
        flotilla_container::image::ImageStore::open(&common::test_image_store(&["busybox"]))
            .unwrap()
            .resolve("busybox")
            .unwrap();
    let rootfs = t.path().join("rootfs");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&busybox.layers[0])
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(status.success());
    fs::create_dir_all(rootfs.join("srv")).unwrap();
    fs::write(rootfs.join("srv/hello"), "from podman").unwrap();
    let rootfs_tar = t.path().join("rootfs.tar");
    tar_dir(&rootfs, &rootfs_tar);
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .arg("--root")
            .arg(t.path().join("podman-root"))
            .arg("--runroot")
            .arg(t.path().join("podman-run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("podman is missing: install the Debian package podman (scripts/test does)");
        ok(&out)
    };
    podman(&[
        "import",
        "--change",
        "CMD [\"/bin/sh\"]",
        rootfs_tar.to_str().unwrap(),
        "localhost/pbox:1",
    ]);
    let docker = t.path().join("docker.tar");
    let oci = t.path().join("oci.tar");
    podman(&["save", "-o", docker.to_str().unwrap(), "localhost/pbox:1"]);
    podman(&[
        "save",
        "--format",
        "oci-archive",
        "-o",
        oci.to_str().unwrap(),
        "localhost/pbox:1",
    ]);
    let store = t.path().join("store");
    let s = store.to_str().unwrap();
    let out = ok(&unitctl(&[
        "image",
        "import",
        docker.to_str().unwrap(),
        "--store",
        s,
    ]));
    assert!(out.contains("imported pbox:1 sha256:"), "{out}");
    ok(&unitctl(&[
        "image",
        "import",
        oci.to_str().unwrap(),
        "--name",
        "pbox:oci",
        "--store",
        s,
    ]));
    for image in ["pbox:1", "pbox:oci"] {
        let out = ok(&unitctl(&[
            "run",
            "--store",
            s,
            "--image",
            image,
            "--",
            "cat",
            "/srv/hello",
        ]));
        assert_eq!(out, "from podman", "{image}");
    }
}
