//! What the agent publishes of its host's OS (issue 13): the version (`VERSION_ID` of
//! os-release) and, on a host booted from a slot of the A/B disk, the update state
//! (`flotilla_osupdate::host::status`: booted slot, each slot's entry, next slot). Read at
//! every registration and every [`REFRESH`] after; a change rewrites the machine record.
//!
//! The ESP is read where [`OsProbe::esp`] says; without one, the agent mounts the disk's
//! `flotilla-esp` partition read-only on a private directory for the read (as `unitctl os
//! status` does) and unmounts it. Nothing here fails the agent: a probe that cannot read
//! something logs it and publishes what it could.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_osupdate::entries::EntryState;
use flotilla_osupdate::host::{self, EspMount, Host, HostError, ESP_PARTITION};

use crate::model::{OsSlot, OsState};

/// How often the agent reads its host's OS state again.
pub const REFRESH: Duration = Duration::from_secs(30);

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

impl OsProbe {
    /// The host's OS version and update state. Never fails: what cannot be read is left
    /// out, and the failure to read the update state is returned for the caller to log
    /// (once: the probe repeats). A missing or unreadable os-release is only `debug`.
    pub fn probe(&self) -> OsReport {
        let version = match std::fs::read_to_string(&self.os_release) {
            Ok(text) => version_id(&text),
            Err(e) => {
                log::debug!("cannot read {}: {e}", self.os_release.display());
                String::new()
            }
        };
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
}
