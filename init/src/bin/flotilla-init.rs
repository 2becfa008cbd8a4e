//! `flotilla-init`: the unit manager. As PID 1 it also sets the machine up first (API
//! filesystems, kernel modules) and takes it down last (SIGTERM/SIGINT reboot, SIGUSR2
//! powers off); as any other process it is a supervisor: a child subreaper that only
//! manages units, and exits 0 once they are stopped.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use flotilla_init::api::{self, dbus};
use flotilla_init::boot::{self, Action};
use flotilla_init::event_loop::{self, Exit};
use flotilla_init::launcher::{ContainerLauncher, HostLauncher, Launcher};
use flotilla_init::logs::LogConfig;
use flotilla_init::manager::{Config, HelperPuller, Manager};
use flotilla_init::os_update::{HostPaths, OsConfig, OsUpdater};
use flotilla_init::scope::ScopeRoot;
use nix::sys::signal::Signal;

/// Flotilla's init and unit manager.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Unit directory (repeatable; a later one overrides an earlier one).
    #[arg(
        long = "units",
        value_name = "DIR",
        default_value = "/etc/flotilla/units"
    )]
    units: Vec<PathBuf>,
    /// State directory: logs and units loaded over the API.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/flotilla")]
    state: PathBuf,
    /// Control socket (peer-to-peer D-Bus).
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    api: PathBuf,
    /// Image store that units' `image` keys are resolved in (repeatable, searched in order;
    /// the first is the writable one, a later one that does not exist is skipped).
    #[arg(
        long,
        value_name = "DIR",
        default_values = flotilla_container::image::DEFAULT_STORES
    )]
    images: Vec<PathBuf>,
    /// Name of the cgroup created below this process's cgroup for the units.
    #[arg(long, value_name = "NAME")]
    cgroup: Option<String>,
    /// Rotate a unit's log file beyond this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    log_max_size: u64,
    /// Rotated log files kept per unit.
    #[arg(long, value_name = "N", default_value_t = 3)]
    log_keep: u32,
    /// Log lines kept in memory per unit.
    #[arg(long, value_name = "N", default_value_t = 200)]
    log_tail: usize,
    /// How units run: `container` (own namespaces and cgroup; the default) or `host` (plain
    /// processes in their own cgroup, for hosts without namespaces and for comparisons).
    #[arg(long, value_enum, default_value = "container")]
    launcher: LauncherKind,
    /// Kernel modules PID 1 loads, one `.ko` path per line, dependencies first.
    #[arg(long, value_name = "PATH", default_value = "/etc/flotilla/modules")]
    modules: PathBuf,
    /// Load and serve the units but start none of them.
    #[arg(long)]
    no_start: bool,
    /// A control socket of another server (fleetd's) that units without `[container]
    /// control_api = true` must not reach: the manager refuses to start such a unit if a
    /// bind mount exposes the socket or a directory above it. Repeat for more; giving one
    /// replaces the default.
    #[arg(
        long = "control-socket",
        value_name = "PATH",
        default_value = "/run/flotilla/fleetd.sock"
    )]
    control_sockets: Vec<PathBuf>,
    /// A host file or directory (a secret) to hide from units that run over the host's root
    /// without `control_api = true`. Repeat for more; giving one replaces the defaults
    /// (fleetd's token and TLS key, the provisioning record). The state directory's `logs`,
    /// `units` and `containers` are always hidden.
    #[arg(
        long = "secret-path",
        value_name = "PATH",
        default_values = [
            flotilla_init::provision::FLEETD_TOKEN,
            flotilla_init::provision::FLEETD_KEY,
            "/var/lib/flotilla/provision.toml",
        ]
    )]
    secret_paths: Vec<PathBuf>,
    /// How long a shutdown may take (`90s`, `500ms`, `2m`, or seconds): then every unit's
    /// processes are killed and the shutdown goes on. As PID 1 the kernel command line's
    /// `flotilla.shutdown_timeout=` overrides it.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = duration)]
    shutdown_timeout: Duration,
    /// How long a container's setup (namespaces, mounts, exec) may take before its
    /// processes are killed and the unit fails: a hung mount must not hang the manager.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    setup_timeout: Duration,
    /// The program that pulls a unit's registry image before its start (run as `PATH image
    /// pull REF --store DIR --registries FILE`); default: the `unitctl` next to this
    /// executable, else /usr/bin/unitctl. PID 1 links no registry client: pulls run in this
    /// helper, and so does `UpdateOs` (`PATH os update SOURCE --no-reboot --json ...`).
    #[arg(long, value_name = "PATH")]
    pull_helper: Option<PathBuf>,
    /// Registry settings handed to the pull helper.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/flotilla/registries.toml"
    )]
    registries: PathBuf,
    /// A mounted ESP for `GetOsStatus`/`UpdateOs` [default: the slots' disk's `flotilla-esp`
    /// partition, mounted on /run/flotilla/esp-os for the moment].
    #[arg(long, value_name = "DIR", hide = true)]
    os_esp: Option<PathBuf>,
    /// The disk holding the slots, by kernel name [default: the running slot's].
    #[arg(long, value_name = "NAME", hide = true)]
    os_disk: Option<String>,
    #[arg(long, hide = true, default_value = "/sys/class/block")]
    os_sys_block: PathBuf,
    #[arg(long, hide = true, default_value = "/dev")]
    os_dev: PathBuf,
    #[arg(long, hide = true, default_value = "/proc/cmdline")]
    os_cmdline: PathBuf,
    #[arg(long, hide = true, default_value = "/usr/lib/os-release")]
    os_release: PathBuf,
    #[arg(long, hide = true, default_value = flotilla_osupdate::payload::TRUSTED_KEYS_DIR)]
    os_keys: PathBuf,
    /// Where `UpdateOs` downloads a registry reference.
    #[arg(long, hide = true, default_value = flotilla_init::os_update::STAGING)]
    os_staging: PathBuf,
}

/// The OS updater of `GetOsStatus`/`UpdateOs`; once an update is installed it asks for
/// the orderly reboot the way Ctrl-Alt-Del does: SIGINT to this process (as PID 1 a
/// reboot; as a supervisor, the units stopped and an exit).
fn os_updater(args: &Args) -> OsUpdater {
    let config = OsConfig {
        paths: HostPaths {
            sys_block: args.os_sys_block.clone(),
            dev: args.os_dev.clone(),
            cmdline: args.os_cmdline.clone(),
            os_release: args.os_release.clone(),
            keys: args.os_keys.clone(),
            disk: args.os_disk.clone(),
            esp: args.os_esp.clone(),
        },
        registries: Some(args.registries.clone()),
        staging: args.os_staging.clone(),
        esp_mount: PathBuf::from(flotilla_init::os_update::INIT_ESP_MOUNT),
        // The update runs in the pull helper (`unitctl os update`): PID 1 links no registry
        // client.
        helpers: helpers(args),
    };
    OsUpdater::new(
        config,
        Box::new(|| {
            if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGINT) {
                log::error!("cannot ask for the reboot after the OS update (SIGINT to self): {e}; reboot the host yourself");
            }
        }),
    )
}

/// The helper that pulls images and runs OS updates: `--pull-helper`, else the defaults.
fn helpers(args: &Args) -> Vec<PathBuf> {
    match &args.pull_helper {
        Some(h) => vec![h.clone()],
        None => HelperPuller::default_helpers(),
    }
}

/// What units over the host's root must not read: the given secrets, and the state
/// directory's other units' logs, API-loaded unit files (their environment) and container
/// state.
fn secrets(state: &Path, given: &[PathBuf]) -> Vec<PathBuf> {
    let state = std::path::absolute(state).unwrap_or_else(|_| state.to_path_buf());
    let mut paths = given.to_vec();
    paths.extend(["logs", "units", "containers"].map(|d| state.join(d)));
    paths
}

/// A duration as unit files write it.
fn duration(text: &str) -> Result<Duration, String> {
    flotilla_units::parse_duration(text)
}

/// Which [`flotilla_init::launcher::Launcher`] to use.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LauncherKind {
    /// Every unit in a container.
    Container,
    /// Plain host processes.
    Host,
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            log::warn!("cannot raise the open-file limit to {hard}: {e}");
        }
    }
}

/// The shutdown deadline: the flag's, or as PID 1 `flotilla.shutdown_timeout=` from the
/// kernel command line.
fn shutdown_timeout(flag: Duration, pid1: bool) -> Duration {
    if pid1 {
        boot::cmdline::Cmdline::read().duration_or("shutdown_timeout", flag)
    } else {
        flag
    }
}

fn run(args: Args, pid1: bool, started: Instant) -> anyhow::Result<Signal> {
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    raise_fd_limit();
    let os = os_updater(&args);
    let helpers = helpers(&args);

    let cgroup = args.cgroup.unwrap_or_else(|| {
        if pid1 {
            "flotilla".to_string()
        } else {
            format!("flotilla-{}", std::process::id())
        }
    });
    let (scopes, degraded) = if pid1 {
        // PID 1 owns the whole hierarchy; a failure leaves it with process groups.
        ScopeRoot::create_with(&cgroup, true)
    } else {
        // A supervisor whose cgroup is not delegated to it stops here, saying how to fix it.
        ScopeRoot::create(&cgroup).context("setting up the units' cgroups")?
    };
    if pid1 {
        // Only leaves hold processes: PID 1 goes to its own, next to the units' cgroup.
        match flotilla_init::scope::move_self_to_leaf("init.scope") {
            Ok(leaf) => log::info!("PID 1 moved to cgroup {}", leaf.display()),
            Err(e) => log::warn!("PID 1 stays in the root cgroup: {e}"),
        }
    }
    if let Some(why) = degraded {
        log::warn!(
            "{why}: units are tracked by process group; a daemon that calls setsid escapes stop"
        );
    }
    let cfg = Config {
        unit_dirs: args.units,
        api_units_dir: Some(args.state.join("units")),
        logs: LogConfig {
            dir: Some(args.state.join("logs")),
            max_file_size: args.log_max_size,
            keep_files: args.log_keep,
            tail_lines: args.log_tail,
        },
        shutdown_timeout: shutdown_timeout(args.shutdown_timeout, pid1),
    };
    let (handle, queue) = api::channel().context("creating the API queue")?;
    let (events_tx, events_rx) = mpsc::channel();
    let launcher: Box<dyn Launcher> = match args.launcher {
        LauncherKind::Container => Box::new(
            ContainerLauncher::new(&args.images, &args.state.join("containers"))
                .with_setup_timeout(args.setup_timeout)
                .with_secrets(secrets(&args.state, &args.secret_paths)),
        ),
        LauncherKind::Host => Box::new(HostLauncher),
    };
    let mut manager = Manager::new(cfg, launcher, scopes, Some(events_tx));
    manager.protect_control_sockets(&args.control_sockets);
    // The OS update helper's exit is reaped by the event loop and handed to its job.
    manager.set_exit_watch(os.exit_watch());
    if matches!(args.launcher, LauncherKind::Container) {
        // A missing helper fails the pulling unit with a message that says so.
        let puller = HelperPuller::new(&helpers, &args.images, Some(&args.registries));
        manager.set_puller(Box::new(puller));
    }
    let server = dbus::serve_with_os(
        &args.api,
        handle,
        events_rx,
        manager.unit_cgroups(),
        Some(os),
    )
    .with_context(|| format!("serving the control API on {}", args.api.display()))?;
    log::info!(
        "managing {} units; control socket {}",
        manager.len(),
        server.socket().display()
    );
    if !args.no_start {
        manager.start_all();
    }
    let marker = pid1.then_some(started);
    let trial = if pid1 { trial_watch(started) } else { None };
    let result = event_loop::run_with(&mut manager, Some(&queue), marker, trial);
    manager.cleanup();
    drop(server);
    let Exit::Shutdown(signal) = result.context("event loop")?;
    if manager.shutdown_forced() {
        log::warn!("shutdown deadline passed: the units still running were killed");
    } else {
        log::info!("all units stopped");
    }
    Ok(signal)
}

/// PID 1 booted from a slot: says whether an update was rolled back, and returns the trial
/// of the running slot when its entry is on trial. Failures are logged (no trial).
fn trial_watch(started: Instant) -> Option<event_loop::TrialWatch> {
    use flotilla_init::trial::{self, Trial, TrialPolicy};
    let found = match trial::at_boot() {
        Ok(Some(found)) => found,
        Ok(None) => return None,
        Err(e) => {
            log::error!("cannot read the boot entries: {e}; the booted slot is not judged");
            return None;
        }
    };
    if let Some(version) = &found.rolled_back {
        log::warn!(
            "flotilla: update to {version} in slot {} was rolled back (its boot entry is \
             bad; `unitctl os status` shows it)",
            found.slot.other()
        );
    }
    if !found.on_trial {
        return None;
    }
    let policy = TrialPolicy::load(std::path::Path::new(trial::SETTINGS)).unwrap_or_else(|e| {
        log::error!("{e}");
        TrialPolicy::default()
    });
    log::info!(
        "flotilla: slot {} is on trial: committed once every unit is healthy for {}, \
         else a reboot {} after the boot",
        found.slot,
        humantime::format_duration(policy.commit_after),
        humantime::format_duration(policy.commit_deadline)
    );
    Some(event_loop::TrialWatch {
        trial: Trial::new(policy, started),
        commit: Box::new(|| {
            trial::commit_running()
                .map(|slot| format!("slot {slot}"))
                .map_err(|e| e.to_string())
        }),
    })
}

fn main() -> ExitCode {
    let started = Instant::now();
    // Before any thread exists: signals are read from a signalfd, never delivered.
    if let Err(e) = event_loop::block_signals() {
        eprintln!("flotilla-init: {e}");
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,zbus=warn"))
        .format_target(false)
        .format_timestamp_millis()
        .init();
    let pid1 = std::process::id() == 1;
    if pid1 {
        // The kernel names PID 1 after the initramfs's `/init` ("init"); `unitctl os update`
        // and `rollback` ask PID 1 to reboot only when /proc/1/comm says flotilla-init.
        if let Err(e) = nix::sys::prctl::set_name(c"flotilla-init") {
            log::warn!("cannot name PID 1 flotilla-init: {e}");
        }
    }
    // Units must not read the manager's memory (other units' environment and output).
    if let Err(e) = flotilla_container::runtime::make_non_dumpable() {
        log::warn!("{e}");
    }
    // PID 1 must not exit on a bad argument (the kernel passes unknown command-line words
    // on to init): fall back to the defaults instead.
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if pid1 => {
            log::warn!("ignoring the arguments: {e}");
            Args::parse_from(["flotilla-init"])
        }
        Err(e) => e.exit(),
    };
    if pid1 {
        // CLOCK_BOOTTIME counts from the kernel's start: the kernel's share of the boot.
        let kernel = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        log::info!(
            "flotilla-init {} as PID 1, {} ms after the kernel started",
            env!("CARGO_PKG_VERSION"),
            kernel.tv_sec * 1000 + kernel.tv_nsec / 1_000_000
        );
        if let Err(e) = boot::setup(&args.modules) {
            boot::emergency(&e);
        }
    }
    // A panic must not take PID 1 down with it: catch it and shut down in order.
    let signal = boot::shutdown::contain(|| run(args, pid1, started));
    if pid1 {
        boot::finish(signal.map_or(Action::Reboot, Action::for_signal));
    }
    match signal {
        Some(_) => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}
