//! `image-build os` end to end with the real kernel package (downloaded once into the
//! cache): the module closure, and reproducibility (same inputs, same bytes).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn cache() -> PathBuf {
    std::env::var_os("FLOTILLA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(image_build::DEFAULT_CACHE))
}

fn build(spec: &Path, init: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_image-build"))
        .arg("os")
        .arg(spec)
        .arg("--out")
        .arg(out)
        .arg("--init")
        .arg(init)
        .arg("--cache")
        .arg(cache())
        .output()
        .unwrap()
}

#[test]
fn host_spec_is_reproducible_and_has_the_module_closure() {
    let t = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/host.toml");
    let init = t.path().join("init");
    std::fs::write(&init, b"\x7fELF not really an init").unwrap();
    let a = build(&spec, &init, &t.path().join("a"));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let stdout = String::from_utf8_lossy(&a.stdout);
    assert!(stdout.contains("vmlinuz: sha256:"), "{stdout}");
    assert!(stdout.contains("initramfs.img: sha256:"), "{stdout}");
    // Touch the init (new mtime): same bytes in, same bytes out.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::fs::write(&init, b"\x7fELF not really an init").unwrap();
    let b = build(&spec, &init, &t.path().join("b"));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    for f in ["manifest.json", "initramfs.img", "vmlinuz"] {
        assert_eq!(
            std::fs::read(t.path().join("a").join(f)).unwrap(),
            std::fs::read(t.path().join("b").join(f)).unwrap(),
            "{f} differs between two builds"
        );
    }
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("a/manifest.json")).unwrap()).unwrap();
    let args: Vec<&str> = m["qemu"]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &args[..4],
        ["-kernel", "vmlinuz", "-initrd", "initramfs.img"]
    );
    assert!(args.windows(2).any(|w| w == ["-accel", "tcg"]));
    assert_eq!(m["artifacts"].as_array().unwrap().len(), 2);

    // The closure, from the cached kernel: dependencies before the modules needing them.
    let kernel = m["kernel"].as_str().unwrap();
    let modules_dir = cache()
        .join("kernel")
        .join(kernel)
        .join("lib/modules")
        .join(kernel);
    let closure =
        image_build::kernel::module_closure(&modules_dir, &["virtio_blk", "virtio_net"]).unwrap();
    let names: Vec<String> = closure
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n} not in {names:?}"))
    };
    assert!(pos("virtio") < pos("virtio_blk"), "{names:?}");
    assert!(pos("failover") < pos("net_failover"), "{names:?}");
    assert!(pos("net_failover") < pos("virtio_net"), "{names:?}");
}

#[test]
fn missing_module_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let spec = t.path().join("host.toml");
    std::fs::write(&spec, "[kernel]\nmodules = [\"no_such_module\"]\n").unwrap();
    let init = t.path().join("init");
    std::fs::write(&init, b"x").unwrap();
    let out = build(&spec, &init, &t.path().join("o"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no_such_module") && err.contains("neither a module nor built"),
        "{err}"
    );
}
