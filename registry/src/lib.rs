//! Flotilla's OCI registry client: `unitctl image pull REF` into the local image store.
//!
//! A separate crate so that PID 1 (`flotilla-init`, which links `flotilla-container`) does
//! not carry tokio's multi-thread runtime, reqwest and rustls: only `unitctl` links this (and
//! `fleetctl`, which pins tags to digests at submit with [`resolve_digest`]).
//! The protocol (auth challenges, manifests, blobs) is `oci-client`'s; this crate resolves
//! references and settings, picks the platform of an index, downloads the blobs the store
//! lacks into a staging OCI layout (each verified against its digest, fsynced, renamed),
//! and hands that layout to [`ImageStore::import_oci_layout`](flotilla_container::image::ImageStore::import_oci_layout),
//! the store's one way in. [`pull_files`] pulls an artifact's files (the host's OS update)
//! into a directory instead, with the same settings and verification.

pub mod config;
mod files;
pub use files::{pull_files, ArtifactFile, FilesReport, ManifestCheck};
pub mod peers;
mod pull;
pub use pull::Progress;
mod reference;

use std::path::{Path, PathBuf};

pub use config::{Registries, RegistryConfig, DEFAULT_REGISTRIES, REGISTRIES_ENV};
pub use peers::{PeerSettings, DEFAULT_PEERS, PEERS_ENV};
pub use pull::{
    fallback_roots, machine_has_roots, pull, pull_with_peers, resolve_digest, PullEvent, PullReport,
};
pub use reference::ImageRef;

use flotilla_container::image::ImageError;

/// Why a pull failed. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error("invalid image reference '{reference}': {reason}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A short name without a configured default registry.
    #[error("image reference '{reference}' names no registry (expected HOST[:PORT]/REPO[:TAG] or ...@sha256:...); give the registry, or set `default_registry` in {settings}")]
    NoDefaultRegistry {
        /// The reference as given.
        reference: String,
        /// The settings file consulted.
        settings: String,
    },
    /// `registries.toml` does not parse.
    #[error("{}:{line}:{column}: {message}; see `registries.toml` in the flotilla-registry README", path.display())]
    Config {
        /// The settings file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// A settings value is inconsistent.
    #[error("registry settings: {0}")]
    Settings(String),
    /// A file holding credentials is open to other users.
    #[error("refusing {}: {why} but its mode is {mode:o}; run `chmod 600 {}`", path.display(), path.display())]
    NotPrivate {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Why it must be private.
        why: &'static str,
    },
    /// A local file operation failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The registry refused or failed a request.
    #[error("pull of {reference} from {registry}: {action}: {answer}{hint}")]
    Registry {
        /// The reference being pulled.
        reference: String,
        /// The registry (or mirror) asked.
        registry: String,
        /// What was asked for (manifest, config, layer N/M).
        action: String,
        /// The registry's answer (or the transport error).
        answer: String,
        /// What to do about it, if known.
        hint: &'static str,
    },
    /// This machine has no CA certificates: no HTTPS client can be built (oci-client's
    /// would panic), so the pull refuses before it starts.
    #[error("cannot pull from {registry}: this machine has no CA certificates (none in SSL_CERT_FILE or SSL_CERT_DIR, no system bundle); install a CA bundle, or give {registry} a `ca_file` in registries.toml (unitctl then uses that CA as the machine's roots)")]
    NoRoots {
        /// The registry (or mirror) to be asked.
        registry: String,
    },
    /// A blob's content does not match its digest: refused, not stored.
    #[error("pull of {reference}: {what} from {registry} does not match its digest (expected {expected}, got {actual}); refused, nothing stored: the registry or something between it and this host altered it")]
    DigestMismatch {
        /// The reference being pulled.
        reference: String,
        /// The registry asked.
        registry: String,
        /// Which blob.
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it had.
        actual: String,
    },
    /// The registry's documents are not what the protocol says.
    #[error("pull of {reference}: {detail}")]
    Unsupported {
        /// The reference being pulled.
        reference: String,
        /// What was unexpected.
        detail: String,
    },
    /// The artifact pulled is not the one asked for (the caller's check of its manifest
    /// refused it, or it is an index): nothing was downloaded.
    #[error("{detail}")]
    Refused {
        /// Why, naming the reference.
        detail: String,
    },
    /// The local image store refused the image.
    #[error(transparent)]
    Store(#[from] ImageError),
}

impl PullError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> PullError {
        PullError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}
