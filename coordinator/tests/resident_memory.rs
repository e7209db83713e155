//! What the coordinator holds in memory does not grow with a blob's size: a large blob
//! named as an Action is refused without being read, and a GiB written and read through
//! ByteStream streams through a MiB at a time. Measured on the resident set, which is the
//! whole process's, so this test is a binary of its own (in the shared integration
//! binary, other tests' buffers would show up in it), and its tests run one at a time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_bad_request, blob_name, upload_name, wire, within, TestServer};
use kiln_proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use kiln_proto::reapi::{
    execution_client::ExecutionClient, ExecuteRequest, FindMissingBlobsRequest,
};
use kiln_store::{Digest, DigestFunction};
use kiln_testkit::resident::{resident_bytes, LargeContent, PeakSampler};
use tokio::sync::Mutex;

/// The tests measure one process-wide number: each holds this while it runs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// How far a GiB transfer may raise the resident set. Either side buffering the whole
/// blob would add 1024 MiB; what streaming costs is the HTTP/2 windows (16 MiB a stream,
/// 64 MiB a connection), a few MiB chunks in flight and the allocator's free lists.
const GROWTH_BOUND: u64 = 192 << 20;

const SAMPLE_EVERY: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_named_as_an_action_does_not_grow_the_resident_set() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await.unwrap();
    // Large enough that reading it would show in the resident set many times over.
    let size = 256 << 20;
    let blob = server.store_zeros(DigestFunction::Blake3, size).await;
    let before = resident_bytes();
    let status = ExecutionClient::new(server.channel.clone())
        .execute(ExecuteRequest {
            action_digest: Some(wire(&blob)),
            skip_cache_lookup: true,
            digest_function: DigestFunction::Blake3.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let grown = resident_bytes().saturating_sub(before);
    assert_bad_request(&status, "action_digest");
    assert!(
        grown < 8 << 20,
        "the resident set grew by {grown} bytes refusing a {size}-byte Action"
    );
    server.stop().await.unwrap();
}

/// A GiB written through ByteStream Write, from a lazily made stream of 1 MiB messages,
/// and read back through ByteStream Read, hashed as it arrives: neither the server nor
/// the client side of tonic may hold the blob whole, so the resident set's peak stays far
/// below the blob's size. The blob is stored (FindMissingBlobs, QueryWriteStatus) and
/// reads back with its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_streams_through_byte_stream_in_bounded_memory() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await.unwrap();
    let content = Arc::new(LargeContent::new(1024, 0x6b69_6c6e));
    let digest = content.digest(DigestFunction::Sha256);
    let hashed = started.elapsed();

    let resource = upload_name("", &uuid::Uuid::new_v4().to_string(), &digest, false);
    let pieces = content.pieces();
    let messages = futures::stream::iter((0..pieces).map({
        let content = content.clone();
        move |index| WriteRequest {
            resource_name: if index == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: (index * LargeContent::PIECE as u64) as i64,
            finish_write: index + 1 == pieces,
            data: content.piece(index).into(),
        }
    }));
    let writing = Instant::now();
    let sampler = PeakSampler::start(SAMPLE_EVERY);
    let written = within(60, server.byte_stream().write(messages))
        .await
        .expect("the Write succeeds")
        .into_inner();
    let write = sampler.finish();
    let write_time = writing.elapsed();
    eprintln!("ByteStream Write of 1 GiB in {write_time:.1?}: {write}");
    assert_eq!(written.committed_size, content.len() as i64);
    assert!(
        write.growth() < GROWTH_BOUND,
        "writing 1 GiB raised the resident set too far: {write}"
    );

    let missing = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&digest)],
            digest_function: DigestFunction::Sha256.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(missing.missing_blob_digests.is_empty(), "{missing:?}");
    let status = server
        .byte_stream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: upload_name("", &uuid::Uuid::new_v4().to_string(), &digest, false),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.complete);
    assert_eq!(status.committed_size, content.len() as i64);

    let reading = Instant::now();
    let sampler = PeakSampler::start(SAMPLE_EVERY);
    let read_back = within(60, async {
        let mut stream = server
            .byte_stream()
            .read(ReadRequest {
                resource_name: blob_name("", &digest),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .expect("the Read starts")
            .into_inner();
        let mut hasher = DigestFunction::Sha256.hasher();
        let mut size = 0;
        while let Some(message) = stream.message().await.expect("the Read streams") {
            hasher.update(&message.data);
            size += message.data.len() as u64;
        }
        Digest::new(DigestFunction::Sha256, hasher.finalize(), size)
    })
    .await;
    let read = sampler.finish();
    let read_time = reading.elapsed();
    eprintln!("ByteStream Read of 1 GiB in {read_time:.1?}: {read}");
    assert_eq!(read_back, digest, "the blob reads back as it was written");
    assert!(
        read.growth() < GROWTH_BOUND,
        "reading 1 GiB raised the resident set too far: {read}"
    );

    server.stop().await.unwrap();
    eprintln!(
        "hashing the content took {hashed:.1?}; the whole test {:.1?}",
        started.elapsed()
    );
}
