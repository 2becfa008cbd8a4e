//! Builds the container's pid 1 for `init = true` units: `reaper/src/main.rs` (the
//! `flotilla-reaper` package) compiled alone with rustc as a freestanding static program
//! (`--cfg flotilla_static`: its own `_start`, raw system calls, no C library, a few KB), so
//! that it runs in any image and costs little to start. The runtime embeds the result
//! (`include_bytes!(concat!(env!("OUT_DIR"), "/flotilla-reaper"))`) and executes it from a
//! sealed memfd.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let source = manifest.join("reaper/src/main.rs");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("flotilla-reaper");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rerun-if-changed={}", source.display());
    let status = Command::new(&rustc)
        .args([
            "--edition=2021",
            "--crate-name",
            "flotilla_reaper",
            "--crate-type",
            "bin",
        ])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "debuginfo=0",
        ])
        .args(["--cfg", "flotilla_static", "-C", "strip=symbols"])
        .args([
            "-C",
            "target-feature=+crt-static",
            "-C",
            "relocation-model=static",
        ])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["--target", &target])
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            println!(
                "cargo:warning=could not build the static flotilla-reaper ({other:?}): is the \
                 C library's static part installed (Debian: gcc, for the linker)?"
            );
            std::process::exit(1);
        }
    }
}
