//! The container runtime: starts one process in its own namespaces, over an overlayfs root
//! (or the host's root, read-only), with the standard API mounts, masked paths, a reduced
//! capability set, `no_new_privs` and a default seccomp filter.
//!
//! The caller (the unit manager, `unitctl run`) builds a [`ContainerSpec`] and calls [`spawn`]
//! (returns the host pid of the container's pid 1, which the caller reaps) or [`run`]
//! (foreground: forwards signals, waits, returns the exit code).
//!
//! How it works: the parent prepares everything that allocates or can be checked up front
//! ([`plan`]), forks an intermediate process that joins the cgroup, creates the namespaces and
//! clones the container's pid 1 with `CLONE_PARENT` (so the caller is its parent). Pid 1 builds
//! the root ([`rootfs`], policy tables in [`mounts`]), drops privileges ([`caps`],
//! [`seccomp`]) and execs. Any failure in the children comes back over a close-on-exec pipe
//! ([`report`]) so [`spawn`] returns an error naming the step and the path.

mod bpf;
mod caps;
mod child;
mod devices;
mod hostpath;
mod init;
mod mounts;
mod plan;
mod reaper;
mod report;
mod rootfs;
mod seccomp;
mod user;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

pub use child::reset_signals;
pub use devices::{
    attach_device_filter, DeviceKind, DeviceRule, ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE,
    DEFAULT_DEVICES,
};
/// The names the runtime takes, defined once in the unit format crate (the kernel numbers:
/// capabilities there, resource limits in this runtime's one table).
pub use flotilla_units::{Capability, NetworkMode, Rlimit, RlimitResource};
pub use hostpath::create_dir_all_nofollow;
pub use user::lookup_user;

/// What to run in a container and how to isolate it.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// The container's name (e.g. the unit name): the default hostname, and part of the names
    /// of temporary directories.
    pub id: String,
    /// The root filesystem.
    pub root: RootFs,
    /// The command line. `args[0]` is searched in the `PATH` of [`ContainerSpec::env`] (or a
    /// default `PATH`) inside the container unless it contains a `/`.
    pub args: Vec<String>,
    /// The environment of the command, exactly (nothing is inherited from the caller).
    pub env: Vec<(String, String)>,
    /// Working directory inside the container.
    pub cwd: PathBuf,
    /// Numeric identity of the process inside the container.
    pub user: User,
    /// Hostname in the container's UTS namespace; `None`: the [`ContainerSpec::id`].
    pub hostname: Option<String>,
    /// Network namespace.
    pub network: NetworkMode,
    /// A user namespace with this mapping (same for uids and gids); `None`: no user namespace.
    pub user_namespace: Option<IdMapping>,
    /// Bind mounts from the host, applied after the standard mounts.
    pub mounts: Vec<BindMount>,
    /// Capabilities kept; `None`: the default set ([`DEFAULT_CAPABILITIES`]).
    pub capabilities: Option<Vec<Capability>>,
    /// Set `no_new_privs` (setuid binaries and file capabilities grant nothing).
    pub no_new_privileges: bool,
    /// Install the default seccomp filter (a deny-list answering `EPERM`).
    pub seccomp: bool,
    /// Resource limits set before the exec.
    pub rlimits: Vec<Rlimit>,
    /// Run a minimal init as pid 1 that reaps orphans, forwards signals to the command and
    /// exits with the command's status (128+signal when it was killed).
    pub init: bool,
    /// Standard input is a terminal: make it the controlling terminal of the command.
    pub terminal: bool,
    /// Devices allowed beyond [`DEFAULT_DEVICES`]. The caller enforces them with
    /// [`attach_device_filter`] on the container's cgroup before [`spawn`].
    pub devices: Vec<DeviceRule>,
    /// More paths to hide inside the container, like the standard masked paths (`/dev/null`
    /// bound over a file, an empty read-only tmpfs over a directory; missing ones skipped):
    /// the host's secrets under a [`RootFs::HostReadOnly`] root. Absolute, in the container.
    pub masked_paths: Vec<PathBuf>,
    /// How long [`spawn`] waits for the setup (namespaces, mounts, exec) to finish before it
    /// kills the setup processes and fails with [`ContainerError::SetupTimeout`]: a mount on
    /// a hung filesystem must not hang the caller ([`DEFAULT_SETUP_TIMEOUT`]).
    pub setup_timeout: Duration,
}

/// How long a container's setup may take by default (see [`ContainerSpec::setup_timeout`]).
pub const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The search path a process gets when its environment sets none (a container's, a host
/// unit's, PID 1's shells): the one definition in the workspace.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ContainerSpec {
    /// A spec with the defaults: cwd `/`, root user, private network, default capabilities,
    /// `no_new_privs`, seccomp, no init, no terminal, `PATH` set to the usual directories.
    pub fn new(id: impl Into<String>, root: RootFs, args: Vec<String>) -> Self {
        ContainerSpec {
            id: id.into(),
            root,
            args,
            env: vec![("PATH".to_owned(), DEFAULT_PATH.to_owned())],
            cwd: PathBuf::from("/"),
            user: User::default(),
            hostname: None,
            network: NetworkMode::Private,
            user_namespace: None,
            mounts: Vec::new(),
            capabilities: None,
            no_new_privileges: true,
            seccomp: true,
            rlimits: Vec::new(),
            init: false,
            terminal: false,
            devices: Vec::new(),
            masked_paths: Vec::new(),
            setup_timeout: DEFAULT_SETUP_TIMEOUT,
        }
    }
}

/// The capabilities a container keeps when [`ContainerSpec::capabilities`] is `None`: runc's
/// and Docker's default set without `CAP_MKNOD` and `CAP_NET_RAW`.
pub const DEFAULT_CAPABILITIES: &[Capability] = caps::DEFAULT;

/// The root filesystem of a container.
#[derive(Debug, Clone)]
pub enum RootFs {
    /// Image layers (lowest first) as overlayfs lower dirs; upper/work dirs created under
    /// `state_dir` (must be on a filesystem that supports an overlay upper dir, e.g. ext4).
    /// `read_only`: the root is read-only.
    Overlay {
        /// Layer directories, lowest first.
        layers: Vec<PathBuf>,
        /// Directory for `upper/`, `work/` and the `rootfs/` mount point.
        state_dir: PathBuf,
        /// Mount the root read-only.
        read_only: bool,
        /// Keep `upper/` and `work/` in memory: the container's pid 1 mounts a tmpfs on
        /// `state_dir` in its own mount namespace, so nothing is written on the host, the
        /// writable layer is gone when the container ends, and any number of containers may
        /// share one (existing) `state_dir`. The toolbox runs this way.
        in_memory: bool,
    },
    /// The host's `/` (or another directory) bind-mounted read-only as the root, for units
    /// without an image. Only declared mounts are writable; their destinations must exist.
    HostReadOnly {
        /// The directory to use as the root.
        path: PathBuf,
    },
}

/// Numeric identity of the container's process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub additional_gids: Vec<u32>,
}

/// One range of a user namespace mapping, used for both uids and gids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    /// First id inside the container.
    pub container_id: u32,
    /// First id on the host.
    pub host_id: u32,
    /// Number of ids mapped.
    pub size: u32,
}

/// A bind mount from the host into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Path on the host (must exist).
    pub source: PathBuf,
    /// Path inside the container, resolved inside the container root (symlinks cannot lead
    /// out of it); created when missing.
    pub destination: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
}

/// The container's standard streams; `None` is `/dev/null`.
#[derive(Debug, Default)]
pub struct Stdio {
    /// Standard input.
    pub stdin: Option<OwnedFd>,
    /// Standard output.
    pub stdout: Option<OwnedFd>,
    /// Standard error.
    pub stderr: Option<OwnedFd>,
}

/// A started container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    /// Host pid of the container's pid 1 (a child of the caller: reap it with `waitpid`).
    pub pid: Pid,
}

/// Why a container could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The spec cannot be run as given.
    #[error("invalid container spec: {0}")]
    InvalidSpec(String),
    /// A setup step in the calling process failed.
    #[error("{step}{}: {source}{}", show_path(path), hint(step, source))]
    Setup {
        /// What was being done.
        step: &'static str,
        /// On which path, if any.
        path: Option<PathBuf>,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A setup step inside the container's processes failed (reported over the error pipe).
    #[error(
        "in the container: {step}{}: {source}{}",
        show_path(path),
        hint(step, source)
    )]
    Child {
        /// What was being done.
        step: String,
        /// On which path, if any.
        path: Option<PathBuf>,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A host path (a bind mount source, a directory to create) has a symlink in it. Host
    /// paths are resolved without following symlinks: a container that may write below a
    /// bind source could otherwise plant one (`sub -> /`) and hand the host's root to the
    /// next container that binds `sub`.
    #[error(
        "{what} {}: {} is a symlink (to {}); host paths are resolved without following \
         symlinks: name the real path instead, or replace the symlink with a directory",
        path.display(),
        component.display(),
        target.display()
    )]
    SymlinkInPath {
        /// What the path is for.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// Its first component that is a symlink.
        component: PathBuf,
        /// Where that symlink points (as stored in it).
        target: PathBuf,
    },
    /// The setup did not finish within [`ContainerSpec::setup_timeout`]; its processes were
    /// killed.
    #[error(
        "the container's setup did not finish within {timeout:?}{}; its processes were \
         killed. A mount may hang (a hung network or FUSE filesystem under a bind mount's \
         source or an image layer): check the unit's mounts",
        at_step(step)
    )]
    SetupTimeout {
        /// The limit that passed.
        timeout: Duration,
        /// The step the setup was at, when it had announced one.
        step: Option<&'static str>,
    },
    /// The container's processes ended without saying why.
    #[error("the container's setup process ended unexpectedly ({0})")]
    Lost(String),
    /// The device filter could not be loaded or attached: the container must not run.
    #[error(
        "cannot enforce the device allow-list on cgroup {}: {step}: {source}{}; \
         the container needs a cgroup v2 directory and a kernel with CONFIG_CGROUP_BPF \
         (run it under a manager on cgroup v2, as root)",
        cgroup.display(),
        if log.is_empty() { String::new() } else { format!(" (verifier: {log})") }
    )]
    DeviceFilter {
        /// What was being done.
        step: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
        /// The verifier's log, when loading failed.
        log: String,
    },
    /// Resolving a user or group in the image failed.
    #[error("user {spec:?}: {message}")]
    User {
        /// The user spec as given.
        spec: String,
        /// What went wrong.
        message: String,
    },
}

fn at_step(step: &Option<&'static str>) -> String {
    match step {
        Some(s) => format!(" (it was {s})"),
        None => String::new(),
    }
}

fn show_path(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" {}", p.display()),
        None => String::new(),
    }
}

/// A short "what to do" for common failures.
fn hint(step: &str, err: &io::Error) -> &'static str {
    use io::ErrorKind as K;
    match (step, err.kind()) {
        ("exec", K::NotFound) => {
            "; the program is not in the image (or not on PATH): check args[0] and PATH"
        }
        ("exec", K::PermissionDenied) => "; the program is not executable for this user",
        ("chdir to the working directory", K::NotFound) => {
            "; create the directory in the image or change the working directory"
        }
        (_, K::ReadOnlyFilesystem) => {
            "; the root is read-only: create the mount point in the image (or use a writable root)"
        }
        (s, K::PermissionDenied) if s.starts_with("mount") => {
            "; mounting needs real root (or a user namespace that owns the mount)"
        }
        _ => "",
    }
}

impl ContainerError {
    pub(crate) fn setup(
        step: &'static str,
        path: Option<&Path>,
        source: impl Into<io::Error>,
    ) -> Self {
        ContainerError::Setup {
            step,
            path: path.map(Path::to_path_buf),
            source: source.into(),
        }
    }
}

/// Start the container; returns once the command is running (its `execve` succeeded) or
/// setup failed (the error says which step, on which path, and often what to do).
///
/// The caller reaps [`Spawned::pid`] with `waitpid`. `cgroup`: the leaf cgroup v2 directory
/// the container starts in (its cgroup namespace is rooted there).
pub fn spawn(
    spec: &ContainerSpec,
    stdio: Stdio,
    cgroup: Option<CgroupDir<'_>>,
) -> Result<Spawned, ContainerError> {
    let plan = plan::Plan::new(spec, stdio, cgroup.map(|c| (c.dir.as_raw_fd(), c.fresh)))?;
    let result = child::start(&plan, spec.setup_timeout);
    plan.cleanup_after_start();
    result
}

/// The leaf cgroup v2 directory a container starts in (see [`spawn`]).
#[derive(Debug, Clone, Copy)]
pub struct CgroupDir<'a> {
    /// The directory, open (`O_RDONLY` or `O_PATH`).
    pub dir: BorrowedFd<'a>,
    /// Never killed with `cgroup.kill` (made for this start): pid 1 is then cloned straight
    /// into it (`clone3` with `CLONE_INTO_CGROUP`), which unlike writing `cgroup.procs` does
    /// not wait for an RCU grace period (~10 ms now and then on a busy 2-CPU machine). A
    /// reused cgroup is joined by writing `cgroup.procs`: Linux 6.14 to 6.18 compare the
    /// `cgroup.kill` count of the caller's cgroup with the target's on that clone path and
    /// kill the new process when they differ.
    pub fresh: bool,
}

/// Make the calling process non-dumpable (`PR_SET_DUMPABLE 0`): no core dumps, and neither
/// `ptrace` nor `/proc/PID/mem`, `/proc/PID/environ` or `/proc/PID/maps` for processes
/// without `CAP_SYS_PTRACE`. Programs that start containers and hold other units' secrets
/// (the manager, the toolbox) call it once at start; the container's setup processes, forks
/// of the caller, inherit it until their exec.
pub fn make_non_dumpable() -> Result<(), ContainerError> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| ContainerError::setup("make this process non-dumpable (prctl)", None, e))
}

/// Signals [`run`] forwards to the container.
const FORWARDED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Foreground run (the toolbox): spawn, forward SIGINT/SIGTERM/SIGHUP/SIGQUIT to the
/// container's pid 1, wait, and return its exit code (128+signal when killed by a signal).
///
/// The forwarded signals are blocked in the calling thread while it runs; other threads of
/// the process should block them too.
pub fn run(
    spec: &ContainerSpec,
    stdio: Stdio,
    cgroup: Option<CgroupDir<'_>>,
) -> Result<i32, ContainerError> {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
        .map_err(|e| ContainerError::setup("block signals", None, e))?;
    let result = spawn(spec, stdio, cgroup).and_then(|s| wait_forwarding(s.pid, &set));
    // Best effort: restoring the mask cannot meaningfully fail with a valid set.
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    result
}

fn wait_forwarding(pid: Pid, set: &SigSet) -> Result<i32, ContainerError> {
    loop {
        match waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ContainerError::setup("wait for the container", None, e)),
        }
        if let Some(sig) = init::wait_signal(set, 100) {
            if sig != Signal::SIGCHLD {
                // The container may be exiting already: ESRCH is fine.
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    }
}
