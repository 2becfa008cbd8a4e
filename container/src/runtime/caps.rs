//! Capabilities: the default set, the kernel's bit mask, and the steps that apply a set.
//! The names and numbers are [`Capability`]'s one table (in `flotilla-units`).

use rustix::thread::{
    capability_is_in_bounding_set, configure_capability_in_ambient_set,
    remove_capability_from_bounding_set, set_capabilities, CapabilitySet, CapabilitySets,
};

use super::report::{Context, Step};
use super::Capability;

/// The default set: runc's and Docker's without `CAP_MKNOD` (device nodes come from the
/// runtime; the device filter denies `mknod` anyway) and `CAP_NET_RAW` (raw and packet
/// sockets would see the host's traffic on the host network; Podman drops it too).
pub(crate) const DEFAULT: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// `CAP_SYS_ADMIN` as a bit.
pub(crate) const SYS_ADMIN_BIT: u64 = bit(Capability::SysAdmin);

/// The bit of one capability in the kernel's sets.
pub(crate) const fn bit(cap: Capability) -> u64 {
    1u64 << cap.number()
}

/// The mask of a set of capabilities.
pub(crate) fn mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0u64, |acc, c| acc | bit(*c))
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
    fn masks() {
        assert_eq!(bit(Capability::NetAdmin), 1 << 12);
        assert_eq!(SYS_ADMIN_BIT, 1 << 21);
        assert_eq!(mask(DEFAULT), 0xa00405fb);
        assert_eq!(mask(&[]), 0);
        assert!(!DEFAULT.contains(&Capability::Mknod) && !DEFAULT.contains(&Capability::NetRaw));
    }
}
