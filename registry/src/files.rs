//! Pulling an OCI artifact's files (not a container image): the manifest (by tag or
//! digest, its sha256 checked against a digest in the reference), then each layer the
//! caller's check names, downloaded digest-verified into a directory under the file name
//! the caller gives. `unitctl os update REF` pulls a Flotilla OS update with it (the check
//! is `flotilla_osupdate::oci::parse_update_manifest`). The same settings, mirrors,
//! credentials, CAs, `insecure` rules and resumed downloads as [`crate::pull`]; no peers,
//! no store.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::RegistryOperation;

use crate::pull::{
    auth_for, client_for, download, endpoints, registry_error, sha256_of, source_failed,
    Descriptor, Source, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use crate::{ImageRef, Progress, PullError, PullEvent, Registries};

/// Files downloaded at once.
const CONCURRENT_FILES: usize = 2;

/// One file of an artifact, as the caller's check of the manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactFile {
    /// The file name in the destination directory (a plain name: no `/`, not `.`/`..`).
    pub name: String,
    /// The layer's media type.
    pub media_type: String,
    /// The layer's digest, `sha256:<64 hex>`.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What [`pull_files`] fetched.
#[derive(Debug, Clone)]
pub struct FilesReport {
    /// The registry (or mirror) it came from.
    pub registry: String,
    /// The manifest's digest.
    pub manifest_digest: String,
    /// The files written, in the manifest's order.
    pub files: Vec<ArtifactFile>,
    /// Bytes downloaded.
    pub bytes: u64,
}

/// The caller's check of the manifest bytes: the files to fetch, or why the artifact is
/// refused (the message is the pull's error).
pub type ManifestCheck<'a> = &'a (dyn Fn(&str, &[u8]) -> Result<Vec<ArtifactFile>, String> + Sync);

/// Pulls the files of the artifact `reference` into `dest` (an existing, empty directory
/// the caller removes afterwards): the manifest is asked for (mirrors first, as a pull);
/// `check(reference, bytes)` decides whether it is the artifact wanted and which layers
/// are which files; each is downloaded to `dest/blobs/sha256/<hex>.partial`, hashed as it
/// arrives, fsynced, checked against its digest and size, then renamed to `dest/<name>`.
/// An image index is refused (an artifact is one manifest). Runs its own tokio runtime.
pub fn pull_files(
    reference: &str,
    settings: &Registries,
    settings_path: &Path,
    dest: &Path,
    check: ManifestCheck<'_>,
    progress: Progress,
) -> Result<FilesReport, PullError> {
    let image = ImageRef::parse(reference, settings, &settings_path.display().to_string())?;
    let blobs = dest.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)
        .map_err(|e| PullError::io("create the download directory", &blobs, e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PullError::io("start the download runtime for", dest, e))?;
    let report = runtime.block_on(fetch(&image, settings, dest, &blobs, check, &progress))?;
    if let Err(e) = std::fs::remove_dir_all(dest.join("blobs")) {
        log::warn!("cannot remove {}: {e}", blobs.display());
    }
    Ok(report)
}

async fn fetch(
    image: &ImageRef,
    settings: &Registries,
    dest: &Path,
    blobs: &Path,
    check: ManifestCheck<'_>,
    progress: &Progress,
) -> Result<FilesReport, PullError> {
    let hosts = endpoints(image, settings);
    let client = client_for(settings, &hosts)?;
    let mut last = None;
    for host in &hosts {
        let auth = auth_for(settings, host)?;
        let source = Source {
            client: &client,
            host,
            auth: &auth,
            peers: None,
            holder: None,
            holder_late: AtomicBool::new(false),
            claim: None,
            held: AtomicBool::new(false),
        };
        match fetch_from(image, &source, dest, blobs, check, progress).await {
            Ok(r) => return Ok(r),
            // Content that does not match, or an artifact refused: never retried elsewhere.
            Err(e @ (PullError::DigestMismatch { .. } | PullError::Refused { .. })) => {
                return Err(e)
            }
            Err(e) => {
                source_failed(image, &hosts, host, &e, progress);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| PullError::Settings("no registry to pull from".into())))
}

/// A plain file name: no separator, not empty, not `.` or `..`.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

async fn fetch_from(
    image: &ImageRef,
    source: &Source<'_>,
    dest: &Path,
    blobs: &Path,
    check: ManifestCheck<'_>,
    progress: &Progress,
) -> Result<FilesReport, PullError> {
    let (client, host, auth) = (source.client, source.host, source.auth);
    let accepted = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
    let cref = image.client_ref(host);
    client
        .auth(&cref, auth, RegistryOperation::Pull)
        .await
        .map_err(|e| registry_error(image, host, "log in", e))?;
    let (bytes, _) = client
        .pull_manifest_raw(&cref, auth, &accepted)
        .await
        .map_err(|e| registry_error(image, host, "fetch the manifest", e))?;
    let digest = sha256_of(&bytes);
    if let Some(want) = &image.digest {
        if *want != digest {
            return Err(PullError::DigestMismatch {
                reference: image.to_string(),
                registry: host.to_string(),
                what: "the manifest".into(),
                expected: want.clone(),
                actual: digest,
            });
        }
    }
    let is_index = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .is_some_and(|v| v.get("manifests").is_some());
    if is_index {
        return Err(PullError::Refused {
            detail: format!(
                "{image} is an image index (a multi-platform container image?), not a single artifact manifest: refused"
            ),
        });
    }
    let files =
        check(&image.to_string(), &bytes).map_err(|detail| PullError::Refused { detail })?;
    if let Some(bad) = files.iter().find(|f| !plain_name(&f.name)) {
        return Err(PullError::Refused {
            detail: format!(
                "{image}: the file name {:?} is not a plain file name: refused",
                bad.name
            ),
        });
    }
    let count = files.len();
    let total: u64 = files.iter().map(|f| f.size).sum();
    progress(PullEvent::Resolved {
        registry: host.to_string(),
        manifest_digest: digest.clone(),
        layers: count,
        missing: count,
        bytes: total,
    });
    // Each digest once (two files with the same bytes share one download).
    let unique: Vec<(usize, &ArtifactFile)> = files
        .iter()
        .enumerate()
        .filter(|(i, f)| !files.iter().take(*i).any(|g| g.digest == f.digest))
        .collect();
    futures_util::stream::iter(unique.into_iter().map(|(index, file)| {
        let cref = &cref;
        async move {
            let desc = Descriptor {
                media_type: file.media_type.clone(),
                digest: file.digest.clone(),
                size: file.size,
            };
            let what = format!("file {}/{count} ({})", index + 1, file.name);
            let from = download(source, cref, image, &what, index, &desc, blobs, progress).await?;
            progress(PullEvent::LayerDone {
                index,
                digest: file.digest.clone(),
                size: file.size,
                source: from,
            });
            Ok::<(), PullError>(())
        }
    }))
    .buffer_unordered(CONCURRENT_FILES)
    .try_collect::<Vec<()>>()
    .await?;
    for (i, file) in files.iter().enumerate() {
        let target: PathBuf = dest.join(&file.name);
        match files.iter().take(i).find(|g| g.digest == file.digest) {
            Some(first) => {
                let from = dest.join(&first.name);
                tokio::fs::copy(&from, &target)
                    .await
                    .map_err(|e| PullError::io("copy", &target, e))?;
            }
            None => {
                let hex = file.digest.strip_prefix("sha256:").unwrap_or(&file.digest);
                tokio::fs::rename(blobs.join(hex), &target)
                    .await
                    .map_err(|e| PullError::io("rename", &target, e))?;
            }
        }
    }
    Ok(FilesReport {
        registry: host.to_string(),
        manifest_digest: digest,
        files,
        bytes: total,
    })
}
