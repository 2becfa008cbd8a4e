//! `image-build os`: the bootable host image. The kernel, an initramfs (the init as `/init`
//! plus the kernel modules it loads), the read-only root image (erofs, see [`crate::hostroot`]
//! for its layout), an empty `/var` disk (ext4), the bootable GPT `disk.img` holding all of
//! them behind UEFI firmware and systemd-boot (see [`bootdisk`]), and `manifest.json` with
//! the artifacts' digests and the QEMU arguments that boot them (directly, and from
//! `disk.img` under OVMF). Every output is reproducible.
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
use crate::hostroot::{
    check_ca_bundle, is_static_elf, stage_root, RootContent, CA_PACKAGE, DEBIAN_CA_BUNDLE,
    HOST_BUSYBOX,
};
use crate::initramfs::{write_initramfs, InitramfsEntry};
use crate::kernel::{fetch_kernel, module_closure, Kernel};
use crate::process::{apt_install, ensure_program};
use crate::progress::{human, Steps};
use crate::static_build::{workspace_root, StaticBuild};
use crate::{rootfs, BuildError, BuildOptions};

pub mod bootdisk;
mod inputs;
mod spec;
mod update;

pub use spec::{
    DiskSpec, InitSpec, KernelSpec, OsSection, OsSpec, RootCompression, RootFormat, RootSpec,
    VarSpec, MIN_ESP_SIZE,
};
pub use update::{UpdateOptions, UPDATE_DIR};

use bootdisk::{DiskLayout, EspSource, EspTools};

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
    /// `vmlinuz`, `initramfs`, `root`, `var`, `disk`.
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
    /// Arguments of `qemu-system-x86_64` that boot the kernel directly, paths relative to the
    /// image directory.
    pub args: Vec<String>,
    /// Arguments that boot `disk.img` under OVMF (UEFI) through systemd-boot, paths relative
    /// to the image directory ([`OVMF_VARS_COPY`] is the writable variable store). Without
    /// `-no-reboot`: a reboot goes through the firmware and the boot loader again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_args: Vec<String>,
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
    /// The partitions of `disk.img`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskLayout>,
}

/// The kernel command line of the image.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// Where the init finds the list of modules to load (one `.ko` path per line, in order).
pub const MODULES_LIST: &str = "/etc/flotilla/modules";

/// The virtio serial of the root disk (the init finds it by this name).
pub const ROOT_SERIAL: &str = "flotilla-root";

/// The virtio serial of the `/var` disk.
pub const VAR_SERIAL: &str = "flotilla-var";

/// OVMF's code (read-only) on the build host and in `disk_args` (Debian `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's empty variable store on the build host (Debian `ovmf`).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The copy of [`OVMF_VARS`] in the output directory that `disk_args` boots with (the
/// firmware writes to it; copy it again for a clean machine).
pub const OVMF_VARS_COPY: &str = "ovmf-vars.fd";

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

/// Checks `[root] ca_bundle` (resolved to `bundle`): Debian's bundle is installed with
/// apt-get (package `ca-certificates`, said on the output) when missing; the file must hold
/// a PEM certificate.
fn ca_bundle(
    bundle: &Path,
    steps: &Steps,
    pb: &indicatif::ProgressBar,
    log: &Path,
) -> Result<(), BuildError> {
    if !bundle.is_file() && bundle == Path::new(DEBIAN_CA_BUNDLE) {
        steps.note(
            pb,
            &format!(
                "{DEBIAN_CA_BUNDLE} is missing: installing the Debian package `{CA_PACKAGE}` with apt-get"
            ),
        );
        apt_install(CA_PACKAGE, pb, log)?;
    }
    check_ca_bundle(bundle).map_err(BuildError::Usage)
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
    let layout = build.disk_image(var_size, &plan.version)?;
    let manifest = build.manifest(&kernel, layout)?;
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
            steps: Steps::new(7 + extra_steps, opts.progress, ""),
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
            "root.img: erofs \"{}\"{}: binaries {}{}, units {}{}{}{}{}",
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
            if content.ca_bundle.is_some() {
                ", CA bundle"
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
        if let Some(bundle) = &content.ca_bundle {
            ca_bundle(bundle, &self.steps, &pb, &self.log)?;
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

    /// `disk.img: GPT ...`: the bootable disk ([`bootdisk`]) of the kernel, initramfs,
    /// root and `/var` images already in the output, and the OVMF variable store copy
    /// ([`OVMF_VARS_COPY`]) that boots it. Returns its layout.
    fn disk_image(&mut self, var_size: u64, version: &str) -> Result<DiskLayout, BuildError> {
        let spec_err = |detail: String| BuildError::Spec {
            path: self.opts.spec.clone(),
            detail,
        };
        let esp_size = self.spec.disk.esp_bytes().map_err(spec_err)?;
        let slot_size = self.spec.disk.slot_bytes().map_err(spec_err)?;
        self.steps.line(&format!(
            "disk.img: GPT, ESP {} (systemd-boot), root slots A and B {} each, /var {}, sparse",
            human(esp_size),
            human(slot_size),
            human(var_size)
        ));
        let out = self.opts.out.clone();
        let root_img = out.join("root.img");
        let root_size = std::fs::metadata(&root_img)
            .map_err(|e| io_err("stat", &root_img, e))?
            .len();
        if root_size > slot_size {
            return Err(spec_err(format!(
                "root.img is {} ({root_size} bytes), larger than a root slot ([disk] slot_size \
                 {:?}): raise [disk] slot_size",
                human(root_size),
                self.spec.disk.slot_size
            )));
        }
        let pb = self.steps.spinner("boot tools");
        let sfdisk = ensure_program("sfdisk", "fdisk", &self.steps, &pb, &self.log)?;
        let tools = EspTools {
            mkfs_vfat: ensure_program("mkfs.vfat", "dosfstools", &self.steps, &pb, &self.log)?,
            mmd: ensure_program("mmd", "mtools", &self.steps, &pb, &self.log)?,
            mcopy: ensure_program("mcopy", "mtools", &self.steps, &pb, &self.log)?,
        };
        for (file, package) in [
            (bootdisk::SYSTEMD_BOOT_EFI, bootdisk::SYSTEMD_BOOT_PACKAGE),
            (OVMF_VARS, "ovmf"),
            (OVMF_CODE, "ovmf"),
        ] {
            if !Path::new(file).is_file() {
                self.steps.note(
                    &pb,
                    &format!(
                        "{file} is missing: installing the Debian package `{package}` with apt-get"
                    ),
                );
                apt_install(package, &pb, &self.log)?;
            }
        }

        pb.set_message("staging the ESP");
        let staged = self.stage_esp_files(version)?;
        let files: Vec<(&str, PathBuf)> = bootdisk::ESP_FILES
            .iter()
            .filter_map(|(dest, src)| {
                staged
                    .iter()
                    .find(|(s, _)| s == src)
                    .map(|(_, p)| (*dest, p.clone()))
            })
            .collect();
        let esp_img = self.work.path().join("esp.img");
        let esp_uuid = self.uuid(b"flotilla esp\0");
        let volume_id = u32::from_str_radix(esp_uuid.get(..8).unwrap_or("0"), 16).unwrap_or(0);
        pb.set_message("mkfs.vfat, mcopy");
        bootdisk::make_esp(
            &tools, &esp_img, esp_size, volume_id, &files, self.epoch, &pb, &self.log,
        )?;

        let layout = bootdisk::layout(esp_size, slot_size, var_size, |name| {
            self.uuid(format!("flotilla gpt {name}\0").as_bytes())
        });
        let disk_img = out.join("disk.img");
        pb.set_message("sfdisk");
        let _ = std::fs::remove_file(&disk_img);
        let mut disk =
            std::fs::File::create(&disk_img).map_err(|e| io_err("create", &disk_img, e))?;
        disk.set_len(layout.size)
            .map_err(|e| io_err("size", &disk_img, e))?;
        bootdisk::write_gpt(&sfdisk, &disk_img, &layout, &self.log)?;
        for (name, src) in [
            (bootdisk::ESP_NAME, esp_img.clone()),
            (bootdisk::SLOT_A_NAME, root_img),
            (bootdisk::VAR_NAME, out.join("var.img")),
        ] {
            pb.set_message(format!("writing {name}"));
            let part = layout
                .partition(name)
                .ok_or_else(|| BuildError::Usage(format!("disk layout has no partition {name}")))?;
            bootdisk::copy_into(&src, &mut disk, &disk_img, part.offset)?;
        }
        disk.sync_all().map_err(|e| io_err("sync", &disk_img, e))?;
        let vars = out.join(OVMF_VARS_COPY);
        std::fs::copy(OVMF_VARS, &vars).map_err(|e| io_err("copy", Path::new(OVMF_VARS), e))?;
        pb.finish_and_clear();
        let meta = std::fs::metadata(&disk_img).map_err(|e| io_err("stat", &disk_img, e))?;
        self.steps.detail(&format!(
            "{}, {} allocated, GPT GUID {}; firmware variables {OVMF_VARS_COPY}",
            human(meta.len()),
            human(meta.blocks() * 512),
            layout.guid
        ));
        Ok(layout)
    }

    /// The ESP's source files in the work directory, every mtime set to the epoch (`mcopy
    /// -m` keeps it): systemd-boot, the kernel, the initramfs, `loader.conf` and slot A's
    /// entry.
    fn stage_esp_files(&self, version: &str) -> Result<Vec<(EspSource, PathBuf)>, BuildError> {
        let dir = self.work.path().join("esp");
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create", &dir, e))?;
        let mut staged = Vec::new();
        for (source, name) in [
            (EspSource::SystemdBoot, "systemd-bootx64.efi"),
            (EspSource::Kernel, "vmlinuz"),
            (EspSource::Initramfs, "initramfs.img"),
            (EspSource::LoaderConf, "loader.conf"),
            (EspSource::EntryA, "flotilla-a.conf"),
        ] {
            let path = dir.join(name);
            let written = match source {
                EspSource::SystemdBoot => {
                    std::fs::copy(bootdisk::SYSTEMD_BOOT_EFI, &path).map(|_| ())
                }
                EspSource::Kernel => {
                    std::fs::copy(self.opts.out.join("vmlinuz"), &path).map(|_| ())
                }
                EspSource::Initramfs => {
                    std::fs::copy(self.opts.out.join("initramfs.img"), &path).map(|_| ())
                }
                EspSource::LoaderConf => std::fs::write(&path, bootdisk::loader_conf()),
                EspSource::EntryA => std::fs::write(&path, bootdisk::entry_conf(version)),
            };
            written.map_err(|e| io_err("stage", &path, e))?;
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.epoch);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(time))
                .map_err(|e| io_err("set the time of", &path, e))?;
            staged.push((source, path));
        }
        Ok(staged)
    }

    /// `manifest.json`: the artifacts' digests and sizes and the QEMU arguments, written to
    /// the output.
    fn manifest(&mut self, kernel: &Kernel, layout: DiskLayout) -> Result<OsManifest, BuildError> {
        self.steps.line("manifest.json");
        let pb = self.steps.spinner("sha256");
        let mut artifacts = Vec::new();
        for (name, file) in [
            ("vmlinuz", "vmlinuz"),
            ("initramfs", "initramfs.img"),
            ("root", "root.img"),
            ("var", "var.img"),
            ("disk", "disk.img"),
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
            qemu: QemuSpec {
                args: qemu_args(),
                disk_args: disk_qemu_args(),
            },
            disk: Some(layout),
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

/// The QEMU arguments that boot `disk.img` under OVMF (paths relative to the image
/// directory, but for the firmware's code): the same machine, memory, NIC and entropy as
/// [`qemu_args`], the firmware's code and a writable copy of its variables as pflash, and
/// the disk as the first boot device. No `-no-reboot`: a reboot goes through the firmware
/// and the boot loader again, as on a real machine.
fn disk_qemu_args() -> Vec<String> {
    let mut args: Vec<String> = [
        "-machine",
        "q35",
        "-m",
        "512",
        "-nographic",
        "-accel",
        "tcg",
        "-nic",
        "user,model=virtio-net-pci",
        "-device",
        "virtio-rng-pci",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "-drive".to_string(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
        "-drive".to_string(),
        format!("if=pflash,format=raw,unit=1,file={OVMF_VARS_COPY}"),
        "-drive".to_string(),
        "if=none,id=disk,format=raw,file=disk.img".to_string(),
        "-device".to_string(),
        "virtio-blk-pci,drive=disk,bootindex=0".to_string(),
    ]);
    args
}
