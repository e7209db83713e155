//! The operator's surfaces over real sockets: `kiln.admin.v1.Admin` (what `kiln status`
//! and `kiln drain` call) counting known work exactly, and grpc.health.v1.

use crate::common;

use common::actions::{upload_action, Spec};
use common::{blob_name, random_bytes, upload_name, wire, within, write_requests, TestServer};
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::admin::v1::{admin_client::AdminClient, DrainWorkerRequest};
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    execution_client::ExecutionClient, BatchReadBlobsRequest, ExecuteRequest, ExecuteResponse,
    GetActionResultRequest,
};
use kiln_store::{Digest, DigestFunction};
use kiln_worker::{SandboxMode, WorkerConfig};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

const TOKEN: &str = "admin-test-join-secret";
const F: DigestFunction = DigestFunction::Sha256;

async fn start(dir: &std::path::Path) -> TestServer {
    let config = CoordinatorConfig {
        join_token: Some(TOKEN.into()),
        ..CoordinatorConfig::default()
    };
    TestServer::start_with(dir, config)
        .await
        .expect("the coordinator starts")
}

async fn execute_to_completion(server: &TestServer, action: &Digest) -> ExecuteResponse {
    let mut stream = ExecutionClient::new(server.channel.clone())
        .execute(ExecuteRequest {
            action_digest: Some(wire(action)),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .expect("Execute is accepted")
        .into_inner();
    within(60, async {
        loop {
            let operation = stream.message().await.unwrap().expect("stream until done");
            if operation.done {
                let Some(kiln_proto::longrunning::operation::Result::Response(any)) =
                    operation.result
                else {
                    panic!("no response in {operation:?}");
                };
                return ExecuteResponse::decode(any.value.as_slice()).unwrap();
            }
        }
    })
    .await
}

#[tokio::test]
async fn status_counts_exactly_the_work_done_and_lists_workers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;

    let empty = server.status().await;
    assert!(empty.workers.is_empty());
    assert_eq!(empty.queue.unwrap_or_default().queued, 0);
    assert!(empty.registry.is_none(), "no registry runs in this process");
    let storage = empty.storage.unwrap();
    assert_eq!((storage.cas_bytes_read, storage.cas_bytes_written), (0, 0));

    // Known CAS traffic: 100 + 50 bytes by batch, 1000 by ByteStream, then reads.
    let small = random_bytes(100, 1);
    let smaller = random_bytes(50, 2);
    let batch = server.upload("", F, &[&small, &smaller]).await.unwrap();
    let large = random_bytes(1000, 3);
    let large_digest = Digest::of_bytes(F, &large);
    let name = upload_name(
        "",
        "9d2a3c54-2f57-4a3b-8a8e-5b3f0f1f7c10",
        &large_digest,
        false,
    );
    server
        .byte_stream()
        .write(futures::stream::iter(write_requests(
            &name, &large, 0, 300, true,
        )))
        .await
        .expect("the write succeeds");
    // Writing a blob that is already stored stores nothing more.
    server.upload("", F, &[&small]).await.unwrap();
    let read_back = server
        .read_blob(blob_name("", &large_digest))
        .await
        .unwrap();
    assert_eq!(read_back, large);
    server
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![wire(&batch[0])],
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap();
    let storage = server.status().await.storage.unwrap();
    assert_eq!(storage.cas_bytes_written, 150 + 1000 + 100);
    assert_eq!(storage.cas_bytes_read, 1000 + 100);
    assert!(storage.stored_bytes >= 1150, "{storage:?}");

    // A worker joins and is listed with what it registered.
    let work_dir = tempfile::tempdir().unwrap();
    let config = WorkerConfig {
        coordinator: format!("grpc://{}", server.addr),
        slots: 2,
        join_token: TOKEN.into(),
        work_dir: work_dir.path().to_path_buf(),
        sandbox: SandboxMode::None,
        worker_id: "builder-1".into(),
        ..WorkerConfig::default()
    };
    let (stop_worker, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(kiln_worker::run(config, async {
        let _ = stopped.await;
    }));
    let listed = server.status_when(|s| s.workers.len() == 1).await;
    let builder = &listed.workers[0];
    assert_eq!(builder.id, "builder-1");
    assert_eq!((builder.slots, builder.running), (2, 0));
    assert!(!builder.draining);
    assert_eq!(builder.version, env!("CARGO_PKG_VERSION"));
    assert!(builder.last_heartbeat.is_some() && builder.connected_at.is_some());

    // One lookup that misses, one execution (its own lookup misses too), one hit.
    let (action, _) = upload_action(&server, Spec::default()).await;
    let missing = server
        .action_cache()
        .get_action_result(GetActionResultRequest {
            action_digest: Some(wire(&action)),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let ran = execute_to_completion(&server, &action).await;
    assert!(!ran.cached_result);
    assert_eq!(ran.result.unwrap().exit_code, 0);
    let cached = execute_to_completion(&server, &action).await;
    assert!(cached.cached_result);
    let cache = server.status().await.cache.unwrap();
    assert_eq!(
        (
            cache.action_cache_hits,
            cache.action_cache_misses,
            cache.actions_succeeded,
            cache.actions_failed
        ),
        (1, 2, 1, 0)
    );

    // Draining needs the join token; the drained worker leaves and its task ends.
    let mut admin = AdminClient::new(server.channel.clone());
    let refused = admin
        .drain_worker(DrainWorkerRequest {
            worker_id: "builder-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut unknown = tonic::Request::new(DrainWorkerRequest {
        worker_id: "nobody".into(),
    });
    unknown
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let not_found = admin.drain_worker(unknown).await.unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound, "{not_found:?}");
    let mut drain = tonic::Request::new(DrainWorkerRequest {
        worker_id: "builder-1".into(),
    });
    drain
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let drained = admin
        .drain_worker(drain)
        .await
        .expect("the drain is accepted");
    assert_eq!(drained.into_inner().running, 0);
    let finished = within(20, worker)
        .await
        .expect("the worker task does not panic");
    assert!(
        finished.is_ok(),
        "a drained worker exits cleanly: {finished:?}"
    );
    server.status_when(|s| s.workers.is_empty()).await;
    drop(stop_worker);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_health_reports_every_service_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in [
        "",
        "build.bazel.remote.execution.v2.Execution",
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        "kiln.worker.v1.Workers",
        "kiln.admin.v1.Admin",
    ] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("Check({service:?}) failed: {e:?}"))
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    server.stop().await.unwrap();
}
