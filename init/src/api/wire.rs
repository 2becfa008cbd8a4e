//! What may go on the wire: every string the D-Bus server sends is made safe here first.
//!
//! A D-Bus string must not contain NUL: one such string in a reply makes zbus fail the whole
//! reply, so a single bad unit would break `ListUnits` for every unit on the machine. The
//! unit parser refuses control characters (`flotilla-units`), so this is defence in depth:
//! a unit's output (logs), an error message echoing a caller's name, or a unit that slipped
//! through is sent with U+FFFD in place of the characters, and the unit is named in a
//! logged warning instead of failing the call.

use super::{LogEntry, UnitInfo, Wire};

/// What replaces a character that may not be sent.
pub const REPLACEMENT: char = '\u{FFFD}';

/// Control characters each kind of field keeps: display fields (name, description, states)
/// keep none; free text (messages, unit files, log lines) keeps tab and newline; log lines
/// also keep the unit's own escape sequences (colours) and carriage returns. NUL never goes.
const KEEP_NONE: &str = "";
const KEEP_TEXT: &str = "\t\n";
const KEEP_LOG: &str = "\t\n\r\u{1b}";

/// Replaces the control characters of `s` not in `keep` with [`REPLACEMENT`]; whether any were.
fn scrub(s: &mut String, keep: &str) -> bool {
    if !s.chars().any(|c| c.is_control() && !keep.contains(c)) {
        return false;
    }
    *s = s
        .chars()
        .map(|c| {
            if c.is_control() && !keep.contains(c) {
                REPLACEMENT
            } else {
                c
            }
        })
        .collect();
    true
}

/// A state made safe: the manager only sends states it knows, whose names are plain; a
/// [`Wire::Unknown`] text is scrubbed like a display field.
fn scrub_state<T>(w: &mut Wire<T>) -> bool {
    match w {
        Wire::Known(_) => false,
        Wire::Unknown(s) => scrub(s, KEEP_NONE),
    }
}

/// A unit's state made safe to send; logs a warning naming the unit when a field had to be
/// cleaned (the unit is still listed, the call still answers).
pub fn unit(mut u: UnitInfo) -> UnitInfo {
    let mut fields = Vec::new();
    for (field, value, keep) in [
        ("name", &mut u.name, KEEP_NONE),
        ("description", &mut u.description, KEEP_NONE),
        ("message", &mut u.message, KEEP_TEXT),
    ] {
        if scrub(value, keep) {
            fields.push(field);
        }
    }
    for (field, scrubbed) in [
        ("load_state", scrub_state(&mut u.load_state)),
        ("active_state", scrub_state(&mut u.active_state)),
        ("sub_state", scrub_state(&mut u.sub_state)),
        ("result", scrub_state(&mut u.result)),
    ] {
        if scrubbed {
            fields.push(field);
        }
    }
    if !fields.is_empty() {
        log::warn!(
            "control API: unit {:?} has control characters in its {}; sent with U+FFFD in their \
             place (fix the unit file: `unitctl cat {}`)",
            u.name,
            fields.join(", "),
            u.name
        );
    }
    u
}

/// Every unit of a list made safe ([`unit`]).
pub fn units(units: Vec<UnitInfo>) -> Vec<UnitInfo> {
    units.into_iter().map(unit).collect()
}

/// Log lines made safe: a unit may print anything, including NUL.
pub fn logs(mut entries: Vec<LogEntry>) -> Vec<LogEntry> {
    for e in &mut entries {
        scrub(&mut e.line, KEEP_LOG);
        scrub_state(&mut e.stream);
    }
    entries
}

/// Free text (a unit file, an error message) made safe.
pub fn text(mut s: String) -> String {
    scrub(&mut s, KEEP_TEXT);
    s
}

/// A list of names (a reload report) made safe.
pub fn names(mut v: Vec<String>) -> Vec<String> {
    for s in &mut v {
        scrub(s, KEEP_TEXT);
    }
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::api::{ActiveState, LogStream, SubState};

    fn info(name: &str, description: &str) -> UnitInfo {
        UnitInfo {
            description: description.into(),
            active_state: ActiveState::Active.into(),
            sub_state: SubState::Running.into(),
            main_pid: 1,
            message: "line one\nline two".into(),
            ..UnitInfo::loaded(name)
        }
    }

    #[test]
    fn clean_units_pass_unchanged() {
        let u = info("web", "Web server");
        assert_eq!(unit(u.clone()), u);
    }

    #[test]
    fn control_characters_become_replacement_characters() {
        let u = unit(info("evil", "a\0b\u{1b}[2J\tc"));
        assert_eq!(u.description, "a\u{FFFD}b\u{FFFD}[2J\u{FFFD}c");
        assert_eq!(u.message, "line one\nline two");
        let l = logs(vec![LogEntry {
            seq: 1,
            time_us: 0,
            stream: LogStream::Stdout.into(),
            line: "x\0y\u{1b}[31mred\r".into(),
        }]);
        assert_eq!(l[0].line, "x\u{FFFD}y\u{1b}[31mred\r");
        assert_eq!(text("no such unit a\0b".into()), "no such unit a\u{FFFD}b");
        let mut odd = info("odd", "");
        odd.sub_state = Wire::Unknown("new\0state".into());
        assert_eq!(unit(odd).sub_state.as_str(), "new\u{FFFD}state");
    }
}
