//! The worker's local blob cache: one file per blob under `work_dir/cache`, evicted
//! least-recently-used first once the cache holds more bytes than its budget.
//!
//! Inputs are copied from here into each action's directory, so a blob is fetched once
//! per worker, not once per action. They are copies, never hardlinks: an action runs as a
//! user who could `chmod` and rewrite a shared inode (the 0444 mode does not stop a file's
//! owner, nor root), and every later action on the worker would then read wrong bytes under
//! a correct digest. A blob needed both as a plain file and as an executable is kept as two
//! files: `files/<fn>/<hex>` (mode 0444) and `executables/<fn>/<hex>` (mode 0555), so a
//! copy takes its mode from its source.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::{StreamExt, TryStreamExt};
use kiln_store::{ContentHash, Digest, DigestFunction};

use kiln_client::RemoteCas;

use crate::WorkerError;

/// Concurrent fetches (batches or streams) per `fetch_missing` call.
const FETCH_CONCURRENCY: usize = 4;

/// One cached file: a blob in its plain or executable variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub digest: Digest,
    pub executable: bool,
}

impl CacheKey {
    pub fn file(digest: Digest) -> Self {
        CacheKey {
            digest,
            executable: false,
        }
    }

    fn with_executable(self, executable: bool) -> Self {
        CacheKey { executable, ..self }
    }
}

/// What the cache holds, for Register and Heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSummary {
    pub bytes: u64,
    pub blobs: u64,
    pub capacity_bytes: u64,
}

/// How much a `fetch_missing` call had to download.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    pub blobs: u64,
    pub bytes: u64,
}

struct Entry {
    size: u64,
    last_use: u64,
    /// Callers between "it is cached" and "it is linked"; eviction skips pinned entries.
    pins: u32,
}

#[derive(Default)]
struct Index {
    entries: HashMap<CacheKey, Entry>,
    by_last_use: BTreeMap<u64, CacheKey>,
    clock: u64,
    bytes: u64,
}

impl Index {
    fn touch(&mut self, key: CacheKey) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.entries.get_mut(&key) {
            self.by_last_use.remove(&entry.last_use);
            entry.last_use = clock;
            self.by_last_use.insert(clock, key);
        }
    }

    fn insert(&mut self, key: CacheKey, size: u64, pins: u32) {
        self.clock += 1;
        self.entries.insert(
            key,
            Entry {
                size,
                last_use: self.clock,
                pins,
            },
        );
        self.by_last_use.insert(self.clock, key);
        self.bytes += size;
    }

    /// Removes unpinned entries, oldest first, until `capacity` is met; returns them.
    fn evict_to(&mut self, capacity: u64) -> Vec<CacheKey> {
        let mut victims = Vec::new();
        if self.bytes <= capacity {
            return victims;
        }
        let candidates: Vec<(u64, CacheKey)> =
            self.by_last_use.iter().map(|(t, k)| (*t, *k)).collect();
        for (last_use, key) in candidates {
            if self.bytes <= capacity {
                break;
            }
            if self.entries.get(&key).is_some_and(|e| e.pins == 0) {
                let entry = self.entries.remove(&key).expect("checked above");
                self.by_last_use.remove(&last_use);
                self.bytes -= entry.size;
                victims.push(key);
            }
        }
        victims
    }
}

/// The on-disk blob cache. Share it between actions with an `Arc`.
pub struct LocalCache {
    root: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    temp_counter: AtomicU64,
}

/// Keeps a cached blob from eviction while it is being linked or read.
pub struct CachePin<'a> {
    cache: &'a LocalCache,
    key: CacheKey,
}

impl CachePin<'_> {
    pub fn key(&self) -> CacheKey {
        self.key
    }

    pub fn path(&self) -> PathBuf {
        self.cache.path_of(&self.key)
    }
}

impl Drop for CachePin<'_> {
    fn drop(&mut self) {
        let mut index = self.cache.lock();
        if let Some(entry) = index.entries.get_mut(&self.key) {
            entry.pins = entry.pins.saturating_sub(1);
        }
        // Concurrent actions may have pinned more than the budget; once they let go, the
        // cache shrinks back to it rather than waiting for the next insert.
        let victims = index.evict_to(self.cache.capacity);
        self.cache.remove_files(&victims);
    }
}

impl LocalCache {
    /// Opens the cache in `root`, indexing what an earlier run left there (oldest
    /// modification first, the best recency a restart can recover).
    pub fn open(root: impl Into<PathBuf>, capacity: u64) -> Result<Self, WorkerError> {
        let root = root.into();
        let temp = root.join("tmp");
        if temp.exists() {
            std::fs::remove_dir_all(&temp).map_err(WorkerError::io("clearing the cache's tmp"))?;
        }
        std::fs::create_dir_all(&temp).map_err(WorkerError::io("creating the blob cache"))?;
        let cache = LocalCache {
            root,
            capacity,
            index: Mutex::new(Index::default()),
            temp_counter: AtomicU64::new(0),
        };
        let mut found = Vec::new();
        for executable in [false, true] {
            for function in DigestFunction::ALL {
                let dir = cache.variant_dir(executable).join(function.name());
                std::fs::create_dir_all(&dir)
                    .map_err(WorkerError::io("creating the blob cache"))?;
                for entry in
                    std::fs::read_dir(&dir).map_err(WorkerError::io("scanning the cache"))?
                {
                    let entry = entry.map_err(WorkerError::io("scanning the cache"))?;
                    let metadata = entry
                        .metadata()
                        .map_err(WorkerError::io("scanning the cache"))?;
                    let name = entry.file_name();
                    let hash = name
                        .to_str()
                        .and_then(|n| ContentHash::parse_hex(function, n).ok());
                    match hash {
                        Some(hash) if metadata.is_file() => {
                            let modified = metadata.modified().ok();
                            let key = CacheKey {
                                digest: hash.with_size(metadata.len()),
                                executable,
                            };
                            found.push((modified, key));
                        }
                        // Not a blob this cache wrote: it has no business here.
                        _ => {
                            let _ = std::fs::remove_file(entry.path());
                        }
                    }
                }
            }
        }
        found.sort_by_key(|(modified, _)| *modified);
        {
            let mut index = cache.lock();
            for (_, key) in found {
                index.insert(key, key.digest.size, 0);
            }
            let victims = index.evict_to(capacity);
            cache.remove_files(&victims);
        }
        Ok(cache)
    }

    pub fn summary(&self) -> CacheSummary {
        let index = self.lock();
        CacheSummary {
            bytes: index.bytes,
            blobs: index.entries.len() as u64,
            capacity_bytes: self.capacity,
        }
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// Pins a cached blob and marks it used, or returns `None` when it is not cached.
    pub fn lookup(&self, key: CacheKey) -> Option<CachePin<'_>> {
        let mut index = self.lock();
        let entry = index.entries.get_mut(&key)?;
        entry.pins += 1;
        index.touch(key);
        Some(CachePin { cache: self, key })
    }

    /// Moves the complete, verified file at `temp` into the cache as `key`, then evicts
    /// least-recently-used blobs beyond the budget. The new blob is pinned, so it survives
    /// until the caller has linked it.
    pub fn insert(&self, key: CacheKey, temp: &Path) -> Result<CachePin<'_>, WorkerError> {
        let mode = if key.executable { 0o555 } else { 0o444 };
        std::fs::set_permissions(temp, std::fs::Permissions::from_mode(mode))
            .map_err(WorkerError::io("setting a cached blob's mode"))?;
        // The file system and the index change together under the lock, so a concurrent
        // eviction can never unlink a file another insert has just put in place.
        let mut index = self.lock();
        if let Some(entry) = index.entries.get_mut(&key) {
            // Another action fetched it meanwhile; this copy is redundant.
            entry.pins += 1;
            index.touch(key);
            drop(index);
            let _ = std::fs::remove_file(temp);
            return Ok(CachePin { cache: self, key });
        }
        std::fs::rename(temp, self.path_of(&key))
            .map_err(WorkerError::io("moving a blob into the cache"))?;
        index.insert(key, key.digest.size, 1);
        let victims = index.evict_to(self.capacity);
        self.remove_files(&victims);
        Ok(CachePin { cache: self, key })
    }

    /// Copies a pinned blob to `dest`, with its variant's mode. `std::fs::copy` uses
    /// `copy_file_range`, which shares the extents instead of copying bytes where the
    /// filesystem can (XFS, btrfs) and copies in the kernel elsewhere (ext4).
    pub fn copy_into(&self, pin: &CachePin<'_>, dest: &Path) -> Result<(), WorkerError> {
        std::fs::copy(pin.path(), dest)
            .map(|_| ())
            .map_err(WorkerError::io(format!("materialising {}", dest.display())))
    }

    /// Reads a pinned blob (Action, Command and Directory messages are read this way).
    pub fn read(&self, pin: &CachePin<'_>) -> Result<Vec<u8>, WorkerError> {
        std::fs::read(pin.path()).map_err(WorkerError::io("reading a cached blob"))
    }

    /// A fresh path in the cache's own temp directory (same filesystem, so rename works).
    pub fn temp_path(&self) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// Makes every key cached, downloading only blobs that are in neither variant, and
    /// returns the pins in the order of `keys`. Blobs the CAS lacks are reported together
    /// as [`WorkerError::MissingInputs`].
    pub async fn fetch_missing<'a>(
        &'a self,
        cas: &RemoteCas,
        keys: &[CacheKey],
    ) -> Result<(Vec<CachePin<'a>>, FetchStats), WorkerError> {
        let mut pins: HashMap<CacheKey, CachePin<'a>> = HashMap::new();
        let mut to_fetch: Vec<Digest> = Vec::new();
        let mut queued = HashSet::new();
        for key in keys {
            if pins.contains_key(key) {
                continue;
            }
            if let Some(pin) = self.lookup(*key) {
                pins.insert(*key, pin);
            } else if let Some(other) = self.lookup(key.with_executable(!key.executable)) {
                // The other variant is here: a local copy beats a download.
                let temp = self.temp_path();
                std::fs::copy(other.path(), &temp)
                    .map_err(WorkerError::io("copying a cached blob"))?;
                pins.insert(*key, self.insert(*key, &temp)?);
            } else if key.digest.is_empty_blob() {
                let temp = self.temp_path();
                std::fs::write(&temp, b"").map_err(WorkerError::io("creating an empty blob"))?;
                pins.insert(*key, self.insert(*key, &temp)?);
            } else if queued.insert(key.digest) {
                to_fetch.push(key.digest);
            }
        }

        let plan = cas.plan_reads(to_fetch);
        let fetches = plan
            .batches
            .into_iter()
            .map(FetchJob::Batch)
            .chain(plan.streamed.into_iter().map(FetchJob::Stream));
        let outcomes: Vec<FetchOutcome> = futures::stream::iter(fetches)
            .map(|job| self.run_fetch(cas, job))
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;

        let mut stats = FetchStats::default();
        let mut missing = Vec::new();
        let mut fetched = HashMap::new();
        for (found, absent) in outcomes {
            missing.extend(absent);
            for (digest, temp) in found {
                stats.blobs += 1;
                stats.bytes += digest.size;
                fetched.insert(digest, temp);
            }
        }
        if !missing.is_empty() {
            for temp in fetched.values() {
                let _ = std::fs::remove_file(temp);
            }
            missing.sort();
            return Err(WorkerError::MissingInputs(missing));
        }
        for key in keys {
            if pins.contains_key(key) {
                continue;
            }
            let temp = fetched.remove(&key.digest).map(Ok).unwrap_or_else(|| {
                // The other variant of this digest took the download; copy it.
                let other = pins
                    .get(&key.with_executable(!key.executable))
                    .expect("every fetched digest has a pinned variant");
                let temp = self.temp_path();
                std::fs::copy(other.path(), &temp)
                    .map(|_| temp)
                    .map_err(WorkerError::io("copying a cached blob"))
            })?;
            pins.insert(*key, self.insert(*key, &temp)?);
        }
        let ordered = keys
            .iter()
            .map(|key| {
                // Each key needs its own pin; a second lookup adds one.
                self.lookup(*key).expect("pinned blobs are never evicted")
            })
            .collect();
        drop(pins);
        Ok((ordered, stats))
    }

    async fn run_fetch(&self, cas: &RemoteCas, job: FetchJob) -> Result<FetchOutcome, WorkerError> {
        let mut found = Vec::new();
        let mut absent = Vec::new();
        match job {
            FetchJob::Batch(digests) => {
                for (digest, data) in cas.read_blobs(&digests).await? {
                    match data {
                        Some(data) => {
                            let temp = self.temp_path();
                            tokio::fs::write(&temp, data)
                                .await
                                .map_err(WorkerError::io("writing a fetched blob"))?;
                            found.push((digest, temp));
                        }
                        None => absent.push(digest),
                    }
                }
            }
            FetchJob::Stream(digest) => {
                let temp = self.temp_path();
                match cas.read_blob_to_file(&digest, &temp).await {
                    Ok(()) => found.push((digest, temp)),
                    Err(e) => {
                        let _ = std::fs::remove_file(&temp);
                        if !e.is_not_found() {
                            return Err(e.into());
                        }
                        absent.push(digest);
                    }
                }
            }
        }
        Ok((found, absent))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // The index holds no invariant a panicking holder could break half-way.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn variant_dir(&self, executable: bool) -> PathBuf {
        self.root
            .join(if executable { "executables" } else { "files" })
    }

    fn path_of(&self, key: &CacheKey) -> PathBuf {
        self.variant_dir(key.executable)
            .join(key.digest.function.name())
            .join(key.digest.hex())
    }

    /// Unlinks evicted blobs; called with the index locked (see `insert`).
    fn remove_files(&self, keys: &[CacheKey]) {
        for key in keys {
            if let Err(e) = std::fs::remove_file(self.path_of(key)) {
                tracing::warn!(digest = %key.digest, error = %e, "could not evict a cached blob");
            }
        }
    }
}

/// What one fetch job got: a verified temp file per blob found, and the digests the CAS
/// does not have.
type FetchOutcome = (Vec<(Digest, PathBuf)>, Vec<Digest>);

enum FetchJob {
    Batch(Vec<Digest>),
    Stream(Digest),
}
