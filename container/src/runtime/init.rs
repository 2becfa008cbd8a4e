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

use std::os::fd::RawFd;

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
    // SAFETY: this process is single-threaded.
    let command = match unsafe { nix::unistd::fork() }.step("fork the command from the init")? {
        ForkResult::Child => child_entry(err, || exec_command(plan)),
        ForkResult::Parent { child } => child,
    };
    let failed = exec_reaper(plan, command);
    // The command runs, but its init could not be set up: end it, report, exit.
    let _ = kill(command, Signal::SIGKILL);
    Err(failed)
}

/// `execveat(reaper, "", ["flotilla-reaper", PID], [], AT_EMPTY_PATH)`; returns only on failure.
fn exec_reaper(plan: &Plan, command: Pid) -> Failure {
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
    let Ok(pid) = std::ffi::CString::new(command.as_raw().to_string()) else {
        return Failure::new("start the container's init", None, libc::EINVAL);
    };
    let argv = [REAPER_ARGV0.as_ptr(), pid.as_ptr(), std::ptr::null()];
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
