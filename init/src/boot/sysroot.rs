//! The real root: the read-only root image, the writable `/var`, `/etc` as a tmpfs rendered
//! from the image's factory `/etc`, and the switch from the initramfs into it (`MS_MOVE` +
//! chroot: pivot_root(2) does not work from an initramfs).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::mount::{mount, mount_move, MountFlags};

use super::disks::Content;
use super::BootError;

/// Where the real root is assembled before the switch.
pub const SYSROOT: &str = "/sysroot";
/// The image's factory `/etc`, copied into the tmpfs `/etc` at every boot (below the root).
pub const FACTORY_ETC: &str = "usr/share/factory/etc";
/// The API filesystems moved into the new root (with everything mounted below them).
pub const MOVED_MOUNTS: &[&str] = &["/dev", "/proc", "/sys", "/run"];
/// How a blank `/var` disk is formatted on first boot: the image's busybox `mke2fs`
/// (ext2, which the ext4 driver mounts), with the label as the last two arguments.
pub const MKFS: &[&str] = &["bin/busybox", "mke2fs", "-q", "-L"];

fn io<'a>(what: &str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    let what = what.to_string();
    move |source| BootError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn errno<'a>(what: &str, path: &'a Path) -> impl FnOnce(rustix::io::Errno) -> BootError + 'a {
    let f = io(what, path);
    move |e| f(std::io::Error::from(e))
}

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
