//! The action cache's storage: encoded `ActionResult`s keyed by instance name and action
//! digest. Instance names are separate namespaces. The coordinator decodes and validates
//! the results; this layer only keeps them durable, and bounded: every entry has a
//! last-use stamp, indexed in stamp order, so [`ActionCache::trim`] can remove the least
//! recently used entries without reading them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use crate::{scan_stream, Digest, DigestFunction, Keyspace, MetadataStore, Result, WriteBatch};

mod recent;
use recent::RecentEntries;

const ACTION_CACHE: Keyspace = Keyspace("action_cache");
/// Entry key → its last-use stamp (8 bytes, big-endian).
const LAST_USE: Keyspace = Keyspace("action_cache.last_use");
/// Stamp (8 bytes, big-endian) followed by the entry key → empty: the entries in use order.
const BY_USE: Keyspace = Keyspace("action_cache.by_use");

#[derive(Clone)]
pub struct ActionCache {
    metadata: Arc<dyn MetadataStore>,
    /// The last stamp handed out: stamps are microseconds since the epoch, made strictly
    /// increasing so that no two uses tie.
    last_stamp: Arc<AtomicU64>,
    /// Entries read a moment ago, shared by every clone ([`ActionCache::keeping_recent`]).
    recent: Option<Arc<RecentEntries>>,
}

/// What one [`ActionCache::trim`] found and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrimReport {
    pub entries: u64,
    pub removed: u64,
}

impl ActionCache {
    pub fn new(metadata: Arc<dyn MetadataStore>) -> Self {
        ActionCache {
            metadata,
            last_stamp: Arc::new(AtomicU64::new(0)),
            recent: None,
        }
    }

    /// Serves an entry read or stored within `fresh_for` from memory (at most `max_bytes`
    /// of them), without asking the metadata store again. See `recent.rs` for what another
    /// replica's writes look like meanwhile.
    pub fn keeping_recent(mut self, fresh_for: Duration, max_bytes: usize) -> Self {
        if !fresh_for.is_zero() && max_bytes > 0 {
            self.recent = Some(Arc::new(RecentEntries::new(fresh_for, max_bytes)));
        }
        self
    }

    fn next_stamp(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let previous = self
            .last_stamp
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .expect("the update always succeeds");
        now.max(previous + 1)
    }

    /// Adds to `batch` what records `key` as used now, replacing its previous stamp.
    async fn stamp(&self, batch: &mut WriteBatch, key: &[u8]) -> Result<()> {
        if let Some(previous) = self.metadata.get(LAST_USE, key).await? {
            batch.delete(BY_USE, [previous.as_slice(), key].concat());
        }
        let stamp = self.next_stamp().to_be_bytes();
        batch.put(LAST_USE, key.to_vec(), stamp.to_vec());
        batch.put(BY_USE, [stamp.as_slice(), key].concat(), Vec::new());
        Ok(())
    }

    fn key(instance_name: &str, action: &Digest) -> Vec<u8> {
        // The NUL separator cannot appear in an instance name, so keys never collide.
        let mut key = Vec::with_capacity(instance_name.len() + 1 + 7 + 64);
        key.extend_from_slice(instance_name.as_bytes());
        key.push(0);
        key.extend_from_slice(action.function.name().as_bytes());
        key.push(b':');
        key.extend_from_slice(action.hex().as_bytes());
        key
    }

    pub async fn get(&self, instance_name: &str, action: &Digest) -> Result<Option<Vec<u8>>> {
        let key = Self::key(instance_name, action);
        if let Some(value) = self.recent.as_ref().and_then(|recent| recent.get(&key)) {
            return Ok(Some(value));
        }
        let stored = self.metadata.get(ACTION_CACHE, &key).await?;
        if let (Some(recent), Some(value)) = (&self.recent, &stored) {
            recent.keep(&key, value);
        }
        Ok(stored)
    }

    /// Stores an encoded result, used now, and makes it durable before returning.
    pub async fn put(
        &self,
        instance_name: &str,
        action: &Digest,
        encoded_result: &[u8],
    ) -> Result<()> {
        let key = Self::key(instance_name, action);
        let mut batch = WriteBatch::new();
        batch.put(ACTION_CACHE, key.clone(), encoded_result.to_vec());
        self.stamp(&mut batch, &key).await?;
        self.forget_recent(&key);
        self.metadata.apply(batch).await?;
        self.metadata.flush().await?;
        if let Some(recent) = &self.recent {
            recent.keep(&key, encoded_result);
        }
        Ok(())
    }

    fn forget_recent(&self, key: &[u8]) {
        if let Some(recent) = &self.recent {
            recent.forget(key);
        }
    }

    /// Records a hit, so that trimming keeps the entry longer. Not flushed: losing a stamp
    /// in a crash only makes the entry look older.
    pub async fn mark_used(&self, instance_name: &str, action: &Digest) -> Result<()> {
        let key = Self::key(instance_name, action);
        if self.metadata.get(ACTION_CACHE, &key).await?.is_none() {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        self.stamp(&mut batch, &key).await?;
        Ok(self.metadata.apply(batch).await?)
    }

    /// Removes the least recently used entries until at most `keep` remain, once there are
    /// more than `max_entries`. Entries stored before stamps existed carry none and are
    /// not counted until they are used or stored again.
    pub async fn trim(&self, max_entries: u64, keep: u64) -> Result<TrimReport> {
        let entries = scan_stream(self.metadata.clone(), BY_USE, Vec::new())
            .try_fold(0u64, |n, _| async move { Ok(n + 1) })
            .await?;
        let mut report = TrimReport {
            entries,
            removed: 0,
        };
        if entries <= max_entries {
            return Ok(report);
        }
        let mut oldest = scan_stream(self.metadata.clone(), BY_USE, Vec::new());
        while report.entries - report.removed > keep {
            let Some((index_key, _)) = oldest.try_next().await? else {
                break;
            };
            let (stamp, key) = index_key.split_at(8.min(index_key.len()));
            let mut batch = WriteBatch::new();
            batch.delete(BY_USE, index_key.clone());
            // A stamp replaced meanwhile (a hit after the scan began) keeps the entry.
            let removing = self.metadata.get(LAST_USE, key).await?.as_deref() == Some(stamp);
            if removing {
                batch.expect(LAST_USE, key.to_vec(), Some(stamp.to_vec()));
                batch.delete(LAST_USE, key.to_vec());
                batch.delete(ACTION_CACHE, key.to_vec());
                report.removed += 1;
            }
            match self.metadata.apply(batch).await {
                Ok(()) if removing => self.forget_recent(key),
                Ok(()) => {}
                // A hit in between fails the expectation: the entry stays, with its new
                // stamp.
                Err(crate::MetadataError::Conflict { .. }) => report.removed -= 1,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(report)
    }

    /// Every stored result, with its action's digest function, a page at a time (for
    /// whoever must know what the cache as a whole references).
    pub fn entries(&self) -> BoxStream<'static, Result<(DigestFunction, Vec<u8>)>> {
        scan_stream(self.metadata.clone(), ACTION_CACHE, Vec::new())
            .filter_map(|entry| async move {
                let (key, value) = match entry {
                    Ok(entry) => entry,
                    Err(e) => return Some(Err(e.into())),
                };
                // `instance \0 function:hex`; a key of another shape is no entry of ours.
                let function = key
                    .iter()
                    .position(|b| *b == 0)
                    .and_then(|nul| key[nul + 1..].split(|b| *b == b':').next())
                    .and_then(|name| std::str::from_utf8(name).ok())
                    .and_then(DigestFunction::from_name)?;
                Some(Ok((function, value)))
            })
            .boxed()
    }

    pub async fn remove(&self, instance_name: &str, action: &Digest) -> Result<()> {
        let key = Self::key(instance_name, action);
        let mut batch = WriteBatch::new();
        batch.delete(ACTION_CACHE, key.clone());
        if let Some(stamp) = self.metadata.get(LAST_USE, &key).await? {
            batch.delete(LAST_USE, key.clone());
            batch.delete(BY_USE, [stamp.as_slice(), &key].concat());
        }
        self.metadata.apply(batch).await?;
        // After the delete: a lookup racing it may have kept the old entry again.
        self.forget_recent(&key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryMetadataStore;

    fn action(n: u8) -> Digest {
        Digest::of_bytes(DigestFunction::Sha256, &[n])
    }

    #[tokio::test]
    async fn trimming_removes_the_least_recently_used_entries() {
        let cache = ActionCache::new(Arc::new(MemoryMetadataStore::new()));
        for n in 0..5 {
            cache.put("", &action(n), &[n]).await.unwrap();
        }
        // A hit makes the oldest the newest; a re-put refreshes another.
        cache.mark_used("", &action(0)).await.unwrap();
        cache.put("", &action(1), b"again").await.unwrap();
        let untouched = cache.trim(10, 2).await.unwrap();
        assert_eq!(
            untouched,
            TrimReport {
                entries: 5,
                removed: 0
            }
        );
        let report = cache.trim(3, 2).await.unwrap();
        assert_eq!(
            report,
            TrimReport {
                entries: 5,
                removed: 3
            }
        );
        for (n, kept) in [(0, true), (1, true), (2, false), (3, false), (4, false)] {
            assert_eq!(
                cache.get("", &action(n)).await.unwrap().is_some(),
                kept,
                "{n}"
            );
        }
        // The index shrank with the entries: nothing left to trim.
        assert_eq!(
            cache.trim(1, 2).await.unwrap(),
            TrimReport {
                entries: 2,
                removed: 0
            }
        );
        cache.remove("", &action(0)).await.unwrap();
        assert_eq!(cache.trim(0, 0).await.unwrap().entries, 1);
    }
}
