//! Policy tables: what every container gets mounted, masked and made read-only, in order.
//! The steps that apply them are in [`super::rootfs`].

use rustix::mount::MountFlags;

/// A filesystem mounted in every container, at a path relative to the new root.
#[derive(Debug)]
pub(crate) struct StandardMount {
    /// Target inside the root (no leading `/`).
    pub target: &'static str,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount source (shown in /proc/mounts).
    pub source: &'static str,
    /// Mount flags.
    pub flags: MountFlags,
    /// Options.
    pub data: &'static str,
    /// Options used instead inside a user namespace (ids like `gid=5` may be unmapped there).
    pub userns_data: Option<&'static str>,
    /// What to do when mounting fails.
    pub fallback: Fallback,
}

/// What to do when a [`StandardMount`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// Fail the container.
    None,
    /// Bind the host's same path recursively, read-only (sysfs when the network namespace is
    /// the host's, which a container may not mount sysfs for).
    BindHostReadOnly,
    /// Skip when the kernel lacks the filesystem or the mount point is missing.
    SkipIfUnsupported,
}

const NOSUID_NODEV_NOEXEC: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// The standard mounts, in order (a mount point must be mounted before the ones under it).
pub(crate) const STANDARD_MOUNTS: &[StandardMount] = &[
    StandardMount {
        target: "proc",
        fstype: "proc",
        source: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        userns_data: None,
        fallback: Fallback::None,
    },
    StandardMount {
        target: "sys",
        fstype: "sysfs",
        source: "sysfs",
        flags: NOSUID_NODEV_NOEXEC.union(MountFlags::RDONLY),
        data: "",
        userns_data: None,
        fallback: Fallback::BindHostReadOnly,
    },
    StandardMount {
        target: "sys/fs/cgroup",
        fstype: "cgroup2",
        source: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC
            .union(MountFlags::RDONLY)
            .union(MountFlags::RELATIME),
        data: "",
        userns_data: None,
        fallback: Fallback::SkipIfUnsupported,
    },
    StandardMount {
        target: "dev",
        fstype: "tmpfs",
        source: "tmpfs",
        flags: MountFlags::NOSUID.union(MountFlags::STRICTATIME),
        data: "mode=755,size=65536k",
        userns_data: None,
        fallback: Fallback::None,
    },
    StandardMount {
        target: "dev/pts",
        fstype: "devpts",
        source: "devpts",
        flags: MountFlags::NOSUID.union(MountFlags::NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
        userns_data: Some("newinstance,ptmxmode=0666,mode=0620"),
        fallback: Fallback::None,
    },
    StandardMount {
        target: "dev/shm",
        fstype: "tmpfs",
        source: "shm",
        flags: NOSUID_NODEV_NOEXEC,
        data: "mode=1777,size=65536k",
        userns_data: None,
        fallback: Fallback::None,
    },
    StandardMount {
        target: "dev/mqueue",
        fstype: "mqueue",
        source: "mqueue",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        userns_data: None,
        fallback: Fallback::None,
    },
];

/// Character devices in the container's `/dev` (bound from the host's `/dev`; the device
/// filter allows them, see [`super::devices::DEFAULT_DEVICES`]).
pub(crate) const DEVICE_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Symlinks in the container's `/dev`: name, target.
pub(crate) const DEVICE_SYMLINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
];

/// Hidden paths: `/dev/null` is bound over files, an empty read-only tmpfs over directories.
/// Missing ones are skipped.
pub(crate) const MASKED_PATHS: &[&str] = &[
    "proc/acpi",
    "proc/asound",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// Paths bound read-only over themselves. Missing ones are skipped.
pub(crate) const READONLY_PATHS: &[&str] = &[
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];
