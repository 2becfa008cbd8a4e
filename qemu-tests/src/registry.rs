//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) started on a
//! given address, with htpasswd basic auth and TLS when asked, its access log in a file the
//! tests count requests in; and `skopeo copy` to push OCI layouts into it.

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ensure_program, free_port, io_err, QemuError, Result};

/// How a [`TestRegistry`] is started.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions<'a> {
    /// The address it listens on; `127.0.0.1` when `None`.
    pub ip: Option<&'a str>,
    /// htpasswd basic auth with this user and password.
    pub creds: Option<(&'a str, &'a str)>,
    /// TLS with this certificate and key (PEM files).
    pub tls: Option<(&'a Path, &'a Path)>,
    /// Extra YAML appended to the configuration (e.g. an `auth: token:` section instead of
    /// `creds`).
    pub extra_yaml: Option<&'a str>,
}

/// A `docker-registry` process, killed when dropped. Its storage, configuration and log
/// live in the directory it was started in.
#[derive(Debug)]
pub struct TestRegistry {
    child: Child,
    ip: String,
    port: u16,
    dir: PathBuf,
}

impl TestRegistry {
    /// Starts a registry on 127.0.0.1 in `dir`, with htpasswd basic auth and TLS when given.
    pub fn start(
        dir: &Path,
        creds: Option<(&str, &str)>,
        tls: Option<(&Path, &Path)>,
    ) -> Result<TestRegistry> {
        Self::start_with(
            dir,
            &RegistryOptions {
                creds,
                tls,
                ..Default::default()
            },
        )
    }

    /// Starts a registry in `dir` as `opts` says, and waits (patiently) until it listens.
    pub fn start_with(dir: &Path, opts: &RegistryOptions<'_>) -> Result<TestRegistry> {
        let bin = ensure_program("docker-registry", "docker-registry")?;
        let ip = opts.ip.unwrap_or("127.0.0.1").to_string();
        let port = free_port()?;
        fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {ip}:{port}\n",
            dir.join("storage").display()
        );
        if let Some((cert, key)) = opts.tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((user, pass)) = opts.creds {
            let htpasswd = ensure_program("htpasswd", "apache2-utils")?;
            let out = Command::new(&htpasswd)
                .args(["-Bbn", user, pass])
                .output()
                .map_err(|e| io_err("run", &htpasswd, e))?;
            if !out.status.success() {
                return Err(QemuError::Setup(format!(
                    "htpasswd failed: {:?}",
                    out.status
                )));
            }
            let file = dir.join("htpasswd");
            fs::write(&file, &out.stdout).map_err(|e| io_err("write", &file, e))?;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n",
                file.display()
            ));
        }
        if let Some(extra) = opts.extra_yaml {
            yaml.push_str(extra);
        }
        let config = dir.join("config.yml");
        fs::write(&config, yaml).map_err(|e| io_err("write", &config, e))?;
        let log_path = dir.join("registry.log");
        let log = fs::File::create(&log_path).map_err(|e| io_err("create", &log_path, e))?;
        let err = log.try_clone().map_err(|e| io_err("open", &log_path, e))?;
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| io_err("run", &bin, e))?;
        let reg = TestRegistry {
            child,
            ip,
            port,
            dir: dir.to_path_buf(),
        };
        // Patience bound only: a stalled box may take a while to start it.
        let deadline = Instant::now() + Duration::from_secs(120);
        while TcpStream::connect((reg.ip.as_str(), port)).is_err() {
            if Instant::now() >= deadline {
                return Err(QemuError::Setup(format!(
                    "the registry did not listen on {}: {}",
                    reg.host(),
                    reg.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(reg)
    }

    /// `ip:port`, the registry part of references to it.
    pub fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log so far (access log included).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("registry.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Access-log lines of successful GETs of blob `digest`.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
            .filter(|l| l.contains("\" 200 "))
            .count()
    }

    /// The registry's file holding blob `digest` (`sha256:<hex>`).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(hex))
            .join(hex)
            .join("data")
    }

    /// Stops it (also done on drop).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `skopeo copy` of the OCI layout `layout` to `docker://DEST` (`host:port/repo:tag`), with
/// `extra` skopeo options (e.g. `--dest-tls-verify=false`, `--dest-creds=u:p`).
pub fn push(layout: &Path, dest: &str, extra: &[&str]) -> Result<()> {
    let skopeo = ensure_program("skopeo", "skopeo")?;
    let out = Command::new(&skopeo)
        .arg("--insecure-policy")
        .arg("copy")
        .args(extra)
        .arg(format!("oci:{}", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .map_err(|e| io_err("run", &skopeo, e))?;
    if !out.status.success() {
        return Err(QemuError::Setup(format!(
            "skopeo copy to {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A one-layer OCI layout of a static busybox (`/bin/sh`, `cat`, `sleep`, `true`) whose
/// `/hello` says `hello`, written to `dir/layout` (the tree and the layer tar beside it).
/// Returns the layout and its layer's (compressed) digest, the one a registry's access log
/// names.
pub fn busybox_layout(dir: &Path, hello: &str) -> Result<(PathBuf, String)> {
    use flotilla_container::image::{write_oci_layout, RuntimeConfig};
    let busybox = ensure_program("busybox", "busybox-static")?;
    let root = dir.join("root");
    let bin = root.join("bin");
    fs::create_dir_all(&bin).map_err(|e| io_err("create", &bin, e))?;
    let target = bin.join("busybox");
    fs::copy(&busybox, &target).map_err(|e| io_err("copy busybox to", &target, e))?;
    for applet in ["true", "sh", "cat", "sleep"] {
        let link = bin.join(applet);
        std::os::unix::fs::symlink("busybox", &link).map_err(|e| io_err("link", &link, e))?;
    }
    let file = root.join("hello");
    fs::write(&file, hello).map_err(|e| io_err("write", &file, e))?;
    let tar = dir.join("layer.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .map_err(|e| io_err("run tar for", &tar, e))?;
    if !status.success() {
        return Err(QemuError::Setup(format!(
            "tar of {} failed",
            root.display()
        )));
    }
    let config = RuntimeConfig {
        env: vec!["PATH=/bin".into()],
        cmd: vec!["/bin/sh".into()],
        ..Default::default()
    };
    let layout = dir.join("layout");
    write_oci_layout(&layout, &[tar], &config, "app:1")
        .map_err(|e| QemuError::Setup(format!("write the OCI layout {}: {e}", layout.display())))?;
    let layer = layer_digest(&layout)?;
    Ok((layout, layer))
}

/// The digest of the first layer of the (first) image in the OCI layout `layout`.
fn layer_digest(layout: &Path) -> Result<String> {
    let read = |path: &Path| -> Result<serde_json::Value> {
        let bytes = fs::read(path).map_err(|e| io_err("read", path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| QemuError::Setup(format!("{} is not JSON: {e}", path.display())))
    };
    let index = read(&layout.join("index.json"))?;
    let hex = index
        .pointer("/manifests/0/digest")
        .and_then(serde_json::Value::as_str)
        .and_then(|d| d.strip_prefix("sha256:"))
        .ok_or_else(|| QemuError::Setup(format!("{} names no manifest", layout.display())))?;
    let manifest = read(&layout.join("blobs/sha256").join(hex))?;
    manifest
        .pointer("/layers/0/digest")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            QemuError::Setup(format!("the manifest in {} has no layer", layout.display()))
        })
}
