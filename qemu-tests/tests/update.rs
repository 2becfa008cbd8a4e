//! The host updating itself in QEMU (issue 13): a v1 `disk.img` booted through OVMF and
//! systemd-boot, the signed v2 payload handed to it on an extra virtio disk (an erofs image
//! of `OUT/update/`), `unitctl os update DIR` in the guest writing slot B and rebooting into
//! it, and what must hold after the reboot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image_build::os::{build_os_with, OsOptions, UpdateOptions};
use qemu_tests::{BootOptions, Shell, Vm};

mod common;

use common::{shell, BOOT_TIMEOUT, MARKER};

const CMD: Duration = Duration::from_secs(60);
/// One update (verify, write ~10 MB to the slot and read it back, the entry): minutes
/// at most under TCG on a busy host.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(600);

/// An Ed25519 release key made with openssl, as an operator would.
fn release_key(dir: &Path) -> PathBuf {
    let openssl = qemu_tests::ensure_program("openssl", "openssl").unwrap();
    let key = dir.join("release.pem");
    let st = Command::new(openssl)
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success(), "openssl genpkey failed");
    key
}

/// `image-build os host.toml --out OUT --os-version VERSION --sign KEY` with the static
/// binaries; prints the build time (the kernel and packages come from the shared cache).
fn build_version(spec: &Path, out: &Path, version: &str, key: &Path) -> PathBuf {
    let started = Instant::now();
    build_os_with(
        &OsOptions {
            spec: spec.to_path_buf(),
            out: out.to_path_buf(),
            init: None,
            bin_dir: Some(qemu_tests::static_binaries().unwrap()),
            extra: Vec::new(),
            cache: qemu_tests::images::cache_dir(),
            progress: false,
        },
        &UpdateOptions {
            os_version: Some(version.to_string()),
            sign: Some(key.to_path_buf()),
        },
    )
    .unwrap();
    println!(
        "image-build os --os-version {version} --sign: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    out.to_path_buf()
}

/// The trial settings every version is provisioned with (first boot, v1): short, so the
/// test sees a commit and a deadline; a real host keeps the defaults (30s, 5m).
const COMMIT_AFTER: &str = "10s";
const COMMIT_DEADLINE: &str = "75s";

/// `dir/host.toml`: `specs/host.toml` with its default provisioning plus `[os]` trial
/// settings, and, when `failing`, an extra host unit that can never start (`/bin/false`,
/// restart always).
fn spec_for(dir: &Path, failing: bool) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let specs = common::specs();
    let provision = dir.join("provision.toml");
    let mut text = std::fs::read_to_string(specs.join("host-provision.toml")).unwrap();
    text.push_str(&format!(
        "\n[os]\ncommit_after = \"{COMMIT_AFTER}\"\ncommit_deadline = \"{COMMIT_DEADLINE}\"\n"
    ));
    std::fs::write(&provision, text).unwrap();
    let units = dir.join("units");
    std::fs::create_dir_all(&units).unwrap();
    for e in std::fs::read_dir(specs.join("host-units")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), units.join(e.file_name())).unwrap();
    }
    if failing {
        std::fs::write(
            units.join("crash.toml"),
            "[unit]\ndescription = \"never starts\"\n[container]\ncommand = [\"/bin/false\"]\n\
             [service]\nrestart = \"always\"\n",
        )
        .unwrap();
    }
    common::host_spec_with(dir, |spec| {
        spec.root.provision = Some(provision);
        spec.root.units = Some(units);
    })
}

/// An erofs image of the directory `update` (payloads), for the guest's second virtio disk.
fn payload_disk(update: &Path, dest: &Path) -> PathBuf {
    let mkfs = qemu_tests::ensure_program("mkfs.erofs", "erofs-utils").unwrap();
    let out = Command::new(mkfs).arg(dest).arg(update).output().unwrap();
    assert!(
        out.status.success(),
        "mkfs.erofs {}: {}",
        dest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dest.to_path_buf()
}

/// Waits for the boot marker printed after the first `from` console bytes; returns the
/// seconds since `since`.
fn marker_after(vm: &Vm, from: usize, since: Instant, what: &str) -> f64 {
    let line = vm
        .wait_for_after(MARKER, from, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let secs = since.elapsed().as_secs_f64();
    println!("{what}: {line} (-> marker {secs:.2} s wall)");
    secs
}

/// `unitctl --json os status` in the guest.
fn os_status(sh: &mut Shell) -> serde_json::Value {
    let out = sh.ok("unitctl --json os status", CMD).unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The state of `slot` in a status.
fn slot_state(st: &serde_json::Value, slot: &str) -> String {
    st["slots"]
        .as_array()
        .and_then(|s| s.iter().find(|e| e["slot"] == slot))
        .map(|e| e["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// Mounts the payload disk (the guest's only whole virtio disk holding an erofs) at
/// `/run/payload`.
fn mount_payload(sh: &mut Shell) {
    sh.ok(
        "mkdir -p /run/payload && for d in /dev/vd?; do \
         mount -t erofs -o ro $d /run/payload 2>/dev/null && break; done; \
         ls /run/payload",
        CMD,
    )
    .unwrap();
}

/// Runs `unitctl os update /run/payload/VERSION [args]` in the guest in the background (its
/// output to the serial console and `/var/update-VERSION.log`, since it ends with the
/// reboot); waits for its `wrote` line and the init's `Reboot`. Returns the console length
/// before, the time it was sent, and the seconds to the slot written.
fn update_and_reboot(vm: &Vm, sh: &mut Shell, version: &str, args: &str) -> (usize, Instant, f64) {
    let before = vm.console().len();
    let started = Instant::now();
    sh.ok(
        &format!(
            "(unitctl os update /run/payload/{version} {args} 2>&1; echo \"unitctl exit $?\") \
             | tee /var/update-{version}.log > /dev/console &"
        ),
        CMD,
    )
    .unwrap();
    let wrote = vm
        .wait_for_after("wrote ", before, UPDATE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let write_secs = started.elapsed().as_secs_f64();
    println!("{wrote} (command -> written {write_secs:.1} s wall)");
    vm.wait_for_after("Reboot", before, UPDATE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    (before, started, write_secs)
}

/// The console after its first `from` bytes.
fn console_after(vm: &Vm, from: usize) -> String {
    vm.console().get(from..).unwrap_or_default().to_string()
}

/// One VM, three versions (issue 13 end to end):
///
/// 1. A v1 disk updated to v2 in the guest with `unitctl os update DIR`: the payload is
///    verified and written to slot B, the guest reboots by itself (through the firmware and
///    systemd-boot) into slot B; then os-release says 2.0.0, `/proc/cmdline` says slot b, a
///    file written to `/var` before the update and the machine id are unchanged.
/// 2. Nobody runs `unitctl os commit`: the init commits slot b once every unit stayed
///    healthy for `commit_after` (provisioned `[os]`), and `unitctl os status` says slot b
///    committed, slot a committed (v1).
/// 3. v3 carries a unit that can never start: updated v2 -> v3 (slot a, 2 tries), it boots,
///    is never committed, the init reboots at `commit_deadline` saying why, twice; then the
///    loader boots slot b (v2) by itself, the init says `update to 3.0.0 in slot a was
///    rolled back` and `unitctl os status` shows it.
///
/// The times of the updates, the slot writes and the reboots are printed.
#[test]
fn v1_updates_to_v2_committed_by_health_then_a_failing_v3_rolls_back() {
    let t = tempfile::tempdir().unwrap();
    let key = release_key(t.path());
    let v1 = build_version(
        &spec_for(&t.path().join("s1"), false),
        &t.path().join("v1"),
        "1.0.0",
        &key,
    );
    let v2 = build_version(
        &spec_for(&t.path().join("s2"), false),
        &t.path().join("v2"),
        "2.0.0",
        &key,
    );
    let v3 = build_version(
        &spec_for(&t.path().join("s3"), true),
        &t.path().join("v3"),
        "3.0.0",
        &key,
    );
    let payloads = t.path().join("payloads");
    for (v, dir) in [("2.0.0", &v2), ("3.0.0", &v3)] {
        std::fs::create_dir_all(payloads.join(v)).unwrap();
        for e in std::fs::read_dir(dir.join("update")).unwrap() {
            let e = e.unwrap();
            std::fs::hard_link(e.path(), payloads.join(v).join(e.file_name())).unwrap();
        }
    }
    let payload = payload_disk(&payloads, &t.path().join("payload.erofs"));

    let drive = format!(
        "file={},if=virtio,format=raw,readonly=on",
        payload.display()
    );
    let vm = Vm::boot_disk(
        &v1,
        &BootOptions {
            debug_shell: true,
            extra_args: vec!["-drive".into(), drive],
            ..BootOptions::default()
        },
    )
    .unwrap();
    marker_after(&vm, 0, vm.started(), "v1 disk boot");
    let mut sh = shell(&vm);
    assert!(sh
        .ok("cat /etc/os-release", CMD)
        .unwrap()
        .contains("VERSION_ID=1.0.0"));
    assert!(sh
        .ok("cat /proc/cmdline", CMD)
        .unwrap()
        .split_whitespace()
        .any(|w| w == "flotilla.slot=a"));
    // Slot a is committed: the init judges nothing.
    assert!(!vm.console().contains("is on trial"), "{}", vm.console());
    sh.ok("head -c 65536 /dev/urandom > /var/keep && sync", CMD)
        .unwrap();
    let sum = sh.ok("sha256sum /var/keep", CMD).unwrap();
    let id = sh.ok("cat /etc/machine-id", CMD).unwrap();
    let st = os_status(&mut sh);
    assert_eq!(st["running"], "a", "{st}");
    assert_eq!(slot_state(&st, "a"), "committed", "{st}");
    mount_payload(&mut sh);

    // 1. v1 -> v2, as an operator runs it.
    let (before, started, write_secs) = update_and_reboot(&vm, &mut sh, "2.0.0", "");
    drop(sh);
    let rebooted = Instant::now();
    let reboot_secs = marker_after(&vm, before, rebooted, "reboot into slot b (v2)");
    let update_secs = started.elapsed().as_secs_f64();
    let second = console_after(&vm, before);
    assert!(second.contains("verified Flotilla 2.0.0"), "{second}");
    assert!(second.contains("next boot: slot b"), "{second}");
    assert!(second.contains("BdsDxe: starting"), "{second}");
    assert!(second.contains("booted slot b"), "{second}");
    assert!(
        second.contains("find the root disk flotilla-root-b"),
        "{second}"
    );
    assert!(!second.contains("FAILED"), "a boot step failed:\n{second}");

    let mut sh = shell(&vm);
    let os = sh.ok("cat /etc/os-release", CMD).unwrap();
    assert!(os.contains("VERSION_ID=2.0.0"), "{os}");
    let cmdline = sh.ok("cat /proc/cmdline", CMD).unwrap();
    for word in [
        "flotilla.slot=b",
        "flotilla.root=flotilla-root-b",
        // Carried over from slot a's entry by the update.
        "flotilla.debug_shell=hvc0",
    ] {
        assert!(
            cmdline.split_whitespace().any(|w| w == word),
            "{word} not in {cmdline}"
        );
    }
    assert_eq!(sh.ok("sha256sum /var/keep", CMD).unwrap(), sum);
    assert_eq!(sh.ok("cat /etc/machine-id", CMD).unwrap(), id);
    let log = sh.ok("cat /var/update-2.0.0.log", CMD).unwrap();
    assert!(log.contains("wrote ") && log.contains("rebooting"), "{log}");
    println!(
        "v1 -> v2: update command -> slot written {write_secs:.1} s, reboot -> marker in \
         slot b {reboot_secs:.1} s, whole update (command -> v2 marker) {update_secs:.1} s"
    );

    // 2. Committed by health, not by anyone: the init's own line, then the status.
    assert!(second.contains("slot b is on trial"), "{second}");
    let line = vm
        .wait_for_after("committed: every unit healthy", before, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    println!(
        "{line} ({:.1} s after the v2 reboot began)",
        rebooted.elapsed().as_secs_f64()
    );
    let st = os_status(&mut sh);
    assert_eq!(st["running"], "b", "{st}");
    assert_eq!(st["version"], "2.0.0", "{st}");
    assert_eq!(slot_state(&st, "a"), "committed", "{st}");
    assert_eq!(slot_state(&st, "b"), "committed", "{st}");
    assert!(st["rolled_back"].is_null(), "{st}");

    // 3. v2 -> v3, whose crash unit never starts: never committed, rolled back by itself.
    mount_payload(&mut sh);
    let (before, started, write_secs) = update_and_reboot(&vm, &mut sh, "3.0.0", "--tries 2");
    drop(sh);
    println!("v2 -> v3: update command -> slot written {write_secs:.1} s");
    let mut from = before;
    for attempt in 1..=2 {
        let t0 = Instant::now();
        marker_after(&vm, from, t0, &format!("v3 boot {attempt} (slot a)"));
        let line = vm
            .wait_for_after("is not committed", from, BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
        println!(
            "{line} ({:.1} s after the reboot began)",
            t0.elapsed().as_secs_f64()
        );
        let this = console_after(&vm, from);
        assert!(this.contains("booted slot a"), "{this}");
        assert!(this.contains("slot a is on trial"), "{this}");
        assert!(line.contains("unit crash"), "{line}");
        // The next boot: its console starts after this reboot's line.
        vm.wait_for_after("Reboot", from, BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
        from = vm.console().len();
    }
    let t0 = Instant::now();
    marker_after(&vm, from, t0, "fallback boot (slot b, v2)");
    let last = console_after(&vm, from);
    assert!(last.contains("booted slot b"), "{last}");
    assert!(
        last.contains("update to 3.0.0 in slot a was rolled back"),
        "{last}"
    );
    assert!(!last.contains("is on trial"), "{last}");
    println!(
        "v2 -> v3 -> back on v2: {:.1} s from the update command",
        started.elapsed().as_secs_f64()
    );
    let mut sh = shell(&vm);
    let st = os_status(&mut sh);
    assert_eq!(st["running"], "b", "{st}");
    assert_eq!(st["version"], "2.0.0", "{st}");
    assert_eq!(slot_state(&st, "b"), "committed", "{st}");
    assert_eq!(slot_state(&st, "a"), "bad", "{st}");
    assert_eq!(st["rolled_back"]["version"], "3.0.0", "{st}");
    let text = sh.ok("unitctl os status", CMD).unwrap();
    assert!(
        text.contains("the update to 3.0.0 in slot a was rolled back"),
        "{text}"
    );
    assert_eq!(sh.ok("sha256sum /var/keep", CMD).unwrap(), sum);
}
