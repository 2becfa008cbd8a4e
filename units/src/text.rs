//! Checks on the raw text of a unit: UTF-8 with a position for the first bad byte, and
//! control characters in strings, refused at parse time with the exact line and column.
//!
//! Every string of a unit reaches the wire (D-Bus, fleetd's JSON, `unitctl list`): a NUL
//! cannot be sent in a D-Bus string at all, and an escape sequence or a carriage return in a
//! description rewrites a terminal. So control characters (Unicode category Cc) are refused
//! everywhere, except the few that a key legitimately takes ([`CONTROL_ALLOWED`]).

use std::path::Path;

use toml::de::{DeTable, DeValue};

use crate::error::UnitError;

/// Keys whose strings may contain some control characters, and which ones. A key matches
/// its dotted path or anything below it (`container.env` covers `container.env.PEM`).
///
/// Tab and newline are allowed in command arguments (a script for `sh -c`) and environment
/// values (a PEM certificate); they travel over D-Bus and JSON unharmed. Nothing else takes
/// a control character: not names, paths, descriptions, images or placement rules.
pub(crate) const CONTROL_ALLOWED: &[(&str, &str)] =
    &[("container.command", "\t\n"), ("container.env", "\t\n")];

/// How the error's help names the exceptions.
const CONTROL_HELP: &str = "remove it: control characters are not allowed in unit strings \
     (only tab and newline, in `command` arguments and `env` values)";

/// The control characters allowed in the string at dotted path `path`.
fn allowed_at(path: &str) -> &'static str {
    CONTROL_ALLOWED
        .iter()
        .find(|(key, _)| {
            path == *key
                || path
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
        .map_or("", |(_, allowed)| allowed)
}

/// `U+0000 (NUL)`-style name of a control character, for messages.
pub(crate) fn describe_control(c: char) -> String {
    const C0: [&str; 32] = [
        "NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "TAB", "LF", "VT", "FF",
        "CR", "SO", "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM",
        "SUB", "ESC", "FS", "GS", "RS", "US",
    ];
    let code = u32::from(c);
    let name = usize::try_from(code)
        .ok()
        .and_then(|i| C0.get(i).copied())
        .or((code == 0x7f).then_some("DEL"));
    match name {
        Some(name) => format!("U+{code:04X} ({name})"),
        None => format!("U+{code:04X}"),
    }
}

/// The first control character in `s` that `allowed` does not contain.
pub(crate) fn first_control(s: &str, allowed: &str) -> Option<char> {
    s.chars().find(|c| c.is_control() && !allowed.contains(*c))
}

/// Refuses control characters in every key and string of the parsed document `doc` of
/// `text` (see [`CONTROL_ALLOWED`]). Returns the message, the help and the byte offset of
/// the offending character (or escape sequence) in `text`.
pub(crate) fn check_controls(text: &str, doc: &DeTable<'_>) -> Result<(), ControlError> {
    walk_table(text, doc, "")
}

/// A refused control character: message, help, byte offset in the text, dotted key.
pub(crate) type ControlError = (String, String, usize, String);

fn walk_table(text: &str, table: &DeTable<'_>, prefix: &str) -> Result<(), ControlError> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in entries {
        let k: &str = key.get_ref();
        let path = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        if let Some(c) = first_control(k, "") {
            let offset = locate(text, key.span(), c);
            return Err((
                format!(
                    "the key {k:?} contains the control character {}",
                    describe_control(c)
                ),
                "keys are plain names such as `description`; remove the character".into(),
                offset,
                path,
            ));
        }
        walk_value(text, value, &path)?;
    }
    Ok(())
}

fn walk_value(
    text: &str,
    value: &toml::Spanned<DeValue<'_>>,
    path: &str,
) -> Result<(), ControlError> {
    match value.get_ref() {
        DeValue::String(s) => {
            if let Some(c) = first_control(s, allowed_at(path)) {
                let key = path.rsplit('.').next().unwrap_or(path);
                return Err((
                    format!(
                        "`{key}` contains the control character {}",
                        describe_control(c)
                    ),
                    CONTROL_HELP.into(),
                    locate(text, value.span(), c),
                    path.to_string(),
                ));
            }
            Ok(())
        }
        DeValue::Array(items) => items.iter().try_for_each(|i| walk_value(text, i, path)),
        DeValue::Table(t) => walk_table(text, t, path),
        _ => Ok(()),
    }
}

/// The byte offset in `text` of the first occurrence of `target` (raw, or written as an
/// escape sequence) in the TOML string or key written at `span`; the span's start when it
/// cannot be found.
fn locate(text: &str, span: std::ops::Range<usize>, target: char) -> usize {
    let Some(raw) = text.get(span.clone()) else {
        return span.start;
    };
    find_in_raw(raw, target).map_or(span.start, |at| span.start + at)
}

/// Scans a TOML string as written (with its quotes) for `target`, decoding escapes.
fn find_in_raw(raw: &str, target: char) -> Option<usize> {
    let literal = raw.starts_with('\'');
    let mut start = 0;
    for delim in ["\"\"\"", "'''"] {
        if raw.starts_with(delim) {
            start = delim.len();
            // A newline right after the opening delimiter is not part of the value.
            if raw.get(start..)?.starts_with("\r\n") {
                start += 2;
            } else if raw.get(start..)?.starts_with('\n') {
                start += 1;
            }
        }
    }
    let body = raw.get(start..)?;
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '\\' || literal {
            if c == target {
                return Some(start + i);
            }
            continue;
        }
        let (_, e) = chars.next()?;
        let decoded = match e {
            'b' => Some('\u{8}'),
            't' => Some('\t'),
            'n' => Some('\n'),
            'f' => Some('\u{c}'),
            'r' => Some('\r'),
            'e' => Some('\u{1b}'),
            'x' | 'u' | 'U' => {
                let digits = match e {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let hex: String = (0..digits)
                    .filter_map(|_| chars.next())
                    .map(|(_, h)| h)
                    .collect();
                u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)
            }
            w if w.is_whitespace() => {
                // A line-ending backslash: the following whitespace is not part of the value.
                while chars.peek().is_some_and(|(_, n)| n.is_whitespace()) {
                    chars.next();
                }
                None
            }
            _ => None,
        };
        if decoded == Some(target) {
            return Some(start + i);
        }
    }
    None
}

/// Decodes the bytes of a unit file; invalid UTF-8 is reported at the line and column of its
/// first bad byte (the column counted in characters, as everywhere in unit errors).
pub fn decode_unit_text(file: &str, bytes: Vec<u8>) -> Result<String, UnitError> {
    String::from_utf8(bytes).map_err(|e| {
        let valid_up_to = e.utf8_error().valid_up_to();
        let bytes = e.into_bytes();
        let bad = bytes.get(valid_up_to).copied().unwrap_or_default();
        let valid = String::from_utf8_lossy(bytes.get(..valid_up_to).unwrap_or_default());
        UnitError::new(
            file,
            format!("the file is not valid UTF-8: byte 0x{bad:02x} (byte offset {valid_up_to})"),
        )
        .at_offset(&valid, valid_up_to)
        .with_help("unit files are UTF-8 text; re-save the file as UTF-8 (e.g. `iconv -t UTF-8`)")
    })
}

/// Reads the unit file at `path` as UTF-8 text ([`decode_unit_text`]).
pub fn read_unit_file(path: &Path) -> Result<String, UnitError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        UnitError::new(&file, format!("cannot read: {e}"))
            .with_help("check that the file exists and is readable")
    })?;
    decode_unit_text(&file, bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn allowed_per_key() {
        assert_eq!(allowed_at("container.command"), "\t\n");
        assert_eq!(allowed_at("container.env.PEM"), "\t\n");
        assert_eq!(allowed_at("container.environ"), "");
        assert_eq!(allowed_at("unit.description"), "");
    }

    #[test]
    fn finds_escapes_and_raw_characters() {
        assert_eq!(find_in_raw(r#""ab\u0000""#, '\0'), Some(3));
        assert_eq!(find_in_raw(r#""a\\u0000\x1b""#, '\u{1b}'), Some(9));
        assert_eq!(find_in_raw("\"a\tb\"", '\t'), Some(2));
        assert_eq!(find_in_raw("'''\nab\tc'''", '\t'), Some(6));
        assert_eq!(find_in_raw("\"\"\"a\\\n   \\r\"\"\"", '\r'), Some(9));
        assert_eq!(find_in_raw(r#""\U0000007f""#, '\u{7f}'), Some(1));
    }

    #[test]
    fn names_controls() {
        assert_eq!(describe_control('\0'), "U+0000 (NUL)");
        assert_eq!(describe_control('\u{1b}'), "U+001B (ESC)");
        assert_eq!(describe_control('\u{7f}'), "U+007F (DEL)");
        assert_eq!(describe_control('\u{85}'), "U+0085");
    }

    #[test]
    fn utf8_position() {
        let e = decode_unit_text(
            "x.toml",
            b"[unit]\ndescription = \"d\xe9j\xc3\xa0\"\n".to_vec(),
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), Some(17)));
        assert!(e.message.contains("0xe9"), "{e}");
    }
}
