//! The real host image under TCG: `image-build os image-build/specs/host.toml` with static
//! `flotilla-init` and `unitctl`, booted with a provisioning config from fw_cfg and checked
//! through the guest's debug shell (a virtio console) and the serial console.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_tests::{BootOptions, Shell, Vm};

mod common;

use common::{shell, wait_marker, BOOT_TIMEOUT, MARKER};

const CMD: Duration = Duration::from_secs(60);

/// Builds the host image into `dir/image`.
fn build_host_image(dir: &Path) -> PathBuf {
    common::build_image(&qemu_tests::images::host_spec(), dir)
}

/// Boots `image` with `config` as its fw_cfg provisioning config and the debug shell.
fn boot(image: &Path, config: &str) -> Vm {
    boot_forwarding(image, config, Vec::new())
}

/// [`boot`] with host ports forwarded to guest ports.
fn boot_forwarding(image: &Path, config: &str, host_forwards: Vec<(u16, u16)>) -> Vm {
    let path = image.join(format!(
        "provision-{}.toml",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(&path, config).unwrap();
    Vm::boot_with(
        image,
        &BootOptions {
            extra_args: vec![
                "-fw_cfg".into(),
                format!("name=opt/org.flotilla/config,file={}", path.display()),
            ],
            debug_shell: true,
            host_forwards,
            ..BootOptions::default()
        },
    )
    .unwrap()
}

/// Waits until `unitctl status UNIT` shows `what` (units start asynchronously).
fn wait_status(sh: &mut Shell, unit: &str, what: &str) -> String {
    let mut last = String::new();
    for _ in 0..60 {
        last = sh
            .run(&format!("unitctl status {unit}"), CMD)
            .unwrap()
            .output;
        if last.contains(what) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("unitctl status {unit} never showed {what:?}; last:\n{last}");
}

const CONFIG: &str = r#"hostname = "vm-one"
[network]
address = "10.0.2.15/24"
gateway = "10.0.2.2"
[metadata]
role = "test"
[[units]]
name = "hello.toml"
contents = """
[unit]
description = "provisioned hello"
[container]
command = ["/bin/sh", "-c", "echo hello from provisioning on $(cat /etc/hostname); exec sleep 100000"]
"""
"#;

/// Boot to the marker; the provisioned unit runs in a container with its output visible;
/// the root is the read-only erofs image, /var the ext4 disk, /etc rendered.
#[test]
fn provisioned_host_boots_and_runs_units() {
    let t = tempfile::tempdir().unwrap();
    let image = build_host_image(t.path());
    let port = qemu_tests::free_port().unwrap();
    let vm = boot_forwarding(&image, CONFIG, vec![(port, 8080)]);
    let marker = wait_marker(&vm);
    let console = vm.console();
    for step in [
        "find the root disk flotilla-root",
        "read-only on /sysroot",
        "first boot: apply the provisioning config from FwCfg",
        "switch root to /sysroot",
        "hostname vm-one",
        "eth0 10.0.2.15/24 via 10.0.2.2",
    ] {
        assert!(console.contains(step), "missing {step:?}\n{console}");
    }
    assert!(
        !console.contains("FAILED"),
        "a boot step failed:\n{console}"
    );
    // Three baked-in units (fleetd, heartbeat, web) and the provisioned one.
    assert!(marker.ends_with(", 4 units active"), "{marker}\n{console}");

    let mut sh = shell(&vm);
    assert_eq!(sh.ok("hostname", CMD).unwrap().trim(), "vm-one");
    wait_status(&mut sh, "hello", "active (running)");
    let logs = sh.ok("unitctl logs hello", CMD).unwrap();
    // A unit without an image sees the host's rendered /etc (bound over the root bind).
    assert!(logs.contains("hello from provisioning on vm-one"), "{logs}");
    let list = sh.ok("unitctl list", CMD).unwrap();
    for unit in ["fleetd", "hello", "heartbeat", "web"] {
        assert!(list.contains(unit), "{list}");
    }
    let www = sh.ok("wget -qO- http://127.0.0.1:8080/", CMD).unwrap();
    assert!(www.contains("Flotilla"), "{www}");

    // The provisioned static address and route on eth0; the web unit answers the host
    // through QEMU's port forward to that address.
    let addr = sh.ok("ip -4 addr show eth0", CMD).unwrap();
    assert!(addr.contains("inet 10.0.2.15/24"), "{addr}");
    let route = sh.ok("ip route", CMD).unwrap();
    assert!(route.contains("default via 10.0.2.2 dev eth0"), "{route}");
    let page = qemu_tests::http_get(port, "/").unwrap();
    assert!(
        page.starts_with("HTTP/1.") && page.contains("Flotilla"),
        "{page}"
    );

    // Read-only root, writable /var, rendered /etc.
    let ro = sh.run("touch /usr/bin/x", CMD).unwrap();
    assert_ne!(ro.status, 0);
    assert!(ro.output.contains("Read-only file system"), "{ro:?}");
    let mounts = sh.ok("cat /proc/mounts", CMD).unwrap();
    assert!(mounts.contains(" / erofs ro"), "{mounts}");
    assert!(mounts.contains(" /var ext4 rw"), "{mounts}");
    assert!(mounts.contains(" /etc tmpfs rw"), "{mounts}");
    let id = sh.ok("cat /etc/machine-id", CMD).unwrap();
    assert_eq!(id.trim().len(), 32, "{id}");
    assert_eq!(sh.ok("cat /var/lib/flotilla/machine-id", CMD).unwrap(), id);
    // PID 1 sits in a leaf cgroup of its own; the units under flotilla/.
    assert_eq!(
        sh.ok("cat /proc/1/cgroup", CMD).unwrap().trim(),
        "0::/init.scope"
    );
    let cg = sh
        .ok(
            "cat /proc/$(unitctl status web | sed -n 's/.*Main PID: //p')/cgroup",
            CMD,
        )
        .unwrap();
    assert!(cg.trim().starts_with("0::/flotilla/web.unit"), "{cg}");
    let meta = sh.ok("cat /etc/flotilla/metadata.toml", CMD).unwrap();
    assert!(meta.contains("role = \"test\""), "{meta}");

    // Out of the box, fleetd is a cluster of one on its embedded registry in /var: this
    // machine (init's id, provisioned metadata), and a unit started with fleetctl runs in
    // this init as a container.
    let mut machines = String::new();
    for _ in 0..60 {
        machines = sh.run("fleetctl list-machines --json", CMD).unwrap().output;
        if machines.contains(id.trim()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let machines: serde_json::Value = serde_json::from_str(&machines).unwrap();
    assert_eq!(machines.as_array().unwrap().len(), 1, "{machines:#}");
    assert_eq!(machines[0]["id"], id.trim(), "{machines:#}");
    assert_eq!(machines[0]["metadata"]["role"], "test", "{machines:#}");
    sh.ok(
        "printf '[container]\\ncommand = [\"/bin/sleep\", \"100000\"]\\n[fleet]\\nmachine_metadata = [\"role=test\"]\\n' > /tmp/nap.toml",
        CMD,
    )
    .unwrap();
    sh.ok("fleetctl start --block-timeout 60s /tmp/nap.toml", CMD)
        .unwrap();
    wait_status(&mut sh, "nap", "active (running)");
    let units = sh.ok("fleetctl list-units", CMD).unwrap();
    assert!(units.contains("nap") && units.contains("active"), "{units}");
    assert!(
        sh.ok("ls /var/lib/flotilla/fleetd", CMD).unwrap().trim() != "",
        "the embedded registry is not in /var"
    );

    // The control API (issue 10): fleetd, granted `control_api`, drove init above; a unit
    // without the grant that binds fleetd's socket directory is not started (fleetd, in its
    // own pid namespace, could not tell its calls from the host's).
    sh.ok(
        "printf '[container]\\ncommand = [\"/bin/sleep\", \"100000\"]\\nmounts = [{ host = \"/run/flotilla\", path = \"/run/flotilla\" }]\\n' > /tmp/peek.toml && unitctl load /tmp/peek.toml",
        CMD,
    )
    .unwrap();
    let _ = sh.run("unitctl start peek", CMD).unwrap();
    let peek = wait_status(&mut sh, "peek", "failed");
    assert!(
        peek.contains("exposes the control socket /run/flotilla/fleetd.sock"),
        "{peek}"
    );

    // The ACPI power button: an orderly power-off, every unit stopped, QEMU exits.
    vm.qmp("system_powerdown").unwrap();
    let status = vm.wait_exit(BOOT_TIMEOUT).unwrap();
    let console = vm.console();
    assert!(status.is_some(), "QEMU still running:\n{console}");
    for line in ["power button pressed", "all units stopped", "Poweroff"] {
        assert!(console.contains(line), "missing {line:?}:\n{console}");
    }
}

/// A blank /var disk is formatted on first boot; what is written to /var survives a reboot;
/// the machine id stays; provisioning is applied once (a new config on the second boot is
/// ignored).
#[test]
fn var_persists_and_provisioning_applies_once() {
    let t = tempfile::tempdir().unwrap();
    let image = build_host_image(t.path());
    // A blank disk instead of the built filesystem.
    let var = image.join("var.img");
    let size = std::fs::metadata(&var).unwrap().len();
    std::fs::remove_file(&var).unwrap();
    std::fs::File::create(&var).unwrap().set_len(size).unwrap();

    let vm = boot(&image, "hostname = \"first\"\n");
    wait_marker(&vm);
    let console = vm.console();
    assert!(console.contains("is blank: formatting it"), "{console}");
    let mut sh = shell(&vm);
    sh.ok("head -c 65536 /dev/urandom > /var/keep", CMD)
        .unwrap();
    let sum = sh.ok("sha256sum /var/keep", CMD).unwrap();
    let id = sh.ok("cat /etc/machine-id", CMD).unwrap();
    // An orderly reboot by Ctrl-Alt-Del (the kernel sends SIGINT to PID 1); QEMU runs
    // -no-reboot, so the guest's reboot ends it.
    let keys: Vec<serde_json::Value> = ["ctrl", "alt", "delete"]
        .iter()
        .map(|k| serde_json::json!({ "type": "qcode", "data": k }))
        .collect();
    vm.qmp_with("send-key", serde_json::json!({ "keys": keys }))
        .unwrap();
    let status = vm.wait_exit(BOOT_TIMEOUT).unwrap();
    assert!(status.is_some(), "QEMU still running:\n{}", vm.console());
    let console = vm.console();
    assert!(console.contains("SIGINT"), "{console}");
    assert!(console.contains("all units stopped"), "{console}");
    assert!(console.contains("Reboot"), "{console}");
    drop(vm);

    let vm = boot(&image, "hostname = \"second\"\n");
    wait_marker(&vm);
    let console = vm.console();
    assert!(!console.contains("is blank"), "{console}");
    assert!(!console.contains("first boot: apply"), "{console}");
    let mut sh = shell(&vm);
    assert_eq!(sh.ok("hostname", CMD).unwrap().trim(), "first");
    assert_eq!(sh.ok("sha256sum /var/keep", CMD).unwrap(), sum);
    assert_eq!(sh.ok("cat /etc/machine-id", CMD).unwrap(), id);
}

/// A broken config stops the boot with the config's line and column, applies nothing, and
/// leaves an emergency shell; the next boot with a good config (on the kernel command line)
/// applies it.
#[test]
fn broken_provisioning_stops_the_boot_and_applies_nothing() {
    let t = tempfile::tempdir().unwrap();
    let image = build_host_image(t.path());
    let broken = "hostname = \"bad\"\n[[units]]\nname = \"x.toml\"\ncontents = \"\"\"\n[container]\ncommand = []\n\"\"\"\n";
    let vm = boot(&image, broken);
    let line = vm
        .wait_for("invalid provisioning config", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    assert!(
        line.contains("fw_cfg:opt/org.flotilla/config:6:11: units/x.toml:"),
        "{line}"
    );
    vm.wait_for("emergency shell on the console", CMD)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    assert!(!vm.console().contains(MARKER));
    assert!(!vm.console().contains("Kernel panic"));
    drop(vm);

    // This time the config comes on the kernel command line (no fw_cfg).
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode("hostname = \"good\"\n");
    let vm = Vm::boot_with(
        &image,
        &BootOptions {
            cmdline: vec![format!("flotilla.config={b64}")],
            debug_shell: true,
            ..BootOptions::default()
        },
    )
    .unwrap();
    wait_marker(&vm);
    assert!(
        vm.console()
            .contains("first boot: apply the provisioning config from Cmdline"),
        "{}",
        vm.console()
    );
    let mut sh = shell(&vm);
    assert_eq!(sh.ok("hostname", CMD).unwrap().trim(), "good");
}

const LIMITS: &str = r#"[[units]]
name = "hog.toml"
contents = """
[container]
command = ["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]
[service]
memory_max = "32M"
"""
[[units]]
name = "forkbomb.toml"
contents = """
[container]
command = ["/bin/sh", "-c", "(while :; do sleep 1000 & done); echo fork bomb over; exec sleep 100000"]
[service]
pids_max = 16
"""
[[units]]
name = "spin.toml"
contents = """
[container]
command = ["/bin/sh", "-c", "while :; do :; done"]
[service]
cpu_max = "10%"
"""
"#;

/// cgroup v2 limits for real: a unit that allocates beyond `memory_max` is OOM-killed and
/// reported `failed` with result `oom-kill`; `pids_max` caps a fork bomb; `cpu_max =
/// "10%"` is the unit cgroup's `cpu.max` (`10000 100000`) and throttles a busy loop (the
/// guest has pure cgroup v2, unlike the dev host).
#[test]
fn cgroup_limits_are_enforced() {
    let t = tempfile::tempdir().unwrap();
    let image = build_host_image(t.path());
    let vm = boot(&image, LIMITS);
    wait_marker(&vm);
    let mut sh = shell(&vm);

    let status = wait_status(&mut sh, "hog", "failed");
    assert!(status.contains("oom-kill"), "{status}");
    // The kernel's own word for it (the unit's cgroup is gone once it failed).
    vm.wait_for("Memory cgroup out of memory", CMD).unwrap();

    wait_status(&mut sh, "forkbomb", "active (running)");
    let logs = (0..60)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            sh.ok("unitctl logs forkbomb", CMD).unwrap()
        })
        .find(|l| l.contains("fork bomb over"))
        .expect("the fork bomb never ended");
    assert!(logs.contains("can't fork"), "{logs}");
    let cg = "/sys/fs/cgroup/flotilla/forkbomb.unit";
    let current: u32 = sh
        .ok(&format!("cat {cg}/pids.current"), CMD)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 16, "pids.current {current}");
    let events = sh.ok(&format!("cat {cg}/pids.events"), CMD).unwrap();
    assert!(
        events
            .lines()
            .any(|l| l.starts_with("max ") && l != "max 0"),
        "{events}"
    );

    wait_status(&mut sh, "spin", "active (running)");
    let cg = "/sys/fs/cgroup/flotilla/spin.unit";
    let max = sh.ok(&format!("cat {cg}/cpu.max"), CMD).unwrap();
    assert_eq!(max.trim(), "10000 100000", "{cg}/cpu.max");
    // The kernel throttles the loop: periods in which it hit its quota.
    let throttled = |stat: &str| -> u64 {
        stat.lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut stat = String::new();
    for _ in 0..60 {
        stat = sh.ok(&format!("cat {cg}/cpu.stat"), CMD).unwrap();
        if throttled(&stat) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        throttled(&stat) > 0,
        "the busy loop was never throttled: {stat}"
    );
}

/// The bytes a foreign `/var` disk starts with: no filesystem flotilla-init knows (not
/// ext4, erofs or squashfs) and not blank.
const FOREIGN: &[u8] = b"someone else's data, not a filesystem flotilla knows\n";

/// A `/var` disk that is neither blank nor ext4 (someone else's data) is refused at boot:
/// the console says what was found and that nothing was written, the boot stops in the
/// emergency shell before any unit starts, and the disk's bytes are the same afterwards.
#[test]
fn a_foreign_var_disk_is_refused_and_left_intact() {
    let t = tempfile::tempdir().unwrap();
    let image = build_host_image(t.path());
    // The image's var.img replaced by a disk of the same size holding foreign data at the
    // start (where a superblock would be) and further in.
    let var = image.join("var.img");
    let size = std::fs::metadata(&var).unwrap().len();
    std::fs::remove_file(&var).unwrap();
    let mut disk = vec![0u8; 4 << 20];
    for (i, chunk) in disk.chunks_mut(4096).enumerate() {
        let line = format!("{i:08} ");
        chunk[..line.len()].copy_from_slice(line.as_bytes());
        chunk[line.len()..line.len() + FOREIGN.len()].copy_from_slice(FOREIGN);
    }
    std::fs::write(&var, &disk).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&var)
        .unwrap()
        .set_len(size)
        .unwrap();
    let before = std::fs::read(&var).unwrap();

    let vm = boot(&image, "hostname = \"foreign\"\n");
    let line = vm
        .wait_for("/var must be ext4 or blank", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    assert!(line.contains("nothing was written to it"), "{line}");
    vm.wait_for("emergency shell on the console", CMD)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let console = vm.console();
    assert!(!console.contains("is blank: formatting it"), "{console}");
    assert!(!console.contains(MARKER), "{console}");
    assert!(!console.contains("Kernel panic"), "{console}");
    drop(vm);
    let after = std::fs::read(&var).unwrap();
    assert!(before == after, "the foreign /var disk was changed");
}
