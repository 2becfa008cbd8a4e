//! `cargo bench -p flotilla-init --bench containers [-- N]`: N (default 50) sequential
//! containers running `true` from the busybox image, side by side in one run, in blocks of
//! ten of each in turn (medians and means): flotilla
//! (`unitctl run`, and the runtime called in-process), crun, runc, and the floor (`unshare`
//! and chroot). Then the toolbox's overhead for `gcc hello.c` against the host's gcc.
//!
//! Run as root; `scripts/bench` installs runc, crun and the images first.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_container::image::ImageStore;
use flotilla_container::runtime::{self, ContainerSpec, RootFs};

const STORE: &str = "/var/tmp/flotilla-test-images";

/// Containers a contender runs before the next one's turn (see `main`).
const BLOCK: usize = 10;

/// One container by the runtime called in-process (no CLI start-up); its time.
fn run_in_process(layers: &[PathBuf], scratch: &Path, i: usize) -> Duration {
    let t = Instant::now();
    let root = RootFs::Overlay {
        layers: layers.to_vec(),
        state_dir: scratch.join(format!("lib{i}")),
        read_only: false,
        in_memory: false,
    };
    let spec = ContainerSpec::new(format!("b{i}"), root, vec!["/bin/true".into()]);
    let code = runtime::run(
        &spec,
        runtime::Stdio {
            stdin: None,
            stdout: None,
            stderr: None,
        },
        None,
    )
    .unwrap();
    assert_eq!(code, 0);
    t.elapsed()
}

fn build(spec: &str) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let opts = image_build::BuildOptions {
        spec: repo.join(format!("image-build/specs/{spec}.toml")),
        store: PathBuf::from(STORE),
        oci_out: None,
        no_import: false,
        cache: PathBuf::from(image_build::DEFAULT_CACHE),
        progress: false,
    };
    image_build::build(&opts).unwrap();
}

/// Run `script` with `sh -c` and return the wall time.
fn time_sh(script: &str) -> Option<Duration> {
    let t = Instant::now();
    let st = Command::new("sh")
        .args(["-c", script])
        .stdout(Stdio::null())
        .status()
        .ok()?;
    st.success().then(|| t.elapsed())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// An OCI bundle over a copy of the busybox layer, for runc and crun.
fn bundle(layer: &Path, dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(dir).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(layer)
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["/bin/true"]);
    fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir.to_path_buf()
}

/// A command run over and over by a shell of its own (`while read n; do CMD; done`), so
/// that every contender pays the same fork and exec per container and the runs can be
/// interleaved one by one.
struct Contender {
    name: String,
    shell: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
    times: Vec<Duration>,
    failed: bool,
}

impl Contender {
    /// `setup` runs once in the shell (crun's gets a mount namespace of its own); `cmd` may
    /// use `$n`, the run's number.
    fn new(name: &str, setup: &str, cmd: &str) -> Contender {
        let script = format!(
            "{setup} while read n; do if {cmd} >/dev/null 2>&1; then echo ok; else echo fail; fi; done"
        );
        let mut shell = if setup.contains("umount") {
            Command::new("unshare")
                .args(["-m", "sh", "-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
        } else {
            Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
        }
        .unwrap();
        Contender {
            name: name.to_string(),
            input: shell.stdin.take().unwrap(),
            output: std::io::BufReader::new(shell.stdout.take().unwrap()),
            shell,
            times: Vec::new(),
            failed: false,
        }
    }

    /// Start run `i` and wait for it; its time is kept unless it failed.
    fn run(&mut self, i: usize) {
        use std::io::{BufRead, Write};
        if self.failed {
            return;
        }
        let t = Instant::now();
        let mut line = String::new();
        let ok = writeln!(self.input, "{i}").is_ok()
            && self.output.read_line(&mut line).is_ok()
            && line.trim() == "ok";
        if ok {
            self.times.push(t.elapsed());
        } else {
            self.failed = true;
        }
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Option<Duration>) -> String {
    per(d, 1)
}

fn per(d: Option<Duration>, n: usize) -> String {
    match d {
        Some(d) => format!("{:>8.2} ms", d.as_secs_f64() * 1000.0 / n as f64),
        None => format!("{:>11}", "n/a"),
    }
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50);
    eprintln!("building the busybox and gcc images (cached) ...");
    build("busybox");
    build("gcc");
    let store = ImageStore::open(Path::new(STORE)).unwrap();
    let busybox = store.resolve("busybox").unwrap();
    let layer = busybox.layers[0].clone();
    let unitctl = env!("CARGO_BIN_EXE_unitctl");
    let scratch = tempfile::tempdir_in("/var/tmp").unwrap();

    eprintln!("building the host image's static binaries (cached) ...");
    let static_unitctl = qemu_tests::static_binaries()
        .map(|dir| dir.join("unitctl"))
        .map_err(|e| eprintln!("no static unitctl: {e}"))
        .ok();
    let b = bundle(&layer, &scratch.path().join("bundle"));
    let bundle_dir = b.display().to_string();
    let run = |bin: &Path| {
        format!(
            "{} run --store {STORE} --image busybox -- /bin/true",
            bin.display()
        )
    };
    let mut contenders = vec![Contender::new(
        "flotilla: unitctl run (CLI, end to end)",
        "",
        &run(Path::new(unitctl)),
    )];
    if let Some(bin) = &static_unitctl {
        contenders.push(Contender::new(
            "flotilla: the same, static (host image's)",
            "",
            &run(bin),
        ));
    }
    contenders.extend([Contender::new(
        "floor: unshare -fpmuin + chroot",
        "",
        &format!("unshare -fpmuin chroot {} /bin/true", layer.display()),
    )]);
    if have("crun") {
        // crun needs the empty cgroup2 at /sys/fs/cgroup/unified out of the way
        // (docs/architecture.md, "Test host notes"):
        // its shell runs in a mount namespace of its own without it.
        contenders.push(Contender::new(
            "crun (crun run)",
            &format!("cd {bundle_dir}; umount /sys/fs/cgroup/unified 2>/dev/null;"),
            "crun run -b . bench$n",
        ));
    }
    if have("runc") {
        contenders.push(Contender::new(
            "runc (runc run)",
            &format!("cd {bundle_dir};"),
            "runc run -b . bench$n",
        ));
    }
    let mut lib = Vec::with_capacity(n);
    // Blocks of BLOCK containers of each contender in turn: a machine that slows down or
    // speeds up during the run (a shared 2-core VM does) weighs on all of them alike, while
    // each contender's deferred kernel work (namespace and cgroup teardown) still lands
    // mostly on its own next run, as in a plain loop.
    for start in (0..n).step_by(BLOCK) {
        let block = start..(start + BLOCK).min(n);
        for c in &mut contenders {
            for j in block.clone() {
                c.run(j);
            }
        }
        for i in block {
            lib.push(run_in_process(&busybox.layers, scratch.path(), i));
        }
    }

    println!(
        "\n{n} sequential containers running /bin/true (busybox image), in blocks of \
         {BLOCK} of each in turn; per container"
    );
    println!("{:<44} {:>11} {:>11}", "", "median", "mean");

    let mean = |t: &[Duration]| t.iter().sum::<Duration>().as_secs_f64() / t.len().max(1) as f64;
    let row = |name: &str, times: &[Duration]| {
        println!(
            "{name:<44} {} {}",
            ms(Some(median(times))),
            ms(Some(Duration::from_secs_f64(mean(times))))
        );
    };
    row("flotilla: runtime::run (in-process)", &lib);
    for c in &contenders {
        if c.failed {
            println!("{:<44} {:>11}", c.name, "failed");
        } else {
            row(&c.name, &c.times);
        }
    }
    let crun = contenders
        .iter()
        .find(|c| c.name.starts_with("crun") && !c.failed)
        .map(|c| c.times.clone());
    for ours in contenders.iter().filter(|c| c.name.starts_with("flotilla")) {
        if let (false, Some(c)) = (ours.failed, &crun) {
            let o = &ours.times;
            println!(
                "ratio to crun, {}: medians {:.2}, means {:.2} (target <= 0.5)",
                ours.name.trim_start_matches("flotilla: "),
                median(o).as_secs_f64() / median(c).as_secs_f64(),
                mean(o) / mean(c)
            );
        }
    }

    // The toolbox's overhead on a compile.
    let src = scratch.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(
        src.join("hello.c"),
        "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n",
    )
    .unwrap();
    let reps = 5;
    let host = have("gcc")
        .then(|| {
            time_sh(&format!(
                "cd {}; for i in $(seq {reps}); do gcc -o hello hello.c || exit 1; done",
                src.display()
            ))
        })
        .flatten();
    let tb = time_sh(&format!(
        "cd {}; for i in $(seq {reps}); do {unitctl} run --store {STORE} --image gcc --bind $PWD:/src --workdir /src -- gcc -o hello hello.c || exit 1; done",
        src.display()
    ));
    println!("\n`gcc hello.c`, mean of {reps}");
    println!("{:<44} {}", "host gcc", per(host, reps));
    println!(
        "{:<44} {}",
        "unitctl run --image gcc (toolbox)",
        per(tb, reps)
    );
}
