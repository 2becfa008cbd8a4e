//! The toolbox: a one-off container in the foreground with the caller's stdio, like CoreOS's
//! `toolbox` (`unitctl run --image gcc --bind $PWD:/src --workdir /src -- make`). It needs no
//! running manager: the request is described as an ad-hoc [`Unit`] and goes through the same
//! [`ContainerLauncher::spec`] path as managed units.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use flotilla_container::runtime::{self, RootFs, Stdio};
use flotilla_units::{ContainerSection, FleetSection, Mount, NetworkMode, ServiceSection, Unit};

use crate::launcher::{ContainerLauncher, LaunchError};
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
    pub network: NetworkMode,
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
            pull: Default::default(),
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
///
/// Nothing is written on the host: the container's writable layer lives in a tmpfs of its
/// own mount namespace ([`RootFs::Overlay`]'s `in_memory`), mounted on one directory every
/// toolbox run shares ([`state_dir`]).
pub fn run(opts: &RunOptions) -> Result<i32, LaunchError> {
    // The container's setup processes are forks of this one until they exec.
    runtime::make_non_dumpable()?;
    let state = state_dir()?;
    let mut launcher = ContainerLauncher::new(&opts.stores, &state);
    let unit = unit_for(opts);
    let mut spec = launcher.spec(&unit, true)?;
    if let RootFs::Overlay {
        state_dir,
        in_memory,
        ..
    } = &mut spec.root
    {
        state_dir.clone_from(&state);
        *in_memory = true;
    }
    spec.terminal = std::io::stdin().is_terminal();
    let stdio = Stdio {
        stdin: Some(dup(std::io::stdin())?),
        stdout: Some(dup(std::io::stdout())?),
        stderr: Some(dup(std::io::stderr())?),
    };
    // A cgroup of its own, in a cgroup every toolbox run shares below this process's, which
    // holds the device filter: attached once, reused by every later run (no program load).
    let (root, fallback) = ScopeRoot::create_with(TOOLBOX_CGROUP, false);
    let ScopeRoot::Cgroup(shared) = &root else {
        return Err(LaunchError::Unsupported(format!(
            "the toolbox cannot enforce the device allow-list: {}; it needs a writable \
             cgroup v2 hierarchy (mount cgroup2, e.g. on /sys/fs/cgroup, and run as root)",
            fallback.unwrap_or_default()
        )));
    };
    runtime::attach_device_filter(shared, &spec.devices)?;
    // This process holds the image's layers until the container is gone.
    let lease = launcher.lease(&spec)?;
    let scope = root.prepare(&unit.name)?;
    let result = scope
        .entry()
        .map_err(LaunchError::from)
        .and_then(|entry| Ok(runtime::run(&spec, stdio, entry.cgroup())?));
    remove_when_empty(&scope);
    drop(lease);
    result
}

/// The cgroup below the caller's that holds every toolbox run's own cgroup, and the device
/// filter they share (the default allow-list: the toolbox grants no devices).
const TOOLBOX_CGROUP: &str = "flotilla-toolbox";

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

/// The directory every toolbox run mounts its in-memory state on (inside its container's
/// mount namespace; on the host it stays empty): `flotilla-toolbox` under `/run`, else
/// `/var/tmp`, else `/tmp`. Created once, mode 0700; refused unless it is a directory of root's that no
/// one else may write (in `/var/tmp` anyone could have made it first).
fn state_dir() -> Result<PathBuf, LaunchError> {
    let base = ["/run", "/var/tmp", "/tmp"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("/tmp"));
    private_dir(&base.join("flotilla-toolbox"))
}

/// Create `dir` (0700) if missing; `dir` unless it is not a directory of root's that only
/// root may write.
fn private_dir(dir: &Path) -> Result<PathBuf, LaunchError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = dir.to_path_buf();
    let unsafe_dir = |why: String| {
        LaunchError::Unsupported(format!(
            "the toolbox's state directory {}: {why}; remove it (the toolbox makes it again)",
            dir.display()
        ))
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(unsafe_dir(e.to_string())),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| unsafe_dir(e.to_string()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "not a directory of root's that only root may write (uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Where `/run` is missing the state dir is in world-writable `/var/tmp`: one made there
    /// first by another user, or a symlink, or one others may write, is refused.
    #[test]
    fn the_state_dir_must_be_roots_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root: the host integration tests run as root (sudo ./scripts/test) (to chown)"
        );
        let base = tempfile::tempdir().unwrap();
        let fresh = base.path().join("fresh");
        assert_eq!(private_dir(&fresh).unwrap(), fresh);
        let meta = std::fs::metadata(&fresh).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o700));
        assert!(private_dir(&fresh).is_ok(), "made before by root: kept");

        let theirs = base.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = private_dir(&theirs).unwrap_err().to_string();
        assert!(
            err.contains("uid 65534") && err.contains("remove it"),
            "{err}"
        );

        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir(&open).is_err());

        let link = base.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(private_dir(&link).is_err(), "a symlink, even to a good dir");
    }

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
