//! `unitctl os status | update DIR | rollback`: the host's A/B update, run by unitctl itself
//! (as root) with `flotilla_init::os_update` and [`super::os_fetch`] over
//! `flotilla_osupdate::host` (init's `UpdateOs` runs `unitctl os update SOURCE --no-reboot
//! --json` as a helper process: PID 1 links no registry client): unitctl shows its
//! progress, and needs no manager. The ESP is mounted by unitctl for the command's duration
//! (or given with `--esp`). The reboot is the init's orderly one (SIGINT to PID 1, as
//! Ctrl-Alt-Del), only when PID 1 is flotilla-init.

use std::io::{IsTerminal as _, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use flotilla_init::os_update::{self, rolled_back, status_json, HostPaths, Source};
use flotilla_osupdate::entries::EntryState;
use flotilla_osupdate::host::{self, EspMount, Host, HostStatus, UpdateOptions, DEFAULT_TRIES};
use flotilla_osupdate::payload::TRUSTED_KEYS_DIR;
use serde_json::{json, Value};

use super::os_fetch::{self, UpdateRun};
use super::{image_pull, print_json};

/// Where `unitctl os update REF` downloads the payload: on `/var`, not in RAM.
const STAGING: &str = os_update::STAGING;

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
        let paths = HostPaths {
            sys_block: self.sys_block,
            dev: self.dev,
            cmdline: self.cmdline,
            os_release: self.os_release,
            keys: self.keys,
            disk: self.disk,
            esp: self.esp,
        };
        let dir = Path::new("/run/flotilla").join(format!("esp-{}", std::process::id()));
        paths
            .open(&dir, false)
            .context("cannot mount the ESP (or give --esp DIR)")
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
            let source = Source::parse(&source)?;
            // The source step (a reference pulled to /var first, removed after, whatever
            // the outcome), then the one update path (`os_fetch::run_update`). Init's
            // `UpdateOs` runs this very command as its helper (`--no-reboot --json`).
            let registries = registries
                .or_else(|| std::env::var_os(flotilla_registry::REGISTRIES_ENV).map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(flotilla_registry::DEFAULT_REGISTRIES));
            let reporter = image_pull::Reporter::new();
            let mut progress = progress_printer(format!("writing slot {}", running.other()));
            let result = os_fetch::run_update(
                &host,
                UpdateRun {
                    source: &source,
                    registries: &registries,
                    staging: &staging,
                    opts: UpdateOptions {
                        allow_downgrade,
                        tries,
                    },
                    pull_progress: reporter.progress(),
                },
                &mut progress,
            );
            reporter.finish();
            let (r, pulled) = result?;
            if let Some(p) = &pulled {
                eprintln!(
                    "pulled {} {} from {}: {} files ({}) in {:.1}s",
                    p.reference,
                    p.digest,
                    p.registry,
                    p.files,
                    os_update::human_size(p.bytes),
                    p.seconds
                );
            }
            let pulled = pulled.map_or(Value::Null, |p| {
                json!({
                    "reference": p.reference,
                    "digest": p.digest,
                    "registry": p.registry,
                    "bytes": p.bytes,
                })
            });
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
