//! The one error type of this crate: a located, explained problem in a unit file.

use std::fmt;

/// A problem in a unit file (or unit directory), located as precisely as possible.
///
/// Displayed as `FILE:LINE:COL: MESSAGE`, followed by `\n  help: HELP` when there is a hint
/// on how to fix it. Line and column are left out when unknown (e.g. an invalid file name).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", Render(self))]
pub struct UnitError {
    /// The file as given to the loader, or a label such as `<api>` for text without a file.
    pub file: String,
    /// Name of the unit the error belongs to, if known.
    pub unit: Option<String>,
    /// 1-based line number.
    pub line: Option<usize>,
    /// 1-based column, counted in characters.
    pub column: Option<usize>,
    /// Dotted offending key, e.g. `service.stop_timeout` or `container.mounts[0].path`.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl UnitError {
    /// An error about `file` with no position, key, unit or help yet.
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            unit: None,
            line: None,
            column: None,
            key: None,
            message: message.into(),
            help: None,
        }
    }

    /// Sets the unit name.
    #[must_use]
    pub fn with_unit(mut self, unit: impl Into<String>) -> Self {
        self.unit = Some(unit.into());
        self
    }

    /// Sets the help text.
    #[must_use]
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Sets line and column from a byte offset into `text`.
    #[must_use]
    pub fn at_offset(mut self, text: &str, offset: usize) -> Self {
        let (line, column) = line_col(text, offset);
        self.line = Some(line);
        self.column = Some(column);
        self
    }
}

/// 1-based line and character column of byte `offset` in `text` (clamped to the text).
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (line, column)
}

struct Render<'a>(&'a UnitError);

impl fmt::Display for Render<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        write!(f, "{}", e.file)?;
        if let Some(line) = e.line {
            write!(f, ":{line}")?;
            if let Some(column) = e.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", e.message)?;
        if let Some(help) = &e.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 7), (2, 4)); // after 'é' (2 bytes)
        assert_eq!(line_col(text, 8), (3, 1));
        assert_eq!(line_col(text, 100), (3, 2));
    }

    #[test]
    fn display_format() {
        let mut e = UnitError::new("web.toml", "command must not be empty")
            .with_help("give the program")
            .at_offset("a\nbcd", 4);
        assert_eq!(
            e.to_string(),
            "web.toml:2:3: command must not be empty\n  help: give the program"
        );
        e.line = None;
        e.help = None;
        assert_eq!(e.to_string(), "web.toml: command must not be empty");
    }
}
