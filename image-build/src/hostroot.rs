//! The tree of the host's read-only root image, staged in a directory for `mkfs.erofs`.
//!
//! Layout (the init depends on it):
//! - `/usr/bin/<binary>`: the static Flotilla binaries (`flotilla-init`, `unitctl`);
//! - `/bin/busybox` and a symlink to it for every applet it lists;
//! - `/usr/lib/os-release`;
//! - `/usr/share/factory/etc/`: the factory `/etc` the init copies into a tmpfs `/etc` at
//!   every boot: `passwd`, `group`, `hosts`, `os-release` (a link to `/usr/lib/os-release`),
//!   `flotilla/units/*.toml` (the baked-in units);
//! - `/usr/lib/flotilla/provision.toml`: the default provisioning config, if any;
//! - `/usr/share/ca-certificates/ca-certificates.crt`: the CA bundle, if any, and the
//!   factory `/etc/ssl/certs/ca-certificates.crt` a link to it;
//! - `/usr/share/flotilla/images/`: the system image store (read-only at run time), if the
//!   spec bakes images in;
//! - empty mount points `/proc /sys /dev /run /var /etc /root /mnt /sysroot`, `/tmp` (1777),
//!   and the bind-mount paths of the baked image-less units (e.g. `/run/flotilla`).
//!
//! Every directory is 0755 (`/tmp` 1777), every file has the mode it is given here; owners
//! and timestamps are set by `mkfs.erofs` (`--all-root`, `-T`). The system store's own
//! directories and files get 0755 and 0644; its extracted layers keep their modes and owners.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flotilla_container::image::{STORE_MODE, SYSTEM_STORE};

use crate::error::io_err;
use crate::rootfs::{busybox_links, make_link};
use crate::BuildError;

/// Empty directories of the root image and their modes.
pub const ROOT_DIRS: &[(&str, u32)] = &[
    ("proc", 0o755),
    ("sys", 0o755),
    ("dev", 0o755),
    ("run", 0o755),
    ("var", 0o755),
    ("etc", 0o755),
    ("root", 0o755),
    ("mnt", 0o755),
    ("sysroot", 0o755),
    ("tmp", 0o1777),
];

/// Where the static binaries go.
pub const BIN_DIR: &str = "/usr/bin";
/// The factory `/etc`.
pub const FACTORY_ETC: &str = "/usr/share/factory/etc";
/// The baked-in units (in the factory `/etc`).
pub const FACTORY_UNITS: &str = "/usr/share/factory/etc/flotilla/units";
/// The os-release file.
pub const OS_RELEASE: &str = "/usr/lib/os-release";
/// The default provisioning config.
pub const PROVISION: &str = "/usr/lib/flotilla/provision.toml";
/// Where `[root] ca_bundle` goes: on the read-only root, not copied into the tmpfs `/etc`
/// at each boot (the factory `/etc` links to it, [`FACTORY_CA_BUNDLE`]).
pub const CA_BUNDLE: &str = "/usr/share/ca-certificates/ca-certificates.crt";
/// The factory `/etc`'s link to [`CA_BUNDLE`]: `/etc/ssl/certs/ca-certificates.crt` at run
/// time, the first place rustls-native-certs (openssl-probe) and OpenSSL look on Linux.
pub const FACTORY_CA_BUNDLE: &str = "/usr/share/factory/etc/ssl/certs/ca-certificates.crt";
/// Debian's CA bundle (package `ca-certificates`), the usual `[root] ca_bundle`.
pub const DEBIAN_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The Debian package that makes [`DEBIAN_CA_BUNDLE`].
pub const CA_PACKAGE: &str = "ca-certificates";
/// The host's busybox copied into the image (Debian `busybox-static`).
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// The factory `/etc/passwd`.
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
     nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// The factory `/etc/group`.
pub const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
/// The factory `/etc/hosts`.
pub const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost\n";

/// `/usr/lib/os-release` of this version of Flotilla.
pub fn os_release() -> String {
    os_release_of(env!("CARGO_PKG_VERSION"))
}

/// `/usr/lib/os-release` of Flotilla version `v` (`image-build os --os-version`).
pub fn os_release_of(v: &str) -> String {
    format!("NAME=\"Flotilla\"\nID=flotilla\nVERSION_ID={v}\nPRETTY_NAME=\"Flotilla {v}\"\n")
}

/// A file copied into the root image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootFile {
    /// Host file.
    pub source: PathBuf,
    /// Absolute path in the image.
    pub dest: String,
    /// Permission bits.
    pub mode: u32,
}

/// Everything that goes into the root image, resolved to host files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootContent {
    /// `(name, host file)`: installed as `/usr/bin/<name>`, 0755.
    pub binaries: Vec<(String, PathBuf)>,
    /// A static busybox: `/bin/busybox` plus its applet links.
    pub busybox: Option<PathBuf>,
    /// Unit files: installed under [`FACTORY_UNITS`] with their file names, 0644.
    pub units: Vec<PathBuf>,
    /// Empty directories (0755) for the bind mounts of image-less units, which run over this
    /// read-only root and cannot create their mount points in it (absolute paths).
    pub mount_points: Vec<String>,
    /// The provisioning config: installed as [`PROVISION`], 0644.
    pub provision: Option<PathBuf>,
    /// A PEM CA bundle: installed as [`CA_BUNDLE`], 0644, with [`FACTORY_CA_BUNDLE`] an
    /// absolute link to it.
    pub ca_bundle: Option<PathBuf>,
    /// More files (`[[root.files]]`), installed last (they may replace generated ones).
    pub files: Vec<RootFile>,
    /// An image store (a directory on the same filesystem as the tree), moved into place as
    /// [`SYSTEM_STORE`].
    pub system_store: Option<PathBuf>,
    /// `VERSION_ID` of os-release; `None`: the crate version.
    pub os_version: Option<String>,
    /// `(file name, PEM)`: public keys trusted for updates, installed under
    /// `flotilla_osupdate::payload::TRUSTED_KEYS_DIR`, 0644.
    pub update_keys: Vec<(String, String)>,
}

/// What [`stage_root`] put into the tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageSummary {
    /// Entries in the tree (directories, files, symlinks; the root included).
    pub entries: usize,
    /// Busybox applet links created.
    pub busybox_links: usize,
    /// Entries of the system store (included in `entries`).
    pub store_entries: usize,
}

/// Whether `path` is a static ELF64 executable (no `PT_INTERP` program header; a static-pie
/// has none either). Not an ELF64 file is an error.
pub fn is_static_elf(path: &Path) -> Result<bool, BuildError> {
    let mut elf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(1 << 16).read_to_end(&mut elf))
        .map_err(|e| io_err("read", path, e))?;
    let bad = || BuildError::Usage(format!("{} is not an ELF64 executable", path.display()));
    if elf.get(0..5) != Some(b"\x7fELF\x02".as_slice()) {
        return Err(bad());
    }
    let num = |o: usize, n: usize| -> Option<usize> {
        let b = elf.get(o..o.checked_add(n)?)?;
        Some(
            b.iter()
                .rev()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x)),
        )
    };
    let phoff = num(0x20, 8).ok_or_else(bad)?;
    let phentsize = num(0x36, 2).ok_or_else(bad)?;
    let phnum = num(0x38, 2).ok_or_else(bad)?;
    for i in 0..phnum {
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(bad)?;
        if num(at, 4).ok_or_else(bad)? == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks that `bundle` is a PEM CA bundle (holds a `-----BEGIN CERTIFICATE-----` line);
/// the error says what is wrong with which file.
pub fn check_ca_bundle(bundle: &Path) -> Result<(), String> {
    let text = std::fs::read(bundle)
        .map_err(|e| format!("[root] ca_bundle {}: cannot read it: {e}", bundle.display()))?;
    if String::from_utf8_lossy(&text).contains("-----BEGIN CERTIFICATE-----") {
        return Ok(());
    }
    Err(format!(
        "[root] ca_bundle {} holds no PEM certificate (no -----BEGIN CERTIFICATE----- line): \
         give a PEM CA bundle such as Debian's {DEBIAN_CA_BUNDLE}",
        bundle.display()
    ))
}

/// Builds the root tree in the empty directory `root`.
pub fn stage_root(content: &RootContent, root: &Path) -> Result<StageSummary, BuildError> {
    for (dir, _) in ROOT_DIRS {
        mkdir(root, dir)?;
    }
    for dir in &content.mount_points {
        mkdir(root, dir)?;
    }
    for (name, source) in &content.binaries {
        put_file(root, &format!("{BIN_DIR}/{name}"), source, 0o755)?;
    }
    let os_release = match &content.os_version {
        Some(v) => os_release_of(v),
        None => os_release(),
    };
    put_bytes(root, OS_RELEASE, os_release.as_bytes(), 0o644)?;
    for (name, pem) in &content.update_keys {
        put_bytes(
            root,
            &format!("{}/{name}", flotilla_osupdate::payload::TRUSTED_KEYS_DIR),
            pem.as_bytes(),
            0o644,
        )?;
    }
    put_bytes(
        root,
        &format!("{FACTORY_ETC}/passwd"),
        PASSWD.as_bytes(),
        0o644,
    )?;
    put_bytes(
        root,
        &format!("{FACTORY_ETC}/group"),
        GROUP.as_bytes(),
        0o644,
    )?;
    put_bytes(
        root,
        &format!("{FACTORY_ETC}/hosts"),
        HOSTS.as_bytes(),
        0o644,
    )?;
    // Absolute: still right once the init has copied it to /etc.
    make_link(root, &format!("{FACTORY_ETC}/os-release"), OS_RELEASE, true)?;
    mkdir(root, FACTORY_UNITS)?;
    for unit in &content.units {
        let name = unit
            .file_name()
            .ok_or_else(|| BuildError::Usage(format!("unit {}: no file name", unit.display())))?;
        let dest = format!("{FACTORY_UNITS}/{}", name.to_string_lossy());
        put_file(root, &dest, unit, 0o644)?;
    }
    if let Some(p) = &content.provision {
        put_file(root, PROVISION, p, 0o644)?;
    }
    if let Some(bundle) = &content.ca_bundle {
        put_file(root, CA_BUNDLE, bundle, 0o644)?;
        // Absolute: right once the init has copied the link into /etc.
        make_link(root, FACTORY_CA_BUNDLE, CA_BUNDLE, true)?;
    }
    if let Some(bb) = &content.busybox {
        put_file(root, HOST_BUSYBOX, bb, 0o755)?;
    }
    for f in &content.files {
        put_file(root, &f.dest, &f.source, f.mode)?;
    }
    // Last, so that nothing above is replaced by a link.
    let links = if content.busybox.is_some() {
        busybox_links(root)?
    } else {
        0
    };
    let store_entries = match &content.system_store {
        Some(store) => {
            let dest = host_path(root, SYSTEM_STORE);
            parent_dirs(&dest)?;
            std::fs::rename(store, &dest)
                .map_err(|e| io_err("move the image store to", &dest, e))?;
            normalize_store(&dest)?
        }
        None => 0,
    };
    let entries = normalize_dirs(root, Path::new(""))?;
    Ok(StageSummary {
        entries,
        busybox_links: links,
        store_entries,
    })
}

fn host_path(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn mkdir(root: &Path, path: &str) -> Result<(), BuildError> {
    let p = host_path(root, path);
    std::fs::create_dir_all(&p).map_err(|e| io_err("create", &p, e))
}

fn parent_dirs(dest: &Path) -> Result<(), BuildError> {
    match dest.parent() {
        Some(parent) => std::fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e)),
        None => Ok(()),
    }
}

fn chmod(path: &Path, mode: u32) -> Result<(), BuildError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err("chmod", path, e))
}

fn put_file(root: &Path, path: &str, source: &Path, mode: u32) -> Result<(), BuildError> {
    let dest = host_path(root, path);
    parent_dirs(&dest)?;
    if dest.symlink_metadata().is_ok() {
        std::fs::remove_file(&dest).map_err(|e| io_err("replace", &dest, e))?;
    }
    std::fs::copy(source, &dest).map_err(|e| io_err("copy", source, e))?;
    chmod(&dest, mode)
}

fn put_bytes(root: &Path, path: &str, data: &[u8], mode: u32) -> Result<(), BuildError> {
    let dest = host_path(root, path);
    parent_dirs(&dest)?;
    std::fs::write(&dest, data).map_err(|e| io_err("write", &dest, e))?;
    chmod(&dest, mode)
}

/// Sets every directory under `root` to 0755 (`/tmp`: its [`ROOT_DIRS`] mode), whatever
/// the umask made of it, leaving the system store alone (see [`normalize_store`]); returns
/// the number of entries.
fn normalize_dirs(root: &Path, rel: &Path) -> Result<usize, BuildError> {
    let dir = root.join(rel);
    if Path::new("/").join(rel) == Path::new(SYSTEM_STORE) {
        return count_entries(&dir);
    }
    let special = ROOT_DIRS
        .iter()
        .find(|(d, _)| Path::new(d) == rel)
        .map(|(_, m)| *m);
    chmod(&dir, special.unwrap_or(0o755))?;
    let mut n = 1;
    for entry in std::fs::read_dir(&dir).map_err(|e| io_err("list", &dir, e))? {
        let entry = entry.map_err(|e| io_err("list", &dir, e))?;
        let ft = entry
            .file_type()
            .map_err(|e| io_err("stat", &entry.path(), e))?;
        if ft.is_dir() {
            n += normalize_dirs(root, &rel.join(entry.file_name()))?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

/// Sets an image store's root to 0700 ([`STORE_MODE`]), its other directories to 0755 and
/// its files (blobs, `images.json`, `lock`) to 0644, whatever the umask made of them; the extracted layers (`layers/*/`) keep
/// the modes of their archives. Returns the number of entries, the store included.
fn normalize_store(store: &Path) -> Result<usize, BuildError> {
    let layers = store.join("layers");
    let mut n = 1;
    let mut dirs = vec![store.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        // The root private to root, as a writable store is (`STORE_MODE`): the layers keep
        // set-id files that no other local user must reach.
        chmod(&dir, if dir == store { STORE_MODE } else { 0o755 })?;
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err("list", &dir, e))? {
            let path = entry.map_err(|e| io_err("list", &dir, e))?.path();
            let meta = path
                .symlink_metadata()
                .map_err(|e| io_err("stat", &path, e))?;
            if dir == layers {
                n += count_entries(&path)?;
            } else if meta.is_dir() {
                dirs.push(path);
            } else {
                n += 1;
                chmod(&path, 0o644)?;
            }
        }
        n += usize::from(dir != store);
    }
    Ok(n)
}

/// The number of entries of the tree at `path` (1 for anything but a directory).
fn count_entries(path: &Path) -> Result<usize, BuildError> {
    let meta = path
        .symlink_metadata()
        .map_err(|e| io_err("stat", path, e))?;
    if !meta.is_dir() {
        return Ok(1);
    }
    let mut n = 1;
    for entry in std::fs::read_dir(path).map_err(|e| io_err("list", path, e))? {
        n += count_entries(&entry.map_err(|e| io_err("list", path, e))?.path())?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn os_release_names_flotilla() {
        let text = os_release();
        assert!(text.contains("ID=flotilla\n"), "{text}");
        assert!(text.contains(&format!("VERSION_ID={}\n", env!("CARGO_PKG_VERSION"))));
    }

    #[test]
    fn static_elf_check() {
        let t = tempfile::tempdir().unwrap();
        let junk = t.path().join("junk");
        std::fs::write(&junk, b"#!/bin/sh\n").unwrap();
        assert!(is_static_elf(&junk).is_err());
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
    }

    #[test]
    fn stages_the_layout_without_busybox() {
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("tool");
        std::fs::write(&bin, b"x").unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let content = RootContent {
            binaries: vec![("tool".into(), bin.clone())],
            files: vec![RootFile {
                source: bin,
                dest: "/usr/share/x/y".into(),
                mode: 0o600,
            }],
            ..RootContent::default()
        };
        let s = stage_root(&content, &root).unwrap();
        assert_eq!(s.busybox_links, 0);
        let mode = |p: &str| {
            std::fs::symlink_metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("usr/bin/tool"), 0o755);
        assert_eq!(mode("usr/share/x/y"), 0o600);
        assert_eq!(mode("usr/share/x"), 0o755);
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("sysroot"), 0o755);
        assert_eq!(
            std::fs::read_link(root.join("usr/share/factory/etc/os-release")).unwrap(),
            Path::new(OS_RELEASE)
        );
        assert!(root.join("usr/share/factory/etc/flotilla/units").is_dir());
    }
}
