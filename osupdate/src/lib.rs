//! A/B updates of the Flotilla host (issue 13).
//!
//! - [`payload`]: the update payload (a directory holding the slot's kernel, initramfs and
//!   root image, `manifest.json` and its detached Ed25519 signature), its signing
//!   (`image-build os --sign`) and its verification against the keys baked into the image.
//! - [`entries`]: the Boot Loader Specification entries of the two slots on the EFI system
//!   partition, with systemd-boot's boot counting (`flotilla-<slot>+<left>[-<done>].conf`):
//!   install a trial entry, commit it, roll back, and the status (which slot boots next).
//! - [`slot`]: the slots' partitions (by GPT partition name), and writing a root image to
//!   the inactive one with a read-back check.
//! - [`host`]: the three together for one host: update, rollback, status.
//! - [`oci`]: the payload as an OCI image (written for `skopeo copy`, checked on pull).
//!
//! The crate is linked by the init (PID 1): nothing here panics; every failure is an error
//! value that says what failed, on what, and what to do.

pub mod entries;
pub mod host;
pub mod oci;
pub mod payload;
pub mod slot;

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

pub use entries::Slot;

/// An I/O error with the action and the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct IoError {
    /// What was being done (`read`, `write`, `rename`, ...).
    pub action: &'static str,
    /// On which file.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// Wraps `source`, which happened while doing `action` on `path`.
    pub fn new(action: &'static str, path: &Path, source: std::io::Error) -> IoError {
        IoError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Lower-case hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The chunk size of reads and writes (and of the progress callbacks).
pub const CHUNK: usize = 4 << 20;

/// Hex sha256 and size of everything `r` yields, read in [`CHUNK`]s.
pub(crate) fn sha256_reader(r: &mut impl Read, path: &Path) -> Result<(String, u64), IoError> {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(IoError::new("read", path, e)),
        };
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

/// Hex sha256 and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64), IoError> {
    let mut f = std::fs::File::open(path).map_err(|e| IoError::new("open", path, e))?;
    sha256_reader(&mut f, path)
}
