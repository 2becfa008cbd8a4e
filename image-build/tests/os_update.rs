//! `image-build os --os-version V --sign KEY.pem`: the version in os-release, the public key
//! baked into the root image, and the signed update payload in `OUT/update/`, verified with
//! `flotilla_osupdate` against the key read back out of the image; the same payload as an
//! OCI image layout in `OUT/update-oci/` that skopeo reads. Stand-in binaries as in
//! `tests/os.rs`; the kernel package comes from the shared cache.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_osupdate::payload::{
    load_trusted_keys, parse_version, verify, PayloadError, Policy, SigningKey, OS_ID,
    TRUSTED_KEYS_DIR,
};

fn cache() -> PathBuf {
    std::env::var_os("FLOTILLA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(image_build::DEFAULT_CACHE))
}

fn program(name: &str, package: &str) -> PathBuf {
    let find = || {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return p;
    }
    println!("{name} is missing: installing the Debian package `{package}` with apt-get");
    let st = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .unwrap();
    assert!(st.success(), "apt-get install {package} failed");
    find().unwrap()
}

fn image_build(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_image-build"))
        .arg("os")
        .args(args)
        .arg("--cache")
        .arg(cache())
        .output()
        .unwrap()
}

fn fake_bin_dir(dir: &Path) -> PathBuf {
    let busybox = program("busybox", "busybox-static");
    std::fs::create_dir_all(dir).unwrap();
    for name in ["flotilla-init", "unitctl", "fleetd", "fleetctl"] {
        std::fs::copy(&busybox, dir.join(name)).unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn a_signed_build_writes_a_payload_the_image_itself_trusts() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("release.pem");
    let st = Command::new(program("openssl", "openssl"))
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let bins = fake_bin_dir(&t.path().join("bin"));
    let out = t.path().join("out");
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/host.toml");
    let o = image_build(&[
        spec.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--bin-dir".as_ref(),
        bins.as_os_str(),
        "--os-version".as_ref(),
        "2.0.0".as_ref(),
        "--sign".as_ref(),
        key.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
    assert!(stdout.contains("update/: version 2.0.0"), "{stdout}");
    let update = out.join("update");
    let mut files: Vec<String> = std::fs::read_dir(&update)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "initramfs.img",
            "manifest.json",
            "manifest.json.sig",
            "root.img",
            "vmlinuz"
        ]
    );

    // The root image: VERSION_ID and the baked-in public key.
    let root = t.path().join("root");
    let o = Command::new(program("fsck.erofs", "erofs-utils"))
        .arg(format!("--extract={}", root.display()))
        .arg(out.join("root.img"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let os_release = std::fs::read_to_string(root.join("usr/lib/os-release")).unwrap();
    assert!(os_release.contains("VERSION_ID=2.0.0\n"), "{os_release}");
    // disk.img's slot A entry carries the same version (the loader orders slots by it).
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let esp_offset = manifest["disk"]["partitions"][0]["offset"]
        .as_u64()
        .unwrap();
    let entry = Command::new(program("mtype", "mtools"))
        .arg("-i")
        .arg(format!("{}@@{esp_offset}", out.join("disk.img").display()))
        .arg("::/loader/entries/flotilla-a.conf")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(entry.status.success(), "{entry:?}");
    let entry = String::from_utf8(entry.stdout).unwrap();
    assert!(entry.contains("\nversion 2.0.0\n"), "{entry}");
    let keys_dir = root.join(TRUSTED_KEYS_DIR.trim_start_matches('/'));
    let trusted = load_trusted_keys(&keys_dir).unwrap();
    assert_eq!(trusted.len(), 1);
    assert_eq!(trusted[0].id, SigningKey::load(&key).unwrap().id());

    // The payload verifies against the image's own keys, from a host running 1.0.0 ...
    let running = parse_version("1.0.0", "test").unwrap();
    let policy = Policy {
        trusted: &trusted,
        running: Some(&running),
        allow_downgrade: false,
        os: OS_ID,
        architecture: std::env::consts::ARCH,
    };
    let v = verify(&update, &policy).unwrap();
    assert_eq!(v.version.to_string(), "2.0.0");
    assert_eq!(v.manifest.kernel, manifest["kernel"].as_str().unwrap());
    // ... and is refused by one already running 2.0.0.
    let running = parse_version("2.0.0", "test").unwrap();
    let e = verify(
        &update,
        &Policy {
            running: Some(&running),
            ..policy
        },
    )
    .unwrap_err();
    assert!(matches!(e, PayloadError::NotNewer { .. }), "{e:?}");

    // The same payload as an OCI image layout in OUT/update-oci/, tagged with the version:
    // its layers are update/'s files, and skopeo reads it by that tag.
    let layout = out.join("update-oci");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "2.0.0"
    );
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let layers = flotilla_osupdate::oci::parse_update_manifest(
        "update-oci",
        &std::fs::read(blob(digest)).unwrap(),
    )
    .unwrap();
    for l in &layers {
        assert_eq!(
            std::fs::read(blob(&l.layer.digest)).unwrap(),
            std::fs::read(update.join(&l.file)).unwrap(),
            "{}",
            l.file
        );
    }
    let copy = t.path().join("copy");
    let o = Command::new(program("skopeo", "skopeo"))
        .args(["--insecure-policy", "copy"])
        .arg(format!("oci:{}:2.0.0", layout.display()))
        .arg(format!("oci:{}:2.0.0", copy.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(copy
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
        .is_file());
}

#[test]
fn a_bad_version_or_key_fails_before_the_build() {
    let t = tempfile::tempdir().unwrap();
    let bins = fake_bin_dir(&t.path().join("bin"));
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/host.toml");
    let out = t.path().join("out");
    let o = image_build(&[
        spec.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--bin-dir".as_ref(),
        bins.as_os_str(),
        "--os-version".as_ref(),
        "two".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{err}");
    assert!(!o.status.success());
    assert!(err.contains("not a semantic version"), "{err}");
    let junk = t.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let o = image_build(&[
        spec.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--bin-dir".as_ref(),
        bins.as_os_str(),
        "--sign".as_ref(),
        junk.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{err}");
    assert!(!o.status.success());
    assert!(err.contains("is not an Ed25519 private key"), "{err}");
    // Nothing was built.
    assert!(!out.join("root.img").exists());
}

#[test]
fn the_spec_os_version_is_the_default_and_the_flag_overrides_it() {
    let t = tempfile::tempdir().unwrap();
    let bins = fake_bin_dir(&t.path().join("bin"));
    let spec = t.path().join("host.toml");
    std::fs::write(&spec, "[os]\nversion = \"3.1.0\"\n").unwrap();
    let loaded = image_build::os::OsSpec::load(&spec).unwrap();
    assert_eq!(loaded.os.version.as_deref(), Some("3.1.0"));
    let extract = |out: &Path| {
        let root = out.join("extracted");
        let o = Command::new(program("fsck.erofs", "erofs-utils"))
            .arg(format!("--extract={}", root.display()))
            .arg(out.join("root.img"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        std::fs::read_to_string(root.join("usr/lib/os-release")).unwrap()
    };
    let out = t.path().join("out1");
    let o = image_build(&[
        spec.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--bin-dir".as_ref(),
        bins.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(extract(&out).contains("VERSION_ID=3.1.0\n"));
    // No --sign: no payload, no trusted key in the image.
    assert!(!out.join("update").exists());
    assert!(!out.join("extracted/usr/lib/flotilla/update-keys").exists());
    let out = t.path().join("out2");
    let o = image_build(&[
        spec.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--bin-dir".as_ref(),
        bins.as_os_str(),
        "--os-version".as_ref(),
        "3.2.0".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(extract(&out).contains("VERSION_ID=3.2.0\n"));
    // Unknown keys in [os] are spec errors.
    std::fs::write(&spec, "[os]\nversoin = \"3.1.0\"\n").unwrap();
    let e = image_build::os::OsSpec::load(&spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("versoin"), "{e}");
}
