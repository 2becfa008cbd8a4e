//! Issue 13 in a real guest booted from `disk.img` (OVMF, systemd-boot): `unitctl os status`
//! on the ESP the guest mounts itself (vfat modules in the initramfs); payloads signed by
//! another key, unsigned, or older than the running version are refused with slot B and the
//! ESP untouched; and an update whose kernel panics ("Attempted to kill init") is tried as
//! often as it was given tries, then the boot loader falls back to slot A by itself.
//! The payloads come from a real `docker-registry` on the host (QEMU's user network:
//! `10.0.2.2`), marked insecure by the guest's first-boot provisioning.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use qemu_tests::registry::TestRegistry;
use qemu_tests::update_payloads::{
    panicking_initramfs, release_key, sign_payload, signed_host_image, PayloadFiles,
    PANIC_INIT_LINE,
};
use qemu_tests::{BootOptions, Shell, Vm};

use common::{shell, BOOT_TIMEOUT, MARKER};

const CMD: Duration = Duration::from_secs(60);
/// Patience for a pull of a payload (tens of MB) and its verification under TCG; only a
/// bound for waiting.
const UPDATE_PATIENCE: Duration = Duration::from_secs(900);
/// The host as QEMU's user-mode network shows it to the guest.
const HOST_FROM_GUEST: &str = "10.0.2.2";
/// The tries given to the panicking update.
const TRIES: usize = 2;

/// The block device (`/dev/vdaN`) whose GPT partition name is `name`, from sysfs.
fn partition(sh: &mut Shell, name: &str) -> String {
    let dev = sh
        .ok(
            &format!(
                "for d in /sys/class/block/*; do grep -qx 'PARTNAME={name}' $d/uevent && \
                 basename $d; done; true"
            ),
            CMD,
        )
        .unwrap()
        .trim()
        .to_string();
    assert!(dev.starts_with("vd"), "no partition {name}: {dev:?}");
    format!("/dev/{dev}")
}

/// What a refused update must not change: the sha256 of slot B's first MiB, and every
/// file of the ESP with its sha256 (the ESP mounted read-only for the look, with the
/// charset the image ships: `osupdate::host::ESP_MOUNT_DATA`).
fn fingerprint(sh: &mut Shell, slot_b: &str, esp: &str) -> String {
    sh.ok(
        &format!(
            "head -c 1048576 {slot_b} | sha256sum; mkdir -p /run/esp-look && \
             mount -t vfat -o ro,iocharset=iso8859-1 {esp} /run/esp-look && \
             (cd /run/esp-look && find . -type f | sort | xargs sha256sum); \
             r=$?; umount /run/esp-look; test $r = 0"
        ),
        CMD,
    )
    .unwrap()
}

/// Waits until `pattern` occurs `n` times on the console after its first `from` bytes;
/// returns when it was seen (polled; `timeout` only bounds the wait).
fn wait_count(vm: &Vm, pattern: &str, from: usize, n: usize, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        let console = vm.console();
        if console
            .get(from..)
            .unwrap_or_default()
            .matches(pattern)
            .count()
            >= n
        {
            return Instant::now();
        }
        if Instant::now() >= deadline {
            panic!("{pattern:?} not seen {n} times after byte {from} in {timeout:?}:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `unitctl --json os status` in the guest, parsed.
fn os_status(sh: &mut Shell) -> serde_json::Value {
    let out = sh.ok("unitctl --json os status", CMD).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Fetches `layout`'s (an update's OCI layout) files but its signature from `reg` into
/// the guest's `dir` with busybox `wget`, by blob digest: a payload directory without
/// `manifest.json.sig`.
fn fetch_unsigned(sh: &mut Shell, reg: &TestRegistry, repo: &str, layout: &Path, dir: &str) {
    let read =
        |p: &Path| -> serde_json::Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let index = read(&layout.join("index.json"));
    let hex = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = read(&layout.join("blobs/sha256").join(&hex["sha256:".len()..]));
    sh.ok(&format!("rm -rf {dir} && mkdir -p {dir}"), CMD)
        .unwrap();
    let mut fetched = 0;
    for layer in manifest["layers"].as_array().unwrap() {
        let name = layer["annotations"]["org.opencontainers.image.title"]
            .as_str()
            .unwrap();
        if name == "manifest.json.sig" {
            continue;
        }
        let digest = layer["digest"].as_str().unwrap();
        sh.ok(
            &format!(
                "wget -q -O {dir}/{name} http://{HOST_FROM_GUEST}:{}/v2/{repo}/blobs/{digest}",
                reg.port()
            ),
            UPDATE_PATIENCE,
        )
        .unwrap();
        fetched += 1;
    }
    assert_eq!(fetched, 4, "{manifest:#}");
}

/// One disk-booted VM of a v1 host image signed with a release key: the ESP works in the
/// guest; three bad payloads are refused there with nothing changed; a v4 whose kernel
/// panics boots TRIES times on slot B, then the guest is back on slot A / v1 by itself with
/// slot B's entry bad and `/var` intact.
#[test]
fn a_panicking_update_falls_back_and_bad_payloads_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = release_key(&dir.join("release.pem")).unwrap();
    let stranger = release_key(&dir.join("stranger.pem")).unwrap();

    // v1, as `image-build os --os-version 1.0.0 --sign release.pem` builds it.
    let built = Instant::now();
    let (v1, kernel) = signed_host_image(
        &qemu_tests::images::host_spec(),
        &dir.join("v1"),
        "1.0.0",
        &key,
    )
    .unwrap();
    println!("v1 built in {:.1} s", built.elapsed().as_secs_f64());
    // The payloads, signed from v1's artifacts: v4 with an initramfs whose /init exits
    // (a kernel panic on every boot of slot B), 2.0.0 by a stranger's key, 0.9.0 (older).
    let files = PayloadFiles::of_image(&v1, &kernel);
    let v4 = sign_payload(
        &dir.join("v4"),
        "4.0.0",
        &PayloadFiles {
            initramfs: panicking_initramfs(&dir.join("panic-initramfs.img")).unwrap(),
            ..files.clone()
        },
        &key,
    )
    .unwrap();
    let foreign = sign_payload(&dir.join("foreign"), "2.0.0", &files, &stranger).unwrap();
    let old = sign_payload(&dir.join("old"), "0.9.0", &files, &key).unwrap();

    // The registry, before the VM: its port goes into the provisioning.
    let reg = TestRegistry::start(&dir.join("registry"), None, None).unwrap();
    let repo = "flotilla/os";
    for (out, version, tag) in [
        (&v4, "4.0.0", "4.0.0"),
        (&foreign, "2.0.0", "2.0.0-foreign"),
        (&old, "0.9.0", "0.9.0"),
    ] {
        let layout = out.join(format!("update-oci:{version}"));
        qemu_tests::registry::push(
            &layout,
            &format!("127.0.0.1:{}/{repo}:{tag}", reg.port()),
            &["--dest-tls-verify=false"],
        )
        .unwrap();
    }
    let guest_ref = |tag: &str| format!("{HOST_FROM_GUEST}:{}/{repo}:{tag}", reg.port());
    let provision = dir.join("provision.toml");
    fs::write(
        &provision,
        format!(
            "hostname = \"vm-fallback\"\n[network]\naddress = \"10.0.2.15/24\"\n\
             gateway = \"10.0.2.2\"\n[registries.registry.\"{HOST_FROM_GUEST}:{}\"]\n\
             insecure = true\n",
            reg.port()
        ),
    )
    .unwrap();

    let vm = Vm::boot_disk(
        &v1,
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
    vm.wait_for(MARKER, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    println!(
        "disk boot of v1 -> marker {:.1} s",
        vm.started().elapsed().as_secs_f64()
    );
    let mut sh = shell(&vm);

    // 1. The ESP in the guest: unitctl mounts it (vfat) and reads the entries.
    let text = sh.ok("unitctl os status", CMD).unwrap();
    println!("unitctl os status:\n{text}");
    assert!(
        text.contains("running: slot a, version 1.0.0"),
        "{text}\n{}",
        vm.console()
    );
    assert!(text.contains("slot a: 1.0.0 committed"), "{text}");
    let st = os_status(&mut sh);
    assert_eq!(st["running"], "a", "{st:#}");
    assert_eq!(st["next"], "a", "{st:#}");
    let slots = st["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 1, "slot b has no entry yet: {st:#}");
    assert_eq!(slots[0]["slot"], "a");
    assert_eq!(slots[0]["state"], "committed");
    let mounts = sh.ok("cat /proc/mounts", CMD).unwrap();
    assert!(
        !mounts.contains("vfat"),
        "the ESP stayed mounted:\n{mounts}"
    );

    sh.ok("head -c 65536 /dev/urandom > /var/keep && sync", CMD)
        .unwrap();
    let keep = sh.ok("sha256sum /var/keep", CMD).unwrap();

    // 3. Refused in the guest, nothing changed: slot B's first MiB and the ESP's files.
    let slot_b = partition(&mut sh, "flotilla-root-b");
    let esp = partition(&mut sh, "flotilla-esp");
    let before = fingerprint(&mut sh, &slot_b, &esp);
    println!("slot B and the ESP before:\n{before}");
    assert!(
        before.contains("loader/entries/flotilla-a.conf"),
        "{before}"
    );
    fetch_unsigned(
        &mut sh,
        &reg,
        repo,
        &v4.join("update-oci"),
        "/var/tmp/unsigned",
    );
    for (what, source, expected) in [
        (
            "signed by another key",
            guest_ref("2.0.0-foreign"),
            "which is not among the 1 trusted keys of this host",
        ),
        (
            "unsigned",
            "/var/tmp/unsigned".to_string(),
            "is not signed (no manifest.json.sig): refused",
        ),
        (
            "a downgrade",
            guest_ref("0.9.0"),
            "version 0.9.0 is older than the running version 1.0.0: refused",
        ),
    ] {
        let out = sh
            .run(&format!("unitctl os update {source} 2>&1"), UPDATE_PATIENCE)
            .unwrap();
        // The pull's progress lines are long: its verdict is the last line.
        println!(
            "{what}: exit {}: {}",
            out.status,
            out.output.trim().lines().last().unwrap_or_default()
        );
        assert_ne!(out.status, 0, "{what} was not refused: {}", out.output);
        assert!(
            out.output.contains(expected),
            "{what}: expected {expected:?} in:\n{}",
            out.output
        );
        assert_eq!(
            fingerprint(&mut sh, &slot_b, &esp),
            before,
            "{what} changed slot B or the ESP"
        );
    }

    // 2. v4, whose kernel panics: TRIES boots of slot B, then slot A by itself.
    let from = vm.console().len();
    let update = format!(
        "unitctl os update {} --tries {TRIES} > /var/update.log 2>&1; \
         echo \"exit $?\" >> /var/update.log; sync",
        guest_ref("4.0.0")
    );
    // The shell goes away with the reboot: its answer may never come. If it does come
    // and the update did not ask for the reboot, fail now rather than wait for one.
    if sh.run(&update, UPDATE_PATIENCE).is_ok() {
        if let Ok(out) = sh.run("cat /var/update.log", CMD) {
            assert!(
                out.output.contains("rebooting (orderly"),
                "the update did not reboot:\n{}",
                out.output
            );
        }
    }
    drop(sh);
    vm.wait_for_after("Reboot", from, UPDATE_PATIENCE)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let rebooted = Instant::now();
    for n in 1..=TRIES {
        let loader = wait_count(&vm, "BdsDxe: starting", from, n, BOOT_TIMEOUT);
        let init = wait_count(&vm, PANIC_INIT_LINE, from, n, BOOT_TIMEOUT);
        let panic = wait_count(&vm, "Attempted to kill init", from, n, BOOT_TIMEOUT);
        println!(
            "slot B try {n}: firmware {:.1} s, its /init {:.1} s, kernel panic {:.1} s after the reboot",
            (loader - rebooted).as_secs_f64(),
            (init - rebooted).as_secs_f64(),
            (panic - rebooted).as_secs_f64()
        );
    }
    wait_count(&vm, "BdsDxe: starting", from, TRIES + 1, BOOT_TIMEOUT);
    // Slot A's marker, or slot B tried once more than it was given (fail at once then).
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let console = vm.console();
        let after = console.get(from..).unwrap_or_default();
        if after.contains(MARKER) {
            break;
        }
        assert!(
            after.matches(PANIC_INIT_LINE).count() <= TRIES,
            "slot B booted again after its {TRIES} tries:\n{console}"
        );
        assert!(
            Instant::now() < deadline,
            "no boot-complete marker after the fallback in {BOOT_TIMEOUT:?}:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "fallback: slot A's marker {:.1} s after the reboot into the update",
        rebooted.elapsed().as_secs_f64()
    );
    let after = vm.console().get(from..).unwrap_or_default().to_string();
    let tries: Vec<&str> = after
        .lines()
        .filter(|l| l.contains(PANIC_INIT_LINE))
        .collect();
    assert_eq!(tries.len(), TRIES, "{after}");
    for line in &tries {
        assert!(
            line.split_whitespace().any(|w| w == "flotilla.slot=b"),
            "{line}"
        );
    }
    assert_eq!(
        after.matches("Kernel panic - not syncing").count(),
        TRIES,
        "{after}"
    );
    let last_boot = after.rsplit("BdsDxe: starting").next().unwrap_or_default();
    assert!(last_boot.contains("booted slot a"), "{last_boot}");
    assert!(!last_boot.contains(PANIC_INIT_LINE), "{last_boot}");

    let mut sh = shell(&vm);
    let log = sh.ok("cat /var/update.log", CMD).unwrap();
    println!("the update said:\n{log}");
    assert!(
        log.contains("verified Flotilla 4.0.0") && log.contains("next boot: slot b"),
        "{log}"
    );
    let os = sh.ok("cat /etc/os-release", CMD).unwrap();
    assert!(os.contains("VERSION_ID=1.0.0"), "{os}");
    let cmdline = sh.ok("cat /proc/cmdline", CMD).unwrap();
    assert!(
        cmdline.split_whitespace().any(|w| w == "flotilla.slot=a"),
        "{cmdline}"
    );
    let text = sh.ok("unitctl os status", CMD).unwrap();
    println!("unitctl os status after the fallback:\n{text}");
    assert!(
        text.contains(&format!("slot b: 4.0.0 bad ({TRIES} tries done)")),
        "{text}"
    );
    let st = os_status(&mut sh);
    assert_eq!(st["running"], "a", "{st:#}");
    assert_eq!(st["version"], "1.0.0", "{st:#}");
    assert_eq!(st["next"], "a", "{st:#}");
    let b = st["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slot"] == "b")
        .unwrap_or_else(|| panic!("no slot b entry: {st:#}"))
        .clone();
    assert_eq!(b["state"], "bad", "{st:#}");
    assert_eq!(b["tries_left"], 0, "{st:#}");
    assert_eq!(b["tries_done"], TRIES, "{st:#}");
    assert_eq!(b["version"], "4.0.0", "{st:#}");
    assert_eq!(sh.ok("sha256sum /var/keep", CMD).unwrap(), keep);
}
