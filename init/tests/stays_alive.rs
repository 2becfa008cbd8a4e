//! The manager stays alive and in charge: a shutdown ends even when running units form an
//! ordering cycle or ignore SIGTERM (the shutdown deadline), a container whose setup hangs on
//! a mount fails instead of hanging the manager, and a large old upper dir is deleted off
//! the event loop. Each test performs the attack for real (a hung FUSE filesystem is a
//! `/dev/fuse` connection nobody answers).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{alive, Machine, PATIENCE};

/// A FUSE filesystem whose server never answers: every lookup below its mount point blocks
/// (killably) until the connection is aborted, like a dead network filesystem.
struct HungFs {
    dev: Option<fs::File>,
    tag: String,
}

impl HungFs {
    fn mount(at: &Path) -> HungFs {
        fs::create_dir_all(at).unwrap();
        let dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .unwrap();
        let tag = format!("flotilla-hung-{}-{}", std::process::id(), dev.as_raw_fd());
        let opts = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            dev.as_raw_fd()
        ))
        .unwrap();
        rustix::mount::mount(
            tag.as_str(),
            at,
            "fuse",
            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
            opts.as_c_str(),
        )
        .unwrap();
        HungFs {
            dev: Some(dev),
            tag,
        }
    }

    /// Abort the connection (every waiting request fails) and detach the mount, wherever
    /// it is now (the manager may have moved the directory holding it).
    fn release(&mut self) {
        drop(self.dev.take());
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            if right.split_whitespace().nth(1) == Some(self.tag.as_str()) {
                if let Some(point) = left.split_whitespace().nth(4) {
                    let point = point.replace("\\040", " ");
                    let _ =
                        rustix::mount::unmount(point.as_str(), rustix::mount::UnmountFlags::DETACH);
                }
            }
        }
    }
}

impl Drop for HungFs {
    fn drop(&mut self) {
        self.release();
    }
}

/// `unitctl ARGS`, which must answer within [`PATIENCE`] (a hung manager fails the test
/// instead of hanging it).
fn unitctl_within(m: &Machine, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .arg("--api")
        .arg(&m.api)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > PATIENCE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the manager did not answer `unitctl {args:?}` (is its event loop blocked?)\n{}",
                m.manager_log()
            );
        }
        sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// [`unitctl_within`], which must also succeed.
fn unitctl_answers(m: &Machine, args: &[&str]) -> Output {
    let out = unitctl_within(m, args);
    assert!(
        out.status.success(),
        "unitctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.manager_log()
    );
    out
}

fn status(m: &Machine, name: &str) -> serde_json::Value {
    serde_json::from_slice(&unitctl_answers(m, &["--json", "status", name]).stdout).unwrap()
}

fn main_pid(m: &Machine, name: &str) -> i64 {
    status(m, name)["pid"].as_i64().unwrap_or(0)
}

/// SIGTERM the manager; it must exit 0 within [`PATIENCE`].
fn shut_down(m: &mut Machine) {
    let st = m.terminate();
    assert!(st.success(), "{st:?}\n{}", m.manager_log());
}

const SLEEPER: &str = r#"
[container]
command = ["/bin/sh", "-c", "exec sleep 1000"]
"#;

#[test]
fn shutdown_finishes_when_running_units_form_an_ordering_cycle() {
    // A shutdown deadline far beyond the test's patience: only breaking the cycle ends it.
    let mut m = Machine::start_with(
        &[("a", SLEEPER), ("b", SLEEPER)],
        &["--shutdown-timeout", "1h"],
    );
    m.wait_state("a", "active");
    m.wait_state("b", "active");
    let pids = [main_pid(&m, "a"), main_pid(&m, "b")];
    // Close the cycle while both run: a after b from the unit directory and a reload, b after
    // a over the API.
    fs::write(
        m.units.join("a.toml"),
        common::with_dir_mount(&format!("[unit]\nafter = [\"b\"]\n{SLEEPER}"))
            .replace("$DIR", m.dir.path().to_str().unwrap()),
    )
    .unwrap();
    unitctl_answers(&m, &["reload"]);
    let b = m.path("b.toml");
    fs::write(
        &b,
        common::with_dir_mount(&format!("[unit]\nafter = [\"a\"]\n{SLEEPER}"))
            .replace("$DIR", m.dir.path().to_str().unwrap()),
    )
    .unwrap();
    unitctl_answers(&m, &["load", b.to_str().unwrap()]);
    assert_eq!(m.state("a"), "active");
    assert_eq!(m.state("b"), "active");

    shut_down(&mut m);
    for pid in pids {
        assert!(pid > 0 && !alive(pid as i32), "unit process {pid} survived");
    }
    let log = m.manager_log();
    // Walked from a: "a after b" stays (a stops first), "b after a" closes the cycle.
    assert!(
        log.contains("stops ignore that b is ordered after a"),
        "the ignored edge must be logged\n{log}"
    );
}

#[test]
fn shutdown_deadline_kills_a_unit_that_ignores_sigterm() {
    let unit = r#"
[container]
command = ["/bin/sh", "-c", "trap '' TERM; echo up > $DIR/up; while true; do sleep 0.2; done"]
[service]
stop_timeout = "1h"
"#;
    let mut m = Machine::start_with(&[("stubborn", unit)], &["--shutdown-timeout", "2s"]);
    m.wait_file(&m.path("up"));
    let pids = m.unit_pids("stubborn");
    assert!(!pids.is_empty(), "the unit's cgroup lists its processes");
    shut_down(&mut m);
    for pid in &pids {
        assert!(
            !alive(*pid),
            "process {pid} of the unit survived the shutdown"
        );
    }
    let log = m.manager_log();
    assert!(
        log.contains("shutdown deadline (2s) passed with 1 unit(s) still running (stubborn)"),
        "{log}"
    );
}

#[test]
fn a_container_whose_mount_hangs_fails_and_the_manager_goes_on() {
    let units = [
        (
            "hung",
            r#"
[container]
command = ["/bin/true"]
mounts = [{ host = "$DIR/hung/data", path = "/mnt" }]
"#,
        ),
        (
            "hung-create",
            r#"
[container]
command = ["/bin/true"]
mounts = [{ host = "$DIR/hung/new", path = "/mnt", create = true }]
"#,
        ),
        ("fine", SLEEPER),
    ];
    let m = Machine::start_with(&units, &["--no-start", "--setup-timeout", "3s"]);
    let _fs = HungFs::mount(&m.path("hung"));
    // `unitctl start` waits for the start's outcome: it fails, with the reason.
    let out = unitctl_within(&m, &["start", "hung"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("did not finish"),
        "{err}"
    );
    let mut last = serde_json::Value::Null;
    m.wait_until("hung to fail", || {
        last = status(&m, "hung");
        last["state"] == "failed"
    });
    assert_eq!(last["result"], "spawn", "{last}");
    let msg = last["message"].as_str().unwrap();
    assert!(
        msg.contains("setup did not finish within 3s")
            && msg.contains("bind-mounting the mounts")
            && msg.contains("A mount may hang"),
        "{msg}"
    );
    // The setup processes stuck on the hung filesystem were killed and reaped.
    let children = format!("/proc/{0}/task/{0}/children", m.pid());
    m.wait_until("the setup processes to be killed and reaped", || {
        fs::read_to_string(&children).unwrap().trim().is_empty()
    });
    // A `create = true` source on the hung filesystem: even checking that it exists hangs.
    let out = unitctl_within(&m, &["start", "hung-create"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let st = status(&m, "hung-create");
    let msg = st["message"].as_str().unwrap();
    assert!(
        msg.contains("creating the mount source")
            && msg.contains("did not finish within 3s")
            && msg.contains("may hang"),
        "{msg}"
    );
    // The manager is free: it lists, and starts another unit.
    let list = String::from_utf8(unitctl_answers(&m, &["list"]).stdout).unwrap();
    assert!(
        list.contains("hung") && list.contains("hung-create") && list.contains("fine"),
        "{list}"
    );
    unitctl_answers(&m, &["start", "fine"]);
    m.wait_state("fine", "active");
}

/// The busybox image, built once into the store the image tests share.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| common::test_image_store(&["busybox"]))
}

/// Entries of the launcher's trash dir.
fn trash(m: &Machine) -> Vec<PathBuf> {
    fs::read_dir(m.state.join("containers/.trash"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_large_old_upper_dir_is_deleted_off_the_event_loop() {
    let images = store().to_str().unwrap().to_string();
    let unit = r#"
[container]
image = "busybox"
command = ["/bin/sh", "-c", "mkdir -p /data/hung; i=0; while [ $i -lt 20000 ]; do : > /data/f$i; i=$((i+1)); done; echo filled; exec sleep 1000"]
"#;
    let mut m = Machine::start_with(&[("big", unit)], &["--images", &images]);
    m.wait_until("the unit to write 20000 files", || {
        m.logs("big").contains("filled")
    });
    let old_pid = main_pid(&m, "big");
    let upper = m.state.join("containers/big/upper");
    assert!(upper.join("data/f19999").exists());
    // Deleting the old upper dir will also walk into a hung filesystem: it cannot finish
    // until the test releases it, so whatever the manager answers meanwhile, it answers
    // while the deletion is still running.
    let mut hung = HungFs::mount(&upper.join("data/hung"));
    unitctl_answers(&m, &["restart", "big"]);
    let mut last = serde_json::Value::Null;
    m.wait_until("big to run again", || {
        last = status(&m, "big");
        last["state"] == "active" && last["pid"].as_i64() != Some(old_pid)
    });
    let list = String::from_utf8(unitctl_answers(&m, &["list"]).stdout).unwrap();
    assert!(list.contains("big"), "{list}");
    let aside = trash(&m);
    assert_eq!(
        aside.len(),
        1,
        "the old state dir waits in the trash: {aside:?}"
    );
    assert!(
        aside[0].join("upper/data").exists(),
        "the deletion is still running (blocked on the hung filesystem)"
    );

    // Releasing the hung filesystem ends that deletion (it fails there); what a deletion
    // interrupted by a crash leaves is deleted by the next manager at its start.
    hung.release();
    shut_down(&mut m);
    let crashed = m.state.join("containers/.trash/big.1.0/upper/data");
    fs::create_dir_all(&crashed).unwrap();
    for i in 0..100 {
        fs::write(crashed.join(format!("f{i}")), "x").unwrap();
    }
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla-init"))
        .arg("--units")
        .arg(&m.units)
        .arg("--state")
        .arg(&m.state)
        .arg("--api")
        .arg(&m.api)
        .arg("--cgroup")
        .arg(&m.cgroup)
        .args(["--images", &images, "--no-start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            fs::OpenOptions::new()
                .append(true)
                .open(m.path("manager.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    m.child = Some(child);
    m.wait_until("the leftover to be deleted at start", || {
        trash(&m).is_empty()
    });
    shut_down(&mut m);
}
