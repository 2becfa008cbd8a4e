//! The slots' partitions and writing a root image to one.
//!
//! Partitions are found by their GPT partition name (`PARTNAME=` in
//! `/sys/class/block/*/uevent`), within one disk when several disks carry the names (a
//! second Flotilla disk attached, or a loop device in a test). [`write_slot`] copies the
//! verified `root.img` to the inactive slot's device in chunks with a progress callback,
//! fsyncs, drops the device's cached pages and reads the image back, comparing its sha256
//! with the signed manifest; it refuses the running slot and an image larger than the
//! partition.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::Digest as _;

use crate::entries::Slot;
use crate::payload::VerifiedPayload;
use crate::{hex, IoError, CHUNK};

/// Why finding or writing a slot failed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// I/O on a device or sysfs file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// No partition of that name.
    #[error("no partition named {name:?}{} in {}: is this a Flotilla disk with the A/B layout?", disk.as_ref().map(|d| format!(" on disk {d}")).unwrap_or_default(), sys.display())]
    NotFound {
        /// The partition name.
        name: String,
        /// The disk searched, if restricted.
        disk: Option<String>,
        /// The sysfs block class directory.
        sys: PathBuf,
    },
    /// Several partitions of that name and no disk to choose.
    #[error("several partitions are named {name:?} ({devices:?}): name the disk")]
    Ambiguous {
        /// The partition name.
        name: String,
        /// The devices.
        devices: Vec<String>,
    },
    /// The target is the running slot.
    #[error("slot {slot} is the running slot: refusing to overwrite it (the update goes to slot {})", slot.other())]
    RunningSlot {
        /// The slot.
        slot: Slot,
    },
    /// The partition is not the slot's.
    #[error("partition {partition:?} is not slot {slot}'s ({expected:?})")]
    WrongPartition {
        /// The slot.
        slot: Slot,
        /// Its partition name.
        expected: String,
        /// The partition given.
        partition: String,
    },
    /// The image does not fit.
    #[error("root image {} is {image} bytes, partition {} holds only {partition}: refused, nothing written", path.display(), dev.display())]
    TooLarge {
        /// The image.
        path: PathBuf,
        /// Its size.
        image: u64,
        /// The device.
        dev: PathBuf,
        /// Its size.
        partition: u64,
    },
    /// The payload has no root artifact (cannot happen after verify).
    #[error("the payload has no root artifact")]
    NoRoot,
    /// The bytes read back differ from the signed manifest.
    #[error("slot {slot} ({}) read back with sha256 {actual}, the signed manifest says {expected}: the write failed or the payload changed; no boot entry installed", dev.display())]
    ReadBack {
        /// The slot.
        slot: Slot,
        /// The device.
        dev: PathBuf,
        /// The manifest's digest.
        expected: String,
        /// What was read back.
        actual: String,
    },
}

/// A partition found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its GPT partition name (`PARTNAME=`).
    pub name: String,
    /// The device node (`DEV_ROOT/DEVNAME`), or a regular file in tests.
    pub dev: PathBuf,
    /// The kernel name of the partition (`DEVNAME=`, e.g. `vda2`).
    pub kernel_name: String,
    /// The kernel name of the disk it is on (e.g. `vda`), empty if unknown.
    pub disk: String,
}

/// Reads `KEY=value` lines.
fn uevent_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Little-endian integers of a byte slice (no panics: a short slice gives `None`).
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// See [`le_u32`].
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The GPT partition names of the disk `dev` with `sector`-byte logical blocks:
/// `(partition number, name)`. The kernel's `PARTNAME=` is preferred; this is the fallback
/// for partitions the kernel did not scan itself (a loop device whose partitions were added
/// with `partx`, which carries no names). An unreadable or absent GPT gives no names.
pub fn gpt_names(dev: &Path, sector: u64) -> Result<Vec<(u32, String)>, IoError> {
    let mut f = std::fs::File::open(dev).map_err(|e| IoError::new("open", dev, e))?;
    let mut header = vec![0u8; 512];
    f.seek(SeekFrom::Start(sector))
        .and_then(|_| f.read_exact(&mut header))
        .map_err(|e| IoError::new("read the GPT header of", dev, e))?;
    if header.get(..8) != Some(b"EFI PART".as_slice()) {
        return Ok(Vec::new());
    }
    let (Some(lba), Some(count), Some(size)) = (
        le_u64(&header, 72),
        le_u32(&header, 80),
        le_u32(&header, 84),
    ) else {
        return Ok(Vec::new());
    };
    // Sanity bounds (a corrupt header must not make us allocate gigabytes): entries of
    // 128..=4096 bytes (the spec's minimum; real tables use 128), at most 1024 of them.
    if !(128..=4096).contains(&size) || count > 1024 {
        return Ok(Vec::new());
    }
    let mut table = vec![0u8; count as usize * size as usize];
    f.seek(SeekFrom::Start(lba.saturating_mul(sector)))
        .and_then(|_| f.read_exact(&mut table))
        .map_err(|e| IoError::new("read the GPT entries of", dev, e))?;
    let mut out = Vec::new();
    for (i, entry) in table.chunks(size as usize).enumerate() {
        let Some(type_guid) = entry.get(..16) else {
            continue;
        };
        if type_guid.iter().all(|&b| b == 0) {
            continue; // unused entry
        }
        let units: Vec<u16> = entry
            .get(56..128)
            .unwrap_or_default()
            .chunks(2)
            .map(|c| {
                u16::from_le_bytes([
                    c.first().copied().unwrap_or(0),
                    c.get(1).copied().unwrap_or(0),
                ])
            })
            .take_while(|&u| u != 0)
            .collect();
        out.push((i as u32 + 1, String::from_utf16_lossy(&units)));
    }
    Ok(out)
}

/// Every partition with a GPT name under `sys_block` (normally `/sys/class/block`); device
/// nodes are under `dev_root` (normally `/dev`). The name is the kernel's `PARTNAME=`, or
/// read from the disk's GPT ([`gpt_names`]) when the kernel has none.
pub fn partitions(sys_block: &Path, dev_root: &Path) -> Result<Vec<Partition>, SlotError> {
    let rd =
        std::fs::read_dir(sys_block).map_err(|e| IoError::new("read directory", sys_block, e))?;
    let mut out = Vec::new();
    let mut gpts: std::collections::HashMap<String, Vec<(u32, String)>> = Default::default();
    for entry in rd {
        let entry = entry.map_err(|e| IoError::new("read directory", sys_block, e))?;
        let uevent = entry.path().join("uevent");
        let Ok(text) = std::fs::read_to_string(&uevent) else {
            continue;
        };
        if uevent_field(&text, "DEVTYPE") != Some("partition") {
            continue;
        }
        let Some(devname) = uevent_field(&text, "DEVNAME") else {
            continue;
        };
        // /sys/class/block/vda2 -> ../../devices/.../vda/vda2: the parent is the disk.
        let disk = std::fs::canonicalize(entry.path())
            .ok()
            .and_then(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        let name = match uevent_field(&text, "PARTNAME") {
            Some(n) => n.to_string(),
            None => {
                let partn = uevent_field(&text, "PARTN").and_then(|n| n.parse::<u32>().ok());
                let (Some(partn), false) = (partn, disk.is_empty()) else {
                    continue;
                };
                if !gpts.contains_key(&disk) {
                    let sector = std::fs::read_to_string(
                        sys_block.join(&disk).join("queue/logical_block_size"),
                    )
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(512);
                    let names = gpt_names(&dev_root.join(&disk), sector).unwrap_or_default();
                    gpts.insert(disk.clone(), names);
                }
                match gpts
                    .get(&disk)
                    .and_then(|g| g.iter().find(|(n, _)| *n == partn))
                {
                    Some((_, name)) if !name.is_empty() => name.clone(),
                    _ => continue,
                }
            }
        };
        out.push(Partition {
            name,
            dev: dev_root.join(devname),
            kernel_name: devname.to_string(),
            disk,
        });
    }
    out.sort_by(|a, b| a.kernel_name.cmp(&b.kernel_name));
    Ok(out)
}

/// The partition named `name`, on `disk` if given; several without a disk is an error.
pub fn find_partition(
    sys_block: &Path,
    dev_root: &Path,
    name: &str,
    disk: Option<&str>,
) -> Result<Partition, SlotError> {
    let mut found: Vec<Partition> = partitions(sys_block, dev_root)?
        .into_iter()
        .filter(|p| p.name == name && disk.is_none_or(|d| p.disk == d))
        .collect();
    match found.len() {
        0 => Err(SlotError::NotFound {
            name: name.to_string(),
            disk: disk.map(str::to_string),
            sys: sys_block.to_path_buf(),
        }),
        1 => found.pop().ok_or(SlotError::NoRoot),
        _ => Err(SlotError::Ambiguous {
            name: name.to_string(),
            devices: found.into_iter().map(|p| p.kernel_name).collect(),
        }),
    }
}

/// The running slot: `flotilla.slot=` on the kernel command line (`/proc/cmdline`).
pub fn running_slot(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("flotilla.slot="))
        .and_then(Slot::parse)
}

/// What [`write_slot`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// Bytes written (the image's size).
    pub bytes: u64,
    /// The partition's size.
    pub partition: u64,
    /// Time to write and fsync.
    pub write: Duration,
    /// Time to read back and hash.
    pub verify: Duration,
}

/// The size of a block device or file, by seeking to its end.
fn device_size(f: &mut std::fs::File, dev: &Path) -> Result<u64, IoError> {
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| IoError::new("seek to the end of", dev, e))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| IoError::new("seek", dev, e))?;
    Ok(size)
}

/// Copies `len` bytes of `src` to `dst` in [`CHUNK`]s, reporting `(done, len)`.
fn copy_chunks(
    src: &mut std::fs::File,
    src_path: &Path,
    dst: &mut std::fs::File,
    dst_path: &Path,
    len: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, IoError> {
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    progress(0, len);
    while done < len {
        // Never past `len`: a file grown since verification must not spill further.
        let want = usize::try_from(len - done).map_or(CHUNK, |left| left.min(CHUNK));
        let n = match src.read(buf.get_mut(..want).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(IoError::new("read", src_path, e)),
        };
        dst.write_all(buf.get(..n).unwrap_or_default())
            .map_err(|e| IoError::new("write", dst_path, e))?;
        done += n as u64;
        progress(done, len);
    }
    Ok(done)
}

/// Reads back the first `len` bytes of `dev` and returns their sha256, after dropping the
/// device's cached pages (so the bytes come from the device, not from what was just
/// written into the page cache).
fn read_back(dev: &Path, len: u64) -> Result<String, IoError> {
    let f = std::fs::File::open(dev).map_err(|e| IoError::new("open", dev, e))?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .map_err(|e| IoError::new("drop the cached pages of", dev, e.into()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    let mut r = f.take(len);
    while left > 0 {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(IoError::new("read back", dev, e)),
        };
        h.update(buf.get(..n).unwrap_or_default());
        left -= n as u64;
    }
    Ok(hex(&h.finalize()))
}

/// The checks [`write_slot`] makes before writing, for a caller that must know before it
/// changes anything else (the update removes the slot's boot entry only once they pass):
/// not the `running` slot, `part` is the slot's partition, the root image fits. Returns
/// the partition's size.
pub fn preflight(
    payload: &VerifiedPayload,
    slot: Slot,
    running: Option<Slot>,
    part: &Partition,
) -> Result<u64, SlotError> {
    open_target(payload, slot, running, part).map(|(_, _, size)| size)
}

/// [`preflight`]'s checks; returns the image file, the opened device and its size.
fn open_target(
    payload: &VerifiedPayload,
    slot: Slot,
    running: Option<Slot>,
    part: &Partition,
) -> Result<(std::fs::File, std::fs::File, u64), SlotError> {
    if running == Some(slot) {
        return Err(SlotError::RunningSlot { slot });
    }
    if part.name != slot.partition_name() {
        return Err(SlotError::WrongPartition {
            slot,
            expected: slot.partition_name(),
            partition: part.name.clone(),
        });
    }
    let root = payload.artifact("root").ok_or(SlotError::NoRoot)?;
    let image_path = payload.dir.join(&root.path);
    let image =
        std::fs::File::open(&image_path).map_err(|e| IoError::new("open", &image_path, e))?;
    let dev = &part.dev;
    // No O_TRUNC, no O_CREAT: a device node is opened, never a new file made in its place.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| IoError::new("open for writing", dev, e))?;
    let partition = device_size(&mut out, dev)?;
    if root.size > partition {
        return Err(SlotError::TooLarge {
            path: image_path,
            image: root.size,
            dev: dev.clone(),
            partition,
        });
    }
    Ok((image, out, partition))
}

/// Writes the payload's root image to `slot`'s partition `part` (whose name must be the
/// slot's), refusing the `running` slot and an image larger than the partition; fsyncs and
/// verifies the bytes read back against the signed sha256. Nothing is written on refusal.
pub fn write_slot(
    payload: &VerifiedPayload,
    slot: Slot,
    running: Option<Slot>,
    part: &Partition,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WriteReport, SlotError> {
    let (mut image, mut out, partition) = open_target(payload, slot, running, part)?;
    let root = payload.artifact("root").ok_or(SlotError::NoRoot)?;
    let image_path = payload.dir.join(&root.path);
    let dev = &part.dev;
    let started = Instant::now();
    let bytes = copy_chunks(&mut image, &image_path, &mut out, dev, root.size, progress)?;
    out.sync_all().map_err(|e| IoError::new("fsync", dev, e))?;
    drop(out);
    let write = started.elapsed();
    let started = Instant::now();
    let actual = read_back(dev, root.size)?;
    let verify = started.elapsed();
    if bytes != root.size || !actual.eq_ignore_ascii_case(&root.sha256) {
        return Err(SlotError::ReadBack {
            slot,
            dev: dev.clone(),
            expected: root.sha256.clone(),
            actual,
        });
    }
    Ok(WriteReport {
        bytes,
        partition,
        write,
        verify,
    })
}

/// Whether `path` is a block device (the real target; tests write to regular files).
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}
