//! Shared test support: Debian tools installed when missing, keys from openssl, payloads.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

/// A mebibyte.
pub const MIB: u64 = 1 << 20;

/// A loop device over a sparse file with the agreed GPT layout; detached on drop.
pub struct LoopDisk {
    /// The loop device's kernel name (`loop3`).
    pub dev: String,
    _file: tempfile::NamedTempFile,
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .args(["-d", &format!("/dev/{}", self.dev)])
            .status();
    }
}

pub fn loop_disk() -> LoopDisk {
    loop_disk_sized(40, 8)
}

/// [`loop_disk`] of `disk_mib` MiB (sparse) with `slot_mib`-MiB root slots.
pub fn loop_disk_sized(disk_mib: u64, slot_mib: u64) -> LoopDisk {
    let sfdisk = ensure_program("sfdisk", "fdisk");
    let losetup = ensure_program("losetup", "mount");
    let file = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    file.as_file().set_len(disk_mib * MIB).unwrap(); // sparse
    let script = format!(
        "label: gpt\n\
        size=4MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"flotilla-esp\"\n\
        size={slot_mib}MiB, type=L, name=\"flotilla-root-a\"\n\
        size={slot_mib}MiB, type=L, name=\"flotilla-root-b\"\n\
        type=L, name=\"flotilla-var\"\n"
    );
    let mut child = Command::new(sfdisk)
        .args(["--quiet", "--no-reread"])
        .arg(file.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    let out = Command::new(losetup)
        .args(["--find", "--show", "--partscan"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .trim_start_matches("/dev/")
        .to_string();
    let disk = LoopDisk { dev, _file: file };
    // The kernel adds the partitions (devtmpfs makes the nodes). Some kernels refuse the
    // partition scan of a loop device (BLKRRPART: EINVAL, as on this test host): then add
    // them one by one with partx (BLKPG). Waiting has generous patience.
    let p4 = format!("/dev/{}p4", disk.dev);
    std::thread::sleep(Duration::from_millis(200));
    if !Path::new(&p4).exists() {
        let partx = ensure_program("partx", "util-linux");
        println!("no partitions after losetup --partscan: adding them with partx -a");
        let st = Command::new(partx)
            .args(["-a", &format!("/dev/{}", disk.dev)])
            .status()
            .unwrap();
        assert!(st.success(), "partx -a failed");
    }
    let started = Instant::now();
    while !Path::new(&p4).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{p4} never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    disk
}
