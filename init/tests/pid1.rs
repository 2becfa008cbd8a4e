//! flotilla-init as a real PID 1: in its own pid and mount namespaces (`unshare`), it mounts
//! the API filesystems, starts its units, prints the boot marker, and on SIGTERM / SIGUSR2
//! stops the units, ends every process and calls reboot(2), which in a pid namespace ends
//! the namespace (SIGHUP for a reboot, SIGINT for a power-off).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

struct Pid1 {
    child: Child,
    stdout: mpsc::Receiver<String>,
    dir: tempfile::TempDir,
}

fn boot(unit: &str) -> Pid1 {
    boot_with(unit, &[])
}

/// [`boot`] with extra flotilla-init arguments.
fn boot_with(unit: &str, extra: &[&str]) -> Pid1 {
    boot_units(&[("svc", unit)], extra)
}

/// [`boot_with`] with these units (name, toml).
fn boot_units(unit_files: &[(&str, &str)], extra: &[&str]) -> Pid1 {
    let dir = tempfile::tempdir().unwrap();
    let units = dir.path().join("units");
    fs::create_dir_all(&units).unwrap();
    for (name, unit) in unit_files {
        fs::write(
            units.join(format!("{name}.toml")),
            unit.replace("$DIR", dir.path().to_str().unwrap()),
        )
        .unwrap();
    }
    // One cgroup per boot: tests run in parallel, and a manager kills leftovers it finds
    // in its units' cgroups.
    let cgroup = format!(
        "flotilla-pid1-{}-{}",
        std::process::id(),
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let mut child = Command::new("unshare")
        .args([
            "--fork",
            "--pid",
            "--mount",
            "--propagation",
            "private",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_flotilla-init"))
        .arg("--units")
        .arg(&units)
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--api")
        .arg(dir.path().join("api.sock"))
        .args(["--cgroup", &cgroup])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(dir.path().join("console.log")).unwrap())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Pid1 {
        child,
        stdout: rx,
        dir,
    }
}

impl Pid1 {
    fn console(&self) -> String {
        fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    fn marker(&self) -> String {
        let line = self
            .stdout
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no boot marker\n{}", self.console()));
        assert!(line.starts_with("flotilla: boot complete in "), "{line}");
        line
    }

    /// Wait until the unit has set its trap and said so (it is `active` as soon as it is
    /// spawned, which can be before its shell ran a line).
    fn wait_unit_up(&self) {
        let start = Instant::now();
        while !self.dir.path().join("up").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the unit never came up\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The host pid of the namespace's PID 1 (unshare's child).
    fn init_pid(&self) -> Pid {
        let id = self.child.id();
        let children = fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap();
        Pid::from_raw(children.split_whitespace().next().unwrap().parse().unwrap())
    }

    /// Wait for the namespace to end; returns the signal that ended its PID 1.
    fn wait(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.signal().or(st.code().map(|c| c - 128));
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "PID 1 did not finish\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pid1 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const UNIT: &str = r#"
[container]
command = ["/bin/sh", "-c", "trap 'echo stopped > $DIR/stopped; exit 0' TERM; echo up > $DIR/up; while true; do sleep 0.05; done"]
mounts = [{ host = "$DIR", path = "$DIR" }]
"#;

#[test]
fn pid1_boots_and_reboots_on_sigterm() {
    let mut vm = boot(UNIT);
    let marker = vm.marker();
    assert!(marker.ends_with(", 1 units active"), "{marker}");
    let console = vm.console();
    for step in [
        "mount proc on /proc",
        "mount devtmpfs on /dev",
        "mount cgroup2 on /sys/fs/cgroup",
    ] {
        assert!(console.contains(step), "missing step {step:?}\n{console}");
    }
    vm.wait_unit_up();
    kill(vm.init_pid(), Signal::SIGTERM).unwrap();
    let sig = vm.wait();
    let console = vm.console();
    assert!(
        vm.dir.path().join("stopped").exists(),
        "the unit must be stopped in order\n{console}"
    );
    assert!(console.contains("Reboot"), "{console}");
    // reboot(2) with RB_AUTOBOOT in a pid namespace ends its init with SIGHUP.
    assert_eq!(sig, Some(libc_sighup()), "{console}");
}

#[test]
fn pid1_powers_off_on_sigusr2() {
    let mut vm = boot(UNIT);
    vm.marker();
    vm.wait_unit_up();
    kill(vm.init_pid(), Signal::SIGUSR2).unwrap();
    let sig = vm.wait();
    let console = vm.console();
    assert!(console.contains("Poweroff"), "{console}");
    assert!(vm.dir.path().join("stopped").exists(), "{console}");
    // RB_POWER_OFF in a pid namespace ends its init with SIGINT.
    assert_eq!(sig, Some(Signal::SIGINT as i32), "{console}");
}

fn libc_sighup() -> i32 {
    Signal::SIGHUP as i32
}

#[test]
fn pid1_powers_off_at_the_shutdown_deadline_despite_a_unit_ignoring_sigterm() {
    // The unit ignores SIGTERM and may take an hour to stop; the shutdown may take 2 s.
    let unit = r#"
[container]
command = ["/bin/sh", "-c", "trap '' TERM; echo up > $DIR/up; while true; do sleep 0.05; done"]
mounts = [{ host = "$DIR", path = "$DIR" }]
[service]
stop_timeout = "1h"
"#;
    let mut vm = boot_with(unit, &["--shutdown-timeout", "2s"]);
    vm.marker();
    vm.wait_unit_up();
    kill(vm.init_pid(), Signal::SIGUSR2).unwrap();
    let sig = vm.wait();
    let console = vm.console();
    assert!(
        console.contains("shutdown deadline (2s) passed with 1 unit(s) still running (svc)"),
        "{console}"
    );
    assert!(console.contains("Poweroff"), "{console}");
    assert_eq!(sig, Some(Signal::SIGINT as i32), "{console}");
}

#[test]
fn pid1_reboots_when_running_units_form_an_ordering_cycle() {
    let peer = r#"
[unit]
after = ["svc"]
[container]
command = ["/bin/sh", "-c", "exec sleep 1000"]
"#;
    // A deadline beyond the test's patience: only breaking the cycle lets the reboot happen.
    let mut vm = boot_units(
        &[("svc", UNIT), ("peer", peer)],
        &["--shutdown-timeout", "1h"],
    );
    let marker = vm.marker();
    assert!(marker.ends_with(", 2 units active"), "{marker}");
    vm.wait_unit_up();
    // Close the cycle while both run (svc after peer) and reload (SIGHUP).
    let dir = vm.dir.path().to_str().unwrap().to_string();
    let svc = format!("[unit]\nafter = [\"peer\"]\n{}", UNIT.replace("$DIR", &dir));
    fs::write(vm.dir.path().join("units/svc.toml"), svc).unwrap();
    kill(vm.init_pid(), Signal::SIGHUP).unwrap();
    let start = Instant::now();
    while !vm.console().contains("reloaded: 0 added, 1 changed") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no reload\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(vm.init_pid(), Signal::SIGTERM).unwrap();
    let sig = vm.wait();
    let console = vm.console();
    assert!(
        console.contains("stops ignore that svc is ordered after peer"),
        "{console}"
    );
    assert!(vm.dir.path().join("stopped").exists(), "{console}");
    assert!(console.contains("Reboot"), "{console}");
    assert_eq!(sig, Some(libc_sighup()), "{console}");
}
