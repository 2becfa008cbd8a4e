//! Shared test support: Debian tools installed when missing, keys from openssl, payloads.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_osupdate::payload::{write_payload, PayloadSource, SigningKey};

/// `program` on PATH or in /usr/sbin, /sbin; installs Debian `package` with apt-get when
/// missing (said on the output: CI runs on a fresh machine).
pub fn ensure_program(program: &str, package: &str) -> PathBuf {
    let find = || {
        let path = std::env::var("PATH").unwrap_or_default();
        let found = path
            .split(':')
            .chain(["/usr/sbin", "/sbin"])
            .map(|d| Path::new(d).join(program))
            .find(|p| p.is_file());
        found
    };
    if let Some(p) = find() {
        return p;
    }
    println!("{program} is missing: installing the Debian package `{package}` with apt-get");
    let ok = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&["install", "-y", "--no-install-recommends", package]) {
        assert!(ok(&["update"]), "apt-get update failed");
        assert!(
            ok(&["install", "-y", "--no-install-recommends", package]),
            "apt-get install {package} failed"
        );
    }
    find().unwrap_or_else(|| panic!("{program} still missing after installing {package}"))
}

/// A fresh Ed25519 private key made by `openssl genpkey -algorithm ed25519`.
pub fn openssl_key(dir: &Path, name: &str) -> PathBuf {
    let openssl = ensure_program("openssl", "openssl");
    let path = dir.join(format!("{name}.pem"));
    let st = Command::new(openssl)
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success(), "openssl genpkey failed");
    path
}

/// The public half of a private key file, as `openssl pkey -pubout` writes it.
pub fn openssl_pubkey(private: &Path, out: &Path) {
    let openssl = ensure_program("openssl", "openssl");
    let st = Command::new(openssl)
        .args(["pkey", "-pubout", "-in"])
        .arg(private)
        .arg("-out")
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "openssl pkey -pubout failed");
}

/// Artifacts with recognizable content: `(vmlinuz, initramfs, root)` in `dir`.
pub fn artifacts(dir: &Path, root_size: usize) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let v = dir.join("vmlinuz");
    let i = dir.join("initramfs.img");
    let r = dir.join("root.img");
    std::fs::write(&v, b"kernel image bytes\n".repeat(100)).unwrap();
    std::fs::write(&i, b"initramfs bytes\n".repeat(200)).unwrap();
    let root: Vec<u8> = (0..root_size).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&r, root).unwrap();
    (v, i, r)
}

/// A signed payload of `version` in `dir/payload`, by `key`.
pub fn payload(dir: &Path, version: &str, key: &Path, root_size: usize) -> PathBuf {
    let (v, i, r) = artifacts(&dir.join("src"), root_size);
    let out = dir.join("payload");
    let key = SigningKey::load(key).unwrap();
    write_payload(
        &out,
        &PayloadSource {
            version,
            kernel: "6.1.0-test-cloud-amd64",
            architecture: std::env::consts::ARCH,
            vmlinuz: &v,
            initramfs: &i,
            root: &r,
        },
        &key,
    )
    .unwrap();
    out
}
