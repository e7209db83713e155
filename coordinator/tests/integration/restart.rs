//! Data written before a restart is served after it: blobs, action results and a
//! half-finished resumable upload.

use crate::common;

use common::{blob_name, random_bytes, upload_name, wire, within, write_requests, TestServer};
use kiln_proto::bytestream::QueryWriteStatusRequest;
use kiln_proto::reapi::{
    ActionResult, FindMissingBlobsRequest, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest,
};
use kiln_store::{Digest, DigestFunction};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let function = DigestFunction::Blake3;
    let small = b"small blob via batch".to_vec();
    let large = random_bytes(5 << 20, 1);
    let large_digest = Digest::of_bytes(function, &large);
    let pending = random_bytes(2 << 20, 2);
    let pending_digest = Digest::of_bytes(function, &pending);
    let pending_name = upload_name("", "resume-after-restart", &pending_digest, false);
    let half = 1 << 20;
    let action = Digest::of_bytes(function, b"the action");

    let server = TestServer::start(dir.path()).await?;
    let small_digest = server.upload("", function, &[&small]).await?[0];
    let mut byte_stream = server.byte_stream();
    byte_stream
        .write(futures::stream::iter(write_requests(
            &upload_name("", "big", &large_digest, false),
            &large,
            0,
            64 << 10,
            true,
        )))
        .await?;
    // Half an upload, closed without finishing.
    byte_stream
        .write(futures::stream::iter(write_requests(
            &pending_name,
            &pending[..half],
            0,
            64 << 10,
            false,
        )))
        .await?;
    let result = ActionResult {
        output_files: vec![
            OutputFile {
                path: "small".into(),
                digest: Some(wire(&small_digest)),
                ..Default::default()
            },
            OutputFile {
                path: "large".into(),
                digest: Some(wire(&large_digest)),
                ..Default::default()
            },
        ],
        exit_code: 0,
        ..Default::default()
    };
    server
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            instance_name: "ci".into(),
            action_digest: Some(wire(&action)),
            action_result: Some(result.clone()),
            results_cache_policy: None,
            digest_function: function.reapi_value(),
        })
        .await?;
    drop(byte_stream);
    within(20, server.stop()).await?;

    // A new server over the same directory.
    let server = TestServer::start(dir.path()).await?;
    let missing = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&small_digest), wire(&large_digest)],
            digest_function: function.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(missing.missing_blob_digests.is_empty());
    assert_eq!(server.read_blob(blob_name("", &small_digest)).await?, small);
    assert!(within(20, server.read_blob(blob_name("", &large_digest))).await? == large);
    let hit = server
        .action_cache()
        .get_action_result(GetActionResultRequest {
            instance_name: "ci".into(),
            action_digest: Some(wire(&action)),
            digest_function: function.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(hit, result);

    // The half-finished upload resumes where it stopped.
    let status = server
        .byte_stream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: pending_name.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(
        (status.committed_size, status.complete),
        (half as i64, false)
    );
    server
        .byte_stream()
        .write(futures::stream::iter(write_requests(
            &pending_name,
            &pending[half..],
            half as u64,
            64 << 10,
            true,
        )))
        .await?;
    assert!(server.read_blob(blob_name("", &pending_digest)).await? == pending);
    server.stop().await
}
