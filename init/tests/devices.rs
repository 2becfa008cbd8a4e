//! The device allow-list (a cgroup device program on every container's cgroup) and the
//! default capability set without `MKNOD` and `NET_RAW`, tested by performing the attacks:
//! reading a host disk (a loop device over a file holding a secret) through a node made with
//! `mknod` or reached through a bind mount (the store turns nodes in image layers into empty
//! files), and opening a packet socket on the host network.
//! Each attack runs with the other protections out of the way (the capability kept, a
//! node that needs none), and each grant shows the test can see the difference.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::Machine;
use flotilla_container::image::{ImageStore, RuntimeConfig};

/// A loop device over a temporary file that starts with a secret; detached on drop.
struct Disk {
    _file: tempfile::NamedTempFile,
    dev: PathBuf,
    major: u32,
    minor: u32,
    secret: String,
}

impl Disk {
    fn new() -> Disk {
        let mut file = tempfile::Builder::new()
            .prefix("flotilla-disk-")
            .tempfile_in("/var/tmp")
            .unwrap();
        let secret = format!("SECRET-{}-{}", std::process::id(), rand_tag());
        let mut data = secret.clone().into_bytes();
        data.resize(64 * 1024, b'\n');
        std::io::Write::write_all(&mut file, &data).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let meta = fs::metadata(&dev).unwrap();
        assert!(meta.file_type().is_block_device());
        let (major, minor) = (
            rustix::fs::major(meta.rdev()),
            rustix::fs::minor(meta.rdev()),
        );
        Disk {
            _file: file,
            dev,
            major,
            minor,
            secret,
        }
    }

    /// `MAJOR MINOR` for mknod.
    fn numbers(&self) -> String {
        format!("{} {}", self.major, self.minor)
    }

    /// `MAJOR:MINOR` for a rule.
    fn rule(&self, access: &str) -> String {
        format!("b {}:{} {access}", self.major, self.minor)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn rand_tag() -> u64 {
    let mut buf = [0u8; 8];
    rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty()).unwrap();
    u64::from_le_bytes(buf)
}

/// Busybox applets linked into the test image.
const APPLETS: &[&str] = &[
    "sh", "cat", "head", "mknod", "echo", "ls", "id", "arping", "sleep", "touch", "grep", "rm",
    "wc",
];

/// The image store of this file: `devimg`, busybox, and beside it a block device node (mode
/// 0666) with the numbers of `disk`'s loop device, which every unit gets at `/disk`.
fn store(disk: &Disk) -> Store {
    let tmp = tempfile::Builder::new()
        .prefix("flotilla-devimg-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = tmp.path();
    let root = dir.join("root");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    // The image ships a plain `/disk` (the store turns device nodes in layers into empty
    // files); the node itself comes from the host through a bind mount, the one way a unit
    // still meets a node it did not make.
    fs::write(root.join("disk"), "").unwrap();
    let node = dir.join("disk-node");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &node,
        rustix::fs::FileType::BlockDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(disk.major, disk.minor),
    )
    .unwrap();
    fs::set_permissions(&node, fs::Permissions::from_mode(0o666)).unwrap();
    let config = RuntimeConfig {
        env: vec!["PATH=/bin".into()],
        cmd: vec!["/bin/sh".into()],
        ..Default::default()
    };
    let layout = common::oci_layout_of(&root, dir, &config, "devimg:latest");
    let store = dir.join("store");
    ImageStore::open(&store)
        .unwrap()
        .import_oci_layout(&layout, Some("devimg"), &mut |_| {})
        .unwrap();
    Store {
        _tmp: tmp,
        store,
        node,
    }
}

/// An image store in a temporary directory, removed on drop.
struct Store {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    /// A block device node (mode 0666) with the loop device's numbers, bound at `/disk`.
    node: PathBuf,
}

impl std::ops::Deref for Store {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.store
    }
}

fn busybox() -> &'static Path {
    static BUSYBOX: OnceLock<PathBuf> = OnceLock::new();
    BUSYBOX.get_or_init(|| {
        ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("busybox is missing: install the Debian package busybox-static")
    })
}

/// A unit of `devimg` running `script` with the node at `/disk`, with extra `[container]`
/// lines.
fn unit(store: &Store, script: &str, extra: &str) -> String {
    format!(
        "[container]\nimage = \"devimg\"\nmounts = [{{ host = {:?}, path = \"/disk\" }}]\n{extra}\n\
         command = [\"/bin/sh\", \"-c\", {script:?}]\n[service]\ntype = \"oneshot\"\n",
        store.node.to_str().unwrap()
    )
}

/// Try to read the disk through `path`; prints the first bytes or the error, then `done`.
fn read_script(path: &str) -> String {
    format!("head -c 40 {path} 2>&1; echo; echo done")
}

/// Start a manager over `units` with the image store; wait for each to finish; return logs.
fn run_units(store: &Path, units: &[(&str, String)]) -> (Machine, Vec<String>) {
    let refs: Vec<(&str, &str)> = units.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let m = Machine::start_with(&refs, &["--images", store.to_str().unwrap()]);
    let mut logs = Vec::new();
    for (name, _) in units {
        m.wait_until(&format!("{name} to finish"), || {
            m.logs(name).contains("done")
                || ["failed", "inactive"].contains(&m.state(name).as_str())
        });
        logs.push(m.logs(name));
    }
    (m, logs)
}

#[test]
fn mknod_of_a_host_disk_is_denied_even_with_cap_mknod() {
    let disk = Disk::new();
    let store = store(&disk);
    let script = format!(
        "mknod /made b {} && echo mknod-ok || echo mknod-refused; {}",
        disk.numbers(),
        read_script("/made")
    );
    // MKNOD kept explicitly: the capability is not what stops the attack.
    let caps = "capabilities = [\"MKNOD\", \"DAC_OVERRIDE\"]";
    let (_m, logs) = run_units(
        &store,
        &[
            ("attack", unit(&store, &script, caps)),
            // mknod granted for these numbers, but not read: the open is refused.
            (
                "mknod-only",
                unit(
                    &store,
                    &script,
                    &format!("{caps}\ndevices = [{:?}]", disk.rule("m")),
                ),
            ),
            // Granted: the same script reads the secret (the test sees the difference).
            (
                "granted",
                unit(
                    &store,
                    &script,
                    &format!("{caps}\ndevices = [{:?}]", disk.rule("rm")),
                ),
            ),
        ],
    );
    let [attack, mknod_only, granted] = [&logs[0], &logs[1], &logs[2]];
    assert!(attack.contains("mknod-refused"), "{attack}");
    assert!(attack.contains("Operation not permitted"), "{attack}");
    assert!(!attack.contains(&disk.secret), "{attack}");
    assert!(mknod_only.contains("mknod-ok"), "{mknod_only}");
    assert!(
        mknod_only.contains("/made: Operation not permitted"),
        "{mknod_only}"
    );
    assert!(!mknod_only.contains(&disk.secret), "{mknod_only}");
    assert!(granted.contains("mknod-ok"), "{granted}");
    assert!(granted.contains(&disk.secret), "{granted}");
}

#[test]
fn a_device_node_reached_through_a_bind_mount_cannot_be_opened() {
    let disk = Disk::new();
    let store = store(&disk);
    let script = format!("id -u; {}", read_script("/disk"));
    // No capabilities and a non-root user: the node's mode 0666 is all it needs without the
    // filter.
    let plain = "capabilities = []\nuser = \"1000\"";
    let (_m, logs) = run_units(
        &store,
        &[
            ("shipped", unit(&store, &script, plain)),
            (
                "shipped-granted",
                unit(
                    &store,
                    &script,
                    &format!("{plain}\ndevices = [{:?}]", disk.rule("r")),
                ),
            ),
        ],
    );
    let [shipped, granted] = [&logs[0], &logs[1]];
    assert!(shipped.contains("1000"), "{shipped}");
    assert!(
        shipped.contains("/disk: Operation not permitted"),
        "{shipped}"
    );
    assert!(!shipped.contains(&disk.secret), "{shipped}");
    assert!(granted.contains(&disk.secret), "{granted}");
}

#[test]
fn the_standard_nodes_and_whiteouts_still_work_under_the_filter() {
    let disk = Disk::new();
    let store = store(&disk);
    // Deleting an image file makes overlayfs create a whiteout (a 0:0 character device).
    let script = "rm /etc/group && echo rm-ok; echo x > /dev/null && echo null-ok; \
                  echo zero=$(head -c 3 /dev/zero | wc -c) urandom=$(head -c 5 /dev/urandom | wc -c); \
                  echo x > /dev/full || echo full-refused; \
                  (exec 3<>/dev/ptmx) && echo ptmx-ok; echo done";
    let (_m, logs) = run_units(&store, &[("plain", unit(&store, script, ""))]);
    let log = &logs[0];
    for want in [
        "rm-ok",
        "null-ok",
        "zero=3 urandom=5",
        "No space left on device",
        "ptmx-ok",
    ] {
        assert!(log.contains(want), "{want}: {log}");
    }
    assert!(!log.contains("Operation not permitted"), "{log}");
}

#[test]
fn a_restarted_unit_gets_its_current_rules() {
    let disk = Disk::new();
    let store = store(&disk);
    let script = read_script("/disk");
    let (m, logs) = run_units(&store, &[("grow", unit(&store, &script, ""))]);
    assert!(logs[0].contains("Operation not permitted"), "{}", logs[0]);
    // A oneshot that exited 0 stays active (exited).
    let runs = |n: usize| {
        let start = std::time::Instant::now();
        while m.logs("grow").matches("done").count() < n || m.state("grow") == "activating" {
            assert!(
                start.elapsed() < common::PATIENCE,
                "run {n} of grow did not happen: {}\n{}",
                m.status("grow"),
                m.logs("grow")
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(m.state("grow"), "active", "{}", m.status("grow"));
    };
    runs(1);
    // Same rules: the cached program is attached already to the unit's cgroup.
    let again = || {
        m.ok(&["stop", "grow"]);
        m.wait_state("grow", "inactive");
        m.ok(&["start", "grow"]);
    };
    again();
    runs(2);
    assert_eq!(m.logs("grow").matches("Operation not permitted").count(), 2);
    assert!(!m.logs("grow").contains(&disk.secret));
    // Granted on reload: the earlier, stricter program must be gone from the cgroup
    // (programs attached together must all allow).
    fs::write(
        m.units.join("grow.toml"),
        unit(
            &store,
            &script,
            &format!("devices = [{:?}]", disk.rule("r")),
        ),
    )
    .unwrap();
    m.ok(&["reload"]);
    again();
    runs(3);
    assert!(m.logs("grow").contains(&disk.secret), "{}", m.logs("grow"));
}

#[test]
fn quick_restarts_reuse_the_cgroup_and_its_filter() {
    let disk = Disk::new();
    let store = store(&disk);
    // Restarted before the leftover cgroup is removed: the same program is attached to it
    // already.
    let text = format!(
        "[container]\nimage = \"devimg\"\nmounts = [{{ host = {:?}, path = \"/disk\" }}]\n\
         command = [\"/bin/sh\", \"-c\", {:?}]\n\
         [service]\nrestart = \"on-failure\"\nrestart_sec = \"1ms\"\nrestart_max_sec = \"1ms\"\n\
         start_limit_burst = 3\nstart_limit_interval = \"1h\"\n",
        store.node.to_str().unwrap(),
        format!("{}; exit 1", read_script("/disk"))
    );
    let m = Machine::start_with(&[("again", &text)], &["--images", store.to_str().unwrap()]);
    let s = m.wait_state("again", "failed");
    let logs = m.logs("again");
    assert_eq!(s["result"], "start-limit-hit", "{s}\n{logs}");
    assert_eq!(
        logs.matches("/disk: Operation not permitted").count(),
        3,
        "{logs}"
    );
}

/// Run `head` on `dev` in the cgroup `cgroup` (the shell moves itself in, then execs).
fn read_in_cgroup(cgroup: &Path, dev: &Path) -> String {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec head -c 40 {} 2>&1",
            cgroup.display(),
            dev.display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn attaching_new_rules_replaces_the_old_ones() {
    use flotilla_container::runtime::{attach_device_filter, DeviceKind, DeviceRule, ACCESS_READ};
    let disk = Disk::new();
    let cgroup = common::own_cgroup_dir().join(format!(
        "flotilla-devtest-{}-{}",
        std::process::id(),
        rand_tag()
    ));
    fs::create_dir(&cgroup).unwrap();
    /// Removes the test's cgroup, also when an assertion fails.
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = fs::remove_dir(self.0);
        }
    }
    let _remove = Remove(&cgroup);
    let grant = [DeviceRule::new(
        DeviceKind::Block,
        Some(disk.major),
        Some(disk.minor),
        ACCESS_READ,
    )];
    attach_device_filter(&cgroup, &[]).unwrap();
    let denied = read_in_cgroup(&cgroup, &disk.dev);
    attach_device_filter(&cgroup, &grant).unwrap();
    let granted = read_in_cgroup(&cgroup, &disk.dev);
    // The same rules again: the program is attached already.
    attach_device_filter(&cgroup, &grant).unwrap();
    let again = read_in_cgroup(&cgroup, &disk.dev);
    attach_device_filter(&cgroup, &[]).unwrap();
    let revoked = read_in_cgroup(&cgroup, &disk.dev);
    assert!(denied.contains("Operation not permitted"), "{denied}");
    assert!(granted.contains(&disk.secret), "{granted}");
    assert!(again.contains(&disk.secret), "{again}");
    assert!(revoked.contains("Operation not permitted"), "{revoked}");
}

#[test]
fn a_device_path_is_granted_and_made_available() {
    let disk = Disk::new();
    let store = store(&disk);
    let dev = disk.dev.to_str().unwrap();
    let script = read_script(dev);
    let (_m, logs) = run_units(
        &store,
        &[
            ("without", unit(&store, &script, "")),
            (
                "with",
                unit(&store, &script, &format!("devices = [{dev:?}]")),
            ),
        ],
    );
    let [without, with] = [&logs[0], &logs[1]];
    assert!(without.contains("No such file"), "{without}");
    assert!(with.contains(&disk.secret), "{with}");
    // A symlink names its node; the container sees it at the path given.
    let link = format!("/dev/flotilla-test-{}", rand_tag());
    std::os::unix::fs::symlink(&disk.dev, &link).unwrap();
    struct Unlink<'a>(&'a str);
    impl Drop for Unlink<'_> {
        fn drop(&mut self) {
            let _ = fs::remove_file(self.0);
        }
    }
    let _unlink = Unlink(&link);
    let missing = format!("/dev/flotilla-missing-{}", rand_tag());
    let (m, logs) = run_units(
        &store,
        &[
            (
                "linked",
                unit(
                    &store,
                    &read_script(&link),
                    &format!("devices = [{link:?}]"),
                ),
            ),
            (
                "missing",
                unit(&store, &script, &format!("devices = [{missing:?}]")),
            ),
        ],
    );
    assert!(logs[0].contains(&disk.secret), "{}", logs[0]);
    let s = m.status("missing");
    assert_eq!(
        (&s["state"], &s["result"]),
        (&"failed".into(), &"spawn".into()),
        "{s}"
    );
    let message = s["message"].as_str().unwrap();
    assert!(
        message.contains(&missing) && message.contains("remove it from `devices`"),
        "{s}"
    );
}

fn unitctl_run(store: &Store, script: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unitctl"))
        .args([
            "run",
            "--store",
            store.to_str().unwrap(),
            "--image",
            "devimg",
            "--bind",
            &format!("{}:/disk", store.node.display()),
        ])
        .args(["--", "/bin/sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_toolbox_denies_host_disks() {
    let disk = Disk::new();
    let store = store(&disk);
    // The toolbox runs as root with the default capabilities; opening a node needs none.
    let script = format!(
        "mknod /made b {} && echo mknod-ok || echo mknod-refused; {}",
        disk.numbers(),
        read_script("/disk")
    );
    let out = unitctl_run(&store, &script);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("mknod-refused"), "{text}");
    assert!(text.contains("/disk: Operation not permitted"), "{text}");
    assert!(!text.contains(&disk.secret), "{text}");
    // The run's own cgroup (`flotilla-toolbox/toolbox-PID.unit` below this process's cgroup,
    // wherever the host mounts cgroup2) is gone with it; the shared parent holds the filter.
    let mount = flotilla_init::scope::find_cgroup2().expect("a cgroup2 mount");
    let own = flotilla_init::scope::own_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap())
        .unwrap_or_default();
    let shared = mount.join(own).join("flotilla-toolbox");
    assert!(shared.is_dir(), "{} missing", shared.display());
    let leftovers: Vec<_> = fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("toolbox-")?
                .strip_suffix(".unit")?
                .to_string();
            (!Path::new("/proc").join(pid).exists()).then(|| e.path())
        })
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// `unshare -m` with every cgroup2 mount unmounted (wherever this host has them): no cgroup
/// v2 for anything started from there.
fn without_cgroup2(program: &str) -> Command {
    let mounts = common::cgroup2_mounts();
    assert!(!mounts.is_empty(), "no cgroup2 filesystem is mounted");
    let umounts: Vec<String> = mounts
        .iter()
        .rev()
        .map(|m| format!("umount {} && ", m.display()))
        .collect();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{}exec \"$0\" \"$@\"", umounts.concat()))
        .arg(program);
    cmd
}

#[test]
fn without_a_filter_nothing_runs() {
    let disk = Disk::new();
    let store = store(&disk);
    let marker = tempfile::tempdir().unwrap();
    // The manager: no usable cgroup2, so its units get process groups: the unit fails.
    let dir = tempfile::tempdir().unwrap();
    let units = dir.path().join("units");
    fs::create_dir_all(&units).unwrap();
    let ran = marker.path().join("ran");
    fs::write(
        units.join("unfiltered.toml"),
        format!(
            "[container]\nmounts = [{{ host = \"{0}\", path = \"{0}\" }}]\n\
             command = [\"/bin/touch\", \"{1}\"]\n",
            marker.path().display(),
            ran.display()
        ),
    )
    .unwrap();
    let api = dir.path().join("manager.sock");
    let child = without_cgroup2(env!("CARGO_BIN_EXE_flotilla-init"))
        .arg("--units")
        .arg(&units)
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--api")
        .arg(&api)
        .arg("--images")
        .arg(&*store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.path().join("manager.log")).unwrap())
        .spawn()
        .unwrap();
    let m = Machine {
        child: Some(child),
        units,
        state: dir.path().join("state"),
        api,
        cgroup: format!("no-cgroup-{}", std::process::id()),
        cgroup_parent: common::own_cgroup_dir(),
        dir,
    };
    m.wait_until("the control socket answers", || {
        m.unitctl(&["list"]).status.success()
    });
    m.wait_until("unfiltered to fail or finish", || {
        ["failed", "inactive"].contains(&m.state("unfiltered").as_str())
    });
    assert!(!ran.exists(), "the unit ran unfiltered");
    let s = m.status("unfiltered");
    assert_eq!(s["state"], "failed", "{s}");
    assert_eq!(s["result"], "spawn", "{s}");
    let message = s["message"].as_str().unwrap();
    assert!(
        message.contains("cannot enforce the device allow-list"),
        "{s}"
    );
    assert!(message.contains("cgroup2"), "{s}");

    // The toolbox the same way.
    let toolbox_ran = marker.path().join("toolbox-ran");
    let out = without_cgroup2(env!("CARGO_BIN_EXE_unitctl"))
        .args([
            "run",
            "--store",
            store.to_str().unwrap(),
            "--image",
            "devimg",
        ])
        .arg("--bind")
        .arg(format!("{}:/m", marker.path().display()))
        .args(["--", "/bin/touch", "/m/toolbox-ran"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the toolbox cannot enforce the device allow-list"),
        "{stderr}"
    );
    assert!(!toolbox_ran.exists(), "the toolbox ran unfiltered");
}

#[test]
fn packet_sockets_on_the_host_network_need_net_raw() {
    let disk = Disk::new();
    let store = store(&disk);
    // busybox arping opens socket(AF_PACKET) first; on lo it then stops ("not ARPable").
    let script = "arping -c 1 -I lo 127.0.0.1 2>&1; echo done";
    let (_m, logs) = run_units(
        &store,
        &[
            ("sniffer", unit(&store, script, "network = \"host\"")),
            (
                "pinger",
                unit(
                    &store,
                    script,
                    "network = \"host\"\ncapabilities = [\"NET_RAW\"]",
                ),
            ),
        ],
    );
    let [sniffer, pinger] = [&logs[0], &logs[1]];
    assert!(
        sniffer.contains("socket: Operation not permitted"),
        "{sniffer}"
    );
    assert!(pinger.contains("not ARPable"), "{pinger}");
    assert!(
        !pinger.contains("socket: Operation not permitted"),
        "{pinger}"
    );
}
