//! The processes that become the container: the caller forks an intermediate process, which
//! joins the cgroup, creates the namespaces and clones the container's pid 1 with
//! `CLONE_PARENT` (so the caller is its parent and reaps it); pid 1 builds the root, drops
//! privileges and execs (or runs the reaper, which forks the command).

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use rustix::pipe::{pipe_with, PipeFlags};
use rustix::thread::UnshareFlags;

use super::plan::{Plan, RootPlan};
use super::report::{self, exit_now, fail_and_exit, Context, Failure, Step};
use super::{caps, init, rootfs, seccomp, ContainerError, Network, Spawned};

/// The fds the children write to.
#[derive(Clone, Copy)]
struct ChildFds {
    /// Error pipe (close-on-exec).
    err: RawFd,
    /// The intermediate process sends pid 1's host pid here.
    pid: RawFd,
    /// User namespace sync: child -> parent ("unshared"), parent -> child ("mapped").
    sync: Option<(RawFd, RawFd)>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    pipe_with(PipeFlags::CLOEXEC).map_err(|e| ContainerError::setup("create a pipe", None, e))
}

/// Read until EOF (or `limit` bytes).
fn read_all(fd: BorrowedFd<'_>, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while out.len() < limit {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    out
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

/// Fork the container's processes and wait until the command runs or setup failed.
pub(crate) fn start(plan: &Plan) -> Result<Spawned, ContainerError> {
    let (err_r, err_w) = pipe()?;
    let (pid_r, pid_w) = pipe()?;
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
    let mut map_error = None;
    if let (Some(((up_r, up_w), (down_r, down_w))), Some(m)) = (sync, plan.userns) {
        drop(up_w);
        drop(down_r);
        // One byte: the child has unshared its user namespace. EOF: it failed (reported below).
        if read_all(up_r.as_fd(), 1).len() == 1 {
            map_error = write_id_maps(c1, &m).err();
            if map_error.is_none() {
                // The child sees EOF instead if this fails, and stops.
                let _ = rustix::io::write(&down_w, b"1");
            }
        }
        drop(down_w);
    }
    let pid_bytes = read_all(pid_r.as_fd(), 4);
    let c1_status = reap(c1);
    let report = read_all(err_r.as_fd(), 4096);
    let pid = <[u8; 4]>::try_from(pid_bytes.as_slice())
        .ok()
        .map(|b| Pid::from_raw(i32::from_le_bytes(b)));
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
    if let Some(fd) = plan.cgroup_procs {
        rustix::io::write(borrow(fd), b"0").step("join the cgroup (write 0 to cgroup.procs)")?;
    }
    if let Some((up_w, down_r)) = fds.sync {
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
    let mut flags = UnshareFlags::NEWNS
        | UnshareFlags::NEWUTS
        | UnshareFlags::NEWIPC
        | UnshareFlags::NEWPID
        | UnshareFlags::NEWCGROUP;
    if plan.network != Network::Host {
        flags |= UnshareFlags::NEWNET;
    }
    // SAFETY: this forked process is single-threaded.
    unsafe { rustix::thread::unshare_unsafe(flags) }.step("create the namespaces (unshare)")?;
    // SAFETY: a fork-like clone (no new stack, no shared VM) of a single-threaded process.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).step("clone the container's pid 1");
    }
    if pid == 0 {
        child_entry(fds.err, || container_main(plan, fds.err));
    }
    let pid = i32::try_from(pid).unwrap_or_default();
    rustix::io::write(borrow(fds.pid), &pid.to_le_bytes()).step("send the container's pid")?;
    exit_now(0)
}

fn root_uid() -> rustix::process::Uid {
    rustix::process::Uid::ROOT
}
fn root_gid() -> rustix::process::Gid {
    rustix::process::Gid::ROOT
}

/// Pid 1 of the container: build the root, set identity and limits, drop privileges, exec.
fn container_main(plan: &Plan, err: RawFd) -> Step<std::convert::Infallible> {
    rustix::process::umask(rustix::fs::Mode::empty());
    rootfs::make_root_private()?;
    if plan.network != Network::Host {
        loopback_up()?;
    }
    let userns = plan.userns.is_some();
    let root = rootfs::mount_root(plan)?;
    rootfs::standard_mounts(root.as_fd(), userns)?;
    rootfs::mask_paths(root.as_fd())?;
    rootfs::readonly_paths(root.as_fd())?;
    rootfs::bind_mounts(root.as_fd(), &plan.binds)?;
    rootfs::seal_root(root.as_fd(), plan)?;
    rootfs::pivot(root.as_fd(), &plan.root_mountpoint)?;
    drop(root);
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
