//! `image-build os` end to end with the real kernel package (downloaded once into the
//! cache): the module closure, the root image's layout, the `/var` disk, and
//! reproducibility (same inputs, same bytes). The static binaries are stand-ins: copies of
//! the host's static busybox under their names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_units::{parse_unit, NetworkMode, RestartPolicy};

fn cache() -> PathBuf {
    std::env::var_os("FLOTILLA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(image_build::DEFAULT_CACHE))
}

fn specs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("specs")
}

fn image_build(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_image-build"))
        .arg("os")
        .args(args)
        .arg("--cache")
        .arg(cache())
        .output()
        .unwrap()
}

fn build(spec: &Path, bin_dir: &Path, out: &Path) -> std::process::Output {
    image_build(&[
        spec.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--bin-dir".as_ref(),
        bin_dir.as_os_str(),
    ])
}

/// A binaries directory with static stand-ins for flotilla-init and unitctl.
fn fake_bin_dir(dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "the tests need the static busybox: apt-get install busybox-static"
    );
    std::fs::create_dir_all(dir).unwrap();
    for name in ["flotilla-init", "unitctl", "fleetd", "fleetctl"] {
        std::fs::copy(busybox, dir.join(name)).unwrap();
    }
    dir.to_path_buf()
}

fn program(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found"))
}

fn same_file(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba).unwrap();
        let mut nb = 0;
        while nb < na {
            let n = fb.read(&mut bb[nb..na]).unwrap();
            if n == 0 {
                return false;
            }
            nb += n;
        }
        if ba[..na] != bb[..na] {
            return false;
        }
        if na == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
    }
}

#[test]
fn host_spec_is_reproducible_with_root_and_var_images() {
    let t = tempfile::tempdir().unwrap();
    let spec = specs().join("host.toml");
    let bins = fake_bin_dir(&t.path().join("bin"));
    let a = build(&spec, &bins, &t.path().join("a"));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let stdout = String::from_utf8_lossy(&a.stdout);
    for f in [
        "vmlinuz",
        "initramfs.img",
        "root.img",
        "var.img",
        "disk.img",
    ] {
        assert!(stdout.contains(&format!("{f}: sha256:")), "{stdout}");
    }
    // New mtimes on every input: same bytes in, same bytes out.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let bins = fake_bin_dir(&t.path().join("bin2"));
    let b = build(&spec, &bins, &t.path().join("b"));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    for f in [
        "manifest.json",
        "initramfs.img",
        "vmlinuz",
        "root.img",
        "var.img",
        "disk.img",
    ] {
        assert!(
            same_file(&t.path().join("a").join(f), &t.path().join("b").join(f)),
            "{f} differs between two builds"
        );
    }

    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("a/manifest.json")).unwrap()).unwrap();
    let args: Vec<&str> = m["qemu"]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &args[..4],
        ["-kernel", "vmlinuz", "-initrd", "initramfs.img"]
    );
    assert!(args.windows(2).any(|w| w == ["-accel", "tcg"]));
    for pair in [
        [
            "-drive",
            "if=none,id=root,format=raw,file=root.img,readonly=on",
        ],
        ["-device", "virtio-blk-pci,drive=root,serial=flotilla-root"],
        ["-drive", "if=none,id=var,format=raw,file=var.img"],
        ["-device", "virtio-blk-pci,drive=var,serial=flotilla-var"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    let names: Vec<&str> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vmlinuz", "initramfs", "root", "var", "disk"]);
    assert_eq!(m["artifacts"][3]["size"].as_u64(), Some(1 << 30));

    check_root_image(&t.path().join("a/root.img"), &t.path().join("bin"));
    check_var_image(&t.path().join("a/var.img"));
    check_disk_image(&t.path().join("a"), &m);

    // The closure, from the cached kernel: dependencies before the modules needing them.
    let kernel = m["kernel"].as_str().unwrap();
    let modules_dir = cache()
        .join("kernel")
        .join(kernel)
        .join("lib/modules")
        .join(kernel);
    let closure =
        image_build::kernel::module_closure(&modules_dir, &["virtio_blk", "virtio_net"]).unwrap();
    let names: Vec<String> = closure
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n} not in {names:?}"))
    };
    assert!(pos("virtio") < pos("virtio_blk"), "{names:?}");
    assert!(pos("failover") < pos("net_failover"), "{names:?}");
    assert!(pos("net_failover") < pos("virtio_net"), "{names:?}");
}

/// The bytes `offset..offset + len` of `path`.
fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// A file of the ESP inside `disk` (at byte `offset`), read with mtools' `mtype`.
fn esp_file(disk: &Path, offset: u64, path: &str) -> String {
    let out = Command::new(program("mtype"))
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()))
        .arg(format!("::{path}"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "mtype {path}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// disk.img: the GPT that `sfdisk --json` reads back (names, types, offsets as in the
/// manifest), slot A holding root.img's bytes, slot B empty, /var holding var.img's bytes,
/// the ESP with systemd-boot, slot A's kernel and initramfs and entry; and the disk QEMU
/// arguments booting it under OVMF.
fn check_disk_image(dir: &Path, m: &serde_json::Value) {
    let disk = dir.join("disk.img");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), m["disk"]["size"].as_u64().unwrap());
    // Sparse: the empty slot B and most of /var are holes.
    assert!(meta.blocks() * 512 < meta.len() / 4, "{meta:?}");
    let out = Command::new(program("sfdisk"))
        .arg("--json")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let table = &table["partitiontable"];
    assert_eq!(table["label"], "gpt");
    assert_eq!(
        table["id"].as_str().unwrap().to_lowercase(),
        m["disk"]["guid"].as_str().unwrap()
    );
    let parts = table["partitions"].as_array().unwrap();
    let want = m["disk"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 4);
    for (got, want) in parts.iter().zip(want) {
        assert_eq!(got["name"], want["name"]);
        assert_eq!(
            got["start"].as_u64().unwrap() * 512,
            want["offset"].as_u64().unwrap()
        );
        assert_eq!(
            got["size"].as_u64().unwrap() * 512,
            want["size"].as_u64().unwrap()
        );
        assert_eq!(
            got["type"].as_str().unwrap(),
            want["type_guid"].as_str().unwrap()
        );
    }
    let names: Vec<&str> = parts.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "flotilla-esp",
            "flotilla-root-a",
            "flotilla-root-b",
            "flotilla-var"
        ]
    );
    let offset = |i: usize| want[i]["offset"].as_u64().unwrap();
    let size = |i: usize| want[i]["size"].as_u64().unwrap();
    assert_eq!(size(1), size(2));
    let root = std::fs::read(dir.join("root.img")).unwrap();
    assert_eq!(
        read_range(&disk, offset(1), root.len()),
        root,
        "slot A is not root.img"
    );
    assert!(
        read_range(&disk, offset(2), 1 << 20)
            .iter()
            .all(|&b| b == 0),
        "slot B is not empty"
    );
    let var_head = read_range(&dir.join("var.img"), 0, 1 << 20);
    assert_eq!(read_range(&disk, offset(3), 1 << 20), var_head);

    let esp = offset(0);
    let loader = std::fs::read("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").unwrap();
    for path in ["/EFI/BOOT/BOOTX64.EFI", "/EFI/systemd/systemd-bootx64.efi"] {
        let out = Command::new(program("mtype"))
            .arg("-i")
            .arg(format!("{}@@{esp}", disk.display()))
            .arg(format!("::{path}"))
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(out.stdout == loader, "{path} is not systemd-boot");
    }
    let conf = esp_file(&disk, esp, "/loader/loader.conf");
    assert!(
        conf.contains("default flotilla-*\n") && conf.contains("timeout 0\n"),
        "{conf}"
    );
    let entry = esp_file(&disk, esp, "/loader/entries/flotilla-a.conf");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        entry.contains(&format!("title Flotilla {version} (slot a)\n"))
            && entry.contains("linux /flotilla/a/vmlinuz\n")
            && entry.contains("initrd /flotilla/a/initramfs.img\n")
            && entry.contains(
                "options console=ttyS0 quiet panic=10 flotilla.slot=a \
                 flotilla.root=flotilla-root-a flotilla.var=flotilla-var\n"
            ),
        "{entry}"
    );
    // The kernel on the ESP is the image's (mtype prints bytes as they are).
    let out = Command::new(program("mtype"))
        .arg("-i")
        .arg(format!("{}@@{esp}", disk.display()))
        .arg("::/flotilla/a/vmlinuz")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(out.stdout == std::fs::read(dir.join("vmlinuz")).unwrap());

    let args: Vec<&str> = m["qemu"]["disk_args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for pair in [
        [
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        ],
        ["-drive", "if=pflash,format=raw,unit=1,file=ovmf-vars.fd"],
        ["-drive", "if=none,id=disk,format=raw,file=disk.img"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    assert!(
        !args.contains(&"-kernel") && !args.contains(&"-no-reboot"),
        "{args:?}"
    );
    assert!(dir.join("ovmf-vars.fd").is_file());
}

fn check_root_image(img: &Path, bins: &Path) {
    assert_eq!(
        image_build::disk::erofs_label(img).unwrap(),
        "flotilla-root"
    );
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let out = Command::new(program("fsck.erofs"))
        .arg(format!("--extract={}", root.display()))
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
    let link = |p: &str| std::fs::read_link(root.join(p)).unwrap();

    for name in ["flotilla-init", "unitctl"] {
        let p = format!("usr/bin/{name}");
        assert_eq!(meta(&p).permissions().mode() & 0o7777, 0o755, "{p}");
        assert_eq!(
            std::fs::read(root.join(&p)).unwrap(),
            std::fs::read(bins.join(name)).unwrap()
        );
    }
    assert!(meta("bin/busybox").is_file());
    assert_eq!(meta("bin/busybox").permissions().mode() & 0o7777, 0o755);
    for applet in ["bin/sh", "bin/ls", "usr/sbin/httpd", "bin/date"] {
        assert_eq!(link(applet), Path::new("/bin/busybox"), "{applet}");
    }
    assert!(read("usr/lib/os-release").contains("ID=flotilla\n"));
    assert!(read("usr/lib/os-release").contains("NAME=\"Flotilla\"\n"));
    let etc = "usr/share/factory/etc";
    let passwd = read(&format!("{etc}/passwd"));
    assert!(
        passwd.starts_with("root:x:0:0:root:/root:/bin/sh\n"),
        "{passwd}"
    );
    assert!(passwd.contains("nobody:x:65534:65534:"), "{passwd}");
    let group = read(&format!("{etc}/group"));
    assert!(group.contains("root:x:0:") && group.contains("nogroup:x:65534:"));
    let hosts = read(&format!("{etc}/hosts"));
    assert!(hosts.contains("127.0.0.1 localhost") && hosts.contains("::1 localhost"));
    assert_eq!(
        link(&format!("{etc}/os-release")),
        Path::new("/usr/lib/os-release")
    );
    // The build host's CA bundle on the read-only root, the factory /etc linking to it.
    assert_eq!(
        std::fs::read(root.join("usr/share/ca-certificates/ca-certificates.crt")).unwrap(),
        std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap()
    );
    assert_eq!(
        meta("usr/share/ca-certificates/ca-certificates.crt")
            .permissions()
            .mode()
            & 0o7777,
        0o644
    );
    assert_eq!(
        link(&format!("{etc}/ssl/certs/ca-certificates.crt")),
        Path::new("/usr/share/ca-certificates/ca-certificates.crt")
    );
    for unit in ["fleetd.toml", "heartbeat.toml", "web.toml"] {
        assert_eq!(
            read(&format!("{etc}/flotilla/units/{unit}")),
            std::fs::read_to_string(specs().join("host-units").join(unit)).unwrap()
        );
    }
    assert_eq!(
        read("usr/lib/flotilla/provision.toml"),
        std::fs::read_to_string(specs().join("host-provision.toml")).unwrap()
    );
    assert!(read("usr/share/flotilla/www/index.html").contains("Flotilla host"));
    for dir in [
        "proc", "sys", "dev", "run", "var", "etc", "root", "mnt", "sysroot", "tmp",
    ] {
        let m = meta(dir);
        assert!(m.is_dir(), "{dir}");
        let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{dir}");
        // /run and /var hold only the mount points of fleetd.toml's binds.
        let expected: &[&str] = match dir {
            "run" => &["flotilla"],
            "var" => &["lib"],
            _ => &[],
        };
        let mut names: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, expected, "{dir}");
    }
    for point in [
        "run/flotilla",
        "var/lib/flotilla/fleetd",
        "var/lib/flotilla/images",
    ] {
        assert!(meta(point).is_dir(), "{point}");
        assert_eq!(std::fs::read_dir(root.join(point)).unwrap().count(), 0);
    }
    // Owned by root, one timestamp.
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (0, 0), "{}", p.display());
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                assert_eq!(m.mtime(), 1_704_067_200, "{}", p.display());
            }
        }
    }
}

fn check_var_image(img: &Path) {
    let out = Command::new(program("dumpe2fs"))
        .arg("-h")
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("Filesystem volume name:") && l.ends_with(" flotilla-var")),
        "{text}"
    );
    let out = Command::new(program("e2fsck"))
        .arg("-fn")
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Sparse: an empty 1 GiB filesystem allocates a few MB at most.
    assert!(std::fs::metadata(img).unwrap().blocks() * 512 < 64 << 20);
}

#[test]
fn missing_module_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let spec = t.path().join("host.toml");
    std::fs::write(&spec, "[kernel]\nmodules = [\"no_such_module\"]\n").unwrap();
    let init = t.path().join("init");
    std::fs::write(&init, b"x").unwrap();
    let out = image_build(&[
        spec.as_os_str(),
        "--out".as_ref(),
        t.path().join("o").as_os_str(),
        "--init".as_ref(),
        init.as_os_str(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no_such_module") && err.contains("neither a module nor built"),
        "{err}"
    );
}

#[test]
fn missing_binary_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let bins = t.path().join("bin");
    std::fs::create_dir(&bins).unwrap();
    std::fs::copy("/bin/busybox", bins.join("flotilla-init")).unwrap();
    let out = build(&specs().join("host.toml"), &bins, &t.path().join("o"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let missing = bins.join("unitctl");
    assert!(
        err.contains(&format!("binary {} does not exist", missing.display()))
            && err.contains("cargo build --release"),
        "{err}"
    );

    // No flotilla-init at all: the initramfs' /init is missing, said the same way.
    std::fs::remove_file(bins.join("flotilla-init")).unwrap();
    let out = build(&specs().join("host.toml"), &bins, &t.path().join("o"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&bins.join("flotilla-init").display().to_string())
            && err.contains("cargo build --release"),
        "{err}"
    );
}

#[test]
fn dynamic_binary_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let bins = fake_bin_dir(&t.path().join("bin"));
    // The test binary itself is dynamically linked.
    std::fs::copy(std::env::current_exe().unwrap(), bins.join("unitctl")).unwrap();
    let out = build(&specs().join("host.toml"), &bins, &t.path().join("o"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dynamically linked"), "{err}");
}

#[test]
fn bad_var_size_and_broken_units_are_spec_errors() {
    let t = tempfile::tempdir().unwrap();
    let bins = fake_bin_dir(&t.path().join("bin"));
    let spec = t.path().join("host.toml");
    std::fs::write(&spec, "[var]\nsize = \"1.5Q\"\n").unwrap();
    let out = build(&spec, &bins, &t.path().join("o"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("[var] size \"1.5Q\""),
        "{err}"
    );
    // An unknown [disk] key names its line and column; an ESP too small for FAT32 is refused.
    std::fs::write(&spec, "[disk]\nesp_size = \"128M\"\nslots = 2\n").unwrap();
    let out = build(&spec, &bins, &t.path().join("o"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown field `slots`") && err.contains("line 3"),
        "{err}"
    );
    std::fs::write(&spec, "[disk]\nesp_size = \"32M\"\n").unwrap();
    let out = build(&spec, &bins, &t.path().join("o"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("[disk] esp_size \"32M\": must be at least 64M"),
        "{err}"
    );

    std::fs::create_dir(t.path().join("units")).unwrap();
    std::fs::write(
        t.path().join("units/bad.toml"),
        "[container]\ncommand = []\n",
    )
    .unwrap();
    std::fs::write(&spec, "[root]\nunits = \"units\"\n").unwrap();
    let out = build(&spec, &bins, &t.path().join("o"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("invalid units") && err.contains("bad.toml"),
        "{err}"
    );
}

/// `[root] ca_bundle`: a missing file or one without a PEM certificate is a spec error
/// naming it (before the kernel download); a bundle relative to the spec is shipped on the
/// root with the factory `/etc/ssl/certs/ca-certificates.crt` linking to it.
#[test]
fn ca_bundle_is_shipped_and_a_missing_or_non_pem_one_is_a_spec_error() {
    let t = tempfile::tempdir().unwrap();
    let init = fake_bin_dir(&t.path().join("bin")).join("flotilla-init");
    let spec = t.path().join("os.toml");
    let build_with = |bundle: &str| {
        std::fs::write(&spec, format!("[root]\nca_bundle = \"{bundle}\"\n")).unwrap();
        image_build(&[
            spec.as_os_str(),
            "--out".as_ref(),
            t.path().join("o").as_os_str(),
            "--init".as_ref(),
            init.as_os_str(),
        ])
    };
    let out = build_with("no-such-ca.pem");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "[root] ca_bundle {} does not exist",
                t.path().join("no-such-ca.pem").display()
            )),
        "{err}"
    );
    std::fs::write(t.path().join("junk.pem"), "not a certificate\n").unwrap();
    let out = build_with("junk.pem");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("holds no PEM certificate"),
        "{err}"
    );

    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    std::fs::write(t.path().join("ca.pem"), pem).unwrap();
    let out = build_with("ca.pem");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(", CA bundle"),
        "{out:?}"
    );
    let root = t.path().join("root");
    let x = Command::new(program("fsck.erofs"))
        .arg(format!("--extract={}", root.display()))
        .arg(t.path().join("o/root.img"))
        .output()
        .unwrap();
    assert!(x.status.success(), "{x:?}");
    assert_eq!(
        std::fs::read_to_string(root.join("usr/share/ca-certificates/ca-certificates.crt"))
            .unwrap(),
        pem
    );
    assert_eq!(
        std::fs::read_link(root.join("usr/share/factory/etc/ssl/certs/ca-certificates.crt"))
            .unwrap(),
        Path::new("/usr/share/ca-certificates/ca-certificates.crt")
    );
}

/// A root image larger than a root slot of `disk.img` is a spec error that says what to raise,
/// and nothing of the disk is left behind.
#[test]
fn root_image_larger_than_its_slot_is_a_spec_error() {
    let t = tempfile::tempdir().unwrap();
    let bins = fake_bin_dir(&t.path().join("bin"));
    let specs = specs();
    let mut text = std::fs::read_to_string(specs.join("host.toml")).unwrap();
    // Absolute paths: the spec is copied out of specs/.
    for key in ["bin_dir", "units", "provision", "src"] {
        text = text.replace(
            &format!("{key} = \""),
            &format!("{key} = \"{}/", specs.display()),
        );
    }
    text.push_str("\n[disk]\nslot_size = \"1M\"\n");
    let spec = t.path().join("host.toml");
    std::fs::write(&spec, text).unwrap();
    let out = build(&spec, &bins, &t.path().join("o"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("larger than a root slot ([disk] slot_size \"1M\")")
            && err.contains("raise [disk] slot_size"),
        "{err}"
    );
    assert!(!t.path().join("o/disk.img").exists());
}

/// `[root] images`: each spec is built through the container build (its cache) and
/// imported into the read-only system store of the root image, reproducibly; the store in
/// the image lists and resolves the image without its compressed layer blobs.
#[test]
fn baked_in_images_land_in_the_system_store_reproducibly() {
    let t = tempfile::tempdir().unwrap();
    let init = fake_bin_dir(&t.path().join("bin")).join("flotilla-init");
    let spec = t.path().join("os.toml");
    std::fs::write(
        &spec,
        format!(
            "[root]\ncompression = \"lz4hc\"\nimages = [\"{}\"]\n",
            specs().join("busybox.toml").display()
        ),
    )
    .unwrap();
    let os = |out: &str| {
        image_build(&[
            spec.as_os_str(),
            "--out".as_ref(),
            t.path().join(out).as_os_str(),
            "--init".as_ref(),
            init.as_os_str(),
        ])
    };
    let a = os("a");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let stdout = String::from_utf8_lossy(&a.stdout);
    assert!(
        stdout.contains("images: busybox:latest -> /usr/share/flotilla/images"),
        "{stdout}"
    );
    assert!(stdout.contains("(lz4hc)"), "{stdout}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(os("b").status.success());
    assert!(same_file(
        &t.path().join("a/root.img"),
        &t.path().join("b/root.img")
    ));

    let root = t.path().join("root");
    let out = Command::new(program("fsck.erofs"))
        .arg(format!("--extract={}", root.display()))
        .arg(t.path().join("a/root.img"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let system = root.join("usr/share/flotilla/images");
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    // The root private to root (set-id files in the layers), the rest as usual.
    assert_eq!(mode(&system), 0o700);
    for dir in ["blobs", "blobs/sha256", "layers", "tmp"] {
        assert_eq!(mode(&system.join(dir)), 0o755, "{dir}");
    }
    assert_eq!(mode(&system.join("images.json")), 0o644);
    // Manifest and config only: the layer is there extracted.
    assert_eq!(
        std::fs::read_dir(system.join("blobs/sha256"))
            .unwrap()
            .count(),
        2
    );
    let stores =
        flotilla_container::image::ImageStores::open(&[t.path().join("writable"), system.clone()])
            .unwrap();
    let busybox = stores.resolve("busybox").unwrap();
    assert!(busybox.layers[0].starts_with(&system));
    assert!(busybox.layers[0].join("bin/busybox").is_file());
    let listed = stores.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].store.as_path(), listed[0].writable),
        (system.as_path(), false)
    );

    // A missing image spec fails before anything is built.
    std::fs::write(&spec, "[root]\nimages = [\"nosuch.toml\"]\n").unwrap();
    let o = os("c");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("[root] images") && err.contains("nosuch.toml"),
        "{err}"
    );
}

#[test]
fn shipped_host_units_and_provisioning_are_valid() {
    let dir = specs().join("host-units");
    let load = |name: &str| {
        let path = dir.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        parse_unit(name, Some(&path), &text).unwrap_or_else(|e| panic!("{e}"))
    };
    let heartbeat = load("heartbeat");
    assert_eq!(heartbeat.container.image, None);
    assert_eq!(heartbeat.service.restart, RestartPolicy::Always);
    assert_eq!(heartbeat.container.command[0], "/bin/sh");
    let web = load("web");
    assert_eq!(web.container.image, None);
    assert_eq!(web.container.network, NetworkMode::Host);
    assert_eq!(
        web.container.command,
        [
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/usr/share/flotilla/www"
        ]
    );
    // fleetd over the host's read-only root: the local init's socket and its state in /var.
    let fleetd = load("fleetd");
    assert_eq!(fleetd.container.image, None);
    assert_eq!(fleetd.container.command, ["/usr/bin/fleetd"]);
    assert_eq!(fleetd.container.network, NetworkMode::Host);
    let paths: Vec<_> = fleetd
        .container
        .mounts
        .iter()
        .map(|m| (m.path.clone(), m.create))
        .collect();
    assert_eq!(
        paths,
        [
            ("/run/flotilla".into(), false),
            ("/var/lib/flotilla/fleetd".into(), true),
            ("/var/lib/flotilla/images".into(), true)
        ]
    );
    let catalog = flotilla_units::Catalog::load_dirs(&[dir]);
    assert!(catalog.errors.is_empty(), "{:?}", catalog.errors);
    assert_eq!(catalog.units.len(), 3);

    let text = std::fs::read_to_string(specs().join("host-provision.toml")).unwrap();
    let p: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(p["hostname"].as_str(), Some("flotilla"));
    assert_eq!(p["network"]["address"].as_str(), Some("10.0.2.15/24"));
    assert_eq!(p["network"]["gateway"].as_str(), Some("10.0.2.2"));
    assert_eq!(p["metadata"]["role"].as_str(), Some("demo"));
    let units = p["units"].as_array().unwrap();
    assert_eq!(units.len(), 1);
    assert_eq!(units[0]["name"].as_str(), Some("hello.toml"));
    let hello = parse_unit("hello", None, units[0]["contents"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hello.unit.description.as_deref(), Some("provisioned hello"));
}
