//! The end of PID 1: after the manager stopped every unit, end every other process, sync,
//! unmount, and reboot(2). Never returns.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::RebootMode;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{mounts, step};

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
}
