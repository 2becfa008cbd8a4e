//! What the manager's methods and signals carry.

use serde::{Deserialize, Serialize};
use zbus::zvariant::Type;

use crate::state::{ActiveState, LoadState, LogStream, SubState, UnitResult, Wire};

/// The state of one unit as clients see it (systemd's vocabulary). On D-Bus a struct of
/// signature `(sssssuuiitss)`: every state is its string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct UnitInfo {
    /// Full unit name.
    pub name: String,
    /// `[unit] description`, or empty.
    pub description: String,
    /// Whether the file is in force: `loaded`, `error` (file broken; the old definition
    /// may still run) or `not-found`.
    pub load_state: Wire<LoadState>,
    /// `inactive`, `activating`, `active`, `deactivating` or `failed`.
    pub active_state: Wire<ActiveState>,
    /// Finer state: `dead`, `waiting`, `start`, `running`, `exited`, `stop-sigterm`,
    /// `stop-sigkill`, `auto-restart`, `failed`.
    pub sub_state: Wire<SubState>,
    /// Main process id, 0 when none.
    pub main_pid: u32,
    /// Restarts performed by the restart policy since the unit was last started by hand.
    pub restarts: u32,
    /// Exit code of the last main process, -1 when it has not exited or died by a signal.
    pub exit_code: i32,
    /// Signal that killed the last main process, 0 when none.
    pub exit_signal: i32,
    /// Time of the last state change, microseconds since the Unix epoch.
    pub since_us: u64,
    /// Why the unit is where it is: `success`, `exit-code`, `signal`, `start-limit-hit`,
    /// `dependency`, `cycle`, `spawn`, `timeout`, `resources` or `oom-kill`.
    pub result: Wire<UnitResult>,
    /// Human-readable detail for `result` (empty on success).
    pub message: String,
}

impl UnitInfo {
    /// A unit that is loaded and has not run: `loaded`, `inactive (dead)`, result `success`,
    /// no process, no description or message. Set the fields that differ.
    pub fn loaded(name: &str) -> Self {
        UnitInfo {
            name: name.into(),
            description: String::new(),
            load_state: LoadState::Loaded.into(),
            active_state: ActiveState::Inactive.into(),
            sub_state: SubState::Dead.into(),
            main_pid: 0,
            restarts: 0,
            exit_code: -1,
            exit_signal: 0,
            since_us: 0,
            result: UnitResult::Success.into(),
            message: String::new(),
        }
    }
}

/// One captured line of a unit's output. On D-Bus `(ttss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct LogEntry {
    /// Monotonic sequence number per unit; used to follow logs (`unitctl logs -f`).
    pub seq: u64,
    /// Capture time, microseconds since the Unix epoch.
    pub time_us: u64,
    /// `stdout`, `stderr` or `manager` (lines the manager writes about the unit).
    pub stream: Wire<LogStream>,
    /// The line, without its newline.
    pub line: String,
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ReloadReport {
    /// Units that appeared.
    pub added: Vec<String>,
    /// Units whose definition changed.
    pub changed: Vec<String>,
    /// Units whose file disappeared (stopped and dropped).
    pub removed: Vec<String>,
    /// Units restarted because they changed and a restart was asked for.
    pub restarted: Vec<String>,
    /// Files that failed to parse; the old definition (if any) stays in force.
    pub errors: Vec<String>,
}

/// One image in the manager's image stores (`ListImages`). On D-Bus `(ss)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Type)]
pub struct ImageEntry {
    /// The store name, `name:tag` (for a pulled image `host[:port]/repo:tag`).
    pub name: String,
    /// The manifest digest, `sha256:<hex>`.
    pub digest: String,
}

/// Something that happened in the manager, published to API clients as a D-Bus signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A unit's active or sub state changed (`UnitStateChanged`, signature `sss`).
    UnitStateChanged {
        /// Unit name.
        name: String,
        /// New active state.
        active_state: Wire<ActiveState>,
        /// New sub state.
        sub_state: Wire<SubState>,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use zbus::zvariant::serialized::Context;
    use zbus::zvariant::{to_bytes, LE};

    fn info() -> UnitInfo {
        UnitInfo {
            name: "web".into(),
            description: "Web".into(),
            load_state: LoadState::Loaded.into(),
            active_state: ActiveState::Active.into(),
            sub_state: SubState::Running.into(),
            main_pid: 42,
            restarts: 0,
            exit_code: -1,
            exit_signal: 0,
            since_us: 1,
            result: UnitResult::Success.into(),
            message: String::new(),
        }
    }

    #[test]
    fn the_dbus_signatures_are_unchanged() {
        assert_eq!(UnitInfo::SIGNATURE.to_string(), "(sssssuuiitss)");
        assert_eq!(LogEntry::SIGNATURE.to_string(), "(ttss)");
        assert_eq!(ReloadReport::SIGNATURE.to_string(), "(asasasasas)");
        assert_eq!(ImageEntry::SIGNATURE.to_string(), "(ss)");
    }

    #[test]
    fn a_state_from_a_newer_manager_does_not_fail_the_decoding() {
        // What a newer manager could send: the same struct with strings this client does
        // not know. It decodes; the known fields are typed, the unknown ones kept as text.
        let ctxt = Context::new_dbus(LE, 0);
        type Raw = (
            String,
            String,
            String,
            String,
            String,
            u32,
            u32,
            i32,
            i32,
            u64,
            String,
            String,
        );
        let raw: Raw = (
            "web".into(),
            "Web".into(),
            "loaded".into(),
            "reloading".into(),
            "reload-notify".into(),
            42,
            0,
            -1,
            0,
            1,
            "watchdog".into(),
            String::new(),
        );
        let bytes = to_bytes(ctxt, &raw).unwrap();
        let (decoded, _): (UnitInfo, _) = bytes.deserialize().unwrap();
        assert_eq!(decoded.load_state, LoadState::Loaded);
        assert_eq!(decoded.active_state.as_str(), "reloading");
        assert_eq!(decoded.active_state.known(), None);
        assert_eq!(decoded.sub_state, Wire::Unknown("reload-notify".into()));
        assert_eq!(decoded.result.as_str(), "watchdog");
        // And a known unit round-trips as the same strings.
        let bytes = to_bytes(ctxt, &info()).unwrap();
        let (raw, _): (Raw, _) = bytes.deserialize().unwrap();
        assert_eq!(
            (
                raw.2.as_str(),
                raw.3.as_str(),
                raw.4.as_str(),
                raw.10.as_str()
            ),
            ("loaded", "active", "running", "success")
        );
        let (back, _): (UnitInfo, _) = bytes.deserialize().unwrap();
        assert_eq!(back, info());
    }
}
