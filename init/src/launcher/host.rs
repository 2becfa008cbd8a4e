//! Plain host processes: a new session, a clean environment, the unit's `workdir`.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use flotilla_units::{NetworkMode, Unit};
use nix::unistd::Pid;

use super::{LaunchError, LaunchIo, Launcher, DEFAULT_PATH};
use crate::scope::Scope;

/// Runs units as plain processes on the host: a new session, a clean environment
/// (`PATH`, `FLOTILLA_UNIT`, then the unit's `env`), the unit's `workdir`.
#[derive(Debug, Default)]
pub struct HostLauncher;

impl HostLauncher {
    fn check_supported(unit: &Unit) -> Result<(), LaunchError> {
        let c = &unit.container;
        let unsupported = [
            (c.image.is_some(), "image"),
            (c.user.is_some(), "user"),
            (!c.mounts.is_empty(), "mounts"),
            (c.network != NetworkMode::Host, "network"),
            (c.hostname.is_some(), "hostname"),
            (!c.devices.is_empty(), "devices"),
            (c.capabilities.is_some(), "capabilities"),
            (!c.rlimits.is_empty(), "rlimits"),
            (c.user_namespace.is_some(), "user_namespace"),
            (c.read_only, "read_only"),
        ];
        let keys: Vec<&str> = unsupported
            .iter()
            .filter(|(set, _)| *set)
            .map(|(_, k)| *k)
            .collect();
        if keys.is_empty() {
            Ok(())
        } else {
            Err(LaunchError::Unsupported(format!(
                "the host launcher cannot honour {}; these need the container runtime \
                 (remove them to run {} as a plain host process)",
                keys.join(", "),
                unit.name
            )))
        }
    }
}

impl Launcher for HostLauncher {
    fn launch(&mut self, unit: &Unit, scope: &Scope, io: LaunchIo) -> Result<Pid, LaunchError> {
        Self::check_supported(unit)?;
        let (program, args) = unit
            .container
            .command
            .split_first()
            .ok_or_else(|| LaunchError::Unsupported("the command is empty".into()))?;
        let entry = scope.entry()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("FLOTILLA_UNIT", &unit.name)
            .envs(&unit.container.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(io.stdout))
            .stderr(Stdio::from(io.stderr));
        if let Some(dir) = &unit.container.workdir {
            cmd.current_dir(dir);
        }
        // SAFETY: between fork and exec this only calls signal(2), sigprocmask(2),
        // setsid(2) and write(2) (all async-signal-safe) on an fd opened before the fork;
        // it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                flotilla_container::runtime::reset_signals();
                entry.enter()
            });
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = i32::try_from(child.id()).map_err(|_| LaunchError::Spawn {
            program: program.clone(),
            source: std::io::Error::other("pid out of range"),
        })?;
        // The manager reaps with waitpid(-1); dropping `Child` neither waits nor kills.
        drop(child);
        Ok(Pid::from_raw(pid))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every container-only key is refused, never silently dropped: a unit that asks for
    /// fewer capabilities or a read-only root must not run with more.
    #[test]
    fn refuses_container_only_keys() {
        for (key, line) in [
            ("devices", "devices = [\"/dev/fuse\"]"),
            ("capabilities", "capabilities = []"),
            ("rlimits", "rlimits = { nofile = 64 }"),
            (
                "user_namespace",
                "user_namespace = { container_id = 0, host_id = 100000, size = 65536 }",
            ),
            ("read_only", "read_only = true"),
        ] {
            let text = format!("[container]\ncommand = [\"/bin/true\"]\n{line}\n");
            let unit = flotilla_units::parse_unit("u", None, &text)
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            let err = HostLauncher::check_supported(&unit)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("cannot honour {key};")), "{err}");
        }
        let plain =
            flotilla_units::parse_unit("u", None, "[container]\ncommand = [\"/bin/true\"]\n")
                .unwrap();
        assert!(HostLauncher::check_supported(&plain).is_ok());
    }
}
