//! The container's pid 1 for `init = true`: the `flotilla-reaper` program (built by this
//! crate's build script, see `reaper/README.md`), kept in a sealed memfd created once per
//! process and executed by the container's pid 1 once the command is forked. A fork of the
//! caller would keep a copy of the caller's memory (for the manager: every unit's environment
//! and captured output) in a process the unit's own processes can reach; the exec leaves
//! nothing of it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};

use super::ContainerError;

/// The static `flotilla-reaper` executable.
const PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flotilla-reaper"));

/// The memfd holding [`PROGRAM`], or why it could not be made.
static MEMFD: OnceLock<Result<OwnedFd, String>> = OnceLock::new();

fn make_memfd() -> Result<OwnedFd, String> {
    let fd = memfd_create(
        "flotilla-reaper",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| format!("memfd_create: {e}"))?;
    let mut rest = PROGRAM;
    while !rest.is_empty() {
        let n = rustix::io::write(&fd, rest).map_err(|e| format!("write: {e}"))?;
        rest = rest.get(n..).unwrap_or_default();
    }
    fcntl_add_seals(
        &fd,
        SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE,
    )
    .map_err(|e| format!("seal: {e}"))?;
    Ok(fd)
}

/// The memfd to execute as the container's pid 1 (close-on-exec, sealed, shared by every
/// container this process starts).
pub(crate) fn program_fd() -> Result<RawFd, ContainerError> {
    match MEMFD.get_or_init(make_memfd) {
        Ok(fd) => Ok(fd.as_fd().as_raw_fd()),
        Err(e) => Err(ContainerError::setup(
            "prepare the container's init (flotilla-reaper)",
            None,
            std::io::Error::other(e.clone()),
        )),
    }
}
