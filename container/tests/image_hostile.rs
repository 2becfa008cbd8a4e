//! Hostile layer tarballs: each must be refused with a clear error, nothing may be written
//! outside the store, and the store must be left unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod image_util;

use std::path::Path;

use flotilla_container::image::{ImageError, ImageStore, RuntimeConfig};
use image_util::{layout_of, tar_of, tree, Ent};

/// Imports a one-layer image made of `entries` into a fresh store and returns the error,
/// after checking that nothing changed anywhere under the test directory.
fn refused(entries: &[Ent]) -> ImageError {
    let t = tempfile::tempdir().unwrap();
    // Deep store: a relative escape that slipped through would still land under `t`.
    let store_dir = t.path().join("a/b/c/d/store");
    let store = ImageStore::open(&store_dir).unwrap();
    let layout = t.path().join("layout");
    layout_of(
        &t.path().join("work"),
        &layout,
        &[tar_of(entries)],
        &RuntimeConfig::default(),
        "hostile:1",
    );
    let strip = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .filter(|p| !p.ends_with("store/lock"))
            .collect()
    };
    let before = strip(tree(t.path()));
    let err = store
        .import_oci_layout(&layout, None, &mut |_| {})
        .expect_err("hostile layer was accepted");
    let after = strip(tree(t.path()));
    assert_eq!(before, after, "files changed under the test dir: {err}");
    assert!(!store_dir.join("images.json").exists());
    assert!(store.list().unwrap().is_empty());
    err
}

fn assert_unsafe(err: &ImageError, needle: &str) {
    let msg = err.to_string();
    assert!(
        matches!(err, ImageError::UnsafeEntry { .. }),
        "expected UnsafeEntry, got: {msg}"
    );
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    assert!(
        msg.contains("refused"),
        "message {msg:?} does not say refused"
    );
}

#[test]
fn absolute_path() {
    let err = refused(&[Ent::File(b"/etc/evil", b"x")]);
    assert_unsafe(&err, "absolute path");
    assert!(!Path::new("/etc/evil").exists());
}

#[test]
fn dotdot_path() {
    assert_unsafe(&refused(&[Ent::File(b"../evil", b"x")]), "'..'");
}

#[test]
fn dotdot_inside_path() {
    assert_unsafe(&refused(&[Ent::File(b"a/../../evil", b"x")]), "'..'");
}

#[test]
fn write_through_absolute_symlink() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().as_bytes().to_vec();
    let err = refused(&[
        Ent::Symlink(b"link", &target),
        Ent::File(b"link/evil", b"x"),
    ]);
    assert_unsafe(&err, "symlink");
    assert!(tree(outside.path()).is_empty());
}

#[test]
fn write_through_relative_symlink() {
    let err = refused(&[
        Ent::Symlink(b"link", b"../../.."),
        Ent::File(b"link/evil", b"x"),
    ]);
    assert_unsafe(&err, "symlink");
}

#[test]
fn hardlink_to_absolute_path() {
    let err = refused(&[Ent::Hardlink(b"passwd", b"/etc/passwd")]);
    assert_unsafe(&err, "hard link target");
}

#[test]
fn hardlink_to_parent() {
    let err = refused(&[Ent::Hardlink(b"outside", b"../outside")]);
    assert_unsafe(&err, "hard link target");
}

#[test]
fn hardlink_through_symlink() {
    let err = refused(&[
        Ent::Symlink(b"etc", b"/etc"),
        Ent::Hardlink(b"passwd", b"etc/passwd"),
    ]);
    assert_unsafe(&err, "symlink");
}

/// RUSTSEC-2021-0080: a symlink to a directory outside, then a directory entry below it,
/// made the tar crate create directories outside the destination.
#[test]
fn rustsec_2021_0080_dir_through_symlink() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().as_bytes().to_vec();
    let err = refused(&[Ent::Symlink(b"foo", &target), Ent::Dir(b"foo/bar")]);
    assert_unsafe(&err, "symlink");
    assert!(!outside.path().join("bar").exists());
}

/// moby pkg/archive TestUntarInvalidFilenames.
#[test]
fn moby_invalid_filenames() {
    assert_unsafe(&refused(&[Ent::File(b"../victim/dotdot", b"x")]), "'..'");
    assert_unsafe(
        &refused(&[Ent::File(b"/../victim/slash-dotdot", b"x")]),
        "absolute",
    );
}

/// moby pkg/archive TestUntarInvalidHardlink.
#[test]
fn moby_invalid_hardlinks() {
    assert_unsafe(
        &refused(&[Ent::Hardlink(b"dotdot", b"../victim/hello")]),
        "'..'",
    );
    assert_unsafe(
        &refused(&[Ent::Hardlink(b"slash-dotdot", b"/../victim/hello")]),
        "absolute",
    );
    // Writing through a symlink to the victim, then a hard link under it.
    assert_unsafe(
        &refused(&[
            Ent::Symlink(b"symlink", b"../victim"),
            Ent::Hardlink(b"symlink/file", b"hello"),
        ]),
        "symlink",
    );
}

#[test]
fn dot_names() {
    assert_unsafe(&refused(&[Ent::File(b"..", b"x")]), "'..'");
    assert_unsafe(&refused(&[Ent::Dir(b"../")]), "'..'");
    assert_unsafe(&refused(&[Ent::File(b"foo/../../bar", b"x")]), "'..'");
    assert_unsafe(&refused(&[Ent::File(b".wh...", b"x")]), "whiteout");
}

#[test]
fn nul_in_name() {
    // Header names end at NUL; a PAX path record can carry one.
    let err = refused(&[Ent::PaxPath(b"a\0b")]);
    assert!(err.to_string().contains("NUL"), "{err}");
}

#[test]
fn layer_digest_mismatch() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let layout = t.path().join("layout");
    layout_of(
        &t.path().join("work"),
        &layout,
        &[tar_of(&[Ent::File(b"hello", b"world")])],
        &RuntimeConfig::default(),
        "bad:1",
    );
    // Corrupt the (only) gzip layer blob: the biggest file that is not JSON.
    let manifest: serde_json::Value = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let d = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap())
            .unwrap()
    };
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = layout.join("blobs/sha256").join(&layer[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 9;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let err = store
        .import_oci_layout(&layout, None, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer), "{err}");
    assert!(store.list().unwrap().is_empty());
    assert!(tree(&t.path().join("store/layers")).is_empty());
    assert!(tree(&t.path().join("store/blobs/sha256")).is_empty());
}

/// Names that look odd but are legal stay accepted: backslashes, and a hard link to a
/// symlink (moby TestUntarHardlinkToSymlink), and a symlink pointing anywhere (never
/// followed during extraction).
#[test]
fn odd_but_legal_names_accepted() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let layout = t.path().join("layout");
    layout_of(
        &t.path().join("work"),
        &layout,
        &[tar_of(&[
            Ent::File(b"back\\slash", b"ok"),
            Ent::Symlink(b"symlink1", b"regfile"),
            Ent::Hardlink(b"symlink2", b"symlink1"),
            Ent::File(b"regfile", b"r"),
            Ent::Symlink(b"passwd", b"/etc/passwd"),
        ])],
        &RuntimeConfig::default(),
        "odd:1",
    );
    store.import_oci_layout(&layout, None, &mut |_| {}).unwrap();
    let img = store.resolve("odd:1").unwrap();
    let l = &img.layers[0];
    assert_eq!(std::fs::read(l.join("back\\slash")).unwrap(), b"ok");
    assert!(std::fs::symlink_metadata(l.join("symlink2"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_link(l.join("passwd")).unwrap(),
        Path::new("/etc/passwd")
    );
}
