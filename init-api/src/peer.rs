//! Who is on the other end of a control socket: `SO_PEERCRED`, then the peer's cgroup and
//! pid namespace from `/proc`. Only the syscalls and `/proc` reads live here; what they mean
//! for access is decided in [`super::access`].
//!
//! The credentials are the ones the kernel recorded at `connect(2)`: the pid may have exited
//! and been reused by the time `/proc/PID` is read (`SO_PEERPIDFD`, Linux 6.5, would close
//! that race; the host image runs 6.1).

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The credentials of a socket's peer, as `SO_PEERCRED` reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's pid in the receiver's pid namespace; `None` when the kernel reported 0:
    /// the peer lives in a pid namespace the receiver cannot see (an ancestor or a sibling).
    pub pid: Option<i32>,
    /// The peer's effective uid (mapped into the receiver's user namespace).
    pub uid: u32,
    /// The peer's effective gid.
    pub gid: u32,
}

/// `getsockopt(fd, SOL_SOCKET, SO_PEERCRED)` on a connected Unix socket.
///
/// Read with libc rather than rustix: rustix's `UCred` holds a non-zero `Pid`, and the
/// kernel reports pid 0 for a peer in a pid namespace the receiver cannot see.
pub fn peer_cred(fd: impl AsFd) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid, writable `ucred` and `len` holds its exact size; the fd is
    // borrowed for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: (cred.pid > 0).then_some(cred.pid),
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The cgroup v2 path of process `pid` from `/proc/PID/cgroup` (its `0::` line), relative to
/// this process's cgroup namespace root and without the leading `/`. `None` when the
/// process is in no cgroup v2 hierarchy.
pub fn cgroup_of(pid: i32) -> io::Result<Option<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    Ok(crate::cgroup::own_cgroup(&text))
}

/// The cgroup path (as [`cgroup_of`] shows it) of the cgroup directory `dir`: `dir` without
/// the cgroup2 mount point ([`crate::cgroup::find_cgroup2`]). `None` when `dir` is not below it.
pub fn cgroup_path_of_dir(dir: &Path) -> Option<String> {
    let mount = crate::cgroup::find_cgroup2()?;
    let rel = dir.strip_prefix(mount).ok()?;
    Some(rel.to_string_lossy().trim_matches('/').to_string())
}

/// Whether process `pid` is in the pid namespace of this process.
pub fn in_own_pid_namespace(pid: i32) -> io::Result<bool> {
    let theirs = fs::metadata(format!("/proc/{pid}/ns/pid"))?;
    let ours = fs::metadata("/proc/self/ns/pid")?;
    Ok((theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()))
}
