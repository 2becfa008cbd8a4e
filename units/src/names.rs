//! Names the kernel knows, defined once: capabilities, resource limits and network modes.
//!
//! Each is an enum with its name table, written out once here. The unit parser validates
//! against these tables (with a file:line:col error and a "did you mean" hint) and the
//! container runtime takes the enums directly, so no name is turned back into a string and
//! parsed again between the unit file and the syscall.
//!
//! Where the kernel numbers live: a capability's number is the same on every architecture
//! (linux/capability.h), so it is the enum's discriminant, here. A resource limit's number
//! is not (`RLIMIT_NOFILE` is 7 on x86 and arm, 5 on mips and sparc), so it comes from libc,
//! in the runtime's one exhaustive match on [`RlimitResource`] (this crate has no libc).

use std::fmt;
use std::str::FromStr;

/// A name that is not in its table: the error of the `FromStr` impls here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {given:?}: use one of {}", valid.join(", "))]
pub struct UnknownName {
    /// What was being named, e.g. `network mode`.
    pub kind: &'static str,
    /// The name as given.
    pub given: String,
    /// The valid names.
    pub valid: &'static [&'static str],
}

/// Defines a fieldless enum and its one name table: `ALL`, `NAMES` (same order), `name()`
/// and `from_name()` (exact match).
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $ty:ident {
            $( $(#[$vmeta:meta])* $variant:ident $(= $number:literal)? => $name:literal, )*
        }
    ) => {
        $(#[$meta])*
        $vis enum $ty {
            $( $(#[$vmeta])* $variant $(= $number)?, )*
        }

        impl $ty {
            /// Every value, in table order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant,)*];
            /// Every name, in the order of [`Self::ALL`].
            pub const NAMES: &'static [&'static str] = &[$($name,)*];

            /// The name as written in a unit file.
            pub const fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)*
                }
            }

            /// The value called exactly `name`.
            pub fn from_name(name: &str) -> Option<$ty> {
                match name {
                    $($name => Some($ty::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

named_enum! {
    /// A Linux capability (capabilities(7)). The discriminant is the kernel's number; the
    /// name is the one after `CAP_`. Written `CAP_NET_ADMIN` or `NET_ADMIN` in a unit file,
    /// displayed `CAP_NET_ADMIN`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    #[repr(u8)]
    pub enum Capability {
        /// `CAP_CHOWN`: change file owners.
        Chown = 0 => "CHOWN",
        /// `CAP_DAC_OVERRIDE`: bypass file permission checks.
        DacOverride = 1 => "DAC_OVERRIDE",
        /// `CAP_DAC_READ_SEARCH`: bypass read and search permission checks.
        DacReadSearch = 2 => "DAC_READ_SEARCH",
        /// `CAP_FOWNER`: bypass owner checks on files.
        Fowner = 3 => "FOWNER",
        /// `CAP_FSETID`: keep set-user/group-ID bits on modification.
        Fsetid = 4 => "FSETID",
        /// `CAP_KILL`: signal any process.
        Kill = 5 => "KILL",
        /// `CAP_SETGID`: change group ids.
        Setgid = 6 => "SETGID",
        /// `CAP_SETUID`: change user ids.
        Setuid = 7 => "SETUID",
        /// `CAP_SETPCAP`: change capability sets.
        Setpcap = 8 => "SETPCAP",
        /// `CAP_LINUX_IMMUTABLE`: set immutable and append-only flags.
        LinuxImmutable = 9 => "LINUX_IMMUTABLE",
        /// `CAP_NET_BIND_SERVICE`: bind ports below 1024.
        NetBindService = 10 => "NET_BIND_SERVICE",
        /// `CAP_NET_BROADCAST`: broadcast and multicast.
        NetBroadcast = 11 => "NET_BROADCAST",
        /// `CAP_NET_ADMIN`: network administration.
        NetAdmin = 12 => "NET_ADMIN",
        /// `CAP_NET_RAW`: raw and packet sockets.
        NetRaw = 13 => "NET_RAW",
        /// `CAP_IPC_LOCK`: lock memory.
        IpcLock = 14 => "IPC_LOCK",
        /// `CAP_IPC_OWNER`: bypass System V IPC permission checks.
        IpcOwner = 15 => "IPC_OWNER",
        /// `CAP_SYS_MODULE`: load kernel modules.
        SysModule = 16 => "SYS_MODULE",
        /// `CAP_SYS_RAWIO`: raw I/O (ioperm, /dev/mem, /proc/kcore).
        SysRawio = 17 => "SYS_RAWIO",
        /// `CAP_SYS_CHROOT`: chroot.
        SysChroot = 18 => "SYS_CHROOT",
        /// `CAP_SYS_PTRACE`: trace any process.
        SysPtrace = 19 => "SYS_PTRACE",
        /// `CAP_SYS_PACCT`: process accounting.
        SysPacct = 20 => "SYS_PACCT",
        /// `CAP_SYS_ADMIN`: mounts, namespaces and much more.
        SysAdmin = 21 => "SYS_ADMIN",
        /// `CAP_SYS_BOOT`: reboot.
        SysBoot = 22 => "SYS_BOOT",
        /// `CAP_SYS_NICE`: raise priorities, set other processes' scheduling.
        SysNice = 23 => "SYS_NICE",
        /// `CAP_SYS_RESOURCE`: override resource limits.
        SysResource = 24 => "SYS_RESOURCE",
        /// `CAP_SYS_TIME`: set the system clock.
        SysTime = 25 => "SYS_TIME",
        /// `CAP_SYS_TTY_CONFIG`: vhangup and privileged tty ioctls.
        SysTtyConfig = 26 => "SYS_TTY_CONFIG",
        /// `CAP_MKNOD`: create device nodes.
        Mknod = 27 => "MKNOD",
        /// `CAP_LEASE`: file leases.
        Lease = 28 => "LEASE",
        /// `CAP_AUDIT_WRITE`: write the audit log.
        AuditWrite = 29 => "AUDIT_WRITE",
        /// `CAP_AUDIT_CONTROL`: configure auditing.
        AuditControl = 30 => "AUDIT_CONTROL",
        /// `CAP_SETFCAP`: set file capabilities.
        Setfcap = 31 => "SETFCAP",
        /// `CAP_MAC_OVERRIDE`: override mandatory access control.
        MacOverride = 32 => "MAC_OVERRIDE",
        /// `CAP_MAC_ADMIN`: configure mandatory access control.
        MacAdmin = 33 => "MAC_ADMIN",
        /// `CAP_SYSLOG`: privileged syslog operations.
        Syslog = 34 => "SYSLOG",
        /// `CAP_WAKE_ALARM`: timers that wake the system.
        WakeAlarm = 35 => "WAKE_ALARM",
        /// `CAP_BLOCK_SUSPEND`: block system suspend.
        BlockSuspend = 36 => "BLOCK_SUSPEND",
        /// `CAP_AUDIT_READ`: read the audit log over multicast netlink.
        AuditRead = 37 => "AUDIT_READ",
        /// `CAP_PERFMON`: performance monitoring.
        Perfmon = 38 => "PERFMON",
        /// `CAP_BPF`: privileged BPF operations.
        Bpf = 39 => "BPF",
        /// `CAP_CHECKPOINT_RESTORE`: checkpoint and restore.
        CheckpointRestore = 40 => "CHECKPOINT_RESTORE",
    }
}

impl Capability {
    /// The kernel's number (linux/capability.h).
    pub const fn number(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CAP_{}", self.name())
    }
}

impl FromStr for Capability {
    type Err = UnknownName;

    /// `CAP_NET_ADMIN` or `NET_ADMIN`, exactly (upper case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::from_name(s.strip_prefix("CAP_").unwrap_or(s)).ok_or_else(|| UnknownName {
            kind: "capability",
            given: s.to_owned(),
            valid: Capability::NAMES,
        })
    }
}

named_enum! {
    /// A resource limit (setrlimit(2)). The name is the one after `RLIMIT_`, in lower case
    /// as in unit files (`nofile`); displayed `RLIMIT_NOFILE`. The kernel's number depends
    /// on the architecture: the container runtime maps it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum RlimitResource {
        /// `RLIMIT_AS`: address space size.
        As => "as",
        /// `RLIMIT_CORE`: core file size.
        Core => "core",
        /// `RLIMIT_CPU`: CPU time in seconds.
        Cpu => "cpu",
        /// `RLIMIT_DATA`: data segment size.
        Data => "data",
        /// `RLIMIT_FSIZE`: file size.
        Fsize => "fsize",
        /// `RLIMIT_LOCKS`: file locks.
        Locks => "locks",
        /// `RLIMIT_MEMLOCK`: locked memory.
        Memlock => "memlock",
        /// `RLIMIT_MSGQUEUE`: POSIX message queue bytes.
        Msgqueue => "msgqueue",
        /// `RLIMIT_NICE`: nice value ceiling.
        Nice => "nice",
        /// `RLIMIT_NOFILE`: open files.
        Nofile => "nofile",
        /// `RLIMIT_NPROC`: processes of the user.
        Nproc => "nproc",
        /// `RLIMIT_RSS`: resident set size.
        Rss => "rss",
        /// `RLIMIT_RTPRIO`: real-time priority ceiling.
        Rtprio => "rtprio",
        /// `RLIMIT_RTTIME`: real-time CPU time in microseconds.
        Rttime => "rttime",
        /// `RLIMIT_SIGPENDING`: queued signals.
        Sigpending => "sigpending",
        /// `RLIMIT_STACK`: stack size.
        Stack => "stack",
    }
}

impl fmt::Display for RlimitResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RLIMIT_{}", self.name().to_ascii_uppercase())
    }
}

impl FromStr for RlimitResource {
    type Err = UnknownName;

    /// `nofile`, `RLIMIT_NOFILE` or `NOFILE`: with or without `RLIMIT_`, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        RlimitResource::from_name(lower.strip_prefix("rlimit_").unwrap_or(&lower)).ok_or_else(
            || UnknownName {
                kind: "resource limit",
                given: s.to_owned(),
                valid: RlimitResource::NAMES,
            },
        )
    }
}

named_enum! {
    /// The network namespace of a unit's container.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub enum NetworkMode {
        /// Share the host's network namespace (a unit's default, like a systemd service).
        #[default]
        Host => "host",
        /// A new network namespace with only `lo` (up).
        None => "none",
        /// A new network namespace with `lo` up, to be connected by the runtime (nothing
        /// more yet).
        Private => "private",
    }
}

named_enum! {
    /// When the manager pulls a unit's registry image (`[container] pull`), as Kubernetes'
    /// `imagePullPolicy`.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub enum PullPolicy {
        /// Pull only when the store lacks the image (the default).
        #[default]
        Missing => "missing",
        /// Pull before every start; a registry that cannot be reached fails the start.
        Always => "always",
        /// Never pull: a missing image fails the start.
        Never => "never",
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NetworkMode {
    type Err = UnknownName;

    /// `host`, `none` or `private`, exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NetworkMode::from_name(s).ok_or_else(|| UnknownName {
            kind: "network mode",
            given: s.to_owned(),
            valid: NetworkMode::NAMES,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn capability_table_is_the_kernels() {
        // Numbered 0.. without gaps, in order: the discriminants are the kernel's numbers.
        for (i, cap) in Capability::ALL.iter().enumerate() {
            assert_eq!(usize::from(cap.number()), i, "{cap}");
        }
        assert_eq!(Capability::ALL.len(), Capability::NAMES.len());
        assert_eq!(Capability::NetAdmin.number(), 12);
        assert_eq!(Capability::SysAdmin.number(), 21);
        assert_eq!(Capability::CheckpointRestore.number(), 40);
        assert_eq!(Capability::NetAdmin.to_string(), "CAP_NET_ADMIN");
        assert_eq!("CAP_NET_ADMIN".parse(), Ok(Capability::NetAdmin));
        assert_eq!("NET_ADMIN".parse(), Ok(Capability::NetAdmin));
        assert!("net_admin".parse::<Capability>().is_err());
        assert!("CAP_NET_ADMN".parse::<Capability>().is_err());
    }

    #[test]
    fn names_round_trip() {
        for cap in Capability::ALL {
            assert_eq!(cap.to_string().parse(), Ok(*cap));
        }
        for r in RlimitResource::ALL {
            assert_eq!(r.to_string().parse(), Ok(*r));
            assert_eq!(r.name().parse(), Ok(*r));
        }
        for n in NetworkMode::ALL {
            assert_eq!(n.to_string().parse(), Ok(*n));
        }
        assert_eq!(RlimitResource::Nofile.to_string(), "RLIMIT_NOFILE");
        assert_eq!("Rlimit_Core".parse(), Ok(RlimitResource::Core));
        let err = "bridge".parse::<NetworkMode>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown network mode \"bridge\": use one of host, none, private"
        );
    }
}
