//! Boots Flotilla host images (built by `image-build os`) in QEMU and checks them from the
//! outside: the serial console is captured into a buffer and a log file, QMP is on a Unix
//! socket, and the VM is always killed when its [`Vm`] is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod images;
pub mod pki;
pub mod registry;
pub mod rolling;
mod shell;
pub mod update_payloads;
pub use image_build::hostroot::is_static_elf;
pub use image_build::static_build::{workspace_root, STATIC_BINARIES};
pub use shell::{CommandOutput, Shell};

use image_build::process::find_program;
use image_build::static_build::StaticBuild;
use image_build::PathIoError;

/// What went wrong with a VM.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A file or process operation failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// The image's manifest.json is missing or malformed.
    #[error("manifest {}: {detail}", path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A pattern did not show up on the console in time.
    #[error("{pattern:?} not on the console after {timeout:?}{}; console ends with:\n{tail}", if *exited { " (QEMU exited)" } else { "" })]
    Timeout {
        /// The pattern.
        pattern: String,
        /// How long we waited.
        timeout: Duration,
        /// QEMU had exited.
        exited: bool,
        /// Last lines of the console.
        tail: String,
    },
    /// A QMP exchange failed.
    #[error("QMP: {0}")]
    Qmp(String),
    /// Building or checking a helper binary failed.
    #[error("{0}")]
    Setup(String),
    /// An image-build helper (program lookup, ELF check) failed.
    #[error(transparent)]
    Build(#[from] image_build::BuildError),
}

fn io_err(action: &str, path: &Path, e: std::io::Error) -> QemuError {
    QemuError::Io(PathIoError::new(action, path, e))
}

/// Result of this crate.
pub type Result<T, E = QemuError> = std::result::Result<T, E>;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Environment variable: accelerator used instead of `tcg` (e.g. `kvm`).
pub const ACCEL_ENV: &str = "FLOTILLA_QEMU_ACCEL";

/// Makes sure a program exists, installing its Debian package with apt-get if not (said
/// on stderr). Returns its path.
pub fn ensure_program(program: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = find_program(program) {
        return Ok(p);
    }
    eprintln!("{program} is not installed: installing the Debian package {package} with apt-get");
    let install = || {
        Command::new("apt-get")
            // Tests boot VMs in parallel: wait for another install's dpkg lock, don't fail.
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let ok = install().is_ok_and(|s| s.success())
        || (Command::new("apt-get")
            .arg("update")
            .status()
            .is_ok_and(|s| s.success())
            && install().is_ok_and(|s| s.success()));
    if !ok {
        return Err(QemuError::Setup(format!(
            "apt-get install {package} failed"
        )));
    }
    find_program(program)
        .ok_or_else(|| QemuError::Setup(format!("{package} installed but no {program} found")))
}

/// The QEMU arguments of an image (its `manifest.json` `qemu.args`: the direct kernel
/// boot), with the accelerator replaced by `$FLOTILLA_QEMU_ACCEL` when that is set.
pub fn manifest_args(image_dir: &Path) -> Result<Vec<String>> {
    manifest_args_of(image_dir, "args")
}

/// An image's `manifest.json`, parsed.
fn read_manifest(image_dir: &Path) -> Result<serde_json::Value> {
    let path = image_dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err("read", &path, e))?;
    serde_json::from_str(&text).map_err(|e| QemuError::Manifest {
        path,
        detail: e.to_string(),
    })
}

/// [`manifest_args`] of the manifest's `qemu.KEY` (`args` or `disk_args`).
pub fn manifest_args_of(image_dir: &Path, key: &str) -> Result<Vec<String>> {
    let path = image_dir.join("manifest.json");
    let bad = |detail: String| QemuError::Manifest {
        path: path.clone(),
        detail,
    };
    let v = read_manifest(image_dir)?;
    let mut args: Vec<String> = v
        .get("qemu")
        .and_then(|q| q.get(key))
        .and_then(|a| a.as_array())
        .ok_or_else(|| {
            bad(format!(
                "no qemu.{key} (rebuild the image with image-build os)"
            ))
        })?
        .iter()
        .map(|a| {
            a.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("{a} is not a string")))
        })
        .collect::<Result<_>>()?;
    let accel = std::env::var(ACCEL_ENV).ok().filter(|a| !a.is_empty());
    if let Some(accel) = accel {
        match args.iter().position(|a| a == "-accel") {
            Some(i) => {
                if let Some(value) = args.get_mut(i + 1) {
                    *value = accel;
                }
            }
            None => args.extend(["-accel".to_string(), accel]),
        }
    } else if !args.iter().any(|a| a == "-accel") {
        args.extend(["-accel".to_string(), "tcg".to_string()]);
    }
    Ok(args)
}

/// The value of the manifest's user-mode `-nic` argument, for `purpose`.
fn user_nic<'a>(args: &'a mut [String], image_dir: &Path, purpose: &str) -> Result<&'a mut String> {
    args.iter_mut()
        .find(|a| a.starts_with("user,") || a.as_str() == "user")
        .ok_or_else(|| QemuError::Manifest {
            path: image_dir.join("manifest.json"),
            detail: format!("no user-mode NIC (-nic user,...) to {purpose}"),
        })
}

/// The guest terminal of the debug shell (a virtio console).
pub const DEBUG_SHELL_TTY: &str = "hvc0";

/// How to boot a VM beyond its manifest.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// More QEMU arguments (after the manifest's).
    pub extra_args: Vec<String>,
    /// More kernel command-line words (appended to the manifest's `-append`).
    pub cmdline: Vec<String>,
    /// Host ports forwarded to guest ports over the manifest's user-mode NIC
    /// (`hostfwd=tcp:127.0.0.1:HOST-:GUEST`), as (host, guest).
    pub host_forwards: Vec<(u16, u16)>,
    /// Replaces the manifest's user-mode NIC (`-nic user,...`): the value of `-nic`, e.g.
    /// `tap,ifname=tap0,script=no,downscript=no,model=virtio-net-pci,mac=52:54:00:00:00:01`
    /// to put the guest on a host bridge. Excludes `host_forwards`.
    pub nic: Option<String>,
    /// Start the guest's debug shell (`flotilla.debug_shell=hvc0`) on a virtio console
    /// whose other end [`Vm::shell`] connects to.
    pub debug_shell: bool,
    /// [`Vm::boot_disk`] only: files written into the disk copy's ESP before the boot, as
    /// (path on the ESP, text), e.g. another boot loader entry.
    pub esp_files: Vec<(String, String)>,
}

#[derive(Default)]
struct Console {
    text: Mutex<String>,
    changed: Condvar,
    closed: Mutex<bool>,
}

/// A running QEMU guest.
pub struct Vm {
    child: Mutex<Child>,
    pid: u32,
    console: Arc<Console>,
    qmp: Mutex<Option<BufReader<UnixStream>>>,
    qmp_path: PathBuf,
    shell_path: PathBuf,
    log: PathBuf,
    started: Instant,
    disk: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Vm {
    /// Boots the image in `image_dir` (a directory written by `image-build os`) with its
    /// manifest's QEMU arguments plus `extra_args`. The serial console (QEMU's stdout) is
    /// captured into [`Vm::console`] and the log file [`Vm::log_path`]; QMP listens on a
    /// Unix socket. QEMU is installed (Debian package `qemu-system-x86`) if missing.
    pub fn boot(image_dir: &Path, extra_args: &[&str]) -> Result<Vm> {
        Vm::boot_with(
            image_dir,
            &BootOptions {
                extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
                ..BootOptions::default()
            },
        )
    }

    /// [`Vm::boot`] with [`BootOptions`]: extra kernel command-line words, and the debug
    /// shell on a virtio console that [`Vm::shell`] connects to.
    pub fn boot_with(image_dir: &Path, opts: &BootOptions) -> Result<Vm> {
        let qemu = ensure_program(QEMU, "qemu-system-x86")?;
        let mut args = manifest_args(image_dir)?;
        let dir = vm_dir()?;
        let cmdline = cmdline_words(opts);
        if !cmdline.is_empty() {
            match args.iter().position(|a| a == "-append") {
                Some(i) => {
                    if let Some(value) = args.get_mut(i + 1) {
                        value.push(' ');
                        value.push_str(&cmdline.join(" "));
                    }
                }
                None => args.extend(["-append".to_string(), cmdline.join(" ")]),
            }
        }
        Vm::start(&qemu, image_dir, args, opts, dir)
    }

    /// Boots the image's `disk.img` like a real machine: OVMF (UEFI) firmware, systemd-boot
    /// from the ESP, slot A's entry (the manifest's `qemu.disk_args`). The VM gets its own
    /// sparse copy of `disk.img` and of the firmware's variable store (`ovmf-vars.fd`), so the
    /// image stays as built; a reboot of the guest goes through the firmware again in the
    /// same QEMU (no `-no-reboot`), on the same copies. [`BootOptions::cmdline`] and the
    /// debug shell's word go into the copy's slot A entry (`options`), written with mtools
    /// (Debian `mtools`, installed if missing): systemd-boot's editor is off.
    pub fn boot_disk(image_dir: &Path, opts: &BootOptions) -> Result<Vm> {
        let qemu = ensure_program(QEMU, "qemu-system-x86")?;
        let mut args = manifest_args_of(image_dir, "disk_args")?;
        let dir = vm_dir()?;
        let disk = dir.path().join(DISK_IMG);
        let cp = Command::new("cp")
            .arg("--sparse=always")
            .arg(image_dir.join(DISK_IMG))
            .arg(&disk)
            .status()
            .map_err(|e| io_err("run cp for", &disk, e))?;
        if !cp.success() {
            return Err(QemuError::Setup(format!(
                "cp --sparse=always {} {}: {cp}",
                image_dir.join(DISK_IMG).display(),
                disk.display()
            )));
        }
        let vars = dir.path().join(OVMF_VARS_COPY);
        std::fs::copy(image_dir.join(OVMF_VARS_COPY), &vars)
            .map_err(|e| io_err("copy", &image_dir.join(OVMF_VARS_COPY), e))?;
        for arg in &mut args {
            for (name, copy) in [(DISK_IMG, &disk), (OVMF_VARS_COPY, &vars)] {
                let relative = format!("file={name}");
                if arg.split(',').any(|part| part == relative) {
                    *arg = arg.replace(&relative, &format!("file={}", copy.display()));
                }
            }
        }
        let words = cmdline_words(opts);
        if !words.is_empty() || !opts.esp_files.is_empty() {
            let esp = esp_offset(image_dir)?;
            if !words.is_empty() {
                append_entry_options(&disk, esp, &words, dir.path())?;
            }
            for (n, (path, text)) in opts.esp_files.iter().enumerate() {
                let tmp = dir.path().join(format!("esp-file-{n}"));
                std::fs::write(&tmp, text).map_err(|e| io_err("write", &tmp, e))?;
                mtools(
                    "mcopy",
                    &disk,
                    esp,
                    &["-o".as_ref(), tmp.as_os_str(), format!("::{path}").as_ref()],
                )?;
            }
        }
        let mut vm = Vm::start(&qemu, image_dir, args, opts, dir)?;
        vm.disk = Some(disk);
        Ok(vm)
    }

    /// The VM's own copy of `disk.img` ([`Vm::boot_disk`]); `None` for a direct boot.
    pub fn disk_copy(&self) -> Option<&Path> {
        self.disk.as_deref()
    }

    /// Starts QEMU with `args` plus what `opts` adds (the debug shell's console, the NIC,
    /// port forwards, extra arguments) and QMP, in `image_dir`; `dir` holds the sockets.
    fn start(
        qemu: &Path,
        image_dir: &Path,
        mut args: Vec<String>,
        opts: &BootOptions,
        dir: tempfile::TempDir,
    ) -> Result<Vm> {
        let qmp_path = dir.path().join("qmp.sock");
        let shell_path = dir.path().join("shell.sock");
        if opts.debug_shell {
            args.extend([
                "-device".to_string(),
                "virtio-serial-pci".to_string(),
                "-chardev".to_string(),
                format!(
                    "socket,id=dbg,path={},server=on,wait=off",
                    shell_path.display()
                ),
                "-device".to_string(),
                "virtconsole,chardev=dbg".to_string(),
            ]);
        }
        if let Some(replacement) = &opts.nic {
            *user_nic(&mut args, image_dir, "replace")? = replacement.clone();
        }
        if !opts.host_forwards.is_empty() {
            let nic = user_nic(&mut args, image_dir, "forward ports over")?;
            for (host, guest) in &opts.host_forwards {
                nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
            }
        }
        args.extend(opts.extra_args.iter().cloned());
        let log = std::env::var_os("FLOTILLA_QEMU_LOG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| image_dir.to_path_buf())
            .join(format!(
                "console-{}.log",
                dir.path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
        let mut logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| io_err("open", &log, e))?;
        let mut cmd = Command::new(qemu);
        cmd.args(&args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .current_dir(image_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let _ = writeln!(logf, "$ {cmd:?}");
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| io_err("start", qemu, e))?;
        let pid = child.id();
        let console = Arc::new(Console::default());
        let streams: Vec<Box<dyn Read + Send>> = [
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
        .flatten()
        .collect();
        let n_streams = streams.len();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(n_streams));
        for mut stream in streams {
            let console = Arc::clone(&console);
            let open = Arc::clone(&open);
            let mut logf = logf.try_clone().map_err(|e| io_err("open", &log, e))?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let chunk = buf.get(..n).unwrap_or_default();
                            let _ = logf.write_all(chunk);
                            let text = String::from_utf8_lossy(chunk).replace('\r', "");
                            if let Ok(mut t) = console.text.lock() {
                                t.push_str(&text);
                            }
                            console.changed.notify_all();
                        }
                    }
                }
                if open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    if let Ok(mut c) = console.closed.lock() {
                        *c = true;
                    }
                    console.changed.notify_all();
                }
            });
        }
        Ok(Vm {
            child: Mutex::new(child),
            pid,
            console,
            qmp: Mutex::new(None),
            qmp_path,
            shell_path,
            log,
            started,
            disk: None,
            _dir: dir,
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When QEMU was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The console log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the console (and QEMU's stderr) printed so far.
    pub fn console(&self) -> String {
        self.console
            .text
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    fn tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        lines
            .get(lines.len().saturating_sub(20)..)
            .unwrap_or_default()
            .join("\n")
    }

    /// Waits until a console line contains `pattern`; returns that line.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_for_after(pattern, 0, timeout)
    }

    /// [`Vm::wait_for`] in what the console printed after its first `from` bytes (e.g.
    /// `vm.console().len()` before a reboot: the next boot's lines).
    pub fn wait_for_after(&self, pattern: &str, from: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut guard = self
            .console
            .text
            .lock()
            .map_err(|_| QemuError::Setup("console lock poisoned".into()))?;
        loop {
            let text = guard.get(from..).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(pattern)) {
                // Only a complete line counts (or the final text once the console closed).
                let complete = text.contains(&format!("{line}\n"));
                let closed = self.console.closed.lock().map(|c| *c).unwrap_or(true);
                if complete || closed {
                    return Ok(strip_escapes(line));
                }
            }
            let closed = self.console.closed.lock().map(|c| *c).unwrap_or(true);
            let now = Instant::now();
            if closed || now >= deadline {
                drop(guard);
                return Err(QemuError::Timeout {
                    pattern: pattern.to_string(),
                    timeout,
                    exited: closed,
                    tail: self.tail(),
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(500));
            guard = self
                .console
                .changed
                .wait_timeout(guard, wait)
                .map_err(|_| QemuError::Setup("console lock poisoned".into()))?
                .0;
        }
    }

    /// Waits up to `timeout` for QEMU to exit on its own; `None` if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self
                .child
                .lock()
                .map_err(|_| QemuError::Setup("child lock poisoned".into()))?
                .try_wait()
                .map_err(|e| io_err("wait for", Path::new(QEMU), e))?;
            if status.is_some() || Instant::now() >= deadline {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Connects to the guest's debug shell (boot with [`BootOptions::debug_shell`]) and
    /// waits, up to `timeout`, until it answers.
    pub fn shell(&self, timeout: Duration) -> Result<Shell> {
        Shell::connect(&self.shell_path, timeout)
    }

    /// Sends one QMP command (e.g. `query-status`, `system_powerdown`, `quit`) and returns
    /// its `return` value. The first call connects and negotiates capabilities.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value> {
        self.qmp_with(command, serde_json::Value::Null)
    }

    /// [`Vm::qmp`] with `arguments` (an object; `Null` for none), e.g. `send-key` with
    /// `{"keys": [...]}`.
    pub fn qmp_with(
        &self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let mut guard = self
            .qmp
            .lock()
            .map_err(|_| QemuError::Qmp("lock poisoned".into()))?;
        if guard.is_none() {
            let stream = connect_until(
                &self.qmp_path,
                Instant::now() + Duration::from_secs(30),
                "connect to QMP",
            )?;
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| io_err("configure", &self.qmp_path, e))?;
            let mut conn = BufReader::new(stream);
            read_message(&mut conn)?; // greeting
            exchange(&mut conn, "qmp_capabilities", serde_json::Value::Null)?;
            *guard = Some(conn);
        }
        let conn = guard
            .as_mut()
            .ok_or_else(|| QemuError::Qmp("not connected".into()))?;
        exchange(conn, command, arguments)
    }
}

/// `disk.img` in an image directory.
pub const DISK_IMG: &str = "disk.img";

/// The image's copy of OVMF's variable store that `qemu.disk_args` boots with.
pub const OVMF_VARS_COPY: &str = image_build::os::OVMF_VARS_COPY;

/// Slot A's boot entry on the ESP of `disk.img`.
pub const ENTRY_A: &str = image_build::os::bootdisk::ENTRY_A;

/// A new directory for one VM's sockets (and disk copies), removed with the [`Vm`].
fn vm_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("flotilla-vm-")
        .tempdir()
        .map_err(|e| io_err("create", &std::env::temp_dir(), e))
}

/// The kernel command-line words `opts` adds: its own, and the debug shell's.
fn cmdline_words(opts: &BootOptions) -> Vec<String> {
    let mut words = opts.cmdline.clone();
    if opts.debug_shell {
        words.push(format!("flotilla.debug_shell={DEBUG_SHELL_TTY}"));
    }
    words
}

/// Byte offset of the ESP in the image's `disk.img` (the manifest's `disk.partitions`).
pub fn esp_offset(image_dir: &Path) -> Result<u64> {
    let v = read_manifest(image_dir)?;
    v.get("disk")
        .and_then(|d| d.get("partitions"))
        .and_then(|p| p.as_array())
        .and_then(|parts| {
            parts.iter().find(|p| {
                p.get("name").and_then(|n| n.as_str()) == Some(image_build::os::bootdisk::ESP_NAME)
            })
        })
        .and_then(|p| p.get("offset"))
        .and_then(|o| o.as_u64())
        .ok_or_else(|| QemuError::Manifest {
            path: image_dir.join("manifest.json"),
            detail: "no disk.partitions entry for flotilla-esp (rebuild the image)".into(),
        })
}

/// Runs an mtools program on the FAT filesystem at byte `offset` of `disk`; its stdout.
fn mtools(program: &str, disk: &Path, offset: u64, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let path = ensure_program(program, "mtools")?;
    let out = Command::new(&path)
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()))
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("MTOOLSRC", "/dev/null")
        .output()
        .map_err(|e| io_err("run", &path, e))?;
    if !out.status.success() {
        return Err(QemuError::Setup(format!(
            "{program} on {}@@{offset} failed ({}): {}",
            disk.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Reads a file of the ESP at byte `esp` of `disk` (mtools `mtype`).
pub fn read_esp_file(disk: &Path, esp: u64, path: &str) -> Result<String> {
    let bytes = mtools("mtype", disk, esp, &[format!("::{path}").as_ref()])?;
    String::from_utf8(bytes).map_err(|_| {
        QemuError::Setup(format!(
            "{path} on the ESP of {} is not text",
            disk.display()
        ))
    })
}

/// The names in a directory of the ESP at byte `esp` of `disk` (mtools `mdir -b`), sorted.
pub fn list_esp_dir(disk: &Path, esp: u64, dir: &str) -> Result<Vec<String>> {
    let out = mtools(
        "mdir",
        disk,
        esp,
        &["-b".as_ref(), format!("::{dir}").as_ref()],
    )?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    names.sort();
    Ok(names)
}

/// Appends `words` to the `options` line of slot A's entry on the ESP at byte `esp` of
/// `disk` (read with `mtype`, written back with `mcopy -o`; `scratch` holds the new text).
pub fn append_entry_options(disk: &Path, esp: u64, words: &[String], scratch: &Path) -> Result<()> {
    let entry = read_esp_file(disk, esp, ENTRY_A)?;
    let mut found = false;
    let text: String = entry
        .lines()
        .map(|l| {
            if l.starts_with("options ") {
                found = true;
                format!("{l} {}\n", words.join(" "))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    if !found {
        return Err(QemuError::Setup(format!(
            "{ENTRY_A} on the ESP of {} has no options line:\n{entry}",
            disk.display()
        )));
    }
    let tmp = scratch.join("entry.conf");
    std::fs::write(&tmp, text).map_err(|e| io_err("write", &tmp, e))?;
    mtools(
        "mcopy",
        disk,
        esp,
        &[
            "-o".as_ref(),
            tmp.as_os_str(),
            format!("::{ENTRY_A}").as_ref(),
        ],
    )?;
    Ok(())
}

/// Connects to the Unix socket QEMU listens on (it may not exist yet), retrying until
/// `deadline`.
pub(crate) fn connect_until(path: &Path, deadline: Instant, what: &str) -> Result<UnixStream> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(io_err(what, path, e)),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A console line without terminal escape sequences (SeaBIOS clears the screen).
pub fn strip_escapes(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // CSI: parameters, then one final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

fn read_message(conn: &mut BufReader<UnixStream>) -> Result<serde_json::Value> {
    let mut line = String::new();
    let n = conn
        .read_line(&mut line)
        .map_err(|e| QemuError::Qmp(format!("read: {e}")))?;
    if n == 0 {
        return Err(QemuError::Qmp("connection closed".into()));
    }
    serde_json::from_str(&line).map_err(|e| QemuError::Qmp(format!("{e}: {line}")))
}

fn exchange(
    conn: &mut BufReader<UnixStream>,
    command: &str,
    arguments: serde_json::Value,
) -> Result<serde_json::Value> {
    let request = if arguments.is_null() {
        serde_json::json!({ "execute": command })
    } else {
        serde_json::json!({ "execute": command, "arguments": arguments })
    };
    let mut bytes = request.to_string().into_bytes();
    bytes.push(b'\n');
    conn.get_mut()
        .write_all(&bytes)
        .map_err(|e| QemuError::Qmp(format!("send {command}: {e}")))?;
    loop {
        let msg = read_message(conn)?;
        if let Some(r) = msg.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = msg.get("error") {
            return Err(QemuError::Qmp(format!("{command}: {e}")));
        }
        // An asynchronous event: skip it.
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for [`BootOptions::host_forwards`]).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| io_err("bind", Path::new("127.0.0.1:0"), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| io_err("read the address of", Path::new("127.0.0.1:0"), e))
}

/// `GET path` from `127.0.0.1:port` (HTTP/1.0); the whole response, headers included.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    let addr = format!("127.0.0.1:{port}");
    let shown = Path::new(&addr);
    let mut s = std::net::TcpStream::connect(&addr).map_err(|e| io_err("connect to", shown, e))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| io_err("configure", shown, e))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .map_err(|e| io_err("send to", shown, e))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| io_err("read from", shown, e))?;
    Ok(out)
}

/// The static `flotilla-init` of [`static_binaries`].
pub fn static_init_binary() -> Result<PathBuf> {
    Ok(static_binaries()?.join("flotilla-init"))
}

/// Builds [`STATIC_BINARIES`] with image-build's static-build recipe
/// ([`image_build::static_build::StaticBuild`]: release, `+crt-static`, target
/// `x86_64-unknown-linux-gnu`, target directory `target/static` in the workspace or
/// `$FLOTILLA_STATIC_TARGET_DIR`), once per process, and checks that none has an ELF
/// interpreter. Returns the directory holding them (`image-build os --bin-dir`).
pub fn static_binaries() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            StaticBuild::new(&workspace_root())
                .run()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(QemuError::Setup)
}
