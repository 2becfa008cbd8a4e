//! The engine's placement decisions, with fleet's semantics. Pure: the machines, the units
//! that want a machine and the current assignments in, decisions out; the engine reads
//! them from the registry and writes the decisions back with compare-and-swap.
//!
//! Rules (`[fleet]` of a unit, see units/README.md):
//! - `machine_id`: only that machine;
//! - `machine_metadata`: different keys AND, several values of one key OR;
//! - `machine_of`: the machine where every named unit is (it waits until they are placed);
//! - `conflicts`: globs; never on a machine with a matching unit, and never where a unit
//!   whose own `conflicts` match this one runs (applied both ways);
//! - `replaces`: placed on the machine of the replaced unit, which is moved away;
//! - `global`: not placed here: every matching machine runs it ([`global_fits`]).
//!
//! A **draining** machine (a rolling OS update takes it down next, [`schedule_draining`])
//! gets no new unit, and each unit on it is moved ([`Decision::Move`]: one compare-and-swap
//! from the old machine to the new one, a planned move) to a machine that fits under the
//! rules above; a unit that fits nowhere else stays ([`Decision::Stays`], with why). Global
//! units are not placed, so they stay.
//!
//! Among the machines that fit, the least loaded wins; among equally loaded ones, a machine
//! that already holds the unit's registry image ([`Machine::images`], compared with
//! [`Candidate::image`]) wins, so a start there needs no pull; then the smallest id. The
//! image never outweighs load or any rule above. The same input always gives the same
//! decisions.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_units::FleetSection;

use crate::model::Machine;

/// A unit that should run somewhere: its name and its placement rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Unit name.
    pub name: String,
    /// Its `[fleet]` section.
    pub fleet: FleetSection,
    /// The store name of its registry image (`[container] image`, see
    /// `flotilla_units::ContainerSection::store_name`), if it has one: breaks ties between
    /// equally loaded machines in favour of those that hold it.
    pub image: Option<String>,
}

/// What the engine should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Place `unit` on `machine`.
    Assign {
        /// Unit name.
        unit: String,
        /// Machine id.
        machine: String,
    },
    /// Take `unit` off `machine` (the machine is gone, or a replacing unit takes its place).
    Unassign {
        /// Unit name.
        unit: String,
        /// Machine id it was on.
        machine: String,
        /// Why.
        reason: String,
    },
    /// Move `unit` from the draining machine `from` to `to` (a planned move: the
    /// assignment goes from one to the other in one compare-and-swap).
    Move {
        /// Unit name.
        unit: String,
        /// The draining machine it is on.
        from: String,
        /// The machine it moves to.
        to: String,
    },
    /// `unit` stays on the draining machine `machine`: no other machine fits it.
    Stays {
        /// Unit name.
        unit: String,
        /// The draining machine.
        machine: String,
        /// Why, per machine.
        reason: String,
    },
    /// `unit` fits no machine now.
    Unschedulable {
        /// Unit name.
        unit: String,
        /// Why, per machine.
        reason: String,
    },
}

/// `true` when glob `pattern` (`*`, `?`, `[...]`) matches `name`; an invalid pattern only
/// matches itself.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    match glob::Pattern::new(pattern) {
        Ok(p) => p.matches(name),
        Err(_) => pattern == name,
    }
}

/// Whether `metadata` satisfies the rules: every key present with one of its values.
pub fn metadata_fits(
    rules: &FleetSection,
    metadata: &BTreeMap<String, String>,
) -> Result<(), String> {
    let mut wanted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for r in &rules.machine_metadata {
        wanted.entry(&r.key).or_default().insert(&r.value);
    }
    for (key, values) in wanted {
        match metadata.get(key) {
            Some(v) if values.contains(v.as_str()) => {}
            Some(v) => {
                return Err(format!(
                    "metadata {key}={v} is not one of {}",
                    values.into_iter().collect::<Vec<_>>().join("|")
                ))
            }
            None => return Err(format!("no metadata {key}")),
        }
    }
    Ok(())
}

pub(crate) fn conflicts_between(
    a: &str,
    a_rules: &FleetSection,
    b: &str,
    b_rules: Option<&FleetSection>,
) -> bool {
    a_rules.conflicts.iter().any(|g| glob_matches(g, b))
        || b_rules.is_some_and(|r| r.conflicts.iter().any(|g| glob_matches(g, a)))
}

/// Whether global unit `unit` runs on `machine`: its metadata rules fit and no unit already
/// there conflicts with it (either way). `running` are the units on that machine.
pub fn global_fits(
    unit: &Candidate,
    machine: &Machine,
    running: &[&Candidate],
) -> Result<(), String> {
    metadata_fits(&unit.fleet, &machine.metadata)?;
    if let Some(other) = running.iter().find(|o| {
        o.name != unit.name && conflicts_between(&unit.name, &unit.fleet, &o.name, Some(&o.fleet))
    }) {
        return Err(format!("conflicts with {}", other.name));
    }
    Ok(())
}

/// Decides placements. `units` are the non-global units that should run (desired
/// `launched` or `loaded`); `assigned` maps unit → machine as the registry has it now;
/// `globals` are the global units (they count for conflicts on every machine they fit).
pub fn schedule(
    machines: &[Machine],
    units: &[Candidate],
    assigned: &BTreeMap<String, String>,
    globals: &[Candidate],
) -> Vec<Decision> {
    schedule_draining(machines, units, assigned, globals, &BTreeSet::new())
}

/// [`schedule`] with the machines in `draining` being emptied: nothing new is placed on
/// them, and their units are moved to machines that fit ([`Decision::Move`]) or stay
/// ([`Decision::Stays`]) when none does.
pub fn schedule_draining(
    machines: &[Machine],
    units: &[Candidate],
    assigned: &BTreeMap<String, String>,
    globals: &[Candidate],
    draining: &BTreeSet<String>,
) -> Vec<Decision> {
    let mut decisions = Vec::new();
    // New placements and moves go only to machines that are not draining.
    let open: Vec<Machine> = machines
        .iter()
        .filter(|m| !draining.contains(&m.id))
        .cloned()
        .collect();
    let by_name: BTreeMap<&str, &Candidate> = units
        .iter()
        .chain(globals)
        .map(|u| (u.name.as_str(), u))
        .collect();
    let present: BTreeSet<&str> = machines.iter().map(|m| m.id.as_str()).collect();
    // Where things run now; an assignment to a machine that is gone is undone.
    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    for (unit, machine) in assigned {
        let wanted = units.iter().any(|u| &u.name == unit);
        if !present.contains(machine.as_str()) {
            decisions.push(Decision::Unassign {
                unit: unit.clone(),
                machine: machine.clone(),
                reason: format!("machine {machine} is gone"),
            });
        } else if !wanted {
            decisions.push(Decision::Unassign {
                unit: unit.clone(),
                machine: machine.clone(),
                reason: "the unit is no longer wanted".into(),
            });
        } else {
            placed.insert(unit.clone(), machine.clone());
        }
    }

    // Replacements first: a unit that replaces a placed unit takes its machine.
    let mut pending: Vec<&Candidate> = units
        .iter()
        .filter(|u| !placed.contains_key(&u.name))
        .collect();
    pending.sort_by(|a, b| a.name.cmp(&b.name));
    let mut evicted: Vec<&Candidate> = Vec::new();
    for u in &pending {
        for r in &u.fleet.replaces {
            if let Some(m) = placed.remove(r) {
                decisions.push(Decision::Unassign {
                    unit: r.clone(),
                    machine: m.clone(),
                    reason: format!("replaced by {}", u.name),
                });
                if let Some(c) = by_name.get(r.as_str()) {
                    evicted.push(c);
                }
                placed.insert(u.name.clone(), m.clone());
                decisions.push(Decision::Assign {
                    unit: u.name.clone(),
                    machine: m,
                });
                break;
            }
        }
    }
    pending.retain(|u| !placed.contains_key(&u.name));
    pending.extend(evicted);

    // Units on draining machines move, in name order, where they fit without them.
    let mut on_draining: Vec<&Candidate> = units
        .iter()
        .filter(|u| placed.get(&u.name).is_some_and(|m| draining.contains(m)))
        .collect();
    on_draining.sort_by(|a, b| a.name.cmp(&b.name));
    for u in on_draining {
        let Some(from) = placed.remove(&u.name) else {
            continue;
        };
        match place(u, &open, &placed, &by_name, globals) {
            Ok(to) => {
                placed.insert(u.name.clone(), to.clone());
                decisions.push(Decision::Move {
                    unit: u.name.clone(),
                    from,
                    to,
                });
            }
            Err(reason) => {
                placed.insert(u.name.clone(), from.clone());
                decisions.push(Decision::Stays {
                    unit: u.name.clone(),
                    machine: from,
                    reason,
                });
            }
        }
    }

    // Units whose machine_of targets are placed go first; repeat while progress is made.
    loop {
        let mut progressed = false;
        let mut waiting = Vec::new();
        for u in pending {
            match place(u, &open, &placed, &by_name, globals) {
                Ok(machine) => {
                    placed.insert(u.name.clone(), machine.clone());
                    decisions.push(Decision::Assign {
                        unit: u.name.clone(),
                        machine,
                    });
                    progressed = true;
                }
                Err(reason) => waiting.push((u, reason)),
            }
        }
        if !progressed || waiting.is_empty() {
            for (u, reason) in waiting {
                decisions.push(Decision::Unschedulable {
                    unit: u.name.clone(),
                    reason,
                });
            }
            break;
        }
        pending = waiting.into_iter().map(|(u, _)| u).collect();
    }
    decisions
}

/// The least loaded machine that fits `u` (among equally loaded ones, one that holds its
/// image, then the first), or why none does.
fn place(
    u: &Candidate,
    machines: &[Machine],
    placed: &BTreeMap<String, String>,
    by_name: &BTreeMap<&str, &Candidate>,
    globals: &[Candidate],
) -> Result<String, String> {
    for target in &u.fleet.machine_of {
        if !placed.contains_key(target) {
            return Err(format!("machine_of: {target} is not placed"));
        }
    }
    let mut why = Vec::new();
    // (load, lacks the image): the smaller wins; on a tie the earlier machine (smaller id).
    let mut best: Option<((usize, bool), &str)> = None;
    for m in machines {
        match fits(u, m, placed, by_name, globals) {
            Ok(()) => {
                let load = placed.values().filter(|p| *p == &m.id).count();
                let lacks = !u.image.as_ref().is_some_and(|i| m.images.contains(i));
                let key = (load, lacks);
                if best.is_none_or(|(k, _)| key < k) {
                    best = Some((key, &m.id));
                }
            }
            Err(e) => why.push(format!("{}: {e}", m.id)),
        }
    }
    match best {
        Some((_, id)) => Ok(id.to_string()),
        None if machines.is_empty() => Err("no machines".into()),
        None => Err(format!("no machine fits ({})", why.join("; "))),
    }
}

fn fits(
    u: &Candidate,
    m: &Machine,
    placed: &BTreeMap<String, String>,
    by_name: &BTreeMap<&str, &Candidate>,
    globals: &[Candidate],
) -> Result<(), String> {
    if let Some(id) = &u.fleet.machine_id {
        if id != &m.id {
            return Err(format!("machine_id is {id}"));
        }
    }
    metadata_fits(&u.fleet, &m.metadata)?;
    for target in &u.fleet.machine_of {
        if placed.get(target).is_some_and(|t| t != &m.id) {
            return Err(format!("machine_of: {target} runs elsewhere"));
        }
    }
    let here = placed
        .iter()
        .filter(|(_, mid)| *mid == &m.id)
        .map(|(n, _)| n.as_str())
        .chain(
            globals
                .iter()
                .filter(|g| metadata_fits(&g.fleet, &m.metadata).is_ok())
                .map(|g| g.name.as_str()),
        );
    for other in here {
        if other != u.name
            && conflicts_between(
                &u.name,
                &u.fleet,
                other,
                by_name.get(other).map(|c| &c.fleet),
            )
        {
            return Err(format!("conflicts with {other}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use flotilla_units::MetadataRule;

    fn machine(id: &str, meta: &[(&str, &str)]) -> Machine {
        Machine {
            id: id.into(),
            address: String::new(),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            api: None,
            images: Vec::new(),
            os_version: String::new(),
            os: None,
        }
    }

    fn unit(name: &str, f: impl FnOnce(&mut FleetSection)) -> Candidate {
        let mut fleet = FleetSection::default();
        f(&mut fleet);
        Candidate {
            name: name.into(),
            fleet,
            image: None,
        }
    }

    const IMAGE: &str = "registry.example:5000/team/app:1";

    /// A draining machine gets nothing new; its units move to machines that fit (one
    /// Move each, no Unassign); a unit that fits nowhere else stays, with why; units on
    /// other machines and global units are untouched.
    #[test]
    fn a_draining_machine_is_emptied_by_moves_and_gets_nothing_new() {
        let ms = [
            machine("a", &[]),
            machine("b", &[("disk", "ssd")]),
            machine("c", &[]),
        ];
        let us = [
            unit("web", |_| {}),
            unit("db", |f| {
                f.machine_metadata = vec![MetadataRule {
                    key: "disk".into(),
                    value: "ssd".into(),
                }]
            }),
            unit("cache", |_| {}),
            unit("new", |_| {}),
        ];
        let globals = [unit("log", |f| f.global = true)];
        let assigned: BTreeMap<String, String> = [
            ("web".to_string(), "b".to_string()),
            ("db".to_string(), "b".to_string()),
            ("cache".to_string(), "a".to_string()),
        ]
        .into();
        let draining: BTreeSet<String> = ["b".to_string()].into();
        let d = schedule_draining(&ms, &us, &assigned, &globals, &draining);
        assert!(
            d.contains(&Decision::Move {
                unit: "web".into(),
                from: "b".into(),
                to: "c".into()
            }),
            "{d:?}"
        );
        assert!(
            d.iter()
                .any(|x| matches!(x, Decision::Stays { unit, machine, reason }
                if unit == "db" && machine == "b" && reason.contains("disk"))),
            "{d:?}"
        );
        assert!(
            !d.iter().any(|x| matches!(x, Decision::Unassign { .. })),
            "a drain never unassigns: {d:?}"
        );
        let placed = assigns(&d);
        assert_ne!(placed.get("new").map(String::as_str), Some("b"), "{d:?}");
        assert!(
            !placed.contains_key("cache"),
            "cache stays where it is: {d:?}"
        );
        assert!(
            !placed.contains_key("log"),
            "global units are not placed: {d:?}"
        );
        // Without the drain nothing moves.
        let plain = schedule(&ms, &us, &assigned, &globals);
        assert!(
            !plain.iter().any(|x| matches!(x, Decision::Move { .. })),
            "{plain:?}"
        );
    }

    fn holding(mut m: Machine, images: &[&str]) -> Machine {
        m.images = images.iter().map(|i| i.to_string()).collect();
        m
    }

    fn with_image(mut c: Candidate) -> Candidate {
        c.image = Some(IMAGE.into());
        c
    }

    /// Equally loaded machines: the one holding the unit's image gets it, not the smallest
    /// id; a unit without a registry image still goes to the smallest id.
    #[test]
    fn a_tie_goes_to_the_machine_that_holds_the_image() {
        let ms = [
            machine("a", &[]),
            holding(machine("b", &[]), &["other/app:2"]),
            holding(machine("c", &[]), &["other/app:2", IMAGE]),
        ];
        let us = [with_image(unit("web", |_| {}))];
        assert_eq!(
            assigns(&schedule(&ms, &us, &BTreeMap::new(), &[]))["web"],
            "c"
        );
        let us = [unit("plain", |_| {})];
        assert_eq!(
            assigns(&schedule(&ms, &us, &BTreeMap::new(), &[]))["plain"],
            "a"
        );
        // Two that hold it: the smaller id of those.
        let ms = [
            machine("a", &[]),
            holding(machine("b", &[]), &[IMAGE]),
            holding(machine("c", &[]), &[IMAGE]),
        ];
        let us = [with_image(unit("web", |_| {}))];
        assert_eq!(
            assigns(&schedule(&ms, &us, &BTreeMap::new(), &[]))["web"],
            "b"
        );
    }

    /// The image breaks ties only: a less loaded machine without it still wins, and the
    /// placement rules still decide first.
    #[test]
    fn load_and_rules_outweigh_the_image() {
        let ms = [
            machine("a", &[]),
            holding(machine("b", &[("disk", "hdd")]), &[IMAGE]),
        ];
        let placed = BTreeMap::from([("busy".to_string(), "b".to_string())]);
        let us = [unit("busy", |_| {}), with_image(unit("web", |_| {}))];
        assert_eq!(assigns(&schedule(&ms, &us, &placed, &[]))["web"], "a");
        let us = [with_image(unit("web", |f| {
            f.machine_metadata = vec![MetadataRule {
                key: "disk".into(),
                value: "ssd".into(),
            }]
        }))];
        let un = unschedulable(&schedule(&ms, &us, &BTreeMap::new(), &[]));
        assert!(un[0].1.contains("no machine fits"), "{un:?}");
        let us = [with_image(unit("web", |f| f.machine_id = Some("a".into())))];
        assert_eq!(
            assigns(&schedule(&ms, &us, &BTreeMap::new(), &[]))["web"],
            "a"
        );
    }

    /// Global units are not placed by the scheduler: where they run depends on metadata and
    /// conflicts only, whatever images the machines hold.
    #[test]
    fn global_units_ignore_the_images() {
        let ms = [machine("a", &[]), holding(machine("b", &[]), &[IMAGE])];
        let g = with_image(unit("agent", |f| f.global = true));
        assert!(global_fits(&g, &ms[0], &[]).is_ok());
        assert!(global_fits(&g, &ms[1], &[]).is_ok());
        let d = schedule(&ms, &[], &BTreeMap::new(), std::slice::from_ref(&g));
        assert!(d.is_empty(), "{d:?}");
    }

    fn assigns(d: &[Decision]) -> BTreeMap<String, String> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Assign { unit, machine } => Some((unit.clone(), machine.clone())),
                _ => None,
            })
            .collect()
    }

    fn unschedulable(d: &[Decision]) -> Vec<(String, String)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Unschedulable { unit, reason } => Some((unit.clone(), reason.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn least_loaded_and_deterministic() {
        let ms = [machine("a", &[]), machine("b", &[]), machine("c", &[])];
        let us: Vec<_> = (0..6).map(|i| unit(&format!("u{i}"), |_| {})).collect();
        let d = schedule(&ms, &us, &BTreeMap::new(), &[]);
        let a = assigns(&d);
        for m in ["a", "b", "c"] {
            assert_eq!(a.values().filter(|v| *v == m).count(), 2, "{a:?}");
        }
        assert_eq!(d, schedule(&ms, &us, &BTreeMap::new(), &[]));
    }

    /// fleet's functional test: 5 mutually conflicting units on 3 machines → 3 run, 2 say why.
    #[test]
    fn five_conflicting_units_on_three_machines() {
        let ms = [machine("a", &[]), machine("b", &[]), machine("c", &[])];
        let us: Vec<_> = (0..5)
            .map(|i| {
                unit(&format!("conflict@{i}"), |f| {
                    f.conflicts = vec!["conflict@*".into()]
                })
            })
            .collect();
        let d = schedule(&ms, &us, &BTreeMap::new(), &[]);
        assert_eq!(assigns(&d).len(), 3);
        let un = unschedulable(&d);
        assert_eq!(un.len(), 2);
        assert!(un[0].1.contains("conflicts with conflict@"), "{un:?}");
    }

    #[test]
    fn one_way_conflict_applies_both_ways() {
        let ms = [machine("a", &[])];
        let us = [
            unit("x", |f| f.conflicts = vec!["y".into()]),
            unit("y", |_| {}),
        ];
        let d = schedule(&ms, &us, &BTreeMap::new(), &[]);
        assert_eq!(assigns(&d).len(), 1);
        assert_eq!(unschedulable(&d).len(), 1);
        // The other way round: y is placed first, x declares the conflict.
        let placed = BTreeMap::from([("y".to_string(), "a".to_string())]);
        let d = schedule(&ms, &us, &placed, &[]);
        assert!(unschedulable(&d)[0].1.contains("conflicts with y"));
    }

    #[test]
    fn machine_of_follows_its_target() {
        let ms = [machine("a", &[]), machine("b", &[])];
        let us = [
            unit("side", |f| f.machine_of = vec!["main".into()]),
            unit("main", |f| f.machine_id = Some("b".into())),
        ];
        let a = assigns(&schedule(&ms, &us, &BTreeMap::new(), &[]));
        assert_eq!(a["main"], "b");
        assert_eq!(a["side"], "b");
        // A target that cannot be placed leaves the follower waiting, with the reason.
        let us = [unit("side", |f| f.machine_of = vec!["ghost".into()])];
        let un = unschedulable(&schedule(&ms, &us, &BTreeMap::new(), &[]));
        assert!(un[0].1.contains("ghost is not placed"), "{un:?}");
    }

    #[test]
    fn metadata_keys_and_values_or() {
        let ms = [
            machine("a", &[("region", "us"), ("disk", "ssd")]),
            machine("b", &[("region", "eu"), ("disk", "hdd")]),
            machine("c", &[("region", "ap"), ("disk", "ssd")]),
        ];
        let rule = |k: &str, v: &str| MetadataRule {
            key: k.into(),
            value: v.into(),
        };
        let us = [unit("w", |f| {
            f.machine_metadata = vec![
                rule("region", "eu"),
                rule("region", "ap"),
                rule("disk", "ssd"),
            ]
        })];
        assert_eq!(
            assigns(&schedule(&ms, &us, &BTreeMap::new(), &[]))["w"],
            "c"
        );
        let us = [unit("w", |f| f.machine_metadata = vec![rule("gpu", "yes")])];
        let un = unschedulable(&schedule(&ms, &us, &BTreeMap::new(), &[]));
        assert!(un[0].1.contains("no metadata gpu"), "{un:?}");
    }

    #[test]
    fn lost_machine_units_are_rescheduled() {
        let ms = [machine("b", &[])];
        let us = [unit("u", |_| {})];
        let placed = BTreeMap::from([("u".to_string(), "gone".to_string())]);
        let d = schedule(&ms, &us, &placed, &[]);
        assert!(d.contains(&Decision::Unassign {
            unit: "u".into(),
            machine: "gone".into(),
            reason: "machine gone is gone".into()
        }));
        assert_eq!(assigns(&d)["u"], "b");
    }

    #[test]
    fn replaces_takes_the_machine_and_moves_the_other() {
        let ms = [machine("a", &[]), machine("b", &[])];
        let us = [
            unit("old", |_| {}),
            unit("new", |f| {
                f.replaces = vec!["old".into()];
                f.conflicts = vec!["old".into()];
            }),
        ];
        let placed = BTreeMap::from([("old".to_string(), "a".to_string())]);
        let d = schedule(&ms, &us, &placed, &[]);
        let a = assigns(&d);
        assert_eq!(a["new"], "a");
        assert_eq!(a["old"], "b");
    }

    #[test]
    fn globals_count_for_conflicts_and_fit_by_metadata() {
        let ms = [machine("a", &[("role", "edge")]), machine("b", &[])];
        let g = unit("agent", |f| {
            f.global = true;
            f.machine_metadata = vec![MetadataRule {
                key: "role".into(),
                value: "edge".into(),
            }];
        });
        assert!(global_fits(&g, &ms[0], &[]).is_ok());
        assert!(global_fits(&g, &ms[1], &[]).is_err());
        let u = unit("shy", |f| f.conflicts = vec!["agent".into()]);
        let a = assigns(&schedule(&ms, &[u], &BTreeMap::new(), &[g]));
        assert_eq!(a["shy"], "b");
    }
}
