//! The ACPI power button (QEMU's `system_powerdown`): the `button` driver reports it as an
//! input device named "Power Button"; a thread reads its events (evdev) and turns a press
//! into SIGUSR2 for PID 1, whose event loop already powers off on that signal.

use std::fs;
use std::io::Read;
use std::path::PathBuf;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The input device name the ACPI button driver gives the power button.
pub const POWER_BUTTON: &str = "Power Button";
/// `EV_KEY`, `KEY_POWER` (linux/input-event-codes.h).
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit: a timeval (16 bytes), type, code (u16 each), value (i32).
const EVENT_SIZE: usize = 24;

/// The `/dev/input/eventN` devices whose name is [`POWER_BUTTON`].
pub fn power_buttons() -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir("/sys/class/input") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = dir
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            fs::read_to_string(e.path().join("device/name")).is_ok_and(|n| n.trim() == POWER_BUTTON)
        })
        .map(|e| PathBuf::from("/dev/input").join(e.file_name()))
        .collect();
    found.sort();
    found
}

/// Whether one `input_event` is a press of the power key.
pub fn is_power_press(event: &[u8]) -> bool {
    let u16_at = |o: usize| {
        event
            .get(o..o + 2)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_le_bytes)
    };
    let value = event
        .get(20..24)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(i32::from_le_bytes);
    u16_at(16) == Some(EV_KEY) && u16_at(18) == Some(KEY_POWER) && value == Some(1)
}

/// Starts one watcher thread per power button; returns how many were found.
pub fn watch() -> usize {
    let buttons = power_buttons();
    for dev in &buttons {
        let Ok(mut file) = fs::File::open(dev) else {
            log::warn!("cannot open the power button {}", dev.display());
            continue;
        };
        let dev = dev.clone();
        let spawned = std::thread::Builder::new()
            .name("power-button".into())
            .spawn(move || {
                let mut buf = [0u8; EVENT_SIZE * 16];
                loop {
                    match file.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let events = buf.get(..n).unwrap_or_default();
                            if events.chunks_exact(EVENT_SIZE).any(is_power_press) {
                                log::info!("power button pressed: powering off");
                                let _ = kill(Pid::this(), Signal::SIGUSR2);
                            }
                        }
                    }
                }
                log::warn!("stopped reading the power button {}", dev.display());
            });
        if let Err(e) = spawned {
            log::warn!("cannot watch the power button: {e}");
        }
    }
    buttons.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend(ty.to_le_bytes());
        e.extend(code.to_le_bytes());
        e.extend(value.to_le_bytes());
        e
    }

    #[test]
    fn recognises_a_power_press() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0))); // release
        assert!(!is_power_press(&event(EV_KEY, 30, 1))); // another key
        assert!(!is_power_press(&event(0, 0, 0))); // EV_SYN
        assert!(!is_power_press(&[1, 2, 3]));
    }
}
