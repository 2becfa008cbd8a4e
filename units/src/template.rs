//! Unit templates: `name@.toml` files instantiated as `name@instance`.

use std::path::{Path, PathBuf};

use crate::error::UnitError;
use crate::model::Unit;
use crate::parse::{check_name, file_label, parse_checked};

/// Instance name used to validate a template when it is loaded.
const PROBE_INSTANCE: &str = "instance";

/// A template unit (`prefix@.toml`), kept as text and parsed once per instance, because
/// specifiers (`%i`, `%n`, ...) expand differently for each instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// The name before `@`: `worker` for `worker@.toml`.
    pub prefix: String,
    /// File the template was read from, if any.
    pub path: Option<PathBuf>,
    /// The TOML text.
    pub source: String,
}

impl Template {
    /// Checks `prefix` and validates `source` by instantiating it with a dummy instance, so
    /// errors show up when the template is loaded rather than when an instance starts.
    pub fn new(prefix: &str, path: Option<&Path>, source: String) -> Result<Template, UnitError> {
        let template_name = format!("{prefix}@");
        let file = file_label(path);
        if prefix.contains('@') {
            return Err(UnitError::new(
                file,
                format!("invalid template prefix `{prefix}`: it must not contain `@`"),
            )
            .with_unit(template_name)
            .with_help("a template file is named `PREFIX@.toml`, e.g. `worker@.toml`"));
        }
        check_name(&template_name).map_err(|reason| {
            UnitError::new(
                &file,
                format!("invalid template name `{template_name}`: {reason}"),
            )
            .with_unit(&template_name)
            .with_help("template names use letters, digits, `_`, `.`, `:` and `-`, then `@`")
        })?;
        let template = Template {
            prefix: prefix.to_string(),
            path: path.map(Path::to_path_buf),
            source,
        };
        template.instantiate(PROBE_INSTANCE).map_err(|mut e| {
            e.unit = Some(template_name);
            e
        })?;
        Ok(template)
    }

    /// The template's own name, `prefix@`.
    pub fn name(&self) -> String {
        format!("{}@", self.prefix)
    }

    /// Parses the unit `prefix@instance`, with specifiers expanded for that instance.
    pub fn instantiate(&self, instance: &str) -> Result<Unit, UnitError> {
        let name = format!("{}@{instance}", self.prefix);
        let file = file_label(self.path.as_deref());
        if instance.is_empty() {
            return Err(
                UnitError::new(file, format!("`{name}` has an empty instance name"))
                    .with_unit(&name)
                    .with_help(format!("name the instance, e.g. `{}@1`", self.prefix)),
            );
        }
        check_name(&name).map_err(|reason| {
            UnitError::new(&file, format!("invalid instance name `{name}`: {reason}"))
                .with_unit(&name)
                .with_help("instance names use letters, digits, `_`, `.`, `:` and `-`")
        })?;
        parse_checked(&name, self.path.as_deref(), &self.source)
    }
}
