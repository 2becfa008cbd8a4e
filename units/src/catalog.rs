//! Loading all units and templates from a list of directories.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::UnitError;
use crate::model::Unit;
use crate::parse::{check_name, parse_unit, split_instance};
use crate::template::Template;

/// Every unit and template found in a set of directories, plus the files that failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    /// Concrete units by name (`web`, and instance files like `getty@tty1`).
    pub units: BTreeMap<String, Unit>,
    /// Templates by prefix (`worker` for `worker@.toml`).
    pub templates: BTreeMap<String, Template>,
    /// Problems: unreadable directories and files, and invalid units (with `unit` set).
    pub errors: Vec<UnitError>,
}

impl Catalog {
    /// Loads `*.toml` from each directory in order; a later directory overrides an earlier
    /// one for the same name (the overridden file is not read at all). `foo@.toml` is a
    /// template, `foo@x.toml` a concrete instance. Other files and hidden files (starting
    /// with `.`) are ignored. A missing directory or broken file becomes an entry in
    /// `errors`; everything else still loads.
    pub fn load_dirs(dirs: &[PathBuf]) -> Catalog {
        let mut catalog = Catalog::default();
        // name (file stem) -> effective file
        let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for dir in dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) => {
                    catalog.errors.push(
                        UnitError::new(
                            dir.display().to_string(),
                            format!("cannot read unit directory: {e}"),
                        )
                        .with_help("create the directory or remove it from the search path"),
                    );
                    continue;
                }
            };
            let mut found = Vec::new();
            for entry in entries {
                match entry {
                    Ok(entry) => found.push(entry.path()),
                    Err(e) => catalog.errors.push(UnitError::new(
                        dir.display().to_string(),
                        format!("cannot list unit directory: {e}"),
                    )),
                }
            }
            found.sort();
            for path in found {
                let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Some(stem) = file_name.strip_suffix(".toml") else {
                    continue;
                };
                if file_name.starts_with('.') || !path.is_file() {
                    continue;
                }
                files.insert(stem.to_string(), path);
            }
        }
        for (name, path) in files {
            let text = match crate::text::read_unit_file(&path) {
                Ok(text) => text,
                Err(e) => {
                    catalog.errors.push(e.with_unit(&name));
                    continue;
                }
            };
            if let Err(reason) = check_name(&name) {
                catalog.errors.push(
                    UnitError::new(
                        path.display().to_string(),
                        format!("invalid unit name `{name}`: {reason}"),
                    )
                    .with_unit(&name)
                    .with_help("rename the file; unit names use letters, digits, `_`, `.`, `:` and `-`, plus at most one `@`"),
                );
                continue;
            }
            match split_instance(&name) {
                Some((prefix, "")) => match Template::new(prefix, Some(&path), text) {
                    Ok(t) => {
                        catalog.templates.insert(prefix.to_string(), t);
                    }
                    Err(e) => catalog.errors.push(e),
                },
                _ => match parse_unit(&name, Some(&path), &text) {
                    Ok(unit) => {
                        catalog.units.insert(name, unit);
                    }
                    Err(e) => catalog.errors.push(e),
                },
            }
        }
        catalog
    }

    /// The unit called `name`: a concrete unit if there is one, else an instance of the
    /// template `prefix@` (parsed now), else `None`.
    pub fn resolve(&self, name: &str) -> Option<Result<Unit, UnitError>> {
        if let Some(unit) = self.units.get(name) {
            return Some(Ok(unit.clone()));
        }
        let (prefix, instance) = split_instance(name)?;
        // An empty instance (`tpl@`) reaches `instantiate`, which refuses it with a message.
        self.templates
            .get(prefix)
            .map(|template| template.instantiate(instance))
    }
}
