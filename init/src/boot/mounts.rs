//! The API filesystems PID 1 mounts (a table, like systemd's), and unmounting at shutdown.

use std::fs;

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

/// Mounts one table entry; the same filesystem already mounted there is fine.
pub fn mount_one(m: &MountStep) -> Result<(), String> {
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
pub fn unmount_all() {
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
}
