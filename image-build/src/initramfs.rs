//! A deterministic initramfs: a newc ("070701") cpio archive, gzip-compressed.
//!
//! Written here rather than with a cpio crate: newc is a 110-byte ASCII header plus
//! 4-byte padding, and reproducibility needs control of every field (inode numbers from
//! the sorted order, mtime 0, uid/gid 0, nlink), which is simplest when we write them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::io_err;
use crate::BuildError;

/// One entry of the initramfs. Paths are absolute inside the image (`/init`,
/// `/lib/modules/...`); missing parent directories are added with mode 0755.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitramfsEntry {
    /// A directory.
    Dir {
        /// Path in the image.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file copied from the host.
    File {
        /// Path in the image.
        path: String,
        /// Host file to read.
        source: PathBuf,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file with the given contents.
    Bytes {
        /// Path in the image.
        path: String,
        /// Contents.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Path in the image.
        path: String,
        /// Link target, stored as is.
        target: String,
    },
}

impl InitramfsEntry {
    fn path(&self) -> &str {
        match self {
            Self::Dir { path, .. }
            | Self::File { path, .. }
            | Self::Bytes { path, .. }
            | Self::Symlink { path, .. } => path,
        }
    }
}

/// The archive name of an image path: no leading `/`, no empty or `..` components.
fn archive_name(path: &str) -> Result<String, BuildError> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return Err(BuildError::Usage(format!(
            "initramfs path {path:?}: not a valid path"
        )));
    }
    Ok(parts.join("/"))
}

fn header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    name: &str,
) -> Result<(), BuildError> {
    let size = u32::try_from(size)
        .map_err(|_| BuildError::Usage(format!("initramfs entry {name}: larger than 4 GiB")))?;
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        0,
        0,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    Ok(())
}

/// One regular file: header, contents, padding.
fn regular_file(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    name: &str,
    data: &[u8],
) -> Result<(), BuildError> {
    header(out, ino, 0o100000 | (mode & 0o7777), 1, data.len(), name)?;
    out.extend_from_slice(data);
    pad4(out);
    Ok(())
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// The uncompressed newc archive of `entries`: sorted by path, parents added, mtime 0,
/// uid/gid 0, inode numbers in order. A later entry for the same path replaces an earlier one.
pub fn cpio_newc(entries: &[InitramfsEntry]) -> Result<Vec<u8>, BuildError> {
    let mut by_name: BTreeMap<String, &InitramfsEntry> = BTreeMap::new();
    for e in entries {
        by_name.insert(archive_name(e.path())?, e);
    }
    let mut parents = Vec::new();
    for name in by_name.keys() {
        let mut p = name.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            parents.push(parent.to_string());
            p = parent;
        }
    }
    let implicit = InitramfsEntry::Dir {
        path: String::new(),
        mode: 0o755,
    };
    for p in parents {
        by_name.entry(p).or_insert(&implicit);
    }
    let mut out = Vec::new();
    for (i, (name, entry)) in by_name.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        match entry {
            InitramfsEntry::Dir { mode, .. } => {
                header(&mut out, ino, 0o040000 | (mode & 0o7777), 2, 0, name)?;
            }
            InitramfsEntry::File { source, mode, .. } => {
                let data = std::fs::read(source).map_err(|e| io_err("read", source, e))?;
                regular_file(&mut out, ino, *mode, name, &data)?;
            }
            InitramfsEntry::Bytes { data, mode, .. } => {
                regular_file(&mut out, ino, *mode, name, data)?;
            }
            InitramfsEntry::Symlink { target, .. } => {
                header(&mut out, ino, 0o120777, 1, target.len(), name)?;
                out.extend_from_slice(target.as_bytes());
                pad4(&mut out);
            }
        }
    }
    header(&mut out, 0, 0, 1, 0, "TRAILER!!!")?;
    Ok(out)
}

/// Writes the gzip-compressed newc archive of `entries` to `out` (gzip header without a
/// name or mtime, so the bytes depend on the entries only). Returns its size in bytes.
pub fn write_initramfs(out: &Path, entries: &[InitramfsEntry]) -> Result<u64, BuildError> {
    let cpio = cpio_newc(entries)?;
    let file = std::fs::File::create(out).map_err(|e| io_err("create", out, e))?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(3)
        .write(std::io::BufWriter::new(file), flate2::Compression::new(9));
    gz.write_all(&cpio).map_err(|e| io_err("write", out, e))?;
    let mut w = gz.finish().map_err(|e| io_err("write", out, e))?;
    w.flush().map_err(|e| io_err("write", out, e))?;
    drop(w);
    Ok(std::fs::metadata(out)
        .map_err(|e| io_err("stat", out, e))?
        .len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn newc_layout_and_order() {
        let entries = vec![
            InitramfsEntry::Bytes {
                path: "/lib/modules/x.ko".into(),
                data: b"abc".to_vec(),
                mode: 0o644,
            },
            InitramfsEntry::Symlink {
                path: "/bin/sh".into(),
                target: "busybox".into(),
            },
            InitramfsEntry::Dir {
                path: "/proc".into(),
                mode: 0o555,
            },
        ];
        let a = cpio_newc(&entries).unwrap();
        let mut rev = entries.clone();
        rev.reverse();
        assert_eq!(
            a,
            cpio_newc(&rev).unwrap(),
            "order of entries must not matter"
        );
        assert_eq!(a.len() % 4, 0);
        // Walk the headers back.
        let mut names = Vec::new();
        let mut off = 0;
        loop {
            let h = std::str::from_utf8(&a[off..off + 110]).unwrap();
            assert_eq!(&h[..6], "070701");
            let field = |i: usize| usize::from_str_radix(&h[6 + 8 * i..14 + 8 * i], 16).unwrap();
            let (size, namesize) = (field(6), field(11));
            assert_eq!(field(5), 0, "mtime");
            let name = std::str::from_utf8(&a[off + 110..off + 110 + namesize - 1])
                .unwrap()
                .to_string();
            off = (off + 110 + namesize).div_ceil(4) * 4;
            off = (off + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                break;
            }
            names.push(name);
        }
        assert_eq!(off, a.len());
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "lib",
                "lib/modules",
                "lib/modules/x.ko",
                "proc"
            ]
        );
        assert!(archive_name("/a/../b").is_err());
    }

    #[test]
    fn gzip_is_reproducible() {
        let t = tempfile::tempdir().unwrap();
        let entries = vec![InitramfsEntry::Bytes {
            path: "/init".into(),
            data: b"x".to_vec(),
            mode: 0o755,
        }];
        write_initramfs(&t.path().join("a"), &entries).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write_initramfs(&t.path().join("b"), &entries).unwrap();
        assert_eq!(
            std::fs::read(t.path().join("a")).unwrap(),
            std::fs::read(t.path().join("b")).unwrap()
        );
    }
}
