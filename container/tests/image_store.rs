//! Image store: import of layouts (directory and tar), overlay format on disk, list,
//! resolve, remove + garbage collection, progress events, concurrent imports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod image_util;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use flotilla_container::image::{ImageError, ImageStore, ImportEvent, RuntimeConfig};
use image_util::{fixture, layout_of, tar_of, tree, Ent, Fixture};

fn config() -> RuntimeConfig {
    RuntimeConfig {
        env: vec!["PATH=/usr/bin:/bin".into(), "GREETING=hi".into()],
        entrypoint: vec![],
        cmd: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
        working_dir: Some("/work".into()),
        user: Some("1000:1000".into()),
    }
}

fn lower() -> Vec<u8> {
    tar_of(&[
        Ent::Dir(b"etc"),
        Ent::File(b"etc/a", b"A"),
        Ent::File(b"etc/b", b"B"),
        Ent::Dir(b"opq"),
        Ent::File(b"opq/old", b"old"),
        Ent::Dir(b"usr/bin"),
        Ent::FileMode(b"usr/bin/tool", b"#!/bin/sh\n", 0o4755, 1000, 100),
        Ent::Symlink(b"bin", b"usr/bin"),
        Ent::Hardlink(b"usr/bin/tool2", b"usr/bin/tool"),
    ])
}

fn upper() -> Vec<u8> {
    tar_of(&[
        Ent::Dir(b"etc"),
        Ent::File(b"etc/.wh.b", b""),
        Ent::Dir(b"opq"),
        Ent::File(b"opq/.wh..wh..opq", b""),
        Ent::File(b"opq/new", b"new"),
    ])
}

impl Fixture {
    fn layout(&self, dir: &str, tars: &[Vec<u8>], name: &str) -> (std::path::PathBuf, String) {
        let out = self.t.path().join(dir);
        let digest = layout_of(
            &self.t.path().join(format!("{dir}-work")),
            &out,
            tars,
            &config(),
            name,
        );
        (out, digest)
    }
}

#[test]
fn import_two_layers_overlay_format() {
    let f = fixture();
    let (layout, digest) = f.layout("l", &[lower(), upper()], "demo:1.0");
    let info = f
        .store
        .import_oci_layout(&layout, None, &mut |_| {})
        .unwrap();
    assert_eq!((info.name.as_str(), info.tag.as_str()), ("demo", "1.0"));
    assert_eq!(info.digest, digest);
    assert_eq!(info.layers, 2);

    let img = f.store.resolve("demo:1.0").unwrap();
    assert_eq!(img.config, config());
    assert_eq!(img.layers.len(), 2);
    let (lo, up) = (&img.layers[0], &img.layers[1]);
    // Lowest first: the lower layer has etc/a.
    assert_eq!(std::fs::read(lo.join("etc/a")).unwrap(), b"A");
    let tool = std::fs::metadata(lo.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!((tool.uid(), tool.gid()), (1000, 100));
    assert_eq!(tool.mtime(), 1_700_000_000);
    assert_eq!(
        std::fs::metadata(lo.join("usr/bin/tool2")).unwrap().ino(),
        tool.ino()
    );
    assert_eq!(
        std::fs::read_link(lo.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    // Whiteout: character device 0:0 named after the hidden file.
    let wh = std::fs::symlink_metadata(up.join("etc/b")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!up.join("etc/.wh.b").exists());
    // Opaque directory: xattr, no marker file.
    let mut buf = [0u8; 8];
    let n = rustix::fs::lgetxattr(up.join("opq"), "trusted.overlay.opaque", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"y");
    assert!(!up.join("opq/.wh..wh..opq").exists());
    assert_eq!(std::fs::read(up.join("opq/new")).unwrap(), b"new");
}

#[test]
fn list_resolve_by_name_tag_digest() {
    let f = fixture();
    let (layout, digest) = f.layout("l", &[lower()], "web");
    f.store
        .import_oci_layout(&layout, None, &mut |_| {})
        .unwrap();
    f.store
        .import_oci_layout(&layout, Some("other:v2"), &mut |_| {})
        .unwrap();
    let list = f.store.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        (list[0].name.as_str(), list[0].tag.as_str()),
        ("other", "v2")
    );
    assert_eq!(
        (list[1].name.as_str(), list[1].tag.as_str()),
        ("web", "latest")
    );
    assert!(list[1].size > 0);
    assert_eq!(list[1].digest, digest);

    assert_eq!(f.store.resolve("web").unwrap().info.digest, digest);
    assert_eq!(f.store.resolve("web:latest").unwrap().info.digest, digest);
    assert_eq!(f.store.resolve(&digest[..19]).unwrap().info.digest, digest);
    assert!(matches!(
        f.store.resolve("web:nope"),
        Err(ImageError::NotFound(_))
    ));
    assert!(matches!(
        f.store.resolve("sha256:zz"),
        Err(ImageError::BadReference { .. })
    ));
    let err = f.store.resolve("nothing").unwrap_err();
    assert!(err.to_string().contains("unitctl image list"), "{err}");
}

#[test]
fn ambiguous_digest_prefix() {
    let f = fixture();
    let (a, _) = f.layout("a", &[lower()], "a");
    let (b, _) = f.layout("b", &[upper()], "b");
    f.store.import_oci_layout(&a, None, &mut |_| {}).unwrap();
    f.store.import_oci_layout(&b, None, &mut |_| {}).unwrap();
    assert!(matches!(
        f.store.resolve("sha256:"),
        Err(ImageError::BadReference { .. })
    ));
    // Every digest starts with one of 16 hex digits; "sha256:" + each finds at most one
    // unless both start alike, then it is ambiguous.
    let da = f.store.resolve("a").unwrap().info.digest;
    let db = f.store.resolve("b").unwrap().info.digest;
    let common = da
        .chars()
        .zip(db.chars())
        .take_while(|(x, y)| x == y)
        .count();
    let r = f.store.resolve(&da[..common.max(8)]);
    if common >= 8 {
        assert!(matches!(r, Err(ImageError::Ambiguous { .. })));
    } else {
        assert!(r.is_ok());
    }
}

#[test]
fn remove_and_gc_keep_shared_layers() {
    let f = fixture();
    let shared = lower();
    let (a, _) = f.layout("a", &[shared.clone(), upper()], "a");
    let (b, _) = f.layout("b", &[shared, tar_of(&[Ent::File(b"only-b", b"b")])], "b");
    f.store.import_oci_layout(&a, None, &mut |_| {}).unwrap();
    f.store.import_oci_layout(&b, None, &mut |_| {}).unwrap();
    let la = f.store.resolve("a").unwrap().layers;
    let lb = f.store.resolve("b").unwrap().layers;
    assert_eq!(la[0], lb[0], "identical layers are stored once");
    assert_eq!(
        tree(&f.store.root().join("layers"))
            .iter()
            .filter(|p| !p.contains('/'))
            .count(),
        3
    );

    f.store.remove("a").unwrap();
    assert!(la[0].is_dir(), "shared layer kept");
    assert!(!la[1].exists(), "layer only a used is gone");
    assert!(lb[1].is_dir());
    assert!(matches!(f.store.resolve("a"), Err(ImageError::NotFound(_))));
    assert!(f.store.resolve("b").is_ok());
    // Blobs: b's manifest, config, 2 layers.
    assert_eq!(tree(&f.store.root().join("blobs/sha256")).len(), 4);

    f.store.remove("b:latest").unwrap();
    assert!(tree(&f.store.root().join("layers")).is_empty());
    assert!(tree(&f.store.root().join("blobs/sha256")).is_empty());
    assert!(f.store.list().unwrap().is_empty());
    assert!(matches!(f.store.remove("b"), Err(ImageError::NotFound(_))));
}

#[test]
fn remove_by_digest_drops_all_tags() {
    let f = fixture();
    let (a, digest) = f.layout("a", &[lower()], "a:1");
    f.store.import_oci_layout(&a, None, &mut |_| {}).unwrap();
    f.store
        .import_oci_layout(&a, Some("a:2"), &mut |_| {})
        .unwrap();
    f.store.remove(&digest[..16]).unwrap();
    assert!(f.store.list().unwrap().is_empty());
}

#[test]
fn import_tar_of_layout() {
    let f = fixture();
    let (layout, digest) = f.layout("l", &[lower(), upper()], "tarred:1");
    for gz in [false, true] {
        let tar_path =
            f.t.path()
                .join(if gz { "layout.tar.gz" } else { "layout.tar" });
        let file = std::fs::File::create(&tar_path).unwrap();
        if gz {
            let enc = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            let mut b = tar::Builder::new(enc);
            b.append_dir_all(".", &layout).unwrap();
            b.into_inner().unwrap().finish().unwrap();
        } else {
            let mut b = tar::Builder::new(file);
            b.append_dir_all(".", &layout).unwrap();
            b.finish().unwrap();
        }
        let info = f
            .store
            .import_oci_layout(&tar_path, None, &mut |_| {})
            .unwrap();
        assert_eq!(info.digest, digest);
    }
    assert_eq!(f.store.resolve("tarred:1").unwrap().layers.len(), 2);
    assert!(
        tree(&f.store.root().join("tmp")).is_empty(),
        "staging cleaned"
    );
}

#[test]
fn progress_events() {
    let f = fixture();
    let (layout, _) = f.layout("l", &[lower(), upper()], "p");
    let mut events = Vec::new();
    f.store
        .import_oci_layout(&layout, None, &mut |e| events.push(e))
        .unwrap();
    assert_eq!(events.len(), 3);
    for (i, e) in events.iter().take(2).enumerate() {
        match e {
            ImportEvent::Layer {
                index,
                count,
                digest,
                bytes,
            } => {
                assert_eq!((*index, *count), (i, 2));
                assert!(digest.starts_with("sha256:"));
                assert!(*bytes > 0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(events[2], ImportEvent::Done);
}

#[test]
fn name_required_without_annotation() {
    let f = fixture();
    let (layout, _) = f.layout("l", &[lower()], "x");
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"][0]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let err = f
        .store
        .import_oci_layout(&layout, None, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, ImageError::NeedName(_)));
    assert!(err.to_string().contains("--name"), "{err}");
    f.store
        .import_oci_layout(&layout, Some("named"), &mut |_| {})
        .unwrap();
    assert!(f.store.resolve("named:latest").is_ok());
}

#[test]
fn not_a_layout() {
    let f = fixture();
    let err = f
        .store
        .import_oci_layout(f.t.path(), Some("x"), &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("index.json"), "{err}");
}

#[test]
fn reproducible_layout() {
    let f = fixture();
    let (_, d1) = f.layout("one", &[lower(), upper()], "r");
    let (_, d2) = f.layout("two", &[lower(), upper()], "r");
    assert_eq!(d1, d2);
}

#[test]
fn concurrent_imports_keep_images_json_whole() {
    let f = fixture();
    let (a, _) = f.layout("a", &[lower()], "a");
    let (b, _) = f.layout("b", &[lower(), upper()], "b");
    std::thread::scope(|s| {
        for i in 0..8 {
            let (store, src) = (
                f.store.clone(),
                if i % 2 == 0 { a.clone() } else { b.clone() },
            );
            s.spawn(move || {
                // Separate store handles: the flock is per open file, like separate processes.
                let store = ImageStore::open(store.root()).unwrap();
                store
                    .import_oci_layout(&src, Some(&format!("img{i}")), &mut |_| {})
                    .unwrap();
            });
        }
    });
    let list = f.store.list().unwrap();
    assert_eq!(list.len(), 8);
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.store.root().join("images.json")).unwrap())
            .unwrap();
    assert_eq!(raw["images"].as_object().unwrap().len(), 8);
    for i in 0..8 {
        assert!(f.store.resolve(&format!("img{i}")).is_ok());
    }
}

/// `setpriv` to nobody (65534, no groups) running `args`: did it succeed, and its stderr.
fn as_nobody(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .args(args)
        .output()
        .expect("setpriv (util-linux) is needed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The store root is private to root (0700): created so, and tightened when a store left
/// 0755 is opened again. A local user (nobody) can then neither run nor even stat a
/// setuid-root file of a layer, though the file keeps its mode for use in containers.
#[test]
fn store_is_private_to_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: the host integration tests run as root (sudo ./scripts/test)"
    );
    // A parent every user may traverse, so only the store's own mode is tested.
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(
        t.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let root = t.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&root), 0o700, "a fresh store");

    let layer = tar_of(&[
        Ent::Dir(b"usr/bin"),
        Ent::FileMode(b"usr/bin/rootshell", b"#!/bin/sh\nid\n", 0o4755, 0, 0),
    ]);
    let out = t.path().join("layout");
    layout_of(&t.path().join("work"), &out, &[layer], &config(), "suid:1");
    store.import_oci_layout(&out, None, &mut |_| {}).unwrap();
    let img = store.resolve("suid:1").unwrap();
    let suid = img.layers[0].join("usr/bin/rootshell");
    assert_eq!(mode(&suid), 0o4755, "set-id bits are kept for containers");
    let suid = suid.to_str().unwrap();

    let (ok, err) = as_nobody(&["stat", suid]);
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&[suid]);
    assert!(!ok && err.contains("Permission denied"), "{err}");

    // An existing store opened loose (an older Flotilla made it 0755) is tightened.
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ok, err) = as_nobody(&["stat", suid]);
    assert!(
        ok,
        "the test needs a reachable file when the store is 0755: {err}"
    );
    ImageStore::open(&root).unwrap();
    assert_eq!(
        mode(&root),
        0o700,
        "a loosened store is tightened when opened"
    );
    let (ok, err) = as_nobody(&["stat", suid]);
    assert!(!ok && err.contains("Permission denied"), "{err}");
}

/// Character and block devices in a layer (a `/dev/mem`, a 0666 disk) are extracted as empty
/// regular files: no node in the store leads to host hardware, whoever reaches it. The
/// overlay whiteout format (character device 0:0) is kept.
#[test]
fn device_nodes_become_empty_files() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: the host integration tests run as root (sudo ./scripts/test)"
    );
    let f = fixture();
    let layer = tar_of(&[
        Ent::Dir(b"dev"),
        Ent::Device(b"dev/mem", true, 1, 1, 0o666),
        Ent::Device(b"dev/sda", false, 8, 0, 0o4666),
        Ent::Device(b"gone", true, 0, 0, 0o600),
    ]);
    let (layout, _) = f.layout("d", &[layer], "dev:1");
    f.store
        .import_oci_layout(&layout, None, &mut |_| {})
        .unwrap();
    let img = f.store.resolve("dev:1").unwrap();
    for node in ["dev/mem", "dev/sda"] {
        let m = std::fs::symlink_metadata(img.layers[0].join(node)).unwrap();
        assert!(m.file_type().is_file(), "{node}: {:?}", m.file_type());
        assert_eq!(m.len(), 0, "{node}");
        assert_eq!(
            m.mode() & 0o7777,
            0o644,
            "{node}: no write for others, no set-id"
        );
    }
    let wh = std::fs::symlink_metadata(img.layers[0].join("gone")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
}
