//! Issue 12 end to end: a booted Flotilla host pulls a unit's image from a real registry
//! and runs it. Debian's `docker-registry` runs on the host's loopback with TLS from a CA
//! the test makes and htpasswd basic auth; the guest reaches it as `10.0.2.2` (QEMU's
//! user-mode network). The registry's credentials and CA come with the first-boot
//! provisioning (`[registries]`, its CA inline as `ca`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_tests::pki::{Ca, Usage};
use qemu_tests::registry::TestRegistry;
use qemu_tests::{BootOptions, Shell, Vm};

use common::{shell, wait_marker};

const CMD: Duration = Duration::from_secs(60);
/// Patience for a pull and a start under TCG (a TLS handshake and a 1 MB layer, unpacked
/// by the guest); only a bound for waiting, nothing is timed.
const PULL_PATIENCE: Duration = Duration::from_secs(600);
/// The host as QEMU's user-mode network shows it to the guest.
const HOST_FROM_GUEST: &str = "10.0.2.2";

/// A one-layer OCI layout in `dir/layout` of a static busybox whose `/hello` says `hello`;
/// returns it and its layer's digest.
fn busybox_layout(dir: &Path, hello: &str) -> (PathBuf, String) {
    qemu_tests::registry::busybox_layout(dir, hello).unwrap()
}

/// `unitctl --json status UNIT` in the guest, parsed.
fn status(sh: &mut Shell, unit: &str) -> serde_json::Value {
    let out = sh
        .ok(&format!("unitctl --json status {unit}"), CMD)
        .unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Polls `unitctl --json status UNIT` until `done` holds (patiently); returns that status.
fn wait_status(
    sh: &mut Shell,
    vm: &Vm,
    unit: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PULL_PATIENCE;
    loop {
        let s = status(sh, unit);
        if done(&s) {
            return s;
        }
        if Instant::now() >= deadline {
            panic!("{unit} never became {what}; last: {s:#}\n{}", vm.console());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Active and running; a failed pull fails the test at once (the unit would only retry it).
fn running(s: &serde_json::Value) -> bool {
    assert_ne!(s["result"], "pull", "the pull failed: {s:#}");
    s["state"] == "active" && s["sub_state"] == "running"
}

#[test]
fn a_provisioned_host_pulls_a_units_image_over_tls_with_basic_auth_and_runs_it() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    // Unique, so that finding them anywhere means they leaked from this test.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let password = format!("vm-pull-pw-{nonce}");
    let wrong = format!("vm-wrong-pw-{nonce}");
    let greeting = format!("served by the test registry {nonce}");

    // The CA and the registry's certificate, valid for the address the guest uses (and
    // loopback, where skopeo pushes).
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new(&pki, "registry").unwrap();
    let cert = ca
        .issue("registry", "server", Usage::Node(HOST_FROM_GUEST))
        .unwrap();
    // Two registries with the same user: the guest gets the right password for the first
    // and a wrong one for the second.
    let start = |name: &str| {
        TestRegistry::start(
            &dir.join(name),
            Some(("deploy", password.as_str())),
            Some((&cert.cert, &cert.key)),
        )
        .unwrap()
    };
    let mut reg = start("reg");
    let other = start("other");
    let certs = dir.join("certs");
    fs::create_dir_all(&certs).unwrap();
    fs::copy(ca.cert(), certs.join("ca.crt")).unwrap();
    let (layout, layer) = busybox_layout(&dir.join("img"), &format!("{greeting}\n"));
    let creds = format!("deploy:{password}");
    for r in [&reg, &other] {
        qemu_tests::registry::push(
            &layout,
            &format!("127.0.0.1:{}/team/hello:1", r.port()),
            &[
                "--dest-creds",
                &creds,
                "--dest-cert-dir",
                certs.to_str().unwrap(),
            ],
        )
        .unwrap();
    }
    let guest_ref = |r: &TestRegistry| format!("{HOST_FROM_GUEST}:{}/team/hello:1", r.port());
    let (image, denied_image) = (guest_ref(&reg), guest_ref(&other));

    let pem = qemu_tests::pki::pem(&ca.cert()).unwrap();
    let config = format!(
        r#"hostname = "vm-pull"
[network]
address = "10.0.2.15/24"
gateway = "10.0.2.2"
[registries.registry."{HOST_FROM_GUEST}:{port}"]
username = "deploy"
password = "{password}"
ca = """
{pem}"""
[registries.registry."{HOST_FROM_GUEST}:{other_port}"]
username = "deploy"
password = "{wrong}"
ca = """
{pem}"""
[[units]]
name = "hello.toml"
contents = """
[container]
image = "{image}"
command = ["/bin/sh", "-c", "cat /hello; exec sleep 100000"]
"""
[[units]]
name = "denied.toml"
contents = """
[container]
image = "{denied_image}"
command = ["/bin/sh", "-c", "cat /hello; exec sleep 100000"]
"""
"#,
        port = reg.port(),
        other_port = other.port(),
    );
    let image_dir = common::build_image(&qemu_tests::images::host_spec(), dir);
    let provision = dir.join("provision.toml");
    fs::write(&provision, &config).unwrap();
    let vm = Vm::boot_with(
        &image_dir,
        &BootOptions {
            extra_args: vec![
                "-fw_cfg".into(),
                format!("name=opt/org.flotilla/config,file={}", provision.display()),
            ],
            debug_shell: true,
            ..BootOptions::default()
        },
    )
    .unwrap();
    wait_marker(&vm);
    let mut sh = shell(&vm);

    // The settings as provisioning rendered them: credentials 0600, the CA beside them.
    let ca_file = format!(
        "/etc/flotilla/registry-ca-{HOST_FROM_GUEST}_{}.crt",
        reg.port()
    );
    let modes = sh
        .ok(
            &format!("stat -c '%a %n' /etc/flotilla/registries.toml {ca_file}"),
            CMD,
        )
        .unwrap();
    assert!(
        modes.contains("600 /etc/flotilla/registries.toml")
            && modes.contains(&format!("644 {ca_file}")),
        "{modes}"
    );
    assert_eq!(
        sh.ok(&format!("cat {ca_file}"), CMD).unwrap().trim(),
        pem.trim()
    );

    // The unit starts from the pulled image: its output is the image's /hello.
    let started = Instant::now();
    let s = wait_status(&mut sh, &vm, "hello", "active (running)", running);
    println!(
        "hello active (running) {:.1} s after the shell answered; {s}",
        started.elapsed().as_secs_f64()
    );
    let logs = sh.ok("unitctl logs hello", CMD).unwrap();
    assert!(logs.contains(&greeting), "{logs}");
    assert!(logs.contains("activating (pull)"), "{logs}");
    // Under its registry name in the guest's store.
    let list = sh.ok("unitctl image list", CMD).unwrap();
    let name = format!("{HOST_FROM_GUEST}:{}/team/hello", reg.port());
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().take(2).eq([name.as_str(), "1"])),
        "no {name} 1 in:\n{list}"
    );
    // The registry served the layer, once, to the guest.
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.log());

    // A wrong password: the unit fails with result `pull`, naming the registry's 401.
    let s = wait_status(&mut sh, &vm, "denied", "failed (pull)", |s| {
        s["result"] == "pull"
    });
    let message = s["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("401 Unauthorized") && message.contains(&denied_image),
        "{s:#}"
    );
    assert_eq!(other.blob_gets(&layer), 0, "{}", other.log());
    let denied = sh.ok("unitctl status denied", CMD).unwrap();
    assert!(denied.contains("Result: pull"), "{denied}");

    // No password anywhere the operator looks.
    let seen = [
        vm.console(),
        logs,
        list,
        denied,
        sh.ok("unitctl status hello", CMD).unwrap(),
        sh.ok("unitctl logs denied", CMD).unwrap(),
        sh.ok("unitctl list", CMD).unwrap(),
    ]
    .join("\n");
    for secret in [&password, &wrong] {
        assert!(
            !seen.contains(secret.as_str()),
            "a password leaked:\n{seen}"
        );
    }

    // The registry is gone; the image is in the store: a restart starts from the cache.
    reg.stop();
    let pid = s_main_pid(&status(&mut sh, "hello"));
    sh.ok("unitctl restart hello", CMD).unwrap();
    let s = wait_status(&mut sh, &vm, "hello", "running again", |s| {
        running(s) && s_main_pid(s) != pid
    });
    assert_ne!(s_main_pid(&s), 0, "{s:#}");
    let logs = sh.ok("unitctl logs hello", CMD).unwrap();
    assert_eq!(logs.matches(greeting.as_str()).count(), 2, "{logs}");
    assert_eq!(logs.matches("activating (pull)").count(), 1, "{logs}");

    the_shipped_ca_bundle_alone_serves_a_plain_http_pull(&mut sh, &vm, dir);
}

/// The image's own CA bundle (image-build's `[root] ca_bundle`) is `/etc/ssl/certs/
/// ca-certificates.crt` in the guest; with it alone (no `ca_file` for this registry, so no
/// fallback CA) `unitctl image pull` of an anonymous plain-HTTP registry listed as insecure
/// works: oci-client builds an HTTPS-capable client even for plain HTTP, which needs roots
/// (without any, the pull refuses with the registry crate's `NoRoots`).
fn the_shipped_ca_bundle_alone_serves_a_plain_http_pull(sh: &mut Shell, vm: &Vm, dir: &Path) {
    let link = sh
        .ok("readlink /etc/ssl/certs/ca-certificates.crt", CMD)
        .unwrap();
    assert!(
        link.contains("/usr/share/ca-certificates/ca-certificates.crt"),
        "{link}"
    );
    let count = sh
        .ok(
            "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt",
            CMD,
        )
        .unwrap();
    let host_count = fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
        .unwrap()
        .matches("BEGIN CERTIFICATE")
        .count();
    assert!(
        count.lines().any(|l| l.trim() == host_count.to_string()),
        "the guest's bundle holds {count} certificates, the build host's {host_count}"
    );
    println!("the guest's CA bundle: {host_count} certificates");

    let plain = TestRegistry::start(&dir.join("plain"), None, None).unwrap();
    // Its own layer (another /hello): the store already holds the first image's.
    let (layout, _) = busybox_layout(&dir.join("plain-img"), "plain HTTP\n");
    qemu_tests::registry::push(
        &layout,
        &format!("127.0.0.1:{}/team/plain:1", plain.port()),
        &["--dest-tls-verify=false"],
    )
    .unwrap();
    let host = format!("{HOST_FROM_GUEST}:{}", plain.port());
    qemu_tests::cluster::write_file(
        sh,
        "/tmp/plain.toml",
        &format!("[registry.\"{host}\"]\ninsecure = true\n"),
    )
    .unwrap();
    let out = sh
        .run(
            &format!("unitctl image pull --registries /tmp/plain.toml {host}/team/plain:1"),
            PULL_PATIENCE,
        )
        .unwrap();
    assert_eq!(
        out.status,
        0,
        "the pull with the shipped bundle only: {}\n{}",
        out.output,
        vm.console()
    );
    assert!(out.output.contains("downloaded 1 layers"), "{}", out.output);
    let list = sh.ok("unitctl image list", CMD).unwrap();
    let name = format!("{host}/team/plain");
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().take(2).eq([name.as_str(), "1"])),
        "no {name} 1 in:\n{list}"
    );
}

fn s_main_pid(s: &serde_json::Value) -> u64 {
    s["pid"].as_u64().unwrap_or(0)
}
