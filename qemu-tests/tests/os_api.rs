//! Init's `GetOsStatus` in a real guest booted from `disk.img` (OVMF, systemd-boot): PID 1
//! mounts the ESP itself (read-only, for the moment of the read), and the guest's fleetd —
//! a container unit that cannot mount — publishes the A/B state it answers in its machine
//! record, which `fleetctl list-machines` shows (issue 13, the cluster part).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use qemu_tests::update_payloads::{release_key, signed_host_image};
use qemu_tests::{BootOptions, Vm};

use common::{shell, BOOT_TIMEOUT, MARKER};

const CMD: Duration = Duration::from_secs(60);

#[test]
fn a_disk_booted_guest_publishes_its_slots_through_init() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = release_key(&dir.join("release.pem")).unwrap();
    let built = Instant::now();
    let (v1, _kernel) = signed_host_image(
        &qemu_tests::images::host_spec(),
        &dir.join("v1"),
        "1.0.0",
        &key,
    )
    .unwrap();
    println!("v1 built in {:.1} s", built.elapsed().as_secs_f64());
    let vm = Vm::boot_disk(
        &v1,
        &BootOptions {
            debug_shell: true,
            ..BootOptions::default()
        },
    )
    .unwrap();
    vm.wait_for(MARKER, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let booted = Instant::now();
    let mut sh = shell(&vm);

    // fleetd's record carries what init read on the ESP: the booted slot, its entry.
    let record = loop {
        let out = sh.run("fleetctl list-machines --json", CMD).unwrap();
        let listed: Option<serde_json::Value> = (out.status == 0)
            .then(|| serde_json::from_str(&out.output).ok())
            .flatten();
        let machine = listed
            .as_ref()
            .and_then(|l| l.as_array())
            .and_then(|l| l.first())
            .cloned();
        if let Some(m) = machine.filter(|m| m["os"]["booted"] == "a") {
            break m;
        }
        assert!(
            booted.elapsed() < BOOT_TIMEOUT,
            "no A/B state in the machine record: {}\n{}",
            out.output,
            vm.console()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    println!(
        "machine record with the A/B state {:.1} s after the boot marker:\n{record:#}",
        booted.elapsed().as_secs_f64()
    );
    assert_eq!(record["os_version"], "1.0.0", "{record:#}");
    assert_eq!(record["os"]["next"], "a", "{record:#}");
    let slots = record["os"]["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 1, "{record:#}");
    assert_eq!(
        (&slots[0]["slot"], &slots[0]["version"], &slots[0]["state"]),
        (&"a".into(), &"1.0.0".into(), &"committed".into()),
        "{record:#}"
    );
    let table = sh.ok("fleetctl list-machines", CMD).unwrap();
    println!("{table}");
    assert!(table.contains("1.0.0"), "{table}");

    // The guest's fleetd cannot mount, so the state came from init: its read leaves no
    // ESP mounted, and nothing in the log says the read failed.
    let mounts = sh.ok("cat /proc/mounts", CMD).unwrap();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains("vfat") && !l.contains(" ro,")),
        "the ESP stayed mounted read-write:\n{mounts}"
    );
    let console = vm.console();
    assert!(
        !console.contains("cannot read the host's A/B update state"),
        "{console}"
    );
}
