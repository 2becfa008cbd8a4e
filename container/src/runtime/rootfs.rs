//! Building the container's root, inside its mount namespace: the root mount, the standard
//! mounts, masked and read-only paths, the spec's bind mounts, then `pivot_root`.
//!
//! Every target inside the new root is opened with `openat2(RESOLVE_IN_ROOT)` and mounted
//! through `/proc/self/fd/N`, so a symlink in the image (`/data -> /etc`) resolves inside the
//! root and can never redirect a mount onto the host.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, StatVfsMountFlags};
use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use super::mounts::{
    Fallback, DEVICE_NODES, DEVICE_SYMLINKS, MASKED_PATHS, READONLY_PATHS, STANDARD_MOUNTS,
};
use super::plan::{BindPlan, Plan, RootPlan};
use super::report::{Context, Failure, Step};

/// How many symlinks [`ensure_dir`] follows while creating a mount point.
const MAX_SYMLINKS: u32 = 40;

/// `/proc/self/fd/N` for an fd: a path the kernel resolves to exactly that file.
fn fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> rustix::io::Result<()> {
    let data = CString::new(data).map_err(|_| Errno::INVAL)?;
    rustix::mount::mount(source, target, fstype, flags, data.as_c_str())
}

/// Mount flags to keep when remounting a bind mount read-only: the kernel refuses to clear
/// locked flags (nosuid, nodev, noexec, atime) inherited from a more privileged mount.
fn kept_flags(fd: BorrowedFd<'_>) -> rustix::io::Result<MountFlags> {
    let vfs = rustix::fs::fstatvfs(fd)?;
    let table = [
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ];
    Ok(table
        .iter()
        .filter(|(st, _)| vfs.f_flag.contains(*st))
        .fold(MountFlags::empty(), |acc, (_, ms)| acc | *ms))
}

/// Remount the bind mount at `target` (an fd path of the mount's root) read-only.
fn remount_readonly(fd: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let flags = kept_flags(fd)? | MountFlags::BIND | MountFlags::RDONLY;
    rustix::mount::mount_remount(fd_path(fd), flags, c"")
}

/// Directories of a host root that are filesystems of their own yet part of the OS a
/// container over that root must see (on a Flotilla host `/etc` is a tmpfs rendered at boot
/// over an empty directory of the read-only image). The root bind does not carry submounts,
/// so each of these is bound read-only on top when it is a separate filesystem.
pub(crate) const HOST_ROOT_SUBMOUNTS: &[&str] = &["etc"];

/// Whether `dir` is on another filesystem than `root` (a mount point below it).
fn is_own_filesystem(root: &Path, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(root), std::fs::metadata(dir)) {
        (Ok(r), Ok(d)) => r.dev() != d.dev(),
        _ => false,
    }
}

/// Step 1: stop mount events from propagating back to the host.
pub(crate) fn make_root_private() -> Step {
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .step_at("make the mounts private (mount --make-rprivate)", "/")
}

/// Step 2: mount the root filesystem at the plan's mount point; returns an fd on it.
pub(crate) fn mount_root(plan: &Plan) -> Step<OwnedFd> {
    let target = &plan.root_mountpoint;
    let target_str = target.to_string_lossy();
    match &plan.root {
        RootPlan::Overlay {
            options, in_memory, ..
        } => {
            if let Some(state) = in_memory {
                rustix::mount::mount(
                    "tmpfs",
                    state,
                    "tmpfs",
                    MountFlags::NOSUID | MountFlags::NODEV,
                    c"mode=0700",
                )
                .step_at("mount the in-memory state tmpfs", state)?;
                // 0755 as on disk: the upper dir's mode is the container root's.
                for d in ["rootfs", "upper", "work"] {
                    let dir = state.join(d);
                    rustix::fs::mkdir(&dir, Mode::from_raw_mode(0o755))
                        .step_at("create a directory in the in-memory state", &dir)?;
                }
            }
            mount(
                "overlay",
                &target_str,
                "overlay",
                MountFlags::empty(),
                options,
            )
            .step_at("mount the overlay root", target)?;
        }
        RootPlan::Bind { source } => {
            rustix::mount::mount_bind(source.as_path(), target.as_path())
                .step_at("bind-mount the root", source)?;
            let fd = open_host_dir(target)?;
            remount_readonly(fd.as_fd()).step_at("remount the root read-only", target)?;
            for sub in HOST_ROOT_SUBMOUNTS {
                let (from, to) = (source.join(sub), target.join(sub));
                if is_own_filesystem(source, &from) && to.is_dir() {
                    rustix::mount::mount_bind(from.as_path(), to.as_path())
                        .step_at("bind-mount the host's directory", &from)?;
                    let fd = open_host_dir(&to)?;
                    remount_readonly(fd.as_fd()).step_at("remount read-only", &to)?;
                }
            }
        }
    }
    open_host_dir(target)
}

/// After every mount is in place: make a read-only overlay root read-only. (A host root
/// bind is read-only from the start: a mount point made there would land on the host.)
pub(crate) fn seal_root(root: BorrowedFd<'_>, plan: &Plan) -> Step {
    if let RootPlan::Overlay {
        read_only: true, ..
    } = &plan.root
    {
        remount_readonly(root).step_at("remount the root read-only", &plan.root_mountpoint)?;
    }
    Ok(())
}

fn open_host_dir(path: &Path) -> Step<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .step_at("open the root mount point", path)
}

/// Open `rel` inside the root (symlinks resolved inside it) as an `O_PATH` fd.
fn open_in_root(root: BorrowedFd<'_>, rel: &Path, extra: OFlags) -> rustix::io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::CLOEXEC | extra,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The path inside the container, for messages.
fn shown(rel: &Path) -> PathBuf {
    Path::new("/").join(rel)
}

/// Open the directory `rel` inside the root, creating missing components (inside the root,
/// following the image's symlinks inside it).
pub(crate) fn ensure_dir(root: BorrowedFd<'_>, rel: &Path) -> Step<OwnedFd> {
    ensure_dir_depth(root, rel, 0)
}

fn ensure_dir_depth(root: BorrowedFd<'_>, rel: &Path, depth: u32) -> Step<OwnedFd> {
    if depth > MAX_SYMLINKS {
        return Err(Failure::new(
            "create a mount point",
            Some(&shown(rel)),
            libc::ELOOP,
        ));
    }
    let mut prefix = PathBuf::new();
    for comp in rel.components() {
        let name = match comp {
            Component::Normal(name) => name,
            // RESOLVE_IN_ROOT keeps ".." inside the root; "/" and "." add nothing.
            Component::ParentDir => {
                prefix.push("..");
                continue;
            }
            _ => continue,
        };
        let parent = open_in_root(root, &prefix, OFlags::DIRECTORY)
            .step_at("open a mount point's parent", shown(&prefix))?;
        prefix.push(name);
        match open_in_root(root, &prefix, OFlags::DIRECTORY) {
            Ok(_) => continue,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(e).step_at("open a mount point", shown(&prefix)),
        }
        match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => {}
            Err(Errno::EXIST) => follow_dangling(root, &parent, &prefix, name, depth)?,
            Err(e) => return Err(e).step_at("create a mount point", shown(&prefix)),
        }
    }
    open_in_root(root, rel, OFlags::DIRECTORY).step_at("open a mount point", shown(rel))
}

/// `name` exists in `parent` but does not resolve: a dangling symlink. Create its target
/// inside the root.
fn follow_dangling(
    root: BorrowedFd<'_>,
    parent: &OwnedFd,
    prefix: &Path,
    name: &OsStr,
    depth: u32,
) -> Step {
    let target = rustix::fs::readlinkat(parent, name, Vec::new())
        .step_at("read a symlink on a mount point's path", shown(prefix))?;
    let target = Path::new(OsStr::from_bytes(target.as_bytes()));
    let resolved = match target.strip_prefix("/") {
        Ok(abs) => abs.to_path_buf(),
        Err(_) => prefix.parent().unwrap_or(Path::new("")).join(target),
    };
    ensure_dir_depth(root, &resolved, depth + 1).map(drop)
}

/// Open the file `rel` inside the root, creating it (and its parents) when missing.
fn ensure_file(root: BorrowedFd<'_>, rel: &Path) -> Step<OwnedFd> {
    if let Some(parent) = rel.parent() {
        ensure_dir(root, parent)?;
    }
    match open_in_root(root, rel, OFlags::empty()) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(e).step_at("open a mount point", shown(rel)),
    }
    rustix::fs::openat2(
        root,
        rel,
        OFlags::CREATE | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::from_raw_mode(0o644),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .step_at("create a mount point", shown(rel))
}

/// Step 3: proc, sys, cgroup, dev, devpts, shm, mqueue ([`STANDARD_MOUNTS`]), then the device
/// nodes and symlinks in `/dev`.
pub(crate) fn standard_mounts(root: BorrowedFd<'_>, userns: bool) -> Step {
    for m in STANDARD_MOUNTS {
        let rel = Path::new(m.target);
        let target = match ensure_dir(root, rel) {
            Ok(fd) => fd,
            Err(f)
                if m.fallback == Fallback::SkipIfUnsupported
                    && [libc::ENOENT, libc::EROFS].contains(&f.errno) =>
            {
                continue
            }
            Err(f) => return Err(f),
        };
        let data = match (userns, m.userns_data) {
            (true, Some(d)) => d,
            _ => m.data,
        };
        let target_path = fd_path(target.as_fd());
        match (
            mount(m.source, &target_path, m.fstype, m.flags, data),
            m.fallback,
        ) {
            (Ok(()), _) => {}
            (Err(Errno::NODEV | Errno::NOENT), Fallback::SkipIfUnsupported) => {}
            (Err(_), Fallback::BindHostReadOnly) => {
                let host = shown(rel);
                rustix::mount::mount_bind_recursive(host.as_path(), target_path.as_str())
                    .step_at("bind-mount the host's directory (fallback)", &host)?;
                let fd = open_in_root(root, rel, OFlags::DIRECTORY).step_at("open", &host)?;
                remount_readonly(fd.as_fd()).step_at("remount read-only", &host)?;
            }
            (Err(e), _) => return Err(e).step_at(m.step_name(), shown(rel)),
        }
    }
    device_nodes(root)
}

impl super::mounts::StandardMount {
    fn step_name(&self) -> &'static str {
        match self.fstype {
            "proc" => "mount proc",
            "sysfs" => "mount sysfs",
            "cgroup2" => "mount cgroup2",
            "tmpfs" => "mount tmpfs",
            "devpts" => "mount devpts",
            "mqueue" => "mount mqueue",
            _ => "mount",
        }
    }
}

fn device_nodes(root: BorrowedFd<'_>) -> Step {
    let dev = open_in_root(root, Path::new("dev"), OFlags::DIRECTORY).step_at("open", "/dev")?;
    for name in DEVICE_NODES {
        // The host's nodes are bound, never created: the device filter denies `mknod` in
        // the container's cgroup (and a user namespace cannot mknod at all).
        let shown_path = Path::new("/dev").join(name);
        let file = rustix::fs::openat(
            &dev,
            *name,
            OFlags::CREATE | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::from_raw_mode(0o666),
        )
        .step_at("create a device node placeholder", &shown_path)?;
        rustix::mount::mount_bind(shown_path.as_path(), fd_path(file.as_fd()).as_str())
            .step_at("bind-mount the host's device node", &shown_path)?;
    }
    for (name, target) in DEVICE_SYMLINKS {
        rustix::fs::symlinkat(*target, &dev, *name)
            .step_at("create a symlink in /dev", Path::new("/dev").join(name))?;
    }
    Ok(())
}

/// Step 4: hide [`MASKED_PATHS`]: `/dev/null` over files, an empty read-only tmpfs over
/// directories.
pub(crate) fn mask_paths(root: BorrowedFd<'_>, extra: &[PathBuf]) -> Step {
    let standard = MASKED_PATHS.iter().map(Path::new);
    for rel in standard.chain(extra.iter().map(PathBuf::as_path)) {
        let fd = match open_in_root(root, rel, OFlags::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e).step_at("open a masked path", shown(rel)),
        };
        let is_dir = rustix::fs::fstat(&fd)
            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
            .step_at("stat a masked path", shown(rel))?;
        let target = fd_path(fd.as_fd());
        if is_dir {
            mount(
                "tmpfs",
                &target,
                "tmpfs",
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                "size=0,mode=555",
            )
            .step_at("mask a directory (read-only tmpfs)", shown(rel))?;
        } else {
            rustix::mount::mount_bind("/dev/null", target.as_str())
                .step_at("mask a file (bind /dev/null)", shown(rel))?;
        }
    }
    Ok(())
}

/// Step 5: make [`READONLY_PATHS`] read-only (bind over themselves, remount read-only).
pub(crate) fn readonly_paths(root: BorrowedFd<'_>) -> Step {
    for p in READONLY_PATHS {
        let rel = Path::new(p);
        let fd = match open_in_root(root, rel, OFlags::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e).step_at("open a read-only path", shown(rel)),
        };
        let target = fd_path(fd.as_fd());
        rustix::mount::mount_bind_recursive(target.as_str(), target.as_str())
            .step_at("bind a read-only path over itself", shown(rel))?;
        let fd = open_in_root(root, rel, OFlags::empty()).step_at("open", shown(rel))?;
        remount_readonly(fd.as_fd()).step_at("remount a path read-only", shown(rel))?;
    }
    Ok(())
}

/// Step 6: the spec's bind mounts, destinations resolved inside the root; each source is the
/// detached clone (and whether it is a directory) that the intermediate process made without
/// following symlinks, in the order of `binds`.
pub(crate) fn bind_mounts(
    root: BorrowedFd<'_>,
    binds: &[BindPlan],
    trees: &[(OwnedFd, bool)],
) -> Step {
    for (b, (tree, is_dir)) in binds.iter().zip(trees) {
        let target = if *is_dir {
            ensure_dir(root, &b.destination)?
        } else {
            ensure_file(root, &b.destination)?
        };
        super::hostpath::attach(tree, &target)
            .step_at("bind-mount (move_mount of the source's clone)", &b.source)?;
        let fd = open_in_root(root, &b.destination, OFlags::empty())
            .step_at("open a bind mount", shown(&b.destination))?;
        // The clone keeps the source's propagation (a shared host mount would make it a
        // peer): make it private like every other mount of the container.
        rustix::mount::mount_change(
            fd_path(fd.as_fd()).as_str(),
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .step_at("make a bind mount private", shown(&b.destination))?;
        if b.read_only {
            remount_readonly(fd.as_fd())
                .step_at("remount a bind mount read-only", shown(&b.destination))?;
        }
    }
    Ok(())
}

/// Step 7: make the new root `/`: `pivot_root(".", ".")` and detach the old root; when the
/// current root cannot be pivoted (an initramfs: `EINVAL`), move the new root over `/` and
/// chroot into it.
pub(crate) fn pivot(root: BorrowedFd<'_>, mountpoint: &Path) -> Step {
    rustix::process::fchdir(root).step_at("chdir to the new root", mountpoint)?;
    match rustix::process::pivot_root(".", ".") {
        Ok(()) => {
            rustix::mount::unmount(".", UnmountFlags::DETACH).step("detach the old root")?;
        }
        Err(Errno::INVAL) => {
            rustix::mount::mount_move(".", "/").step_at("move the new root over /", mountpoint)?;
            rustix::process::chroot(".").step_at("chroot into the new root", mountpoint)?;
        }
        Err(e) => return Err(e).step_at("pivot_root", mountpoint),
    }
    rustix::process::chdir("/").step("chdir to / in the new root")
}
