//! The leader's rollout runner: while this fleetd's engine leads, it re-evaluates
//! [`decide`] on every relevant registry change (machines, assignments, reported states,
//! the rollout record) and at least every [`DEFAULT_INTERVAL`], writes the new steps to the
//! rollout record **before** acting, then carries out the actions. Level-triggered: a new
//! leader reads the record and continues where the old one was; an action that did not
//! take effect is decided again.
//!
//! | action | what the runner does |
//! |---|---|
//! | `AcquireLock(m)` | [`Registry::acquire_reboot_lock`] for `m` on **`m`'s presence lease** ([`Registry::machine_lease`]), with the plan's `max_unavailable`: a machine that dies (or goes down for its reboot) frees its slot by itself, nobody has to release it; the count of unavailable machines does not rest on the lock alone ([`decide`] also counts steps in flight and absent machines) |
//! | `Drain(m)` / `Undrain(m)` | nothing more: the step in the record is the drain ([`super::draining`]); the engine moves `m`'s units away and places nothing new there while its step is in flight |
//! | `Update(m)` | nothing more: `m`'s agent sees its step `updating` and asks its init once ([`super::should_update`]) |
//! | `ReleaseLock(m)` | [`Registry::release_reboot_lock`] |
//! | `Halt` | the record says `halted` with the machine and why; nothing new starts |
//!
//! A machine that stays away in `rebooting`, or present in `updating` (its init refused
//! the update, or never got to the reboot), longer than the reboot deadline
//! ([`DEFAULT_REBOOT_DEADLINE`]) fails the rollout. Units that stay
//! on a draining machine (no other machine fits them) do not hold the drain up: they are
//! named in the machine's `reason` and logged.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use flotilla_init_api::ActiveState;

use super::{decide, Action, Observed, Plan, Step};
use crate::engine::EngineStatus;
use crate::error::RegistryError;
use crate::model::{Rollout, RolloutHalt, RolloutMachine, RolloutState, RolloutStep};
use crate::registry::{now_ms, Change, RebootLock, Registry, Snapshot};

/// How often the runner re-evaluates without a change.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// How long a machine may stay in `updating` or away in `rebooting` before the rollout
/// halts on it.
pub const DEFAULT_REBOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// The leader's rollout runner. See the [module docs](self).
pub struct Runner {
    registry: Arc<dyn Registry>,
    status: EngineStatus,
    machine_id: String,
    interval: Duration,
    reboot_deadline: Duration,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("registry", &self.registry.describe())
            .field("machine_id", &self.machine_id)
            .field("interval", &self.interval)
            .field("reboot_deadline", &self.reboot_deadline)
            .finish()
    }
}

/// What one round did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Round {
    /// There is no running rollout.
    Idle,
    /// The record was written (or unchanged) and the actions carried out.
    Stepped(Rollout),
    /// This engine does not lead (or was deposed meanwhile): nothing written.
    NotLeader,
}

impl Runner {
    /// A runner for the engine whose status is `status` (it acts only while that engine
    /// leads, writing with its lease), on machine `machine_id` (for logs).
    pub fn new(
        registry: Arc<dyn Registry>,
        status: EngineStatus,
        machine_id: impl Into<String>,
    ) -> Runner {
        Runner {
            registry,
            status,
            machine_id: machine_id.into(),
            interval: DEFAULT_INTERVAL,
            reboot_deadline: DEFAULT_REBOOT_DEADLINE,
        }
    }

    /// Sets how often it re-evaluates without a change ([`DEFAULT_INTERVAL`]).
    pub fn with_interval(mut self, interval: Duration) -> Runner {
        self.interval = interval.max(Duration::from_millis(50));
        self
    }

    /// Sets how long a machine may stay in `updating` (present) or away in `rebooting`
    /// ([`DEFAULT_REBOOT_DEADLINE`]) before the rollout halts on it.
    pub fn with_reboot_deadline(mut self, deadline: Duration) -> Runner {
        self.reboot_deadline = deadline;
        self
    }

    /// Runs until `shutdown` completes: a round after each burst of relevant changes and
    /// every interval, while the engine leads. Registry errors are logged and retried.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut watch = None;
        loop {
            if !self.status.is_leader() {
                // A follower watches nothing: it only checks whether it leads now.
                watch = None;
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(self.interval) => continue,
                }
            }
            if watch.is_none() {
                match self.registry.watch(0).await {
                    Ok(w) => watch = Some(w),
                    Err(e) => log::warn!(
                        "rollout {}: cannot watch the registry: {e}; polling",
                        self.machine_id
                    ),
                }
            }
            if let Err(e) = self.round().await {
                log::warn!("rollout {}: a round failed: {e}; retrying", self.machine_id);
            }
            // Wait for a relevant change (then a short debounce) or the interval.
            let tick = tokio::time::sleep(self.interval);
            tokio::pin!(tick);
            loop {
                let event = async {
                    match watch.as_mut() {
                        Some(w) => w.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = &mut shutdown => return,
                    () = &mut tick => break,
                    event = event => match event {
                        Some(Ok(e)) if relevant(&e.change) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            watch = None;
                            break;
                        }
                    },
                }
            }
        }
    }

    /// One evaluation: reads the record and the registry, decides, writes the record, acts.
    pub async fn round(&self) -> Result<Round, RegistryError> {
        let Some(lease) = self.status.lease() else {
            return Ok(Round::NotLeader);
        };
        let Some(rollout) = self.registry.get_rollout().await? else {
            return Ok(Round::Idle);
        };
        if rollout.state != RolloutState::Running {
            return Ok(Round::Idle);
        }
        let snapshot = self.registry.snapshot().await?;
        let holders = self.registry.reboot_lock_holders().await?.items;
        let staying = self.status.staying();
        let now = now_ms();

        let plan = Plan {
            version: rollout.version.clone(),
            max_unavailable: rollout.max_unavailable,
            machines: rollout.machines.iter().map(|m| m.id.clone()).collect(),
        };
        let mut steps: BTreeMap<String, Step> = BTreeMap::new();
        let mut actions_first = Vec::new();
        for m in &rollout.machines {
            let mut step = Step::from_record(m.step, m.reason.as_deref());
            let present = snapshot.machines.iter().any(|x| x.id == m.id);
            let late = now.saturating_sub(m.since)
                > u64::try_from(self.reboot_deadline.as_millis()).unwrap_or(u64::MAX);
            let overdue = match m.step {
                RolloutStep::Rebooting if !present && late => Some(format!(
                    "did not come back from its reboot within {} s",
                    self.reboot_deadline.as_secs()
                )),
                // Its init refused the update, or the update never got to the reboot.
                RolloutStep::Updating if present && late => Some(format!(
                    "was told to update {} s ago and has not rebooted into it: see why in its \
                     log (unitctl os status, fleetd's journal)",
                    self.reboot_deadline.as_secs()
                )),
                _ => None,
            };
            if let Some(reason) = overdue {
                actions_first.push(Action::Halt {
                    machine: m.id.clone(),
                    reason: reason.clone(),
                });
                actions_first.push(Action::ReleaseLock(m.id.clone()));
                step = Step::Failed(reason);
            }
            steps.insert(m.id.clone(), step);
        }
        let observed: Vec<Observed> = snapshot
            .machines
            .iter()
            .filter(|m| plan.machines.contains(&m.id))
            .map(|m| Observed {
                id: m.id.clone(),
                present: true,
                os_version: m.os_version.clone(),
                update: m.os.as_ref().map(|o| o.update_state()),
                holds_lock: holders.iter().any(|h| h.machine == m.id),
                units: units_still_on(&snapshot, &m.id, &staying),
            })
            .collect();
        let decisions = decide(&plan, &steps, &observed);
        let mut actions = actions_first;
        actions.extend(decisions.actions.iter().cloned());

        // The next record: steps (with when they began), reasons, the state.
        let mut next = rollout.clone();
        for m in &mut next.machines {
            let Some(step) = decisions.steps.get(&m.id) else {
                continue;
            };
            let (step, mut reason) = step.to_record();
            if step == RolloutStep::Draining {
                reason = stays_reason(&m.id, &staying);
            }
            if step != m.step {
                m.since = now;
            }
            *m = RolloutMachine {
                id: m.id.clone(),
                step,
                reason,
                since: m.since,
            };
        }
        if let Some(Action::Halt { machine, reason }) =
            actions.iter().find(|a| matches!(a, Action::Halt { .. }))
        {
            next.state = RolloutState::Halted;
            next.halted = Some(RolloutHalt {
                machine: machine.clone(),
                reason: reason.clone(),
            });
        } else if decisions.halted {
            next.state = RolloutState::Halted;
        } else if decisions.finished {
            next.state = RolloutState::Finished;
        }
        // The record first: a leader that dies after acting is followed by one that knows.
        if next != rollout {
            if !self.registry.update_rollout(&next, lease).await? {
                return Ok(Round::NotLeader);
            }
            for (old, new) in rollout.machines.iter().zip(&next.machines) {
                if old.step != new.step || old.reason != new.reason {
                    log::info!(
                        "rollout {}: machine {} {} → {}{}",
                        self.machine_id,
                        new.id,
                        old.step,
                        new.step,
                        new.reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                }
            }
            if next.state != rollout.state {
                log::info!(
                    "rollout {}: the rollout of {} to {} is {}",
                    self.machine_id,
                    next.reference,
                    next.version,
                    next.state
                );
            }
        }
        for action in &actions {
            self.act(action, &next).await?;
        }
        Ok(Round::Stepped(next))
    }

    async fn act(&self, action: &Action, rollout: &Rollout) -> Result<(), RegistryError> {
        match action {
            Action::AcquireLock(id) => {
                let Some(lease) = self.registry.machine_lease(id).await? else {
                    return Ok(()); // gone meanwhile: decided again next round
                };
                match self
                    .registry
                    .acquire_reboot_lock(id, lease, rollout.max_unavailable)
                    .await
                {
                    Ok(RebootLock::Acquired) => {
                        log::info!("rollout {}: {id} holds a reboot-lock slot", self.machine_id)
                    }
                    Ok(RebootLock::Held(by)) => log::info!(
                        "rollout {}: {id} waits for a reboot-lock slot (held by {})",
                        self.machine_id,
                        by.iter()
                            .map(|h| h.machine.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    // Its lease ended meanwhile (it went away): decided again next round.
                    Err(RegistryError::LeaseExpired { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Action::ReleaseLock(id) => {
                if self.registry.release_reboot_lock(id).await? {
                    log::info!(
                        "rollout {}: released {id}'s reboot-lock slot",
                        self.machine_id
                    );
                }
            }
            Action::Halt { machine, reason } => {
                log::warn!("rollout {}: halted at {machine}: {reason}", self.machine_id)
            }
            // The record's step is the drain (the engine follows it) and the update (the
            // machine's agent follows it).
            Action::Drain(_) | Action::Undrain(_) | Action::Update(_) => {}
        }
        Ok(())
    }
}

/// The units that keep machine `id` from being drained: those assigned to it that can
/// move (not in `staying`), and those moved away whose old copy still runs there (a
/// planned move: the old copy stops once the new one is active).
pub fn units_still_on(
    snapshot: &Snapshot,
    id: &str,
    staying: &BTreeMap<String, (String, String)>,
) -> usize {
    let assigned: BTreeMap<&str, &str> = snapshot
        .assignments
        .iter()
        .map(|a| (a.unit.as_str(), a.machine.as_str()))
        .collect();
    let here = assigned
        .iter()
        .filter(|(unit, machine)| {
            **machine == id && staying.get(**unit).is_none_or(|(m, _)| m != id)
        })
        .count();
    let old_copies = snapshot
        .states
        .iter()
        .filter(|s| {
            s.machine == id
                && assigned.get(s.unit.as_str()).is_some_and(|m| *m != id)
                && matches!(
                    s.active.known(),
                    Some(ActiveState::Active | ActiveState::Activating | ActiveState::Deactivating)
                )
        })
        .count();
    here + old_copies
}

/// What stays on draining machine `id`, for its `reason`.
fn stays_reason(id: &str, staying: &BTreeMap<String, (String, String)>) -> Option<String> {
    let stays: Vec<String> = staying
        .iter()
        .filter(|(_, (m, _))| m == id)
        .map(|(unit, (_, why))| format!("{unit} stays: {why}"))
        .collect();
    (!stays.is_empty()).then(|| stays.join("; "))
}

/// Whether a change can move a rollout on.
fn relevant(change: &Change) -> bool {
    !matches!(change, Change::BodyPut { .. } | Change::BodyRemoved { .. })
}
