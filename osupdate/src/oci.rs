//! The update payload as an OCI image, so that it travels through the same registries as
//! the apps (format: `osupdate/README.md`, "The payload as an OCI image"). An OCI image
//! manifest whose layers are the payload's five files, each an uncompressed blob with its
//! own media type and an `org.opencontainers.image.title` annotation naming the file (as
//! ORAS stores files); the config's media type and the manifest's `artifactType` say it is
//! a Flotilla OS update.
//!
//! The OCI digests only protect the transfer: the registry is not trusted. What decides is
//! the payload's own signature, checked by [`crate::payload::verify`] on the files pulled.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::payload::{PayloadError, UpdateManifest, MANIFEST, SIGNATURE};
use crate::{sha256_file, IoError};

/// `artifactType` of the image manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.flotilla.os.update.v1";
/// Media type of the config blob (a small JSON: os, version, architecture; informative,
/// not trusted).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.flotilla.os.update.config.v1+json";
/// Media type of the image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The annotation naming a layer's file (ORAS's convention).
pub const TITLE: &str = "org.opencontainers.image.title";
/// The annotation carrying the OS version on the manifest.
pub const VERSION: &str = "org.opencontainers.image.version";
/// The annotation naming a tag in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The layers of an update image, in order: `(file name, media type)`. Exactly these, each
/// once; nothing else.
pub const LAYERS: [(&str, &str); 5] = [
    (MANIFEST, "application/vnd.flotilla.os.manifest.v1+json"),
    (SIGNATURE, "application/vnd.flotilla.os.signature.v1+json"),
    ("vmlinuz", "application/vnd.flotilla.os.kernel.v1"),
    ("initramfs.img", "application/vnd.flotilla.os.initramfs.v1"),
    ("root.img", "application/vnd.flotilla.os.root.erofs.v1"),
];

/// Why an OCI update image cannot be written, or a manifest is not one.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The payload directory does not hold what a payload holds.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// A JSON document could not be written.
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// Which document.
        what: &'static str,
        /// What serde said.
        detail: String,
    },
    /// The manifest is not an OCI image manifest at all.
    #[error("{reference}: the manifest is not an OCI image manifest: {detail}; refused")]
    NotAManifest {
        /// The reference.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// An OCI image of another kind (a container image, another artifact).
    #[error("{reference} is not a Flotilla OS update (its config is {config_type}{artifact}, expected {CONFIG_MEDIA_TYPE}): refused; `unitctl image pull` pulls container images, `unitctl os update` takes the image `image-build os --sign` writes")]
    NotAnUpdate {
        /// The reference.
        reference: String,
        /// The config's media type.
        config_type: String,
        /// `, artifactType X` when present.
        artifact: String,
    },
    /// An update image whose layers are not exactly the payload's files.
    #[error("{reference} is a Flotilla OS update of another shape: {detail}; rebuild it with `image-build os --sign`")]
    BadLayers {
        /// The reference.
        reference: String,
        /// What is wrong.
        detail: String,
    },
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<64 hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// The parts of an OCI image manifest an update image has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// [`OCI_MANIFEST`] (optional in OCI).
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// [`ARTIFACT_TYPE`] (optional: registries before OCI 1.1 may not keep it).
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Annotations ([`VERSION`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// The config blob of an update image: informative only (the signed manifest decides).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// The OS id.
    pub os: String,
    /// The version.
    pub version: String,
    /// The architecture.
    pub architecture: String,
}

/// One file of an update image: its name in the payload directory and its layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateLayer {
    /// The file name ([`LAYERS`]).
    pub file: String,
    /// The layer's descriptor.
    pub layer: Descriptor,
}

/// An OCI layout written by [`write_layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayout {
    /// The layout directory.
    pub dir: PathBuf,
    /// The tag in its `index.json` (`skopeo copy oci:DIR:TAG ...`).
    pub tag: String,
    /// The manifest's digest.
    pub digest: String,
    /// Bytes of all the blobs.
    pub size: u64,
}

fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, OciError> {
    serde_json::to_vec(v).map_err(|e| OciError::Encode {
        what,
        detail: e.to_string(),
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    std::fs::write(path, bytes).map_err(|e| IoError::new("write", path, e))
}

/// Puts `src` into `blobs` under its digest (a hard link, else a copy); returns the digest
/// and size.
fn add_blob_file(blobs: &Path, src: &Path) -> Result<(String, u64), IoError> {
    let (hex, size) = sha256_file(src)?;
    let dest = blobs.join(&hex);
    if !dest.exists() && std::fs::hard_link(src, &dest).is_err() {
        std::fs::copy(src, &dest).map_err(|e| IoError::new("copy", src, e))?;
    }
    Ok((format!("sha256:{hex}"), size))
}

fn add_blob_bytes(blobs: &Path, bytes: &[u8]) -> Result<(String, u64), IoError> {
    let hex = crate::hex(&<sha2::Sha256 as sha2::Digest>::digest(bytes));
    write_file(&blobs.join(&hex), bytes)?;
    Ok((format!("sha256:{hex}"), bytes.len() as u64))
}

/// Writes the signed payload in `payload` (a directory `image-build os --sign` wrote) as an
/// OCI image layout in `out` (replaced if present), tagged `tag` in its `index.json`. The
/// blobs are hard links to the payload's files where the filesystem allows. The payload's
/// manifest is read for the version and architecture annotations; it is not verified here.
pub fn write_layout(payload: &Path, out: &Path, tag: &str) -> Result<WrittenLayout, OciError> {
    let mpath = payload.join(MANIFEST);
    let mbytes = std::fs::read(&mpath).map_err(|e| IoError::new("read", &mpath, e))?;
    let update: UpdateManifest =
        serde_json::from_slice(&mbytes).map_err(|e| PayloadError::BadManifest {
            path: mpath.clone(),
            detail: e.to_string(),
        })?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| IoError::new("remove", out, e))?;
    }
    let blobs = out.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| IoError::new("create", &blobs, e))?;
    let mut layers = Vec::new();
    let mut total = 0u64;
    for (file, media_type) in LAYERS {
        let (digest, size) = add_blob_file(&blobs, &payload.join(file))?;
        total += size;
        layers.push(Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: Some([(TITLE.to_string(), file.to_string())].into()),
        });
    }
    let config = UpdateConfig {
        os: update.os.clone(),
        version: update.version.clone(),
        architecture: update.architecture.clone(),
    };
    let (cdigest, csize) = add_blob_bytes(&blobs, &encode("the update config", &config)?)?;
    total += csize;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: Descriptor {
            media_type: CONFIG_MEDIA_TYPE.into(),
            digest: cdigest,
            size: csize,
            annotations: None,
        },
        layers,
        annotations: Some([(VERSION.to_string(), update.version.clone())].into()),
    };
    let mbytes = encode("the image manifest", &manifest)?;
    let (digest, msize) = add_blob_bytes(&blobs, &mbytes)?;
    total += msize;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "digest": digest,
            "size": msize,
            "annotations": { REF_NAME: tag },
        }],
    });
    write_file(
        &out.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    write_file(
        &out.join("index.json"),
        &encode("the layout's index", &index)?,
    )?;
    Ok(WrittenLayout {
        dir: out.to_path_buf(),
        tag: tag.to_string(),
        digest,
        size: total,
    })
}

/// Checks that the image manifest `bytes` of `reference` is a Flotilla OS update: the
/// config's media type is [`CONFIG_MEDIA_TYPE`] (and `artifactType`, when present,
/// [`ARTIFACT_TYPE`]), and its layers are exactly the files of [`LAYERS`], each once,
/// named by [`TITLE`], with their media types. Returns the files to fetch. Only the shape
/// is checked: the registry is not trusted, the signature of the files pulled decides.
pub fn parse_update_manifest(reference: &str, bytes: &[u8]) -> Result<Vec<UpdateLayer>, OciError> {
    let m: ImageManifest = serde_json::from_slice(bytes).map_err(|e| OciError::NotAManifest {
        reference: reference.to_string(),
        detail: e.to_string(),
    })?;
    let ours = m.config.media_type == CONFIG_MEDIA_TYPE
        && m.artifact_type
            .as_deref()
            .is_none_or(|t| t == ARTIFACT_TYPE);
    if !ours {
        return Err(OciError::NotAnUpdate {
            reference: reference.to_string(),
            config_type: m.config.media_type.clone(),
            artifact: m
                .artifact_type
                .as_ref()
                .map(|t| format!(", artifactType {t}"))
                .unwrap_or_default(),
        });
    }
    let bad = |detail: String| OciError::BadLayers {
        reference: reference.to_string(),
        detail,
    };
    let mut out: Vec<UpdateLayer> = Vec::new();
    for layer in &m.layers {
        let title = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(TITLE))
            .ok_or_else(|| bad(format!("layer {} has no {TITLE} annotation", layer.digest)))?;
        let (file, media_type) = LAYERS.iter().find(|(f, _)| f == title).ok_or_else(|| {
            bad(format!(
                "a layer is named {title:?}, not one of the payload's files"
            ))
        })?;
        if layer.media_type != *media_type {
            return Err(bad(format!(
                "the layer {file} has media type {}, expected {media_type}",
                layer.media_type
            )));
        }
        if out.iter().any(|l| l.file == *file) {
            return Err(bad(format!("two layers are named {file}")));
        }
        out.push(UpdateLayer {
            file: (*file).to_string(),
            layer: layer.clone(),
        });
    }
    if let Some((missing, _)) = LAYERS
        .iter()
        .find(|(f, _)| !out.iter().any(|l| l.file == *f))
    {
        return Err(bad(format!("no layer holds {missing}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn the_layers_are_the_payloads_files() {
        for (_, path) in crate::payload::ARTIFACTS {
            assert!(LAYERS.iter().any(|(f, _)| *f == path), "{path}");
        }
    }

    #[test]
    fn a_container_image_is_not_an_update() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},"layers":[]}"#;
        let e = parse_update_manifest("r/x:1", m).unwrap_err();
        assert!(matches!(e, OciError::NotAnUpdate { .. }), "{e}");
        assert!(e.to_string().contains("is not a Flotilla OS update"), "{e}");
    }
}
