//! The host kernel: a Debian kernel package fetched without installing it (`apt-get
//! download` + `dpkg-deb -x` into the cache), and the dependency closure of its modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::ProgressBar;

use crate::error::io_err;
use crate::process::run;
use crate::BuildError;

/// Default kernel package (a metapackage that depends on the current cloud kernel).
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// An unpacked kernel in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Kernel release, e.g. `6.1.0-48-cloud-amd64` (the `lib/modules` directory name).
    pub version: String,
    /// The concrete package it came from, e.g. `linux-image-6.1.0-48-cloud-amd64`.
    pub package: String,
    /// The compressed kernel image.
    pub vmlinuz: PathBuf,
    /// `.../lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

/// Resolves a metapackage (`linux-image-cloud-amd64`) to the concrete kernel package
/// (`linux-image-<release>`) through `apt-cache depends`. A concrete package is returned as is.
pub fn resolve_package(package: &str, pb: &ProgressBar, log: &Path) -> Result<String, BuildError> {
    if release_of(package).is_some() {
        return Ok(package.to_string());
    }
    let query = || {
        Command::new("apt-cache")
            .args(["depends", "--important", package])
            .output()
    };
    let mut out =
        query().map_err(|e| io_err("run apt-cache depends for", Path::new(package), e))?;
    if !out.status.success() || concrete_dependency(&String::from_utf8_lossy(&out.stdout)).is_none()
    {
        pb.println(format!(
            "      apt-cache does not know {package}: running apt-get update once"
        ));
        run(Command::new("apt-get").arg("update"), pb, log)?;
        out = query().map_err(|e| io_err("run apt-cache depends for", Path::new(package), e))?;
    }
    concrete_dependency(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
        BuildError::Usage(format!(
            "{package}: not a kernel package (no linux-image-<release> in its dependencies)"
        ))
    })
}

/// The first `Depends: linux-image-<release>` of `apt-cache depends` output.
fn concrete_dependency(apt_cache: &str) -> Option<String> {
    apt_cache.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        release_of(dep).map(|_| dep.to_string())
    })
}

/// `linux-image-6.1.0-48-cloud-amd64` → `6.1.0-48-cloud-amd64`; `None` for a metapackage.
pub fn release_of(package: &str) -> Option<&str> {
    let rest = package.strip_prefix("linux-image-")?;
    rest.starts_with(|c: char| c.is_ascii_digit())
        .then_some(rest)
}

/// Fetches and unpacks a kernel package into `CACHE/kernel/<release>/` (skipped when it is
/// already there). The `.deb` is kept in `CACHE/kernel/debs/`. Nothing is installed on
/// the host. Returns the kernel and whether it came from the cache.
pub fn fetch_kernel(
    cache: &Path,
    package: &str,
    pb: &ProgressBar,
) -> Result<(Kernel, bool), BuildError> {
    let kdir = cache.join("kernel");
    let debs = kdir.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| io_err("create cache directory", &debs, e))?;
    // One fetch at a time per cache (tests build in parallel).
    let lock_path = kdir.join(".lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| io_err("create", &lock_path, e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err("lock", &lock_path, e.into()))?;
    let log = kdir.join("fetch.log");

    pb.set_message(format!("resolving {package}"));
    let concrete = resolve_package(package, pb, &log)?;
    let release = release_of(&concrete)
        .ok_or_else(|| BuildError::Usage(format!("{concrete}: no kernel release in the name")))?
        .to_string();
    let root = kdir.join(&release);
    let kernel = Kernel {
        version: release.clone(),
        package: concrete.clone(),
        vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
        modules_dir: root.join(format!("lib/modules/{release}")),
    };
    if root.join(".complete").is_file() {
        return Ok((kernel, true));
    }

    pb.set_message(format!("apt-get download {concrete}"));
    let dl = || {
        let mut c = Command::new("apt-get");
        c.arg("download").arg(&concrete).current_dir(&debs);
        c
    };
    if run(&mut dl(), pb, &log).is_err() {
        pb.println("      apt-get download failed: running apt-get update once and retrying");
        run(Command::new("apt-get").arg("update"), pb, &log)?;
        run(&mut dl(), pb, &log)?;
    }
    let prefix = format!("{concrete}_");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&debs)
        .map_err(|e| io_err("list", &debs, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    found.sort();
    let deb = found.pop().ok_or_else(|| {
        BuildError::Usage(format!(
            "apt-get download {concrete} left no {prefix}*.deb in {}",
            debs.display()
        ))
    })?;

    pb.set_message(format!("dpkg-deb -x {}", deb.display()));
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&kdir)
        .map_err(|e| io_err("create directory in", &kdir, e))?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tmp.path()),
        pb,
        &log,
    )?;
    let _ = std::fs::remove_dir_all(&root);
    let unpacked = tmp.keep();
    std::fs::rename(&unpacked, &root).map_err(|e| io_err("store in cache", &root, e))?;
    for p in [&kernel.vmlinuz, &kernel.modules_dir] {
        if !p.exists() {
            return Err(BuildError::Usage(format!(
                "{concrete}: the package has no {}",
                p.display()
            )));
        }
    }
    std::fs::write(root.join(".complete"), deb.display().to_string())
        .map_err(|e| io_err("write", &root, e))?;
    Ok((kernel, false))
}

/// A module name as the kernel compares them: `-` and `_` are the same.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Splits `foo.ko`, `foo.ko.xz`, ... into (module name, compressed?).
fn module_name(file: &str) -> Option<(String, bool)> {
    if let Some(stem) = file.strip_suffix(".ko") {
        return Some((normalize(stem), false));
    }
    let (stem, ext) = file.rsplit_once(".ko.")?;
    (!ext.contains('.')).then(|| (normalize(stem), true))
}

fn walk(
    dir: &Path,
    base: &Path,
    out: &mut BTreeMap<String, (PathBuf, bool)>,
) -> Result<(), BuildError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_err("list", dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| io_err("stat", &path, e))?;
        if ft.is_dir() {
            walk(&path, base, out)?;
        } else if let Some((name, compressed)) = entry.file_name().to_str().and_then(module_name) {
            let rel = path.strip_prefix(base).unwrap_or(&path).to_path_buf();
            out.entry(name).or_insert((rel, compressed));
        }
    }
    Ok(())
}

/// The `key=value` strings of an ELF64 little-endian object's `.modinfo` section.
pub fn modinfo(elf: &[u8]) -> Option<Vec<(String, String)>> {
    let u16_at = |o: usize| -> Option<usize> {
        Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?) as usize)
    };
    let u32_at = |o: usize| -> Option<usize> {
        Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?) as usize)
    };
    let u64_at = |o: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?)).ok()
    };
    if elf.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3a)?;
    let shnum = u16_at(0x3c)?;
    let shstrndx = u16_at(0x3e)?;
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(h)?, u64_at(h + 0x18)?, u64_at(h + 0x20)?))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let names = elf.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let n = names.get(name..)?;
        let n = n.split(|&b| b == 0).next()?;
        if n == b".modinfo" {
            let data = elf.get(off..off.checked_add(size)?)?;
            return Some(
                data.split(|&b| b == 0)
                    .filter_map(|s| {
                        let s = std::str::from_utf8(s).ok()?;
                        let (k, v) = s.split_once('=')?;
                        Some((k.to_string(), v.to_string()))
                    })
                    .collect(),
            );
        }
    }
    Some(Vec::new())
}

/// The `.ko` files (relative to `modules_dir`) needed to load `names`, dependencies first,
/// each once. Names compare with `-`/`_` equivalence. Dependencies come from `modules.dep`
/// when the directory has one (after `depmod`), else from each module's `.modinfo`
/// `depends=` (a kernel package as shipped has no `modules.dep`: depmod runs at install).
/// A name listed in `modules.builtin` needs nothing and adds nothing. Compressed modules
/// (`.ko.xz`, `.ko.zst`, ...) are refused: the init loads plain `.ko` files.
pub fn module_closure(modules_dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>, BuildError> {
    let mut index = BTreeMap::new();
    walk(modules_dir, modules_dir, &mut index)?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name).map(|(n, _)| n))
        .collect();
    let dep_file: Option<BTreeMap<PathBuf, Vec<PathBuf>>> =
        std::fs::read_to_string(modules_dir.join("modules.dep"))
            .ok()
            .map(|text| {
                text.lines()
                    .filter_map(|l| {
                        let (m, deps) = l.split_once(':')?;
                        Some((
                            PathBuf::from(m.trim()),
                            deps.split_whitespace().map(PathBuf::from).collect(),
                        ))
                    })
                    .collect()
            });
    let by_path: BTreeMap<PathBuf, String> = index
        .iter()
        .map(|(n, (p, _))| (p.clone(), n.clone()))
        .collect();

    let deps_of = |name: &str, rel: &Path| -> Result<Vec<String>, BuildError> {
        if let Some(dep) = &dep_file {
            return Ok(dep
                .get(rel)
                .map(|ds| ds.iter().filter_map(|d| by_path.get(d).cloned()).collect())
                .unwrap_or_default());
        }
        let path = modules_dir.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| io_err("read module", &path, e))?;
        let info = modinfo(&bytes).ok_or_else(|| {
            BuildError::Usage(format!(
                "module {name}: {} is not an ELF64 object",
                path.display()
            ))
        })?;
        Ok(info
            .iter()
            .filter(|(k, _)| k == "depends")
            .flat_map(|(_, v)| {
                v.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalize)
            })
            .collect())
    };

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    // Iterative post-order DFS: (name, children expanded?).
    for requested in names {
        let mut stack = vec![(normalize(requested), false, (*requested).to_string())];
        while let Some((name, expanded, wanted_by)) = stack.pop() {
            if done.contains(&name) {
                continue;
            }
            let Some((rel, compressed)) = index.get(&name) else {
                if builtin.contains(&name) {
                    done.insert(name);
                    continue;
                }
                return Err(BuildError::Usage(format!(
                    "module {name} (needed for {wanted_by}) is neither a module nor built into the kernel in {}",
                    modules_dir.display()
                )));
            };
            if *compressed {
                return Err(BuildError::Usage(format!(
                    "module {name} is compressed ({}): only uncompressed .ko files are supported",
                    rel.display()
                )));
            }
            if expanded {
                done.insert(name);
                order.push(rel.clone());
                continue;
            }
            if stack.iter().any(|(n, e, _)| *e && *n == name) {
                return Err(BuildError::Usage(format!(
                    "module {name}: dependency cycle"
                )));
            }
            let deps = deps_of(&name, rel)?;
            stack.push((name.clone(), true, wanted_by));
            for d in deps.into_iter().rev() {
                if !done.contains(&d) {
                    stack.push((d, false, name.clone()));
                }
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn release_and_metapackage() {
        assert_eq!(
            release_of("linux-image-6.1.0-48-cloud-amd64"),
            Some("6.1.0-48-cloud-amd64")
        );
        assert_eq!(release_of("linux-image-cloud-amd64"), None);
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-48-cloud-amd64\n";
        assert_eq!(
            concrete_dependency(out).as_deref(),
            Some("linux-image-6.1.0-48-cloud-amd64")
        );
    }

    #[test]
    fn closure_from_modules_dep() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path();
        for f in [
            "kernel/a/virtio.ko",
            "kernel/a/virtio_ring.ko",
            "kernel/b/virtio-blk.ko",
            "kernel/c/zz.ko.xz",
        ] {
            std::fs::create_dir_all(m.join(f).parent().unwrap()).unwrap();
            std::fs::write(m.join(f), b"").unwrap();
        }
        std::fs::write(
            m.join("modules.dep"),
            "kernel/a/virtio.ko:\nkernel/a/virtio_ring.ko: kernel/a/virtio.ko\nkernel/b/virtio-blk.ko: kernel/a/virtio_ring.ko kernel/a/virtio.ko\n",
        )
        .unwrap();
        std::fs::write(m.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let got = module_closure(m, &["virtio_blk", "ext4", "virtio"]).unwrap();
        assert_eq!(
            got,
            vec![
                PathBuf::from("kernel/a/virtio.ko"),
                PathBuf::from("kernel/a/virtio_ring.ko"),
                PathBuf::from("kernel/b/virtio-blk.ko")
            ]
        );
        let err = module_closure(m, &["nope"]).unwrap_err().to_string();
        assert!(err.contains("neither a module nor built"), "{err}");
        let err = module_closure(m, &["zz"]).unwrap_err().to_string();
        assert!(err.contains("compressed"), "{err}");
    }
}
