//! `flotilla-reaper PID [FD]`: pid 1 of a container that runs its command under an init.
//!
//! The runtime forks the command (`PID`) with the forwarded signals and SIGCHLD blocked, then
//! executes this program in place of the container's pid 1, so that pid 1 holds nothing of the
//! manager's memory. The blocked mask and any pending signal survive the exec: nothing is lost
//! in between. This program:
//! 1. marks itself non-dumpable (no ptrace, no `/proc/1/mem`, no `/proc/1/environ` for the
//!    container's processes), then closes `FD`, the last write end of a pipe the command
//!    waits on: the command runs only once pid 1 is non-dumpable;
//! 2. takes the blocked signals with `rt_sigtimedwait` (a blocked signal is queued even for a
//!    namespace's init, which the kernel otherwise shields from signals it has no handler for);
//! 3. forwards TERM, INT, HUP, QUIT, USR1 and USR2 to `PID`, reaps every child (orphans are
//!    re-parented to pid 1), and exits with `PID`'s status (128+N when killed by signal N).
//!
//! It talks to the kernel directly (no C library, no crate): `flotilla-container`'s build
//! script compiles this file with `--cfg flotilla_static` as a freestanding program of a few
//! kilobytes (its own `_start`, no `std`), which is cheap to copy into a memfd and to execute
//! on every container start. Built by cargo (without that cfg) it is an ordinary `std`
//! program with the same logic, so that the workspace formats, lints and tests this file.

#![cfg_attr(flotilla_static, no_std, no_main)]
// No C library to call: keep LLVM from turning loops into `strlen` or `memset` calls.
#![cfg_attr(flotilla_static, no_builtins)]

/// Raw Linux system calls: the handful this program makes, for x86-64 and AArch64.
mod sys {
    #[cfg(target_arch = "x86_64")]
    mod nr {
        pub const WRITE: usize = 1;
        pub const CLOSE: usize = 3;
        pub const RT_SIGPROCMASK: usize = 14;
        pub const WAIT4: usize = 61;
        pub const KILL: usize = 62;
        pub const RT_SIGTIMEDWAIT: usize = 128;
        pub const PRCTL: usize = 157;
        pub const EXIT_GROUP: usize = 231;
    }
    #[cfg(target_arch = "aarch64")]
    mod nr {
        pub const WRITE: usize = 64;
        pub const CLOSE: usize = 57;
        pub const RT_SIGPROCMASK: usize = 135;
        pub const WAIT4: usize = 260;
        pub const KILL: usize = 129;
        pub const RT_SIGTIMEDWAIT: usize = 137;
        pub const PRCTL: usize = 167;
        pub const EXIT_GROUP: usize = 94;
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    compile_error!("flotilla-reaper knows the system calls of x86_64 and aarch64 only");

    /// `syscall(n, a, b, c, d)`: the raw result (a negative errno on failure).
    ///
    /// # Safety
    /// The arguments must be valid for system call `n` (pointers to live memory of the
    /// right layout).
    #[cfg(target_arch = "x86_64")]
    unsafe fn syscall4(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller passes valid arguments; `syscall` clobbers rcx and r11 only.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") n as isize => ret,
                in("rdi") a,
                in("rsi") b,
                in("rdx") c,
                in("r10") d,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// `syscall(n, a, b, c, d)`: the raw result (a negative errno on failure).
    ///
    /// # Safety
    /// The arguments must be valid for system call `n` (pointers to live memory of the
    /// right layout).
    #[cfg(target_arch = "aarch64")]
    unsafe fn syscall4(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller passes valid arguments; `svc 0` returns in x0.
        unsafe {
            core::arch::asm!(
                "svc 0",
                in("x8") n,
                inlateout("x0") a => ret,
                in("x1") b,
                in("x2") c,
                in("x3") d,
                options(nostack),
            );
        }
        ret
    }

    /// `EINTR`.
    pub const EINTR: isize = 4;
    /// The kernel's `sigset_t` size for the `rt_sig*` calls.
    const SIGSET_SIZE: usize = 8;

    /// The kernel's `struct timespec` on 64-bit Linux.
    #[repr(C)]
    pub struct Timespec {
        pub tv_sec: i64,
        pub tv_nsec: i64,
    }

    pub fn write(fd: i32, bytes: &[u8]) {
        // SAFETY: the buffer is live for the call and its length is passed.
        unsafe {
            syscall4(
                nr::WRITE,
                fd as usize,
                bytes.as_ptr() as usize,
                bytes.len(),
                0,
            )
        };
    }

    pub fn close(fd: i32) {
        // SAFETY: closing a descriptor number has no memory effects.
        let _ = unsafe { syscall4(nr::CLOSE, fd as usize, 0, 0, 0) };
    }

    /// `prctl(PR_SET_DUMPABLE, 0)`.
    pub fn set_non_dumpable() {
        const PR_SET_DUMPABLE: usize = 4;
        // SAFETY: changes this process's own dumpable flag only.
        unsafe { syscall4(nr::PRCTL, PR_SET_DUMPABLE, 0, 0, 0) };
    }

    /// Block the signals in `set` (bit N-1 for signal N).
    pub fn block(set: u64) {
        const SIG_BLOCK: usize = 0;
        // SAFETY: `set` is a live 8-byte signal set; the old mask is not wanted (NULL).
        unsafe {
            syscall4(
                nr::RT_SIGPROCMASK,
                SIG_BLOCK,
                &set as *const u64 as usize,
                0,
                SIGSET_SIZE,
            )
        };
    }

    /// Take one pending signal of `set`, waiting up to `timeout`: its number, or a
    /// negative errno (`EAGAIN` on timeout).
    pub fn sigtimedwait(set: u64, timeout: &Timespec) -> isize {
        // SAFETY: `set` and `timeout` are live for the call; the siginfo may be NULL.
        unsafe {
            syscall4(
                nr::RT_SIGTIMEDWAIT,
                &set as *const u64 as usize,
                0,
                timeout as *const Timespec as usize,
                SIGSET_SIZE,
            )
        }
    }

    /// `wait4(-1, &status, WNOHANG, NULL)`: the pid and status of an ended child, 0 when
    /// none has ended, or a negative errno.
    pub fn reap_one() -> (isize, i32) {
        const WNOHANG: usize = 1;
        let mut status = 0i32;
        // SAFETY: `status` is a live out-pointer; the rusage may be NULL.
        let pid = unsafe {
            syscall4(
                nr::WAIT4,
                -1isize as usize,
                &mut status as *mut i32 as usize,
                WNOHANG,
                0,
            )
        };
        (pid, status)
    }

    pub fn kill(pid: i32, sig: i32) {
        // SAFETY: sending a signal has no memory effects; ESRCH is harmless.
        unsafe { syscall4(nr::KILL, pid as usize, sig as usize, 0, 0) };
    }

    pub fn exit(code: u8) -> ! {
        // SAFETY: exit_group ends the process; nothing runs afterwards.
        unsafe { syscall4(nr::EXIT_GROUP, usize::from(code), 0, 0, 0) };
        // exit_group does not return; should it, spin rather than fall through.
        #[allow(clippy::empty_loop)]
        loop {}
    }
}

const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGQUIT: i32 = 3;
const SIGUSR1: i32 = 10;
const SIGUSR2: i32 = 12;
const SIGTERM: i32 = 15;
const SIGCHLD: i32 = 17;

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

/// A positive decimal number that fits an `i32`.
fn parse_positive(arg: &[u8]) -> Option<i32> {
    if arg.is_empty() || arg.len() > 10 {
        return None;
    }
    let mut n: i64 = 0;
    for b in arg {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(b - b'0');
    }
    i32::try_from(n).ok().filter(|n| *n > 0)
}

/// The command's pid and the ready fd from the arguments (`flotilla-reaper PID [FD]`).
fn parse_args<'a>(mut args: impl Iterator<Item = &'a [u8]>) -> Option<(i32, Option<i32>)> {
    let _program = args.next();
    let pid = parse_positive(args.next()?)?;
    let ready = match args.next() {
        Some(fd) => Some(parse_positive(fd).filter(|fd| *fd > 2)?),
        None => None,
    };
    args.next().is_none().then_some((pid, ready))
}

/// The signal set (bit N-1 for signal N) of the forwarded signals and SIGCHLD.
fn signal_set() -> u64 {
    FORWARDED
        .iter()
        .chain(&[SIGCHLD])
        .fold(0u64, |set, sig| set | 1u64 << (sig - 1))
}

/// Reap every child that has ended; `Some(status)` once the command is among them.
fn reap_all(command: i32) -> Option<u8> {
    const ECHILD: isize = 10;
    loop {
        let (pid, status) = sys::reap_one();
        if pid == command as isize {
            if let Some(code) = exit_status(&decode(status)) {
                return Some(code);
            }
        } else if pid == 0 {
            return None;
        } else if pid == -sys::EINTR {
            continue;
        } else if pid == -ECHILD {
            // No children left: the command is gone without our seeing its status.
            return Some(USAGE);
        } else if pid < 0 {
            return Some(USAGE);
        }
    }
}

/// The reaper's whole life, from its arguments to its exit.
fn run<'a>(args: impl Iterator<Item = &'a [u8]>) -> ! {
    sys::set_non_dumpable();
    let Some((command, ready)) = parse_args(args) else {
        sys::write(
            2,
            b"usage: flotilla-reaper PID [FD] (run by the container runtime, not by hand)\n",
        );
        sys::exit(USAGE);
    };
    if let Some(fd) = ready {
        // The command waits for this: it runs only once this process is non-dumpable.
        sys::close(fd);
    }
    let set = signal_set();
    // The runtime blocked these before forking the command; block them again in case this
    // program was started another way.
    sys::block(set);
    let timeout = sys::Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    loop {
        let sig = sys::sigtimedwait(set, &timeout);
        if let Some(&sig) = FORWARDED.iter().find(|s| **s as isize == sig) {
            sys::kill(command, sig);
        }
        if let Some(code) = reap_all(command) {
            sys::exit(code);
        }
    }
}

#[cfg(not(flotilla_static))]
fn main() {
    use std::os::unix::ffi::OsStringExt;
    let args: Vec<Vec<u8>> = std::env::args_os().map(OsStringExt::into_vec).collect();
    run(args.iter().map(Vec::as_slice))
}

/// The freestanding program's entry: `_start` hands the initial stack (argc, then argv) to
/// [`entry::start`].
#[cfg(flotilla_static)]
mod entry {
    #[cfg(target_arch = "x86_64")]
    core::arch::global_asm!(
        ".globl _start",
        "_start:",
        "xor ebp, ebp",
        "mov rdi, rsp",
        "call {start}",
        "ud2",
        start = sym start,
    );

    #[cfg(target_arch = "aarch64")]
    core::arch::global_asm!(
        ".globl _start",
        "_start:",
        "mov x29, xzr",
        "mov x30, xzr",
        "mov x0, sp",
        "bl {start}",
        "brk #0",
        start = sym start,
    );

    /// The C string at `p` as bytes, without its NUL.
    ///
    /// # Safety
    /// `p` points to a NUL-terminated string that lives for the rest of the program.
    unsafe fn c_str(p: *const u8) -> &'static [u8] {
        let mut len = 0;
        // SAFETY: the string is NUL-terminated, so every byte up to the NUL is readable.
        while unsafe { *p.add(len) } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes from `p` were just read.
        unsafe { core::slice::from_raw_parts(p, len) }
    }

    /// # Safety
    /// `sp` is the initial stack the kernel set up: argc, then argc argument pointers.
    unsafe extern "C" fn start(sp: *const usize) -> ! {
        // SAFETY: the kernel's initial stack starts with argc, followed by argv.
        let (argc, argv) = unsafe { (*sp, sp.add(1) as *const *const u8) };
        // SAFETY: argv holds argc pointers to NUL-terminated strings (execve's contract).
        super::run((0..argc).map(|i| unsafe { c_str(*argv.add(i)) }))
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
        super::sys::exit(super::USAGE)
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
        let parse = |v: &[&str]| parse_args(v.iter().map(|s| s.as_bytes()));
        assert_eq!(parse(&["r", "42"]), Some((42, None)));
        assert_eq!(parse(&["r", "42", "5"]), Some((42, Some(5))));
        assert_eq!(parse(&["r"]), None);
        assert_eq!(parse(&["r", "0"]), None);
        assert_eq!(parse(&["r", "x"]), None);
        assert_eq!(parse(&["r", "-3"]), None);
        assert_eq!(parse(&["r", "99999999999"]), None);
        assert_eq!(parse(&["r", "1", "2"]), None);
        assert_eq!(parse(&["r", "1", "7", "8"]), None);
    }

    #[test]
    fn blocks_the_forwarded_signals_and_sigchld() {
        let set = signal_set();
        for sig in FORWARDED.iter().chain(&[SIGCHLD]) {
            assert_ne!(set & (1 << (sig - 1)), 0, "signal {sig}");
        }
        assert_eq!(set.count_ones(), 7);
        assert_eq!(set & (1 << 8), 0, "SIGKILL is never in the set");
    }
}
