use futures::TryStreamExt;

use super::*;

fn store() -> (tempfile::TempDir, FsBlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    (dir, store)
}

async fn collect(stream: ChunkStream) -> Vec<u8> {
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    chunks.concat()
}

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

#[tokio::test]
async fn streamed_put_then_ranged_read() {
    let (_dir, store) = store();
    let data = pattern(3 * IO_CHUNK + 17);
    let digest = Digest::of_bytes(DigestFunction::Blake3, &data);
    let mut writer = store
        .begin_write(DigestFunction::Blake3, None)
        .await
        .unwrap();
    for piece in data.chunks(100_000) {
        writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    assert_eq!(
        writer.commit(ExpectedDigest::Exact(digest)).await.unwrap(),
        digest
    );

    assert_eq!(
        store.size_of(&digest.content_hash()).await.unwrap(),
        Some(digest.size)
    );
    assert_eq!(
        collect(store.read(&digest.content_hash(), 0, None).await.unwrap()).await,
        data
    );
    let middle = collect(
        store
            .read(&digest.content_hash(), 1000, Some(IO_CHUNK as u64 + 5))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(middle, &data[1000..1000 + IO_CHUNK + 5]);
    assert!(matches!(
        store
            .read(&digest.content_hash(), digest.size + 1, None)
            .await,
        Err(StoreError::OffsetOutOfRange { .. })
    ));
}

#[tokio::test]
async fn a_mismatch_stores_nothing() {
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
    assert_eq!(store.stored_bytes(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(store.list().try_collect::<Vec<_>>().await.unwrap().len(), 0);
}

#[tokio::test]
async fn the_empty_blob_is_always_present() {
    let (_dir, store) = store();
    for function in DigestFunction::ALL {
        let empty = function.empty_digest();
        assert_eq!(store.has_many(&[empty]).await.unwrap(), [true]);
        assert!(
            collect(store.read(&empty.content_hash(), 0, None).await.unwrap())
                .await
                .is_empty()
        );
    }
}

#[tokio::test]
async fn has_many_checks_size_too() {
    let (_dir, store) = store();
    let data = pattern(10);
    let digest = store
        .put(
            ExpectedDigest::Hash(Digest::of_bytes(DigestFunction::Sha256, &data).content_hash()),
            data,
        )
        .await
        .unwrap();
    let wrong_size = Digest { size: 11, ..digest };
    let absent = Digest::of_bytes(DigestFunction::Sha256, b"absent");
    assert_eq!(
        store.has_many(&[digest, wrong_size, absent]).await.unwrap(),
        [true, false, false]
    );
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
    assert_eq!(reopened.stored_bytes(), 4);
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
    assert!(store
        .begin_write(DigestFunction::Blake3, Some("../escape"))
        .await
        .is_err());
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
