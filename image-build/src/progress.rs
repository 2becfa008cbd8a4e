//! Progress output: the numbered step lines of a build, their detail lines, spinners and
//! bars (shown only on a terminal), and byte counts in human units.

use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Prints step lines and runs spinners.
pub(crate) struct Steps {
    n: usize,
    total: usize,
    progress: bool,
    /// Put before every line: the steps of a build nested in another one are indented.
    indent: &'static str,
}

impl Steps {
    /// Steps numbered 1 to `total`, their lines prefixed with `indent`; spinners and bars
    /// only when `progress`.
    pub(crate) fn new(total: usize, progress: bool, indent: &'static str) -> Steps {
        Steps {
            n: 0,
            total,
            progress,
            indent,
        }
    }
    /// Prints the next step's numbered line.
    pub(crate) fn line(&mut self, text: &str) {
        self.n += 1;
        println!("{}[{}/{}] {text}", self.indent, self.n, self.total);
        let _ = std::io::stdout().flush();
    }
    /// A line under the current step.
    pub(crate) fn detail(&self, text: &str) {
        println!("{}      {text}", self.indent);
    }
    /// A note under the current step, above any spinner.
    pub(crate) fn note(&self, pb: &ProgressBar, text: &str) {
        if pb.is_hidden() {
            self.detail(text);
        } else {
            pb.println(format!("{}      {text}", self.indent));
        }
    }
    /// A progress bar under the current step (hidden without `progress`).
    pub(crate) fn bar(&self, template: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(1);
        pb.set_style(
            ProgressStyle::with_template(&format!("{}      {template}", self.indent))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    }
    /// A spinner showing `msg` under the current step (hidden without `progress`).
    pub(crate) fn spinner(&self, msg: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template(&format!(
                "{}      {{spinner}} [{{elapsed}}] {{wide_msg}}",
                self.indent
            ))
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_message(msg.to_string());
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    }
}

/// Bytes in a human unit.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}
