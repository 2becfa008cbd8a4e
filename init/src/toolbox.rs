//! The toolbox: a one-off container in the foreground with the caller's stdio, like CoreOS's
//! `toolbox` (`unitctl run --image gcc --bind $PWD:/src --workdir /src -- make`). It needs no
//! running manager: the request is described as an ad-hoc [`Unit`] and goes through the same
//! [`ContainerLauncher::spec`] path as managed units.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use flotilla_container::runtime::{self, Stdio};
use flotilla_units::{ContainerSection, FleetSection, Mount, Network, ServiceSection, Unit};

use crate::launcher::{filter_devices, ContainerLauncher, LaunchError};
use crate::scope::{Scope, ScopeRoot};

/// What `unitctl run` was asked for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Image reference in the store.
    pub image: String,
    /// Image stores, searched in order (the first is the writable one).
    pub stores: Vec<PathBuf>,
    /// `HOST:CONTAINER[:ro]` bind mounts, already split.
    pub binds: Vec<Mount>,
    /// Working directory inside.
    pub workdir: Option<PathBuf>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// `user`, `uid[:gid]`; `None`: the invoking user (`SUDO_UID`/`SUDO_GID` under sudo), else root.
    pub user: Option<String>,
    /// Network mode (the host's by default, like CoreOS's toolbox).
    pub network: Network,
    /// The command; empty runs the image's entrypoint and cmd.
    pub command: Vec<String>,
}

/// Parse `HOST:CONTAINER[:ro|:rw]`; the host path is made absolute against the current dir.
pub fn parse_bind(spec: &str) -> Result<Mount, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, path, read_only) = match parts.as_slice() {
        [h, p] => (*h, *p, false),
        [h, p, "ro"] => (*h, *p, true),
        [h, p, "rw"] => (*h, *p, false),
        _ => {
            return Err(format!(
                "invalid --bind {spec:?}: use HOST:CONTAINER or HOST:CONTAINER:ro"
            ))
        }
    };
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!(
            "invalid --bind {spec:?}: the container path must be absolute"
        ));
    }
    let host = std::path::absolute(host).map_err(|e| format!("--bind {spec:?}: {e}"))?;
    Ok(Mount {
        host,
        path,
        read_only,
        create: false,
    })
}

/// The user the toolbox runs as when none is given: the one who invoked sudo, so files it
/// creates in bound directories belong to the caller.
fn default_user() -> Option<String> {
    let uid = std::env::var("SUDO_UID").ok()?;
    let gid = std::env::var("SUDO_GID").unwrap_or_else(|_| uid.clone());
    Some(format!("{uid}:{gid}"))
}

/// The ad-hoc unit describing the request.
pub fn unit_for(opts: &RunOptions) -> Unit {
    let name = format!("toolbox-{}", std::process::id());
    Unit {
        name: name.clone(),
        path: None,
        source: String::new(),
        unit: Default::default(),
        container: ContainerSection {
            image: Some(opts.image.clone()),
            command: opts.command.clone(),
            env: opts.env.clone(),
            workdir: opts.workdir.clone(),
            user: opts.user.clone().or_else(default_user),
            network: opts.network,
            mounts: opts.binds.clone(),
            hostname: Some("toolbox".into()),
            init: true,
            capabilities: None,
            read_only: false,
            rlimits: Vec::new(),
            user_namespace: None,
            control_api: false,
            devices: Vec::new(),
        },
        service: ServiceSection::default(),
        fleet: FleetSection::default(),
    }
}

fn dup(fd: impl AsFd) -> Result<OwnedFd, LaunchError> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|source| LaunchError::Spawn {
            program: "(duplicating stdio)".into(),
            source,
        })
}

/// Run the container in the foreground with this process's stdio; returns the command's
/// exit status (128+N when killed by signal N).
pub fn run(opts: &RunOptions) -> Result<i32, LaunchError> {
    // The container's setup processes are forks of this one until they exec.
    runtime::make_non_dumpable()?;
    let scratch = tempfile::Builder::new()
        .prefix("flotilla-toolbox-")
        .tempdir_in(scratch_dir())
        .map_err(|source| LaunchError::Spawn {
            program: "(creating the container's scratch directory)".into(),
            source,
        })?;
    private_tmpfs(scratch.path())?;
    let result = run_in(opts, scratch.path());
    // Unmount first, or removing the scratch dir fails on the mount point (EBUSY).
    let _ = rustix::mount::unmount(scratch.path(), rustix::mount::UnmountFlags::DETACH);
    drop(scratch);
    result
}

fn run_in(opts: &RunOptions, scratch: &Path) -> Result<i32, LaunchError> {
    let mut launcher = ContainerLauncher::new(&opts.stores, scratch);
    let unit = unit_for(opts);
    let mut spec = launcher.spec(&unit, true)?;
    spec.terminal = std::io::stdin().is_terminal();
    let stdio = Stdio {
        stdin: Some(dup(std::io::stdin())?),
        stdout: Some(dup(std::io::stdout())?),
        stderr: Some(dup(std::io::stderr())?),
    };
    // A transient cgroup of its own, below this process's, to hold the device filter.
    let (root, fallback) = ScopeRoot::create_with(&unit.name, false);
    if let Some(why) = fallback {
        return Err(LaunchError::Unsupported(format!(
            "the toolbox cannot enforce the device allow-list: {why}; it needs a writable \
             cgroup v2 hierarchy (mount cgroup2, e.g. on /sys/fs/cgroup, and run as root)"
        )));
    }
    let result = root
        .prepare("toolbox")
        .map_err(LaunchError::from)
        .and_then(|scope| {
            let result = filter_devices(&spec, &scope)
                .and_then(|()| scope.entry().map_err(LaunchError::from))
                .and_then(|entry| Ok(runtime::run(&spec, stdio, entry.procs())?));
            remove_when_empty(&scope);
            result
        });
    root.remove();
    result
}

/// Kill what is left in the toolbox's cgroup and remove it once empty (the container's
/// other processes die with its pid namespace; the wait is bounded).
fn remove_when_empty(scope: &Scope) {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);
    let start = std::time::Instant::now();
    while !scope.is_empty() && start.elapsed() < PATIENCE {
        scope.signal(nix::sys::signal::Signal::SIGKILL);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    scope.remove();
}

/// Give this process a private mount namespace with a tmpfs on `dir`: the container's
/// throwaway writable layer then lives in memory, is never visible on the host, and goes
/// away with this process. (It also makes a run about 2 ms faster than ext4 mkdir/rmdir.)
fn private_tmpfs(dir: &Path) -> Result<(), LaunchError> {
    use rustix::mount::{mount, mount_change, MountFlags, MountPropagationFlags};
    use rustix::thread::{unshare_unsafe, UnshareFlags};
    let err = |what: &str| {
        let what = what.to_string();
        move |e: rustix::io::Errno| LaunchError::Spawn {
            program: format!("({what} for the toolbox's scratch space)"),
            source: e.into(),
        }
    };
    // SAFETY: only the mount namespace is unshared, not the fd table (the concern of
    // `unshare_unsafe`); unitctl is single-threaded here.
    unsafe { unshare_unsafe(UnshareFlags::NEWNS) }.map_err(err("unshare the mount namespace"))?;
    mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(err("make / private"))?;
    mount(
        "tmpfs",
        dir,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=0700",
    )
    .map_err(err("mount a tmpfs"))
}

/// The mount point of the toolbox's scratch tmpfs: under `/var/tmp`, else `/tmp`.
fn scratch_dir() -> &'static Path {
    let var_tmp = Path::new("/var/tmp");
    if var_tmp.is_dir() {
        var_tmp
    } else {
        Path::new("/tmp")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn binds_parse() {
        let m = parse_bind("/src:/work:ro").unwrap();
        assert_eq!(
            (m.host, m.path, m.read_only),
            ("/src".into(), "/work".into(), true)
        );
        let m = parse_bind("rel:/w").unwrap();
        assert!(m.host.is_absolute() && !m.read_only);
        assert!(parse_bind("/a:rel").is_err());
        assert!(parse_bind("/a").is_err());
        assert!(parse_bind("/a:/b:rx").is_err());
    }
}
