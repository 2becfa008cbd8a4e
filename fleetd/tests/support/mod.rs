//! Shared by the fleetd tests that run a real `flotilla-init`.
// Each test binary uses a part of this module.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// The `flotilla-init` binary: `$FLOTILLA_INIT_BIN`, else `target/<profile>/flotilla-init`
/// next to this test's `deps/` (`CARGO_BIN_EXE_*` does not reach across crates, so
/// `cargo build -p flotilla-init` must have run; `cargo test --workspace` does it).
pub fn init_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("FLOTILLA_INIT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("flotilla-init");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p flotilla-init` first (or set FLOTILLA_INIT_BIN)",
        bin.display()
    );
    bin
}

/// Starts a `flotilla-init` supervisor (host launcher) over `units`, its state in
/// `dir/state`, its control socket at `socket`, its units in the cgroup `cgroup`, its log in
/// `dir/init.log`; run under `wrapper` (e.g. `nsenter --net=... --`) when that is not empty.
pub fn spawn_init(
    wrapper: &[String],
    dir: &Path,
    units: &Path,
    socket: &Path,
    cgroup: &str,
) -> std::process::Child {
    let host = ["--launcher".to_string(), "host".to_string()];
    spawn_init_with(wrapper, dir, units, socket, cgroup, &host)
}

/// [`spawn_init`] with `launcher` as init's launcher arguments instead of `--launcher host`
/// (e.g. `--launcher container --images DIR --registries FILE`).
pub fn spawn_init_with(
    wrapper: &[String],
    dir: &Path,
    units: &Path,
    socket: &Path,
    cgroup: &str,
    launcher: &[String],
) -> std::process::Child {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args).arg(init_binary());
            cmd
        }
        None => std::process::Command::new(init_binary()),
    };
    cmd.arg("--units")
        .arg(units)
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--api")
        .arg(socket)
        .args(launcher)
        .args(["--cgroup", cgroup])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("init.log")).unwrap())
        .spawn()
        .unwrap()
}

/// Stops a machine of the tests: kills and reaps its fleetd and init (when still held),
/// then everything its init left in the cgroup `cgroup`.
pub fn stop_machine(
    fleetd: Option<std::process::Child>,
    init: Option<std::process::Child>,
    cgroup: &str,
) {
    for mut child in [fleetd, init].into_iter().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
    kill_cgroup(cgroup);
}

/// Kills everything in the cgroup `name` (what an init started) and removes the cgroups.
/// The init made it below its own cgroup, which is this test's (it is our child): found
/// through the cgroup2 mount on any layout (`/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one, the test inside a session scope or not).
pub fn kill_cgroup(name: &str) {
    let Some(mount) = flotilla_init_api::cgroup::find_cgroup2() else {
        return;
    };
    let own = flotilla_init_api::cgroup::own_cgroup(
        &std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
    )
    .unwrap_or_default();
    let root = mount.join(own).join(name);
    if let Ok(dir) = std::fs::read_dir(&root) {
        for e in dir.flatten() {
            let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
            std::thread::sleep(std::time::Duration::from_millis(20));
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::write(root.join("cgroup.kill"), "1");
    let _ = std::fs::remove_dir(&root);
}

/// Polls `cond` every `every` until it holds; panics with `what` and `logs()` after `bound`.
pub fn wait_until(
    what: &str,
    bound: std::time::Duration,
    every: std::time::Duration,
    mut cond: impl FnMut() -> bool,
    logs: impl Fn() -> String,
) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < bound,
            "gave up waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(every);
    }
}
