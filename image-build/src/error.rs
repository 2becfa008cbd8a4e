//! Why a build failed: [`BuildError`]; and [`PathIoError`], an I/O error naming what was done
//! on which path (the QEMU harness uses it too).

use std::path::{Path, PathBuf};

use flotilla_container::image::ImageError;

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The spec is invalid.
    #[error("spec {}: {detail}", path.display())]
    Spec {
        /// Spec file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// An external command failed.
    #[error("{command} failed ({status}){}", tail_text(.tail, .log))]
    Command {
        /// The command line.
        command: String,
        /// Exit status or spawn error.
        status: String,
        /// Last lines of its output.
        tail: Vec<String>,
        /// Full log, if kept.
        log: Option<PathBuf>,
    },
    /// Writing the layout or importing failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Invalid options.
    #[error("{0}")]
    Usage(String),
    /// The update payload (`--sign`): a bad key, version or file.
    #[error(transparent)]
    Update(#[from] flotilla_osupdate::payload::PayloadError),
    /// The update payload's OCI image (`OUT/update-oci/`).
    #[error("writing the OCI image of the update payload: {0}")]
    UpdateOci(#[from] flotilla_osupdate::oci::OciError),
}

fn tail_text(tail: &[String], log: &Option<PathBuf>) -> String {
    let mut s = String::new();
    if !tail.is_empty() {
        s.push_str(":\n  ");
        s.push_str(&tail.join("\n  "));
    }
    if let Some(l) = log {
        s.push_str(&format!("\n(full log: {})", l.display()));
    }
    s
}

/// A file or process operation that failed on a path: "cannot ACTION PATH: OS error".
/// Shared with the QEMU harness's errors.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct PathIoError {
    /// What was being done.
    pub action: String,
    /// On what.
    pub path: PathBuf,
    /// OS error.
    #[source]
    pub source: std::io::Error,
}

impl PathIoError {
    /// The error `e` of doing `action` on `path`.
    pub fn new(action: &str, path: &Path, e: std::io::Error) -> PathIoError {
        PathIoError {
            action: action.to_string(),
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// An I/O error on `path` while doing `action`.
pub(crate) fn io_err(action: &str, path: &Path, e: std::io::Error) -> BuildError {
    BuildError::Io(PathIoError::new(action, path, e))
}
