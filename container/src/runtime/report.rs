//! Failures inside the container's processes, and how they travel back to [`super::spawn`]:
//! the child writes one short message (`step NUL path NUL errno`) on a close-on-exec pipe and
//! exits 127; a successful `execve` closes the pipe with nothing written.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::ContainerError;

/// Exit status of a container process whose setup failed.
pub(crate) const SETUP_FAILED: i32 = 127;

/// A failed step inside the container's processes.
#[derive(Debug)]
pub(crate) struct Failure {
    /// What was being done.
    pub step: &'static str,
    /// On which path (as seen by the process that failed).
    pub path: Option<PathBuf>,
    /// The error number.
    pub errno: i32,
}

/// Result of a step inside the container's processes.
pub(crate) type Step<T = ()> = Result<T, Failure>;

/// Attach a step name (and optionally a path) to a system error.
pub(crate) trait Context<T> {
    /// Name the step that failed.
    fn step(self, step: &'static str) -> Step<T>;
    /// Name the step and the path it failed on.
    fn step_at(self, step: &'static str, path: impl AsRef<Path>) -> Step<T>;
}

fn errno_of<E: Into<io::Error>>(e: E) -> i32 {
    e.into().raw_os_error().unwrap_or(libc::EIO)
}

impl<T, E: Into<io::Error>> Context<T> for Result<T, E> {
    fn step(self, step: &'static str) -> Step<T> {
        self.map_err(|e| Failure {
            step,
            path: None,
            errno: errno_of(e),
        })
    }
    fn step_at(self, step: &'static str, path: impl AsRef<Path>) -> Step<T> {
        self.map_err(|e| Failure {
            step,
            path: Some(path.as_ref().to_path_buf()),
            errno: errno_of(e),
        })
    }
}

impl Failure {
    /// A failure with a plain error number.
    pub(crate) fn new(step: &'static str, path: Option<&Path>, errno: i32) -> Self {
        Failure {
            step,
            path: path.map(Path::to_path_buf),
            errno,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut msg = Vec::with_capacity(128);
        msg.extend_from_slice(self.step.as_bytes());
        msg.push(0);
        if let Some(p) = &self.path {
            msg.extend_from_slice(p.as_os_str().as_bytes());
        }
        msg.push(0);
        msg.extend_from_slice(self.errno.to_string().as_bytes());
        // One write of at most PIPE_BUF bytes is atomic.
        msg.truncate(libc::PIPE_BUF);
        msg
    }
}

/// Write the failure on the error pipe and end the process with [`SETUP_FAILED`].
pub(crate) fn fail_and_exit(err_fd: RawFd, failure: &Failure) -> ! {
    // SAFETY: err_fd is the error pipe's write end, open in this process until exit.
    let fd = unsafe { BorrowedFd::borrow_raw(err_fd) };
    // Nothing more can be done if the parent is gone.
    let _ = rustix::io::write(fd, &failure.encode());
    exit_now(SETUP_FAILED)
}

/// `_exit`: end a forked process without running the parent's atexit handlers or destructors.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

/// Decode a message read from the error pipe.
pub(crate) fn decode(msg: &[u8]) -> ContainerError {
    let mut parts = msg.splitn(3, |b| *b == 0);
    let step = parts
        .next()
        .map(|s| String::from_utf8_lossy(s).into_owned());
    let path = parts.next();
    let errno = parts
        .next()
        .and_then(|e| std::str::from_utf8(e).ok())
        .and_then(|e| e.parse::<i32>().ok());
    match (step, path, errno) {
        (Some(step), Some(path), Some(errno)) => ContainerError::Child {
            step,
            path: if path.is_empty() {
                None
            } else {
                Some(PathBuf::from(std::ffi::OsString::from_vec(path.to_vec())))
            },
            source: io::Error::from_raw_os_error(errno),
        },
        _ => ContainerError::Lost(format!(
            "unreadable report {:?}",
            String::from_utf8_lossy(msg)
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let f = Failure::new("mount /proc", Some(Path::new("/x/proc")), libc::EPERM);
        let e = decode(&f.encode());
        let text = e.to_string();
        assert!(text.contains("mount /proc /x/proc"), "{text}");
        assert!(text.contains("not permitted"), "{text}");
        let f = Failure::new("exec", None, libc::ENOENT);
        let text = decode(&f.encode()).to_string();
        assert!(text.starts_with("in the container: exec: "), "{text}");
        assert!(text.contains("not in the image"), "{text}");
    }
}
