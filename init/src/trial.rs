//! An updated slot committed by its health, not by a timer (issue 13). When the booted
//! slot's boot entry is on trial (`flotilla-<slot>+N[-M].conf`), PID 1 commits it once the
//! boot completed and no unit has failed or restarted for [`TrialPolicy::commit_after`];
//! if that does not happen within [`TrialPolicy::commit_deadline`] of the boot, it logs why
//! and reboots in order, and the boot loader's counter, once spent, boots the other slot.
//! After such a fallback the boot says which update was rolled back.
//!
//! [`Trial`] is the policy, pure (health samples in, a [`Decision`] out); [`at_boot`] and
//! [`commit_running`] are the effects (the ESP mounted for the moment, `flotilla_osupdate`).
//! Nothing here panics; every failure is a [`TrialError`] the caller logs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_osupdate::entries::{self, EntryState};
use flotilla_osupdate::host::{self, EspMount, Host, HostError, ESP_PARTITION};
use flotilla_osupdate::Slot;

/// The settings file rendered from provisioning's `[os]` ([`crate::provision`]).
pub const SETTINGS: &str = "/etc/flotilla/os.toml";
/// Where PID 1 mounts the ESP for a moment.
const ESP_MOUNT: &str = "/run/flotilla/esp-init";

/// How a slot on trial is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialPolicy {
    /// How long every unit must stay healthy (the boot complete, none failed or restarted)
    /// before the slot is committed.
    pub commit_after: Duration,
    /// From the boot: no commit by then means an orderly reboot (a try spent).
    pub commit_deadline: Duration,
}

impl Default for TrialPolicy {
    fn default() -> Self {
        TrialPolicy {
            commit_after: Duration::from_secs(30),
            commit_deadline: Duration::from_secs(300),
        }
    }
}

/// Why the trial's effects failed.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    /// The update library (entries, partitions, the command line).
    #[error(transparent)]
    Host(#[from] HostError),
    /// Mounting or unmounting the ESP.
    #[error(transparent)]
    Esp(#[from] flotilla_osupdate::IoError),
    /// The settings file.
    #[error("{file}: {why}; using the defaults (commit_after 30s, commit_deadline 5m)")]
    Settings {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// What [`crate::provision`] renders into [`SETTINGS`]; durations as `"30s"`, `"5m"`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    commit_after: Option<String>,
    commit_deadline: Option<String>,
}

impl TrialPolicy {
    /// The policy of the settings file `path`; absent: the defaults.
    pub fn load(path: &Path) -> Result<TrialPolicy, TrialError> {
        let bad = |why: String| TrialError::Settings {
            file: path.to_path_buf(),
            why,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TrialPolicy::default()),
            Err(e) => return Err(bad(e.to_string())),
        };
        let s: Settings = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        let mut policy = TrialPolicy::default();
        if let Some(v) = s.commit_after {
            policy.commit_after = flotilla_units::parse_duration(&v).map_err(bad)?;
        }
        if let Some(v) = s.commit_deadline {
            policy.commit_deadline = flotilla_units::parse_duration(&v).map_err(bad)?;
        }
        Ok(policy)
    }
}

/// The units' health at one moment, as the manager sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    /// The first start settled (the boot-complete marker's condition).
    pub settled: bool,
    /// A unit that is failed or waiting to be restarted, with what it is.
    pub failing: Option<String>,
    /// Restarts done by the restart policy, over all units (any change is a restart).
    pub restarts: u64,
}

/// What to do about the slot on trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Look again at this time at the latest (or at the next event).
    Wait(Instant),
    /// Healthy long enough: commit the slot.
    Commit,
    /// The deadline passed: reboot in order, for this reason.
    Reboot(String),
}

/// The policy applied to a stream of [`Health`] samples.
#[derive(Debug, Clone)]
pub struct Trial {
    policy: TrialPolicy,
    deadline: Instant,
    healthy_since: Option<Instant>,
    restarts: Option<u64>,
    problem: String,
}

impl Trial {
    /// A trial of the boot that started at `boot`.
    pub fn new(policy: TrialPolicy, boot: Instant) -> Trial {
        Trial {
            policy,
            deadline: boot + policy.commit_deadline,
            healthy_since: None,
            restarts: None,
            problem: "the boot has not completed".into(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> TrialPolicy {
        self.policy
    }

    /// Takes the sample `health` at `now`. A unit failed or restarted (since the last
    /// sample) resets the wait; healthy for `commit_after` commits; past the deadline,
    /// reboot.
    pub fn step(&mut self, now: Instant, health: &Health) -> Decision {
        let restarted = self.restarts.is_some_and(|r| r != health.restarts);
        self.restarts = Some(health.restarts);
        let problem = if !health.settled {
            Some("the boot has not completed".to_string())
        } else if let Some(f) = &health.failing {
            Some(f.clone())
        } else if restarted {
            Some("a unit restarted".to_string())
        } else {
            None
        };
        match problem {
            Some(p) => {
                self.healthy_since = None;
                self.problem = p;
            }
            None => {
                self.healthy_since.get_or_insert(now);
            }
        }
        if let Some(since) = self.healthy_since {
            if now.saturating_duration_since(since) >= self.policy.commit_after {
                return Decision::Commit;
            }
        }
        if now >= self.deadline {
            return Decision::Reboot(format!(
                "the units were not healthy for {} within {} of the boot (last: {})",
                humantime::format_duration(self.policy.commit_after),
                humantime::format_duration(self.policy.commit_deadline),
                self.problem
            ));
        }
        let next = self
            .healthy_since
            .map_or(self.deadline, |s| s + self.policy.commit_after);
        Decision::Wait(next.min(self.deadline))
    }
}

/// Runs `f` on the host with the ESP mounted.
fn with_esp<T>(f: impl FnOnce(&Host) -> Result<T, TrialError>) -> Result<T, TrialError> {
    let mut host = Host::system(Path::new(ESP_MOUNT));
    // Not booted from a slot: nothing to mount, and `f` says so.
    host.running_slot()?;
    let part = host.partition(ESP_PARTITION)?;
    let mount = EspMount::mount(&part.dev, Path::new(ESP_MOUNT), false)?;
    host.esp = mount.dir().to_path_buf();
    let r = f(&host);
    if let Err(e) = mount.unmount() {
        log::error!("{e}");
    }
    r
}

/// What the boot found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtBoot {
    /// The running slot.
    pub slot: Slot,
    /// Its entry is on trial: the init must judge it.
    pub on_trial: bool,
    /// An update to the other slot was rolled back: its version.
    pub rolled_back: Option<String>,
}

/// At boot, as PID 1: the running slot's entry state, and whether an update was rolled
/// back. `Ok(None)`: not booted from a slot (direct kernel boot).
pub fn at_boot() -> Result<Option<AtBoot>, TrialError> {
    let host = Host::system(Path::new(ESP_MOUNT));
    match host.running_slot() {
        Ok(_) => {}
        Err(HostError::NotAb { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    with_esp(|host| {
        let st = host::status(host)?;
        let slot = host.running_slot()?;
        // Any counted entry: the loader renamed it before booting it, so the last try runs
        // as `+0-N` (bad, to the parser) and must be judged too.
        let on_trial = st.entries.entry(slot).is_some_and(|e| {
            matches!(
                e.state(),
                EntryState::Trying { .. } | EntryState::Bad { .. }
            )
        });
        let rolled_back =
            entries::rolled_back(&st.entries, slot, &st.version).map(|e| e.version.clone());
        Ok(Some(AtBoot {
            slot,
            on_trial,
            rolled_back,
        }))
    })
}

/// Commits the running slot (its trial entry renamed to the committed name); returns the
/// slot.
pub fn commit_running() -> Result<Slot, TrialError> {
    with_esp(|host| Ok(host::commit(host)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn healthy(restarts: u64) -> Health {
        Health {
            settled: true,
            failing: None,
            restarts,
        }
    }

    fn policy() -> TrialPolicy {
        TrialPolicy {
            commit_after: Duration::from_secs(30),
            commit_deadline: Duration::from_secs(300),
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn healthy_for_commit_after_commits() {
        let t0 = Instant::now();
        let mut t = Trial::new(policy(), t0);
        let booting = Health::default();
        assert_eq!(t.step(t0, &booting), Decision::Wait(t0 + s(300)));
        // The boot completes at 10 s: the wait ends at 40 s.
        assert_eq!(t.step(t0 + s(10), &healthy(0)), Decision::Wait(t0 + s(40)));
        assert_eq!(t.step(t0 + s(39), &healthy(0)), Decision::Wait(t0 + s(40)));
        assert_eq!(t.step(t0 + s(40), &healthy(0)), Decision::Commit);
    }

    #[test]
    fn a_failed_or_restarted_unit_resets_the_wait() {
        let t0 = Instant::now();
        let mut t = Trial::new(policy(), t0);
        t.step(t0 + s(10), &healthy(0));
        let failed = Health {
            failing: Some("unit web failed".into()),
            ..healthy(0)
        };
        assert_eq!(t.step(t0 + s(20), &failed), Decision::Wait(t0 + s(300)));
        // Healthy again from 25 s.
        assert_eq!(t.step(t0 + s(25), &healthy(0)), Decision::Wait(t0 + s(55)));
        // A restart seen at 50 s (the counter moved) resets it again.
        assert_eq!(t.step(t0 + s(50), &healthy(1)), Decision::Wait(t0 + s(300)));
        assert_eq!(t.step(t0 + s(51), &healthy(1)), Decision::Wait(t0 + s(81)));
        assert_eq!(t.step(t0 + s(81), &healthy(1)), Decision::Commit);
    }

    #[test]
    fn the_deadline_reboots_and_says_why() {
        let t0 = Instant::now();
        let mut t = Trial::new(policy(), t0);
        let crashing = |n| Health {
            failing: Some(format!("unit bad waiting to restart (restart {n})")),
            ..healthy(n)
        };
        for n in 0..29 {
            assert!(matches!(
                t.step(t0 + s(n * 10), &crashing(n)),
                Decision::Wait(_)
            ));
        }
        match t.step(t0 + s(300), &crashing(30)) {
            Decision::Reboot(why) => {
                assert!(why.contains("30s") && why.contains("5m"), "{why}");
                assert!(why.contains("unit bad waiting to restart"), "{why}");
            }
            d => panic!("{d:?}"),
        }
        // A boot that never completes reboots at the deadline too.
        let mut t = Trial::new(policy(), t0);
        assert!(matches!(
            t.step(t0 + s(301), &Health::default()),
            Decision::Reboot(why) if why.contains("has not completed")
        ));
    }

    #[test]
    fn healthy_at_the_deadline_still_commits_first() {
        let t0 = Instant::now();
        let p = TrialPolicy {
            commit_after: s(30),
            commit_deadline: s(60),
        };
        let mut t = Trial::new(p, t0);
        t.step(t0 + s(30), &healthy(0));
        assert_eq!(t.step(t0 + s(60), &healthy(0)), Decision::Commit);
    }

    #[test]
    fn settings_load_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("os.toml");
        assert_eq!(TrialPolicy::load(&f).unwrap(), TrialPolicy::default());
        std::fs::write(&f, "commit_after = \"5s\"\ncommit_deadline = \"2m\"\n").unwrap();
        assert_eq!(
            TrialPolicy::load(&f).unwrap(),
            TrialPolicy {
                commit_after: s(5),
                commit_deadline: s(120)
            }
        );
        std::fs::write(&f, "commit_after = \"soon\"\n").unwrap();
        assert!(TrialPolicy::load(&f).is_err());
    }
}
