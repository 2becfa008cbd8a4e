//! OS update payloads for the A/B update tests (issue 13): a release key made by `openssl`,
//! a host image built with `--os-version V --sign KEY` (its payload in `OUT/update/` and
//! `OUT/update-oci/`), more payloads signed from a built image's artifacts (another version,
//! another key, another initramfs) without a second image build, and an initramfs whose
//! `/init` exits at once, so that the kernel panics ("Attempted to kill init").

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_osupdate::payload::{write_payload, PayloadSource, SigningKey};
use image_build::initramfs::{write_initramfs, InitramfsEntry};
use image_build::os::{build_os_with, OsOptions, UpdateOptions};

use crate::{ensure_program, io_err, is_static_elf, static_binaries, QemuError, Result};

/// The line a [`panicking_initramfs`]'s `/init` prints on the serial console before it exits.
pub const PANIC_INIT_LINE: &str = "flotilla-test: panicking init on";

/// Makes an Ed25519 release key at `path` with `openssl genpkey -algorithm ed25519` (Debian
/// `openssl` installed when missing).
pub fn release_key(path: &Path) -> Result<PathBuf> {
    let openssl = ensure_program("openssl", "openssl")?;
    let out = Command::new(&openssl)
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(path)
        .output()
        .map_err(|e| io_err("run", &openssl, e))?;
    if !out.status.success() {
        return Err(QemuError::Setup(format!(
            "openssl genpkey -out {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(path.to_path_buf())
}

/// Builds the host image of `spec` into `out` like [`crate::images::host_image`], as
/// `image-build os --os-version VERSION --sign KEY` does: the key's public half is trusted
/// by the root image, and the signed payload is in `out/update/` and `out/update-oci/`
/// (tag `VERSION`). Returns `out` and the kernel release.
pub fn signed_host_image(
    spec: &Path,
    out: &Path,
    version: &str,
    key: &Path,
) -> Result<(PathBuf, String)> {
    let manifest = build_os_with(
        &OsOptions {
            spec: spec.to_path_buf(),
            out: out.to_path_buf(),
            init: None,
            bin_dir: Some(static_binaries()?),
            extra: Vec::new(),
            cache: crate::images::cache_dir(),
            progress: false,
        },
        &UpdateOptions {
            os_version: Some(version.to_string()),
            sign: Some(key.to_path_buf()),
        },
    )
    .map_err(|e| QemuError::Setup(format!("image-build os --sign: {e}")))?;
    Ok((out.to_path_buf(), manifest.kernel))
}

/// The artifacts of an update payload.
#[derive(Debug, Clone)]
pub struct PayloadFiles {
    /// The kernel release the manifest names.
    pub kernel: String,
    /// The kernel.
    pub vmlinuz: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The erofs root image.
    pub root: PathBuf,
}

impl PayloadFiles {
    /// The artifacts of the host image in `image_dir` (kernel release `kernel`).
    pub fn of_image(image_dir: &Path, kernel: &str) -> PayloadFiles {
        PayloadFiles {
            kernel: kernel.to_string(),
            vmlinuz: image_dir.join("vmlinuz"),
            initramfs: image_dir.join("initramfs.img"),
            root: image_dir.join("root.img"),
        }
    }
}

/// Writes `files` as a payload of `version` signed with `key` into `out/update/`, and the
/// same as an OCI image layout in `out/update-oci/` (tag `version`), the way `image-build
/// os --sign` lays them out. Returns `out`.
pub fn sign_payload(
    out: &Path,
    version: &str,
    files: &PayloadFiles,
    key: &Path,
) -> Result<PathBuf> {
    let key = SigningKey::load(key)
        .map_err(|e| QemuError::Setup(format!("load the signing key: {e}")))?;
    let dir = out.join(image_build::os::UPDATE_DIR);
    write_payload(
        &dir,
        &PayloadSource {
            version,
            kernel: &files.kernel,
            architecture: std::env::consts::ARCH,
            vmlinuz: &files.vmlinuz,
            initramfs: &files.initramfs,
            root: &files.root,
        },
        &key,
    )
    .map_err(|e| QemuError::Setup(format!("write the payload {}: {e}", dir.display())))?;
    let layout = out.join("update-oci");
    flotilla_osupdate::oci::write_layout(&dir, &layout, version)
        .map_err(|e| QemuError::Setup(format!("write the layout {}: {e}", layout.display())))?;
    Ok(out.to_path_buf())
}

/// Writes to `path` an initramfs whose `/init` (a static busybox script) mounts `/proc`
/// and `/dev`, prints [`PANIC_INIT_LINE`] and the kernel command line on `/dev/ttyS0`, and
/// exits: the kernel panics with "Attempted to kill init!" (and reboots after `panic=N`
/// seconds). Debian `busybox-static` is installed when missing.
pub fn panicking_initramfs(path: &Path) -> Result<PathBuf> {
    let busybox = ensure_program("busybox", "busybox-static")?;
    let busybox = std::fs::canonicalize(&busybox).map_err(|e| io_err("resolve", &busybox, e))?;
    if !is_static_elf(&busybox)? {
        return Err(QemuError::Setup(format!(
            "{} must be static (Debian busybox-static)",
            busybox.display()
        )));
    }
    let script = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         /bin/busybox echo \"{PANIC_INIT_LINE} $(/bin/busybox cat /proc/cmdline)\" > /dev/ttyS0\n\
         exit 1\n"
    );
    let entries = vec![
        InitramfsEntry::Dir {
            path: "/bin".into(),
            mode: 0o755,
        },
        InitramfsEntry::Dir {
            path: "/proc".into(),
            mode: 0o755,
        },
        InitramfsEntry::Dir {
            path: "/dev".into(),
            mode: 0o755,
        },
        InitramfsEntry::File {
            path: "/bin/busybox".into(),
            source: busybox,
            mode: 0o755,
        },
        InitramfsEntry::Bytes {
            path: "/init".into(),
            data: script.into_bytes(),
            mode: 0o755,
        },
    ];
    write_initramfs(path, &entries)
        .map_err(|e| QemuError::Setup(format!("write the initramfs {}: {e}", path.display())))?;
    // Readable by the test's tools whatever the umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| io_err("chmod", path, e))?;
    Ok(path.to_path_buf())
}
