//! Shared by the QEMU tests: a host spec derived from `image-build/specs/host.toml`, the
//! image built from it with the static binaries, and a boot with the debug shell.
// Each test file uses a part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use image_build::os::OsSpec;
use qemu_tests::{BootOptions, Shell, Vm};

/// How long a boot may take under TCG.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// The line flotilla-init prints once the first start settled.
pub const MARKER: &str = "flotilla: boot complete in";

/// `image-build/specs/`.
pub fn specs() -> PathBuf {
    qemu_tests::images::specs_dir()
}

/// Writes `dir/host.toml`: `specs/host.toml` with its paths made absolute, then changed by
/// `edit`.
pub fn host_spec_with(dir: &Path, edit: impl FnOnce(&mut OsSpec)) -> PathBuf {
    let specs = specs();
    let mut spec = OsSpec::load(&specs.join("host.toml")).unwrap();
    let abs = |p: &mut Option<PathBuf>| *p = p.as_ref().map(|p| specs.join(p));
    abs(&mut spec.init.binary);
    abs(&mut spec.root.bin_dir);
    abs(&mut spec.root.units);
    abs(&mut spec.root.provision);
    for f in &mut spec.root.files {
        f.src = specs.join(&f.src);
    }
    edit(&mut spec);
    let path = dir.join("host.toml");
    std::fs::write(&path, toml::to_string(&spec).unwrap()).unwrap();
    path
}

/// Builds the image of `spec` into `dir/image` with the static flotilla-init and unitctl.
pub fn build_image(spec: &Path, dir: &Path) -> PathBuf {
    qemu_tests::images::host_image(spec, &dir.join("image"), false).unwrap()
}

/// The size of `image/NAME` in MB.
pub fn size_mb(image: &Path, name: &str) -> f64 {
    std::fs::metadata(image.join(name)).unwrap().len() as f64 / 1e6
}

/// Boots `image` (its default provisioning) with the debug shell and `extra_args`.
pub fn boot(image: &Path, extra_args: &[&str]) -> Vm {
    Vm::boot_with(
        image,
        &BootOptions {
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            debug_shell: true,
            ..BootOptions::default()
        },
    )
    .unwrap()
}

/// Waits for the boot marker; prints it with the wall time since QEMU started.
pub fn wait_marker(vm: &Vm) -> String {
    let marker = vm
        .wait_for(MARKER, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    println!(
        "{marker} (QEMU start -> marker {:.2} s wall)",
        vm.started().elapsed().as_secs_f64()
    );
    marker
}

/// The guest's debug shell.
pub fn shell(vm: &Vm) -> Shell {
    vm.shell(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()))
}
