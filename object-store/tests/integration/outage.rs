//! Garage going away and coming back: errors that say so, promptly, and no restart needed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_object_store::{connect_s3, ObjectBlobStore, ObjectStoreOptions};
use kiln_store::{BlobStore, Digest, DigestFunction, ExpectedDigest, StoreError};
use kiln_testkit::Garage;

use crate::support::settings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn an_unreachable_store_is_unavailable_and_recovers_without_a_restart() {
    let mut garage = Garage::start().expect("garage starts");
    let mut s3 = settings(&garage, 0, "outage");
    s3.retry_timeout_secs = 2;
    s3.request_timeout_secs = 5;
    let options = ObjectStoreOptions {
        prefix: "outage".into(),
        ..Default::default()
    };
    let store = ObjectBlobStore::open(connect_s3(&s3).unwrap(), options)
        .await
        .unwrap();
    let data = Bytes::from_static(b"written before the outage");
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    store
        .put(ExpectedDigest::Exact(digest), data.clone())
        .await
        .unwrap();

    garage.kill(0).unwrap();
    // FindMissingBlobs needs no request: the index answers while the bucket is gone.
    assert_eq!(store.has_many(&[digest]).await.unwrap(), [true]);
    // Anything that needs the bucket fails as unavailable, within the retry budget.
    let started = Instant::now();
    let other = Bytes::from_static(b"written during the outage");
    let other_digest = Digest::of_bytes(DigestFunction::Sha256, &other);
    match store
        .put(ExpectedDigest::Exact(other_digest), other.clone())
        .await
    {
        Err(StoreError::Unavailable(cause)) => {
            assert!(cause.contains("object store"), "{cause}");
            assert!(
                !cause.contains(garage.secret_access_key()),
                "the secret leaked: {cause}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    match store.read(&digest.content_hash(), 0, None).await {
        Err(StoreError::Unavailable(_)) => {}
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("a read reached a dead store"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failing took {:?}",
        started.elapsed()
    );

    // Back: the same store object serves again.
    garage.restart(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store
            .put(ExpectedDigest::Exact(other_digest), other.clone())
            .await
        {
            Ok(stored) => {
                assert_eq!(stored, other_digest);
                break;
            }
            Err(error) => {
                assert!(Instant::now() < deadline, "still failing: {error}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
    assert_eq!(store.read_all(&other_digest).await.unwrap(), other);
}
