//! A rolling OS update through a cluster of disk-booted VMs (issue 13, "The cluster"):
//! the releases (host images built with `--os-version V --sign KEY`, one release key), a
//! local registry on the cluster's bridge holding their update payloads as OCI artifacts,
//! three VMs booted from their own copies of the first release's `disk.img`
//! ([`ClusterNet::boot_disk`]), and [`RollingCluster::roll`]: `fleetctl os update REF
//! --max-unavailable N` from the host (the operator's certificate), followed until the
//! rollout finishes or halts, while a thread probes a service on the VMs' addresses five
//! times a second and another counts the machines present in the registry once a second.
//! Used by
//! `tests/rolling.rs` and `flotilla-vm rolling`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::{ClusterNet, FLEETD_PORT};
use crate::registry::{push, RegistryOptions, TestRegistry};
use crate::update_payloads::{release_key, signed_host_image};
use crate::{io_err, QemuError, Result, Vm};

/// The port [`SERVICE_UNIT`] answers HTTP on.
pub const SERVICE_PORT: u16 = 8090;

/// The service that must keep answering through a rollout: one instance (not global),
/// restarted always, busybox httpd over the host's read-only root serving the image's web
/// page on [`SERVICE_PORT`] in the host's network.
pub const SERVICE_UNIT: &str = r#"[unit]
description = "one instance answering HTTP on port 8090"
[container]
command = ["/bin/busybox", "httpd", "-f", "-p", "8090", "-h", "/usr/share/flotilla/www"]
network = "host"
[service]
restart = "always"
"#;

/// The repository the update payloads are pushed to, tagged with their versions.
pub const OS_REPO: &str = "flotilla/os";

/// The line flotilla-init prints once the first start settled.
const MARKER: &str = "flotilla: boot complete in";
/// How long a disk boot of three VMs at once may take under TCG.
const BOOT_PATIENCE: Duration = Duration::from_secs(600);
/// How long the cluster may take to list every machine, or to place units.
const SETTLE: Duration = Duration::from_secs(300);
/// The bound on one `fleetctl` or `etcdctl` run from the host.
const COMMAND: Duration = Duration::from_secs(60);
/// The bound on one read-only `fleetctl` run against one VM: short, so that a VM that is
/// rebooting (its address silent) costs little before the next VM is asked.
const QUERY: Duration = Duration::from_secs(10);
/// The bound on `fleetctl start --block-timeout 240s`.
const START: Duration = Duration::from_secs(300);
/// How often the service is probed: finer than a second, so that a gap of a fraction of a
/// second between one copy stopping and the next answering is seen.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);
/// How often the machines present in the registry are counted.
pub const COUNT_EVERY: Duration = Duration::from_secs(1);
/// The bound on one HTTP probe's connect, and on its answer.
const PROBE_CONNECT: Duration = Duration::from_secs(3);
const PROBE_ANSWER: Duration = Duration::from_secs(5);
/// fleetd's default key prefix in etcd.
const PREFIX: &str = "/flotilla/";
/// The machines' lease TTL (`[fleet] ttl`), in seconds.
const TTL_SECS: u64 = 20;

/// One release: its version and the image directory `image-build os` wrote.
#[derive(Debug, Clone)]
pub struct Release {
    /// `--os-version`.
    pub version: String,
    /// The image directory (`disk.img`, `update/`, `update-oci/`, ...).
    pub image: PathBuf,
    /// How long its build took, in seconds.
    pub build_secs: f64,
}

/// Makes a release key in `dir` and builds the host image of `image-build/specs/host.toml`
/// once per version into `dir/v<VERSION>` (`image-build os --os-version V --sign KEY`, see
/// [`signed_host_image`]): every release trusts the key, so each can update to the next.
pub fn build_releases(dir: &Path, versions: &[&str]) -> Result<Vec<Release>> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    let key = release_key(&dir.join("release.pem"))?;
    let spec = crate::images::host_spec();
    let mut out = Vec::new();
    for version in versions {
        let started = Instant::now();
        let (image, _) = signed_host_image(&spec, &dir.join(format!("v{version}")), version, &key)?;
        out.push(Release {
            version: version.to_string(),
            image,
            build_secs: started.elapsed().as_secs_f64(),
        });
    }
    Ok(out)
}

/// One round of the prober: the service asked on the VMs' addresses until one answered.
#[derive(Debug, Clone)]
pub struct Round {
    /// Seconds since the rollout command was sent.
    pub at: f64,
    /// The VM (1-based) whose copy of the service answered, if any did.
    pub answered: Option<usize>,
    /// Why each VM tried did not answer.
    pub misses: Vec<String>,
}

/// One count of the machines present in the registry.
#[derive(Debug, Clone, Copy)]
pub struct Count {
    /// Seconds since the rollout command was sent.
    pub at: f64,
    /// Machines present (`machines/` keys in etcd); `None` when etcd could not be read.
    pub present: Option<usize>,
}

/// A rollout as the host saw it.
#[derive(Debug, Clone)]
pub struct RolloutRun {
    /// The target version.
    pub version: String,
    /// `--max-unavailable`.
    pub max_unavailable: usize,
    /// The rollout's last state (`finished`, `halted`, `running`), or `gave up ...` when
    /// the patience ran out first.
    pub state: String,
    /// Seconds from the command to the state above.
    pub secs: f64,
    /// The last `fleetctl os status --json`.
    pub status: serde_json::Value,
    /// The prober's rounds ([`PROBE_EVERY`]).
    pub rounds: Vec<Round>,
    /// The counts of machines present ([`COUNT_EVERY`]).
    pub counts: Vec<Count>,
    /// Each step change seen, as printed: `[  12.3 s] vm2 draining`.
    pub steps: Vec<String>,
}

impl RolloutRun {
    /// The rounds no copy of the service answered in.
    pub fn unanswered(&self) -> Vec<&Round> {
        self.rounds
            .iter()
            .filter(|r| r.answered.is_none())
            .collect()
    }

    /// The most machines missing from the registry at one count (out of `total`).
    pub fn most_missing(&self, total: usize) -> usize {
        self.counts
            .iter()
            .filter_map(|r| r.present)
            .map(|p| total.saturating_sub(p))
            .max()
            .unwrap_or(0)
    }

    /// Counts for which etcd could not be read.
    pub fn uncounted(&self) -> usize {
        self.counts.iter().filter(|c| c.present.is_none()).count()
    }
}

/// Three (or more) VMs of one release, booted from `disk.img`, in one fleet cluster on
/// etcd over mutual TLS, with a local registry on the bridge that holds update payloads.
pub struct RollingCluster {
    net: ClusterNet,
    registry: TestRegistry,
    vms: Vec<Vm>,
    ids: Vec<String>,
    fleetctl: PathBuf,
    dir: PathBuf,
    /// The VM (0-based) whose API answered last: asked first next time.
    preferred: AtomicUsize,
}

impl RollingCluster {
    /// Starts the bridge and etcd ([`ClusterNet`]) and a registry on the bridge's host
    /// address (marked insecure in every VM's provisioning), then boots `vms` VMs from
    /// `first`'s `disk.img`, each provisioned with `extra` as well (e.g. `[os]
    /// commit_after`), and waits until each printed the boot marker and all are listed by
    /// the registry. `dir` holds etcd, the registry and the operator's files.
    pub fn start(dir: &Path, first: &Release, vms: usize, extra: &str) -> Result<RollingCluster> {
        let mut net = ClusterNet::new(dir, vms)?;
        let registry = TestRegistry::start_with(
            &dir.join("registry"),
            &RegistryOptions {
                ip: Some(&net.host_ip()),
                ..Default::default()
            },
        )?;
        net.insecure_registry(&registry.host());
        let started = Instant::now();
        let mut booted = Vec::new();
        for n in 1..=vms {
            booted.push(net.boot_disk(&first.image, n, "worker", TTL_SECS, extra)?);
        }
        for (i, vm) in booted.iter().enumerate() {
            vm.wait_for(MARKER, BOOT_PATIENCE)?;
            println!(
                "vm{} booted {} from disk.img: marker {:.1} s after the first QEMU started (console: {})",
                i + 1,
                first.version,
                started.elapsed().as_secs_f64(),
                vm.log_path().display()
            );
        }
        let fleetctl = crate::static_binaries()?.join("fleetctl");
        let mut cluster = RollingCluster {
            net,
            registry,
            vms: booted,
            ids: Vec::new(),
            fleetctl,
            dir: dir.to_path_buf(),
            preferred: AtomicUsize::new(0),
        };
        let addresses: Vec<String> = (1..=vms).map(|n| cluster.net.vm_ip(n)).collect();
        let listed = cluster.poll_json(
            &format!("{vms} machines in list-machines"),
            &["list-machines", "--json"],
            |v| {
                v.as_array().is_some_and(|l| {
                    l.len() == vms
                        && addresses
                            .iter()
                            .all(|a| l.iter().any(|m| field(m, "address") == a.as_str()))
                })
            },
        )?;
        cluster.ids = addresses
            .iter()
            .map(|a| {
                listed
                    .as_array()
                    .and_then(|l| l.iter().find(|m| field(m, "address") == a.as_str()))
                    .and_then(|m| field(m, "id").as_str())
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        Ok(cluster)
    }

    /// The cluster's network, etcd and certificates.
    pub fn net(&self) -> &ClusterNet {
        &self.net
    }

    /// The VMs, in order (VM `n` is `vms()[n - 1]`).
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// The machine ids, in VM order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The VM number (1-based) of machine `id`.
    pub fn vm_of(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|i| i == id).map(|i| i + 1)
    }

    /// Pushes `release`'s update payload (`update-oci/`, tag = its version) to the
    /// registry; returns the reference the VMs pull it by (`HOST:PORT/flotilla/os:V`).
    pub fn publish(&self, release: &Release) -> Result<String> {
        let reference = format!("{}/{OS_REPO}:{}", self.registry.host(), release.version);
        let layout = release
            .image
            .join(format!("update-oci:{}", release.version));
        push(&layout, &reference, &["--dest-tls-verify=false"])?;
        Ok(reference)
    }

    /// The registry's settings as an operator's workstation would name it (insecure), for
    /// `fleetctl --registries`.
    pub fn registries_file(&self) -> Result<PathBuf> {
        let path = self.dir.join("operator-registries.toml");
        std::fs::write(
            &path,
            format!("[registry.\"{}\"]\ninsecure = true\n", self.registry.host()),
        )
        .map_err(|e| io_err("write", &path, e))?;
        Ok(path)
    }

    /// The static `fleetctl` with the operator's certificate against VM `n`'s TCP API,
    /// bounded by `timeout`: `(success, stdout, stderr)`.
    pub fn fleetctl_on(
        &self,
        n: usize,
        args: &[&str],
        timeout: Duration,
    ) -> Result<(bool, String, String)> {
        let op = self.net.operator();
        let mut cmd = Command::new(&self.fleetctl);
        cmd.arg("--endpoint")
            .arg(format!("https://{}:{FLEETD_PORT}", self.net.vm_ip(n)))
            .arg("--ca")
            .arg(self.net.ca_cert())
            .arg("--cert")
            .arg(&op.cert)
            .arg("--key")
            .arg(&op.key)
            .args(args);
        run_bounded(cmd, timeout)
    }

    /// [`RollingCluster::fleetctl_on`] on the VMs in turn, the one that answered last
    /// first, each bounded by a minute, until one succeeds (a VM may be rebooting); the
    /// last failure otherwise.
    pub fn fleetctl(&self, args: &[&str]) -> Result<(bool, String, String)> {
        self.fleetctl_with(args, COMMAND)
    }

    /// [`RollingCluster::fleetctl`] with each VM's run bounded by `per_vm`.
    pub fn fleetctl_with(&self, args: &[&str], per_vm: Duration) -> Result<(bool, String, String)> {
        let total = self.vms.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last = (false, String::new(), String::from("no VM"));
        for k in 0..total {
            let i = (first + k) % total;
            let out = self.fleetctl_on(i + 1, args, per_vm)?;
            if out.0 {
                self.preferred.store(i, Ordering::Relaxed);
                return Ok(out);
            }
            last = out;
        }
        Ok(last)
    }

    /// `fleetctl ARGS` (a query ending in `--json`) parsed, each VM's run bounded by ten
    /// seconds; `None` while no VM answers with JSON.
    pub fn fleetctl_json(&self, args: &[&str]) -> Result<Option<serde_json::Value>> {
        let (ok, out, _) = self.fleetctl_with(args, QUERY)?;
        Ok(ok.then(|| serde_json::from_str(&out).ok()).flatten())
    }

    /// Asks `fleetctl ARGS` every second until its JSON satisfies `done` (at most
    /// [`SETTLE`]); the error names `what` and the last answer.
    pub fn poll_json(
        &self,
        what: &str,
        args: &[&str],
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let v = self.fleetctl_json(args)?;
            if let Some(v) = v.as_ref().filter(|v| done(v)) {
                return Ok(v.clone());
            }
            if start.elapsed() > SETTLE {
                return Err(QemuError::Setup(format!(
                    "gave up after {SETTLE:?} waiting for {what}; last answer of fleetctl {}: {v:?}",
                    args.join(" ")
                )));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Submits and starts `units` (name, text) from the host (`fleetctl start`), waiting
    /// for them to be placed.
    pub fn start_units(&self, units: &[(&str, &str)]) -> Result<()> {
        let mut args = vec!["start".to_string(), "--block-timeout".into(), "240s".into()];
        for (name, text) in units {
            let path = self.dir.join(format!("{name}.toml"));
            std::fs::write(&path, text).map_err(|e| io_err("write", &path, e))?;
            args.push(path.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = self.fleetctl_with(&args, START)?;
        if !ok {
            return Err(QemuError::Setup(format!("fleetctl start: {out}{err}")));
        }
        Ok(())
    }

    /// The `(unit, machine id)` pairs `list-units` shows active, sorted.
    pub fn active_units(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .fleetctl_json(&["list-units", "--json"])?
            .map(|v| crate::cluster::active_in(&v))
            .unwrap_or_default())
    }

    /// The machines present in the registry: the `machines/` keys in etcd.
    pub fn present(&self) -> Result<usize> {
        let mut cmd = self.net.etcdctl()?;
        cmd.args([
            "get",
            &format!("{PREFIX}machines/"),
            "--prefix",
            "--keys-only",
        ]);
        let (ok, out, err) = run_bounded(cmd, COMMAND)?;
        if !ok {
            return Err(QemuError::Setup(format!("etcdctl get machines/: {err}")));
        }
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
    }

    /// One probe of the service on VM `n`'s address: an HTTP/1.0 `GET /` answered `200`.
    pub fn probe(&self, n: usize) -> std::result::Result<(), String> {
        probe_http(&self.net.vm_ip(n), SERVICE_PORT)
    }

    /// Rolls `reference` (a payload of `version`) through the cluster: `fleetctl os update
    /// REFERENCE --max-unavailable N` plus `args` from the host, then `fleetctl os status
    /// --json` every two seconds until the rollout's state is `finished` or `halted` (at
    /// most `patience`), printing each machine's step changes; meanwhile a thread probes
    /// the service every [`PROBE_EVERY`] ([`Round`]) and another counts the machines present
    /// every [`COUNT_EVERY`] ([`Count`]).
    pub fn roll(
        &self,
        reference: &str,
        version: &str,
        max_unavailable: usize,
        args: &[&str],
        patience: Duration,
    ) -> Result<RolloutRun> {
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        std::thread::scope(|scope| {
            let prober = scope.spawn(|| self.probe_rounds(started, &stop));
            let counter = scope.spawn(|| self.count_rounds(started, &stop));
            let followed =
                self.start_and_follow(reference, version, max_unavailable, args, patience, started);
            stop.store(true, Ordering::Relaxed);
            let rounds = prober
                .join()
                .map_err(|_| QemuError::Setup("the prober thread panicked".into()))?;
            let counts = counter
                .join()
                .map_err(|_| QemuError::Setup("the counting thread panicked".into()))?;
            let (state, secs, status, steps) = followed?;
            Ok(RolloutRun {
                version: version.to_string(),
                max_unavailable,
                state,
                secs,
                status,
                rounds,
                counts,
                steps,
            })
        })
    }

    /// The prober: every [`PROBE_EVERY`] until `stop`, the service on each VM in turn (the
    /// one that answered last first) until one answers.
    fn probe_rounds(&self, started: Instant, stop: &AtomicBool) -> Vec<Round> {
        let total = self.vms.len();
        let mut rounds = Vec::new();
        let mut first = 0;
        while !stop.load(Ordering::Relaxed) {
            let began = Instant::now();
            let at = started.elapsed().as_secs_f64();
            let mut misses = Vec::new();
            let mut answered = None;
            for k in 0..total {
                let i = (first + k) % total;
                match self.probe(i + 1) {
                    Ok(()) => {
                        answered = Some(i + 1);
                        first = i;
                        break;
                    }
                    Err(e) => misses.push(format!("vm{}: {e}", i + 1)),
                }
            }
            rounds.push(Round {
                at,
                answered,
                misses,
            });
            if let Some(rest) = PROBE_EVERY.checked_sub(began.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        rounds
    }

    /// The counter: every [`COUNT_EVERY`] until `stop`, the machines present.
    fn count_rounds(&self, started: Instant, stop: &AtomicBool) -> Vec<Count> {
        let mut counts = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let began = Instant::now();
            let at = started.elapsed().as_secs_f64();
            counts.push(Count {
                at,
                present: self.present().ok(),
            });
            if let Some(rest) = COUNT_EVERY.checked_sub(began.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        counts
    }

    /// Sends `fleetctl os update` and follows the rollout: `(state, seconds, last status,
    /// step lines)`.
    fn start_and_follow(
        &self,
        reference: &str,
        version: &str,
        max_unavailable: usize,
        args: &[&str],
        patience: Duration,
        started: Instant,
    ) -> Result<(String, f64, serde_json::Value, Vec<String>)> {
        let n = max_unavailable.to_string();
        let mut update = vec!["os", "update", reference, "--max-unavailable", &n];
        update.extend_from_slice(args);
        let (ok, out, err) = self.fleetctl(&update)?;
        println!("$ fleetctl {}\n{}{}", update.join(" "), out, err);
        if !ok {
            return Err(QemuError::Setup(format!(
                "fleetctl {} failed: {out}{err}",
                update.join(" ")
            )));
        }
        let mut steps = Vec::new();
        let mut seen: Vec<(String, String)> = Vec::new();
        let mut status = serde_json::Value::Null;
        loop {
            let answer = self.fleetctl_json(&["os", "status", "--json"])?;
            // When the answer came (a VM that is rebooting may have been asked first).
            let at = started.elapsed().as_secs_f64();
            if let Some(now) = answer {
                status = now;
                let rollout = field(&status, "rollout");
                for m in field(rollout, "machines").as_array().into_iter().flatten() {
                    let id = field(m, "id").as_str().unwrap_or_default().to_string();
                    let step = field(m, "step").as_str().unwrap_or_default().to_string();
                    if seen.iter().any(|(i, s)| *i == id && *s == step) {
                        continue;
                    }
                    seen.retain(|(i, _)| *i != id);
                    seen.push((id.clone(), step.clone()));
                    let name = self
                        .vm_of(&id)
                        .map_or_else(|| id.clone(), |v| format!("vm{v}"));
                    let reason = field(m, "reason")
                        .as_str()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default();
                    let line = format!("[{at:>7.1} s] {name} {step}{reason}");
                    println!("{line}");
                    steps.push(line);
                }
                let state = field(rollout, "state").as_str().unwrap_or_default();
                let target = field(rollout, "version").as_str().unwrap_or_default();
                if target == version && (state == "finished" || state == "halted") {
                    return Ok((state.to_string(), at, status, steps));
                }
            }
            if started.elapsed() > patience {
                return Ok((
                    format!("gave up after {patience:?} (the rollout still running)"),
                    at,
                    status,
                    steps,
                ));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

/// `value[key]` without indexing: `Null` when `value` has no `key`.
pub fn field<'a>(value: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    static NULL: serde_json::Value = serde_json::Value::Null;
    value.get(key).unwrap_or(&NULL)
}

/// An HTTP/1.0 `GET /` to `ip:port`, which must answer `200` (bounded connect and read).
pub fn probe_http(ip: &str, port: u16) -> std::result::Result<(), String> {
    let addr: SocketAddr = format!("{ip}:{port}")
        .parse()
        .map_err(|e| format!("address {ip}:{port}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, PROBE_CONNECT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(PROBE_ANSWER))
        .and_then(|()| s.set_write_timeout(Some(PROBE_ANSWER)))
        .map_err(|e| format!("socket: {e}"))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: service\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let status = answer.lines().next().unwrap_or_default();
    if status.starts_with("HTTP/1.") && status.contains(" 200") {
        Ok(())
    } else {
        Err(format!("answered {status:?}"))
    }
}

/// Runs `cmd` with its output captured, killing it after `timeout`: `(success, stdout,
/// stderr)`; a killed command is a failure whose stderr says so.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<(bool, String, String)> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io_err("run", Path::new(&shown), e))?;
    let readers: Vec<std::thread::JoinHandle<String>> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|stream| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut s) = stream {
                let mut bytes = Vec::new();
                let _ = s.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(io_err("wait for", Path::new(&shown), e)),
        }
    };
    let mut texts = readers.into_iter().map(|h| h.join().unwrap_or_default());
    let (out, mut err) = (
        texts.next().unwrap_or_default(),
        texts.next().unwrap_or_default(),
    );
    match status {
        Some(s) => Ok((s.success(), out, err)),
        None => {
            err.push_str(&format!("\n(killed after {timeout:?})"));
            Ok((false, out, err))
        }
    }
}
