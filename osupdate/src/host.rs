//! One host's update, rollback and status: [`payload`](crate::payload), [`slot`](crate::slot)
//! and [`entries`](crate::entries) put together over the paths of a [`Host`] (the real
//! ones by default; tests point them at a loop device, a directory standing in for the
//! mounted ESP, and files standing in for `/proc/cmdline` and os-release).
//!
//! The update runs in the caller (`unitctl os update`, as root), not in PID 1: writing
//! hundreds of MB must not stall the init's event loop, and the caller shows the progress.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::entries::{self, BootFile, EntryError, Installed};
use crate::payload::{self, PayloadError, Policy, VerifiedPayload, OS_ID, TRUSTED_KEYS_DIR};
use crate::slot::{self, Partition, SlotError, WriteReport};
use crate::{IoError, Slot};

/// The GPT partition name of the EFI system partition.
pub const ESP_PARTITION: &str = "flotilla-esp";
/// The mount data for the ESP (vfat): the cloud kernel's default `iocharset` is `ascii`
/// (`nls_ascii`, a module); the image ships `nls_iso8859_1` with `vfat` and `nls_cp437`.
pub const ESP_MOUNT_DATA: &std::ffi::CStr = c"iocharset=iso8859-1";
/// The ESP (vfat, [`ESP_MOUNT_DATA`], `nosuid,nodev,noexec`) mounted on a directory for
/// the life of the value: unmounted, and the directory removed when empty, by
/// [`EspMount::unmount`] or on drop. unitctl, the init's trial and fleetd's probe mount it
/// only for as long as they read or change it.
#[derive(Debug)]
pub struct EspMount {
    dir: Option<PathBuf>,
}

impl EspMount {
    /// Mounts the partition `dev` on `dir` (created if missing), read-only if asked.
    pub fn mount(dev: &Path, dir: &Path, read_only: bool) -> Result<EspMount, IoError> {
        use rustix::mount::MountFlags;
        std::fs::create_dir_all(dir).map_err(|e| IoError::new("create", dir, e))?;
        let mut flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        if read_only {
            flags |= MountFlags::RDONLY;
        }
        if let Err(e) = rustix::mount::mount(dev, dir, "vfat", flags, ESP_MOUNT_DATA) {
            let _ = std::fs::remove_dir(dir);
            return Err(IoError::new(
                "mount the ESP (vfat: are vfat, nls_cp437 and nls_iso8859_1 in the image's [kernel] modules?) from",
                dev,
                e.into(),
            ));
        }
        Ok(EspMount {
            dir: Some(dir.to_path_buf()),
        })
    }

    /// Where it is mounted.
    pub fn dir(&self) -> &Path {
        self.dir.as_deref().unwrap_or(Path::new(""))
    }

    /// Unmounts it now, saying whether that failed (drop does the same silently).
    pub fn unmount(mut self) -> Result<(), IoError> {
        match self.dir.take() {
            Some(dir) => unmount_esp(&dir),
            None => Ok(()),
        }
    }
}

fn unmount_esp(dir: &Path) -> Result<(), IoError> {
    rustix::mount::unmount(dir, rustix::mount::UnmountFlags::empty())
        .map_err(|e| IoError::new("unmount the ESP at", dir, e.into()))?;
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

impl Drop for EspMount {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = unmount_esp(&dir);
        }
    }
}

/// Tries a new slot gets before the loader falls back (systemd-boot's counter).
pub const DEFAULT_TRIES: u32 = 3;

/// Why an update, rollback or status failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Reading a host file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The payload was refused.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// The boot entries.
    #[error(transparent)]
    Entries(#[from] EntryError),
    /// Finding or writing the slot.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The running slot's entry is still on trial: writing the other slot would overwrite
    /// the committed fallback the loader returns to if this slot fails.
    #[error("the running slot {slot} is on trial (not committed; its entry {entry}): refused, nothing written, since the update would overwrite slot {other}, the committed fallback; commit it (`unitctl os commit`) or wait for the health check, then update", other = slot.other())]
    OnTrial {
        /// The running slot.
        slot: Slot,
        /// Its boot entry's file name.
        entry: String,
    },
    /// Not booted from an A/B disk.
    #[error("this host was not booted from a slot of an A/B disk (no flotilla.slot= in {}): updates need the disk image (`image-build os` disk.img), not the direct kernel boot", cmdline.display())]
    NotAb {
        /// The command line file read.
        cmdline: PathBuf,
    },
}

/// The paths an update works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `/sys/class/block`.
    pub sys_block: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
    /// `/proc/cmdline` (the running slot).
    pub cmdline: PathBuf,
    /// The running os-release (`/usr/lib/os-release`: the running version).
    pub os_release: PathBuf,
    /// The trusted keys ([`TRUSTED_KEYS_DIR`]).
    pub keys: PathBuf,
    /// The disk (kernel name, e.g. `vda`); `None`: the disk holding the running slot.
    pub disk: Option<String>,
    /// The mounted ESP.
    pub esp: PathBuf,
}

impl Host {
    /// The real paths, with the ESP mounted at `esp`.
    pub fn system(esp: &Path) -> Host {
        Host {
            sys_block: PathBuf::from("/sys/class/block"),
            dev: PathBuf::from("/dev"),
            cmdline: PathBuf::from("/proc/cmdline"),
            os_release: PathBuf::from("/usr/lib/os-release"),
            keys: PathBuf::from(TRUSTED_KEYS_DIR),
            disk: None,
            esp: esp.to_path_buf(),
        }
    }

    /// The running slot (`flotilla.slot=` on the command line).
    pub fn running_slot(&self) -> Result<Slot, HostError> {
        let text = std::fs::read_to_string(&self.cmdline)
            .map_err(|e| IoError::new("read", &self.cmdline, e))?;
        slot::running_slot(&text).ok_or_else(|| HostError::NotAb {
            cmdline: self.cmdline.clone(),
        })
    }

    /// The disk holding the slots: [`Host::disk`], else the running slot's.
    pub fn disk(&self) -> Result<String, HostError> {
        if let Some(d) = &self.disk {
            return Ok(d.clone());
        }
        let running = self.running_slot()?;
        Ok(slot::find_partition(&self.sys_block, &self.dev, &running.partition_name(), None)?.disk)
    }

    /// The partition named `name` on the slots' disk.
    pub fn partition(&self, name: &str) -> Result<Partition, HostError> {
        let disk = self.disk()?;
        Ok(slot::find_partition(
            &self.sys_block,
            &self.dev,
            name,
            Some(&disk),
        )?)
    }
}

/// What [`update`] is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateOptions {
    /// Accept a version not newer than the running one.
    pub allow_downgrade: bool,
    /// Tries of the new slot.
    pub tries: u32,
}

impl Default for UpdateOptions {
    fn default() -> Self {
        UpdateOptions {
            allow_downgrade: false,
            tries: DEFAULT_TRIES,
        }
    }
}

/// What [`update`] did.
#[derive(Debug, Clone)]
pub struct UpdateReport {
    /// The verified payload.
    pub payload: VerifiedPayload,
    /// The slot written (the next boot, on trial).
    pub slot: Slot,
    /// Its partition.
    pub partition: Partition,
    /// The write.
    pub write: WriteReport,
    /// The entry installed.
    pub installed: Installed,
    /// Time to verify the payload.
    pub verify: Duration,
}

/// Updates the host from the payload in `dir`: verifies it against the trusted keys and the
/// running version (nothing is written if it is refused), removes the inactive slot's
/// entry, writes the root image to the inactive slot (read back and checked), then copies
/// the kernel and initramfs to the ESP and installs the slot's entry on trial with
/// `opts.tries` tries. The reboot is the caller's.
pub fn update(
    host: &Host,
    dir: &Path,
    opts: UpdateOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<UpdateReport, HostError> {
    let running = host.running_slot()?;
    refuse_on_trial(host)?;
    let version = payload::os_release_version(&host.os_release)?;
    let trusted = payload::load_trusted_keys(&host.keys)?;
    let started = std::time::Instant::now();
    let verified = payload::verify(
        dir,
        &Policy {
            trusted: &trusted,
            running: Some(&version),
            allow_downgrade: opts.allow_downgrade,
            os: OS_ID,
            architecture: std::env::consts::ARCH,
        },
    )?;
    let verify = started.elapsed();
    let target = running.other();
    let partition = host.partition(&target.partition_name())?;
    // The write's own checks first: a refused write changes nothing, not even the entries.
    slot::preflight(&verified, target, Some(running), &partition)?;
    // Words the operator added to the running slot's entry go on in the new one.
    let extra = entries::extra_options(&host.esp, running)?;
    // The loader must not boot the slot while it is rewritten.
    entries::remove(&host.esp, target)?;
    let write = slot::write_slot(&verified, target, Some(running), &partition, progress)?;
    let file = |name: &str| {
        verified
            .artifact(name)
            .map(|a| (verified.dir.join(&a.path), a.sha256.clone()))
            .ok_or(SlotError::NoRoot)
    };
    let (kernel, kernel_sha) = file("vmlinuz")?;
    let (initrd, initrd_sha) = file("initramfs")?;
    let installed = entries::install_with(
        &host.esp,
        target,
        &verified.manifest.version,
        opts.tries,
        &extra,
        BootFile {
            path: &kernel,
            sha256: &kernel_sha,
        },
        BootFile {
            path: &initrd,
            sha256: &initrd_sha,
        },
    )?;
    Ok(UpdateReport {
        payload: verified,
        slot: target,
        partition,
        write,
        installed,
        verify,
    })
}

/// The host's state: the running slot and version, and the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    /// The running slot (`None`: not booted from an A/B disk).
    pub running: Option<Slot>,
    /// The running version (os-release `VERSION_ID`).
    pub version: String,
    /// The slots' entries and which boots next.
    pub entries: entries::Status,
}

/// The host's state. Works on a host booted directly too (no running slot).
pub fn status(host: &Host) -> Result<HostStatus, HostError> {
    let running = match host.running_slot() {
        Ok(s) => Some(s),
        Err(HostError::NotAb { .. }) => None,
        Err(e) => return Err(e),
    };
    let version = payload::os_release_version(&host.os_release)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| "unknown".into());
    Ok(HostStatus {
        running,
        version,
        entries: entries::status(&host.esp)?,
    })
}

/// Refuses an update while the running slot's boot entry is on trial (`Trying`: booted but
/// not committed yet): the inactive slot is then the committed fallback, and writing it
/// would leave the host with no good slot to fall back to. [`update`] calls it first (the
/// one place, for `unitctl os update` and init's `UpdateOs` alike); callers may call it
/// before a download. A host without an entry for the running slot is not refused.
pub fn refuse_on_trial(host: &Host) -> Result<(), HostError> {
    let running = host.running_slot()?;
    let st = entries::status(&host.esp)?;
    match st.entry(running) {
        Some(e) if matches!(e.state(), entries::EntryState::Trying { .. }) => {
            Err(HostError::OnTrial {
                slot: running,
                entry: e.file.clone(),
            })
        }
        _ => Ok(()),
    }
}

/// Makes the other slot the next boot ([`entries::rollback`]); returns it.
pub fn rollback(host: &Host) -> Result<Slot, HostError> {
    Ok(entries::rollback(&host.esp)?)
}

/// Marks the running slot good: its trial entry becomes committed
/// ([`entries::commit`]). Returns the slot.
pub fn commit(host: &Host) -> Result<Slot, HostError> {
    let running = host.running_slot()?;
    entries::commit(&host.esp, running)?;
    Ok(running)
}
