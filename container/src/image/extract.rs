//! Safe extraction of one layer tarball into a directory, in overlayfs format.
//!
//! The `tar` crate is used only to READ entries; every file is created here, relative to
//! the layer directory, without ever following a symlink:
//! - each entry path is validated first (no absolute path, no `..`, no NUL, not empty);
//! - parent directories are walked component by component with
//!   `openat(O_DIRECTORY | O_NOFOLLOW)`, so a symlink (or a non-directory) in the middle of
//!   a path makes the entry refused instead of followed;
//! - the final component is created with `O_CREAT | O_EXCL | O_NOFOLLOW` (files),
//!   `mkdirat`, `symlinkat` (target text stored as is, never followed), `mknodat`, or
//!   `linkat` without `AT_SYMLINK_FOLLOW` to a target resolved the same way;
//! - character and block devices become empty regular files (see [`device_placeholder`]);
//!   FIFOs and 0:0 character devices (overlayfs whiteouts) are kept;
//! - OCI whiteouts become overlayfs whiteouts: `.wh.NAME` → character device 0:0 `NAME`,
//!   `.wh..wh..opq` → xattr `trusted.overlay.opaque=y` on the directory (as containerd's
//!   overlay snapshotter does).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{
    chmodat, chownat, fchmod, fchown, fsetxattr, futimens, linkat, makedev, mkdirat, mknodat,
    openat, statat, symlinkat, unlinkat, utimensat, AtFlags, FileType, Mode, OFlags, Timespec,
    Timestamps, XattrFlags, CWD,
};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};
use tar::EntryType;

use super::ImageError;

/// Name of the opaque-directory marker in OCI layers.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Prefix of OCI whiteout files.
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// Splits a raw tar path into its components, refusing anything that could name a file
/// outside the extraction root. `.` and empty components are dropped; an empty result
/// means the root itself.
pub(crate) fn components(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    if raw.is_empty() {
        return Err("empty file name".into());
    }
    if raw.contains(&0) {
        return Err("file name contains a NUL byte".into());
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path has a '..' component".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Where an error happened, for messages.
struct Ctx<'a> {
    layer: &'a str,
    entry: String,
}

impl Ctx<'_> {
    fn refuse(&self, reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.to_string(),
            entry: self.entry.clone(),
            reason: reason.into(),
        }
    }
    fn io(&self, what: &str, err: impl Into<io::Error>) -> ImageError {
        ImageError::Extract {
            layer: self.layer.to_string(),
            entry: self.entry.clone(),
            what: what.to_string(),
            source: err.into(),
        }
    }
}

/// Options of one extraction.
#[derive(Clone, Copy)]
pub(crate) struct Options {
    /// Convert OCI whiteouts to overlayfs whiteouts (layers); off for plain archives (a tar
    /// of an OCI layout).
    pub overlay: bool,
    /// Apply ownership from the archive (needs root).
    pub owners: bool,
}

/// Extracts the tar stream `reader` into the existing empty directory `dest`.
/// `layer` names the layer in error messages. Returns after reading the whole stream
/// (including the trailing blocks), so a hashing reader sees every byte.
pub(crate) fn extract<R: Read>(
    reader: R,
    dest: &Path,
    layer: &str,
    opts: Options,
) -> Result<R, ImageError> {
    let ctx0 = Ctx {
        layer,
        entry: String::new(),
    };
    let root = openat(
        CWD,
        dest,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| ctx0.io(&format!("open layer directory {}", dest.display()), e))?;
    let mut archive = tar::Archive::new(reader);
    let mut dir_times: Vec<(Vec<Vec<u8>>, i64)> = Vec::new();
    {
        let entries = archive
            .entries()
            .map_err(|e| ctx0.io("read tar archive", e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ctx0.io("read next tar entry", e))?;
            let raw_path = entry.path_bytes().into_owned();
            let ctx = Ctx {
                layer,
                entry: show(&raw_path),
            };
            if let Some(times) = extract_entry(&root, &mut entry, &raw_path, &ctx, opts)? {
                dir_times.push(times);
            }
        }
    }
    // Directory mtimes last: creating children changed them.
    for (comps, mtime) in dir_times.iter().rev() {
        let refs: Vec<&[u8]> = comps.iter().map(Vec::as_slice).collect();
        if let Ok(fd) = walk(&root, &refs, false, &ctx0) {
            let _ = futimens(&fd, &times(*mtime));
        }
    }
    let mut inner = archive.into_inner();
    io::copy(&mut inner, &mut io::sink()).map_err(|e| ctx0.io("read the end of the layer", e))?;
    Ok(inner)
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Opens the directory named by `comps` below `root`, never following a symlink; creates
/// missing directories (mode 0755) when `create`.
fn walk(root: &OwnedFd, comps: &[&[u8]], create: bool, ctx: &Ctx) -> Result<OwnedFd, ImageError> {
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
    let mut cur = openat(root, ".", flags, Mode::empty()).map_err(|e| ctx.io("open root", e))?;
    for comp in comps {
        let next = match openat(&cur, *comp, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                match mkdirat(&cur, *comp, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(ctx.io(&format!("create directory {}", show(comp)), e)),
                }
                openat(&cur, *comp, flags, Mode::empty())
                    .map_err(|e| ctx.io(&format!("open directory {}", show(comp)), e))?
            }
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                let what = match statat(&cur, *comp, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                        "a symlink"
                    }
                    _ => "not a directory",
                };
                return Err(ctx.refuse(format!(
                    "path component '{}' is {what}; entries are never written through symlinks",
                    show(comp)
                )));
            }
            Err(e) => return Err(ctx.io(&format!("open directory {}", show(comp)), e)),
        };
        cur = next;
    }
    Ok(cur)
}

/// Removes whatever is at `name` in `dir` (an empty directory, or any non-directory).
fn remove_existing(dir: &OwnedFd, name: &[u8], ctx: &Ctx) -> Result<(), ImageError> {
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(ctx.io("inspect existing file", e)),
        Ok(st) => {
            let flags = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            unlinkat(dir, name, flags).map_err(|e| ctx.io("replace existing file", e))
        }
    }
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn read_meta<R: Read>(entry: &mut tar::Entry<R>, ctx: &Ctx) -> Result<Meta, ImageError> {
    let h = entry.header();
    let bad = |what: &str, e: io::Error| ctx.refuse(format!("invalid {what} in header: {e}"));
    let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
    let uid = h.uid().map_err(|e| bad("uid", e))?;
    let gid = h.gid().map_err(|e| bad("gid", e))?;
    let mtime = h.mtime().map_err(|e| bad("mtime", e))?;
    let uid = u32::try_from(uid).map_err(|_| ctx.refuse(format!("uid {uid} out of range")))?;
    let gid = u32::try_from(gid).map_err(|_| ctx.refuse(format!("gid {gid} out of range")))?;
    let mtime = i64::try_from(mtime).unwrap_or(i64::MAX);
    let mut xattrs = Vec::new();
    if let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| ctx.io("read PAX extensions", e))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| ctx.io("read PAX extension", e))?;
            if let Ok(key) = ext.key() {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

fn apply_fd(fd: &OwnedFd, meta: &Meta, ctx: &Ctx, opts: Options) -> Result<(), ImageError> {
    if opts.owners {
        fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| ctx.io("set owner", e))?;
    }
    // After chown: chown clears set-id bits.
    fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| ctx.io("set mode", e))?;
    for (name, value) in &meta.xattrs {
        if name.starts_with("trusted.overlay.") {
            log::warn!(
                "layer {}: ignoring xattr {name} on {}: overlayfs attributes come only from whiteouts",
                ctx.layer,
                ctx.entry
            );
            continue;
        }
        if let Err(e) = fsetxattr(fd, name.as_str(), value, XattrFlags::empty()) {
            log::warn!(
                "layer {}: cannot set xattr {name} on {}: {e}",
                ctx.layer,
                ctx.entry
            );
        }
    }
    Ok(())
}

/// Owner and times of a node that cannot be opened (symlink, device, fifo).
fn apply_at(
    dir: &OwnedFd,
    name: &[u8],
    meta: &Meta,
    chmod: bool,
    ctx: &Ctx,
    opts: Options,
) -> Result<(), ImageError> {
    if opts.owners {
        chownat(
            dir,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| ctx.io("set owner", e))?;
    }
    if chmod {
        chmodat(dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())
            .map_err(|e| ctx.io("set mode", e))?;
    }
    utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| ctx.io("set times", e))?;
    Ok(())
}

type DirTime = (Vec<Vec<u8>>, i64);

fn extract_entry<R: Read>(
    root: &OwnedFd,
    entry: &mut tar::Entry<R>,
    raw_path: &[u8],
    ctx: &Ctx,
    opts: Options,
) -> Result<Option<DirTime>, ImageError> {
    let kind = entry.header().entry_type();
    if matches!(kind, EntryType::XGlobalHeader) {
        return Ok(None);
    }
    let comps = components(raw_path).map_err(|r| ctx.refuse(r))?;
    let meta = read_meta(entry, ctx)?;
    let Some((name, parents)) = comps.split_last() else {
        // The root itself ("./").
        if kind.is_dir() {
            apply_fd(root, &meta, ctx, opts)?;
            return Ok(Some((Vec::new(), meta.mtime)));
        }
        return Err(ctx.refuse("a non-directory entry names the layer root"));
    };
    let name: &[u8] = name;

    if opts.overlay {
        if name == OPAQUE_MARKER {
            let dir = walk(root, parents, true, ctx)?;
            fsetxattr(&dir, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                .map_err(|e| ctx.io("set trusted.overlay.opaque (needs root)", e))?;
            return Ok(None);
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(ctx.refuse("whiteout of an invalid name"));
            }
            let dir = walk(root, parents, true, ctx)?;
            remove_existing(&dir, hidden, ctx)?;
            mknodat(
                &dir,
                hidden,
                FileType::CharacterDevice,
                Mode::empty(),
                makedev(0, 0),
            )
            .map_err(|e| ctx.io("create overlay whiteout (needs root)", e))?;
            return Ok(None);
        }
    }

    let dir = walk(root, parents, true, ctx)?;
    match kind {
        EntryType::Directory => {
            match statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                Ok(_) => {
                    unlinkat(&dir, name, AtFlags::empty())
                        .map_err(|e| ctx.io("replace existing file", e))?;
                    mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| ctx.io("create directory", e))?;
                }
                Err(Errno::NOENT) => mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| ctx.io("create directory", e))?,
                Err(e) => return Err(ctx.io("inspect existing file", e)),
            }
            let fd = walk(root, &comps, false, ctx)?;
            apply_fd(&fd, &meta, ctx, opts)?;
            let owned = comps.iter().map(|c| c.to_vec()).collect();
            Ok(Some((owned, meta.mtime)))
        }
        EntryType::Regular | EntryType::Continuous => {
            remove_existing(&dir, name, ctx)?;
            let fd = openat(
                &dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| ctx.io("create file", e))?;
            let mut file = File::from(fd);
            io::copy(entry, &mut file).map_err(|e| ctx.io("write file contents", e))?;
            let fd = OwnedFd::from(file);
            apply_fd(&fd, &meta, ctx, opts)?;
            futimens(&fd, &times(meta.mtime)).map_err(|e| ctx.io("set times", e))?;
            Ok(None)
        }
        EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .map(|c| c.into_owned())
                .unwrap_or_default();
            if target.is_empty() || target.contains(&0) {
                return Err(ctx.refuse("symlink with an empty target or a NUL byte"));
            }
            remove_existing(&dir, name, ctx)?;
            symlinkat(target.as_slice(), &dir, name).map_err(|e| ctx.io("create symlink", e))?;
            apply_at(&dir, name, &meta, false, ctx, opts)?;
            Ok(None)
        }
        EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .map(|c| c.into_owned())
                .unwrap_or_default();
            let tcomps = components(&target)
                .map_err(|r| ctx.refuse(format!("hard link target '{}': {r}", show(&target))))?;
            let Some((tname, tparents)) = tcomps.split_last() else {
                return Err(ctx.refuse("hard link to the layer root"));
            };
            let tdir = walk(root, tparents, false, ctx).map_err(|e| match e {
                ImageError::UnsafeEntry { .. } => e,
                _ => ctx.refuse(format!(
                    "hard link target '{}' is not an earlier entry of this layer",
                    show(&target)
                )),
            })?;
            match statat(&tdir, *tname, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {}
                Ok(_) => return Err(ctx.refuse("hard link to a directory")),
                Err(_) => {
                    return Err(ctx.refuse(format!(
                        "hard link target '{}' is not an earlier entry of this layer",
                        show(&target)
                    )))
                }
            }
            if tcomps == comps {
                return Ok(None);
            }
            remove_existing(&dir, name, ctx)?;
            linkat(&tdir, *tname, &dir, name, AtFlags::empty())
                .map_err(|e| ctx.io("create hard link", e))?;
            Ok(None)
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let h = entry.header();
            let major = h
                .device_major()
                .map_err(|e| ctx.refuse(format!("invalid device major: {e}")))?
                .unwrap_or(0);
            let minor = h
                .device_minor()
                .map_err(|e| ctx.refuse(format!("invalid device minor: {e}")))?
                .unwrap_or(0);
            let ft = match kind {
                EntryType::Fifo => FileType::Fifo,
                // 0:0 is overlayfs's whiteout format (a layer exported from an overlay).
                EntryType::Char if (major, minor) == (0, 0) => FileType::CharacterDevice,
                _ => {
                    return device_placeholder(&dir, name, &meta, major, minor, ctx, opts);
                }
            };
            remove_existing(&dir, name, ctx)?;
            mknodat(
                &dir,
                name,
                ft,
                Mode::from_raw_mode(0o600),
                makedev(major, minor),
            )
            .map_err(|e| ctx.io("create device node (needs root)", e))?;
            apply_at(&dir, name, &meta, true, ctx, opts)?;
            Ok(None)
        }
        other => Err(ctx.refuse(format!("unsupported tar entry type {other:?}"))),
    }
}

/// A character or block device from a layer becomes an empty regular file (mode at most
/// 0644, never set-id): an image never needs a real device node (a container's `/dev` is
/// made by the runtime and its devices by the cgroup allow-list), and a real node in the
/// store would be a way to the host's hardware for anyone who could reach it (an
/// `/dev/mem`, a 0666 disk). Rootless extraction (containers/storage) does the same.
fn device_placeholder(
    dir: &OwnedFd,
    name: &[u8],
    meta: &Meta,
    major: u32,
    minor: u32,
    ctx: &Ctx,
    opts: Options,
) -> Result<Option<DirTime>, ImageError> {
    log::info!(
        "layer {}: device node {} ({major}:{minor}) extracted as an empty file",
        ctx.layer,
        ctx.entry
    );
    remove_existing(dir, name, ctx)?;
    let fd = openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ctx.io("create a placeholder for a device node", e))?;
    let meta = Meta {
        mode: meta.mode & 0o644,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime,
        xattrs: meta.xattrs.clone(),
    };
    apply_fd(&fd, &meta, ctx, opts)?;
    futimens(&fd, &times(meta.mtime)).map_err(|e| ctx.io("set times", e))?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::components;

    #[test]
    fn path_validation() {
        assert!(components(b"/etc/evil").is_err());
        assert!(components(b"../evil").is_err());
        assert!(components(b"a/../../evil").is_err());
        assert!(components(b"a/..").is_err());
        assert!(components(b"").is_err());
        assert!(components(b"a\0b").is_err());
        assert_eq!(
            components(b"./a//b/./c").ok(),
            Some(vec![&b"a"[..], b"b", b"c"])
        );
        assert_eq!(
            components(b"back\\slash").ok(),
            Some(vec![&b"back\\slash"[..]])
        );
        assert_eq!(components(b"./").ok(), Some(vec![]));
    }
}
