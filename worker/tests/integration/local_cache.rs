//! The local blob cache: LRU eviction by bytes, pins, variants, and reopening.

use crate::common;

use common::TestCas;
use kiln_store::{Digest, DigestFunction};
use kiln_worker::{CacheKey, LocalCache};

fn key(data: &[u8]) -> CacheKey {
    CacheKey::file(Digest::of_bytes(DigestFunction::Sha256, data))
}

/// Inserts `data` the way a fetch does: a temp file moved into the cache.
fn insert(cache: &LocalCache, data: &[u8]) -> CacheKey {
    let key = key(data);
    let temp = cache.temp_path();
    std::fs::write(&temp, data).unwrap();
    drop(cache.insert(key, &temp).unwrap());
    key
}

#[test]
fn least_recently_used_blobs_go_first_once_over_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalCache::open(dir.path(), 300).unwrap();
    let a = insert(&cache, &[b'a'; 100]);
    let b = insert(&cache, &[b'b'; 100]);
    let c = insert(&cache, &[b'c'; 100]);
    assert_eq!(cache.summary().bytes, 300);

    // Using `a` makes `b` the least recently used.
    drop(cache.lookup(a).unwrap());
    let d = insert(&cache, &[b'd'; 100]);
    assert!(!cache.contains(&b), "b was least recently used");
    for kept in [a, c, d] {
        assert!(cache.contains(&kept));
    }
    assert_eq!(cache.summary().bytes, 300);
    assert_eq!(cache.summary().blobs, 3);

    // A blob bigger than half the budget pushes out as many as it takes.
    let e = insert(&cache, &[b'e'; 250]);
    assert!(cache.contains(&e));
    assert_eq!(
        cache.summary().blobs,
        1,
        "a, c and d were all needed for 250 bytes"
    );
    assert!(cache.summary().bytes <= 300);
    // Evicted means gone from disk too.
    let files = walk(dir.path());
    assert_eq!(files, 1, "only e's file is left");
}

#[test]
fn pinned_blobs_survive_eviction_and_variants_are_separate_files() {
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalCache::open(dir.path(), 150).unwrap();
    let a = insert(&cache, &[b'a'; 100]);
    let pin = cache.lookup(a).unwrap();
    // Over budget with `a` pinned: `b`, the only blob free to go, goes once unpinned.
    let b = insert(&cache, &[b'b'; 100]);
    assert!(cache.contains(&a), "pinned");
    assert!(!cache.contains(&b), "over budget and unpinned");
    drop(pin);
    let b = insert(&cache, &[b'b'; 100]);
    assert!(!cache.contains(&a), "unpinned and least recently used");
    assert!(cache.contains(&b));
    let c = insert(&cache, &[b'c'; 10]);
    assert!(cache.contains(&b) && cache.contains(&c), "within budget");

    // The executable variant is its own file with its own mode.
    use std::os::unix::fs::PermissionsExt;
    let exe = CacheKey {
        executable: true,
        ..c
    };
    let temp = cache.temp_path();
    std::fs::write(&temp, [b'c'; 10]).unwrap();
    let pin = cache.insert(exe, &temp).unwrap();
    let plain = cache.lookup(c).unwrap();
    assert_ne!(pin.path(), plain.path());
    assert_eq!(
        std::fs::metadata(pin.path()).unwrap().permissions().mode() & 0o777,
        0o555
    );
    assert_eq!(
        std::fs::metadata(plain.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o444
    );
}

#[test]
fn reopening_keeps_the_cached_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let a;
    {
        let cache = LocalCache::open(dir.path(), 1000).unwrap();
        a = insert(&cache, b"persisted");
        std::fs::write(cache.temp_path(), b"half-written").unwrap();
    }
    let cache = LocalCache::open(dir.path(), 1000).unwrap();
    assert!(cache.contains(&a));
    assert_eq!(cache.summary().bytes, 9);
    assert_eq!(
        walk(&dir.path().join("tmp")),
        0,
        "leftover temp files are cleared"
    );
    // A smaller budget on reopen evicts at once.
    drop(cache);
    let cache = LocalCache::open(dir.path(), 5).unwrap();
    assert_eq!(cache.summary().blobs, 0);
}

#[tokio::test]
async fn fetching_from_the_cas_counts_only_missing_blobs_and_evicts_by_bytes() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let client = cas.client().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalCache::open(dir.path(), 2500).unwrap();
    let mut keys = Vec::new();
    for byte in [1u8, 2, 3] {
        let data = vec![byte; 1000];
        keys.push(CacheKey::file(cas.put(&data).await));
    }
    let (pins, stats) = cache.fetch_missing(&client, &keys[..2]).await.unwrap();
    assert_eq!((stats.blobs, stats.bytes), (2, 2000));
    assert_eq!(std::fs::read(pins[1].path()).unwrap(), vec![2u8; 1000]);
    drop(pins);
    let (pins, stats) = cache.fetch_missing(&client, &keys[..2]).await.unwrap();
    assert_eq!((stats.blobs, stats.bytes), (0, 0));
    drop(pins);
    // The third blob exceeds the 2500-byte budget: the least recently used one goes.
    let (pins, stats) = cache.fetch_missing(&client, &keys[2..]).await.unwrap();
    assert_eq!(stats.blobs, 1);
    drop(pins);
    assert!(!cache.contains(&keys[0]));
    assert!(cache.contains(&keys[1]) && cache.contains(&keys[2]));
    assert_eq!(cache.summary().bytes, 2000);
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Concurrent actions fetching through one cache: each gets its own verified bytes, the
/// cache ends within its byte budget, and its index and its files agree (nothing evicted
/// is left on disk, nothing on disk is unaccounted for).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fetches_keep_the_byte_budget() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let client = cas.client().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = std::sync::Arc::new(LocalCache::open(dir.path(), 10_000).unwrap());
    let mut actions = Vec::new();
    for action in 0..8u8 {
        let mut keys = Vec::new();
        for blob in 0..5u8 {
            let data = vec![action * 16 + blob; 1000];
            keys.push((CacheKey::file(cas.put(&data).await), data));
        }
        actions.push(keys);
    }
    let mut running = Vec::new();
    for keys in actions {
        let (cache, client) = (cache.clone(), client.clone());
        running.push(tokio::spawn(async move {
            for _ in 0..3 {
                let wanted: Vec<CacheKey> = keys.iter().map(|(key, _)| *key).collect();
                let (pins, _) = cache.fetch_missing(&client, &wanted).await.unwrap();
                for (pin, (_, data)) in pins.iter().zip(&keys) {
                    assert_eq!(&std::fs::read(pin.path()).unwrap(), data);
                }
            }
        }));
    }
    for action in running {
        action.await.unwrap();
    }
    let summary = cache.summary();
    assert!(summary.bytes <= 10_000, "{summary:?}");
    let on_disk = walk(&dir.path().join("files"));
    assert_eq!(
        on_disk as u64, summary.blobs,
        "files on disk vs blobs in the index"
    );
}
