//! The minimal init (`ContainerSpec::init`): pid 1 forks the command, then executes
//! `flotilla-reaper` (see [`super::reaper`]) in its own place, which reaps every orphan,
//! forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the command, and exits with the
//! command's status (128+signal when it was killed) as soon as the command exits. Pid 1 is
//! thus a fresh, non-dumpable program holding nothing of the caller's memory.
//!
//! The signals are blocked before the fork and taken with `sigtimedwait` by the reaper: a
//! blocked signal is queued even for a namespace's init, which the kernel would otherwise
//! shield from signals it has no handler for. [`wait_signal`] serves the foreground
//! [`super::run`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::unistd::{ForkResult, Pid};

use super::child::{child_entry, exec_command};
use super::plan::Plan;
use super::report::{Context, Failure, Step};

/// Signals the init passes on to the command.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Wait up to `timeout_ms` for one of the (blocked) signals in `set`.
pub(crate) fn wait_signal(set: &SigSet, timeout_ms: i64) -> Option<Signal> {
    let timeout = libc::timespec {
        tv_sec: timeout_ms / 1000,
        tv_nsec: (timeout_ms % 1000) * 1_000_000,
    };
    // SAFETY: set and timeout are valid for the call; info may be NULL.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
    Signal::try_from(sig).ok()
}

/// Fork the command, then replace this process (a fork of the caller) with `flotilla-reaper`,
/// which reaps and forwards until the command exits. The forwarded signals and SIGCHLD are
/// blocked before the fork and stay blocked (and pending) across the exec: none is lost.
pub(crate) fn run_init(plan: &Plan, err: RawFd) -> Step<std::convert::Infallible> {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    // Block before the fork so that no signal is lost in between; the command unblocks.
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .step("block signals in the init")?;
    // The command waits until the reaper has made itself non-dumpable (it closes `ready_w`,
    // the last write end): between its exec and that prctl a fresh process is dumpable, and
    // the command must not run in that window.
    let (ready_r, ready_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .step("create the init's ready pipe")?;
    // SAFETY: this process is single-threaded.
    let command = match unsafe { nix::unistd::fork() }.step("fork the command from the init")? {
        ForkResult::Child => child_entry(err, || {
            drop(ready_w);
            wait_for_eof(ready_r.as_fd());
            drop(ready_r);
            exec_command(plan)
        }),
        ForkResult::Parent { child } => child,
    };
    drop(ready_r);
    let failed = exec_reaper(plan, command, ready_w.as_raw_fd());
    // The command runs, but its init could not be set up: end it, report, exit.
    let _ = kill(command, Signal::SIGKILL);
    Err(failed)
}

/// Block until every write end of the pipe is closed (or reading fails).
fn wait_for_eof(fd: BorrowedFd<'_>) {
    let mut b = [0u8; 1];
    loop {
        match rustix::io::read(fd, &mut b) {
            Ok(n) if n > 0 => continue,
            Err(rustix::io::Errno::INTR) => continue,
            _ => return,
        }
    }
}

/// `execveat(reaper, "", ["flotilla-reaper", PID, READY_FD], [], AT_EMPTY_PATH)`; returns
/// only on failure. `ready`: kept open across the exec for the reaper to close.
fn exec_reaper(plan: &Plan, command: Pid, ready: RawFd) -> Failure {
    let Some(program) = plan.reaper else {
        return Failure::new("start the container's init", None, libc::ENOEXEC);
    };
    // Every fd but stdio closes with the exec: the error pipe (kept until then, to report a
    // failed exec), the memfd itself. The reaper holds nothing that anyone waits on.
    // SAFETY: close_range only changes flags of this process's own fds.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    // SAFETY: F_SETFD on an fd this process owns: only `ready` stays open across the exec.
    if unsafe { libc::fcntl(ready, libc::F_SETFD, 0) } != 0 {
        return Failure::new("keep the init's ready pipe open", None, libc::EBADF);
    }
    let (Ok(pid), Ok(ready)) = (
        std::ffi::CString::new(command.as_raw().to_string()),
        std::ffi::CString::new(ready.to_string()),
    ) else {
        return Failure::new("start the container's init", None, libc::EINVAL);
    };
    let argv = [
        REAPER_ARGV0.as_ptr(),
        pid.as_ptr(),
        ready.as_ptr(),
        std::ptr::null(),
    ];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv and envp are NULL-terminated arrays of valid C strings that outlive the
    // call; the path is the empty string with AT_EMPTY_PATH (execute the fd itself).
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            program,
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    let errno = std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::ENOEXEC);
    Failure::new(
        "execute the container's init (flotilla-reaper)",
        None,
        errno,
    )
}

/// `argv[0]` of the container's init, as `ps` shows it.
const REAPER_ARGV0: &std::ffi::CStr = c"flotilla-reaper";
