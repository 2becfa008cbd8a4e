//! Resolving a user spec (`name`, `name:group`, `uid`, `uid:gid`) against the image's
//! `/etc/passwd` and `/etc/group`.

use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::{ContainerError, User};

/// Resolve `spec` ("name", "name:group", "uid", "uid:gid") with the image's `/etc`
/// (`rootfs_etc`: the image's `etc` directory on the host).
///
/// A numeric uid without a passwd entry gets gid 0 (like Docker); a name gets its primary
/// group from passwd and its supplementary groups from `group`. The files are opened beneath
/// `rootfs_etc` only: a symlink in the image cannot point them at the host's files.
pub fn lookup_user(rootfs_etc: &Path, spec: &str) -> Result<User, ContainerError> {
    let err = |message: String| ContainerError::User {
        spec: spec.to_owned(),
        message,
    };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(err("expected name, name:group, uid or uid:gid".to_owned()));
    }
    let passwd = read_etc(rootfs_etc, "passwd").map_err(|e| err(e.clone()))?;
    let groups = read_etc(rootfs_etc, "group").map_err(|e| err(e.clone()))?;
    let passwd_entries = entries(passwd.as_deref().unwrap_or(""));
    let group_entries = entries(groups.as_deref().unwrap_or(""));

    // (name, uid, gid) from passwd.
    let by_user = passwd_entries.iter().find_map(|f| {
        let name = *f.first()?;
        let uid: u32 = f.get(2)?.parse().ok()?;
        let gid: u32 = f.get(3)?.parse().ok()?;
        let matches = match user_part.parse::<u32>() {
            Ok(n) => uid == n,
            Err(_) => name == user_part,
        };
        matches.then(|| (name.to_owned(), uid, gid))
    });
    let (name, uid, primary) = match (by_user, user_part.parse::<u32>()) {
        (Some(found), _) => (Some(found.0), found.1, found.2),
        (None, Ok(uid)) => (None, uid, 0),
        (None, Err(_)) => {
            return Err(err(format!(
                "no such user in {}",
                rootfs_etc.join("passwd").display()
            )))
        }
    };
    let gid = match group_part {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_entries
                .iter()
                .find(|f| f.first() == Some(&g))
                .and_then(|f| f.get(2)?.parse().ok())
                .ok_or_else(|| {
                    err(format!(
                        "no such group {g:?} in {}",
                        rootfs_etc.join("group").display()
                    ))
                })?,
        },
    };
    let mut additional_gids = Vec::new();
    if let (Some(name), None) = (&name, group_part) {
        for f in &group_entries {
            let member = f
                .get(3)
                .is_some_and(|m| m.split(',').any(|m| m.trim() == name));
            if let (true, Some(g)) = (member, f.get(2).and_then(|g| g.parse::<u32>().ok())) {
                if g != gid && !additional_gids.contains(&g) {
                    additional_gids.push(g);
                }
            }
        }
    }
    Ok(User {
        uid,
        gid,
        additional_gids,
    })
}

fn entries(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
        .collect()
}

/// The file's text, `None` when it does not exist.
fn read_etc(etc: &Path, name: &str) -> Result<Option<String>, String> {
    let dir = match rustix::fs::open(
        etc,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(d) => d,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(format!("open {}: {e}", etc.display())),
    };
    let fd = match rustix::fs::openat2(
        &dir,
        name,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(format!("open {}: {e}", etc.join(name).display())),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text)
        .map_err(|e| format!("read {}: {e}", etc.join(name).display()))?;
    Ok(Some(text))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn etc() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("group"),
            "root:x:0:\nalice:x:1000:\nwheel:x:10:alice,bob\naudio:x:29:alice\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn forms() {
        let d = etc();
        let p = d.path();
        assert_eq!(
            lookup_user(p, "alice").unwrap(),
            User {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10, 29]
            }
        );
        assert_eq!(
            lookup_user(p, "alice:wheel").unwrap(),
            User {
                uid: 1000,
                gid: 10,
                additional_gids: vec![]
            }
        );
        assert_eq!(lookup_user(p, "1000").unwrap().gid, 1000);
        assert_eq!(
            lookup_user(p, "4242").unwrap(),
            User {
                uid: 4242,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            lookup_user(p, "4242:7").unwrap(),
            User {
                uid: 4242,
                gid: 7,
                additional_gids: vec![]
            }
        );
        assert_eq!(lookup_user(p, "root").unwrap(), User::default());
        assert!(lookup_user(p, "nobody").is_err());
        assert!(lookup_user(p, "alice:nogroup").is_err());
        assert!(lookup_user(p, ":").is_err());
    }

    #[test]
    fn symlink_out_of_etc_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("passwd")).unwrap();
        assert!(lookup_user(d.path(), "root").is_err());
        // Numeric ids without files still resolve.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(lookup_user(empty.path(), "5:6").unwrap().gid, 6);
    }
}
