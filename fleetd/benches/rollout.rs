//! `cargo bench -p flotilla-fleetd --bench rollout [-- OPTIONS]`: the rollout benchmark of
//! issue 12 — a global unit started on N machines at once (network namespaces of the
//! harness of `tests/cluster.rs`, each with its own `flotilla-init` running units in
//! containers and its own image store, none holding the unit's image), from a real registry
//! (Debian's `docker-registry` on the cluster's bridge). Side by side in one run, on two
//! fresh clusters:
//! - **peers** (the default): every fleetd serves its blobs and keeps the peers file; the
//!   machines claim the image at its arbiter, one fetches it from the registry, the others
//!   take its blobs from it;
//! - **alone**: the inits read no peers file: every machine pulls every blob from the
//!   registry.
//!
//! Prints a markdown table: registry bytes served (the sizes of the blob GETs in the
//! registry's access log, summed) ÷ image size (config + layers), target 1.0 (alone: N), and
//! the time from `fleetctl start` to the unit active on every machine.
//!
//! The image: a static busybox layer plus `--layers K` (4) layers of random bytes,
//! `--mib M` (64) MiB in all (incompressible, so the bytes on the wire are the bytes
//! stored), built here and pushed with `skopeo copy`.
//!
//! Options: `--machines N` (5), `--mib M` (64), `--layers K` (4). Needs root, iproute2,
//! util-linux, `etcd-server`, `docker-registry`, `skopeo`, `busybox-static`, and `cargo build
//! --release -p flotilla-init` first (it builds `unitctl` beside it; or
//! `FLOTILLA_INIT_BIN`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

#[path = "../tests/cluster/mod.rs"]
mod cluster;
#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cluster::Cluster;
use flotilla_container::image::{write_oci_layout, RuntimeConfig};
use qemu_tests::registry::push;
use serde_json::Value;

/// The machines' lease TTL: long, so that no machine leaves while the box is busy pulling.
const TTL_SECS: u64 = 30;
/// The bound on the wait for the rollout.
const WAIT: Duration = Duration::from_secs(900);

struct Args {
    machines: usize,
    mib: usize,
    layers: usize,
}

fn args() -> Args {
    let mut a = Args {
        machines: 5,
        mib: 64,
        layers: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "--machines" => a.machines = num(),
            "--mib" => a.mib = num(),
            "--layers" => a.layers = num().max(1),
            // `cargo bench` passes `--bench`.
            "--bench" => {}
            other => panic!("unknown option {other}: --machines N, --mib M, --layers K"),
        }
    }
    assert!(
        (2..16).contains(&a.machines),
        "--machines: 2 to 15 (the harness's limit)"
    );
    a
}

/// xorshift64*: incompressible bytes without a dependency.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn tar(root: &Path, out: &Path) {
    let status = Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of {}", root.display());
}

/// An OCI layout of a static busybox (`/hello` says `hello`) plus `a.layers` layers of
/// random data, `a.mib` MiB in all.
fn layout(dir: &Path, a: &Args) -> PathBuf {
    let busybox = qemu_tests::ensure_program("busybox", "busybox-static").unwrap();
    let base = dir.join("base");
    fs::create_dir_all(base.join("bin")).unwrap();
    fs::copy(&busybox, base.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "sleep"] {
        std::os::unix::fs::symlink("busybox", base.join("bin").join(applet)).unwrap();
    }
    fs::write(base.join("hello"), "hello\n").unwrap();
    let mut tars = vec![dir.join("base.tar")];
    tar(&base, &tars[0]);
    let per = a.mib * 1024 * 1024 / a.layers;
    for i in 0..a.layers {
        let root = dir.join(format!("data{i}"));
        fs::create_dir_all(root.join("data")).unwrap();
        let mut f = fs::File::create(root.join("data").join(format!("part{i}"))).unwrap();
        f.write_all(&random_bytes(0x9e37_79b9_7f4a_7c15 ^ i as u64, per))
            .unwrap();
        let t = dir.join(format!("data{i}.tar"));
        tar(&root, &t);
        tars.push(t);
    }
    let config = RuntimeConfig {
        env: vec!["PATH=/bin".into()],
        cmd: vec!["/bin/sh".into()],
        ..Default::default()
    };
    let out = dir.join("layout");
    write_oci_layout(&out, &tars, &config, "app:1").unwrap();
    out
}

/// The image's blobs in the registry (config and layers): digest and size.
fn blobs_of(image: &str) -> Vec<(String, u64)> {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let desc = |d: &Value| {
        (
            d["digest"].as_str().unwrap().to_string(),
            d["size"].as_u64().unwrap(),
        )
    };
    let mut v = vec![desc(&m["config"])];
    v.extend(m["layers"].as_array().unwrap().iter().map(desc));
    v
}

/// The bytes the registry sent for blob GETs (200 and 206), from its access log (combined
/// format: `"GET /v2/.../blobs/sha256:... HTTP/1.1" 200 <bytes> ...`), and their count.
fn blob_bytes_served(log: &str) -> (u64, usize) {
    let mut bytes = 0;
    let mut gets = 0;
    for line in log.lines() {
        let Some((_, rest)) = line.split_once("\"GET /v2/") else {
            continue;
        };
        let Some((path, after)) = rest.split_once('"') else {
            continue;
        };
        if !path.contains("/blobs/sha256:") {
            continue;
        }
        let mut fields = after.split_whitespace();
        let status = fields.next().unwrap_or_default();
        if status != "200" && status != "206" {
            continue;
        }
        gets += 1;
        bytes += fields
            .next()
            .and_then(|b| b.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (bytes, gets)
}

struct Run {
    ratio: f64,
    served: u64,
    gets: usize,
    elapsed: Duration,
}

/// One rollout on a fresh cluster: registry, image, `fleetctl start` of a global unit, until
/// it is active on every machine.
fn rollout(a: &Args, dir: &Path, layout: &Path, peers: bool) -> Run {
    let metadata = vec!["role=web"; a.machines];
    let t0 = Instant::now();
    let c = if peers {
        Cluster::start_with_containers(&metadata, TTL_SECS)
    } else {
        Cluster::start_without_peers(&metadata, TTL_SECS)
    };
    eprintln!(
        "cluster up: etcd + {} machines in {:.1}s",
        a.machines,
        t0.elapsed().as_secs_f64()
    );
    let registry = c.start_registry(&dir.join(if peers {
        "registry-peers"
    } else {
        "registry-alone"
    }));
    let settings = c.registries();
    let image = format!("{}/bench/app:1", registry.host());
    push(layout, &image, &["--dest-tls-verify=false"]).unwrap();
    let blobs = blobs_of(&image);
    let size: u64 = blobs.iter().map(|(_, s)| s).sum();
    let (pushed, _) = blob_bytes_served(&registry.log());
    assert_eq!(pushed, 0, "no blob GET before the rollout");
    if peers {
        for (i, n) in c.nodes.iter().enumerate() {
            let path = n.peers_file();
            c.wait(&format!("m{}'s peers file", i + 1), || {
                fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.parse::<toml::Table>().ok())
                    .and_then(|t| t.get("peers").and_then(|p| p.as_array()).map(Vec::len))
                    == Some(a.machines - 1)
            });
        }
    }
    let web = c.write(
        "web.toml",
        &format!(
            "[container]\nimage = \"{image}\"\n\
             command = [\"/bin/sh\", \"-c\", \"cat /hello; exec sleep 100000\"]\n\
             [fleet]\nglobal = true\n"
        ),
    );
    eprintln!(
        "{}: fleetctl start of a global unit on {} machines ({:.1} MiB image) ...",
        if peers { "peers" } else { "alone" },
        a.machines,
        size as f64 / (1024.0 * 1024.0)
    );
    let t0 = Instant::now();
    c.ok(&[
        "start",
        "--no-block",
        "--registries",
        settings.to_str().unwrap(),
        &web,
    ]);
    loop {
        if c.running("web").len() == a.machines {
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "the unit is not active on every machine after {WAIT:?}: {:?}\n{}",
            c.running("web"),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = t0.elapsed();
    let (served, gets) = blob_bytes_served(&registry.log());
    Run {
        ratio: served as f64 / size as f64,
        served,
        gets,
        elapsed,
    }
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().unwrap();
    eprintln!(
        "image: busybox + {} random layers, {} MiB ...",
        a.layers, a.mib
    );
    let layout = layout(dir.path(), &a);
    let with = rollout(&a, dir.path(), &layout, true);
    let alone = rollout(&a, dir.path(), &layout, false);
    let n = a.machines;
    println!();
    println!("| metric | flotilla (peers) | every machine alone | target | met? |");
    println!("|---|---|---|---|---|");
    println!(
        "| {n}-machine global rollout: registry bytes served ÷ image size | {:.2} ({:.1} MiB, {} blob GETs) | {:.2} ({:.1} MiB, {} blob GETs) | 1.0 (alone: {n}.0) | {} |",
        with.ratio,
        with.served as f64 / (1024.0 * 1024.0),
        with.gets,
        alone.ratio,
        alone.served as f64 / (1024.0 * 1024.0),
        alone.gets,
        if with.ratio <= 1.0 + 1e-9 { "yes" } else { "no" }
    );
    println!(
        "| `fleetctl start` → active on all {n} machines | {:.1} s | {:.1} s | | |",
        with.elapsed.as_secs_f64(),
        alone.elapsed.as_secs_f64()
    );
}
