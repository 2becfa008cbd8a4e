//! Finding the machine's disks: by virtio serial (`-drive ...,serial=NAME`), by GPT partition
//! name (`PARTNAME=` in the partition's sysfs `uevent`, e.g. `flotilla-root-a` on the
//! bootable `disk.img`) or by filesystem label, and telling what a disk holds from its
//! superblock.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a block device holds, from the first 64 KiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// An ext2/3/4 filesystem with this label.
    Ext4 {
        /// The volume label.
        label: String,
    },
    /// An erofs filesystem with this label.
    Erofs {
        /// The volume label.
        label: String,
    },
    /// A squashfs filesystem (no label).
    Squashfs,
    /// Only zeros: a new disk that may be formatted.
    Blank,
    /// Something else: never formatted over.
    Unknown,
}

impl Content {
    /// The filesystem type to mount, if any.
    pub fn fstype(&self) -> Option<&'static str> {
        match self {
            Content::Ext4 { .. } => Some("ext4"),
            Content::Erofs { .. } => Some("erofs"),
            Content::Squashfs => Some("squashfs"),
            Content::Blank | Content::Unknown => None,
        }
    }

    fn label(&self) -> Option<&str> {
        match self {
            Content::Ext4 { label } | Content::Erofs { label } => Some(label),
            _ => None,
        }
    }
}

/// Bytes read to classify a disk.
pub const PROBE_BYTES: usize = 64 * 1024;

fn le(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = b.get(at..at + n)?;
    Some(s.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn label_at(b: &[u8], at: usize) -> String {
    let raw = b.get(at..at + 16).unwrap_or_default();
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(raw.get(..end).unwrap_or_default()).into_owned()
}

/// Classifies the start of a disk (see [`PROBE_BYTES`]).
pub fn classify(head: &[u8]) -> Content {
    // ext2/3/4: superblock at 1024, s_magic at +56, s_volume_name at +120.
    if le(head, 1024 + 56, 2) == Some(0xEF53) {
        return Content::Ext4 {
            label: label_at(head, 1024 + 120),
        };
    }
    // erofs: superblock at 1024, magic first, volume_name at +64.
    if le(head, 1024, 4) == Some(0xE0F5_E1E2) {
        return Content::Erofs {
            label: label_at(head, 1024 + 64),
        };
    }
    if head.get(..4) == Some(b"hsqs".as_slice()) {
        return Content::Squashfs;
    }
    if !head.is_empty() && head.iter().all(|&b| b == 0) {
        return Content::Blank;
    }
    Content::Unknown
}

/// Reads the start of a device and classifies it.
pub fn probe(dev: &Path) -> std::io::Result<Content> {
    let mut head = Vec::with_capacity(PROBE_BYTES);
    fs::File::open(dev)?
        .take(PROBE_BYTES as u64)
        .read_to_end(&mut head)?;
    Ok(classify(&head))
}

/// Whole disks and partitions the kernel knows: (`/dev/NAME`, its sysfs directory).
fn block_devices() -> Vec<(PathBuf, PathBuf)> {
    let Ok(dir) = fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    let mut devs: Vec<(PathBuf, PathBuf)> = dir
        .flatten()
        .map(|e| (Path::new("/dev").join(e.file_name()), e.path()))
        .collect();
    devs.sort();
    devs
}

/// The GPT partition name in the text of a partition's sysfs `uevent` (`PARTNAME=NAME`
/// line), if it has one. Whole disks and MBR partitions have none.
pub fn partname(uevent: &str) -> Option<&str> {
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("PARTNAME="))
        .map(str::trim_end)
        .filter(|n| !n.is_empty())
}

/// The device whose virtio serial, GPT partition name or filesystem label is `name`, if
/// present now (in that order).
pub fn find(name: &str) -> Option<(PathBuf, Content)> {
    let devs = block_devices();
    // Serial first, then the partition name: they name the disk even when it is blank.
    for (dev, sys) in &devs {
        let serial = fs::read_to_string(sys.join("serial")).unwrap_or_default();
        if serial.trim() == name {
            let content = probe(dev).unwrap_or(Content::Unknown);
            return Some((dev.clone(), content));
        }
    }
    for (dev, sys) in &devs {
        let uevent = fs::read_to_string(sys.join("uevent")).unwrap_or_default();
        if partname(&uevent) == Some(name) {
            let content = probe(dev).unwrap_or(Content::Unknown);
            return Some((dev.clone(), content));
        }
    }
    devs.into_iter().find_map(|(dev, _)| {
        let content = probe(&dev).ok()?;
        (content.label() == Some(name)).then_some((dev, content))
    })
}

/// [`find`], retried until `timeout` (drivers probe devices asynchronously).
pub fn wait_for(name: &str, timeout: Duration) -> Option<(PathBuf, Content)> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(found) = find(name) {
            return Some(found);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn classifies_superblocks() {
        let mut b = vec![0u8; PROBE_BYTES];
        assert_eq!(classify(&b), Content::Blank);
        b[1024 + 56] = 0x53;
        b[1024 + 57] = 0xEF;
        b[1024 + 120..1024 + 123].copy_from_slice(b"var");
        assert_eq!(
            classify(&b),
            Content::Ext4 {
                label: "var".into()
            }
        );
        let mut e = vec![0u8; PROBE_BYTES];
        e[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        e[1024 + 64..1024 + 80].copy_from_slice(b"flotilla-root-xx");
        assert_eq!(
            classify(&e),
            Content::Erofs {
                label: "flotilla-root-xx".into()
            }
        );
        let mut s = vec![0u8; 100];
        s[..4].copy_from_slice(b"hsqs");
        assert_eq!(classify(&s), Content::Squashfs);
        assert_eq!(classify(&[0, 1, 0]), Content::Unknown);
        assert_eq!(classify(&[]), Content::Unknown);
        assert_eq!(Content::Blank.fstype(), None);
    }

    #[test]
    fn partition_names_from_uevent() {
        // As the 6.1 kernel writes /sys/class/block/vda2/uevent for a GPT partition.
        let slot_a = "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nDISKSEQ=9\n\
                      PARTN=2\nPARTNAME=flotilla-root-a\n";
        assert_eq!(partname(slot_a), Some("flotilla-root-a"));
        assert_ne!(partname(slot_a), Some("flotilla-root-b"));
        assert_ne!(partname(slot_a), Some("flotilla-root"));
        // A whole disk and an unnamed partition have no name; a name is not a prefix match.
        let disk = "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\nDISKSEQ=9\n";
        assert_eq!(partname(disk), None);
        assert_eq!(partname("DEVTYPE=partition\nPARTN=1\nPARTNAME=\n"), None);
        assert_eq!(
            partname("PARTN=4\nPARTNAME=flotilla-var"),
            Some("flotilla-var")
        );
        assert_eq!(partname("XPARTNAME=flotilla-var\n"), None);
        assert_eq!(partname(""), None);
    }
}
