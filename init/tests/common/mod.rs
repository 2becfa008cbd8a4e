//! A real `flotilla-init` in supervisor mode with its own unit dir, state dir and socket,
//! driven through the real `unitctl` binary.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous bound for anything to happen on a loaded 2-core machine (not a timing assertion).
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Machine {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub units: PathBuf,
    pub state: PathBuf,
    pub api: PathBuf,
    pub cgroup: String,
    /// The cgroup the manager was started in (its units' cgroup `cgroup` is made below it).
    pub cgroup_parent: PathBuf,
}

/// How to start a [`Machine`] beyond its units.
#[derive(Default)]
pub struct Setup<'a> {
    /// More `flotilla-init` arguments.
    pub extra: &'a [&'a str],
    /// `--launcher host`: plain host processes (host pids, no pid namespace, the manager
    /// their subreaper). The units get no `$DIR` mount (the host launcher refuses mounts).
    pub host: bool,
    /// Run the manager as this uid and gid (with `setpriv`), the test's directory its own.
    pub user: Option<u32>,
    /// Start the manager in this cgroup (moved there before `exec`); else the test's own.
    pub cgroup_parent: Option<PathBuf>,
}

impl Machine {
    /// Write `units` (name, toml) and start a manager over them.
    pub fn start(units: &[(&str, &str)]) -> Machine {
        Self::start_with(units, &[])
    }

    pub fn start_with(units: &[(&str, &str)], extra: &[&str]) -> Machine {
        Self::start_setup(
            units,
            Setup {
                extra,
                ..Setup::default()
            },
        )
    }

    /// A manager with `--launcher host` (see [`Setup::host`]).
    pub fn start_host(units: &[(&str, &str)]) -> Machine {
        Self::start_setup(
            units,
            Setup {
                host: true,
                ..Setup::default()
            },
        )
    }

    pub fn start_setup(units: &[(&str, &str)], setup: Setup<'_>) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        let unit_dir = dir.path().join("units");
        fs::create_dir_all(&unit_dir).unwrap();
        for (name, text) in units {
            let text = if setup.host {
                text.to_string()
            } else {
                with_dir_mount(text)
            };
            let text = text.replace("$DIR", dir.path().to_str().unwrap());
            fs::write(unit_dir.join(format!("{name}.toml")), text).unwrap();
        }
        let state = dir.path().join("state");
        let api = dir.path().join("manager.sock");
        let cgroup = format!("flotilla-test-{}", std::process::id())
            + &format!("-{}", dir.path().file_name().unwrap().to_string_lossy());
        let cgroup_parent = setup.cgroup_parent.clone().unwrap_or_else(own_cgroup_dir);
        let init = env!("CARGO_BIN_EXE_flotilla-init");
        let mut cmd = if setup.cgroup_parent.is_none() && setup.user.is_none() {
            Command::new(init)
        } else {
            // A shell moves itself into the cgroup (when one is given), then becomes the
            // manager (through setpriv for another user).
            let mut script = String::new();
            if setup.cgroup_parent.is_some() {
                script.push_str("echo $$ > \"$1\"/cgroup.procs || exit 125; ");
            }
            script.push_str("shift; exec \"$@\"");
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(script).arg("sh").arg(&cgroup_parent);
            if let Some(uid) = setup.user {
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
                cmd.arg("setpriv")
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg("--");
            }
            cmd.arg(init);
            cmd
        };
        let child = cmd
            .arg("--units")
            .arg(&unit_dir)
            .arg("--state")
            .arg(&state)
            .arg("--api")
            .arg(&api)
            .arg("--cgroup")
            .arg(&cgroup)
            .args(
                setup
                    .host
                    .then_some(["--launcher", "host"])
                    .into_iter()
                    .flatten(),
            )
            .args(setup.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("manager.log")).unwrap())
            .spawn()
            .unwrap();
        let m = Machine {
            child: Some(child),
            dir,
            units: unit_dir,
            state,
            api,
            cgroup,
            cgroup_parent,
        };
        m.wait_until("the control socket answers", || {
            m.unitctl(&["list"]).status.success()
        });
        m
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn manager_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("manager.log")).unwrap_or_default()
    }

    pub fn unitctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_unitctl"))
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `unitctl ARGS`, which must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.unitctl(args);
        assert!(
            out.status.success(),
            "unitctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.manager_log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn status(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["--json", "status", name])).unwrap()
    }

    pub fn state(&self, name: &str) -> String {
        self.status(name)["state"].as_str().unwrap().to_string()
    }

    pub fn wait_until(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > PATIENCE {
                panic!(
                    "gave up waiting for {what}\nmanager log:\n{}",
                    self.manager_log()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Wait until unit `name` is in active state `state`; returns its status.
    pub fn wait_state(&self, name: &str, state: &str) -> Value {
        let start = Instant::now();
        loop {
            let last = self.status(name);
            if last["state"] == state {
                return last;
            }
            if start.elapsed() > PATIENCE {
                // The status seen last, not the one before the first look.
                panic!(
                    "gave up waiting for {name} to be {state} (last: {last})\nmanager log:\n{}",
                    self.manager_log()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_file(&self, path: &Path) {
        self.wait_until(&format!("{} to exist", path.display()), || path.exists());
    }

    /// The units' cgroup of this manager: `--cgroup` below the test's own cgroup v2, which
    /// the manager inherited.
    pub fn cgroup_dir(&self) -> PathBuf {
        self.cgroup_parent.join(&self.cgroup)
    }

    /// Host pids in the unit's cgroup.
    pub fn unit_pids(&self, name: &str) -> Vec<i32> {
        let procs = self
            .cgroup_dir()
            .join(format!("{name}.unit"))
            .join("cgroup.procs");
        fs::read_to_string(procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn logs(&self, name: &str) -> String {
        self.ok(&["logs", name, "-n", "1000"])
    }

    /// SIGTERM the manager and wait for it.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > PATIENCE {
                let _ = child.kill();
                panic!("manager did not exit after SIGTERM\n{}", self.manager_log());
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Kill whatever the manager left in its cgroup tree.
        let root = self.cgroup_dir();
        if let Ok(dir) = fs::read_dir(&root) {
            for e in dir.flatten() {
                let _ = fs::write(e.path().join("cgroup.kill"), "1");
                sleep(Duration::from_millis(20));
                let _ = fs::remove_dir(e.path());
            }
        }
        let _ = fs::remove_dir(&root);
    }
}

/// This test process's own cgroup v2 directory, found, never assumed: the cgroup2 mount
/// (`/sys/fs/cgroup` on a pure cgroup v2 host, `/sys/fs/cgroup/unified` on a hybrid one)
/// joined with the `0::` line of `/proc/self/cgroup`.
pub fn own_cgroup_dir() -> PathBuf {
    let mount = flotilla_init::scope::find_cgroup2()
        .expect("no cgroup2 filesystem is mounted: these tests need cgroup v2");
    let own = flotilla_init::scope::own_cgroup(
        &fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup"),
    )
    .expect("this process has no cgroup v2 path in /proc/self/cgroup");
    mount.join(own)
}

/// Every cgroup2 mount point of `/proc/self/mountinfo`, in mount order.
pub fn cgroup2_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// Every test unit gets the test's directory as a writable mount: a unit without an image
/// runs over the host's root, read-only, with only its declared mounts writable.
pub fn with_dir_mount(text: &str) -> String {
    if text.contains("mounts") {
        return text.to_string();
    }
    text.replacen(
        "[container]\n",
        "[container]\nmounts = [{ host = \"$DIR\", path = \"$DIR\" }]\n",
        1,
    )
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Zombie children of `parent`.
pub fn zombies_of(parent: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() == Some(&"Z") && f.get(1) == Some(&parent.to_string().as_str()) {
            out.push(pid);
        }
    }
    out
}

/// Tars `root` into `dir/layer.tar` and writes a one-layer OCI layout of it at `dir/layout`
/// (as image-build does), tagged `reference`; returns the layout.
pub fn oci_layout_of(
    root: &Path,
    dir: &Path,
    config: &flotilla_container::image::RuntimeConfig,
    reference: &str,
) -> PathBuf {
    let tar = dir.join("layer.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of {}", root.display());
    let layout = dir.join("layout");
    flotilla_container::image::write_oci_layout(&layout, &[tar], config, reference).unwrap();
    layout
}

/// The store the image tests share, `/var/tmp/flotilla-test-images`, with the images of
/// `image-build/specs/{spec}.toml` built into it (cached and idempotent: reused across runs).
pub fn test_image_store(specs: &[&str]) -> PathBuf {
    let dir = PathBuf::from("/var/tmp/flotilla-test-images");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for spec in specs {
        let opts = image_build::BuildOptions {
            spec: repo.join(format!("image-build/specs/{spec}.toml")),
            store: dir.clone(),
            oci_out: None,
            no_import: false,
            cache: PathBuf::from(image_build::DEFAULT_CACHE),
            progress: false,
        };
        image_build::build(&opts).unwrap_or_else(|e| panic!("building {spec}: {e}"));
    }
    dir
}
