//! Units' output pipes: handed to the event loop to watch, read into the units' logs.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::Manager;
use crate::api::LogStream;
use crate::logs::LineBuffer;

/// One output pipe being read.
#[derive(Debug)]
pub(super) struct Pipe {
    pub(super) fd: OwnedFd,
    pub(super) unit: String,
    pub(super) stream: LogStream,
    pub(super) buf: LineBuffer,
    /// The pull helper's output (kept as manager lines, the last one remembered).
    pub(super) helper: bool,
}

impl Manager {
    /// Pipes opened since the last call: `(token, fd)` pairs to watch for input.
    pub fn take_new_pipes(&mut self) -> Vec<(usize, BorrowedFd<'_>)> {
        let idx = std::mem::take(&mut self.new_pipes);
        idx.into_iter()
            .filter_map(|i| {
                self.pipes
                    .get(i)
                    .and_then(|p| p.as_ref())
                    .map(|p| (i, p.fd.as_fd()))
            })
            .collect()
    }

    /// Read what pipe `token` has; closes it at end of file.
    pub fn on_output(&mut self, token: usize) {
        self.read_pipe(token);
    }

    /// Read what is left in `unit`'s pull helper pipes (the helper has exited, so all of its
    /// output is in the pipes already, unless something it left behind holds them open).
    pub(super) fn drain_helper_pipes(&mut self, unit: &str) {
        let tokens: Vec<usize> = self
            .pipes
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_ref().is_some_and(|p| p.helper && p.unit == unit))
            .map(|(i, _)| i)
            .collect();
        for t in tokens {
            // Bounded: each round reads up to 256 lines; stop when a round reads nothing.
            for _ in 0..64 {
                if self.read_pipe(t) == 0 {
                    break;
                }
            }
        }
    }

    /// Read what pipe `token` has (closing it at end of file); returns the lines read.
    fn read_pipe(&mut self, token: usize) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let Some(Some(pipe)) = self.pipes.get_mut(token) else {
            return 0;
        };
        let mut lines = Vec::new();
        let mut eof = false;
        loop {
            match nix::unistd::read(&pipe.fd, &mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => lines.extend(pipe.buf.feed(chunk.get(..n).unwrap_or_default())),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
            if lines.len() > 256 {
                break; // let other pipes have a turn; epoll reports this one again
            }
        }
        if eof {
            lines.extend(pipe.buf.finish());
        }
        let unit = pipe.unit.clone();
        let stream = pipe.stream;
        let helper = pipe.helper;
        let count = lines.len();
        if eof {
            if let Some(p) = self.pipes.get_mut(token) {
                *p = None;
            }
        }
        let cfg = &self.cfg.logs;
        if let Some(slot) = self.slots.get_mut(&unit) {
            for l in lines {
                if helper {
                    slot.pull_output(cfg, &l);
                } else if let Some(err) = slot.log.push(cfg, stream, &l) {
                    log::error!("{err}");
                }
            }
        }
        count
    }
}
