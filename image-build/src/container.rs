//! `image-build container`: a container image from a [`Spec`]. A root filesystem
//! (debootstrap, Debian packages, or a directory), the spec's extra files, a deterministic
//! layer tar (cached by the spec's content), an OCI image layout, and an import into the
//! local image store.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use flotilla_container::image::{
    write_oci_layout, ImageInfo, ImageStore, ImportEvent, RuntimeConfig,
};
use indicatif::ProgressBar;
use sha2::Digest as _;

use crate::error::io_err;
use crate::process::{apt_install, copy_tree, find_program, run};
use crate::progress::{human, Steps};
use crate::rootfs::busybox_links;
use crate::rootfs::make_link;
use crate::spec::{self, Source, Spec};
use crate::{apt, rootfs, BuildError};

/// Default cache directory (layer tars, work directories).
pub const DEFAULT_CACHE: &str = "/var/cache/flotilla";

/// Options of one build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The spec file.
    pub spec: PathBuf,
    /// Image store to import into.
    pub store: PathBuf,
    /// Write the OCI layout here (else a temporary directory).
    pub oci_out: Option<PathBuf>,
    /// Skip the import.
    pub no_import: bool,
    /// Cache directory.
    pub cache: PathBuf,
    /// Show spinners and bars (on a terminal).
    pub progress: bool,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// `name:tag`.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// The layer came from the cache.
    pub cached: bool,
    /// The layer tar (in the cache, or a temporary file already deleted when not cached).
    pub layer_tar: PathBuf,
    /// Size of the layer tar in bytes.
    pub layer_bytes: u64,
    /// The imported image, unless `no_import`.
    pub imported: Option<ImageInfo>,
}

/// The manifest digest of a complete OCI layout at `dir` (from its `index.json`), if any.
fn layout_digest(dir: &Path) -> Option<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).ok()?).ok()?;
    index
        .get("manifests")?
        .get(0)?
        .get("digest")?
        .as_str()
        .map(str::to_string)
}

/// Cache key: the canonical spec, the suite, and the contents of copied files.
fn cache_key(spec: &Spec, suite: &str, spec_dir: &Path) -> Result<String, BuildError> {
    let mut h = sha2::Sha256::new();
    let canonical = serde_json::to_vec(spec).map_err(|e| BuildError::Usage(e.to_string()))?;
    h.update(b"flotilla-image-build v1\0");
    h.update(&canonical);
    h.update(b"\0suite\0");
    h.update(suite.as_bytes());
    h.update(rootfs::source_date_epoch().to_string().as_bytes());
    for f in &spec.files {
        let p = spec_dir.join(&f.src);
        let bytes = std::fs::read(&p).map_err(|e| io_err("read [[files]] src", &p, e))?;
        h.update(b"\0file\0");
        h.update(f.src.as_os_str().as_encoded_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Puts the spec's extra files and symlinks into `root`.
fn add_extras(spec: &Spec, spec_dir: &Path, root: &Path) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    for f in &spec.files {
        let src = spec_dir.join(&f.src);
        let dest = root.join(f.dest.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
        }
        let _ = std::fs::remove_file(&dest);
        std::fs::copy(&src, &dest).map_err(|e| io_err("copy [[files]] src", &src, e))?;
        let mode = f
            .mode
            .as_deref()
            .map(spec::parse_mode)
            .transpose()
            .map_err(BuildError::Usage)?
            .unwrap_or(0o644);
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_err("chmod", &dest, e))?;
    }
    for s in &spec.symlinks {
        make_link(root, &s.path, &s.target, true)?;
    }
    Ok(())
}

/// Builds the image of `opts.spec`.
pub fn build(opts: &BuildOptions) -> Result<BuildOutcome, BuildError> {
    build_indented(opts, "")
}

/// [`build`], its output lines indented by `indent` (a build inside `image-build os`): one
/// function per step, each named as its progress line. A cached layer skips the first
/// three.
pub(crate) fn build_indented(
    opts: &BuildOptions,
    indent: &'static str,
) -> Result<BuildOutcome, BuildError> {
    let started = Instant::now();
    let mut b = ContainerBuild::start(opts, indent)?;
    let (layer_tar, cached) = if b.cacheable && b.cached_tar.is_file() {
        b.cached_layer();
        (b.cached_tar.clone(), true)
    } else {
        b.root_filesystem()?;
        b.clean_and_extras()?;
        (b.layer_tar()?, false)
    };
    let layer_bytes = std::fs::metadata(&layer_tar)
        .map_err(|e| io_err("stat", &layer_tar, e))?
        .len();
    let (oci_dir, digest) = b.oci_layout(&layer_tar, layer_bytes, cached)?;
    let imported = if opts.no_import {
        None
    } else {
        Some(b.import(&oci_dir)?)
    };
    println!(
        "{indent}{} {digest} ({}, {:.1}s{})",
        b.reference,
        human(layer_bytes),
        started.elapsed().as_secs_f64(),
        if cached { ", cached" } else { "" }
    );
    Ok(BuildOutcome {
        reference: b.reference,
        digest,
        cached,
        layer_tar,
        layer_bytes,
        imported,
    })
}

/// One run of [`build_indented`]: the spec, the cache entries its key names, and the work
/// directory (removed on drop) with the build log and the root filesystem.
struct ContainerBuild<'a> {
    opts: &'a BuildOptions,
    spec: Spec,
    /// The spec's directory: `[[files]]` and directory sources are relative to it.
    spec_dir: PathBuf,
    /// `name:tag`.
    reference: String,
    /// The Debian suite (debootstrap's, else the host's).
    suite: String,
    /// Not a directory source: the layer tar and layout are cached by [`cache_key`].
    cacheable: bool,
    /// The cache key of the spec.
    key: String,
    /// `CACHE/layers/KEY.tar`.
    cached_tar: PathBuf,
    work: tempfile::TempDir,
    log: PathBuf,
    /// The root filesystem being built (in `work`).
    root: PathBuf,
    steps: Steps,
}

impl<'a> ContainerBuild<'a> {
    /// Loads the spec, checks the options, computes the cache key and creates the cache
    /// and work directories.
    fn start(opts: &'a BuildOptions, indent: &'static str) -> Result<Self, BuildError> {
        let spec = Spec::load(&opts.spec)?;
        let spec_dir = opts
            .spec
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        if opts.no_import && opts.oci_out.is_none() {
            return Err(BuildError::Usage(
                "--no-import without --oci-out would build nothing to keep: give --oci-out DIR"
                    .into(),
            ));
        }
        let reference = spec.reference();
        let suite = match &spec.source {
            Source::Debootstrap { suite: Some(s), .. } => s.clone(),
            _ => apt::host_codename().unwrap_or_else(|| "stable".into()),
        };
        let total = 4 + usize::from(!opts.no_import);
        let steps = Steps::new(total, opts.progress, indent);

        let layers_dir = opts.cache.join("layers");
        let work_dir = opts.cache.join("work");
        for d in [&layers_dir, &work_dir] {
            std::fs::create_dir_all(d).map_err(|e| io_err("create cache directory", d, e))?;
        }
        let cacheable = !matches!(spec.source, Source::Directory { .. });
        let key = cache_key(&spec, &suite, &spec_dir)?;
        let cached_tar = layers_dir.join(format!("{key}.tar"));
        let work = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&work_dir)
            .map_err(|e| io_err("create work directory in", &work_dir, e))?;
        let log = work.path().join("build.log");
        let root = work.path().join("rootfs");
        std::fs::create_dir(&root).map_err(|e| io_err("create", &root, e))?;
        Ok(ContainerBuild {
            opts,
            spec,
            spec_dir,
            reference,
            suite,
            cacheable,
            key,
            cached_tar,
            work,
            log,
            root,
            steps,
        })
    }

    /// The first three steps' lines when the layer tar is in the cache.
    fn cached_layer(&mut self) {
        self.steps.line(&format!(
            "{}: root filesystem: cached",
            describe(&self.spec.source, &self.suite)
        ));
        self.steps.line("clean + extras: cached");
        self.steps.line(&format!(
            "layer tar: cached ({})",
            self.cached_tar.display()
        ));
    }

    /// The root filesystem step (its line describes the source): debootstrap, Debian
    /// packages unpacked, or a directory copied.
    fn root_filesystem(&mut self) -> Result<(), BuildError> {
        self.steps.line(&describe(&self.spec.source, &self.suite));
        let pb = self.steps.spinner("starting");
        match &self.spec.source {
            Source::Debootstrap {
                variant, packages, ..
            } => self.debootstrap(variant.as_deref(), packages, &pb)?,
            Source::Packages { packages } => self.unpack_packages(packages, &pb)?,
            Source::Directory { path } => {
                let src = self.spec_dir.join(path);
                if !src.is_dir() {
                    return Err(BuildError::Spec {
                        path: self.opts.spec.clone(),
                        detail: format!("source path {} is not a directory", src.display()),
                    });
                }
                copy_tree(&src, &self.root, &pb, &self.log)?;
            }
        }
        pb.finish_and_clear();
        Ok(())
    }

    /// debootstrap (installed if missing) of the suite into the root, from the mirror of
    /// the host's apt sources.
    fn debootstrap(
        &self,
        variant: Option<&str>,
        packages: &[String],
        pb: &ProgressBar,
    ) -> Result<(), BuildError> {
        let program = match find_program("debootstrap") {
            Some(p) => p,
            None => {
                self.steps.note(pb, "debootstrap is not installed: installing the Debian package `debootstrap` with apt-get");
                apt_install("debootstrap", pb, &self.log)?;
                find_program("debootstrap").unwrap_or_else(|| PathBuf::from("debootstrap"))
            }
        };
        let mut cmd = Command::new(program);
        cmd.arg(format!("--variant={}", variant.unwrap_or("minbase")));
        if !packages.is_empty() {
            cmd.arg(format!("--include={}", packages.join(",")));
        }
        cmd.arg(&self.suite).arg(&self.root);
        if let Some(m) = apt::pick_mirror(&apt::host_sources(), &self.suite) {
            cmd.arg(m);
        }
        run(&mut cmd, pb, &self.log)
    }

    /// `apt-get download` of the packages (`apt-get update` once if it fails), each
    /// unpacked into the root with `dpkg-deb -x`, in name order.
    fn unpack_packages(&self, packages: &[String], pb: &ProgressBar) -> Result<(), BuildError> {
        let debs = self.work.path().join("debs");
        std::fs::create_dir(&debs).map_err(|e| io_err("create", &debs, e))?;
        let dl = || {
            let mut c = Command::new("apt-get");
            c.arg("download").args(packages).current_dir(&debs);
            c
        };
        if run(&mut dl(), pb, &self.log).is_err() {
            self.steps.note(
                pb,
                "apt-get download failed: running apt-get update once and retrying",
            );
            run(Command::new("apt-get").arg("update"), pb, &self.log)?;
            run(&mut dl(), pb, &self.log)?;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&debs)
            .map_err(|e| io_err("list", &debs, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        files.sort();
        for deb in &files {
            run(
                Command::new("dpkg-deb").arg("-x").arg(deb).arg(&self.root),
                pb,
                &self.log,
            )?;
        }
        Ok(())
    }

    /// `clean + extras`: a debootstrapped root's caches and logs removed, the spec's files
    /// and symlinks added, busybox's applet links made.
    fn clean_and_extras(&mut self) -> Result<(), BuildError> {
        let removed = if matches!(self.spec.source, Source::Debootstrap { .. }) {
            rootfs::clean(&self.root)?
        } else {
            0
        };
        add_extras(&self.spec, &self.spec_dir, &self.root)?;
        let links = if self.spec.busybox_links {
            busybox_links(&self.root)?
        } else {
            0
        };
        self.steps.line(&format!(
            "clean + extras: {removed} cache/log entries removed, {} files, {} symlinks, {links} busybox links",
            self.spec.files.len(),
            self.spec.symlinks.len()
        ));
        Ok(())
    }

    /// `layer tar (sorted, mtime <= EPOCH)`: the deterministic tar of the root, stored in
    /// the cache when the build is cacheable; returns its path.
    fn layer_tar(&mut self) -> Result<PathBuf, BuildError> {
        let epoch = rootfs::source_date_epoch();
        self.steps
            .line(&format!("layer tar (sorted, mtime <= {epoch})"));
        let pb = self.steps.spinner("writing layer tar");
        let tmp_tar = self.work.path().join("layer.tar");
        let count = rootfs::write_tar(&self.root, &tmp_tar, epoch)?;
        pb.finish_and_clear();
        let target = if self.cacheable {
            std::fs::rename(&tmp_tar, &self.cached_tar)
                .map_err(|e| io_err("store in cache", &self.cached_tar, e))?;
            self.cached_tar.clone()
        } else {
            tmp_tar
        };
        self.steps.detail(&format!("{count} entries"));
        Ok(target)
    }

    /// `OCI layout DIR (SIZE)`: the layout of the layer, or the cached one. Compressing a
    /// big layer is most of a rebuild, so a cacheable build keeps its layout under
    /// `CACHE/layouts/KEY` and a cached rebuild reuses it. Returns the layout and its
    /// manifest digest.
    fn oci_layout(
        &mut self,
        layer_tar: &Path,
        layer_bytes: u64,
        cached: bool,
    ) -> Result<(PathBuf, String), BuildError> {
        let opts = self.opts;
        let cached_layout = opts.cache.join("layouts").join(&self.key);
        let config = RuntimeConfig {
            env: self.spec.config.env.clone(),
            entrypoint: self.spec.config.entrypoint.clone(),
            cmd: self.spec.config.cmd.clone(),
            working_dir: self.spec.config.working_dir.clone(),
            user: self.spec.config.user.clone(),
        };
        let reuse = self.cacheable && cached && opts.oci_out.is_none();
        let (oci_dir, digest) = match layout_digest(&cached_layout).filter(|_| reuse) {
            Some(digest) => {
                self.steps
                    .line(&format!("OCI layout: cached ({})", cached_layout.display()));
                (cached_layout, digest)
            }
            None => {
                let oci_dir = match &opts.oci_out {
                    Some(d) => d.clone(),
                    None => self.work.path().join("oci"),
                };
                self.steps.line(&format!(
                    "OCI layout {} ({})",
                    oci_dir.display(),
                    human(layer_bytes)
                ));
                let pb = self.steps.spinner("compressing layer");
                let digest = write_oci_layout(
                    &oci_dir,
                    &[layer_tar.to_path_buf()],
                    &config,
                    &self.reference,
                )?;
                pb.finish_and_clear();
                if self.cacheable && opts.oci_out.is_none() {
                    // Best effort: a failure only costs the next rebuild its shortcut.
                    let _ = std::fs::remove_dir_all(&cached_layout);
                    let kept = cached_layout
                        .parent()
                        .map(std::fs::create_dir_all)
                        .transpose()
                        .and_then(|_| std::fs::rename(&oci_dir, &cached_layout));
                    match kept {
                        Ok(()) => (cached_layout, digest),
                        Err(_) => (oci_dir, digest),
                    }
                } else {
                    (oci_dir, digest)
                }
            }
        };
        self.steps.detail(&digest);
        Ok((oci_dir, digest))
    }

    /// `import NAME:TAG into STORE`.
    fn import(&mut self, oci_dir: &Path) -> Result<ImageInfo, BuildError> {
        self.steps.line(&format!(
            "import {} into {}",
            self.reference,
            self.opts.store.display()
        ));
        let store = ImageStore::open(&self.opts.store)?;
        let pb = self.steps.bar("{bar:30} {pos}/{len} layers {msg}");
        let info = store.import_oci_layout(oci_dir, Some(&self.reference), &mut |e| match e {
            ImportEvent::Layer {
                index,
                count,
                bytes,
                ..
            } => {
                pb.set_length(count as u64);
                pb.set_position(index as u64 + 1);
                pb.set_message(human(bytes));
            }
            ImportEvent::Done => pb.finish_and_clear(),
        })?;
        Ok(info)
    }
}

fn describe(source: &Source, suite: &str) -> String {
    match source {
        Source::Debootstrap {
            variant, packages, ..
        } => format!(
            "debootstrap {suite} {} (+{} packages)",
            variant.as_deref().unwrap_or("minbase"),
            packages.len()
        ),
        Source::Packages { packages } => {
            format!("apt-get download + dpkg-deb -x: {}", packages.join(" "))
        }
        Source::Directory { path } => format!("copy directory {}", path.display()),
    }
}
