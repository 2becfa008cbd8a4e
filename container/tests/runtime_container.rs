//! End-to-end tests of the container runtime (as root, with /bin/busybox from busybox-static).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod runtime_common;

use std::path::PathBuf;
use std::time::Duration;

use flotilla_container::runtime::{
    run, spawn, BindMount, ContainerError, IdMapping, Network, RootFs, Stdio,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use runtime_common::{can_run, field, pipe, read_all, run_capture, TestRoot};

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
    if !can_run() {
        return;
    }
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

#[test]
fn seccomp_and_caps_can_be_turned_off() {
    if !can_run() {
        return;
    }
    let root = TestRoot::new();
    let mut spec = root.spec(
        "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t ' | sed 's/:/=/'",
    );
    spec.seccomp = false;
    spec.no_new_privileges = false;
    spec.capabilities = Some(vec!["CAP_NET_ADMIN".into(), "SYS_ADMIN".into()]);
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
    if !can_run() {
        return;
    }
    let root = TestRoot::new();
    // Even with CAP_SYS_ADMIN-less root, mount is refused by the filter (EPERM either way),
    // so check a syscall that only the filter blocks: sethostname is allowed, swapoff is not.
    let mut spec =
        root.spec("swapoff /nonexistent; echo rc=$?; hostname other && echo host=$(hostname)");
    spec.capabilities = Some(vec!["SYS_ADMIN".into()]);
    std::os::unix::fs::symlink("busybox", root.layer.join("bin/swapoff")).unwrap();
    let out = run_capture(&spec);
    assert!(out.stderr.contains("Operation not permitted"), "{out:?}");
    assert_eq!(field(&out.stdout, "host="), Some("other"), "{out:?}");
}

#[test]
fn overlay_writes_go_to_upper() {
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
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
    };
    let out = run_capture(&spec);
    assert!(out.stdout.contains("from the top layer"), "{out:?}");
    assert_eq!(field(&out.stdout, "rc="), Some("1"), "{out:?}");
}

#[test]
fn bind_mounts_ro_rw_and_symlink_escape() {
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
    let root = TestRoot::new();
    let mut spec = root.spec("ls /sys/class/net | tr '\\n' ' '; echo; grep -c : /proc/net/dev; cat /sys/class/net/lo/operstate /sys/class/net/lo/flags");
    spec.network = Network::None;
    let out = run_capture(&spec);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0].trim(), "lo", "{out:?}");
    assert_eq!(lines[1], "1", "{out:?}");
    // IFF_UP is bit 0.
    let flags = u32::from_str_radix(lines[3].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is not up: {out:?}");

    let mut spec = root.spec("grep -c : /proc/net/dev");
    spec.network = Network::Host;
    let out = run_capture(&spec);
    let host_ifaces = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .matches(':')
        .count();
    assert_eq!(out.stdout.trim(), host_ifaces.to_string(), "{out:?}");
}

#[test]
fn host_read_only_root() {
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
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

    // Checked before any fork.
    let mut spec = root.spec("true");
    spec.capabilities = Some(vec!["CAP_BOGUS".into()]);
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

#[test]
fn cgroup_namespace_rooted_at_leaf() {
    if !can_run() {
        return;
    }
    let unified = PathBuf::from("/sys/fs/cgroup/unified");
    let base = if unified.join("cgroup.procs").exists() {
        unified
    } else {
        PathBuf::from("/sys/fs/cgroup")
    };
    let leaf = base.join(format!("flotilla-rt-test-{}", std::process::id()));
    std::fs::create_dir(&leaf).unwrap();
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(leaf.join("cgroup.procs"))
        .unwrap();
    let root = TestRoot::new();
    let (out_r, out_w) = pipe();
    let spawned = spawn(
        &root.spec("grep '^0::' /proc/self/cgroup; sleep 1"),
        Stdio {
            stdin: None,
            stdout: Some(out_w),
            stderr: None,
        },
        Some(std::os::fd::AsFd::as_fd(&procs)),
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
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
    let root = TestRoot::new();
    let mut spec = root.spec("id -u; id -g; id -G; ulimit -n; grep -E '^(CapEff|CapAmb):' /proc/self/status | tr -d '\\t ' | sed 's/:/=/'; touch /root/x; echo rc=$?");
    spec.user = flotilla_container::runtime::User {
        uid: 1000,
        gid: 1001,
        additional_gids: vec![20, 30],
    };
    spec.rlimits = vec![flotilla_container::runtime::Rlimit {
        resource: "RLIMIT_NOFILE".into(),
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
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
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
