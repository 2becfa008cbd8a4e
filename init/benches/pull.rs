//! `cargo bench -p flotilla-init --bench pull [-- N]`: pulls of the gcc image (Debian
//! minbase + gcc, `image-build/specs/gcc.toml`) from a local `docker-registry` (Debian's
//! distribution 2.8 on 127.0.0.1, plain HTTP) into a fresh directory, side by side in one
//! run, N rounds (default 5) of each in turn, medians:
//! - flotilla: `unitctl image pull` into a fresh store (download, verify, extract, tag), and
//!   its split: until `importing into the store` (manifest, blobs downloaded, fsynced and
//!   verified) and after (the store's import: verify again, extract the layers, tag);
//! - `skopeo copy docker://… oci:DIR` (download and verify, no extraction), and the same
//!   followed by `tar -xzf` of its layers (like for like with flotilla's pull);
//! - `tar -xzf` of the layer blobs alone (the extraction floor);
//! - the floor: `curl` of the manifest, then of the config and every layer in parallel,
//!   nothing verified or extracted.
//!
//! Run as root; `scripts/bench` installs docker-registry, skopeo and curl first. The gcc
//! image is built into `/var/tmp/flotilla-test-images` (cached) and pushed with skopeo.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_container::image::ImageStore;
use qemu_tests::registry::TestRegistry;

const STORE: &str = "/var/tmp/flotilla-test-images";

fn build_gcc() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let opts = image_build::BuildOptions {
        spec: repo.join("image-build/specs/gcc.toml"),
        store: PathBuf::from(STORE),
        oci_out: None,
        no_import: false,
        cache: PathBuf::from(image_build::DEFAULT_CACHE),
        progress: false,
    };
    image_build::build(&opts).unwrap();
}

/// An OCI layout of the stored gcc image in `dir` (its blobs linked from the store); the
/// digests of its config and layers, and their total size.
fn gcc_layout(dir: &Path) -> (PathBuf, Vec<String>, u64) {
    let store = ImageStore::open(Path::new(STORE)).unwrap();
    let info = store
        .list()
        .unwrap()
        .into_iter()
        .find(|i| i.name == "gcc" && i.tag == "latest")
        .expect("gcc:latest in the test store");
    let blob = |d: &str| {
        Path::new(STORE)
            .join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    let manifest_bytes = fs::read(blob(&info.digest)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    for l in manifest["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_string());
    }
    let layout = dir.join("gcc-layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let mut size = 0;
    for d in digests.iter().chain(std::iter::once(&info.digest)) {
        let (from, to) = (blob(d), blobs.join(d.strip_prefix("sha256:").unwrap()));
        assert!(
            from.is_file(),
            "{} is not in the store (its layer blobs were dropped?): `unitctl image rm gcc` \
             and run again to rebuild it",
            from.display()
        );
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).unwrap();
        }
        if *d != info.digest {
            size += fs::metadata(&to).unwrap().len();
        }
    }
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        layout.join("index.json"),
        serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": manifest["mediaType"].as_str()
                    .unwrap_or("application/vnd.oci.image.manifest.v1+json"),
                "digest": info.digest,
                "size": manifest_bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": "gcc"},
            }],
        })
        .to_string(),
    )
    .unwrap();
    (layout, digests, size)
}

/// Run `script` with `sh -c`; its wall time, or `None` (and its stderr shown) if it failed.
fn time_sh(script: &str) -> Option<Duration> {
    let t = Instant::now();
    let out = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .ok()?;
    let took = t.elapsed();
    if !out.status.success() {
        eprintln!("failed: {script}\n{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    Some(took)
}

/// `unitctl image pull` into `store`: (total, until the import started).
fn flotilla_pull(
    unitctl: &str,
    reference: &str,
    settings: &Path,
    store: &Path,
) -> Option<(Duration, Duration)> {
    let t = Instant::now();
    let mut child = Command::new(unitctl)
        .args(["image", "pull", reference, "--registries"])
        .arg(settings)
        .arg("--store")
        .arg(store)
        .env_remove("FLOTILLA_IMAGES")
        .env_remove("FLOTILLA_REGISTRIES")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let mut download = None;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take()?).lines() {
        let line = line.ok()?;
        if download.is_none() && line.contains("importing into the store") {
            download = Some(t.elapsed());
        }
        lines.push(line);
    }
    let ok = child.wait().ok()?.success();
    let total = t.elapsed();
    if !ok {
        eprintln!("unitctl image pull failed:\n{}", lines.join("\n"));
        return None;
    }
    Some((total, download?))
}

fn median(times: &[Duration]) -> Option<Duration> {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied()
}

fn secs(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:>8.2} s", d.as_secs_f64()),
        None => format!("{:>10}", "failed"),
    }
}

/// Bytes under `dir` (`du -sb`).
fn du(dir: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5)
        .max(1);
    for (prog, package) in [("skopeo", "skopeo"), ("curl", "curl")] {
        qemu_tests::ensure_program(prog, package).unwrap();
    }
    eprintln!("building the gcc image (cached) ...");
    build_gcc();
    let scratch = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = scratch.path();
    let (layout, blobs, size) = gcc_layout(dir);
    let reg = TestRegistry::start(&dir.join("registry"), None, None).unwrap();
    let host = reg.host();
    let reference = format!("{host}/bench/gcc:1");
    eprintln!("pushing the gcc image ({}) to {host} ...", mib(size));
    qemu_tests::registry::push(&layout, &reference, &["--dest-tls-verify=false"]).unwrap();
    let settings = dir.join("registries.toml");
    fs::write(
        &settings,
        format!("[registry.\"{host}\"]\ninsecure = true\n"),
    )
    .unwrap();

    let unitctl = env!("CARGO_BIN_EXE_unitctl");
    let skopeo = format!(
        "skopeo --insecure-policy copy -q --src-tls-verify=false docker://{reference} oci:{}:gcc",
        dir.join("skopeo").display()
    );
    let url = |d: &str| format!("http://{host}/v2/bench/gcc/blobs/{d}");
    let out = dir.join("curl");
    let mut curl = format!(
        "mkdir -p {o} && curl -sfS -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
         -o {o}/manifest http://{host}/v2/bench/gcc/manifests/1",
        o = out.display()
    );
    for (i, d) in blobs.iter().enumerate() {
        curl.push_str(&format!(
            " && {{ curl -sfS -o {}/{i} {} & p{i}=$!; true; }}",
            out.display(),
            url(d)
        ));
    }
    for i in 0..blobs.len() {
        curl.push_str(&format!(" && wait $p{i}"));
    }

    // Like for like with flotilla's pull: skopeo's copy, then its layers extracted with tar
    // (what an OCI layout needs before a container can run from it).
    let sk_dir = dir.join("skopeo");
    let mut skopeo_tar = format!("{skopeo} && mkdir {}/rootfs", sk_dir.display());
    let mut tar_only = format!("mkdir -p {}", dir.join("tar").display());
    for d in &blobs[1..] {
        let hex = d.strip_prefix("sha256:").unwrap();
        skopeo_tar.push_str(&format!(
            " && tar -xzf {s}/blobs/sha256/{hex} -C {s}/rootfs",
            s = sk_dir.display()
        ));
        tar_only.push_str(&format!(
            " && tar -xzf {}/blobs/sha256/{hex} -C {}",
            layout.display(),
            dir.join("tar").display()
        ));
    }

    let (mut ours, mut ours_download, mut ours_import) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sk, mut sk_tar, mut tar, mut floor) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut extracted = 0;
    for round in 0..n {
        eprintln!("round {}/{n} ...", round + 1);
        let store = dir.join("store");
        if let Some((total, download)) = flotilla_pull(unitctl, &reference, &settings, &store) {
            ours.push(total);
            ours_download.push(download);
            ours_import.push(total.saturating_sub(download));
        }
        extracted = du(&store.join("layers"));
        let _ = fs::remove_dir_all(&store);
        if let Some(t) = time_sh(&skopeo) {
            sk.push(t);
        }
        let _ = fs::remove_dir_all(&sk_dir);
        if let Some(t) = time_sh(&skopeo_tar) {
            sk_tar.push(t);
        }
        let _ = fs::remove_dir_all(&sk_dir);
        if let Some(t) = time_sh(&tar_only) {
            tar.push(t);
        }
        let _ = fs::remove_dir_all(dir.join("tar"));
        if let Some(t) = time_sh(&curl) {
            floor.push(t);
        }
        let _ = fs::remove_dir_all(&out);
    }

    println!(
        "\npull of the gcc image ({} compressed in {} blobs, {} extracted) from a local \
         docker-registry (127.0.0.1, HTTP) into a fresh directory; median of {n}, one of \
         each in turn",
        mib(size),
        blobs.len(),
        mib(extracted)
    );
    println!("{:<58} {:>10} {:>12}", "", "median", "x skopeo");
    let sk_median = median(&sk);
    let row = |name: &str, times: &[Duration]| {
        let m = if times.len() == n {
            median(times)
        } else {
            None
        };
        let ratio = match (m, sk_median) {
            (Some(m), Some(s)) => format!("{:>12.2}", m.as_secs_f64() / s.as_secs_f64()),
            _ => format!("{:>12}", "-"),
        };
        println!("{name:<58} {} {ratio}", secs(m));
    };
    row(
        "flotilla: unitctl image pull (download, verify, extract)",
        &ours,
    );
    row(
        "  of which: download + verify (until the import)",
        &ours_download,
    );
    row(
        "  of which: the store's import (verify, extract, tag)",
        &ours_import,
    );
    row("skopeo copy docker://… oci:… (download + verify)", &sk);
    row("skopeo copy, then tar -xzf of its layers", &sk_tar);
    row("floor: tar -xzf of the layers (extraction alone)", &tar);
    row("floor: curl, manifest then blobs in parallel", &floor);
    println!(
        "target: flotilla <= 1.0 x skopeo (skopeo does not extract: compare the download \
         row with skopeo's, the whole pull with skopeo + tar)"
    );
}
