//! The processes that become the container: the caller forks an intermediate process, which
//! joins the cgroup, creates the namespaces and clones the container's pid 1 with
//! `CLONE_PARENT` (so the caller is its parent and reaps it); pid 1 builds the root, drops
//! privileges and execs (or runs the reaper, which forks the command).

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use rustix::pipe::{pipe_with, PipeFlags};
use rustix::thread::UnshareFlags;

use super::plan::{Plan, RootPlan};
use super::report::{self, exit_now, fail_and_exit, Context, Failure, Step};
use super::{caps, hostpath, init, rootfs, seccomp, ContainerError, NetworkMode, Spawned};

/// The fds the children write to.
#[derive(Clone, Copy)]
struct ChildFds {
    /// Error pipe (close-on-exec).
    err: RawFd,
    /// The intermediate process sends pid 1's host pid here.
    pid: RawFd,
    /// User namespace sync: child -> parent ("unshared"), parent -> child ("mapped").
    sync: Option<(RawFd, RawFd)>,
    /// Progress pipe (close-on-exec): one [`Progress`] byte before each setup step.
    progress: RawFd,
}

/// The setup steps the children announce on the progress pipe, one byte each, so that the
/// caller can say where a setup that does not finish in time was stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Progress {
    JoinCgroup,
    UserNamespace,
    Namespaces,
    PrivateMounts,
    Loopback,
    RootFs,
    StandardMounts,
    MaskPaths,
    ReadOnlyPaths,
    BindMounts,
    SealRoot,
    Pivot,
    Identity,
    Exec,
}

impl Progress {
    /// Every step, in the order of their byte values.
    const ALL: [Progress; 14] = [
        Progress::JoinCgroup,
        Progress::UserNamespace,
        Progress::Namespaces,
        Progress::PrivateMounts,
        Progress::Loopback,
        Progress::RootFs,
        Progress::StandardMounts,
        Progress::MaskPaths,
        Progress::ReadOnlyPaths,
        Progress::BindMounts,
        Progress::SealRoot,
        Progress::Pivot,
        Progress::Identity,
        Progress::Exec,
    ];

    fn text(self) -> &'static str {
        match self {
            Progress::JoinCgroup => "joining the cgroup",
            Progress::UserNamespace => "creating the user namespace",
            Progress::Namespaces => "creating the namespaces",
            Progress::PrivateMounts => "making the mounts private",
            Progress::Loopback => "bringing lo up",
            Progress::RootFs => "mounting the root filesystem",
            Progress::StandardMounts => "mounting /proc, /dev and /sys",
            Progress::MaskPaths => "masking paths",
            Progress::ReadOnlyPaths => "making paths read-only",
            Progress::BindMounts => "bind-mounting the mounts",
            Progress::SealRoot => "sealing the root",
            Progress::Pivot => "pivoting into the root",
            Progress::Identity => "setting hostname, limits, seccomp, capabilities and user",
            Progress::Exec => "executing the command",
        }
    }

    fn from_byte(b: u8) -> Option<Progress> {
        Progress::ALL.get(usize::from(b)).copied()
    }
}

/// Tell the caller which step comes next (best effort: the pipe never fills, ~16 bytes).
fn announce(fd: RawFd, step: Progress) {
    let _ = rustix::io::write(borrow(fd), &[step as u8]);
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    pipe_with(PipeFlags::CLOEXEC).map_err(|e| ContainerError::setup("create a pipe", None, e))
}

/// Read until EOF (or `limit` bytes), giving up when `deadline` passes (`None`).
fn read_all_until(fd: BorrowedFd<'_>, limit: usize, deadline: Instant) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while out.len() < limit {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let timeout = rustix::event::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut pfd = [rustix::event::PollFd::from_borrowed_fd(
            fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut pfd, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => break,
        }
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    Some(out)
}

/// The last step announced on the progress pipe (what is there now, without waiting).
fn last_progress(fd: BorrowedFd<'_>) -> Option<&'static str> {
    let mut last = None;
    let mut buf = [0u8; 64];
    loop {
        let mut pfd = [rustix::event::PollFd::from_borrowed_fd(
            fd,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut pfd, Some(&zero)) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(b) = buf.get(..n).and_then(|b| b.last()) {
                    last = Progress::from_byte(*b).or(last);
                }
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    last.map(Progress::text)
}

/// How long [`give_up`] waits for the killed setup processes to be reaped; one stuck in the
/// kernel beyond that is left to the caller's own reaping (a process manager reaps all).
const REAP_AFTER_KILL: Duration = Duration::from_secs(2);

/// Setup did not finish by the deadline: kill its processes, reap them if they end soon, and
/// name the step they were at.
fn give_up(pids: &[Pid], progress: BorrowedFd<'_>, timeout: Duration) -> ContainerError {
    let step = last_progress(progress);
    for pid in pids {
        let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
    }
    let end = Instant::now() + REAP_AFTER_KILL;
    let mut left: Vec<Pid> = pids.to_vec();
    while !left.is_empty() && Instant::now() < end {
        left.retain(|pid| {
            matches!(
                waitpid(*pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR)
            )
        });
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    ContainerError::SetupTimeout { timeout, step }
}

fn reap(pid: Pid) -> Option<WaitStatus> {
    loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(s) => return Some(s),
            Err(_) => return None,
        }
    }
}

/// Fork the container's processes and wait until the command runs or setup failed, at most
/// `timeout`: then the setup processes are killed and the error names the step they were at.
pub(crate) fn start(plan: &Plan, timeout: Duration) -> Result<Spawned, ContainerError> {
    let deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
    let (err_r, err_w) = pipe()?;
    let (pid_r, pid_w) = pipe()?;
    let (progress_r, progress_w) = pipe()?;
    let sync = match plan.userns {
        Some(_) => Some((pipe()?, pipe()?)),
        None => None,
    };
    let fds = ChildFds {
        err: err_w.as_raw_fd(),
        pid: pid_w.as_raw_fd(),
        sync: sync
            .as_ref()
            .map(|((_, up_w), (down_r, _))| (up_w.as_raw_fd(), down_r.as_raw_fd())),
        progress: progress_w.as_raw_fd(),
    };
    // SAFETY: the child only runs this module's code, which does not touch locks other
    // threads may hold (no stdio, no env access); glibc's fork keeps malloc usable.
    let c1 = match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => child_entry(fds.err, || intermediate(plan, fds)),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(ContainerError::setup("fork", None, e)),
    };
    drop(err_w);
    drop(pid_w);
    drop(progress_w);
    let mut map_error = None;
    if let (Some(((up_r, up_w), (down_r, down_w))), Some(m)) = (sync, plan.userns) {
        drop(up_w);
        drop(down_r);
        let Some(unshared) = read_all_until(up_r.as_fd(), 1, deadline) else {
            return Err(give_up(&[c1], progress_r.as_fd(), timeout));
        };
        // One byte: the child has unshared its user namespace. EOF: it failed (reported below).
        if unshared.len() == 1 {
            map_error = write_id_maps(c1, &m).err();
            if map_error.is_none() {
                // The child sees EOF instead if this fails, and stops.
                let _ = rustix::io::write(&down_w, b"1");
            }
        }
        drop(down_w);
    }
    let Some(pid_bytes) = read_all_until(pid_r.as_fd(), 4, deadline) else {
        return Err(give_up(&[c1], progress_r.as_fd(), timeout));
    };
    // The intermediate process exits right after sending the pid (or failing).
    let c1_status = reap(c1);
    let pid = <[u8; 4]>::try_from(pid_bytes.as_slice())
        .ok()
        .map(|b| Pid::from_raw(i32::from_le_bytes(b)));
    // The error pipe closes when the command's exec succeeds, or carries why setup failed.
    let Some(report) = read_all_until(err_r.as_fd(), 4096, deadline) else {
        let pids: Vec<Pid> = pid.into_iter().collect();
        return Err(give_up(&pids, progress_r.as_fd(), timeout));
    };
    if report.is_empty() && map_error.is_none() {
        if let Some(pid) = pid {
            return Ok(Spawned { pid });
        }
    }
    if let Some(pid) = pid {
        // pid 1 exited (or will, its setup failed): reap it.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        reap(pid);
    }
    if let Some(e) = map_error {
        return Err(e);
    }
    if report.is_empty() {
        return Err(ContainerError::Lost(format!(
            "intermediate process: {c1_status:?}"
        )));
    }
    Err(report::decode(&report))
}

/// Run the body of a forked process; it never returns into the caller's code: a failure (or
/// a panic, which must not unwind into a copy of the caller) is reported and the process exits.
pub(crate) fn child_entry(err: RawFd, body: impl FnOnce() -> Step<std::convert::Infallible>) -> ! {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Err(f)) => fail_and_exit(err, &f),
        Err(_) => fail_and_exit(
            err,
            &Failure::new("container setup (internal error: panic)", None, libc::EIO),
        ),
    }
}

fn write_id_maps(child: Pid, m: &super::IdMapping) -> Result<(), ContainerError> {
    let line = format!("{} {} {}\n", m.container_id, m.host_id, m.size);
    for file in ["uid_map", "gid_map"] {
        let path = Path::new("/proc")
            .join(child.as_raw().to_string())
            .join(file);
        std::fs::write(&path, &line)
            .map_err(|e| ContainerError::setup("write the user namespace map", Some(&path), e))?;
    }
    Ok(())
}

fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: only used with fds the plan keeps open for the life of the forked process.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Put the plan's stdio on 0, 1, 2 (via high copies, in case they overlap).
fn setup_stdio(plan: &Plan) -> Step {
    let mut high = Vec::with_capacity(3);
    for fd in &plan.stdio {
        high.push(rustix::io::fcntl_dupfd_cloexec(fd, 10).step("duplicate a stdio fd")?);
    }
    for (target, fd) in high.iter().enumerate() {
        // SAFETY: dup2 onto 0..2 of this (forked, single-threaded) process.
        let rc = unsafe { libc::dup2(fd.as_raw_fd(), target as RawFd) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).step("set up stdin/stdout/stderr");
        }
    }
    Ok(())
}

fn intermediate(plan: &Plan, fds: ChildFds) -> Step<std::convert::Infallible> {
    setup_stdio(plan)?;
    // While still host root: the layers' directory becomes the cwd, which the new mount
    // namespace carries over, so pid 1 names the layers relative to it (see
    // `plan::lower_dirs`).
    if let RootPlan::Overlay {
        layer_dir: Some(dir),
        ..
    } = &plan.root
    {
        rustix::process::fchdir(dir).step("chdir to the image layers' directory")?;
    }
    // Join the cgroup now by writing cgroup.procs (the slow path: it waits for an RCU grace
    // period) where pid 1 cannot be cloned into it: a reused cgroup (see `CgroupDir::fresh`),
    // or a user namespace, whose root is not the host's root.
    let mut joined = false;
    if let Some((dir, fresh)) = plan.cgroup {
        if !fresh || fds.sync.is_some() {
            announce(fds.progress, Progress::JoinCgroup);
            join_cgroup(dir)?;
            joined = true;
        }
    }
    // Still in the caller's namespaces and as host root (open_tree needs CAP_SYS_ADMIN over
    // the source's mount namespace), but bounded by the caller's setup timeout: a source on
    // a hung filesystem hangs this process, never the caller.
    announce(fds.progress, Progress::BindMounts);
    let trees = plan
        .binds
        .iter()
        .map(|b| hostpath::clone_source_step(&b.source))
        .collect::<Step<Vec<_>>>()?;
    if let Some((up_w, down_r)) = fds.sync {
        announce(fds.progress, Progress::UserNamespace);
        // SAFETY: this forked process is single-threaded.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) }
            .step("create the user namespace (unshare CLONE_NEWUSER)")?;
        rustix::io::write(borrow(up_w), b"1").step("tell the parent the user namespace exists")?;
        let mut b = [0u8; 1];
        if rustix::io::read(borrow(down_r), &mut b).step("wait for the id maps")? != 1 {
            return Err(Failure::new("wait for the id maps", None, libc::ECANCELED));
        }
        rustix::thread::set_thread_res_gid(root_gid(), root_gid(), root_gid())
            .step("become root in the user namespace (is container id 0 mapped?)")?;
        rustix::thread::set_thread_res_uid(root_uid(), root_uid(), root_uid())
            .step("become root in the user namespace (is container id 0 mapped?)")?;
    }
    // The cgroup namespace is created by pid 1, once it is in its cgroup.
    let mut flags =
        UnshareFlags::NEWNS | UnshareFlags::NEWUTS | UnshareFlags::NEWIPC | UnshareFlags::NEWPID;
    if plan.network != NetworkMode::Host {
        flags |= UnshareFlags::NEWNET;
    }
    announce(fds.progress, Progress::Namespaces);
    // SAFETY: this forked process is single-threaded.
    unsafe { rustix::thread::unshare_unsafe(flags) }.step("create the namespaces (unshare)")?;
    let into = plan.cgroup.map(|(dir, _)| dir).filter(|_| !joined);
    if into.is_some() {
        announce(fds.progress, Progress::JoinCgroup);
    }
    let pid = clone_pid1(into)?;
    if pid == 0 {
        child_entry(fds.err, || {
            container_main(plan, &trees, fds.err, fds.progress)
        });
    }
    let pid = i32::try_from(pid).unwrap_or_default();
    rustix::io::write(borrow(fds.pid), &pid.to_le_bytes()).step("send the container's pid")?;
    exit_now(0)
}

/// `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (linux/sched.h, Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Fork the container's pid 1 as a sibling of this process (`CLONE_PARENT`: the caller reaps
/// it): 0 in the child, its pid in this process. With `cgroup`, the child starts in that
/// cgroup v2 directory (`clone3` with `CLONE_INTO_CGROUP`, which unlike writing
/// `cgroup.procs` does not wait for an RCU grace period: ~10 ms on a busy 2-CPU machine);
/// where `clone3` is refused (`ENOSYS` from an older kernel or a seccomp sandbox), this
/// process joins the cgroup the slow way first.
fn clone_pid1(cgroup: Option<RawFd>) -> Step<libc::c_long> {
    let plain = || {
        // SAFETY: a fork-like clone (no new stack, no shared VM) of a single-threaded process.
        unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        }
    };
    let pid = match cgroup {
        None => plain(),
        Some(dir) => {
            // No exit_signal: with CLONE_PARENT the child inherits this process's (SIGCHLD),
            // and clone3 refuses to be told one (EINVAL).
            let args = CloneArgs {
                flags: libc::CLONE_PARENT as u64 | CLONE_INTO_CGROUP,
                cgroup: u64::try_from(dir).unwrap_or(u64::MAX),
                ..Default::default()
            };
            // SAFETY: a fork-like clone3 (no stack, no shared VM) of a single-threaded
            // process; `args` is a live `struct clone_args` of the size passed.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &args as *const CloneArgs,
                    std::mem::size_of::<CloneArgs>(),
                )
            };
            let refused = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS);
            if pid < 0 && refused {
                join_cgroup(dir)?;
                plain()
            } else {
                pid
            }
        }
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).step("clone the container's pid 1");
    }
    Ok(pid)
}

/// Move this process into the cgroup v2 directory `dir` (write 0 to its `cgroup.procs`).
fn join_cgroup(dir: RawFd) -> Step {
    let procs = rustix::fs::openat(
        borrow(dir),
        "cgroup.procs",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .step("open the cgroup's cgroup.procs")?;
    rustix::io::write(&procs, b"0").step("join the cgroup (write 0 to cgroup.procs)")?;
    Ok(())
}

fn root_uid() -> rustix::process::Uid {
    rustix::process::Uid::ROOT
}
fn root_gid() -> rustix::process::Gid {
    rustix::process::Gid::ROOT
}

/// Pid 1 of the container: build the root, set identity and limits, drop privileges, exec.
fn container_main(
    plan: &Plan,
    trees: &[(OwnedFd, bool)],
    err: RawFd,
    progress: RawFd,
) -> Step<std::convert::Infallible> {
    let step = |p| announce(progress, p);
    // Rooted at the cgroup this process was cloned into: the container sees only its own.
    step(Progress::Namespaces);
    // SAFETY: this forked process is single-threaded.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWCGROUP) }
        .step("create the cgroup namespace (unshare CLONE_NEWCGROUP)")?;
    rustix::process::umask(rustix::fs::Mode::empty());
    step(Progress::PrivateMounts);
    rootfs::make_root_private()?;
    if plan.network != NetworkMode::Host {
        step(Progress::Loopback);
        loopback_up()?;
    }
    let userns = plan.userns.is_some();
    step(Progress::RootFs);
    let root = rootfs::mount_root(plan)?;
    step(Progress::StandardMounts);
    rootfs::standard_mounts(root.as_fd(), userns)?;
    step(Progress::MaskPaths);
    rootfs::mask_paths(root.as_fd(), &plan.masked)?;
    step(Progress::ReadOnlyPaths);
    rootfs::readonly_paths(root.as_fd())?;
    step(Progress::BindMounts);
    rootfs::bind_mounts(root.as_fd(), &plan.binds, trees)?;
    step(Progress::SealRoot);
    rootfs::seal_root(root.as_fd(), plan)?;
    step(Progress::Pivot);
    rootfs::pivot(root.as_fd(), &plan.root_mountpoint)?;
    drop(root);
    step(Progress::Identity);
    rustix::system::sethostname(plan.hostname.as_bytes()).step("set the hostname")?;
    for (resource, soft, hard) in &plan.rlimits {
        nix::sys::resource::setrlimit(*resource, *soft, *hard).step("set a resource limit")?;
    }
    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it while we have it.
    if let (Some(filter), false) = (&plan.seccomp, plan.no_new_privileges) {
        seccomp::install(filter)?;
    }
    caps::drop_bounding(plan.caps)?;
    switch_user(plan)?;
    caps::apply(plan.caps, plan.user.uid)?;
    if plan.no_new_privileges {
        rustix::thread::set_no_new_privs(true).step("set no_new_privs")?;
        if let Some(filter) = &plan.seccomp {
            seccomp::install(filter)?;
        }
    }
    step(Progress::Exec);
    if plan.init {
        init::run_init(plan, err)
    } else {
        exec_command(plan)
    }
}

fn switch_user(plan: &Plan) -> Step {
    let u = &plan.user;
    let groups: Vec<rustix::process::Gid> = u
        .additional_gids
        .iter()
        .map(|g| rustix::process::Gid::from_raw(*g))
        .collect();
    rustix::thread::set_thread_groups(&groups).step("set the supplementary groups")?;
    rustix::thread::set_keep_capabilities(true).step("keep capabilities across setuid")?;
    let gid = rustix::process::Gid::from_raw(u.gid);
    rustix::thread::set_thread_res_gid(gid, gid, gid).step("set the group id")?;
    let uid = rustix::process::Uid::from_raw(u.uid);
    rustix::thread::set_thread_res_uid(uid, uid, uid).step("set the user id")?;
    Ok(())
}

/// Bring `lo` up in the new network namespace.
fn loopback_up() -> Step {
    let sock = rustix::net::socket_with(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .step("open a socket to configure lo")?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error()).step("read the flags of lo");
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error()).step("bring lo up");
        }
    }
    Ok(())
}

/// Default dispositions and an empty mask: the caller may ignore or block signals (an event
/// loop blocks SIGCHLD; Rust ignores SIGPIPE), and both survive execve. Async-signal-safe:
/// for use between fork and exec, also by launchers outside this crate.
pub fn reset_signals() {
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: setting SIG_DFL is always sound; invalid numbers just fail.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

/// The last steps before the command: session, terminal, fds, cwd, umask, execve.
pub(crate) fn exec_command(plan: &Plan) -> Step<std::convert::Infallible> {
    reset_signals();
    // Own session (and, with a terminal, stdin as the controlling terminal).
    let _ = rustix::process::setsid();
    if plan.terminal {
        rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())
            .step("make stdin the controlling terminal (TIOCSCTTY)")?;
    }
    // SAFETY: close_range only changes flags of this process's fds.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).step("mark fds close-on-exec (close_range)");
    }
    rustix::process::chdir(plan.cwd.as_path())
        .step_at("chdir to the working directory", &plan.cwd)?;
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let argv = null_terminated(&plan.argv);
    let envp = null_terminated(&plan.envp);
    let mut errno = libc::ENOENT;
    for exe in &plan.exe_candidates {
        exec(exe, &argv, &envp);
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::ENOENT);
        // Like execvp: remember a more telling error than "not found".
        if e != libc::ENOENT && e != libc::ENOTDIR {
            errno = e;
        }
    }
    let arg0 = plan
        .argv
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(Failure::new("exec", Some(Path::new(&arg0)), errno))
}

fn null_terminated(list: &[std::ffi::CString]) -> Vec<*const libc::c_char> {
    list.iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn exec(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) {
    // SAFETY: argv and envp are NULL-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn progress_bytes_name_their_steps() {
        for (i, step) in Progress::ALL.iter().enumerate() {
            assert_eq!(*step as u8 as usize, i, "ALL is in byte order");
            assert_eq!(Progress::from_byte(*step as u8), Some(*step));
        }
        assert_eq!(Progress::from_byte(200), None);
    }

    #[test]
    fn a_silent_pipe_times_out_and_a_closed_one_does_not() {
        let (r, w) = pipe().unwrap();
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(read_all_until(r.as_fd(), 4, soon), None);
        rustix::io::write(&w, &[Progress::BindMounts as u8]).unwrap();
        assert_eq!(last_progress(r.as_fd()), Some("bind-mounting the mounts"));
        rustix::io::write(&w, b"ab").unwrap();
        drop(w);
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(read_all_until(r.as_fd(), 4, later), Some(b"ab".to_vec()));
    }
}
