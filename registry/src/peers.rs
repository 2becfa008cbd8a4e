//! Layers from peers (issue 12): the other machines of the cluster serve their image
//! stores' blobs read-only on their fleetd's TCP API (`GET /v2/<name>/blobs/<digest>`); a pull
//! asks them for every blob it needs (config and layers) before the registry. A peer is just
//! another source of bytes: each blob is staged, hashed and verified exactly as one from the
//! registry, so a peer can withhold a blob (404, an error: the next source is asked, quietly)
//! but not substitute one (a mismatch is logged and the next source is asked).
//!
//! Who the peers are: `--peer URL` (repeatable) with `--peer-ca/--peer-cert/--peer-key` or
//! `--peer-token-file`, or the peers file fleetd's agent keeps ([`DEFAULT_PEERS`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::line_col;
use crate::PullError;

/// The peers file fleetd writes (`fleetd --peers-file`) and `unitctl image pull` reads when
/// it exists.
pub const DEFAULT_PEERS: &str = "/run/flotilla/peers.toml";
/// The environment variable that overrides [`DEFAULT_PEERS`] (`unitctl image pull` run by
/// the manager inherits init's environment).
pub const PEERS_ENV: &str = "FLOTILLA_PEERS";

/// Where blobs may come from besides the registry: the peers file's contents.
///
/// ```toml
/// peers = ["https://10.0.0.12:4002", "https://10.0.0.13:4002"]   # asked in this order ...
/// ca = "/etc/flotilla/tls/ca.pem"        # mutual TLS: the cluster CA ...
/// cert = "/etc/flotilla/tls/machine.pem" # ... and this machine's certificate (OU=machine)
/// key = "/etc/flotilla/tls/machine.key"
/// # token_file = "/etc/flotilla/fleetd.token"   # for http:// peers (fleetd --insecure)
///
/// [images]   # ... after the peers that hold the image being pulled (store names)
/// "https://10.0.0.13:4002" = ["registry.example:5000/team/app:1.4"]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSettings {
    /// This machine's own API URL, when it serves its blobs to the others: with it, the
    /// machines that pull the same image at once agree on one that fetches it from the
    /// registry (an image claim) while the others wait for its blobs.
    #[serde(default)]
    pub own: Option<String>,
    /// The peers' API URLs (`https://HOST:PORT`, or `http://` for `--insecure` clusters), in
    /// the order they are asked.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The cluster CA (PEM) that issued the peers' certificates.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This machine's certificate (PEM, `OU=machine`): peers serve blobs to machines only.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The key of `cert` (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The cluster's bearer token (first line of the file), sent to `http://` peers only.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The images each peer holds (peer URL → store names, `host/repo:tag`, as its machine
    /// publishes them): a pull asks the peers that hold its image first, then those that hold
    /// another tag of its repository, then the rest, each group in `peers` order.
    #[serde(default)]
    pub images: BTreeMap<String, Vec<String>>,
}

impl PeerSettings {
    /// Reads a peers file (TOML, see [`PeerSettings`]); errors name the file, line and column.
    pub fn load(path: &Path) -> Result<PeerSettings, PullError> {
        let text =
            fs::read_to_string(path).map_err(|e| PullError::io("read the peers file", path, e))?;
        toml::from_str(&text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
            PullError::Config {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })
    }

    /// Whether there is no peer to ask.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// Why a peer did not give a blob.
#[derive(Debug)]
pub(crate) enum PeerMiss {
    /// It does not have it (404) or could not be asked: the next source, quietly.
    Unavailable(String),
    /// It sent bytes that are not the blob: logged, then the next source.
    Mismatch(String),
}

/// How long a machine that lost an image claim waits for the holder's blobs before it asks
/// the registry itself.
pub const CLAIM_WAIT: Duration = Duration::from_secs(300);

/// The HTTP client for the peers, with the cluster identity.
pub(crate) struct PeerClient {
    own: Option<String>,
    peers: Vec<String>,
    /// Peer URL (without a trailing `/`) → the store names it holds.
    images: BTreeMap<String, Vec<String>>,
    http: reqwest::Client,
    token: Option<String>,
}

impl PeerClient {
    /// `None` when there is no peer; an error for unreadable identity files.
    pub(crate) fn new(settings: &PeerSettings) -> Result<Option<PeerClient>, PullError> {
        if settings.peers.is_empty() {
            return Ok(None);
        }
        // rustls without a bundled provider: ring, once per process (an error means one is
        // installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A peer that stops sending mid-blob is left for the next source.
            .read_timeout(Duration::from_secs(30))
            .no_proxy();
        if let Some(ca) = &settings.ca {
            let pem = fs::read(ca).map_err(|e| PullError::io("read the peers' CA", ca, e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                PullError::Settings(format!(
                    "the peers' CA {} is not a PEM certificate: {e}",
                    ca.display()
                ))
            })?;
            builder = builder.tls_certs_only(certs);
        }
        match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => {
                let mut pem = fs::read(cert)
                    .map_err(|e| PullError::io("read the machine certificate", cert, e))?;
                pem.push(b'\n');
                pem.extend(
                    fs::read(key).map_err(|e| PullError::io("read the machine key", key, e))?,
                );
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    PullError::Settings(format!(
                        "the machine certificate {} or key {} is not PEM: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(PullError::Settings(
                    "peers: give both the machine certificate and its key (--peer-cert and --peer-key, or cert and key in the peers file)".into(),
                ))
            }
        }
        let token = match &settings.token_file {
            Some(path) => {
                let text = fs::read_to_string(path)
                    .map_err(|e| PullError::io("read the peers' token file", path, e))?;
                Some(text.lines().next().unwrap_or_default().trim().to_string())
                    .filter(|t| !t.is_empty())
            }
            None => None,
        };
        let http = builder.build().map_err(|e| {
            PullError::Settings(format!("cannot set up the HTTP client for peers: {e}"))
        })?;
        Ok(Some(PeerClient {
            own: settings
                .own
                .as_ref()
                .map(|o| o.trim_end_matches('/').to_string()),
            peers: settings
                .peers
                .iter()
                .map(|p| p.trim_end_matches('/').to_string())
                .collect(),
            images: settings
                .images
                .iter()
                .map(|(p, names)| (p.trim_end_matches('/').to_string(), names.clone()))
                .collect(),
            http,
            token,
        }))
    }

    /// Claims the fetch of the image `digest` at its arbiter: the machine (of the peers and
    /// this one) whose `sha256(URL + digest)` is lowest, so every puller picks the same one.
    /// `Some(Some(holder))` when another machine fetches it (wait for its blobs);
    /// `Some(None)` when this machine does; `None` when nothing could be claimed (no own URL,
    /// the arbiter did not answer: the registry then).
    pub(crate) async fn claim(&self, digest: &str) -> Option<Option<String>> {
        let own = self.own.as_deref()?;
        let arbiter = self.arbiter(own, digest)?;
        let url = format!("{arbiter}/v2/_flotilla/claims/{digest}");
        let body = serde_json::json!({ "holder": own }).to_string();
        let mut request = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let (Some(token), true) = (&self.token, arbiter.starts_with("http://")) {
            request = request.bearer_auth(token);
        }
        let answer = match request.send().await {
            Ok(r) if r.status().is_success() => r.bytes().await.ok(),
            Ok(r) => {
                log::warn!(
                    "image claim at {url}: answered {}; fetching from the registry",
                    r.status()
                );
                None
            }
            Err(e) => {
                log::warn!(
                    "image claim at {url}: {}; fetching from the registry",
                    chain(&e)
                );
                None
            }
        }?;
        #[derive(Deserialize)]
        struct Answer {
            holder: String,
            granted: bool,
        }
        let answer: Answer = serde_json::from_slice(&answer).ok()?;
        if answer.granted || answer.holder.trim_end_matches('/') == own {
            Some(None)
        } else {
            Some(Some(answer.holder.trim_end_matches('/').to_string()))
        }
    }

    /// The arbiter of `digest`'s claims: the machine (of the peers and `own`) whose
    /// `sha256(URL + digest)` is lowest.
    fn arbiter<'a>(&'a self, own: &'a str, digest: &str) -> Option<&'a str> {
        self.peers
            .iter()
            .map(String::as_str)
            .chain([own])
            .min_by_key(|url| Sha256::digest(format!("{url}\n{digest}").as_bytes()))
    }

    /// Releases this machine's claim of the image `digest` (its pull failed), so that the
    /// machines waiting for its blobs claim the image again at once; failures are logged
    /// (the claim then expires at its arbiter).
    pub(crate) async fn release(&self, digest: &str) {
        let Some(own) = self.own.as_deref() else {
            return;
        };
        let Some(arbiter) = self.arbiter(own, digest) else {
            return;
        };
        let url = format!("{arbiter}/v2/_flotilla/claims/{digest}");
        let body = serde_json::json!({ "holder": own }).to_string();
        let mut request = self
            .http
            .delete(&url)
            .header("content-type", "application/json")
            .body(body);
        if let (Some(token), true) = (&self.token, arbiter.starts_with("http://")) {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => {
                log::info!("image claim at {url}: released (this pull failed)");
            }
            Ok(r) => log::warn!(
                "image claim at {url}: the release answered {}; the claim expires in at most {} s",
                r.status(),
                CLAIM_WAIT.as_secs()
            ),
            Err(e) => log::warn!(
                "image claim at {url}: cannot release it: {}; the claim expires in at most {} s",
                chain(&e),
                CLAIM_WAIT.as_secs()
            ),
        }
    }

    /// Orders the peers for a pull of the image stored as `store_name` (`host/repo:tag`):
    /// first those that hold it, then those that hold another tag of its repository, then
    /// the rest; each group keeps the peers file's order.
    pub(crate) fn prefer(&mut self, store_name: &str) {
        let repo = repository(store_name);
        let rank = |peer: &String| match self.images.get(peer) {
            Some(names) if names.iter().any(|n| n == store_name) => 0,
            Some(names) if names.iter().any(|n| repository(n) == repo) => 1,
            _ => 2,
        };
        let mut ranked: Vec<(u8, String)> =
            self.peers.iter().map(|p| (rank(p), p.clone())).collect();
        ranked.sort_by_key(|(r, _)| *r);
        self.peers = ranked.into_iter().map(|(_, p)| p).collect();
    }

    /// The peers, in the order they are asked.
    pub(crate) fn peers(&self) -> &[String] {
        &self.peers
    }

    /// Downloads `digest` (`size` bytes) from `peer` into `partial`, hashing as it writes,
    /// and fsyncs it; `Ok` only when the size and the sha256 match. `received` is called with
    /// the bytes so far. The caller renames `partial` into place.
    pub(crate) async fn fetch(
        &self,
        peer: &str,
        digest: &str,
        size: u64,
        partial: &Path,
        received: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), PeerMiss> {
        let url = format!("{peer}/v2/peer/blobs/{digest}");
        let mut request = self.http.get(&url);
        if let (Some(token), true) = (&self.token, peer.starts_with("http://")) {
            request = request.bearer_auth(token);
        }
        let unavailable = |why: String| PeerMiss::Unavailable(format!("{url}: {why}"));
        let mut response = request.send().await.map_err(|e| unavailable(chain(&e)))?;
        if !response.status().is_success() {
            return Err(unavailable(format!("answered {}", response.status())));
        }
        let mut file = tokio::fs::File::create(partial)
            .await
            .map_err(|e| unavailable(format!("cannot create {}: {e}", partial.display())))?;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return Err(unavailable(format!("the download failed: {}", chain(&e)))),
            };
            got += chunk.len() as u64;
            if got > size {
                return Err(PeerMiss::Mismatch(format!(
                    "{url}: more than the {size} bytes of {digest}"
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| unavailable(format!("cannot write {}: {e}", partial.display())))?;
            received(got);
        }
        file.sync_all()
            .await
            .map_err(|e| unavailable(format!("cannot fsync {}: {e}", partial.display())))?;
        let actual = format!(
            "sha256:{}",
            flotilla_container::image::hex(&hasher.finalize())
        );
        if actual != digest || got != size {
            return Err(PeerMiss::Mismatch(format!(
                "{url}: got {actual} ({got} bytes), expected {digest} ({size} bytes)"
            )));
        }
        Ok(())
    }
}

/// The repository part of a store name: `host:port/repo` of `host:port/repo:tag`.
fn repository(store_name: &str) -> &str {
    match store_name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => store_name,
    }
}

/// An error with its causes (reqwest's Display hides them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_file_parses_and_names_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.toml");
        fs::write(
            &path,
            "peers = [\"http://10.0.0.12:4002\"]\ntoken_file = \"/etc/flotilla/fleetd.token\"\n",
        )
        .unwrap();
        let s = PeerSettings::load(&path).unwrap();
        assert_eq!(s.peers, ["http://10.0.0.12:4002"]);
        assert_eq!(
            s.token_file.as_deref(),
            Some(Path::new("/etc/flotilla/fleetd.token"))
        );
        assert!(s.images.is_empty());
        fs::write(&path, "peers = []\npeer = \"x\"\n").unwrap();
        let e = PeerSettings::load(&path).unwrap_err().to_string();
        assert!(e.contains("peers.toml:2:1"), "{e}");
    }

    #[test]
    fn a_pull_asks_the_peers_that_hold_its_image_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.toml");
        fs::write(
            &path,
            r#"peers = ["http://m1:4002", "http://m2:4002/", "http://m3:4002", "http://m4:4002"]
[images]
"http://m2:4002" = ["reg:5000/team/db:9"]
"http://m3:4002/" = ["reg:5000/team/app:1", "reg:5000/team/db:9"]
"http://m4:4002" = ["reg:5000/team/app:2"]
"#,
        )
        .unwrap();
        let settings = PeerSettings::load(&path).unwrap();
        let order = |name: &str| {
            let mut c = PeerClient::new(&settings).unwrap().unwrap();
            c.prefer(name);
            c.peers().to_vec()
        };
        assert_eq!(
            order("reg:5000/team/app:1"),
            [
                "http://m3:4002",
                "http://m4:4002",
                "http://m1:4002",
                "http://m2:4002"
            ],
            "the holder, then another tag of the repository, then the rest in file order"
        );
        assert_eq!(
            order("reg:5000/team/db:9"),
            [
                "http://m2:4002",
                "http://m3:4002",
                "http://m1:4002",
                "http://m4:4002"
            ],
            "two holders keep the file's order"
        );
        assert_eq!(
            order("other:5000/x:1"),
            [
                "http://m1:4002",
                "http://m2:4002",
                "http://m3:4002",
                "http://m4:4002"
            ],
            "no holder: the file's order"
        );
        assert_eq!(
            repository("reg:5000/team/app:sha256-ab"),
            "reg:5000/team/app"
        );
        assert_eq!(repository("reg:5000/team/app"), "reg:5000/team/app");
    }
}
