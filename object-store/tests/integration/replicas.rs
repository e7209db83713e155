//! Two stores on one bucket, as two kiln replicas are: what one writes or keeps, the other
//! reads or resumes.

use bytes::Bytes;
use kiln_store::{BlobStore, Digest, DigestFunction, ExpectedDigest};
use kiln_testkit::Garage;

use crate::support::open_store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn an_upload_begun_on_one_replica_completes_on_the_other() {
    let garage = Garage::start().expect("garage starts");
    let (a, b) = (
        open_store(&garage, "replicas").await,
        open_store(&garage, "replicas").await,
    );
    let data: Bytes = (0..(10 << 20) + 123).map(|i| (i % 251) as u8).collect();
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let id = "8c1f0b5e-replicas";

    // Three requests of one upload, alternating replicas; each replica's writer goes away
    // after its piece, as a request handler's does.
    let pieces = [0..3 << 20, 3 << 20..9 << 20, 9 << 20..data.len()];
    for (index, piece) in pieces.iter().enumerate() {
        let replica: &dyn BlobStore = if index % 2 == 0 { &a } else { &b };
        let mut writer = replica
            .begin_write(DigestFunction::Sha256, Some(id))
            .await
            .unwrap();
        assert_eq!(writer.bytes_written(), piece.start as u64, "piece {index}");
        writer.write(data.slice(piece.clone())).await.unwrap();
        if index + 1 == pieces.len() {
            let expected = ExpectedDigest::Hash(digest.content_hash());
            assert_eq!(writer.commit(expected).await.unwrap(), digest);
        } else {
            drop(writer);
            // The dropped writer keeps its bytes in the background; the next request
            // (on the other replica) must see them, so wait until they are listed.
            wait_until_kept(replica, piece.end as u64).await;
        }
    }
    for replica in [&a, &b] {
        assert_eq!(replica.read_all(&digest).await.unwrap(), data);
    }
}

async fn wait_until_kept(store: &dyn BlobStore, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.stored_bytes().await.unwrap() < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "upload bytes not kept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An upload may be kept in at most 1,000 pieces (one per request across replicas): past
/// that a resume is refused, rather than a commit reading back any number of objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn an_upload_in_too_many_pieces_is_refused() {
    use futures::StreamExt;
    let garage = Garage::start().expect("garage starts");
    let store = open_store(&garage, "pieces").await;
    let bucket = kiln_object_store::connect_s3(&crate::support::settings(&garage, 0, "")).unwrap();
    // 1,001 one-byte pieces, contiguous from 0, as 1,001 requests would leave them.
    futures::stream::iter(0..1_001u64)
        .map(|start| {
            let bucket = bucket.clone();
            async move {
                let key = format!("pieces/uploads/many/sha256-{start:016x}");
                bucket
                    .put(&key.as_str().into(), Bytes::from_static(b"x").into())
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    match store
        .begin_write(DigestFunction::Sha256, Some("many"))
        .await
    {
        Err(kiln_store::StoreError::LimitExceeded(message)) => {
            assert!(message.contains("1000 pieces"), "{message}")
        }
        Err(other) => panic!("expected LimitExceeded, got {other}"),
        Ok(_) => panic!("a resume over 1,000 pieces was accepted"),
    }
}

/// A blob one replica wrote is not yet in the other's presence index, so the other's
/// FindMissingBlobs calls it missing (a re-upload at most); `confirm_presence`, which
/// Execute and the action cache use, asks the bucket and finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn a_blob_written_through_one_replica_is_confirmed_present_on_the_other() {
    let garage = Garage::start().expect("garage starts");
    let (a, b) = (
        open_store(&garage, "presence").await,
        open_store(&garage, "presence").await,
    );
    let data = Bytes::from_static(b"written through replica a");
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let absent = Digest::of_bytes(DigestFunction::Sha256, b"written nowhere");
    a.put(ExpectedDigest::Exact(digest), data).await.unwrap();
    assert_eq!(b.has_many(&[digest]).await.unwrap(), [false]);
    assert_eq!(
        kiln_store::confirm_presence(&b, &[digest, absent])
            .await
            .unwrap(),
        [true, false]
    );
    // Asking taught b's index: its FindMissingBlobs now knows the blob too.
    assert_eq!(b.has_many(&[digest]).await.unwrap(), [true]);
}
