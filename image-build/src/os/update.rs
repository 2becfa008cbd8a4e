//! The update side of `image-build os` (issue 13): the OS version (`--os-version`, `[os]
//! version`) that goes into os-release and the payload's manifest, and `--sign KEY.pem`:
//! the public key baked into the root image's trusted keys and the signed payload written
//! to `OUT/update/` (format: `osupdate/README.md`).

use std::path::{Path, PathBuf};

use flotilla_osupdate::payload::{parse_version, write_payload, PayloadSource, SigningKey};

use super::OsSpec;
use crate::BuildError;

/// The payload's directory inside the output directory.
pub const UPDATE_DIR: &str = "update";
/// The payload as an OCI image layout (tag = the version) inside the output directory:
/// `skopeo copy oci:OUT/update-oci:VERSION docker://REGISTRY/REPO:TAG` pushes it.
pub const UPDATE_OCI_DIR: &str = "update-oci";

/// The update options of `image-build os` (outside [`super::OsOptions`], whose users need
/// none of them).
#[derive(Debug, Clone, Default)]
pub struct UpdateOptions {
    /// `--os-version`: overrides `[os] version`.
    pub os_version: Option<String>,
    /// `--sign KEY.pem`: an Ed25519 private key (`openssl genpkey -algorithm ed25519`).
    pub sign: Option<PathBuf>,
}

/// What was resolved before the first step: the version, and the key if signing.
pub(super) struct UpdatePlan {
    /// The OS version.
    pub(super) version: String,
    /// The signing key.
    pub(super) key: Option<SigningKey>,
}

impl UpdatePlan {
    /// Resolves the version (`--os-version`, else `[os] version`, else the crate version;
    /// must be semver) and loads the key, before the kernel download.
    pub(super) fn resolve(opts: &UpdateOptions, spec: &OsSpec) -> Result<UpdatePlan, BuildError> {
        let version = opts
            .os_version
            .clone()
            .or_else(|| spec.os.version.clone())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
        parse_version(&version, "the image (--os-version or [os] version)")?;
        let key = opts.sign.as_deref().map(SigningKey::load).transpose()?;
        Ok(UpdatePlan { version, key })
    }

    /// The public keys to bake in: `(file name, PEM)`.
    pub(super) fn trusted_keys(&self) -> Vec<(String, String)> {
        self.key
            .iter()
            .map(|k| {
                let id = k.id();
                let name = id.strip_prefix("sha256:").unwrap_or(&id);
                (format!("{name}.pem"), k.public_pem())
            })
            .collect()
    }

    /// Writes `out/update/` (when signing): the image's `vmlinuz`, `initramfs.img` and
    /// `root.img` (hard links), the manifest and its signature; and the same payload as an
    /// OCI image layout in `out/update-oci/` (blobs hard-linked, tagged with the version).
    /// Returns the payload directory and the key id.
    pub(super) fn write(
        &self,
        out: &Path,
        kernel: &str,
    ) -> Result<Option<(PathBuf, String)>, BuildError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let dir = out.join(UPDATE_DIR);
        write_payload(
            &dir,
            &PayloadSource {
                version: &self.version,
                kernel,
                // The image is built for this architecture (the kernel is Debian's amd64).
                architecture: std::env::consts::ARCH,
                vmlinuz: &out.join("vmlinuz"),
                initramfs: &out.join("initramfs.img"),
                root: &out.join("root.img"),
            },
            key,
        )?;
        flotilla_osupdate::oci::write_layout(&dir, &out.join(UPDATE_OCI_DIR), &self.version)?;
        Ok(Some((dir, key.id())))
    }
}
