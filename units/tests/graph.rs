//! Ordering graph: predecessors and cycle detection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};

use flotilla_units::*;

/// (name, after, before, requires)
type Spec<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);

/// Builds units from specs.
fn units(specs: &[Spec<'_>]) -> BTreeMap<String, Unit> {
    specs
        .iter()
        .map(|(name, after, before, requires)| {
            let list = |l: &[&str]| {
                l.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let text = format!(
                "[unit]\nafter = [{}]\nbefore = [{}]\nrequires = [{}]\n[container]\ncommand = [\"/bin/true\"]\n",
                list(after),
                list(before),
                list(requires)
            );
            (name.to_string(), parse_unit(name, None, &text).unwrap())
        })
        .collect()
}

/// A self-loop cannot be written in a file (it is rejected), so build it directly.
fn with_self_loop(mut map: BTreeMap<String, Unit>, name: &str) -> BTreeMap<String, Unit> {
    map.get_mut(name).unwrap().unit.after.push(name.to_string());
    map
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn cycles(map: &BTreeMap<String, Unit>) -> Vec<String> {
    ordering_cycles(map)
        .iter()
        .map(|c| format_cycle(c))
        .collect()
}

#[test]
fn predecessors_come_from_after_and_before() {
    let map = units(&[
        ("web", &["db"], &[], &["cache"]),
        ("db", &[], &[], &[]),
        ("setup", &[], &["web", "db"], &[]),
        ("cache", &[], &[], &[]),
        ("proxy", &["web", "ghost"], &[], &[]),
    ]);
    assert_eq!(order_predecessors(&map, "web"), set(&["db", "setup"]));
    assert_eq!(order_predecessors(&map, "db"), set(&["setup"]));
    // requires does not order.
    assert_eq!(order_predecessors(&map, "cache"), set(&[]));
    // Names need not be loaded.
    assert_eq!(order_predecessors(&map, "proxy"), set(&["ghost", "web"]));
    assert_eq!(order_predecessors(&map, "unknown"), set(&[]));
}

#[test]
fn no_false_cycles() {
    // A diamond plus a requires loop (requires does not order) and a before/after pair
    // that say the same thing twice.
    let map = units(&[
        ("a", &[], &[], &["d"]),
        ("b", &["a"], &[], &[]),
        ("c", &["a"], &["d"], &[]),
        ("d", &["b", "c"], &[], &["a"]),
    ]);
    assert_eq!(cycles(&map), Vec::<String>::new());
    assert!(ordering_cycles(&BTreeMap::new()).is_empty());
}

#[test]
fn two_cycle() {
    let map = units(&[("b", &["a"], &[], &[]), ("a", &["b"], &[], &[])]);
    assert_eq!(ordering_cycles(&map), vec![vec!["a", "b", "a"]]);
    assert_eq!(cycles(&map), ["a -> b -> a"]);
}

#[test]
fn two_cycle_through_before() {
    // a before b, and a after b.
    let map = units(&[("a", &["b"], &["b"], &[]), ("b", &[], &[], &[])]);
    assert_eq!(cycles(&map), ["a -> b -> a"]);
}

#[test]
fn three_cycle_with_full_path() {
    // a after c, c after b, b after a: a waits for c, c for b, b for a.
    let map = units(&[
        ("a", &["c"], &[], &[]),
        ("b", &["a"], &[], &[]),
        ("c", &["b"], &[], &[]),
        ("x", &["a"], &[], &[]),
    ]);
    assert_eq!(cycles(&map), ["a -> c -> b -> a"]);
}

#[test]
fn self_loop() {
    let map = with_self_loop(units(&[("a", &[], &[], &[]), ("b", &["a"], &[], &[])]), "a");
    assert_eq!(ordering_cycles(&map), vec![vec!["a", "a"]]);
    assert_eq!(cycles(&map), ["a -> a"]);
}

#[test]
fn separate_cycles_are_each_reported_in_order() {
    let map = units(&[
        ("z1", &["z2"], &[], &[]),
        ("z2", &["z1"], &[], &[]),
        ("m", &["n"], &[], &[]),
        ("n", &["o"], &[], &[]),
        ("o", &["m"], &[], &[]),
        ("free", &["m", "z1"], &[], &[]),
    ]);
    assert_eq!(cycles(&map), ["m -> n -> o -> m", "z1 -> z2 -> z1"]);
    // Deterministic.
    assert_eq!(ordering_cycles(&map), ordering_cycles(&map.clone()));
}

#[test]
fn cycle_through_an_unloaded_name() {
    // x before ghost, y after ghost, x after y: ghost waits for x, x for y, y for ghost.
    let map = units(&[("x", &["y"], &["ghost"], &[]), ("y", &["ghost"], &[], &[])]);
    assert_eq!(cycles(&map), ["ghost -> x -> y -> ghost"]);
}

#[test]
fn format() {
    let c: Vec<String> = ["a", "b", "c", "a"].iter().map(|s| s.to_string()).collect();
    assert_eq!(format_cycle(&c), "a -> b -> c -> a");
    assert_eq!(format_cycle(&[]), "");
}

/// Is `graph` free of cycles? (Kahn: repeatedly remove nodes without predecessors left.)
fn acyclic(graph: &BTreeMap<String, BTreeSet<String>>) -> bool {
    let mut g = graph.clone();
    loop {
        let free: Vec<String> = g
            .iter()
            .filter(|(_, preds)| preds.iter().all(|p| !g.contains_key(p)))
            .map(|(n, _)| n.clone())
            .collect();
        if free.is_empty() {
            return g.is_empty();
        }
        for n in free {
            g.remove(&n);
        }
    }
}

#[test]
fn break_cycles_drops_the_closing_edges_deterministically() {
    let map = units(&[
        ("a", &["b"], &[], &[]),
        ("b", &["a"], &[], &[]),
        ("c", &["d"], &[], &[]),
        ("d", &["e"], &[], &[]),
        ("e", &["c"], &[], &[]),
        ("f", &["a", "c"], &[], &[]),
    ]);
    let graph = predecessor_map(&map);
    let (kept, dropped) = break_cycles(&graph);
    // Walked from a: a -> b kept, b -> a closes the cycle; from c: c -> d -> e, e -> c closes it.
    assert_eq!(
        dropped,
        vec![
            ("b".to_string(), "a".to_string()),
            ("e".to_string(), "c".to_string())
        ]
    );
    assert!(acyclic(&kept));
    assert!(!acyclic(&graph));
    // Edges outside cycles all stay.
    assert_eq!(kept["f"], set(&["a", "c"]));
    assert_eq!(kept["a"], set(&["b"]));
    // Same input, same answer.
    assert_eq!(break_cycles(&graph), (kept, dropped));
}

#[test]
fn break_cycles_drops_a_self_loop_and_keeps_an_acyclic_graph() {
    let map = with_self_loop(units(&[("a", &[], &[], &[]), ("b", &["a"], &[], &[])]), "a");
    let (kept, dropped) = break_cycles(&predecessor_map(&map));
    assert_eq!(dropped, vec![("a".to_string(), "a".to_string())]);
    assert_eq!(kept["b"], set(&["a"]));
    let plain = predecessor_map(&units(&[("x", &["y"], &[], &[]), ("y", &[], &["z"], &[])]));
    let (kept, dropped) = break_cycles(&plain);
    assert!(dropped.is_empty());
    assert_eq!(kept, plain);
}
