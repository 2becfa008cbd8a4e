//! Root filesystems: the deterministic layer tar, the clean-up of a debootstrapped root,
//! and the symlinks put into a root (a spec's `[[symlinks]]`, busybox's applet links).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::{EntryType, Header};

use crate::error::io_err;
use crate::BuildError;

/// Fixed timestamp clamping every mtime when `SOURCE_DATE_EPOCH` is not set
/// (2024-01-01T00:00:00Z).
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_704_067_200;

/// The `SOURCE_DATE_EPOCH` in force.
pub fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_SOURCE_DATE_EPOCH)
}

/// Writes a tar of `root` to `out`: entries sorted by name, mtimes clamped to `epoch`,
/// uid/gid and modes kept, hard links kept, xattrs as PAX `SCHILY.xattr.*` records, no
/// user/group names. The same tree always gives the same bytes.
pub fn write_tar(root: &Path, out: &Path, epoch: u64) -> Result<u64, BuildError> {
    let file = File::create(out).map_err(|e| io_err("create", out, e))?;
    let mut b = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    b.follow_symlinks(false);
    let mut w = TarWalk {
        builder: b,
        links: HashMap::new(),
        epoch,
        count: 0,
    };
    w.entry(root, Path::new("."))?;
    w.dir(root, Path::new(""))?;
    let count = w.count;
    let inner = w
        .builder
        .into_inner()
        .map_err(|e| io_err("finish tar", out, e))?;
    let file = inner
        .into_inner()
        .map_err(|e| io_err("write", out, e.into_error()))?;
    file.sync_all().map_err(|e| io_err("sync", out, e))?;
    Ok(count)
}

struct TarWalk {
    builder: tar::Builder<BufWriter<File>>,
    links: HashMap<(u64, u64), PathBuf>,
    epoch: u64,
    count: u64,
}

impl TarWalk {
    fn dir(&mut self, dir: &Path, rel: &Path) -> Result<(), BuildError> {
        let mut names: Vec<OsString> = fs::read_dir(dir)
            .map_err(|e| io_err("list", dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| io_err("list", dir, e))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = dir.join(&name);
            let rel = rel.join(&name);
            let is_dir = self.entry(&path, &rel)?;
            if is_dir {
                self.dir(&path, &rel)?;
            }
        }
        Ok(())
    }

    /// Appends one entry; returns whether it is a directory to descend into.
    fn entry(&mut self, path: &Path, rel: &Path) -> Result<bool, BuildError> {
        let meta = fs::symlink_metadata(path).map_err(|e| io_err("stat", path, e))?;
        let ft = meta.file_type();
        let mut h = Header::new_gnu();
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(u64::from(meta.uid()));
        h.set_gid(u64::from(meta.gid()));
        let mtime = u64::try_from(meta.mtime()).unwrap_or(0).min(self.epoch);
        h.set_mtime(mtime);
        h.set_size(0);
        let err = |e| io_err("add to tar", path, e);
        self.count += 1;
        if ft.is_dir() {
            h.set_entry_type(EntryType::Directory);
            self.xattrs(path)?;
            let name = if rel == Path::new(".") {
                PathBuf::from("./")
            } else {
                rel.to_path_buf()
            };
            self.builder
                .append_data(&mut h, name, io::empty())
                .map_err(err)?;
            return Ok(rel != Path::new("."));
        }
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(|e| io_err("read link", path, e))?;
            h.set_entry_type(EntryType::Symlink);
            self.builder
                .append_link(&mut h, rel, &target)
                .map_err(err)?;
            return Ok(false);
        }
        if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    h.set_entry_type(EntryType::Link);
                    let first = first.clone();
                    self.builder.append_link(&mut h, rel, &first).map_err(err)?;
                    return Ok(false);
                }
                self.links.insert(key, rel.to_path_buf());
            }
            h.set_entry_type(EntryType::Regular);
            h.set_size(meta.len());
            self.xattrs(path)?;
            let f = File::open(path).map_err(|e| io_err("open", path, e))?;
            self.builder.append_data(&mut h, rel, f).map_err(err)?;
            return Ok(false);
        }
        let kind = if ft.is_char_device() {
            EntryType::Char
        } else if ft.is_block_device() {
            EntryType::Block
        } else if ft.is_fifo() {
            EntryType::Fifo
        } else {
            // Sockets cannot be archived; skip them.
            self.count -= 1;
            return Ok(false);
        };
        h.set_entry_type(kind);
        let rdev = meta.rdev();
        h.set_device_major(rustix::fs::major(rdev)).map_err(err)?;
        h.set_device_minor(rustix::fs::minor(rdev)).map_err(err)?;
        self.builder
            .append_data(&mut h, rel, io::empty())
            .map_err(err)?;
        Ok(false)
    }

    /// Appends the xattrs of `path` (if any) as a PAX header for the next entry.
    fn xattrs(&mut self, path: &Path) -> Result<(), BuildError> {
        let mut names = vec![0u8; 4096];
        let n = match rustix::fs::llistxattr(path, &mut names) {
            Ok(n) => n,
            Err(_) => return Ok(()),
        };
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        for name in names.get(..n).unwrap_or_default().split(|b| *b == 0) {
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            if name.is_empty() || name.starts_with("trusted.overlay.") {
                continue;
            }
            let mut value = vec![0u8; 65536];
            if let Ok(len) = rustix::fs::lgetxattr(path, name, &mut value) {
                value.truncate(len);
                records.push((format!("SCHILY.xattr.{name}"), value));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        records.sort();
        self.builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(|e| io_err("add xattrs to tar", path, e))
    }
}

/// Which names of a directory to remove.
type NameFilter = dyn Fn(&str) -> bool;

/// Removes apt caches and lists, logs and temporary files from a debootstrapped root.
pub fn clean(root: &Path) -> Result<u64, BuildError> {
    let mut removed = 0;
    let globs: &[(&str, &NameFilter)] = &[
        ("var/cache/apt", &|n| n.ends_with(".bin")),
        ("var/cache/apt/archives", &|n| n.ends_with(".deb")),
        ("var/cache/apt/archives/partial", &|_| true),
        ("var/lib/apt/lists", &|n| {
            n != "lock" && n != "partial" && n != "auxfiles"
        }),
        ("var/cache/debconf", &|n| n.ends_with("-old")),
        ("var/cache/ldconfig", &|n| n == "aux-cache"),
        ("tmp", &|_| true),
        ("var/tmp", &|_| true),
        ("var/lib/dpkg", &|n| n.ends_with("-old")),
    ];
    for (dir, keep) in globs {
        let dir = root.join(dir);
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep(&name) {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|e| io_err("remove", &p, e))?;
            removed += 1;
        }
    }
    // Logs: keep the directory layout, drop the files.
    removed += remove_files_below(&root.join("var/log"))?;
    Ok(removed)
}

fn remove_files_below(dir: &Path) -> Result<u64, BuildError> {
    let mut n = 0;
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(0);
    };
    for e in rd.flatten() {
        let p = e.path();
        let ft = e.file_type().map_err(|e| io_err("stat", &p, e))?;
        if ft.is_dir() {
            n += remove_files_below(&p)?;
        } else {
            fs::remove_file(&p).map_err(|e| io_err("remove", &p, e))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Creates the symlink `root/path` -> `target` (and its parent directories); an existing
/// entry is replaced when `replace`, else kept. Returns whether it made the link.
pub(crate) fn make_link(
    root: &Path,
    path: &str,
    target: &str,
    replace: bool,
) -> Result<bool, BuildError> {
    let link = root.join(path.trim_start_matches('/'));
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
    }
    if link.symlink_metadata().is_ok() {
        if !replace {
            return Ok(false);
        }
        std::fs::remove_file(&link).map_err(|e| io_err("replace", &link, e))?;
    }
    std::os::unix::fs::symlink(target, &link).map_err(|e| io_err("create symlink", &link, e))?;
    Ok(true)
}

/// Creates a link to `/bin/busybox` for every applet `ROOT/bin/busybox --list-full` lists,
/// keeping existing files; returns how many it made. Serves container images
/// (`busybox_links = true`) and the host's root image (`[root] busybox = true`).
pub(crate) fn busybox_links(root: &Path) -> Result<usize, BuildError> {
    let bb = root.join("bin/busybox");
    let out = Command::new(&bb)
        .arg("--list-full")
        .output()
        .map_err(|e| io_err("run (busybox_links needs bin/busybox)", &bb, e))?;
    if !out.status.success() {
        return Err(BuildError::Command {
            command: format!("{} --list-full", bb.display()),
            status: out.status.to_string(),
            tail: vec![String::from_utf8_lossy(&out.stderr).into_owned()],
            log: None,
        });
    }
    let mut n = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = line.trim();
        if applet.is_empty() || applet.split('/').any(|c| c == "..") || applet == "bin/busybox" {
            continue;
        }
        if make_link(root, applet, "/bin/busybox", false)? {
            n += 1;
        }
    }
    Ok(n)
}
