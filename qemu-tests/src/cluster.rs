//! A fleet cluster of host-image VMs on one host: a Linux bridge with one tap per VM, etcd
//! (Debian's etcd-server) listening on the bridge's address, and per VM a copy of the image
//! ([`crate::images::machine_copy`]) booted with a provisioning config that gives it an
//! address on the bridge, metadata, and `[fleet] etcd` naming that etcd. Used by
//! `tests/cluster.rs` and `flotilla-vm cluster`. Needs root and iproute2.
//!
//! Everything is mutual TLS, as a real cluster's should be: a cluster CA ([`crate::pki`])
//! issues etcd's certificate, one machine certificate per VM (`OU=machine`, its address in
//! the subjectAltName; provisioned inline as `[fleet] ca`, `cert`, `key`) and an operator's
//! for the host; etcd runs with `--client-cert-auth`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pki::{pem, Ca, Cert, Usage};
use crate::{
    ensure_program, free_port, http_get, io_err, BootOptions, QemuError, Result, Shell, Vm,
};

/// How long etcd may take to answer after it starts.
const ETCD_READY: Duration = Duration::from_secs(60);
/// The port of every VM's fleetd TCP API (`[fleet] listen`).
pub const FLEETD_PORT: u16 = 4002;
/// The bound on one command in a guest's shell.
const SHELL_COMMAND: Duration = Duration::from_secs(60);

/// Runs `ip ARGS`, which must succeed.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io_err("run", Path::new("ip"), e))?;
    if !out.status.success() {
        return Err(QemuError::Setup(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The host side of a VM cluster: a bridge, a tap per VM, and etcd on the bridge's
/// address; all of it removed (etcd killed) on drop.
pub struct ClusterNet {
    bridge: String,
    taps: Vec<String>,
    /// `10.x.y` of the bridge's /24.
    subnet: String,
    etcd: Option<Child>,
    etcd_log: PathBuf,
    endpoint: String,
    ca: Ca,
    operator: Cert,
    reader: Cert,
    /// Registries (`host:port`) the VMs' provisioning marks insecure (plain HTTP).
    insecure_registries: Vec<String>,
}

impl ClusterNet {
    /// Creates the bridge (`10.201-202.x.1/24`, apart from fleetd's namespace clusters in
    /// 10.100-199) with `vms` taps, and starts etcd in `dir` (its data and log). etcd is
    /// `$FLOTILLA_ETCD` or `etcd` (installed from Debian's etcd-server if missing).
    pub fn new(dir: &Path, vms: usize) -> Result<ClusterNet> {
        let pid = std::process::id();
        let tag = format!("{:x}", pid % 0xfffff);
        let mut net = ClusterNet {
            bridge: format!("fqb{tag}"),
            taps: Vec::new(),
            subnet: format!("10.{}.{}", 201 + pid % 2, (pid / 2) % 250),
            etcd: None,
            etcd_log: dir.join("etcd.log"),
            endpoint: String::new(),
            ca: Ca::new(dir, "flotilla test cluster")?,
            operator: Cert {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            reader: Cert {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            insecure_registries: Vec::new(),
        };
        // Issued now, before any VM boots: a guest's clock under TCG lags the host's by a
        // few seconds, and a certificate issued later may not be valid yet there.
        net.operator = net.ca.issue("operator", "operator", Usage::Client)?;
        net.reader = net.ca.issue("reader", "reader", Usage::Client)?;
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        let cidr = format!("{}/24", net.host_ip());
        ip(&["addr", "add", &cidr, "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for n in 1..=vms {
            let tap = format!("fqt{tag}-{n}");
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            net.taps.push(tap.clone());
            ip(&["link", "set", &tap, "master", &net.bridge, "up"])?;
        }
        net.start_etcd(dir)?;
        Ok(net)
    }

    /// The host's address on the bridge: etcd's, and the VMs' gateway.
    pub fn host_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// VM `n`'s address (1-based).
    pub fn vm_ip(&self, n: usize) -> String {
        format!("{}.{}", self.subnet, 10 + n)
    }

    /// etcd's client URL on the bridge.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The cluster CA's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.ca.cert()
    }

    /// An operator's client certificate (`OU=operator`), for `fleetctl --ca --cert --key`
    /// from the host.
    pub fn operator(&self) -> &Cert {
        &self.operator
    }

    /// A reader's client certificate (`OU=reader`).
    pub fn reader(&self) -> &Cert {
        &self.reader
    }

    /// Marks the registry at `host` (`ip:port`, e.g. a
    /// [`crate::registry::TestRegistry`] on [`ClusterNet::host_ip`]) insecure (plain HTTP) in
    /// the provisioning of the VMs booted from now on: `[registries]`, which init renders as
    /// `/etc/flotilla/registries.toml`, the settings the VMs' pulls read.
    pub fn insecure_registry(&mut self, host: &str) {
        self.insecure_registries.push(host.to_string());
    }

    /// etcd's log so far.
    pub fn etcd_log(&self) -> String {
        std::fs::read_to_string(&self.etcd_log).unwrap_or_default()
    }

    fn start_etcd(&mut self, dir: &Path) -> Result<()> {
        let bin = match std::env::var_os("FLOTILLA_ETCD") {
            Some(bin) => PathBuf::from(bin),
            None => ensure_program("etcd", "etcd-server")?,
        };
        let (client, peer, metrics) = (free_port()?, free_port()?, free_port()?);
        let server = self
            .ca
            .issue("etcd", "etcd", Usage::Node(&self.host_ip()))?;
        self.endpoint = format!("https://{}:{client}", self.host_ip());
        let listen = format!("{},https://127.0.0.1:{client}", self.endpoint);
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(&self.etcd_log)
            .map_err(|e| io_err("create", &self.etcd_log, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| io_err("open", &self.etcd_log, e))?;
        let child = Command::new(&bin)
            .args(["--name", "vms"])
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("vms={peer_url}")])
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(self.ca.cert())
            .arg("--cert-file")
            .arg(&server.cert)
            .arg("--key-file")
            .arg(&server.key)
            // Health over plain HTTP on loopback only: the client port wants a certificate.
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{metrics}"),
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| io_err("start", &bin, e))?;
        self.etcd = Some(child);
        let start = Instant::now();
        while !http_get(metrics, "/health").is_ok_and(|r| r.contains("\"true\"")) {
            if start.elapsed() > ETCD_READY {
                return Err(QemuError::Setup(format!(
                    "etcd did not become healthy in {ETCD_READY:?}:\n{}",
                    self.etcd_log()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// VM `n`'s `-nic`: its tap, with a MAC of its own (QEMU's default is the same for all).
    pub fn nic(&self, n: usize) -> Result<String> {
        let tap = n
            .checked_sub(1)
            .and_then(|i| self.taps.get(i))
            .ok_or_else(|| QemuError::Setup(format!("no tap for VM {n}")))?;
        Ok(format!(
            "tap,ifname={tap},script=no,downscript=no,model=virtio-net-pci,mac=52:54:00:f1:00:{n:02x}"
        ))
    }

    /// VM `n`'s provisioning: hostname `vm<n>`, its address with the host as gateway,
    /// `role` metadata, and `[fleet]`: this etcd, the lease TTL, fleetd's TCP API on port
    /// [`FLEETD_PORT`] over mutual TLS with the VM's own machine certificate, also its etcd
    /// client certificate (the image's fleetd unit reads them from /etc/flotilla; list-machines
    /// shows eth0's address); and `[registries]` when [`ClusterNet::insecure_registry`] named
    /// any.
    pub fn provisioning(&self, n: usize, role: &str, ttl_secs: u64) -> Result<String> {
        let machine = self
            .ca
            .issue(&format!("vm{n}"), "machine", Usage::Node(&self.vm_ip(n)))?;
        let mut registries = String::new();
        if !self.insecure_registries.is_empty() {
            registries.push_str("[registries]\n");
            for host in &self.insecure_registries {
                registries.push_str(&format!(
                    "[registries.registry.\"{host}\"]\ninsecure = true\n"
                ));
            }
        }
        Ok(format!(
            r#"hostname = "vm{n}"
[network]
address = "{ip}/24"
gateway = "{gw}"
[metadata]
role = "{role}"
[fleet]
etcd = ["{endpoint}"]
ttl = {ttl_secs}
listen = "0.0.0.0:{FLEETD_PORT}"
ca = """
{ca}"""
cert = """
{cert}"""
key = """
{key}"""
{registries}"#,
            ip = self.vm_ip(n),
            gw = self.host_ip(),
            endpoint = self.endpoint,
            ca = pem(&self.ca.cert())?,
            cert = pem(&machine.cert)?,
            key = pem(&machine.key)?,
        ))
    }

    /// Boots VM `n` like a real machine ([`Vm::boot_disk`]: OVMF, systemd-boot, its own
    /// sparse copy of the image's `disk.img` and of the firmware's variables; a guest reboot
    /// comes back on the same copies) on this network, with [`ClusterNet::provisioning`]
    /// plus `extra` (more provisioning TOML, e.g. `[os] commit_after = "5s"`) on fw_cfg,
    /// and the debug shell. The provisioning file is written beside the image
    /// (`vmN-disk/provision.toml`).
    pub fn boot_disk(
        &self,
        image: &Path,
        n: usize,
        role: &str,
        ttl_secs: u64,
        extra: &str,
    ) -> Result<Vm> {
        let dir = image.with_file_name(format!("vm{n}-disk"));
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create", &dir, e))?;
        let config = dir.join("provision.toml");
        let text = format!("{}{extra}", self.provisioning(n, role, ttl_secs)?);
        std::fs::write(&config, text).map_err(|e| io_err("write", &config, e))?;
        Vm::boot_disk(
            image,
            &BootOptions {
                extra_args: vec![
                    "-fw_cfg".into(),
                    format!("name=opt/org.flotilla/config,file={}", config.display()),
                ],
                nic: Some(self.nic(n)?),
                debug_shell: true,
                ..BootOptions::default()
            },
        )
    }

    /// `etcdctl` (API 3) against this etcd as the operator (etcd runs with
    /// `--client-cert-auth`); Debian's `etcd-client` is installed if missing.
    pub fn etcdctl(&self) -> Result<Command> {
        let bin = ensure_program("etcdctl", "etcd-client")?;
        let mut cmd = Command::new(bin);
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "--cacert"])
            .arg(self.ca.cert())
            .arg("--cert")
            .arg(&self.operator.cert)
            .arg("--key")
            .arg(&self.operator.key);
        Ok(cmd)
    }

    /// Boots VM `n` from its own copy of `image` (made beside it, `vmN/`) on this network
    /// with [`ClusterNet::provisioning`] on fw_cfg and the debug shell.
    pub fn boot(&self, image: &Path, n: usize, role: &str, ttl_secs: u64) -> Result<Vm> {
        let copy = image.with_file_name(format!("vm{n}"));
        let copy = crate::images::machine_copy(image, &copy)?;
        let config = copy.join("provision.toml");
        std::fs::write(&config, self.provisioning(n, role, ttl_secs)?)
            .map_err(|e| io_err("write", &config, e))?;
        Vm::boot_with(
            &copy,
            &BootOptions {
                extra_args: vec![
                    "-fw_cfg".into(),
                    format!("name=opt/org.flotilla/config,file={}", config.display()),
                ],
                nic: Some(self.nic(n)?),
                debug_shell: true,
                ..BootOptions::default()
            },
        )
    }
}

impl Drop for ClusterNet {
    fn drop(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        for dev in self.taps.iter().chain([&self.bridge]) {
            let _ = Command::new("ip")
                .args(["link", "del", dev])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `fleetctl VERB --json` in a guest, parsed; `None` while it fails (no leader yet, etcd
/// not reached yet, ...).
pub fn fleetctl_json(sh: &mut Shell, verb: &str) -> Result<Option<serde_json::Value>> {
    let out = sh.run(&format!("fleetctl {verb} --json"), SHELL_COMMAND)?;
    Ok((out.status == 0)
        .then(|| serde_json::from_str(&out.output).ok())
        .flatten())
}

/// The `(unit, machine id)` pairs `list-units` shows `active`, sorted (a global unit has a
/// state per machine).
pub fn active_units(sh: &mut Shell) -> Result<Vec<(String, String)>> {
    Ok(fleetctl_json(sh, "list-units")?
        .map(|v| active_in(&v))
        .unwrap_or_default())
}

/// The `(unit, machine id)` pairs a `list-units --json` answer shows `active`, sorted.
pub fn active_in(list: &serde_json::Value) -> Vec<(String, String)> {
    let Some(units) = list.as_array() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for u in units {
        let name = u["name"].as_str().unwrap_or_default();
        for s in u["states"].as_array().into_iter().flatten() {
            if s["state"] == "active" {
                let machine = s["machine"].as_str().unwrap_or_default();
                out.push((name.to_string(), machine.to_string()));
            }
        }
    }
    out.sort();
    out
}

/// The machine ids `list-machines` shows, by address.
pub fn machines(sh: &mut Shell) -> Result<Vec<(String, String)>> {
    let Some(serde_json::Value::Array(list)) = fleetctl_json(sh, "list-machines")? else {
        return Ok(Vec::new());
    };
    let field = |m: &serde_json::Value, k: &str| m[k].as_str().unwrap_or_default().to_string();
    let mut out: Vec<(String, String)> = list
        .iter()
        .map(|m| (field(m, "address"), field(m, "id")))
        .collect();
    out.sort();
    Ok(out)
}

/// Asks `probe` every second until `done` holds for its answer, for at most `timeout`;
/// the error names `what` and the last answer.
pub fn poll<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T>,
    done: impl Fn(&T) -> bool,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let v = probe()?;
        if done(&v) {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(QemuError::Setup(format!(
                "gave up after {timeout:?} waiting for {what}; last: {v:?}"
            )));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Writes `text` to `path` in a guest (a here-document through its shell).
pub fn write_file(sh: &mut Shell, path: &str, text: &str) -> Result<()> {
    sh.ok(&format!("cat > {path} <<'EOF'\n{text}EOF"), SHELL_COMMAND)?;
    Ok(())
}

/// A global unit: on every machine.
pub const GLOBAL_UNIT: &str = r#"[unit]
description = "on every machine"
[container]
command = ["/bin/sh", "-c", "echo global unit up on $(cat /etc/hostname); exec sleep 100000"]
[fleet]
global = true
"#;

/// A service for one machine with `role = worker`, restarted when it exits.
pub const SERVICE_UNIT: &str = r#"[unit]
description = "one instance, on a worker"
[container]
command = ["/bin/sh", "-c", "echo service up on $(cat /etc/hostname); exec sleep 100000"]
[service]
restart = "always"
[fleet]
machine_metadata = ["role=worker"]
"#;
