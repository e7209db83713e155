use futures::TryStreamExt;

use super::*;
use crate::blob_store::ExpectedDigest;

fn store() -> (tempfile::TempDir, FsBlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    (dir, store)
}

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

/// Beyond the conformance suite's check: nothing is left in `tmp/` either.
#[tokio::test]
async fn a_mismatch_leaves_no_temp_file() {
    let (dir, store) = store();
    let data = pattern(5000);
    let wrong = Digest::of_bytes(DigestFunction::Sha256, b"something else");
    let err = store
        .put(ExpectedDigest::Exact(wrong), data.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }));
    let right_hash_wrong_size = Digest {
        size: 4999,
        ..Digest::of_bytes(DigestFunction::Sha256, &data)
    };
    assert!(store
        .put(ExpectedDigest::Exact(right_hash_wrong_size), data)
        .await
        .is_err());
    assert_eq!(store.stored_bytes().await.unwrap(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(store.list().try_collect::<Vec<_>>().await.unwrap().len(), 0);
}

/// A commit that fails after the digest checked out (here the blob's directory cannot be
/// made; ENOSPC or EIO on fsync take the same path) leaves no temp or upload file.
#[tokio::test]
async fn a_failed_commit_leaves_no_file() {
    let (dir, store) = store();
    let data = pattern(3000);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let blocked = store.blob_path(&digest.content_hash());
    let prefix = blocked.parent().unwrap();
    std::fs::create_dir_all(prefix.parent().unwrap()).unwrap();
    std::fs::write(prefix, b"a file where the blob's directory belongs").unwrap();
    assert!(store
        .put(ExpectedDigest::Exact(digest), data.clone())
        .await
        .is_err());
    let mut writer = store
        .begin_write(DigestFunction::Sha256, Some("named"))
        .await
        .unwrap();
    writer.write(data).await.unwrap();
    assert!(writer.commit(ExpectedDigest::Exact(digest)).await.is_err());
    for leftovers in ["tmp", "uploads"] {
        let left = std::fs::read_dir(dir.path().join(leftovers))
            .unwrap()
            .count();
        assert_eq!(left, 0, "{leftovers}/ keeps {left} file(s)");
    }
    assert_eq!(store.stored_bytes().await.unwrap(), 0);
}

#[tokio::test]
async fn delete_and_reopen() {
    let (dir, store) = store();
    let kept = store
        .put(
            ExpectedDigest::Exact(Digest::of_bytes(DigestFunction::Sha256, b"kept")),
            Bytes::from_static(b"kept"),
        )
        .await
        .unwrap();
    let gone = store
        .put(
            ExpectedDigest::Exact(Digest::of_bytes(DigestFunction::Blake3, b"gone")),
            Bytes::from_static(b"gone"),
        )
        .await
        .unwrap();
    assert!(store.delete(&gone.content_hash()).await.unwrap());
    assert!(!store.delete(&gone.content_hash()).await.unwrap());
    drop(store);

    let reopened = FsBlobStore::open(dir.path()).unwrap();
    assert_eq!(
        reopened.has_many(&[kept, gone]).await.unwrap(),
        [true, false]
    );
    assert_eq!(reopened.stored_bytes().await.unwrap(), 4);
    let listed: Vec<BlobInfo> = reopened.list().try_collect().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].hash, kept.content_hash());
}

#[tokio::test]
async fn a_named_upload_resumes_after_a_dropped_writer() {
    let (dir, store) = store();
    let data = pattern(2 * IO_CHUNK + 123);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let split = IO_CHUNK + 7;
    {
        let mut writer = store
            .begin_write(DigestFunction::Sha256, Some("upload-1"))
            .await
            .unwrap();
        writer.write(data.slice(..split)).await.unwrap();
        // Dropped without commit: the client disconnected.
    }
    // A resuming writer waits for the dropped one's last append (the upload's lock)...
    drop(
        store
            .begin_write(DigestFunction::Sha256, Some("upload-1"))
            .await
            .unwrap(),
    );
    // ...and a restart in between must not matter either.
    let store = FsBlobStore::open(dir.path()).unwrap();
    let mut writer = store
        .begin_write(DigestFunction::Sha256, Some("upload-1"))
        .await
        .unwrap();
    assert_eq!(writer.bytes_written(), split as u64);
    writer.write(data.slice(split..)).await.unwrap();
    assert_eq!(
        writer.commit(ExpectedDigest::Exact(digest)).await.unwrap(),
        digest
    );
    assert!(!dir.path().join("uploads/upload-1").exists());
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
}

#[tokio::test]
async fn an_aborted_upload_leaves_nothing() {
    let (dir, store) = store();
    let mut writer = store
        .begin_write(DigestFunction::Blake3, Some("u2"))
        .await
        .unwrap();
    writer.write(pattern(100)).await.unwrap();
    writer.abort().await.unwrap();
    assert!(!dir.path().join("uploads/u2").exists());
}

/// Small blobs take the direct read, large ones the stream; both check presence and size.
#[tokio::test]
async fn read_all_small_and_large_blobs() {
    let (_dir, store) = store();
    for len in [1, SMALL_READ_BYTES as usize, SMALL_READ_BYTES as usize + 1] {
        let data = pattern(len);
        let digest = store
            .put(
                ExpectedDigest::Exact(Digest::of_bytes(DigestFunction::Sha256, &data)),
                data.clone(),
            )
            .await
            .unwrap();
        assert_eq!(store.read_all(&digest).await.unwrap(), data, "{len} bytes");
        // The right hash with the wrong size is not this blob.
        let wrong_size = Digest::new(digest.function, digest.hash, digest.size + 1);
        assert!(matches!(
            store.read_all(&wrong_size).await,
            Err(StoreError::NotFound(_))
        ));
    }
    let absent = Digest::of_bytes(DigestFunction::Sha256, b"never stored");
    assert!(matches!(
        store.read_all(&absent).await,
        Err(StoreError::NotFound(_))
    ));
    let empty = DigestFunction::Sha256.empty_digest();
    assert!(store.read_all(&empty).await.unwrap().is_empty());
}

/// Large chunks are kept as they came and small ones gathered (writer.rs): interleaved,
/// across several flushes and a resume, the file still holds every byte in order.
#[tokio::test]
async fn chunks_of_every_size_land_in_order() {
    let (_dir, store) = store();
    let sizes = [
        1,
        3 << 20,
        7,
        65 << 10,
        (64 << 10) - 1,
        1 << 20,
        100,
        2 << 20,
        5,
    ];
    let data = pattern(sizes.iter().sum());
    let digest = Digest::of_bytes(DigestFunction::Blake3, &data);
    let mut writer = store
        .begin_write(DigestFunction::Blake3, Some("mixed"))
        .await
        .unwrap();
    let mut offset = 0;
    for (i, size) in sizes.iter().enumerate() {
        writer
            .write(data.slice(offset..offset + size))
            .await
            .unwrap();
        offset += size;
        if i == sizes.len() / 2 {
            // Dropped mid-upload: what was accepted is kept, and a new writer resumes.
            drop(writer);
            writer = store
                .begin_write(DigestFunction::Blake3, Some("mixed"))
                .await
                .unwrap();
            assert_eq!(writer.bytes_written(), offset as u64);
        }
    }
    writer.commit(ExpectedDigest::Exact(digest)).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
}
