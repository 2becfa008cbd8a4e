//! image-build end to end: a directory spec (fast, through the CLI), the busybox spec
//! (downloads one small .deb from the Debian registry), and the layer cache.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_container::image::ImageStore;
use image_build::{build, BuildOptions};

fn opts(spec: &Path, t: &Path) -> BuildOptions {
    BuildOptions {
        spec: spec.to_path_buf(),
        store: t.join("store"),
        oci_out: Some(t.join("oci")),
        no_import: false,
        cache: t.join("cache"),
        progress: false,
    }
}

#[test]
fn directory_spec_through_cli() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("spec");
    std::fs::create_dir_all(src.join("root/bin")).unwrap();
    std::fs::create_dir_all(src.join("files")).unwrap();
    std::fs::write(src.join("root/bin/hello"), "#!/bin/sh\necho hello\n").unwrap();
    std::fs::set_permissions(
        src.join("root/bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(src.join("files/motd"), "welcome\n").unwrap();
    std::fs::write(
        src.join("dir.toml"),
        r#"
name = "dirtest"
tag = "v1"

[source]
kind = "directory"
path = "root"

[config]
cmd = ["/bin/hello"]
env = ["A=b"]
working_dir = "/tmp"

[[files]]
src = "files/motd"
dest = "/etc/motd"
mode = "0600"

[[symlinks]]
path = "/usr/bin/hi"
target = "/bin/hello"
"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_image-build"))
        .args(["container"])
        .arg(src.join("dir.toml"))
        .arg("--store")
        .arg(t.path().join("store"))
        .arg("--cache")
        .arg(t.path().join("cache"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[1/5] copy directory root"), "{stdout}");
    assert!(stdout.contains("[5/5] import dirtest:v1"), "{stdout}");

    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].name.as_str(), list[0].tag.as_str()),
        ("dirtest", "v1")
    );
    let img = store.resolve("dirtest:v1").unwrap();
    assert_eq!(img.config.cmd, vec!["/bin/hello"]);
    assert_eq!(img.config.env, vec!["A=b"]);
    assert_eq!(img.config.working_dir.as_deref(), Some("/tmp"));
    let l = &img.layers[0];
    assert_eq!(
        std::fs::metadata(l.join("bin/hello")).unwrap().mode() & 0o777,
        0o755
    );
    assert_eq!(std::fs::read(l.join("etc/motd")).unwrap(), b"welcome\n");
    assert_eq!(
        std::fs::metadata(l.join("etc/motd")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_link(l.join("usr/bin/hi")).unwrap(),
        PathBuf::from("/bin/hello")
    );
}

#[test]
fn bad_spec_is_reported_with_location() {
    let t = tempfile::tempdir().unwrap();
    let spec = t.path().join("bad.toml");
    std::fs::write(
        &spec,
        "name = \"x\"\n[source]\nkind = \"packages\"\npackages = [\"busybox-static\"]\nfoo = 1\n",
    )
    .unwrap();
    let err = build(&opts(&spec, t.path())).unwrap_err().to_string();
    assert!(err.contains("bad.toml") && err.contains("foo"), "{err}");
}

/// The busybox spec, cold then cached: one small .deb from the Debian registry.
#[test]
fn busybox_spec_end_to_end_and_cached_rebuild() {
    let t = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/busybox.toml");
    let first = build(&opts(&spec, t.path())).unwrap();
    assert!(!first.cached);
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "busybox");
    let img = store.resolve("busybox").unwrap();
    let l = &img.layers[0];
    assert!(l.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(l.join("bin/sh")).unwrap(),
        PathBuf::from("/bin/busybox")
    );
    // What a container would run (chroot stands in for the runtime here).
    let out = Command::new("chroot")
        .arg(l)
        .args(["/bin/sh", "-c", "echo hi"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "{out:?}");

    // Rebuild: the layer comes from the cache and the image is bit-for-bit the same.
    let mut o = opts(&spec, t.path());
    o.oci_out = Some(t.path().join("oci2"));
    let second = build(&o).unwrap();
    assert!(second.cached);
    assert_eq!(second.digest, first.digest);
    assert_eq!(store.list().unwrap().len(), 1);

    // Without --oci-out the layout itself is cached: a third build writes it once, a fourth
    // reuses it (no re-compression) and imports the same image into a fresh store.
    let mut o = opts(&spec, t.path());
    o.oci_out = None;
    let third = build(&o).unwrap();
    assert_eq!(third.digest, first.digest);
    let layouts = t.path().join("cache/layouts");
    let kept: Vec<_> = std::fs::read_dir(&layouts).unwrap().flatten().collect();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].path().join("index.json").is_file());
    o.store = t.path().join("store2");
    let fourth = build(&o).unwrap();
    assert_eq!(fourth.digest, first.digest);
    let store2 = ImageStore::open(&t.path().join("store2")).unwrap();
    assert!(store2.resolve("busybox").unwrap().layers[0]
        .join("bin/busybox")
        .is_file());
}
