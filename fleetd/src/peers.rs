//! The peers file (layers from peers, issue 12): fleetd keeps, at `--peers-file` (default
//! [`DEFAULT_PEERS_FILE`]), the list of the other live machines' TCP APIs with the identity
//! to show them, which `unitctl image pull` (run by the local init's manager) reads to ask
//! those machines for blobs before the registry. Rewritten atomically (a temporary file
//! renamed over it) whenever a machine comes, goes or changes its record.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::model::Machine;
use crate::registry::{Change, Registry};

/// Where fleetd writes the peers file by default (`unitctl image pull`'s default too).
pub const DEFAULT_PEERS_FILE: &str = "/run/flotilla/peers.toml";

/// How this machine authenticates to the other machines' TCP APIs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// Mutual TLS: the cluster CA and this machine's certificate (`OU=machine`) and key.
    Tls {
        /// The cluster CA (PEM).
        ca: PathBuf,
        /// This machine's certificate (PEM).
        cert: PathBuf,
        /// Its key (PEM).
        key: PathBuf,
    },
    /// `--insecure`: the cluster's bearer token file.
    Token(PathBuf),
}

/// The file's contents (the keys `flotilla_registry::PeerSettings` reads).
#[derive(Debug, Serialize)]
struct Contents<'a> {
    /// This machine's own API (where the others fetch what it pulled).
    #[serde(skip_serializing_if = "Option::is_none")]
    own: Option<&'a str>,
    peers: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_file: Option<&'a Path>,
    /// Each peer's images (its `Machine::images`, store names), so that a pull asks the
    /// holders of its image first. Last: a TOML table follows the plain keys.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    images: BTreeMap<&'a str, &'a [String]>,
}

/// Writes the peers file from the registry's live machines.
#[derive(Clone, Debug)]
pub struct PeersFile {
    path: PathBuf,
    own_id: String,
    own_api: Option<String>,
    identity: PeerIdentity,
}

impl PeersFile {
    /// The peers file at `path` for machine `own_id` (whose API is `own_api`), naming
    /// `identity`.
    pub fn new(
        path: impl Into<PathBuf>,
        own_id: impl Into<String>,
        own_api: Option<String>,
        identity: PeerIdentity,
    ) -> PeersFile {
        PeersFile {
            path: path.into(),
            own_id: own_id.into(),
            own_api,
            identity,
        }
    }

    /// The file's text for `machines`: every other machine with an API (sorted by id), the
    /// identity, and the images each of them holds.
    pub fn render(&self, machines: &[Machine]) -> String {
        let mut others: Vec<&Machine> = machines
            .iter()
            .filter(|m| m.id != self.own_id && m.api.is_some())
            .collect();
        others.sort_by(|a, b| a.id.cmp(&b.id));
        let (ca, cert, key, token_file) = match &self.identity {
            PeerIdentity::Tls { ca, cert, key } => (
                Some(ca.as_path()),
                Some(cert.as_path()),
                Some(key.as_path()),
                None,
            ),
            PeerIdentity::Token(t) => (None, None, None, Some(t.as_path())),
        };
        let contents = Contents {
            own: self.own_api.as_deref(),
            peers: others.iter().filter_map(|m| m.api.as_deref()).collect(),
            ca,
            cert,
            key,
            token_file,
            images: others
                .iter()
                .filter(|m| !m.images.is_empty())
                .filter_map(|m| Some((m.api.as_deref()?, m.images.as_slice())))
                .collect(),
        };
        format!(
            "# Written by fleetd: the machines `unitctl image pull` asks for blobs before the registry.\n{}",
            toml::to_string(&contents).unwrap_or_default()
        )
    }

    /// Writes the file for `machines` when its text changes (a temporary file beside it,
    /// renamed over it). Returns whether it wrote.
    pub fn write(&self, machines: &[Machine]) -> std::io::Result<bool> {
        let text = self.render(machines);
        if std::fs::read_to_string(&self.path).is_ok_and(|old| old == text) {
            return Ok(false);
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(true)
    }

    /// Keeps the file current until `shutdown`: reads the machines, writes, watches for
    /// machine changes and does it again; registry errors are logged and retried. Removes
    /// the file when it stops (its peers are no longer kept current).
    pub async fn run(self, registry: Arc<dyn Registry>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = self.once(registry.as_ref()) => {}
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// One read, write and watch, until the watch ends or fails.
    async fn once(&self, registry: &dyn Registry) {
        let listing = match registry.list_machines().await {
            Ok(l) => l,
            Err(e) => {
                log::warn!("peers: cannot list the machines: {e}; retrying");
                return;
            }
        };
        match self.write(&listing.items) {
            Ok(true) => log::info!(
                "peers: {} lists {} other machines",
                self.path.display(),
                listing
                    .items
                    .iter()
                    .filter(|m| m.id != self.own_id && m.api.is_some())
                    .count()
            ),
            Ok(false) => {}
            Err(e) => log::warn!("peers: cannot write {}: {e}", self.path.display()),
        }
        let mut watch = match registry.watch(listing.revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                log::warn!("peers: cannot watch the machines: {e}; retrying");
                return;
            }
        };
        while let Some(event) = watch.next().await {
            match event {
                Ok(e) => {
                    if matches!(
                        e.change,
                        Change::MachinePut(_) | Change::MachineRemoved { .. }
                    ) {
                        return;
                    }
                }
                Err(e) => {
                    log::warn!("peers: the machine watch ended: {e}; reading again");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn machine(id: &str, api: Option<&str>) -> Machine {
        Machine {
            id: id.into(),
            address: String::new(),
            metadata: Default::default(),
            api: api.map(str::to_string),
            images: Vec::new(),
            os_version: String::new(),
            os: None,
        }
    }

    #[test]
    fn names_the_images_each_peer_holds() {
        let f = PeersFile::new(
            "/nonexistent/peers.toml",
            "m1",
            None,
            PeerIdentity::Token("/etc/flotilla/fleetd.token".into()),
        );
        let mut m1 = machine("m1", Some("http://10.0.0.11:4002"));
        m1.images = vec!["reg:5000/own:1".into()];
        let mut m2 = machine("m2", Some("http://10.0.0.12:4002"));
        m2.images = vec!["reg:5000/team/app:1".into(), "reg:5000/team/db:9".into()];
        let m3 = machine("m3", Some("http://10.0.0.13:4002"));
        let text = f.render(&[m3, m2, m1]);
        // The file is what unitctl reads (and its reader denies unknown keys).
        let v: toml::Value = toml::from_str(&text).unwrap();
        let images = v["images"].as_table().unwrap();
        assert_eq!(
            images.len(),
            1,
            "only m2 holds images, itself left out: {text}"
        );
        assert_eq!(
            images["http://10.0.0.12:4002"],
            toml::Value::Array(vec![
                "reg:5000/team/app:1".into(),
                "reg:5000/team/db:9".into()
            ]),
            "{text}"
        );
        assert_eq!(v["peers"].as_array().unwrap().len(), 2, "{text}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.toml");
        std::fs::write(&path, &text).unwrap();
        let read = flotilla_registry::PeerSettings::load(&path).unwrap();
        assert_eq!(
            read.images.get("http://10.0.0.12:4002").map(Vec::len),
            Some(2),
            "unitctl reads it: {text}"
        );
        let none = f.render(&[machine("m2", Some("http://10.0.0.12:4002"))]);
        assert!(!none.contains("images"), "no table without images: {none}");
    }

    #[test]
    fn lists_the_other_machines_with_an_api() {
        let f = PeersFile::new(
            "/nonexistent/peers.toml",
            "m2",
            Some("http://10.0.0.12:4002".into()),
            PeerIdentity::Token("/etc/flotilla/fleetd.token".into()),
        );
        let text = f.render(&[
            machine("m3", Some("http://10.0.0.13:4002")),
            machine("m2", Some("http://10.0.0.12:4002")),
            machine("m4", None),
            machine("m1", Some("http://10.0.0.11:4002")),
        ]);
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(
            v["peers"].as_array().unwrap().len(),
            2,
            "m1 and m3, not itself nor m4: {text}"
        );
        assert_eq!(v["peers"][0].as_str(), Some("http://10.0.0.11:4002"));
        assert_eq!(v["own"].as_str(), Some("http://10.0.0.12:4002"));
        assert_eq!(v["token_file"].as_str(), Some("/etc/flotilla/fleetd.token"));
    }
}
