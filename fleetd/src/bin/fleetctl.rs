//! `fleetctl`: fleet's command line over fleetd's HTTP/JSON API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use flotilla_fleetd::api::{self, ApiClient, ClientError, PutUnit, UnitView};
use flotilla_fleetd::{DesiredState, Machine, RolloutState};
use flotilla_init_api::{ActiveState, Wire};

/// fleetctl: submit units to the cluster and see where and how they run.
#[derive(Debug, Parser)]
#[command(name = "fleetctl", version)]
struct Cli {
    /// The fleetd API: a Unix socket path, https://HOST:PORT (mutual TLS: --ca, --cert,
    /// --key) or http://HOST:PORT (a fleetd run with --insecure: --token-file) [default:
    /// $FLEETCTL_ENDPOINT, else /run/flotilla/fleetd.sock].
    #[arg(long, value_name = "PATH|URL", global = true)]
    endpoint: Option<String>,
    /// The cluster CA (PEM) the https:// endpoint's certificate must chain to [default:
    /// $FLEETCTL_CA].
    #[arg(long, value_name = "PATH", global = true)]
    ca: Option<PathBuf>,
    /// Your client certificate (PEM, issued by the cluster CA; OU=operator may change
    /// units, OU=reader may read) [default: $FLEETCTL_CERT].
    #[arg(long, value_name = "PATH", global = true)]
    cert: Option<PathBuf>,
    /// The key of --cert (PEM) [default: $FLEETCTL_KEY].
    #[arg(long, value_name = "PATH", global = true)]
    key: Option<PathBuf>,
    /// A file whose first line is the bearer token (for an http:// endpoint).
    #[arg(long, value_name = "PATH", global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Clone, ClapArgs)]
struct Block {
    /// Return at once instead of waiting for the state to be reached.
    #[arg(long)]
    no_block: bool,
    /// Give up waiting after this long (e.g. 30s, 2m); 0 waits forever, as fleet does.
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = humantime::parse_duration)]
    block_timeout: Duration,
}

/// Pinning a unit file's registry image to its digest at submit.
#[derive(Debug, Clone, ClapArgs)]
struct Pin {
    /// Submit registry images by tag as written: each machine resolves the tag when it
    /// pulls, so machines may run different bytes after the tag moves.
    #[arg(long)]
    no_pin: bool,
    /// The registry settings used to resolve tags (credentials, CAs, insecure, mirrors)
    /// [default: $FLOTILLA_REGISTRIES, else /etc/flotilla/registries.toml].
    #[arg(long, value_name = "FILE")]
    registries: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Submit unit files to the cluster (desired state `inactive`). A registry image named
    /// by tag is pinned to its digest first (see --no-pin).
    Submit {
        /// Replace the body of units that exist with a different one.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        pin: Pin,
        /// Unit files (the unit is named after the file stem) or submitted unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// Schedule units to machines and load them there, not started.
    Load {
        /// Replace the body of units that exist with a different one.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        pin: Pin,
        #[command(flatten)]
        block: Block,
        /// Unit files or submitted unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// Schedule units and start them (blocks until active).
    Start {
        /// Replace the body of units that exist with a different one.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        pin: Pin,
        #[command(flatten)]
        block: Block,
        /// Unit files or submitted unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// Stop units (they stay loaded on their machines).
    Stop {
        #[command(flatten)]
        block: Block,
        /// Unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// Unload units from their machines (they stay submitted).
    Unload {
        #[command(flatten)]
        block: Block,
        /// Unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// Remove units from the cluster (stopped and unloaded everywhere).
    Destroy {
        /// Unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// Stop units, then start them again.
    Restart {
        #[command(flatten)]
        block: Block,
        /// Unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// The units and their state on their machines (UNIT MACHINE ACTIVE SUB).
    ListUnits {
        /// JSON: name, machine, desired, state, sub, hash, reason, states (and image).
        #[arg(long)]
        json: bool,
        /// Do not shorten machine ids (and pinned digests).
        #[arg(long)]
        full: bool,
        /// Add an IMAGE column: each unit's image, with its pinned digest (one more request
        /// per unit, for its body).
        #[arg(long)]
        image: bool,
    },
    /// The submitted units (UNIT HASH DSTATE STATE TARGET).
    ListUnitFiles {
        /// JSON: name, hash, desired, state, machine.
        #[arg(long)]
        json: bool,
        /// Do not shorten hashes and machine ids.
        #[arg(long)]
        full: bool,
    },
    /// The machines of the cluster (MACHINE IP VERSION UPDATE METADATA).
    ListMachines {
        /// JSON: id, address, metadata (plus api, images, os_version, os).
        #[arg(long)]
        json: bool,
        /// Do not shorten machine ids.
        #[arg(long)]
        full: bool,
    },
    /// A unit's desired state, machine, state, and why it cannot be placed.
    Status {
        /// Unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// A unit's output, from the init of the machine it runs on (relayed by this fleetd
    /// when that is another machine).
    Journal {
        /// Keep printing new lines as they come.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many of the last lines to print.
        #[arg(short = 'n', long, default_value_t = api::DEFAULT_JOURNAL_LINES)]
        lines: u32,
        /// For a global unit: the machine (id or id prefix) whose copy to show.
        #[arg(long, value_name = "ID")]
        machine: Option<String>,
        /// The unit name.
        unit: String,
    },
    /// Print a unit's file.
    Cat {
        /// The unit name.
        unit: String,
    },
    /// The machines' host OS: versions, A/B update states, reboot lock.
    Os {
        #[command(subcommand)]
        verb: OsVerb,
    },
}

#[derive(Debug, Subcommand)]
enum OsVerb {
    /// Each machine's OS version and update state (booted and next slot, each slot's
    /// version and state), which machines hold the reboot lock, and the rollout.
    Status {
        /// JSON: machines (id, address, os_version, update, os, reboot_lock), reboot_lock
        /// (the holders: machine, lease, since) and rollout (null, or reference, version,
        /// max_unavailable, state, halted, machines: id, step, reason).
        #[arg(long)]
        json: bool,
        /// Do not shorten machine ids.
        #[arg(long)]
        full: bool,
    },
    /// Roll a signed OS update through the cluster: the leader takes the machines present
    /// now, in id order, N at a time: moves each one's units away, has it update and
    /// reboot, and waits until it is back on the new version and committed. It halts at
    /// the first machine that comes back on the old version or does not come back.
    Update {
        /// The update payload: a registry reference `HOST[:PORT]/REPO[:TAG]` (or
        /// `...@sha256:<hex>`) of the OCI image, or a payload directory that exists at the
        /// same path on every machine. An existing local path is a directory.
        #[arg(value_name = "REF|DIR")]
        reference: String,
        /// How many machines may be unavailable (draining, updating, rebooting, down) at once.
        #[arg(long, value_name = "N", default_value_t = 1)]
        max_unavailable: u32,
        /// The version the machines reach [default: the `version` of the payload's
        /// manifest.json, read from the directory or pulled (that one file) from the registry].
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Follow the rollout, one line per step change; exit non-zero if it halts.
        #[arg(long)]
        wait: bool,
        /// Registry settings for pulling the payload's manifest (credentials, mirrors, CA,
        /// insecure) [default: $FLOTILLA_REGISTRIES, else /etc/flotilla/registries.toml].
        #[arg(long, value_name = "FILE")]
        registries: Option<PathBuf>,
    },
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            std::process::exit(1);
        }
        Err(e) => {
            let _ = e.print();
            return;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetctl: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("fleetctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let endpoint = cli
        .endpoint
        .or_else(|| std::env::var("FLEETCTL_ENDPOINT").ok())
        .unwrap_or_else(|| api::DEFAULT_SOCKET.to_string());
    let mut client = ApiClient::new(&endpoint)?;
    if let Some(path) = &cli.token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        client = client.with_token(text.lines().next().unwrap_or_default().trim());
    }
    let from_env = |flag: Option<PathBuf>, var: &str| {
        flag.or_else(|| std::env::var_os(var).map(PathBuf::from))
    };
    let ca = from_env(cli.ca, "FLEETCTL_CA");
    let (cert, key) = (
        from_env(cli.cert, "FLEETCTL_CERT"),
        from_env(cli.key, "FLEETCTL_KEY"),
    );
    match (ca, matches!(client.endpoint(), api::client::Endpoint::Tls(_))) {
        (Some(ca), true) => {
            let files = flotilla_fleetd::tls::TlsFiles { ca, cert, key };
            client = client.with_tls(flotilla_fleetd::tls::client_config(&files)?);
        }
        (None, true) => bail!(
            "the endpoint {endpoint} is TLS: give the cluster CA (--ca FILE or FLEETCTL_CA) and your certificate and key (--cert, --key or FLEETCTL_CERT, FLEETCTL_KEY)"
        ),
        // The TLS settings (perhaps from the environment) do not apply to a socket or http://.
        (_, false) => {}
    }
    let ctl = Ctl { client };
    match cli.verb {
        Verb::Submit {
            replace,
            pin,
            units,
        } => {
            let units = ctl.pin(&units, &pin, replace).await?;
            ctl.change(&units, replace, None, None).await
        }
        Verb::Load {
            replace,
            pin,
            block,
            units,
        } => {
            let units = ctl.pin(&units, &pin, replace).await?;
            ctl.change(&units, replace, Some(DesiredState::Loaded), Some(&block))
                .await
        }
        Verb::Start {
            replace,
            pin,
            block,
            units,
        } => {
            let units = ctl.pin(&units, &pin, replace).await?;
            ctl.change(&units, replace, Some(DesiredState::Launched), Some(&block))
                .await
        }
        Verb::Stop { block, units } => {
            ctl.change(
                &name_args(&units),
                false,
                Some(DesiredState::Loaded),
                Some(&block),
            )
            .await
        }
        Verb::Unload { block, units } => {
            ctl.change(
                &name_args(&units),
                false,
                Some(DesiredState::Inactive),
                Some(&block),
            )
            .await
        }
        Verb::Destroy { units } => ctl.destroy(&names(&units)?).await,
        Verb::Restart { block, units } => ctl.restart(&names(&units)?, &block).await,
        Verb::ListUnits { json, full, image } => ctl.list_units(json, full, image).await,
        Verb::ListUnitFiles { json, full } => ctl.list_unit_files(json, full).await,
        Verb::ListMachines { json, full } => ctl.list_machines(json, full).await,
        Verb::Status { units } => ctl.status(&names(&units)?).await,
        Verb::Journal {
            follow,
            lines,
            machine,
            unit,
        } => {
            ctl.journal(&unit_name(&unit), lines, machine.as_deref(), follow)
                .await
        }
        Verb::Os {
            verb: OsVerb::Status { json, full },
        } => ctl.os_status(json, full).await,
        Verb::Os {
            verb:
                OsVerb::Update {
                    reference,
                    max_unavailable,
                    version,
                    wait,
                    registries,
                },
        } => {
            ctl.os_update(&reference, max_unavailable, version, wait, registries)
                .await
        }
        Verb::Cat { unit } => {
            let detail = ctl.get(&unit_name(&unit)).await?;
            print!("{}", detail.body);
            if !detail.body.ends_with('\n') {
                println!();
            }
            Ok(())
        }
    }
}

/// `hello.toml` or `dir/hello.toml` → `hello`; names stay as they are.
fn unit_name(arg: &str) -> String {
    if arg.ends_with(".toml") || arg.contains('/') {
        Path::new(arg)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| arg.to_string())
    } else {
        arg.to_string()
    }
}

fn names(args: &[String]) -> Result<Vec<String>> {
    Ok(args.iter().map(|a| unit_name(a)).collect())
}

/// Unit names as [`UnitArg::Name`]s (stop, unload: never a body).
fn name_args(args: &[String]) -> Vec<UnitArg> {
    args.iter().map(|a| UnitArg::Name(unit_name(a))).collect()
}

/// A unit argument: a file to submit, or the name of a submitted unit.
enum UnitArg {
    /// A unit file: its name, its body, its registry image if it names one.
    File {
        name: String,
        body: String,
        image: Option<String>,
    },
    Name(String),
}

/// The registry settings (`--registries`, else `$FLOTILLA_REGISTRIES`, else
/// `/etc/flotilla/registries.toml`: the same file and loader as `unitctl image pull`).
fn registry_settings(flag: Option<PathBuf>) -> Result<(flotilla_registry::Registries, PathBuf)> {
    let path = flag
        .or_else(|| std::env::var_os(flotilla_registry::REGISTRIES_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(flotilla_registry::DEFAULT_REGISTRIES));
    let settings = flotilla_registry::Registries::load(&path)?;
    Ok((settings, path))
}

/// The `[container] image` of a unit body, when it parses, and whether it names a registry.
fn unit_image(name: &str, body: &str) -> Option<(String, bool)> {
    let unit = flotilla_units::parse_unit(name, None, body).ok()?;
    let registry = unit.container.registry_image().is_some();
    Some((unit.container.image?, registry))
}

/// Reads and checks a unit argument; a file with an error fails with its `file:line:col`.
fn unit_arg(arg: &str) -> Result<UnitArg> {
    let path = Path::new(arg);
    let is_file = path.is_file() || arg.ends_with(".toml") || arg.contains('/');
    if !is_file {
        return Ok(UnitArg::Name(arg.to_string()));
    }
    let body =
        std::fs::read_to_string(path).with_context(|| format!("cannot read unit file {arg}"))?;
    let name = unit_name(arg);
    let unit = flotilla_units::parse_unit(&name, Some(path), &body).map_err(|e| anyhow!("{e}"))?;
    let image = unit.container.registry_image().map(str::to_string);
    Ok(UnitArg::File { name, body, image })
}

/// The target a blocking verb waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Inactive,
    Loaded,
    Launched,
}

struct Ctl {
    client: ApiClient,
}

fn unknown(e: ClientError, name: &str) -> anyhow::Error {
    if e.is_not_found() {
        anyhow!("unknown unit {name:?}: it is not in the cluster (fleetctl list-unit-files)")
    } else {
        anyhow::Error::from(e)
    }
}

impl Ctl {
    async fn get(&self, name: &str) -> Result<api::UnitDetail> {
        self.client
            .get_unit(name)
            .await
            .map_err(|e| unknown(e, name))
    }

    /// Reads and checks every unit argument, then pins the registry image of each file to
    /// its digest (unless `--no-pin`): all before anything is submitted, so a file with an
    /// error or a tag that does not resolve changes nothing.
    async fn pin(&self, args: &[String], pin: &Pin, replace: bool) -> Result<Vec<UnitArg>> {
        let mut parsed = Vec::new();
        for arg in args {
            parsed.push(unit_arg(arg)?);
        }
        if pin.no_pin {
            return Ok(parsed);
        }
        let mut settings = None;
        let mut resolved: BTreeMap<String, String> = BTreeMap::new();
        for unit in &mut parsed {
            let UnitArg::File { name, body, image } = unit else {
                continue;
            };
            let Some(img) = image.clone().filter(|i| flotilla_units::wants_pin(i)) else {
                continue;
            };
            // The unit is in the cluster with this very file pinned: keep its digest (the
            // tag may have moved since); --replace resolves the tag again.
            if !replace {
                if let Ok(d) = self.client.get_unit(name).await {
                    let kept = unit_image(name, &d.body)
                        .and_then(|(i, _)| flotilla_units::pinned_digest(&i).map(str::to_string))
                        .filter(|digest| {
                            flotilla_units::pin_image(body, digest).ok().as_ref() == Some(&d.body)
                        });
                    if let Some(digest) = kept {
                        println!("Unit {name} keeps its image {img} pinned to {digest}");
                        *body = d.body;
                        continue;
                    }
                }
            }
            let digest = match resolved.get(&img) {
                Some(d) => d.clone(),
                None => {
                    if settings.is_none() {
                        settings = Some(registry_settings(pin.registries.clone())?);
                    }
                    let Some((settings, path)) = &settings else {
                        bail!("no registry settings");
                    };
                    let d = flotilla_registry::resolve_digest(&img, settings, path)
                        .await
                        .map_err(|e| {
                            anyhow!(
                                "cannot pin the image of unit {name}: {e}; nothing was submitted (--no-pin submits the tag as written)"
                            )
                        })?;
                    resolved.insert(img.clone(), d.clone());
                    d
                }
            };
            *body = flotilla_units::pin_image(body, &digest)
                .map_err(|e| anyhow!("cannot pin the image of unit {name}: {e}"))?;
            println!("Unit {name} image {img} pinned to {digest}");
        }
        Ok(parsed)
    }

    /// submit / load / start / stop / unload: puts each unit (with its body when given a
    /// file), then waits for the target unless told not to.
    async fn change(
        &self,
        parsed: &[UnitArg],
        replace: bool,
        desired: Option<DesiredState>,
        block: Option<&Block>,
    ) -> Result<()> {
        let mut names = Vec::new();
        for unit in parsed {
            let (name, body) = match unit {
                UnitArg::File { name, body, .. } => (name.clone(), Some(body.clone())),
                UnitArg::Name(name) => (name.clone(), None),
            };
            if desired.is_none() && body.is_none() {
                // submit NAME: only check that it is there.
                self.get(&name).await?;
                continue;
            }
            let req = PutUnit {
                desired,
                body,
                replace,
            };
            let changed = self
                .client
                .put_unit(&name, &req)
                .await
                .map_err(|e| unknown(e, &name))?;
            if changed.result == "created" || changed.result == "replaced" {
                println!("Unit {name} {}", changed.result);
            }
            names.push(name);
        }
        let (Some(desired), Some(block)) = (desired, block) else {
            return Ok(());
        };
        let target = match desired {
            DesiredState::Inactive => Target::Inactive,
            DesiredState::Loaded => Target::Loaded,
            DesiredState::Launched => Target::Launched,
        };
        if block.no_block {
            for name in &names {
                println!("Triggered unit {name} {desired}");
            }
            return Ok(());
        }
        self.wait(&names, target, block.block_timeout).await
    }

    /// Waits until every unit reaches `target`; fails on a timeout (with why) or a failed unit.
    async fn wait(&self, names: &[String], target: Target, timeout: Duration) -> Result<()> {
        let started = tokio::time::Instant::now();
        let mut pending: Vec<String> = names.to_vec();
        let mut said_why = BTreeMap::new();
        loop {
            let units = self.client.list_units().await?;
            let machines = self.machines().await.unwrap_or_default();
            let mut still = Vec::new();
            for name in pending {
                let Some(unit) = units.iter().find(|u| u.name == name) else {
                    bail!("unit {name} disappeared from the cluster while waiting");
                };
                if reached(unit, target) {
                    println!("{}", reached_message(unit, target, &machines));
                    continue;
                }
                if target == Target::Launched {
                    if let Some(s) = relevant(unit)
                        .into_iter()
                        .find(|s| s.state == ActiveState::Failed)
                    {
                        bail!(
                            "unit {name} failed on machine {} ({}): see fleetctl status {name}",
                            s.machine,
                            s.sub
                        );
                    }
                }
                if let Some(reason) = &unit.reason {
                    if said_why.get(&name) != Some(reason) {
                        eprintln!("unit {name} cannot be placed yet: {reason}");
                        said_why.insert(name.clone(), reason.clone());
                    }
                }
                still.push(name);
            }
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
            if !timeout.is_zero() && started.elapsed() >= timeout {
                let mut why = Vec::new();
                for name in &pending {
                    let unit = units.iter().find(|u| &u.name == name);
                    why.push(match unit {
                        Some(u) => not_reached(u, target),
                        None => format!("{name}: gone"),
                    });
                }
                bail!(
                    "gave up after {}: {}",
                    humantime::format_duration(timeout),
                    why.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn machines(&self) -> Result<BTreeMap<String, Machine>> {
        Ok(self
            .client
            .list_machines()
            .await?
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect())
    }

    async fn destroy(&self, names: &[String]) -> Result<()> {
        for name in names {
            self.client
                .delete_unit(name)
                .await
                .map_err(|e| unknown(e, name))?;
            println!("Destroyed {name}");
        }
        Ok(())
    }

    async fn restart(&self, names: &[String], block: &Block) -> Result<()> {
        for name in names {
            self.get(name).await?;
        }
        let stop = Block {
            no_block: false,
            block_timeout: block.block_timeout,
        };
        let args: Vec<UnitArg> = names.iter().cloned().map(UnitArg::Name).collect();
        self.change(&args, false, Some(DesiredState::Loaded), Some(&stop))
            .await?;
        self.change(&args, false, Some(DesiredState::Launched), Some(block))
            .await
    }

    async fn journal(
        &self,
        name: &str,
        lines: u32,
        machine: Option<&str>,
        follow: bool,
    ) -> Result<()> {
        use std::io::Write;
        let mut after = 0;
        let mut first = true;
        loop {
            let n = if first { lines } else { u32::MAX };
            let entries = match machine {
                Some(m) => self.client.journal_on(name, n, after, m).await,
                None => self.client.journal(name, n, after).await,
            }
            .map_err(|e| unknown(e, name))?;
            let mut out = std::io::stdout().lock();
            for e in &entries {
                let time = std::time::UNIX_EPOCH + Duration::from_micros(e.time_us);
                writeln!(
                    out,
                    "{} {} {}",
                    humantime::format_rfc3339_micros(time),
                    e.stream,
                    e.line
                )?;
                after = after.max(e.seq);
            }
            out.flush()?;
            if !follow {
                return Ok(());
            }
            first = false;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn list_units(&self, json: bool, full: bool, image: bool) -> Result<()> {
        let units = self.client.list_units().await?;
        // --image: each unit's image from its body (a unit destroyed meanwhile shows none).
        let mut images = BTreeMap::new();
        if image {
            for u in &units {
                if let Ok(d) = self.client.get_unit(&u.name).await {
                    if let Some((i, _)) = unit_image(&u.name, &d.body) {
                        images.insert(u.name.clone(), i);
                    }
                }
            }
        }
        if json {
            let mut value = serde_json::to_value(&units)?;
            if let Some(list) = value.as_array_mut().filter(|_| image) {
                for u in list.iter_mut() {
                    let name = u["name"].as_str().unwrap_or_default().to_string();
                    if let Some(obj) = u.as_object_mut() {
                        obj.insert("image".into(), serde_json::json!(images.get(&name)));
                    }
                }
            }
            println!("{}", serde_json::to_string_pretty(&value)?);
            return Ok(());
        }
        let machines = self.machines().await?;
        let image_cell = |name: &str| -> String {
            match images.get(name) {
                Some(i) if full => i.clone(),
                Some(i) => short_pin(i),
                None => "-".into(),
            }
        };
        let mut rows = vec![row(["UNIT", "MACHINE", "ACTIVE", "SUB", "IMAGE"])];
        for u in &units {
            if u.machine.is_none() && !u.states.is_empty() {
                for s in &u.states {
                    rows.push(row([
                        &u.name,
                        &machine_label(&s.machine, &machines, full),
                        s.state.as_str(),
                        s.sub.as_str(),
                        &image_cell(&u.name),
                    ]));
                }
                continue;
            }
            let machine = u
                .machine
                .as_deref()
                .map(|m| machine_label(m, &machines, full))
                .unwrap_or_else(|| "-".into());
            rows.push(row([
                &u.name,
                &machine,
                u.state.as_ref().map_or("-", Wire::as_str),
                u.sub.as_ref().map_or("-", Wire::as_str),
                &image_cell(&u.name),
            ]));
        }
        if !image {
            for r in &mut rows {
                r.pop();
            }
        }
        print_table(&rows);
        Ok(())
    }

    async fn list_unit_files(&self, json: bool, full: bool) -> Result<()> {
        let units = self.client.list_units().await?;
        let files: Vec<serde_json::Value> = units
            .iter()
            .map(|u| {
                serde_json::json!({
                    "name": u.name,
                    "hash": u.hash,
                    "desired": u.desired,
                    "state": current(u),
                    "machine": u.machine,
                })
            })
            .collect();
        if json {
            println!("{}", serde_json::to_string_pretty(&files)?);
            return Ok(());
        }
        let machines = self.machines().await?;
        let mut rows = vec![row(["UNIT", "HASH", "DSTATE", "STATE", "TARGET"])];
        for u in &units {
            let hash = if full {
                u.hash.clone()
            } else {
                u.hash.chars().take(7).collect()
            };
            let target = match &u.machine {
                Some(m) => machine_label(m, &machines, full),
                None if !u.states.is_empty() => "global".into(),
                None => "-".into(),
            };
            rows.push(row([
                &u.name,
                &hash,
                u.desired.as_str(),
                current(u).as_str(),
                &target,
            ]));
        }
        print_table(&rows);
        Ok(())
    }

    async fn list_machines(&self, json: bool, full: bool) -> Result<()> {
        let machines = self.client.list_machines().await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&machines)?);
            return Ok(());
        }
        let mut rows = vec![row(["MACHINE", "IP", "VERSION", "UPDATE", "METADATA"])];
        for m in &machines {
            let metadata = if m.metadata.is_empty() {
                "-".to_string()
            } else {
                m.metadata
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let address = if m.address.is_empty() {
                "-"
            } else {
                &m.address
            };
            rows.push(row([
                &short_id(&m.id, full),
                address,
                os_version(m),
                update_state(m),
                &metadata,
            ]));
        }
        print_table(&rows);
        Ok(())
    }

    async fn os_status(&self, json: bool, full: bool) -> Result<()> {
        let machines = self.client.list_machines().await?;
        let holders = self.client.reboot_lock().await?;
        let rollout = self.client.rollout().await?;
        let holds = |id: &str| holders.iter().find(|h| h.machine == id);
        if json {
            let machines: Vec<serde_json::Value> = machines
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "id": m.id,
                        "address": m.address,
                        "os_version": m.os_version,
                        "update": m.os.as_ref().map(|o| o.update_state().as_str()),
                        "os": m.os,
                        "reboot_lock": holds(&m.id).is_some(),
                    })
                })
                .collect();
            let out = serde_json::json!({
                "machines": machines,
                "reboot_lock": holders,
                "rollout": rollout,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let held_for = |since: u64| {
            let secs = now.saturating_sub(since) / 1000;
            format!(
                "held {}",
                humantime::format_duration(Duration::from_secs(secs))
            )
        };
        let mut rows = vec![row([
            "MACHINE",
            "VERSION",
            "UPDATE",
            "BOOTED",
            "NEXT",
            "SLOTS",
            "REBOOT-LOCK",
        ])];
        for m in &machines {
            let (booted, next, slots) = match &m.os {
                Some(os) => (
                    os.booted.clone(),
                    os.next.clone().unwrap_or_else(|| "-".into()),
                    os.slots
                        .iter()
                        .map(|s| match s.tries_left {
                            Some(left) => {
                                format!("{}={} {} ({left} left)", s.slot, s.version, s.state)
                            }
                            None => format!("{}={} {}", s.slot, s.version, s.state),
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let lock = holds(&m.id).map_or_else(|| "-".to_string(), |h| held_for(h.since));
            rows.push(row([
                &short_id(&m.id, full),
                os_version(m),
                update_state(m),
                &booted,
                &next,
                &slots,
                &lock,
            ]));
        }
        print_table(&rows);
        // Holders that are not live machines (a lease other than the presence lease).
        for h in holders
            .iter()
            .filter(|h| !machines.iter().any(|m| m.id == h.machine))
        {
            println!(
                "reboot lock also held by {} (not a live machine; lease {}), {}",
                short_id(&h.machine, full),
                h.lease,
                held_for(h.since)
            );
        }
        if holders.is_empty() {
            println!("reboot lock: free");
        } else {
            println!("reboot lock: {} slot(s) held", holders.len());
        }
        if let Some(r) = &rollout {
            println!();
            let by_id: BTreeMap<&str, &Machine> =
                machines.iter().map(|m| (m.id.as_str(), m)).collect();
            let mut rows = vec![row(["MACHINE", "STEP", "VERSION", "UPDATE", "REASON"])];
            for m in &r.machines {
                let live = by_id.get(m.id.as_str());
                rows.push(row([
                    &short_id(&m.id, full),
                    m.step.as_str(),
                    live.map_or("(absent)", |l| os_version(l)),
                    live.map_or("-", |l| update_state(l)),
                    m.reason.as_deref().unwrap_or("-"),
                ]));
            }
            print_table(&rows);
            println!("{}", rollout_line(r, full));
        } else {
            println!("rollout: none");
        }
        Ok(())
    }

    /// `fleetctl os update`: the version (given, or the payload manifest's), the start,
    /// and with `wait` the rollout followed to its end.
    async fn os_update(
        &self,
        reference: &str,
        max_unavailable: u32,
        version: Option<String>,
        wait: bool,
        registries: Option<PathBuf>,
    ) -> Result<()> {
        if max_unavailable == 0 {
            bail!("--max-unavailable must be at least 1");
        }
        let local = Path::new(reference);
        let reference = if local.is_dir() {
            std::fs::canonicalize(local)
                .with_context(|| format!("cannot resolve the payload directory {reference}"))?
                .display()
                .to_string()
        } else {
            reference.to_string()
        };
        let version = match version {
            Some(v) => v,
            None => payload_version(&reference, registries).await?,
        };
        let request = api::StartRollout {
            reference: reference.clone(),
            version: version.clone(),
            max_unavailable,
        };
        let started = self.client.start_rollout(&request).await?;
        println!(
            "Started the rollout of {reference} to version {version} through {} machine(s) ({}), at most {max_unavailable} unavailable at once",
            started.machines.len(),
            started
                .machines
                .iter()
                .map(|m| short_id(&m.id, false))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !wait {
            println!("Follow it with: fleetctl os status (or fleetctl os update ... --wait)");
            return Ok(());
        }
        self.follow_rollout(&started).await
    }

    /// Prints one line per step change of `started` until it finishes (Ok) or halts (Err).
    async fn follow_rollout(&self, started: &flotilla_fleetd::Rollout) -> Result<()> {
        let mut seen: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
        loop {
            let current = self
                .client
                .rollout()
                .await?
                .filter(|r| r.same_as(started))
                .ok_or_else(|| anyhow!("the rollout was replaced by another one"))?;
            for m in &current.machines {
                let now = (m.step.as_str().to_string(), m.reason.clone());
                if seen.get(&m.id) != Some(&now) {
                    match &m.reason {
                        Some(why) => println!("{}: {} ({why})", short_id(&m.id, false), m.step),
                        None => println!("{}: {}", short_id(&m.id, false), m.step),
                    }
                    seen.insert(m.id.clone(), now);
                }
            }
            match current.state {
                RolloutState::Running => {}
                RolloutState::Finished => {
                    println!("{}", rollout_line(&current, false));
                    return Ok(());
                }
                RolloutState::Halted => bail!("{}", rollout_line(&current, false)),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn status(&self, names: &[String]) -> Result<()> {
        let machines = self.machines().await.unwrap_or_default();
        for (i, name) in names.iter().enumerate() {
            let d = self.get(name).await?;
            let u = &d.unit;
            if i > 0 {
                println!();
            }
            let dot = if u.state.as_ref().is_some_and(|s| *s == ActiveState::Active) {
                "●"
            } else {
                "○"
            };
            println!("{dot} {} - desired {}", u.name, u.desired);
            println!("     Hash: {}", u.hash);
            if let Some((image, registry)) = unit_image(&u.name, &d.body) {
                println!("    Image: {image}");
                match flotilla_units::pinned_digest(&image) {
                    Some(digest) => println!("   Pinned: {digest}"),
                    None if registry => {
                        println!("   Pinned: no (each machine resolves the tag when it pulls)")
                    }
                    None => {}
                }
            }
            match &u.machine {
                Some(m) => println!("  Machine: {}", machine_label(m, &machines, true)),
                None if !u.states.is_empty() => println!("  Machine: global"),
                None => println!("  Machine: - (not scheduled)"),
            }
            for s in relevant(u) {
                let pid = s.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
                let stale = match &s.hash {
                    Some(h) if h != &u.hash => " (runs an older body)",
                    _ => "",
                };
                println!(
                    "   Active: {} ({}) on {}{pid}{stale}",
                    s.state,
                    s.sub,
                    short_id(&s.machine, false)
                );
            }
            if let Some(reason) = &u.reason {
                println!("   Reason: cannot be placed: {reason}");
            }
        }
        Ok(())
    }
}

/// The states that count for a unit: its machine's, or every machine's for a global unit.
fn relevant(u: &UnitView) -> Vec<&api::StateView> {
    match &u.machine {
        Some(m) => u.states.iter().filter(|s| &s.machine == m).collect(),
        None => u.states.iter().collect(),
    }
}

/// Whether a machine's state means the unit's process runs or is being started or stopped.
fn is_running_state(state: &Wire<ActiveState>) -> bool {
    matches!(
        state.known(),
        Some(ActiveState::Active | ActiveState::Activating | ActiveState::Deactivating)
    )
}

fn current_body(u: &UnitView, s: &api::StateView) -> bool {
    s.hash.as_deref().is_none_or(|h| h == u.hash)
}

fn reached(u: &UnitView, target: Target) -> bool {
    let states = relevant(u);
    match target {
        Target::Inactive => u.machine.is_none() && u.states.is_empty(),
        Target::Loaded => {
            !states.is_empty()
                && states
                    .iter()
                    .all(|s| current_body(u, s) && !is_running_state(&s.state))
        }
        Target::Launched => {
            !states.is_empty()
                && states
                    .iter()
                    .all(|s| current_body(u, s) && s.state == ActiveState::Active)
        }
    }
}

fn not_reached(u: &UnitView, target: Target) -> String {
    let goal = match target {
        Target::Inactive => "unloaded",
        Target::Loaded => "loaded",
        Target::Launched => ActiveState::Active.as_str(),
    };
    if let Some(reason) = &u.reason {
        return format!(
            "unit {} is not {goal}: it cannot be placed: {reason}",
            u.name
        );
    }
    if u.machine.is_none() && u.states.is_empty() && target != Target::Inactive {
        return format!(
            "unit {} is not {goal}: no machine was assigned to it yet",
            u.name
        );
    }
    let states: Vec<String> = relevant(u)
        .iter()
        .map(|s| format!("{} ({}) on {}", s.state, s.sub, short_id(&s.machine, false)))
        .collect();
    if states.is_empty() {
        format!("unit {} is not {goal}: no state reported yet", u.name)
    } else {
        format!("unit {} is not {goal}: {}", u.name, states.join(", "))
    }
}

fn reached_message(u: &UnitView, target: Target, machines: &BTreeMap<String, Machine>) -> String {
    let on = u
        .machine
        .as_deref()
        .map(|m| format!(" on {}", machine_label(m, machines, false)))
        .unwrap_or_default();
    match target {
        Target::Inactive => format!("Unit {} inactive", u.name),
        Target::Loaded => format!("Unit {} loaded{on}", u.name),
        Target::Launched => format!("Unit {} launched{on}", u.name),
    }
}

/// fleet's STATE column: what the unit is on its machine.
fn current(u: &UnitView) -> String {
    let states = relevant(u);
    let state = if states.is_empty() {
        DesiredState::Inactive
    } else if states.iter().any(|s| s.state == ActiveState::Active) {
        DesiredState::Launched
    } else {
        DesiredState::Loaded
    };
    state.to_string()
}

/// `repo:tag@sha256:<12 hex>` for `repo:tag@sha256:<64 hex>` (a table cell); other images
/// as they are.
fn short_pin(image: &str) -> String {
    match image.split_once("@sha256:") {
        Some((name, hex)) if hex.len() > 12 => {
            format!("{name}@sha256:{}", hex.chars().take(12).collect::<String>())
        }
        _ => image.to_string(),
    }
}

fn short_id(id: &str, full: bool) -> String {
    if full || id.chars().count() <= 8 {
        id.to_string()
    } else {
        format!("{}...", id.chars().take(8).collect::<String>())
    }
}

fn machine_label(id: &str, machines: &BTreeMap<String, Machine>, full: bool) -> String {
    match machines.get(id).map(|m| m.address.as_str()) {
        Some(addr) if !addr.is_empty() => format!("{}/{addr}", short_id(id, full)),
        _ => short_id(id, full),
    }
}

/// The line that says where a rollout is.
fn rollout_line(r: &flotilla_fleetd::Rollout, full: bool) -> String {
    let done = r
        .machines
        .iter()
        .filter(|m| m.step == flotilla_fleetd::RolloutStep::Done)
        .count();
    let head = format!(
        "rollout of {} to version {} (at most {} unavailable): {}, {done} of {} machine(s) done",
        r.reference,
        r.version,
        r.max_unavailable,
        r.state,
        r.machines.len()
    );
    match &r.halted {
        Some(h) => format!(
            "{head}; halted at {}: {}",
            short_id(&h.machine, full),
            h.reason
        ),
        None => head,
    }
}

/// The `version` of the update payload's manifest.json: read from the directory, or only
/// that layer pulled from the registry (the signature is the machines' to check).
async fn payload_version(reference: &str, registries: Option<PathBuf>) -> Result<String> {
    use flotilla_osupdate::payload::{UpdateManifest, MANIFEST};
    let dir = Path::new(reference);
    let read = |path: &Path| -> Result<String> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read the payload manifest {}: give the version with --version",
                path.display()
            )
        })?;
        let manifest: UpdateManifest = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not an update payload manifest: give the version with --version",
                path.display()
            )
        })?;
        Ok(manifest.version)
    };
    if dir.is_dir() {
        return read(&dir.join(MANIFEST));
    }
    let (settings, path) = registry_settings(registries)?;
    let wanted = reference.to_string();
    let reference = reference.to_string();
    let staging = std::env::temp_dir().join(format!(
        "fleetctl-manifest-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let dest = staging.clone();
    // pull_files runs its own runtime: off this one's thread.
    let pulled = tokio::task::spawn_blocking(move || {
        let check = |reference: &str, bytes: &[u8]| {
            let layers = flotilla_osupdate::oci::parse_update_manifest(reference, bytes)
                .map_err(|e| e.to_string())?;
            Ok(layers
                .into_iter()
                .filter(|l| l.file == MANIFEST)
                .map(|l| flotilla_registry::ArtifactFile {
                    name: l.file,
                    media_type: l.layer.media_type,
                    digest: l.layer.digest,
                    size: l.layer.size,
                })
                .collect())
        };
        let quiet: flotilla_registry::Progress = std::sync::Arc::new(|_| {});
        flotilla_registry::pull_files(&reference, &settings, &path, &dest, &check, quiet)
    })
    .await;
    let version = match pulled {
        Ok(Ok(_)) => read(&staging.join(MANIFEST)),
        Ok(Err(e)) => Err(anyhow!(e).context(format!(
            "cannot pull the payload manifest of {wanted}: give the version with --version"
        ))),
        Err(e) => Err(anyhow!("the manifest pull failed: {e}")),
    };
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        eprintln!("fleetctl: cannot remove {}: {e}", staging.display());
    }
    version
}

/// A machine's VERSION cell.
fn os_version(m: &Machine) -> &str {
    if m.os_version.is_empty() {
        "-"
    } else {
        &m.os_version
    }
}

/// A machine's UPDATE cell: the A/B state's summary, `-` when it did not boot a slot.
fn update_state(m: &Machine) -> &'static str {
    m.os.as_ref().map_or("-", |o| o.update_state().as_str())
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

fn print_table(rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = Vec::new();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            let w = c.chars().count();
            match widths.get_mut(i) {
                Some(cur) => *cur = (*cur).max(w),
                None => widths.push(w),
            }
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
}
