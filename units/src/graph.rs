//! The ordering graph: `after` and `before` only, as in systemd. `requires` and `wants`
//! pull units in but do not order them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::model::Unit;

/// Units that must finish starting before `name` starts: the names in its `after`, plus
/// every unit whose `before` lists `name`. Names need not be loaded units.
pub fn order_predecessors(units: &BTreeMap<String, Unit>, name: &str) -> BTreeSet<String> {
    let mut preds: BTreeSet<String> = units
        .get(name)
        .map(|u| u.unit.after.iter().cloned().collect())
        .unwrap_or_default();
    preds.extend(
        units
            .values()
            .filter(|u| u.unit.before.iter().any(|b| b == name))
            .map(|u| u.name.clone()),
    );
    preds.remove(name);
    preds
}

/// Every unit's start predecessors at once ("waits for" edges: unit -> the units it starts
/// after, from `after` and from other units' `before`), in one pass. Includes names that are
/// only mentioned, not loaded; units with no predecessor are absent.
pub fn predecessor_map(units: &BTreeMap<String, Unit>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for unit in units.values() {
        for after in &unit.unit.after {
            graph
                .entry(unit.name.clone())
                .or_default()
                .insert(after.clone());
        }
        for before in &unit.unit.before {
            graph
                .entry(before.clone())
                .or_default()
                .insert(unit.name.clone());
        }
    }
    graph
}

fn reachable(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<&str> = graph
        .get(start)
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    while let Some(n) = queue.pop_front() {
        if seen.insert(n.to_string()) {
            queue.extend(graph.get(n).into_iter().flatten().map(String::as_str));
        }
    }
    seen
}

/// Ordering cycles, one per set of units that wait on each other (a strongly connected
/// component). Each is the full path from the alphabetically first unit of the set along
/// "waits for" edges back to it, the first name repeated at the end: `["a", "b", "a"]` means
/// `a` starts after `b` and `b` after `a`. A unit ordered after itself gives `["a", "a"]`.
/// The path is a shortest such cycle; the list is sorted by first name.
pub fn ordering_cycles(units: &BTreeMap<String, Unit>) -> Vec<Vec<String>> {
    let graph = predecessor_map(units);
    let mut reverse: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &graph {
        for to in tos {
            reverse.entry(to.clone()).or_default().insert(from.clone());
        }
    }
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut cycles = Vec::new();
    for start in graph.keys() {
        if done.contains(start) {
            continue;
        }
        let forward = reachable(&graph, start);
        if !forward.contains(start) {
            continue;
        }
        let backward = reachable(&reverse, start);
        let component: BTreeSet<String> = forward.intersection(&backward).cloned().collect();
        if let Some(cycle) = shortest_cycle(&graph, &component, start) {
            cycles.push(cycle);
        }
        done.extend(component);
    }
    cycles
}

/// Shortest path from `start` back to itself inside `component` (breadth-first, neighbours
/// in name order, so the result is deterministic).
fn shortest_cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    component: &BTreeSet<String>,
    start: &str,
) -> Option<Vec<String>> {
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue: VecDeque<&str> = VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for next in graph.get(n).into_iter().flatten() {
            if !component.contains(next) {
                continue;
            }
            if next == start {
                let mut path = vec![start.to_string()];
                let mut at = n;
                while at != start {
                    path.push(at.to_string());
                    at = parent.get(at).copied()?;
                }
                path.push(start.to_string());
                path.reverse();
                return Some(path);
            }
            if !parent.contains_key(next.as_str()) {
                parent.insert(next, n);
                queue.push_back(next);
            }
        }
    }
    None
}

/// A "waits for" graph: unit -> the units it starts after (see [`predecessor_map`]).
pub type OrderGraph = BTreeMap<String, BTreeSet<String>>;

/// A "waits for" graph (as [`predecessor_map`] gives it) made acyclic, and the edges left
/// out to make it so, each `(a, b)` meaning "a is ordered after b" was ignored.
///
/// A depth-first walk from every name in name order, neighbours in name order, drops each
/// edge that leads back to a unit still on the walk's path (and a unit ordered after
/// itself). The same graph always loses the same edges. The manager orders stops by the
/// result, so units in an ordering cycle never wait on each other.
pub fn break_cycles(graph: &OrderGraph) -> (OrderGraph, Vec<(String, String)>) {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Mark {
        OnPath,
        Done,
    }
    let empty = BTreeSet::new();
    let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
    let mut kept: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut dropped = Vec::new();
    for root in graph.keys() {
        if marks.contains_key(root.as_str()) {
            continue;
        }
        marks.insert(root, Mark::OnPath);
        let mut stack = vec![(root.as_str(), graph.get(root).unwrap_or(&empty).iter())];
        while let Some((node, next)) = stack.last_mut() {
            let node: &str = node;
            match next.next() {
                Some(to) => match marks.get(to.as_str()) {
                    Some(Mark::OnPath) => dropped.push((node.to_string(), to.clone())),
                    Some(Mark::Done) => {
                        kept.entry(node.to_string()).or_default().insert(to.clone());
                    }
                    None => {
                        kept.entry(node.to_string()).or_default().insert(to.clone());
                        marks.insert(to, Mark::OnPath);
                        stack.push((to.as_str(), graph.get(to).unwrap_or(&empty).iter()));
                    }
                },
                None => {
                    marks.insert(node, Mark::Done);
                    stack.pop();
                }
            }
        }
    }
    (kept, dropped)
}

/// `"a -> b -> c -> a"`.
pub fn format_cycle(cycle: &[String]) -> String {
    cycle.join(" -> ")
}
