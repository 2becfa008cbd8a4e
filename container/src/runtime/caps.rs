//! Capabilities: the name table, the default set, and the step that applies a set.

use rustix::thread::{
    capability_is_in_bounding_set, configure_capability_in_ambient_set,
    remove_capability_from_bounding_set, set_capabilities, CapabilitySet, CapabilitySets,
};

use super::report::{Context, Step};

/// Capability names and numbers (linux/capability.h).
pub(crate) const NAMES: &[(&str, u32)] = &[
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("DAC_READ_SEARCH", 2),
    ("FOWNER", 3),
    ("FSETID", 4),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("SETPCAP", 8),
    ("LINUX_IMMUTABLE", 9),
    ("NET_BIND_SERVICE", 10),
    ("NET_BROADCAST", 11),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("IPC_LOCK", 14),
    ("IPC_OWNER", 15),
    ("SYS_MODULE", 16),
    ("SYS_RAWIO", 17),
    ("SYS_CHROOT", 18),
    ("SYS_PTRACE", 19),
    ("SYS_PACCT", 20),
    ("SYS_ADMIN", 21),
    ("SYS_BOOT", 22),
    ("SYS_NICE", 23),
    ("SYS_RESOURCE", 24),
    ("SYS_TIME", 25),
    ("SYS_TTY_CONFIG", 26),
    ("MKNOD", 27),
    ("LEASE", 28),
    ("AUDIT_WRITE", 29),
    ("AUDIT_CONTROL", 30),
    ("SETFCAP", 31),
    ("MAC_OVERRIDE", 32),
    ("MAC_ADMIN", 33),
    ("SYSLOG", 34),
    ("WAKE_ALARM", 35),
    ("BLOCK_SUSPEND", 36),
    ("AUDIT_READ", 37),
    ("PERFMON", 38),
    ("BPF", 39),
    ("CHECKPOINT_RESTORE", 40),
];

/// The default set: runc's and Docker's without `CAP_MKNOD` (device nodes come from the
/// runtime; the device filter denies `mknod` anyway) and `CAP_NET_RAW` (raw and packet
/// sockets would see the host's traffic on the host network; Podman drops it too).
pub(crate) const DEFAULT: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// `CAP_SYS_ADMIN` as a bit.
pub(crate) const SYS_ADMIN_BIT: u64 = 1 << 21;

/// The bit of one capability name (`CAP_X` or `X`, any case).
pub(crate) fn bit(name: &str) -> Option<u64> {
    let upper = name.trim().to_ascii_uppercase();
    let short = upper.strip_prefix("CAP_").unwrap_or(&upper);
    NAMES
        .iter()
        .find(|(n, _)| *n == short)
        .map(|(_, number)| 1u64 << number)
}

/// The mask of a list of names; the error is the first unknown name.
pub(crate) fn mask<S: AsRef<str>>(names: &[S]) -> Result<u64, String> {
    names.iter().try_fold(0u64, |acc, n| {
        bit(n.as_ref())
            .map(|b| acc | b)
            .ok_or_else(|| format!("unknown capability {:?}", n.as_ref()))
    })
}

/// Drop every capability not in `keep` from the bounding set (needs `CAP_SETPCAP`, so this
/// runs before the switch to the container's user).
pub(crate) fn drop_bounding(keep: u64) -> Step {
    for number in 0..64u32 {
        let bit = 1u64 << number;
        let cap = CapabilitySet::from_bits_retain(bit);
        match capability_is_in_bounding_set(cap) {
            Ok(true) if keep & bit == 0 => remove_capability_from_bounding_set(cap)
                .step("drop a capability from the bounding set")?,
            Ok(_) => {}
            // Past the kernel's last capability.
            Err(_) => break,
        }
    }
    Ok(())
}

/// Set the effective, permitted and inheritable sets to `keep`; for a non-root user also
/// raise them in the ambient set so they survive the exec.
pub(crate) fn apply(keep: u64, uid: u32) -> Step {
    let set = CapabilitySet::from_bits_retain(keep);
    set_capabilities(
        None,
        CapabilitySets {
            effective: set,
            permitted: set,
            inheritable: set,
        },
    )
    .step("set capabilities")?;
    if uid != 0 {
        for number in 0..64u32 {
            let bit = 1u64 << number;
            if keep & bit != 0 {
                configure_capability_in_ambient_set(CapabilitySet::from_bits_retain(bit), true)
                    .step("raise an ambient capability")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(bit("CAP_NET_ADMIN"), Some(1 << 12));
        assert_eq!(bit("net_admin"), Some(1 << 12));
        assert_eq!(bit("CAP_NOPE"), None);
        assert_eq!(mask(DEFAULT).unwrap(), 0xa00405fb);
        assert!(!DEFAULT.contains(&"CAP_MKNOD") && !DEFAULT.contains(&"CAP_NET_RAW"));
        assert!(mask(&["CAP_CHOWN", "BOGUS"]).is_err());
    }
}
