//! Every unit as a container: a unit's `[container]` section becomes a
//! [`ContainerSpec`] for the runtime.
//!
//! A unit without `image` still gets its own namespaces and cgroup, with the host's root
//! mounted read-only as its root and only its declared mounts writable.

use std::path::PathBuf;

use flotilla_container::runtime::{self, BindMount, ContainerSpec, RootFs, Stdio};
use flotilla_units::{Network, Unit};
use nix::unistd::Pid;

use super::{LaunchError, LaunchIo, Launcher, DEFAULT_PATH};
use crate::scope::Scope;

/// Runs units through the container runtime.
#[derive(Debug, Clone)]
pub struct ContainerLauncher {
    /// The root a unit without an image runs on (read-only): `/` normally.
    host_root: PathBuf,
}

impl Default for ContainerLauncher {
    fn default() -> Self {
        Self {
            host_root: PathBuf::from("/"),
        }
    }
}

impl ContainerLauncher {
    /// A launcher for units without image over `/`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The root filesystem of `unit` and the `/etc` to resolve its user in.
    fn root(&self, unit: &Unit) -> Result<(RootFs, PathBuf), LaunchError> {
        match &unit.container.image {
            None => Ok((
                RootFs::HostReadOnly {
                    path: self.host_root.clone(),
                },
                self.host_root.join("etc"),
            )),
            Some(image) => Err(LaunchError::Unsupported(format!(
                "image {image}: the image store is not wired into the manager yet; \
                 remove `image` to run {} over the host's root, read-only",
                unit.name
            ))),
        }
    }

    /// The runtime's description of `unit`.
    pub fn spec(&self, unit: &Unit) -> Result<ContainerSpec, LaunchError> {
        let c = &unit.container;
        let (root, etc) = self.root(unit)?;
        let mut spec = ContainerSpec::new(unit.name.clone(), root, c.command.clone());
        spec.env = vec![
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ("FLOTILLA_UNIT".to_string(), unit.name.clone()),
        ];
        for (k, v) in &c.env {
            spec.env.retain(|(old, _)| old != k);
            spec.env.push((k.clone(), v.clone()));
        }
        if let Some(dir) = &c.workdir {
            spec.cwd = dir.clone();
        }
        if let Some(user) = &c.user {
            spec.user = runtime::lookup_user(&etc, user)?;
        }
        spec.hostname = c.hostname.clone();
        spec.init = c.init;
        spec.network = match c.network {
            Network::Host => runtime::Network::Host,
            Network::None => runtime::Network::None,
            Network::Private => runtime::Network::Private,
        };
        spec.mounts = c
            .mounts
            .iter()
            .map(|m| BindMount {
                source: m.host.clone(),
                destination: m.path.clone(),
                read_only: m.read_only,
            })
            .collect();
        Ok(spec)
    }
}

impl Launcher for ContainerLauncher {
    fn launch(&mut self, unit: &Unit, scope: &Scope, io: LaunchIo) -> Result<Pid, LaunchError> {
        let spec = self.spec(unit)?;
        let entry = scope.entry()?;
        let stdio = Stdio {
            stdin: None,
            stdout: Some(io.stdout),
            stderr: Some(io.stderr),
        };
        let spawned = runtime::spawn(&spec, stdio, entry.procs())?;
        Ok(spawned.pid)
    }
}
