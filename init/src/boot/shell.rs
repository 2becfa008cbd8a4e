//! Shells on a terminal, started by PID 1 outside any container: the emergency shell when
//! the boot cannot go on, and the debug shell (`flotilla.debug_shell=ttyS1` on the kernel
//! command line, as systemd's `systemd.debug_shell`), which the QEMU tests drive.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The shell the image provides (busybox).
pub const SHELL: &str = "/bin/sh";

/// Starts `sh -c script` on `tty` as a session leader with `tty` as its controlling terminal,
/// a clean environment and default signal handling, with `root` as its root directory.
pub fn spawn_on(tty: &Path, script: &str, root: &Path) -> io::Result<Child> {
    let term = OpenOptions::new().read(true).write(true).open(tty)?;
    let mut cmd = Command::new(SHELL);
    cmd.args(["-c", script])
        .env_clear()
        .env("PATH", flotilla_container::runtime::DEFAULT_PATH)
        .env("HOME", "/root")
        .env("TERM", "linux")
        .stdin(term.try_clone()?)
        .stdout(term.try_clone()?)
        .stderr(term);
    if root != Path::new("/") {
        cmd.current_dir("/");
        let root = root.to_path_buf();
        // SAFETY: only async-signal-safe calls (chroot, chdir) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::chroot(&root)?;
                nix::unistd::chdir("/")?;
                Ok(())
            });
        }
    }
    // SAFETY: only async-signal-safe calls between fork and exec: sigprocmask, sigaction,
    // setsid, ioctl.
    unsafe {
        cmd.pre_exec(|| {
            // PID 1 blocks every signal it reads from its signalfd: undo that for the shell.
            SigSet::empty().thread_set_mask()?;
            for sig in
                Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP))
            {
                let _ = sigaction(
                    sig,
                    &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty()),
                );
            }
            nix::unistd::setsid()?;
            if libc::ioctl(0, libc::TIOCSCTTY, 1) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The debug shell: a root shell on `tty`, started again whenever it exits.
pub fn spawn_debug_shell(tty: &Path) -> io::Result<Child> {
    spawn_on(tty, "while :; do /bin/sh; sleep 1; done", Path::new("/"))
}
