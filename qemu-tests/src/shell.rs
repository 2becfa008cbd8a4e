//! The guest's debug shell, driven over the virtio console's host socket: one command at a
//! time, each followed by an `echo` of a unique marker with its exit status.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{connect_until, QemuError, Result};

/// A connected debug shell.
pub struct Shell {
    stream: UnixStream,
    buf: String,
    next: u64,
}

/// What a command printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The shell's `$?` after the command.
    pub status: i32,
    /// Its standard output and error (the terminal merges them), `\r` removed.
    pub output: String,
}

impl Shell {
    /// Connects to the socket QEMU listens on and waits until the guest's shell answers,
    /// then turns echo off and empties the prompt.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Shell> {
        let deadline = Instant::now() + timeout;
        let stream = connect_until(path, deadline, "connect to the debug shell")?;
        let mut shell = Shell {
            stream,
            buf: String::new(),
            next: 0,
        };
        // The shell may not be up yet: ask again every few seconds until one answer comes.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QemuError::Setup(format!(
                    "the debug shell did not answer within {timeout:?}; it printed: {:?}",
                    shell.buf
                )));
            }
            shell.send("stty -echo 2>/dev/null; PS1=''; PS2=''; export PS1 PS2")?;
            if shell.finish(left.min(Duration::from_secs(5))).is_ok() {
                return Ok(shell);
            }
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let bytes = format!("{line}\n");
        self.stream
            .write_all(bytes.as_bytes())
            .map_err(|e| QemuError::Setup(format!("write to the debug shell: {e}")))
    }

    /// Sends the marker command and reads until its answer; returns what came before it.
    fn finish(&mut self, timeout: Duration) -> Result<CommandOutput> {
        self.next += 1;
        let id = self.next;
        let tag = format!("__flotilla_done_{id}_");
        self.send(&format!("echo {tag}$?__"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = find_marker(&self.buf, &tag) {
                let (status, before, after) = found;
                // The newline that ended the previous marker's line may arrive late.
                let output = self
                    .buf
                    .get(..before)
                    .unwrap_or_default()
                    .trim_start_matches('\n')
                    .to_string();
                self.buf = self.buf.get(after..).unwrap_or_default().to_string();
                return Ok(CommandOutput { status, output });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QemuError::Setup(format!(
                    "no answer from the debug shell after {timeout:?}; so far: {:?}",
                    self.buf
                )));
            }
            self.stream
                .set_read_timeout(Some((deadline - now).min(Duration::from_millis(500))))
                .map_err(|e| QemuError::Setup(format!("debug shell socket: {e}")))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QemuError::Setup("the debug shell socket closed".into())),
                Ok(n) => {
                    let text = String::from_utf8_lossy(chunk.get(..n).unwrap_or_default());
                    self.buf.push_str(&text.replace('\r', ""));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(QemuError::Setup(format!("read the debug shell: {e}"))),
            }
        }
    }

    /// Runs `command` (one shell line) and returns its output and status.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<CommandOutput> {
        // Whatever arrived unasked (kernel messages on the console) is not this command's.
        self.buf.clear();
        self.send(command)?;
        self.finish(timeout)
    }

    /// [`Shell::run`] that fails unless the status is 0; returns the output.
    pub fn ok(&mut self, command: &str, timeout: Duration) -> Result<String> {
        let out = self.run(command, timeout)?;
        if out.status != 0 {
            return Err(QemuError::Setup(format!(
                "`{command}` exited with {}: {}",
                out.status, out.output
            )));
        }
        Ok(out.output)
    }
}

/// Finds `TAG<digits>__` in `buf`: (status, where the marker starts, end of its line).
fn find_marker(buf: &str, tag: &str) -> Option<(i32, usize, usize)> {
    let mut from = 0;
    while let Some(i) = buf.get(from..)?.find(tag) {
        let start = from + i;
        let rest = buf.get(start + tag.len()..)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && rest.get(digits.len()..)?.starts_with("__") {
            let status = digits.parse().ok()?;
            let end = start + tag.len() + digits.len() + 2;
            let end = buf
                .get(end..)?
                .find('\n')
                .map_or(buf.len(), |n| end + n + 1);
            // Text before the marker on its line belongs to the output (no final newline).
            return Some((status, start, end));
        }
        from = start + tag.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_only_with_a_status() {
        let tag = "__flotilla_done_3_";
        // The echoed command (literal `$?`) is not the answer.
        assert_eq!(find_marker("echo __flotilla_done_3_$?__\n", tag), None);
        let buf = "hello\n__flotilla_done_3_0__\nrest";
        let (status, before, end) = find_marker(buf, tag).unwrap_or((-1, 0, 0));
        assert_eq!(status, 0);
        assert_eq!(buf.get(..before), Some("hello\n"));
        assert_eq!(buf.get(end..), Some("rest"));
        let (status, ..) = find_marker("x__flotilla_done_3_127__\n", tag).unwrap_or((-1, 0, 0));
        assert_eq!(status, 127);
    }
}
