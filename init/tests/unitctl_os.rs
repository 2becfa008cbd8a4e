//! `unitctl os status | update | rollback` on this host, against a loop device with the
//! agreed GPT layout (made by sfdisk), a directory standing in for the mounted ESP (the dev
//! host's kernel has no vfat), and files standing in for /proc/cmdline, os-release and the
//! trusted keys (the hidden path options). Payloads are signed with keys from openssl.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

#[path = "../../osupdate/tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::MIB;
use flotilla_osupdate::entries::{self, BootFile};
use flotilla_osupdate::{sha256_file, Slot};

struct Host {
    tmp: tempfile::TempDir,
    disk: common::LoopDisk,
    esp: PathBuf,
    cmdline: PathBuf,
    key: PathBuf,
}

impl Host {
    /// Running slot A at 1.0.0 (committed entry on the ESP), trusting `key`.
    fn new() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let key = common::openssl_key(tmp.path(), "release");
        let keys = tmp.path().join("update-keys");
        std::fs::create_dir(&keys).unwrap();
        common::openssl_pubkey(&key, &keys.join("release.pem"));
        std::fs::write(
            tmp.path().join("os-release"),
            "NAME=\"Flotilla\"\nID=flotilla\nVERSION_ID=1.0.0\n",
        )
        .unwrap();
        let cmdline = tmp.path().join("cmdline");
        std::fs::write(
            &cmdline,
            "console=ttyS0 quiet panic=10 flotilla.slot=a flotilla.root=flotilla-root-a flotilla.var=flotilla-var\n",
        )
        .unwrap();
        let esp = tmp.path().join("esp");
        std::fs::create_dir(&esp).unwrap();
        let (v, i, _) = common::artifacts(&tmp.path().join("v1"), 1000);
        let (vs, is) = (sha256_file(&v).unwrap().0, sha256_file(&i).unwrap().0);
        entries::install(
            &esp,
            Slot::A,
            "1.0.0",
            3,
            BootFile {
                path: &v,
                sha256: &vs,
            },
            BootFile {
                path: &i,
                sha256: &is,
            },
        )
        .unwrap();
        entries::commit(&esp, Slot::A).unwrap();
        let disk = common::loop_disk();
        Host {
            tmp,
            disk,
            esp,
            cmdline,
            key,
        }
    }

    fn unitctl(&self, args: &[&str]) -> Output {
        let t = self.tmp.path();
        let out = Command::new(env!("CARGO_BIN_EXE_unitctl"))
            .args(args)
            .arg("--esp")
            .arg(&self.esp)
            .args(["--disk", &self.disk.dev])
            .arg("--cmdline")
            .arg(&self.cmdline)
            .arg("--os-release")
            .arg(t.join("os-release"))
            .arg("--keys")
            .arg(t.join("update-keys"))
            .output()
            .unwrap();
        println!(
            "$ unitctl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn slot_b(&self) -> PathBuf {
        PathBuf::from(format!("/dev/{}p3", self.disk.dev))
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.esp.join("loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn head(dev: &Path, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open(dev)
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn update_status_and_rollback_on_a_loop_disk() {
    let h = Host::new();
    let o = h.unitctl(&["os", "status"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("running: slot a, version 1.0.0"), "{text}");
    assert!(
        text.contains("slot a: 1.0.0 committed  <- next boot"),
        "{text}"
    );

    // Refused payloads write nothing: slot B stays zero, the entries stay as they were.
    let stranger = common::openssl_key(h.tmp.path(), "stranger");
    let cases = [
        (
            "wrong-key",
            "2.0.0",
            &stranger,
            "not among the 1 trusted keys",
        ),
        (
            "downgrade",
            "0.9.0",
            &h.key,
            "older than the running version 1.0.0",
        ),
        (
            "same",
            "1.0.0",
            &h.key,
            "equal to the running version 1.0.0",
        ),
    ];
    for (name, version, key, message) in cases {
        let p = common::payload(&h.tmp.path().join(name), version, key, (2 * MIB) as usize);
        let o = h.unitctl(&["os", "update", p.to_str().unwrap(), "--no-reboot"]);
        assert!(!o.status.success(), "{name}");
        assert!(stderr(&o).contains(message), "{name}: {}", stderr(&o));
        assert!(
            head(&h.slot_b(), (2 * MIB) as usize)
                .iter()
                .all(|&b| b == 0),
            "{name}"
        );
        assert_eq!(h.entries(), ["flotilla-a.conf"], "{name}");
    }
    let unsigned = common::payload(&h.tmp.path().join("unsigned"), "2.0.0", &h.key, 1000);
    std::fs::remove_file(unsigned.join("manifest.json.sig")).unwrap();
    let o = h.unitctl(&["os", "update", unsigned.to_str().unwrap(), "--no-reboot"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not signed"), "{}", stderr(&o));
    assert_eq!(h.entries(), ["flotilla-a.conf"]);

    // A good one: slot B written and read back, its kernel on the ESP, its entry on trial.
    let good = common::payload(
        &h.tmp.path().join("good"),
        "2.0.0",
        &h.key,
        (3 * MIB) as usize,
    );
    let o = h.unitctl(&["os", "update", good.to_str().unwrap(), "--no-reboot"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("next boot: slot b (flotilla-b+3.conf, 3 tries)"),
        "{text}"
    );
    let root = std::fs::read(good.join("root.img")).unwrap();
    assert_eq!(head(&h.slot_b(), root.len()), root);
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b+3.conf"]);
    assert_eq!(
        std::fs::read(h.esp.join("flotilla/b/vmlinuz")).unwrap(),
        std::fs::read(good.join("vmlinuz")).unwrap()
    );
    let o = h.unitctl(&["--json", "os", "status"]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["running"], "a");
    assert_eq!(st["next"], "b");
    assert_eq!(st["slots"][1]["state"], "trying");
    assert_eq!(st["slots"][1]["tries_left"], 3);
    assert_eq!(st["slots"][1]["version"], "2.0.0");

    // Rollback: A boots next, B is marked bad.
    let o = h.unitctl(&["os", "rollback", "--no-reboot"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("next boot: slot a"));
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b+0.conf"]);
    let o = h.unitctl(&["os", "status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("slot b: 2.0.0 bad (0 tries done)"), "{text}");
    assert!(
        text.contains("slot a: 1.0.0 committed  <- next boot"),
        "{text}"
    );

    // Booted into B after an update (the loader counted one try): commit makes it permanent.
    let good2 = common::payload(&h.tmp.path().join("good2"), "2.1.0", &h.key, 1000);
    let o = h.unitctl(&["os", "update", good2.to_str().unwrap(), "--no-reboot"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = h.esp.join("loader/entries");
    std::fs::rename(
        dir.join("flotilla-b+3.conf"),
        dir.join("flotilla-b+2-1.conf"),
    )
    .unwrap();
    std::fs::write(&h.cmdline, "console=ttyS0 flotilla.slot=b\n").unwrap();
    let o = h.unitctl(&["os", "commit"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b.conf"]);

    // A root image larger than slot A (8 MiB): refused before anything changes, B's
    // committed entry included.
    let big = common::payload(
        &h.tmp.path().join("big"),
        "3.0.0",
        &h.key,
        (8 * MIB + 1) as usize,
    );
    let o = h.unitctl(&["os", "update", big.to_str().unwrap(), "--no-reboot"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("holds only 8388608"), "{}", stderr(&o));
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b.conf"]);

    // Booted directly (no flotilla.slot=): updates are refused with the reason.
    std::fs::write(&h.cmdline, "console=ttyS0 quiet panic=-1\n").unwrap();
    let o = h.unitctl(&["os", "update", good.to_str().unwrap(), "--no-reboot"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no flotilla.slot="), "{}", stderr(&o));
}

/// The payload as an OCI image (`flotilla_osupdate::oci::write_layout`, what `image-build os
/// --sign` writes to OUT/update-oci/) pushed with skopeo to Debian's `docker-registry` on
/// loopback; `unitctl os update HOST:PORT/flotilla/os:TAG` pulls it into the staging
/// directory and runs the same update path as a directory.
#[test]
fn update_from_a_registry_on_a_loop_disk() {
    use flotilla_osupdate::oci;
    use qemu_tests::registry::{push, TestRegistry};

    let h = Host::new();
    let t = h.tmp.path();
    let reg = TestRegistry::start(&t.join("registry"), None, None).unwrap();
    let host = reg.host();
    let settings = t.join("registries.toml");
    std::fs::write(
        &settings,
        format!("[registry.\"{host}\"]\ninsecure = true\n"),
    )
    .unwrap();
    let staging = t.join("staging");
    let push_payload = |name: &str, payload: &Path, tag: &str| -> String {
        let layout = oci::write_layout(payload, &t.join(format!("{name}-oci")), tag).unwrap();
        push(
            &layout.dir,
            &format!("{host}/flotilla/os:{tag}"),
            &["--dest-tls-verify=false"],
        )
        .unwrap();
        layout.digest
    };
    let update = |reference: &str| -> Output {
        h.unitctl(&[
            "os",
            "update",
            reference,
            "--no-reboot",
            "--registries",
            settings.to_str().unwrap(),
            "--staging",
            staging.to_str().unwrap(),
        ])
    };
    let staging_empty = || {
        std::fs::read_dir(&staging)
            .map(|rd| rd.count() == 0)
            .unwrap_or(true)
    };
    let slot_b_zero = || {
        head(&h.slot_b(), (2 * MIB) as usize)
            .iter()
            .all(|&b| b == 0)
    };

    // Signed by a key the host does not trust: pulled, then refused by the signature check;
    // nothing written, the download removed.
    let stranger = common::openssl_key(t, "stranger");
    let p = common::payload(&t.join("stranger"), "2.0.0", &stranger, (2 * MIB) as usize);
    push_payload("stranger", &p, "stranger");

    // A host that trusts no key refuses before it asks the registry for anything.
    let keys = t.join("update-keys");
    std::fs::rename(&keys, t.join("keys-aside")).unwrap();
    let o = update(&format!("{host}/flotilla/os:stranger"));
    std::fs::rename(t.join("keys-aside"), &keys).unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no trusted update keys"),
        "{}",
        stderr(&o)
    );
    assert!(
        !reg.log().contains("GET /v2/flotilla/os/manifests/"),
        "{}",
        reg.log()
    );

    let o = update(&format!("{host}/flotilla/os:stranger"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not among the 1 trusted keys"),
        "{}",
        stderr(&o)
    );
    assert!(slot_b_zero());
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
    assert!(staging_empty());

    // The same image under an image index (skopeo copy --all): refused, an update is one
    // manifest.
    let layout = t.join("stranger-oci");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut entry = index["manifests"][0].clone();
    entry.as_object_mut().unwrap().remove("annotations");
    entry["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry],
    }))
    .unwrap();
    let nested_path = t.join("nested.json");
    std::fs::write(&nested_path, &nested).unwrap();
    let (nested_hex, _) = flotilla_osupdate::sha256_file(&nested_path).unwrap();
    std::fs::write(layout.join("blobs/sha256").join(&nested_hex), &nested).unwrap();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": format!("sha256:{nested_hex}"),
                "size": nested.len(),
                "annotations": {"org.opencontainers.image.ref.name": "index"},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    push(
        &layout,
        &format!("{host}/flotilla/os:index"),
        &["--all", "--dest-tls-verify=false"],
    )
    .unwrap();
    let o = update(&format!("{host}/flotilla/os:index"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is an image index"), "{}", stderr(&o));
    assert!(slot_b_zero());
    assert!(staging_empty());

    // A container image is not an OS update: refused before any blob is downloaded.
    let (app, layer) = qemu_tests::registry::busybox_layout(&t.join("app"), "hi\n").unwrap();
    push(
        &app,
        &format!("{host}/flotilla/os:app"),
        &["--dest-tls-verify=false"],
    )
    .unwrap();
    let o = update(&format!("{host}/flotilla/os:app"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not a Flotilla OS update")
            && stderr(&o).contains("application/vnd.oci.image.config.v1+json"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        reg.blob_gets(&layer),
        0,
        "a layer of the container image was fetched"
    );
    assert!(slot_b_zero());
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
    assert!(staging_empty());

    // A root image altered in the registry's storage: the download does not match its
    // digest; nothing written.
    let p = common::payload(&t.join("tampered"), "2.0.0", &h.key, (2 * MIB) as usize + 7);
    push_payload("tampered", &p, "tampered");
    let (root_hex, _) = flotilla_osupdate::sha256_file(&p.join("root.img")).unwrap();
    let blob = reg.blob_file(&format!("sha256:{root_hex}"));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let o = update(&format!("{host}/flotilla/os:tampered"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not match its digest"),
        "{}",
        stderr(&o)
    );
    assert!(slot_b_zero());
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
    assert!(staging_empty());

    // A manifest altered in the registry's storage, pulled by its digest: refused before
    // any file is fetched.
    let p = common::payload(&t.join("altered"), "2.0.0", &h.key, 5000);
    let digest = push_payload("altered", &p, "altered");
    let mblob = reg.blob_file(&digest);
    let text = std::fs::read_to_string(&mblob).unwrap();
    assert!(text.contains("\"2.0.0\""));
    std::fs::write(&mblob, text.replace("\"2.0.0\"", "\"9.0.0\"")).unwrap();
    let o = update(&format!("{host}/flotilla/os@{digest}"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the manifest") && stderr(&o).contains("does not match its digest"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("downloaded"), "{}", stderr(&o));
    assert!(slot_b_zero());
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
    assert!(staging_empty());

    // A /var too small for the download (a 1 MiB tmpfs as the staging directory): refused
    // from the manifest's sizes, before any file is fetched.
    struct Tmpfs(PathBuf);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let small = t.join("small");
    std::fs::create_dir(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success());
    let small = Tmpfs(small);
    let p = common::payload(&t.join("roomy"), "2.0.0", &h.key, (2 * MIB) as usize + 11);
    push_payload("roomy", &p, "roomy");
    let (root_hex, _) = flotilla_osupdate::sha256_file(&p.join("root.img")).unwrap();
    let o = h.unitctl(&[
        "os",
        "update",
        &format!("{host}/flotilla/os:roomy"),
        "--no-reboot",
        "--registries",
        settings.to_str().unwrap(),
        "--staging",
        small.0.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("are free there: refused, nothing downloaded"),
        "{}",
        stderr(&o)
    );
    assert_eq!(reg.blob_gets(&format!("sha256:{root_hex}")), 0);
    assert_eq!(std::fs::read_dir(&small.0).unwrap().count(), 0);
    drop(small);
    assert!(slot_b_zero());
    assert_eq!(h.entries(), ["flotilla-a.conf"]);

    // A name that is neither a directory nor a reference.
    let o = update("./no-such-payload");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no such payload directory"),
        "{}",
        stderr(&o)
    );

    // The signed v2, by tag: slot B written and read back, the trial entry installed.
    let good = common::payload(&t.join("good"), "2.0.0", &h.key, (3 * MIB) as usize);
    let digest = push_payload("good", &good, "2");
    let started = std::time::Instant::now();
    let o = update(&format!("{host}/flotilla/os:2"));
    println!(
        "unitctl os update {host}/flotilla/os:2 (3 MiB root): {:.2}s",
        started.elapsed().as_secs_f64()
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("pulled {host}/flotilla/os:2 {digest}")),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("verified"), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("next boot: slot b (flotilla-b+3.conf, 3 tries)"),
        "{text}"
    );
    let root = std::fs::read(good.join("root.img")).unwrap();
    assert_eq!(head(&h.slot_b(), root.len()), root);
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b+3.conf"]);
    assert_eq!(
        std::fs::read(h.esp.join("flotilla/b/vmlinuz")).unwrap(),
        std::fs::read(good.join("vmlinuz")).unwrap()
    );
    assert!(staging_empty());

    // By digest too (2.1.0 over the trial 2.0.0).
    let next = common::payload(&t.join("next"), "2.1.0", &h.key, 1000);
    let digest = push_payload("next", &next, "2.1.0");
    let reference = format!("{host}/flotilla/os@{digest}");
    let o = h.unitctl(&[
        "--json",
        "os",
        "update",
        &reference,
        "--no-reboot",
        "--registries",
        settings.to_str().unwrap(),
        "--staging",
        staging.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["version"], "2.1.0");
    assert_eq!(r["pulled"]["digest"], digest.as_str());
    assert_eq!(r["pulled"]["reference"], reference.as_str());
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b+3.conf"]);
    let o = h.unitctl(&["--json", "os", "status"]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["slots"][1]["version"], "2.1.0");
    assert!(staging_empty());

    // The download of a killed update (its pid gone) is removed by the next one; nothing
    // else in the staging directory is touched.
    let leftover = staging.join("999999999-1");
    std::fs::create_dir_all(leftover.join("blobs")).unwrap();
    std::fs::create_dir_all(staging.join("keep-me")).unwrap();
    std::fs::write(staging.join("keep-me/file"), "not ours").unwrap();
    let o = update(&format!("{host}/flotilla/os:stranger"));
    assert!(!o.status.success());
    assert!(!leftover.exists());
    let names: Vec<String> = std::fs::read_dir(&staging)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["keep-me"]);
}

/// `unitctl os update REF` with the settings `unitctl image pull` uses: basic auth over TLS
/// with the registry's CA as `ca_file` (a CA made by openssl), the password in a 0600
/// `registries.toml`. A wrong password is the registry's 401, named, without the password,
/// and nothing is written; the right one updates.
#[test]
fn update_from_a_registry_with_credentials_over_tls() {
    use std::os::unix::fs::PermissionsExt;

    use flotilla_osupdate::oci;
    use qemu_tests::pki::{Ca, Usage};
    use qemu_tests::registry::{push, TestRegistry};

    let h = Host::new();
    let t = h.tmp.path();
    let pki = t.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new(&pki, "registry").unwrap();
    let cert = ca
        .issue("registry", "server", Usage::Node("127.0.0.1"))
        .unwrap();
    let reg = TestRegistry::start(
        &t.join("registry"),
        Some(("ops", "0s-pw-9")),
        Some((&cert.cert, &cert.key)),
    )
    .unwrap();
    let host = reg.host();
    let certs = t.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(ca.cert(), certs.join("ca.crt")).unwrap();
    let good = common::payload(&t.join("good"), "2.0.0", &h.key, (2 * MIB) as usize);
    let layout = oci::write_layout(&good, &t.join("good-oci"), "2.0.0").unwrap();
    push(
        &layout.dir,
        &format!("{host}/flotilla/os:2.0.0"),
        &[
            "--dest-creds",
            "ops:0s-pw-9",
            "--dest-cert-dir",
            certs.to_str().unwrap(),
        ],
    )
    .unwrap();
    let settings = t.join("registries.toml");
    let staging = t.join("staging");
    let update = |password: &str| -> Output {
        std::fs::write(
            &settings,
            format!(
                "[registry.\"{host}\"]\nusername = \"ops\"\npassword = \"{password}\"\nca_file = \"{}\"\n",
                ca.cert().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&settings, std::fs::Permissions::from_mode(0o600)).unwrap();
        h.unitctl(&[
            "os",
            "update",
            &format!("{host}/flotilla/os:2.0.0"),
            "--no-reboot",
            "--registries",
            settings.to_str().unwrap(),
            "--staging",
            staging.to_str().unwrap(),
        ])
    };

    let o = update("wrong-pw");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("401 Unauthorized") && err.contains(&host),
        "{err}"
    );
    assert!(!err.contains("wrong-pw"), "{err}");
    assert!(head(&h.slot_b(), (2 * MIB) as usize)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(h.entries(), ["flotilla-a.conf"]);
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);

    let o = update("0s-pw-9");
    assert!(o.status.success(), "{}", stderr(&o));
    let root = std::fs::read(good.join("root.img")).unwrap();
    assert_eq!(head(&h.slot_b(), root.len()), root);
    assert_eq!(h.entries(), ["flotilla-a.conf", "flotilla-b+3.conf"]);
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
}
