//! `kiln publish`'s per-blob progress bars on stderr, drawn only when stderr is a
//! terminal: kiln-publish reports (`PublishProgress`), this draws.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_publish::{BlobTransfer, PublishProgress};
use kiln_store::ContentHash;

pub struct PublishBars {
    bars: MultiProgress,
    by_digest: Mutex<HashMap<ContentHash, ProgressBar>>,
}

impl PublishBars {
    /// Bars are drawn when `wanted` and stderr is a terminal, and hidden otherwise.
    pub fn new(wanted: bool) -> Self {
        let target = if wanted && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        PublishBars {
            bars: MultiProgress::with_draw_target(target),
            by_digest: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, digest: &ContentHash) -> Option<ProgressBar> {
        self.by_digest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }
}

/// `sha256:0123…` as its first 12 hex digits.
fn short(digest: &ContentHash) -> String {
    hex::encode(&digest.bytes[..6])
}

impl PublishProgress for PublishBars {
    fn blob_started(&self, digest: &ContentHash, size: u64) {
        if let Some(bar) = self.bar(digest) {
            bar.set_position(0);
            return;
        }
        let bar = self.bars.add(ProgressBar::new(size));
        let style =
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(short(digest));
        self.by_digest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*digest, bar);
    }

    fn blob_progressed(&self, digest: &ContentHash, bytes: u64) {
        if let Some(bar) = self.bar(digest) {
            bar.inc(bytes);
        }
    }

    fn blob_finished(&self, digest: &ContentHash, transfer: BlobTransfer) {
        let Some(bar) = self.bar(digest) else { return };
        let message = match transfer {
            BlobTransfer::Existed => "exists",
            BlobTransfer::Mounted => "mounted",
            BlobTransfer::Copied => "copied",
            BlobTransfer::Uploaded => "pushed",
        };
        if let Some(total) = bar.length() {
            bar.set_position(total);
        }
        bar.finish_with_message(message);
    }
}
