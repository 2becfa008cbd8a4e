//! Shared by the fleetd tests that run a real `flotilla-init`.

use std::path::{Path, PathBuf};

/// The `flotilla-init` binary: `$FLOTILLA_INIT_BIN`, else `target/<profile>/flotilla-init`
/// next to this test's `deps/` (`CARGO_BIN_EXE_*` does not reach across crates, so
/// `cargo build -p flotilla-init` must have run; `cargo test --workspace` does it).
pub fn init_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("FLOTILLA_INIT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("flotilla-init");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p flotilla-init` first (or set FLOTILLA_INIT_BIN)",
        bin.display()
    );
    bin
}
