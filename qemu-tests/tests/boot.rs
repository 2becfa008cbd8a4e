//! Boots the host kernel with a test initramfs built by `image_build::os` (the real kernel
//! and module closure; `/init` is a busybox script) and checks the harness itself: console,
//! QMP, power-off, and that dropping a `Vm` kills QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_tests::{is_static_elf, Vm};

use qemu_tests::images::FLOOR_MARKER as MARKER;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds the floor image (busybox `/init` ending in `tail`) into `dir/image`.
fn build_test_image(dir: &Path, tail: &str) {
    qemu_tests::images::floor_image(&qemu_tests::images::host_spec(), dir, tail).unwrap();
}

#[test]
fn boots_to_init_and_powers_off() {
    let t = tempfile::tempdir().unwrap();
    build_test_image(t.path(), "/bin/busybox poweroff -f");
    let vm = Vm::boot(&t.path().join("image"), &[]).unwrap();
    let line = vm.wait_for(MARKER, BOOT_TIMEOUT).unwrap();
    let boot = vm.started().elapsed();
    let uptime = vm
        .wait_for("flotilla-test: uptime", Duration::from_secs(30))
        .unwrap();
    let modules = vm
        .wait_for("flotilla-test: modules", Duration::from_secs(30))
        .unwrap();
    println!(
        "boot time (QEMU start -> {line:?}): {:.2} s wall; guest says {uptime:?}; {modules:?}",
        boot.as_secs_f64()
    );
    // poweroff -f: QEMU must exit on its own.
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        status.is_some(),
        "QEMU still running after poweroff; console:\n{}",
        vm.console()
    );
    println!(
        "QEMU exited on its own {:.2} s after start ({})",
        vm.started().elapsed().as_secs_f64(),
        status.unwrap()
    );
}

#[test]
fn qmp_and_drop_kills_a_running_vm() {
    let t = tempfile::tempdir().unwrap();
    build_test_image(t.path(), "exec /bin/busybox sleep 100000");
    let vm = Vm::boot(&t.path().join("image"), &[]).unwrap();
    let started = Instant::now();
    vm.wait_for(MARKER, BOOT_TIMEOUT).unwrap();
    println!(
        "boot time (QEMU start -> marker): {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let status = vm.qmp("query-status").unwrap();
    assert_eq!(status["status"], "running", "{status}");
    assert!(vm.qmp("no-such-command").is_err());
    let pid = vm.pid();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(vm);
    // Drop killed and reaped it: the pid is gone (or, rarely, reused by something else).
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(!comm.starts_with("qemu-system"), "QEMU {pid} survived Drop");
}

#[test]
fn qmp_quit_ends_qemu() {
    let t = tempfile::tempdir().unwrap();
    build_test_image(t.path(), "exec /bin/busybox sleep 100000");
    let vm = Vm::boot(&t.path().join("image"), &[]).unwrap();
    // No need to wait for the guest: QMP answers as soon as QEMU runs.
    vm.qmp("quit").unwrap();
    assert!(vm.wait_exit(Duration::from_secs(30)).unwrap().is_some());
}

/// Builds flotilla-init statically (a release build: minutes on two cores, hence ignored;
/// run with `cargo test -p qemu-tests -- --ignored`).
#[test]
#[ignore]
fn static_init_binary_is_static() {
    let bin = qemu_tests::static_init_binary().unwrap();
    assert!(is_static_elf(&bin).unwrap());
    // Once per process: the second call is the cached result.
    assert_eq!(qemu_tests::static_init_binary().unwrap(), bin);
    println!(
        "{} ({} bytes)",
        bin.display(),
        std::fs::metadata(&bin).unwrap().len()
    );
}

#[test]
fn escapes_are_stripped() {
    assert_eq!(
        qemu_tests::strip_escapes("\u{1b}c\u{1b}[?7l\u{1b}[2Jflotilla-test: init reached"),
        MARKER
    );
}
