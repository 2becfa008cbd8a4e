//! `cargo bench -p flotilla-init --bench manager [-- N]`: start N (default 1000) units running
//! `sleep 1000` until all are active, then stop them all; side by side with the floor, a plain
//! loop that spawns and reaps the same N processes. Prints a table. Run as root.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

use std::fs;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

fn floor(n: usize) -> (Duration, Duration) {
    let t0 = Instant::now();
    let mut kids: Vec<_> = (0..n)
        .map(|_| {
            Command::new("/bin/sleep")
                .arg("1000")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let start = t0.elapsed();
    let t1 = Instant::now();
    for k in &kids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(k.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for k in &mut kids {
        let _ = k.wait();
    }
    (start, t1.elapsed())
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn active_count(api: &std::path::Path) -> Option<usize> {
    let out = Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .arg("--api")
        .arg(api)
        .args(["--json", "list"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter(|u| u["state"] == "active")
            .count(),
    )
}

/// Start a manager over `n` units with `launcher` (`host` or `container`); returns
/// (start-until-active, stop-all, RSS with n units).
fn ours(n: usize, launcher: &str) -> (Duration, Duration, u64) {
    let dir = tempfile::tempdir().unwrap();
    let units = dir.path().join("units");
    fs::create_dir_all(&units).unwrap();
    for i in 0..n {
        fs::write(
            units.join(format!("sleeper{i:05}.toml")),
            "[container]\ncommand = [\"/bin/sleep\", \"1000\"]\n",
        )
        .unwrap();
    }
    let api = dir.path().join("api.sock");
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-init"))
        .arg("--units")
        .arg(&units)
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--api")
        .arg(&api)
        .args(["--launcher", launcher])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while active_count(&api) != Some(n) {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "units never all active"
        );
        sleep(Duration::from_millis(50));
    }
    let start = t0.elapsed();
    let rss = rss_kib(child.id());
    let t1 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
    (start, t1.elapsed(), rss)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    eprintln!("starting and stopping {n} units (sleep 1000), ours then the floor ...");
    let (_, _, idle) = ours(0, "host");
    let (os, ot, rss) = ours(n, "host");
    let (cs, ct, crss) = ours(n, "container");
    let (fs_, ft) = floor(n);
    println!("\n{n} units running `sleep 1000`");
    println!(
        "{:<34} {:>14} {:>14} {:>10} {:>8}",
        "", "flotilla host", "flotilla ctr", "floor", "host/floor"
    );
    let row = |what: &str, a: Duration, b: Duration, f: Duration| {
        println!(
            "{:<34} {:>12.0}ms {:>12.0}ms {:>8.0}ms {:>10.2}",
            what,
            ms(a),
            ms(b),
            ms(f),
            ms(a) / ms(f)
        );
    };
    row("start all until active", os, cs, fs_);
    row("stop all (SIGTERM, reap)", ot, ct, ft);
    println!(
        "{:<34} {:>12.1}MiB {:>12.1}MiB",
        format!("manager RSS with {n} units"),
        rss as f64 / 1024.0,
        crss as f64 / 1024.0
    );
    println!(
        "{:<34} {:>12.1}MiB",
        "manager RSS with 0 units",
        idle as f64 / 1024.0
    );
    println!(
        "host = --launcher host (plain processes, own cgroup each); ctr = every unit a container"
    );
    println!("targets: start ratio (host/floor) <= 1.5, RSS <= 8 MiB");
}
