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
}

impl Machine {
    /// Write `units` (name, toml) and start a manager over them.
    pub fn start(units: &[(&str, &str)]) -> Machine {
        Self::start_with(units, &[])
    }

    pub fn start_with(units: &[(&str, &str)], extra: &[&str]) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        let unit_dir = dir.path().join("units");
        fs::create_dir_all(&unit_dir).unwrap();
        for (name, text) in units {
            let text = with_dir_mount(text).replace("$DIR", dir.path().to_str().unwrap());
            fs::write(unit_dir.join(format!("{name}.toml")), text).unwrap();
        }
        let state = dir.path().join("state");
        let api = dir.path().join("manager.sock");
        let cgroup = format!("flotilla-test-{}", std::process::id())
            + &format!("-{}", dir.path().file_name().unwrap().to_string_lossy());
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla-init"))
            .arg("--units")
            .arg(&unit_dir)
            .arg("--state")
            .arg(&state)
            .arg("--api")
            .arg(&api)
            .arg("--cgroup")
            .arg(&cgroup)
            .args(extra)
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
        let mut last = Value::Null;
        self.wait_until(&format!("{name} to be {state} (last: {last})"), || {
            last = self.status(name);
            last["state"] == state
        });
        last
    }

    pub fn wait_file(&self, path: &Path) {
        self.wait_until(&format!("{} to exist", path.display()), || path.exists());
    }

    /// Host pids in the unit's cgroup.
    pub fn unit_pids(&self, name: &str) -> Vec<i32> {
        let procs = Path::new("/sys/fs/cgroup/unified")
            .join(&self.cgroup)
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
        let root = Path::new("/sys/fs/cgroup/unified").join(&self.cgroup);
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
