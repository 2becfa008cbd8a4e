//! The pull: manifest (index → linux/<host arch>), config and missing layers into a staging
//! OCI layout beside the store, each blob verified, then the store's import.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_container::image::{self, ImageInfo, ImageStore, ImportEvent};
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use oci_client::RegistryOperation;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::peers::{PeerClient, PeerMiss, PeerSettings};
use crate::{ImageRef, PullError, Registries};

/// Layers downloaded at once.
const CONCURRENT_LAYERS: usize = 4;

/// Times a cut blob download is resumed (each must have brought bytes) before the pull
/// gives up.
const MAX_RESUMES: u32 = 5;

/// Directory beside the store's `tmp/` where pulls stage their downloads. Not `tmp/`
/// itself: every import clears that under the store lock, and the pull hands its staging
/// layout to the import.
const PULL_STAGING: &str = "pull-tmp";

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What a pull reports as it goes (called from the download tasks: `Send + Sync`).
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// The manifest is known: `layers` in the image, `missing` of them to download.
    Resolved {
        /// Registry (or mirror) the image comes from.
        registry: String,
        /// Digest of the image manifest (for an index: the platform's manifest).
        manifest_digest: String,
        /// Layers in the image.
        layers: usize,
        /// Layers the store lacks.
        missing: usize,
        /// Compressed bytes of the missing layers.
        bytes: u64,
    },
    /// A layer the store already has: not downloaded.
    LayerSkipped {
        /// 0-based position in the manifest.
        index: usize,
        /// Its digest.
        digest: String,
    },
    /// Bytes of a layer arrived.
    LayerProgress {
        /// 0-based position in the manifest.
        index: usize,
        /// Bytes received so far.
        received: u64,
        /// Size the manifest gives.
        size: u64,
    },
    /// A layer was downloaded and verified.
    LayerDone {
        /// 0-based position in the manifest.
        index: usize,
        /// Its digest.
        digest: String,
        /// Its size.
        size: u64,
        /// Where its bytes came from: a peer's URL or the registry (or mirror).
        source: String,
    },
    /// A download was cut; the rest of the blob is asked for (HTTP Range).
    Resuming {
        /// 0-based position in the manifest (`usize::MAX`: the config).
        index: usize,
        /// Its digest.
        digest: String,
        /// Bytes already received, where the download goes on.
        offset: u64,
        /// What cut it.
        error: String,
    },
    /// A mirror failed (down, or lacks the image); the next source is asked.
    SourceFailed {
        /// The mirror.
        registry: String,
        /// Its error.
        error: String,
    },
    /// Every blob is verified; the store imports the image now (layer extraction).
    Importing,
    /// A peer sent bytes that do not match a blob's digest: refused, the next source is
    /// asked (a peer cannot substitute content).
    PeerRefused {
        /// Which blob (`the config`, `layer N/M`) and its digest.
        what: String,
        /// The peer, what it sent and what was expected.
        detail: String,
    },
    /// The peers cannot be asked (their settings are unusable): the registry only.
    PeersUnavailable {
        /// Why.
        why: String,
    },
    /// The image claim of a rollout: which machine fetches the image from the registry.
    Claimed {
        /// The image manifest's digest.
        digest: String,
        /// The machine that fetches it, when it is another (this pull takes its blobs from
        /// it); `None`: this machine.
        holder: Option<String>,
    },
}

/// The outcome of a successful pull.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The image as stored (`name`, `tag`, digests).
    pub image: ImageInfo,
    /// Registry (or mirror) it came from.
    pub registry: String,
    /// Layers downloaded.
    pub downloaded_layers: usize,
    /// Layers the store already had.
    pub skipped_layers: usize,
    /// Compressed bytes downloaded (layers and config).
    pub downloaded_bytes: u64,
    /// Those bytes by source: the registry (or mirror) and each peer (`http(s)://...`) that
    /// served a blob.
    pub sources: BTreeMap<String, u64>,
}

/// Callback for [`PullEvent`]s.
pub type Progress = Arc<dyn Fn(PullEvent) + Send + Sync>;

/// Pulls `reference` into `store` and tags it there under [`ImageRef::store_name`].
///
/// Runs its own tokio runtime (call it from synchronous code). `settings_path` only names
/// the settings in errors. Nothing enters the store unless every blob matched its digest and
/// the store's import (which checks them again, and the layers' diff_ids) succeeded.
pub fn pull(
    store: &ImageStore,
    reference: &str,
    settings: &Registries,
    settings_path: &Path,
    progress: Progress,
) -> Result<PullReport, PullError> {
    pull_with_peers(
        store,
        reference,
        settings,
        settings_path,
        &PeerSettings::default(),
        progress,
    )
}

/// [`pull`] that asks `peers` for every blob (config and layers) before the registry (see
/// [`crate::peers`]); the manifests still come from the registry (or its mirrors).
pub fn pull_with_peers(
    store: &ImageStore,
    reference: &str,
    settings: &Registries,
    settings_path: &Path,
    peers: &PeerSettings,
    progress: Progress,
) -> Result<PullReport, PullError> {
    // A peers file that cannot be used (its identity files unreadable) costs the pull its
    // peers, not the pull: the registry is always there.
    let peers = match PeerClient::new(peers) {
        Ok(p) => p,
        Err(e) => {
            progress(PullEvent::PeersUnavailable { why: e.to_string() });
            None
        }
    };
    let image = ImageRef::parse(reference, settings, &settings_path.display().to_string())?;
    // The peers that hold this image are asked first.
    let peers = peers.map(|mut p| {
        p.prefer(&image.store_name());
        p
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PullError::io("start the download runtime for", store.root(), e))?;
    let staging = Staging::new(store.root())?;
    let fetched = runtime.block_on(fetch(
        store,
        &image,
        settings,
        peers.as_ref(),
        &staging.dir,
        &progress,
    ))?;
    progress(PullEvent::Importing);
    let info = store.import_oci_layout(
        &staging.dir,
        Some(&image.store_name()),
        &mut |_: ImportEvent| {},
    )?;
    Ok(PullReport {
        image: info,
        registry: fetched.registry,
        downloaded_layers: fetched.downloaded_layers,
        skipped_layers: fetched.skipped_layers,
        downloaded_bytes: fetched.downloaded_bytes,
        sources: fetched.sources,
    })
}

/// A staging directory under `<store>/pull-tmp/`, removed when dropped.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(store: &Path) -> Result<Staging, PullError> {
        let parent = store.join(PULL_STAGING);
        fs::create_dir_all(&parent)
            .map_err(|e| PullError::io("create the pull staging directory", &parent, e))?;
        // Leftovers of pulls whose process is gone (killed, power loss).
        if let Ok(rd) = fs::read_dir(&parent) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name.split('-').next().unwrap_or_default();
                if !Path::new("/proc").join(pid).exists() {
                    if let Err(e) = fs::remove_dir_all(entry.path()) {
                        log::warn!(
                            "image store: cannot remove leftover {}: {e}",
                            entry.path().display()
                        );
                    }
                }
            }
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!("{}-{nanos}", std::process::id()));
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs)
            .map_err(|e| PullError::io("create the pull staging directory", &blobs, e))?;
        Ok(Staging { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            log::warn!("image store: cannot remove {}: {e}", self.dir.display());
        }
    }
}

struct Fetched {
    registry: String,
    downloaded_layers: usize,
    skipped_layers: usize,
    downloaded_bytes: u64,
    sources: BTreeMap<String, u64>,
}

/// Who to ask: the mirrors in order, then the registry.
pub(crate) fn endpoints(image: &ImageRef, settings: &Registries) -> Vec<String> {
    let mut v = settings.get(&image.registry).mirrors;
    v.push(image.registry.clone());
    v
}

/// Whether this process finds CA certificates of its own, as the HTTPS client looks for
/// them (rustls-native-certs: `SSL_CERT_FILE`/`SSL_CERT_DIR`, else the system bundle). A
/// host image without a CA bundle has none; oci-client then cannot build its HTTP client
/// (its constructor panics, even for plain HTTP), so [`pull`] refuses first.
pub fn machine_has_roots() -> bool {
    !rustls_native_certs::load_native_certs().certs.is_empty()
}

/// On a machine without CA certificates ([`machine_has_roots`] false): the `ca_file` of
/// the registry `reference` names (else of its first mirror that has one), for the caller
/// to point `SSL_CERT_FILE` at before it starts any thread, so that the pull can build its
/// client (that CA then stands for the machine's roots for this process). `None` when the
/// machine has roots, the reference does not parse, or no such `ca_file` is set.
pub fn fallback_roots(
    reference: &str,
    settings: &Registries,
    settings_path: &Path,
) -> Option<PathBuf> {
    if machine_has_roots() {
        return None;
    }
    let image = ImageRef::parse(reference, settings, &settings_path.display().to_string()).ok()?;
    let mut hosts = endpoints(&image, settings);
    hosts.rotate_right(1); // the registry first, then its mirrors in order
    hosts.iter().find_map(|h| settings.get(h).ca_file)
}

pub(crate) fn client_for(settings: &Registries, hosts: &[String]) -> Result<Client, PullError> {
    // rustls without a bundled provider: install ring (the workspace's) once per process.
    // An error means one is already installed, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if !machine_has_roots() {
        return Err(PullError::NoRoots {
            registry: hosts.last().cloned().unwrap_or_default(),
        });
    }
    let mut insecure = Vec::new();
    let mut extra = Vec::new();
    for host in hosts {
        let cfg = settings.get(host);
        if cfg.insecure {
            insecure.push(host.clone());
        }
        if let Some(ca) = &cfg.ca_file {
            let data = fs::read(ca).map_err(|e| PullError::io("read the CA file", ca, e))?;
            extra.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
    }
    Ok(Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure),
        extra_root_certificates: extra,
        platform_resolver: None,
        ..Default::default()
    }))
}

/// The credentials `registries.toml` gives `host` (anonymous without any).
pub(crate) fn auth_for(settings: &Registries, host: &str) -> Result<RegistryAuth, PullError> {
    Ok(match settings.get(host).credentials(host)? {
        Some(c) => RegistryAuth::Basic(c.username, c.password),
        None => RegistryAuth::Anonymous,
    })
}

/// Says that a mirror failed with `e` before the next endpoint is tried (the registry
/// itself, last, or a lone endpoint, is the pull's own error instead).
pub(crate) fn source_failed(
    image: &ImageRef,
    hosts: &[String],
    host: &str,
    e: &PullError,
    progress: &Progress,
) {
    if hosts.len() > 1 && host != image.registry {
        progress(PullEvent::SourceFailed {
            registry: host.to_string(),
            error: e.to_string(),
        });
    }
}

async fn fetch(
    store: &ImageStore,
    image: &ImageRef,
    settings: &Registries,
    peers: Option<&PeerClient>,
    layout: &Path,
    progress: &Progress,
) -> Result<Fetched, PullError> {
    let hosts = endpoints(image, settings);
    let client = client_for(settings, &hosts)?;
    let mut last = None;
    for host in &hosts {
        let auth = auth_for(settings, host)?;
        let mut source = Source {
            client: &client,
            host,
            auth: &auth,
            peers,
            holder: None,
            holder_late: AtomicBool::new(false),
            claim: None,
            held: AtomicBool::new(false),
        };
        let result = fetch_from(store, image, &mut source, layout, progress).await;
        // A failed pull that holds its image's claim releases it: the machines waiting for
        // its blobs claim the image again at once (one of them fetches it) rather than
        // waiting for the claim to expire.
        if let (Err(_), Some(peers), Some(digest)) = (&result, peers, &source.claim) {
            if source.held.load(Ordering::Relaxed) {
                peers.release(digest).await;
            }
        }
        match result {
            Ok(f) => return Ok(f),
            // Content that does not match is never retried elsewhere silently: say it.
            Err(e @ PullError::DigestMismatch { .. }) => return Err(e),
            Err(e) => {
                source_failed(image, &hosts, host, &e, progress);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| PullError::Settings("no registry to pull from".into())))
}

/// Resolves `reference` (`HOST[:PORT]/REPO[:TAG]`) to the digest of the manifest the
/// registry answers for it, `sha256:<64 hex>`: the top-level document, so an index's digest
/// for a multi-platform image (each machine still picks its own platform when it pulls).
/// Computed here from the bytes received, not taken from a header. The same sources,
/// credentials, CAs and insecure rules as [`pull`]: the mirrors in order, then the registry.
/// Async, for callers with their own runtime (`fleetctl` pins at submit with it).
pub async fn resolve_digest(
    reference: &str,
    settings: &Registries,
    settings_path: &Path,
) -> Result<String, PullError> {
    let image = ImageRef::parse(reference, settings, &settings_path.display().to_string())?;
    let hosts = endpoints(&image, settings);
    let client = client_for(settings, &hosts)?;
    let accepted = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
    let mut last = None;
    for host in &hosts {
        let auth = auth_for(settings, host)?;
        match client
            .pull_manifest_raw(&image.client_ref(host), &auth, &accepted)
            .await
        {
            Ok((bytes, _)) => {
                let digest = sha256_of(&bytes);
                if let Some(want) = &image.digest {
                    if *want != digest {
                        return Err(PullError::DigestMismatch {
                            reference: image.to_string(),
                            registry: host.clone(),
                            what: "the manifest".into(),
                            expected: want.clone(),
                            actual: digest,
                        });
                    }
                }
                return Ok(digest);
            }
            Err(e) => {
                let e = registry_error(&image, host, "fetch the manifest to pin its digest", e);
                if hosts.len() > 1 {
                    log::warn!("{e}; trying the next source");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| PullError::Settings("no registry to ask".into())))
}

/// The parts of an index this needs.
#[derive(Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

/// The parts of an image manifest this needs.
#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Clone)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
}

/// The OCI architecture name of this host.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

pub(crate) fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", image::hex(&Sha256::digest(bytes)))
}

pub(crate) fn registry_error(
    image: &ImageRef,
    host: &str,
    action: &str,
    e: OciDistributionError,
) -> PullError {
    if let OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
        expected,
        actual,
    }) = &e
    {
        return PullError::DigestMismatch {
            reference: image.to_string(),
            registry: host.to_string(),
            what: action.strip_prefix("fetch ").unwrap_or(action).to_string(),
            expected: expected.clone(),
            actual: actual.clone(),
        };
    }
    let (answer, hint) = match &e {
        OciDistributionError::UnauthorizedError { .. } => (
            "the registry answered 401 Unauthorized".to_string(),
            "; check the username and password for it in registries.toml",
        ),
        OciDistributionError::AuthenticationFailure(reason) => (
            format!(
                "the token service refused the credentials: {}",
                reason.trim()
            ),
            "; check the username and password for it in registries.toml",
        ),
        OciDistributionError::ImageManifestNotFoundError(_) => (
            e.to_string(),
            "; check the repository and tag (`skopeo list-tags docker://REGISTRY/REPO` lists tags)",
        ),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|x| format!("{:?}: {}", x.code, x.message))
                .collect();
            let unknown = envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                )
            });
            (
                format!("the registry answered {}", codes.join("; ")),
                if unknown {
                    "; check the repository and tag"
                } else {
                    ""
                },
            )
        }
        OciDistributionError::RequestError(r) => {
            // reqwest's Display hides the cause (TLS, refused): walk the chain.
            let mut msg = r.to_string();
            let mut src = std::error::Error::source(r);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            (
                msg,
                "; check that it is reachable (plain HTTP needs `insecure = true`, a private CA `ca_file`, in registries.toml)",
            )
        }
        _ => (e.to_string(), ""),
    };
    PullError::Registry {
        reference: image.to_string(),
        registry: host.to_string(),
        action: action.to_string(),
        answer,
        hint,
    }
}

/// How many half-second rounds of waiting for a claim's holder between two claims of the
/// image at its arbiter (which learn that the holder released it).
const RECLAIM_ROUNDS: u32 = 4;

/// Where a pull's bytes come from: the registry (or mirror) `host`, and the peers first.
pub(crate) struct Source<'a> {
    pub(crate) client: &'a Client,
    pub(crate) host: &'a str,
    pub(crate) auth: &'a RegistryAuth,
    pub(crate) peers: Option<&'a PeerClient>,
    /// The machine that claimed this image's fetch from the registry: wait for its blobs.
    pub(crate) holder: Option<String>,
    /// Set once the holder did not serve a blob in time: the other blobs do not wait again.
    pub(crate) holder_late: AtomicBool,
    /// The image (manifest digest) this pull claimed, granted or not.
    pub(crate) claim: Option<String>,
    /// Whether this machine holds that claim (granted at first, or after the holder
    /// released it): a failed pull releases it.
    pub(crate) held: AtomicBool,
}

async fn fetch_from(
    store: &ImageStore,
    image: &ImageRef,
    source: &mut Source<'_>,
    layout: &Path,
    progress: &Progress,
) -> Result<Fetched, PullError> {
    let (client, host, auth) = (source.client, source.host, source.auth);
    let accepted = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
    let cref = image.client_ref(host);
    // Answer the registry's challenge first, so that a token service's refusal is the
    // error (with its answer): left to the requests below, oci-client drops a failed token
    // request and goes on anonymously, and the registry's bare 401 is all one would see.
    client
        .auth(&cref, auth, RegistryOperation::Pull)
        .await
        .map_err(|e| registry_error(image, host, "log in", e))?;
    let (mut bytes, _) = client
        .pull_manifest_raw(&cref, auth, &accepted)
        .await
        .map_err(|e| registry_error(image, host, "fetch the manifest", e))?;
    let mut digest = sha256_of(&bytes);
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
    let is_index = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .and_then(|v| v.get("manifests").map(|_| ()))
            .is_some()
    };
    if is_index(&bytes) {
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| PullError::Unsupported {
            reference: image.to_string(),
            detail: format!("the image index from {host} does not parse: {e}"),
        })?;
        let arch = host_arch();
        let available: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|m| m.platform.as_ref())
            .map(|p| format!("{}/{}", p.os, p.architecture))
            .collect();
        let entry = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                    && (m.media_type.is_empty() || !m.media_type.contains("index"))
            })
            .ok_or_else(|| PullError::Unsupported {
                reference: image.to_string(),
                detail: format!(
                    "the image index has no linux/{arch} image (it has: {}); pull a reference for this platform",
                    if available.is_empty() { "none with a platform".to_string() } else { available.join(", ") }
                ),
            })?;
        let by_digest = ImageRef {
            digest: Some(entry.digest.clone()),
            tag: None,
            ..image.clone()
        };
        let (b, _) = client
            .pull_manifest_raw(&by_digest.client_ref(host), auth, &accepted)
            .await
            .map_err(|e| registry_error(image, host, "fetch the platform manifest", e))?;
        let got = sha256_of(&b);
        if got != entry.digest {
            return Err(PullError::DigestMismatch {
                reference: image.to_string(),
                registry: host.to_string(),
                what: format!("the linux/{arch} manifest"),
                expected: entry.digest.clone(),
                actual: got,
            });
        }
        bytes = b;
        digest = got;
    }
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| PullError::Unsupported {
            reference: image.to_string(),
            detail: format!("the image manifest from {host} does not parse: {e}"),
        })?;
    let media_type = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| OCI_MANIFEST.to_string());

    let blobs = layout.join("blobs").join("sha256");
    let stored = store.root().join("blobs").join("sha256");
    let bad_digest = |d: &str| PullError::Unsupported {
        reference: image.to_string(),
        detail: format!("the manifest names a blob '{d}' that is not sha256:<64 hex>"),
    };
    let mhex = image::sha256_hex(&digest).ok_or_else(|| bad_digest(&digest))?;
    write_file(&blobs.join(mhex), &bytes)?;

    let count = manifest.layers.len();
    let mut missing = Vec::new();
    let mut skipped = 0;
    for (index, layer) in manifest.layers.iter().enumerate() {
        let hex = image::sha256_hex(&layer.digest).ok_or_else(|| bad_digest(&layer.digest))?;
        if stored.join(hex).is_file() {
            skipped += 1;
            progress(PullEvent::LayerSkipped {
                index,
                digest: layer.digest.clone(),
            });
        } else if !missing
            .iter()
            .any(|(_, l): &(usize, Descriptor)| l.digest == layer.digest)
        {
            missing.push((index, layer.clone()));
        }
    }
    progress(PullEvent::Resolved {
        registry: host.to_string(),
        manifest_digest: digest.clone(),
        layers: count,
        missing: missing.len(),
        bytes: missing.iter().map(|(_, l)| l.size).sum(),
    });

    // One registry fetch per image in a rollout: claim it; a machine that holds the claim
    // already is waited for (see `download`).
    if let Some(peers) = source.peers.filter(|_| !missing.is_empty()) {
        if let Some(claimed) = peers.claim(&digest).await {
            progress(PullEvent::Claimed {
                digest: digest.clone(),
                holder: claimed.clone(),
            });
            source.held.store(claimed.is_none(), Ordering::Relaxed);
            source.holder = claimed;
            source.claim = Some(digest.clone());
        }
    }
    let source = &*source;
    let cref = image.client_ref(host);
    let config = manifest.config.clone();
    let config_size = config.size;
    let mut sources: BTreeMap<String, u64> = BTreeMap::new();
    let from = download(
        source,
        &cref,
        image,
        "the config",
        usize::MAX,
        &config,
        &blobs,
        progress,
    )
    .await?;
    *sources.entry(from).or_default() += config_size;
    let downloaded = missing.len();
    let mut bytes_total = config_size;
    bytes_total += missing.iter().map(|(_, l)| l.size).sum::<u64>();
    futures_util::stream::iter(missing.into_iter().map(|(index, layer)| {
        let cref = &cref;
        let blobs = &blobs;
        async move {
            let what = format!("layer {}/{count}", index + 1);
            let from = download(source, cref, image, &what, index, &layer, blobs, progress).await?;
            progress(PullEvent::LayerDone {
                index,
                digest: layer.digest.clone(),
                size: layer.size,
                source: from.clone(),
            });
            Ok::<(String, u64), PullError>((from, layer.size))
        }
    }))
    .buffer_unordered(CONCURRENT_LAYERS)
    .try_collect::<Vec<(String, u64)>>()
    .await?
    .into_iter()
    .for_each(|(from, size)| *sources.entry(from).or_default() += size);

    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": image.store_name()},
        }],
    });
    write_file(
        &layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    write_file(&layout.join("index.json"), index.to_string().as_bytes())?;
    Ok(Fetched {
        registry: host.to_string(),
        downloaded_layers: downloaded,
        skipped_layers: skipped,
        downloaded_bytes: bytes_total,
        sources,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), PullError> {
    let mut f = fs::File::create(path).map_err(|e| PullError::io("create", path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| PullError::io("write", path, e))
}

/// Downloads one blob to `<blobs>/<hex>.partial`, hashing as it writes; fsyncs it, checks
/// size and digest, and only then renames it to `<blobs>/<hex>`. The peers are asked first,
/// in order (see [`crate::peers`]), then the registry. Returns where the bytes came from.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn download(
    source: &Source<'_>,
    cref: &oci_client::Reference,
    image: &ImageRef,
    what: &str,
    index: usize,
    desc: &Descriptor,
    blobs: &Path,
    progress: &Progress,
) -> Result<String, PullError> {
    let (client, host) = (source.client, source.host);
    let hex = image::sha256_hex(&desc.digest).ok_or_else(|| PullError::Unsupported {
        reference: image.to_string(),
        detail: format!("{what}: digest '{}' is not sha256:<64 hex>", desc.digest),
    })?;
    let partial = blobs.join(format!("{hex}.partial"));
    let fin = blobs.join(hex);
    if let Some(peers) = source.peers {
        let received = |got: u64| {
            if index != usize::MAX {
                progress(PullEvent::LayerProgress {
                    index,
                    received: got,
                    size: desc.size,
                });
            }
        };
        for peer in peers.peers() {
            match peers
                .fetch(peer, &desc.digest, desc.size, &partial, &received)
                .await
            {
                Ok(()) => {
                    tokio::fs::rename(&partial, &fin)
                        .await
                        .map_err(|e| PullError::io("rename", &fin, e))?;
                    return Ok(peer.clone());
                }
                Err(PeerMiss::Unavailable(why)) => {
                    log::debug!("{what} ({}): not from the peer: {why}", desc.digest);
                }
                Err(PeerMiss::Mismatch(why)) => {
                    progress(PullEvent::PeerRefused {
                        what: format!("{what} ({})", desc.digest),
                        detail: why,
                    });
                }
            }
            let _ = tokio::fs::remove_file(&partial).await;
        }
        // Another machine fetches this image from the registry: wait for this blob there.
        if let Some(first) = source
            .holder
            .as_ref()
            .filter(|_| !source.holder_late.load(Ordering::Relaxed))
        {
            let mut holder = first.clone();
            let mut released = false;
            let deadline = tokio::time::Instant::now() + crate::peers::CLAIM_WAIT;
            let mut round: u32 = 0;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                // Another blob's wait learnt that this machine fetches the image now.
                if source.held.load(Ordering::Relaxed) {
                    released = true;
                    break;
                }
                round += 1;
                // Every few rounds, ask the arbiter again: a holder whose pull failed
                // released its claim, and then this machine (or another) holds it.
                if round % RECLAIM_ROUNDS == 0 {
                    if let Some(digest) = &source.claim {
                        match peers.claim(digest).await {
                            Some(None) => {
                                if !source.held.swap(true, Ordering::Relaxed) {
                                    log::info!("image {digest}: {holder} released its claim");
                                    progress(PullEvent::Claimed {
                                        digest: digest.clone(),
                                        holder: None,
                                    });
                                }
                                released = true;
                                break;
                            }
                            Some(Some(other)) if other != holder => {
                                log::info!(
                                    "image {digest}: {holder} released its claim; {other} fetches it now"
                                );
                                holder = other;
                            }
                            _ => {}
                        }
                    }
                }
                match peers
                    .fetch(&holder, &desc.digest, desc.size, &partial, &received)
                    .await
                {
                    Ok(()) => {
                        tokio::fs::rename(&partial, &fin)
                            .await
                            .map_err(|e| PullError::io("rename", &fin, e))?;
                        return Ok(holder);
                    }
                    Err(PeerMiss::Unavailable(_)) => {}
                    Err(PeerMiss::Mismatch(why)) => {
                        progress(PullEvent::PeerRefused {
                            what: format!("{what} ({})", desc.digest),
                            detail: why,
                        });
                        break;
                    }
                }
                let _ = tokio::fs::remove_file(&partial).await;
            }
            let _ = tokio::fs::remove_file(&partial).await;
            source.holder_late.store(true, Ordering::Relaxed);
            if released {
                log::info!(
                    "{what} ({}): this machine fetches the image now; fetching it from the registry",
                    desc.digest
                );
            } else {
                log::info!(
                    "{what} ({}): {holder} did not serve it in time; fetching it from the registry",
                    desc.digest
                );
            }
        }
    }
    let oci_desc = OciDescriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.clone(),
        size: i64::try_from(desc.size).unwrap_or(i64::MAX),
        ..Default::default()
    };
    let action = format!("fetch {what} ({})", desc.digest);
    let mut stream = client
        .pull_blob_stream(cref, &oci_desc)
        .await
        .map_err(|e| registry_error(image, host, &action, e))?;
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| PullError::io("create", &partial, e))?;
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let mut resumes = 0;
    // Where the current request started: a resume must have brought bytes since.
    let mut attempt_from: u64 = 0;
    loop {
        let chunk = match stream.next().await {
            None => break,
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                // oci-client verifies the digest too and reports a mismatch as the
                // stream's last error; the check after the loop is this crate's own.
                if let Some(oci_client::errors::DigestError::VerificationError { actual, .. }) = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>())
                {
                    return Err(PullError::DigestMismatch {
                        reference: image.to_string(),
                        registry: host.to_string(),
                        what: format!("{what} ({})", desc.digest),
                        expected: desc.digest.clone(),
                        actual: actual.clone(),
                    });
                }
                let failed = |detail: String| PullError::Registry {
                    reference: image.to_string(),
                    registry: host.to_string(),
                    action: action.clone(),
                    answer: format!(
                        "the download failed at {received} of {} bytes: {e}{detail}",
                        desc.size
                    ),
                    hint: "",
                };
                // A cut connection: ask for the rest (HTTP Range), as long as each request
                // brings bytes, a bounded number of times.
                if received == attempt_from || received >= desc.size {
                    return Err(failed(String::new()));
                }
                if resumes >= MAX_RESUMES {
                    return Err(failed(format!(" (gave up after {MAX_RESUMES} resumes)")));
                }
                resumes += 1;
                progress(PullEvent::Resuming {
                    index,
                    digest: desc.digest.clone(),
                    offset: received,
                    error: e.to_string(),
                });
                attempt_from = received;
                match client
                    .pull_blob_stream_partial(cref, &oci_desc, received, None)
                    .await
                    .map_err(|e| registry_error(image, host, &action, e))?
                {
                    BlobResponse::Partial(rest) => stream = rest,
                    // The registry ignored the Range: start over from its full answer.
                    BlobResponse::Full(whole) => {
                        file = tokio::fs::File::create(&partial)
                            .await
                            .map_err(|e| PullError::io("create", &partial, e))?;
                        hasher = Sha256::new();
                        received = 0;
                        attempt_from = 0;
                        stream = whole;
                    }
                }
                continue;
            }
        };
        received += chunk.len() as u64;
        if received > desc.size {
            return Err(PullError::DigestMismatch {
                reference: image.to_string(),
                registry: host.to_string(),
                what: what.to_string(),
                expected: format!("{} ({} bytes)", desc.digest, desc.size),
                actual: format!("more than {} bytes", desc.size),
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| PullError::io("write", &partial, e))?;
        if index != usize::MAX {
            progress(PullEvent::LayerProgress {
                index,
                received,
                size: desc.size,
            });
        }
    }
    file.sync_all()
        .await
        .map_err(|e| PullError::io("fsync", &partial, e))?;
    drop(file);
    let mut actual = String::with_capacity(71);
    actual.push_str("sha256:");
    for b in hasher.finalize().iter() {
        actual.push_str(&format!("{b:02x}"));
    }
    if actual != desc.digest || received != desc.size {
        return Err(PullError::DigestMismatch {
            reference: image.to_string(),
            registry: host.to_string(),
            what: what.to_string(),
            expected: desc.digest.clone(),
            actual: format!("{actual} ({received} bytes)"),
        });
    }
    tokio::fs::rename(&partial, &fin)
        .await
        .map_err(|e| PullError::io("rename", &fin, e))?;
    Ok(host.to_string())
}
