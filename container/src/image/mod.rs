//! The local, content-addressed image store.
//!
//! Layout under the store root (default [`DEFAULT_STORE`]):
//! ```text
//! blobs/sha256/<hex>     OCI blobs as imported: manifests, configs, compressed layers
//! layers/<diffid-hex>/   each layer extracted once (overlayfs format), shared by images
//! images.json            name:tag -> manifest digest (replaced atomically)
//! lock                   flock(2)ed while an import or a removal changes the store
//! tmp/                   staging area of the import in progress
//! leases/<holder>.<pid>.json layers running containers use: kept by garbage collection
//! ```
//! Images come in as OCI image layouts or `docker save` archives
//! ([`ImageStore::import_oci_layout`]); a container's
//! root is an overlay of [`ResolvedImage::layers`]. [`ImageStores`] looks images up in
//! several stores in order (the writable one, then the read-only [`SYSTEM_STORE`]). Nothing here panics: the store is used
//! by PID 1.

mod docker;
mod extract;
mod layout;
mod lease;
mod source;
mod store;
mod stores;

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use layout::write_oci_layout;
pub use lease::Lease;
pub use store::{ImageStore, STORE_MODE};
pub use stores::{ImageStores, StoredImage};

/// Default store root, shared by `unitctl image` and `image-build`: the writable store.
pub const DEFAULT_STORE: &str = "/var/lib/flotilla/images";

/// The system store: images baked into the host's read-only root image by `image-build os`.
pub const SYSTEM_STORE: &str = "/usr/share/flotilla/images";

/// The stores images are looked up in by default, in order: the writable store, then the
/// system store (see [`ImageStores`]).
pub const DEFAULT_STORES: [&str; 2] = [DEFAULT_STORE, SYSTEM_STORE];

/// A stored image, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Image name (without tag).
    pub name: String,
    /// Tag (`latest` unless given).
    pub tag: String,
    /// Manifest digest, `sha256:<hex>`.
    pub digest: String,
    /// Sum of the layer blob sizes (compressed, as imported), in bytes.
    pub size: u64,
    /// Creation time from the image config, if it has one.
    pub created: Option<String>,
    /// Number of layers.
    pub layers: usize,
}

/// What a container needs from its image's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// `KEY=value` environment entries.
    pub env: Vec<String>,
    /// Entrypoint (may be empty).
    pub entrypoint: Vec<String>,
    /// Default command (arguments to the entrypoint, or the command itself).
    pub cmd: Vec<String>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// User (`uid`, `uid:gid`, or a name).
    pub user: Option<String>,
}

/// An image ready to be mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The image as listed.
    pub info: ImageInfo,
    /// Extracted layer directories, LOWEST FIRST (overlayfs wants `lowerdir` highest first:
    /// reverse this list).
    pub layers: Vec<PathBuf>,
    /// Runtime settings from the image config.
    pub config: RuntimeConfig,
}

/// Progress of an import, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportEvent {
    /// A layer was verified and extracted (or found already extracted).
    Layer {
        /// 0-based index of the layer, lowest first.
        index: usize,
        /// Number of layers of the image.
        count: usize,
        /// Digest of the layer blob (`sha256:<hex>`).
        digest: String,
        /// Size of the layer blob in bytes.
        bytes: u64,
    },
    /// The image is in the store.
    Done,
}

/// Why an image operation failed. Messages say what failed, on what, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A filesystem operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: String,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file of a source layout is not a regular file (a FIFO, device, socket, symlink or
    /// directory): reading it could block forever or never end, so it is refused unread.
    #[error("refusing the {what} {}: it is {kind}, not a regular file; an OCI layout holds only regular files and directories (the layout is corrupt or hostile), nothing was imported", path.display())]
    NotRegular {
        /// Which file (`index`, `manifest blob`, `layer 1/3 blob`, `image archive`).
        what: String,
        /// Where.
        path: PathBuf,
        /// What it is instead, e.g. `a FIFO (named pipe)`.
        kind: &'static str,
    },
    /// A JSON document (index, manifest, config, images.json) could not be read or written.
    #[error("invalid {what} {}: {detail}", path.display())]
    Json {
        /// Which document.
        what: String,
        /// Where.
        path: PathBuf,
        /// Parser message.
        detail: String,
    },
    /// The source is not a usable OCI image layout.
    #[error("{0}")]
    Layout(String),
    /// A blob does not have the digest (or size) its descriptor promises.
    #[error("{what} {expected}: content has {actual}; the layout is corrupt or was tampered with, nothing was imported")]
    DigestMismatch {
        /// What kind of blob (manifest, config, layer N, diff_id of layer N).
        what: String,
        /// The digest (or size) announced.
        expected: String,
        /// The digest (or size) found.
        actual: String,
    },
    /// A layer uses a compression this store does not read.
    #[error("{0}")]
    Unsupported(String),
    /// A tar entry was refused as unsafe or invalid.
    #[error("layer {layer}: refused tar entry '{entry}': {reason}; the archive is hostile or corrupt, nothing was imported")]
    UnsafeEntry {
        /// Layer digest (or archive name).
        layer: String,
        /// Entry name as found in the archive.
        entry: String,
        /// Why.
        reason: String,
    },
    /// Writing one entry of a layer failed.
    #[error("layer {layer}: cannot {what} for entry '{entry}': {source}")]
    Extract {
        /// Layer digest (or archive name).
        layer: String,
        /// Entry name.
        entry: String,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The import needs a name and the layout has none.
    #[error("the image at {} has no name (no org.opencontainers.image.ref.name annotation, no RepoTags): give the image a name (--name NAME[:TAG])", .0.display())]
    NeedName(PathBuf),
    /// An invalid image reference.
    #[error("invalid image reference '{reference}': {reason}")]
    BadReference {
        /// As given.
        reference: String,
        /// Why.
        reason: String,
    },
    /// No image matches.
    #[error("no image '{0}' in the store (see `unitctl image list`; import or build it first)")]
    NotFound(String),
    /// The image to remove is only in a read-only store of an [`ImageStores`].
    #[error("image '{reference}' is only in {}, a read-only store (only the first store, {}, is written to): it cannot be removed", store.display(), writable.display())]
    ReadOnlyStore {
        /// As given.
        reference: String,
        /// The read-only store that has it.
        store: PathBuf,
        /// The writable store.
        writable: PathBuf,
    },
    /// An [`ImageStores`] was given no store directory.
    #[error("no image store given")]
    NoStore,
    /// A digest prefix matches several images.
    #[error("'{reference}' matches several images ({}): give more digest characters or name:tag", candidates.join(", "))]
    Ambiguous {
        /// As given.
        reference: String,
        /// The matching name:tag references.
        candidates: Vec<String>,
    },
    /// The store's content is damaged.
    #[error("store damaged: {0}; remove the image and import it again")]
    Damaged(String),
}

impl ImageError {
    pub(crate) fn io(
        action: impl Into<String>,
        path: impl Into<PathBuf>,
        source: impl Into<io::Error>,
    ) -> Self {
        ImageError::Io {
            action: action.into(),
            path: path.into(),
            source: source.into(),
        }
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A reader that hashes (sha256) and counts what passes through it.
pub(crate) struct HashReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    count: u64,
}

impl<R> HashReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        use sha2::Digest as _;
        HashReader {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
        }
    }
    /// `sha256:<hex>` of everything read, and the byte count.
    pub(crate) fn finish(self) -> (String, u64) {
        use sha2::Digest as _;
        (
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.count,
        )
    }
}

impl<R: io::Read> io::Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        let done = buf.get(..n).unwrap_or_default();
        self.hasher.update(done);
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that hashes (sha256) and counts what passes through it.
pub(crate) struct HashWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W> HashWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        use sha2::Digest as _;
        HashWriter {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
        }
    }
    /// The inner writer, `sha256:<hex>` of everything written, and the byte count.
    pub(crate) fn finish(self) -> (W, String, u64) {
        use sha2::Digest as _;
        (
            self.inner,
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.count,
        )
    }
}

impl<W: io::Write> io::Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Splits `sha256:<hex>` into its hex part, checking it is 64 lower-case hex digits (the
/// units crate's rule, which unit files are checked by too).
pub use flotilla_units::sha256_hex;

/// The store tag of an image pinned by digest: `sha256:<64 hex>` → `sha256-<64 hex>` (the
/// units crate's rule, which fleetd's scheduler names images by too).
pub use flotilla_units::digest_tag;

/// Parses `name` or `name:tag` (tag defaults to `latest`). A `:` followed by a `/` belongs
/// to a registry host:port, not a tag. `name[:tag]@sha256:<64 hex>` is the image pinned to
/// that digest: `(name, "sha256-<64 hex>")` ([`digest_tag`]); its tag, if any, only says
/// what was meant and is not looked up.
pub fn parse_reference(reference: &str) -> Result<(String, String), ImageError> {
    let bad = |reason: &str| ImageError::BadReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    };
    let parts = flotilla_units::split_reference(reference).map_err(bad)?;
    let (name, tag) = (parts.name, parts.tag);
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if tag.is_empty() {
        return Err(bad("empty tag"));
    }
    let ok = |s: &str, extra: &[u8]| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
    };
    if !ok(name, b"/:") {
        return Err(bad("names use letters, digits, '.', '_', '-', '/'"));
    }
    if !ok(tag, b"") {
        return Err(bad("tags use letters, digits, '.', '_', '-'"));
    }
    Ok((name.to_string(), parts.store_tag().to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn a_digest_reference_is_its_pinned_store_tag() {
        let hex = "0123456789abcdef".repeat(4);
        let pinned = (
            "127.0.0.1:5000/team/app".to_string(),
            format!("sha256-{hex}"),
        );
        // With or without the tag: the digest decides.
        for r in [
            format!("127.0.0.1:5000/team/app@sha256:{hex}"),
            format!("127.0.0.1:5000/team/app:1.4@sha256:{hex}"),
            format!("127.0.0.1:5000/team/app:sha256-{hex}"),
        ] {
            assert_eq!(parse_reference(&r).unwrap(), pinned, "{r}");
        }
        assert_eq!(
            digest_tag(&format!("sha256:{hex}")).unwrap(),
            format!("sha256-{hex}")
        );
        // Only a whole, lower-case sha256 digest pins.
        for d in [
            "sha256:0123456789ab".to_string(),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha512:{hex}"),
            format!("sha256:{hex}0"),
            String::new(),
        ] {
            assert_eq!(digest_tag(&d), None, "{d}");
            let r = format!("reg.example/app:1@{d}");
            assert!(
                matches!(parse_reference(&r), Err(ImageError::BadReference { .. })),
                "{r}"
            );
        }
        assert!(parse_reference(&format!("@sha256:{hex}")).is_err());
        assert!(parse_reference(&format!("app:@sha256:{hex}")).is_err());
        // Plain references are as before.
        assert_eq!(
            parse_reference("localhost:5000/app").unwrap(),
            ("localhost:5000/app".to_string(), "latest".to_string())
        );
        assert_eq!(
            parse_reference("app:1").unwrap(),
            ("app".to_string(), "1".to_string())
        );
    }
}
