//! Progress on the terminal: a bar with loss, tokens/s and ETA when stderr is a terminal, a
//! plain line per interval otherwise (CI logs, pipes).

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    /// What a count counts, in the plain lines: `step` unless [`Progress::unit`] says.
    unit: String,
    total: usize,
    start: Instant,
    start_step: usize,
}

/// Whether progress is drawn as bars: on a terminal, unless `TEMPER_NO_BAR` is set.
pub fn bars_shown() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("TEMPER_NO_BAR").is_none()
}

impl Progress {
    pub fn new(label: &str, start_step: usize, total: usize) -> Self {
        let bar = if bars_shown() {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b.set_position(start_step as u64);
            Some(b)
        } else {
            None
        };
        Self {
            bar,
            label: label.to_string(),
            unit: "step".into(),
            total,
            start: Instant::now(),
            start_step,
        }
    }

    /// Counts `unit`s (rows, prompts) instead of steps.
    pub fn unit(mut self, unit: &str) -> Self {
        self.unit = unit.into();
        self
    }

    /// Called every logging interval with the step just finished and its summary.
    pub fn update(&self, step: usize, summary: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(summary.to_string());
            }
            None => {
                let done = step.saturating_sub(self.start_step).max(1) as f64;
                let per = self.start.elapsed().as_secs_f64() / done;
                let eta = per * self.total.saturating_sub(step) as f64;
                errln!(
                    "[{}] {} {step}/{} {summary} eta {}",
                    self.label,
                    self.unit,
                    self.total,
                    fmt_secs(eta)
                );
            }
        }
    }

    /// A line that should stay on screen (evaluation results).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => errln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
