//! The image spec (TOML). See the crate README for every key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::BuildError;

/// A container image spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Image name.
    pub name: String,
    /// Image tag (default `latest`).
    #[serde(default)]
    pub tag: Option<String>,
    /// Where the root filesystem comes from.
    pub source: Source,
    /// Runtime settings written into the image config.
    #[serde(default)]
    pub config: ConfigSpec,
    /// Extra files copied in.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Extra symlinks created.
    #[serde(default)]
    pub symlinks: Vec<SymlinkSpec>,
    /// Create a symlink to `/bin/busybox` for every applet `bin/busybox --list-full`
    /// prints (existing files are kept).
    #[serde(default)]
    pub busybox_links: bool,
}

/// The source of the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// `debootstrap --variant VARIANT --include PACKAGES SUITE ROOT [MIRROR]`.
    Debootstrap {
        /// Debian suite (default: the host's VERSION_CODENAME).
        #[serde(default)]
        suite: Option<String>,
        /// debootstrap variant (default `minbase`).
        #[serde(default)]
        variant: Option<String>,
        /// Extra packages (`--include`).
        #[serde(default)]
        packages: Vec<String>,
    },
    /// `apt-get download` of exactly these packages (no dependency resolution) and
    /// `dpkg-deb -x` of each: no maintainer scripts run. For tiny images.
    Packages {
        /// Packages, from the host's apt sources.
        packages: Vec<String>,
    },
    /// A directory copied as is (path relative to the spec file).
    Directory {
        /// The directory.
        path: PathBuf,
    },
}

/// Runtime settings of the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default command.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `KEY=value` environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// User.
    #[serde(default)]
    pub user: Option<String>,
}

/// A file copied into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Source, relative to the spec file.
    pub src: PathBuf,
    /// Absolute destination in the image.
    pub dest: String,
    /// Octal mode, e.g. "0644" (default "0644").
    #[serde(default)]
    pub mode: Option<String>,
}

/// A symlink created in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymlinkSpec {
    /// Absolute path of the link in the image.
    pub path: String,
    /// What it points to (stored as is).
    pub target: String,
}

impl Spec {
    /// Reads and validates a spec file.
    pub fn load(path: &Path) -> Result<Spec, BuildError> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err("read spec", path, e))?;
        let spec: Spec = toml::from_str(&text).map_err(|e| BuildError::Spec {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        spec.validate(path)?;
        Ok(spec)
    }

    fn validate(&self, path: &Path) -> Result<(), BuildError> {
        let bad = |detail: String| BuildError::Spec {
            path: path.to_path_buf(),
            detail,
        };
        flotilla_container::image::parse_reference(&self.reference())
            .map_err(|e| bad(e.to_string()))?;
        for f in &self.files {
            check_dest(&f.dest).map_err(|d| bad(format!("[[files]] dest {:?}: {d}", f.dest)))?;
            if let Some(m) = &f.mode {
                parse_mode(m).map_err(|d| bad(format!("[[files]] mode {m:?}: {d}")))?;
            }
        }
        for s in &self.symlinks {
            check_dest(&s.path).map_err(|d| bad(format!("[[symlinks]] path {:?}: {d}", s.path)))?;
            if s.target.is_empty() {
                return Err(bad(format!("[[symlinks]] {}: empty target", s.path)));
            }
        }
        let pkgs = match &self.source {
            Source::Debootstrap { packages, .. } | Source::Packages { packages } => packages,
            Source::Directory { .. } => return Ok(()),
        };
        for p in pkgs {
            let ok = !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.:=_".contains(&b))
                && !p.starts_with('-');
            if !ok {
                return Err(bad(format!(
                    "package name {p:?} is not a Debian package name"
                )));
            }
        }
        if matches!(&self.source, Source::Packages { packages } if packages.is_empty()) {
            return Err(bad("kind = \"packages\" needs at least one package".into()));
        }
        Ok(())
    }

    /// `name:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag.as_deref().unwrap_or("latest"))
    }
}

/// Checks an image path: absolute, no `..`, not `/` itself.
pub(crate) fn check_dest(dest: &str) -> Result<(), String> {
    if !dest.starts_with('/') {
        return Err("must be absolute".into());
    }
    if dest.split('/').any(|c| c == "..") {
        return Err("must not contain '..'".into());
    }
    if dest.trim_matches('/').is_empty() {
        return Err("must name a file, not /".into());
    }
    Ok(())
}

/// Parses an octal mode string like "0755".
pub fn parse_mode(mode: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .map_err(|_| "expected an octal mode like \"0644\"".to_string())?;
    if m > 0o7777 {
        return Err("mode above 07777".into());
    }
    Ok(m)
}
