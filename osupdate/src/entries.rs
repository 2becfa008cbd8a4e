//! The boot entries of the two slots on the EFI system partition (ESP), given as a
//! directory (the mounted ESP; tests use a temporary directory).
//!
//! One Boot Loader Specification type #1 entry per slot in `/loader/entries/`:
//! `flotilla-<slot>.conf` once committed, `flotilla-<slot>+<left>[-<done>].conf` while on
//! trial. systemd-boot (Automatic Boot Assessment) decrements `left` and increments `done`
//! in the name on each try; an entry with `left` = 0 is bad and sorted after every good
//! one. The slot's kernel and initramfs live at `/flotilla/<slot>/vmlinuz` and
//! `/flotilla/<slot>/initramfs.img`.
//!
//! Every change is atomic on the FAT ESP: a file is written under a temporary name (not
//! `*.conf`, so the loader ignores it), fsynced, renamed, and the directory fsynced.
//! [`next_slot`] orders the entries as systemd-boot 252 does (bad last; then `sort-key`
//! ascending; then `version` descending; then the id descending) and so says which slot
//! boots next.

use std::cmp::Ordering;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::{hex, IoError, CHUNK};

/// The entries directory inside the ESP.
pub const ENTRIES_DIR: &str = "loader/entries";
/// The slots' kernels directory inside the ESP (`flotilla/<slot>/`).
pub const SLOTS_DIR: &str = "flotilla";
/// The `sort-key` of every Flotilla entry.
pub const SORT_KEY: &str = "flotilla";
/// The name prefix of the entries.
pub const PREFIX: &str = "flotilla-";
/// The kernel command line of a slot, after `flotilla.slot=<slot>` and the partitions.
pub const BASE_OPTIONS: &str = "console=ttyS0 quiet panic=10";
/// Slot A's GPT partition name.
pub const SLOT_A_PARTITION: &str = "flotilla-root-a";
/// Slot B's GPT partition name.
pub const SLOT_B_PARTITION: &str = "flotilla-root-b";
/// The GPT partition name of the `/var` partition.
pub const VAR_PARTITION: &str = "flotilla-var";

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// Slot A (`flotilla-root-a`).
    A,
    /// Slot B (`flotilla-root-b`).
    B,
}

impl Slot {
    /// Both slots.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// `a` or `b`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// Parses `a` or `b`.
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    /// The slot's GPT partition name, `flotilla-root-<slot>`.
    pub fn partition_name(self) -> String {
        match self {
            Slot::A => SLOT_A_PARTITION,
            Slot::B => SLOT_B_PARTITION,
        }
        .to_string()
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The boot counter in an entry's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Tries left (0: bad).
    pub left: u32,
    /// Tries done, if the name has them.
    pub done: Option<u32>,
}

/// An entry's file name, parsed: `flotilla-<slot>[+<left>[-<done>]].conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryName {
    /// The slot.
    pub slot: Slot,
    /// The boot counter; `None` once committed.
    pub counter: Option<Counter>,
}

impl EntryName {
    /// Parses a file name; `None` if it is not a Flotilla entry.
    pub fn parse(file: &str) -> Option<EntryName> {
        let stem = file.strip_prefix(PREFIX)?.strip_suffix(".conf")?;
        let (slot, counter) = match stem.split_once('+') {
            None => (stem, None),
            Some((slot, c)) => {
                let (left, done) = match c.split_once('-') {
                    None => (c, None),
                    Some((l, d)) => (l, Some(d)),
                };
                let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                if !digits(left) || !done.is_none_or(digits) {
                    return None;
                }
                let left = left.parse().ok()?;
                let done = match done {
                    Some(d) => Some(d.parse().ok()?),
                    None => None,
                };
                (slot, Some(Counter { left, done }))
            }
        };
        Some(EntryName {
            slot: Slot::parse(slot)?,
            counter,
        })
    }

    /// The file name.
    pub fn render(&self) -> String {
        let counter = match self.counter {
            None => String::new(),
            Some(Counter { left, done: None }) => format!("+{left}"),
            Some(Counter {
                left,
                done: Some(d),
            }) => format!("+{left}-{d}"),
        };
        format!("{PREFIX}{}{counter}.conf", self.slot)
    }

    /// The entry's state.
    pub fn state(&self) -> EntryState {
        match self.counter {
            None => EntryState::Committed,
            Some(Counter { left: 0, done }) => EntryState::Bad {
                done: done.unwrap_or(0),
            },
            Some(Counter { left, done }) => EntryState::Trying {
                left,
                done: done.unwrap_or(0),
            },
        }
    }
}

/// The state of a slot's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Booted successfully and committed (no counter).
    Committed,
    /// On trial: `left` tries remain, `done` were made.
    Trying {
        /// Tries left.
        left: u32,
        /// Tries done.
        done: u32,
    },
    /// No tries left: the loader boots it only if nothing good remains.
    Bad {
        /// Tries done.
        done: u32,
    },
}

impl std::fmt::Display for EntryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryState::Committed => f.write_str("committed"),
            EntryState::Trying { left, done } => {
                write!(f, "trying ({left} tries left, {done} done)")
            }
            EntryState::Bad { done } => write!(f, "bad ({done} tries done)"),
        }
    }
}

/// Why an entry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// File I/O on the ESP failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A slot has more than one entry.
    #[error("slot {slot} has several entries in {}: {files:?}; remove all but one", dir.display())]
    Duplicate {
        /// The slot.
        slot: Slot,
        /// The entries directory.
        dir: PathBuf,
        /// The files.
        files: Vec<String>,
    },
    /// The slot has no entry.
    #[error("slot {slot} has no boot entry in {}", dir.display())]
    Missing {
        /// The slot.
        slot: Slot,
        /// The entries directory.
        dir: PathBuf,
    },
    /// Commit of an entry that is not on trial.
    #[error("slot {slot}'s entry is {state}, not on trial: nothing to commit")]
    NotTrying {
        /// The slot.
        slot: Slot,
        /// Its state.
        state: EntryState,
    },
    /// Rollback without a good other slot.
    #[error("cannot roll back to slot {slot}: {reason}")]
    NoFallback {
        /// The slot that would be booted.
        slot: Slot,
        /// Why it cannot.
        reason: String,
    },
    /// A copied kernel or initramfs does not have the expected digest.
    #[error("{} copied to {} has sha256 {actual}, expected {expected}: the payload changed after verification; nothing installed", source_path.display(), dest.display())]
    Digest {
        /// The source file.
        source_path: PathBuf,
        /// The destination.
        dest: PathBuf,
        /// Expected sha256.
        expected: String,
        /// What was copied.
        actual: String,
    },
    /// A version that cannot go into an entry.
    #[error("version {0:?} cannot go into a boot entry (empty, or contains whitespace or a control character)")]
    BadVersion(String),
}

/// A slot's entry as found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEntry {
    /// The slot.
    pub slot: Slot,
    /// The file name in [`ENTRIES_DIR`].
    pub file: String,
    /// Its parsed name.
    pub name: EntryName,
    /// The `version` line.
    pub version: String,
    /// The `sort-key` line, if any.
    pub sort_key: Option<String>,
    /// The `title` line.
    pub title: String,
}

impl SlotEntry {
    /// The entry's state.
    pub fn state(&self) -> EntryState {
        self.name.state()
    }
}

/// What [`status`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The slots' entries, A then B (a slot without an entry is absent).
    pub entries: Vec<SlotEntry>,
    /// The slot the loader boots next ([`next_slot`]), if any entry exists.
    pub next: Option<Slot>,
}

impl Status {
    /// The entry of `slot`.
    pub fn entry(&self, slot: Slot) -> Option<&SlotEntry> {
        self.entries.iter().find(|e| e.slot == slot)
    }
}

/// Compares two version strings like systemd's `strverscmp_improved` does for the cases
/// Flotilla produces: runs of digits numerically, runs of letters as text, a digit run
/// above a letter run, other characters as separators, and the longer version (more runs)
/// above its prefix.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn runs(s: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut start = None;
        let mut kind = 0u8;
        for (i, c) in s.char_indices() {
            let k = if c.is_ascii_digit() {
                1
            } else if c.is_ascii_alphabetic() {
                2
            } else {
                0
            };
            if k != kind {
                if let (Some(st), true) = (start, kind != 0) {
                    out.push(s.get(st..i).unwrap_or_default());
                }
                start = Some(i);
                kind = k;
            }
        }
        if let (Some(st), true) = (start, kind != 0) {
            out.push(s.get(st..).unwrap_or_default());
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(rb.iter()) {
        let xd = x.bytes().all(|c| c.is_ascii_digit());
        let yd = y.bytes().all(|c| c.is_ascii_digit());
        let ord = match (xd, yd) {
            (true, true) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ra.len().cmp(&rb.len())
}

/// systemd-boot 252's order of two entries: `Less` if `a` comes first in the menu.
pub fn boot_order(a: &SlotEntry, b: &SlotEntry) -> Ordering {
    let bad = |e: &SlotEntry| matches!(e.state(), EntryState::Bad { .. });
    let id = |e: &SlotEntry| format!("{PREFIX}{}", e.slot);
    bad(a)
        .cmp(&bad(b))
        .then_with(|| a.sort_key.is_none().cmp(&b.sort_key.is_none()))
        .then_with(|| a.sort_key.cmp(&b.sort_key))
        // Newest version first.
        .then_with(|| compare_versions(&b.version, &a.version))
        .then_with(|| compare_versions(&id(b), &id(a)))
        .then_with(|| {
            let left = |e: &SlotEntry| e.name.counter.map(|c| c.left);
            let done = |e: &SlotEntry| e.name.counter.and_then(|c| c.done).unwrap_or(0);
            match (left(a), left(b)) {
                (Some(x), Some(y)) => y.cmp(&x).then_with(|| done(a).cmp(&done(b))),
                _ => Ordering::Equal,
            }
        })
}

/// The other slot's entry when an update to it was rolled back: `running`'s entry is not
/// on trial, the other slot's entry is bad (its tries ran out, or `unitctl os rollback`) and
/// its version is newer than the running one's (`running_version`). The init says so at
/// boot and `unitctl os status` shows it.
pub fn rolled_back<'a>(
    status: &'a Status,
    running: Slot,
    running_version: &str,
) -> Option<&'a SlotEntry> {
    let own = status.entry(running)?;
    if matches!(own.state(), EntryState::Trying { .. }) {
        return None;
    }
    status.entry(running.other()).filter(|other| {
        matches!(other.state(), EntryState::Bad { .. })
            && compare_versions(&other.version, running_version) == Ordering::Greater
    })
}

/// The slot systemd-boot boots next (the first entry in its order; `loader.conf` sets no
/// `default` and no `LoaderEntryDefault` EFI variable is set).
pub fn next_slot(entries: &[SlotEntry]) -> Option<Slot> {
    entries
        .iter()
        .min_by(|a, b| boot_order(a, b))
        .map(|e| e.slot)
}

/// The entry text of a slot.
pub fn render_entry(slot: Slot, version: &str) -> String {
    render_entry_with(slot, version, &[])
}

/// The entry text of a slot with `extra` words appended to its `options` line.
pub fn render_entry_with(slot: Slot, version: &str, extra: &[String]) -> String {
    let extra: String = extra.iter().map(|w| format!(" {w}")).collect();
    format!(
        "title Flotilla {version} (slot {slot})\n\
         sort-key {SORT_KEY}\n\
         version {version}\n\
         linux /{SLOTS_DIR}/{slot}/vmlinuz\n\
         initrd /{SLOTS_DIR}/{slot}/initramfs.img\n\
         options {BASE_OPTIONS} flotilla.slot={slot} flotilla.root={} flotilla.var={VAR_PARTITION}{extra}\n",
        slot.partition_name()
    )
}

/// The words of `slot`'s entry `options` line that [`render_entry`] does not write (e.g. a
/// console or debug word the operator added to the entry): an update carries them to the
/// new slot's entry, as kernel arguments survive updates elsewhere. No entry: none.
pub fn extra_options(esp: &Path, slot: Slot) -> Result<Vec<String>, EntryError> {
    let Some(entry) = entries_checked(esp)?.into_iter().find(|e| e.slot == slot) else {
        return Ok(Vec::new());
    };
    let path = esp.join(ENTRIES_DIR).join(&entry.file);
    let text = std::fs::read_to_string(&path).map_err(|e| IoError::new("read", &path, e))?;
    let template = render_entry(slot, &entry.version);
    let base: Vec<&str> = entry_field(&template, "options")
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    Ok(entry_field(&text, "options")
        .unwrap_or_default()
        .split_whitespace()
        .filter(|w| !base.contains(w))
        .map(str::to_string)
        .collect())
}

/// The value of `key` in an entry's text.
fn entry_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let l = l.trim();
        let (k, v) = l.split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim())
    })
}

/// Reads the Flotilla entries of the ESP (other files are ignored).
fn read_entries(esp: &Path) -> Result<Vec<SlotEntry>, EntryError> {
    let dir = esp.join(ENTRIES_DIR);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(IoError::new("read directory", &dir, e).into()),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| IoError::new("read directory", &dir, e))?;
        let Some(file) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Some(name) = EntryName::parse(&file) else {
            continue;
        };
        let path = dir.join(&file);
        let text = std::fs::read_to_string(&path).map_err(|e| IoError::new("read", &path, e))?;
        out.push(SlotEntry {
            slot: name.slot,
            name,
            version: entry_field(&text, "version")
                .unwrap_or_default()
                .to_string(),
            sort_key: entry_field(&text, "sort-key").map(str::to_string),
            title: entry_field(&text, "title").unwrap_or_default().to_string(),
            file,
        });
    }
    out.sort_by(|a, b| a.slot.cmp(&b.slot).then_with(|| a.file.cmp(&b.file)));
    Ok(out)
}

/// The entries, at most one per slot.
fn entries_checked(esp: &Path) -> Result<Vec<SlotEntry>, EntryError> {
    let entries = read_entries(esp)?;
    for slot in Slot::ALL {
        let files: Vec<String> = entries
            .iter()
            .filter(|e| e.slot == slot)
            .map(|e| e.file.clone())
            .collect();
        if files.len() > 1 {
            return Err(EntryError::Duplicate {
                slot,
                dir: esp.join(ENTRIES_DIR),
                files,
            });
        }
    }
    Ok(entries)
}

/// Per slot: version and state; and which slot boots next.
pub fn status(esp: &Path) -> Result<Status, EntryError> {
    let entries = entries_checked(esp)?;
    let next = next_slot(&entries);
    Ok(Status { entries, next })
}

/// fsyncs a directory (a rename or unlink in it is durable after this).
fn sync_dir(dir: &Path) -> Result<(), IoError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IoError::new("fsync directory", dir, e))
}

/// Renames `from` to `to` in `dir` and fsyncs the directory.
fn rename_synced(dir: &Path, from: &str, to: &str) -> Result<(), IoError> {
    let (a, b) = (dir.join(from), dir.join(to));
    std::fs::rename(&a, &b).map_err(|e| IoError::new("rename", &a, e))?;
    sync_dir(dir)
}

/// The temporary name of `file` (not `*.conf`: the loader ignores it).
fn tmp_name(file: &str) -> String {
    format!(".{file}.tmp")
}

/// Writes `bytes` to `dir/file` atomically: temporary file, fsync, rename, fsync `dir`.
fn write_atomic(dir: &Path, file: &str, bytes: &[u8]) -> Result<(), IoError> {
    let tmp = dir.join(tmp_name(file));
    let mut f = std::fs::File::create(&tmp).map_err(|e| IoError::new("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| IoError::new("write", &tmp, e))?;
    drop(f);
    rename_synced(dir, &tmp_name(file), file)
}

/// Copies `src` to `dir/file` atomically, hashing what it writes; refuses (removing the
/// temporary file) if the sha256 is not `expected`.
fn copy_verified(src: &Path, dir: &Path, file: &str, expected: &str) -> Result<(), EntryError> {
    let tmp = dir.join(tmp_name(file));
    let mut input = std::fs::File::open(src).map_err(|e| IoError::new("open", src, e))?;
    let mut out = std::fs::File::create(&tmp).map_err(|e| IoError::new("create", &tmp, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(IoError::new("read", src, e).into()),
        };
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        h.update(chunk);
        out.write_all(chunk)
            .map_err(|e| IoError::new("write", &tmp, e))?;
    }
    let actual = hex(&h.finalize());
    if !actual.eq_ignore_ascii_case(expected) {
        drop(out);
        let _ = std::fs::remove_file(&tmp);
        return Err(EntryError::Digest {
            source_path: src.to_path_buf(),
            dest: dir.join(file),
            expected: expected.to_string(),
            actual,
        });
    }
    out.sync_all().map_err(|e| IoError::new("fsync", &tmp, e))?;
    drop(out);
    rename_synced(dir, &tmp_name(file), file)?;
    Ok(())
}

/// A file to copy into the slot's directory of the ESP, with its expected sha256.
#[derive(Debug, Clone, Copy)]
pub struct BootFile<'a> {
    /// The source file.
    pub path: &'a Path,
    /// Its expected hex sha256 (from the verified manifest).
    pub sha256: &'a str,
}

/// Removes every entry of `slot` (so the loader cannot boot it while it is rewritten);
/// returns how many were removed.
pub fn remove(esp: &Path, slot: Slot) -> Result<usize, EntryError> {
    let dir = esp.join(ENTRIES_DIR);
    let mut n = 0;
    for e in read_entries(esp)?.into_iter().filter(|e| e.slot == slot) {
        let path = dir.join(&e.file);
        std::fs::remove_file(&path).map_err(|err| IoError::new("remove", &path, err))?;
        n += 1;
    }
    if n > 0 {
        sync_dir(&dir)?;
    }
    Ok(n)
}

/// What [`install`] did besides writing the trial entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The trial entry's file name.
    pub file: String,
    /// The other slot's committed entry, renamed to `+0` (bad) because the new entry would
    /// not sort before it (a downgrade, or the same version): see the crate README.
    pub demoted: Option<String>,
}

/// Installs `slot` as the next boot on trial: removes its old entries, copies the kernel
/// and initramfs into `flotilla/<slot>/` (each checked against its sha256), then writes
/// `flotilla-<slot>+<tries>.conf`. If the new entry would not sort first (the other slot's
/// entry has a version not lower: a downgrade or the same version), that entry is marked
/// bad (`+0`) so the trial boots first; should the trial's tries run out, both are bad and
/// the loader's version order boots the other slot again (see [`Installed::demoted`]).
pub fn install(
    esp: &Path,
    slot: Slot,
    version: &str,
    tries: u32,
    vmlinuz: BootFile<'_>,
    initramfs: BootFile<'_>,
) -> Result<Installed, EntryError> {
    install_with(esp, slot, version, tries, &[], vmlinuz, initramfs)
}

/// [`install`] with `extra` words appended to the entry's `options` line (the running
/// slot's [`extra_options`], carried over by an update).
pub fn install_with(
    esp: &Path,
    slot: Slot,
    version: &str,
    tries: u32,
    extra: &[String],
    vmlinuz: BootFile<'_>,
    initramfs: BootFile<'_>,
) -> Result<Installed, EntryError> {
    if version.is_empty() || version.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(EntryError::BadVersion(version.to_string()));
    }
    let tries = tries.max(1);
    let entries_dir = esp.join(ENTRIES_DIR);
    let slot_dir = esp.join(SLOTS_DIR).join(slot.as_str());
    remove(esp, slot)?;
    for d in [&entries_dir, &slot_dir] {
        std::fs::create_dir_all(d).map_err(|e| IoError::new("create", d, e))?;
    }
    copy_verified(vmlinuz.path, &slot_dir, "vmlinuz", vmlinuz.sha256)?;
    copy_verified(initramfs.path, &slot_dir, "initramfs.img", initramfs.sha256)?;
    let name = EntryName {
        slot,
        counter: Some(Counter {
            left: tries,
            done: None,
        }),
    };
    let file = name.render();
    let text = render_entry_with(slot, version, extra);
    let new_entry = SlotEntry {
        slot,
        file: file.clone(),
        name,
        version: version.to_string(),
        sort_key: Some(SORT_KEY.to_string()),
        title: String::new(),
    };
    // The other slot's entry must sort after the new one, or the trial is never booted.
    let mut demoted = None;
    if let Some(other) = entries_checked(esp)?
        .into_iter()
        .find(|e| e.slot == slot.other())
    {
        if boot_order(&new_entry, &other) != Ordering::Less {
            if let EntryState::Committed | EntryState::Trying { .. } = other.state() {
                let bad = EntryName {
                    slot: other.slot,
                    counter: Some(Counter {
                        left: 0,
                        done: None,
                    }),
                }
                .render();
                rename_synced(&entries_dir, &other.file, &bad)?;
                demoted = Some(bad);
            }
        }
    }
    write_atomic(&entries_dir, &file, text.as_bytes())?;
    Ok(Installed { file, demoted })
}

/// Commits `slot`: renames its trial entry `flotilla-<slot>+N[-M].conf` (also `+0-M`: the
/// running slot's last try) to `flotilla-<slot>.conf`. Returns the new file name.
pub fn commit(esp: &Path, slot: Slot) -> Result<String, EntryError> {
    let entry = entries_checked(esp)?
        .into_iter()
        .find(|e| e.slot == slot)
        .ok_or_else(|| EntryError::Missing {
            slot,
            dir: esp.join(ENTRIES_DIR),
        })?;
    // A counted entry is on trial, also at `+0-N`: the loader renames the entry before it
    // boots it, so the boot that uses the last try runs with no tries left.
    if entry.name.counter.is_none() {
        return Err(EntryError::NotTrying {
            slot,
            state: entry.state(),
        });
    }
    let to = EntryName {
        slot,
        counter: None,
    }
    .render();
    rename_synced(&esp.join(ENTRIES_DIR), &entry.file, &to)?;
    Ok(to)
}

/// Makes the other slot the one booted next: the entry that would boot next is marked bad
/// (`+0`, keeping its tries done), provided the other slot has an entry that is not bad.
/// Returns the slot that boots next.
pub fn rollback(esp: &Path) -> Result<Slot, EntryError> {
    let entries = entries_checked(esp)?;
    let dir = esp.join(ENTRIES_DIR);
    let Some(next) = entries.iter().min_by(|a, b| boot_order(a, b)) else {
        return Err(EntryError::Missing { slot: Slot::A, dir });
    };
    let target = next.slot.other();
    match entries.iter().find(|e| e.slot == target) {
        None => {
            return Err(EntryError::NoFallback {
                slot: target,
                reason: "it has no boot entry (never installed)".into(),
            })
        }
        Some(e) if matches!(e.state(), EntryState::Bad { .. }) => {
            return Err(EntryError::NoFallback {
                slot: target,
                reason: format!("its entry {} is bad (no tries left)", e.file),
            })
        }
        Some(_) => {}
    }
    let done = next.name.counter.and_then(|c| c.done);
    let bad = EntryName {
        slot: next.slot,
        counter: Some(Counter { left: 0, done }),
    }
    .render();
    rename_synced(&dir, &next.file, &bad)?;
    Ok(target)
}
