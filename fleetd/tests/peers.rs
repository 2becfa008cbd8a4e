//! Layers from peers (issue 12): every fleetd serves its image store's blobs on its TCP API
//! and keeps the peers file its init's `unitctl image pull` reads; a pull asks the other
//! machines for each blob before the registry, verifies every byte whatever the source, and
//! in a rollout the machines pulling one image agree (an image claim) on one that fetches it
//! from the registry while the others take its blobs from it.
//!
//! Real parts: Debian's `docker-registry` (`qemu_tests::registry::TestRegistry`) on the
//! cluster's bridge, whose access log counts the blob GETs; images pushed with `skopeo copy`
//! from OCI layouts of a static busybox; etcd and network-namespace machines from
//! `cluster/mod.rs` whose inits run units in containers and pull with the real `unitctl`.
//! Needs root, `docker-registry`, `skopeo`, `busybox-static`, `etcd-server`, and `cargo build
//! -p flotilla-init` first (it builds `unitctl` too).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "cluster/mod.rs"]
mod harness;
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use harness::Cluster;
use qemu_tests::registry::{push, TestRegistry};
use serde_json::Value;

/// The lease TTL where no machine leaves (as `tests/pin.rs`).
const TTL_SECS: u64 = 30;

/// An OCI layout (in `dir/layout`) of a static busybox whose `/hello` says `hello`.
fn busybox_layout(dir: &Path, hello: &str) -> PathBuf {
    qemu_tests::registry::busybox_layout(dir, hello).unwrap().0
}

/// A registry on the cluster's bridge, marked insecure in `c.registries()`, holding
/// `team/app:1`; returns it, the settings path, the reference and the image's blobs
/// (config first, then the layers).
fn registry_with_image(c: &Cluster, dir: &Path) -> (TestRegistry, String, String, Vec<String>) {
    let registry = c.start_registry(&dir.join("registry"));
    let settings = c.registries();
    let layout = busybox_layout(&dir.join("v1"), "release one\n");
    let image = format!("{}/team/app:1", registry.host());
    push(&layout, &image, &["--dest-tls-verify=false"]).unwrap();
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    for l in manifest["layers"].as_array().unwrap() {
        blobs.push(l["digest"].as_str().unwrap().to_string());
    }
    (
        registry,
        settings.to_str().unwrap().to_string(),
        image,
        blobs,
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `unitctl` beside the `flotilla-init` the machines run.
fn unitctl() -> PathBuf {
    support::init_binary().with_file_name("unitctl")
}

/// `unitctl --json image pull IMAGE --store STORE --registries SETTINGS ARGS`, which must
/// succeed: its JSON report and its stderr.
fn pull(image: &str, store: &Path, settings: &str, args: &[&str]) -> (Value, String) {
    let out = Command::new(unitctl())
        .args(["--json", "image", "pull", image, "--store"])
        .arg(store)
        .args(["--registries", settings])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("FLOTILLA_PEERS")
        .output()
        .unwrap();
    assert!(out.status.success(), "unitctl image pull: {}", stderr(&out));
    (serde_json::from_slice(&out.stdout).unwrap(), stderr(&out))
}

/// The peers file of machine `i`, once it lists `n` peers.
fn peers_file(c: &Cluster, i: usize, n: usize) -> PathBuf {
    let path = c.nodes[i].peers_file();
    c.wait(
        &format!("m{}'s peers file to list {n} peers", i + 1),
        || {
            fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .and_then(|t| t.get("peers").and_then(|p| p.as_array()).map(Vec::len))
                == Some(n)
        },
    );
    path
}

/// Two machines: m1 pulls the image (from the registry: one GET per blob); m2's pull takes
/// every blob from m1 (its report says so; the registry's log shows no second GET), and m2
/// runs the same image. Then m1's copy of the layer is altered: a pull that asks m1 first
/// refuses its bytes (a peer cannot substitute content), takes the layer from the registry
/// and stores the right image.
#[test]
fn a_machine_takes_the_blobs_another_machine_holds_and_refuses_altered_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::start_with_containers(&["role=a", "role=b"], TTL_SECS);
    let (registry, settings, image, blobs) = registry_with_image(&c, tmp.path());
    let gets = |r: &TestRegistry| blobs.iter().map(|b| r.blob_gets(b)).collect::<Vec<_>>();
    let p1 = peers_file(&c, 0, 1);
    let p2 = peers_file(&c, 1, 1);
    let m1_api = format!("http://{}:{}", c.nodes[0].ip, harness::FLEETD_PORT);
    let p2_text = fs::read_to_string(&p2).unwrap();
    assert!(p2_text.contains(&m1_api), "{p2_text}");

    // m1 pulls: from the registry, once per blob.
    let p1s = p1.to_str().unwrap();
    let (report, _) = pull(&image, &c.images(0), &settings, &["--peers", p1s]);
    assert_eq!(gets(&registry), vec![1; blobs.len()], "{}", registry.log());
    assert_eq!(
        report["sources"][registry.host()],
        report["downloaded_bytes"]
    );

    // m2 pulls: every blob from m1, none from the registry.
    let p2s = p2.to_str().unwrap();
    let (report, err) = pull(&image, &c.images(1), &settings, &["--peers", p2s]);
    assert_eq!(
        gets(&registry),
        vec![1; blobs.len()],
        "no second GET of any blob: {err}\n{}",
        registry.log()
    );
    assert_eq!(
        report["sources"],
        serde_json::json!({ m1_api.clone(): report["downloaded_bytes"] }),
        "{report}\n{err}"
    );
    assert!(err.contains(&format!("from {m1_api}, verified")), "{err}");
    let list = Command::new(unitctl())
        .args(["image", "list", "--store"])
        .arg(c.images(1))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("/team/app"),
        "m2's store holds the image: {}",
        String::from_utf8_lossy(&list.stdout)
    );

    // m1's copy of the layer is altered (same size): m1 now serves wrong bytes for it.
    let layer = &blobs[1];
    let file = c.images(0).join("blobs/sha256").join(&layer[7..]);
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    let token = fs::read_to_string(&p1)
        .unwrap()
        .parse::<toml::Table>()
        .unwrap()["token_file"]
        .as_str()
        .unwrap()
        .to_string();
    let fresh = tmp.path().join("fresh");
    let (report, err) = pull(
        &image,
        &fresh,
        &settings,
        &["--peer", &m1_api, "--peer-token-file", &token],
    );
    assert!(
        err.contains("does not match its digest, refused (a peer cannot substitute content)"),
        "{err}"
    );
    assert_eq!(
        registry.blob_gets(layer),
        2,
        "the layer came from the registry: {}",
        registry.log()
    );
    assert_eq!(registry.blob_gets(&blobs[0]), 1, "the config from m1");
    let layer_size = bytes.len() as u64;
    assert_eq!(
        report["sources"][registry.host()].as_u64(),
        Some(layer_size),
        "{report}"
    );
    let stored = fs::read(fresh.join("blobs/sha256").join(&layer[7..])).unwrap();
    assert_ne!(
        stored, bytes,
        "the store holds the registry's bytes, not m1's"
    );
}

/// Five machines start a global unit by a pinned tag at once, none holding its image:
/// every machine runs it, and each blob of the image was fetched from the registry exactly
/// once (the registry's access log): one machine claimed the image and the others took its
/// blobs from it.
#[test]
fn a_five_machine_rollout_fetches_each_blob_from_the_registry_once() {
    let tmp = tempfile::tempdir().unwrap();
    let machines = ["m1", "m2", "m3", "m4", "m5"];
    let c = Cluster::start_with_containers(&["role=web"; 5], TTL_SECS);
    let (registry, settings, image, blobs) = registry_with_image(&c, tmp.path());
    for i in 0..machines.len() {
        peers_file(&c, i, machines.len() - 1);
    }
    let web = c.write(
        "web.toml",
        &format!(
            "[container]\nimage = \"{image}\"\n\
             command = [\"/bin/sh\", \"-c\", \"cat /hello; exec sleep 100000\"]\n\
             [fleet]\nglobal = true\n"
        ),
    );
    c.ok(&[
        "start",
        "--registries",
        &settings,
        "--block-timeout",
        "300s",
        &web,
    ]);
    for m in machines {
        c.wait(&format!("web's output on {m}"), || {
            c.hello_on("web", m).is_some()
        });
        assert_eq!(c.hello_on("web", m).as_deref(), Some("release one"), "{m}");
    }
    let counts: Vec<usize> = blobs.iter().map(|b| registry.blob_gets(b)).collect();
    assert_eq!(
        counts,
        vec![1; blobs.len()],
        "each blob fetched from the registry once (config, layer): {}\n{}",
        registry.log(),
        c.logs()
    );
}

/// `curl` of a claim route on a fleetd's TCP API (`POST`/`DELETE
/// /v2/_flotilla/claims/<digest>` with `{"holder": holder}`, the cluster's token): the answer.
fn claim_route(method: &str, api: &str, digest: &str, holder: &str, token: &Path) -> Value {
    let token = fs::read_to_string(token).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "-X", method])
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("authorization: Bearer {}", token.trim())])
        .args([
            "--data",
            &serde_json::json!({ "holder": holder }).to_string(),
        ])
        .arg(format!("{api}/v2/_flotilla/claims/{digest}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {method} {api}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A holder whose pull fails releases its image claim, and the machines waiting for it go
/// to the registry at once instead of after the claim's 300 s. First m1's pull fails (the
/// registry lost the layer): m2's pull, after the layer is back, is granted the claim and
/// fetches the image itself. Then m2 waits for a holder (m1's claim, made by hand, of an
/// image m1 never fetches) that releases its claim: m2 claims the image again, fetches it
/// from the registry and succeeds.
#[test]
fn a_failed_holder_releases_its_claim_and_the_waiters_fetch_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::start_with_containers(&["role=a", "role=b"], TTL_SECS);
    let (registry, settings, image, blobs) = registry_with_image(&c, tmp.path());
    let p1 = peers_file(&c, 0, 1);
    let p2 = peers_file(&c, 1, 1);
    let (p1s, p2s) = (p1.to_str().unwrap(), p2.to_str().unwrap());
    let m1_api = format!("http://{}:{}", c.nodes[0].ip, harness::FLEETD_PORT);
    let m2_api = format!("http://{}:{}", c.nodes[1].ip, harness::FLEETD_PORT);
    let unitctl_pull = |image: &str, store: &Path, peers: &str| {
        let mut cmd = Command::new(unitctl());
        cmd.args(["image", "pull", image, "--store"])
            .arg(store)
            .args(["--registries", &settings, "--peers", peers])
            .env("RUST_LOG", "info")
            .env_remove("FLOTILLA_PEERS");
        cmd
    };

    // m1 claims the image and its pull fails: the registry lost the layer's bytes.
    let layer = registry.blob_file(&blobs[1]);
    let aside = layer.with_extension("aside");
    fs::rename(&layer, &aside).unwrap();
    let out = unitctl_pull(&image, &c.images(0), p1s).output().unwrap();
    let err1 = stderr(&out);
    assert!(!out.status.success(), "m1's pull fails: {err1}");
    assert!(
        err1.contains("this machine fetches it from the registry"),
        "m1 held the claim: {err1}"
    );
    let released = format!("released by {m1_api} (the next claimer fetches it)");
    c.wait("the arbiter to log m1's release", || {
        c.logs().contains(&released)
    });
    fs::rename(&aside, &layer).unwrap();

    // m2 is granted the claim at once (not "m1 fetches it"), and pulls from the registry.
    let out = unitctl_pull(&image, &c.images(1), p2s).output().unwrap();
    let err2 = stderr(&out);
    assert!(out.status.success(), "m2's pull: {err2}");
    assert!(
        err2.contains("this machine fetches it from the registry"),
        "m2 holds the claim m1 released: {err2}\n{err1}"
    );
    assert!(!err2.contains(&format!("{m1_api} fetches it")), "{err2}");
    assert_eq!(registry.blob_gets(&blobs[1]), 1, "{}", registry.log());

    // A second image; m1 "holds" its claim (made by hand at both fleetds, so at its
    // arbiter too) but never fetches it.
    let layout = busybox_layout(&tmp.path().join("v2"), "release two\n");
    let image2 = format!("{}/team/app:2", registry.host());
    push(&layout, &image2, &["--dest-tls-verify=false"]).unwrap();
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image2}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let digest = format!(
        "sha256:{}",
        flotilla_container::image::hex(&{
            use sha2::Digest;
            sha2::Sha256::digest(&out.stdout)
        })
    );
    let token = PathBuf::from(
        fs::read_to_string(&p2)
            .unwrap()
            .parse::<toml::Table>()
            .unwrap()["token_file"]
            .as_str()
            .unwrap(),
    );
    for api in [&m1_api, &m2_api] {
        let answer = claim_route("POST", api, &digest, &m1_api, &token);
        assert_eq!(answer["granted"], true, "{answer}");
    }
    // m2's pull waits for m1's blobs ...
    let mut child = unitctl_pull(&image2, &c.images(1), p2s)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut seen = String::new();
    let waiting = format!("{m1_api} fetches it from the registry; taking its blobs from there");
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(&waiting) {
            break;
        }
    }
    assert!(seen.contains(&waiting), "m2 waits for m1: {seen}");
    // ... until m1 releases its claim: only the holder's release counts.
    for api in [&m1_api, &m2_api] {
        let answer = claim_route("DELETE", api, &digest, &m2_api, &token);
        assert_eq!(answer["released"], false, "not m2's claim: {answer}");
        let answer = claim_route("DELETE", api, &digest, &m1_api, &token);
        assert_eq!(answer["released"], true, "{answer}");
    }
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "m2's pull of {image2}: {seen}");
    assert!(
        seen.contains("this machine fetches it from the registry"),
        "m2 claimed the image again and fetched it: {seen}"
    );
    assert!(!seen.contains("did not serve it in time"), "{seen}");
}

/// A claim whose holder is no live machine (it died or left the cluster mid-pull: its
/// record left the registry with its lease) is dropped by the arbiter at the next claim:
/// m2's pull is granted the image at once and fetches it from the registry, instead of
/// waiting up to the claim's 300 s for blobs that will never come. The claim is made by
/// hand at both fleetds (so at the arbiter too) for an API no machine has.
#[test]
fn a_claim_whose_holder_left_the_cluster_does_not_hold_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::start_with_containers(&["role=a", "role=b"], TTL_SECS);
    let (registry, settings, image, blobs) = registry_with_image(&c, tmp.path());
    let p2 = peers_file(&c, 1, 1);
    let m1_api = format!("http://{}:{}", c.nodes[0].ip, harness::FLEETD_PORT);
    let m2_api = format!("http://{}:{}", c.nodes[1].ip, harness::FLEETD_PORT);
    // On the bridge's subnet, but no machine's: a holder that is gone.
    let gone = format!("http://{}:{}", c.bridge_ip(), harness::FLEETD_PORT + 7);
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let digest = format!(
        "sha256:{}",
        flotilla_container::image::hex(&{
            use sha2::Digest;
            sha2::Sha256::digest(&out.stdout)
        })
    );
    let token = PathBuf::from(
        fs::read_to_string(&p2)
            .unwrap()
            .parse::<toml::Table>()
            .unwrap()["token_file"]
            .as_str()
            .unwrap(),
    );
    for api in [&m1_api, &m2_api] {
        let answer = claim_route("POST", api, &digest, &gone, &token);
        assert_eq!(answer["granted"], true, "{answer}");
    }
    let mut child = Command::new(unitctl())
        .args(["image", "pull", &image, "--store"])
        .arg(c.images(1))
        .args(["--registries", &settings, "--peers", p2.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env_remove("FLOTILLA_PEERS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut seen = String::new();
    let waiting = format!("{gone} fetches it from the registry");
    for line in lines {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(&waiting) {
            // Waiting for a holder that is gone: the claim was not dropped.
            let _ = child.kill();
            let _ = child.wait();
            panic!("m2 waits for {gone}, no live machine: {seen}\n{}", c.logs());
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "m2's pull of {image}: {seen}");
    assert!(
        seen.contains("this machine fetches it from the registry"),
        "m2 was granted the claim: {seen}"
    );
    assert!(
        c.logs().contains(&format!(
            "its holder {gone} is no live machine's API: claim dropped"
        )),
        "{}",
        c.logs()
    );
    assert_eq!(registry.blob_gets(&blobs[1]), 1, "{}", registry.log());
}
