//! Everything the container's processes need, prepared and checked in the caller before the
//! fork: paths, mount options, the exec candidates, the compiled seccomp filter. The children
//! only execute it.

use std::ffi::CString;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::sys::resource::Resource;
use rustix::fs::{Mode, OFlags};
use seccompiler::BpfProgram;

use super::{
    caps, seccomp, ContainerError, ContainerSpec, IdMapping, NetworkMode, RlimitResource, RootFs,
    Stdio, User,
};

pub(crate) use super::DEFAULT_PATH;

/// The kernel's resource for each limit a unit can name: the one table, an exhaustive match
/// (the numbers differ between architectures, so they come from libc through nix).
pub(crate) fn resource(r: RlimitResource) -> Resource {
    match r {
        RlimitResource::As => Resource::RLIMIT_AS,
        RlimitResource::Core => Resource::RLIMIT_CORE,
        RlimitResource::Cpu => Resource::RLIMIT_CPU,
        RlimitResource::Data => Resource::RLIMIT_DATA,
        RlimitResource::Fsize => Resource::RLIMIT_FSIZE,
        RlimitResource::Locks => Resource::RLIMIT_LOCKS,
        RlimitResource::Memlock => Resource::RLIMIT_MEMLOCK,
        RlimitResource::Msgqueue => Resource::RLIMIT_MSGQUEUE,
        RlimitResource::Nice => Resource::RLIMIT_NICE,
        RlimitResource::Nofile => Resource::RLIMIT_NOFILE,
        RlimitResource::Nproc => Resource::RLIMIT_NPROC,
        RlimitResource::Rss => Resource::RLIMIT_RSS,
        RlimitResource::Rtprio => Resource::RLIMIT_RTPRIO,
        RlimitResource::Rttime => Resource::RLIMIT_RTTIME,
        RlimitResource::Sigpending => Resource::RLIMIT_SIGPENDING,
        RlimitResource::Stack => Resource::RLIMIT_STACK,
    }
}

/// How the root is mounted.
#[derive(Debug)]
pub(crate) enum RootPlan {
    /// overlayfs with these options.
    Overlay {
        /// `lowerdir=...[,upperdir=...,workdir=...]`
        options: String,
        /// With the upper and work dirs in a tmpfs that pid 1 mounts here first (the state
        /// dir of [`RootFs::Overlay::in_memory`]).
        in_memory: Option<PathBuf>,
        /// Mounted read-only.
        read_only: bool,
        /// The directory holding every layer, opened by the caller, when they share one:
        /// `lowerdir` then names the layers relative to it, and the container's processes
        /// start there (see [`lower_dirs`]).
        layer_dir: Option<OwnedFd>,
    },
    /// A read-only bind mount of this directory.
    Bind {
        /// The directory.
        source: PathBuf,
    },
}

/// One checked bind mount.
#[derive(Debug)]
pub(crate) struct BindPlan {
    /// Host path: opened without following symlinks and cloned into a detached mount tree
    /// by the intermediate process ([`super::hostpath::clone_source`]), then moved onto the
    /// destination inside the container's mount namespace.
    pub source: PathBuf,
    /// Path relative to the container root (no leading `/`).
    pub destination: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

/// The prepared container.
pub(crate) struct Plan {
    pub root: RootPlan,
    pub root_mountpoint: PathBuf,
    /// The mount point is a temporary directory to remove after the start.
    pub temporary_mountpoint: bool,
    pub binds: Vec<BindPlan>,
    /// The spec's extra masked paths, relative to the container root.
    pub masked: Vec<PathBuf>,
    pub hostname: String,
    pub network: NetworkMode,
    pub userns: Option<IdMapping>,
    pub rlimits: Vec<(Resource, u64, u64)>,
    pub user: User,
    pub caps: u64,
    pub no_new_privileges: bool,
    pub seccomp: Option<Arc<BpfProgram>>,
    /// Paths to try with execve, in order.
    pub exe_candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: PathBuf,
    pub init: bool,
    /// With `init`: the memfd of `flotilla-reaper`, executed as the container's pid 1.
    pub reaper: Option<RawFd>,
    pub terminal: bool,
    /// stdin, stdout, stderr.
    pub stdio: [OwnedFd; 3],
    /// The leaf cgroup v2 directory the container's processes start in, and whether pid 1
    /// may be cloned into it ([`super::CgroupDir::fresh`]).
    pub cgroup: Option<(RawFd, bool)>,
}

fn invalid(msg: impl Into<String>) -> ContainerError {
    ContainerError::InvalidSpec(msg.into())
}

fn cstring(what: &str, s: &[u8]) -> Result<CString, ContainerError> {
    CString::new(s).map_err(|_| invalid(format!("{what} contains a NUL byte")))
}

/// A path inside the container, relative to its root; `..` is refused.
fn relative_in_container(what: &str, p: &Path) -> Result<PathBuf, ContainerError> {
    if !p.is_absolute() {
        return Err(invalid(format!("{what} {} must be absolute", p.display())));
    }
    let mut rel = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::RootDir | Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "{what} {} must not contain ..",
                    p.display()
                )))
            }
        }
    }
    Ok(rel)
}

fn open_dev_null() -> Result<OwnedFd, ContainerError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| ContainerError::setup("open", Some(Path::new("/dev/null")), e))
}

fn create_dir(path: &Path) -> Result<(), ContainerError> {
    std::fs::create_dir_all(path)
        .map_err(|e| ContainerError::setup("create directory", Some(path), e))
}

impl Plan {
    /// Check the spec and prepare everything.
    pub(crate) fn new(
        spec: &ContainerSpec,
        stdio: Stdio,
        cgroup: Option<(RawFd, bool)>,
    ) -> Result<Plan, ContainerError> {
        if spec.args.is_empty() {
            return Err(invalid("args is empty: nothing to run"));
        }
        let caps = caps::mask(spec.capabilities.as_deref().unwrap_or(caps::DEFAULT));
        let seccomp = if spec.seccomp {
            Some(seccomp::filter_for(caps).map_err(invalid)?)
        } else {
            None
        };
        let rlimits = spec
            .rlimits
            .iter()
            .map(|r| (resource(r.resource), r.soft, r.hard))
            .collect();
        if let Some(m) = &spec.user_namespace {
            if m.size == 0 {
                return Err(invalid("user_namespace size is 0"));
            }
        }
        let binds = spec
            .mounts
            .iter()
            .map(|m| {
                // The source is not looked at here but by the intermediate setup process
                // (`hostpath::clone_source`), which the caller's setup timeout bounds: on a
                // hung filesystem even a lookup hangs, and the caller (a process manager)
                // must not.
                let destination = relative_in_container("mount destination", &m.destination)?;
                if destination.as_os_str().is_empty() {
                    return Err(invalid("a bind mount cannot replace the root"));
                }
                Ok(BindPlan {
                    source: m.source.clone(),
                    destination,
                    read_only: m.read_only,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        relative_in_container("cwd", &spec.cwd)?;
        let (root, root_mountpoint, temporary_mountpoint) = root_plan(spec)?;
        let hostname = spec.hostname.clone().unwrap_or_else(|| spec.id.clone());
        if hostname.len() > 64 {
            return Err(invalid(format!(
                "hostname {hostname:?} is longer than 64 bytes"
            )));
        }
        let argv = spec
            .args
            .iter()
            .map(|a| cstring("an argument", a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = spec
            .env
            .iter()
            .map(|(k, v)| {
                if k.is_empty() || k.contains('=') {
                    return Err(invalid(format!("bad environment variable name {k:?}")));
                }
                cstring("an environment variable", format!("{k}={v}").as_bytes())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exe_candidates = exe_candidates(spec)?;
        let stdio = [
            stdio.stdin.map_or_else(open_dev_null, Ok)?,
            stdio.stdout.map_or_else(open_dev_null, Ok)?,
            stdio.stderr.map_or_else(open_dev_null, Ok)?,
        ];
        let plan = Plan {
            root,
            root_mountpoint,
            temporary_mountpoint,
            binds,
            masked: spec
                .masked_paths
                .iter()
                .map(|p| relative_in_container("masked path", p))
                .collect::<Result<Vec<_>, _>>()?,
            hostname,
            network: spec.network,
            userns: spec.user_namespace,
            rlimits,
            user: spec.user.clone(),
            caps,
            no_new_privileges: spec.no_new_privileges,
            seccomp,
            exe_candidates,
            argv,
            envp,
            cwd: spec.cwd.clone(),
            init: spec.init,
            reaper: if spec.init {
                Some(super::reaper::program_fd()?)
            } else {
                None
            },
            terminal: spec.terminal,
            stdio,
            cgroup,
        };
        plan.chown_for_userns(spec)?;
        Ok(plan)
    }

    /// In a user namespace, the container's root must own the overlay's upper and work dirs.
    fn chown_for_userns(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        let (
            Some(m),
            RootFs::Overlay {
                state_dir,
                read_only: false,
                in_memory: false,
                ..
            },
        ) = (&self.userns, &spec.root)
        else {
            return Ok(());
        };
        let Some(host_root) = m
            .host_id
            .checked_sub(m.container_id)
            .filter(|_| m.container_id == 0)
        else {
            return Ok(());
        };
        for d in ["upper", "work"] {
            let p = state_dir.join(d);
            let meta =
                std::fs::metadata(&p).map_err(|e| ContainerError::setup("stat", Some(&p), e))?;
            if meta.uid() != host_root {
                std::os::unix::fs::chown(&p, Some(host_root), Some(host_root)).map_err(|e| {
                    ContainerError::setup("chown for the user namespace", Some(&p), e)
                })?;
            }
        }
        Ok(())
    }

    /// Remove what only the start needed (the temporary mount point; the container's root is
    /// pivoted away from it by now, or the container is gone).
    pub(crate) fn cleanup_after_start(&self) {
        if self.temporary_mountpoint {
            // Best effort: a leftover empty directory under /run is harmless.
            let _ = std::fs::remove_dir(&self.root_mountpoint);
        }
    }
}

fn check_overlay_path(p: &Path) -> Result<String, ContainerError> {
    let s = p
        .to_str()
        .ok_or_else(|| invalid(format!("layer path {} is not UTF-8", p.display())))?;
    if !p.is_absolute() || s.contains([':', ',', '\\']) {
        return Err(invalid(format!(
            "overlay path {s:?} must be absolute and contain no ':', ',' or '\\'"
        )));
    }
    Ok(s.to_owned())
}

/// overlayfs `lowerdir` for `layers` (lowest first), top layer first. When the layers share a
/// parent directory (a store's `layers/`), it is opened here and the layers are named
/// relative to it: the intermediate process `fchdir`s there while still host root, the cwd
/// follows it into the new mount namespace, and overlayfs resolves the names from there. So
/// the root of a container in a user namespace (a host uid that may not enter the private
/// store, 0700) never walks the store's path. Otherwise: absolute paths.
fn lower_dirs(layers: &[PathBuf]) -> Result<(Option<OwnedFd>, String), ContainerError> {
    let parent = layers.first().and_then(|l| l.parent());
    let shared = parent.filter(|p| layers.iter().all(|l| l.parent() == Some(*p)));
    let Some(dir) = shared else {
        let lower = layers
            .iter()
            .rev()
            .map(|l| check_overlay_path(l))
            .collect::<Result<Vec<_>, _>>()?
            .join(":");
        return Ok((None, lower));
    };
    check_overlay_path(dir)?;
    let names = layers
        .iter()
        .rev()
        .map(|l| {
            let name = l.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.is_empty() || name.starts_with('.') {
                return Err(invalid(format!(
                    "layer path {} must end in a plain directory name",
                    l.display()
                )));
            }
            // The whole path passed check_overlay_path's character rules with the parent.
            check_overlay_path(l).map(|_| name.to_owned())
        })
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let fd = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ContainerError::setup("open the image layers' directory", Some(dir), e))?;
    Ok((Some(fd), names))
}

fn root_plan(spec: &ContainerSpec) -> Result<(RootPlan, PathBuf, bool), ContainerError> {
    match &spec.root {
        RootFs::Overlay {
            layers,
            state_dir,
            read_only,
            in_memory,
        } => {
            if layers.is_empty() {
                return Err(invalid("overlay root without layers"));
            }
            for l in layers {
                if !l.is_dir() {
                    return Err(ContainerError::setup(
                        "image layer",
                        Some(l),
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    ));
                }
            }
            let mountpoint = state_dir.join("rootfs");
            let (layer_dir, lower) = lower_dirs(layers)?;
            // Always an upper dir: a read-only root is mounted writable so that missing mount
            // points can be made (in the container's state, never in the image), then
            // remounted read-only once every mount is in place (as runc does).
            let upper = state_dir.join("upper");
            let work = state_dir.join("work");
            if *in_memory {
                // Pid 1 makes all three in its tmpfs.
                create_dir(state_dir)?;
            } else {
                for d in [&mountpoint, &upper, &work] {
                    create_dir(d)?;
                }
            }
            let options = format!(
                "lowerdir={lower},upperdir={},workdir={}",
                check_overlay_path(&upper)?,
                check_overlay_path(&work)?
            );
            if options.len() >= 4000 {
                return Err(invalid(
                    "too many layers: the overlay options exceed a page",
                ));
            }
            Ok((
                RootPlan::Overlay {
                    options,
                    in_memory: in_memory.then(|| state_dir.clone()),
                    read_only: *read_only,
                    layer_dir,
                },
                mountpoint,
                false,
            ))
        }
        RootFs::HostReadOnly { path } => {
            if !path.is_dir() {
                return Err(ContainerError::setup(
                    "root directory",
                    Some(path),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ));
            }
            let base = if Path::new("/run").is_dir() {
                PathBuf::from("/run/flotilla/rootfs")
            } else {
                std::env::temp_dir().join("flotilla-rootfs")
            };
            let safe_id: String = spec
                .id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let mountpoint = base.join(format!("{safe_id}.{}.{}", std::process::id(), unique()));
            create_dir(&mountpoint)?;
            Ok((
                RootPlan::Bind {
                    source: path.clone(),
                },
                mountpoint,
                true,
            ))
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The paths to try for `args[0]`: itself when it contains a `/`, else each `PATH` entry.
fn exe_candidates(spec: &ContainerSpec) -> Result<Vec<CString>, ContainerError> {
    let arg0 = spec.args.first().map(String::as_str).unwrap_or_default();
    if arg0.is_empty() {
        return Err(invalid("args[0] is empty"));
    }
    if arg0.contains('/') {
        return Ok(vec![cstring("args[0]", arg0.as_bytes())?]);
    }
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| {
            let p = Path::new(d).join(arg0);
            cstring("PATH entry", p.as_os_str().as_bytes())
        })
        .collect()
}
