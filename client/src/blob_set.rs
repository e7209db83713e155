//! The blobs one run may need to upload, and where each one's bytes come from.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use kiln_store::{Digest, DigestFunction};

/// Where a blob's bytes are: in memory (protos) or in a file of the working tree.
#[derive(Clone, Debug)]
pub enum BlobSource {
    Bytes(Bytes),
    File(PathBuf),
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
