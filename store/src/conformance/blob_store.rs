//! The [`BlobStore`] contract. Each check writes content of its own, so all of them can
//! share one store.

use bytes::Bytes;
use futures::TryStreamExt;

use crate::{BlobStore, ContentHash, Digest, DigestFunction, ExpectedDigest, StoreError};

/// Runs every check on `store`, which must start empty.
pub async fn all(store: &dyn BlobStore) {
    the_empty_blob_is_always_present(store).await;
    put_then_read_whole_and_ranged(store).await;
    has_many_checks_the_size(store).await;
    a_mismatch_stores_nothing(store).await;
    an_oci_hash_expectation_takes_any_size(store).await;
    a_dropped_or_aborted_writer_leaves_nothing(store).await;
    a_named_upload_resumes_or_starts_over(store).await;
    delete_removes_once(store).await;
    list_and_stored_bytes_count_what_is_stored(store).await;
    concurrent_writers_of_one_blob_all_succeed(store).await;
    touch_ignores_absent_blobs(store).await;
    upload_ids_are_plain_names(store).await;
    abandoned_uploads_are_swept_and_open_ones_kept(store).await;
    a_reader_during_a_write_sees_nothing_until_the_commit(store).await;
    large_blobs_stream_resume_and_fail_whole(store).await;
    a_suspended_upload_resumes_with_every_byte(store).await;
}

/// `suspend` keeps every byte for the next writer of the upload, wherever it runs.
pub async fn a_suspended_upload_resumes_with_every_byte(store: &dyn BlobStore) {
    let data = content(90_000, 18);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let id = "conformance-suspended";
    let mut offset = 0;
    for piece in data.chunks(40_000) {
        let mut writer = store
            .begin_write(DigestFunction::Sha256, Some(id))
            .await
            .unwrap();
        assert_eq!(writer.bytes_written(), offset);
        writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
        offset = writer.suspend().await.unwrap();
    }
    assert_eq!(offset, data.len() as u64);
    let writer = store
        .begin_write(DigestFunction::Sha256, Some(id))
        .await
        .unwrap();
    assert_eq!(writer.bytes_written(), offset);
    assert_eq!(
        writer.commit(ExpectedDigest::Exact(digest)).await.unwrap(),
        digest
    );
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
}

/// What a concurrent reader sees of a blob being written: nothing, until the commit has
/// checked it, then all of it.
pub async fn a_reader_during_a_write_sees_nothing_until_the_commit(store: &dyn BlobStore) {
    let data = content(200_000, 15);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let hash = digest.content_hash();
    let mut writer = store
        .begin_write(DigestFunction::Sha256, None)
        .await
        .unwrap();
    writer.write(data.slice(..150_000)).await.unwrap();
    assert_eq!(store.size_of(&hash).await.unwrap(), None);
    assert_eq!(store.has_many(&[digest]).await.unwrap(), [false]);
    assert!(matches!(
        store.read(&hash, 0, None).await,
        Err(StoreError::NotFound(_))
    ));
    writer.write(data.slice(150_000..)).await.unwrap();
    writer.commit(ExpectedDigest::Exact(digest)).await.unwrap();
    assert_eq!(store.has_many(&[digest]).await.unwrap(), [true]);
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
}

/// Blobs larger than any backend's in-memory buffer or upload part (20 MiB): written in
/// pieces, read in ranges across part boundaries, resumed mid-way, and refused whole on
/// a mismatch.
pub async fn large_blobs_stream_resume_and_fail_whole(store: &dyn BlobStore) {
    let data = content(20 << 20 | 777, 16);
    let write_all = |function, upload_id: Option<&'static str>, from: usize| {
        let data = data.clone();
        async move {
            let mut writer = store.begin_write(function, upload_id).await.unwrap();
            assert_eq!(writer.bytes_written(), from as u64);
            for piece in data[from..].chunks(1 << 20) {
                writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
            }
            writer
        }
    };
    let digest = Digest::of_bytes(DigestFunction::Blake3, &data);
    let writer = write_all(DigestFunction::Blake3, None, 0).await;
    assert_eq!(
        writer.commit(ExpectedDigest::Exact(digest)).await.unwrap(),
        digest
    );
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
    let (offset, limit) = ((8 << 20) - 1000, 3 << 20);
    assert_eq!(
        read_range(store, &digest.content_hash(), offset, Some(limit)).await,
        &data[offset as usize..(offset + limit) as usize]
    );

    // Resumed after 12 MiB and a dropped writer, under an OCI expectation (any size).
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let id = "conformance-large-upload";
    let mut first = store
        .begin_write(DigestFunction::Sha256, Some(id))
        .await
        .unwrap();
    for piece in data[..12 << 20].chunks(1 << 20) {
        first.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    drop(first);
    let resumed_at = store
        .begin_write(DigestFunction::Sha256, Some(id))
        .await
        .unwrap()
        .bytes_written() as usize;
    assert!(resumed_at == 12 << 20 || resumed_at == 0, "{resumed_at}");
    let rest = write_all(DigestFunction::Sha256, Some(id), resumed_at).await;
    let expected = ExpectedDigest::Hash(digest.content_hash());
    assert_eq!(rest.commit(expected).await.unwrap(), digest);
    assert_eq!(store.read_all(&digest).await.unwrap(), data);

    // A large write that does not match leaves nothing under either name.
    let other = content(20 << 20, 17);
    let claimed = Digest::of_bytes(DigestFunction::Sha256, b"not this");
    let mut writer = store
        .begin_write(DigestFunction::Sha256, None)
        .await
        .unwrap();
    for piece in other.chunks(1 << 20) {
        writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    assert!(matches!(
        writer.commit(ExpectedDigest::Exact(claimed)).await,
        Err(StoreError::DigestMismatch { .. })
    ));
    for hash in [
        claimed.content_hash(),
        Digest::of_bytes(DigestFunction::Sha256, &other).content_hash(),
    ] {
        assert_eq!(store.size_of(&hash).await.unwrap(), None);
    }
}

pub async fn abandoned_uploads_are_swept_and_open_ones_kept(store: &dyn BlobStore) {
    let hour = std::time::Duration::from_secs(3600);
    let data = content(70_000, 13);
    let digest = Digest::of_bytes(DigestFunction::Blake3, &data);
    // A client went away mid-upload: its bytes are kept for a resume.
    let mut abandoned = store
        .begin_write(DigestFunction::Blake3, Some("swept-upload"))
        .await
        .unwrap();
    abandoned.write(data.slice(..1000)).await.unwrap();
    let before = store.stored_bytes().await.unwrap();
    drop(abandoned);
    // The kept bytes count as stored (a dropped writer may append its last bytes in the
    // background, so wait for them, boundedly).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.stored_bytes().await.unwrap() < before + 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "kept upload bytes are not counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Another is still being written.
    let mut open = store
        .begin_write(DigestFunction::Blake3, Some("open-upload"))
        .await
        .unwrap();
    open.write(data.slice(..500)).await.unwrap();

    assert_eq!(
        store.sweep_uploads(hour).await.unwrap(),
        0,
        "nothing is an hour idle"
    );
    // Let the clock move past the abandoned upload's last write.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let swept = store
        .sweep_uploads(std::time::Duration::from_millis(10))
        .await
        .unwrap();
    assert!(swept >= 1, "the abandoned upload was not swept");
    let resumed = store
        .begin_write(DigestFunction::Blake3, Some("swept-upload"))
        .await
        .unwrap();
    assert_eq!(resumed.bytes_written(), 0, "a swept upload starts again");
    resumed.abort().await.unwrap();
    // The open writer was left alone and still commits.
    open.write(data.slice(500..)).await.unwrap();
    assert_eq!(
        open.commit(ExpectedDigest::Exact(digest)).await.unwrap(),
        digest
    );
}

pub async fn upload_ids_are_plain_names(store: &dyn BlobStore) {
    for id in ["../escape", "a/b", "", "with space"] {
        assert!(
            store
                .begin_write(DigestFunction::Sha256, Some(id))
                .await
                .is_err(),
            "upload id {id:?} was accepted"
        );
    }
}

/// Deterministic content of `len` bytes, different for each `seed`.
fn content(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

async fn read_range(
    store: &dyn BlobStore,
    hash: &ContentHash,
    offset: u64,
    limit: Option<u64>,
) -> Vec<u8> {
    let chunks: Vec<Bytes> = store
        .read(hash, offset, limit)
        .await
        .expect("a stored blob reads")
        .try_collect()
        .await
        .expect("every chunk reads");
    chunks.concat()
}

async fn put(store: &dyn BlobStore, function: DigestFunction, data: &Bytes) -> Digest {
    let digest = Digest::of_bytes(function, data);
    store
        .put(ExpectedDigest::Exact(digest), data.clone())
        .await
        .expect("a put of matching content succeeds")
}

pub async fn the_empty_blob_is_always_present(store: &dyn BlobStore) {
    for function in DigestFunction::ALL {
        let empty = function.empty_digest();
        assert_eq!(store.size_of(&empty.content_hash()).await.unwrap(), Some(0));
        assert_eq!(store.has_many(&[empty]).await.unwrap(), [true]);
        assert!(read_range(store, &empty.content_hash(), 0, None)
            .await
            .is_empty());
        assert_eq!(store.read_all(&empty).await.unwrap().len(), 0);
        assert!(
            !store.delete(&empty.content_hash()).await.unwrap(),
            "the empty blob cannot be deleted"
        );
    }
}

pub async fn put_then_read_whole_and_ranged(store: &dyn BlobStore) {
    // Larger than any sensible chunk, so that ranges cross chunk boundaries.
    let data = content(3 << 20 | 12345, 1);
    for function in DigestFunction::ALL {
        let digest = put(store, function, &data).await;
        let hash = digest.content_hash();
        assert_eq!(store.size_of(&hash).await.unwrap(), Some(data.len() as u64));
        assert_eq!(store.read_all(&digest).await.unwrap(), data);
        let len = data.len() as u64;
        for (offset, limit) in [
            (0, Some(10)),
            (1 << 20, Some(1 << 20)),
            (len - 7, None),
            (5, Some(len)),
        ] {
            let end = limit.map_or(len, |l| len.min(offset + l));
            assert_eq!(
                read_range(store, &hash, offset, limit).await,
                &data[offset as usize..end as usize],
                "range {offset}+{limit:?}"
            );
        }
        assert!(
            read_range(store, &hash, len, None).await.is_empty(),
            "a read at the end is empty"
        );
        match store.read(&hash, len + 1, None).await {
            Err(StoreError::OffsetOutOfRange { offset, size }) => {
                assert_eq!((offset, size), (len + 1, len))
            }
            Err(e) => panic!("a read past the end: expected OffsetOutOfRange, got {e}"),
            Ok(_) => panic!("a read past the end: expected OffsetOutOfRange, got a stream"),
        }
        // A second put of the same content is a no-op that succeeds.
        assert_eq!(put(store, function, &data).await, digest);
    }
    let absent = Digest::of_bytes(DigestFunction::Sha256, b"never stored");
    assert_eq!(store.size_of(&absent.content_hash()).await.unwrap(), None);
    assert!(matches!(
        store.read(&absent.content_hash(), 0, None).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.read_all(&absent).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn has_many_checks_the_size(store: &dyn BlobStore) {
    let data = content(100, 2);
    let digest = put(store, DigestFunction::Blake3, &data).await;
    let wrong_size = Digest::new(digest.function, digest.hash, 99);
    let absent = Digest::of_bytes(DigestFunction::Blake3, b"absent");
    assert_eq!(
        store.has_many(&[digest, wrong_size, absent]).await.unwrap(),
        [true, false, false]
    );
    // read_all with a size the blob does not have is NotFound, not a buffer of that size.
    let huge = Digest::new(digest.function, digest.hash, u64::MAX / 2);
    assert!(matches!(
        store.read_all(&huge).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn a_mismatch_stores_nothing(store: &dyn BlobStore) {
    let data = content(5000, 3);
    let claimed = Digest::of_bytes(DigestFunction::Sha256, b"something else");
    let mut writer = store
        .begin_write(DigestFunction::Sha256, None)
        .await
        .unwrap();
    writer.write(data.clone()).await.unwrap();
    assert_eq!(writer.bytes_written(), data.len() as u64);
    match writer.commit(ExpectedDigest::Exact(claimed)).await {
        Err(StoreError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, claimed);
            assert_eq!(actual, Digest::of_bytes(DigestFunction::Sha256, &data));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    for hash in [
        claimed.content_hash(),
        Digest::of_bytes(DigestFunction::Sha256, &data).content_hash(),
    ] {
        assert_eq!(
            store.size_of(&hash).await.unwrap(),
            None,
            "a mismatched write left {hash}"
        );
    }
    // put with data that does not match an existing blob's digest is refused too.
    let present = put(store, DigestFunction::Sha256, &content(10, 4)).await;
    assert!(matches!(
        store
            .put(ExpectedDigest::Exact(present), content(10, 5))
            .await,
        Err(StoreError::DigestMismatch { .. })
    ));
}

pub async fn an_oci_hash_expectation_takes_any_size(store: &dyn BlobStore) {
    let data = content(777, 6);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let mut writer = store
        .begin_write(DigestFunction::Sha256, None)
        .await
        .unwrap();
    for piece in data.chunks(100) {
        writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    let stored = writer
        .commit(ExpectedDigest::Hash(digest.content_hash()))
        .await
        .unwrap();
    assert_eq!(stored, digest);
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
}

pub async fn a_dropped_or_aborted_writer_leaves_nothing(store: &dyn BlobStore) {
    let data = content(4096, 7);
    let digest = Digest::of_bytes(DigestFunction::Blake3, &data);
    let mut writer = store
        .begin_write(DigestFunction::Blake3, None)
        .await
        .unwrap();
    writer.write(data.clone()).await.unwrap();
    drop(writer);
    let mut writer = store
        .begin_write(DigestFunction::Blake3, Some("aborted-upload"))
        .await
        .unwrap();
    writer.write(data.clone()).await.unwrap();
    writer.abort().await.unwrap();
    assert_eq!(store.size_of(&digest.content_hash()).await.unwrap(), None);
    // An aborted named upload starts from nothing.
    let writer = store
        .begin_write(DigestFunction::Blake3, Some("aborted-upload"))
        .await
        .unwrap();
    assert_eq!(writer.bytes_written(), 0);
    writer.abort().await.unwrap();
}

pub async fn a_named_upload_resumes_or_starts_over(store: &dyn BlobStore) {
    let data = content(300_000, 8);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let id = "conformance-upload-1";
    let mut writer = store
        .begin_write(DigestFunction::Sha256, Some(id))
        .await
        .unwrap();
    writer.write(data.slice(..100_000)).await.unwrap();
    drop(writer);
    let mut writer = store
        .begin_write(DigestFunction::Sha256, Some(id))
        .await
        .unwrap();
    // Resumed where the dropped writer stopped, or (a backend that could not keep the
    // prefix) from the start: the caller continues from whatever it is told.
    let resumed_at = writer.bytes_written();
    assert!(
        resumed_at == 100_000 || resumed_at == 0,
        "resumed at {resumed_at}"
    );
    writer
        .write(data.slice(resumed_at as usize..))
        .await
        .unwrap();
    assert_eq!(writer.bytes_written(), data.len() as u64);
    assert_eq!(
        writer.commit(ExpectedDigest::Exact(digest)).await.unwrap(),
        digest
    );
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
    // A committed upload's id is free again.
    let writer = store
        .begin_write(DigestFunction::Sha256, Some(id))
        .await
        .unwrap();
    assert_eq!(writer.bytes_written(), 0);
    writer.abort().await.unwrap();
}

pub async fn delete_removes_once(store: &dyn BlobStore) {
    let digest = put(store, DigestFunction::Blake3, &content(64, 9)).await;
    assert!(store.delete(&digest.content_hash()).await.unwrap());
    assert!(!store.delete(&digest.content_hash()).await.unwrap());
    assert_eq!(store.size_of(&digest.content_hash()).await.unwrap(), None);
    assert_eq!(store.has_many(&[digest]).await.unwrap(), [false]);
    // And it can be written again.
    put(store, DigestFunction::Blake3, &content(64, 9)).await;
}

pub async fn list_and_stored_bytes_count_what_is_stored(store: &dyn BlobStore) {
    let before = store.stored_bytes().await.unwrap();
    let data = content(12_345, 10);
    let digest = put(store, DigestFunction::Sha256, &data).await;
    assert_eq!(
        store.stored_bytes().await.unwrap(),
        before + data.len() as u64
    );
    let listed: Vec<_> = store.list().try_collect().await.unwrap();
    let entry = listed
        .iter()
        .find(|info| info.hash == digest.content_hash())
        .expect("a stored blob is listed");
    assert_eq!(entry.size, data.len() as u64);
    assert_eq!(
        listed.iter().map(|info| info.size).sum::<u64>(),
        store.stored_bytes().await.unwrap(),
        "stored_bytes is what list shows"
    );
    store.delete(&digest.content_hash()).await.unwrap();
    assert_eq!(store.stored_bytes().await.unwrap(), before);
}

pub async fn concurrent_writers_of_one_blob_all_succeed(store: &dyn BlobStore) {
    let data = content(1 << 20, 11);
    let digest = Digest::of_bytes(DigestFunction::Blake3, &data);
    let writes = (0..8).map(|_| async {
        let mut writer = store.begin_write(DigestFunction::Blake3, None).await?;
        for piece in data.chunks(64 << 10) {
            writer.write(Bytes::copy_from_slice(piece)).await?;
        }
        writer.commit(ExpectedDigest::Exact(digest)).await
    });
    for result in futures::future::join_all(writes).await {
        assert_eq!(result.expect("every concurrent writer commits"), digest);
    }
    assert_eq!(store.read_all(&digest).await.unwrap(), data);
}

pub async fn touch_ignores_absent_blobs(store: &dyn BlobStore) {
    let present = put(store, DigestFunction::Sha256, &content(10, 12)).await;
    let absent = Digest::of_bytes(DigestFunction::Sha256, b"touch me not");
    store
        .touch(&[present.content_hash(), absent.content_hash()])
        .await
        .expect("touching an absent blob is not an error");
}
