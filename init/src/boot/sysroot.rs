//! The real root: the read-only root image, the writable `/var`, `/etc` as a tmpfs rendered
//! from the image's factory `/etc`, and the switch from the initramfs into it (`MS_MOVE` +
//! chroot: pivot_root(2) does not work from an initramfs).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::mount::{mount, mount_move, MountFlags};

use super::disks::Content;
use super::{errno, io, BootError};

/// Where the real root is assembled before the switch.
pub const SYSROOT: &str = "/sysroot";
/// The image's factory `/etc`, copied into the tmpfs `/etc` at every boot (below the root).
pub const FACTORY_ETC: &str = "usr/share/factory/etc";
/// The API filesystems moved into the new root (with everything mounted below them).
pub const MOVED_MOUNTS: &[&str] = &["/dev", "/proc", "/sys", "/run"];
/// How a blank `/var` disk is formatted on first boot: the image's busybox `mke2fs`
/// (ext2, which the ext4 driver mounts), with the label as the last two arguments.
pub const MKFS: &[&str] = &["bin/busybox", "mke2fs", "-q", "-L"];

/// `/sysroot/REL`.
pub fn sysroot(rel: &str) -> PathBuf {
    Path::new(SYSROOT).join(rel.trim_start_matches('/'))
}

/// Mounts the root image read-only on [`SYSROOT`].
pub fn mount_root(dev: &Path, content: &Content) -> Result<(), BootError> {
    let fstype = content.fstype().ok_or_else(|| BootError::Disk {
        disk: dev.to_path_buf(),
        detail: format!("holds no root filesystem ({content:?}); rebuild it with image-build os"),
    })?;
    let target = Path::new(SYSROOT);
    fs::create_dir_all(target).map_err(io("create", target))?;
    mount(dev, target, fstype, MountFlags::RDONLY, c"").map_err(errno("mount", dev))
}

/// Mounts `/var` read-write from `dev`, formatting it first when it is blank. Without a
/// `/var` disk, a tmpfs stands in (nothing survives a reboot; said on the console).
pub fn mount_var(disk: Option<(PathBuf, Content)>, label: &str) -> Result<(), BootError> {
    let target = sysroot("var");
    let Some((dev, content)) = disk else {
        log::warn!("no /var disk named {label}: /var is a tmpfs, nothing in it survives a reboot");
        return mount(
            c"tmpfs",
            &target,
            c"tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            c"mode=0755",
        )
        .map_err(errno("mount a tmpfs on", &target));
    };
    let content = match content {
        Content::Blank => {
            format_blank(&dev, label)?;
            super::disks::probe(&dev).map_err(io("read", &dev))?
        }
        c => c,
    };
    let fstype = match content.fstype() {
        Some(t @ "ext4") => t,
        _ => {
            return Err(BootError::Disk {
                disk: dev,
                detail: format!(
                    "/var must be ext4 or blank, found {content:?}; nothing was written to it"
                ),
            })
        }
    };
    mount(
        &dev,
        &target,
        fstype,
        MountFlags::NOSUID | MountFlags::NODEV,
        c"",
    )
    .map_err(errno("mount", &dev))
}

/// First boot with a blank `/var` disk: make the filesystem with the image's own tool.
fn format_blank(dev: &Path, label: &str) -> Result<(), BootError> {
    let (tool, args) = MKFS
        .split_first()
        .ok_or_else(|| BootError::Other("empty MKFS table".into()))?;
    let tool = sysroot(tool);
    log::info!(
        "/var disk {} is blank: formatting it (first boot)",
        dev.display()
    );
    let out = Command::new(&tool)
        .args(args)
        .arg(label)
        .arg(dev)
        .output()
        .map_err(io("run", &tool))?;
    if !out.status.success() {
        return Err(BootError::Disk {
            disk: dev.to_path_buf(),
            detail: format!(
                "formatting failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Mounts a tmpfs on `/sysroot/etc` and copies the image's factory `/etc` into it.
pub fn mount_etc() -> Result<(), BootError> {
    let target = sysroot("etc");
    mount(
        c"tmpfs",
        &target,
        c"tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=0755",
    )
    .map_err(errno("mount a tmpfs on", &target))?;
    let factory = sysroot(FACTORY_ETC);
    if factory.is_dir() {
        copy_tree(&factory, &target)?;
    } else {
        log::warn!("the image has no {}: /etc starts empty", factory.display());
    }
    Ok(())
}

/// Copies directories, regular files (with their modes) and symlinks from `src` into `dst`.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), BootError> {
    for entry in fs::read_dir(src).map_err(io("read", src))? {
        let entry = entry.map_err(io("read", src))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = fs::symlink_metadata(&from).map_err(io("stat", &from))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&to).map_err(io("create", &to))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.permissions().mode()))
                .map_err(io("chmod", &to))?;
            copy_tree(&from, &to)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(io("read", &from))?;
            symlink(&target, &to).map_err(io("create", &to))?;
        } else if ft.is_file() {
            fs::copy(&from, &to).map_err(io("copy", &from))?;
        }
    }
    Ok(())
}

/// Frees the initramfs: deletes everything on the root filesystem when it is the
/// initramfs (ramfs or tmpfs), without crossing into other filesystems (the moved API
/// mounts, [`SYSROOT`]). Like busybox's switch_root: its memory is otherwise never returned.
/// Returns how many entries were removed.
pub fn free_initramfs() -> Result<usize, BootError> {
    use rustix::fs::{stat, statfs};
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let root = Path::new("/");
    let fs = statfs(root).map_err(errno("statfs", root))?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    let magic = fs.f_type as i64;
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        return Err(BootError::Other(format!(
            "/ is not an initramfs (filesystem magic {magic:#x}); nothing deleted"
        )));
    }
    let dev = stat(root).map_err(errno("stat", root))?.st_dev;
    remove_on_device(root, dev)
}

fn remove_on_device(dir: &Path, dev: u64) -> Result<usize, BootError> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(io("read", dir))? {
        let path = entry.map_err(io("read", dir))?.path();
        let meta = fs::symlink_metadata(&path).map_err(io("stat", &path))?;
        if std::os::unix::fs::MetadataExt::dev(&meta) != dev {
            continue; // another filesystem mounted here
        }
        if meta.is_dir() {
            removed += remove_on_device(&path, dev)?;
            // A directory that still holds a mount point stays.
            if fs::remove_dir(&path).is_ok() {
                removed += 1;
            }
        } else {
            fs::remove_file(&path).map_err(io("remove", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Moves the API filesystems into [`SYSROOT`] and makes it the root (`MS_MOVE` + chroot).
pub fn switch_root() -> Result<(), BootError> {
    for m in MOVED_MOUNTS {
        let target = sysroot(m);
        fs::create_dir_all(&target).map_err(io("create", &target))?;
        mount_move(*m, &target).map_err(errno("move mount", Path::new(m)))?;
    }
    let root = Path::new(SYSROOT);
    nix::unistd::chdir(root).map_err(|e| io("chdir", root)(e.into()))?;
    mount_move(".", "/").map_err(errno("move the root", root))?;
    nix::unistd::chroot(".").map_err(|e| io("chroot", root)(e.into()))?;
    nix::unistd::chdir("/").map_err(|e| io("chdir", Path::new("/"))(e.into()))
}
