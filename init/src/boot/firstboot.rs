//! Provisioning at boot: find the config (the record in `/var` on every boot after the
//! first; on the first, QEMU's fw_cfg, the kernel command line, or the image's default),
//! validate it whole, record it durably, and render `/etc` from it.

use std::fs;
use std::path::Path;

use base64::Engine as _;

use super::cmdline::Cmdline;
use super::machine::write_durably;
use super::sysroot::sysroot;
use super::{io, BootError};
use crate::provision::{self, Config};

/// The record of the applied config, below the root.
pub const RECORD: &str = "var/lib/flotilla/provision.toml";
/// The image's default config, below the root.
pub const IMAGE_DEFAULT: &str = "usr/lib/flotilla/provision.toml";
/// QEMU's `-fw_cfg name=opt/org.flotilla/config,file=...`, through the qemu_fw_cfg module.
pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.flotilla/config/raw";

/// Where a config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Applied on an earlier boot.
    Record,
    /// QEMU's fw_cfg.
    FwCfg,
    /// `flotilla.config=` on the kernel command line.
    Cmdline,
    /// The image's default.
    Image,
    /// None anywhere: an empty config.
    Empty,
}

/// The config in force, its text and where it came from. A broken config is an error that
/// names the source, line and column; nothing has been written then.
pub fn load(cmdline: &Cmdline) -> Result<(Config, String, Source), BootError> {
    let (text, label, source) = find(cmdline)?;
    let config = provision::parse(&label, &text).map_err(|e| BootError::Provision(Box::new(e)))?;
    Ok((config, text, source))
}

fn find(cmdline: &Cmdline) -> Result<(String, String, Source), BootError> {
    let read = |p: &Path| fs::read_to_string(p).ok();
    let record = sysroot(RECORD);
    if let Some(text) = read(&record) {
        return Ok((text, record.display().to_string(), Source::Record));
    }
    if let Ok(bytes) = fs::read(FW_CFG) {
        let text = String::from_utf8(bytes).map_err(|_| {
            BootError::Other(format!("{FW_CFG}: the provisioning config is not UTF-8"))
        })?;
        return Ok((text, "fw_cfg:opt/org.flotilla/config".into(), Source::FwCfg));
    }
    if let Some(b64) = cmdline.get("config") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| {
                BootError::Other(format!(
                    "flotilla.config= on the kernel command line is not base64: {e}"
                ))
            })?;
        let text = String::from_utf8(bytes).map_err(|_| {
            BootError::Other("flotilla.config= does not decode to UTF-8 text".into())
        })?;
        return Ok((text, "cmdline:flotilla.config".into(), Source::Cmdline));
    }
    let image = sysroot(IMAGE_DEFAULT);
    if let Some(text) = read(&image) {
        return Ok((text, image.display().to_string(), Source::Image));
    }
    Ok((String::new(), "(none)".into(), Source::Empty))
}

/// First boot: records the config's text durably in `/var`, so every later boot applies the
/// same (Ignition's "once").
pub fn record(text: &str) -> Result<(), BootError> {
    let path = sysroot(RECORD);
    write_durably(&path, text.as_bytes()).map_err(io("record the provisioning config in", &path))
}

/// Writes `path` with `mode` (also when it exists: the mode is set again).
fn write_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data)
}

/// Writes the files the config renders into `etc` (the tmpfs `/etc`).
pub fn render(config: &Config, machine_id: &str, etc: &Path) -> Result<usize, BootError> {
    let files = provision::render(config, machine_id);
    for f in &files {
        let path = etc.join(&f.path);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        write_mode(&path, f.contents.as_bytes(), f.mode).map_err(io("write", &path))?;
    }
    Ok(files.len())
}
