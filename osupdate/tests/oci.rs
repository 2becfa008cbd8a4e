//! The payload as an OCI image: `oci::write_layout` of a signed payload, read back as an OCI
//! layout (index → manifest → blobs), and `oci::parse_update_manifest`'s refusals of
//! manifests that are not a Flotilla OS update or not of its shape.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use flotilla_osupdate::oci::{self, OciError, ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, LAYERS};
use flotilla_osupdate::sha256_file;
use serde_json::Value;

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &str) -> std::path::PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

#[test]
fn a_payload_written_as_an_oci_layout() {
    let t = tempfile::tempdir().unwrap();
    let key = common::openssl_key(t.path(), "release");
    let payload = common::payload(t.path(), "2.0.0", &key, 100_000);
    let out = t.path().join("update-oci");
    let written = oci::write_layout(&payload, &out, "2.0.0").unwrap();

    assert_eq!(
        std::fs::read_to_string(out.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let index = json(&out.join("index.json"));
    let entry = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "2.0.0"
    );
    assert_eq!(entry["digest"], written.digest.as_str());
    let mpath = blob(&out, &written.digest);
    let mbytes = std::fs::read(&mpath).unwrap();
    assert_eq!(entry["size"], mbytes.len());
    assert_eq!(
        format!("sha256:{}", sha256_file(&mpath).unwrap().0),
        written.digest
    );

    let m: Value = serde_json::from_slice(&mbytes).unwrap();
    assert_eq!(m["schemaVersion"], 2);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(m["artifactType"], ARTIFACT_TYPE);
    assert_eq!(m["config"]["mediaType"], CONFIG_MEDIA_TYPE);
    assert_eq!(
        m["annotations"]["org.opencontainers.image.version"],
        "2.0.0"
    );
    let config = json(&blob(&out, m["config"]["digest"].as_str().unwrap()));
    assert_eq!(config["os"], "flotilla");
    assert_eq!(config["version"], "2.0.0");

    // Each layer is a payload file, byte for byte (a hard link here), under its own name.
    let layers = oci::parse_update_manifest("test", &mbytes).unwrap();
    assert_eq!(layers.len(), LAYERS.len());
    for (l, (file, media_type)) in layers.iter().zip(LAYERS) {
        assert_eq!(l.file, file);
        assert_eq!(l.layer.media_type, media_type);
        let (hex, size) = sha256_file(&payload.join(file)).unwrap();
        assert_eq!(l.layer.digest, format!("sha256:{hex}"));
        assert_eq!(l.layer.size, size);
        let b = blob(&out, &l.layer.digest);
        assert_eq!(
            std::fs::metadata(&b).unwrap().ino(),
            std::fs::metadata(payload.join(file)).unwrap().ino(),
            "{file}"
        );
    }

    // Written again: replaced, same digest (the layout is deterministic).
    let again = oci::write_layout(&payload, &out, "2.0.0").unwrap();
    assert_eq!(again.digest, written.digest);
}

/// An edit of a manifest.
type Edit = Box<dyn FnOnce(&mut Value)>;

/// The manifest `write_layout` writes, edited by `edit`, then parsed.
fn parse_edited(edit: impl FnOnce(&mut Value)) -> Result<Vec<oci::UpdateLayer>, OciError> {
    let t = tempfile::tempdir().unwrap();
    let key = common::openssl_key(t.path(), "release");
    let payload = common::payload(t.path(), "2.0.0", &key, 1000);
    let w = oci::write_layout(&payload, &t.path().join("oci"), "2").unwrap();
    let mut m = json(&blob(&w.dir, &w.digest));
    edit(&mut m);
    oci::parse_update_manifest("reg/os:2", &serde_json::to_vec(&m).unwrap())
}

#[test]
fn manifests_that_are_not_a_flotilla_update_are_refused() {
    let cases: Vec<(&str, Edit, &str)> =
        vec![
        (
            "container image",
            Box::new(|m| {
                m["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
                m.as_object_mut().unwrap().remove("artifactType");
            }),
            "is not a Flotilla OS update (its config is application/vnd.oci.image.config.v1+json",
        ),
        (
            "another artifact type",
            Box::new(|m| m["artifactType"] = "application/vnd.example.thing".into()),
            "artifactType application/vnd.example.thing",
        ),
        (
            "a file missing",
            Box::new(|m| {
                m["layers"].as_array_mut().unwrap().remove(1);
            }),
            "no layer holds manifest.json.sig",
        ),
        (
            "a file twice",
            Box::new(|m| {
                let l = m["layers"][4].clone();
                m["layers"].as_array_mut().unwrap().push(l);
            }),
            "two layers are named root.img",
        ),
        (
            "another file",
            Box::new(|m| {
                m["layers"][2]["annotations"]["org.opencontainers.image.title"] =
                    "../etc/passwd".into()
            }),
            "a layer is named \"../etc/passwd\"",
        ),
        (
            "no title",
            Box::new(|m| {
                m["layers"][0].as_object_mut().unwrap().remove("annotations");
            }),
            "has no org.opencontainers.image.title annotation",
        ),
        (
            "wrong media type",
            Box::new(|m| m["layers"][4]["mediaType"] = "application/octet-stream".into()),
            "the layer root.img has media type application/octet-stream",
        ),
        (
            "not a manifest",
            Box::new(|m| *m = serde_json::json!({"manifests": []})),
            "is not an OCI image manifest",
        ),
    ];
    for (name, edit, message) in cases {
        let e = parse_edited(edit).unwrap_err();
        println!("{name}: {e}");
        assert!(e.to_string().contains(message), "{name}: {e}");
    }
    // Without artifactType (a registry that drops it), the config's media type suffices.
    let ok = parse_edited(|m| {
        m.as_object_mut().unwrap().remove("artifactType");
    })
    .unwrap();
    assert_eq!(ok.len(), 5);
}
