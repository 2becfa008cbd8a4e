//! The host's disk images: the read-only root (erofs, `mkfs.erofs`) and the empty `/var`
//! (ext4, `mkfs.ext4` on a sparse file, never mounted). Both are reproducible: fixed
//! timestamps, a UUID derived from the spec, and (ext4) a fixed directory hash seed.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use indicatif::ProgressBar;
use sha2::Digest as _;

use crate::error::io_err;
use crate::process::run;
use crate::BuildError;

/// Where the erofs superblock starts.
const EROFS_SUPER_OFFSET: u64 = 1024;
/// The erofs magic number (little-endian at the superblock's start).
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// `feature_compat` bit: the superblock carries a crc32c.
const EROFS_FEATURE_COMPAT_SB_CHKSUM: u32 = 1;
/// Offset of `volume_name[16]` in the erofs superblock.
const EROFS_VOLUME_NAME: usize = 64;

/// Longest filesystem label (erofs `volume_name` and ext4 `s_volume_name` are 16 bytes).
pub const MAX_LABEL_LEN: usize = 16;

/// Checks a filesystem label: 1 to 16 bytes of ASCII letters, digits, `-`, `_`, `.`.
pub fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > MAX_LABEL_LEN {
        return Err(format!("must be 1 to {MAX_LABEL_LEN} bytes"));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err("only ASCII letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

/// Parses a disk size: bytes (`"1048576"`), or a whole number with `K`, `M`, `G` or `T`
/// (1024-based, any case, `iB` or `B` optional): `"512M"`, `"1G"`, `"1GiB"`. At least 1M.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let hint = "expected a size like \"512M\" or \"1G\" (K, M, G, T: 1024-based)";
    if num.is_empty() {
        return Err(hint.into());
    }
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("unknown unit {unit:?}: {hint}")),
    };
    let n: u64 = num.parse().map_err(|_| "size is too large".to_string())?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "size is too large".to_string())?;
    if bytes < 1 << 20 {
        return Err("size must be at least 1M".into());
    }
    Ok(bytes)
}

/// A filesystem UUID derived from `seed`: the first 16 bytes of its sha256, marked as an
/// RFC 9562 version 8 ("custom") UUID. Same seed, same UUID.
pub fn derived_uuid(seed: &[u8]) -> String {
    let digest = sha2::Sha256::digest(seed);
    let mut b = [0u8; 16];
    for (dst, src) in b.iter_mut().zip(digest.iter()) {
        *dst = *src;
    }
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let part = |r: std::ops::Range<usize>| hex.get(r).unwrap_or_default().to_string();
    format!(
        "{}-{}-{}-{}-{}",
        part(0..8),
        part(8..12),
        part(12..16),
        part(16..20),
        part(20..32)
    )
}

/// How [`mkfs_erofs`] makes an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErofsOptions<'a> {
    /// Volume label.
    pub label: &'a str,
    /// Filesystem UUID.
    pub uuid: &'a str,
    /// Every inode's time (`-T`).
    pub epoch: u64,
    /// `-z` algorithm (`lz4`, `lz4hc`), `None`: uncompressed.
    pub compression: Option<&'a str>,
    /// Keep the tree's owners and xattrs (image layers need theirs: overlay opaque
    /// directories, file capabilities); else every file is root's and no xattr is stored.
    pub keep_owners: bool,
}

/// The erofs image of `tree` at `out`: `mkfs.erofs -T EPOCH -U UUID` (fixed timestamps and
/// UUID), with `--all-root -x -1` (owners root, no xattrs from the build host) unless
/// `keep_owners`, `-zALGORITHM` if compressed; then the volume label written into the
/// superblock (mkfs.erofs 1.5 has no `-L`).
pub fn mkfs_erofs(
    program: &Path,
    tree: &Path,
    out: &Path,
    opts: &ErofsOptions<'_>,
    pb: &ProgressBar,
    log: &Path,
) -> Result<(), BuildError> {
    remove_if_exists(out)?;
    let mut cmd = Command::new(program);
    cmd.arg(format!("-T{}", opts.epoch))
        .arg(format!("-U{}", opts.uuid));
    if !opts.keep_owners {
        cmd.args(["--all-root", "-x", "-1"]);
    }
    if let Some(algorithm) = opts.compression {
        cmd.arg(format!("-z{algorithm}"));
    }
    cmd.arg("--quiet")
        .arg(out)
        .arg(tree)
        .env("SOURCE_DATE_EPOCH", opts.epoch.to_string());
    run(&mut cmd, pb, log)?;
    set_erofs_label(out, opts.label)
}

/// Writes `label` into an erofs image's superblock `volume_name` and updates the
/// superblock checksum (crc32c, as the kernel checks it) when the image has one.
pub fn set_erofs_label(image: &Path, label: &str) -> Result<(), BuildError> {
    check_label(label).map_err(|e| BuildError::Usage(format!("label {label:?}: {e}")))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| io_err("open", image, e))?;
    let mut sb = read_superblock(&mut f, image)?;
    if let Some(name) = sb.get_mut(EROFS_VOLUME_NAME..EROFS_VOLUME_NAME + MAX_LABEL_LEN) {
        name.fill(0);
        for (dst, src) in name.iter_mut().zip(label.bytes()) {
            *dst = src;
        }
    }
    if let Some(crc) = superblock_checksum(&sb) {
        if let Some(sum) = sb.get_mut(4..8) {
            sum.copy_from_slice(&crc.to_le_bytes());
        }
    }
    f.seek(SeekFrom::Start(EROFS_SUPER_OFFSET))
        .and_then(|_| f.write_all(&sb))
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err("write the superblock of", image, e))
}

/// The volume label of an erofs image, after checking the superblock checksum (if the
/// image has one) the way the kernel does at mount.
pub fn erofs_label(image: &Path) -> Result<String, BuildError> {
    let mut f = std::fs::File::open(image).map_err(|e| io_err("open", image, e))?;
    let sb = read_superblock(&mut f, image)?;
    if let Some(crc) = superblock_checksum(&sb) {
        if le32(&sb, 4) != crc {
            return Err(BuildError::Usage(format!(
                "{}: bad superblock checksum",
                image.display()
            )));
        }
    }
    let name = sb
        .get(EROFS_VOLUME_NAME..EROFS_VOLUME_NAME + MAX_LABEL_LEN)
        .unwrap_or_default();
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(name.get(..end).unwrap_or_default()).into_owned())
}

fn le32(b: &[u8], o: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(o..o + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

/// The erofs superblock's block from the superblock on (what the checksum covers).
fn read_superblock(f: &mut std::fs::File, image: &Path) -> Result<Vec<u8>, BuildError> {
    let bad = |detail: &str| BuildError::Usage(format!("{}: {detail}", image.display()));
    let mut head = [0u8; 16];
    f.seek(SeekFrom::Start(EROFS_SUPER_OFFSET))
        .and_then(|_| f.read_exact(&mut head))
        .map_err(|e| io_err("read the superblock of", image, e))?;
    if le32(&head, 0) != EROFS_MAGIC {
        return Err(bad("not an erofs image (bad magic)"));
    }
    let blkszbits = head.get(12).copied().unwrap_or(0);
    if !(9..=16).contains(&blkszbits) {
        return Err(bad("unsupported erofs block size"));
    }
    let mut len = 1usize << blkszbits;
    if len > EROFS_SUPER_OFFSET as usize {
        len -= EROFS_SUPER_OFFSET as usize;
    }
    let mut sb = vec![0u8; len.max(128)];
    f.seek(SeekFrom::Start(EROFS_SUPER_OFFSET))
        .and_then(|_| f.read_exact(&mut sb))
        .map_err(|e| io_err("read the superblock of", image, e))?;
    Ok(sb)
}

/// The checksum the superblock `sb` should carry, if its `feature_compat` asks for one.
fn superblock_checksum(sb: &[u8]) -> Option<u32> {
    if le32(sb, 8) & EROFS_FEATURE_COMPAT_SB_CHKSUM == 0 {
        return None;
    }
    let mut copy = sb.to_vec();
    copy.get_mut(4..8)?.fill(0);
    Some(crc32c(!0, &copy))
}

/// CRC-32C (Castagnoli), without the final inversion: the kernel's `crc32c(seed, ...)`.
fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// An empty ext4 filesystem of `size` bytes at `out`, made without mounting: a sparse file,
/// then `mkfs.ext4 -F -L LABEL -U UUID -E hash_seed=UUID,root_owner=0:0,lazy_itable_init=1,
/// lazy_journal_init=1,nodiscard` with `E2FSPROGS_FAKE_TIME=EPOCH` (all three are needed for
/// identical bytes: the UUID, the directory hash seed and the superblock/inode times).
#[allow(clippy::too_many_arguments)]
pub fn mkfs_ext4(
    program: &Path,
    out: &Path,
    size: u64,
    label: &str,
    uuid: &str,
    epoch: u64,
    pb: &ProgressBar,
    log: &Path,
) -> Result<(), BuildError> {
    remove_if_exists(out)?;
    let f = std::fs::File::create(out).map_err(|e| io_err("create", out, e))?;
    f.set_len(size).map_err(|e| io_err("size", out, e))?;
    drop(f);
    let mut cmd = Command::new(program);
    cmd.args(["-F", "-q", "-L", label, "-U", uuid, "-E"])
        .arg(format!(
            "hash_seed={uuid},root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard"
        ))
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string());
    run(&mut cmd, pb, log)
}

fn remove_if_exists(path: &Path) -> Result<(), BuildError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512mib"), Ok(512 << 20));
        assert_eq!(parse_size("2048K"), Ok(2 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in [
            "",
            "G",
            "1.5G",
            "-1G",
            "1X",
            "1 G",
            "512",
            "99999999999999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size("1Q").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn labels() {
        assert!(check_label("flotilla-root").is_ok());
        assert!(check_label("").is_err());
        assert!(check_label("seventeen-bytes-x").is_err());
        assert!(check_label("a b").is_err());
    }

    #[test]
    fn uuids_are_derived() {
        let a = derived_uuid(b"x");
        assert_eq!(a, derived_uuid(b"x"));
        assert_ne!(a, derived_uuid(b"y"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "8");
        assert!("89ab".contains(&a[19..20]), "{a}");
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn erofs_label_keeps_the_checksum_valid() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("x.img");
        let mut b = vec![0u8; 8192];
        b[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        b[1032] = 1; // feature_compat: sb_csum
        b[1036] = 12; // 4 KiB blocks
        std::fs::write(&img, &b).unwrap();
        assert!(erofs_label(&img).is_err(), "checksum 0 must not verify");
        set_erofs_label(&img, "flotilla-root").unwrap();
        assert_eq!(erofs_label(&img).unwrap(), "flotilla-root");
        set_erofs_label(&img, "short").unwrap();
        assert_eq!(erofs_label(&img).unwrap(), "short");
        let mut b = std::fs::read(&img).unwrap();
        b[2000] ^= 1;
        std::fs::write(&img, &b).unwrap();
        assert!(erofs_label(&img).is_err());
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert!(set_erofs_label(&img, "x")
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }
}
