//! The host image's `disk.img` booted like a real machine under TCG: OVMF (UEFI) firmware,
//! systemd-boot from the ESP, slot A's entry, the init finding its root and `/var` by GPT
//! partition name; and the same image's direct kernel boot, timed side by side.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use qemu_tests::{BootOptions, Shell, Vm};

mod common;

use common::{shell, BOOT_TIMEOUT, MARKER};

const CMD: Duration = Duration::from_secs(60);

/// The block device (`vdaN`) whose GPT partition name is `name`, from sysfs.
fn partition(sh: &mut Shell, name: &str) -> String {
    sh.ok(
        &format!(
            "for d in /sys/class/block/*; do grep -qx 'PARTNAME={name}' $d/uevent && \
             basename $d; done; true"
        ),
        CMD,
    )
    .unwrap()
    .trim()
    .to_string()
}

/// Waits for the boot marker printed after the first `from` console bytes; returns the
/// seconds since `since`.
fn marker_after(vm: &Vm, from: usize, since: std::time::Instant, what: &str) -> f64 {
    let line = vm
        .wait_for_after(MARKER, from, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let secs = since.elapsed().as_secs_f64();
    println!("{what}: {line} (-> marker {secs:.2} s wall)");
    secs
}

/// disk.img boots through OVMF and systemd-boot to the boot-complete marker with slot A's
/// command line; the root is the erofs of partition `flotilla-root-a`, `/var` the ext4 of
/// `flotilla-var`; the baked-in units run (the web unit answers through a port forward);
/// what is written to `/var` and the machine id survive a reboot, which goes through the
/// firmware and the boot loader again. The direct kernel boot of the same image is timed
/// too: both boot times are printed.
#[test]
fn disk_image_boots_through_uefi_and_keeps_var_across_reboots() {
    let t = tempfile::tempdir().unwrap();
    let image = common::build_image(&qemu_tests::images::host_spec(), t.path());

    // The direct kernel boot of the same image, for the comparison.
    let direct = common::boot(&image, &[]);
    let direct_secs = marker_after(&direct, 0, direct.started(), "direct kernel boot");
    drop(direct);

    let port = qemu_tests::free_port().unwrap();
    let vm = Vm::boot_disk(
        &image,
        &BootOptions {
            debug_shell: true,
            host_forwards: vec![(port, 8080)],
            ..BootOptions::default()
        },
    )
    .unwrap();
    let disk_secs = marker_after(&vm, 0, vm.started(), "disk boot (OVMF + systemd-boot)");
    let console = vm.console();
    // The firmware started the disk's removable-media loader; the init says which slot.
    assert!(console.contains("BdsDxe: starting"), "{console}");
    for step in [
        "booted slot a",
        "find the root disk flotilla-root-a",
        "read-only on /sysroot",
        "switch root to /sysroot",
    ] {
        assert!(console.contains(step), "missing {step:?}\n{console}");
    }
    assert!(
        !console.contains("FAILED"),
        "a boot step failed:\n{console}"
    );
    assert!(
        !console.contains("staying on the initramfs"),
        "no root found:\n{console}"
    );
    println!(
        "boot times, QEMU start -> boot-complete marker: disk (OVMF + systemd-boot) \
         {disk_secs:.2} s, direct kernel {direct_secs:.2} s"
    );

    let mut sh = shell(&vm);
    let cmdline = sh.ok("cat /proc/cmdline", CMD).unwrap();
    for word in [
        "flotilla.slot=a",
        "flotilla.root=flotilla-root-a",
        "flotilla.var=flotilla-var",
        "panic=10",
        "flotilla.debug_shell=hvc0",
    ] {
        assert!(
            cmdline.split_whitespace().any(|w| w == word),
            "{word} not in {cmdline}"
        );
    }
    let root = partition(&mut sh, "flotilla-root-a");
    let var = partition(&mut sh, "flotilla-var");
    assert!(
        root.starts_with("vd") && var.starts_with("vd"),
        "{root} {var}"
    );
    let mounts = sh.ok("cat /proc/mounts", CMD).unwrap();
    assert!(
        mounts.contains(&format!("/dev/{root} / erofs ro")),
        "root is not /dev/{root} (flotilla-root-a):\n{mounts}"
    );
    assert!(
        mounts.contains(&format!("/dev/{var} /var ext4 rw")),
        "/var is not /dev/{var} (flotilla-var):\n{mounts}"
    );
    // Slot B is there and empty; nothing mounted from the ESP.
    let slot_b = partition(&mut sh, "flotilla-root-b");
    assert!(!slot_b.is_empty() && !mounts.contains(&format!("/dev/{slot_b} ")));
    let os = sh.ok("cat /etc/os-release", CMD).unwrap();
    assert!(os.contains("ID=flotilla"), "{os}");

    // The baked-in units start; the web unit answers the host.
    let mut list = String::new();
    for _ in 0..60 {
        list = sh.ok("unitctl list", CMD).unwrap();
        if list.contains("web") && list.contains("active") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(list.contains("web"), "{list}");
    let page = qemu_tests::http_get(port, "/").unwrap();
    assert!(
        page.starts_with("HTTP/1.") && page.contains("Flotilla"),
        "{page}"
    );

    // /var and the machine id survive a reboot through the firmware.
    sh.ok("head -c 65536 /dev/urandom > /var/keep && sync", CMD)
        .unwrap();
    let sum = sh.ok("sha256sum /var/keep", CMD).unwrap();
    let id = sh.ok("cat /etc/machine-id", CMD).unwrap();
    drop(sh);
    let before = vm.console().len();
    let keys: Vec<serde_json::Value> = ["ctrl", "alt", "delete"]
        .iter()
        .map(|k| serde_json::json!({ "type": "qcode", "data": k }))
        .collect();
    vm.qmp_with("send-key", serde_json::json!({ "keys": keys }))
        .unwrap();
    vm.wait_for_after("Reboot", before, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let rebooted = std::time::Instant::now();
    marker_after(
        &vm,
        before,
        rebooted,
        "disk reboot (guest reboot -> marker)",
    );
    let second = vm.console().get(before..).unwrap_or_default().to_string();
    assert!(second.contains("BdsDxe: starting"), "{second}");
    assert!(second.contains("booted slot a"), "{second}");
    assert!(!second.contains("is blank"), "{second}");
    let mut sh = shell(&vm);
    assert_eq!(sh.ok("sha256sum /var/keep", CMD).unwrap(), sum);
    assert_eq!(sh.ok("cat /etc/machine-id", CMD).unwrap(), id);
}

/// A slot B entry for these tests: version `version`, `flotilla.slot=b`, but slot A's kernel
/// and root (slot B is empty), so which entry booted shows only in `flotilla.slot`.
fn slot_b_entry(version: &str) -> String {
    format!(
        "title Flotilla {version} (slot b)\nsort-key flotilla\nversion {version}\n\
         linux /flotilla/a/vmlinuz\ninitrd /flotilla/a/initramfs.img\n\
         options console=ttyS0 quiet panic=10 flotilla.slot=b flotilla.root=flotilla-root-a \
         flotilla.var=flotilla-var\n"
    )
}

/// Boots `image`'s disk with `entries` added to the ESP; returns the slot the init says it
/// booted and the entries directory after the boot loader ran.
fn boot_with_entries(image: &std::path::Path, entries: &[(&str, String)]) -> (String, Vec<String>) {
    let vm = Vm::boot_disk(
        image,
        &BootOptions {
            esp_files: entries
                .iter()
                .map(|(name, text)| (format!("/loader/entries/{name}"), text.clone()))
                .collect(),
            ..BootOptions::default()
        },
    )
    .unwrap();
    let line = vm
        .wait_for("booted slot", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    println!(
        "{line} ({:.2} s after QEMU start)",
        vm.started().elapsed().as_secs_f64()
    );
    let slot = line
        .split("booted slot ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let esp = qemu_tests::esp_offset(image).unwrap();
    let listed = qemu_tests::list_esp_dir(vm.disk_copy().unwrap(), esp, "/loader/entries").unwrap();
    (slot, listed)
}

/// How disk.img's `loader.conf` (`default flotilla-*`, `timeout 0`) makes systemd-boot 252
/// choose, which A/B updates rely on: a newer entry with tries left wins and its counter is
/// decremented by the loader (`+2` -> `+1-1`); a newer entry whose tries are spent (`+0-3`)
/// loses to the committed slot A; an older committed entry loses to slot A.
#[test]
fn systemd_boot_prefers_newer_entries_with_tries_left_and_falls_back() {
    let t = tempfile::tempdir().unwrap();
    let image = common::build_image(&qemu_tests::images::host_spec(), t.path());

    let (slot, entries) = boot_with_entries(&image, &[("flotilla-b+2.conf", slot_b_entry("99.0"))]);
    assert_eq!(slot, "b", "{entries:?}");
    assert_eq!(entries, ["flotilla-a.conf", "flotilla-b+1-1.conf"]);

    let (slot, entries) =
        boot_with_entries(&image, &[("flotilla-b+0-3.conf", slot_b_entry("99.0"))]);
    assert_eq!(slot, "a", "{entries:?}");
    assert_eq!(entries, ["flotilla-a.conf", "flotilla-b+0-3.conf"]);

    let (slot, _) = boot_with_entries(&image, &[("flotilla-b.conf", slot_b_entry("0.0.1"))]);
    assert_eq!(slot, "a");
}
