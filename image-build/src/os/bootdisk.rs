//! `disk.img`: the bootable disk of the host image, made without mounting anything.
//!
//! GPT (written by `sfdisk` on the sparse file), four partitions found by their GPT names:
//! 1. `flotilla-esp`, the EFI system partition (FAT32 by `mkfs.vfat`, filled with mtools):
//!    systemd-boot as the removable-media path `/EFI/BOOT/BOOTX64.EFI` and as
//!    `/EFI/systemd/systemd-bootx64.efi`, `/loader/loader.conf`, slot A's kernel and
//!    initramfs under `/flotilla/a/`, and slot A's committed entry
//!    `/loader/entries/flotilla-a.conf`;
//! 2. `flotilla-root-a`, slot A: `root.img` (erofs) written raw;
//! 3. `flotilla-root-b`, slot B: empty (zeros, sparse), as large as slot A;
//! 4. `flotilla-var`: the ext4 `/var` (the bytes of `var.img`).
//!
//! The layout (what goes where) is data: [`layout`], [`sfdisk_script`], [`ESP_FILES`],
//! [`loader_conf`], [`entry_conf`]; the steps that run programs or write bytes are small
//! functions after them.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::process::run;
use crate::BuildError;

/// The ESP's GPT partition name (osupdate's, which mounts it).
pub const ESP_NAME: &str = flotilla_osupdate::host::ESP_PARTITION;
/// Slot A's GPT partition name (`flotilla.root=` of its entry).
pub const SLOT_A_NAME: &str = flotilla_osupdate::entries::SLOT_A_PARTITION;
/// Slot B's GPT partition name.
pub const SLOT_B_NAME: &str = flotilla_osupdate::entries::SLOT_B_PARTITION;
/// The `/var` partition's GPT name (and its ext4 label).
pub const VAR_NAME: &str = flotilla_osupdate::entries::VAR_PARTITION;

/// GPT type of an EFI system partition.
pub const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// GPT type of a root partition for x86-64 (Discoverable Partitions Specification).
pub const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// GPT type of a `/var` partition (Discoverable Partitions Specification).
pub const TYPE_VAR: &str = "4D21B016-B534-45C2-A9FB-5C16E091FD2D";

/// Alignment of every partition, and the space kept before the first one (primary GPT) and
/// after the last one (backup GPT).
pub const ALIGN: u64 = 1 << 20;
/// Sector size of the disk.
pub const SECTOR: u64 = 512;

/// The FAT volume label of the ESP (11 characters at most).
pub const ESP_LABEL: &str = "FLOTILLAESP";

/// Where systemd-boot is on the build host (Debian `systemd-boot-efi`).
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// The Debian package of [`SYSTEMD_BOOT_EFI`].
pub const SYSTEMD_BOOT_PACKAGE: &str = "systemd-boot-efi";

/// Slot A's boot entry on the ESP (committed: no boot counter in its name).
pub const ENTRY_A: &str = "/loader/entries/flotilla-a.conf";

/// One partition of `disk.img` (in `manifest.json` under `disk.partitions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// GPT partition name (`PARTNAME=` in the guest's sysfs).
    pub name: String,
    /// GPT partition type GUID.
    pub type_guid: String,
    /// GPT unique partition GUID (derived from the spec).
    pub uuid: String,
    /// Offset in the disk, bytes.
    pub offset: u64,
    /// Size, bytes.
    pub size: u64,
}

/// `disk.img`'s layout (in `manifest.json` as `disk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    /// GPT disk GUID (derived from the spec).
    pub guid: String,
    /// Size of the whole disk, bytes.
    pub size: u64,
    /// The partitions, in table order (1 to 4).
    pub partitions: Vec<Partition>,
}

impl DiskLayout {
    /// The partition named `name`.
    pub fn partition(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }
}

/// The layout of a disk with an ESP of `esp`, two slots of `slot` and a `/var` of `var`
/// bytes (each a multiple of [`ALIGN`]); `guid(name)` gives each GUID ("disk" for the
/// disk's own).
pub fn layout(esp: u64, slot: u64, var: u64, guid: impl Fn(&str) -> String) -> DiskLayout {
    let table: [(&str, &str, u64); 4] = [
        (ESP_NAME, TYPE_ESP, esp),
        (SLOT_A_NAME, TYPE_ROOT_X86_64, slot),
        (SLOT_B_NAME, TYPE_ROOT_X86_64, slot),
        (VAR_NAME, TYPE_VAR, var),
    ];
    let mut offset = ALIGN;
    let mut partitions = Vec::new();
    for (name, type_guid, size) in table {
        partitions.push(Partition {
            name: name.into(),
            type_guid: type_guid.into(),
            uuid: guid(name),
            offset,
            size,
        });
        offset += size;
    }
    DiskLayout {
        guid: guid("disk"),
        size: offset + ALIGN,
        partitions,
    }
}

/// The `sfdisk` script that writes `layout`'s GPT (sector units, fixed GUIDs).
pub fn sfdisk_script(layout: &DiskLayout) -> String {
    let mut s = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: {}\nlast-lba: {}\n",
        layout.guid,
        ALIGN / SECTOR,
        (layout.size - ALIGN) / SECTOR - 1
    );
    for (i, p) in layout.partitions.iter().enumerate() {
        s.push_str(&format!(
            "{} : start={}, size={}, type={}, uuid={}, name=\"{}\"\n",
            i + 1,
            p.offset / SECTOR,
            p.size / SECTOR,
            p.type_guid,
            p.uuid,
            p.name
        ));
    }
    s
}

/// systemd-boot's `loader.conf`: the default entry is the first of the sorted `flotilla-*`
/// entries (systemd-boot 252 sorts entries whose boot counter reached 0 after all others,
/// then by `sort-key`, then by `version`, newest first); `timeout 0` boots it at once (a
/// key held at start still shows the menu); no command-line editor on the console.
pub fn loader_conf() -> String {
    "default flotilla-*\ntimeout 0\neditor no\nauto-entries no\nauto-firmware no\n".into()
}

/// The Boot Loader Specification entry of slot A for version `version`: osupdate's
/// ([`flotilla_osupdate::entries::render_entry`]), which `unitctl os update` writes for the
/// other slot (the kernel command line: the serial console, a panic reboots after 10 s so
/// that a boot counter can run out, the slot's root partition and `/var`).
pub fn entry_conf(version: &str) -> String {
    flotilla_osupdate::entries::render_entry(flotilla_osupdate::entries::Slot::A, version)
}

/// Where a file of the ESP comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EspSource {
    /// systemd-boot ([`SYSTEMD_BOOT_EFI`]).
    SystemdBoot,
    /// The image's `vmlinuz`.
    Kernel,
    /// The image's `initramfs.img`.
    Initramfs,
    /// [`loader_conf`].
    LoaderConf,
    /// [`entry_conf`] of slot A.
    EntryA,
}

/// The ESP's directories, parents first.
pub const ESP_DIRS: &[&str] = &[
    "/EFI",
    "/EFI/BOOT",
    "/EFI/systemd",
    "/loader",
    "/loader/entries",
    "/flotilla",
    "/flotilla/a",
    "/flotilla/b",
];

/// The ESP's files: (path on the ESP, source).
pub const ESP_FILES: &[(&str, EspSource)] = &[
    ("/EFI/BOOT/BOOTX64.EFI", EspSource::SystemdBoot),
    ("/EFI/systemd/systemd-bootx64.efi", EspSource::SystemdBoot),
    ("/loader/loader.conf", EspSource::LoaderConf),
    (ENTRY_A, EspSource::EntryA),
    ("/flotilla/a/vmlinuz", EspSource::Kernel),
    ("/flotilla/a/initramfs.img", EspSource::Initramfs),
];

/// The programs [`make_esp`] runs.
#[derive(Debug, Clone)]
pub struct EspTools {
    /// `mkfs.vfat` (dosfstools).
    pub mkfs_vfat: PathBuf,
    /// `mmd` (mtools).
    pub mmd: PathBuf,
    /// `mcopy` (mtools).
    pub mcopy: PathBuf,
}

/// Environment of every mtools command: no `~/.mtoolsrc` or `/etc/mtools.conf` surprises
/// about the image's geometry, and the fixed time.
fn mtools_env(cmd: &mut Command, epoch: u64) {
    cmd.env("MTOOLS_SKIP_CHECK", "1")
        .env("MTOOLSRC", "/dev/null")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("TZ", "UTC");
}

/// The FAT32 ESP image at `out` (`size` bytes, sparse), holding `files` (ESP path, host
/// file): `mkfs.vfat --invariant -i VOLID` with `SOURCE_DATE_EPOCH` (fixed volume id and
/// times), then `mmd` for [`ESP_DIRS`] and `mcopy -m` (the host files' mtime, which the
/// caller sets to the epoch) for each file.
#[allow(clippy::too_many_arguments)]
pub fn make_esp(
    tools: &EspTools,
    out: &Path,
    size: u64,
    volume_id: u32,
    files: &[(&str, PathBuf)],
    epoch: u64,
    pb: &ProgressBar,
    log: &Path,
) -> Result<(), BuildError> {
    let f = std::fs::File::create(out).map_err(|e| io_err("create", out, e))?;
    f.set_len(size).map_err(|e| io_err("size", out, e))?;
    drop(f);
    let mut mkfs = Command::new(&tools.mkfs_vfat);
    mkfs.args([
        "-F",
        "32",
        "-S",
        "512",
        "-n",
        ESP_LABEL,
        "--invariant",
        "-i",
    ])
    .arg(format!("{volume_id:08X}"))
    .arg(out)
    .env("SOURCE_DATE_EPOCH", epoch.to_string());
    run(&mut mkfs, pb, log)?;
    let mut mmd = Command::new(&tools.mmd);
    mmd.arg("-i").arg(out);
    for d in ESP_DIRS {
        mmd.arg(format!("::{d}"));
    }
    mtools_env(&mut mmd, epoch);
    run(&mut mmd, pb, log)?;
    for (dest, src) in files {
        let mut mcopy = Command::new(&tools.mcopy);
        mcopy
            .args(["-m", "-i"])
            .arg(out)
            .arg(src)
            .arg(format!("::{dest}"));
        mtools_env(&mut mcopy, epoch);
        run(&mut mcopy, pb, log)?;
    }
    Ok(())
}

/// Writes `sfdisk_script(layout)` to the (sparse, `layout.size` bytes) disk `out` with
/// `sfdisk` (the script on its standard input), which leaves the partitions' bytes alone.
/// Its output goes to `log`.
pub fn write_gpt(
    sfdisk: &Path,
    out: &Path,
    layout: &DiskLayout,
    log: &Path,
) -> Result<(), BuildError> {
    let mut cmd = Command::new(sfdisk);
    cmd.args(["--no-reread", "--no-tell-kernel", "--wipe", "never"])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}").replace('"', "");
    let failed = |status: String, tail: Vec<String>| BuildError::Command {
        command: shown.clone(),
        status,
        tail,
        log: Some(log.to_path_buf()),
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("cannot start: {e}"), Vec::new()))?;
    let script = sfdisk_script(layout);
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| failed(format!("cannot send the script: {e}"), Vec::new()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| failed(format!("cannot wait: {e}"), Vec::new()))?;
    let text = format!(
        "$ {shown} <<EOF\n{script}EOF\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = f.write_all(text.as_bytes());
    }
    if output.status.success() {
        return Ok(());
    }
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let tail = lines
        .get(lines.len().saturating_sub(12)..)
        .unwrap_or_default()
        .to_vec();
    Err(failed(output.status.to_string(), tail))
}

/// Copies the file `src` into `dst` at byte `offset`, skipping blocks of zeros (the disk is
/// a fresh sparse file: they stay holes). Returns the bytes copied.
pub fn copy_into(
    src: &Path,
    dst: &mut std::fs::File,
    dst_path: &Path,
    offset: u64,
) -> Result<u64, BuildError> {
    let mut f = std::fs::File::open(src).map_err(|e| io_err("read", src, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|e| io_err("read", src, e))?;
        if n == 0 {
            return Ok(at);
        }
        let chunk = buf.get(..n).unwrap_or_default();
        if chunk.iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(offset + at))
                .and_then(|_| dst.write_all(chunk))
                .map_err(|e| io_err("write", dst_path, e))?;
        }
        at += n as u64;
    }
}

/// Reads until `buf` is full or the end of the file.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..) {
        if rest.is_empty() {
            break;
        }
        match f.read(rest)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn layout_is_aligned_and_in_order() {
        let l = layout(128 << 20, 256 << 20, 1 << 30, |n| format!("guid-{n}"));
        let names: Vec<&str> = l.partitions.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, [ESP_NAME, SLOT_A_NAME, SLOT_B_NAME, VAR_NAME]);
        assert_eq!(l.partitions[0].offset, ALIGN);
        for w in l.partitions.windows(2) {
            assert_eq!(w[0].offset + w[0].size, w[1].offset);
        }
        assert!(l.partitions.iter().all(|p| p.offset % ALIGN == 0));
        assert_eq!(l.partitions[1].size, l.partitions[2].size);
        assert_eq!(
            l.size,
            ALIGN + (128 << 20) + 2 * (256 << 20) + (1 << 30) + ALIGN
        );
        assert_eq!(l.guid, "guid-disk");
        let script = sfdisk_script(&l);
        assert!(
            script.contains("label: gpt\nlabel-id: guid-disk\n"),
            "{script}"
        );
        assert!(
            script.contains(&format!(
                "2 : start=264192, size=524288, type={TYPE_ROOT_X86_64}, uuid=guid-flotilla-root-a, name=\"flotilla-root-a\"\n"
            )),
            "{script}"
        );
    }

    #[test]
    fn slot_a_entry() {
        let e = entry_conf("0.1.0");
        assert_eq!(
            e,
            "title Flotilla 0.1.0 (slot a)\nsort-key flotilla\nversion 0.1.0\n\
             linux /flotilla/a/vmlinuz\ninitrd /flotilla/a/initramfs.img\n\
             options console=ttyS0 quiet panic=10 flotilla.slot=a \
             flotilla.root=flotilla-root-a flotilla.var=flotilla-var\n"
        );
        assert!(loader_conf().contains("timeout 0\n"));
    }
}
