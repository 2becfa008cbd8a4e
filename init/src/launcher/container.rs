//! Every unit as a container: a unit's `[container]` section becomes a [`ContainerSpec`]
//! for the runtime. The toolbox (`unitctl run`) describes its one-off container as a unit
//! too, so both take this one path.
//!
//! A unit without `image` still gets its own namespaces and cgroup, with the host's root
//! mounted read-only as its root and only its declared mounts writable. A unit with an
//! image runs on the image's layers (overlayfs) with a fresh upper dir on every start.
//!
//! The previous run's state dir (its upper dir may hold any number of files) is renamed
//! into `STATE/containers/.trash/` (unit names never start with a dot) and deleted by a
//! background thread, so a start never waits on a large or hung deletion; leftovers of a
//! deletion a crash or reboot interrupted are deleted when the launcher is created.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use flotilla_container::image::{ImageError, ImageStores, Lease, ResolvedImage};
use flotilla_container::runtime::{self, BindMount, ContainerSpec, RootFs, Stdio};
use flotilla_units::{Device, DeviceKind, Unit};
use nix::unistd::Pid;

use super::{LaunchError, LaunchIo, Launcher, DEFAULT_PATH};
use crate::scope::Scope;

/// Runs units through the container runtime.
#[derive(Debug)]
pub struct ContainerLauncher {
    /// The root a unit without an image runs on (read-only): `/` normally.
    host_root: PathBuf,
    /// The image stores, or why they could not be opened (reported by units that need them).
    stores: Result<ImageStores, String>,
    /// Per-container state (overlay upper and work dirs): `STATE/containers/NAME`.
    state_dir: PathBuf,
    /// How long a container's setup may take ([`ContainerSpec::setup_timeout`]).
    setup_timeout: Duration,
    /// The deletion thread's queue, once started.
    trash: Option<Sender<PathBuf>>,
    /// Host paths hidden from image-less units without the control API grant.
    secrets: Vec<PathBuf>,
}

/// Where old container state dirs wait to be deleted, inside the containers dir (a rename
/// there never crosses a filesystem).
const TRASH: &str = ".trash";

/// Makes the names of trashed dirs unique within this process.
static TRASHED: AtomicU64 = AtomicU64::new(0);

/// Start the thread that deletes trashed dirs one after the other; `None` if no thread can
/// be started (the dirs then stay until the next launcher's start-up cleanup).
fn start_trash_thread() -> Option<Sender<PathBuf>> {
    let (tx, rx) = mpsc::channel::<PathBuf>();
    let spawned = std::thread::Builder::new()
        .name("container-trash".into())
        .spawn(move || {
            for dir in rx {
                match fs::remove_dir_all(&dir) {
                    Ok(()) => log::debug!("deleted {}", dir.display()),
                    Err(e) => log::warn!(
                        "cannot delete the old container state {}: {e}; it is retried when \
                         the manager next starts",
                        dir.display()
                    ),
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            log::warn!("cannot start the thread deleting old container state: {e}");
            None
        }
    }
}

impl ContainerLauncher {
    /// A launcher over the image stores at `images` (searched in order, see
    /// [`ImageStores::open`]), keeping container state in `state_dir`.
    pub fn new(images: &[PathBuf], state_dir: &Path) -> Self {
        let stores = ImageStores::open(images).map_err(|e| e.to_string());
        if let Err(e) = &stores {
            log::warn!("{e}; units with an image will fail until this is fixed");
        }
        let mut launcher = Self {
            host_root: PathBuf::from("/"),
            stores,
            state_dir: state_dir.to_path_buf(),
            setup_timeout: runtime::DEFAULT_SETUP_TIMEOUT,
            trash: None,
            secrets: Vec::new(),
        };
        // Dirs whose deletion a crash or reboot interrupted.
        if let Ok(entries) = fs::read_dir(launcher.trash_dir()) {
            for entry in entries.flatten() {
                launcher.delete_later(entry.path());
            }
        }
        launcher
    }

    /// Give every container's setup at most `timeout` (see [`ContainerSpec::setup_timeout`]).
    pub fn with_setup_timeout(mut self, timeout: Duration) -> Self {
        self.setup_timeout = timeout;
        self
    }

    /// Hide `paths` (host files and directories: secrets, other units' state) from units
    /// that run over the host's root without the control API grant: they would be readable
    /// there, read-only but whole, even when mode 0600, to a unit running as root. A unit
    /// that needs one binds it explicitly (binds come after masks).
    pub fn with_secrets(mut self, paths: Vec<PathBuf>) -> Self {
        self.secrets = paths;
        self
    }

    /// Where old state dirs wait for deletion: `STATE/containers/.trash`.
    pub fn trash_dir(&self) -> PathBuf {
        self.state_dir.join(TRASH)
    }

    fn delete_later(&mut self, dir: PathBuf) {
        if self.trash.is_none() {
            self.trash = start_trash_thread();
        }
        if let Some(tx) = &self.trash {
            if tx.send(dir).is_err() {
                self.trash = None; // the thread ended; the next call starts another
            }
        }
    }

    /// Move `dir` into the trash at once (a rename) and delete it in the background.
    fn discard(&mut self, name: &str, dir: &Path) -> Result<(), LaunchError> {
        let trash = self.trash_dir();
        let err = |what: String| {
            move |source| LaunchError::Spawn {
                program: what,
                source,
            }
        };
        fs::create_dir_all(&trash).map_err(err(format!("(creating {})", trash.display())))?;
        let n = TRASHED.fetch_add(1, Ordering::Relaxed);
        let aside = trash.join(format!("{name}.{}.{n}", std::process::id()));
        fs::rename(dir, &aside).map_err(err(format!(
            "(moving the old state {} aside to {})",
            dir.display(),
            aside.display()
        )))?;
        self.delete_later(aside);
        Ok(())
    }

    /// The image stores, if they opened.
    pub fn stores(&self) -> Result<&ImageStores, LaunchError> {
        self.stores
            .as_ref()
            .map_err(|e| LaunchError::Unsupported(e.clone()))
    }

    /// A lease in the writable store on the layers `spec` mounts (none without an image),
    /// held by this process until handed over: garbage collection spares them.
    pub fn lease(&self, spec: &ContainerSpec) -> Result<Option<Lease>, LaunchError> {
        let RootFs::Overlay { layers, .. } = &spec.root else {
            return Ok(None);
        };
        let store = self.stores()?.writable();
        store.lease(&spec.id, layers).map(Some).map_err(image_err)
    }

    /// The directory for `name`'s overlay upper and work dirs.
    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    /// The runtime's description of `unit`. `fresh`: start from an empty upper dir (the old
    /// one is moved aside and deleted in the background).
    pub fn spec(&mut self, unit: &Unit, fresh: bool) -> Result<ContainerSpec, LaunchError> {
        let c = &unit.container;
        let image = match &c.image {
            Some(reference) => Some(self.stores()?.resolve(reference).map_err(image_err)?),
            None => None,
        };
        let (root, etc) = match &image {
            None => (
                RootFs::HostReadOnly {
                    path: self.host_root.clone(),
                },
                self.host_root.join("etc"),
            ),
            Some(img) => {
                let dir = self.container_dir(&unit.name);
                if fresh && dir.exists() {
                    self.discard(&unit.name, &dir)?;
                }
                (
                    RootFs::Overlay {
                        layers: img.layers.clone(),
                        state_dir: dir,
                        read_only: c.read_only,
                        in_memory: false,
                    },
                    image_etc(img),
                )
            }
        };
        let config = image.as_ref().map(|i| &i.config);
        let args = if c.command.is_empty() {
            config
                .map(|cfg| cfg.entrypoint.iter().chain(&cfg.cmd).cloned().collect())
                .unwrap_or_default()
        } else {
            c.command.clone()
        };
        if args.is_empty() {
            return Err(LaunchError::Unsupported(format!(
                "{}: no command, and the image has no entrypoint or cmd",
                unit.name
            )));
        }
        let host_root = matches!(root, RootFs::HostReadOnly { .. });
        let mut spec = ContainerSpec::new(unit.name.clone(), root, args);
        if host_root && !c.control_api {
            spec.masked_paths = self.secrets.clone();
        }
        spec.setup_timeout = self.setup_timeout;
        spec.env = merge_env(
            config.map(|cfg| cfg.env.as_slice()).unwrap_or_default(),
            &unit.name,
            c.env.iter(),
        );
        if let Some(dir) = c
            .workdir
            .clone()
            .or_else(|| config.and_then(|cfg| cfg.working_dir.clone().map(PathBuf::from)))
        {
            spec.cwd = dir;
        }
        if let Some(user) = c.user.as_ref().or(config.and_then(|cfg| cfg.user.as_ref())) {
            spec.user = runtime::lookup_user(&etc, user)?;
        }
        spec.hostname = c.hostname.clone();
        spec.init = c.init;
        spec.capabilities = c.capabilities.clone();
        spec.rlimits = c.rlimits.clone();
        spec.user_namespace = c.user_namespace.map(|m| runtime::IdMapping {
            container_id: m.container_id,
            host_id: m.host_id,
            size: m.size,
        });
        spec.network = c.network;
        for m in c.mounts.iter().filter(|m| m.create) {
            // Never through a symlink: a container that can write above this path could
            // otherwise have us create (and then bind) a directory anywhere on the host.
            create_source_within(&m.host, self.setup_timeout)?;
        }
        spec.mounts = c
            .mounts
            .iter()
            .map(|m| BindMount {
                source: m.host.clone(),
                destination: m.path.clone(),
                read_only: m.read_only,
            })
            .collect();
        for device in &c.devices {
            match device {
                Device::Path(path) => {
                    // A symlink (/dev/disk/by-id/...) names its node; the container sees the
                    // node at the path the unit gave.
                    let node = fs::canonicalize(path).unwrap_or_else(|_| path.clone());
                    spec.devices.push(runtime::DeviceRule::for_node(&node)?);
                    spec.mounts.push(BindMount {
                        source: node,
                        destination: path.clone(),
                        read_only: false,
                    });
                }
                Device::Rule(rule) => spec.devices.push(device_rule(rule)),
            }
        }
        Ok(spec)
    }
}

/// The runtime's form of a unit's device rule.
fn device_rule(rule: &flotilla_units::DeviceRule) -> runtime::DeviceRule {
    let kind = match rule.kind {
        DeviceKind::Char => runtime::DeviceKind::Char,
        DeviceKind::Block => runtime::DeviceKind::Block,
    };
    let access = [
        (rule.read, runtime::ACCESS_READ),
        (rule.write, runtime::ACCESS_WRITE),
        (rule.mknod, runtime::ACCESS_MKNOD),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .fold(0, |acc, (_, bit)| acc | bit);
    runtime::DeviceRule::new(kind, rule.major, rule.minor, access)
}

/// Enforce the device allow-list of `spec` on `scope` before anything runs in it. A scope
/// without a cgroup cannot be filtered: the container must not start then.
fn filter_devices(spec: &ContainerSpec, scope: &Scope) -> Result<(), LaunchError> {
    let Some(cgroup) = scope.cgroup_path() else {
        return Err(LaunchError::Unsupported(format!(
            "{}: cannot enforce the device allow-list: the container has no cgroup v2 of its \
             own ({scope}); run the manager with a writable cgroup2 hierarchy (mounted, and \
             `--cgroup` below a delegated directory), or use `--launcher host` for plain \
             host processes",
            spec.id
        )));
    };
    runtime::attach_device_filter(cgroup, &spec.devices)?;
    Ok(())
}

/// Create a `create = true` mount source if it is missing, on a helper thread waited for at
/// most `limit`: on a hung filesystem even the existence check hangs, and the caller is the
/// manager's event loop. A thread that never returns stays blocked in the kernel (it holds
/// nothing the manager needs); the unit fails with a clear message.
fn create_source_within(dir: &Path, limit: Duration) -> Result<(), LaunchError> {
    let (tx, rx) = mpsc::channel();
    let path = dir.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("mount-source".into())
        .spawn(move || {
            let _ = tx.send(runtime::create_dir_all_nofollow(&path));
        });
    let program = format!("(creating the mount source {})", dir.display());
    if let Err(source) = spawned {
        return Err(LaunchError::Spawn { program, source });
    }
    match rx.recv_timeout(limit) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(LaunchError::Unsupported(format!(
            "creating the mount source {} did not finish within {limit:?}; its filesystem \
             may hang (a network or FUSE mount): check it, or the unit's mounts",
            dir.display()
        ))),
    }
}

fn image_err(e: ImageError) -> LaunchError {
    LaunchError::Unsupported(e.to_string())
}

/// The `/etc` of the topmost layer that has a passwd file (where a user name resolves).
fn image_etc(img: &ResolvedImage) -> PathBuf {
    img.layers
        .iter()
        .rev()
        .map(|l| l.join("etc"))
        .find(|etc| etc.join("passwd").exists())
        .unwrap_or_else(|| PathBuf::from("/nonexistent/etc"))
}

/// The environment: the image's, then `PATH` if it has none, `FLOTILLA_UNIT`, then the
/// unit's own (a later name replaces an earlier one).
fn merge_env<'a>(
    image: &[String],
    unit: &str,
    own: impl Iterator<Item = (&'a String, &'a String)>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        env.retain(|(old, _)| old != k);
        env.push((k.to_string(), v.to_string()));
    };
    for kv in image {
        if let Some((k, v)) = kv.split_once('=') {
            set(k, v);
        }
    }
    if !image.iter().any(|kv| kv.starts_with("PATH=")) {
        set("PATH", DEFAULT_PATH);
    }
    set("FLOTILLA_UNIT", unit);
    for (k, v) in own {
        set(k, v);
    }
    env
}

impl Launcher for ContainerLauncher {
    fn launch(&mut self, unit: &Unit, scope: &Scope, io: LaunchIo) -> Result<Pid, LaunchError> {
        let spec = self.spec(unit, true)?;
        filter_devices(&spec, scope)?;
        let lease = self.lease(&spec)?;
        let entry = scope.entry()?;
        let stdio = Stdio {
            stdin: None,
            stdout: Some(io.stdout),
            stderr: Some(io.stderr),
        };
        let spawned = runtime::spawn(&spec, stdio, entry.cgroup())?;
        if let Some(lease) = lease {
            // The container's pid 1 holds its layers from now on; its exit ends the lease.
            if let Err(e) = lease.hand_over(spawned.pid.as_raw()) {
                log::warn!(
                    "{}: {e}; garbage collection may remove its image's layers while it runs",
                    unit.name
                );
            }
        }
        Ok(spawned.pid)
    }

    fn terminate_main_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_layers_image_then_unit() {
        let image = vec!["PATH=/img/bin".to_string(), "LANG=C".to_string()];
        let own = [("LANG".to_string(), "en".to_string())];
        let env = merge_env(&image, "web", own.iter().map(|(k, v)| (k, v)));
        assert_eq!(
            env,
            [
                ("PATH".to_string(), "/img/bin".to_string()),
                ("FLOTILLA_UNIT".to_string(), "web".to_string()),
                ("LANG".to_string(), "en".to_string()),
            ]
        );
        let env = merge_env(&[], "x", std::iter::empty());
        assert_eq!(env.first().map(|(k, _)| k.as_str()), Some("PATH"));
    }
}
