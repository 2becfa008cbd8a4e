//! `image-build os`: the bootable host image. The kernel, an initramfs (the init as `/init`
//! plus the kernel modules it loads), the read-only root image (erofs, see [`crate::hostroot`]
//! for its layout), an empty `/var` disk (ext4), and `manifest.json` with the artifacts'
//! digests and the QEMU arguments that boot them. Every output is reproducible.
//!
//! The spec's types are in `spec` (re-exported here), the inputs resolved before the first
//! step in `inputs`; [`build_os`] and its steps here.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use flotilla_container::image::{ImageStore, SYSTEM_STORE};

use self::inputs::{resolve_inputs, OsInputs};
use crate::container::build_indented;
use crate::disk::{derived_uuid, mkfs_erofs, mkfs_ext4, ErofsOptions};
use crate::error::io_err;
use crate::hostroot::{is_static_elf, stage_root, RootContent, HOST_BUSYBOX};
use crate::initramfs::{write_initramfs, InitramfsEntry};
use crate::kernel::{fetch_kernel, module_closure, Kernel};
use crate::process::{apt_install, ensure_program};
use crate::progress::{human, Steps};
use crate::static_build::{workspace_root, StaticBuild};
use crate::{rootfs, BuildError, BuildOptions};

mod inputs;
mod spec;
mod update;

pub use spec::{
    InitSpec, KernelSpec, OsSection, OsSpec, RootCompression, RootFormat, RootSpec, VarSpec,
};
pub use update::{UpdateOptions, UPDATE_DIR};

/// Options of `image-build os`.
#[derive(Debug, Clone)]
pub struct OsOptions {
    /// The spec file.
    pub spec: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Init binary, overriding `[init] binary` and `BIN_DIR/flotilla-init`.
    pub init: Option<PathBuf>,
    /// Directory of the static binaries (`[root] binaries`), overriding `[root] bin_dir`.
    pub bin_dir: Option<PathBuf>,
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
    /// `vmlinuz`, `initramfs`, `root`, `var`.
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

/// The virtio serial of the root disk (the init finds it by this name).
pub const ROOT_SERIAL: &str = "flotilla-root";

/// The virtio serial of the `/var` disk.
pub const VAR_SERIAL: &str = "flotilla-var";

/// The init binary's name in the binaries directory.
pub const INIT_BINARY: &str = "flotilla-init";

/// How to build the static binaries `[root] bin_dir` of `specs/host.toml` points to, from
/// the workspace root: `image-build static-binaries`, and the [`StaticBuild`] recipe it runs.
pub fn static_build_hint() -> String {
    format!(
        "cargo run --locked -p image-build -- static-binaries\n  which runs: {}",
        StaticBuild::new(&workspace_root()).shell_line()
    )
}

/// Hex sha256 and size of a file, read in chunks (`var.img` is large and sparse).
fn sha256_file(path: &Path) -> Result<(String, u64), BuildError> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err("read", path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
        size += n as u64;
    }
    Ok((
        h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        size,
    ))
}

/// The host's static busybox, installing Debian's `busybox-static` if there is none.
fn host_busybox(
    steps: &Steps,
    pb: &indicatif::ProgressBar,
    log: &Path,
) -> Result<PathBuf, BuildError> {
    let path = PathBuf::from(HOST_BUSYBOX);
    if !path.is_file() {
        steps.note(
            pb,
            "busybox is not installed: installing the Debian package `busybox-static` with apt-get",
        );
        apt_install("busybox-static", pb, log)?;
    }
    if !is_static_elf(&path)? {
        return Err(BuildError::Usage(format!(
            "{HOST_BUSYBOX} is dynamically linked (Debian's `busybox`): install `busybox-static`"
        )));
    }
    Ok(path)
}

/// Builds the host image of `opts.spec` into `opts.out`: the inputs are resolved and
/// checked first (a missing binary fails before the kernel download), then one function per
/// step, each named as its progress line.
pub fn build_os(opts: &OsOptions) -> Result<OsManifest, BuildError> {
    build_os_with(opts, &UpdateOptions::default())
}

/// [`build_os`] with the update options: the OS version, and `--sign` (the key baked in,
/// the signed payload in `OUT/update/`, one more step).
pub fn build_os_with(opts: &OsOptions, up: &UpdateOptions) -> Result<OsManifest, BuildError> {
    let started = Instant::now();
    let OsInputs {
        spec,
        init,
        mut root_content,
        images,
        var_size,
    } = resolve_inputs(opts)?;
    let plan = update::UpdatePlan::resolve(up, &spec)?;
    root_content.os_version = Some(plan.version.clone());
    root_content.update_keys = plan.trusted_keys();
    let extra_steps = usize::from(!images.is_empty()) + usize::from(plan.key.is_some());
    let mut build = OsBuild::start(opts, &spec, extra_steps)?;
    let kernel = build.kernel()?;
    let closure = build.modules(&kernel)?;
    build.initramfs(&kernel, &closure, &init)?;
    if !images.is_empty() {
        root_content.system_store = Some(build.images(&images)?);
    }
    build.root_image(&mut root_content, images.len())?;
    build.var_image(var_size)?;
    let manifest = build.manifest(&kernel)?;
    build.update_payload(&plan, &kernel)?;
    println!(
        "host image {} (kernel {}, {:.1}s)",
        opts.out.display(),
        kernel.version,
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}

/// One run of [`build_os`]: its options, the spec, the work directory (removed on drop)
/// with the build log, and the step lines.
struct OsBuild<'a> {
    opts: &'a OsOptions,
    spec: &'a OsSpec,
    work: tempfile::TempDir,
    log: PathBuf,
    /// `SOURCE_DATE_EPOCH`: every timestamp of the image.
    epoch: u64,
    /// The spec as JSON: the seed of the filesystems' UUIDs.
    canonical: Vec<u8>,
    steps: Steps,
}

impl<'a> OsBuild<'a> {
    /// Creates the output and work directories; `extra_steps` is 1 when the spec bakes
    /// images in (the `images` step).
    fn start(
        opts: &'a OsOptions,
        spec: &'a OsSpec,
        extra_steps: usize,
    ) -> Result<OsBuild<'a>, BuildError> {
        std::fs::create_dir_all(&opts.out).map_err(|e| io_err("create", &opts.out, e))?;
        let work_dir = opts.cache.join("work");
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| io_err("create cache directory", &work_dir, e))?;
        let work = tempfile::Builder::new()
            .prefix("os-")
            .tempdir_in(&work_dir)
            .map_err(|e| io_err("create work directory in", &work_dir, e))?;
        let log = work.path().join("build.log");
        let canonical = serde_json::to_vec(spec).map_err(|e| BuildError::Usage(e.to_string()))?;
        Ok(OsBuild {
            opts,
            spec,
            work,
            log,
            epoch: rootfs::source_date_epoch(),
            canonical,
            steps: Steps::new(6 + extra_steps, opts.progress, ""),
        })
    }

    /// `kernel: PACKAGE`: fetches the kernel package (or finds it in the cache) and copies
    /// its `vmlinuz` to the output.
    fn kernel(&mut self) -> Result<Kernel, BuildError> {
        let package = &self.spec.kernel.package;
        self.steps.line(&format!("kernel: {package}"));
        let pb = self.steps.spinner("resolving");
        let (kernel, cached) = fetch_kernel(&self.opts.cache, package, &pb)?;
        pb.finish_and_clear();
        self.steps.detail(&format!(
            "{} {}{}",
            kernel.package,
            kernel.version,
            if cached { " (cached)" } else { "" }
        ));
        let vmlinuz = self.opts.out.join("vmlinuz");
        std::fs::copy(&kernel.vmlinuz, &vmlinuz).map_err(|e| io_err("copy", &kernel.vmlinuz, e))?;
        Ok(kernel)
    }

    /// `modules: N requested, M to load with dependencies`: the `[kernel] modules` and their
    /// dependencies, in load order (paths relative to the kernel's modules directory).
    fn modules(&mut self, kernel: &Kernel) -> Result<Vec<PathBuf>, BuildError> {
        let names: Vec<&str> = self
            .spec
            .kernel
            .modules
            .iter()
            .map(String::as_str)
            .collect();
        let closure = module_closure(&kernel.modules_dir, &names)?;
        self.steps.line(&format!(
            "modules: {} requested, {} to load with dependencies",
            names.len(),
            closure.len()
        ));
        Ok(closure)
    }

    /// `initramfs: /init = INIT`: the init, the modules and their list
    /// ([`MODULES_LIST`]), the empty mount points, and [`OsOptions::extra`].
    fn initramfs(
        &mut self,
        kernel: &Kernel,
        closure: &[PathBuf],
        init: &Path,
    ) -> Result<(), BuildError> {
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
            source: init.to_path_buf(),
            mode: 0o755,
        });
        let mut list = String::new();
        for rel in closure {
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
        entries.extend(self.opts.extra.iter().cloned());
        self.steps
            .line(&format!("initramfs: /init = {}", init.display()));
        let pb = self.steps.spinner("writing initramfs");
        write_initramfs(&self.opts.out.join("initramfs.img"), &entries)?;
        pb.finish_and_clear();
        Ok(())
    }

    /// `images: NAME:TAG, ... -> SYSTEM_STORE`: builds the `[root] images` (or finds them
    /// in the cache) into a store that becomes the root tree's system store; returns it.
    fn images(&mut self, images: &[(PathBuf, String)]) -> Result<PathBuf, BuildError> {
        let names: Vec<&str> = images.iter().map(|(_, r)| r.as_str()).collect();
        self.steps
            .line(&format!("images: {} -> {SYSTEM_STORE}", names.join(", ")));
        let store = self.work.path().join("system-store");
        for (path, _) in images {
            self.steps.detail(&path.display().to_string());
            let build = BuildOptions {
                spec: path.clone(),
                store: store.clone(),
                oci_out: None,
                no_import: false,
                cache: self.opts.cache.clone(),
                progress: self.opts.progress,
            };
            build_indented(&build, "      ")?;
        }
        // Read-only at run time: the extracted layers are all it needs.
        let freed = ImageStore::open(&store)?.drop_layer_blobs()?;
        self.steps.detail(&format!(
            "compressed layer blobs dropped from the system store: {}",
            human(freed)
        ));
        Ok(store)
    }

    /// `root.img: erofs "LABEL" ...`: stages the root tree (with the host's busybox when
    /// `[root] busybox`) and makes the erofs image of it.
    fn root_image(&mut self, content: &mut RootContent, images: usize) -> Result<(), BuildError> {
        let root = &self.spec.root;
        self.steps.line(&format!(
            "root.img: erofs \"{}\"{}: binaries {}{}, units {}{}{}{}",
            root.label,
            root.compression
                .algorithm()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default(),
            content.binaries.len(),
            if root.busybox { ", busybox" } else { "" },
            content.units.len(),
            if content.provision.is_some() {
                ", provisioning"
            } else {
                ""
            },
            if content.files.is_empty() {
                String::new()
            } else {
                format!(", extra files {}", content.files.len())
            },
            if images == 0 {
                String::new()
            } else {
                format!(", images {images}")
            }
        ));
        let pb = self.steps.spinner("staging the root tree");
        if root.busybox {
            content.busybox = Some(host_busybox(&self.steps, &pb, &self.log)?);
        }
        let mkfs_erofs_bin =
            ensure_program("mkfs.erofs", "erofs-utils", &self.steps, &pb, &self.log)?;
        let tree = self.work.path().join("root");
        std::fs::create_dir(&tree).map_err(|e| io_err("create", &tree, e))?;
        let staged = stage_root(content, &tree)?;
        pb.set_message("mkfs.erofs");
        let root_img = self.opts.out.join("root.img");
        let root_uuid = self.uuid(b"flotilla root\0");
        let erofs = ErofsOptions {
            label: &root.label,
            uuid: &root_uuid,
            epoch: self.epoch,
            compression: root.compression.algorithm(),
            // The images' files keep their owners (the import ran as root, so everything else
            // is root's too) and their xattrs.
            keep_owners: content.system_store.is_some(),
        };
        mkfs_erofs(&mkfs_erofs_bin, &tree, &root_img, &erofs, &pb, &self.log)?;
        pb.finish_and_clear();
        let root_size = std::fs::metadata(&root_img)
            .map_err(|e| io_err("stat", &root_img, e))?
            .len();
        self.steps.detail(&format!(
            "{} entries ({} busybox links{}), {}, UUID {root_uuid}",
            staged.entries,
            staged.busybox_links,
            if staged.store_entries > 0 {
                format!(", {} in the system store", staged.store_entries)
            } else {
                String::new()
            },
            human(root_size)
        ));
        Ok(())
    }

    /// `var.img: ext4 "LABEL", SIZE sparse`: the empty `/var` disk.
    fn var_image(&mut self, size: u64) -> Result<(), BuildError> {
        let var = &self.spec.var;
        self.steps.line(&format!(
            "var.img: ext4 \"{}\", {} sparse",
            var.label, var.size
        ));
        let pb = self.steps.spinner("mkfs.ext4");
        let mkfs_ext4_bin = ensure_program("mkfs.ext4", "e2fsprogs", &self.steps, &pb, &self.log)?;
        let var_img = self.opts.out.join("var.img");
        let var_uuid = self.uuid(b"flotilla var\0");
        mkfs_ext4(
            &mkfs_ext4_bin,
            &var_img,
            size,
            &var.label,
            &var_uuid,
            self.epoch,
            &pb,
            &self.log,
        )?;
        pb.finish_and_clear();
        let meta = std::fs::metadata(&var_img).map_err(|e| io_err("stat", &var_img, e))?;
        self.steps.detail(&format!(
            "{}, {} allocated, UUID {var_uuid}",
            human(meta.len()),
            human(meta.blocks() * 512)
        ));
        Ok(())
    }

    /// `manifest.json`: the artifacts' digests and sizes and the QEMU arguments, written to
    /// the output.
    fn manifest(&mut self, kernel: &Kernel) -> Result<OsManifest, BuildError> {
        self.steps.line("manifest.json");
        let pb = self.steps.spinner("sha256");
        let mut artifacts = Vec::new();
        for (name, file) in [
            ("vmlinuz", "vmlinuz"),
            ("initramfs", "initramfs.img"),
            ("root", "root.img"),
            ("var", "var.img"),
        ] {
            pb.set_message(format!("sha256 {file}"));
            let (sha256, size) = sha256_file(&self.opts.out.join(file))?;
            self.steps
                .note(&pb, &format!("{file}: sha256:{sha256} ({})", human(size)));
            artifacts.push(Artifact {
                name: name.into(),
                path: file.into(),
                sha256,
                size,
            });
        }
        pb.finish_and_clear();
        let manifest = OsManifest {
            kernel: kernel.version.clone(),
            artifacts,
            qemu: QemuSpec { args: qemu_args() },
        };
        let path = self.opts.out.join("manifest.json");
        let mut json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| BuildError::Usage(e.to_string()))?;
        json.push(b'\n');
        std::fs::write(&path, json).map_err(|e| io_err("write", &path, e))?;
        Ok(manifest)
    }

    /// `update/: version V, signed by KEY`: the signed update payload (only with `--sign`).
    fn update_payload(
        &mut self,
        plan: &update::UpdatePlan,
        kernel: &Kernel,
    ) -> Result<(), BuildError> {
        if plan.key.is_none() {
            return Ok(());
        }
        self.steps
            .line(&format!("{UPDATE_DIR}/: version {}", plan.version));
        let pb = self.steps.spinner("sha256 and signature");
        let written = plan.write(&self.opts.out, &kernel.version)?;
        pb.finish_and_clear();
        if let Some((dir, key)) = written {
            self.steps
                .detail(&format!("{} signed by key {key}", dir.display()));
            let oci = self.opts.out.join(update::UPDATE_OCI_DIR);
            self.steps.detail(&format!(
                "{}: the same as an OCI image, tag {v}; push: skopeo copy oci:{}:{v} docker://REGISTRY/flotilla/os:{v}",
                oci.display(),
                oci.display(),
                v = plan.version
            ));
        }
        Ok(())
    }

    /// A filesystem UUID derived from `label` and the canonical spec.
    fn uuid(&self, label: &[u8]) -> String {
        let mut seed = label.to_vec();
        seed.extend_from_slice(&self.canonical);
        derived_uuid(&seed)
    }
}

/// The QEMU arguments of the manifest (paths relative to the image directory).
fn qemu_args() -> Vec<String> {
    let mut args = [
        "-kernel",
        "vmlinuz",
        "-initrd",
        "initramfs.img",
        "-append",
        KERNEL_CMDLINE,
        // q35 puts virtio devices on PCIe, modern-only: virtio_pci probes them in ~20 ms
        // under TCG instead of ~330 ms on the default i440fx machine (legacy I/O ports).
        "-machine",
        "q35",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-accel",
        "tcg",
    ]
    .map(String::from)
    .to_vec();
    // One NIC (eth0 in the guest) on QEMU's user network: 10.0.2.0/24, gateway 10.0.2.2.
    args.extend(["-nic".to_string(), "user,model=virtio-net-pci".to_string()]);
    // Entropy from the host: without it the guest's random pool takes seconds to initialize
    // under TCG, and every getrandom(2) caller (D-Bus clients among them) waits for it.
    args.extend(["-device".to_string(), "virtio-rng-pci".to_string()]);
    // A virtio-blk device per disk, named by its serial (which `-drive if=virtio` cannot set).
    args.extend([
        "-drive".to_string(),
        "if=none,id=root,format=raw,file=root.img,readonly=on".to_string(),
        "-device".to_string(),
        format!("virtio-blk-pci,drive=root,serial={ROOT_SERIAL}"),
        "-drive".to_string(),
        "if=none,id=var,format=raw,file=var.img".to_string(),
        "-device".to_string(),
        format!("virtio-blk-pci,drive=var,serial={VAR_SERIAL}"),
    ]);
    args
}
