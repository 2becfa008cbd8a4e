//! Helpers shared by the image store tests: raw tar building (path bytes set directly, so
//! the `tar` builder cannot sanitize hostile names) and layouts from in-memory tars.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use flotilla_container::image::{write_oci_layout, ImageStore, RuntimeConfig};
use tar::{EntryType, Header};

/// One tar entry to write.
pub enum Ent<'a> {
    Dir(&'a [u8]),
    File(&'a [u8], &'a [u8]),
    /// Regular file with mode, uid, gid.
    FileMode(&'a [u8], &'a [u8], u32, u64, u64),
    Symlink(&'a [u8], &'a [u8]),
    Hardlink(&'a [u8], &'a [u8]),
    /// A PAX `path` record (may contain anything), then a regular file.
    PaxPath(&'a [u8]),
    /// A character (`true`) or block device: path, major, minor, mode.
    Device(&'a [u8], bool, u32, u32, u32),
}

fn header(kind: EntryType, path: &[u8], link: &[u8], mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    {
        let old = h.as_old_mut();
        assert!(
            path.len() < old.name.len(),
            "test names must fit the header"
        );
        old.name[..path.len()].copy_from_slice(path);
        old.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    h
}

/// Builds a tar from raw entries.
pub fn tar_of(entries: &[Ent]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Ent::Dir(p) => b
                .append(&header(EntryType::Directory, p, b"", 0o755, 0), &[][..])
                .unwrap(),
            Ent::File(p, data) => b
                .append(
                    &header(EntryType::Regular, p, b"", 0o644, data.len() as u64),
                    *data,
                )
                .unwrap(),
            Ent::FileMode(p, data, mode, uid, gid) => {
                let mut h = header(EntryType::Regular, p, b"", *mode, data.len() as u64);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_cksum();
                b.append(&h, *data).unwrap()
            }
            Ent::Symlink(p, t) => b
                .append(&header(EntryType::Symlink, p, t, 0o777, 0), &[][..])
                .unwrap(),
            Ent::Hardlink(p, t) => b
                .append(&header(EntryType::Link, p, t, 0o644, 0), &[][..])
                .unwrap(),
            Ent::Device(p, chr, major, minor, mode) => {
                let kind = if *chr {
                    EntryType::Char
                } else {
                    EntryType::Block
                };
                let mut h = header(kind, p, b"", *mode, 0);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap()
            }
            Ent::PaxPath(p) => {
                let mut rec = Vec::new();
                let body_len = b" path=".len() + p.len() + 1;
                // The length field counts itself.
                let mut total = body_len + 1;
                while total.to_string().len() + body_len != total {
                    total = total.to_string().len() + body_len;
                }
                rec.extend_from_slice(total.to_string().as_bytes());
                rec.extend_from_slice(b" path=");
                rec.extend_from_slice(p);
                rec.push(b'\n');
                b.append(
                    &header(EntryType::XHeader, b"pax", b"", 0o644, rec.len() as u64),
                    rec.as_slice(),
                )
                .unwrap();
                b.append(
                    &header(EntryType::Regular, b"placeholder", b"", 0o644, 1),
                    &b"x"[..],
                )
                .unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Writes each tar to `work` and an OCI layout of them to `out`; returns the manifest digest.
pub fn layout_of(
    work: &Path,
    out: &Path,
    tars: &[Vec<u8>],
    config: &RuntimeConfig,
    name: &str,
) -> String {
    std::fs::create_dir_all(work).unwrap();
    let mut paths: Vec<PathBuf> = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        let p = work.join(format!("layer{i}.tar"));
        std::fs::write(&p, t).unwrap();
        paths.push(p);
    }
    write_oci_layout(out, &paths, config, name).unwrap()
}

/// Every path under `dir` (relative), sorted.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if p.is_dir() && !p.is_symlink() {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A temporary directory with an image store in `store/`; each test file adds its own
/// helpers to it.
pub struct Fixture {
    /// The directory (removed on drop).
    pub t: tempfile::TempDir,
    /// The store.
    pub store: ImageStore,
}

/// A fresh [`Fixture`].
pub fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    Fixture { t, store }
}
