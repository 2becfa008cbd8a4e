//! What the agent publishes of its host's OS (issue 13): the version (`VERSION_ID` of
//! os-release) and, on a host booted from a slot of the A/B disk, the update state
//! (`flotilla_osupdate::host::status`: booted slot, each slot's entry, next slot). Read at
//! every registration and every [`REFRESH`] after; a change rewrites the machine record.
//!
//! Without [`OsProbe::esp`] the agent asks the local init (`GetOsStatus`: fleetd runs in a
//! container of the host image and cannot mount the ESP) and converts its JSON with
//! [`report_from_init`]; only an init too old to know the method (`UnknownMethod`) makes it
//! read the ESP itself: the disk's `flotilla-esp` partition mounted read-only on a private
//! directory for the read (as `unitctl os status` does) and unmounted. With `esp` given it
//! reads that directory. Nothing here fails the agent: a probe that cannot read something
//! logs it and publishes what it could.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_osupdate::entries::EntryState;
use flotilla_osupdate::host::{self, EspMount, Host, HostError, ESP_PARTITION};

use crate::model::{OsSlot, OsState};

/// How often the agent reads its host's OS state again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// How often it reads it while the host runs a slot on trial: the commit by health is what a
/// rolling update waits for, so it shows within seconds rather than at the next [`REFRESH`].
pub const TRIAL_REFRESH: Duration = Duration::from_secs(2);

/// Where the host's OS facts are (the real paths by default; tests give files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsProbe {
    /// The os-release file (`/etc/os-release`).
    pub os_release: PathBuf,
    /// The kernel command line (`/proc/cmdline`): `flotilla.slot=` names the booted slot.
    pub cmdline: PathBuf,
    /// The mounted ESP; `None`: mount the slots' disk's `flotilla-esp` read-only for each
    /// read.
    pub esp: Option<PathBuf>,
}

impl Default for OsProbe {
    fn default() -> Self {
        OsProbe {
            os_release: PathBuf::from("/etc/os-release"),
            cmdline: PathBuf::from("/proc/cmdline"),
            esp: None,
        }
    }
}

/// What [`OsProbe::probe`] read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsReport {
    /// `VERSION_ID` (empty when unknown).
    pub version: String,
    /// The A/B update state (`None`: not booted from a slot, or unreadable).
    pub os: Option<OsState>,
    /// Why the update state could not be read, if it could not.
    pub error: Option<String>,
}

/// The `VERSION_ID` of an os-release text (quotes removed); empty when there is none.
pub fn version_id(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|l| l.trim().strip_prefix("VERSION_ID="))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .unwrap_or_default()
}

/// The published form of osupdate's status, or `None` when the host did not boot a slot.
pub fn os_state(status: &host::HostStatus) -> Option<OsState> {
    let booted = status.running?;
    Some(OsState {
        booted: booted.as_str().to_string(),
        next: status.entries.next.map(|s| s.as_str().to_string()),
        slots: status
            .entries
            .entries
            .iter()
            .map(|e| {
                let (state, tries_left) = match e.name.state() {
                    EntryState::Committed => ("committed", None),
                    EntryState::Trying { left, .. } => ("trying", Some(left)),
                    EntryState::Bad { .. } => ("bad", None),
                };
                OsSlot {
                    slot: e.slot.as_str().to_string(),
                    version: e.version.clone(),
                    state: state.to_string(),
                    tries_left,
                }
            })
            .collect(),
    })
}

/// The report of init's `GetOsStatus` document (`flotilla_init::os_update`: `running`
/// (slot or null), `version`, `next`, `slots` of `{slot, version, state, tries_left}`):
/// no update state when `running` is null (not booted from a slot). `local_version` gives
/// the version when init knows none (`unknown`: an os-release without a semver
/// `VERSION_ID`, e.g. a development host's). Fails when the document is not that shape.
pub fn report_from_init(
    json: &str,
    local_version: impl FnOnce() -> String,
) -> Result<OsReport, String> {
    use serde_json::Value;
    let bad = |why: &str| format!("init's GetOsStatus answer {json:?} is not understood: {why}");
    let doc: Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let text = |v: &Value, key: &str| -> Result<Option<String>, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad(&format!("{key} is {other}, not a string"))),
        }
    };
    let version = match text(&doc, "version")? {
        Some(v) if !v.is_empty() && v != "unknown" => v,
        _ => local_version(),
    };
    let Some(booted) = text(&doc, "running")? else {
        return Ok(OsReport {
            version,
            os: None,
            error: None,
        });
    };
    let slots = match doc.get("slots") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(slots)) => slots
            .iter()
            .map(|e| {
                let state = text(e, "state")?.ok_or_else(|| bad("a slot without a state"))?;
                let tries_left = match state.as_str() {
                    "trying" => e
                        .get("tries_left")
                        .and_then(Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok()),
                    _ => None,
                };
                Ok(OsSlot {
                    slot: text(e, "slot")?.ok_or_else(|| bad("a slot without its name"))?,
                    version: text(e, "version")?.unwrap_or_default(),
                    state,
                    tries_left,
                })
            })
            .collect::<Result<Vec<_>, String>>()?,
        Some(other) => return Err(bad(&format!("slots is {other}, not a list"))),
    };
    Ok(OsReport {
        version,
        os: Some(OsState {
            booted,
            next: text(&doc, "next")?,
            slots,
        }),
        error: None,
    })
}

impl OsProbe {
    /// `VERSION_ID` of [`OsProbe::os_release`] (empty when unreadable).
    pub fn version(&self) -> String {
        match std::fs::read_to_string(&self.os_release) {
            Ok(text) => version_id(&text),
            Err(e) => {
                log::debug!("cannot read {}: {e}", self.os_release.display());
                String::new()
            }
        }
    }

    /// The host's OS version and update state. Never fails: what cannot be read is left
    /// out, and the failure to read the update state is returned for the caller to log
    /// (once: the probe repeats). A missing or unreadable os-release is only `debug`.
    pub fn probe(&self) -> OsReport {
        let version = self.version();
        match self.update_state() {
            Ok(os) => OsReport {
                version,
                os,
                error: None,
            },
            Err(e) => OsReport {
                version,
                os: None,
                error: Some(format!("cannot read the host's A/B update state: {e}")),
            },
        }
    }

    fn host(&self, esp: &Path) -> Host {
        Host {
            cmdline: self.cmdline.clone(),
            os_release: self.os_release.clone(),
            esp: esp.to_path_buf(),
            ..Host::system(esp)
        }
    }

    /// `None` when the host did not boot a slot (no `flotilla.slot=`).
    fn update_state(&self) -> Result<Option<OsState>, HostError> {
        let probe_host = self.host(Path::new(""));
        match probe_host.running_slot() {
            Ok(_) => {}
            Err(HostError::NotAb { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
        if let Some(esp) = &self.esp {
            return Ok(os_state(&host::status(&self.host(esp))?));
        }
        let part = probe_host.partition(ESP_PARTITION)?;
        let dir = PathBuf::from(format!("/run/flotilla/fleetd-esp-{}", std::process::id()));
        let mount = EspMount::mount(&part.dev, &dir, true)?;
        let status = host::status(&self.host(mount.dir()));
        if let Err(e) = mount.unmount() {
            log::warn!("{e}");
        }
        Ok(os_state(&status?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_id_of_os_release() {
        assert_eq!(version_id("ID=flotilla\nVERSION_ID=\"2.1.0\"\n"), "2.1.0");
        assert_eq!(version_id("VERSION_ID=12\nID=debian\n"), "12");
        assert_eq!(version_id("ID=arch\n"), "");
    }

    /// A host without `flotilla.slot=` publishes no update state; one with it and an ESP
    /// publishes its entries.
    #[test]
    fn probe_reads_version_and_entries() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
            p
        };
        let mut probe = OsProbe {
            os_release: write("os-release", "ID=flotilla\nVERSION_ID=1.0.0\n"),
            cmdline: write("cmdline", "console=ttyS0 quiet\n"),
            esp: Some(dir.path().join("esp")),
        };
        let plain = probe.probe();
        assert_eq!(
            (plain.version.as_str(), plain.os, plain.error),
            ("1.0.0", None, None)
        );
        probe.cmdline = write("cmdline", "quiet flotilla.slot=a\n");
        let entries = dir.path().join("esp/loader/entries");
        std::fs::create_dir_all(&entries).unwrap_or_else(|e| panic!("{e}"));
        for (slot, file, version) in [
            ("a", "flotilla-a.conf", "1.0.0"),
            ("b", "flotilla-b+3.conf", "2.0.0"),
        ] {
            std::fs::write(
                entries.join(file),
                format!(
                    "title Flotilla {version}\nsort-key flotilla\nversion {version}\n\
                     linux /flotilla/{slot}/vmlinuz\ninitrd /flotilla/{slot}/initramfs.img\n"
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let report = probe.probe();
        assert_eq!(report.version, "1.0.0");
        let state = report
            .os
            .unwrap_or_else(|| panic!("an A/B host has an update state"));
        assert_eq!(state.booted, "a");
        assert_eq!(state.next.as_deref(), Some("b"));
        assert_eq!(state.slots.len(), 2);
        assert_eq!(state.slots.get(1).and_then(|s| s.tries_left), Some(3));
        assert_eq!(
            state.update_state(),
            crate::model::UpdateState::RebootPending
        );
        // An A/B host whose ESP cannot be read says why, and still has its version.
        probe.esp = Some(probe.os_release.clone());
        let report = probe.probe();
        assert_eq!((report.version.as_str(), report.os), ("1.0.0", None));
        assert!(
            report.error.as_deref().is_some_and(|e| e.contains("A/B")),
            "{:?}",
            report.error
        );
    }

    /// Init's `GetOsStatus` document of an A/B host becomes the published state: booted
    /// slot, next, each slot with its state, tries left only while trying.
    #[test]
    fn report_from_init_of_an_ab_host() {
        let json = r#"{"running":"b","version":"2.0.0","next":"b","slots":[
            {"slot":"a","version":"1.0.0","state":"bad","tries_left":0,"tries_done":3,"entry":"flotilla-a+0-3.conf"},
            {"slot":"b","version":"2.0.0","state":"trying","tries_left":2,"tries_done":1,"entry":"flotilla-b+2-1.conf"}],
            "rolled_back":null,"job":null}"#;
        let r = report_from_init(json, || panic!("init knows the version"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.version, "2.0.0");
        assert_eq!(r.error, None);
        assert_eq!(
            r.os,
            Some(OsState {
                booted: "b".into(),
                next: Some("b".into()),
                slots: vec![
                    OsSlot {
                        slot: "a".into(),
                        version: "1.0.0".into(),
                        state: "bad".into(),
                        tries_left: None,
                    },
                    OsSlot {
                        slot: "b".into(),
                        version: "2.0.0".into(),
                        state: "trying".into(),
                        tries_left: Some(2),
                    },
                ],
            })
        );
    }

    /// The same host through the ESP probe and through init's JSON (built by the one
    /// function init uses) publishes the same state.
    #[test]
    fn report_from_init_matches_the_esp_probe() {
        let status = host::HostStatus {
            running: Some(flotilla_osupdate::Slot::A),
            version: "1.0.0".into(),
            entries: flotilla_osupdate::entries::Status {
                entries: Vec::new(),
                next: None,
            },
        };
        let doc = serde_json::json!({
            "running": "a", "version": "1.0.0", "next": null, "slots": [],
            "rolled_back": null, "job": null,
        });
        let r = report_from_init(&doc.to_string(), String::new).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.os, os_state(&status));
    }

    /// Not booted from a slot: a version, no update state; init's `unknown` version (no
    /// semver `VERSION_ID`) gives way to the agent's own read.
    #[test]
    fn report_from_init_of_a_direct_boot() {
        let json = r#"{"running":null,"version":"unknown","next":null,"slots":[],"rolled_back":null,"job":null}"#;
        let r = report_from_init(json, || "12".into()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.version.as_str(), r.os, r.error), ("12", None, None));
    }

    #[test]
    fn report_from_init_refuses_another_shape() {
        for json in [
            "not json",
            r#"{"running":1}"#,
            r#"{"running":"a","slots":{}}"#,
            r#"{"running":"a","slots":[{"slot":"a"}]}"#,
        ] {
            let e = report_from_init(json, String::new).err();
            assert!(
                e.as_deref().is_some_and(|e| e.contains("not understood")),
                "{json}: {e:?}"
            );
        }
    }
}
