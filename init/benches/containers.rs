//! `cargo bench -p flotilla-init --bench containers [-- N]`: N (default 50) sequential
//! containers running `true` from the busybox image, side by side in one run: flotilla
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

    // In-process: the runtime alone, no CLI start-up.
    let t = Instant::now();
    for i in 0..n {
        let root = RootFs::Overlay {
            layers: busybox.layers.clone(),
            state_dir: scratch.path().join(format!("lib{i}")),
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
    }
    let lib = Some(t.elapsed());

    let ours = time_sh(&format!(
        "for i in $(seq {n}); do {unitctl} run --store {STORE} --image busybox -- /bin/true || exit 1; done"
    ));
    let floor = time_sh(&format!(
        "for i in $(seq {n}); do unshare -fpmuin chroot {} /bin/true || exit 1; done",
        layer.display()
    ));
    let b = bundle(&layer, &scratch.path().join("bundle"));
    let runc = have("runc")
        .then(|| {
            time_sh(&format!(
                "cd {}; for i in $(seq {n}); do runc run -b . bench$i || exit 1; done",
                b.display()
            ))
        })
        .flatten();
    // crun needs the empty cgroup2 at /sys/fs/cgroup/unified out of the way (DESIGN.md).
    let crun = have("crun")
        .then(|| {
            time_sh(&format!(
                "cd {}; unshare -m sh -c 'umount /sys/fs/cgroup/unified 2>/dev/null; \
                 for i in $(seq {n}); do crun run -b . bench$i || exit 1; done'",
                b.display()
            ))
        })
        .flatten();

    println!("\n{n} sequential containers running /bin/true (busybox image), per container");
    println!("{:<44} {:>11}", "", "time");
    println!(
        "{:<44} {}",
        "flotilla: unitctl run (CLI, end to end)",
        per(ours, n)
    );
    println!(
        "{:<44} {}",
        "flotilla: runtime::run (in-process)",
        per(lib, n)
    );
    println!("{:<44} {}", "crun 1.8 (crun run)", per(crun, n));
    println!("{:<44} {}", "runc 1.1 (runc run)", per(runc, n));
    println!(
        "{:<44} {}",
        "floor: unshare -fpmuin + chroot",
        per(floor, n)
    );
    if let (Some(o), Some(c)) = (ours, crun) {
        println!(
            "ratio unitctl run / crun: {:.2} (target <= 0.5)",
            o.as_secs_f64() / c.as_secs_f64()
        );
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
