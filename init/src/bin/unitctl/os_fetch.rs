//! The source step of `unitctl os update`: a payload directory as it is, or an OCI reference
//! pulled through `flotilla_registry` into the staging directory on `/var`. It lives in
//! unitctl, not in the library: PID 1 links no registry client, and init's `UpdateOs` runs
//! `unitctl os update SOURCE --no-reboot --json` as its helper process.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use flotilla_init::os_update::{human_size, Source};
use flotilla_osupdate::host::{self, Host, HostError, UpdateOptions, UpdateReport};

/// A download directory under the staging directory, removed when dropped.
pub(crate) struct Staged {
    /// The directory.
    pub(crate) dir: PathBuf,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("unitctl: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Bytes free for root (`f_bfree`: root may use the reserved blocks) on the filesystem
/// holding `dir`; `None` when it cannot be asked.
fn free_bytes(dir: &Path) -> Option<u64> {
    let vfs = rustix::fs::statvfs(dir).ok()?;
    vfs.f_bfree.checked_mul(vfs.f_frsize)
}

/// Removes leftovers of updates whose process is gone (killed, power loss): only names
/// [`pull_payload`] makes (`<pid>-<nanos>`), whatever else the directory holds.
fn remove_leftovers(staging: &Path) {
    let Ok(rd) = std::fs::read_dir(staging) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, nanos)) = name.split_once('-') else {
            continue;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        // This process's own earlier downloads are gone too (each is removed when done).
        let ours = pid == std::process::id().to_string();
        if digits(pid) && digits(nanos) && (ours || !Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn staging_context(path: &Path) -> String {
    format!(
        "cannot create the download directory {}; check that /var is mounted and writable",
        path.display()
    )
}

/// Pulls the OS update image `reference` into a fresh directory under `staging` with the
/// registry settings `settings` (read from `settings_path`): the manifest must be a
/// Flotilla OS update (`flotilla_osupdate::oci`), a download larger than the free space is
/// refused before its first byte, each file is digest-verified as it arrives. The payload's
/// signature is checked afterwards by the one update path, like a directory's.
fn pull_payload(
    reference: &str,
    settings: &flotilla_registry::Registries,
    settings_path: &Path,
    staging: &Path,
    progress: flotilla_registry::Progress,
) -> Result<(Staged, flotilla_registry::FilesReport)> {
    use flotilla_osupdate::oci;
    std::fs::create_dir_all(staging).with_context(|| staging_context(staging))?;
    remove_leftovers(staging);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = staging.join(format!("{}-{nanos}", std::process::id()));
    // Private: only this root process writes the payload it verifies.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| staging_context(&dir))?;
    let staged = Staged { dir };
    let free = free_bytes(&staged.dir);
    let check = |reference: &str, bytes: &[u8]| {
        let layers = oci::parse_update_manifest(reference, bytes).map_err(|e| e.to_string())?;
        // A download that cannot fit is refused before its first byte.
        let need: u64 = layers.iter().map(|l| l.layer.size).sum();
        if let Some(free) = free.filter(|&f| f < need) {
            return Err(format!(
                "{reference}: the update needs {} ({need} bytes) in {} but only {} ({free} bytes) are free there: refused, nothing downloaded; free space on that filesystem",
                human_size(need),
                staging.display(),
                human_size(free)
            ));
        }
        Ok(layers
            .into_iter()
            .map(|l| flotilla_registry::ArtifactFile {
                name: l.file,
                media_type: l.layer.media_type,
                digest: l.layer.digest,
                size: l.layer.size,
            })
            .collect())
    };
    let report = flotilla_registry::pull_files(
        reference,
        settings,
        settings_path,
        &staged.dir,
        &check,
        progress,
    )?;
    Ok((staged, report))
}

/// What a registry pull of an update fetched.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pulled {
    /// The reference.
    pub(crate) reference: String,
    /// The manifest's digest.
    pub(crate) digest: String,
    /// The registry (or mirror) it came from.
    pub(crate) registry: String,
    /// Bytes downloaded.
    pub(crate) bytes: u64,
    /// Files downloaded.
    pub(crate) files: usize,
    /// Time the download took.
    pub(crate) seconds: f64,
}

/// How [`run_update`] runs.
pub(crate) struct UpdateRun<'a> {
    /// Where the payload comes from.
    pub(crate) source: &'a Source,
    /// The registry settings file (for a reference).
    pub(crate) registries: &'a Path,
    /// Where a reference is downloaded.
    pub(crate) staging: &'a Path,
    /// Downgrade and tries.
    pub(crate) opts: UpdateOptions,
    /// The pull's progress.
    pub(crate) pull_progress: flotilla_registry::Progress,
}

/// A payload ready to verify: a directory, or a download removed when dropped.
struct Fetched {
    /// The payload directory.
    dir: PathBuf,
    /// The download holding it (a reference's), removed when dropped.
    _staged: Option<Staged>,
    /// What the pull fetched (a reference's).
    pulled: Option<Pulled>,
}

/// The source step of an update: a directory as it is; a reference pulled into the staging
/// directory, after what would refuse any payload is checked (the running slot on trial,
/// the trusted keys, the running version, the target partition).
fn fetch(host: &Host, run: UpdateRun<'_>) -> Result<Fetched> {
    let running = host.running_slot()?;
    match run.source {
        Source::Dir(dir) => Ok(Fetched {
            dir: dir.clone(),
            _staged: None,
            pulled: None,
        }),
        Source::Reference(r) => {
            // Nothing is downloaded for an update that would be refused anyway.
            host::refuse_on_trial(host)?;
            flotilla_osupdate::payload::load_trusted_keys(&host.keys).map_err(HostError::from)?;
            flotilla_osupdate::payload::os_release_version(&host.os_release)
                .map_err(HostError::from)?;
            host.partition(&running.other().partition_name())?;
            let settings = flotilla_registry::Registries::load(run.registries)?;
            if let Some(ca) = flotilla_registry::fallback_roots(r, &settings, run.registries) {
                // unitctl has no other thread yet that could read the environment.
                std::env::set_var("SSL_CERT_FILE", ca);
            }
            let started = std::time::Instant::now();
            let (staged, report) =
                pull_payload(r, &settings, run.registries, run.staging, run.pull_progress)?;
            Ok(Fetched {
                dir: staged.dir.clone(),
                _staged: Some(staged),
                pulled: Some(Pulled {
                    reference: r.clone(),
                    digest: report.manifest_digest,
                    registry: report.registry,
                    bytes: report.bytes,
                    files: report.files.len(),
                    seconds: started.elapsed().as_secs_f64(),
                }),
            })
        }
    }
}

/// Updates `host` (its ESP mounted) from `run.source`: [`fetch`], then the one update path
/// (`host::update`: verify, write the inactive slot, install its entry on trial). The
/// download is removed afterwards, whatever the outcome. The reboot is the caller's.
pub(crate) fn run_update(
    host: &Host,
    run: UpdateRun<'_>,
    write_progress: &mut dyn FnMut(u64, u64),
) -> Result<(UpdateReport, Option<Pulled>)> {
    let opts = run.opts;
    let fetched = fetch(host, run)?;
    let report = host::update(host, &fetched.dir, opts, write_progress)?;
    Ok((report, fetched.pulled))
}
