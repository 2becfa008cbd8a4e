//! PID 1: set the machine up before the manager runs, and take it down after.
//!
//! The boot, in order, each step logged to the console with its duration:
//! 1. the API filesystems ([`mounts::API_MOUNTS`]) and the image's kernel modules;
//! 2. the root disk (virtio serial, GPT partition name or label `flotilla-root`) mounted read-only on
//!    `/sysroot`; without one, the boot stays on the initramfs;
//! 3. `/var` read-write (formatted on first boot when blank), `/etc` a tmpfs from the image's
//!    factory `/etc`;
//! 4. provisioning ([`firstboot`]): found, validated whole, recorded once, rendered into
//!    `/etc`; the machine id, created once in `/var`;
//! 5. the switch into the real root, `/tmp`, the hostname, the network;
//! 6. the debug shell when the command line asks for one; the power button watcher.
//!
//! A step the boot cannot do without returns a [`BootError`]; the caller then runs
//! [`emergency`]. Nothing here panics or exits, and shutdown always ends in `reboot(2)` (or,
//! if even that fails, an endless sleep: PID 1 must never exit, or the kernel panics).

pub mod cmdline;
pub mod disks;
pub mod firstboot;
pub mod machine;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod power;
pub mod shell;
pub mod shutdown;
pub mod sysroot;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_units::UnitError;
use rustix::mount::{mount, MountFlags};

pub use modules::load_modules;
pub use shutdown::{finish, Action};

use cmdline::Cmdline;
use firstboot::Source;

/// A boot step the machine cannot do without failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file or mount operation failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: String,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A disk holds the wrong thing.
    #[error("disk {}: {detail}", disk.display())]
    Disk {
        /// The device.
        disk: PathBuf,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The provisioning config is invalid; nothing of it was applied.
    #[error(
        "invalid provisioning config, nothing of it was applied: {0}\n  \
         fix it and boot again (QEMU: -fw_cfg name=opt/org.flotilla/config,file=CONFIG.toml)"
    )]
    Provision(Box<UnitError>),
    /// Anything else, explained.
    #[error("{0}")]
    Other(String),
}

/// `map_err` for a failed file operation: [`BootError::Io`] saying what was done on `path`.
pub(crate) fn io<'a>(what: &str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    let what = what.to_string();
    move |source| BootError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// [`io`] for rustix's errors.
pub(crate) fn errno<'a>(
    what: &str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> BootError + 'a {
    let f = io(what, path);
    move |e| f(std::io::Error::from(e))
}

/// How long PID 1 waits for the root disk to show up after loading the drivers.
pub const ROOT_WAIT: Duration = Duration::from_secs(10);
/// How long it waits for the `/var` disk once the root disk is there.
pub const VAR_WAIT: Duration = Duration::from_secs(2);

/// Print one boot step to the console with how long it took; `None` if it failed.
fn step<T, E: std::fmt::Display>(what: &str, f: impl FnOnce() -> Result<T, E>) -> Option<T> {
    required(what, f).ok()
}

/// [`step`] for a step the boot cannot do without: the error is returned.
fn required<T, E: std::fmt::Display>(what: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let t = Instant::now();
    let r = f();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    match &r {
        Ok(_) => log::info!("[{ms:7.1} ms] {what}"),
        Err(e) => log::error!("[{ms:7.1} ms] {what}: FAILED: {e}"),
    }
    r
}

/// Sets the machine up (see the module doc). `Err` means the boot cannot go on: call
/// [`emergency`].
pub fn setup(modules_list: &Path) -> Result<(), BootError> {
    // Ctrl-Alt-Del becomes SIGINT to PID 1 (an orderly reboot) instead of an instant reset.
    step("Ctrl-Alt-Del sends SIGINT", || {
        nix::sys::reboot::set_cad_enabled(false)
    });
    for m in mounts::API_MOUNTS {
        step(&format!("mount {} on {}", m.fstype, m.target), || {
            mounts::mount_one(m)
        });
    }
    load_modules(modules_list);
    step("loopback up", || net::link_up("lo"));
    let cmdline = Cmdline::read();
    if let Some(slot) = cmdline.get("slot") {
        log::info!("booted slot {slot} (flotilla.slot on the kernel command line)");
    }

    let root_name = cmdline.get("root").unwrap_or("flotilla-root");
    let Some((root_dev, root_content)) =
        required(&format!("find the root disk {root_name}"), || {
            disks::wait_for(root_name, ROOT_WAIT).ok_or("not found")
        })
        .ok()
    else {
        log::warn!("no root disk named {root_name}: staying on the initramfs");
        debug_shell(&cmdline);
        power_button();
        return Ok(());
    };
    required(
        &format!(
            "mount {} read-only on {}",
            root_dev.display(),
            sysroot::SYSROOT
        ),
        || sysroot::mount_root(&root_dev, &root_content),
    )?;

    let var_name = cmdline.get("var").unwrap_or("flotilla-var");
    let var = disks::wait_for(var_name, VAR_WAIT);
    let var_shown = var
        .as_ref()
        .map_or("tmpfs".to_string(), |(d, _)| d.display().to_string());
    required(&format!("mount {var_shown} on /sysroot/var"), || {
        sysroot::mount_var(var, var_name)
    })?;
    required(
        "mount /sysroot/etc (tmpfs from the factory /etc)",
        sysroot::mount_etc,
    )?;

    let (config, text, source) =
        required("read the provisioning config", || firstboot::load(&cmdline))?;
    let (machine_id, new_id) = required("machine id", || {
        machine::machine_id(Path::new(sysroot::SYSROOT))
    })
    .map_err(io(
        "keep the machine id in",
        &sysroot::sysroot(machine::MACHINE_ID),
    ))?;
    log::info!(
        "machine id {machine_id}{}",
        if new_id { " (new: first boot)" } else { "" }
    );
    if source != Source::Record {
        required(
            &format!("first boot: apply the provisioning config from {source:?}"),
            || firstboot::record(&text),
        )?;
    }
    required("render /etc from the provisioning config", || {
        firstboot::render(&config, &machine_id, &sysroot::sysroot("etc"))
    })?;

    step("free the initramfs", sysroot::free_initramfs);
    required("switch root to /sysroot", sysroot::switch_root)?;
    step("mount tmpfs on /tmp", || {
        mount(
            c"tmpfs",
            c"/tmp",
            c"tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            c"mode=1777",
        )
    });
    if let Some(name) = &config.hostname {
        step(&format!("hostname {name}"), || machine::set_hostname(name));
    }
    if let Some(net) = &config.network {
        step(
            &format!(
                "eth0 {}/{}{}",
                net.address,
                net.prefix,
                net.gateway.map(|g| format!(" via {g}")).unwrap_or_default()
            ),
            || net::configure("eth0", net),
        );
    }
    debug_shell(&cmdline);
    power_button();
    Ok(())
}

fn power_button() {
    match power::watch() {
        0 => {
            log::info!("no power button (ACPI button and evdev modules): use SIGUSR2 to power off")
        }
        n => log::info!("watching {n} power button(s)"),
    }
}

fn debug_shell(cmdline: &Cmdline) {
    if let Some(tty) = cmdline.get("debug_shell").filter(|t| !t.is_empty()) {
        let tty = Path::new("/dev").join(tty);
        step(&format!("debug shell on {}", tty.display()), || {
            // Its driver may still be creating the device node.
            let end = Instant::now() + Duration::from_secs(5);
            while !tty.exists() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            shell::spawn_debug_shell(&tty)
        });
    }
}

/// The boot cannot go on: say why, run a shell on the console if the image has one (in the
/// real root when it is mounted), and power off when it exits. Without a shell, halt (reaping
/// children) until the machine is switched off. Never returns.
pub fn emergency(err: &BootError) -> ! {
    log::error!("boot failed: {err}");
    // The image's /bin/sh is a link to /bin/busybox, which only resolves inside /sysroot.
    let present = |p: &Path| std::fs::symlink_metadata(p).is_ok();
    let root = if present(Path::new(shell::SHELL)) {
        Some(PathBuf::from("/"))
    } else if present(&sysroot::sysroot(shell::SHELL)) {
        Some(PathBuf::from(sysroot::SYSROOT))
    } else {
        None
    };
    match root {
        Some(root) => {
            log::error!("emergency shell on the console; the machine powers off when it exits");
            match shell::spawn_on(Path::new("/dev/console"), "exec /bin/sh", &root) {
                Ok(mut child) => {
                    let _ = child.wait();
                }
                Err(e) => log::error!("cannot start the emergency shell: {e}"),
            }
            finish(Action::Poweroff)
        }
        None => {
            log::error!("this image has no shell: halted; power the machine off");
            loop {
                shutdown::reap_for(Duration::from_secs(1));
                std::thread::sleep(Duration::from_secs(10));
            }
        }
    }
}
