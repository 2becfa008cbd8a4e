//! `image-build os`: the bootable host image. This increment: the kernel, an initramfs
//! (the init as `/init` plus the kernel modules it loads), and `manifest.json` with the
//! artifacts' digests and the QEMU arguments that boot them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::initramfs::{write_initramfs, InitramfsEntry};
use crate::kernel::{fetch_kernel, module_closure, DEFAULT_KERNEL_PACKAGE};
use crate::{human, io_err, BuildError, Steps};

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
    /// A static init binary (relative to the spec file), becomes `/init`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

impl OsSpec {
    /// Reads and parses a spec file.
    pub fn load(path: &Path) -> Result<OsSpec, BuildError> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err("read spec", path, e))?;
        toml::from_str(&text).map_err(|e| BuildError::Spec {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }
}

/// Options of `image-build os`.
#[derive(Debug, Clone)]
pub struct OsOptions {
    /// The spec file.
    pub spec: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Init binary, overriding `[init] binary`.
    pub init: Option<PathBuf>,
    /// More initramfs entries (tests put a busybox here).
    pub extra: Vec<InitramfsEntry>,
    /// Cache directory (the kernel goes to `CACHE/kernel/`).
    pub cache: PathBuf,
    /// Show spinners.
    pub progress: bool,
}

/// One file of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// `vmlinuz`, `initramfs`.
    pub name: String,
    /// Relative to the output directory.
    pub path: String,
    /// Hex sha256.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// How to boot the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuSpec {
    /// Arguments of `qemu-system-x86_64`, paths relative to the image directory.
    pub args: Vec<String>,
}

/// `manifest.json` of a host image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsManifest {
    /// The kernel release.
    pub kernel: String,
    /// The files.
    pub artifacts: Vec<Artifact>,
    /// How to boot them.
    pub qemu: QemuSpec,
}

/// The kernel command line of the image.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// Where the init finds the list of modules to load (one `.ko` path per line, in order).
pub const MODULES_LIST: &str = "/etc/flotilla/modules";

fn sha256_file(path: &Path) -> Result<(String, u64), BuildError> {
    let bytes = std::fs::read(path).map_err(|e| io_err("read", path, e))?;
    let digest = sha2::Sha256::digest(&bytes);
    Ok((
        digest.iter().map(|b| format!("{b:02x}")).collect(),
        bytes.len() as u64,
    ))
}

/// Builds the host image of `opts.spec` into `opts.out`.
pub fn build_os(opts: &OsOptions) -> Result<OsManifest, BuildError> {
    let started = Instant::now();
    let spec = OsSpec::load(&opts.spec)?;
    let spec_dir = match opts.spec.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let init = match (&opts.init, &spec.init.binary) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => spec_dir.join(p),
        (None, None) => {
            return Err(BuildError::Usage(
                "no init: give [init] binary in the spec or --init PATH".into(),
            ))
        }
    };
    if !init.is_file() {
        return Err(BuildError::Usage(format!(
            "init binary {} does not exist",
            init.display()
        )));
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| io_err("create", &opts.out, e))?;
    let mut steps = Steps {
        n: 0,
        total: 4,
        progress: opts.progress,
    };

    // 1. Kernel.
    steps.line(&format!("kernel: {}", spec.kernel.package));
    let pb = steps.spinner("resolving");
    let (kernel, cached) = fetch_kernel(&opts.cache, &spec.kernel.package, &pb)?;
    pb.finish_and_clear();
    println!(
        "      {} {}{}",
        kernel.package,
        kernel.version,
        if cached { " (cached)" } else { "" }
    );
    let vmlinuz = opts.out.join("vmlinuz");
    std::fs::copy(&kernel.vmlinuz, &vmlinuz).map_err(|e| io_err("copy", &kernel.vmlinuz, e))?;

    // 2. Modules.
    let names: Vec<&str> = spec.kernel.modules.iter().map(String::as_str).collect();
    let closure = module_closure(&kernel.modules_dir, &names)?;
    steps.line(&format!(
        "modules: {} requested, {} to load with dependencies",
        names.len(),
        closure.len()
    ));

    // 3. Initramfs.
    let mod_root = format!("/lib/modules/{}", kernel.version);
    let mut entries: Vec<InitramfsEntry> =
        ["/proc", "/sys", "/dev", "/run", "/tmp", "/var", "/etc"]
            .iter()
            .map(|d| InitramfsEntry::Dir {
                path: (*d).to_string(),
                mode: if *d == "/tmp" { 0o1777 } else { 0o755 },
            })
            .collect();
    entries.push(InitramfsEntry::File {
        path: "/init".into(),
        source: init.clone(),
        mode: 0o755,
    });
    let mut list = String::new();
    for rel in &closure {
        let path = format!("{mod_root}/{}", rel.display());
        list.push_str(&path);
        list.push('\n');
        entries.push(InitramfsEntry::File {
            path,
            source: kernel.modules_dir.join(rel),
            mode: 0o644,
        });
    }
    entries.push(InitramfsEntry::Bytes {
        path: MODULES_LIST.into(),
        data: list.into_bytes(),
        mode: 0o644,
    });
    entries.extend(opts.extra.iter().cloned());
    steps.line(&format!("initramfs: /init = {}", init.display()));
    let pb = steps.spinner("writing initramfs");
    let initramfs = opts.out.join("initramfs.img");
    write_initramfs(&initramfs, &entries)?;
    pb.finish_and_clear();

    // 4. Manifest.
    steps.line("manifest.json");
    let mut artifacts = Vec::new();
    for (name, file) in [("vmlinuz", "vmlinuz"), ("initramfs", "initramfs.img")] {
        let (sha256, size) = sha256_file(&opts.out.join(file))?;
        println!("      {file}: sha256:{sha256} ({})", human(size));
        artifacts.push(Artifact {
            name: name.into(),
            path: file.into(),
            sha256,
            size,
        });
    }
    let args = [
        "-kernel",
        "vmlinuz",
        "-initrd",
        "initramfs.img",
        "-append",
        KERNEL_CMDLINE,
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-accel",
        "tcg",
    ]
    .map(String::from)
    .to_vec();
    let manifest = OsManifest {
        kernel: kernel.version.clone(),
        artifacts,
        qemu: QemuSpec { args },
    };
    let path = opts.out.join("manifest.json");
    let mut json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| BuildError::Usage(e.to_string()))?;
    json.push(b'\n');
    std::fs::write(&path, json).map_err(|e| io_err("write", &path, e))?;
    println!(
        "host image {} (kernel {}, {:.1}s)",
        opts.out.display(),
        kernel.version,
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}
