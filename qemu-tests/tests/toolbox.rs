//! The gcc toolbox inside the booted host VM: `specs/host.toml` with the gcc image
//! (`specs/gcc.toml`) baked into the root image's read-only system store; `unitctl run`
//! compiles and runs a C program in it through the guest's debug shell.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::{boot, build_image, host_spec_with, shell, size_mb, specs, wait_marker};

const CMD: Duration = Duration::from_secs(60);
/// gcc under TCG, its files read from the erofs root for the first time.
const COMPILE: Duration = Duration::from_secs(900);
const GREETING: &str = "hello from the flotilla toolbox";

#[test]
fn gcc_toolbox_compiles_and_runs_a_program_in_the_vm() {
    let t = tempfile::tempdir().unwrap();
    let spec = host_spec_with(t.path(), |s| {
        s.root.images = vec![specs().join("gcc.toml")];
    });
    let image = build_image(&spec, t.path());
    println!(
        "root.img {:.1} MB (compression: {:?}), initramfs.img {:.1} MB",
        size_mb(&image, "root.img"),
        image_build::os::OsSpec::load(&spec)
            .unwrap()
            .root
            .compression,
        size_mb(&image, "initramfs.img")
    );
    let vm = boot(&image, &[]);
    wait_marker(&vm);
    let mut sh = shell(&vm);

    // The image comes from the system store, read-only; the writable store is empty.
    let list = sh.ok("unitctl image list", CMD).unwrap();
    let gcc = list
        .lines()
        .find(|l| l.starts_with("gcc "))
        .unwrap_or_else(|| panic!("no gcc in:\n{list}"));
    assert!(gcc.ends_with("/usr/share/flotilla/images"), "{list}");
    let rm = sh.run("unitctl image rm gcc", CMD).unwrap();
    assert_ne!(rm.status, 0);
    assert!(rm.output.contains("read-only store"), "{rm:?}");

    sh.ok(
        &format!(
            "mkdir -p /var/src && printf '%s\\n' '#include <stdio.h>' \
             'int main(void) {{ puts(\"{GREETING}\"); return 0; }}' > /var/src/hello.c"
        ),
        CMD,
    )
    .unwrap();
    // stdin from /dev/null: no terminal for the container, the shell's tty stays as it is.
    let toolbox = "unitctl run --image gcc --bind /var/src:/src --workdir /src --";
    let started = Instant::now();
    let out = sh
        .run(
            &format!("{toolbox} gcc -O2 -o hello hello.c </dev/null"),
            COMPILE,
        )
        .unwrap();
    let compile = started.elapsed();
    assert_eq!(out.status, 0, "{}\n{}", out.output, vm.console());
    println!(
        "toolbox gcc -O2 hello.c in the VM: {:.1} s",
        compile.as_secs_f64()
    );
    let started = Instant::now();
    sh.ok(
        &format!("{toolbox} gcc -O2 -o hello hello.c </dev/null"),
        COMPILE,
    )
    .unwrap();
    println!(
        "again (files cached): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let run = sh
        .ok(&format!("{toolbox} ./hello </dev/null"), CMD)
        .unwrap();
    assert_eq!(run.trim(), GREETING, "{run:?}");
    // The program was written to /var through the bind mount.
    let ls = sh.ok("ls -l /var/src/hello", CMD).unwrap();
    assert!(ls.starts_with("-rwx"), "{ls}");
}
