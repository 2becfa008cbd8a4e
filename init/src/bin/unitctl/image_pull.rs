//! `unitctl image pull REF`: settings, progress (bars on a terminal, step lines otherwise).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use flotilla_container::image::ImageStore;
use flotilla_registry::{PullEvent, Registries, DEFAULT_REGISTRIES, REGISTRIES_ENV};
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

/// Pulls `reference` into `store`; step lines go to stderr, the result to `out`.
pub(crate) fn pull(
    store: &ImageStore,
    reference: &str,
    registries: Option<PathBuf>,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let path = registries
        .or_else(|| std::env::var_os(REGISTRIES_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_REGISTRIES));
    let settings = Registries::load(&path)?;
    // A machine without CA certificates (the host image has no CA bundle): the registry's
    // own CA stands for the machine's roots, else no HTTPS client can be built at all (see
    // flotilla_registry::fallback_roots).
    if let Some(ca) = flotilla_registry::fallback_roots(reference, &settings, &path) {
        // Set before the pull starts its runtime: unitctl has no other thread that could
        // read the environment meanwhile.
        std::env::set_var("SSL_CERT_FILE", &ca);
    }
    let multi = std::io::stderr().is_terminal().then(MultiProgress::new);
    let shown = Arc::new(Mutex::new(Shown::default()));
    let progress: flotilla_registry::Progress = {
        let shown = shown.clone();
        Arc::new(move |ev| {
            if let Ok(mut s) = shown.lock() {
                show(&mut s, multi.as_ref(), ev);
            }
        })
    };
    let report = flotilla_registry::pull(store, reference, &settings, &path, progress)?;
    if let Ok(mut s) = shown.lock() {
        let s = &mut *s;
        for bar in s.bars.iter().flatten().chain(s.importing.iter()) {
            bar.finish_and_clear();
        }
    }
    let i = &report.image;
    if json {
        let v = json!({
            "image": i,
            "registry": report.registry,
            "downloaded_layers": report.downloaded_layers,
            "skipped_layers": report.skipped_layers,
            "downloaded_bytes": report.downloaded_bytes,
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
    }
    Ok(())
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
            let line = format!(
                "{registry}: manifest {manifest_digest}, {layers} layers, {missing} to download ({})",
                human_size(bytes)
            );
            match multi {
                Some(m) => {
                    let _ = m.println(line);
                }
                None => eprintln!("{line}"),
            }
        }
        PullEvent::LayerSkipped { index, digest } => {
            let line = format!(
                "layer {}/{} {digest} already in the store",
                index + 1,
                s.count.max(index + 1)
            );
            match multi {
                Some(m) => {
                    let _ = m.println(line);
                }
                None => eprintln!("{line}"),
            }
        }
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
        } => {
            let line = format!(
                "layer {}/{} {digest} downloaded ({}), verified",
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
