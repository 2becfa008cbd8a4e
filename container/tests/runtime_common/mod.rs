//! Helpers for the runtime tests: a tiny busybox root, running a container and capturing its
//! output. The tests need root and `/bin/busybox` (Debian package busybox-static).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use flotilla_container::runtime::{spawn, ContainerSpec, RootFs, Stdio};
use nix::sys::wait::{waitpid, WaitStatus};

/// Applets linked into the test root.
const APPLETS: &[&str] = &[
    "sh", "cat", "ls", "id", "hostname", "sleep", "mount", "ps", "echo", "touch", "kill", "grep",
    "wc", "tr", "test", "true", "false", "env", "mkdir", "readlink", "head", "sed", "stat", "pwd",
];

/// Checks that the tests can run (root, busybox present) and fails loudly otherwise: a
/// skipped host test must never pass silently.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: the host integration tests run as root (sudo ./scripts/test)"
    );
    if !Path::new("/bin/busybox").exists() {
        panic!("/bin/busybox is missing: install the Debian package busybox-static");
    }
}

/// A directory with a busybox root filesystem, and a state dir for the overlay.
pub struct TestRoot {
    pub dir: tempfile::TempDir,
    pub layer: PathBuf,
    pub state: PathBuf,
}

impl TestRoot {
    pub fn new() -> TestRoot {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-rt-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let layer = dir.path().join("layer");
        let state = dir.path().join("state");
        for d in ["bin", "etc", "proc", "sys", "dev", "root", "tmp", "mnt"] {
            std::fs::create_dir_all(layer.join(d)).unwrap();
        }
        std::fs::set_permissions(
            layer.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        std::fs::copy("/bin/busybox", layer.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", layer.join("bin").join(a)).unwrap();
        }
        std::fs::write(layer.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(layer.join("etc/group"), "root:x:0:\n").unwrap();
        TestRoot { dir, layer, state }
    }

    /// A spec running `sh -c script` over this root as a one-layer overlay.
    pub fn spec(&self, script: &str) -> ContainerSpec {
        self.spec_ro(script, false)
    }

    pub fn spec_ro(&self, script: &str, read_only: bool) -> ContainerSpec {
        let mut spec = ContainerSpec::new(
            "rt-test",
            RootFs::Overlay {
                layers: vec![self.layer.clone()],
                state_dir: self.state.clone(),
                read_only,
                in_memory: false,
            },
            vec!["sh".into(), "-c".into(), script.into()],
        );
        spec.hostname = Some("box".into());
        spec
    }
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

pub fn read_all(fd: OwnedFd) -> String {
    let mut s = String::new();
    std::fs::File::from(fd).read_to_string(&mut s).unwrap();
    s
}

/// Output of a finished container.
#[derive(Debug)]
pub struct Output {
    pub status: WaitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> i32 {
        match self.status {
            WaitStatus::Exited(_, c) => c,
            WaitStatus::Signaled(_, s, _) => 128 + s as i32,
            ref other => panic!("unexpected status {other:?}"),
        }
    }
}

/// Spawn, capture stdout and stderr, wait.
pub fn run_capture(spec: &ContainerSpec) -> Output {
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let spawned = spawn(
        spec,
        Stdio {
            stdin: None,
            stdout: Some(out_w),
            stderr: Some(err_w),
        },
        None,
    )
    .unwrap_or_else(|e| panic!("spawn failed: {e}"));
    let err_thread = std::thread::spawn(move || read_all(err_r));
    let stdout = read_all(out_r);
    let stderr = err_thread.join().unwrap();
    let status = waitpid(spawned.pid, None).unwrap();
    Output {
        status,
        stdout,
        stderr,
    }
}

/// The value after `key` on the line starting with `key` in `text`.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// This test process's own cgroup v2 directory, detected, never assumed: the last cgroup2
/// mount of `/proc/self/mountinfo` (`/sys/fs/cgroup` on a pure cgroup v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one) joined with the `0::` line of
/// `/proc/self/cgroup`.
pub fn own_cgroup2_dir() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = mountinfo
        .lines()
        .rev()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("no cgroup2 filesystem is mounted: these tests need cgroup v2");
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("this process has no cgroup v2 path in /proc/self/cgroup")
        .trim_start_matches('/')
        .to_string();
    mount.join(own)
}
