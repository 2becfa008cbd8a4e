//! The one event loop: signals (signalfd), API requests (eventfd), unit output (pipes) and
//! timers, all through one epoll set. State changes happen only in [`Manager`] methods
//! called from here.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::api::ApiQueue;
use crate::manager::Manager;
use crate::trial::{Decision, Trial};

const TOKEN_SIGNAL: u64 = u64::MAX;
const TOKEN_API: u64 = u64::MAX - 1;

/// Signals the loop handles; they must be blocked in every thread (call [`block_signals`]
/// before starting any thread).
pub const SIGNALS: [Signal; 5] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR2,
];

/// Errors that end the loop (setup failures only; nothing in the loop itself is fatal).
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// epoll or signalfd could not be set up.
    #[error("cannot set up the event loop ({what}): {source}")]
    Setup {
        /// Which step.
        what: &'static str,
        /// The errno.
        source: Errno,
    },
}

fn setup(what: &'static str) -> impl FnOnce(Errno) -> LoopError {
    move |source| LoopError::Setup { what, source }
}

/// Block [`SIGNALS`] in the calling thread (and so in threads it starts later).
pub fn block_signals() -> Result<SigSet, LoopError> {
    let mut set = SigSet::empty();
    for s in SIGNALS {
        set.add(s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(setup("sigprocmask"))?;
    Ok(set)
}

/// What the loop reports when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A shutdown was asked for by this signal (SIGTERM, SIGINT or SIGUSR2) and every unit
    /// has stopped.
    Shutdown(Signal),
}

/// Run until the manager has shut down. With `boot_started`, print the boot marker
/// (`flotilla: boot complete in <ms> ms, <n> units active`) once the first start settles.
pub fn run(
    manager: &mut Manager,
    api: Option<&ApiQueue>,
    boot_started: Option<Instant>,
) -> Result<Exit, LoopError> {
    run_with(manager, api, boot_started, None)
}

/// A booted slot on trial: the policy and how to commit it.
pub struct TrialWatch {
    /// The policy's state.
    pub trial: Trial,
    /// Commits the running slot (PID 1: [`crate::trial::commit_running`]).
    pub commit: Box<dyn FnMut() -> Result<String, String>>,
}

/// [`run`], judging the slot on `trial` by the units' health: commit it once healthy long
/// enough, or reboot in order (as SIGINT) when its deadline passes.
pub fn run_with(
    manager: &mut Manager,
    api: Option<&ApiQueue>,
    boot_started: Option<Instant>,
    mut trial: Option<TrialWatch>,
) -> Result<Exit, LoopError> {
    let mask = block_signals()?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(setup("signalfd"))?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(setup("epoll"))?;
    epoll
        .add(
            sfd.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SIGNAL),
        )
        .map_err(setup("epoll add signalfd"))?;
    if let Some(q) = api {
        epoll
            .add(q.fd(), EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_API))
            .map_err(setup("epoll add api"))?;
    }
    // Children may have exited before the signalfd existed.
    reap(manager);
    let mut events = vec![EpollEvent::empty(); 256];
    let mut marker = boot_started;
    let mut shutdown_by: Option<Signal> = None;
    loop {
        let mut deadline = manager.tick(Instant::now());
        register_pipes(&epoll, manager);
        if shutdown_by.is_some() {
            // Shutting down: the trial is over for this boot (the loader counted the try).
            trial = None;
        }
        if let Some(w) = trial.as_mut() {
            match w.trial.step(Instant::now(), &manager.health()) {
                Decision::Wait(at) => {
                    deadline = Some(deadline.map_or(at, |d| d.min(at)));
                }
                Decision::Commit => {
                    let policy = w.trial.policy();
                    match (w.commit)() {
                        Ok(what) => log::info!(
                            "flotilla: {what} committed: every unit healthy for {}",
                            humantime::format_duration(policy.commit_after)
                        ),
                        Err(e) => log::error!("cannot commit the booted slot: {e}"),
                    }
                    trial = None;
                }
                Decision::Reboot(why) => {
                    log::error!(
                        "flotilla: the booted slot is not committed: {why}; rebooting \
                         (the boot loader falls back once its tries are spent)"
                    );
                    manager.shutdown();
                    shutdown_by.get_or_insert(Signal::SIGINT);
                    trial = None;
                }
            }
        }
        if let Some(t0) = marker.filter(|_| manager.settled()) {
            marker = None;
            // The one line the QEMU harness parses, straight to the console.
            println!(
                "flotilla: boot complete in {} ms, {} units active",
                t0.elapsed().as_millis(),
                manager.active_count()
            );
        }
        if manager.shutdown_complete() {
            return Ok(Exit::Shutdown(shutdown_by.unwrap_or(Signal::SIGTERM)));
        }
        let timeout = match deadline {
            None => EpollTimeout::NONE,
            Some(d) => {
                let ms = d
                    .saturating_duration_since(Instant::now())
                    .as_millis()
                    .saturating_add(1);
                EpollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(EpollTimeout::NONE)
            }
        };
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("epoll_wait: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        for ev in events.iter().take(n) {
            match ev.data() {
                TOKEN_SIGNAL => {
                    if let Some(sig) = on_signals(&sfd, manager) {
                        shutdown_by.get_or_insert(sig);
                    }
                }
                TOKEN_API => {
                    if let Some(q) = api {
                        for env in q.drain() {
                            let answer = manager.handle(env.request);
                            let _ = env.reply.send(answer);
                        }
                    }
                }
                token => manager.on_output(usize::try_from(token).unwrap_or(usize::MAX)),
            }
        }
    }
}

fn register_pipes(epoll: &Epoll, manager: &mut Manager) {
    let pipes: Vec<(usize, BorrowedFd<'_>)> = manager.take_new_pipes();
    for (token, fd) in pipes {
        let ev = EpollEvent::new(EpollFlags::EPOLLIN, token as u64);
        if let Err(e) = epoll.add(fd, ev) {
            log::error!("cannot watch a unit's output pipe: {e}");
        }
    }
}

/// Handle pending signals; returns the first one that asked for a shutdown.
fn on_signals(sfd: &SignalFd, manager: &mut Manager) -> Option<Signal> {
    let mut shutdown = None;
    loop {
        match sfd.read_signal() {
            Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => reap(manager),
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT | Signal::SIGUSR2)) => {
                    log::info!("{sig}: stopping all units");
                    manager.shutdown();
                    shutdown.get_or_insert(sig);
                }
                Ok(Signal::SIGHUP) => {
                    let r = manager.reload(false);
                    log::info!(
                        "reloaded: {} added, {} changed, {} removed, {} errors",
                        r.added.len(),
                        r.changed.len(),
                        r.removed.len(),
                        r.errors.len()
                    );
                    for e in r.errors {
                        log::error!("{e}");
                    }
                }
                _ => {}
            },
            Ok(None) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("reading signals: {e}");
                break;
            }
        }
    }
    shutdown
}

/// Reap every exited child, units' main processes and re-parented orphans alike.
fn reap(manager: &mut Manager) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status) => manager.on_exit(status, Instant::now()),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("waitpid: {e}");
                break;
            }
        }
    }
}
