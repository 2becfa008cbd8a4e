//! Leases: the layers running containers have mounted, so garbage collection spares them.
//!
//! A container's overlay reads its image's layer directories for as long as it runs, even
//! once no tag refers to the image any more. Before it mounts them, the launcher writes a
//! lease `leases/<holder>.<pid>.json` in the writable store: the layer names (diff_id hex) and
//! the process that holds them, as its pid and start time (`/proc/PID/stat` field 22, so a
//! recycled pid is not taken for the holder). The launcher leases under its own pid, and
//! once the container runs hands the lease over to the container's pid 1
//! ([`Lease::hand_over`]): its exit ends the whole container. Garbage collection keeps
//! every layer a live lease names; a lease whose process is gone (or is another process
//! now) is stale: it is deleted and ignored. Nothing needs to remove a handed-over lease
//! when the container stops, so a crashed manager or a reboot leaves nothing that pins
//! layers forever. Pids are those of the host's pid namespace (the manager's and
//! `unitctl`'s).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layout::MAX_JSON;
use super::source::open_regular;
use super::{ImageError, ImageStore};

/// The directory of the leases, below the store root.
pub(crate) const LEASES: &str = "leases";

/// What a lease file says.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseFile {
    /// The holder's pid.
    pid: i32,
    /// The holder's start time, in clock ticks since boot.
    start: u64,
    /// The layer directory names (diff_id hex) it uses.
    layers: Vec<String>,
}

/// A lease on the layers of a container that is about to run (see the module docs).
/// Dropped, it is removed; [`Lease::hand_over`] leaves it to the container's pid 1.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    layers: Vec<String>,
    /// False once handed over: the file then outlives this value.
    remove_on_drop: bool,
}

/// The start time of `pid` (`/proc/PID/stat` field 22), if the process exists.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state): field 22 is the 20th from here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Holder names are file names: letters, digits, `.`, `_`, `-`, `@`, `:`, not starting with `.`.
fn check_holder(holder: &str) -> Result<(), ImageError> {
    let ok = !holder.is_empty()
        && !holder.starts_with('.')
        && holder.len() <= 200
        && holder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadReference {
            reference: holder.to_string(),
            reason: "a layer lease is named after its container: letters, digits, '.', '_', '-', '@', ':', not starting with '.'".into(),
        })
    }
}

/// Writes `lease` to `path` whole: a temporary file, then a rename over the old one.
fn write_lease(path: &Path, lease: &LeaseFile) -> Result<(), ImageError> {
    let bytes = serde_json::to_vec(lease).map_err(|e| ImageError::Json {
        what: "layer lease".into(),
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("lease");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| ImageError::io("create", &tmp, e))?;
    f.write_all(&bytes)
        .map_err(|e| ImageError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| ImageError::io("write the layer lease", path, e))
}

impl ImageStore {
    /// Leases `layers` (extracted layer directories, as [`super::ResolvedImage::layers`])
    /// for the container `holder`, held by this process until [`Lease::hand_over`]; replaces
    /// an older lease of the same holder by this process. Fails if a layer is gone by then
    /// (removed by a garbage collection that ran before the lease was written): start again.
    pub fn lease(&self, holder: &str, layers: &[PathBuf]) -> Result<Lease, ImageError> {
        check_holder(holder)?;
        let dir = self.root().join(LEASES);
        fs::create_dir_all(&dir).map_err(|e| ImageError::io("create", &dir, e))?;
        let pid = std::process::id() as i32;
        let names: Vec<String> = layers
            .iter()
            .filter_map(|l| l.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect();
        let lease = Lease {
            // The leasing process's pid in the name: managers sharing a store, or a unit
            // named like a toolbox run, never replace each other's leases.
            path: dir.join(format!("{holder}.{pid}.json")),
            layers: names,
            remove_on_drop: true,
        };
        write_lease(
            &lease.path,
            &LeaseFile {
                pid,
                start: start_time(pid).unwrap_or(0),
                layers: lease.layers.clone(),
            },
        )?;
        // A collection that read the leases before this one was written may have removed a
        // layer: the lease (dropped on return) must not pretend to protect it.
        if let Some(gone) = layers.iter().find(|l| !l.is_dir()) {
            return Err(ImageError::Damaged(format!(
                "layer {} was removed (the image was removed while the container started); start it again",
                gone.display()
            )));
        }
        Ok(lease)
    }
}

impl Lease {
    /// The lease file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the lease over to `pid` (the container's pid 1, in this pid namespace): it
    /// stays valid while that process lives and is left in place after this call.
    pub fn hand_over(mut self, pid: i32) -> Result<(), ImageError> {
        let Some(start) = start_time(pid) else {
            // Already gone: nothing runs on the layers any more.
            return Ok(());
        };
        write_lease(
            &self.path,
            &LeaseFile {
                pid,
                start,
                layers: std::mem::take(&mut self.layers),
            },
        )?;
        self.remove_on_drop = false;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.remove_on_drop {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove the layer lease {}: {e}", self.path.display());
                }
            }
        }
    }
}

/// A lease file (a regular file only: nothing in the store may block a collection) and its
/// inode.
fn read_lease(path: &Path) -> Result<(u64, LeaseFile), String> {
    let file = open_regular(path, "layer lease").map_err(|e| e.to_string())?;
    let ino = file.metadata().map_err(|e| e.to_string())?.ino();
    let mut bytes = Vec::new();
    file.take(MAX_JSON)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let lease = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok((ino, lease))
}

/// The layers the live leases of the store at `root` name; stale leases are deleted.
/// `None` when a lease cannot be read: the caller then keeps every layer.
pub(crate) fn leased_layers(root: &Path) -> Option<BTreeSet<String>> {
    let dir = root.join(LEASES);
    let mut out = BTreeSet::new();
    let entries = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(out),
        Err(e) => {
            log::warn!(
                "image store: cannot list the layer leases {}: {e}; no layer is removed",
                dir.display()
            );
            return None;
        }
    };
    for entry in entries {
        let path = match entry {
            Ok(e) => e.path(),
            Err(e) => {
                log::warn!(
                    "image store: cannot list the layer leases {}: {e}; no layer is removed",
                    dir.display()
                );
                return None;
            }
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(".");
        if name.starts_with('.') {
            continue; // a lease being written
        }
        let (ino, lease) = match read_lease(&path) {
            Ok(l) => l,
            Err(e) if fs::symlink_metadata(&path).is_err() => {
                log::debug!("lease {} went away: {e}", path.display());
                continue;
            }
            Err(e) => {
                log::warn!(
                    "image store: cannot read the layer lease {}: {e}; no layer is removed (delete the file if no container runs from this store)",
                    path.display()
                );
                return None;
            }
        };
        if lease.pid > 0 && start_time(lease.pid) == Some(lease.start) {
            out.extend(lease.layers);
            continue;
        }
        // Stale. Unless a launcher just replaced it (a rename: another inode) with a live one.
        if fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
            if let Err(e) = fs::remove_file(&path) {
                log::warn!(
                    "cannot remove the stale layer lease {}: {e}",
                    path.display()
                );
            }
        }
    }
    Some(out)
}
