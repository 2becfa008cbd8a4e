//! `docker save` / `podman save` archives (Docker's legacy format, built here by hand: there
//! is no docker daemon) and Docker 25+ archives (OCI layout + manifest.json); layer leases
//! that keep a running container's layers from garbage collection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod image_util;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use flotilla_container::image::{ImageError, RuntimeConfig};
use image_util::{fixture, layout_of, tar_of, tree, Ent, Fixture};
use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    let mut s = String::new();
    for b in Sha256::digest(bytes) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn lower() -> Vec<u8> {
    tar_of(&[
        Ent::Dir(b"etc"),
        Ent::File(b"etc/a", b"A"),
        Ent::File(b"etc/b", b"B"),
    ])
}

fn upper() -> Vec<u8> {
    tar_of(&[
        Ent::Dir(b"etc"),
        Ent::File(b"etc/.wh.b", b""),
        Ent::File(b"etc/c", b"C"),
    ])
}

/// A docker image config whose diff_ids are those of `diff_of` (the real layers' tars).
fn config_json(diff_of: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = diff_of
        .iter()
        .map(|t| format!("sha256:{}", sha(t)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "GREETING=hi"], "Cmd": ["/bin/sh"], "WorkingDir": "/etc"},
        "container_config": {"Hostname": "ignored by us"},
        "docker_version": "24.0.7",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [],
    }))
    .unwrap()
}

/// The bytes of a legacy `docker save` archive: `layers` as `<id>/layer.tar` (the content
/// actually stored), the config declaring the diff_ids of `declared` (the same layers unless
/// a test tampers with one), `repo_tags`.
fn docker_archive(layers: &[Vec<u8>], declared: &[Vec<u8>], repo_tags: &[&str]) -> Vec<u8> {
    let config = config_json(declared);
    let config_name = format!("{}.json", sha(&config));
    let ids: Vec<String> = layers
        .iter()
        .enumerate()
        .map(|(i, t)| sha(&[t.as_slice(), &[i as u8]].concat()))
        .collect();
    let layer_paths: Vec<String> = ids.iter().map(|id| format!("{id}/layer.tar")).collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": repo_tags,
        "Layers": layer_paths,
    }]))
    .unwrap();
    let mut entries = vec![
        Ent::File(config_name.as_bytes(), &config),
        Ent::File(b"repositories", b"{}"),
    ];
    for (i, id) in ids.iter().enumerate() {
        entries.push(Ent::Dir(id.as_bytes()));
        entries.push(Ent::File(layer_paths[i].as_bytes(), &layers[i]));
    }
    entries.push(Ent::File(b"manifest.json", &manifest));
    tar_of(&entries)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

impl Fixture {
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.t.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    /// Everything in the store but the lock, the (empty) staging dir and the lease dir.
    fn content(&self) -> Vec<String> {
        tree(self.store.root())
            .into_iter()
            .filter(|p| p != "lock" && p != "tmp" && p != "leases" && !p.starts_with("tmp/"))
            .collect()
    }
}

#[test]
fn docker_save_archive_imports_with_its_repo_tags_plain_and_gzipped() {
    let f = fixture();
    let layers = [lower(), upper()];
    let bytes = docker_archive(
        &layers,
        &layers,
        &["docker.io/library/demo:1.0", "demo:latest"],
    );
    for (name, bytes) in [("a.tar", bytes.clone()), ("a.tar.gz", gzip(&bytes))] {
        let path = f.file(name, &bytes);
        let info = f.store.import_oci_layout(&path, None, &mut |_| {}).unwrap();
        assert_eq!((info.name.as_str(), info.tag.as_str()), ("demo", "1.0"));
        assert_eq!(info.layers, 2);
        let tags: Vec<String> = f
            .store
            .list()
            .unwrap()
            .iter()
            .map(|i| format!("{}:{}", i.name, i.tag))
            .collect();
        assert_eq!(tags, ["demo:1.0", "demo:latest"]);
        let img = f.store.resolve("demo:latest").unwrap();
        assert_eq!(img.info.digest, info.digest);
        assert_eq!(
            img.config,
            RuntimeConfig {
                env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
                entrypoint: vec![],
                cmd: vec!["/bin/sh".into()],
                working_dir: Some("/etc".into()),
                user: None,
            }
        );
        // The layers are extracted by the OCI path: overlay whiteouts and all.
        assert_eq!(std::fs::read(img.layers[0].join("etc/a")).unwrap(), b"A");
        assert_eq!(std::fs::read(img.layers[1].join("etc/c")).unwrap(), b"C");
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &std::fs::symlink_metadata(img.layers[1].join("etc/b"))
                .unwrap()
                .file_type()
        ));
        // The layer directories are named by diff_id.
        assert!(img.layers[0].ends_with(sha(&layers[0])));
    }
    // --name picks the name.
    let path = f.file("b.tar", &bytes);
    let info = f
        .store
        .import_oci_layout(&path, Some("other:2"), &mut |_| {})
        .unwrap();
    assert_eq!((info.name.as_str(), info.tag.as_str()), ("other", "2"));
}

#[test]
fn tampered_layer_is_refused_with_nothing_stored() {
    let f = fixture();
    let mut bad = lower();
    // Same length, one byte of file content changed: only the hash can tell.
    let at = bad.windows(1).position(|w| w == b"A").unwrap();
    bad[at] = b'Z';
    let bytes = docker_archive(&[bad], &[lower()], &["demo:1.0"]);
    let path = f.file("bad.tar", &bytes);
    let err = f
        .store
        .import_oci_layout(&path, None, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("diff_id of layer 1/1"), "{msg}");
    assert!(msg.contains(&sha(&lower())), "{msg}");
    assert!(msg.contains("nothing was imported"), "{msg}");
    assert_eq!(f.content(), ["blobs", "blobs/sha256", "layers"]);
}

#[test]
fn tampered_layer_claiming_a_stored_layer_is_refused() {
    // The layer the diff_id names is already extracted in the store, so the OCI path would
    // skip extracting (and hashing) it: the archive's layers are checked before that.
    let f = fixture();
    let good = f.file(
        "good.tar",
        &docker_archive(&[lower()], &[lower()], &["good:1"]),
    );
    f.store.import_oci_layout(&good, None, &mut |_| {}).unwrap();
    let before = f.content();
    let evil = tar_of(&[Ent::Dir(b"etc"), Ent::File(b"etc/a", b"evil")]);
    let bad = f.file("bad.tar", &docker_archive(&[evil], &[lower()], &["bad:1"]));
    let err = f
        .store
        .import_oci_layout(&bad, None, &mut |_| {})
        .unwrap_err();
    assert!(
        err.to_string().contains("diff_id of layer 1/1"),
        "expected a diff_id mismatch, got: {err}"
    );
    assert_eq!(
        f.content(),
        before,
        "nothing of the tampered archive is stored"
    );
    assert!(matches!(
        f.store.resolve("bad:1"),
        Err(ImageError::NotFound(_))
    ));
}

#[test]
fn hostile_archives_are_refused() {
    let f = fixture();
    let config = config_json(&[lower()]);
    let cname = format!("{}.json", sha(&config));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "layer path climbing out",
            tar_of(&[
                Ent::File(cname.as_bytes(), &config),
                Ent::File(
                    b"manifest.json",
                    format!(r#"[{{"Config":"{cname}","RepoTags":["x:1"],"Layers":["../../etc/passwd"]}}]"#)
                        .as_bytes(),
                ),
            ]),
            "not a path inside the archive",
        ),
        (
            "layer symlinked out of the archive",
            tar_of(&[
                Ent::File(cname.as_bytes(), &config),
                Ent::Dir(b"l"),
                Ent::Symlink(b"l/layer.tar", b"../../../../../../etc/passwd"),
                Ent::File(
                    b"manifest.json",
                    format!(r#"[{{"Config":"{cname}","RepoTags":["x:1"],"Layers":["l/layer.tar"]}}]"#)
                        .as_bytes(),
                ),
            ]),
            "pointing out of the archive",
        ),
        (
            "config not matching its name",
            tar_of(&[
                Ent::File(format!("{}.json", sha(b"other")).as_bytes(), &config),
                Ent::Dir(b"l"),
                Ent::File(b"l/layer.tar", &lower()),
                Ent::File(
                    b"manifest.json",
                    format!(
                        r#"[{{"Config":"{}.json","RepoTags":["x:1"],"Layers":["l/layer.tar"]}}]"#,
                        sha(b"other")
                    )
                    .as_bytes(),
                ),
            ]),
            "image config",
        ),
        (
            "layer with an entry escaping the root",
            {
                let evil = tar_of(&[Ent::File(b"../escape", b"x")]);
                docker_archive(std::slice::from_ref(&evil), std::slice::from_ref(&evil), &["x:1"])
            },
            "refused tar entry '../escape'",
        ),
    ];
    for (what, bytes, expect) in cases {
        let path = f.file("hostile.tar", &bytes);
        let err = f
            .store
            .import_oci_layout(&path, None, &mut |_| {})
            .unwrap_err();
        assert!(err.to_string().contains(expect), "{what}: {err}");
        assert_eq!(f.content(), ["blobs", "blobs/sha256", "layers"], "{what}");
    }
    assert!(!f.t.path().join("escape").exists());
}

#[test]
fn docker25_archive_is_named_by_its_repo_tags() {
    // Docker 25+: an OCI layout plus manifest.json; here without a name annotation.
    let f = fixture();
    let out = f.t.path().join("layout");
    let cfg = RuntimeConfig {
        cmd: vec!["/bin/sh".into()],
        ..Default::default()
    };
    layout_of(&f.t.path().join("work"), &out, &[lower()], &cfg, "ignored");
    let index_path = out.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"][0]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("blobs/sha256").join(&digest[7..])).unwrap(),
    )
    .unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap();
    std::fs::write(
        out.join("manifest.json"),
        format!(
            r#"[{{"Config":"blobs/sha256/{}","RepoTags":["registry.example:5000/team/app:1.4"],"Layers":[]}}]"#,
            &config[7..]
        ),
    )
    .unwrap();
    let info = f.store.import_oci_layout(&out, None, &mut |_| {}).unwrap();
    assert_eq!((info.name.as_str(), info.tag.as_str()), ("app", "1.4"));
}

/// A process that stands for a container's pid 1; killed and reaped on drop.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn layer_dirs(store: &Path) -> Vec<String> {
    tree(&store.join("layers"))
        .into_iter()
        .filter(|p| !p.contains('/'))
        .collect()
}

#[test]
fn leased_layers_survive_gc_until_their_holder_is_gone() {
    let f = fixture();
    let path = f.file(
        "a.tar",
        &docker_archive(&[lower()], &[lower()], &["demo:1"]),
    );
    f.store.import_oci_layout(&path, None, &mut |_| {}).unwrap();
    let img = f.store.resolve("demo:1").unwrap();
    let layer = img.layers[0].clone();

    // Held by this process while "starting", then handed to the container's pid 1.
    let lease = f.store.lease("web", &img.layers).unwrap();
    assert!(lease.path().is_file());
    let pid1 = Holder(Command::new("sleep").arg("1000").spawn().unwrap());
    lease.hand_over(pid1.0.id() as i32).unwrap();

    f.store.remove("demo:1").unwrap();
    assert!(f.store.list().unwrap().is_empty());
    assert_eq!(std::fs::read(layer.join("etc/a")).unwrap(), b"A");
    f.store.prune().unwrap();
    assert_eq!(std::fs::read(layer.join("etc/a")).unwrap(), b"A");

    drop(pid1); // the container stops
    f.store.prune().unwrap();
    assert!(
        !layer.exists(),
        "the layer of a stopped container is collected"
    );
    assert!(layer_dirs(f.store.root()).is_empty());
    assert_eq!(tree(&f.store.root().join("leases")), Vec::<String>::new());
}

#[test]
fn a_lease_not_handed_over_lives_until_dropped() {
    let f = fixture();
    let path = f.file(
        "a.tar",
        &docker_archive(&[lower()], &[lower()], &["demo:1"]),
    );
    f.store.import_oci_layout(&path, None, &mut |_| {}).unwrap();
    let img = f.store.resolve("demo:1").unwrap();
    let lease = f.store.lease("toolbox-1", &img.layers).unwrap();
    f.store.remove("demo:1").unwrap();
    assert!(img.layers[0].is_dir(), "kept while this process holds it");
    let file = lease.path().to_path_buf();
    drop(lease);
    assert!(!file.exists(), "dropping the lease removes it");
    f.store.prune().unwrap();
    assert!(layer_dirs(f.store.root()).is_empty());
}

#[test]
fn a_lease_of_a_recycled_pid_or_a_dead_process_is_stale() {
    let f = fixture();
    let path = f.file(
        "a.tar",
        &docker_archive(&[lower()], &[lower()], &["demo:1"]),
    );
    f.store.import_oci_layout(&path, None, &mut |_| {}).unwrap();
    let img = f.store.resolve("demo:1").unwrap();
    let hex = img.layers[0].file_name().unwrap().to_str().unwrap();
    let leases = f.store.root().join("leases");
    std::fs::create_dir_all(&leases).unwrap();
    // This process's pid with another start time: the pid was reused, the holder is gone.
    let me = std::process::id();
    std::fs::write(
        leases.join("old.json"),
        format!(r#"{{"pid":{me},"start":1,"layers":["{hex}"]}}"#),
    )
    .unwrap();
    // A process that exited.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    std::fs::write(
        leases.join("dead.json"),
        format!(r#"{{"pid":{dead_pid},"start":0,"layers":["{hex}"]}}"#),
    )
    .unwrap();
    f.store.remove("demo:1").unwrap();
    assert!(layer_dirs(f.store.root()).is_empty());
    assert_eq!(
        tree(&leases),
        Vec::<String>::new(),
        "stale leases are deleted"
    );
}

#[test]
fn an_unreadable_lease_keeps_every_layer() {
    let f = fixture();
    let path = f.file(
        "a.tar",
        &docker_archive(&[lower()], &[lower()], &["demo:1"]),
    );
    f.store.import_oci_layout(&path, None, &mut |_| {}).unwrap();
    let leases = f.store.root().join("leases");
    std::fs::create_dir_all(&leases).unwrap();
    std::fs::write(leases.join("broken.json"), b"{not json").unwrap();
    f.store.remove("demo:1").unwrap();
    assert_eq!(layer_dirs(f.store.root()).len(), 1);
}

#[test]
fn layer_symlinked_inside_the_archive_is_followed() {
    // Docker (< 25) writes a layer seen before as a symlink to the first copy.
    let f = fixture();
    let config = config_json(&[lower(), lower()]);
    let cname = format!("{}.json", sha(&config));
    let manifest = format!(
        r#"[{{"Config":"{cname}","RepoTags":["dup:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}}]"#
    );
    let bytes = tar_of(&[
        Ent::File(cname.as_bytes(), &config),
        Ent::Dir(b"l1"),
        Ent::File(b"l1/layer.tar", &lower()),
        Ent::Dir(b"l2"),
        Ent::Symlink(b"l2/layer.tar", b"../l1/layer.tar"),
        Ent::File(b"manifest.json", manifest.as_bytes()),
    ]);
    let path = f.file("dup.tar", &bytes);
    let info = f.store.import_oci_layout(&path, None, &mut |_| {}).unwrap();
    assert_eq!((info.name.as_str(), info.layers), ("dup", 2));
    let img = f.store.resolve("dup:1").unwrap();
    assert_eq!(img.layers[0], img.layers[1]);
    assert_eq!(std::fs::read(img.layers[1].join("etc/a")).unwrap(), b"A");
}
