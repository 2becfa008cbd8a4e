//! The states and results that cross the wire, in systemd's vocabulary.
//!
//! Each is a closed, `Copy` enum of exactly the values the manager produces (the manager's
//! own state machine uses them), with `as_str`, [`std::str::FromStr`] and [`std::fmt::Display`]
//! over systemd's strings. On the wire (D-Bus, fleetd's JSON) a state is its string: the
//! D-Bus signature is `s`, so `busctl`/`dbus-send` clients see the same text as before.
//!
//! A client reads them as [`Wire<T>`]: a string it does not know (a state added by a newer
//! manager) becomes [`Wire::Unknown`] with the text kept, instead of failing the whole call.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zbus::zvariant::{Signature, Type};

/// A state's name is not one of its kind's (see [`StateName::ALL`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {text:?}: expected one of {expected}")]
pub struct UnknownState {
    /// What kind of state was parsed, e.g. `active state`.
    pub kind: &'static str,
    /// The text that was given.
    pub text: String,
    /// The known names, comma-separated.
    pub expected: String,
}

/// A closed vocabulary of names (systemd's strings): what [`Wire`] needs of a state.
pub trait StateName: Copy + Eq + fmt::Debug + 'static {
    /// What the names are, for messages (e.g. `active state`).
    const KIND: &'static str;
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    /// The value's name on the wire.
    fn name(self) -> &'static str;
    /// The value named `text`, if any.
    fn from_name(text: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == text)
    }
}

/// Defines a closed state enum with its wire names and the impls every state has.
macro_rules! state_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// systemd's name for the value, as it crosses the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl StateName for $name {
            const KIND: &'static str = $kind;
            const ALL: &'static [Self] = &[$( $name::$variant, )+];
            fn name(self) -> &'static str {
                self.as_str()
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(text: &str) -> Result<Self, UnknownState> {
                <$name as StateName>::from_name(text).ok_or_else(|| UnknownState {
                    kind: $kind,
                    text: text.to_string(),
                    expected: [$( $text, )+].join(", "),
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl Type for $name {
            const SIGNATURE: &'static Signature = &Signature::Str;
        }
    };
}

state_enum! {
    /// systemd's `ActiveState`.
    ActiveState, "active state" {
        /// Not running.
        Inactive = "inactive",
        /// Starting: waiting for ordering, a oneshot running, or a restart pending.
        Activating = "activating",
        /// Running (simple) or finished successfully (oneshot).
        Active = "active",
        /// Being stopped.
        Deactivating = "deactivating",
        /// Ended in failure.
        Failed = "failed",
    }
}

state_enum! {
    /// systemd's `SubState`, as far as Flotilla has them.
    SubState, "sub state" {
        /// No process.
        Dead = "dead",
        /// Start queued, waiting for units it is ordered after.
        Waiting = "waiting",
        /// The unit's registry image is being pulled before its start.
        Pull = "pull",
        /// A oneshot's process runs.
        Start = "start",
        /// The main process runs.
        Running = "running",
        /// A oneshot exited 0.
        Exited = "exited",
        /// SIGTERM sent, waiting for the scope to empty.
        StopSigterm = "stop-sigterm",
        /// SIGKILL sent after `stop_timeout`.
        StopSigkill = "stop-sigkill",
        /// Waiting `restart_sec` before the next start.
        AutoRestart = "auto-restart",
        /// Failed.
        Failed = "failed",
    }
}

state_enum! {
    /// systemd's `LoadState`: whether the unit's file is in force.
    LoadState, "load state" {
        /// The file parsed; its definition is in force.
        Loaded = "loaded",
        /// The file is broken; the previous definition (if any) may still run.
        Error = "error",
        /// No such unit file.
        NotFound = "not-found",
    }
}

state_enum! {
    /// Why a unit is in its state (systemd's `Result`).
    UnitResult, "unit result" {
        /// Nothing went wrong.
        Success = "success",
        /// The main process exited non-zero.
        ExitCode = "exit-code",
        /// The main process was killed by a signal.
        Signal = "signal",
        /// Too many starts within `start_limit_interval`.
        StartLimitHit = "start-limit-hit",
        /// A required unit is missing or failed.
        Dependency = "dependency",
        /// The unit is part of an ordering cycle.
        Cycle = "cycle",
        /// The process could not be created.
        Spawn = "spawn",
        /// A stop needed SIGKILL.
        Timeout = "timeout",
        /// The unit's cgroup or limits could not be set up.
        Resources = "resources",
        /// The kernel's OOM killer ended a process of the unit (its `memory_max` was reached).
        OomKill = "oom-kill",
        /// Pulling the unit's registry image failed (the message has the registry's answer).
        Pull = "pull",
    }
}

state_enum! {
    /// The manager's state, as systemd's `SystemState` (`GetSystemState`).
    SystemState, "system state" {
        /// Units run normally.
        Running = "running",
        /// An orderly shutdown (power-off, reboot, SIGTERM) is stopping the units: a client
        /// stopped now knows the host is going down.
        Stopping = "stopping",
    }
}

state_enum! {
    /// Where a captured log line came from.
    LogStream, "log stream" {
        /// The unit's standard output.
        Stdout = "stdout",
        /// The unit's standard error.
        Stderr = "stderr",
        /// A line the manager wrote about the unit (`Started.`, `Stopping (SIGTERM).`).
        Manager = "manager",
    }
}

/// A state as a client received it: one this client knows, or the text of one it does not
/// (sent by a newer manager), kept so that it can still be shown and relayed.
///
/// Compare with the enum (`info.active_state == ActiveState::Active`); there is deliberately
/// no comparison with a `&str`. On the wire it is the plain string (D-Bus signature `s`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wire<T> {
    /// A value of the vocabulary this client knows.
    Known(T),
    /// A string outside it, as received.
    Unknown(String),
}

impl<T: StateName> Wire<T> {
    /// The known value, `None` for an unknown string.
    pub fn known(&self) -> Option<T> {
        match self {
            Wire::Known(v) => Some(*v),
            Wire::Unknown(_) => None,
        }
    }

    /// Whether this is the known value `value`.
    pub fn is(&self, value: T) -> bool {
        self.known() == Some(value)
    }

    /// The text as it crosses the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Wire::Known(v) => v.name(),
            Wire::Unknown(s) => s,
        }
    }

    /// The value for `text`: [`Wire::Known`] when it is a name of `T`, else
    /// [`Wire::Unknown`] with the text kept.
    pub fn from_text(text: &str) -> Self {
        T::from_name(text).map_or_else(|| Wire::Unknown(text.to_string()), Wire::Known)
    }
}

impl<T: StateName> From<T> for Wire<T> {
    fn from(value: T) -> Self {
        Wire::Known(value)
    }
}

impl<T: StateName> PartialEq<T> for Wire<T> {
    fn eq(&self, other: &T) -> bool {
        self.is(*other)
    }
}

impl<T: StateName> FromStr for Wire<T> {
    type Err = Infallible;
    fn from_str(text: &str) -> Result<Self, Infallible> {
        Ok(Wire::from_text(text))
    }
}

impl<T: StateName> fmt::Display for Wire<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<T: StateName> Serialize for Wire<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de, T: StateName> Deserialize<'de> for Wire<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|text| Wire::from_text(&text))
    }
}

impl<T> Type for Wire<T> {
    const SIGNATURE: &'static Signature = &Signature::Str;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every name of `T` parses back to its value, and the names are distinct.
    fn round_trips<T: StateName + FromStr + fmt::Display>(names: &[&str])
    where
        <T as FromStr>::Err: fmt::Debug,
    {
        let got: Vec<&str> = T::ALL.iter().map(|v| v.name()).collect();
        assert_eq!(got, names, "{}", T::KIND);
        for v in T::ALL {
            assert_eq!(v.name().parse::<T>().unwrap(), *v);
            assert_eq!(v.to_string(), v.name());
        }
    }

    #[test]
    fn names_are_systemds() {
        round_trips::<ActiveState>(&["inactive", "activating", "active", "deactivating", "failed"]);
        round_trips::<SubState>(&[
            "dead",
            "waiting",
            "pull",
            "start",
            "running",
            "exited",
            "stop-sigterm",
            "stop-sigkill",
            "auto-restart",
            "failed",
        ]);
        round_trips::<LoadState>(&["loaded", "error", "not-found"]);
        round_trips::<UnitResult>(&[
            "success",
            "exit-code",
            "signal",
            "start-limit-hit",
            "dependency",
            "cycle",
            "spawn",
            "timeout",
            "resources",
            "oom-kill",
            "pull",
        ]);
        round_trips::<SystemState>(&["running", "stopping"]);
        round_trips::<LogStream>(&["stdout", "stderr", "manager"]);
    }

    #[test]
    fn an_unknown_name_is_an_error_for_the_enum_and_kept_by_wire() {
        let err = "reloading".parse::<ActiveState>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown active state \"reloading\": expected one of inactive, activating, active, \
             deactivating, failed"
        );
        let w: Wire<ActiveState> = "reloading".parse().unwrap();
        assert_eq!(w, Wire::Unknown("reloading".into()));
        assert_eq!(w.as_str(), "reloading");
        assert_eq!(w.known(), None);
        assert!(!w.is(ActiveState::Active));
        let w: Wire<ActiveState> = "active".parse().unwrap();
        assert_eq!(w, ActiveState::Active);
        assert_eq!(w.to_string(), "active");
    }

    #[test]
    fn json_carries_the_plain_string() {
        let w: Wire<SubState> = SubState::StopSigterm.into();
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"stop-sigterm\"");
        let back: Wire<SubState> = serde_json::from_str("\"stop-sigterm\"").unwrap();
        assert_eq!(back, SubState::StopSigterm);
        let newer: Wire<SubState> = serde_json::from_str("\"reload-notify\"").unwrap();
        assert_eq!(newer.as_str(), "reload-notify");
        assert_eq!(serde_json::to_string(&newer).unwrap(), "\"reload-notify\"");
        assert!(serde_json::from_str::<SubState>("\"reload-notify\"").is_err());
    }

    #[test]
    fn dbus_signature_is_a_string() {
        assert_eq!(<Wire<ActiveState>>::SIGNATURE, &Signature::Str);
        assert_eq!(ActiveState::SIGNATURE, &Signature::Str);
    }
}
