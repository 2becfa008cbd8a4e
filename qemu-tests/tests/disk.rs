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
