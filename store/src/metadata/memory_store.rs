//! An in-memory backend: for tests where durability is not what is tested, and as the
//! simplest statement of the contract the conformance suite checks. `flush` has nothing
//! to make durable; nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    scan_start, Entry, Keyspace, MetadataError, MetadataResult, MetadataStore, ScanStart,
    WriteBatch, MAX_SCAN_PAGE,
};

type Space = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
pub struct MemoryMetadataStore {
    spaces: Mutex<HashMap<Keyspace, Space>>,
}

impl MemoryMetadataStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn spaces(&self) -> MutexGuard<'_, HashMap<Keyspace, Space>> {
        self.spaces.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl MetadataStore for MemoryMetadataStore {
    async fn get(&self, space: Keyspace, key: &[u8]) -> MetadataResult<Option<Vec<u8>>> {
        Ok(self
            .spaces()
            .get(&space)
            .and_then(|entries| entries.get(key).cloned()))
    }

    async fn insert(
        &self,
        space: Keyspace,
        key: &[u8],
        value: &[u8],
    ) -> MetadataResult<Option<Vec<u8>>> {
        Ok(self
            .spaces()
            .entry(space)
            .or_default()
            .insert(key.to_vec(), value.to_vec()))
    }

    async fn remove(&self, space: Keyspace, key: &[u8]) -> MetadataResult<Option<Vec<u8>>> {
        Ok(self
            .spaces()
            .get_mut(&space)
            .and_then(|entries| entries.remove(key)))
    }

    async fn compare_and_swap(
        &self,
        space: Keyspace,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> MetadataResult<std::result::Result<(), Option<Vec<u8>>>> {
        let mut spaces = self.spaces();
        let entries = spaces.entry(space).or_default();
        let current = entries.get(key);
        if current.map(Vec::as_slice) != expected {
            return Ok(Err(current.cloned()));
        }
        match new {
            Some(value) => entries.insert(key.to_vec(), value.to_vec()),
            None => entries.remove(key),
        };
        Ok(Ok(()))
    }

    async fn apply(&self, batch: WriteBatch) -> MetadataResult<()> {
        // One lock over the whole batch: readers see all of it or none.
        let mut spaces = self.spaces();
        for (space, key, expected) in batch.expectations() {
            let current = spaces.get(&space).and_then(|entries| entries.get(key));
            if current.map(Vec::as_slice) != expected {
                return Err(MetadataError::conflict(space, key));
            }
        }
        for (space, key, value) in batch.writes() {
            let entries = spaces.entry(space).or_default();
            match value {
                Some(value) => entries.insert(key.to_vec(), value.to_vec()),
                None => entries.remove(key),
            };
        }
        Ok(())
    }

    async fn scan(
        &self,
        space: Keyspace,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> MetadataResult<Vec<Entry>> {
        let spaces = self.spaces();
        let Some(entries) = spaces.get(&space) else {
            return Ok(Vec::new());
        };
        let start = match scan_start(prefix, after) {
            ScanStart::After(after) => Bound::Excluded(after.to_vec()),
            ScanStart::At(prefix) => Bound::Included(prefix.to_vec()),
        };
        Ok(entries
            .range((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit.min(MAX_SCAN_PAGE))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    async fn flush(&self) -> MetadataResult<()> {
        Ok(())
    }
}
