//! The real thing under TCG: the Debian cloud kernel with a static `flotilla-init` as
//! `/init`. It must mount, load its modules, start a unit as a container over the
//! initramfs root (pivot_root fails there: the runtime's MS_MOVE + chroot path), and print
//! the boot marker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use image_build::initramfs::InitramfsEntry;
use image_build::os::{build_os, OsOptions};
use qemu_tests::{ensure_program, static_init_binary, Vm};

const UNIT: &str = r#"[unit]
description = "hello from a container in the VM"
[container]
command = ["/bin/busybox", "sh", "-c", "echo hello; exec /bin/busybox sleep 1000"]
"#;

fn cache() -> PathBuf {
    std::env::var_os("FLOTILLA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(image_build::DEFAULT_CACHE))
}

#[test]
fn flotilla_init_boots_as_pid1_and_runs_a_unit() {
    let t = tempfile::tempdir().unwrap();
    let init = static_init_binary().unwrap();
    let busybox =
        std::fs::canonicalize(ensure_program("busybox", "busybox-static").unwrap()).unwrap();
    let out = t.path().join("image");
    build_os(&OsOptions {
        spec: Path::new(env!("CARGO_MANIFEST_DIR")).join("../image-build/specs/host.toml"),
        out: out.clone(),
        init: Some(init),
        extra: vec![
            InitramfsEntry::File {
                path: "/bin/busybox".into(),
                source: busybox,
                mode: 0o755,
            },
            InitramfsEntry::Bytes {
                path: "/etc/flotilla/units/hello.toml".into(),
                data: UNIT.as_bytes().to_vec(),
                mode: 0o644,
            },
        ],
        cache: cache(),
        progress: false,
    })
    .unwrap();
    let vm = Vm::boot(&out, &[]).unwrap();
    let marker = vm
        .wait_for("flotilla: boot complete in", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let console = vm.console();
    println!(
        "{marker} (QEMU start -> marker {:.2} s wall)",
        vm.started().elapsed().as_secs_f64()
    );
    assert!(marker.ends_with(", 1 units active"), "{marker}\n{console}");
    for step in [
        "mount proc on /proc",
        "mount cgroup2 on /sys/fs/cgroup",
        "load module",
    ] {
        assert!(console.contains(step), "missing {step:?}\n{console}");
    }
    assert!(
        !console.contains("FAILED"),
        "a boot step failed:\n{console}"
    );
    assert!(!console.contains("Kernel panic"), "{console}");
}
