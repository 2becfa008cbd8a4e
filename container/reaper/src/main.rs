//! `flotilla-reaper PID [FD]`: pid 1 of a container that runs its command under an init.
//!
//! The runtime forks the command (`PID`) with the forwarded signals and SIGCHLD blocked, then
//! executes this program in place of the container's pid 1, so that pid 1 holds nothing of the
//! manager's memory. The blocked mask and any pending signal survive the exec: nothing is lost
//! in between. This program:
//! 1. marks itself non-dumpable (no ptrace, no `/proc/1/mem`, no `/proc/1/environ` for the
//!    container's processes), then closes `FD`, the last write end of a pipe the command
//!    waits on: the command runs only once pid 1 is non-dumpable;
//! 2. takes the blocked signals with `sigtimedwait` (a blocked signal is queued even for a
//!    namespace's init, which the kernel otherwise shields from signals it has no handler for);
//! 3. forwards TERM, INT, HUP, QUIT, USR1 and USR2 to `PID`, reaps every child (orphans are
//!    re-parented to pid 1), and exits with `PID`'s status (128+N when killed by signal N).
//!
//! Built without any crate (see the package README): the C library calls are declared here.

use std::process::ExitCode;

/// The C library's `sigset_t` (1024 bits in glibc and musl).
#[repr(C)]
struct SigSet {
    bits: [u64; 16],
}

/// The C library's `struct timespec` on 64-bit Linux.
#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn sigemptyset(set: *mut SigSet) -> i32;
    fn sigaddset(set: *mut SigSet, sig: i32) -> i32;
    fn sigprocmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    fn sigtimedwait(set: *const SigSet, info: *mut u8, timeout: *const Timespec) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    fn close(fd: i32) -> i32;
}

const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGQUIT: i32 = 3;
const SIGUSR1: i32 = 10;
const SIGUSR2: i32 = 12;
const SIGTERM: i32 = 15;
const SIGCHLD: i32 = 17;
const SIG_BLOCK: i32 = 0;
const WNOHANG: i32 = 1;
const PR_SET_DUMPABLE: i32 = 4;

/// Signals passed on to the command.
const FORWARDED: [i32; 6] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// Exit status when the arguments are wrong or the command is already gone unseen.
const USAGE: u8 = 127;

/// How a reaped child ended, decoded from a `waitpid` status.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Exited with this code.
    Exited(u8),
    /// Killed by this signal.
    Signaled(u8),
    /// Stopped or continued: still there.
    Other,
}

/// Decode a `waitpid` status (the `WIFEXITED`/`WIFSIGNALED` macros of the C library).
fn decode(status: i32) -> Ended {
    let sig = status & 0x7f;
    if sig == 0 {
        Ended::Exited(((status >> 8) & 0xff) as u8)
    } else if sig != 0x7f {
        Ended::Signaled(sig as u8)
    } else {
        Ended::Other
    }
}

/// The exit status pid 1 passes on for the command's end.
fn exit_status(ended: &Ended) -> Option<u8> {
    match ended {
        Ended::Exited(code) => Some(*code),
        Ended::Signaled(sig) => Some(128u8.saturating_add(*sig)),
        Ended::Other => None,
    }
}

/// The command's pid and the ready fd from the arguments (`flotilla-reaper PID [FD]`).
fn parse_args(mut args: impl Iterator<Item = String>) -> Option<(i32, Option<i32>)> {
    let _program = args.next();
    let pid = args.next()?.parse::<i32>().ok().filter(|p| *p > 0)?;
    let ready = match args.next() {
        Some(fd) => Some(fd.parse::<i32>().ok().filter(|fd| *fd > 2)?),
        None => None,
    };
    args.next().is_none().then_some((pid, ready))
}

fn signal_set() -> SigSet {
    let mut set = SigSet { bits: [0; 16] };
    // SAFETY: `set` is a valid sigset_t-sized buffer owned by this frame; the numbers are valid.
    unsafe {
        sigemptyset(&mut set);
        for sig in FORWARDED.iter().chain(&[SIGCHLD]) {
            sigaddset(&mut set, *sig);
        }
    }
    set
}

/// Reap every child that has ended; `Some(status)` once the command is among them.
fn reap_all(command: i32) -> Option<u8> {
    loop {
        let mut status = 0i32;
        // SAFETY: `status` is a valid out-pointer for the call.
        let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
        if pid == command {
            if let Some(code) = exit_status(&decode(status)) {
                return Some(code);
            }
        } else if pid == 0 {
            return None;
        } else if pid < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error();
            if errno == Some(4) {
                continue; // EINTR
            }
            // ECHILD: no children left, so the command is gone without our seeing its status.
            return Some(USAGE);
        }
    }
}

fn main() -> ExitCode {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) only changes this process's own dumpable flag.
    unsafe { prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let Some((command, ready)) = parse_args(std::env::args()) else {
        eprintln!("usage: flotilla-reaper PID [FD] (run by the container runtime, not by hand)");
        return ExitCode::from(USAGE);
    };
    if let Some(fd) = ready {
        // The command waits for this: it runs only once this process is non-dumpable.
        // SAFETY: closing the fd the runtime handed over; it is not used afterwards.
        unsafe { close(fd) };
    }
    let set = signal_set();
    // The runtime blocked these before forking the command; block them again in case this
    // program was started another way.
    // SAFETY: `set` is a valid signal set; the old mask is not wanted.
    unsafe { sigprocmask(SIG_BLOCK, &set, std::ptr::null_mut()) };
    let timeout = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: `set` and `timeout` are valid for the call; the siginfo may be NULL.
        let sig = unsafe { sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if FORWARDED.contains(&sig) {
            // SAFETY: kill(2) with a pid and a valid signal number; ESRCH is harmless.
            unsafe { kill(command, sig) };
        }
        if let Some(code) = reap_all(command) {
            return ExitCode::from(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(decode(0), Ended::Exited(0));
        assert_eq!(decode(3 << 8), Ended::Exited(3));
        assert_eq!(decode(9), Ended::Signaled(9));
        assert_eq!(decode(0x137f), Ended::Other);
        assert_eq!(exit_status(&Ended::Signaled(15)), Some(143));
        assert_eq!(exit_status(&Ended::Exited(7)), Some(7));
        assert_eq!(exit_status(&Ended::Other), None);
    }

    #[test]
    fn parses_arguments() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_args(args(&["r", "42"]).into_iter()), Some((42, None)));
        assert_eq!(
            parse_args(args(&["r", "42", "5"]).into_iter()),
            Some((42, Some(5)))
        );
        assert_eq!(parse_args(args(&["r"]).into_iter()), None);
        assert_eq!(parse_args(args(&["r", "0"]).into_iter()), None);
        assert_eq!(parse_args(args(&["r", "x"]).into_iter()), None);
        assert_eq!(parse_args(args(&["r", "1", "2"]).into_iter()), None);
        assert_eq!(parse_args(args(&["r", "1", "7", "8"]).into_iter()), None);
    }
}
