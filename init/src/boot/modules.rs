//! Kernel modules: the image lists them (dependencies first); PID 1 loads them with
//! finit_module(2).

use std::fs;
use std::path::Path;

use nix::errno::Errno;

use super::step;

/// Load the modules listed in `list` (one `.ko` path per line, dependencies first) with
/// finit_module(2). Already loaded or built in is fine. A missing list means no modules.
pub fn load_modules(list: &Path) {
    let Ok(text) = fs::read_to_string(list) else {
        log::info!("no module list at {}; loading none", list.display());
        return;
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        step(&format!("load module {line}"), || {
            load_module(Path::new(line))
        });
    }
}

fn load_module(path: &Path) -> Result<(), String> {
    let file = fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
