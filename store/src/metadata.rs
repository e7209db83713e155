//! The metadata store: small records in named keyspaces, on sled.
//!
//! Callers go through [`MetadataStore`] so that another embedded engine (redb, fjall)
//! can replace sled without touching them. Writes are visible at once but durable only
//! after [`MetadataStore::flush`]; callers flush before acknowledging anything that must
//! survive a crash.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::Result;

/// A named keyspace. Each crate declares the ones it owns next to the code that uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Keyspace(pub &'static str);

/// Key-value pairs, as returned by scans.
pub type Entry = (Vec<u8>, Vec<u8>);

#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    fn get(&self, space: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Stores `value`, returning the previous one.
    fn insert(&self, space: Keyspace, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Removes a key, returning its value.
    fn remove(&self, space: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Atomically replaces `expected` (None: absent) with `new` (None: delete).
    /// On a conflict, returns the value actually present.
    fn compare_and_swap(
        &self,
        space: Keyspace,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<std::result::Result<(), Option<Vec<u8>>>>;

    /// Entries whose key starts with `prefix`, in key order, starting after `after` when
    /// given (for pagination). At most `limit` entries.
    fn scan(
        &self,
        space: Keyspace,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>>;

    /// Makes every write so far durable.
    async fn flush(&self) -> Result<()>;
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
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
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

    fn tree(&self, space: Keyspace) -> Result<sled::Tree> {
        Ok(self.db.open_tree(space.0)?)
    }
}

#[async_trait]
impl MetadataStore for SledMetadataStore {
    fn get(&self, space: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(space)?.get(key)?.map(|v| v.to_vec()))
    }

    fn insert(&self, space: Keyspace, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(space)?.insert(key, value)?.map(|v| v.to_vec()))
    }

    fn remove(&self, space: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(space)?.remove(key)?.map(|v| v.to_vec()))
    }

    fn compare_and_swap(
        &self,
        space: Keyspace,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<std::result::Result<(), Option<Vec<u8>>>> {
        Ok(self
            .tree(space)?
            .compare_and_swap(key, expected, new)?
            .map_err(|conflict| conflict.current.map(|v| v.to_vec())))
    }

    fn scan(
        &self,
        space: Keyspace,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let tree = self.tree(space)?;
        let iter = match after {
            // Keys sort bytewise, so "after" is the range that excludes it.
            Some(after) => tree
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => tree.range::<&[u8], _>(prefix..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            if out.len() == limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    async fn flush(&self) -> Result<()> {
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
            store.insert(SPACE, b"k", b"v").unwrap();
            store.flush().await.unwrap();
        }
        let store = SledMetadataStore::open(dir.path()).unwrap();
        assert_eq!(store.get(SPACE, b"k").unwrap().as_deref(), Some(&b"v"[..]));
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
                            store.insert(SPACE, &key, b"v").unwrap();
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
        assert_eq!(
            store.scan(SPACE, b"", None, usize::MAX).unwrap().len(),
            64 * 20
        );
    }

    #[test]
    fn scan_pages_within_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledMetadataStore::open(dir.path()).unwrap();
        for key in ["a/1", "a/2", "a/3", "b/1"] {
            store.insert(SPACE, key.as_bytes(), b"").unwrap();
        }
        let keys = |entries: Vec<Entry>| {
            entries
                .into_iter()
                .map(|(k, _)| String::from_utf8(k).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(store.scan(SPACE, b"a/", None, 2).unwrap()),
            ["a/1", "a/2"]
        );
        assert_eq!(
            keys(store.scan(SPACE, b"a/", Some(b"a/2"), 10).unwrap()),
            ["a/3"]
        );
    }

    #[test]
    fn compare_and_swap_reports_the_current_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledMetadataStore::open(dir.path()).unwrap();
        assert!(store
            .compare_and_swap(SPACE, b"k", None, Some(b"1"))
            .unwrap()
            .is_ok());
        let conflict = store
            .compare_and_swap(SPACE, b"k", None, Some(b"2"))
            .unwrap();
        assert_eq!(conflict, Err(Some(b"1".to_vec())));
    }
}
