//! End-to-end tests of the container runtime (as root, with /bin/busybox from busybox-static).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod runtime_common;

use std::time::Duration;

use flotilla_container::runtime::{
    run, spawn, BindMount, Capability, CgroupDir, ContainerError, IdMapping, NetworkMode, RootFs,
    Stdio,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use runtime_common::{field, pipe, read_all, require_root, run_capture, TestRoot};

const ISOLATION_SCRIPT: &str = r#"
echo "pid=$$"
echo "procs=$(ls /proc | grep -c '^[0-9][0-9]*$')"
echo "host=$(hostname)"
echo "kcore=$(cat /proc/kcore 2>/dev/null | wc -c)"
echo "keys=$(cat /proc/keys 2>/dev/null | wc -c)"
echo "firmware=$(ls -A /sys/firmware | wc -l)"
if echo x > /proc/sys/kernel/hostname 2>/dev/null; then echo "sysctl=writable"; else echo "sysctl=readonly"; fi
grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\t ' | sed 's/:/=/'
echo "fds=$(ls /proc/self/fd | tr '\n' ' ')"
echo "dev=$(ls /dev | tr '\n' ' ')"
echo "mounts=$(grep -c . /proc/mounts)"
"#;

#[test]
fn isolation() {
    require_root();
    let root = TestRoot::new();
    let out = run_capture(&root.spec(ISOLATION_SCRIPT));
    let o = &out.stdout;
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(field(o, "pid="), Some("1"), "{o}");
    let procs: u32 = field(o, "procs=").unwrap().parse().unwrap();
    assert!(procs <= 6, "sees host processes: {o}");
    assert_eq!(field(o, "host="), Some("box"));
    assert_eq!(field(o, "kcore="), Some("0"), "{o}");
    assert_eq!(field(o, "keys="), Some("0"), "{o}");
    assert_eq!(field(o, "firmware="), Some("0"), "{o}");
    assert_eq!(field(o, "sysctl="), Some("readonly"), "{o}");
    assert_eq!(field(o, "CapEff="), Some("00000000a00405fb"), "{o}");
    assert_eq!(field(o, "CapPrm="), Some("00000000a00405fb"), "{o}");
    assert_eq!(field(o, "CapBnd="), Some("00000000a00405fb"), "{o}");
    assert_eq!(field(o, "NoNewPrivs="), Some("1"), "{o}");
    assert_eq!(field(o, "Seccomp="), Some("2"), "{o}");
    let fds: Vec<&str> = field(o, "fds=").unwrap().split_whitespace().collect();
    assert!(
        fds.len() <= 4 && fds[..3] == ["0", "1", "2"],
        "leaked fds: {o}"
    );
    let dev = field(o, "dev=").unwrap();
    for node in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "mqueue", "fd",
        "stdin",
    ] {
        assert!(
            dev.split_whitespace().any(|d| d == node),
            "/dev lacks {node}: {o}"
        );
    }
}

/// The masks alone, not the dropped capabilities: with `CAP_SYS_RAWIO` kept (which lets root
/// read `/proc/kcore`) every masked file that exists is still the empty `/dev/null` node
/// (char 1:3) and every masked directory still empty, so `/proc/kcore` reads nothing.
#[test]
fn masked_paths_hold_with_sys_rawio() {
    require_root();
    let root = TestRoot::new();
    let mut spec = root.spec(
        r#"grep -E '^CapEff:' /proc/self/status | tr -d '\t ' | sed 's/:/=/'
for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats; do
  [ -e "$f" ] && echo "file $f $(stat -c '%F %t:%T' "$f")"
done
for d in /proc/acpi /proc/scsi /sys/firmware; do
  [ -e "$d" ] && echo "dir $d $(ls -A "$d" | wc -l)"
done
echo "kcore=$(head -c 4096 /proc/kcore 2>/dev/null | wc -c)"
"#,
    );
    let mut caps = flotilla_container::runtime::DEFAULT_CAPABILITIES.to_vec();
    caps.push(Capability::SysRawio);
    spec.capabilities = Some(caps);
    let out = run_capture(&spec);
    let o = &out.stdout;
    assert_eq!(out.code(), 0, "{out:?}");
    let eff = u64::from_str_radix(field(o, "CapEff=").unwrap(), 16).unwrap();
    assert_ne!(eff & (1 << 17), 0, "CAP_SYS_RAWIO kept: {o}");
    let files: Vec<&str> = o.lines().filter(|l| l.starts_with("file ")).collect();
    // Which exist depends on the kernel (this CI host's has no /proc/kcore at all).
    assert!(files.len() >= 2, "too few masked files exist to test: {o}");
    for line in &files {
        assert!(
            line.ends_with("character special file 1:3"),
            "not masked: {line}"
        );
    }
    for line in o.lines().filter(|l| l.starts_with("dir ")) {
        assert!(line.ends_with(" 0"), "not masked: {line}");
    }
    assert_eq!(field(o, "kcore="), Some("0"), "{o}");
}

#[test]
fn seccomp_and_caps_can_be_turned_off() {
    require_root();
    let root = TestRoot::new();
    let mut spec = root.spec(
        "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t ' | sed 's/:/=/'",
    );
    spec.seccomp = false;
    spec.no_new_privileges = false;
    spec.capabilities = Some(vec![Capability::NetAdmin, Capability::SysAdmin]);
    let out = run_capture(&spec);
    assert_eq!(field(&out.stdout, "Seccomp="), Some("0"), "{out:?}");
    assert_eq!(field(&out.stdout, "NoNewPrivs="), Some("0"), "{out:?}");
    assert_eq!(
        field(&out.stdout, "CapEff="),
        Some("0000000000201000"),
        "{out:?}"
    );
}

#[test]
fn seccomp_denies_with_eperm() {
    require_root();
    let root = TestRoot::new();
    // Even with CAP_SYS_ADMIN-less root, mount is refused by the filter (EPERM either way),
    // so check a syscall that only the filter blocks: sethostname is allowed, swapoff is not.
    let mut spec =
        root.spec("swapoff /nonexistent; echo rc=$?; hostname other && echo host=$(hostname)");
    spec.capabilities = Some(vec![Capability::SysAdmin]);
    std::os::unix::fs::symlink("busybox", root.layer.join("bin/swapoff")).unwrap();
    let out = run_capture(&spec);
    assert!(out.stderr.contains("Operation not permitted"), "{out:?}");
    assert_eq!(field(&out.stdout, "host="), Some("other"), "{out:?}");
}

#[test]
fn overlay_writes_go_to_upper() {
    require_root();
    let root = TestRoot::new();
    let out =
        run_capture(&root.spec("echo hi > /newfile && echo changed > /etc/group && cat /newfile"));
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "hi\n");
    assert_eq!(
        std::fs::read_to_string(root.state.join("upper/newfile")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.state.join("upper/etc/group")).unwrap(),
        "changed\n"
    );
    assert!(!root.layer.join("newfile").exists());
    assert_eq!(
        std::fs::read_to_string(root.layer.join("etc/group")).unwrap(),
        "root:x:0:\n"
    );
    // The state persists into the next run (like a restarted container).
    let out = run_capture(&root.spec("cat /newfile"));
    assert_eq!(out.stdout, "hi\n");
}

#[test]
fn read_only_overlay_root() {
    require_root();
    let root = TestRoot::new();
    let out = run_capture(&root.spec_ro(
        "touch /newfile; echo rc=$?; echo tmp > /dev/shm/x && echo shm=ok",
        true,
    ));
    assert_eq!(field(&out.stdout, "rc="), Some("1"), "{out:?}");
    assert!(out.stderr.contains("Read-only file system"), "{out:?}");
    assert_eq!(field(&out.stdout, "shm="), Some("ok"), "{out:?}");
    // The upper dir only ever receives missing mount points, before the root is sealed.
    assert!(!root.state.join("upper/newfile").exists());
    // Two layers, read-only.
    let top = root.dir.path().join("top");
    std::fs::create_dir_all(top.join("etc")).unwrap();
    std::fs::write(top.join("etc/motd"), "from the top layer\n").unwrap();
    let mut spec = root.spec("cat /etc/motd; touch /x; echo rc=$?");
    spec.root = RootFs::Overlay {
        layers: vec![root.layer.clone(), top],
        state_dir: root.state.clone(),
        read_only: true,
        in_memory: false,
    };
    let out = run_capture(&spec);
    assert!(out.stdout.contains("from the top layer"), "{out:?}");
    assert_eq!(field(&out.stdout, "rc="), Some("1"), "{out:?}");
}

#[test]
fn bind_mounts_ro_rw_and_symlink_escape() {
    require_root();
    let root = TestRoot::new();
    let rw = root.dir.path().join("rw");
    let ro = root.dir.path().join("ro");
    let sneaky = root.dir.path().join("sneaky-src");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&sneaky).unwrap();
    std::fs::write(ro.join("f"), "ro content\n").unwrap();
    std::fs::write(sneaky.join("marker"), "marker\n").unwrap();
    let host_target = root.dir.path().join("host-target-must-not-exist");
    // In the image: /data -> <absolute host path>.
    std::os::unix::fs::symlink(&host_target, root.layer.join("data")).unwrap();
    let mut spec = root.spec(
        "echo written > /mnt/rw/out && echo rw=ok; cat /mnt/ro/f; echo x > /mnt/ro/g; echo ro_rc=$?; \
         cat /data/marker; echo config > /etc/x.conf",
    );
    let file_src = root.dir.path().join("file.conf");
    std::fs::write(&file_src, "a file\n").unwrap();
    spec.mounts = vec![
        BindMount {
            source: rw.clone(),
            destination: "/mnt/rw".into(),
            read_only: false,
        },
        BindMount {
            source: ro.clone(),
            destination: "/mnt/ro".into(),
            read_only: true,
        },
        BindMount {
            source: sneaky,
            destination: "/data".into(),
            read_only: true,
        },
        BindMount {
            source: file_src,
            destination: "/new/dir/file.conf".into(),
            read_only: true,
        },
    ];
    spec.args[2].push_str("; cat /new/dir/file.conf");
    let out = run_capture(&spec);
    assert_eq!(field(&out.stdout, "rw="), Some("ok"), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "written\n"
    );
    assert!(out.stdout.contains("ro content"), "{out:?}");
    assert_eq!(field(&out.stdout, "ro_rc="), Some("1"), "{out:?}");
    assert!(!ro.join("g").exists());
    // The symlink's target was created inside the root, not on the host.
    assert!(out.stdout.contains("marker"), "{out:?}");
    assert!(
        !host_target.exists(),
        "a mount point was created on the host"
    );
    let inside = root
        .state
        .join("upper")
        .join(host_target.strip_prefix("/").unwrap());
    assert!(inside.is_dir(), "{} missing", inside.display());
    assert!(out.stdout.contains("a file"), "{out:?}");
}

#[test]
fn exit_codes_and_signals() {
    require_root();
    let root = TestRoot::new();
    assert_eq!(run_capture(&root.spec("exit 3")).code(), 3);
    // run(): a command killed by SIGTERM → 128+15 (with the init, the command is not pid 1,
    // which the kernel shields from its own signals).
    let mut spec = root.spec("kill -TERM $$; sleep 5");
    spec.init = true;
    assert_eq!(run(&spec, Stdio::default(), None).unwrap(), 143);
    // Killed from the host.
    let spawned = spawn(&root.spec("sleep 100"), Stdio::default(), None).unwrap();
    kill(spawned.pid, Signal::SIGKILL).unwrap();
    assert!(matches!(
        waitpid(spawned.pid, None).unwrap(),
        WaitStatus::Signaled(_, Signal::SIGKILL, _)
    ));
}

#[test]
fn init_reaps_zombies_and_forwards_sigterm() {
    require_root();
    let root = TestRoot::new();
    let mut spec = root.spec(
        "(sleep 0.2 &); sleep 1; \
         for s in /proc/[0-9]*/stat; do read -r l < $s 2>/dev/null && case \"$l\" in *') Z '*) echo zombie: $l;; esac; done; \
         echo pid=$$; echo done",
    );
    spec.init = true;
    let out = run_capture(&spec);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(!out.stdout.contains("zombie"), "{out:?}");
    assert_eq!(field(&out.stdout, "pid="), Some("2"), "{out:?}");
    assert!(out.stdout.contains("done"));

    let mut spec = root.spec("sleep 100");
    spec.init = true;
    let spawned = spawn(&spec, Stdio::default(), None).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    kill(spawned.pid, Signal::SIGTERM).unwrap();
    assert_eq!(
        waitpid(spawned.pid, None).unwrap(),
        WaitStatus::Exited(spawned.pid, 143)
    );
}

#[test]
fn network_none_has_only_lo() {
    require_root();
    let root = TestRoot::new();
    let mut spec = root.spec("ls /sys/class/net | tr '\\n' ' '; echo; grep -c : /proc/net/dev; cat /sys/class/net/lo/operstate /sys/class/net/lo/flags");
    spec.network = NetworkMode::None;
    let out = run_capture(&spec);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0].trim(), "lo", "{out:?}");
    assert_eq!(lines[1], "1", "{out:?}");
    // IFF_UP is bit 0.
    let flags = u32::from_str_radix(lines[3].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is not up: {out:?}");

    let mut spec = root.spec("grep -c : /proc/net/dev");
    spec.network = NetworkMode::Host;
    let out = run_capture(&spec);
    let host_ifaces = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .matches(':')
        .count();
    assert_eq!(out.stdout.trim(), host_ifaces.to_string(), "{out:?}");
}

#[test]
fn host_read_only_root() {
    require_root();
    let root = TestRoot::new();
    std::fs::create_dir_all(root.layer.join("data")).unwrap();
    let rw = root.dir.path().join("rw");
    std::fs::create_dir_all(&rw).unwrap();
    let mut spec = root.spec("touch /x; echo rc=$?; echo ok > /data/f && echo data=ok; cat /proc/self/mountinfo | grep -c ' / / '");
    spec.root = RootFs::HostReadOnly {
        path: root.layer.clone(),
    };
    spec.mounts = vec![BindMount {
        source: rw.clone(),
        destination: "/data".into(),
        read_only: false,
    }];
    let out = run_capture(&spec);
    assert_eq!(field(&out.stdout, "rc="), Some("1"), "{out:?}");
    assert_eq!(field(&out.stdout, "data="), Some("ok"), "{out:?}");
    assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "ok\n");
    assert!(!root.layer.join("x").exists());

    // The real host root, with the host's own shell.
    let mut spec =
        root.spec("touch /flotilla-must-not-exist 2>/dev/null && echo BAD || echo ro=yes; echo $$");
    spec.root = RootFs::HostReadOnly { path: "/".into() };
    spec.args[0] = "/bin/sh".into();
    let out = run_capture(&spec);
    assert_eq!(field(&out.stdout, "ro="), Some("yes"), "{out:?}");
    assert!(!std::path::Path::new("/flotilla-must-not-exist").exists());
}

#[test]
fn setup_errors_come_back() {
    require_root();
    let root = TestRoot::new();
    let mut spec = root.spec("true");
    spec.cwd = "/does/not/exist".into();
    let err = spawn(&spec, Stdio::default(), None).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ContainerError::Child { .. }), "{text}");
    assert!(
        text.contains("chdir to the working directory /does/not/exist"),
        "{text}"
    );
    assert!(text.contains("No such file"), "{text}");

    let mut spec = root.spec("true");
    spec.args = vec!["no-such-program".into()];
    let text = spawn(&spec, Stdio::default(), None)
        .unwrap_err()
        .to_string();
    assert!(text.contains("exec no-such-program"), "{text}");
    assert!(text.contains("not in the image"), "{text}");

    // The same with the init: the command's failure still comes back.
    spec.init = true;
    let text = spawn(&spec, Stdio::default(), None)
        .unwrap_err()
        .to_string();
    assert!(text.contains("exec no-such-program"), "{text}");

    // Checked before any fork. (An unknown capability can no longer reach the runtime: the
    // spec holds `Capability` values, and the unit parser refuses unknown names.)
    let mut spec = root.spec("");
    spec.args.clear();
    assert!(matches!(
        spawn(&spec, Stdio::default(), None),
        Err(ContainerError::InvalidSpec(_))
    ));
    let mut spec = root.spec("true");
    spec.mounts = vec![BindMount {
        source: "/no/such/source".into(),
        destination: "/x".into(),
        read_only: true,
    }];
    let text = spawn(&spec, Stdio::default(), None)
        .unwrap_err()
        .to_string();
    assert!(text.contains("/no/such/source"), "{text}");
}

/// Pid 1 starts in the leaf cgroup (cloned into it) and its cgroup namespace is rooted
/// there.
#[test]
fn cgroup_namespace_rooted_at_leaf() {
    starts_in_leaf_cgroup(false, true);
}

/// The same in a user namespace, whose root cannot be cloned into a host cgroup: the setup
/// joins it while still host root.
#[test]
fn cgroup_namespace_rooted_at_leaf_in_a_user_namespace() {
    starts_in_leaf_cgroup(true, true);
}

/// A reused cgroup, killed once with `cgroup.kill` (as the manager does when a unit's main
/// process exits): joined by writing `cgroup.procs`, and the container runs. (Cloned into
/// it instead, Linux 6.14-6.18 kill the new process at once.)
#[test]
fn a_killed_cgroup_is_joined_not_cloned_into() {
    starts_in_leaf_cgroup(false, false);
}

fn starts_in_leaf_cgroup(userns: bool, fresh: bool) {
    require_root();
    let base = runtime_common::own_cgroup2_dir();
    let leaf = base.join(format!(
        "flotilla-rt-test-{}-{userns}-{fresh}",
        std::process::id()
    ));
    std::fs::create_dir(&leaf).unwrap();
    if !fresh {
        std::fs::write(leaf.join("cgroup.kill"), "1").unwrap();
    }
    let dir = std::fs::File::open(&leaf).unwrap();
    let root = TestRoot::new();
    let (out_r, out_w) = pipe();
    let mut spec = root.spec("grep '^0::' /proc/self/cgroup; sleep 1");
    if userns {
        spec.user_namespace = Some(IdMapping {
            container_id: 0,
            host_id: 200000,
            size: 65536,
        });
    }
    let spawned = spawn(
        &spec,
        Stdio {
            stdin: None,
            stdout: Some(out_w),
            stderr: None,
        },
        Some(CgroupDir {
            dir: std::os::fd::AsFd::as_fd(&dir),
            fresh,
        }),
    );
    let result = spawned.map(|s| {
        std::thread::sleep(Duration::from_millis(300));
        let members = std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap();
        let out = read_all(out_r);
        let status = waitpid(s.pid, None).unwrap();
        (s.pid, members, out, status)
    });
    let removed = std::fs::remove_dir(&leaf);
    let (pid, members, out, status) = result.unwrap();
    removed.unwrap();
    assert!(
        members.lines().any(|l| l == pid.to_string()),
        "{pid} not in {members}"
    );
    assert_eq!(out.trim(), "0::/");
    assert_eq!(status, WaitStatus::Exited(pid, 0));
}

#[test]
fn run_with_piped_stdio() {
    require_root();
    let root = TestRoot::new();
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    rustix::io::write(&in_w, b"from stdin\n").unwrap();
    drop(in_w);
    let mut spec = root.spec("read line; echo \"got $line\"; echo oops >&2; echo $PWD; exit 5");
    spec.cwd = "/tmp".into();
    let code = run(
        &spec,
        Stdio {
            stdin: Some(in_r),
            stdout: Some(out_w),
            stderr: Some(err_w),
        },
        None,
    )
    .unwrap();
    assert_eq!(code, 5);
    assert_eq!(read_all(out_r), "got from stdin\n/tmp\n");
    assert_eq!(read_all(err_r), "oops\n");
}

#[test]
fn user_and_rlimits() {
    require_root();
    let root = TestRoot::new();
    let mut spec = root.spec("id -u; id -g; id -G; ulimit -n; grep -E '^(CapEff|CapAmb):' /proc/self/status | tr -d '\\t ' | sed 's/:/=/'; touch /root/x; echo rc=$?");
    spec.user = flotilla_container::runtime::User {
        uid: 1000,
        gid: 1001,
        additional_gids: vec![20, 30],
    };
    spec.rlimits = vec![flotilla_container::runtime::Rlimit {
        resource: flotilla_container::runtime::RlimitResource::Nofile,
        soft: 256,
        hard: 512,
    }];
    let out = run_capture(&spec);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[..4], ["1000", "1001", "1001 20 30", "256"], "{out:?}");
    assert_eq!(
        field(&out.stdout, "CapEff="),
        Some("00000000a00405fb"),
        "{out:?}"
    );
    assert_eq!(
        field(&out.stdout, "CapAmb="),
        Some("00000000a00405fb"),
        "{out:?}"
    );
}

#[test]
fn user_namespace() {
    require_root();
    let root = TestRoot::new();
    let mut spec = root.spec("cat /proc/self/uid_map; id -u; echo hi > /x && cat /x");
    spec.user_namespace = Some(IdMapping {
        container_id: 0,
        host_id: 200000,
        size: 65536,
    });
    let out = run_capture(&spec);
    assert_eq!(out.code(), 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["0", "200000", "65536"],
        "{out:?}"
    );
    assert_eq!(lines[1], "0");
    assert_eq!(lines[2], "hi", "{out:?}");
    assert!(root.state.join("upper/x").exists());
}

/// `in_memory`: the writable layer lives in a tmpfs of the container's own mount namespace.
/// Two containers share one state directory at once, each sees only its own writes, and
/// nothing reaches the host's directory.
#[test]
fn in_memory_root_writes_nothing_on_the_host() {
    require_root();
    let root = TestRoot::new();
    let in_memory = |script: &str| {
        let mut spec = root.spec(script);
        if let RootFs::Overlay { in_memory, .. } = &mut spec.root {
            *in_memory = true;
        }
        spec
    };
    let (out_r, out_w) = pipe();
    let first = spawn(
        &in_memory("echo one > /x; sleep 1; cat /x"),
        Stdio {
            stdin: None,
            stdout: Some(out_w),
            stderr: None,
        },
        None,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let second = run_capture(&in_memory(
        "cat /x 2>/dev/null || echo none; echo two > /x; cat /x; stat -c %a /",
    ));
    assert_eq!(second.code(), 0, "{second:?}");
    // The root's mode is the upper dir's: 755 as on disk, so other users can walk it.
    assert_eq!(second.stdout, "none\ntwo\n755\n");
    assert_eq!(read_all(out_r), "one\n");
    assert_eq!(
        waitpid(first.pid, None).unwrap(),
        WaitStatus::Exited(first.pid, 0)
    );
    let left: Vec<_> = std::fs::read_dir(&root.state).unwrap().collect();
    assert!(left.is_empty(), "the host's state dir: {left:?}");
}

/// A new pseudo-terminal: (master, slave).
fn openpty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc pty calls on fds this test owns.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0);
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(master, name.as_mut_ptr(), name.len()), 0);
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(slave >= 0);
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

#[test]
fn terminal_becomes_controlling_tty() {
    require_root();
    let root = TestRoot::new();
    let (master, slave) = openpty();
    let mut spec = root.spec(
        "[ -t 0 ] && echo tty=yes; read -r a b c d e f g rest < /proc/self/stat; echo sid=$f; echo tty_nr=$g",
    );
    spec.terminal = true;
    let stdio = Stdio {
        stdin: Some(slave.try_clone().unwrap()),
        stdout: Some(slave.try_clone().unwrap()),
        stderr: Some(slave),
    };
    let spawned = spawn(&spec, stdio, None).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    // The master reads EIO once every slave fd is closed.
    while let Ok(n) = rustix::io::read(&master, &mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let status = waitpid(spawned.pid, None).unwrap();
    let out = String::from_utf8_lossy(&out).replace('\r', "");
    assert_eq!(status, WaitStatus::Exited(spawned.pid, 0), "{out}");
    assert_eq!(field(&out, "tty="), Some("yes"), "{out}");
    assert_eq!(field(&out, "sid="), Some("1"), "{out}");
    assert_ne!(field(&out, "tty_nr="), Some("0"), "{out}");
}

/// Not a check: how long a `true` container takes (`cargo test -- --ignored --nocapture`).
#[test]
#[ignore]
fn bench_spawn_true() {
    require_root();
    let root = TestRoot::new();
    let mut spec = root.spec("true");
    spec.args = vec!["/bin/true".into()];
    let n = 50;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let s = spawn(&spec, Stdio::default(), None).unwrap();
        waitpid(s.pid, None).unwrap();
    }
    eprintln!("{:?} per container", start.elapsed() / n);
}

/// The symlink swap: container A may write a host directory; it replaces a subdirectory with
/// a symlink to `/`. Container B, which binds that subdirectory (e.g. a later unit, or the
/// next start of a unit binding its own state below A's), must not get the host's root: the
/// bind source is resolved without following symlinks and the start is refused, naming the
/// path and the symlink. So is a symlink in the middle of a path, and `create = true`
/// (`create_dir_all_nofollow`) through one.
#[test]
fn bind_source_swapped_for_a_symlink_is_refused() {
    require_root();
    let root = TestRoot::new();
    for applet in ["ln", "rm", "rmdir"] {
        std::os::unix::fs::symlink("busybox", root.layer.join("bin").join(applet)).unwrap();
    }
    let shared = root.dir.path().join("shared");
    std::fs::create_dir_all(shared.join("sub")).unwrap();
    std::fs::write(shared.join("sub/own-file"), "mine\n").unwrap();

    // B before the attack: binds shared/sub and sees its own file.
    let bind_sub = |source: std::path::PathBuf| BindMount {
        source,
        destination: "/mnt/sub".into(),
        read_only: true,
    };
    let mut b = root.spec("ls /mnt/sub");
    b.mounts = vec![bind_sub(shared.join("sub"))];
    let out = run_capture(&b);
    assert!(out.stdout.contains("own-file"), "{out:?}");

    // A, from inside its container: swap sub for a symlink to /.
    let mut a = root.spec("rm -rf /shared/sub && ln -s / /shared/sub && echo swapped=yes");
    a.mounts = vec![BindMount {
        source: shared.clone(),
        destination: "/shared".into(),
        read_only: false,
    }];
    let out = run_capture(&a);
    assert_eq!(field(&out.stdout, "swapped="), Some("yes"), "{out:?}");
    assert_eq!(
        std::fs::read_link(shared.join("sub")).unwrap(),
        std::path::Path::new("/")
    );

    // B after the attack: refused before any fork, with the path and the symlink named.
    let mut b = root.spec("ls /mnt/sub/etc/shadow && echo GOT-THE-HOST-ROOT");
    b.mounts = vec![bind_sub(shared.join("sub"))];
    let err = spawn(&b, Stdio::default(), None).unwrap_err();
    let text = err.to_string();
    // The source is opened by the setup process (bounded by the setup timeout), which
    // reports the symlink it met: the step says what to do, the path is the symlink.
    match &err {
        ContainerError::Child { step, path, source } => {
            assert!(step.contains("is a symlink"), "{step}");
            assert_eq!(path.as_deref(), Some(shared.join("sub").as_path()));
            assert_eq!(source.raw_os_error(), Some(libc::ELOOP));
        }
        other => panic!("expected the symlink refusal, got {other:?}"),
    }
    assert!(text.contains("name the real path"), "{text}");

    // A symlink in the middle of the path: shared/sub/etc would be the host's /etc.
    let mut b = root.spec("cat /mnt/sub/hostname");
    b.mounts = vec![bind_sub(shared.join("sub/etc"))];
    let err = spawn(&b, Stdio::default(), None).unwrap_err();
    assert!(
        matches!(&err, ContainerError::Child { path: Some(p), .. } if p == &shared.join("sub")),
        "{err}"
    );

    // create = true through the symlink: nothing is made on the host.
    let marker = format!("flotilla-test-created-{}", std::process::id());
    let through = shared.join("sub").join(&marker).join("state");
    let err = flotilla_container::runtime::create_dir_all_nofollow(&through).unwrap_err();
    assert!(matches!(err, ContainerError::SymlinkInPath { .. }), "{err}");
    assert!(!std::path::Path::new("/").join(&marker).exists());
    // Without a symlink it makes the directories (and accepts existing ones).
    let fine = shared.join("real/state");
    flotilla_container::runtime::create_dir_all_nofollow(&fine).unwrap();
    flotilla_container::runtime::create_dir_all_nofollow(&fine).unwrap();
    assert!(fine.is_dir());
}

/// Build `runtime_common/abi_probe.c` (raw syscalls, bypassing libc) into the test root as
/// `/bin/abi_probe`.
fn with_abi_probe(root: &TestRoot) {
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/runtime_common/abi_probe.c"
    );
    let out = std::process::Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(root.layer.join("bin/abi_probe"))
        .arg(src)
        .output()
        .expect("cc is missing: install gcc (Debian package gcc) for the seccomp tests");
    assert!(out.status.success(), "{out:?}");
}

/// `abi_probe ARGS` in a container (default seccomp filter, or none): its `rc=` and the
/// shell's view of its exit status.
fn probe(root: &TestRoot, args: &str, seccomp: bool) -> (Option<i64>, String) {
    let mut spec = root.spec(&format!("/bin/abi_probe {args}; echo status=$?"));
    spec.seccomp = seccomp;
    let out = run_capture(&spec);
    assert_eq!(out.code(), 0, "{out:?}");
    let rc = field(&out.stdout, "rc=").map(|v| v.parse().unwrap());
    (
        rc,
        field(&out.stdout, "status=").unwrap_or_default().to_owned(),
    )
}

/// io_uring_setup answers EPERM under the default filter. Without the filter the same
/// container (same capabilities, no_new_privs) gets a ring: the filter alone blocks it.
#[test]
fn seccomp_blocks_io_uring() {
    require_root();
    let root = TestRoot::new();
    with_abi_probe(&root);
    assert_eq!(probe(&root, "uring", true).0, Some(-i64::from(libc::EPERM)));
    let (rc, _) = probe(&root, "uring", false);
    assert!(
        rc.unwrap() >= 0,
        "io_uring_setup without the filter: {rc:?}"
    );
}

/// The x32 ABI (syscall number | 0x40000000, same AUDIT_ARCH_X86_64) cannot slip past the
/// deny-list: every x32 call answers EPERM from the filter. Without the filter this kernel
/// answers ENOSYS (no x32 support built in), so EPERM shows the filter decided; on a kernel
/// with x32 the call would have run. The same number without the x32 bit is allowed.
#[test]
fn seccomp_denies_the_x32_abi() {
    require_root();
    let root = TestRoot::new();
    with_abi_probe(&root);
    let eperm = Some(-i64::from(libc::EPERM));
    // getpid (39): harmless, so only the ABI check can refuse it.
    assert_eq!(probe(&root, "x32 39", true).0, eperm);
    // io_uring_setup (425) and mount (165) by the x32 door.
    assert_eq!(probe(&root, "x32 425", true).0, eperm);
    assert_eq!(probe(&root, "x32 165", true).0, eperm);
    let native = probe(&root, "native 39", true).0.unwrap();
    assert!(native > 0, "native getpid: {native}");
    assert_ne!(probe(&root, "x32 39", false).0, eperm);
}

/// A 32-bit `int 0x80` syscall (the i386 ABI, other numbers, not covered by the x86_64
/// deny-list) kills the process. Without the filter the same call succeeds.
#[test]
fn seccomp_kills_the_i386_abi() {
    require_root();
    let root = TestRoot::new();
    with_abi_probe(&root);
    // getpid is 20 on i386.
    let (rc, status) = probe(&root, "i386 20", true);
    assert_eq!(rc, None, "the call returned");
    assert_eq!(status, (128 + libc::SIGSYS).to_string());
    let (rc, status) = probe(&root, "i386 20", false);
    assert!(rc.unwrap() > 0, "{rc:?}");
    assert_eq!(status, "0");
}

/// Without CAP_SYS_ADMIN, `clone(CLONE_NEWUSER)` (which needs no capability) is denied like
/// `unshare`, and `clone3` answers ENOSYS (libc falls back to `clone`). Without the filter
/// the same container creates the user namespace.
#[test]
fn seccomp_denies_namespaces_by_clone() {
    require_root();
    let root = TestRoot::new();
    with_abi_probe(&root);
    assert_eq!(
        probe(&root, "newuser", true).0,
        Some(-i64::from(libc::EPERM))
    );
    assert_eq!(
        probe(&root, "native 435", true).0,
        Some(-i64::from(libc::ENOSYS))
    );
    let (rc, _) = probe(&root, "newuser", false);
    assert!(
        rc.unwrap() > 0,
        "clone(CLONE_NEWUSER) without the filter: {rc:?}"
    );
}

/// Image layers in a store only root may enter (`STORE/` 0700, `STORE/layers/` 0755) still
/// make the root of a container in a user namespace, whose root (host uid 200000) could not
/// walk that path: the layers are named relative to `STORE/layers`, entered by the caller.
#[test]
fn user_namespace_over_layers_in_a_private_store() {
    require_root();
    let root = TestRoot::new();
    let store = root.dir.path().join("store");
    std::fs::create_dir_all(store.join("layers")).unwrap();
    let layer = store.join("layers/busybox");
    std::fs::rename(&root.layer, &layer).unwrap();
    std::fs::set_permissions(&store, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut spec = root.spec("id -u; echo hi > /x && cat /x");
    spec.root = RootFs::Overlay {
        layers: vec![layer],
        state_dir: root.state.clone(),
        read_only: false,
        in_memory: false,
    };
    spec.user_namespace = Some(IdMapping {
        container_id: 0,
        host_id: 200000,
        size: 65536,
    });
    let out = run_capture(&spec);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "0\nhi\n", "{out:?}");
}

/// Each syscall of the default filter's deny-list probed alone, as a raw `syscall`
/// (name, number, arguments, the one capability kept). The capability is the one the kernel
/// would check, so that with the filter off the call gets past the capability check; the
/// arguments are harmless ones the kernel answers with something other than `EPERM` (a
/// result, `EINVAL`, `EFAULT`, `EBADF`, or `ENOSYS` where this kernel lacks the feature):
/// without the filter the answer shows the probe reached the kernel. The `CAP_SYS_ADMIN`
/// group (mount API, `unshare`, `setns`) is denied only without `CAP_SYS_ADMIN` (by design:
/// with it they are allowed), so those run with the default capabilities and arguments the
/// kernel rejects before any capability check. (`ptrace` is not in the profile: allowed, as in
/// Docker's on kernels from 4.8.)
const DENIED_ALONE: &[(&str, libc::c_long, &str, Option<&str>)] = &[
    ("keyctl", libc::SYS_keyctl, "9999", None),
    ("add_key", libc::SYS_add_key, "0", None),
    ("request_key", libc::SYS_request_key, "0", None),
    ("bpf", libc::SYS_bpf, "0 0 0", Some("BPF")),
    (
        "perf_event_open",
        libc::SYS_perf_event_open,
        "0 0 -1 -1 0",
        Some("PERFMON"),
    ),
    (
        "userfaultfd",
        libc::SYS_userfaultfd,
        "0x80000",
        Some("SYS_PTRACE"),
    ),
    ("io_uring_setup", libc::SYS_io_uring_setup, "1 0", None),
    (
        "io_uring_enter",
        libc::SYS_io_uring_enter,
        "-1 0 0 0 0",
        None,
    ),
    (
        "io_uring_register",
        libc::SYS_io_uring_register,
        "-1 0 0 0",
        None,
    ),
    (
        "kexec_load",
        libc::SYS_kexec_load,
        "0 17 0 0",
        Some("SYS_BOOT"),
    ),
    (
        "kexec_file_load",
        libc::SYS_kexec_file_load,
        "-1 -1 0 0 0",
        Some("SYS_BOOT"),
    ),
    (
        "init_module",
        libc::SYS_init_module,
        "0 0 0",
        Some("SYS_MODULE"),
    ),
    (
        "finit_module",
        libc::SYS_finit_module,
        "-1 0 0",
        Some("SYS_MODULE"),
    ),
    (
        "delete_module",
        libc::SYS_delete_module,
        "0 0",
        Some("SYS_MODULE"),
    ),
    ("reboot", libc::SYS_reboot, "0 0 0 0", Some("SYS_BOOT")),
    ("swapon", libc::SYS_swapon, "0 0", Some("SYS_ADMIN")),
    ("swapoff", libc::SYS_swapoff, "0", Some("SYS_ADMIN")),
    ("syslog", libc::SYS_syslog, "10 0 0", Some("SYSLOG")),
    (
        "settimeofday",
        libc::SYS_settimeofday,
        "0 0",
        Some("SYS_TIME"),
    ),
    (
        "clock_settime",
        libc::SYS_clock_settime,
        "9999 0",
        Some("SYS_TIME"),
    ),
    (
        "clock_adjtime",
        libc::SYS_clock_adjtime,
        "9999 0",
        Some("SYS_TIME"),
    ),
    ("adjtimex", libc::SYS_adjtimex, "0", Some("SYS_TIME")),
    (
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        "-1 0 0",
        Some("DAC_READ_SEARCH"),
    ),
    ("acct", libc::SYS_acct, "0", Some("SYS_PACCT")),
    ("quotactl", libc::SYS_quotactl, "0 0 0 0", Some("SYS_ADMIN")),
    (
        "lookup_dcookie",
        libc::SYS_lookup_dcookie,
        "0 0 0",
        Some("SYS_ADMIN"),
    ),
    ("iopl", libc::SYS_iopl, "0", Some("SYS_RAWIO")),
    ("ioperm", libc::SYS_ioperm, "0 0 0", Some("SYS_RAWIO")),
    ("uselib", libc::SYS_uselib, "0", None),
    ("_sysctl", libc::SYS__sysctl, "0", None),
    ("mount", libc::SYS_mount, "0 0 0 0 0", None),
    ("umount2", libc::SYS_umount2, "0 0x80000000", None),
    ("open_tree", libc::SYS_open_tree, "-1 0 0", None),
    ("fsconfig", libc::SYS_fsconfig, "-1 0 0 0 0", None),
    ("mount_setattr", libc::SYS_mount_setattr, "-1 0 0 0 0", None),
    ("unshare", libc::SYS_unshare, "0", None),
    ("setns", libc::SYS_setns, "-1 0", None),
];

/// The deny-list, one protection at a time ([`DENIED_ALONE`]): under the default filter each
/// call answers `EPERM`; the same call in the same container with the filter off does not
/// (the filter alone stops it). Every case runs and all failures are reported together.
#[test]
fn seccomp_denies_each_syscall_alone() {
    require_root();
    let root = TestRoot::new();
    with_abi_probe(&root);
    let eperm = -i64::from(libc::EPERM);
    let answer = |nr: libc::c_long, args: &str, cap: Option<&str>, seccomp: bool| {
        let mut spec = root.spec(&format!("/bin/abi_probe native {nr} {args}"));
        spec.seccomp = seccomp;
        if let Some(cap) = cap {
            spec.capabilities = Some(vec![cap.parse().unwrap()]);
        }
        let out = run_capture(&spec);
        field(&out.stdout, "rc=").and_then(|v| v.parse::<i64>().ok())
    };
    let mut wrong = Vec::new();
    for (name, nr, args, cap) in DENIED_ALONE {
        let on = answer(*nr, args, *cap, true);
        let off = answer(*nr, args, *cap, false);
        eprintln!("{name}({args}) keeping {cap:?}: filter {on:?}, no filter {off:?}");
        if on != Some(eperm) {
            wrong.push(format!(
                "{name}: the filter let it through: {on:?}, not EPERM"
            ));
        }
        if off.is_none_or(|rc| rc == eperm) {
            wrong.push(format!(
                "{name}: without the filter it answered {off:?}: the probe cannot tell the \
                 filter from the kernel's own check"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
