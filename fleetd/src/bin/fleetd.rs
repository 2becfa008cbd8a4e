//! `fleetd`: the cluster daemon of one machine. Runs the agent (what the cluster assigns to
//! this machine runs in the local init), the engine (leader-elected scheduling) and the
//! HTTP/JSON API, in one tokio runtime, over the embedded registry or etcd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use flotilla_fleetd::api::{self, ApiState};
use flotilla_fleetd::tls::{self, TlsFiles};
use flotilla_fleetd::{
    Agent, EmbeddedRegistry, Engine, EtcdConfig, EtcdRegistry, InitApi, Machine, Registry,
};
use tokio::sync::watch;

/// Where the host's provisioning writes the machine's fleet metadata (`key = "value"` lines).
const METADATA_FILE: &str = "/etc/flotilla/metadata.toml";
/// Where the host's provisioning (`[fleet]`) writes fleetd's settings.
const CONFIG_FILE: &str = "/etc/flotilla/fleetd.toml";
/// The lease TTL without --ttl or a `ttl` in the config file, in seconds.
const DEFAULT_TTL: u64 = 5;

/// The config file: defaults for the flags of the same names (`etcd = ["http://..."]`,
/// `ttl = 5`, `address = "10.0.0.11"`, `listen = "0.0.0.0:4002"`, `token_file = "..."`,
/// `insecure = true`, `tls_ca`/`tls_cert`/`tls_key`, `etcd_ca`/`etcd_cert`/`etcd_key` =
/// "PATH"); a flag given on the command line wins.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    etcd: Vec<String>,
    ttl: Option<u64>,
    address: Option<String>,
    listen: Option<String>,
    token_file: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
}

/// fleetd: spreads units across machines with fleet's placement rules.
#[derive(Debug, Parser)]
#[command(name = "fleetd", version)]
struct Args {
    /// Settings file (written by provisioning's `[fleet]`): `etcd`, `ttl`, `address`,
    /// `listen`, `token_file`, `insecure`, `tls_ca`, `tls_cert`, `tls_key`, `etcd_ca`,
    /// `etcd_cert`, `etcd_key`, the defaults of those flags. A missing file is no error.
    #[arg(long, value_name = "PATH", default_value = CONFIG_FILE)]
    config: PathBuf,
    /// etcd endpoints, comma-separated (http://10.0.0.1:2379,...); without it (and without
    /// `etcd` in --config), the embedded registry in --state.
    #[arg(long, value_delimiter = ',', value_name = "URL,...")]
    etcd: Vec<String>,
    /// The key prefix in etcd (starts and ends with `/`).
    #[arg(long, value_name = "PREFIX", default_value = "/flotilla/")]
    etcd_prefix: String,
    /// The embedded registry's directory (without --etcd).
    #[arg(long, value_name = "DIR", default_value = flotilla_fleetd::embedded::DEFAULT_DIR)]
    state: PathBuf,
    /// The local init's control socket.
    #[arg(long, value_name = "PATH", default_value = flotilla_init_api::DEFAULT_SOCKET)]
    init_api: PathBuf,
    /// The API's Unix socket (mode 0600).
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    api: PathBuf,
    /// Also serve the API on this TCP address (HOST:PORT), over mutual TLS: requires
    /// --tls-ca, --tls-cert and --tls-key (or, in plaintext, --insecure and --token-file).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The cluster CA (PEM): TCP API clients and the other fleetds must show a certificate
    /// it issued (OU=operator may change units; OU=reader and OU=machine may read).
    #[arg(long, value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    /// This machine's certificate (PEM, OU=machine, subjectAltName = the address others
    /// reach it at): the TCP API's server certificate and the client certificate this fleetd
    /// relays with.
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// INSECURE: serve --listen in plaintext HTTP, authenticated only by the shared bearer
    /// token of --token-file (anyone on the network path can read it and the API's answers).
    /// Without it, --listen needs the --tls-* files.
    #[arg(long)]
    insecure: bool,
    /// With --insecure: the bearer token TCP clients must send (the file's first line).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The most TCP connections served at once (more wait in the kernel's backlog).
    #[arg(long, value_name = "N", default_value_t = api::ServeLimits::TCP.max_connections)]
    listen_max_connections: usize,
    /// Seconds a TCP connection has to send a complete request head.
    #[arg(long, value_name = "SECS", default_value_t = api::ServeLimits::TCP.header_read_timeout.as_secs())]
    listen_header_timeout: u64,
    /// Seconds without a byte either way after which a TCP connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = api::ServeLimits::TCP.idle_timeout.as_secs())]
    listen_idle_timeout: u64,
    /// The most connections served at once on the Unix socket (its own cap: a full TCP
    /// listener never locks out local clients).
    #[arg(long, value_name = "N", default_value_t = api::ServeLimits::UNIX.max_connections)]
    api_max_connections: usize,
    /// The CA of etcd's certificate (PEM), for https:// --etcd endpoints.
    #[arg(long, value_name = "PATH")]
    etcd_ca: Option<PathBuf>,
    /// The client certificate fleetd shows etcd (PEM; etcd --client-cert-auth).
    #[arg(long, value_name = "PATH")]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "PATH")]
    etcd_key: Option<PathBuf>,
    /// Machine metadata for placement, comma-separated (role=web,region=eu); without it,
    /// /etc/flotilla/metadata.toml if it exists.
    #[arg(long, value_delimiter = ',', value_name = "K=V,...")]
    metadata: Vec<String>,
    /// The machine id; without it, the local init's (GetMachineId).
    #[arg(long, value_name = "ID")]
    machine_id: Option<String>,
    /// The address others reach this machine at (shown by list-machines); default: the host
    /// part of --listen, else empty.
    #[arg(long, value_name = "ADDR")]
    address: Option<String>,
    /// The image store whose blobs the TCP API serves to the other machines' pulls
    /// (`GET /v2/<name>/blobs/sha256:<hex>`; over TLS to OU=machine certificates only): the
    /// local init's writable store.
    #[arg(long, value_name = "DIR", default_value = api::blobs::DEFAULT_IMAGES)]
    images: PathBuf,
    /// Where to keep the list of the other machines' APIs and the identity to show them,
    /// which `unitctl image pull` reads to fetch blobs from them before the registry (kept
    /// only with --listen: TLS or --insecure's token).
    #[arg(long, value_name = "PATH", default_value = flotilla_fleetd::peers::DEFAULT_PEERS_FILE)]
    peers_file: PathBuf,
    /// The host's os-release, whose `VERSION_ID` the machine record publishes
    /// (`fleetctl list-machines`' VERSION).
    #[arg(long, value_name = "PATH", default_value = "/etc/os-release")]
    os_release: PathBuf,
    /// The kernel command line (`flotilla.slot=`: the host booted a slot of the A/B disk).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/proc/cmdline",
        hide = true
    )]
    os_cmdline: PathBuf,
    /// The mounted ESP to read the A/B boot entries from [default: mount the disk's
    /// `flotilla-esp` read-only for each read].
    #[arg(long, value_name = "DIR", hide = true)]
    os_esp: Option<PathBuf>,
    /// How often to read the host's OS version and update state again, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = flotilla_fleetd::os::REFRESH.as_secs(), hide = true)]
    os_refresh: u64,
    /// The lease TTL of this machine's presence and of the engine's leadership, in seconds
    /// (default: `ttl` in --config, else 5).
    #[arg(long, value_name = "SECS")]
    ttl: Option<u64>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("fleetd: {first} (see fleetd --help)");
            std::process::exit(2);
        }
        Err(e) => {
            let _ = e.print();
            return;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetd: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("fleetd: {e:#}");
        std::process::exit(1);
    }
}

/// Parses `k=v` pairs.
fn parse_metadata(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in pairs.iter().filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("invalid --metadata {pair:?}: use key=value,key=value");
        };
        if k.trim().is_empty() {
            bail!("invalid --metadata {pair:?}: the key is empty");
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Reads the provisioning's metadata file: a TOML table of `key = "value"`.
fn read_metadata_file(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
    Ok(table
        .into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

/// Whether a listen host means every address.
fn is_wildcard(host: &str) -> bool {
    host.is_empty() || host == "0.0.0.0" || host == "::"
}

/// The URL the other fleetds reach this one's TCP API at: `--listen`'s host, or `address`
/// where that host is a wildcard (`0.0.0.0`, `[::]`); `https` over TLS, else `http`.
fn public_api_url(listen: &str, address: &str, tls: bool) -> Result<String> {
    let scheme = if tls { "https" } else { "http" };
    let Some((host, port)) = listen.rsplit_once(':') else {
        bail!("invalid --listen {listen:?}: use HOST:PORT, e.g. 0.0.0.0:4002");
    };
    let host = host.trim_matches(['[', ']']);
    let host = if is_wildcard(host) {
        if address.is_empty() {
            bail!(
                "--listen {listen} listens on every address: give --address (the one the other machines reach this one at)"
            );
        }
        address
    } else {
        host
    };
    Ok(if host.contains(':') {
        format!("{scheme}://[{host}]:{port}")
    } else {
        format!("{scheme}://{host}:{port}")
    })
}

/// Reads the config file (none: no settings).
fn read_config_file(path: &Path) -> Result<FileConfig> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    toml::from_str(&text).with_context(|| {
        format!(
            "invalid {} (keys: etcd = [\"http://HOST:2379\", ...], ttl = SECS, address = \"ADDR\", \
             listen = \"HOST:PORT\", tls_ca, tls_cert, tls_key = \"PATH\", insecure = true, \
             token_file = \"PATH\", etcd_ca, etcd_cert, etcd_key = \"PATH\")",
            path.display()
        )
    })
}

async fn run(mut args: Args) -> Result<()> {
    let file = read_config_file(&args.config)?;
    if args.etcd.is_empty() {
        args.etcd = file.etcd;
    }
    args.address = args.address.or(file.address);
    args.listen = args.listen.or(file.listen);
    args.token_file = args.token_file.or(file.token_file);
    args.insecure |= file.insecure;
    args.tls_ca = args.tls_ca.or(file.tls_ca);
    args.tls_cert = args.tls_cert.or(file.tls_cert);
    args.tls_key = args.tls_key.or(file.tls_key);
    args.etcd_ca = args.etcd_ca.or(file.etcd_ca);
    args.etcd_cert = args.etcd_cert.or(file.etcd_cert);
    args.etcd_key = args.etcd_key.or(file.etcd_key);
    let ttl_secs = args.ttl.or(file.ttl).unwrap_or(DEFAULT_TTL);
    if ttl_secs == 0 {
        bail!("invalid ttl 0: the lease TTL is at least 1 second");
    }
    let ttl = Duration::from_secs(ttl_secs);
    let tls_files = api_tls_files(&args)?;
    let token = match (&args.listen, &args.token_file) {
        (Some(_), _) if tls_files.is_some() => None,
        (Some(listen), _) if !args.insecure => bail!(
            "refusing to serve the API on plaintext TCP {listen}: give --tls-ca, --tls-cert and --tls-key (mutual TLS with the cluster CA; see fleetd/README.md, \"Certificates\"), or --insecure --token-file PATH to accept plaintext HTTP with a bearer token"
        ),
        (Some(_), None) => bail!(
            "--insecure --listen needs --token-file: the plaintext TCP API requires a bearer token (write one, e.g. `head -c 32 /dev/urandom | base64 > /etc/flotilla/fleetd.token`)"
        ),
        (_, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            let token = text.lines().next().unwrap_or_default().trim().to_string();
            if token.is_empty() {
                bail!("the token file {} is empty", path.display());
            }
            Some(token)
        }
        (None, None) => None,
    };
    let metadata = if args.metadata.is_empty() {
        read_metadata_file(Path::new(METADATA_FILE))?
    } else {
        parse_metadata(&args.metadata)?
    };
    let address = args.address.clone().unwrap_or_else(|| {
        args.listen
            .as_deref()
            .and_then(|l| l.rsplit_once(':'))
            .map(|(host, _)| host.trim_matches(['[', ']']))
            .filter(|host| !is_wildcard(host))
            .unwrap_or_default()
            .to_string()
    });
    let api_url = match &args.listen {
        Some(listen) => Some(public_api_url(listen, &address, tls_files.is_some())?),
        None => None,
    };
    // Read now, so a bad file stops fleetd at startup with its name.
    let tls_configs = match &tls_files {
        Some(files) => Some((
            tls::server_config(files).context("the TCP API's TLS (--tls-*)")?,
            tls::client_config(files).context("the relay's TLS (--tls-*)")?,
        )),
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    // Installed before anything else, so an early SIGTERM is not the default (fatal) one.
    let signals = wait_for_signal()?;
    tokio::spawn(async move {
        signals.await;
        let _ = on_signal.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let registry: Arc<dyn Registry> = if args.etcd.is_empty() {
        Arc::new(EmbeddedRegistry::open(&args.state).await?)
    } else {
        let mut config = EtcdConfig::new(args.etcd.clone()).with_prefix(args.etcd_prefix.clone());
        if let Some(files) = etcd_tls_files(&args)? {
            config = config.with_tls(files);
        }
        Arc::new(EtcdRegistry::connect(config).await?)
    };

    let init = InitApi::new(&args.init_api);
    let machine_id = match args.machine_id.clone() {
        Some(id) => id,
        None => {
            tokio::select! {
                id = machine_id_from_init(&init) => id,
                () = stopped() => return Ok(()),
            }
        }
    };
    log::info!(
        "fleetd: machine {machine_id} (address {address:?}, metadata {metadata:?}) on {}",
        registry.describe()
    );

    let engine = Engine::new(registry.clone(), machine_id.clone(), ttl);
    let runner = flotilla_fleetd::rollout::Runner::new(
        registry.clone(),
        engine.status(),
        machine_id.clone(),
    );
    let mut api_state = ApiState::new(registry.clone(), Some(engine.status()))
        .with_local_init(machine_id.clone(), init.clone());
    if let Some(token) = &token {
        // The cluster shares one token: with it, this fleetd asks the others' TCP APIs.
        api_state = api_state.with_relay_token(token.clone());
    }
    if let Some((_, client)) = &tls_configs {
        // This machine's certificate lets it read the others' TCP APIs (a journal relay).
        api_state = api_state.with_relay_tls(client.clone());
    }
    // Layers from peers: the identity this machine shows the others' blob routes.
    let peer_identity = match (&tls_files, &args.token_file) {
        (Some(files), _) => match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some(flotilla_fleetd::peers::PeerIdentity::Tls {
                ca: files.ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
        (None, Some(token)) if args.listen.is_some() => {
            Some(flotilla_fleetd::peers::PeerIdentity::Token(token.clone()))
        }
        _ => None,
    };
    let peers_file = peer_identity.map(|identity| {
        flotilla_fleetd::peers::PeersFile::new(
            &args.peers_file,
            machine_id.clone(),
            api_url.clone(),
            identity,
        )
    });
    let machine = Machine {
        id: machine_id,
        address,
        metadata,
        api: api_url,
        images: Vec::new(),
        os_version: String::new(),
        os: None,
    };
    let gate = api::PeerGate::new(Some(init.clone()));
    let agent = Agent::new(registry.clone(), init, machine, ttl)
        .with_lease_file(args.state.join("agent.lease"))
        .with_os_probe(
            flotilla_fleetd::os::OsProbe {
                os_release: args.os_release.clone(),
                cmdline: args.os_cmdline.clone(),
                esp: args.os_esp.clone(),
            },
            Duration::from_secs(args.os_refresh),
        );

    let mut tasks = tokio::task::JoinSet::new();
    let unix_router = api::router(api_state.clone());
    let socket = args.api.clone();
    let unix_limits = api::ServeLimits {
        max_connections: args.api_max_connections.max(1),
        ..api::ServeLimits::UNIX
    };
    let tcp_limits = api::ServeLimits {
        max_connections: args.listen_max_connections.max(1),
        header_read_timeout: Duration::from_secs(args.listen_header_timeout.max(1)),
        idle_timeout: Duration::from_secs(args.listen_idle_timeout.max(1)),
    };
    let stop = stopped();
    tasks.spawn(async move {
        api::serve_unix(&socket, unix_router, unix_limits, gate, stop)
            .await
            .map_err(anyhow::Error::from)
    });
    match (args.listen.clone(), token, tls_configs) {
        (Some(listen), _, Some((server, _))) => {
            let router = api::router(api_state.with_client_roles().with_blobs(&args.images));
            let stop = stopped();
            tasks.spawn(async move {
                api::serve_tls(&listen, router, server, tcp_limits, stop)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        (Some(listen), Some(token), None) => {
            log::warn!("api: --insecure: serving {listen} in plaintext HTTP, authenticated by the shared bearer token only");
            let router = api::router(api_state.with_token(token).with_blobs(&args.images));
            let stop = stopped();
            tasks.spawn(async move {
                api::serve_tcp(&listen, router, tcp_limits, stop)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        _ => {}
    }
    if let Some(peers_file) = peers_file {
        let stop = stopped();
        let registry = registry.clone();
        tasks.spawn(async move {
            peers_file.run(registry, stop).await;
            Ok(())
        });
    }
    // The rolling OS update: acts while this machine's engine leads.
    let stop = stopped();
    tasks.spawn(async move {
        runner.run(stop).await;
        Ok(())
    });
    let stop = stopped();
    tasks.spawn(async move { engine.run(stop).await.map_err(anyhow::Error::from) });
    let stop = stopped();
    tasks.spawn(async move { agent.run(stop).await.map_err(anyhow::Error::from) });

    // Runs until the signal; a part that fails (the API cannot bind, the registry refuses
    // the machine id) stops the others.
    let mut first_error = None;
    let mut deadline = None;
    loop {
        let joined = match deadline {
            None => tasks.join_next().await,
            Some(at) => match tokio::time::timeout_at(at, tasks.join_next()).await {
                Ok(joined) => joined,
                Err(_) => {
                    log::warn!("fleetd: parts did not stop in time, aborting them");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            },
        };
        let Some(joined) = joined else { break };
        let result = joined.map_err(|e| anyhow::anyhow!("a fleetd task panicked: {e}"));
        if let Err(e) = result.and_then(|r| r) {
            log::error!("fleetd: {e:#}");
            first_error.get_or_insert(e);
        }
        if deadline.is_none() {
            let _ = stop_tx.send(true);
            deadline = Some(tokio::time::Instant::now() + ttl + Duration::from_secs(5));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            log::info!("fleetd: stopped");
            Ok(())
        }
    }
}

/// The TCP API's TLS files: all three of --tls-ca, --tls-cert, --tls-key, or none.
fn api_tls_files(args: &Args) -> Result<Option<TlsFiles>> {
    match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (None, None, None) => Ok(None),
        (Some(ca), Some(cert), Some(key)) => {
            if args.insecure {
                bail!("--insecure and --tls-* exclude each other: drop --insecure to serve the API over mutual TLS");
            }
            if args.token_file.is_some() {
                bail!("--token-file is for --insecure plaintext: over TLS the client certificate authenticates; drop --token-file");
            }
            Ok(Some(TlsFiles {
                ca: ca.clone(),
                cert: Some(cert.clone()),
                key: Some(key.clone()),
            }))
        }
        _ => bail!("mutual TLS needs all of --tls-ca (the cluster CA), --tls-cert and --tls-key (this machine's certificate and key)"),
    }
}

/// etcd's TLS files: --etcd-ca, with --etcd-cert and --etcd-key (both or neither).
fn etcd_tls_files(args: &Args) -> Result<Option<TlsFiles>> {
    match (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) {
        (None, None, None) => Ok(None),
        (Some(ca), cert, key) if cert.is_some() == key.is_some() => Ok(Some(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, _, _) => {
            bail!("--etcd-cert and --etcd-key need --etcd-ca (the CA of etcd's certificate)")
        }
        _ => bail!("--etcd-cert and --etcd-key go together: give both"),
    }
}

/// The machine id from the local init, retried (every second) until init answers.
async fn machine_id_from_init(init: &InitApi) -> String {
    let mut warned = false;
    loop {
        match init.machine_id().await {
            Ok(id) => return id,
            Err(e) => {
                if !warned {
                    log::warn!("fleetd: waiting for the local init to tell the machine id: {e}");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// A future that completes on SIGTERM or SIGINT; the handlers are installed at once.
fn wait_for_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log::info!("fleetd: SIGTERM, stopping (units keep running)"),
            _ = int.recv() => log::info!("fleetd: SIGINT, stopping (units keep running)"),
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_file_gives_defaults_and_may_be_missing() {
        let dir = tempfile::tempdir().unwrap();
        let none = read_config_file(&dir.path().join("fleetd.toml")).unwrap();
        assert!(none.etcd.is_empty() && none.ttl.is_none() && none.address.is_none());

        let path = dir.path().join("fleetd.toml");
        std::fs::write(
            &path,
            "# from provisioning\netcd = [\"http://10.0.0.1:2379\"]\nttl = 3\naddress = \"10.0.0.11\"\n",
        )
        .unwrap();
        let file = read_config_file(&path).unwrap();
        assert_eq!(file.etcd, ["http://10.0.0.1:2379"]);
        assert_eq!(file.ttl, Some(3));
        assert_eq!(file.address.as_deref(), Some("10.0.0.11"));

        assert_eq!(
            public_api_url("0.0.0.0:4002", "10.0.0.11", false).unwrap(),
            "http://10.0.0.11:4002"
        );
        assert_eq!(
            public_api_url("10.0.0.12:4002", "", true).unwrap(),
            "https://10.0.0.12:4002"
        );
        assert_eq!(
            public_api_url("[::]:4002", "fd00::1", false).unwrap(),
            "http://[fd00::1]:4002"
        );
        assert!(public_api_url("0.0.0.0:4002", "", true).is_err());

        std::fs::write(&path, "etcd_servers = []\n").unwrap();
        let err = format!("{:#}", read_config_file(&path).unwrap_err());
        assert!(
            err.contains("unknown field") && err.contains("keys: etcd"),
            "{err}"
        );
    }
}
