//! Per-unit output capture: an in-memory tail plus a size-rotated file.
//!
//! The manager reads every unit's pipes as soon as they are readable, so a unit never
//! blocks on output whether or not anybody is looking; lines go to the tail (for `unitctl
//! logs`) and to `STATE/logs/NAME.log` with a timestamp and the stream name. When the file
//! passes the size limit it is rotated to `NAME.log.1` … `NAME.log.K`. Lines the manager
//! writes about a unit ([`MANAGER_STREAM`]) are kept in the tail only.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::api::{LogEntry, LogStream};

/// Stream name of lines the manager writes about a unit. They live in the in-memory tail
/// only (failures also go to the manager's own log): a unit's file holds what the unit
/// printed, and a unit that prints nothing costs no file.
pub const MANAGER_STREAM: LogStream = LogStream::Manager;

/// Longest line kept whole; longer output is split.
pub const MAX_LINE: usize = 8192;

/// Log settings shared by all units.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Directory of the log files; `None` keeps only the in-memory tail.
    pub dir: Option<PathBuf>,
    /// Rotate a file when it grows beyond this many bytes.
    pub max_file_size: u64,
    /// Rotated files kept (`NAME.log.1` … `NAME.log.K`).
    pub keep_files: u32,
    /// Lines kept in memory per unit.
    pub tail_lines: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_file_size: 1024 * 1024,
            keep_files: 3,
            tail_lines: 200,
        }
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How finely [`format_time`] prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// `2026-11-24T10:00:00Z`
    Seconds,
    /// `2026-11-24T10:00:00.123Z`
    Millis,
    /// `2026-11-24T10:00:00.123456Z`
    Micros,
}

/// RFC 3339 UTC timestamp for `us` microseconds since the epoch.
pub fn format_time(us: u64, precision: Precision) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_micros(us);
    match precision {
        Precision::Seconds => humantime::format_rfc3339_seconds(t).to_string(),
        Precision::Millis => humantime::format_rfc3339_millis(t).to_string(),
        Precision::Micros => humantime::format_rfc3339_micros(t).to_string(),
    }
}

/// One unit's log.
#[derive(Debug)]
pub struct UnitLog {
    name: String,
    tail: VecDeque<LogEntry>,
    next_seq: u64,
    file: Option<File>,
    file_size: u64,
    /// Set after a write error so the error is reported once, not per line.
    file_failed: bool,
}

impl UnitLog {
    /// An empty log for unit `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            tail: VecDeque::new(),
            next_seq: 1,
            file: None,
            file_size: 0,
            file_failed: false,
        }
    }

    /// Append one line; returns an error message the first time the file cannot be written.
    pub fn push(&mut self, cfg: &LogConfig, stream: LogStream, line: &str) -> Option<String> {
        let entry = LogEntry {
            seq: self.next_seq,
            time_us: now_us(),
            stream: stream.into(),
            line: line.to_string(),
        };
        self.next_seq += 1;
        let err = match &cfg.dir {
            Some(dir) if !self.file_failed && stream != MANAGER_STREAM => {
                match self.write_file(cfg, dir, &entry) {
                    Ok(()) => None,
                    Err(e) => {
                        self.file_failed = true;
                        Some(format!(
                        "cannot write the log of {} under {}: {e}; keeping only the in-memory tail",
                        self.name,
                        dir.display()
                    ))
                    }
                }
            }
            _ => None,
        };
        if cfg.tail_lines > 0 {
            while self.tail.len() >= cfg.tail_lines {
                self.tail.pop_front();
            }
            self.tail.push_back(entry);
        }
        err
    }

    /// The newest `lines` entries with `seq > after_seq`, oldest first.
    pub fn tail(&self, lines: usize, after_seq: u64) -> Vec<LogEntry> {
        let newer: Vec<&LogEntry> = self.tail.iter().filter(|e| e.seq > after_seq).collect();
        let skip = newer.len().saturating_sub(lines);
        newer.into_iter().skip(skip).cloned().collect()
    }

    fn path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.log"))
    }

    fn write_file(&mut self, cfg: &LogConfig, dir: &Path, e: &LogEntry) -> io::Result<()> {
        let text = format!(
            "{} {} {}\n",
            format_time(e.time_us, Precision::Micros),
            e.stream,
            e.line
        );
        if self.file.is_some() && self.file_size + text.len() as u64 > cfg.max_file_size {
            self.file = None;
            rotate(&Self::path(dir, &self.name), cfg.keep_files)?;
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                fs::create_dir_all(dir)?;
                let path = Self::path(dir, &self.name);
                let f = OpenOptions::new().create(true).append(true).open(&path)?;
                self.file_size = f.metadata()?.len();
                self.file.insert(f)
            }
        };
        file.write_all(text.as_bytes())?;
        self.file_size += text.len() as u64;
        Ok(())
    }
}

/// Shift `P.1 … P.(keep-1)` up by one and move `P` to `P.1`; `keep = 0` just truncates.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |i: u32| PathBuf::from(format!("{}.{i}", path.display()));
    if keep == 0 {
        return fs::remove_file(path);
    }
    for i in (1..keep).rev() {
        let from = numbered(i);
        if from.exists() {
            fs::rename(&from, numbered(i + 1))?;
        }
    }
    fs::rename(path, numbered(1))
}

/// Splits a byte stream into lines, holding back an unfinished last line.
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Feed bytes; returns the complete lines (lossily decoded, without newline).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
            let rest = self.pending.split_off(pos + 1);
            let mut line = std::mem::replace(&mut self.pending, rest);
            line.pop();
            out.push(String::from_utf8_lossy(&line).into_owned());
        }
        while self.pending.len() >= MAX_LINE {
            let rest = self.pending.split_off(MAX_LINE);
            let line = std::mem::replace(&mut self.pending, rest);
            out.push(String::from_utf8_lossy(&line).into_owned());
        }
        out
    }

    /// The unfinished last line, if any (at end of stream).
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            None
        } else {
            let line = std::mem::take(&mut self.pending);
            Some(String::from_utf8_lossy(&line).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn splits_lines_and_keeps_partial() {
        let mut b = LineBuffer::default();
        assert_eq!(b.feed(b"a\nb"), vec!["a"]);
        assert_eq!(b.feed(b"c\n\n"), vec!["bc", ""]);
        assert_eq!(b.feed(b"tail"), Vec::<String>::new());
        assert_eq!(b.finish(), Some("tail".into()));
        assert_eq!(b.finish(), None);
    }

    #[test]
    fn splits_overlong_lines() {
        let mut b = LineBuffer::default();
        let lines = b.feed(&vec![b'x'; MAX_LINE * 2 + 5]);
        assert_eq!(lines.len(), 2);
        assert_eq!(b.finish().map(|s| s.len()), Some(5));
    }

    #[test]
    fn tail_is_bounded_and_follows_seq() {
        let cfg = LogConfig {
            tail_lines: 3,
            ..LogConfig::default()
        };
        let mut log = UnitLog::new("u");
        for i in 0..5 {
            log.push(&cfg, LogStream::Stdout, &format!("l{i}"));
        }
        let all = log.tail(10, 0);
        assert_eq!(
            all.iter().map(|e| e.line.as_str()).collect::<Vec<_>>(),
            ["l2", "l3", "l4"]
        );
        assert_eq!(log.tail(1, 0)[0].line, "l4");
        assert_eq!(log.tail(10, all[1].seq).len(), 1);
    }

    #[test]
    fn manager_lines_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            dir: Some(dir.path().to_path_buf()),
            ..LogConfig::default()
        };
        let mut log = UnitLog::new("quiet");
        log.push(&cfg, MANAGER_STREAM, "Started.");
        assert_eq!(log.tail(10, 0).len(), 1);
        assert!(!dir.path().join("quiet.log").exists());
    }

    #[test]
    fn rotates_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            dir: Some(dir.path().to_path_buf()),
            max_file_size: 200,
            keep_files: 2,
            tail_lines: 10,
        };
        let mut log = UnitLog::new("svc");
        for i in 0..40 {
            assert_eq!(
                log.push(&cfg, LogStream::Stdout, &format!("line number {i}")),
                None
            );
        }
        let cur = fs::read_to_string(dir.path().join("svc.log")).unwrap();
        assert!(cur.len() <= 200, "current file {} bytes", cur.len());
        assert!(cur.contains("stdout line number 39"));
        assert!(dir.path().join("svc.log.1").exists());
        assert!(dir.path().join("svc.log.2").exists());
        assert!(!dir.path().join("svc.log.3").exists());
    }
}
