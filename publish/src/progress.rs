//! What publishing reports while it moves blobs. The library reports; the CLI draws
//! (kiln's indicatif bars), tests ignore it. Like kiln-client's `Progress`, every method
//! has a no-op default.

use std::sync::Arc;

use kiln_store::ContentHash;

/// What happened to one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobTransfer {
    /// The registry already had it.
    Existed,
    /// Mounted from the base image's repository.
    Mounted,
    /// Copied from the base image's registry.
    Copied,
    Uploaded,
}

pub trait PublishProgress: Send + Sync {
    /// A blob of `size` bytes starts moving (again, after a retried request).
    fn blob_started(&self, _digest: &ContentHash, _size: u64) {}
    /// `bytes` more of it went out.
    fn blob_progressed(&self, _digest: &ContentHash, _bytes: u64) {}
    /// It is in the registry, and this is how it got there.
    fn blob_finished(&self, _digest: &ContentHash, _transfer: BlobTransfer) {}
}

/// Reports nothing.
pub struct NoProgress;

impl PublishProgress for NoProgress {}

/// Where a publish reports its progress (nothing, by default).
#[derive(Clone)]
pub struct ProgressSink(pub Arc<dyn PublishProgress>);

impl Default for ProgressSink {
    fn default() -> Self {
        ProgressSink(Arc::new(NoProgress))
    }
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// One blob's progress, owned, so that a request body's stream can carry it.
#[derive(Clone)]
pub struct BlobProgress {
    sink: Arc<dyn PublishProgress>,
    digest: ContentHash,
    size: u64,
}

impl BlobProgress {
    /// Announces the blob (`blob_started`) and returns its handle.
    pub fn new(sink: &ProgressSink, digest: ContentHash, size: u64) -> Self {
        let progress = BlobProgress {
            sink: sink.0.clone(),
            digest,
            size,
        };
        progress.start();
        progress
    }

    /// Starts (or, for a retried request, restarts) the count from 0.
    pub fn start(&self) {
        self.sink.blob_started(&self.digest, self.size);
    }

    pub fn advance(&self, bytes: u64) {
        self.sink.blob_progressed(&self.digest, bytes);
    }

    pub fn finish(&self, transfer: BlobTransfer) {
        self.sink.blob_finished(&self.digest, transfer);
    }
}
