//! The blobs one upload may need to send, and where each one's bytes come from.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use kiln_store::{Digest, DigestFunction};

use crate::{ClientError, Result};

/// Where a blob's bytes are.
#[derive(Clone, Debug)]
pub enum BlobSource {
    /// In memory (encoded protos).
    Bytes(Bytes),
    /// A file by path (a working-tree input, an action's output).
    File(PathBuf),
    /// An open file read from its start, leaving its own offset alone (a worker's
    /// captured stdout or stderr, which has no path).
    Open(Arc<File>),
}

impl BlobSource {
    /// The whole blob, for a batch upload (callers only do this for small blobs).
    pub(crate) async fn read_all(&self) -> Result<Vec<u8>> {
        match self {
            BlobSource::Bytes(bytes) => Ok(bytes.to_vec()),
            BlobSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| ClientError::io(path, e)),
            BlobSource::Open(file) => {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut OpenFileReader::new(file.clone()), &mut data)
                    .map_err(|e| ClientError::io("a captured log", e))?;
                Ok(data)
            }
        }
    }
}

/// Reads a shared open file from its start with positional reads, leaving the file's own
/// offset alone.
pub struct OpenFileReader {
    file: Arc<File>,
    offset: u64,
}

impl OpenFileReader {
    pub fn new(file: Arc<File>) -> Self {
        OpenFileReader { file, offset: 0 }
    }
}

impl std::io::Read for OpenFileReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buffer, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Blobs by digest. Adding the same digest twice keeps the first source.
#[derive(Clone, Debug, Default)]
pub struct BlobSet {
    blobs: HashMap<Digest, BlobSource>,
}

impl BlobSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds in-memory bytes and returns their digest.
    pub fn add_bytes(&mut self, function: DigestFunction, bytes: Bytes) -> Digest {
        let digest = Digest::of_bytes(function, &bytes);
        self.blobs.entry(digest).or_insert(BlobSource::Bytes(bytes));
        digest
    }

    /// Adds a blob whose digest is already known.
    pub fn insert(&mut self, digest: Digest, source: BlobSource) {
        self.blobs.entry(digest).or_insert(source);
    }

    pub fn get(&self, digest: &Digest) -> Option<&BlobSource> {
        self.blobs.get(digest)
    }

    pub fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.blobs.keys()
    }

    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    pub fn total_bytes(&self) -> u64 {
        self.blobs.keys().map(|d| d.size).sum()
    }
}

impl FromIterator<(Digest, BlobSource)> for BlobSet {
    fn from_iter<I: IntoIterator<Item = (Digest, BlobSource)>>(blobs: I) -> Self {
        let mut set = BlobSet::new();
        for (digest, source) in blobs {
            set.insert(digest, source);
        }
        set
    }
}
