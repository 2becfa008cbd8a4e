//! The decisions of a rolling OS update (`fleetctl os update REF --max-unavailable N`,
//! issue 13), pure: the plan, each machine's step so far and what the registry shows of
//! each machine go in; the next steps and the actions to take come out. Level-triggered,
//! like the scheduler: calling [`decide`] again with the same input gives the same output,
//! and an action that did not take effect yet is simply decided again.
//!
//! [`Runner`] carries it out on the leader: it keeps the steps in the registry's rollout
//! record ([`crate::Rollout`]) and acts on the decisions; the engine drains the machines
//! whose step is in flight ([`draining`]); each machine's agent updates its host when its
//! step is `updating` ([`should_update`]).
//!
//! A machine goes `Waiting → Draining → Updating → Rebooting → Verifying → Done`, or to
//! `Failed` (the rollout then halts: no further machine starts). At most
//! `max_unavailable` machines are unavailable at once, counting those in the rollout's
//! middle steps, those that hold a reboot-lock slot, and those that are not present at all
//! (a machine that is down is unavailable whoever took it down). The lock alone cannot be
//! the count: a slot on a presence lease ends when its machine goes down for the reboot.

pub mod runner;

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Machine, Rollout, RolloutState, RolloutStep, UpdateState};

pub use runner::Runner;

/// The machines a rollout drains now: while it runs, those whose step is in flight
/// (`draining` to `verifying`); none once it finished or halted. The engine places
/// nothing new there and moves their units away.
pub fn draining(rollout: Option<&Rollout>) -> BTreeSet<String> {
    rollout
        .filter(|r| r.state == RolloutState::Running)
        .map(|r| {
            r.machines
                .iter()
                .filter(|m| {
                    matches!(
                        m.step,
                        RolloutStep::Draining
                            | RolloutStep::Updating
                            | RolloutStep::Rebooting
                            | RolloutStep::Verifying
                    )
                })
                .map(|m| m.id.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the agent of `machine` should ask its init to update now: the rollout runs, the
/// machine's step is `updating`, the machine is not at the rollout's version yet, and its
/// A/B state shows no update already under way or rolled back (a machine back from a
/// failed update must not try again before the runner marks it failed). The agent also
/// asks only once per rollout.
pub fn should_update(rollout: &Rollout, machine: &Machine) -> bool {
    rollout.state == RolloutState::Running
        && rollout
            .machine(&machine.id)
            .is_some_and(|m| m.step == RolloutStep::Updating)
        && machine.os_version != rollout.version
        && !matches!(
            machine.os.as_ref().map(|o| o.update_state()),
            Some(UpdateState::RolledBack | UpdateState::RebootPending | UpdateState::Trial)
        )
}

impl Step {
    /// The step as the rollout record has it, with its reason.
    pub fn to_record(&self) -> (RolloutStep, Option<String>) {
        match self {
            Step::Waiting => (RolloutStep::Waiting, None),
            Step::Draining => (RolloutStep::Draining, None),
            Step::Updating => (RolloutStep::Updating, None),
            Step::Rebooting => (RolloutStep::Rebooting, None),
            Step::Verifying => (RolloutStep::Verifying, None),
            Step::Done => (RolloutStep::Done, None),
            Step::Failed(why) => (RolloutStep::Failed, Some(why.clone())),
        }
    }

    /// The step of a rollout record's machine.
    pub fn from_record(step: RolloutStep, reason: Option<&str>) -> Step {
        match step {
            RolloutStep::Waiting => Step::Waiting,
            RolloutStep::Draining => Step::Draining,
            RolloutStep::Updating => Step::Updating,
            RolloutStep::Rebooting => Step::Rebooting,
            RolloutStep::Verifying => Step::Verifying,
            RolloutStep::Done => Step::Done,
            RolloutStep::Failed => Step::Failed(reason.unwrap_or("failed").to_string()),
        }
    }
}

/// What the rollout is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The OS version to reach (the payload's, the machines' `os_version` once booted).
    pub version: String,
    /// How many machines may be unavailable at once (at least 1 is used).
    pub max_unavailable: u32,
    /// The machines, in the order they are updated.
    pub machines: Vec<String>,
}

/// Where one machine is in the rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not started.
    Waiting,
    /// Holds a reboot-lock slot; its units are being moved away.
    Draining,
    /// Drained; told to write the update and reboot.
    Updating,
    /// Gone from the registry (rebooting) after the update.
    Rebooting,
    /// Back with the new version, on trial (not committed yet).
    Verifying,
    /// At the plan's version, committed.
    Done,
    /// The update did not take: why.
    Failed(String),
}

impl Step {
    /// Whether the machine is between taking its slot and being done.
    fn in_flight(&self) -> bool {
        matches!(
            self,
            Step::Draining | Step::Updating | Step::Rebooting | Step::Verifying
        )
    }
}

/// What the registry shows of one machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The machine id.
    pub id: String,
    /// Whether it has a machine record (its presence lease lives).
    pub present: bool,
    /// Its `os_version`.
    pub os_version: String,
    /// Its A/B state summed up (`None`: it publishes none).
    pub update: Option<UpdateState>,
    /// Whether it holds a reboot-lock slot.
    pub holds_lock: bool,
    /// How many units are still assigned to it (global units do not count).
    pub units: usize,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Take a reboot-lock slot for the machine (with the plan's `max_unavailable`).
    AcquireLock(String),
    /// Move the machine's units away, as a planned move, and place nothing new on it.
    Drain(String),
    /// Tell the machine to write the update to its other slot and reboot into it.
    Update(String),
    /// Free the machine's slot.
    ReleaseLock(String),
    /// Let units be placed on the machine again.
    Undrain(String),
    /// Stop the rollout: the machine's update failed.
    Halt {
        /// The machine.
        machine: String,
        /// Why.
        reason: String,
    },
}

/// The outcome of one [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decisions {
    /// Every planned machine's step after this decision.
    pub steps: BTreeMap<String, Step>,
    /// What to do now, in order.
    pub actions: Vec<Action>,
    /// Every machine is done.
    pub finished: bool,
    /// A machine failed: nothing more starts.
    pub halted: bool,
}

/// The next steps and actions. `steps` are the machines' steps so far (a machine missing
/// there is `Waiting`); `observed` what the registry shows (a planned machine missing
/// there is not present).
pub fn decide(plan: &Plan, steps: &BTreeMap<String, Step>, observed: &[Observed]) -> Decisions {
    let absent = |id: &str| Observed {
        id: id.to_string(),
        present: false,
        os_version: String::new(),
        update: None,
        holds_lock: false,
        units: 0,
    };
    let view = |id: &str| {
        observed
            .iter()
            .find(|o| o.id == id)
            .cloned()
            .unwrap_or_else(|| absent(id))
    };
    let mut next: BTreeMap<String, Step> = BTreeMap::new();
    let mut actions = Vec::new();
    // First every machine already under way (and the done and failed ones), so that the
    // count of unavailable machines is known before anything new starts.
    for id in &plan.machines {
        let step = steps.get(id).cloned().unwrap_or(Step::Waiting);
        let seen = view(id);
        let at_target = seen.present && seen.os_version == plan.version;
        let stepped = match step {
            Step::Waiting => Step::Waiting,
            Step::Draining if seen.units == 0 => {
                actions.push(Action::Update(id.clone()));
                Step::Updating
            }
            Step::Draining => {
                actions.push(Action::Drain(id.clone()));
                Step::Draining
            }
            Step::Updating | Step::Rebooting if !seen.present => Step::Rebooting,
            Step::Updating | Step::Rebooting | Step::Verifying if at_target => {
                verify(id, &seen, &mut actions)
            }
            Step::Rebooting | Step::Verifying => failed_back(plan, id, &seen, &mut actions)
                .unwrap_or(if matches!(step, Step::Verifying) {
                    Step::Verifying
                } else {
                    Step::Rebooting
                }),
            Step::Updating => {
                if seen.update == Some(UpdateState::RolledBack) {
                    fail(
                        id,
                        "the update was refused or rolled back before the reboot",
                        &mut actions,
                    )
                } else {
                    Step::Updating
                }
            }
            done @ (Step::Done | Step::Failed(_)) => done,
        };
        next.insert(id.clone(), stepped);
    }
    let halted = next.values().any(|s| matches!(s, Step::Failed(_)));
    let mut unavailable = plan
        .machines
        .iter()
        .filter(|id| {
            let seen = view(id);
            next.get(*id).is_some_and(Step::in_flight)
                || seen.holds_lock
                || (!seen.present && next.get(*id) != Some(&Step::Done))
        })
        .count();
    let max = usize::try_from(plan.max_unavailable.max(1)).unwrap_or(usize::MAX);
    for id in &plan.machines {
        if next.get(id) != Some(&Step::Waiting) {
            continue;
        }
        let seen = view(id);
        if seen.present
            && seen.os_version == plan.version
            && seen.update != Some(UpdateState::Trial)
        {
            // Nothing to do: already there (a slot it holds is given back).
            if seen.holds_lock {
                actions.push(Action::ReleaseLock(id.clone()));
            }
            next.insert(id.clone(), Step::Done);
            continue;
        }
        if seen.holds_lock && seen.present && !halted {
            // Its slot was granted: drain it.
            actions.push(Action::Drain(id.clone()));
            next.insert(id.clone(), Step::Draining);
            continue;
        }
        if halted || !seen.present || unavailable >= max {
            continue;
        }
        actions.push(Action::AcquireLock(id.clone()));
        unavailable += 1;
    }
    let finished = next.values().all(|s| *s == Step::Done);
    Decisions {
        steps: next,
        actions,
        finished,
        halted,
    }
}

/// A machine back at the plan's version: done once committed.
fn verify(id: &str, seen: &Observed, actions: &mut Vec<Action>) -> Step {
    match seen.update {
        Some(UpdateState::Trial) => Step::Verifying,
        Some(UpdateState::Committed) | None => {
            actions.push(Action::ReleaseLock(id.to_string()));
            actions.push(Action::Undrain(id.to_string()));
            Step::Done
        }
        Some(other) => fail(
            id,
            &format!("back at the new version, but its update state is {other}"),
            actions,
        ),
    }
}

/// A machine present again after the reboot on another version: failed if its update was
/// rolled back (or it runs the old version, committed); `None` while it may still come.
fn failed_back(plan: &Plan, id: &str, seen: &Observed, actions: &mut Vec<Action>) -> Option<Step> {
    if !seen.present || seen.update == Some(UpdateState::RebootPending) {
        return None;
    }
    Some(fail(
        id,
        &format!(
            "came back with version {:?}, not {:?} (update state {}): the new slot did not boot or was rolled back",
            seen.os_version,
            plan.version,
            seen.update.map_or("none", UpdateState::as_str)
        ),
        actions,
    ))
}

fn fail(id: &str, reason: &str, actions: &mut Vec<Action>) -> Step {
    actions.push(Action::Halt {
        machine: id.to_string(),
        reason: reason.to_string(),
    });
    actions.push(Action::ReleaseLock(id.to_string()));
    actions.push(Action::Undrain(id.to_string()));
    Step::Failed(reason.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cluster that carries out the actions: a lock slot is granted at once, a drain
    /// empties a machine after one round, an update reboots it (gone one round) into
    /// `version` on trial, and the next round it commits — unless it is in `bad`, whose
    /// new slot fails and falls back to the old version.
    struct Fake {
        machines: BTreeMap<String, Observed>,
        draining: Vec<String>,
        rebooting: BTreeMap<String, u32>,
        bad: Vec<String>,
        version: String,
    }

    impl Fake {
        fn new(n: usize, version: &str) -> Fake {
            let machines = (1..=n)
                .map(|i| {
                    let id = format!("m{i}");
                    let o = Observed {
                        id: id.clone(),
                        present: true,
                        os_version: "1.0.0".into(),
                        update: Some(UpdateState::Committed),
                        holds_lock: false,
                        units: 2,
                    };
                    (id, o)
                })
                .collect();
            Fake {
                machines,
                draining: Vec::new(),
                rebooting: BTreeMap::new(),
                bad: Vec::new(),
                version: version.into(),
            }
        }

        fn observed(&self) -> Vec<Observed> {
            self.machines.values().cloned().collect()
        }

        fn get(&mut self, id: &str) -> &mut Observed {
            self.machines
                .get_mut(id)
                .unwrap_or_else(|| panic!("no machine {id}"))
        }

        /// One round: what was under way progresses, then the actions are applied.
        fn round(&mut self, actions: &[Action]) {
            for id in std::mem::take(&mut self.draining) {
                self.get(&id).units = 0;
            }
            for m in self.machines.values_mut() {
                if m.present && m.update == Some(UpdateState::Trial) {
                    // Healthy on trial: the machine commits (next round it shows).
                    m.update = Some(UpdateState::Committed);
                }
            }
            let back: Vec<String> = self.rebooting.keys().cloned().collect();
            for id in back {
                let left = self.rebooting.get(&id).copied().unwrap_or(0);
                if left > 0 {
                    self.rebooting.insert(id, left - 1);
                    continue;
                }
                self.rebooting.remove(&id);
                let failed = self.bad.contains(&id);
                let version = self.version.clone();
                let m = self.get(&id);
                m.present = true;
                if failed {
                    m.update = Some(UpdateState::RolledBack);
                } else {
                    m.os_version = version;
                    m.update = Some(UpdateState::Trial);
                }
            }
            for action in actions {
                match action {
                    Action::AcquireLock(id) => self.get(id).holds_lock = true,
                    Action::ReleaseLock(id) => self.get(id).holds_lock = false,
                    Action::Drain(id) => self.draining.push(id.clone()),
                    Action::Undrain(_) | Action::Halt { .. } => {}
                    Action::Update(id) => {
                        // Rebooting: the presence lease (and a slot on it) is gone.
                        let m = self.get(id);
                        m.present = false;
                        m.holds_lock = false;
                        self.rebooting.insert(id.clone(), 1);
                    }
                }
            }
        }
    }

    fn plan(n: usize, max: u32) -> Plan {
        Plan {
            version: "2.0.0".into(),
            max_unavailable: max,
            machines: (1..=n).map(|i| format!("m{i}")).collect(),
        }
    }

    /// Runs to the end (or a halt); returns the most machines unavailable at once and the
    /// last decisions.
    fn run(plan: &Plan, fake: &mut Fake) -> (usize, Decisions) {
        let mut steps = BTreeMap::new();
        let mut most = 0;
        let mut verified = false;
        for _ in 0..200 {
            let d = decide(plan, &steps, &fake.observed());
            verified |= d.steps.values().any(|s| *s == Step::Verifying);
            let unavailable = d
                .steps
                .iter()
                .filter(|(id, s)| {
                    s.in_flight()
                        || fake
                            .machines
                            .get(*id)
                            .is_some_and(|m| !m.present || m.holds_lock)
                })
                .count();
            most = most.max(unavailable);
            if d.finished || d.halted {
                assert!(verified || d.halted, "no machine was seen on trial");
                return (most, d);
            }
            fake.round(&d.actions);
            steps = d.steps;
        }
        panic!("the rollout did not end in 200 rounds: {steps:?}");
    }

    #[test]
    fn the_first_decision_takes_n_slots_in_plan_order() {
        let fake = Fake::new(5, "2.0.0");
        let d = decide(&plan(5, 2), &BTreeMap::new(), &fake.observed());
        assert_eq!(
            d.actions,
            [
                Action::AcquireLock("m1".into()),
                Action::AcquireLock("m2".into())
            ]
        );
        assert!(d.steps.values().all(|s| *s == Step::Waiting));
    }

    #[test]
    fn a_rollout_updates_every_machine_never_more_than_n_at_once() {
        for max in [1, 2, 3] {
            let mut fake = Fake::new(5, "2.0.0");
            let (most, d) = run(&plan(5, max), &mut fake);
            assert!(d.finished, "{d:?}");
            assert_eq!(most, usize::try_from(max).unwrap_or(0), "max {max}");
            for m in fake.machines.values() {
                assert_eq!(m.os_version, "2.0.0");
                assert!(!m.holds_lock, "{m:?}");
            }
        }
    }

    #[test]
    fn a_machine_that_comes_back_on_the_old_version_halts_the_rollout() {
        let mut fake = Fake::new(4, "2.0.0");
        fake.bad.push("m2".into());
        let (_, d) = run(&plan(4, 1), &mut fake);
        assert!(d.halted && !d.finished, "{d:?}");
        assert!(matches!(d.steps.get("m2"), Some(Step::Failed(r)) if r.contains("1.0.0")));
        assert_eq!(d.steps.get("m1"), Some(&Step::Done));
        // Nothing after m2 started, and m2's slot is given back.
        assert_eq!(d.steps.get("m3"), Some(&Step::Waiting));
        assert!(d.actions.contains(&Action::ReleaseLock("m2".into())));
        assert!(!d
            .actions
            .iter()
            .any(|a| matches!(a, Action::AcquireLock(_))));
        let again = decide(&plan(4, 1), &d.steps, &fake.observed());
        assert!(!again
            .actions
            .iter()
            .any(|a| matches!(a, Action::AcquireLock(_))));
    }

    #[test]
    fn a_machine_that_is_down_counts_as_unavailable() {
        let mut fake = Fake::new(3, "2.0.0");
        fake.get("m3").present = false;
        let d = decide(&plan(3, 1), &BTreeMap::new(), &fake.observed());
        assert!(d.actions.is_empty(), "m3 is down: nothing may start: {d:?}");
        let d = decide(&plan(3, 2), &BTreeMap::new(), &fake.observed());
        assert_eq!(d.actions, [Action::AcquireLock("m1".into())]);
    }

    #[test]
    fn machines_already_at_the_version_are_done_at_once() {
        let mut fake = Fake::new(2, "2.0.0");
        fake.get("m1").os_version = "2.0.0".into();
        let d = decide(&plan(2, 1), &BTreeMap::new(), &fake.observed());
        assert_eq!(d.steps.get("m1"), Some(&Step::Done));
        assert_eq!(d.actions, [Action::AcquireLock("m2".into())]);
    }
}
