//! Why a build failed: [`BuildError`], and the helper that names the path an I/O error hit.

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
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: String,
        /// On what.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
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

/// An I/O error on `path` while doing `action`.
pub(crate) fn io_err(action: &str, path: &Path, e: std::io::Error) -> BuildError {
    BuildError::Io {
        action: action.to_string(),
        path: path.to_path_buf(),
        source: e,
    }
}
