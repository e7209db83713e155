//! ByteStream Read, Write and QueryWriteStatus over a real socket.

use crate::common;

use std::time::Duration;

use common::{
    assert_bad_request, blob_name, function_segment, random_bytes, upload_name, within,
    write_requests, TestServer,
};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use kiln_store::{Digest, DigestFunction};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

async fn write(server: &TestServer, requests: Vec<WriteRequest>) -> Result<i64, tonic::Status> {
    let response = server
        .byte_stream()
        .write(futures::stream::iter(requests))
        .await?;
    Ok(response.into_inner().committed_size)
}

async fn read(
    server: &TestServer,
    resource_name: String,
    read_offset: i64,
    read_limit: i64,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let mut stream = server
        .byte_stream()
        .read(ReadRequest {
            resource_name,
            read_offset,
            read_limit,
        })
        .await?
        .into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.message().await? {
        messages.push(message.data.to_vec());
    }
    Ok(messages)
}

async fn query(server: &TestServer, resource_name: &str) -> Result<(i64, bool), tonic::Status> {
    let status = server
        .byte_stream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: resource_name.into(),
        })
        .await?
        .into_inner();
    Ok((status.committed_size, status.complete))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_read_with_both_functions_and_instance_names() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    for function in DigestFunction::ALL {
        let data = random_bytes(200_000, function as u64);
        let digest = Digest::of_bytes(function, &data);
        let name = upload_name("team/a", "5b2a0f4e-uuid", &digest, false);
        let committed = within(
            10,
            write(&server, write_requests(&name, &data, 0, 16 << 10, true)),
        )
        .await?;
        assert_eq!(committed, data.len() as i64);
        assert_eq!(query(&server, &name).await?, (data.len() as i64, true));

        // The CAS is shared by every instance name.
        for instance in ["team/a", "", "other"] {
            let read_back = within(10, server.read_blob(blob_name(instance, &digest))).await?;
            assert_eq!(read_back, data, "{function} {instance:?}");
        }
        // Offset and limit select a slice; an offset at the end reads nothing.
        let slice = read(&server, blob_name("", &digest), 1_000, 5_000)
            .await?
            .concat();
        assert_eq!(slice, data[1_000..6_000]);
        let tail = read(&server, blob_name("", &digest), 199_990, 0)
            .await?
            .concat();
        assert_eq!(tail, data[199_990..]);
        let nothing = read(&server, blob_name("", &digest), 200_000, 0)
            .await?
            .concat();
        assert!(nothing.is_empty());
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_over_four_mebibytes_stream_in_bounded_chunks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let data = random_bytes(9 << 20, 99);
    for function in DigestFunction::ALL {
        let digest = Digest::of_bytes(function, &data);
        let name = upload_name("", "big", &digest, false);
        let committed = within(
            30,
            write(&server, write_requests(&name, &data, 0, 64 << 10, true)),
        )
        .await?;
        assert_eq!(committed, data.len() as i64);
        let messages = within(30, read(&server, blob_name("", &digest), 0, 0)).await?;
        assert!(messages.len() >= 9, "{} messages", messages.len());
        assert!(messages.iter().all(|m| m.len() <= (1 << 20)));
        assert!(messages.concat() == data, "{function}: content differs");
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_compressed_writes_and_reads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    for function in DigestFunction::ALL {
        let data: Vec<u8> = b"a fairly compressible line of build output\n".repeat(150_000);
        let digest = Digest::of_bytes(function, &data);
        let compressed = zstd::bulk::compress(&data, 3)?;
        let name = upload_name("ci", "zz", &digest, true);
        let committed = within(
            30,
            write(
                &server,
                write_requests(&name, &compressed, 0, 16 << 10, true),
            ),
        )
        .await?;
        // The wire bytes of a compressed upload.
        assert_eq!(committed, compressed.len() as i64);
        assert_eq!(server.read_blob(blob_name("ci", &digest)).await?, data);

        let compressed_name = format!(
            "ci/compressed-blobs/zstd/{}{}",
            function_segment(function),
            digest.reapi()
        );
        let received = within(30, read(&server, compressed_name.clone(), 0, 0))
            .await?
            .concat();
        assert!(received.len() < data.len() / 10);
        assert_eq!(zstd::stream::decode_all(received.as_slice())?, data);
        // read_offset counts uncompressed bytes.
        let from_offset = read(&server, compressed_name.clone(), 1_000_000, 0)
            .await?
            .concat();
        assert_eq!(
            zstd::stream::decode_all(from_offset.as_slice())?,
            data[1_000_000..]
        );

        // REAPI: a compressed read with a read_limit is an INVALID_ARGUMENT.
        let err = read(&server, compressed_name, 0, 10).await.unwrap_err();
        assert_bad_request(&err, "read_limit");

        // An upload of a blob already present ends at once: -1 when compressed.
        let again = upload_name("ci", "again", &digest, true);
        let committed = write(
            &server,
            write_requests(&again, &compressed[..100], 0, 100, false),
        )
        .await?;
        assert_eq!(committed, -1);
    }

    // Compressed data that is not zstd, or that decodes to something else, is refused.
    let data = b"the real content".to_vec();
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let name = upload_name("", "bad", &digest, true);
    let err = write(
        &server,
        write_requests(&name, b"garbage, not zstd", 0, 100, true),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let other = zstd::bulk::compress(b"different content", 1)?;
    let err = write(&server, write_requests(&name, &other, 0, 100, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(query(&server, &name).await?, (0, false));
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_do_not_match_their_digest_are_refused_and_not_stored() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let data = random_bytes(50_000, 3);
    let digest = Digest::of_bytes(DigestFunction::Blake3, &data);

    // Wrong content for the hash.
    let mut corrupted = data.clone();
    corrupted[25_000] ^= 1;
    let name = upload_name("", "u1", &digest, false);
    let err = write(&server, write_requests(&name, &corrupted, 0, 8 << 10, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Too much data for the size.
    let mut longer = data.clone();
    longer.extend_from_slice(b"extra");
    let err = write(&server, write_requests(&name, &longer, 0, 8 << 10, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Too little data, then finish_write.
    let err = write(
        &server,
        write_requests(&name, &data[..40_000], 0, 8 << 10, true),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // None of it was stored, and no partial upload is left to resume.
    let err = server.read_blob(blob_name("", &digest)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(query(&server, &name).await?, (0, false));

    // The resource name's size must match too: the right bytes under a wrong size fail.
    let wrong_size = Digest::new(digest.function, digest.hash, digest.size + 1);
    let name = upload_name("", "u2", &wrong_size, false);
    let err = write(&server, write_requests(&name, &data, 0, 8 << 10, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_specified_codes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let data = b"some blob".to_vec();
    let digest = server.upload("", DigestFunction::Sha256, &[&data]).await?[0];
    let absent = Digest::of_bytes(DigestFunction::Sha256, b"absent");

    // Malformed resource names, on every RPC.
    for bad in [
        "blobs/xyz/12".to_string(),
        format!("blobs/md5/{}", digest.reapi()),
        format!("compressed-blobs/brotli/{}", digest.reapi()),
        "nonsense".to_string(),
    ] {
        let err = read(&server, bad.clone(), 0, 0).await.unwrap_err();
        assert_bad_request(&err, "resource_name");
    }
    let err = write(
        &server,
        write_requests("uploads/u/blobs/abc/1", b"x", 0, 1, true),
    )
    .await
    .unwrap_err();
    assert_bad_request(&err, "resource_name");
    // A write must name an upload.
    let err = write(
        &server,
        write_requests(&blob_name("", &absent), b"absent", 0, 6, true),
    )
    .await
    .unwrap_err();
    assert_bad_request(&err, "resource_name");
    let err = query(&server, "uploads/u/blobs/short/1").await.unwrap_err();
    assert_bad_request(&err, "resource_name");

    // Reads: missing → NOT_FOUND, past the end → OUT_OF_RANGE, negative limit → INVALID_ARGUMENT.
    let err = read(&server, blob_name("", &absent), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = read(&server, blob_name("", &digest), data.len() as i64 + 1, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = read(&server, blob_name("", &digest), -1, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = read(&server, blob_name("", &digest), 0, -1)
        .await
        .unwrap_err();
    assert_bad_request(&err, "read_limit");

    // Writes at a wrong offset: a first offset that is not the committed size, and a
    // later one that skips data.
    let payload = random_bytes(30_000, 5);
    let target = Digest::of_bytes(DigestFunction::Sha256, &payload);
    let name = upload_name("", "offsets", &target, false);
    let err = write(
        &server,
        write_requests(&name, &payload[10..], 10, 4096, true),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut skipping = write_requests(&name, &payload, 0, 4096, true);
    skipping[2].write_offset += 1;
    let err = write(&server, skipping).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A resource name that changes mid-stream.
    let mut renamed = write_requests(&name, &payload, 0, 4096, true);
    renamed[1].resource_name = upload_name("", "someone-else", &target, false);
    let err = write(&server, renamed).await.unwrap_err();
    assert_bad_request(&err, "resource_name");
    // An empty stream.
    let err = write(&server, Vec::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_a_blob_that_exists_answers_early_with_its_size() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let data = random_bytes(100_000, 11);
    let digest = server.upload("", DigestFunction::Blake3, &[&data]).await?[0];
    let name = upload_name("", "dup", &digest, false);

    // The client sends one chunk and never finishes; the server answers anyway.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(write_requests(&name, &data[..1000], 0, 1000, false).remove(0))
        .await?;
    let response = within(10, server.byte_stream().write(ReceiverStream::new(rx))).await?;
    assert_eq!(response.into_inner().committed_size, data.len() as i64);
    drop(tx);

    // QueryWriteStatus of a stored blob: complete. Of an upload never seen: nothing yet.
    assert_eq!(query(&server, &name).await?, (data.len() as i64, true));
    let absent = Digest::of_bytes(DigestFunction::Blake3, b"not yet");
    assert_eq!(
        query(&server, &upload_name("", "new", &absent, false)).await?,
        (0, false)
    );
    // The empty blob always exists.
    let empty = DigestFunction::Blake3.empty_digest();
    assert_eq!(
        write(
            &server,
            write_requests(&upload_name("", "e", &empty, false), b"", 0, 1, true)
        )
        .await?,
        0
    );
    assert!(server.read_blob(blob_name("", &empty)).await?.is_empty());
    server.stop().await
}

/// Polls QueryWriteStatus until it reports `expected` bytes, for up to 15 s: a deadline
/// in time, since a count of polls (200 of 25 ms) ended about when a 4 s TTL's sweep
/// (up to TTL + TTL / 4 after the last write) is due.
async fn wait_for_committed(server: &TestServer, name: &str, expected: i64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let last = query(server, name).await?;
        if last.0 == expected {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("committed size stayed at {last:?}, expected {expected}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_write_resumes_at_the_committed_size() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let data = random_bytes(6 << 20, 21);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let name = upload_name(
        "inst",
        "8c1f0b5e-0000-4000-8000-000000000001",
        &digest,
        false,
    );
    let half = 3 << 20;

    // Send half the data on a connection of its own, then kill the call mid-stream.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut client = ByteStreamClient::new(server.new_channel().await?);
    let call = tokio::spawn(async move { client.write(ReceiverStream::new(rx)).await });
    for request in write_requests(&name, &data[..half], 0, 256 << 10, false) {
        tx.send(request).await?;
    }
    within(20, wait_for_committed(&server, &name, half as i64)).await?;
    call.abort();
    drop(tx);
    let _ = call.await;

    // The server kept what it received.
    within(20, wait_for_committed(&server, &name, half as i64)).await?;
    assert_eq!(query(&server, &name).await?, (half as i64, false));

    // Resuming anywhere else is refused; at the committed size it completes.
    let err = write(
        &server,
        write_requests(&name, &data[half + 1..], half as u64 + 1, 256 << 10, true),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let committed = within(
        20,
        write(
            &server,
            write_requests(&name, &data[half..], half as u64, 256 << 10, true),
        ),
    )
    .await?;
    assert_eq!(committed, data.len() as i64);
    assert_eq!(query(&server, &name).await?, (data.len() as i64, true));
    assert!(within(20, server.read_blob(blob_name("inst", &digest))).await? == data);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_compressed_write_resumes_from_the_uncompressed_offset() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let data: Vec<u8> = (0..2_000_000u32)
        .flat_map(|i| (i / 7).to_le_bytes())
        .collect();
    let digest = Digest::of_bytes(DigestFunction::Blake3, &data);
    let name = upload_name("", "resume-zstd", &digest, true);
    let compressed = zstd::bulk::compress(&data, 1)?;

    // The client closes the stream after half the compressed bytes, without finishing.
    let sent = compressed.len() / 2;
    let response = write(
        &server,
        write_requests(&name, &compressed[..sent], 0, 32 << 10, false),
    )
    .await?;
    let (committed, complete) = query(&server, &name).await?;
    assert!(!complete);
    assert_eq!(
        response, committed,
        "the response reports what QueryWriteStatus does"
    );
    assert!(
        committed > 0 && committed < data.len() as i64,
        "{committed}"
    );

    // It resumes with a fresh zstd frame of the rest, at the uncompressed offset.
    let rest = zstd::bulk::compress(&data[committed as usize..], 1)?;
    within(
        20,
        write(
            &server,
            write_requests(&name, &rest, committed as u64, 32 << 10, true),
        ),
    )
    .await?;
    assert!(server.read_blob(blob_name("", &digest)).await? == data);
    server.stop().await
}

/// A client that goes away mid-upload leaves bytes kept for a resume; once the upload has
/// been idle for `upload_ttl_secs`, the coordinator's sweep removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_is_swept_after_its_ttl() -> anyhow::Result<()> {
    // Long enough that a loaded CI machine still queries before the sweep, short enough
    // to wait for: a 1 s TTL once expired between the last write and the first query.
    const TTL_SECS: u64 = 4;
    let dir = tempfile::tempdir()?;
    let config = kiln_coordinator::CoordinatorConfig {
        upload_ttl_secs: TTL_SECS,
        ..Default::default()
    };
    let server = TestServer::start_with(dir.path(), config).await?;
    let data = random_bytes(300_000, 31);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let name = upload_name("", "8c1f0b5e-0000-4000-8000-0000000000ab", &digest, false);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut client = ByteStreamClient::new(server.new_channel().await?);
    let call = tokio::spawn(async move { client.write(ReceiverStream::new(rx)).await });
    for request in write_requests(&name, &data[..100_000], 0, 50_000, false) {
        tx.send(request).await?;
    }
    within(20, wait_for_committed(&server, &name, 100_000)).await?;
    let last_write = std::time::Instant::now();
    call.abort();
    drop(tx);
    let _ = call.await;
    // Kept for a resume: the server still reports what it received. Only asserted while
    // the TTL cannot yet have run out, so the check says something about the server
    // rather than about how busy the machine is.
    let kept = query(&server, &name).await?;
    if last_write.elapsed() < std::time::Duration::from_secs(TTL_SECS) {
        assert_eq!(kept, (100_000, false));
    }
    // Swept within a sweep of the TTL (every TTL / 4 = 1 s here): nothing left to resume.
    within(20, wait_for_committed(&server, &name, 0)).await?;
    let uploads = dir.path().join("blobs").join("uploads");
    assert_eq!(
        std::fs::read_dir(&uploads)?.count(),
        0,
        "the upload's file is gone"
    );
    server.stop().await
}
