//! `unitctl`: control the units of one Flotilla machine over the manager's D-Bus socket.
//!
//! Exit status: 0 on success, 1 on any error (one `unitctl: <reason>` line on stderr), 3 when
//! a started unit ended up `failed`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, Subcommand};
use flotilla_container::image;
use flotilla_init::logs::{format_time, Precision};
use flotilla_init::toolbox;
use flotilla_init_api::client::{Client, ClientError};
use flotilla_init_api::{ActiveState, LogEntry, SubState, UnitInfo, DEFAULT_SOCKET, INVALID_UNIT};
use flotilla_units::NetworkMode;
use serde_json::{json, Value};

#[path = "unitctl/image_pull.rs"]
mod image_pull;
#[path = "unitctl/os.rs"]
mod os;
#[path = "unitctl/os_fetch.rs"]
mod os_fetch;

/// Control the units of a Flotilla machine.
#[derive(Debug, Parser)]
#[command(
    name = "unitctl",
    version,
    about = "Control the units of a Flotilla machine through its manager's D-Bus socket"
)]
struct Cli {
    /// The manager's control socket [default: $FLOTILLA_API, else /run/flotilla/manager.sock].
    #[arg(long, global = true, value_name = "PATH")]
    api: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the units (UNIT LOAD ACTIVE SUB PID RESTARTS DESCRIPTION).
    List,
    /// Show a unit's state and its last log lines.
    Status {
        /// Unit name.
        name: String,
    },
    /// Start units and wait until they are running (or finished, for one-shot units).
    Start(ChangeArgs),
    /// Stop units and wait until they are down.
    Stop(ChangeArgs),
    /// Restart units and wait until they are running again.
    Restart(ChangeArgs),
    /// Print a unit's captured output.
    Logs {
        /// Unit name.
        name: String,
        /// How many lines to show.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: u32,
        /// Keep printing new lines as they arrive (until interrupted).
        #[arg(short, long)]
        follow: bool,
    },
    /// Print a unit's file.
    Cat {
        /// Unit name.
        name: String,
    },
    /// Add or replace a unit from a TOML file and print its state.
    Load {
        /// The unit file.
        file: PathBuf,
        /// Unit name [default: the file name without its extension].
        #[arg(long)]
        name: Option<String>,
    },
    /// Stop and forget a unit.
    Remove {
        /// Unit name.
        name: String,
    },
    /// Re-read the unit directories.
    Reload {
        /// Restart running units whose definition changed.
        #[arg(long)]
        restart_changed: bool,
    },
    /// Run a one-off container in the foreground with this terminal (the toolbox); exits
    /// with the command's status. Needs no running manager.
    Run(RunArgs),
    /// Manage the local image store.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The host's A/B update: status, update from a signed payload, rollback (as root; needs
    /// no running manager).
    #[command(subcommand)]
    Os(os::OsCommand),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Image to run (`name`, `name:tag` or `sha256:PREFIX`).
    #[arg(long)]
    image: String,
    /// Bind mount `HOST:CONTAINER[:ro]` (repeatable).
    #[arg(long = "bind", value_name = "HOST:CTR[:ro]")]
    binds: Vec<String>,
    /// Working directory inside the container.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Environment variable `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Run as `user`, `user:group` or `uid[:gid]` [default: the sudo caller, else root].
    #[arg(long)]
    user: Option<String>,
    /// Network: host, none or private.
    #[arg(long, default_value_t = NetworkMode::Host)]
    network: NetworkMode,
    #[command(flatten)]
    stores: StoreArgs,
    /// The command and its arguments [default: the image's entrypoint and cmd].
    #[arg(last = true)]
    command: Vec<String>,
}

/// Where images are looked up.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// Image store (repeatable, searched in order; imports and removals go to the first)
    /// [default: $FLOTILLA_IMAGES (colon-separated), else /var/lib/flotilla/images then
    /// /usr/share/flotilla/images].
    #[arg(long = "store", value_name = "DIR")]
    roots: Vec<PathBuf>,
}

impl StoreArgs {
    /// The store roots: `--store`s, else `$FLOTILLA_IMAGES`, else the defaults; a relative
    /// one is taken from the current directory (overlayfs needs absolute layer paths).
    fn roots(self) -> Vec<PathBuf> {
        self.given()
            .into_iter()
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .collect()
    }

    fn given(self) -> Vec<PathBuf> {
        if !self.roots.is_empty() {
            return self.roots;
        }
        let from_env: Vec<PathBuf> = std::env::var_os("FLOTILLA_IMAGES")
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if !from_env.is_empty() {
            return from_env;
        }
        image::DEFAULT_STORES.iter().map(PathBuf::from).collect()
    }

    /// The opened stores.
    fn open(self) -> Result<image::ImageStores> {
        Ok(image::ImageStores::open(&self.roots())?)
    }
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// List the images of every store (NAME TAG DIGEST SIZE LAYERS CREATED STORE).
    List {
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// Import an OCI image layout (a directory, or a tar of one) or a `docker save` /
    /// `podman save` archive (tar or tar.gz, told apart by content).
    Import {
        /// The layout directory, or the archive.
        path: PathBuf,
        /// `name[:tag]` [default: the layout's ref name annotation, or the archive's
        /// RepoTags].
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// Pull an image from an OCI registry into the writable (first) store and tag it there
    /// under its reference (`HOST[:PORT]/REPO[:TAG]` or `HOST[:PORT]/REPO@sha256:...`).
    Pull {
        /// The registry reference; a short name (`REPO[:TAG]`) needs `default_registry`.
        reference: String,
        /// Registry settings [default: $FLOTILLA_REGISTRIES, else
        /// /etc/flotilla/registries.toml].
        #[arg(long, value_name = "FILE")]
        registries: Option<PathBuf>,
        #[command(flatten)]
        peers: image_pull::PeerArgs,
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// Remove an image from the writable (first) store (its layers go once no image uses
    /// them).
    Rm {
        /// `name`, `name:tag` or `sha256:PREFIX`.
        reference: String,
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// Delete the blobs and layers of the writable store that no image and no running
    /// container uses.
    Prune {
        #[command(flatten)]
        stores: StoreArgs,
    },
}

#[derive(Debug, clap::Args)]
struct ChangeArgs {
    /// Unit names.
    #[arg(required = true)]
    names: Vec<String>,
    /// Return once the request is queued instead of waiting for the units to settle.
    #[arg(long)]
    no_block: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 90.0)]
    timeout: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Start,
    Stop,
    Restart,
}

/// A unit file that does not parse, as the parser located it (`FILE:LINE:COL: MESSAGE`, then
/// `  help: HELP` on its own line).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UnitFileError(Box<flotilla_units::UnitError>);

/// Checks `text` as the manager will when it is loaded as `name` (a template `prefix@`, or a
/// unit), naming `file` in the error.
fn check_unit_file(name: &str, file: &Path, text: &str) -> Result<(), UnitFileError> {
    let checked = match flotilla_units::split_instance(name) {
        Some((prefix, "")) => {
            flotilla_units::Template::new(prefix, Some(file), text.to_string()).map(drop)
        }
        _ => flotilla_units::parse_unit(name, Some(file), text).map(drop),
    };
    checked.map_err(|e| UnitFileError(Box::new(e)))
}

/// Exit status for "the unit failed to start".
const EXIT_FAILED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // `unitctl list | head`: stdout's reader left; not an error. A broken pipe to
            // the manager (it closed the connection) is one.
            if is_broken_pipe(&e) && stdout_closed() {
                return ExitCode::SUCCESS;
            }
            // A unit file's error (found here, or the manager's InvalidUnit) keeps its `help:`
            // on its own line; anything else is one line.
            let reason = match (e.downcast_ref::<UnitFileError>(), e.downcast_ref()) {
                (Some(unit), _) => unit.to_string(),
                (None, Some(ClientError::Manager { name, message })) if name == INVALID_UNIT => {
                    message.clone()
                }
                _ => format!("{e}").replace('\n', " "),
            };
            eprintln!("unitctl: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Whether stdout is a pipe whose reader is gone (poll reports an error on its write end).
fn stdout_closed() -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let stdout = io::stdout();
    let mut fds = [PollFd::new(&stdout, PollFlags::OUT)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok()
        && fds
            .first()
            .is_some_and(|f| f.revents().contains(PollFlags::ERR))
}

fn socket_path(cli: &Cli) -> PathBuf {
    cli.api
        .clone()
        .or_else(|| {
            std::env::var_os("FLOTILLA_API")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// `unitctl run`: the toolbox. Returns the command's exit status.
fn toolbox_run(args: RunArgs) -> Result<u8> {
    let binds = args
        .binds
        .iter()
        .map(|b| toolbox::parse_bind(b).map_err(|e| anyhow!(e)))
        .collect::<Result<Vec<_>>>()?;
    let env = args
        .env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("invalid --env {kv:?}: use KEY=VALUE"))
        })
        .collect::<Result<_>>()?;
    let opts = toolbox::RunOptions {
        image: args.image,
        stores: args.stores.roots(),
        binds,
        workdir: args.workdir,
        env,
        user: args.user,
        network: args.network,
        command: args.command,
    };
    let code = toolbox::run(&opts)?;
    Ok(u8::try_from(code).unwrap_or(u8::MAX))
}

/// `unitctl image ...`: works on the store directly, no manager needed.
fn image_command(cmd: ImageCommand, json: bool, out: &mut impl Write) -> Result<u8> {
    match cmd {
        ImageCommand::List { stores } => {
            let images = stores.open()?.list()?;
            if json {
                print_json(out, &serde_json::to_value(&images)?)?;
            } else {
                writeln!(
                    out,
                    "{:<20} {:<10} {:<19} {:>10} {:>6}  {:<20}  STORE",
                    "NAME", "TAG", "DIGEST", "SIZE", "LAYERS", "CREATED"
                )?;
                for image::StoredImage { info: i, store, .. } in &images {
                    let short: String = i.digest.chars().take(19).collect();
                    writeln!(
                        out,
                        "{:<20} {:<10} {:<19} {:>10} {:>6}  {:<20}  {}",
                        i.name,
                        i.tag,
                        short,
                        human_size(i.size),
                        i.layers,
                        i.created.as_deref().unwrap_or("-"),
                        store.display()
                    )?;
                }
            }
        }
        ImageCommand::Import { path, name, stores } => {
            let stores = stores.open()?;
            let store = stores.writable();
            let mut progress = |ev: image::ImportEvent| {
                if let image::ImportEvent::Layer {
                    index,
                    count,
                    digest,
                    bytes,
                } = ev
                {
                    eprintln!("layer {}/{count} {digest} {}", index + 1, human_size(bytes));
                }
            };
            let info = store.import_oci_layout(&path, name.as_deref(), &mut progress)?;
            if json {
                print_json(out, &serde_json::to_value(&info)?)?;
            } else {
                writeln!(out, "imported {}:{} {}", info.name, info.tag, info.digest)?;
            }
        }
        ImageCommand::Pull {
            reference,
            registries,
            peers,
            stores,
        } => {
            let stores = stores.open()?;
            let peers = peers.settings()?;
            image_pull::pull(stores.writable(), &reference, registries, &peers, json, out)?;
        }
        ImageCommand::Rm { reference, stores } => {
            stores.open()?.remove(&reference)?;
        }
        ImageCommand::Prune { stores } => {
            stores.open()?.writable().prune()?;
        }
    }
    out.flush()?;
    Ok(0)
}

/// `run` and `image` are answered before connecting; reaching the manager with them is a bug.
fn unreachable_local() -> Result<()> {
    bail!("internal error: a local command was sent to the manager")
}

fn human_size(bytes: u64) -> String {
    flotilla_init::os_update::human_size(bytes)
}

fn run(cli: Cli) -> Result<u8> {
    // Commands that need no manager.
    let cli = match cli.command {
        Command::Run(args) => return toolbox_run(args),
        Command::Image(cmd) => return image_command(cmd, cli.json, &mut io::stdout().lock()),
        Command::Os(cmd) => return os::run(cmd, cli.json, &mut io::stdout().lock()),
        _ => cli,
    };
    let socket = socket_path(&cli);
    // Read local input before connecting so that a bad file is reported as such.
    let load_text = match &cli.command {
        Command::Load { file, name } => {
            let text = std::fs::read(file)
                .map_err(|e| anyhow!("cannot read {}: {e}", file.display()))
                // Invalid UTF-8 is reported at its line and column, like any unit error.
                .and_then(|bytes| {
                    flotilla_units::decode_unit_text(&file.display().to_string(), bytes)
                        .map_err(|e| anyhow!(UnitFileError(Box::new(e))))
                })?;
            let name = match name {
                Some(n) => n.clone(),
                None => unit_name_from_file(file)?,
            };
            // Checked here as the manager checks it, so that an error names the user's file
            // (the manager's own check would name its stored copy); the manager checks again.
            check_unit_file(&name, file, &text)?;
            Some(text)
        }
        _ => None,
    };
    let client = Client::connect(&socket)?;
    let json = cli.json;
    let out = &mut io::stdout().lock();
    match cli.command {
        Command::List => {
            let units = client.list_units()?;
            if json {
                let all: Vec<Value> = units.iter().map(unit_json).collect();
                print_json(out, &Value::Array(all))?;
            } else {
                write!(out, "{}", units_table(&units))?;
            }
        }
        Command::Status { name } => {
            let unit = client.get_unit(&name)?;
            if json {
                print_json(out, &unit_json(&unit))?;
            } else {
                let logs = client.logs(&name, 10)?;
                write!(out, "{}", status_text(&unit, &logs))?;
            }
        }
        Command::Start(args) => return change(&client, Change::Start, &args, json, out),
        Command::Stop(args) => return change(&client, Change::Stop, &args, json, out),
        Command::Restart(args) => return change(&client, Change::Restart, &args, json, out),
        Command::Logs {
            name,
            lines,
            follow,
        } => logs(&client, &name, lines, follow, json, out)?,
        Command::Cat { name } => {
            let text = client.cat_unit(&name)?;
            if json {
                print_json(out, &json!({ "name": name, "text": text }))?;
            } else {
                write!(out, "{text}")?;
                if !text.is_empty() && !text.ends_with('\n') {
                    writeln!(out)?;
                }
            }
        }
        Command::Load { file, name } => {
            let name = match name {
                Some(n) => n,
                None => unit_name_from_file(&file)?,
            };
            let text = load_text.unwrap_or_default();
            let unit = client.load_unit(&name, &text)?;
            if json {
                print_json(out, &unit_json(&unit))?;
            } else {
                writeln!(
                    out,
                    "{}: {}, {} ({})",
                    unit.name, unit.load_state, unit.active_state, unit.sub_state
                )?;
            }
        }
        Command::Remove { name } => client.remove_unit(&name)?,
        Command::Run(_) | Command::Image(_) | Command::Os(_) => unreachable_local()?,
        Command::Reload { restart_changed } => {
            let report = client.reload(restart_changed)?;
            if json {
                print_json(out, &serde_json::to_value(&report)?)?;
            } else {
                let mut any = false;
                for (what, names) in [
                    ("added", &report.added),
                    ("changed", &report.changed),
                    ("removed", &report.removed),
                    ("restarted", &report.restarted),
                ] {
                    if !names.is_empty() {
                        any = true;
                        writeln!(out, "{what}: {}", names.join(" "))?;
                    }
                }
                if !any && report.errors.is_empty() {
                    writeln!(out, "nothing changed")?;
                }
            }
            if !report.errors.is_empty() {
                out.flush()?;
                eprintln!(
                    "unitctl: reload: {} unit file(s) could not be loaded (their old definitions stay in force):",
                    report.errors.len()
                );
                for e in &report.errors {
                    eprintln!("  {}", e.replace('\n', "\n  "));
                }
                return Ok(1);
            }
        }
    }
    out.flush()?;
    Ok(0)
}

fn unit_name_from_file(file: &Path) -> Result<String> {
    file.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .with_context(|| {
            format!(
                "cannot derive a unit name from {}; pass --name NAME",
                file.display()
            )
        })
}

fn print_json(out: &mut impl Write, value: &Value) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn unit_json(u: &UnitInfo) -> Value {
    json!({
        "name": u.name,
        "description": u.description,
        "load_state": u.load_state,
        "state": u.active_state,
        "sub_state": u.sub_state,
        "pid": u.main_pid,
        "restarts": u.restarts,
        "exit_code": u.exit_code,
        "exit_signal": u.exit_signal,
        "since_us": u.since_us,
        "since": if u.since_us == 0 { Value::Null } else { Value::String(rfc3339(u.since_us, false)) },
        "result": u.result,
        "message": u.message,
    })
}

fn units_table(units: &[UnitInfo]) -> String {
    let header = [
        "UNIT",
        "LOAD",
        "ACTIVE",
        "SUB",
        "PID",
        "RESTARTS",
        "DESCRIPTION",
    ];
    let rows: Vec<[String; 7]> = units
        .iter()
        .map(|u| {
            [
                u.name.clone(),
                u.load_state.to_string(),
                u.active_state.to_string(),
                u.sub_state.to_string(),
                if u.main_pid == 0 {
                    "-".to_string()
                } else {
                    u.main_pid.to_string()
                },
                u.restarts.to_string(),
                u.description.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        text.push_str(l.trim_end());
        text.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    text.push_str(&format!(
        "\n{} unit{} listed.\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    ));
    text
}

fn status_text(u: &UnitInfo, logs: &[LogEntry]) -> String {
    let mut s = String::new();
    if u.description.is_empty() {
        s.push_str(&format!("● {}\n", u.name));
    } else {
        s.push_str(&format!("● {} - {}\n", u.name, u.description));
    }
    s.push_str(&format!("     Loaded: {}\n", u.load_state));
    let since = if u.since_us == 0 {
        String::new()
    } else {
        format!(" since {}", rfc3339(u.since_us, false))
    };
    s.push_str(&format!(
        "     Active: {} ({}){since}\n",
        u.active_state, u.sub_state
    ));
    if u.main_pid != 0 {
        s.push_str(&format!("   Main PID: {}\n", u.main_pid));
    }
    s.push_str(&format!("   Restarts: {}\n", u.restarts));
    if u.exit_code >= 0 || u.exit_signal != 0 {
        let mut exit = Vec::new();
        if u.exit_code >= 0 {
            exit.push(format!("code={}", u.exit_code));
        }
        if u.exit_signal != 0 {
            exit.push(format!("signal={}", u.exit_signal));
        }
        s.push_str(&format!("  Last exit: {}\n", exit.join(", ")));
    }
    if !u.result.as_str().is_empty() {
        s.push_str(&format!("     Result: {}\n", u.result));
    }
    if !u.message.is_empty() {
        s.push_str(&format!("    Message: {}\n", u.message));
    }
    if !logs.is_empty() {
        s.push('\n');
        for l in logs {
            s.push_str(&log_line(l));
            s.push('\n');
        }
    }
    s
}

fn log_line(l: &LogEntry) -> String {
    format!("{} {} {}", rfc3339(l.time_us, true), l.stream, l.line)
}

fn log_json(l: &LogEntry) -> Value {
    json!({
        "seq": l.seq,
        "time_us": l.time_us,
        "time": rfc3339(l.time_us, true),
        "stream": l.stream,
        "line": l.line,
    })
}

fn print_logs(out: &mut impl Write, entries: &[LogEntry], json: bool) -> io::Result<()> {
    for l in entries {
        if json {
            writeln!(out, "{}", log_json(l))?;
        } else {
            writeln!(out, "{}", log_line(l))?;
        }
    }
    out.flush()
}

fn logs(
    client: &Client,
    name: &str,
    lines: u32,
    follow: bool,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let first = client.logs(name, lines)?;
    print_logs(out, &first, json)?;
    if !follow {
        return Ok(());
    }
    let mut last = first.iter().map(|l| l.seq).max().unwrap_or(0);
    loop {
        thread::sleep(Duration::from_millis(200));
        let more = client.logs_after(name, last, 10_000)?;
        if let Some(max) = more.iter().map(|l| l.seq).max() {
            last = last.max(max);
        }
        // A closed stdout (e.g. `| head`) ends the loop through the error path.
        print_logs(out, &more, json)?;
    }
}

/// Is the unit where `change` wants it?
fn settled(change: Change, u: &UnitInfo) -> bool {
    match change {
        Change::Start | Change::Restart => match u.active_state.known() {
            Some(ActiveState::Active | ActiveState::Failed) => true,
            Some(ActiveState::Inactive) => {
                matches!(u.sub_state.known(), Some(SubState::Exited | SubState::Dead))
            }
            _ => false,
        },
        Change::Stop => matches!(
            u.active_state.known(),
            Some(ActiveState::Inactive | ActiveState::Failed)
        ),
    }
}

fn change(
    client: &Client,
    change: Change,
    args: &ChangeArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<u8> {
    if !args.timeout.is_finite() || args.timeout < 0.0 {
        bail!("--timeout must be a non-negative number of seconds");
    }
    let mut replies = Vec::new();
    for name in &args.names {
        let unit = match change {
            Change::Start => client.start_unit(name),
            Change::Stop => client.stop_unit(name),
            Change::Restart => client.restart_unit(name),
        }?;
        replies.push(unit);
    }
    if args.no_block {
        if json {
            print_json(out, &Value::Array(replies.iter().map(unit_json).collect()))?;
        }
        return Ok(0);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout.min(1e9));
    let mut finals = Vec::new();
    let mut code = 0;
    for (name, reply) in args.names.iter().zip(replies) {
        let unit = wait(client, change, name, reply, deadline, args.timeout)?;
        if change != Change::Stop && unit.active_state == ActiveState::Failed {
            let mut why = unit.result.to_string();
            if !unit.message.is_empty() {
                why = format!("{why}: {}", unit.message);
            }
            eprintln!("unitctl: {name} failed: {why}");
            code = EXIT_FAILED;
        }
        finals.push(unit);
    }
    if json {
        print_json(out, &Value::Array(finals.iter().map(unit_json).collect()))?;
    }
    Ok(code)
}

fn wait(
    client: &Client,
    change: Change,
    name: &str,
    mut unit: UnitInfo,
    deadline: Instant,
    timeout: f64,
) -> Result<UnitInfo> {
    loop {
        if settled(change, &unit) {
            return Ok(unit);
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout} s waiting for {name} (now {} ({})); it may still settle: see `unitctl status {name}`",
                unit.active_state,
                unit.sub_state
            );
        }
        thread::sleep(Duration::from_millis(50));
        unit = client.get_unit(name)?;
    }
}

/// Format microseconds since the epoch as RFC 3339 UTC, with or without milliseconds.
fn rfc3339(us: u64, millis: bool) -> String {
    let precision = if millis {
        Precision::Millis
    } else {
        Precision::Seconds
    };
    format_time(us, precision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_init_api::Wire;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0, true), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_456, true),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(rfc3339(951_782_400_000_000, false), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339(4_107_542_399_999_999, true),
            "2100-02-28T23:59:59.999Z"
        );
    }

    #[test]
    fn settle_rules() {
        let mut u = UnitInfo {
            active_state: ActiveState::Activating.into(),
            sub_state: SubState::Start.into(),
            ..UnitInfo::loaded("x")
        };
        assert!(!settled(Change::Start, &u));
        assert!(!settled(Change::Stop, &u));
        u.active_state = ActiveState::Inactive.into();
        u.sub_state = SubState::Exited.into();
        assert!(settled(Change::Start, &u));
        assert!(settled(Change::Stop, &u));
        u.active_state = ActiveState::Deactivating.into();
        u.sub_state = SubState::StopSigterm.into();
        assert!(!settled(Change::Stop, &u));
        assert!(!settled(Change::Restart, &u));
        u.active_state = ActiveState::Active.into();
        assert!(settled(Change::Restart, &u));
        assert!(!settled(Change::Stop, &u));
        // A state from a newer manager is not taken as settled (the wait goes on, bounded
        // by --timeout), and does not fail the call.
        u.active_state = Wire::Unknown("reloading".into());
        assert!(!settled(Change::Start, &u));
        assert!(!settled(Change::Stop, &u));
    }
}
