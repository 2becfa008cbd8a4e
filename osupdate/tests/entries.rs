//! The boot entries on an ESP directory: naming, install / commit / rollback, and which slot
//! systemd-boot picks next, with the loader's boot counting emulated by renames.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use flotilla_osupdate::entries::{
    commit, compare_versions, extra_options, install, install_with, render_entry,
    render_entry_with, rollback, rolled_back, status, BootFile, Counter, EntryError, EntryName,
    EntryState, ENTRIES_DIR,
};
use flotilla_osupdate::{sha256_file, Slot};

/// A kernel and an initramfs for `version`, with their digests.
struct Boot {
    kernel: PathBuf,
    kernel_sha: String,
    initrd: PathBuf,
    initrd_sha: String,
}

fn boot_files(dir: &Path, version: &str) -> Boot {
    let d = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&d).unwrap();
    let kernel = d.join("vmlinuz");
    let initrd = d.join("initramfs.img");
    std::fs::write(&kernel, format!("kernel {version}\n")).unwrap();
    std::fs::write(&initrd, format!("initramfs {version}\n")).unwrap();
    Boot {
        kernel_sha: sha256_file(&kernel).unwrap().0,
        initrd_sha: sha256_file(&initrd).unwrap().0,
        kernel,
        initrd,
    }
}

fn install_v(
    esp: &Path,
    slot: Slot,
    version: &str,
    tries: u32,
) -> flotilla_osupdate::entries::Installed {
    let b = boot_files(esp.parent().unwrap(), version);
    install(
        esp,
        slot,
        version,
        tries,
        BootFile {
            path: &b.kernel,
            sha256: &b.kernel_sha,
        },
        BootFile {
            path: &b.initrd,
            sha256: &b.initrd_sha,
        },
    )
    .unwrap()
}

/// What systemd-boot does on one boot: picks the first entry in its order and, if it has a
/// boot counter with tries left, renames it with one try less and one more done. Returns
/// the slot booted.
fn loader_boot(esp: &Path) -> Slot {
    let st = status(esp).unwrap();
    let slot = st.next.unwrap();
    let e = st.entry(slot).unwrap();
    if let Some(Counter { left, done }) = e.name.counter {
        if left > 0 {
            let to = EntryName {
                slot,
                counter: Some(Counter {
                    left: left - 1,
                    done: Some(done.unwrap_or(0) + 1),
                }),
            }
            .render();
            let dir = esp.join(ENTRIES_DIR);
            std::fs::rename(dir.join(&e.file), dir.join(to)).unwrap();
        }
    }
    slot
}

fn files(esp: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(esp.join(ENTRIES_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// An ESP with slot A committed at `version`.
fn esp_with_a(version: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let esp = tmp.path().join("esp");
    std::fs::create_dir(&esp).unwrap();
    install_v(&esp, Slot::A, version, 3);
    commit(&esp, Slot::A).unwrap();
    (tmp, esp)
}

#[test]
fn entry_names_parse_and_render() {
    for (file, slot, counter) in [
        ("flotilla-a.conf", Slot::A, None),
        ("flotilla-b+3.conf", Slot::B, Some((3, None))),
        ("flotilla-b+2-1.conf", Slot::B, Some((2, Some(1)))),
        ("flotilla-a+0-3.conf", Slot::A, Some((0, Some(3)))),
    ] {
        let n = EntryName::parse(file).unwrap_or_else(|| panic!("{file}"));
        assert_eq!(n.slot, slot);
        assert_eq!(n.counter.map(|c| (c.left, c.done)), counter);
        assert_eq!(n.render(), file);
    }
    for bad in [
        "flotilla-c.conf",
        "flotilla-a+x.conf",
        "flotilla-a+3-.conf",
        "flotilla-a+-1.conf",
        "flotilla-a.conf.tmp",
        ".flotilla-a.conf.tmp",
        "debian.conf",
    ] {
        assert_eq!(EntryName::parse(bad), None, "{bad}");
    }
    assert_eq!(
        EntryName::parse("flotilla-a+0-3.conf").unwrap().state(),
        EntryState::Bad { done: 3 }
    );
    assert_eq!(
        EntryName::parse("flotilla-a+2-1.conf").unwrap().state(),
        EntryState::Trying { left: 2, done: 1 }
    );
}

#[test]
fn the_entry_text_is_the_agreed_one() {
    assert_eq!(
        render_entry(Slot::B, "1.2.0"),
        "title Flotilla 1.2.0 (slot b)\n\
         sort-key flotilla\n\
         version 1.2.0\n\
         linux /flotilla/b/vmlinuz\n\
         initrd /flotilla/b/initramfs.img\n\
         options console=ttyS0 quiet panic=10 flotilla.slot=b flotilla.root=flotilla-root-b flotilla.var=flotilla-var\n"
    );
}

#[test]
fn versions_compare_like_the_loader() {
    assert_eq!(compare_versions("1.10.0", "1.9.0"), Ordering::Greater);
    assert_eq!(compare_versions("2.0.0", "1.99.99"), Ordering::Greater);
    assert_eq!(compare_versions("1.0.0", "1.0.0"), Ordering::Equal);
    assert_eq!(compare_versions("1.0.1", "1.0"), Ordering::Greater);
    assert_eq!(
        compare_versions("flotilla-b", "flotilla-a"),
        Ordering::Greater
    );
}

#[test]
fn a_newer_trial_boots_first_and_falls_back_once_its_tries_are_spent() {
    let (_tmp, esp) = esp_with_a("1.0.0");
    let inst = install_v(&esp, Slot::B, "1.1.0", 3);
    assert_eq!(inst.file, "flotilla-b+3.conf");
    assert_eq!(inst.demoted, None);
    assert_eq!(files(&esp), ["flotilla-a.conf", "flotilla-b+3.conf"]);
    assert_eq!(
        std::fs::read_to_string(esp.join("flotilla/b/vmlinuz")).unwrap(),
        "kernel 1.1.0\n"
    );
    assert_eq!(
        std::fs::read_to_string(esp.join(ENTRIES_DIR).join("flotilla-b+3.conf")).unwrap(),
        render_entry(Slot::B, "1.1.0")
    );
    // No temporary file left anywhere.
    for d in [esp.join(ENTRIES_DIR), esp.join("flotilla/b")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.ends_with(".tmp"), "{n} left in {}", d.display());
        }
    }
    let st = status(&esp).unwrap();
    assert_eq!(st.next, Some(Slot::B));
    assert_eq!(st.entry(Slot::A).unwrap().state(), EntryState::Committed);
    assert_eq!(st.entry(Slot::B).unwrap().version, "1.1.0");
    // Three failed boots of B (it never commits), then the loader picks A by itself.
    let booted: Vec<Slot> = (0..4).map(|_| loader_boot(&esp)).collect();
    println!("booted: {booted:?}, entries now {:?}", files(&esp));
    assert_eq!(booted, [Slot::B, Slot::B, Slot::B, Slot::A]);
    assert_eq!(files(&esp), ["flotilla-a.conf", "flotilla-b+0-3.conf"]);
    let st = status(&esp).unwrap();
    assert_eq!(
        st.entry(Slot::B).unwrap().state(),
        EntryState::Bad { done: 3 }
    );
    assert_eq!(st.next, Some(Slot::A));
    // Back on A, the fallback is recognised: B's newer entry is bad.
    assert_eq!(rolled_back(&st, Slot::A, "1.0.0").unwrap().version, "1.1.0");
}

/// `rolled_back` names the other slot's entry only when it is bad and newer than the
/// running version, and the running slot is not itself on trial.
#[test]
fn rolled_back_is_a_bad_newer_entry_of_the_other_slot() {
    let (_tmp, esp) = esp_with_a("1.0.0");
    assert!(rolled_back(&status(&esp).unwrap(), Slot::A, "1.0.0").is_none());
    install_v(&esp, Slot::B, "1.1.0", 1);
    // On trial: nothing rolled back yet, from either side.
    let st = status(&esp).unwrap();
    assert!(rolled_back(&st, Slot::A, "1.0.0").is_none());
    assert!(rolled_back(&st, Slot::B, "1.1.0").is_none());
    // The operator rolls back: B is bad and newer.
    rollback(&esp).unwrap();
    let st = status(&esp).unwrap();
    let e = rolled_back(&st, Slot::A, "1.0.0").unwrap();
    assert_eq!((e.slot, e.version.as_str()), (Slot::B, "1.1.0"));
    // A bad entry that is older than the running version is not a rolled-back update.
    assert!(rolled_back(&st, Slot::A, "1.2.0").is_none());
}

#[test]
fn commit_makes_the_trial_permanent() {
    let (_tmp, esp) = esp_with_a("1.0.0");
    install_v(&esp, Slot::B, "1.1.0", 3);
    assert_eq!(loader_boot(&esp), Slot::B);
    assert_eq!(files(&esp), ["flotilla-a.conf", "flotilla-b+2-1.conf"]);
    assert_eq!(commit(&esp, Slot::B).unwrap(), "flotilla-b.conf");
    assert_eq!(files(&esp), ["flotilla-a.conf", "flotilla-b.conf"]);
    for _ in 0..5 {
        assert_eq!(loader_boot(&esp), Slot::B);
    }
    // Committing again is an error that says why.
    let e = commit(&esp, Slot::B).unwrap_err();
    assert!(matches!(e, EntryError::NotTrying { .. }), "{e:?}");
    // The last try runs as `+0-N` (the loader renames first): it can still be committed.
    install_v(&esp, Slot::A, "1.1.5", 1);
    assert_eq!(loader_boot(&esp), Slot::A);
    assert_eq!(files(&esp), ["flotilla-a+0-1.conf", "flotilla-b.conf"]);
    assert_eq!(commit(&esp, Slot::A).unwrap(), "flotilla-a.conf");
    // The next update goes to A and replaces its committed entry.
    install_v(&esp, Slot::A, "1.2.0", 2);
    assert_eq!(files(&esp), ["flotilla-a+2.conf", "flotilla-b.conf"]);
    assert_eq!(status(&esp).unwrap().next, Some(Slot::A));
}

#[test]
fn rollback_boots_the_other_slot_next() {
    let (_tmp, esp) = esp_with_a("1.0.0");
    // Nothing to fall back to yet.
    let e = rollback(&esp).unwrap_err();
    println!("{e}");
    assert!(
        matches!(e, EntryError::NoFallback { slot: Slot::B, .. }),
        "{e:?}"
    );
    // A trial in B: rollback marks it bad, keeping its tries done.
    install_v(&esp, Slot::B, "1.1.0", 3);
    loader_boot(&esp);
    assert_eq!(rollback(&esp).unwrap(), Slot::A);
    assert_eq!(files(&esp), ["flotilla-a.conf", "flotilla-b+0-1.conf"]);
    assert_eq!(loader_boot(&esp), Slot::A);
    // Both committed, B newer: rollback makes A next.
    install_v(&esp, Slot::B, "1.1.0", 3);
    commit(&esp, Slot::B).unwrap();
    assert_eq!(status(&esp).unwrap().next, Some(Slot::B));
    assert_eq!(rollback(&esp).unwrap(), Slot::A);
    assert_eq!(files(&esp), ["flotilla-a.conf", "flotilla-b+0.conf"]);
    assert_eq!(loader_boot(&esp), Slot::A);
    // And not again: B is bad now.
    let e = rollback(&esp).unwrap_err();
    assert!(
        matches!(e, EntryError::NoFallback { slot: Slot::B, .. }),
        "{e:?}"
    );
}

#[test]
fn a_downgrade_boots_first_and_still_falls_back() {
    let (_tmp, esp) = esp_with_a("2.0.0");
    let inst = install_v(&esp, Slot::B, "1.0.0", 2);
    // Version order alone would boot A (2.0.0) first: A is demoted to bad.
    assert_eq!(inst.demoted.as_deref(), Some("flotilla-a+0.conf"));
    assert_eq!(status(&esp).unwrap().next, Some(Slot::B));
    let booted: Vec<Slot> = (0..3).map(|_| loader_boot(&esp)).collect();
    println!("booted: {booted:?}, entries now {:?}", files(&esp));
    // Both bad: version order again, A (2.0.0) first.
    assert_eq!(booted, [Slot::B, Slot::B, Slot::A]);
}

#[test]
fn a_kernel_that_changed_after_verification_installs_nothing() {
    let (tmp, esp) = esp_with_a("1.0.0");
    let b = boot_files(tmp.path(), "1.1.0");
    let e = install(
        &esp,
        Slot::B,
        "1.1.0",
        3,
        BootFile {
            path: &b.kernel,
            sha256: &b.initrd_sha, // not the kernel's digest
        },
        BootFile {
            path: &b.initrd,
            sha256: &b.initrd_sha,
        },
    )
    .unwrap_err();
    println!("{e}");
    assert!(matches!(e, EntryError::Digest { .. }), "{e:?}");
    assert_eq!(files(&esp), ["flotilla-a.conf"]);
    assert!(!esp.join("flotilla/b/vmlinuz").exists());
    assert_eq!(
        std::fs::read_dir(esp.join("flotilla/b")).unwrap().count(),
        0
    );
}

#[test]
fn two_entries_for_one_slot_are_reported() {
    let (_tmp, esp) = esp_with_a("1.0.0");
    std::fs::write(
        esp.join(ENTRIES_DIR).join("flotilla-a+1.conf"),
        render_entry(Slot::A, "1.0.0"),
    )
    .unwrap();
    let e = status(&esp).unwrap_err();
    println!("{e}");
    assert!(
        matches!(e, EntryError::Duplicate { slot: Slot::A, .. }),
        "{e:?}"
    );
}

/// Words an operator added to the running slot's entry (a debug shell, a console) are found
/// by `extra_options` and written into the next slot's entry by `install_with`; the
/// template's own words are not repeated.
#[test]
fn extra_options_are_carried_to_the_new_entry() {
    let (_t, esp) = esp_with_a("1.0.0");
    assert!(extra_options(&esp, Slot::A).unwrap().is_empty());
    assert!(extra_options(&esp, Slot::B).unwrap().is_empty());
    let a = esp.join(ENTRIES_DIR).join("flotilla-a.conf");
    let text = std::fs::read_to_string(&a).unwrap();
    let text = text.replace(
        "flotilla.var=flotilla-var",
        "flotilla.var=flotilla-var flotilla.debug_shell=hvc0 loglevel=7",
    );
    std::fs::write(&a, text).unwrap();
    let extra = extra_options(&esp, Slot::A).unwrap();
    assert_eq!(extra, ["flotilla.debug_shell=hvc0", "loglevel=7"]);

    let b = boot_files(esp.parent().unwrap(), "2.0.0");
    let installed = install_with(
        &esp,
        Slot::B,
        "2.0.0",
        3,
        &extra,
        BootFile {
            path: &b.kernel,
            sha256: &b.kernel_sha,
        },
        BootFile {
            path: &b.initrd,
            sha256: &b.initrd_sha,
        },
    )
    .unwrap();
    let new = std::fs::read_to_string(esp.join(ENTRIES_DIR).join(&installed.file)).unwrap();
    assert_eq!(new, render_entry_with(Slot::B, "2.0.0", &extra));
    let options = new.lines().find(|l| l.starts_with("options ")).unwrap();
    assert!(
        options.ends_with("flotilla.slot=b flotilla.root=flotilla-root-b flotilla.var=flotilla-var flotilla.debug_shell=hvc0 loglevel=7"),
        "{options}"
    );
    assert_eq!(extra_options(&esp, Slot::B).unwrap(), extra);
}
