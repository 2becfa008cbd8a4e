//! The host image spec (`image-build os SPEC.toml`): `[kernel]`, `[init]`, `[root]`,
//! `[var]`, `[disk]`, parsed and validated.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use flotilla_container::image::SYSTEM_STORE;

use super::{ROOT_SERIAL, VAR_SERIAL};
use crate::disk::{check_label, parse_size};
use crate::error::io_err;
use crate::kernel::DEFAULT_KERNEL_PACKAGE;
use crate::spec::{check_dest, parse_mode, FileSpec};
use crate::BuildError;

/// The host image spec (TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsSpec {
    /// The kernel.
    #[serde(default)]
    pub kernel: KernelSpec,
    /// The init.
    #[serde(default)]
    pub init: InitSpec,
    /// The read-only root image.
    #[serde(default)]
    pub root: RootSpec,
    /// The `/var` disk.
    #[serde(default)]
    pub var: VarSpec,
    /// `[os]`: the version (absent from the canonical spec when empty, so the UUIDs of
    /// existing specs do not change).
    #[serde(default, skip_serializing_if = "OsSection::is_empty")]
    pub os: OsSection,
    /// The bootable `disk.img` (its `/var` partition is `[var] size`).
    #[serde(default)]
    pub disk: DiskSpec,
}

/// `[os]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsSection {
    /// The version (semver): os-release `VERSION_ID` and the update manifest's version;
    /// `--os-version` overrides; default the crate version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl OsSection {
    fn is_empty(&self) -> bool {
        self.version.is_none()
    }
}

/// `[kernel]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSpec {
    /// Debian kernel package (a metapackage is resolved), default `linux-image-cloud-amd64`.
    #[serde(default = "default_package")]
    pub package: String,
    /// Modules to put in the initramfs (with their dependencies), in load order.
    #[serde(default)]
    pub modules: Vec<String>,
}

impl Default for KernelSpec {
    fn default() -> Self {
        Self {
            package: default_package(),
            modules: Vec::new(),
        }
    }
}

fn default_package() -> String {
    DEFAULT_KERNEL_PACKAGE.to_string()
}

/// `[init]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// A static init binary (relative to the spec file), becomes `/init`. Without it (and
    /// without `--init` or `--bin-dir`), `/init` is `BIN_DIR/flotilla-init`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

/// Compression of the root image (`mkfs.erofs -zALGORITHM`; the kernel decompresses on read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootCompression {
    /// Uncompressed.
    #[default]
    None,
    /// LZ4.
    Lz4,
    /// LZ4HC: smaller than LZ4, slower to build, as fast to read.
    Lz4hc,
}

impl RootCompression {
    /// The `mkfs.erofs -z` algorithm, `None` when uncompressed.
    pub fn algorithm(self) -> Option<&'static str> {
        match self {
            RootCompression::None => None,
            RootCompression::Lz4 => Some("lz4"),
            RootCompression::Lz4hc => Some("lz4hc"),
        }
    }

    fn is_none(&self) -> bool {
        *self == RootCompression::None
    }
}

/// Filesystem of the root image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootFormat {
    /// erofs, made by `mkfs.erofs` (Debian `erofs-utils`).
    #[default]
    Erofs,
}

/// `[root]`: the read-only root image (`root.img`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootSpec {
    /// Filesystem, `"erofs"`.
    #[serde(default)]
    pub format: RootFormat,
    /// Volume label, default `flotilla-root`.
    #[serde(default = "default_root_label")]
    pub label: String,
    /// Static binaries installed as `/usr/bin/<name>`, from the binaries directory.
    #[serde(default)]
    pub binaries: Vec<String>,
    /// The binaries directory (relative to the spec file); `--bin-dir` overrides.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// Install the host's static busybox as `/bin/busybox`, with its applet links.
    #[serde(default)]
    pub busybox: bool,
    /// Directory of baked-in units (relative to the spec file): its `*.toml` go to the
    /// factory `/etc/flotilla/units`.
    #[serde(default)]
    pub units: Option<PathBuf>,
    /// Default provisioning config (relative to the spec file), copied to
    /// `/usr/lib/flotilla/provision.toml`.
    #[serde(default)]
    pub provision: Option<PathBuf>,
    /// More files (`[[root.files]]`: `src` relative to the spec file, absolute `dest`, `mode`).
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Container image specs (relative to the spec file) built like `image-build container`
    /// (same cache) and imported into the read-only system store
    /// ([`flotilla_container::image::SYSTEM_STORE`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<PathBuf>,
    /// Compression of the image, default none.
    #[serde(default, skip_serializing_if = "RootCompression::is_none")]
    pub compression: RootCompression,
    /// A PEM CA bundle of the build host (absolute, or relative to the spec file) shipped as
    /// [`crate::hostroot::CA_BUNDLE`], with the factory `/etc/ssl/certs/ca-certificates.crt`
    /// a link to it: the roots of every TLS client on the host (`unitctl image pull`).
    /// Debian's bundle ([`crate::hostroot::DEBIAN_CA_BUNDLE`], package `ca-certificates`) is
    /// installed with apt-get when missing; any other missing file is a spec error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<PathBuf>,
}

impl Default for RootSpec {
    fn default() -> Self {
        Self {
            format: RootFormat::Erofs,
            label: default_root_label(),
            binaries: Vec::new(),
            bin_dir: None,
            busybox: false,
            units: None,
            provision: None,
            files: Vec::new(),
            images: Vec::new(),
            compression: RootCompression::None,
            ca_bundle: None,
        }
    }
}

fn default_root_label() -> String {
    ROOT_SERIAL.to_string()
}

/// `[var]`: the empty `/var` disk (`var.img`, ext4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarSpec {
    /// Size, e.g. `"1G"`, `"512M"` (1024-based), default `1G`. The file is sparse.
    #[serde(default = "default_var_size")]
    pub size: String,
    /// Filesystem label, default `flotilla-var`.
    #[serde(default = "default_var_label")]
    pub label: String,
}

impl Default for VarSpec {
    fn default() -> Self {
        Self {
            size: default_var_size(),
            label: default_var_label(),
        }
    }
}

fn default_var_size() -> String {
    "1G".into()
}

fn default_var_label() -> String {
    VAR_SERIAL.to_string()
}

/// `[disk]`: the bootable GPT `disk.img` (EFI system partition, root slots A and B, `/var`
/// of `[var] size`). Sizes are whole MiB (partitions are MiB-aligned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The EFI system partition (FAT32: at least 64M), default `128M`. It holds the boot
    /// loader and both slots' kernels and initramfs.
    #[serde(default = "default_esp_size")]
    pub esp_size: String,
    /// Each root slot (A and B), default `512M` (a root with baked-in images such as gcc is
    /// ~200 MB); `root.img` must fit.
    #[serde(default = "default_slot_size")]
    pub slot_size: String,
}

impl Default for DiskSpec {
    fn default() -> Self {
        Self {
            esp_size: default_esp_size(),
            slot_size: default_slot_size(),
        }
    }
}

fn default_esp_size() -> String {
    "128M".into()
}

fn default_slot_size() -> String {
    "512M".into()
}

/// Smallest EFI system partition: FAT32 needs 65525 clusters (of 512 bytes here) and its FATs.
pub const MIN_ESP_SIZE: u64 = 64 << 20;

/// A `[disk]`/`[var]` size in bytes that is a whole number of MiB, at least `min`.
fn partition_size(text: &str, min: u64) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes % (1 << 20) != 0 {
        return Err("must be a whole number of MiB (e.g. \"256M\")".into());
    }
    if bytes < min {
        return Err(format!("must be at least {}M", min >> 20));
    }
    Ok(bytes)
}

impl DiskSpec {
    /// `esp_size` in bytes.
    pub fn esp_bytes(&self) -> Result<u64, String> {
        partition_size(&self.esp_size, MIN_ESP_SIZE)
            .map_err(|e| format!("[disk] esp_size {:?}: {e}", self.esp_size))
    }

    /// `slot_size` in bytes.
    pub fn slot_bytes(&self) -> Result<u64, String> {
        partition_size(&self.slot_size, 1 << 20)
            .map_err(|e| format!("[disk] slot_size {:?}: {e}", self.slot_size))
    }
}

impl OsSpec {
    /// Reads and parses a spec file.
    pub fn load(path: &Path) -> Result<OsSpec, BuildError> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err("read spec", path, e))?;
        let spec: OsSpec = toml::from_str(&text).map_err(|e| BuildError::Spec {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        spec.validate().map_err(|detail| BuildError::Spec {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), String> {
        check_label(&self.root.label).map_err(|e| format!("[root] label: {e}"))?;
        check_label(&self.var.label).map_err(|e| format!("[var] label: {e}"))?;
        partition_size(&self.var.size, 1 << 20)
            .map_err(|e| format!("[var] size {:?}: {e}", self.var.size))?;
        self.disk.esp_bytes()?;
        self.disk.slot_bytes()?;
        for b in &self.root.binaries {
            if b.is_empty() || b == "." || b == ".." || b.contains('/') {
                return Err(format!("[root] binaries: {b:?} is not a file name"));
            }
        }
        for f in &self.root.files {
            check_dest(&f.dest).map_err(|d| format!("[[root.files]] dest {:?}: {d}", f.dest))?;
            if Path::new(&f.dest).starts_with(SYSTEM_STORE) {
                return Err(format!(
                    "[[root.files]] dest {:?}: inside the system image store {SYSTEM_STORE}",
                    f.dest
                ));
            }
            if let Some(m) = &f.mode {
                parse_mode(m).map_err(|d| format!("[[root.files]] mode {m:?}: {d}"))?;
            }
        }
        Ok(())
    }
}
