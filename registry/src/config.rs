//! `registries.toml`: per-registry credentials, extra CA, insecure (plain HTTP), mirrors.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::PullError;

/// Default path of the registry settings.
pub const DEFAULT_REGISTRIES: &str = "/etc/flotilla/registries.toml";

/// Environment variable that overrides [`DEFAULT_REGISTRIES`] (tests, other hosts).
pub const REGISTRIES_ENV: &str = "FLOTILLA_REGISTRIES";

/// Settings of one registry (`[registry."host:port"]`).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// User name for basic auth (and for a bearer-token service's basic challenge).
    pub username: Option<String>,
    /// Password, inline (the file must then be mode 0600).
    pub password: Option<String>,
    /// File holding the password (first line; must be mode 0600).
    pub password_file: Option<PathBuf>,
    /// PEM file of an extra CA trusted for this registry, on top of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Plain HTTP is allowed for this registry (only then).
    #[serde(default)]
    pub insecure: bool,
    /// Mirrors (`host:port`), tried in order before the registry itself.
    #[serde(default)]
    pub mirrors: Vec<String>,
}

// Never print a password, not even in debug output.
impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("insecure", &self.insecure)
            .field("mirrors", &self.mirrors)
            .finish()
    }
}

/// The whole `registries.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    /// Registry that short names (`debian:12`, `team/app`) resolve against; without it they
    /// are refused.
    pub default_registry: Option<String>,
    /// Per-registry settings, keyed by `host` or `host:port`.
    #[serde(default)]
    pub registry: BTreeMap<String, RegistryConfig>,
}

/// Credentials of a registry, resolved from the settings.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password (never printed).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Registries {
    /// Reads the settings at `path`; a missing file is empty settings (anonymous HTTPS).
    ///
    /// Refused: a file that holds a password and is readable or writable by group or others
    /// (`chmod 600 FILE`), unknown keys, wrong types (with `file:line:column`).
    pub fn load(path: &Path) -> Result<Registries, PullError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Registries::default()),
            Err(e) => return Err(PullError::io("read the registry settings", path, e)),
        };
        let regs: Registries = toml::from_str(&text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
            PullError::Config {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        if regs.registry.values().any(|r| r.password.is_some()) {
            check_private(path, "it holds a password")?;
        }
        Ok(regs)
    }

    /// The settings of `registry` (empty settings if it is not listed).
    pub fn get(&self, registry: &str) -> RegistryConfig {
        self.registry.get(registry).cloned().unwrap_or_default()
    }
}

impl RegistryConfig {
    /// The credentials, reading `password_file` if set (which must be mode 0600).
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>, PullError> {
        let Some(username) = &self.username else {
            return Ok(None);
        };
        let password = match (&self.password, &self.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(file)) => {
                check_private(file, "it holds a password")?;
                let text = fs::read_to_string(file)
                    .map_err(|e| PullError::io("read the password file", file, e))?;
                text.lines().next().unwrap_or_default().to_string()
            }
            (None, None) => {
                return Err(PullError::Settings(format!(
                    "registry {registry}: `username` is set but neither `password` nor `password_file`; add one"
                )))
            }
        };
        Ok(Some(Credentials {
            username: username.clone(),
            password,
        }))
    }
}

/// Refuses `path` unless only its owner may read or write it.
fn check_private(path: &Path, why: &'static str) -> Result<(), PullError> {
    let meta = fs::metadata(path).map_err(|e| PullError::io("stat", path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PullError::NotPrivate {
            path: path.to_path_buf(),
            mode,
            why,
        });
    }
    Ok(())
}

/// 1-based line and column of byte offset `at` in `text`.
pub(crate) fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("registries.toml");
        fs::write(&p, "[registry.\"r:5000\"]\ninsecure = true\nmirrorz = []\n").unwrap();
        let e = Registries::load(&p).unwrap_err().to_string();
        assert!(e.contains("registries.toml:3:1"), "{e}");
        assert!(e.contains("mirrorz"), "{e}");
    }

    #[test]
    fn password_needs_mode_0600_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("registries.toml");
        fs::write(
            &p,
            "[registry.\"r:5000\"]\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Registries::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let r = Registries::load(&p).unwrap();
        let c = r.get("r:5000").credentials("r:5000").unwrap().unwrap();
        assert_eq!(c.password, "hunter2");
        assert!(!format!("{r:?} {c:?}").contains("hunter2"));
    }

    #[test]
    fn missing_file_is_empty() {
        let r = Registries::load(Path::new("/nonexistent/registries.toml")).unwrap();
        assert!(r.registry.is_empty() && r.default_registry.is_none());
    }
}
