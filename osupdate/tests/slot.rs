//! Writing a slot: on a loop device with a real GPT made by sfdisk (the agreed partition
//! names, found through /sys/class/block), and the refusals on regular files.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flotilla_osupdate::payload::{load_trusted_keys, verify, Policy, VerifiedPayload, OS_ID};
use flotilla_osupdate::slot::{find_partition, running_slot, write_slot, Partition, SlotError};
use flotilla_osupdate::Slot;

use common::MIB;

/// A verified payload of version 2.0.0 with a `root_size`-byte root image.
fn verified(dir: &Path, root_size: usize) -> VerifiedPayload {
    let key = common::openssl_key(dir, "k");
    let payload = common::payload(dir, "2.0.0", &key, root_size);
    let kd = dir.join("keys");
    std::fs::create_dir_all(&kd).unwrap();
    common::openssl_pubkey(&key, &kd.join("k.pem"));
    let trusted = load_trusted_keys(&kd).unwrap();
    let running = semver::Version::new(1, 0, 0);
    verify(
        &payload,
        &Policy {
            trusted: &trusted,
            running: Some(&running),
            allow_downgrade: false,
            os: OS_ID,
            architecture: std::env::consts::ARCH,
        },
    )
    .unwrap()
}

fn read_range(dev: &Path, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(dev).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

#[test]
fn the_root_image_goes_to_the_inactive_slot_on_a_real_gpt() {
    let tmp = tempfile::tempdir().unwrap();
    let payload = verified(tmp.path(), (3 * MIB + 12345) as usize);
    let disk = common::loop_disk();
    let sys = Path::new("/sys/class/block");
    let dev = Path::new("/dev");
    let b = find_partition(sys, dev, "flotilla-root-b", Some(&disk.dev)).unwrap();
    let a = find_partition(sys, dev, "flotilla-root-a", Some(&disk.dev)).unwrap();
    println!(
        "slot a = {}, slot b = {} on {}",
        a.dev.display(),
        b.dev.display(),
        disk.dev
    );
    assert_eq!(b.disk, disk.dev);
    assert_eq!(b.dev, PathBuf::from(format!("/dev/{}p3", disk.dev)));
    // Running B: B is refused, nothing written.
    let e = write_slot(&payload, Slot::B, Some(Slot::B), &b, &mut |_, _| {}).unwrap_err();
    println!("{e}");
    assert!(
        matches!(e, SlotError::RunningSlot { slot: Slot::B }),
        "{e:?}"
    );
    assert!(read_range(&b.dev, (4 * MIB) as usize)
        .iter()
        .all(|&x| x == 0));
    // A's partition given for slot B: refused.
    let e = write_slot(&payload, Slot::B, Some(Slot::A), &a, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, SlotError::WrongPartition { .. }), "{e:?}");
    // Running A: B is written, with progress, and reads back as the image.
    let mut calls = Vec::new();
    let report = write_slot(&payload, Slot::B, Some(Slot::A), &b, &mut |d, t| {
        calls.push((d, t))
    })
    .unwrap();
    let root = std::fs::read(payload.artifact_path("root").unwrap()).unwrap();
    println!(
        "wrote {} bytes to {} ({} partition) in {:?}, read back in {:?}; progress calls {}",
        report.bytes,
        b.dev.display(),
        report.partition,
        report.write,
        report.verify,
        calls.len()
    );
    assert_eq!(report.bytes, root.len() as u64);
    assert_eq!(report.partition, 8 * MIB);
    assert_eq!(calls.first(), Some(&(0, root.len() as u64)));
    assert_eq!(calls.last(), Some(&(root.len() as u64, root.len() as u64)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(read_range(&b.dev, root.len()), root);
    // Slot A untouched.
    assert!(read_range(&a.dev, (8 * MIB) as usize)
        .iter()
        .all(|&x| x == 0));
    // Without a disk, the name may be ambiguous on a machine with several such disks; with
    // this one it is found.
    assert_eq!(
        find_partition(sys, dev, "flotilla-var", Some(&disk.dev))
            .unwrap()
            .dev,
        PathBuf::from(format!("/dev/{}p4", disk.dev))
    );
    let e = find_partition(sys, dev, "flotilla-root-c", Some(&disk.dev)).unwrap_err();
    assert!(matches!(e, SlotError::NotFound { .. }), "{e:?}");
}

#[test]
fn an_image_larger_than_the_partition_is_refused_on_a_real_gpt() {
    let tmp = tempfile::tempdir().unwrap();
    let payload = verified(tmp.path(), (8 * MIB + 1) as usize);
    let disk = common::loop_disk();
    let b = find_partition(
        Path::new("/sys/class/block"),
        Path::new("/dev"),
        "flotilla-root-b",
        Some(&disk.dev),
    )
    .unwrap();
    let e = write_slot(&payload, Slot::B, Some(Slot::A), &b, &mut |_, _| {}).unwrap_err();
    println!("{e}");
    assert!(matches!(e, SlotError::TooLarge { .. }), "{e:?}");
    assert!(read_range(&b.dev, (8 * MIB) as usize)
        .iter()
        .all(|&x| x == 0));
}

/// A regular file standing in for slot B's partition.
fn file_partition(dir: &Path, size: u64) -> Partition {
    let dev = dir.join("root-b.part");
    std::fs::File::create(&dev).unwrap().set_len(size).unwrap();
    Partition {
        name: "flotilla-root-b".into(),
        dev,
        kernel_name: "test".into(),
        disk: String::new(),
    }
}

#[test]
fn a_root_image_changed_after_verification_fails_the_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let payload = verified(tmp.path(), 200_000);
    // Swapped (same size) between verify and write.
    let root = payload.artifact_path("root").unwrap();
    let mut bytes = std::fs::read(&root).unwrap();
    bytes[100] ^= 1;
    std::fs::remove_file(&root).unwrap();
    std::fs::write(&root, bytes).unwrap();
    let part = file_partition(tmp.path(), 8 * MIB);
    let e = write_slot(&payload, Slot::B, Some(Slot::A), &part, &mut |_, _| {}).unwrap_err();
    println!("{e}");
    assert!(matches!(e, SlotError::ReadBack { .. }), "{e:?}");
}

#[test]
fn a_root_image_grown_after_verification_writes_no_more_than_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let payload = verified(tmp.path(), 200_000);
    let root = payload.artifact_path("root").unwrap();
    let mut bytes = std::fs::read(&root).unwrap();
    bytes.extend(std::iter::repeat_n(0xaa, 100_000));
    std::fs::remove_file(&root).unwrap();
    std::fs::write(&root, bytes).unwrap();
    let part = file_partition(tmp.path(), 8 * MIB);
    // The signed 200000 bytes are written (and read back as signed); nothing after them.
    let report = write_slot(&payload, Slot::B, Some(Slot::A), &part, &mut |_, _| {}).unwrap();
    assert_eq!(report.bytes, 200_000);
    let written = std::fs::read(&part.dev).unwrap();
    assert!(written[200_000..].iter().all(|&b| b == 0));
}

#[test]
fn the_running_slot_comes_from_the_command_line() {
    assert_eq!(
        running_slot("console=ttyS0 quiet panic=10 flotilla.slot=b flotilla.root=flotilla-root-b"),
        Some(Slot::B)
    );
    assert_eq!(
        running_slot("console=ttyS0 flotilla.slot=a\n"),
        Some(Slot::A)
    );
    assert_eq!(running_slot("console=ttyS0 quiet panic=-1"), None);
    assert_eq!(running_slot("flotilla.slot=c"), None);
}

#[test]
fn partitions_are_found_by_name_in_a_sysfs_tree() {
    // A fake /sys/class/block: two disks carry the names; the disk decides.
    let tmp = tempfile::tempdir().unwrap();
    let devices = tmp.path().join("devices");
    let class = tmp.path().join("class");
    std::fs::create_dir_all(&class).unwrap();
    for (disk, n) in [("vda", 2), ("vdb", 2)] {
        let d = devices.join(disk).join(format!("{disk}{n}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("uevent"),
            format!("MAJOR=254\nMINOR=2\nDEVNAME={disk}{n}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME=flotilla-root-a\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink(&d, class.join(format!("{disk}{n}"))).unwrap();
    }
    let dev = Path::new("/dev");
    let e = find_partition(&class, dev, "flotilla-root-a", None).unwrap_err();
    println!("{e}");
    assert!(matches!(e, SlotError::Ambiguous { .. }), "{e:?}");
    let p = find_partition(&class, dev, "flotilla-root-a", Some("vdb")).unwrap();
    assert_eq!(p.dev, Path::new("/dev/vdb2"));
    assert_eq!(p.disk, "vdb");
}

#[test]
fn gpt_names_are_read_from_the_disk_and_a_corrupt_header_gives_none() {
    let sfdisk = common::ensure_program("sfdisk", "fdisk");
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    let mut child = std::process::Command::new(sfdisk)
        .args(["--quiet"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"label: gpt\nsize=4MiB, name=\"flotilla-esp\"\nsize=8MiB, name=\"flotilla-root-a\"\nname=\"flotilla-var\"\n",
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let names = flotilla_osupdate::slot::gpt_names(&img, 512).unwrap();
    assert_eq!(
        names,
        [
            (1, "flotilla-esp".to_string()),
            (2, "flotilla-root-a".to_string()),
            (3, "flotilla-var".to_string())
        ]
    );
    // An entry size of 4 GiB in the header: no names, and no 4 TiB allocation.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[512 + 84..512 + 88].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    assert!(flotilla_osupdate::slot::gpt_names(&img, 512)
        .unwrap()
        .is_empty());
    // No GPT at all.
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    assert!(flotilla_osupdate::slot::gpt_names(&img, 512)
        .unwrap()
        .is_empty());
}
