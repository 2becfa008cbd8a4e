//! Loading units: the unit directories, reload, units loaded over the API (persisted in the
//! state directory), template instances, and the ordering graph derived from them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use flotilla_units::{Catalog, Unit};

use super::{source_hash, Job, Manager, Slot};
use crate::api::{ApiError, ReloadReport, UnitInfo};
use crate::logs::MANAGER_STREAM;

impl Manager {
    pub(super) fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.cfg.unit_dirs.clone();
        if let Some(api) = &self.cfg.api_units_dir {
            if api.is_dir() {
                dirs.push(api.clone());
            }
        }
        dirs
    }

    /// Make sure `name` has a slot, instantiating a template if needed.
    pub(super) fn ensure(&mut self, name: &str) -> Result<UnitInfo, ApiError> {
        if !self.slots.contains_key(name) {
            match self.catalog.resolve(name) {
                Some(Ok(unit)) => {
                    self.insert_unit(unit);
                    self.recompute_graph();
                }
                Some(Err(e)) => return Err(ApiError::InvalidUnit(e.to_string())),
                None => return Err(ApiError::NoSuchUnit(name.to_string())),
            }
        }
        self.info(name)
            .ok_or_else(|| ApiError::NoSuchUnit(name.to_string()))
    }

    pub(super) fn insert_unit(&mut self, unit: Unit) {
        let name = unit.name.clone();
        self.slots
            .entry(name.clone())
            .or_insert_with(|| Slot::new(&name));
        self.units.insert(name, unit);
    }

    pub(super) fn recompute_graph(&mut self) {
        self.preds = flotilla_units::predecessor_map(&self.units);
        self.cycles.clear();
        for cycle in flotilla_units::ordering_cycles(&self.units) {
            let text = flotilla_units::format_cycle(&cycle);
            for n in &cycle {
                self.cycles.insert(n.clone(), text.clone());
            }
        }
        // Running units can form a cycle (a reload or LoadUnit added an edge): stops must
        // not wait on each other around it, so they follow the graph without its closing
        // edges, dropped the same way every time.
        let (stop_preds, ignored) = flotilla_units::break_cycles(&self.preds);
        if ignored != self.ignored_edges {
            for (a, b) in &ignored {
                let cycle = self.cycles.get(a).map_or("", String::as_str);
                log::warn!(
                    "ordering cycle {cycle}: stops ignore that {a} is ordered after {b} \
                     ({b} may stop before {a}); remove one after/before to fix it"
                );
            }
        }
        self.stop_preds = stop_preds;
        self.ignored_edges = ignored;
    }

    /// Store and install a unit, or a template (`name@`): then its state as `LoadUnit`
    /// answers it (a template has no state of its own: loaded, inactive, dead).
    pub(super) fn load_from_api(
        &mut self,
        name: &str,
        text: &str,
    ) -> Result<Option<UnitInfo>, ApiError> {
        flotilla_units::check_name(name)
            .map_err(|e| ApiError::InvalidUnit(format!("invalid unit name {name:?}: {e}")))?;
        let dir = self.cfg.api_units_dir.clone();
        let path = dir.as_ref().map(|d| d.join(format!("{name}.toml")));
        if flotilla_units::split_instance(name).is_some_and(|(_, i)| i.is_empty()) {
            let prefix = name.trim_end_matches('@');
            let t = flotilla_units::Template::new(prefix, path.as_deref(), text.to_string())
                .map_err(|e| ApiError::InvalidUnit(e.to_string()))?;
            self.persist(path.as_deref(), text)?;
            self.catalog.templates.insert(prefix.to_string(), t);
            return Ok(Some(UnitInfo {
                message: format!("a template: start an instance such as {prefix}@1"),
                ..UnitInfo::loaded(name)
            }));
        }
        let unit = flotilla_units::parse_unit(name, path.as_deref(), text)
            .map_err(|e| ApiError::InvalidUnit(e.to_string()))?;
        self.persist(path.as_deref(), text)?;
        self.define(unit);
        self.recompute_graph();
        Ok(None)
    }

    pub(super) fn persist(&self, path: Option<&Path>, text: &str) -> Result<(), ApiError> {
        let Some(path) = path else { return Ok(()) };
        let tmp = path.with_extension("toml.tmp");
        let res = path
            .parent()
            .map(fs::create_dir_all)
            .transpose()
            .and_then(|_| fs::write(&tmp, text))
            .and_then(|_| fs::rename(&tmp, path));
        res.map_err(|e| {
            ApiError::Refused(format!(
                "cannot store the unit at {}: {e}; check that the state directory is writable",
                path.display()
            ))
        })
    }

    /// Install a (new) definition. A running unit keeps running; the new definition is
    /// used from its next start.
    pub(super) fn define(&mut self, unit: Unit) {
        if let Some(slot) = self.slots.get_mut(&unit.name) {
            slot.definition_loaded();
        }
        self.insert_unit(unit);
    }

    /// Re-read the unit directories.
    pub fn reload(&mut self, restart_changed: bool) -> ReloadReport {
        let catalog = Catalog::load_dirs(&self.dirs());
        let mut report = ReloadReport::default();
        let mut broken: BTreeSet<String> = BTreeSet::new();
        for e in &catalog.errors {
            report.errors.push(e.to_string());
            if let Some(name) = &e.unit {
                broken.insert(name.clone());
                if let Some(slot) = self.slots.get_mut(name) {
                    slot.load_failed(e.to_string());
                    slot.log
                        .push(&self.cfg.logs, MANAGER_STREAM, &format!("reload: {e}"));
                }
            }
        }
        for (name, unit) in &catalog.units {
            match self.units.get(name) {
                None => report.added.push(name.clone()),
                Some(old) if old.source != unit.source || old.path != unit.path => {
                    report.changed.push(name.clone())
                }
                Some(_) => {}
            }
        }
        // Instances of templates are re-instantiated from the new template.
        let mut instances = Vec::new();
        for name in self.units.keys() {
            if catalog.units.contains_key(name) || broken.contains(name) {
                continue;
            }
            match catalog.resolve(name) {
                Some(Ok(u)) => instances.push(u),
                Some(Err(e)) => {
                    report.errors.push(e.to_string());
                    broken.insert(name.clone());
                }
                None => report.removed.push(name.clone()),
            }
        }
        for u in &instances {
            if self.units.get(&u.name).map(|o| &o.source) != Some(&u.source) {
                report.changed.push(u.name.clone());
            }
        }
        let mut catalog = catalog;
        for unit in std::mem::take(&mut catalog.units)
            .into_values()
            .chain(instances)
        {
            self.define(unit);
        }
        for name in &report.removed {
            self.remove(name);
        }
        // Keep only the templates: the units themselves live in `self.units`.
        self.catalog = Catalog {
            templates: catalog.templates,
            ..Catalog::default()
        };
        self.recompute_graph();
        if restart_changed {
            // Restart every running unit whose process was started from another definition,
            // including one installed by an earlier reload without a restart.
            let stale: Vec<String> = self
                .slots
                .iter()
                .filter(|(n, s)| {
                    s.main_pid().is_some()
                        && s.running_source() != self.units.get(*n).map(|u| source_hash(&u.source))
                })
                .map(|(n, _)| n.clone())
                .collect();
            for name in stale {
                self.queue_stop(&name, Job::Restart);
                report.restarted.push(name);
            }
        }
        report
    }
}
