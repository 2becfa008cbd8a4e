//! What `build_os` resolves and checks before its first step (so that a missing binary or
//! a broken unit fails before the kernel download): the init, the root image's content as
//! host files, the `[root] images` specs, the `/var` size.

use std::path::{Path, PathBuf};

use super::{static_build_hint, OsOptions, OsSpec, INIT_BINARY};
use crate::disk::parse_size;
use crate::error::io_err;
use crate::hostroot::{
    check_ca_bundle, is_static_elf, RootContent, RootFile, CA_PACKAGE, DEBIAN_CA_BUNDLE,
};
use crate::spec::{parse_mode, Spec};
use crate::BuildError;

/// What [`build_os`] resolves and checks before its first step.
pub(super) struct OsInputs {
    /// The loaded spec.
    pub(super) spec: OsSpec,
    /// The binary that becomes `/init`.
    pub(super) init: PathBuf,
    /// The root image's inputs, as host files.
    pub(super) root_content: RootContent,
    /// The `[root] images` specs and the `name:tag` each builds.
    pub(super) images: Vec<(PathBuf, String)>,
    /// `[var] size` in bytes.
    pub(super) var_size: u64,
}

/// Loads the spec and resolves its inputs: the init (`--init`, else `--bin-dir`'s init,
/// else `[init] binary`, else the spec's bin_dir's init), the root content, the image specs
/// and the `/var` size.
pub(super) fn resolve_inputs(opts: &OsOptions) -> Result<OsInputs, BuildError> {
    let spec = OsSpec::load(&opts.spec)?;
    let spec_dir = match opts.spec.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let bin_dir = opts
        .bin_dir
        .clone()
        .or_else(|| spec.root.bin_dir.as_ref().map(|d| spec_dir.join(d)));
    let init = match (&opts.init, &opts.bin_dir, &spec.init.binary, &bin_dir) {
        (Some(p), _, _, _) => p.clone(),
        (None, Some(d), _, _) => d.join(INIT_BINARY),
        (None, None, Some(p), _) => spec_dir.join(p),
        (None, None, None, Some(d)) => d.join(INIT_BINARY),
        (None, None, None, None) => {
            return Err(BuildError::Usage(
                "no init: give --init PATH, --bin-dir DIR, [init] binary or [root] bin_dir".into(),
            ))
        }
    };
    if !init.is_file() {
        return Err(BuildError::Usage(format!(
            "init binary {} does not exist: build the static binaries with\n  {}\n\
             (from the workspace root), or give --init PATH or --bin-dir DIR",
            init.display(),
            static_build_hint()
        )));
    }
    let root_content = root_content(&spec, &opts.spec, &spec_dir, bin_dir.as_deref())?;
    let images = image_specs(&spec, &opts.spec, &spec_dir)?;
    let var_size = parse_size(&spec.var.size).map_err(|detail| BuildError::Spec {
        path: opts.spec.clone(),
        detail,
    })?;
    Ok(OsInputs {
        spec,
        init,
        root_content,
        images,
        var_size,
    })
}

/// Resolves the root image's inputs to host files, checking that they exist (before the
/// kernel download, so that a missing binary fails fast).
fn root_content(
    spec: &OsSpec,
    spec_path: &Path,
    spec_dir: &Path,
    bin_dir: Option<&Path>,
) -> Result<RootContent, BuildError> {
    let spec_err = |detail: String| BuildError::Spec {
        path: spec_path.to_path_buf(),
        detail,
    };
    let mut content = RootContent::default();
    for name in &spec.root.binaries {
        let dir = bin_dir.ok_or_else(|| {
            spec_err(
                "[root] binaries needs a binaries directory: [root] bin_dir or --bin-dir DIR"
                    .into(),
            )
        })?;
        let path = dir.join(name);
        if !path.is_file() {
            return Err(BuildError::Usage(format!(
                "binary {} does not exist: build the static binaries with\n  {}\n\
                 (from the workspace root), or give --bin-dir DIR",
                path.display(),
                static_build_hint()
            )));
        }
        if !is_static_elf(&path)? {
            return Err(BuildError::Usage(format!(
                "binary {} is dynamically linked, and the root image has no C library: build it with\n  {}",
                path.display(),
                static_build_hint()
            )));
        }
        content.binaries.push((name.clone(), path));
    }
    if let Some(dir) = &spec.root.units {
        let dir = spec_dir.join(dir);
        let catalog = flotilla_units::Catalog::load_dirs(std::slice::from_ref(&dir));
        if !catalog.errors.is_empty() {
            let errors: Vec<String> = catalog.errors.iter().map(ToString::to_string).collect();
            return Err(spec_err(format!(
                "[root] units {}: invalid units:\n{}",
                dir.display(),
                errors.join("\n")
            )));
        }
        // Exactly the files the catalog reads: `*.toml`, not hidden.
        let mut units: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| io_err("list", &dir, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|e| e == "toml")
                    && p.file_name()
                        .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
            })
            .collect();
        units.sort();
        content.units = units;
        // A unit without an image runs over this read-only root: the paths it binds must
        // exist here as mount points (on the host they sit under /run's and /var's mounts).
        let mut points: Vec<String> = catalog
            .units
            .values()
            .filter(|u| u.container.image.is_none())
            .flat_map(|u| &u.container.mounts)
            .map(|m| m.path.to_string_lossy().into_owned())
            .collect();
        points.sort();
        points.dedup();
        content.mount_points = points;
    }
    if let Some(p) = &spec.root.provision {
        let p = spec_dir.join(p);
        if !p.is_file() {
            return Err(spec_err(format!(
                "[root] provision {} does not exist",
                p.display()
            )));
        }
        content.provision = Some(p);
    }
    if let Some(b) = &spec.root.ca_bundle {
        let bundle = spec_dir.join(b);
        // Debian's bundle is installed at the root image step when missing (said there).
        if !bundle.is_file() && bundle != Path::new(DEBIAN_CA_BUNDLE) {
            return Err(spec_err(format!(
                "[root] ca_bundle {} does not exist: give a PEM CA bundle of this host \
                 (Debian's is {DEBIAN_CA_BUNDLE}, package `{CA_PACKAGE}`)",
                bundle.display()
            )));
        }
        if bundle.is_file() {
            check_ca_bundle(&bundle).map_err(spec_err)?;
        }
        content.ca_bundle = Some(bundle);
    }
    for f in &spec.root.files {
        let source = spec_dir.join(&f.src);
        if !source.is_file() {
            return Err(spec_err(format!(
                "[[root.files]] src {} does not exist",
                source.display()
            )));
        }
        let mode = f
            .mode
            .as_deref()
            .map(parse_mode)
            .transpose()
            .map_err(spec_err)?
            .unwrap_or(0o644);
        content.files.push(RootFile {
            source,
            dest: f.dest.clone(),
            mode,
        });
    }
    Ok(content)
}

/// The `[root] images` specs, loaded (so that a broken one fails before the kernel
/// download): `(spec file, name:tag)`. Two specs naming the same image are an error.
fn image_specs(
    spec: &OsSpec,
    spec_path: &Path,
    spec_dir: &Path,
) -> Result<Vec<(PathBuf, String)>, BuildError> {
    let mut out: Vec<(PathBuf, String)> = Vec::new();
    for p in &spec.root.images {
        let path = spec_dir.join(p);
        if !path.is_file() {
            return Err(BuildError::Spec {
                path: spec_path.to_path_buf(),
                detail: format!("[root] images: {} does not exist", path.display()),
            });
        }
        let reference = Spec::load(&path)?.reference();
        if let Some((other, _)) = out.iter().find(|(_, r)| *r == reference) {
            return Err(BuildError::Spec {
                path: spec_path.to_path_buf(),
                detail: format!(
                    "[root] images: {} and {} both build {reference}",
                    other.display(),
                    path.display()
                ),
            });
        }
        out.push((path, reference));
    }
    Ok(out)
}
