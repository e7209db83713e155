//! The embedded backend: sled, one tree per keyspace.
//!
//! sled's reads and writes are in-memory operations on its page cache that do not block
//! on I/O (its log is written by its own threads), so they run inline in the async
//! methods; only `flush`, which waits for the disk, goes to the blocking pool.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::{
    scan_start, Entry, Keyspace, MetadataError, MetadataResult, MetadataStore, ScanStart,
    WriteBatch, MAX_SCAN_PAGE,
};

impl From<sled::Error> for MetadataError {
    fn from(error: sled::Error) -> Self {
        match error {
            sled::Error::Io(io) => MetadataError::Io(io),
            other => MetadataError::Backend(other.to_string()),
        }
    }
}

pub struct SledMetadataStore {
    db: sled::Db,
    /// Group commit: flushes run one at a time, and a caller whose writes a flush that
    /// started after them has already made durable returns without flushing again. Under
    /// concurrent load (many actions finishing at once) that turns N fsyncs into about 2.
    flush_lock: tokio::sync::Mutex<()>,
    flushes_started: AtomicU64,
    flushes_completed: AtomicU64,
}

impl SledMetadataStore {
    pub fn open(path: impl AsRef<Path>) -> MetadataResult<Self> {
        let db = sled::Config::new()
            .path(path)
            // kiln flushes explicitly before acknowledging; the periodic flush only bounds
            // how much unacknowledged work a crash can take with it.
            .flush_every_ms(Some(1000))
            .open()?;
        Ok(SledMetadataStore {
            db,
            flush_lock: tokio::sync::Mutex::new(()),
            flushes_started: AtomicU64::new(0),
            flushes_completed: AtomicU64::new(0),
        })
    }

    fn tree(&self, space: Keyspace) -> MetadataResult<sled::Tree> {
        Ok(self.db.open_tree(space.0)?)
    }
}

#[async_trait]
impl MetadataStore for SledMetadataStore {
    async fn get(&self, space: Keyspace, key: &[u8]) -> MetadataResult<Option<Vec<u8>>> {
        Ok(self.tree(space)?.get(key)?.map(|v| v.to_vec()))
    }

    async fn insert(
        &self,
        space: Keyspace,
        key: &[u8],
        value: &[u8],
    ) -> MetadataResult<Option<Vec<u8>>> {
        Ok(self.tree(space)?.insert(key, value)?.map(|v| v.to_vec()))
    }

    async fn remove(&self, space: Keyspace, key: &[u8]) -> MetadataResult<Option<Vec<u8>>> {
        Ok(self.tree(space)?.remove(key)?.map(|v| v.to_vec()))
    }

    async fn compare_and_swap(
        &self,
        space: Keyspace,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> MetadataResult<std::result::Result<(), Option<Vec<u8>>>> {
        Ok(self
            .tree(space)?
            .compare_and_swap(key, expected, new)?
            .map_err(|conflict| conflict.current.map(|v| v.to_vec())))
    }

    async fn apply(&self, batch: WriteBatch) -> MetadataResult<()> {
        // sled's transaction over no trees panics.
        if batch.is_empty() {
            return Ok(());
        }
        // One transaction over every tree the batch touches (sled's transactions span
        // trees of one database).
        let spaces = batch.keyspaces();
        let trees = spaces
            .iter()
            .map(|space| self.tree(*space))
            .collect::<MetadataResult<Vec<_>>>()?;
        use sled::Transactional;
        trees
            .as_slice()
            .transaction(|views| {
                let view_of =
                    |space| &views[spaces.binary_search(&space).expect("collected above")];
                for (space, key, expected) in batch.expectations() {
                    if view_of(space).get(key)?.as_deref() != expected {
                        return sled::transaction::abort(MetadataError::conflict(space, key));
                    }
                }
                for (space, key, value) in batch.writes() {
                    let view = view_of(space);
                    match value {
                        Some(value) => view.insert(key, value)?,
                        None => view.remove(key)?,
                    };
                }
                Ok(())
            })
            .map_err(
                |e: sled::transaction::TransactionError<MetadataError>| match e {
                    sled::transaction::TransactionError::Storage(e) => MetadataError::from(e),
                    sled::transaction::TransactionError::Abort(conflict) => conflict,
                },
            )
    }

    async fn scan(
        &self,
        space: Keyspace,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> MetadataResult<Vec<Entry>> {
        let tree = self.tree(space)?;
        // Keys sort bytewise, so "after" is the range that excludes it.
        let iter = match scan_start(prefix, after) {
            ScanStart::After(after) => tree
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            ScanStart::At(prefix) => tree.range::<&[u8], _>(prefix..),
        };
        let limit = limit.min(MAX_SCAN_PAGE);
        let mut out = Vec::new();
        for item in iter {
            if out.len() == limit {
                break;
            }
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    async fn flush(&self) -> MetadataResult<()> {
        // Not sled's flush_async: in sled 0.34 concurrent calls deadlock, each waiting on
        // sled's own thread pool for a write none of them can run (spacejam/sled#1308,
        // fixed on sled's main branch but never released). The blocking flush on tokio's
        // blocking pool makes the same durability promise.
        //
        // Every flush that starts from here on covers this caller's writes.
        let covering = self.flushes_started.load(Ordering::SeqCst) + 1;
        let _one_at_a_time = self.flush_lock.lock().await;
        if self.flushes_completed.load(Ordering::SeqCst) >= covering {
            return Ok(());
        }
        let this_flush = self.flushes_started.fetch_add(1, Ordering::SeqCst) + 1;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(std::io::Error::other)??;
        self.flushes_completed.store(this_flush, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPACE: Keyspace = Keyspace("test");

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledMetadataStore::open(dir.path()).unwrap();
            store.insert(SPACE, b"k", b"v").await.unwrap();
            store.flush().await.unwrap();
        }
        let store = SledMetadataStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get(SPACE, b"k").await.unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }

    /// Many requests acknowledging at once (a registry taking a burst of tag pushes) all
    /// get their flush; sled's own flush_async deadlocked here. The runtime lives on its
    /// own thread so that a hang fails the test instead of stalling it.
    #[test]
    fn concurrent_flushes_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SledMetadataStore::open(dir.path()).unwrap());
        let (done, finished) = std::sync::mpsc::channel();
        let writer = store.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
                .unwrap();
            runtime.block_on(async move {
                let flushes = (0..64u32).map(|i| {
                    let store = writer.clone();
                    tokio::spawn(async move {
                        for round in 0..20u32 {
                            let key = [i.to_be_bytes(), round.to_be_bytes()].concat();
                            store.insert(SPACE, &key, b"v").await.unwrap();
                            store.flush().await.unwrap();
                        }
                    })
                });
                futures::future::try_join_all(flushes).await.unwrap();
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("every concurrent flush completes within a minute");
    }
}
