//! Host paths opened without following symlinks: bind mount sources, and the state
//! directories a unit's `create = true` mount makes.
//!
//! Each component is opened with `openat(O_PATH | O_NOFOLLOW)` relative to the fd of the
//! previous one, starting at `/`. A symlink anywhere in the path (such as one a container
//! planted below a directory it may write) is refused with [`ContainerError::SymlinkInPath`],
//! never followed; and the fd returned is the very file that was checked, so there is no
//! window between the check and the mount.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{MoveMountFlags, OpenTreeFlags};

use super::report::{Failure, Step};
use super::ContainerError;

/// Mode of the directories [`create_dir_all_nofollow`] makes.
const CREATED_DIR_MODE: u32 = 0o755;

/// Open `path` (absolute) as an `O_PATH` fd without following any symlink; with `create`,
/// make missing components as directories on the way (never through a symlink).
fn walk(what: &'static str, path: &Path, create: bool) -> Result<OwnedFd, ContainerError> {
    if !path.is_absolute() {
        return Err(ContainerError::InvalidSpec(format!(
            "{what} {} must be an absolute path",
            path.display()
        )));
    }
    // Errors name the whole path as given (the admin's words), not the component.
    let setup = |e: Errno| ContainerError::Setup {
        step: what,
        path: Some(path.to_path_buf()),
        source: e.into(),
    };
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut cur = rustix::fs::openat(CWD, "/", dir_flags, Mode::empty()).map_err(setup)?;
    let mut shown = PathBuf::from("/");
    let comps: Vec<Component<'_>> = path.components().collect();
    let count = comps.len();
    for (i, comp) in comps.into_iter().enumerate() {
        let last = i + 1 == count;
        let name = match comp {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
            Component::ParentDir => {
                // The real parent of an fd: no symlink is involved.
                cur = rustix::fs::openat(&cur, "..", dir_flags | OFlags::NOFOLLOW, Mode::empty())
                    .map_err(setup)?;
                shown.push("..");
                continue;
            }
            Component::Normal(name) => name,
        };
        shown.push(name);
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let next = match rustix::fs::openat(&cur, name, flags, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(CREATED_DIR_MODE)) {
                    // EEXIST: made concurrently (or a dangling symlink): checked below.
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(setup(e)),
                }
                rustix::fs::openat(&cur, name, flags, Mode::empty()).map_err(setup)?
            }
            Err(e) => return Err(setup(e)),
            Ok(fd) => fd,
        };
        let stat = rustix::fs::fstat(&next).map_err(setup)?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&cur, name, Vec::new())
                    .map(|t| PathBuf::from(OsStr::from_bytes(t.as_bytes())))
                    .unwrap_or_else(|_| PathBuf::from("?"));
                return Err(ContainerError::SymlinkInPath {
                    what,
                    path: path.to_path_buf(),
                    component: shown,
                    target,
                });
            }
            FileType::Directory => {}
            // Only the last component may be something other than a directory.
            _ if !last => {
                return Err(setup(Errno::NOTDIR));
            }
            _ => {}
        }
        cur = next;
    }
    Ok(cur)
}

/// Open the bind mount source `path` without following symlinks and clone it (with its
/// submounts) into a detached mount tree (`open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`), for
/// [`attach`] in the container's mount namespace. Returns the tree and whether its root is
/// a directory.
pub(crate) fn clone_source(path: &Path) -> Result<(OwnedFd, bool), ContainerError> {
    let fd = walk("bind mount source", path, false)?;
    let is_dir = rustix::fs::fstat(&fd)
        .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
        .map_err(|e| ContainerError::setup("bind mount source", Some(path), e))?;
    let tree = rustix::mount::open_tree(
        &fd,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH
            | OpenTreeFlags::AT_RECURSIVE,
    )
    .map_err(|e| ContainerError::setup("clone the bind mount source (open_tree)", Some(path), e))?;
    Ok((tree, is_dir))
}

/// [`clone_source`] for the setup processes: its error as a [`Failure`] for the error pipe.
/// A symlink is reported as [`SYMLINK_STEP`] on the symlink's path with `ELOOP`.
pub(crate) fn clone_source_step(path: &Path) -> Step<(OwnedFd, bool)> {
    clone_source(path).map_err(|e| match e {
        ContainerError::SymlinkInPath { component, .. } => {
            Failure::new(SYMLINK_STEP, Some(&component), libc::ELOOP)
        }
        ContainerError::Setup { step, source, .. } => {
            Failure::new(step, Some(path), source.raw_os_error().unwrap_or(libc::EIO))
        }
        _ => Failure::new("bind mount source", Some(path), libc::EINVAL),
    })
}

/// The step named when a bind mount source has a symlink in it.
pub(crate) const SYMLINK_STEP: &str =
    "bind mount source: this path is a symlink, and host paths are resolved without \
     following symlinks (name the real path instead, or replace the symlink with a directory)";

/// Attach a tree from [`clone_source`] on `target` (an `O_PATH` fd) in this mount namespace.
pub(crate) fn attach(tree: &OwnedFd, target: &OwnedFd) -> rustix::io::Result<()> {
    rustix::mount::move_mount(
        tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
}

/// Create the host directory `path` and its missing parents (mode 0755), never through a
/// symlink: a symlink anywhere in the path is [`ContainerError::SymlinkInPath`]. An existing
/// directory is fine.
pub fn create_dir_all_nofollow(path: &Path) -> Result<(), ContainerError> {
    let fd = walk("create the mount source", path, true)?;
    let st = rustix::fs::fstat(&fd)
        .map_err(|e| ContainerError::setup("create the mount source", Some(path), e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(ContainerError::setup(
            "create the mount source",
            Some(path),
            Errno::NOTDIR,
        ));
    }
    Ok(())
}
