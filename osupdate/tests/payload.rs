//! The payload's signature and verification: every refusal, with keys made by openssl.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::path::Path;

use flotilla_osupdate::payload::{
    load_trusted_keys, os_release_version, parse_version, sign, verify, PayloadError, Policy,
    SigningKey, TrustedKey, MANIFEST, OS_ID, SIGNATURE,
};
use semver::Version;

/// A key directory holding the public halves of `keys` (via `openssl pkey -pubout`).
fn trust(dir: &Path, keys: &[&Path]) -> Vec<TrustedKey> {
    let kd = dir.join("update-keys");
    std::fs::create_dir_all(&kd).unwrap();
    for (n, k) in keys.iter().enumerate() {
        common::openssl_pubkey(k, &kd.join(format!("key{n}.pem")));
    }
    load_trusted_keys(&kd).unwrap()
}

fn policy<'a>(trusted: &'a [TrustedKey], running: &'a Version) -> Policy<'a> {
    Policy {
        trusted,
        running: Some(running),
        allow_downgrade: false,
        os: OS_ID,
        architecture: std::env::consts::ARCH,
    }
}

/// Everything a test needs: a temp dir, a signing key, a payload of `version` by it, the
/// trusted keys (that key's public half) and the running version 1.0.0.
struct Setup {
    tmp: tempfile::TempDir,
    key: std::path::PathBuf,
    payload: std::path::PathBuf,
    trusted: Vec<TrustedKey>,
    running: Version,
}

fn setup(version: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let key = common::openssl_key(tmp.path(), "release");
    let payload = common::payload(tmp.path(), version, &key, 100_000);
    let trusted = trust(tmp.path(), &[&key]);
    Setup {
        tmp,
        key,
        payload,
        trusted,
        running: Version::new(1, 0, 0),
    }
}

/// Nothing in the payload directory changed (verification writes nothing).
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_signed_newer_payload_verifies() {
    let s = setup("1.1.0");
    let before = listing(&s.payload);
    let v = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap();
    assert_eq!(v.version, Version::new(1, 1, 0));
    assert_eq!(v.key, SigningKey::load(&s.key).unwrap().id());
    assert_eq!(v.manifest.os, "flotilla");
    assert_eq!(v.manifest.artifacts.len(), 3);
    assert!(v.artifact_path("root").unwrap().ends_with("root.img"));
    assert_eq!(listing(&s.payload), before, "verify wrote into the payload");
    // The public key image-build bakes in is the one openssl derives.
    let ours = SigningKey::load(&s.key).unwrap().public_pem();
    let theirs = std::fs::read_to_string(s.tmp.path().join("update-keys/key0.pem")).unwrap();
    assert_eq!(ours, theirs);
}

#[test]
fn an_unsigned_payload_is_refused() {
    let s = setup("1.1.0");
    std::fs::remove_file(s.payload.join(SIGNATURE)).unwrap();
    let e = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap_err();
    println!("{e}");
    assert!(matches!(e, PayloadError::Unsigned { .. }), "{e:?}");
    assert!(e.to_string().contains("not signed"));
}

#[test]
fn a_payload_signed_by_another_key_is_refused() {
    let s = setup("1.1.0");
    let other = common::openssl_key(s.tmp.path(), "stranger");
    sign(&s.payload, &SigningKey::load(&other).unwrap()).unwrap();
    let e = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap_err();
    println!("{e}");
    assert!(matches!(e, PayloadError::UntrustedKey { .. }), "{e:?}");
}

#[test]
fn a_signature_claiming_a_trusted_key_id_does_not_help_another_key() {
    // The stranger's signature file names the trusted key's id: still refused.
    let s = setup("1.1.0");
    let other = common::openssl_key(s.tmp.path(), "stranger");
    let mut sig = SigningKey::load(&other)
        .unwrap()
        .sign(&std::fs::read(s.payload.join(MANIFEST)).unwrap());
    sig.key = s.trusted[0].id.clone();
    std::fs::write(s.payload.join(SIGNATURE), serde_json::to_vec(&sig).unwrap()).unwrap();
    let e = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap_err();
    println!("{e}");
    assert!(matches!(e, PayloadError::ManifestAltered { .. }), "{e:?}");
}

#[test]
fn rotation_any_trusted_key_verifies() {
    let s = setup("1.1.0");
    let new = common::openssl_key(s.tmp.path(), "new");
    let trusted = trust(&s.tmp.path().join("rot"), &[&new, &s.key]);
    assert_eq!(trusted.len(), 2);
    verify(&s.payload, &policy(&trusted, &s.running)).unwrap();
    sign(&s.payload, &SigningKey::load(&new).unwrap()).unwrap();
    verify(&s.payload, &policy(&trusted, &s.running)).unwrap();
}

#[test]
fn a_manifest_altered_after_signing_is_refused() {
    let s = setup("1.1.0");
    let path = s.payload.join(MANIFEST);
    let text = std::fs::read_to_string(&path).unwrap();
    // The attacker bumps the version; the artifacts are untouched.
    std::fs::write(&path, text.replace("\"1.1.0\"", "\"9.9.9\"")).unwrap();
    let e = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap_err();
    println!("{e}");
    assert!(matches!(e, PayloadError::ManifestAltered { .. }), "{e:?}");
}

#[test]
fn an_artifact_with_another_digest_is_refused() {
    let s = setup("1.1.0");
    let root = s.payload.join("root.img");
    let mut bytes = std::fs::read(&root).unwrap();
    bytes[5000] ^= 0xff; // same size, one byte flipped
    std::fs::remove_file(&root).unwrap(); // a hard link: do not change the source
    std::fs::write(&root, bytes).unwrap();
    let e = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap_err();
    println!("{e}");
    assert!(
        matches!(&e, PayloadError::ArtifactDigest { name, .. } if name == "root"),
        "{e:?}"
    );
}

#[test]
fn an_artifact_with_another_size_is_refused() {
    let s = setup("1.1.0");
    let k = s.payload.join("vmlinuz");
    let mut bytes = std::fs::read(&k).unwrap();
    bytes.push(0);
    std::fs::remove_file(&k).unwrap();
    std::fs::write(&k, bytes).unwrap();
    let e = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap_err();
    println!("{e}");
    assert!(
        matches!(&e, PayloadError::ArtifactSize { name, .. } if name == "vmlinuz"),
        "{e:?}"
    );
}

#[test]
fn another_os_or_architecture_is_refused() {
    let s = setup("1.1.0");
    let mut p = policy(&s.trusted, &s.running);
    p.os = "flatcar";
    let e = verify(&s.payload, &p).unwrap_err();
    println!("{e}");
    assert!(matches!(e, PayloadError::WrongOs { .. }), "{e:?}");
    let mut p = policy(&s.trusted, &s.running);
    p.architecture = "aarch64";
    let e = verify(&s.payload, &p).unwrap_err();
    println!("{e}");
    assert!(matches!(e, PayloadError::WrongArchitecture { .. }), "{e:?}");
}

#[test]
fn an_older_or_equal_version_is_refused_unless_downgrade_is_allowed() {
    for (version, relation) in [("0.9.0", "older than"), ("1.0.0", "equal to")] {
        let s = setup(version);
        let e = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap_err();
        println!("{e}");
        assert!(
            matches!(&e, PayloadError::NotNewer { relation: r, .. } if *r == relation),
            "{e:?}"
        );
        let mut p = policy(&s.trusted, &s.running);
        p.allow_downgrade = true;
        verify(&s.payload, &p).unwrap();
    }
    // Semver order, not text order: 1.10.0 is newer than 1.9.0.
    let s = setup("1.10.0");
    let running = Version::new(1, 9, 0);
    verify(&s.payload, &policy(&s.trusted, &running)).unwrap();
}

#[test]
fn a_path_outside_the_payload_is_refused_even_when_signed() {
    let s = setup("1.1.0");
    let path = s.payload.join(MANIFEST);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"root.img\"", "\"../src/root.img\"")).unwrap();
    sign(&s.payload, &SigningKey::load(&s.key).unwrap()).unwrap();
    let e = verify(&s.payload, &policy(&s.trusted, &s.running)).unwrap_err();
    println!("{e}");
    assert!(matches!(e, PayloadError::BadManifest { .. }), "{e:?}");
}

#[test]
fn keys_and_versions_are_read_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_trusted_keys(&tmp.path().join("none")).unwrap_err();
    assert!(matches!(e, PayloadError::NoTrustedKeys { .. }), "{e:?}");
    std::fs::write(tmp.path().join("junk.pem"), "hello").unwrap();
    let e = load_trusted_keys(tmp.path()).unwrap_err();
    println!("{e}");
    assert!(matches!(e, PayloadError::BadKey { .. }), "{e:?}");
    let key = common::openssl_key(tmp.path(), "k");
    // A private key is not a public key.
    let e = TrustedKey::from_pem(&std::fs::read_to_string(&key).unwrap(), &key).unwrap_err();
    assert!(matches!(e, PayloadError::BadKey { .. }), "{e:?}");
    let osr = tmp.path().join("os-release");
    std::fs::write(
        &osr,
        "NAME=\"Flotilla\"\nID=flotilla\nVERSION_ID=\"2.3.4\"\n",
    )
    .unwrap();
    assert_eq!(os_release_version(&osr).unwrap(), Version::new(2, 3, 4));
    assert!(parse_version("two", "test").is_err());
}
