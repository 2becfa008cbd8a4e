//! The device policy: which device nodes a container may create (`mknod`), read and write,
//! enforced by the kernel with a cgroup device program ([`super::bpf`]) on the container's
//! cgroup. Everything not allowed here is denied with `EPERM`, whatever the container's
//! capabilities, user or image contents (a device node shipped in an image layer included).

use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::ContainerError;

/// `mknod` access.
pub const ACCESS_MKNOD: u32 = 1;
/// `open` for reading.
pub const ACCESS_READ: u32 = 2;
/// `open` for writing.
pub const ACCESS_WRITE: u32 = 4;
/// Every access.
pub(crate) const ACCESS_ALL: u32 = ACCESS_MKNOD | ACCESS_READ | ACCESS_WRITE;
const RW: u32 = ACCESS_READ | ACCESS_WRITE;

/// Character or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A character device (`c`).
    Char,
    /// A block device (`b`).
    Block,
}

/// One allow rule: devices of `kind` with `major:minor` (`None` matches any) may be
/// accessed with the bits of `access` ([`ACCESS_MKNOD`], [`ACCESS_READ`], [`ACCESS_WRITE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceRule {
    /// Character or block.
    pub kind: DeviceKind,
    /// Major number; `None`: any.
    pub major: Option<u32>,
    /// Minor number; `None`: any.
    pub minor: Option<u32>,
    /// Allowed access bits.
    pub access: u32,
}

impl DeviceRule {
    /// A rule; `access` is a mask of the `ACCESS_*` bits.
    pub const fn new(
        kind: DeviceKind,
        major: Option<u32>,
        minor: Option<u32>,
        access: u32,
    ) -> Self {
        DeviceRule {
            kind,
            major,
            minor,
            access,
        }
    }

    /// The rule for the host's device node at `path` (read and write, no `mknod`), from its
    /// type and numbers as they are now.
    pub fn for_node(path: &Path) -> Result<DeviceRule, ContainerError> {
        let meta = std::fs::metadata(path).map_err(|e| {
            ContainerError::InvalidSpec(format!(
                "device {}: {e}; the host has no such node: load its driver (or create the \
                 node), or remove it from `devices`",
                path.display()
            ))
        })?;
        let kind = if meta.file_type().is_char_device() {
            DeviceKind::Char
        } else if meta.file_type().is_block_device() {
            DeviceKind::Block
        } else {
            return Err(ContainerError::InvalidSpec(format!(
                "device {} is not a character or block device: name a device node \
                 (e.g. /dev/fuse), or use a rule such as \"c 10:229 rw\"",
                path.display()
            )));
        };
        let rdev = meta.rdev();
        Ok(DeviceRule::new(
            kind,
            Some(rustix::fs::major(rdev)),
            Some(rustix::fs::minor(rdev)),
            RW,
        ))
    }
}

const fn char_rw(major: u32, minor: Option<u32>) -> DeviceRule {
    DeviceRule::new(DeviceKind::Char, Some(major), minor, RW)
}

/// The devices every container may open: the standard nodes of its `/dev`, read and write,
/// no `mknod` (like runc's default list without its `mknod` wildcards).
pub const DEFAULT_DEVICES: &[DeviceRule] = &[
    char_rw(1, Some(3)), // null
    char_rw(1, Some(5)), // zero
    char_rw(1, Some(7)), // full
    char_rw(1, Some(8)), // random
    char_rw(1, Some(9)), // urandom
    char_rw(5, Some(0)), // tty
    char_rw(5, Some(1)), // console
    char_rw(5, Some(2)), // ptmx
    // pts: Unix98 pseudo-terminal slaves, majors 136-143.
    char_rw(136, None),
    char_rw(137, None),
    char_rw(138, None),
    char_rw(139, None),
    char_rw(140, None),
    char_rw(141, None),
    char_rw(142, None),
    char_rw(143, None),
];

/// Allow [`DEFAULT_DEVICES`] plus `extra` (and nothing else) to the processes of the cgroup
/// v2 directory `cgroup` and its descendants, enforced by the kernel. Call before any
/// process of the container joins the cgroup. Rules attached directly to this cgroup
/// before are replaced.
///
/// Fails (and nothing must then run in the cgroup) when the program cannot be loaded or
/// attached: no cgroup v2 there, a kernel without `CONFIG_CGROUP_BPF`, no `CAP_SYS_ADMIN`.
pub fn attach_device_filter(cgroup: &Path, extra: &[DeviceRule]) -> Result<(), ContainerError> {
    let rules: Vec<DeviceRule> = DEFAULT_DEVICES.iter().chain(extra).copied().collect();
    let dir = std::fs::File::open(cgroup).map_err(|e| {
        ContainerError::setup("open the cgroup for the device filter", Some(cgroup), e)
    })?;
    super::bpf::attach_device_program(dir.as_fd(), &rules).map_err(|f| {
        ContainerError::DeviceFilter {
            step: f.step,
            cgroup: cgroup.to_path_buf(),
            source: f.source,
            log: f.log,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_has_no_mknod_and_no_block_devices() {
        assert!(DEFAULT_DEVICES
            .iter()
            .all(|r| r.access & ACCESS_MKNOD == 0 && r.kind == DeviceKind::Char));
        assert!(DEFAULT_DEVICES.iter().all(|r| r.major.is_some()));
    }
}
