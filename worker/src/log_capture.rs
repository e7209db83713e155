//! Capturing an action's stdout or stderr with a cap: the command writes into a pipe, and
//! a task copies at most `max_bytes` of it into the log file the ActionResult will name,
//! reading and dropping the rest so that the command never blocks on a full pipe. A log
//! cut short ends with a line that says so, since REAPI's ActionResult has no field for it.
//!
//! Without the cap, a command printing in a loop would grow the worker's in-memory log
//! file until the machine runs out of memory.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

use crate::WorkerError;

/// How long to wait for the pipe to close once the command's process group is gone; a
/// process that left the group (setsid) may hold it open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// One capture in progress.
pub(crate) struct LogCapture {
    /// The pipe's write end, for the command; drop it once the command holds its copy.
    pub(crate) writer: Option<File>,
    copying: JoinHandle<u64>,
}

impl LogCapture {
    /// Starts copying into `log` (named `stream` in the truncation note).
    pub(crate) fn start(
        log: Arc<File>,
        max_bytes: u64,
        stream: &'static str,
    ) -> Result<Self, WorkerError> {
        let (reader, writer) = std::io::pipe().map_err(WorkerError::io("creating a log pipe"))?;
        let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
            .map_err(WorkerError::io("watching a log pipe"))?;
        let copying = tokio::spawn(copy_capped(reader, log, max_bytes, stream));
        Ok(LogCapture {
            writer: Some(File::from(OwnedFd::from(writer))),
            copying,
        })
    }

    /// Waits for the copy to end (the command and its group are gone); returns the bytes
    /// dropped past the cap.
    pub(crate) async fn finish(mut self) -> u64 {
        self.writer = None;
        match tokio::time::timeout(DRAIN_AFTER_EXIT, &mut self.copying).await {
            Ok(Ok(dropped)) => dropped,
            Ok(Err(_)) => 0,
            Err(_) => {
                tracing::warn!("a process outside the action's group kept its log open");
                self.copying.abort();
                0
            }
        }
    }
}

/// Copies the pipe into `log` up to `max_bytes`, then drops the rest; returns how much it
/// dropped.
async fn copy_capped(
    mut pipe: tokio::net::unix::pipe::Receiver,
    log: Arc<File>,
    max_bytes: u64,
    stream: &'static str,
) -> u64 {
    let mut buffer = vec![0u8; 64 << 10];
    let (mut kept, mut dropped) = (0u64, 0u64);
    loop {
        let n = match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let room = max_bytes.saturating_sub(kept).min(n as u64) as usize;
        // The log is an in-memory file: writing to it does not block.
        if room > 0 && (&*log).write_all(&buffer[..room]).is_err() {
            break;
        }
        kept += room as u64;
        dropped += (n - room) as u64;
    }
    if dropped > 0 {
        metrics::counter!("kiln_worker_log_bytes_dropped_total", "stream" => stream)
            .increment(dropped);
        let note = format!(
            "\n[kiln: {stream} truncated: the action wrote {} bytes; only the first {kept} are kept (worker.max_log_bytes)]\n",
            kept + dropped
        );
        let _ = (&*log).write_all(note.as_bytes());
    }
    dropped
}
