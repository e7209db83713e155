//! The metadata store: small records in named keyspaces.
//!
//! Callers go through [`MetadataStore`] so that another engine (PostgreSQL for several
//! servers, or redb/fjall embedded) can replace sled without touching them; every backend
//! passes the same conformance suite (`kiln_store::conformance`, feature `conformance`).
//! Writes are visible at once but durable only after [`MetadataStore::flush`]; callers
//! flush before acknowledging anything that must survive a crash. Blobs never go here.

mod memory_store;
mod sled_store;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use memory_store::MemoryMetadataStore;
pub use sled_store::SledMetadataStore;

/// A named keyspace. Each crate declares the ones it owns next to the code that uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Keyspace(pub &'static str);

/// Key-value pairs, as returned by scans.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The most entries one [`MetadataStore::scan`] returns, whatever limit it is asked for:
/// a page is held in memory, so its size is the store's to bound, not the caller's.
pub const MAX_SCAN_PAGE: usize = 1000;

/// What can go wrong in a metadata backend. No backend's own error type appears here, so
/// that callers never depend on which engine is underneath.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The engine failed (its message, for the log).
    #[error("metadata backend: {0}")]
    Backend(String),
    /// The database could not be reached (a shared backend down or restarting); the
    /// client may retry.
    #[error("the metadata store is unavailable: {0}")]
    Unavailable(String),
    #[error("metadata I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A [`WriteBatch`]'s expectation did not hold; nothing was written. The caller reads
    /// again and decides anew.
    #[error("a conditional write found {key:?} in {space:?} changed")]
    Conflict { space: &'static str, key: String },
}

impl MetadataError {
    fn conflict(space: Keyspace, key: &[u8]) -> Self {
        MetadataError::Conflict {
            space: space.0,
            key: String::from_utf8_lossy(key).into_owned(),
        }
    }
}

pub type MetadataResult<T> = std::result::Result<T, MetadataError>;

/// Writes to apply together: all of them become visible at once, or none does. With
/// expectations, only if each expected key still holds its expected value (else
/// [`MetadataError::Conflict`] and nothing is written): a read-check-write made atomic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// Keys whose value (None: absent) must be what it was when the caller read it.
    expectations: Vec<(Keyspace, Vec<u8>, Option<Vec<u8>>)>,
    /// In order; a later write to the same key wins.
    writes: Vec<(Keyspace, Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, space: Keyspace, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.push((space, key.into(), Some(value.into())));
    }

    pub fn delete(&mut self, space: Keyspace, key: impl Into<Vec<u8>>) {
        self.writes.push((space, key.into(), None));
    }

    /// Applies the batch only if `key` still holds `value` (None: is absent).
    pub fn expect(&mut self, space: Keyspace, key: impl Into<Vec<u8>>, value: Option<Vec<u8>>) {
        self.expectations.push((space, key.into(), value));
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.expectations.is_empty()
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// The writes in order: keyspace, key, and the new value (None deletes).
    pub fn writes(&self) -> impl Iterator<Item = (Keyspace, &[u8], Option<&[u8]>)> {
        self.writes
            .iter()
            .map(|(space, key, value)| (*space, key.as_slice(), value.as_deref()))
    }

    /// The expectations: keyspace, key, and the value it must hold (None: absent).
    pub fn expectations(&self) -> impl Iterator<Item = (Keyspace, &[u8], Option<&[u8]>)> {
        self.expectations
            .iter()
            .map(|(space, key, value)| (*space, key.as_slice(), value.as_deref()))
    }

    /// Every keyspace the batch reads or writes, sorted and once each.
    pub fn keyspaces(&self) -> Vec<Keyspace> {
        let mut spaces: Vec<Keyspace> = self
            .expectations()
            .chain(self.writes())
            .map(|(space, _, _)| space)
            .collect();
        spaces.sort();
        spaces.dedup();
        spaces
    }
}

#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    async fn get(&self, space: Keyspace, key: &[u8]) -> MetadataResult<Option<Vec<u8>>>;

    /// Stores `value`, returning the previous one.
    async fn insert(
        &self,
        space: Keyspace,
        key: &[u8],
        value: &[u8],
    ) -> MetadataResult<Option<Vec<u8>>>;

    /// Removes a key, returning its value.
    async fn remove(&self, space: Keyspace, key: &[u8]) -> MetadataResult<Option<Vec<u8>>>;

    /// Atomically replaces `expected` (None: absent) with `new` (None: delete).
    /// On a conflict, returns the value actually present.
    async fn compare_and_swap(
        &self,
        space: Keyspace,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> MetadataResult<std::result::Result<(), Option<Vec<u8>>>>;

    /// Applies every write of `batch` atomically: a reader sees all of them or none. If an
    /// expectation does not hold, nothing is written and the result is
    /// [`MetadataError::Conflict`].
    async fn apply(&self, batch: WriteBatch) -> MetadataResult<()>;

    /// Entries whose key starts with `prefix`, in key order, after `after` when given (for
    /// pagination; an `after` that sorts before the prefix starts at the prefix). At most
    /// `limit` entries, and never more than [`MAX_SCAN_PAGE`].
    async fn scan(
        &self,
        space: Keyspace,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> MetadataResult<Vec<Entry>>;

    /// Makes every write so far durable.
    async fn flush(&self) -> MetadataResult<()>;
}

/// Every entry under `prefix`, in key order, a page at a time: for callers that must
/// visit a whole keyspace (garbage collection, status) without holding it in memory.
pub fn scan_stream(
    store: Arc<dyn MetadataStore>,
    space: Keyspace,
    prefix: Vec<u8>,
) -> BoxStream<'static, MetadataResult<Entry>> {
    scan_stream_after(store, space, prefix, None)
}

/// [`scan_stream`] from just after `after` (as [`MetadataStore::scan`] takes it).
pub fn scan_stream_after(
    store: Arc<dyn MetadataStore>,
    space: Keyspace,
    prefix: Vec<u8>,
    after: Option<Vec<u8>>,
) -> BoxStream<'static, MetadataResult<Entry>> {
    use futures::StreamExt;
    struct Cursor {
        store: Arc<dyn MetadataStore>,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        done: bool,
    }
    let cursor = Cursor {
        store,
        prefix,
        after,
        done: false,
    };
    futures::stream::try_unfold(cursor, move |mut cursor| async move {
        if cursor.done {
            return Ok(None);
        }
        let page = cursor
            .store
            .scan(
                space,
                &cursor.prefix,
                cursor.after.as_deref(),
                MAX_SCAN_PAGE,
            )
            .await?;
        cursor.done = page.len() < MAX_SCAN_PAGE;
        cursor.after = page.last().map(|(key, _)| key.clone());
        Ok(Some((
            futures::stream::iter(page.into_iter().map(Ok)),
            cursor,
        )))
    })
    .map(|page| match page {
        Ok(entries) => entries.boxed(),
        Err(e) => futures::stream::iter([Err(e)]).boxed(),
    })
    .flatten()
    .boxed()
}

/// Where a scan starts: just after `after` when it lies within or past the prefix, else
/// at the prefix itself. Shared by the backends so that they agree on the edge cases.
pub(crate) fn scan_start<'a>(prefix: &'a [u8], after: Option<&'a [u8]>) -> ScanStart<'a> {
    match after {
        Some(after) if after >= prefix => ScanStart::After(after),
        _ => ScanStart::At(prefix),
    }
}

pub(crate) enum ScanStart<'a> {
    At(&'a [u8]),
    After(&'a [u8]),
}
