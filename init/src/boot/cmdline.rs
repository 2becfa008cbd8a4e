//! The kernel command line's `flotilla.*` options (`/proc/cmdline`).
//!
//! | option | meaning |
//! |---|---|
//! | `flotilla.root=NAME` | the root disk's virtio serial, GPT partition name or label (default `flotilla-root`; `flotilla-root-a` on `disk.img`) |
//! | `flotilla.var=NAME` | the `/var` disk's virtio serial, GPT partition name or label (default `flotilla-var`) |
//! | `flotilla.slot=a` | the root slot the boot loader booted (`disk.img`'s entries set it); logged at boot, read from `/proc/cmdline` by whoever needs it |
//! | `flotilla.config=BASE64` | a provisioning config (TOML, base64), if there is no fw_cfg one |
//! | `flotilla.debug_shell=TTY` | a root shell on `/dev/TTY` (e.g. `ttyS1`), for debugging and tests |
//! | `flotilla.shutdown_timeout=DURATION` | how long a shutdown may take before every unit's processes are killed (default `90s`; `flotilla-init --shutdown-timeout`) |

use std::collections::BTreeMap;

/// The `flotilla.*` options, by name without the prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline(BTreeMap<String, String>);

impl Cmdline {
    /// Parses command line text: space-separated words, `flotilla.KEY=VALUE` kept (a later
    /// one wins), `flotilla.KEY` alone kept with an empty value.
    pub fn parse(text: &str) -> Cmdline {
        Cmdline(
            text.split_whitespace()
                .filter_map(|w| w.strip_prefix("flotilla."))
                .map(|w| match w.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (w.to_string(), String::new()),
                })
                .collect(),
        )
    }

    /// Reads `/proc/cmdline` (empty when unreadable).
    pub fn read() -> Cmdline {
        Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }

    /// The value of `flotilla.KEY`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `flotilla.KEY` as a duration (`90s`, `500ms`, `2m`, or seconds), or `default` when it
    /// is absent; a bad value is logged and `default` used (PID 1 must boot regardless).
    pub fn duration_or(&self, key: &str, default: std::time::Duration) -> std::time::Duration {
        match self.get(key).map(flotilla_units::parse_duration) {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                log::warn!(
                    "ignoring flotilla.{key} on the kernel command line: {e}; using \
                     {default:?} (write e.g. flotilla.{key}=90s)"
                );
                default
            }
            None => default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_flotilla_options() {
        let c = Cmdline::parse(
            "console=ttyS0 quiet flotilla.root=r1 flotilla.debug_shell=ttyS1 flotilla.root=r2 flotilla.x\n",
        );
        assert_eq!(c.get("root"), Some("r2"));
        assert_eq!(c.get("debug_shell"), Some("ttyS1"));
        assert_eq!(c.get("x"), Some(""));
        assert_eq!(c.get("console"), None);
    }

    #[test]
    fn durations_fall_back_to_the_default() {
        use std::time::Duration;
        let c = Cmdline::parse("flotilla.shutdown_timeout=5s flotilla.bad=soon");
        let d = Duration::from_secs(90);
        assert_eq!(c.duration_or("shutdown_timeout", d), Duration::from_secs(5));
        assert_eq!(c.duration_or("bad", d), d);
        assert_eq!(c.duration_or("absent", d), d);
    }
}
