//! Who may use the control API: the rules, as pure functions over what [`super::peer`] read.
//!
//! A process inside a unit may use the manager's socket or fleetd's socket only when the
//! unit is granted it (`[container] control_api = true`): read-only does not stop
//! `connect(2)`, and whoever can talk to the manager can start a unit that binds the host's
//! `/` read-write. The rules:
//!
//! - **The manager** identifies every caller: `SO_PEERCRED` pid → `/proc/PID/cgroup`. A
//!   caller in `<units root>/<name>.unit` is unit `name`, allowed only if that unit was
//!   started with the grant; anything else below the units root is refused. A caller outside
//!   the units root (an operator's shell, `unitctl run`) is allowed (root or the manager's
//!   uid only, as before). A peer pid of 0 means the caller is in a pid namespace the manager
//!   cannot see; every unit lives in a pid namespace *below* the manager's (or in its own),
//!   so such a caller is not one of its units and is allowed. Without cgroup v2 (process
//!   groups) a caller in another pid namespace cannot be attributed to a unit and is refused.
//! - **fleetd** cannot always see its callers: in the host image it runs as a unit in its
//!   own pid namespace, so the host's `fleetctl` and other units alike show as pid 0. It
//!   checks the cgroup when the pid resolves (a `<name>.unit` cgroup other than its own must
//!   be granted, asked of the manager). For pid 0 it relies on the manager keeping ungranted
//!   units away from its socket: the manager refuses to start a unit without the grant whose
//!   bind mount exposes a control socket (the socket itself or a directory above it,
//!   `flotilla-init --control-socket`, default `/run/flotilla/fleetd.sock`), and a unit
//!   without an image sees the host's root without its submounts, so not `/run` (a tmpfs).

use std::path::{Path, PathBuf};

/// The suffix of a unit's cgroup below the manager's units root (`<root>/<unit>.unit`, see
/// `flotilla_init::scope`).
pub const UNIT_CGROUP_SUFFIX: &str = ".unit";

/// The D-Bus error name of a refused caller.
pub use crate::ACCESS_DENIED;

/// How the manager finds the unit a caller belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitCgroups {
    /// Units live in `<this path>/<unit>.unit` (a cgroup path relative to the manager's
    /// cgroup namespace root, without the leading `/`).
    Below(String),
    /// No cgroup v2: units are process groups and cannot be told apart by cgroup.
    None,
}

/// Where a caller's cgroup puts it relative to a manager's units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Not below the units root: not a unit of this manager.
    Outside,
    /// In the cgroup of this unit (or below it).
    Unit(String),
    /// Below the units root but in no unit's cgroup (refused: nothing should run there).
    Unknown,
}

/// Places a caller whose cgroup is `caller` (as `/proc/PID/cgroup` shows it) relative to the
/// units root `root` (same form).
pub fn place(root: &str, caller: &str) -> Placement {
    let root = root.trim_matches('/');
    let caller = caller.trim_matches('/');
    let rest = if root.is_empty() {
        Some(caller)
    } else if caller == root {
        Some("")
    } else {
        caller.strip_prefix(root).and_then(|r| r.strip_prefix('/'))
    };
    let Some(rest) = rest else {
        return Placement::Outside;
    };
    match rest
        .split('/')
        .next()
        .and_then(|first| first.strip_suffix(UNIT_CGROUP_SUFFIX))
    {
        Some(name) if !name.is_empty() => Placement::Unit(name.to_string()),
        _ => Placement::Unknown,
    }
}

/// The unit whose cgroup holds `cgroup`, found by its first `<name>.unit` component, with
/// the cgroup path up to and including that component. For a server (fleetd) that does not
/// know the manager's units root.
pub fn unit_in_cgroup(cgroup: &str) -> Option<(String, String)> {
    let mut prefix = String::new();
    for part in cgroup.trim_matches('/').split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        if let Some(name) = part
            .strip_suffix(UNIT_CGROUP_SUFFIX)
            .filter(|n| !n.is_empty())
        {
            return Some((prefix, name.to_string()));
        }
    }
    None
}

/// Whether the cgroup `cgroup` is `unit_cgroup` or below it.
pub fn within(cgroup: &str, unit_cgroup: &str) -> bool {
    Path::new(cgroup.trim_matches('/')).starts_with(unit_cgroup.trim_matches('/'))
}

/// The first control socket a bind mount of `source` exposes: the socket itself or one in
/// a directory below `source`. Compare lexically normalized absolute paths (pass the
/// resolved forms too, see [`super::peer`]'s callers).
pub fn exposed_socket<'a>(source: &Path, sockets: &'a [PathBuf]) -> Option<&'a Path> {
    sockets
        .iter()
        .find(|s| s.starts_with(source))
        .map(PathBuf::as_path)
}

/// Why the manager refuses to start `unit`: its mount of `source` exposes `socket`.
pub fn bind_refusal(unit: &str, source: &Path, socket: &Path) -> String {
    format!(
        "refusing to start {unit}: its mount of {} exposes the control socket {}, and the \
         unit is not granted the control API; add `control_api = true` to its [container] \
         section if it must drive the host, or bind a narrower path",
        source.display(),
        socket.display()
    )
}

/// The message a caller from an ungranted unit gets (D-Bus error text, HTTP 403 body).
pub fn unit_refusal(pid: i32, unit: &str, socket: &Path) -> String {
    format!(
        "access denied: the caller (pid {pid}) runs in unit {unit}, which is not granted the \
         control API on {}; add `control_api = true` to the [container] section of {unit}'s \
         unit file and restart it to grant it",
        socket.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_placed_by_their_cgroup() {
        let root = "flotilla";
        assert_eq!(
            place(root, "/flotilla/web.unit"),
            Placement::Unit("web".into())
        );
        assert_eq!(
            place(root, "flotilla/worker@3.unit/sub"),
            Placement::Unit("worker@3".into())
        );
        assert_eq!(place(root, "/init.scope"), Placement::Outside);
        assert_eq!(place(root, "/flotilla-other/web.unit"), Placement::Outside);
        assert_eq!(
            place(root, "/user.slice/session-1.scope"),
            Placement::Outside
        );
        assert_eq!(place(root, "/flotilla"), Placement::Unknown);
        assert_eq!(place(root, "/flotilla/stray"), Placement::Unknown);
        assert_eq!(place(root, "/flotilla/.unit"), Placement::Unknown);
        assert_eq!(place("a/b", "/a/b/x.unit"), Placement::Unit("x".into()));
    }

    #[test]
    fn a_unit_is_found_in_any_cgroup_path() {
        assert_eq!(
            unit_in_cgroup("/flotilla/fleetd.unit"),
            Some(("flotilla/fleetd.unit".into(), "fleetd".into()))
        );
        assert_eq!(
            unit_in_cgroup("/t/x.unit/inner.unit"),
            Some(("t/x.unit".into(), "x".into()))
        );
        assert_eq!(unit_in_cgroup("/"), None);
        assert_eq!(unit_in_cgroup("/init.scope"), None);
        assert!(within("/t/x.unit/sub", "t/x.unit"));
        assert!(!within("/t/x.unitx", "t/x.unit"));
    }

    #[test]
    fn binds_that_expose_a_socket() {
        let sockets = vec![PathBuf::from("/run/flotilla/fleetd.sock")];
        for exposing in ["/", "/run", "/run/flotilla", "/run/flotilla/fleetd.sock"] {
            assert!(
                exposed_socket(Path::new(exposing), &sockets).is_some(),
                "{exposing}"
            );
        }
        for harmless in [
            "/run/flotilla/rootfs",
            "/run/flot",
            "/var/lib",
            "/run/flotilla2",
        ] {
            assert!(
                exposed_socket(Path::new(harmless), &sockets).is_none(),
                "{harmless}"
            );
        }
    }
}
