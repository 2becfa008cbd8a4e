//! The static build of the host image's binaries, defined once. The cargo invocation that
//! builds `flotilla-init`, `unitctl`, `fleetd` and `fleetctl` statically (release,
//! `+crt-static`, target [`STATIC_TARGET`], target directory `target/static`) is
//! [`StaticBuild::command`]; everything else uses it:
//! - `image-build static-binaries` runs it (`scripts/lib.sh`'s `build_static` calls that);
//! - `qemu_tests::static_binaries()` runs it through [`StaticBuild::run`];
//! - `image-build os` names it ([`StaticBuild::shell_line`]) when a binary is missing or
//!   dynamically linked.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::hostroot::is_static_elf;
use crate::BuildError;

/// The target triple of the static build (its own, so that `+crt-static` does not reach
/// build scripts and proc macros).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// `RUSTFLAGS` of the static build: a static C library, no debug info.
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static -C strip=debuginfo";

/// The static build's target directory, relative to the workspace root (its own: other
/// `RUSTFLAGS` would rebuild the workspace's `target/` each time).
pub const STATIC_TARGET_DIR: &str = "target/static";

/// Environment variable: a target directory used instead of [`STATIC_TARGET_DIR`].
pub const STATIC_TARGET_DIR_ENV: &str = "FLOTILLA_STATIC_TARGET_DIR";

/// The binaries of the static build, with their packages: the host image's `/usr/bin`.
pub const STATIC_PACKAGES: [(&str, &str); 4] = [
    ("flotilla-init", "flotilla-init"),
    ("flotilla-init", "unitctl"),
    ("flotilla-fleetd", "fleetd"),
    ("flotilla-fleetd", "fleetctl"),
];

/// The names of the binaries [`StaticBuild`] builds.
pub const STATIC_BINARIES: [&str; 4] = [
    STATIC_PACKAGES[0].1,
    STATIC_PACKAGES[1].1,
    STATIC_PACKAGES[2].1,
    STATIC_PACKAGES[3].1,
];

/// The workspace this crate was built in (its parent directory).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Whether `name` is a variable cargo sets for the crate it runs (`cargo run`, `cargo
/// test`): `CARGO_PKG_*`, `CARGO_MANIFEST_*`, `CARGO_CRATE_NAME`, `OUT_DIR`, ... Build
/// scripts (ring's) rerun when such a variable changes, so a static build started from
/// image-build would rebuild them after one started from qemu-tests and back: the build
/// runs without them, as from a shell.
pub fn is_crate_env(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || name.starts_with("CARGO_BIN_")
        || [
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ]
        .contains(&name)
}

/// The static build of one workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBuild {
    /// The workspace root (cargo runs there).
    pub workspace: PathBuf,
    /// The target directory.
    pub target_dir: PathBuf,
}

impl StaticBuild {
    /// The build of `workspace` into `$FLOTILLA_STATIC_TARGET_DIR`, else
    /// `WORKSPACE/target/static`.
    pub fn new(workspace: &Path) -> StaticBuild {
        let target_dir = std::env::var_os(STATIC_TARGET_DIR_ENV)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join(STATIC_TARGET_DIR));
        StaticBuild {
            workspace: workspace.to_path_buf(),
            target_dir,
        }
    }

    /// cargo's arguments: `build --release --locked -p PACKAGE --bin BINARY ... --target`.
    pub fn cargo_args() -> Vec<String> {
        let mut args: Vec<String> = ["build", "--release", "--locked"].map(String::from).into();
        let mut package = "";
        for (p, bin) in STATIC_PACKAGES {
            if p != package {
                args.extend(["-p".to_string(), p.to_string()]);
                package = p;
            }
            args.extend(["--bin".to_string(), bin.to_string()]);
        }
        args.extend(["--target".to_string(), STATIC_TARGET.to_string()]);
        args
    }

    /// The environment of the build: `RUSTFLAGS` and `CARGO_TARGET_DIR`.
    pub fn env(&self) -> [(&'static str, &OsStr); 2] {
        [
            ("RUSTFLAGS", OsStr::new(STATIC_RUSTFLAGS)),
            ("CARGO_TARGET_DIR", self.target_dir.as_os_str()),
        ]
    }

    /// The build as a command: `cargo` (the path of the cargo to run) with
    /// [`StaticBuild::cargo_args`] and [`StaticBuild::env`], in the workspace root, without
    /// the variables cargo sets for the crate that runs it ([`is_crate_env`]).
    pub fn command(&self, cargo: &OsStr) -> Command {
        let mut cmd = Command::new(cargo);
        cmd.args(Self::cargo_args())
            .envs(self.env())
            .current_dir(&self.workspace);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(is_crate_env) {
                cmd.env_remove(name);
            }
        }
        cmd
    }

    /// The build as a shell line to run from the workspace root (the target directory
    /// relative to it when it is inside), for messages that say how to build the binaries.
    pub fn shell_line(&self) -> String {
        let dir = self
            .target_dir
            .strip_prefix(&self.workspace)
            .unwrap_or(&self.target_dir);
        format!(
            "RUSTFLAGS=\"{STATIC_RUSTFLAGS}\" CARGO_TARGET_DIR={} cargo {}",
            dir.display(),
            Self::cargo_args().join(" ")
        )
    }

    /// Where the binaries land: `TARGET_DIR/x86_64-unknown-linux-gnu/release`
    /// (`image-build os --bin-dir`).
    pub fn bin_dir(&self) -> PathBuf {
        self.target_dir.join(STATIC_TARGET).join("release")
    }

    /// Runs the build with `$CARGO` (else `cargo`; its output goes to this process's
    /// stdout and stderr), checks that no binary has an ELF interpreter, and returns
    /// [`StaticBuild::bin_dir`].
    pub fn run(&self) -> Result<PathBuf, BuildError> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = self
            .command(&cargo)
            .status()
            .map_err(|e| BuildError::Command {
                command: self.shell_line(),
                status: format!("cannot start {}: {e}", Path::new(&cargo).display()),
                tail: vec![],
                log: None,
            })?;
        if !status.success() {
            return Err(BuildError::Command {
                command: format!(
                    "static build of {} ({})",
                    STATIC_BINARIES.join(", "),
                    self.shell_line()
                ),
                status: status.to_string(),
                tail: vec![],
                log: None,
            });
        }
        let dir = self.bin_dir();
        for name in STATIC_BINARIES {
            let bin = dir.join(name);
            if !is_static_elf(&bin)? {
                return Err(BuildError::Usage(format!(
                    "{} is dynamically linked (has an ELF interpreter): the static build's \
                     RUSTFLAGS ({STATIC_RUSTFLAGS}) did not apply",
                    bin.display()
                )));
            }
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_recipe_for_every_caller() {
        let ws = Path::new("/ws");
        let b = StaticBuild {
            workspace: ws.to_path_buf(),
            target_dir: ws.join(STATIC_TARGET_DIR),
        };
        assert_eq!(
            b.shell_line(),
            "RUSTFLAGS=\"-C target-feature=+crt-static -C strip=debuginfo\" \
             CARGO_TARGET_DIR=target/static cargo build --release --locked \
             -p flotilla-init --bin flotilla-init --bin unitctl \
             -p flotilla-fleetd --bin fleetd --bin fleetctl --target x86_64-unknown-linux-gnu"
        );
        let cmd = b.command(OsStr::new("cargo"));
        let args: Vec<&OsStr> = cmd.get_args().collect();
        assert_eq!(
            args,
            StaticBuild::cargo_args()
                .iter()
                .map(OsStr::new)
                .collect::<Vec<_>>()
        );
        assert_eq!(cmd.get_current_dir(), Some(ws));
        let env: Vec<_> = cmd.get_envs().collect();
        assert!(env.contains(&(OsStr::new("RUSTFLAGS"), Some(OsStr::new(STATIC_RUSTFLAGS)))));
        assert!(env.contains(&(
            OsStr::new("CARGO_TARGET_DIR"),
            Some(OsStr::new("/ws/target/static"))
        )));
        assert_eq!(
            b.bin_dir(),
            Path::new("/ws/target/static/x86_64-unknown-linux-gnu/release")
        );
        // This test runs under cargo, which set CARGO_PKG_NAME and CARGO_MANIFEST_DIR:
        // the build does not inherit them.
        for name in ["CARGO_PKG_NAME", "CARGO_MANIFEST_DIR"] {
            assert!(std::env::var_os(name).is_some(), "{name} not set by cargo");
            assert!(env.contains(&(OsStr::new(name), None)), "{name} inherited");
        }
        assert!(!is_crate_env("CARGO_HOME") && !is_crate_env("CARGO_TARGET_DIR"));
        // A target directory elsewhere is named in full.
        let elsewhere = StaticBuild {
            target_dir: PathBuf::from("/elsewhere"),
            ..b
        };
        assert!(elsewhere
            .shell_line()
            .contains("CARGO_TARGET_DIR=/elsewhere cargo build"));
    }
}
