//! Nothing of one unit is readable from another: a container's pid 1 (with `init = true`, the
//! default) is a fresh exec of `flotilla-reaper`, marked non-dumpable, and no longer a fork of
//! the manager, whose memory holds every unit's environment and captured output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;

use common::Machine;

/// What the holder unit keeps in its environment and prints; the manager holds both.
const SECRET: &str = "flotilla-unit-secret-7c41e9d2";

/// The unit whose secret the attacker is after.
fn holder() -> String {
    format!(
        r#"
[container]
command = ["/bin/sh", "-c", "echo token=$SECRET_TOKEN; exec sleep 1000"]
env = {{ SECRET_TOKEN = "{SECRET}" }}
"#
    )
}

/// A uid-0 unit with the default capabilities that goes for its pid 1 the way an attacker
/// would: its environment, its maps, its memory.
const ATTACKER: &str = r#"
[container]
command = ["/bin/sh", "-c", """
for f in environ maps mem; do
  if head -c 1 /proc/1/$f >/dev/null 2>&1; then echo $f=read; else echo $f=denied; fi
done
echo exe=$(readlink /proc/1/exe 2>&1)
echo attack-done
exec sleep 1000
"""]
"#;

/// Whether `needle` occurs in any readable mapping of `pid` (read from the host, as root).
fn memory_contains(pid: i32, needle: &[u8]) -> bool {
    let maps = fs::File::open(format!("/proc/{pid}/maps")).unwrap();
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = Vec::new();
    for line in BufReader::new(maps).lines() {
        let line = line.unwrap();
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vsyscall]") || line.ends_with("[vvar]") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        buf.resize((end - start) as usize, 0);
        // Some mappings (guard pages, device memory) do not read: skip them.
        if mem.read_exact_at(&mut buf, start).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

#[test]
fn a_unit_cannot_read_its_pid_1_and_pid_1_holds_nothing_of_the_manager() {
    let holder = holder();
    let m = Machine::start(&[("holder", &holder), ("attacker", ATTACKER)]);
    m.wait_state("holder", "active");
    m.wait_state("attacker", "active");
    m.wait_until("the holder's output", || m.logs("holder").contains(SECRET));
    m.wait_until("the attacker's output", || {
        m.logs("attacker").contains("attack-done")
    });
    let out = m.logs("attacker");

    // From inside: pid 1 is non-dumpable, so even a uid-0 unit cannot read it.
    for f in ["environ", "maps", "mem"] {
        assert!(out.contains(&format!("{f}=denied")), "{f}: {out}");
    }
    assert!(!out.contains(SECRET), "{out}");

    // From the host (root, CAP_SYS_PTRACE): pid 1 is the reaper, not a copy of the manager.
    let pid1 = m.status("attacker")["pid"].as_i64().unwrap() as i32;
    // The scan works: the manager's own memory has the secret (the unit file, the output).
    assert!(memory_contains(m.pid() as i32, SECRET.as_bytes()));
    assert!(
        !memory_contains(pid1, SECRET.as_bytes()),
        "the container's pid 1 holds the other unit's secret"
    );
    let exe = fs::read_link(format!("/proc/{pid1}/exe")).unwrap();
    assert!(
        exe.to_string_lossy().contains("memfd:flotilla-reaper"),
        "{exe:?}"
    );
}

/// A unit over the host's root (read-only, but whole) looks for the other units' secrets
/// where the host keeps them: the manager's state directory (logs, API-loaded unit files,
/// container state) and a secret file of the host's (as fleetd's TLS key): all hidden. The
/// same script in a unit granted the control API (root-equivalent by design) finds them,
/// so the search works.
#[test]
fn a_unit_over_the_host_root_cannot_read_other_units_state_or_the_hosts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("fleetd.key");
    fs::write(
        &secret_file,
        format!("-----BEGIN PRIVATE KEY----- {SECRET}\n"),
    )
    .unwrap();
    let peek = |grant: &str| {
        format!(
            r#"
[container]
mounts = []
{grant}
command = ["/bin/sh", "-c", """
echo found-in-state=$(grep -rls {SECRET} $DIR/state 2>/dev/null | wc -l)
echo found-in-file=$(grep -c {SECRET} {file} 2>/dev/null)
echo peek-done
exec sleep 1000
"""]
"#,
            file = secret_file.display()
        )
    };
    let holder = holder();
    let (attacker, granted) = (peek(""), peek("control_api = true"));
    let m = Machine::start_with(
        &[("holder", &holder)],
        &["--secret-path", secret_file.to_str().unwrap()],
    );
    m.wait_state("holder", "active");
    // The holder's output is in the manager's log files under the state dir by now.
    m.wait_until("the holder's output", || m.logs("holder").contains(SECRET));
    let state = m.path("state");
    let on_disk = std::process::Command::new("grep")
        .args(["-rls", SECRET])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        !on_disk.stdout.is_empty(),
        "the secret is not under {state:?}"
    );
    for (name, text) in [("attacker", &attacker), ("granted", &granted)] {
        let text = text.replace("$DIR", m.dir.path().to_str().unwrap());
        let file = m.path(&format!("{name}.toml"));
        fs::write(&file, text).unwrap();
        m.ok(&["load", file.to_str().unwrap()]);
        m.ok(&["start", name]);
        m.wait_until(&format!("{name}'s output"), || {
            m.logs(name).contains("peek-done")
        });
    }
    let out = m.logs("attacker");
    assert!(out.contains("found-in-state=0"), "{out}");
    assert!(out.contains("found-in-file=0"), "{out}");
    let out = m.logs("granted");
    assert!(!out.contains("found-in-state=0"), "{out}");
    assert!(out.contains("found-in-file=1"), "{out}");
}
