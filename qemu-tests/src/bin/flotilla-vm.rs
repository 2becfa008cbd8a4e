//! `flotilla-vm`: boots a Flotilla host image (a directory written by `image-build os`) in
//! QEMU under TCG, for people rather than tests.
//!
//! - `flotilla-vm demo DIR`: boots it, shows the boot steps, `unitctl list`, a unit's status
//!   and logs, a unit started through fleetd with `fleetctl`, fetches the web unit's page from the host through a forwarded port, then
//!   presses the ACPI power button and shows the orderly shutdown. `--keep` instead runs QEMU
//!   in the foreground with its serial console on this terminal (Ctrl-A X quits).
//! - `flotilla-vm cluster DIR`: three VMs of it on a host bridge with etcd on the host, each
//!   provisioned with `[fleet] etcd`; starts a global unit and a service with `fleetctl`,
//!   powers the service's VM off and shows the service move to another machine.
//! - `flotilla-vm bench DIR`: boots it several times and prints a table: QEMU start → boot
//!   marker, the kernel's share, init's own share, PID 1's memory, the image sizes, side by
//!   side with the floor (the same kernel and modules with a busybox `/init`), and the
//!   image's `disk.img` booted like a real machine (OVMF + systemd-boot) against the direct
//!   kernel boot.
//! - `flotilla-vm rolling`: the whole three-VM rolling update: builds v1, v2 and v3 of the
//!   host image (one release key), boots three VMs from v1's `disk.img` in a cluster, rolls
//!   v2 through it one machine at a time (`--max-unavailable 1`) while a service is probed,
//!   then v3 to all three at once (`--max-unavailable 3`, the floor), and prints a table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use qemu_tests::images::{floor_image, host_spec, FLOOR_MARKER};
use qemu_tests::{free_port, http_get, manifest_args, BootOptions, Vm, QEMU};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const CMD: Duration = Duration::from_secs(60);
const MARKER: &str = "flotilla: boot complete in";
/// The port the image's web unit listens on.
const WEB_PORT: u16 = 8080;

/// Boots Flotilla host images in QEMU.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the image, show what runs in it, power it off.
    Demo {
        /// The image directory (image-build os --out DIR).
        image: PathBuf,
        /// Run QEMU in the foreground with the serial console on this terminal instead.
        #[arg(long)]
        keep: bool,
    },
    /// Boot three VMs of the image on a host bridge with etcd, start a global unit and a
    /// service with fleetctl, power the service's VM off and show the service move.
    Cluster {
        /// The image directory (image-build os --out DIR).
        image: PathBuf,
    },
    /// Boot the image several times and print the boot time table.
    Bench {
        /// The image directory (image-build os --out DIR).
        image: PathBuf,
        /// How many boots to measure.
        #[arg(long, default_value_t = 5)]
        boots: usize,
    },
    /// The whole three-VM rolling update: v1 -> v2 one machine at a time, then v2 -> v3
    /// all at once (the floor), in one run; prints a table.
    Rolling {
        /// Where the images, etcd and the registry go (default: a temporary directory,
        /// removed at the end).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Demo { image, keep: true } => keep(&image),
        Cmd::Demo { image, keep: false } => demo(&image),
        Cmd::Cluster { image } => cluster(&image),
        Cmd::Bench { image, boots } => bench(&image, boots),
        Cmd::Rolling { dir } => rolling(dir),
    }
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn boot(image: &Path, host_forwards: Vec<(u16, u16)>) -> anyhow::Result<Vm> {
    Ok(Vm::boot_with(
        image,
        &BootOptions {
            debug_shell: true,
            host_forwards,
            ..BootOptions::default()
        },
    )?)
}

fn wait_marker(vm: &Vm) -> anyhow::Result<String> {
    vm.wait_for(MARKER, BOOT_TIMEOUT)
        .with_context(|| format!("booting (console log: {})", vm.log_path().display()))
}

fn demo(image: &Path) -> anyhow::Result<()> {
    let port = free_port()?;
    step(&format!(
        "booting {} under QEMU (TCG); the guest's port {WEB_PORT} is 127.0.0.1:{port} here",
        image.display()
    ));
    let vm = boot(image, vec![(port, WEB_PORT)])?;
    let marker = wait_marker(&vm)?;
    let console = vm.console();
    let steps: Vec<&str> = console
        .lines()
        .filter(|l| l.contains(" ms] ") || l.contains("as PID 1") || l.contains("machine id "))
        .collect();
    indent(&steps.join("\n"));
    println!(
        "    {marker}  (QEMU start -> marker {:.2} s wall)",
        vm.started().elapsed().as_secs_f64()
    );

    let mut sh = vm.shell(CMD)?;
    for (what, cmd) in [
        ("the units (every one is a container)", "unitctl list"),
        ("unitctl status web", "unitctl status web"),
        (
            "unitctl logs hello (provisioned on first boot)",
            "unitctl logs hello",
        ),
        ("unitctl logs heartbeat -n 3", "unitctl logs heartbeat -n 3"),
        (
            "fleetctl start: a unit through fleetd (a cluster of one, embedded registry in /var)",
            "printf '[container]\\ncommand = [\"/bin/sh\", \"-c\", \"echo scheduled by fleetd; exec sleep 100000\"]\\n' \
             > /tmp/greeter.toml && fleetctl start --block-timeout 60s /tmp/greeter.toml",
        ),
        (
            "fleetctl list-machines; fleetctl list-units",
            "fleetctl list-machines; echo; fleetctl list-units",
        ),
        (
            "the root is read-only, /var is not",
            "touch /usr/x; grep -E ' / | /var | /etc ' /proc/mounts",
        ),
    ] {
        step(what);
        indent(&sh.run(cmd, CMD)?.output);
    }
    step(&format!(
        "from the host: GET http://127.0.0.1:{port}/ (the web unit)"
    ));
    match http_get(port, "/") {
        Ok(page) => indent(page.lines().last().unwrap_or_default()),
        Err(e) => println!("    (no answer: {e})"),
    }

    step("pressing the ACPI power button (QMP system_powerdown)");
    let pressed = Instant::now();
    vm.qmp("system_powerdown")?;
    let status = vm.wait_exit(BOOT_TIMEOUT)?;
    let console = vm.console();
    let tail: Vec<&str> = console
        .lines()
        .skip_while(|l| !l.contains("power button pressed"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    indent(&tail.join("\n"));
    match status {
        Some(s) => println!(
            "    QEMU exited ({s}) {:.2} s after the button",
            pressed.elapsed().as_secs_f64()
        ),
        None => bail!(
            "the guest did not power off; console: {}",
            vm.log_path().display()
        ),
    }
    Ok(())
}

/// The lease TTL of the cluster demo's machines, in seconds.
const CLUSTER_TTL: u64 = 3;

fn cluster(image: &Path) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("flotilla-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = cluster_in(image, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn cluster_in(image: &Path, scratch: &Path) -> anyhow::Result<()> {
    use qemu_tests::cluster::{active_units, machines, poll, write_file, ClusterNet};
    let net = ClusterNet::new(scratch, 3)?;
    step(&format!(
        "host bridge {}/24 with etcd at {}; booting vm1 (role=edge), vm2 and vm3 (role=worker), \
         each provisioned with [fleet] etcd = [\"{}\"]",
        net.host_ip(),
        net.endpoint(),
        net.endpoint()
    ));
    // The VMs boot from copies next to the image, in the scratch directory.
    let base = scratch.join("image");
    std::fs::create_dir_all(&base)?;
    for name in [
        "vmlinuz",
        "initramfs.img",
        "root.img",
        "var.img",
        "manifest.json",
    ] {
        std::os::unix::fs::symlink(std::fs::canonicalize(image.join(name))?, base.join(name))?;
    }
    let roles = ["edge", "worker", "worker"];
    let mut vms = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        vms.push(net.boot(&base, i + 1, role, CLUSTER_TTL)?);
    }
    for (i, vm) in vms.iter().enumerate() {
        println!("    vm{}: {}", i + 1, wait_marker(vm)?);
    }
    let mut shells = Vec::new();
    for vm in &vms {
        shells.push(vm.shell(CMD)?);
    }
    let Some(sh) = shells.first_mut() else {
        bail!("no VM");
    };
    poll(
        "3 machines",
        BOOT_TIMEOUT,
        || machines(sh),
        |m| m.len() == 3,
    )?;
    step("vm1$ fleetctl list-machines");
    indent(&sh.run("fleetctl list-machines", CMD)?.output);

    write_file(sh, "/tmp/everywhere.toml", qemu_tests::cluster::GLOBAL_UNIT)?;
    write_file(sh, "/tmp/svc.toml", qemu_tests::cluster::SERVICE_UNIT)?;
    step("vm1$ cat /tmp/svc.toml");
    indent(&sh.run("cat /tmp/svc.toml", CMD)?.output);
    step("vm1$ fleetctl start /tmp/everywhere.toml /tmp/svc.toml  (everywhere: global = true)");
    indent(
        &sh.run(
            "fleetctl start --block-timeout 120s /tmp/everywhere.toml /tmp/svc.toml",
            BOOT_TIMEOUT,
        )?
        .output,
    );
    let placed = poll(
        "everywhere on 3 machines and svc on one",
        BOOT_TIMEOUT,
        || active_units(sh),
        |a| {
            a.iter().filter(|(u, _)| u == "everywhere").count() == 3
                && a.iter().any(|(u, _)| u == "svc")
        },
    )?;
    step("vm1$ fleetctl list-units");
    indent(&sh.run("fleetctl list-units", CMD)?.output);

    let svc_machine = placed
        .iter()
        .find(|(u, _)| u == "svc")
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    let mut host = None;
    for (i, s) in shells.iter_mut().enumerate() {
        if s.ok("cat /etc/machine-id", CMD)?.trim() == svc_machine {
            host = Some(i);
        }
    }
    let Some(host) = host else {
        bail!("svc runs on {svc_machine}, which is none of the VMs");
    };
    step(&format!(
        "vm{}$ unitctl logs svc  (a container in that VM's init)",
        host + 1
    ));
    if let Some(s) = shells.get_mut(host) {
        indent(&s.run("unitctl logs svc", CMD)?.output);
    }
    if let Some(s) = shells.first_mut() {
        step("vm1$ fleetctl journal svc  (vm1's fleetd relays to that machine's)");
        indent(&s.run("fleetctl journal svc", CMD)?.output);
    }
    step(&format!(
        "pressing vm{}'s ACPI power button: an orderly shutdown; its fleetd sees init stopping and takes the machine out of the cluster",
        host + 1
    ));
    let off = Instant::now();
    if let Some(vm) = vms.get(host) {
        vm.qmp("system_powerdown")?;
        vm.wait_exit(BOOT_TIMEOUT)?;
    }
    println!(
        "    vm{} powered off {:.1} s after the button",
        host + 1,
        off.elapsed().as_secs_f64()
    );
    let Some(sh) = shells.first_mut() else {
        bail!("no VM");
    };
    poll(
        "svc active on another machine",
        BOOT_TIMEOUT,
        || active_units(sh),
        |a| a.iter().any(|(u, m)| u == "svc" && *m != svc_machine),
    )?;
    println!(
        "    svc active elsewhere {:.1} s after the button",
        off.elapsed().as_secs_f64()
    );
    step("vm1$ fleetctl list-machines; fleetctl list-units");
    indent(
        &sh.run("fleetctl list-machines; echo; fleetctl list-units", CMD)?
            .output,
    );
    for vm in &vms {
        let _ = vm.qmp("quit");
    }
    Ok(())
}

fn keep(image: &Path) -> anyhow::Result<()> {
    let port = free_port()?;
    let mut args = manifest_args(image)?;
    if let Some(nic) = args.iter_mut().find(|a| a.starts_with("user,")) {
        nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-:{WEB_PORT}"));
    }
    println!(
        "==> QEMU in the foreground: the serial console is this terminal; Ctrl-A X quits. \
         The web unit: http://127.0.0.1:{port}/"
    );
    let status = Command::new(QEMU)
        .args(&args)
        .current_dir(image)
        .status()
        .with_context(|| format!("running {QEMU}"))?;
    println!("QEMU exited: {status}");
    Ok(())
}

/// One measured boot.
struct Sample {
    wall_ms: f64,
    kernel_ms: f64,
    init_ms: f64,
    rss_kib: u64,
    units: u32,
}

fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = line.split(key).nth(1)?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

fn boot_once(image: &Path) -> anyhow::Result<Sample> {
    let vm = boot(image, Vec::new())?;
    let marker = wait_marker(&vm)?;
    let wall_ms = vm.started().elapsed().as_secs_f64() * 1000.0;
    let pid1 = vm.wait_for("as PID 1, ", CMD)?;
    let kernel_ms = number_after(&pid1, "as PID 1, ").context("kernel time")?;
    let init_ms = number_after(&marker, MARKER).context("init time")?;
    let units = number_after(&marker, "ms, ").context("unit count")? as u32;
    let mut sh = vm.shell(CMD)?;
    let status = sh.ok("cat /proc/1/status", CMD)?;
    let rss_kib = status
        .lines()
        .find_map(|l| number_after(l, "VmRSS:"))
        .context("VmRSS of PID 1")? as u64;
    vm.qmp("quit")?;
    Ok(Sample {
        wall_ms,
        kernel_ms,
        init_ms,
        rss_kib,
        units,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn size_of(image: &Path, file: &str) -> u64 {
    std::fs::metadata(image.join(file)).map_or(0, |m| m.len())
}

fn bench(image: &Path, boots: usize) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("flotilla-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    println!(
        "{boots} boots of {} under TCG, each from a fresh /var (first boot)",
        image.display()
    );
    println!(
        "\n{:>4}  {:>12}  {:>10}  {:>10}  {:>12}  {:>5}",
        "boot", "wall (ms)", "kernel", "init", "PID 1 RSS", "units"
    );
    let mut samples = Vec::new();
    for n in 1..=boots {
        // A fresh /var each time: copy the pristine disk sparsely next to the image.
        let dir = scratch.join("image");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(image)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let status = Command::new("cp")
                    .arg("--sparse=always")
                    .arg(entry.path())
                    .arg(dir.join(entry.file_name()))
                    .status()?;
                if !status.success() {
                    bail!("copying {} failed", entry.path().display());
                }
            }
        }
        let s = boot_once(&dir)?;
        println!(
            "{n:>4}  {:>12.0}  {:>10.0}  {:>10.0}  {:>8} KiB  {:>5}",
            s.wall_ms, s.kernel_ms, s.init_ms, s.rss_kib, s.units
        );
        samples.push(s);
    }

    // The floor: the same kernel and modules, a busybox /init that powers off at once.
    let floor_dir = floor_image(
        &host_spec(),
        &scratch.join("floor"),
        "/bin/busybox poweroff -f",
    )?;
    let mut floor = Vec::new();
    for _ in 0..boots.min(3) {
        let vm = Vm::boot(&floor_dir, &[])?;
        vm.wait_for(FLOOR_MARKER, BOOT_TIMEOUT)?;
        floor.push(vm.started().elapsed().as_secs_f64() * 1000.0);
    }
    let _ = std::fs::remove_dir_all(&scratch);

    // disk.img under OVMF through systemd-boot (each boot on fresh copies of the disk and
    // the firmware variables: a first boot, like the direct samples).
    let mut disk = Vec::new();
    for _ in 0..boots.min(3) {
        let vm = Vm::boot_disk(image, &qemu_tests::BootOptions::default())?;
        let marker = wait_marker(&vm)?;
        let wall_ms = vm.started().elapsed().as_secs_f64() * 1000.0;
        // A disk boot that missed its root or its units is no sample.
        let units = number_after(&marker, "ms, ").context("unit count")? as u32;
        let want = samples.first().map_or(0, |s| s.units);
        if units != want {
            bail!("disk boot: {marker:?}, the direct boots had {want} units active");
        }
        disk.push(wall_ms);
        vm.qmp("quit")?;
    }

    let med = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let (initramfs, root) = (size_of(image, "initramfs.img"), size_of(image, "root.img"));
    println!(
        "\nmedians                                    flotilla    floor (busybox /init)   target"
    );
    println!(
        "QEMU start -> marker (wall)              {:>8.0} ms  {:>8.0} ms",
        med(|s| s.wall_ms),
        median(floor.clone())
    );
    println!(
        "disk boot (OVMF + systemd-boot) vs direct kernel boot, QEMU start -> boot-complete \
         marker: {:.0} ms vs {:.0} ms (medians of {} and {} boots)",
        median(disk.clone()),
        med(|s| s.wall_ms),
        disk.len(),
        samples.len(),
    );
    println!(
        "kernel's share (start -> PID 1)          {:>8.0} ms",
        med(|s| s.kernel_ms)
    );
    println!(
        "init's own share (PID 1 -> marker)       {:>8.0} ms                          <= 150 ms ({} units)",
        med(|s| s.init_ms),
        samples.first().map_or(0, |s| s.units)
    );
    println!(
        "PID 1 RSS after boot                     {:>8.1} MiB                         <= 8 MiB",
        med(|s| s.rss_kib as f64) / 1024.0
    );
    println!(
        "vmlinuz / initramfs / root.img           {:.1} / {:.1} / {:.1} MiB",
        mib(size_of(image, "vmlinuz")),
        mib(initramfs),
        mib(root)
    );
    println!(
        "initramfs + root.img                     {:>8.1} MiB                         <= 40 MiB",
        mib(initramfs + root)
    );
    Ok(())
}

/// The rolling benchmark's trial before a machine commits its new slot.
const ROLLING_PROVISION: &str = "[os]\ncommit_after = \"5s\"\n";
/// Patience for one rollout of three machines under TCG (only a bound for waiting).
const ROLLOUT_PATIENCE: Duration = Duration::from_secs(2400);

fn rolling(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temp = match dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("flotilla-rolling-")
                .tempdir()?,
        ),
    };
    let dir = match (&dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => bail!("no directory"),
    };
    step("building v1, v2 and v3 of the host image, signed with one release key");
    let releases = qemu_tests::rolling::build_releases(&dir, &["1.0.0", "2.0.0", "3.0.0"])?;
    for r in &releases {
        println!("    {}: {:.1} s", r.version, r.build_secs);
    }
    let (Some(v1), Some(v2), Some(v3)) = (releases.first(), releases.get(1), releases.get(2))
    else {
        bail!("three releases were asked for");
    };
    step("booting three VMs from v1's disk.img (OVMF + systemd-boot) in one cluster");
    let cluster = qemu_tests::rolling::RollingCluster::start(&dir, v1, 3, ROLLING_PROVISION)?;
    committed(&cluster, "1.0.0")?;
    cluster.start_units(&[
        ("everywhere", qemu_tests::cluster::GLOBAL_UNIT),
        ("svc", qemu_tests::rolling::SERVICE_UNIT),
    ])?;
    cluster.poll_json("svc active", &["list-units", "--json"], |v| {
        qemu_tests::cluster::active_in(v)
            .iter()
            .any(|(u, _)| u == "svc")
    })?;
    let settings = cluster.registries_file()?;
    let settings = settings.display().to_string();
    let mut runs = Vec::new();
    for (release, n) in [(v2, 1), (v3, 3)] {
        step(&format!(
            "fleetctl os update {} --max-unavailable {n}",
            release.version
        ));
        let reference = cluster.publish(release)?;
        let run = cluster.roll(
            &reference,
            &release.version,
            n,
            &["--registries", &settings],
            ROLLOUT_PATIENCE,
        )?;
        if run.state != "finished" {
            bail!(
                "the rollout to {} did not finish: {}\n{:#}",
                release.version,
                run.state,
                run.status
            );
        }
        committed(&cluster, &release.version)?;
        runs.push(run);
    }
    drop(cluster);
    println!(
        "\nwhole three-VM rolling update (TCG, disk boots, [os] commit_after 5s)\n{:<46}{:>22}{:>30}",
        "", "max-unavailable 1", "max-unavailable 3 (floor)"
    );
    let cells = |f: &dyn Fn(&qemu_tests::rolling::RolloutRun) -> String| {
        runs.iter().map(f).collect::<Vec<_>>()
    };
    for (what, values) in [
        ("versions", cells(&|r| format!("-> {}", r.version))),
        (
            "fleetctl os update -> rollout finished",
            cells(&|r| format!("{:.1} s", r.secs)),
        ),
        (
            "service probe rounds unanswered",
            cells(&|r| format!("{} of {}", r.unanswered().len(), r.rounds.len())),
        ),
        (
            "most machines missing at one count",
            cells(&|r| format!("{} of 3", r.most_missing(3))),
        ),
    ] {
        let (a, b) = (
            values.first().cloned().unwrap_or_default(),
            values.get(1).cloned().unwrap_or_default(),
        );
        println!("{what:<46}{a:>22}{b:>30}");
    }
    Ok(())
}

/// Waits until every machine reports `version` with its update committed.
fn committed(cluster: &qemu_tests::rolling::RollingCluster, version: &str) -> anyhow::Result<()> {
    use qemu_tests::rolling::field;
    cluster.poll_json(
        &format!("every machine on {version}, committed"),
        &["os", "status", "--json"],
        |s| {
            field(s, "machines").as_array().is_some_and(|m| {
                m.len() == 3
                    && m.iter().all(|m| {
                        field(m, "os_version") == version && field(m, "update") == "committed"
                    })
            })
        },
    )?;
    Ok(())
}
