//! Where the cgroup v2 hierarchy is and where a process sits in it: `/proc` text and one
//! `statfs`, used by the manager (its units' scopes) and by servers that place their callers
//! (the manager's and fleetd's access rules).

use std::fs;
use std::path::PathBuf;

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`: the `f_type` of a cgroup2 filesystem.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Find the cgroup v2 mount point from `/proc/self/mountinfo` text: the last one listed,
/// since a later mount (PID 1's, over a fresh /sys) hides earlier ones.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().rev().find_map(|line| {
        // Fields: ... mount_point ... " - " fstype source options
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Whether `path` is the root of a cgroup2 filesystem's mount (one `statfs`).
fn is_cgroup2(path: &str) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| {
        // The field's integer type differs between architectures; the magic fits in 32 bits.
        #[allow(clippy::unnecessary_cast, clippy::cast_sign_loss)]
        let f_type = st.f_type as u64;
        f_type == CGROUP2_SUPER_MAGIC
    })
}

/// The cgroup v2 mount point: `/sys/fs/cgroup` (pure v2) or `/sys/fs/cgroup/unified` (a
/// hybrid layout) when that is a cgroup2 filesystem, else the last cgroup2 mount of
/// `/proc/self/mountinfo` ([`cgroup2_mount`]). `None` without cgroup v2.
pub fn find_cgroup2() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|p| is_cgroup2(p))
        .map(PathBuf::from)
        .or_else(|| cgroup2_mount(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()))
}

/// A process's cgroup v2 path (relative to the cgroup2 mount, without the leading `/`) from
/// its `/proc/PID/cgroup` text (the `0::` line). `None` when it is in no cgroup v2 hierarchy.
pub fn own_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn finds_cgroup2_mount() {
        let mi = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                  37 25 0:33 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("25 30 0:22 / /x rw - tmpfs tmpfs rw\n"), None);
        let hidden = format!("{mi}50 25 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(
            cgroup2_mount(&hidden),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn reads_own_cgroup() {
        assert_eq!(
            own_cgroup("4:memory:/a\n0::/user.slice/x\n"),
            Some("user.slice/x".into())
        );
        assert_eq!(own_cgroup("0::/\n"), Some(String::new()));
        assert_eq!(own_cgroup("1:cpu:/\n"), None);
    }

    #[test]
    fn finds_the_hosts_cgroup2_mount() {
        // Whatever the layout (pure v2, hybrid, none), the answer is one of the cgroup2 mounts
        // the kernel lists, and there is an answer exactly when it lists one.
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounts: Vec<PathBuf> = mountinfo
            .lines()
            .filter_map(|l| cgroup2_mount(&format!("{l}\n")))
            .collect();
        match find_cgroup2() {
            Some(found) => assert!(mounts.contains(&found), "{found:?} not in {mounts:?}"),
            None => assert!(
                mounts.is_empty(),
                "cgroup2 mounted at {mounts:?} but not found"
            ),
        }
    }
}
