//! Pinned at submit (issue 12): `fleetctl submit/start` resolves a unit file's registry
//! image by tag to the digest the registry answers, once, and submits the body with the image
//! rewritten to `host/repo:tag@sha256:<hex>`, so every machine runs the same bytes after the
//! tag moves.
//!
//! Real parts: Debian's `docker-registry` (`qemu_tests::registry::TestRegistry`) on the
//! cluster's bridge address, images pushed with `skopeo copy` from OCI layouts of a static
//! busybox written here, etcd and network-namespace machines from `cluster/mod.rs`; in the
//! cluster case the machines' inits run units in containers and pull with the real
//! `unitctl`. Needs root, `docker-registry`, `skopeo`, `busybox-static`, `etcd-server`, and
//! `cargo build -p flotilla-init` first (it builds `unitctl` too).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "cluster/mod.rs"]
mod harness;
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_container::image::hex;
use harness::Cluster;
use qemu_tests::registry::{push, TestRegistry};
use sha2::{Digest, Sha256};

/// The lease TTL where no machine leaves (as `tests/cluster.rs`' steady one): a stall of the
/// shared machine shorter than ~20 s expires nothing.
const TTL_SECS: u64 = 30;

/// An OCI layout (in `dir/layout`) of a static busybox whose `/hello` says `hello`.
fn busybox_layout(dir: &Path, hello: &str) -> PathBuf {
    qemu_tests::registry::busybox_layout(dir, hello).unwrap().0
}

/// A test registry on the cluster's bridge (the machines reach it there), the settings
/// file that marks it insecure (plain HTTP) at `c.registries()`, and the layouts of two
/// releases of one image (`/hello` says `release one` / `release two`).
struct Setup {
    registry: TestRegistry,
    settings: String,
    v1: PathBuf,
    v2: PathBuf,
}

fn setup(c: &Cluster, dir: &Path) -> Setup {
    let registry = c.start_registry(&dir.join("registry"));
    let settings = c.registries();
    Setup {
        v1: busybox_layout(&dir.join("v1"), "release one\n"),
        v2: busybox_layout(&dir.join("v2"), "release two\n"),
        settings: settings.to_str().unwrap().to_string(),
        registry,
    }
}

impl Setup {
    /// Pushes `layout` as `REGISTRY/team/app:TAG`; returns the digest the registry now
    /// answers for the tag, computed here from `skopeo inspect --raw` (not by fleetctl's code).
    fn push(&self, layout: &Path, tag: &str) -> String {
        let dest = format!("{}/team/app:{tag}", self.registry.host());
        push(layout, &dest, &["--dest-tls-verify=false"]).unwrap();
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{dest}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo inspect {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("sha256:{}", hex(&Sha256::digest(&out.stdout)))
    }

    fn image(&self, tag: &str) -> String {
        format!("{}/team/app:{tag}", self.registry.host())
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One machine: `fleetctl submit` pins the tag to the registry's digest (the body keeps its
/// comments), `status` shows it, `--no-pin` submits the tag as written, a tag the registry
/// does not know fails the command naming the unit and submits nothing (not even the good
/// file given with it); after the tag moves, submitting the same file keeps the unit's pin,
/// and `--replace` pins the new digest.
#[test]
fn submit_pins_the_tag_to_its_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::start_with_ttl(&["role=test"], TTL_SECS);
    let s = setup(&c, tmp.path());
    let d1 = s.push(&s.v1, "1");
    let image = s.image("1");
    let unit = |fleet: &str| {
        format!(
            "# the web tier\n[container]\nimage = \"{image}\"   # release 1 for now\n\
             command = [\"/bin/sh\", \"-c\", \"cat /hello; exec sleep 100000\"]\n{fleet}"
        )
    };
    let web = c.write("web.toml", &unit(""));
    let out = c.ok(&["submit", "--registries", &s.settings, &web]);
    assert!(
        out.contains(&format!("Unit web image {image} pinned to {d1}")),
        "{out}"
    );
    let body = c.ok(&["cat", "web"]);
    assert_eq!(
        body,
        unit("").replace(&image, &format!("{image}@{d1}")),
        "the body names the digest, all else as written"
    );
    let status = c.ok(&["status", "web"]);
    assert!(
        status.contains(&format!("Image: {image}@{d1}"))
            && status.contains(&format!("Pinned: {d1}")),
        "{status}"
    );

    // --no-pin: the tag as written.
    let loose = c.write("loose.toml", &unit(""));
    c.ok(&["submit", "--no-pin", "--registries", &s.settings, &loose]);
    assert_eq!(c.ok(&["cat", "loose"]), unit(""));
    let status = c.ok(&["status", "loose"]);
    assert!(status.contains("Pinned: no"), "{status}");

    // An unknown tag: the registry's answer and the unit's name; nothing is submitted.
    let good = c.write("good.toml", &unit(""));
    let bad = c.write("bad.toml", &unit("").replace(&image, &s.image("nosuch")));
    let out = c.fleetctl(&["submit", "--registries", &s.settings, &good, &bad]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("unit bad") && err.contains("nothing was submitted"),
        "{err}"
    );
    assert!(err.to_lowercase().contains("manifest unknown"), "{err}");
    let names: Vec<String> = c
        .units()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["loose", "web"], "nothing submitted");

    // The tag moves. The same file again keeps the unit's pin (no 409 for a tag that moved);
    // --replace resolves the tag again.
    let d2 = s.push(&s.v2, "1");
    assert_ne!(d1, d2);
    let out = c.ok(&["submit", "--registries", &s.settings, &web]);
    assert!(
        out.contains(&format!("keeps its image {image} pinned to {d1}")),
        "{out}"
    );
    assert!(c.ok(&["cat", "web"]).contains(&format!("{image}@{d1}")));
    let out = c.ok(&["submit", "--replace", "--registries", &s.settings, &web]);
    assert!(
        out.contains(&format!("pinned to {d2}")) && out.contains("Unit web replaced"),
        "{out}"
    );
    assert!(c.ok(&["cat", "web"]).contains(&format!("{image}@{d2}")));
}

/// The cluster: a global unit submitted by tag runs release one on m1 and m2; the tag is
/// moved to release two; a machine that joins then pulls and runs release one too, because
/// the unit names the digest (its store holds the image under that digest, and not the new
/// release).
#[test]
fn a_unit_submitted_by_tag_runs_the_same_image_everywhere_after_the_tag_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::start_with_containers(&["role=web", "role=web"], TTL_SECS);
    let s = setup(&c, tmp.path());
    let d1 = s.push(&s.v1, "1");
    let image = s.image("1");
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
        &s.settings,
        "--block-timeout",
        "120s",
        &web,
    ]);
    for m in ["m1", "m2"] {
        c.wait(&format!("web's output on {m}"), || {
            c.hello_on("web", m).is_some()
        });
        assert_eq!(c.hello_on("web", m).as_deref(), Some("release one"), "{m}");
    }

    let d2 = s.push(&s.v2, "1");
    assert_ne!(d1, d2);
    let i = c.add_node("role=web");
    c.wait_machines(3);
    c.wait("web's output on m3", || c.hello_on("web", "m3").is_some());
    assert_eq!(
        c.hello_on("web", "m3").as_deref(),
        Some("release one"),
        "the late machine runs the pinned release"
    );
    let db = fs::read_to_string(c.images(i).join("images.json")).unwrap();
    let pinned = d1.strip_prefix("sha256:").unwrap();
    assert!(
        db.contains(&format!("/team/app:sha256-{pinned}")),
        "m3's store holds the pinned image: {db}"
    );
    let status = c.ok(&["status", "web"]);
    assert!(status.contains(&format!("Pinned: {d1}")), "{status}");
    // list-units --image: every machine's copy with the pinned image.
    let short = format!("{image}@{}", &d1[..7 + 12]);
    let web_rows = |t: &str| t.lines().filter(|l| l.starts_with("web ")).count();
    c.wait("list-units to show web on 3 machines", || {
        web_rows(&c.ok(&["list-units", "--image"])) == 3
    });
    let table = c.ok(&["list-units", "--image"]);
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("web ")).collect();
    assert!(rows.iter().all(|r| r.ends_with(&short)), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&c.ok(&["list-units", "--json", "--image"])).unwrap();
    assert_eq!(json[0]["image"], format!("{image}@{d1}"), "{json}");
}
