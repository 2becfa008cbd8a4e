//! `cargo bench -p flotilla-osupdate --bench update [-- --runs N] [--root-mib M]
//! [--payload DIR] [--unitctl PATH]` (relative paths from the workspace's root): issue 13's update benchmark, each row next to its
//! floor in the same run, median of N runs (default 3), the page cache dropped before each:
//!
//! - writing the slot: `slot::write_slot` of a signed payload's `root.img` (M MiB of random
//!   bytes, default 256: incompressible, the size of a realistic root) to slot B of a
//!   sparse file with the agreed GPT (sfdisk) on a loop device, split into write + fsync and
//!   the read back (cached pages dropped, sha256 against the signed manifest); against
//!   `dd if=root.img of=PART bs=4M conv=fsync` of the same bytes to the same partition (the
//!   floor);
//!   Then the same rows again for the host image's own kernel, initramfs and root image
//!   (`--payload DIR`'s, re-signed with the bench's key), when they are built;
//! - the whole update: `host::update` in process (verify, write, read back, kernel and
//!   initramfs to the ESP, entry), with its parts, and `unitctl os update DIR --no-reboot`
//!   (a temporary directory as the ESP) when a unitctl binary is found (`--unitctl`, else
//!   the target directory's `release/` then `debug/`);
//! - the payload's size: `image-build os --sign`'s `update/` (`--payload DIR`, default
//!   `target/host-image/update`), total and per file, raw and compressed (`gzip -1`,
//!   `zstd -3`), next to Flatcar's published full update payload (~458 MB, a constant: not
//!   measured here).
//!
//! Times are printed, never asserted. Root (loop devices, drop_caches); `scripts/bench`
//! installs what it needs first, and the tools are installed with apt-get when missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::MIB;
use flotilla_osupdate::host::{self, Host, UpdateOptions};
use flotilla_osupdate::payload::{
    load_trusted_keys, verify, write_payload, PayloadSource, Policy, SigningKey, OS_ID,
};
use flotilla_osupdate::slot::{find_partition, write_slot};
use flotilla_osupdate::Slot;

/// Flatcar's full update payload, as published (not measured here).
const FLATCAR_PAYLOAD_MB: u64 = 458;

struct Args {
    runs: usize,
    root_mib: u64,
    payload: PathBuf,
    unitctl: Option<PathBuf>,
}

fn args() -> Args {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf();
    let mut a = Args {
        runs: 3,
        root_mib: 256,
        payload: repo.join("target/host-image/update"),
        unitctl: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => a.runs = it.next().and_then(|n| n.parse().ok()).expect("--runs N"),
            "--root-mib" => {
                a.root_mib = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--root-mib M")
            }
            // cargo runs a bench in the package's directory: relative paths are taken from
            // the workspace's root instead.
            "--payload" => a.payload = repo.join(it.next().expect("--payload DIR")),
            "--unitctl" => a.unitctl = Some(repo.join(it.next().expect("--unitctl PATH"))),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            other => panic!(
                "unknown argument {other:?}: --runs N --root-mib M --payload DIR --unitctl PATH"
            ),
        }
    }
    a.runs = a.runs.max(1);
    a
}

/// Flushes dirty pages and drops the page cache (so every run reads from the "disk").
fn drop_caches() {
    let ok = Command::new("sync").status().is_ok_and(|s| s.success());
    assert!(ok, "sync failed");
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("write /proc/sys/vm/drop_caches");
}

/// `len` bytes of xorshift noise (incompressible, like a compressed or random image).
fn random_file(path: &Path, len: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..len / MIB {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

/// The unitctl binary: `--unitctl`, else beside this bench in the target directory.
fn find_unitctl(given: Option<PathBuf>) -> Option<PathBuf> {
    if given.is_some() {
        return given;
    }
    // target/release/deps/update-HASH → target/
    let exe = std::env::current_exe().ok()?;
    let target = exe.ancestors().nth(3)?.to_path_buf();
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("unitctl"))
        .find(|p| p.is_file())
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn row(name: &str, times: &[Duration], floor: Option<Duration>, bytes: u64) {
    let m = median(times);
    let (min, max) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    let rate = bytes as f64 / MIB as f64 / m.as_secs_f64().max(1e-9);
    let ratio = floor.map_or("floor".to_string(), |f| {
        format!("x{:.2}", m.as_secs_f64() / f.as_secs_f64().max(1e-9))
    });
    println!(
        "{name:<58} {:>8} {:>8} {:>8} {:>9.0} MiB/s {ratio:>6}",
        secs(m),
        secs(*min),
        secs(*max),
        rate
    );
}

/// Bytes of `path` compressed by `program args` (stdin to stdout).
fn compressed(program: &Path, args: &[&str], path: &Path) -> u64 {
    let input = std::fs::File::open(path).unwrap();
    let mut child = Command::new(program)
        .args(args)
        .stdin(input)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let n = std::io::copy(&mut child.stdout.take().unwrap(), &mut std::io::sink()).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "{} failed",
        program.display()
    );
    n
}

fn mb(b: u64) -> String {
    if b < 100_000 {
        format!("{b} B")
    } else {
        format!("{:.1} MB", b as f64 / 1e6)
    }
}

/// The payload's size table: raw, `gzip -1`, `zstd -3`, and Flatcar's published number.
fn payload_sizes(dir: &Path) {
    println!();
    let manifest = dir.join("manifest.json");
    let Ok(text) = std::fs::read(&manifest) else {
        println!(
            "payload size: {} not found: build it with `image-build os image-build/specs/host.toml \
             --out target/host-image --sign KEY.pem` (scripts/bench does), or pass --payload DIR",
            manifest.display()
        );
        return;
    };
    let m: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let gzip = common::ensure_program("gzip", "gzip");
    let zstd = common::ensure_program("zstd", "zstd");
    println!(
        "payload size: {} (version {}, kernel {}); MB = 10^6 bytes",
        dir.display(),
        m["version"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?")
    );
    println!(
        "{:<58} {:>10} {:>10} {:>10}",
        "", "raw", "gzip -1", "zstd -3"
    );
    let mut files: Vec<String> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap().to_string())
        .collect();
    files.extend(["manifest.json".into(), "manifest.json.sig".into()]);
    let (mut raw, mut gz, mut zs) = (0, 0, 0);
    for f in &files {
        let p = dir.join(f);
        let r = std::fs::metadata(&p).unwrap().len();
        let g = compressed(&gzip, &["-1", "-c"], &p);
        let z = compressed(&zstd, &["-3", "-c", "-q"], &p);
        println!("{f:<58} {:>10} {:>10} {:>10}", mb(r), mb(g), mb(z));
        raw += r;
        gz += g;
        zs += z;
    }
    println!(
        "{:<58} {:>10} {:>10} {:>10}",
        "the whole payload (update/)",
        mb(raw),
        mb(gz),
        mb(zs)
    );
    println!(
        "{:<58} {:>10}",
        "Flatcar's full update payload (published, not measured)",
        format!("~{FLATCAR_PAYLOAD_MB} MB")
    );
}

/// The artifacts of one payload to measure, and how to name it.
struct Source {
    /// Said in the table's title.
    what: String,
    vmlinuz: PathBuf,
    initramfs: PathBuf,
    root: PathBuf,
}

/// Signs `src` with the bench's key into `dir/NAME`; measures the slot write against `dd`
/// and the whole update on a loop disk sized for it, `runs` times; prints the table.
fn bench_set(t: &Path, name: &str, src: &Source, runs: usize, unitctl: Option<&Path>) {
    let key = SigningKey::load(&t.join("release.pem")).unwrap();
    let keys = t.join("update-keys");
    let payload = t.join(name);
    write_payload(
        &payload,
        &PayloadSource {
            version: "2.0.0",
            kernel: "6.1.0-bench-cloud-amd64",
            architecture: std::env::consts::ARCH,
            vmlinuz: &src.vmlinuz,
            initramfs: &src.initramfs,
            root: &src.root,
        },
        &key,
    )
    .unwrap();
    let payload_bytes: u64 = std::fs::read_dir(&payload)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let trusted = load_trusted_keys(&keys).unwrap();
    let running = semver::Version::new(1, 0, 0);
    let verified = verify(
        &payload,
        &Policy {
            trusted: &trusted,
            running: Some(&running),
            allow_downgrade: false,
            os: OS_ID,
            architecture: std::env::consts::ARCH,
        },
    )
    .unwrap();
    let root_img = verified.artifact_path("root").unwrap();
    let root_bytes = verified.artifact("root").unwrap().size;

    // Slots with room to spare; the disk file is sparse and removed when dropped.
    let root_mib = root_bytes.div_ceil(MIB);
    let slot_mib = root_mib + root_mib / 4 + 16;
    let disk_mib = 4 + 2 * slot_mib + 64;
    eprintln!("a {disk_mib} MiB sparse disk with {slot_mib} MiB slots on a loop device ...");
    let disk = common::loop_disk_sized(disk_mib, slot_mib);
    let (sys, dev) = (Path::new("/sys/class/block"), Path::new("/dev"));
    let part_b = find_partition(sys, dev, "flotilla-root-b", Some(&disk.dev)).unwrap();
    let dd = common::ensure_program("dd", "coreutils");

    // Files standing in for the running host (slot A, 1.0.0) for host::update and unitctl.
    let cmdline = t.join("cmdline");
    let os_release = t.join("os-release");
    let esp = t.join(format!("esp-{name}"));
    std::fs::create_dir(&esp).unwrap();
    let h = Host {
        sys_block: sys.to_path_buf(),
        dev: dev.to_path_buf(),
        cmdline: cmdline.clone(),
        os_release: os_release.clone(),
        keys: keys.clone(),
        disk: Some(disk.dev.clone()),
        esp: esp.clone(),
    };

    let mut dd_t = Vec::new();
    let (mut ws_total, mut ws_write, mut ws_read) = (Vec::new(), Vec::new(), Vec::new());
    let (mut up_total, mut up_verify, mut up_write, mut up_read, mut up_rest) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut uc_total = Vec::new();
    for run in 0..runs {
        eprintln!("{name}: run {}/{runs} ...", run + 1);
        drop_caches();
        let started = Instant::now();
        let st = Command::new(&dd)
            .arg(format!("if={}", root_img.display()))
            .arg(format!("of={}", part_b.dev.display()))
            .args(["bs=4M", "conv=fsync", "status=none"])
            .status()
            .unwrap();
        dd_t.push(started.elapsed());
        assert!(st.success(), "dd failed");

        drop_caches();
        let started = Instant::now();
        let r = write_slot(&verified, Slot::B, Some(Slot::A), &part_b, &mut |_, _| {}).unwrap();
        ws_total.push(started.elapsed());
        ws_write.push(r.write);
        ws_read.push(r.verify);

        drop_caches();
        let started = Instant::now();
        let r = host::update(&h, &payload, UpdateOptions::default(), &mut |_, _| {}).unwrap();
        let total = started.elapsed();
        up_total.push(total);
        up_verify.push(r.verify);
        up_write.push(r.write.write);
        up_read.push(r.write.verify);
        up_rest.push(total.saturating_sub(r.verify + r.write.write + r.write.verify));

        if let Some(u) = unitctl {
            drop_caches();
            let started = Instant::now();
            let out = Command::new(u)
                .args(["os", "update"])
                .arg(&payload)
                .arg("--no-reboot")
                .arg("--esp")
                .arg(&esp)
                .args(["--disk", &disk.dev])
                .arg("--cmdline")
                .arg(&cmdline)
                .arg("--os-release")
                .arg(&os_release)
                .arg("--keys")
                .arg(&keys)
                .output()
                .unwrap();
            uc_total.push(started.elapsed());
            assert!(
                out.status.success(),
                "unitctl os update failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    println!();
    println!(
        "A/B update of {} (root.img {:.1} MiB, payload {:.1} MiB) on a loop device over a \
         sparse file in /var/tmp ({slot_mib} MiB slots); page cache dropped before each; {runs} runs",
        src.what,
        root_bytes as f64 / MIB as f64,
        payload_bytes as f64 / MIB as f64,
    );
    println!(
        "{:<58} {:>8} {:>8} {:>8} {:>15} {:>6}",
        "", "median", "min", "max", "throughput", "x dd"
    );
    let floor = Some(median(&dd_t));
    let boot_files = payload_bytes.saturating_sub(root_bytes);
    row(
        "dd bs=4M conv=fsync of root.img to slot B (floor)",
        &dd_t,
        None,
        root_bytes,
    );
    row(
        "slot::write_slot: write + fsync + read back",
        &ws_total,
        floor,
        root_bytes,
    );
    row("  write + fsync", &ws_write, floor, root_bytes);
    row(
        "  read back (cache dropped) + sha256",
        &ws_read,
        floor,
        root_bytes,
    );
    row(
        "host::update (in process): the whole update",
        &up_total,
        floor,
        payload_bytes,
    );
    row(
        "  verify (signature, sha256 of every artifact)",
        &up_verify,
        floor,
        payload_bytes,
    );
    row("  write + fsync", &up_write, floor, root_bytes);
    row("  read back + sha256", &up_read, floor, root_bytes);
    row(
        "  the rest (keys, preflight, kernel + initramfs to ESP)",
        &up_rest,
        floor,
        boot_files,
    );
    match unitctl {
        Some(u) => {
            let profile = u
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            row(
                &format!("unitctl os update DIR --no-reboot ({profile})"),
                &uc_total,
                floor,
                payload_bytes,
            );
        }
        None => println!(
            "unitctl os update: no unitctl binary found (build it: `cargo build --release -p \
             flotilla-init`, or pass --unitctl PATH)"
        ),
    }
}

fn main() {
    let a = args();
    if !rustix::process::geteuid().is_root() {
        eprintln!("the update bench needs root (loop devices, drop_caches): run it as root");
        std::process::exit(1);
    }
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let t = tmp.path();
    // The bench's own release key (the host image's key may not be at hand): every payload
    // measured is signed with it, the host image's artifacts included.
    let key_path = common::openssl_key(t, "release");
    let key = SigningKey::load(&key_path).unwrap();
    let keys = t.join("update-keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(keys.join("release.pem"), key.public_pem()).unwrap();
    std::fs::write(
        t.join("os-release"),
        "NAME=\"Flotilla\"\nID=flotilla\nVERSION_ID=1.0.0\n",
    )
    .unwrap();
    std::fs::write(
        t.join("cmdline"),
        "console=ttyS0 quiet panic=10 flotilla.slot=a flotilla.root=flotilla-root-a flotilla.var=flotilla-var\n",
    )
    .unwrap();
    let unitctl = find_unitctl(a.unitctl);

    eprintln!(
        "making a payload with a {} MiB random root.img ...",
        a.root_mib
    );
    let src = t.join("src");
    std::fs::create_dir(&src).unwrap();
    random_file(&src.join("root.img"), a.root_mib * MIB);
    random_file(&src.join("vmlinuz"), 8 * MIB);
    random_file(&src.join("initramfs.img"), 32 * MIB);
    let random = Source {
        what: format!(
            "random bytes ({} MiB root, 8 MiB kernel, 32 MiB initramfs)",
            a.root_mib
        ),
        vmlinuz: src.join("vmlinuz"),
        initramfs: src.join("initramfs.img"),
        root: src.join("root.img"),
    };
    bench_set(t, "random", &random, a.runs, unitctl.as_deref());

    // The host image's own artifacts, when built (re-signed with the bench's key).
    let real = &a.payload;
    if ["vmlinuz", "initramfs.img", "root.img"]
        .iter()
        .all(|f| real.join(f).is_file())
    {
        let host = Source {
            what: format!("the host image's artifacts ({})", real.display()),
            vmlinuz: real.join("vmlinuz"),
            initramfs: real.join("initramfs.img"),
            root: real.join("root.img"),
        };
        bench_set(t, "host-image", &host, a.runs, unitctl.as_deref());
    }
    println!(
        "(a loop device's \"disk\" is the host's page cache of its file, written back on fsync: \
         optimistic for a real disk)"
    );
    drop(tmp);
    payload_sizes(&a.payload);
}
