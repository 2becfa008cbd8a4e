//! The end of PID 1: after the manager stopped every unit, end every other process, sync,
//! unmount, and reboot(2). Never returns.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::RebootMode;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{mounts, step};

/// Runs the manager (`run`) so that neither its error nor its panic ends the process: an
/// error is logged with its causes, a panic is caught and logged. Either way the answer is
/// `None` and the caller shuts down in order (as PID 1: [`finish`] with [`Action::Reboot`]);
/// PID 1 must never exit, or the kernel panics.
pub fn contain<T, E: std::fmt::Display>(run: impl FnOnce() -> Result<T, E>) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            log::error!("{e:#}");
            None
        }
        Err(_) => {
            log::error!("the manager panicked; shutting down");
            None
        }
    }
}

/// What to do once every unit has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Restart the machine (SIGTERM, SIGINT / Ctrl-Alt-Del).
    Reboot,
    /// Switch it off (SIGUSR2, the power button).
    Poweroff,
}

impl Action {
    /// The action a shutdown signal asks for.
    pub fn for_signal(sig: Signal) -> Action {
        match sig {
            Signal::SIGUSR2 => Action::Poweroff,
            _ => Action::Reboot,
        }
    }
}

/// After the manager stopped every unit: end every other process (SIGTERM, a grace period,
/// SIGKILL), sync, unmount in reverse order, then reboot(2). Never returns.
pub fn finish(action: Action) -> ! {
    step("SIGTERM to remaining processes", || {
        kill(Pid::from_raw(-1), Signal::SIGTERM).or_else(ignore_esrch)
    });
    reap_for(Duration::from_secs(3));
    step("SIGKILL to remaining processes", || {
        kill(Pid::from_raw(-1), Signal::SIGKILL).or_else(ignore_esrch)
    });
    reap_for(Duration::from_millis(500));
    nix::unistd::sync();
    mounts::unmount_all();
    nix::unistd::sync();
    let mode = match action {
        Action::Reboot => RebootMode::RB_AUTOBOOT,
        Action::Poweroff => RebootMode::RB_POWER_OFF,
    };
    log::info!("{action:?}");
    let err = nix::sys::reboot::reboot(mode).err();
    log::error!("reboot(2) failed: {err:?}; halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn ignore_esrch(e: Errno) -> Result<(), Errno> {
    if e == Errno::ESRCH {
        Ok(())
    } else {
        Err(e)
    }
}

/// Reap children until none is left or `limit` passes.
pub fn reap_for(limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(_) => return, // ECHILD: nobody left
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_actions() {
        assert_eq!(Action::for_signal(Signal::SIGUSR2), Action::Poweroff);
        assert_eq!(Action::for_signal(Signal::SIGTERM), Action::Reboot);
        assert_eq!(Action::for_signal(Signal::SIGINT), Action::Reboot);
    }

    #[test]
    fn a_panic_in_the_manager_is_contained() {
        let answer = contain(|| -> Result<u8, String> { panic!("a bug in the manager") });
        assert_eq!(answer, None);
        // The thread that panicked goes on: the caller can still shut down in order.
        assert_eq!(contain(|| -> Result<u8, String> { Ok(7) }), Some(7));
        assert_eq!(
            contain(|| -> Result<u8, String> { Err("no cgroup".into()) }),
            None
        );
    }
}
