//! `unitctl os status | update DIR | rollback`: the host's A/B update, run by unitctl itself
//! (as root) with `flotilla_osupdate::host`, not by PID 1: the write of the slot (hundreds
//! of MB) must not stall the init's event loop, and unitctl shows its progress. The ESP is
//! mounted by unitctl for the command's duration (or given with `--esp`). The reboot is the
//! init's orderly one (SIGINT to PID 1, as Ctrl-Alt-Del), only when PID 1 is flotilla-init.

use std::io::{IsTerminal as _, Write};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use flotilla_osupdate::entries::EntryState;
use flotilla_osupdate::host::{
    self, EspMount, Host, HostStatus, UpdateOptions, DEFAULT_TRIES, ESP_PARTITION,
};
use flotilla_osupdate::payload::TRUSTED_KEYS_DIR;
use serde_json::{json, Value};

use super::{human_size, image_pull, print_json};

/// Where `unitctl os update REF` downloads the payload: on `/var`, not in RAM.
const STAGING: &str = "/var/lib/flotilla/os-update";

/// Where the payload comes from: a directory as given, or a registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A payload directory.
    Dir(PathBuf),
    /// A registry reference of an OS update image.
    Reference(String),
}

impl Source {
    /// An existing path is a directory; something that looks like a path (`/`, `.`) but
    /// does not exist is an error; anything else is a registry reference.
    fn parse(arg: &str) -> Result<Source> {
        let path = Path::new(arg);
        if path.exists() {
            if !path.is_dir() {
                bail!("{arg} is not a directory: give the payload directory (OUT/update/) or a registry reference HOST[:PORT]/REPO:TAG");
            }
            return Ok(Source::Dir(path.to_path_buf()));
        }
        if arg.starts_with('/') || arg.starts_with('.') || !arg.contains('/') {
            bail!("{arg}: no such payload directory, and not a registry reference (HOST[:PORT]/REPO[:TAG] or ...@sha256:<hex>)");
        }
        Ok(Source::Reference(arg.to_string()))
    }
}

/// A download directory under the staging directory, removed when dropped.
struct Staged {
    dir: PathBuf,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("unitctl: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Bytes free for root (`f_bfree`: root may use the reserved blocks) on
/// the filesystem holding `dir`; `None` when it cannot be asked.
fn free_bytes(dir: &Path) -> Option<u64> {
    let vfs = rustix::fs::statvfs(dir).ok()?;
    vfs.f_bfree.checked_mul(vfs.f_frsize)
}

/// Pulls the OS update image `reference` into a fresh directory under `staging`: the
/// manifest must be a Flotilla OS update (`flotilla_osupdate::oci`), each file is
/// digest-verified as it arrives. The payload's signature is checked afterwards by the one
/// update path, like a directory's.
fn pull_payload(
    reference: &str,
    registries: Option<PathBuf>,
    staging: &Path,
) -> Result<(Staged, flotilla_registry::FilesReport)> {
    use flotilla_osupdate::oci;
    let (settings, path) = image_pull::settings_for(reference, registries)?;
    std::fs::create_dir_all(staging)
        .with_context(|| format!("cannot create the download directory {}", staging.display()))?;
    // Leftovers of updates whose process is gone (killed, power loss): only names this
    // function makes (`<pid>-<nanos>`), whatever else the directory holds.
    if let Ok(rd) = std::fs::read_dir(staging) {
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((pid, nanos)) = name.split_once('-') else {
                continue;
            };
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if digits(pid) && digits(nanos) && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = staging.join(format!("{}-{nanos}", std::process::id()));
    // Private: only this root process writes the payload it verifies.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
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
    let reporter = image_pull::Reporter::new();
    let started = std::time::Instant::now();
    let report = flotilla_registry::pull_files(
        reference,
        &settings,
        &path,
        &staged.dir,
        &check,
        reporter.progress(),
    );
    reporter.finish();
    let report = report?;
    eprintln!(
        "pulled {reference} {} from {}: {} files ({}) in {:.1}s",
        report.manifest_digest,
        report.registry,
        report.files.len(),
        human_size(report.bytes),
        started.elapsed().as_secs_f64()
    );
    Ok((staged, report))
}

#[derive(Debug, Subcommand)]
pub(crate) enum OsCommand {
    /// Show the running slot and version, each slot's boot entry (version, committed /
    /// trying / bad) and the slot that boots next.
    Status {
        #[command(flatten)]
        paths: OsPaths,
    },
    /// Verify the update payload in DIR, or pulled from the registry reference REF
    /// (signature, OS, architecture, newer version, digests), write it to the inactive
    /// slot, make it the next boot on trial, and reboot.
    Update {
        /// The payload directory (`image-build os --sign` writes OUT/update/), or a registry
        /// reference `HOST[:PORT]/REPO[:TAG]` / `...@sha256:<hex>` of the OCI image
        /// (OUT/update-oci/ pushed with skopeo). An existing path is a directory.
        #[arg(value_name = "DIR|REF")]
        source: String,
        /// Registry settings for a REF (credentials, mirrors, CA, insecure) [default:
        /// $FLOTILLA_REGISTRIES, else /etc/flotilla/registries.toml].
        #[arg(long, value_name = "FILE")]
        registries: Option<PathBuf>,
        /// Where a REF's files are downloaded (a directory on /var: a root image is hundreds
        /// of MB); removed afterwards.
        #[arg(long, hide = true, default_value = STAGING)]
        staging: PathBuf,
        /// Do not reboot afterwards.
        #[arg(long)]
        no_reboot: bool,
        /// Accept a version older than or equal to the running one.
        #[arg(long)]
        allow_downgrade: bool,
        /// Boot tries of the new slot before the loader falls back.
        #[arg(long, default_value_t = DEFAULT_TRIES)]
        tries: u32,
        #[command(flatten)]
        paths: OsPaths,
    },
    /// Mark the running slot good: its boot entry on trial becomes committed, so the loader
    /// keeps booting it.
    Commit {
        #[command(flatten)]
        paths: OsPaths,
    },
    /// Make the other slot the next boot (the current next entry is marked bad), and reboot.
    Rollback {
        /// Do not reboot afterwards.
        #[arg(long)]
        no_reboot: bool,
        #[command(flatten)]
        paths: OsPaths,
    },
}

/// Where the host's parts are (the defaults are the real ones; the hidden options let the
/// tests use a loop device and files).
#[derive(Debug, clap::Args)]
pub(crate) struct OsPaths {
    /// The mounted EFI system partition [default: mount the slots' disk's `flotilla-esp`
    /// partition (vfat) on a private directory under /run/flotilla for the command].
    #[arg(long, value_name = "DIR")]
    esp: Option<PathBuf>,
    /// The disk holding the slots, by kernel name (e.g. `vda`) [default: the running slot's].
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    #[arg(long, hide = true, default_value = "/sys/class/block")]
    sys_block: PathBuf,
    #[arg(long, hide = true, default_value = "/dev")]
    dev: PathBuf,
    #[arg(long, hide = true, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    #[arg(long, hide = true, default_value = "/usr/lib/os-release")]
    os_release: PathBuf,
    #[arg(long, hide = true, default_value = TRUSTED_KEYS_DIR)]
    keys: PathBuf,
}

/// The ESP mounted by unitctl: unmounted and its directory removed on drop.
impl OsPaths {
    /// The host's paths, and the ESP mount when unitctl made one.
    fn host(self) -> Result<(Host, Option<EspMount>)> {
        let mut host = Host {
            sys_block: self.sys_block,
            dev: self.dev,
            cmdline: self.cmdline,
            os_release: self.os_release,
            keys: self.keys,
            disk: self.disk,
            esp: PathBuf::new(),
        };
        if let Some(esp) = self.esp {
            host.esp = esp;
            return Ok((host, None));
        }
        let part = host.partition(ESP_PARTITION)?;
        let dir = Path::new("/run/flotilla").join(format!("esp-{}", std::process::id()));
        let mount = EspMount::mount(&part.dev, &dir, false)
            .with_context(|| "cannot mount the ESP (or give --esp DIR)".to_string())?;
        host.esp = mount.dir().to_path_buf();
        Ok((host, Some(mount)))
    }
}

/// Whether PID 1 is flotilla-init: the init's API socket is served by PID 1 itself
/// (`SO_PEERCRED` of a connection to it names the listener's pid). Its name proves
/// nothing: booted from the initramfs, flotilla-init runs as `/init` (comm `init`, as
/// sysvinit's).
fn pid1_is_flotilla_init() -> bool {
    let Ok(stream) = std::os::unix::net::UnixStream::connect(flotilla_init_api::DEFAULT_SOCKET)
    else {
        return false;
    };
    matches!(flotilla_init_api::peer::peer_cred(&stream), Ok(c) if c.pid == Some(1))
}

/// Asks PID 1 for an orderly reboot (SIGINT, the init's Ctrl-Alt-Del), only if it is
/// flotilla-init: on any other init SIGINT means something else.
fn reboot(out: &mut impl Write) -> Result<()> {
    if !pid1_is_flotilla_init() {
        let comm = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
        bail!(
            "PID 1 ({:?}) is not flotilla-init (it does not serve {}): not rebooting; reboot the machine yourself",
            comm.trim(),
            flotilla_init_api::DEFAULT_SOCKET
        );
    }
    writeln!(out, "rebooting (orderly: units are stopped first)")?;
    out.flush()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(1),
        nix::sys::signal::Signal::SIGINT,
    )
    .context("cannot signal PID 1 to reboot")?;
    Ok(())
}

fn state_text(s: EntryState) -> String {
    s.to_string()
}

fn status_json(st: &HostStatus) -> Value {
    let slots: Vec<Value> = st
        .entries
        .entries
        .iter()
        .map(|e| {
            let (state, left, done) = match e.state() {
                EntryState::Committed => ("committed", None, None),
                EntryState::Trying { left, done } => ("trying", Some(left), Some(done)),
                EntryState::Bad { done } => ("bad", Some(0), Some(done)),
            };
            json!({
                "slot": e.slot.as_str(),
                "version": e.version,
                "state": state,
                "tries_left": left,
                "tries_done": done,
                "entry": e.file,
            })
        })
        .collect();
    json!({
        "running": st.running.map(|s| s.as_str()),
        "version": st.version,
        "next": st.entries.next.map(|s| s.as_str()),
        "slots": slots,
        "rolled_back": rolled_back(st).map(|e| json!({
            "slot": e.slot.as_str(),
            "version": e.version,
            "entry": e.file,
        })),
    })
}

fn status_text(st: &HostStatus) -> String {
    let mut s = match st.running {
        Some(slot) => format!("running: slot {slot}, version {}\n", st.version),
        None => format!(
            "running: version {} (not booted from a slot: direct kernel boot)\n",
            st.version
        ),
    };
    if st.entries.entries.is_empty() {
        s.push_str("no boot entries on the ESP\n");
    }
    for e in &st.entries.entries {
        s.push_str(&format!(
            "slot {}: {} {}{}\n",
            e.slot,
            e.version,
            state_text(e.state()),
            if st.entries.next == Some(e.slot) {
                "  <- next boot"
            } else {
                ""
            }
        ));
    }
    if let Some(e) = rolled_back(st) {
        s.push_str(&format!(
            "the update to {} in slot {} was rolled back (its entry {} is bad)\n",
            e.version, e.slot, e.file
        ));
    }
    s
}

/// The other slot's entry when an update to it was rolled back.
fn rolled_back(st: &HostStatus) -> Option<&flotilla_osupdate::entries::SlotEntry> {
    flotilla_osupdate::entries::rolled_back(&st.entries, st.running?, &st.version)
}

/// Prints a progress line every 10 % (on a terminal: one line rewritten).
fn progress_printer(label: String) -> impl FnMut(u64, u64) {
    let tty = std::io::stderr().is_terminal();
    let mut last = u64::MAX;
    move |done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let step = pct / 10;
        if step == last {
            return;
        }
        last = step;
        if tty {
            eprint!("\r{label}: {pct:3}%");
            if done == total {
                eprintln!();
            }
        } else {
            eprintln!("{label}: {pct}%");
        }
    }
}

/// Runs `unitctl os ...`.
pub(crate) fn run(cmd: OsCommand, json: bool, out: &mut impl Write) -> Result<u8> {
    match cmd {
        OsCommand::Status { paths } => {
            let (host, _mount) = paths.host()?;
            let st = host::status(&host)?;
            if json {
                print_json(out, &status_json(&st))?;
            } else {
                write!(out, "{}", status_text(&st))?;
            }
        }
        OsCommand::Update {
            source,
            registries,
            staging,
            no_reboot,
            allow_downgrade,
            tries,
            paths,
        } => {
            let (host, mount) = paths.host()?;
            let running = host.running_slot()?;
            // The source step: a directory as it is, a reference pulled to /var first (and
            // removed after, whatever the outcome). Then the one update path.
            let (dir, _staged, pulled) = match Source::parse(&source)? {
                Source::Dir(dir) => (dir, None, Value::Null),
                Source::Reference(r) => {
                    // What would refuse any payload is checked before a download of
                    // hundreds of MB: the trusted keys, the running version, the target.
                    flotilla_osupdate::payload::load_trusted_keys(&host.keys)?;
                    flotilla_osupdate::payload::os_release_version(&host.os_release)?;
                    host.partition(&running.other().partition_name())?;
                    let (staged, report) = pull_payload(&r, registries, &staging)?;
                    let pulled = json!({
                        "reference": r,
                        "digest": report.manifest_digest,
                        "registry": report.registry,
                        "bytes": report.bytes,
                    });
                    (staged.dir.clone(), Some(staged), pulled)
                }
            };
            let mut progress = progress_printer(format!("writing slot {}", running.other()));
            let r = host::update(
                &host,
                &dir,
                UpdateOptions {
                    allow_downgrade,
                    tries,
                },
                &mut progress,
            )?;
            drop(mount);
            let secs = r.write.write.as_secs_f64();
            if json {
                print_json(
                    out,
                    &json!({
                        "version": r.payload.manifest.version,
                        "key": r.payload.key,
                        "slot": r.slot.as_str(),
                        "device": r.partition.dev,
                        "bytes": r.write.bytes,
                        "verify_seconds": r.verify.as_secs_f64(),
                        "write_seconds": secs,
                        "read_back_seconds": r.write.verify.as_secs_f64(),
                        "entry": r.installed.file,
                        "demoted": r.installed.demoted,
                        "tries": tries,
                        "pulled": pulled,
                    }),
                )?;
            } else {
                writeln!(
                    out,
                    "verified Flotilla {} (signed by {}) in {:.1}s",
                    r.payload.manifest.version,
                    r.payload.key,
                    r.verify.as_secs_f64()
                )?;
                writeln!(
                    out,
                    "wrote {} bytes to slot {} ({}) in {secs:.1}s, read back and checked in {:.1}s",
                    r.write.bytes,
                    r.slot,
                    r.partition.dev.display(),
                    r.write.verify.as_secs_f64()
                )?;
                if let Some(d) = &r.installed.demoted {
                    writeln!(
                        out,
                        "not newer than slot {}: its entry is now {d}, so the new slot boots first",
                        r.slot.other()
                    )?;
                }
                writeln!(
                    out,
                    "next boot: slot {} ({}, {} tries); once it runs well, `unitctl os commit` marks it good",
                    r.slot,
                    r.installed.file,
                    tries.max(1)
                )?;
            }
            if !no_reboot {
                reboot(out)?;
            }
        }
        OsCommand::Commit { paths } => {
            let (host, mount) = paths.host()?;
            let slot = host::commit(&host)?;
            drop(mount);
            if json {
                print_json(out, &json!({ "committed": slot.as_str() }))?;
            } else {
                writeln!(out, "slot {slot} committed")?;
            }
        }
        OsCommand::Rollback { no_reboot, paths } => {
            let (host, mount) = paths.host()?;
            let slot = host::rollback(&host)?;
            drop(mount);
            if json {
                print_json(out, &json!({ "next": slot.as_str() }))?;
            } else {
                writeln!(out, "next boot: slot {slot}")?;
            }
            if !no_reboot {
                reboot(out)?;
            }
        }
    }
    Ok(0)
}
