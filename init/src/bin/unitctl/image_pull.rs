//! `unitctl image pull REF`: settings, progress (bars on a terminal, step lines otherwise).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use flotilla_container::image::ImageStore;
use flotilla_registry::{
    PeerSettings, PullEvent, Registries, DEFAULT_PEERS, DEFAULT_REGISTRIES, PEERS_ENV,
    REGISTRIES_ENV,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use super::human_size;

/// Progress state shared with the download tasks.
#[derive(Default)]
struct Shown {
    count: usize,
    bars: Vec<Option<ProgressBar>>,
    /// Spinner while the store extracts the layers (on a terminal).
    importing: Option<ProgressBar>,
}

/// Where blobs may come from before the registry: other machines' fleetd (layers from peers).
#[derive(Debug, clap::Args)]
pub(crate) struct PeerArgs {
    /// Ask this peer (a machine's fleetd API, `https://HOST:PORT` or `http://` for an
    /// --insecure cluster) for every blob before the registry; repeatable, asked in order.
    /// Replaces the peers file.
    #[arg(long = "peer", value_name = "URL")]
    peer: Vec<String>,
    /// The cluster CA (PEM) of the --peer machines' certificates.
    #[arg(long, value_name = "FILE", requires = "peer")]
    peer_ca: Option<PathBuf>,
    /// This machine's certificate (PEM, OU=machine) shown to the --peer machines.
    #[arg(long, value_name = "FILE", requires = "peer")]
    peer_cert: Option<PathBuf>,
    /// The key of --peer-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "peer")]
    peer_key: Option<PathBuf>,
    /// The cluster's bearer token (first line) for http:// --peer machines.
    #[arg(long, value_name = "FILE", requires = "peer")]
    peer_token_file: Option<PathBuf>,
    /// The peers file fleetd keeps [default: $FLOTILLA_PEERS, else /run/flotilla/peers.toml,
    /// when it exists].
    #[arg(long, value_name = "FILE", conflicts_with = "peer")]
    peers: Option<PathBuf>,
    /// Ask no peer: the registry only.
    #[arg(long, conflicts_with_all = ["peer", "peers"])]
    no_peers: bool,
}

impl PeerArgs {
    /// The peers to ask: `--peer ...`, else the peers file (given, or the default one when
    /// it exists), else none.
    pub(crate) fn settings(self) -> Result<PeerSettings> {
        if self.no_peers {
            return Ok(PeerSettings::default());
        }
        if !self.peer.is_empty() {
            return Ok(PeerSettings {
                peers: self.peer,
                ca: self.peer_ca,
                cert: self.peer_cert,
                key: self.peer_key,
                token_file: self.peer_token_file,
                own: None,
                images: Default::default(),
            });
        }
        let (path, given) = match self.peers {
            Some(p) => (p, true),
            None => match std::env::var_os(PEERS_ENV) {
                Some(p) => (PathBuf::from(p), false),
                None => (PathBuf::from(DEFAULT_PEERS), false),
            },
        };
        if !given && !path.exists() {
            return Ok(PeerSettings::default());
        }
        Ok(PeerSettings::load(&path)?)
    }
}

/// The registry settings (`--registries FILE`, else `$FLOTILLA_REGISTRIES`, else the
/// default file) and their path. On a machine without CA certificates, the registry's own
/// CA stands for the machine's roots (see `flotilla_registry::fallback_roots`).
pub(crate) fn settings_for(
    reference: &str,
    registries: Option<PathBuf>,
) -> Result<(Registries, PathBuf)> {
    let path = registries
        .or_else(|| std::env::var_os(REGISTRIES_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_REGISTRIES));
    let settings = Registries::load(&path)?;
    // A machine without CA certificates (a host image built without `[root] ca_bundle`, a
    // bare container): the registry's own CA stands for the machine's roots, else no HTTPS
    // client can be built at all (see flotilla_registry::fallback_roots).
    if let Some(ca) = flotilla_registry::fallback_roots(reference, &settings, &path) {
        // Set before the pull starts its runtime: unitctl has no other thread that could
        // read the environment meanwhile.
        std::env::set_var("SSL_CERT_FILE", &ca);
    }
    Ok((settings, path))
}

/// The pull's progress: bars on a terminal, step lines on stderr otherwise.
pub(crate) struct Reporter {
    shown: Arc<Mutex<Shown>>,
    multi: Option<MultiProgress>,
}

impl Reporter {
    /// A reporter for one pull.
    pub(crate) fn new() -> Reporter {
        Reporter {
            shown: Arc::new(Mutex::new(Shown::default())),
            multi: std::io::stderr().is_terminal().then(MultiProgress::new),
        }
    }

    /// The callback the pull reports to.
    pub(crate) fn progress(&self) -> flotilla_registry::Progress {
        let shown = self.shown.clone();
        let multi = self.multi.clone();
        Arc::new(move |ev| {
            if let Ok(mut s) = shown.lock() {
                show(&mut s, multi.as_ref(), ev);
            }
        })
    }

    /// Clears the bars left.
    pub(crate) fn finish(&self) {
        if let Ok(mut s) = self.shown.lock() {
            let s = &mut *s;
            for bar in s.bars.iter().flatten().chain(s.importing.iter()) {
                bar.finish_and_clear();
            }
        }
    }
}

/// Pulls `reference` into `store`; step lines go to stderr, the result to `out`.
pub(crate) fn pull(
    store: &ImageStore,
    reference: &str,
    registries: Option<PathBuf>,
    peers: &PeerSettings,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let (settings, path) = settings_for(reference, registries)?;
    let reporter = Reporter::new();
    let report = flotilla_registry::pull_with_peers(
        store,
        reference,
        &settings,
        &path,
        peers,
        reporter.progress(),
    )?;
    reporter.finish();
    let i = &report.image;
    if json {
        let v = json!({
            "image": i,
            "registry": report.registry,
            "downloaded_layers": report.downloaded_layers,
            "skipped_layers": report.skipped_layers,
            "downloaded_bytes": report.downloaded_bytes,
            "sources": report.sources,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "pulled {}:{} {} from {}: downloaded {} layers ({}), {} already in the store",
            i.name,
            i.tag,
            i.digest,
            report.registry,
            report.downloaded_layers,
            human_size(report.downloaded_bytes),
            report.skipped_layers
        )?;
        if report.sources.keys().any(|s| *s != report.registry) {
            let by: Vec<String> = report
                .sources
                .iter()
                .map(|(s, b)| format!("{} from {s}", human_size(*b)))
                .collect();
            writeln!(out, "  bytes by source: {}", by.join(", "))?;
        }
    }
    Ok(())
}

/// A step line: above the progress bars on a terminal, else on stderr.
fn say(multi: Option<&MultiProgress>, line: String) {
    match multi {
        Some(m) => {
            let _ = m.println(line);
        }
        None => eprintln!("{line}"),
    }
}

fn show(s: &mut Shown, multi: Option<&MultiProgress>, ev: PullEvent) {
    match ev {
        PullEvent::Resolved {
            registry,
            manifest_digest,
            layers,
            missing,
            bytes,
        } => {
            s.count = layers;
            s.bars = vec![None; layers];
            say(
                multi,
                format!(
                    "{registry}: manifest {manifest_digest}, {layers} layers, {missing} to download ({})",
                    human_size(bytes)
                ),
            );
        }
        PullEvent::LayerSkipped { index, digest } => say(
            multi,
            format!(
                "layer {}/{} {digest} already in the store",
                index + 1,
                s.count.max(index + 1)
            ),
        ),
        PullEvent::LayerProgress {
            index,
            received,
            size,
        } => {
            let Some(m) = multi else { return };
            let count = s.count;
            if let Some(slot) = s.bars.get_mut(index) {
                let bar = slot.get_or_insert_with(|| {
                    let b = m.add(ProgressBar::new(size));
                    if let Ok(style) = ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b.set_prefix(format!("layer {}/{count}", index + 1));
                    b
                });
                bar.set_position(received);
            }
        }
        PullEvent::LayerDone {
            index,
            digest,
            size,
            source,
        } => {
            let line = format!(
                "layer {}/{} {digest} downloaded ({}) from {source}, verified",
                index + 1,
                s.count.max(index + 1),
                human_size(size)
            );
            match (multi, s.bars.get_mut(index).and_then(Option::take)) {
                (Some(m), bar) => {
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                    let _ = m.println(line);
                }
                (None, _) => eprintln!("{line}"),
            }
        }
        PullEvent::Resuming {
            index,
            digest,
            offset,
            error,
        } => {
            let which = if index == usize::MAX {
                "the config".to_string()
            } else {
                format!("layer {}/{}", index + 1, s.count.max(index + 1))
            };
            say(
                multi,
                format!(
                    "{which} {digest}: cut after {} ({error}); resuming there",
                    human_size(offset)
                ),
            );
        }
        PullEvent::PeerRefused { what, detail } => say(
            multi,
            format!(
                "{what} from a peer does not match its digest, refused (a peer cannot substitute content): {detail}; trying the next source"
            ),
        ),
        PullEvent::SourceFailed { registry, error } => say(
            multi,
            format!("mirror {registry} failed: {error}; trying the next source"),
        ),
        PullEvent::PeersUnavailable { why } => say(
            multi,
            format!("not asking the peers: {why}; pulling from the registry"),
        ),
        PullEvent::Claimed { digest, holder } => say(
            multi,
            match holder {
                Some(h) => format!(
                    "image {digest}: {h} fetches it from the registry; taking its blobs from there"
                ),
                None => format!("image {digest}: this machine fetches it from the registry"),
            },
        ),
        PullEvent::Importing => {
            let line = "every blob verified; importing into the store".to_string();
            match multi {
                Some(m) => {
                    let _ = m.println(line);
                    let spinner = m.add(ProgressBar::new_spinner());
                    spinner.set_message("extracting the layers");
                    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
                    s.importing = Some(spinner);
                }
                None => eprintln!("{line}"),
            }
        }
    }
}
