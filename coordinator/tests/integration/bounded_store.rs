//! The coordinator over a blob store with a size limit, over a real socket: writes past
//! the limit get RESOURCE_EXHAUSTED (ByteStream and per batch entry), eviction frees the
//! least recently used blobs, and an action-cache entry whose outputs were evicted is a
//! miss, never a result pointing at nothing; a queued action's inputs stay.

use std::sync::Arc;
use std::time::Duration;

use kiln_coordinator::CoordinatorConfig;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::longrunning::{operations_client::OperationsClient, CancelOperationRequest};
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    action_cache_client::ActionCacheClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient, Action, ActionResult, Command, Directory, DirectoryNode,
    ExecuteRequest, FileNode, GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use kiln_store::{BoundedBlobStore, Digest, DigestFunction, EvictionPolicy, ResourceName};
use kiln_testkit::{ServedCoordinator, Stores};
use tonic::transport::Channel;
use tonic::Code;

use crate::common::{batch_update, random_bytes, wire, write_requests};

const F: DigestFunction = DigestFunction::Sha256;
const KIB: usize = 1024;

async fn batch_put(channel: &Channel, blobs: &[&[u8]]) -> Vec<(Digest, i32)> {
    let (request, digests) = batch_update("", F, blobs);
    let response = ContentAddressableStorageClient::new(channel.clone())
        .max_encoding_message_size(8 << 20)
        .batch_update_blobs(request)
        .await
        .unwrap()
        .into_inner();
    let codes = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().map_or(0, |s| s.code));
    digests.into_iter().zip(codes).collect()
}

async fn byte_stream_put(channel: &Channel, data: &[u8]) -> Result<(), tonic::Status> {
    let digest = Digest::of_bytes(F, data);
    let name = ResourceName::write("", digest).to_string();
    let requests = write_requests(&name, data, 0, 64 * KIB, true);
    ByteStreamClient::new(channel.clone())
        .write(futures::stream::iter(requests))
        .await
        .map(|_| ())
}

async fn cached_result(channel: &Channel, action: &Digest) -> Result<ActionResult, tonic::Status> {
    ActionCacheClient::new(channel.clone())
        .get_action_result(GetActionResultRequest {
            action_digest: Some(wire(action)),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A coordinator on a 1 MiB store with no grace period, whose passes the test runs.
async fn serve_bounded(low_watermark: f64) -> (ServedCoordinator, Arc<BoundedBlobStore>, Channel) {
    let policy = EvictionPolicy {
        max_bytes: (1024 * KIB) as u64,
        low_watermark,
        grace: Duration::ZERO,
        interval: Duration::from_secs(3600),
        ..EvictionPolicy::with_max_bytes(0)
    };
    let server = ServedCoordinator::start(CoordinatorConfig::default(), Stores::Bounded(policy))
        .await
        .unwrap();
    let store = server.stores.bounded.clone().unwrap();
    let channel = server.channel().await.unwrap();
    (server, store, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_writes_then_evicts_the_least_recently_used() {
    // 614 KiB: evicting the two oldest 240 KiB blobs gets the store there.
    let (server, store, channel) = serve_bounded(0.6).await;

    // Four 240 KiB blobs, oldest first: 960 KiB, above the 90% watermark.
    let blobs: Vec<Vec<u8>> = (0..4).map(|seed| random_bytes(240 * KIB, seed)).collect();
    let mut digests = Vec::new();
    for blob in &blobs {
        let stored = batch_put(&channel, &[blob]).await;
        assert_eq!(stored[0].1, Code::Ok as i32);
        digests.push(stored[0].0);
    }
    // An action whose one output is the oldest blob.
    let action = Digest::of_bytes(F, b"an action");
    ActionCacheClient::new(channel.clone())
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(wire(&action)),
            action_result: Some(ActionResult {
                output_files: vec![OutputFile {
                    path: "out".into(),
                    digest: Some(wire(&digests[0])),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Past the limit: refused on both write paths, and nothing partial stays.
    let late = random_bytes(200 * KIB, 9);
    let err = byte_stream_put(&channel, &late).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("full"), "{err:?}");
    let refused = batch_put(&channel, &[&random_bytes(100 * KIB, 10)]).await;
    assert_eq!(refused[0].1, Code::ResourceExhausted as i32);

    // Everything was used (written, checked) since the last pass: this one spares it all.
    let report = store.evict_once().await.unwrap();
    assert_eq!(report.evicted_blobs, 0, "{report:?}");
    // The two newest are read (a build's working set); the next pass evicts the others.
    for blob in &blobs[2..] {
        let name = ResourceName::read("", Digest::of_bytes(F, blob)).to_string();
        let mut stream = ByteStreamClient::new(channel.clone())
            .read(kiln_proto::bytestream::ReadRequest {
                resource_name: name,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while stream.message().await.unwrap().is_some() {}
    }
    let report = store.evict_once().await.unwrap();
    assert_eq!(report.evicted_blobs, 2, "{report:?}");
    assert_eq!(
        missing(&channel, &digests).await,
        vec![wire(&digests[0]), wire(&digests[1])]
    );

    // The cached result lost its output: a miss, so the client runs the action again.
    let miss = cached_result(&channel, &action).await.unwrap_err();
    assert_eq!(miss.code(), Code::NotFound, "{miss:?}");
    // And the write that was refused now fits.
    byte_stream_put(&channel, &late).await.unwrap();
    server.stop().await.unwrap();
}

/// Eviction keeps what a queued action needs however long it waits (here with no grace
/// period at all), and lets it go once the operation is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_actions_inputs_survive_eviction_until_it_ends() {
    // No worker joins: the action stays queued.
    let (server, store, channel) = serve_bounded(0.5).await;

    // An input file one directory down, then the tree, Command and Action.
    let input = random_bytes(300 * KIB, 1);
    let input_digest = batch_put(&channel, &[&input]).await[0].0;
    let subdirectory = Directory {
        files: vec![FileNode {
            name: "input.bin".into(),
            digest: Some(wire(&input_digest)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let subdirectory_digest = Digest::of_bytes(F, &subdirectory);
    let root = Directory {
        directories: vec![DirectoryNode {
            name: "src".into(),
            digest: Some(wire(&subdirectory_digest)),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let command = Command {
        arguments: vec!["cat".into(), "src/input.bin".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let action = Action {
        command_digest: Some(wire(&Digest::of_bytes(F, &command))),
        input_root_digest: Some(wire(&Digest::of_bytes(F, &root))),
        ..Default::default()
    }
    .encode_to_vec();
    let stored = batch_put(&channel, &[&subdirectory, &root, &command, &action]).await;
    let mut needed: Vec<Digest> = stored.iter().map(|(digest, _)| *digest).collect();
    needed.push(input_digest);
    let action_digest = needed[3];

    let mut operations = ExecutionClient::new(channel.clone())
        .execute(ExecuteRequest {
            action_digest: Some(wire(&action_digest)),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let operation = operations.message().await.unwrap().unwrap().name;

    // Older blobs than the inputs would be evicted first; these are newer, and still
    // everything but the inputs goes: 300 KiB of the 1 MiB store are pinned.
    for seed in 10..12 {
        batch_put(&channel, &[&random_bytes(320 * KIB, seed)]).await;
    }
    // The first pass spares what was used since the last one: everything, here.
    store.evict_once().await.unwrap();
    let report = store.evict_once().await.unwrap();
    assert_eq!(report.kept_retained, needed.len() as u64, "{report:?}");
    assert_eq!(report.evicted_blobs, 2, "{report:?}");
    assert_eq!(missing(&channel, &needed).await, vec![]);

    // Once the operation is over, its inputs are candidates like any other blob.
    OperationsClient::new(channel.clone())
        .cancel_operation(CancelOperationRequest { name: operation })
        .await
        .unwrap();
    for seed in 20..22 {
        batch_put(&channel, &[&random_bytes(320 * KIB, seed)]).await;
    }
    let report = store.evict_once().await.unwrap();
    assert!(report.used_before > 921 * KIB as u64, "{report:?}");
    assert_eq!(report.kept_retained, 0, "{report:?}");
    server.stop().await.unwrap();
}

async fn missing(channel: &Channel, digests: &[Digest]) -> Vec<kiln_proto::reapi::Digest> {
    ContentAddressableStorageClient::new(channel.clone())
        .find_missing_blobs(kiln_proto::reapi::FindMissingBlobsRequest {
            blob_digests: digests.iter().map(wire).collect(),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
}
