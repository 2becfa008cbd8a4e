//! The minimal init (`ContainerSpec::init`): pid 1 forks the command, reaps every orphan,
//! forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the command, and exits with the
//! command's status (128+signal when it was killed) as soon as the command exits.
//!
//! The signals are blocked and taken with `sigtimedwait`: a blocked signal is queued even for
//! a namespace's init, which the kernel would otherwise shield from signals it has no handler
//! for.

use std::os::fd::RawFd;

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use super::child::{child_entry, exec_command};
use super::plan::Plan;
use super::report::{exit_now, Context, Step};

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

/// Become the reaper: fork the command, then reap and forward until it exits.
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
    // The error pipe now belongs to the command alone (its exec closes it); the init keeps
    // only stdio, so it holds nothing open that someone waits on.
    // SAFETY: closing this process's own fds; none is used afterwards.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0) };
    reap_loop(command, &set)
}

fn reap_loop(command: Pid, set: &SigSet) -> ! {
    loop {
        match wait_signal(set, 1000) {
            Some(Signal::SIGCHLD) | None => {}
            Some(sig) => {
                let _ = kill(command, sig);
            }
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == command => exit_now(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == command => {
                    exit_now(128 + sig as i32)
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                // No children left: the command is gone.
                Err(_) => exit_now(super::report::SETUP_FAILED),
            }
        }
    }
}
