//! The machine's identity: its id, created once and kept in `/var`, and its hostname.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

/// Where the machine id is kept, below the root (`/var/lib/flotilla/machine-id`).
pub const MACHINE_ID: &str = "var/lib/flotilla/machine-id";

/// Whether `s` is a machine id: 32 lowercase hex digits (as systemd's machine-id(5)).
pub fn is_machine_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The machine id kept at `root/MACHINE_ID`, created (from the kernel's random source) and
/// written durably the first time. Returns it and whether it is new.
pub fn machine_id(root: &Path) -> io::Result<(String, bool)> {
    let path = root.join(MACHINE_ID);
    if let Ok(text) = fs::read_to_string(&path) {
        let id = text.trim();
        if is_machine_id(id) {
            return Ok((id.to_string(), false));
        }
        log::warn!(
            "{} holds no valid machine id; making a new one",
            path.display()
        );
    }
    let bytes = random_bytes()?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_durably(&path, format!("{id}\n").as_bytes())?;
    Ok((id, true))
}

/// 16 random bytes without waiting for the kernel's random pool to be initialized (early
/// boot can wait seconds for it): a machine id must be unique, not secret, as systemd's.
fn random_bytes() -> io::Result<[u8; 16]> {
    use rustix::rand::{getrandom, GetRandomFlags};
    let mut bytes = [0u8; 16];
    // Kernels before 5.6 lack GRND_INSECURE: then read /dev/urandom.
    if let Ok(16) = getrandom(&mut bytes, GetRandomFlags::INSECURE) {
        return Ok(bytes);
    }
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Writes `data` to `path` so that a crash leaves either the old file or the new one:
/// a temporary file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Sets the kernel's hostname.
pub fn set_hostname(name: &str) -> io::Result<()> {
    nix::unistd::sethostname(name).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn machine_id_is_created_once() {
        let t = tempfile::tempdir().unwrap();
        let (a, new_a) = machine_id(t.path()).unwrap();
        let (b, new_b) = machine_id(t.path()).unwrap();
        assert!(is_machine_id(&a), "{a}");
        assert!(new_a && !new_b);
        assert_eq!(a, b);
        fs::write(t.path().join(MACHINE_ID), "garbage").unwrap();
        let (c, new_c) = machine_id(t.path()).unwrap();
        assert!(new_c && c != a && is_machine_id(&c));
    }

    #[test]
    fn machine_id_shape() {
        assert!(is_machine_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_machine_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_machine_id("0123"));
    }
}
