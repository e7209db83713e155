//! The size limit and eviction over the filesystem backend, in a temporary directory.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{BoundedBlobStore, EvictionPolicy, RetainedBlobs};
use crate::{
    BlobStore, ContentHash, Digest, DigestFunction, ExpectedDigest, FsBlobStore, StoreError,
};

const LIMIT: u64 = 1 << 20;

fn policy(grace: Duration) -> EvictionPolicy {
    EvictionPolicy {
        grace,
        interval: Duration::from_millis(20),
        ..EvictionPolicy::with_max_bytes(LIMIT)
    }
}

async fn bounded(grace: Duration) -> (tempfile::TempDir, Arc<BoundedBlobStore>) {
    let dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(FsBlobStore::open(dir.path()).unwrap());
    let store = BoundedBlobStore::new(inner, policy(grace)).await.unwrap();
    (dir, Arc::new(store))
}

/// A blob of `size` bytes unique to `seed`.
fn blob(seed: u32, size: usize) -> Bytes {
    let mut data = seed.to_le_bytes().repeat(size / 4 + 1);
    data.truncate(size);
    Bytes::from(data)
}

async fn put(store: &dyn BlobStore, data: Bytes) -> Result<Digest, StoreError> {
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    store.put(ExpectedDigest::Exact(digest), data).await
}

async fn present(store: &dyn BlobStore, digest: &Digest) -> bool {
    store.has_many(&[*digest]).await.unwrap()[0]
}

struct Fixed(Mutex<HashSet<ContentHash>>);

#[async_trait]
impl RetainedBlobs for Fixed {
    async fn retained(&self) -> Result<HashSet<ContentHash>, String> {
        Ok(self.0.lock().unwrap().clone())
    }
}

/// Three times the limit in blobs of mixed sizes, with a working set read between
/// writes and one blob retained: the store never passes its limit, and what is used or
/// retained survives while the rest goes oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_keeps_the_working_set_and_retained_blobs_within_the_limit() {
    let (_dir, store) = bounded(Duration::ZERO).await;
    let retained_blob = put(store.as_ref(), blob(1, 100_000)).await.unwrap();
    store.retain(Arc::new(Fixed(Mutex::new(HashSet::from([
        retained_blob.content_hash()
    ])))));
    let working_set: Vec<Digest> = {
        let mut set = Vec::new();
        for seed in 2..6 {
            set.push(put(store.as_ref(), blob(seed, 20_000)).await.unwrap());
        }
        set
    };
    let mut written = 0u64;
    let mut first_cold = None;
    let mut seed = 100;
    while written < 3 * LIMIT {
        let size = [4_000, 30_000, 90_000][seed as usize % 3];
        match put(store.as_ref(), blob(seed, size)).await {
            Ok(digest) => {
                first_cold.get_or_insert(digest);
                written += size as u64;
            }
            // Between passes a write may find the store full; the next pass frees room.
            Err(StoreError::Full { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        seed += 1;
        for digest in &working_set {
            store.read_all(digest).await.unwrap();
        }
        store.evict_once().await.unwrap();
        let on_disk = store.stored_bytes().await.unwrap();
        assert!(
            on_disk <= LIMIT,
            "{on_disk} bytes stored, over the {LIMIT}-byte limit"
        );
    }
    for digest in &working_set {
        assert!(
            present(store.as_ref(), digest).await,
            "working set lost {digest}"
        );
    }
    assert!(
        present(store.as_ref(), &retained_blob).await,
        "retained blob evicted"
    );
    assert!(
        !present(store.as_ref(), &first_cold.unwrap()).await,
        "the oldest unused blob should have gone"
    );
}

/// A write that does not fit is refused at once, whole: nothing partial is visible and
/// no bytes stay counted; once space is freed, writes succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_limit_is_refused_and_leaves_nothing() {
    let (dir, store) = bounded(Duration::from_secs(3600)).await;
    let kept = put(store.as_ref(), blob(1, 960_000)).await.unwrap();
    let big = blob(2, 100_000);
    let err = put(store.as_ref(), big.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Full { limit: LIMIT }), "{err}");
    let big_digest = Digest::of_bytes(DigestFunction::Sha256, &big);
    assert!(!present(store.as_ref(), &big_digest).await);
    assert_eq!(
        store.used_bytes(),
        960_000,
        "the refused write's bytes are released"
    );
    // Everything is within its grace period: a pass frees nothing.
    let report = store.evict_once().await.unwrap();
    assert_eq!(
        (report.evicted_blobs, report.kept_in_grace),
        (0, 1),
        "{report:?}"
    );
    // A resumable upload refused for the same reason keeps no prefix either.
    let mut upload = store
        .begin_write(DigestFunction::Sha256, Some("refused"))
        .await
        .unwrap();
    upload.write(blob(3, 40_000)).await.unwrap();
    let err = upload.write(blob(4, 100_000)).await.unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err}");
    assert_eq!(
        store.used_bytes(),
        960_000,
        "a refused writer holds no bytes, even while it is still open"
    );
    drop(upload);
    for leftovers in ["tmp", "uploads"] {
        let left = walk(&dir.path().join(leftovers));
        assert_eq!(left, 0, "{leftovers}/ keeps {left} file(s)");
    }

    store.delete(&kept.content_hash()).await.unwrap();
    put(store.as_ref(), big).await.unwrap();
}

/// The background loop wakes when a write crosses the high watermark and brings the
/// store down to the low one without anyone calling it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_eviction_loop_wakes_at_the_high_watermark() {
    let (_dir, store) = bounded(Duration::ZERO).await;
    let stop = stop_signal();
    let evicting = tokio::spawn(store.clone().run_eviction(stop.1));
    for seed in 0..10 {
        put(store.as_ref(), blob(seed, 100_000)).await.unwrap();
    }
    let low = (LIMIT as f64 * 0.8) as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.stored_bytes().await.unwrap() > low {
        assert!(tokio::time::Instant::now() < deadline, "eviction never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.0.send(());
    evicting.await.unwrap();
}

fn stop_signal() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()>,
) {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    (sender, async move {
        let _ = receiver.await;
    })
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

/// With `max_age`, a store far below its limit still lets go of what nobody has used for
/// that long (an object store's eviction), and keeps what is retained or recently used.
#[tokio::test]
async fn blobs_unused_past_max_age_are_evicted_whatever_the_size() {
    let policy = EvictionPolicy {
        grace: Duration::ZERO,
        max_age: Some(Duration::from_millis(150)),
        ..EvictionPolicy::with_max_bytes(u64::MAX / 2)
    };
    let store = BoundedBlobStore::new(Arc::new(crate::MemoryBlobStore::new()), policy)
        .await
        .unwrap();
    let old = put(&store, blob(1, 1000)).await.unwrap();
    let retained = put(&store, blob(2, 1000)).await.unwrap();
    store.retain(Arc::new(Fixed(Mutex::new(HashSet::from([
        retained.content_hash()
    ])))));
    // The first pass hands the writes' accesses over; both are recent.
    assert_eq!(store.evict_once().await.unwrap().evicted_blobs, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = put(&store, blob(3, 1000)).await.unwrap();
    let report = store.evict_once().await.unwrap();
    assert_eq!(report.evicted_blobs, 1, "{report:?}");
    assert!(!present(&store, &old).await, "unused past max_age");
    assert!(
        present(&store, &retained).await,
        "retained whatever its age"
    );
    assert!(present(&store, &fresh).await, "used since the last pass");
}
