//! PID 1: set the machine up before the manager runs, and take it down after.
//!
//! Policy lives in tables ([`API_MOUNTS`]); each step is a small function, logged to the
//! console with its duration. Nothing here panics or exits: a step that fails is reported,
//! and shutdown always ends in `reboot(2)` (or, if even that fails, an endless sleep — PID 1
//! must never exit, or the kernel panics).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::RebootMode;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

/// One API filesystem PID 1 mounts.
#[derive(Debug, Clone, Copy)]
pub struct MountStep {
    /// Source (device or the filesystem name).
    pub source: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount flags.
    pub flags: MountFlags,
    /// Filesystem options.
    pub data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// The API filesystems, in order (like systemd's mount table).
pub const API_MOUNTS: &[MountStep] = &[
    MountStep {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountStep {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountStep {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MountFlags::NOSUID,
        data: "mode=0755",
    },
    MountStep {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MountFlags::NOSUID.union(MountFlags::NOEXEC),
        data: "gid=5,mode=0620,ptmxmode=0666",
    },
    MountStep {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MountFlags::NOSUID.union(MountFlags::NODEV),
        data: "mode=1777",
    },
    MountStep {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MountFlags::NOSUID.union(MountFlags::NODEV),
        data: "mode=0755",
    },
    MountStep {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
];

/// Print one boot step to the console with how long it took.
fn step<T, E: std::fmt::Display>(what: &str, f: impl FnOnce() -> Result<T, E>) -> Option<T> {
    let t = Instant::now();
    let r = f();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    match r {
        Ok(v) => {
            log::info!("[{ms:7.1} ms] {what}");
            Some(v)
        }
        Err(e) => {
            log::error!("[{ms:7.1} ms] {what}: FAILED: {e}");
            None
        }
    }
}

fn mount_one(m: &MountStep) -> Result<(), String> {
    fs::create_dir_all(m.target).map_err(|e| format!("create {}: {e}", m.target))?;
    let data = std::ffi::CString::new(m.data).map_err(|e| e.to_string())?;
    match mount(m.source, m.target, m.fstype, m.flags, data.as_c_str()) {
        // The same instance is mounted there already (e.g. by the kernel or a container).
        Err(rustix::io::Errno::BUSY) => {
            log::info!("{} already mounted on {}", m.fstype, m.target);
            Ok(())
        }
        r => r.map_err(|e| e.to_string()),
    }
}

/// Mount the API filesystems and load the listed kernel modules. Failures are logged; the
/// boot goes on with what works (the manager reports units that cannot run).
pub fn setup(modules_list: &Path) {
    for m in API_MOUNTS {
        step(&format!("mount {} on {}", m.fstype, m.target), || {
            mount_one(m)
        });
    }
    load_modules(modules_list);
}

/// Load the modules listed in `list` (one `.ko` path per line, dependencies first) with
/// finit_module(2). Already loaded or built in is fine. A missing list means no modules.
pub fn load_modules(list: &Path) {
    let Ok(text) = fs::read_to_string(list) else {
        log::info!("no module list at {}; loading none", list.display());
        return;
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        step(&format!("load module {line}"), || {
            load_module(Path::new(line))
        });
    }
}

fn load_module(path: &Path) -> Result<(), String> {
    let file = fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// What to do once every unit has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Restart the machine (SIGTERM, SIGINT / Ctrl-Alt-Del).
    Reboot,
    /// Switch it off (SIGUSR2, the power button).
    Poweroff,
}

impl Action {
    /// The action a shutdown signal asks for.
    pub fn for_signal(sig: Signal) -> Action {
        match sig {
            Signal::SIGUSR2 => Action::Poweroff,
            _ => Action::Reboot,
        }
    }
}

/// After the manager stopped every unit: end every other process (SIGTERM, a grace period,
/// SIGKILL), sync, unmount in reverse order, then reboot(2). Never returns.
pub fn finish(action: Action) -> ! {
    step("SIGTERM to remaining processes", || {
        kill(Pid::from_raw(-1), Signal::SIGTERM).or_else(ignore_esrch)
    });
    reap_for(Duration::from_secs(3));
    step("SIGKILL to remaining processes", || {
        kill(Pid::from_raw(-1), Signal::SIGKILL).or_else(ignore_esrch)
    });
    reap_for(Duration::from_millis(500));
    nix::unistd::sync();
    unmount_all();
    nix::unistd::sync();
    let mode = match action {
        Action::Reboot => RebootMode::RB_AUTOBOOT,
        Action::Poweroff => RebootMode::RB_POWER_OFF,
    };
    log::info!("{action:?}");
    let err = nix::sys::reboot::reboot(mode).err();
    log::error!("reboot(2) failed: {err:?}; halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn ignore_esrch(e: Errno) -> Result<(), Errno> {
    if e == Errno::ESRCH {
        Ok(())
    } else {
        Err(e)
    }
}

/// Reap children until none is left or `limit` passes.
fn reap_for(limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(_) => return, // ECHILD: nobody left
        }
    }
}

/// Mount points from `/proc/self/mountinfo` text, in mount order.
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_octal)
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\NNN`.
fn unescape_octal(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            let t = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(t, 8).ok()
        });
        match (c, oct) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount everything but `/`, newest first. The root's superblock is left alone: it is
/// read-only (or the initramfs), and remounting it would reach any host sharing it.
fn unmount_all() {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let points = mount_points(&info);
    for p in points.iter().rev().filter(|p| p.as_str() != "/") {
        if unmount(p.as_str(), UnmountFlags::empty()).is_err() {
            let _ = unmount(p.as_str(), UnmountFlags::DETACH);
        }
    }
    log::info!("unmounted {} filesystems", points.len().saturating_sub(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_in_order_and_unescaped() {
        let mi = "22 1 0:21 / / rw - ext4 /dev/vda rw\n\
                  23 22 0:5 / /proc rw - proc proc rw\n\
                  24 22 0:6 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(mount_points(mi), ["/", "/proc", "/mnt/with space"]);
    }

    #[test]
    fn signals_map_to_actions() {
        assert_eq!(Action::for_signal(Signal::SIGUSR2), Action::Poweroff);
        assert_eq!(Action::for_signal(Signal::SIGTERM), Action::Reboot);
        assert_eq!(Action::for_signal(Signal::SIGINT), Action::Reboot);
    }
}
