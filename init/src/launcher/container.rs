//! Every unit as a container: a unit's `[container]` section becomes a [`ContainerSpec`]
//! for the runtime. The toolbox (`unitctl run`) describes its one-off container as a unit
//! too, so both take this one path.
//!
//! A unit without `image` still gets its own namespaces and cgroup, with the host's root
//! mounted read-only as its root and only its declared mounts writable. A unit with an
//! image runs on the image's layers (overlayfs) with a fresh upper dir on every start.

use std::fs;
use std::path::{Path, PathBuf};

use flotilla_container::image::{ImageError, ImageStores, ResolvedImage};
use flotilla_container::runtime::{self, BindMount, ContainerSpec, RootFs, Stdio};
use flotilla_units::{Device, DeviceKind, Network, Unit};
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
}

impl ContainerLauncher {
    /// A launcher over the image stores at `images` (searched in order, see
    /// [`ImageStores::open`]), keeping container state in `state_dir`.
    pub fn new(images: &[PathBuf], state_dir: &Path) -> Self {
        let stores = ImageStores::open(images).map_err(|e| e.to_string());
        if let Err(e) = &stores {
            log::warn!("{e}; units with an image will fail until this is fixed");
        }
        Self {
            host_root: PathBuf::from("/"),
            stores,
            state_dir: state_dir.to_path_buf(),
        }
    }

    /// The image stores, if they opened.
    pub fn stores(&self) -> Result<&ImageStores, LaunchError> {
        self.stores
            .as_ref()
            .map_err(|e| LaunchError::Unsupported(e.clone()))
    }

    /// The directory for `name`'s overlay upper and work dirs.
    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    /// The runtime's description of `unit`. `fresh`: start from an empty upper dir.
    pub fn spec(&self, unit: &Unit, fresh: bool) -> Result<ContainerSpec, LaunchError> {
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
                    fs::remove_dir_all(&dir).map_err(|source| LaunchError::Spawn {
                        program: format!("(clearing {})", dir.display()),
                        source,
                    })?;
                }
                (
                    RootFs::Overlay {
                        layers: img.layers.clone(),
                        state_dir: dir,
                        read_only: c.read_only,
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
        let mut spec = ContainerSpec::new(unit.name.clone(), root, args);
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
        spec.rlimits = c
            .rlimits
            .iter()
            .map(|r| runtime::Rlimit {
                resource: r.name.clone(),
                soft: r.soft,
                hard: r.hard,
            })
            .collect();
        spec.user_namespace = c.user_namespace.map(|m| runtime::IdMapping {
            container_id: m.container_id,
            host_id: m.host_id,
            size: m.size,
        });
        spec.network = match c.network {
            Network::Host => runtime::Network::Host,
            Network::None => runtime::Network::None,
            Network::Private => runtime::Network::Private,
        };
        for m in c.mounts.iter().filter(|m| m.create) {
            // Never through a symlink: a container that can write above this path could
            // otherwise have us create (and then bind) a directory anywhere on the host.
            runtime::create_dir_all_nofollow(&m.host)?;
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
pub(crate) fn filter_devices(spec: &ContainerSpec, scope: &Scope) -> Result<(), LaunchError> {
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
        let entry = scope.entry()?;
        let stdio = Stdio {
            stdin: None,
            stdout: Some(io.stdout),
            stderr: Some(io.stderr),
        };
        let spawned = runtime::spawn(&spec, stdio, entry.procs())?;
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
