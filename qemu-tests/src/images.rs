//! The images the tests, the demo and the benchmark boot, built with `image_build::os`:
//! the host image of `image-build/specs/host.toml`, and a floor image (the same kernel and
//! modules with a busybox script as `/init`) to measure what the kernel alone costs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use image_build::initramfs::InitramfsEntry;
use image_build::os::{build_os, OsOptions};

use crate::{ensure_program, io_err, is_static_elf, static_binaries, QemuError, Result};

/// The line the floor image's `/init` prints once it runs.
pub const FLOOR_MARKER: &str = "flotilla-test: init reached";

/// The image-build cache: `$FLOTILLA_CACHE`, default `/var/cache/flotilla`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(image_build::DEFAULT_CACHE))
}

/// `image-build/specs/` in this workspace.
pub fn specs_dir() -> PathBuf {
    crate::workspace_root().join("image-build/specs")
}

/// `image-build/specs/host.toml` in this workspace.
pub fn host_spec() -> PathBuf {
    specs_dir().join("host.toml")
}

fn build(opts: &OsOptions) -> Result<PathBuf> {
    build_os(opts).map_err(|e| QemuError::Setup(format!("image-build os: {e}")))?;
    Ok(opts.out.clone())
}

/// Builds the host image of `spec` into `out` with the static binaries of this workspace.
pub fn host_image(spec: &Path, out: &Path, progress: bool) -> Result<PathBuf> {
    build(&OsOptions {
        spec: spec.to_path_buf(),
        out: out.to_path_buf(),
        init: None,
        bin_dir: Some(static_binaries()?),
        extra: Vec::new(),
        cache: cache_dir(),
        progress,
    })
}

/// Builds the host image of `spec` into `out` with a busybox script as `/init` instead of
/// flotilla-init: it mounts `/proc`, prints [`FLOOR_MARKER`], the guest uptime and the
/// number of modules listed, then runs `tail` (e.g. `/bin/busybox poweroff -f`).
pub fn floor_image(spec: &Path, out: &Path, tail: &str) -> Result<PathBuf> {
    let busybox = ensure_program("busybox", "busybox-static")?;
    let busybox = std::fs::canonicalize(&busybox).map_err(|e| io_err("resolve", &busybox, e))?;
    if !is_static_elf(&busybox)? {
        return Err(QemuError::Setup(format!(
            "{} must be static (Debian busybox-static)",
            busybox.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io_err("create", out, e))?;
    let init = out.join("floor-init");
    std::fs::write(
        &init,
        format!(
            "#!/bin/busybox sh\n\
             /bin/busybox mount -t proc proc /proc\n\
             /bin/busybox echo \"{FLOOR_MARKER}\"\n\
             /bin/busybox echo \"flotilla-test: uptime $(/bin/busybox cat /proc/uptime)\"\n\
             /bin/busybox echo \"flotilla-test: modules $(/bin/busybox wc -l < /etc/flotilla/modules)\"\n\
             {tail}\n"
        ),
    )
    .map_err(|e| io_err("write", &init, e))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io_err("chmod", &init, e))?;
    build(&OsOptions {
        spec: spec.to_path_buf(),
        out: out.join("image"),
        init: Some(init),
        bin_dir: Some(static_binaries()?),
        extra: vec![InitramfsEntry::File {
            path: "/bin/busybox".into(),
            source: busybox,
            mode: 0o755,
        }],
        cache: cache_dir(),
        progress: false,
    })
}

/// Makes `dest` one machine's copy of the image in `image_dir`, for booting several VMs of
/// one image at once (QEMU locks each writable disk): the kernel, initramfs, read-only
/// root and manifest are symlinked, and `var.img` is a blank sparse file of the image's
/// size, which the init formats on first boot (a copy of the image's own `var.img` would
/// carry the machine id and provisioning of any boot it has seen). Whatever was at `dest`
/// is replaced. Returns `dest`.
pub fn machine_copy(image_dir: &Path, dest: &Path) -> Result<PathBuf> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| io_err("remove", dest, e))?;
    }
    std::fs::create_dir_all(dest).map_err(|e| io_err("create", dest, e))?;
    for name in ["vmlinuz", "initramfs.img", "root.img", "manifest.json"] {
        let (src, link) = (image_dir.join(name), dest.join(name));
        let src = std::fs::canonicalize(&src).map_err(|e| io_err("resolve", &src, e))?;
        std::os::unix::fs::symlink(&src, &link).map_err(|e| io_err("symlink", &link, e))?;
    }
    let (src, var) = (image_dir.join("var.img"), dest.join("var.img"));
    let size = std::fs::metadata(&src)
        .map_err(|e| io_err("stat", &src, e))?
        .len();
    std::fs::File::create(&var)
        .and_then(|f| f.set_len(size))
        .map_err(|e| io_err("create", &var, e))?;
    Ok(dest.to_path_buf())
}
