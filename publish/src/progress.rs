//! Per-blob progress bars on stderr; drawn only when stderr is a terminal.

use std::io::IsTerminal as _;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bars: MultiProgress,
}

impl Progress {
    /// Bars are drawn when `wanted` and stderr is a terminal, and hidden otherwise.
    pub fn new(wanted: bool) -> Self {
        let target = if wanted && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Progress {
            bars: MultiProgress::with_draw_target(target),
        }
    }

    /// A byte-count bar for one blob.
    pub fn blob(&self, label: &str, total: u64) -> ProgressBar {
        let bar = self.bars.add(ProgressBar::new(total));
        let style =
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        bar
    }
}
