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

/// [`build`], its output lines indented by `indent` (a build inside `image-build os`).
pub(crate) fn build_indented(
    opts: &BuildOptions,
    indent: &'static str,
) -> Result<BuildOutcome, BuildError> {
    let started = Instant::now();
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
            "--no-import without --oci-out would build nothing to keep: give --oci-out DIR".into(),
        ));
    }
    let reference = spec.reference();
    let suite = match &spec.source {
        Source::Debootstrap { suite: Some(s), .. } => s.clone(),
        _ => apt::host_codename().unwrap_or_else(|| "stable".into()),
    };
    let total = 4 + usize::from(!opts.no_import);
    let mut steps = Steps::new(total, opts.progress, indent);

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

    let (layer_tar, cached) = if cacheable && cached_tar.is_file() {
        steps.line(&format!(
            "{}: root filesystem: cached",
            describe(&spec.source, &suite)
        ));
        steps.line("clean + extras: cached");
        steps.line(&format!("layer tar: cached ({})", cached_tar.display()));
        (cached_tar.clone(), true)
    } else {
        // 1. Root filesystem.
        steps.line(&describe(&spec.source, &suite));
        let pb = steps.spinner("starting");
        match &spec.source {
            Source::Debootstrap {
                variant, packages, ..
            } => {
                let program = match find_program("debootstrap") {
                    Some(p) => p,
                    None => {
                        steps.note(&pb, "debootstrap is not installed: installing the Debian package `debootstrap` with apt-get");
                        apt_install("debootstrap", &pb, &log)?;
                        find_program("debootstrap").unwrap_or_else(|| PathBuf::from("debootstrap"))
                    }
                };
                let mut cmd = Command::new(program);
                cmd.arg(format!(
                    "--variant={}",
                    variant.as_deref().unwrap_or("minbase")
                ));
                if !packages.is_empty() {
                    cmd.arg(format!("--include={}", packages.join(",")));
                }
                cmd.arg(&suite).arg(&root);
                if let Some(m) = apt::pick_mirror(&apt::host_sources(), &suite) {
                    cmd.arg(m);
                }
                run(&mut cmd, &pb, &log)?;
            }
            Source::Packages { packages } => {
                let debs = work.path().join("debs");
                std::fs::create_dir(&debs).map_err(|e| io_err("create", &debs, e))?;
                let dl = || {
                    let mut c = Command::new("apt-get");
                    c.arg("download").args(packages).current_dir(&debs);
                    c
                };
                if run(&mut dl(), &pb, &log).is_err() {
                    steps.note(
                        &pb,
                        "apt-get download failed: running apt-get update once and retrying",
                    );
                    run(Command::new("apt-get").arg("update"), &pb, &log)?;
                    run(&mut dl(), &pb, &log)?;
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
                        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root),
                        &pb,
                        &log,
                    )?;
                }
            }
            Source::Directory { path } => {
                let src = spec_dir.join(path);
                if !src.is_dir() {
                    return Err(BuildError::Spec {
                        path: opts.spec.clone(),
                        detail: format!("source path {} is not a directory", src.display()),
                    });
                }
                copy_tree(&src, &root, &pb, &log)?;
            }
        }
        pb.finish_and_clear();

        // 2. Clean + extras.
        let removed = if matches!(spec.source, Source::Debootstrap { .. }) {
            rootfs::clean(&root)?
        } else {
            0
        };
        add_extras(&spec, &spec_dir, &root)?;
        let links = if spec.busybox_links {
            busybox_links(&root)?
        } else {
            0
        };
        steps.line(&format!(
            "clean + extras: {removed} cache/log entries removed, {} files, {} symlinks, {links} busybox links",
            spec.files.len(),
            spec.symlinks.len()
        ));

        // 3. Deterministic tar.
        let epoch = rootfs::source_date_epoch();
        steps.line(&format!("layer tar (sorted, mtime <= {epoch})"));
        let pb = steps.spinner("writing layer tar");
        let tmp_tar = work.path().join("layer.tar");
        let count = rootfs::write_tar(&root, &tmp_tar, epoch)?;
        pb.finish_and_clear();
        let target = if cacheable {
            std::fs::rename(&tmp_tar, &cached_tar)
                .map_err(|e| io_err("store in cache", &cached_tar, e))?;
            cached_tar.clone()
        } else {
            tmp_tar
        };
        steps.detail(&format!("{count} entries"));
        (target, false)
    };
    let layer_bytes = std::fs::metadata(&layer_tar)
        .map_err(|e| io_err("stat", &layer_tar, e))?
        .len();

    // 4. OCI layout. Compressing a big layer is most of a rebuild, so a cacheable build
    // keeps its layout under CACHE/layouts/<key> and a cached rebuild reuses it.
    let cached_layout = layers_dir
        .parent()
        .unwrap_or(&opts.cache)
        .join("layouts")
        .join(&key);
    let config = RuntimeConfig {
        env: spec.config.env.clone(),
        entrypoint: spec.config.entrypoint.clone(),
        cmd: spec.config.cmd.clone(),
        working_dir: spec.config.working_dir.clone(),
        user: spec.config.user.clone(),
    };
    let reuse = cacheable && cached && opts.oci_out.is_none();
    let (oci_dir, digest) = match layout_digest(&cached_layout).filter(|_| reuse) {
        Some(digest) => {
            steps.line(&format!("OCI layout: cached ({})", cached_layout.display()));
            (cached_layout, digest)
        }
        None => {
            let oci_dir = match &opts.oci_out {
                Some(d) => d.clone(),
                None => work.path().join("oci"),
            };
            steps.line(&format!(
                "OCI layout {} ({})",
                oci_dir.display(),
                human(layer_bytes)
            ));
            let pb = steps.spinner("compressing layer");
            let digest = write_oci_layout(
                &oci_dir,
                std::slice::from_ref(&layer_tar),
                &config,
                &reference,
            )?;
            pb.finish_and_clear();
            if cacheable && opts.oci_out.is_none() {
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
    steps.detail(&digest);

    // 5. Import.
    let imported = if opts.no_import {
        None
    } else {
        steps.line(&format!("import {reference} into {}", opts.store.display()));
        let store = ImageStore::open(&opts.store)?;
        let pb = steps.bar("{bar:30} {pos}/{len} layers {msg}");
        let info = store.import_oci_layout(&oci_dir, Some(&reference), &mut |e| match e {
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
        Some(info)
    };
    println!(
        "{indent}{reference} {digest} ({}, {:.1}s{})",
        human(layer_bytes),
        started.elapsed().as_secs_f64(),
        if cached { ", cached" } else { "" }
    );
    Ok(BuildOutcome {
        reference,
        digest,
        cached,
        layer_tar,
        layer_bytes,
        imported,
    })
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
