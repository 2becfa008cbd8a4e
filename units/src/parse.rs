//! Parsing and validating one unit file.
//!
//! The text is parsed into toml's spanned document tree ([`toml::de::DeTable`]) and walked
//! key by key in source order, so the first problem in the file is the one reported, and
//! every error carries the exact line and column of the offending key or value.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::UnitError;
use crate::model::{
    ContainerSection, Device, DeviceKind, DeviceRule, FleetSection, IdMap, MetadataRule, Mount,
    RestartPolicy, Rlimit, ServiceSection, ServiceType, Unit, UnitSection,
};
use crate::names::{Capability, NetworkMode, PullPolicy, RlimitResource};
use crate::specifier::Specifiers;
use crate::values;

/// Maximum length of a unit name.
pub const MAX_NAME_LEN: usize = 200;

/// File label used in errors for unit text that did not come from a file.
pub const API_FILE_LABEL: &str = "<api>";

const NAME_HELP: &str =
    "unit names use letters, digits, `_`, `.`, `:` and `-`, plus at most one `@` (e.g. `web`, `getty@tty1`)";

/// Sections and their keys, in documentation order.
const SECTIONS: &[(&str, &[&str])] = &[
    (
        "unit",
        &["description", "requires", "wants", "after", "before"],
    ),
    (
        "container",
        &[
            "image",
            "command",
            "env",
            "workdir",
            "user",
            "network",
            "hostname",
            "mounts",
            "init",
            "control_api",
            "pull",
        ],
    ),
    (
        "service",
        &[
            "type",
            "restart",
            "restart_sec",
            "restart_max_sec",
            "stop_timeout",
            "start_limit_burst",
            "start_limit_interval",
            "memory_max",
            "cpu_max",
            "pids_max",
        ],
    ),
    (
        "fleet",
        &[
            "machine_id",
            "machine_of",
            "machine_metadata",
            "conflicts",
            "global",
            "replaces",
        ],
    ),
];

const MOUNT_KEYS: &[&str] = &["host", "path", "read_only", "create"];
const IDMAP_KEYS: &[&str] = &["container_id", "host_id", "size"];
/// Common names from other formats, mapped to ours.
const ALIASES: &[(&str, &str)] = &[
    ("cmd", "command"),
    ("exec", "command"),
    ("exec_start", "command"),
    ("entrypoint", "command"),
    ("args", "command"),
    ("environment", "env"),
    ("volumes", "mounts"),
    ("binds", "mounts"),
    ("cwd", "workdir"),
    ("working_dir", "workdir"),
    ("working_directory", "workdir"),
    ("depends_on", "requires"),
    ("memory", "memory_max"),
    ("memory_limit", "memory_max"),
    ("cpus", "cpu_max"),
    ("cpu_quota", "cpu_max"),
    ("timeout", "stop_timeout"),
    ("readonly", "read_only"),
    ("ro", "read_only"),
    ("source", "host"),
    ("target", "path"),
    ("destination", "path"),
];

/// Checks a unit name: 1 to 200 characters from `[A-Za-z0-9_.:-]` plus at most one `@`,
/// not starting with `.`, `-` or `@`; an instance is never `.` or `..` (and `/` is not an
/// allowed character), so `%i` in a path stays one path component. Template names (`foo@`)
/// pass. Returns the reason on error.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(format!(
            "the name is {len} characters long; the limit is {MAX_NAME_LEN}"
        ));
    }
    if let Some(first @ ('.' | '-' | '@')) = name.chars().next() {
        return Err(format!("a name must not start with `{first}`"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '@')))
    {
        return Err(format!("the character {bad:?} is not allowed"));
    }
    if name.matches('@').count() > 1 {
        return Err("a name may contain at most one `@`".into());
    }
    if let Some((prefix, instance @ ("." | ".."))) = split_instance(name) {
        return Err(format!(
            "the instance name `{instance}` is not allowed: `%i` in a path would name a \
             directory outside the instance's own (e.g. the parent of every `{prefix}@*`); \
             name the instance with a letter or digit, e.g. `{prefix}@1`"
        ));
    }
    Ok(())
}

/// Splits `prefix@instance`: `"getty@tty1"` → `Some(("getty", "tty1"))`,
/// `"getty@"` → `Some(("getty", ""))`, `"web"` → `None`.
pub fn split_instance(name: &str) -> Option<(&str, &str)> {
    name.split_once('@')
}

/// Parses and validates the unit called `name` (the file stem) from `text`.
///
/// `path` is only used in errors and stored in the unit. Template names (`foo@`) are
/// rejected: load those with [`crate::Template`]. Specifiers (`%n`, `%i`, ...) in string
/// values of `[unit]`, `[container]` and `[fleet]` are expanded.
pub fn parse_unit(name: &str, path: Option<&Path>, text: &str) -> Result<Unit, UnitError> {
    let file = file_label(path);
    check_name(name).map_err(|reason| {
        UnitError::new(&file, format!("invalid unit name `{name}`: {reason}"))
            .with_unit(name)
            .with_help(NAME_HELP)
    })?;
    if let Some((prefix, "")) = split_instance(name) {
        return Err(
            UnitError::new(&file, format!("`{name}` is a template, not a unit"))
                .with_unit(name)
                .with_help(format!(
                    "start an instance of it instead, e.g. `{prefix}@1`; its `%i` becomes `1`"
                )),
        );
    }
    parse_checked(name, path, text)
}

/// The label used for `path` in errors.
pub(crate) fn file_label(path: Option<&Path>) -> String {
    path.map_or_else(|| API_FILE_LABEL.to_string(), |p| p.display().to_string())
}

/// Parses a unit whose (non-template) name was already checked.
pub(crate) fn parse_checked(
    name: &str,
    path: Option<&Path>,
    text: &str,
) -> Result<Unit, UnitError> {
    let ctx = Ctx {
        file: file_label(path),
        unit: name.to_string(),
        text,
        spec: Specifiers::for_name(name),
    };
    let doc = DeTable::parse(text).map_err(|e| {
        let message = e.message().trim().to_string();
        let mut err = ctx.error(message.clone(), None);
        if message.contains("duplicate") {
            err = err.with_help("each key and each [section] may appear only once; merge them");
        }
        match e.span() {
            Some(span) => err.at_offset(text, span.start),
            None => err,
        }
    })?;
    crate::text::check_controls(text, doc.get_ref()).map_err(|(message, help, offset, key)| {
        ctx.error(message, Some(key))
            .at_offset(text, offset)
            .with_help(help)
    })?;

    let mut tables: BTreeMap<&str, (Range<usize>, &DeTable<'_>)> = BTreeMap::new();
    for (key, value) in entries(doc.get_ref()) {
        let k: &str = key.get_ref();
        match (SECTIONS.iter().find(|(s, _)| *s == k), value.get_ref()) {
            (Some((section, _)), DeValue::Table(table)) => {
                tables.insert(section, (value.span(), table));
            }
            (Some(_), _) => {
                return Err(ctx
                    .error(
                        format!(
                            "`{k}` must be a section, not a {}",
                            value.get_ref().type_str()
                        ),
                        Some(k.to_string()),
                    )
                    .at_offset(text, key.span().start)
                    .with_help(format!("write [{k}] on its own line, followed by its keys")));
            }
            (None, DeValue::Table(_)) => {
                let names: Vec<&str> = SECTIONS.iter().map(|(s, _)| *s).collect();
                let help = match suggest(k, &names) {
                    Some(s) => format!("did you mean [{s}]?"),
                    None => format!("sections are {}", list(&names, "[", "]")),
                };
                return Err(ctx
                    .error(format!("unknown section [{k}]"), Some(k.to_string()))
                    .at_offset(text, key.span().start)
                    .with_help(help));
            }
            (None, _) => {
                let help = match SECTIONS.iter().find(|(_, keys)| keys.contains(&k)) {
                    Some((section, _)) => format!("put it under [{section}]"),
                    None => format!(
                        "keys go in one of the sections {}",
                        list(
                            &SECTIONS.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                            "[",
                            "]"
                        )
                    ),
                };
                return Err(ctx
                    .error(
                        format!("key `{k}` is outside any section"),
                        Some(k.to_string()),
                    )
                    .at_offset(text, key.span().start)
                    .with_help(help));
            }
        }
    }

    let unit = match tables.get("unit") {
        Some((_, t)) => parse_unit_section(&ctx, t)?,
        None => UnitSection::default(),
    };
    let container = match tables.get("container") {
        Some((span, t)) => parse_container(&ctx, span.clone(), t)?,
        None => {
            return Err(ctx
                .error("missing [container] section".into(), Some("container".into()))
                .at_offset(text, 0)
                .with_help(
                    "every unit runs a command; add:\n  [container]\n  command = [\"/bin/sleep\", \"60\"]",
                ))
        }
    };
    let service = match tables.get("service") {
        Some((_, t)) => parse_service(&ctx, t)?,
        None => ServiceSection::default(),
    };
    let fleet = match tables.get("fleet") {
        Some((_, t)) => parse_fleet(&ctx, t)?,
        None => FleetSection::default(),
    };
    Ok(Unit {
        name: name.to_string(),
        path: path.map(Path::to_path_buf),
        source: text.to_string(),
        unit,
        container,
        service,
        fleet,
    })
}

/// Everything an error needs besides the position.
struct Ctx<'t> {
    file: String,
    unit: String,
    text: &'t str,
    spec: Specifiers,
}

impl Ctx<'_> {
    fn error(&self, message: String, key: Option<String>) -> UnitError {
        let mut e = UnitError::new(&self.file, message).with_unit(&self.unit);
        e.key = key;
        e
    }

    fn unknown_key(
        &self,
        section: &str,
        dotted: &str,
        key: &Spanned<Cow<'_, str>>,
        valid: &[&str],
    ) -> UnitError {
        let k: &str = key.get_ref();
        let help = if let Some((other, _)) = SECTIONS
            .iter()
            .find(|(s, keys)| *s != section && keys.contains(&k))
        {
            format!("`{k}` belongs in [{other}]")
        } else if let Some(s) = suggest(k, valid) {
            format!("did you mean `{s}`?")
        } else if let Some((other, s)) = SECTIONS
            .iter()
            .filter(|(s, _)| *s != section && !section.starts_with("container."))
            .find_map(|(other, keys)| suggest(k, keys).map(|s| (other, s)))
        {
            format!("did you mean `{s}` in [{other}]?")
        } else {
            format!("valid keys here are {}", list(valid, "`", "`"))
        };
        let where_ = if section.contains('[') || section.contains('.') {
            format!("in {section}")
        } else {
            format!("in [{section}]")
        };
        self.error(
            format!("unknown key `{k}` {where_}"),
            Some(dotted.to_string()),
        )
        .at_offset(self.text, key.span().start)
        .with_help(help)
    }
}

/// A table's entries in source order.
fn entries<'a, 'i>(
    table: &'a DeTable<'i>,
) -> Vec<(&'a Spanned<Cow<'i, str>>, &'a Spanned<DeValue<'i>>)> {
    let mut v: Vec<_> = table.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

/// The closest candidate to `word`, if it is close enough to be a plausible typo.
fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase().replace('-', "_");
    if let Some(c) = candidates.iter().find(|c| **c == lower) {
        return Some(c);
    }
    if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == lower) {
        if let Some(c) = candidates.iter().find(|c| *c == to) {
            return Some(c);
        }
    }
    candidates
        .iter()
        .map(|c| {
            (
                strsim::jaro_winkler(&lower, c),
                strsim::damerau_levenshtein(&lower, c),
                *c,
            )
        })
        .filter(|(jw, dl, _)| *jw >= 0.88 || (*dl <= 2 && *dl < lower.len()))
        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, _, c)| c)
}

/// `a, b or c` with each item wrapped.
fn list(items: &[&str], open: &str, close: &str) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{open}{i}{close}")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
}

/// A value as it would be written in TOML, for messages.
fn show(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => format!("{s:?}"),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.as_str().to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(_) => "[...]".into(),
        DeValue::Table(_) => "{...}".into(),
    }
}

fn a_type(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn int_value(value: &DeValue<'_>) -> Option<i128> {
    match value {
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix()).ok(),
        _ => None,
    }
}

fn float_value(value: &DeValue<'_>) -> Option<f64> {
    match value {
        DeValue::Float(f) => f.as_str().parse().ok(),
        #[allow(clippy::cast_precision_loss)]
        DeValue::Integer(_) => int_value(value).map(|i| i as f64),
        _ => None,
    }
}

/// One key's value being converted, with everything needed to report a problem with it.
struct Field<'c, 't, 'v, 'i> {
    ctx: &'c Ctx<'t>,
    /// Short key name used in messages, e.g. `stop_timeout`.
    name: &'c str,
    /// Dotted key, e.g. `service.stop_timeout`.
    dotted: String,
    value: &'v Spanned<DeValue<'i>>,
    /// Whether string values get specifiers expanded.
    expand: bool,
}

impl<'v, 'i> Field<'_, '_, 'v, 'i> {
    fn err_at(&self, span: Range<usize>, message: String, help: Option<String>) -> UnitError {
        let e = self
            .ctx
            .error(message, Some(self.dotted.clone()))
            .at_offset(self.ctx.text, span.start);
        match help {
            Some(h) => e.with_help(h),
            None => e,
        }
    }

    fn err(&self, message: String, help: Option<String>) -> UnitError {
        self.err_at(self.value.span(), message, help)
    }

    /// "`name` must be EXPECTED, not a TYPE", with an example.
    fn type_err(&self, expected: &str, example: &str) -> UnitError {
        self.err(
            format!(
                "`{}` must be {expected}, not {}",
                self.name,
                a_type(self.value.get_ref())
            ),
            Some(format!("e.g. {} = {example}", self.name)),
        )
    }

    /// "invalid NAME VALUE: REASON".
    fn invalid(&self, reason: &str, help: &str) -> UnitError {
        self.err(
            format!(
                "invalid {} {}: {reason}",
                self.name,
                show(self.value.get_ref())
            ),
            Some(help.to_string()),
        )
    }

    fn expand_at(&self, text: &str, span: Range<usize>) -> Result<String, UnitError> {
        if !self.expand {
            return Ok(text.to_string());
        }
        let expanded = self
            .ctx
            .spec
            .expand(text)
            .map_err(|(message, help)| self.err_at(span.clone(), message, Some(help)))?;
        // The raw string was checked (crate::text); an expanded specifier (e.g. `%I`)
        // must not bring in a control character either.
        if let Some(c) = crate::text::first_control(&expanded, "").filter(|c| !text.contains(*c)) {
            return Err(self.err_at(
                span,
                format!(
                    "`{}` expands to a string with the control character {}",
                    self.name,
                    crate::text::describe_control(c)
                ),
                Some("check the value the specifiers in this string expand to".into()),
            ));
        }
        Ok(expanded)
    }

    fn string(&self, example: &str) -> Result<String, UnitError> {
        match self.value.get_ref() {
            DeValue::String(s) => self.expand_at(s, self.value.span()),
            _ => Err(self.type_err("a string", example)),
        }
    }

    fn nonempty_string(&self, example: &str) -> Result<String, UnitError> {
        let s = self.string(example)?;
        if s.trim().is_empty() {
            return Err(self.err(
                format!("`{}` must not be empty", self.name),
                Some(format!(
                    "give a value, e.g. {} = {example}, or remove the key",
                    self.name
                )),
            ));
        }
        Ok(s)
    }

    /// An array of strings, each expanded, with their spans.
    fn strings(&self, example: &str) -> Result<Vec<(String, Range<usize>)>, UnitError> {
        let DeValue::Array(items) = self.value.get_ref() else {
            return Err(self.type_err("a list of strings", example));
        };
        items
            .iter()
            .map(|item| match item.get_ref() {
                DeValue::String(s) => Ok((self.expand_at(s, item.span())?, item.span())),
                other => Err(self.err_at(
                    item.span(),
                    format!(
                        "`{}` must contain only strings, not {} ({})",
                        self.name,
                        a_type(other),
                        show(other)
                    ),
                    Some(format!(
                        "quote each element, e.g. {} = {example}",
                        self.name
                    )),
                )),
            })
            .collect()
    }

    /// A list of unit names, none of which may be this unit itself.
    fn unit_names(&self) -> Result<Vec<String>, UnitError> {
        let example = "[\"db\", \"cache\"]";
        let mut out = Vec::new();
        for (name, span) in self.strings(example)? {
            if let Err(reason) = check_name(&name) {
                return Err(self.err_at(
                    span,
                    format!("invalid unit name {name:?} in `{}`: {reason}", self.name),
                    Some(NAME_HELP.to_string()),
                ));
            }
            if let Some((prefix, "")) = split_instance(&name) {
                return Err(self.err_at(
                    span,
                    format!("`{name}` in `{}` is a template, not a unit", self.name),
                    Some(format!("name an instance of it, e.g. \"{prefix}@1\"")),
                ));
            }
            if name == self.ctx.unit {
                return Err(self.err_at(
                    span,
                    format!("unit `{name}` lists itself in `{}`", self.name),
                    Some(format!("remove {name:?} from `{}`", self.name)),
                ));
            }
            out.push(name);
        }
        Ok(out)
    }

    fn boolean(&self) -> Result<bool, UnitError> {
        match self.value.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            _ => Err(self.type_err("true or false", "true")),
        }
    }

    fn integer(&self, min: u64, example: &str) -> Result<u64, UnitError> {
        let Some(i) = int_value(self.value.get_ref()) else {
            return Err(self.type_err("an integer", example));
        };
        if i < i128::from(min) {
            return Err(self.err(
                format!("`{}` must be at least {min}, not {i}", self.name),
                Some(format!("e.g. {} = {example}", self.name)),
            ));
        }
        u64::try_from(i).map_err(|_| self.err(format!("`{}` is too large", self.name), None))
    }

    fn duration(&self) -> Result<std::time::Duration, UnitError> {
        let value = self.value.get_ref();
        let parsed = match value {
            DeValue::String(s) => values::parse_duration(s),
            DeValue::Integer(_) | DeValue::Float(_) => match float_value(value) {
                Some(f) => values::duration_from_secs(f),
                None => Err("not a number".into()),
            },
            _ => return Err(self.type_err("a duration", "\"10s\"")),
        };
        parsed.map_err(|reason| self.invalid(&reason, values::DURATION_HELP))
    }

    fn bytes(&self) -> Result<u64, UnitError> {
        let parsed = match self.value.get_ref() {
            DeValue::String(s) => values::parse_bytes(s),
            DeValue::Integer(_) => match int_value(self.value.get_ref()) {
                Some(i) if i < 0 => Err("sizes cannot be negative".into()),
                Some(i) => u64::try_from(i).map_err(|_| "size is too large".to_string()),
                None => Err("not a number".into()),
            },
            _ => return Err(self.type_err("a size", "\"512M\"")),
        };
        let help = if matches!(self.value.get_ref(), DeValue::String(s) if s.trim().eq_ignore_ascii_case("max"))
        {
            format!("remove `{}` for no limit", self.name)
        } else {
            values::BYTES_HELP.to_string()
        };
        match parsed {
            Ok(0) => Err(self.invalid("the limit must be greater than 0", &help)),
            Ok(n) => Ok(n),
            Err(reason) => Err(self.invalid(&reason, &help)),
        }
    }

    fn cpu(&self) -> Result<crate::model::CpuMax, UnitError> {
        let value = self.value.get_ref();
        let parsed = match value {
            DeValue::String(s) => values::parse_cpu(s),
            DeValue::Integer(_) | DeValue::Float(_) => match float_value(value) {
                Some(f) => values::cpu_from_cores(f),
                None => Err("not a number".into()),
            },
            _ => return Err(self.type_err("a CPU limit", "\"150%\"")),
        };
        parsed.map_err(|reason| self.invalid(&reason, values::CPU_HELP))
    }

    /// One of `options` (a string).
    fn choice<'o>(&self, options: &[&'o str]) -> Result<&'o str, UnitError> {
        let example = format!("{:?}", options.first().copied().unwrap_or_default());
        let DeValue::String(s) = self.value.get_ref() else {
            return Err(self.type_err(&format!("one of {}", list(options, "\"", "\"")), &example));
        };
        if let Some(o) = options.iter().find(|o| **o == s.as_ref()) {
            return Ok(o);
        }
        let choices = list(options, "\"", "\"");
        let help = match suggest(s, options) {
            Some(close) => format!("did you mean \"{close}\"? (one of {choices})"),
            None => format!("use one of {choices}"),
        };
        Err(self.err(
            format!("invalid {} {}", self.name, show(self.value.get_ref())),
            Some(help),
        ))
    }

    /// An absolute path without `..` (specifiers expanded).
    fn abs_path(&self, example: &str) -> Result<PathBuf, UnitError> {
        let s = self.string(example)?;
        self.check_abs_path(&s, example)?;
        Ok(PathBuf::from(s))
    }

    fn check_abs_path(&self, s: &str, example: &str) -> Result<(), UnitError> {
        let help = Some(format!("e.g. {} = {example}", self.name));
        if !s.starts_with('/') {
            return Err(self.err(
                format!("`{}` must be an absolute path, not {s:?}", self.name),
                help,
            ));
        }
        if Path::new(s).components().any(|c| c == Component::ParentDir) {
            return Err(self.err(
                format!("`{}` must not contain `..`: {s:?}", self.name),
                Some("write the path without `..` components".into()),
            ));
        }
        Ok(())
    }
}

/// Iterates a section's keys in source order, with an unknown-key error for the rest.
fn fields<'c, 't, 'v, 'i>(
    ctx: &'c Ctx<'t>,
    prefix: &str,
    table: &'v DeTable<'i>,
    expand: bool,
) -> Vec<(&'v str, Field<'c, 't, 'v, 'i>, &'v Spanned<Cow<'i, str>>)>
where
    'v: 'c,
{
    entries(table)
        .into_iter()
        .map(|(key, value)| {
            let k: &'v str = key.get_ref();
            let field = Field {
                ctx,
                name: k,
                dotted: format!("{prefix}.{k}"),
                value,
                expand,
            };
            (k, field, key)
        })
        .collect()
}

fn keys_of(section: &str) -> &'static [&'static str] {
    SECTIONS
        .iter()
        .find(|(s, _)| *s == section)
        .map_or(&[], |(_, k)| k)
}

fn parse_unit_section(ctx: &Ctx<'_>, table: &DeTable<'_>) -> Result<UnitSection, UnitError> {
    let mut s = UnitSection::default();
    for (k, f, key) in fields(ctx, "unit", table, true) {
        match k {
            "description" => s.description = Some(f.string("\"Web server\"")?),
            "requires" => s.requires = f.unit_names()?,
            "wants" => s.wants = f.unit_names()?,
            "after" => s.after = f.unit_names()?,
            "before" => s.before = f.unit_names()?,
            _ => return Err(ctx.unknown_key("unit", &f.dotted, key, keys_of("unit"))),
        }
    }
    Ok(s)
}

fn parse_container(
    ctx: &Ctx<'_>,
    span: Range<usize>,
    table: &DeTable<'_>,
) -> Result<ContainerSection, UnitError> {
    let mut s = ContainerSection::default();
    let mut have_command = false;
    for (k, f, key) in fields(ctx, "container", table, true) {
        match k {
            "image" => {
                let image = f.nonempty_string("\"nginx:1.25\"")?;
                if image.chars().any(|c| c.is_whitespace() || c.is_control())
                    || image.starts_with(':')
                    || image.ends_with(':')
                {
                    return Err(f.err(
                        format!("invalid image {image:?}"),
                        Some("use `name` or `name:tag`, e.g. image = \"nginx:1.25\"".into()),
                    ));
                }
                if let Some((name, digest)) = image.split_once('@') {
                    if name.is_empty() || crate::pin::sha256_hex(digest).is_none() {
                        return Err(f.err(
                            format!("invalid image digest in {image:?}"),
                            Some(
                                "an image pinned to a digest is `name[:tag]@sha256:<64 lower-case hex digits>`"
                                    .into(),
                            ),
                        ));
                    }
                }
                s.image = Some(image);
            }
            "pull" => {
                let word = f.choice(PullPolicy::NAMES)?;
                s.pull = PullPolicy::from_name(word).unwrap_or_default();
            }
            "command" => {
                s.command = parse_command(&f)?;
                have_command = true;
            }
            "env" => s.env = parse_env(&f)?,
            "workdir" => s.workdir = Some(f.abs_path("\"/srv\"")?),
            "user" => {
                let user = f.string("\"www-data\"")?;
                check_user(&user).map_err(|reason| {
                    f.err(
                        format!("invalid user {user:?}: {reason}"),
                        Some("use \"user\", \"user:group\", \"1000\" or \"1000:1000\"".into()),
                    )
                })?;
                s.user = Some(user);
            }
            "network" => {
                let word = f.choice(NetworkMode::NAMES)?;
                s.network = NetworkMode::from_name(word).unwrap_or_default();
            }
            "hostname" => {
                let hostname = f.string("\"web\"")?;
                check_hostname(&hostname).map_err(|reason| {
                    f.err(
                        format!("invalid hostname {hostname:?}: {reason}"),
                        Some(
                            "use 1 to 64 letters, digits, `-` and `.`, e.g. hostname = \"web\""
                                .into(),
                        ),
                    )
                })?;
                s.hostname = Some(hostname);
            }
            "mounts" => s.mounts = parse_mounts(&f)?,
            "init" => s.init = f.boolean()?,
            "read_only" => s.read_only = f.boolean()?,
            "control_api" => s.control_api = f.boolean()?,
            "rlimits" => s.rlimits = parse_rlimits(&f)?,
            "user_namespace" => s.user_namespace = Some(parse_idmap(&f)?),
            "devices" => s.devices = parse_devices(&f)?,
            "capabilities" => s.capabilities = Some(parse_capabilities(&f)?),
            _ => return Err(ctx.unknown_key("container", &f.dotted, key, keys_of("container"))),
        }
    }
    if !have_command {
        return Err(ctx
            .error(
                "[container] has no `command`".into(),
                Some("container.command".into()),
            )
            .at_offset(ctx.text, span.start)
            .with_help(
                "give the program and its arguments, e.g. command = [\"/bin/sleep\", \"60\"]",
            ));
    }
    Ok(s)
}

const COMMAND_EXAMPLE: &str = "[\"/bin/sleep\", \"60\"]";

fn parse_command(f: &Field<'_, '_, '_, '_>) -> Result<Vec<String>, UnitError> {
    let help = Some(format!(
        "give the program and its arguments, e.g. command = {COMMAND_EXAMPLE}"
    ));
    if let DeValue::String(s) = f.value.get_ref() {
        return Err(f.err(
            format!("`command` must be a list of strings, not a string ({s:?})"),
            Some(format!(
                "split it into program and arguments, e.g. command = {COMMAND_EXAMPLE}; \
                 for a shell line use [\"/bin/sh\", \"-c\", {s:?}]"
            )),
        ));
    }
    let args = f.strings(COMMAND_EXAMPLE)?;
    match args.first() {
        None => Err(f.err("command must not be empty".into(), help)),
        Some((program, span)) if program.is_empty() => Err(f.err_at(
            span.clone(),
            "the program (first element of command) must not be empty".into(),
            help,
        )),
        Some(_) => Ok(args.into_iter().map(|(a, _)| a).collect()),
    }
}

fn parse_env(f: &Field<'_, '_, '_, '_>) -> Result<BTreeMap<String, String>, UnitError> {
    let DeValue::Table(table) = f.value.get_ref() else {
        return Err(f.type_err("a table", "{ KEY = \"value\" }"));
    };
    let mut env = BTreeMap::new();
    for (key, value) in entries(table) {
        let k: &str = key.get_ref();
        let field = Field {
            ctx: f.ctx,
            name: k,
            dotted: format!("{}.{k}", f.dotted),
            value,
            expand: f.expand,
        };
        let valid = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(field.err_at(
                key.span(),
                format!("invalid environment variable name {k:?}"),
                Some("names use letters, digits and `_` and do not start with a digit, e.g. LOG_LEVEL".into()),
            ));
        }
        let v = match value.get_ref() {
            DeValue::String(s) => field.expand_at(s, value.span())?,
            other => {
                return Err(field.err(
                    format!(
                        "environment variable `{k}` must be a string, not {}",
                        a_type(other)
                    ),
                    Some(format!(
                        "quote the value: {k} = \"{}\"",
                        show(other).trim_matches('"')
                    )),
                ))
            }
        };
        env.insert(k.to_string(), v);
    }
    Ok(env)
}

/// `rlimits = { nofile = 4096, core = [0, 0] }`: a number (soft = hard) or `[soft, hard]`.
fn parse_rlimits(f: &Field<'_, '_, '_, '_>) -> Result<Vec<Rlimit>, UnitError> {
    let example = "{ nofile = 4096, core = 0 }";
    let DeValue::Table(table) = f.value.get_ref() else {
        return Err(f.type_err("a table of limits", example));
    };
    let mut out = Vec::new();
    for (k, field, key) in fields(f.ctx, &f.dotted, table, f.expand) {
        let Ok(resource) = k.parse::<RlimitResource>() else {
            return Err(f.ctx.unknown_key(
                "container.rlimits",
                &field.dotted,
                key,
                RlimitResource::NAMES,
            ));
        };
        let name = resource.name();
        let (soft, hard) = match field.value.get_ref() {
            DeValue::Array(items) if items.len() == 2 => {
                let at = |i: usize| {
                    let item = items.get(i)?;
                    int_value(item.get_ref()).and_then(|v| u64::try_from(v).ok())
                };
                match (at(0), at(1)) {
                    (Some(a), Some(b)) if a <= b => (a, b),
                    _ => {
                        return Err(field.err(
                            format!("invalid limit for {name}"),
                            Some("use [soft, hard] with soft <= hard, e.g. [1024, 4096]".into()),
                        ))
                    }
                }
            }
            _ => {
                let v = field.integer(0, "4096")?;
                (v, v)
            }
        };
        out.push(Rlimit {
            resource,
            soft,
            hard,
        });
    }
    Ok(out)
}

/// `capabilities = ["CAP_NET_BIND_SERVICE", "KILL"]`: names from capabilities(7), with or
/// without `CAP_`, in upper case. An unknown one is an error at its position, with the
/// closest known name as a hint.
fn parse_capabilities(f: &Field<'_, '_, '_, '_>) -> Result<Vec<Capability>, UnitError> {
    let mut caps = Vec::new();
    for (cap, span) in f.strings("[\"CAP_NET_BIND_SERVICE\"]")? {
        if let Ok(c) = cap.parse::<Capability>() {
            caps.push(c);
            continue;
        }
        let bare = cap.strip_prefix("CAP_").unwrap_or(&cap);
        let well_formed =
            !bare.is_empty() && bare.chars().all(|c| c.is_ascii_uppercase() || c == '_');
        let message = if well_formed {
            format!("unknown capability {cap:?}")
        } else {
            format!("invalid capability {cap:?}")
        };
        let names = "use capability names as in capabilities(7), e.g. \"CAP_NET_BIND_SERVICE\" \
                     or \"NET_ADMIN\"";
        let help = match closest_capability(bare) {
            Some(close) if cap.starts_with("CAP_") => {
                format!("did you mean \"{close}\"? ({names})")
            }
            Some(close) => format!("did you mean \"{}\"? ({names})", close.name()),
            None => names.to_string(),
        };
        return Err(f.err_at(span, message, Some(help)));
    }
    Ok(caps)
}

/// The known capability closest to `bare` (without `CAP_`), if it is a plausible typo.
fn closest_capability(bare: &str) -> Option<Capability> {
    let lower: Vec<String> = Capability::NAMES
        .iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let candidates: Vec<&str> = lower.iter().map(String::as_str).collect();
    let close = suggest(&bare.replace(' ', "_"), &candidates)?;
    let upper = close.to_ascii_uppercase();
    Capability::from_name(&upper)
}

/// `user_namespace = { host_id = 100000, size = 65536 }` (`container_id` defaults to 0).
fn parse_idmap(f: &Field<'_, '_, '_, '_>) -> Result<IdMap, UnitError> {
    let example = "{ host_id = 100000, size = 65536 }";
    let DeValue::Table(table) = f.value.get_ref() else {
        return Err(f.type_err("a table", example));
    };
    let (mut container_id, mut host_id, mut size) = (0u64, None, None);
    for (k, field, key) in fields(f.ctx, &f.dotted, table, f.expand) {
        match k {
            "container_id" => container_id = field.integer(0, "0")?,
            "host_id" => host_id = Some(field.integer(1, "100000")?),
            "size" => size = Some(field.integer(1, "65536")?),
            _ => {
                return Err(f.ctx.unknown_key(
                    "container.user_namespace",
                    &field.dotted,
                    key,
                    IDMAP_KEYS,
                ))
            }
        }
    }
    let (Some(host_id), Some(size)) = (host_id, size) else {
        return Err(f.err(
            "user_namespace needs `host_id` and `size`".into(),
            Some(format!("e.g. user_namespace = {example}")),
        ));
    };
    let id = |v: u64| u32::try_from(v).ok();
    match (id(container_id), id(host_id), id(size)) {
        (Some(container_id), Some(host_id), Some(size))
            if u64::from(host_id) + u64::from(size) <= u64::from(u32::MAX) =>
        {
            Ok(IdMap {
                container_id,
                host_id,
                size,
            })
        }
        _ => Err(f.err(
            "user_namespace ids must fit in 32 bits".into(),
            Some(format!("e.g. user_namespace = {example}")),
        )),
    }
}

/// Largest device numbers the kernel's `dev_t` holds (12-bit major, 20-bit minor).
const MAX_MAJOR: u32 = (1 << 12) - 1;
const MAX_MINOR: u32 = (1 << 20) - 1;

/// `devices = ["/dev/fuse", "c 10:229 rw"]`: host device paths under `/dev`, or allow rules
/// `c|b MAJOR|*:MINOR|* [r][w][m]`.
fn parse_devices(f: &Field<'_, '_, '_, '_>) -> Result<Vec<Device>, UnitError> {
    let example = "[\"/dev/fuse\", \"c 10:229 rw\"]";
    let mut devices = Vec::new();
    for (text, span) in f.strings(example)? {
        let device = if text.starts_with('/') {
            check_device_path(&text).map(|()| Device::Path(PathBuf::from(&text)))
        } else {
            parse_device_rule(&text).map(Device::Rule)
        };
        let device = device.map_err(|(message, help)| {
            f.err_at(
                span.clone(),
                format!("invalid device {text:?}: {message}"),
                Some(help),
            )
        })?;
        if devices.contains(&device) {
            return Err(f.err_at(
                span,
                format!("device {text:?} is listed twice"),
                Some("list each device once".into()),
            ));
        }
        devices.push(device);
    }
    Ok(devices)
}

fn check_device_path(text: &str) -> Result<(), (String, String)> {
    let path = Path::new(text);
    let clean = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !clean || !path.starts_with("/dev") || path == Path::new("/dev") {
        return Err((
            "a device path must name a node under /dev, without `.` or `..`".into(),
            "e.g. devices = [\"/dev/fuse\"], or a rule such as \"c 10:229 rw\"".into(),
        ));
    }
    Ok(())
}

/// `c|b MAJOR|*:MINOR|* [r][w][m]`.
fn parse_device_rule(text: &str) -> Result<DeviceRule, (String, String)> {
    let help = || {
        "write a device path under /dev (\"/dev/fuse\") or a rule `TYPE MAJOR:MINOR ACCESS`: \
         TYPE c (char) or b (block), MAJOR and MINOR numbers or *, ACCESS some of r, w, m \
         (e.g. \"c 10:229 rw\", \"b 7:* r\")"
            .to_string()
    };
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [kind, numbers, access] = parts.as_slice() else {
        return Err(("expected three fields".into(), help()));
    };
    let kind = match *kind {
        "c" => DeviceKind::Char,
        "b" => DeviceKind::Block,
        "a" => {
            return Err((
                "type `a` (all devices) is not allowed".into(),
                "name the devices: c or b with their numbers, e.g. \"c 10:229 rw\"".into(),
            ))
        }
        other => return Err((format!("unknown device type {other:?}"), help())),
    };
    let Some((major, minor)) = numbers.split_once(':') else {
        return Err((format!("{numbers:?} is not MAJOR:MINOR"), help()));
    };
    let number = |s: &str, max: u32, what: &str| -> Result<Option<u32>, (String, String)> {
        if s == "*" {
            return Ok(None);
        }
        match s.parse::<u32>() {
            Ok(n) if n <= max && s.chars().all(|c| c.is_ascii_digit()) => Ok(Some(n)),
            _ => Err((
                format!("{what} {s:?} must be * or a number up to {max}"),
                help(),
            )),
        }
    };
    let (major, minor) = (
        number(major, MAX_MAJOR, "major")?,
        number(minor, MAX_MINOR, "minor")?,
    );
    let (mut read, mut write, mut mknod) = (false, false, false);
    for c in access.chars() {
        let flag = match c {
            'r' => &mut read,
            'w' => &mut write,
            'm' => &mut mknod,
            _ => return Err((format!("unknown access {c:?} in {access:?}"), help())),
        };
        if *flag {
            return Err((format!("access {c:?} is repeated in {access:?}"), help()));
        }
        *flag = true;
    }
    Ok(DeviceRule {
        kind,
        major,
        minor,
        read,
        write,
        mknod,
    })
}

fn parse_mounts(f: &Field<'_, '_, '_, '_>) -> Result<Vec<Mount>, UnitError> {
    let example = "[{ host = \"/var/lib/web\", path = \"/data\" }]";
    let DeValue::Array(items) = f.value.get_ref() else {
        return Err(f.type_err("a list of tables", example));
    };
    let mut mounts = Vec::new();
    let mut targets = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        let dotted = format!("{}[{i}]", f.dotted);
        let DeValue::Table(table) = item.get_ref() else {
            let e = Field {
                ctx: f.ctx,
                name: "mounts",
                dotted,
                value: item,
                expand: f.expand,
            };
            return Err(e.type_err("a list of tables", example));
        };
        let (mut host, mut path, mut read_only, mut create) = (None, None, false, false);
        for (k, field, key) in fields(f.ctx, &dotted, table, f.expand) {
            match k {
                "host" => host = Some(field.abs_path("\"/var/lib/web\"")?),
                "path" => {
                    let p = field.abs_path("\"/data\"")?;
                    if !targets.insert(p.clone()) {
                        return Err(field.err(
                            format!("two mounts use the same path {:?}", p.display().to_string()),
                            Some("give each mount its own path inside the container".into()),
                        ));
                    }
                    path = Some(p);
                }
                "read_only" => read_only = field.boolean()?,
                "create" => create = field.boolean()?,
                _ => {
                    return Err(f.ctx.unknown_key(
                        &format!("container.mounts[{i}]"),
                        &field.dotted,
                        key,
                        MOUNT_KEYS,
                    ))
                }
            }
        }
        let missing = |what: &str| {
            f.ctx
                .error(
                    format!("mount is missing `{what}`"),
                    Some(format!("{dotted}.{what}")),
                )
                .at_offset(f.ctx.text, item.span().start)
                .with_help(format!(
                    "each mount needs `host` and `path`, e.g. mounts = {example}"
                ))
        };
        let host = host.ok_or_else(|| missing("host"))?;
        let path = path.ok_or_else(|| missing("path"))?;
        mounts.push(Mount {
            host,
            path,
            read_only,
            create,
        });
    }
    Ok(mounts)
}

fn check_user(user: &str) -> Result<(), String> {
    let mut parts = user.split(':');
    let (name, group) = (parts.next().unwrap_or_default(), parts.next());
    if parts.next().is_some() {
        return Err("more than one `:`".into());
    }
    for (what, part) in std::iter::once(("user", name)).chain(group.map(|g| ("group", g))) {
        if part.is_empty() {
            return Err(format!("the {what} is empty"));
        }
        if part.starts_with('-') {
            return Err(format!("the {what} must not start with `-`"));
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(format!("the character {c:?} is not allowed"));
        }
    }
    Ok(())
}

fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if name.starts_with(['-', '.']) || name.ends_with(['-', '.']) {
        return Err("must not start or end with `-` or `.`".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.')))
    {
        return Err(format!("the character {c:?} is not allowed"));
    }
    Ok(())
}

fn parse_service(ctx: &Ctx<'_>, table: &DeTable<'_>) -> Result<ServiceSection, UnitError> {
    let mut s = ServiceSection::default();
    let mut restart_span = None;
    let mut restart_max_span = None;
    let mut restart_sec_given = false;
    for (k, f, key) in fields(ctx, "service", table, false) {
        match k {
            "type" => {
                s.kind = match f.choice(&["simple", "oneshot"])? {
                    "oneshot" => ServiceType::Oneshot,
                    _ => ServiceType::Simple,
                }
            }
            "restart" => {
                s.restart = match f.choice(&["no", "on-failure", "always"])? {
                    "on-failure" => RestartPolicy::OnFailure,
                    "always" => RestartPolicy::Always,
                    _ => RestartPolicy::No,
                };
                restart_span = Some(f.value.span());
            }
            "restart_sec" => {
                s.restart_sec = f.duration()?;
                restart_sec_given = true;
            }
            "restart_max_sec" => {
                s.restart_max_sec = f.duration()?;
                restart_max_span = Some(f.value.span());
            }
            "stop_timeout" => s.stop_timeout = f.duration()?,
            "start_limit_burst" => {
                let n = f.integer(1, "5")?;
                s.start_limit_burst = u32::try_from(n)
                    .map_err(|_| f.err("`start_limit_burst` is too large".into(), None))?;
            }
            "start_limit_interval" => {
                s.start_limit_interval = f.duration()?;
                if s.start_limit_interval.is_zero() {
                    return Err(f.invalid(
                        "the interval must be longer than 0",
                        "e.g. start_limit_interval = \"10s\"",
                    ));
                }
            }
            "memory_max" => s.memory_max = Some(f.bytes()?),
            "cpu_max" => s.cpu_max = Some(f.cpu()?),
            "pids_max" => s.pids_max = Some(f.integer(1, "100")?),
            _ => return Err(ctx.unknown_key("service", &f.dotted, key, keys_of("service"))),
        }
    }
    if s.kind == ServiceType::Oneshot && s.restart == RestartPolicy::Always {
        let e = ctx
            .error(
                "a oneshot unit cannot use restart = \"always\"".into(),
                Some("service.restart".into()),
            )
            .with_help("a oneshot is meant to finish; use restart = \"on-failure\" to retry failures, or type = \"simple\"");
        return Err(match restart_span {
            Some(span) => e.at_offset(ctx.text, span.start),
            None => e,
        });
    }
    if let Some(span) = restart_max_span {
        if s.restart_max_sec < s.restart_sec {
            let sec_where = if restart_sec_given {
                ""
            } else {
                " (the default)"
            };
            return Err(ctx
                .error(
                    format!(
                        "restart_max_sec ({:?}) is shorter than restart_sec ({:?}{sec_where})",
                        s.restart_max_sec, s.restart_sec
                    ),
                    Some("service.restart_max_sec".into()),
                )
                .at_offset(ctx.text, span.start)
                .with_help(
                    "restart_max_sec caps the growing restart delay; make it at least restart_sec",
                ));
        }
    }
    Ok(s)
}

fn parse_fleet(ctx: &Ctx<'_>, table: &DeTable<'_>) -> Result<FleetSection, UnitError> {
    let mut s = FleetSection::default();
    let mut global_span = None;
    let mut pinned = None;
    for (k, f, key) in fields(ctx, "fleet", table, true) {
        match k {
            "machine_id" => {
                let id = f.nonempty_string("\"2c2a9c3e8f1d4b6a9e0f7d5c3b1a2e4f\"")?;
                if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(f.err(
                        format!("invalid machine_id {id:?}: it contains whitespace"),
                        Some("use the id from /etc/machine-id".into()),
                    ));
                }
                s.machine_id = Some(id);
                pinned = pinned.or(Some(("machine_id", f.value.span())));
            }
            "machine_of" => {
                s.machine_of = f.unit_names()?;
                if !s.machine_of.is_empty() {
                    pinned = pinned.or(Some(("machine_of", f.value.span())));
                }
            }
            "machine_metadata" => {
                for (rule, span) in f.strings("[\"region=us-east\"]")? {
                    match rule.split_once('=') {
                        Some((key, value)) if !key.trim().is_empty() => {
                            s.machine_metadata.push(MetadataRule {
                                key: key.trim().to_string(),
                                value: value.trim().to_string(),
                            })
                        }
                        _ => {
                            return Err(f.err_at(
                                span,
                                format!(
                                    "invalid machine_metadata rule {rule:?}: expected key=value"
                                ),
                                Some(
                                    "e.g. machine_metadata = [\"region=us-east\", \"disk=ssd\"]"
                                        .into(),
                                ),
                            ))
                        }
                    }
                }
            }
            "conflicts" => {
                for (glob, span) in f.strings("[\"web@*\"]")? {
                    if glob.trim().is_empty() {
                        return Err(f.err_at(
                            span,
                            "a conflicts pattern must not be empty".into(),
                            Some("use a unit name or glob, e.g. conflicts = [\"web@*\"]".into()),
                        ));
                    }
                    s.conflicts.push(glob);
                }
            }
            "global" => {
                s.global = f.boolean()?;
                if s.global {
                    global_span = Some(f.value.span());
                }
            }
            "replaces" => {
                s.replaces = f.unit_names()?;
                if !s.replaces.is_empty() {
                    pinned = pinned.or(Some(("replaces", f.value.span())));
                }
            }
            _ => return Err(ctx.unknown_key("fleet", &f.dotted, key, keys_of("fleet"))),
        }
    }
    if let (Some(global), Some((what, span))) = (global_span, pinned) {
        let at = span.start.max(global.start);
        return Err(ctx
            .error(
                format!("a global unit cannot use `{what}`"),
                Some(format!("fleet.{what}")),
            )
            .at_offset(ctx.text, at)
            .with_help("a global unit runs on every machine matching machine_metadata; remove `global` or `".to_string() + what + "`"));
    }
    Ok(s)
}
