//! Clients that open a stream and then send nothing are cut off within the configured
//! time, over a real socket: a ByteStream upload that never starts, one that stalls
//! half-way (its bytes stay, to resume from), and a worker connection that never
//! registers. Calls in parallel are answered meanwhile.

use std::time::{Duration, Instant};

use kiln_coordinator::CoordinatorConfig;
use kiln_proto::bytestream::{
    byte_stream_client::ByteStreamClient, QueryWriteStatusRequest, WriteRequest,
};
use kiln_proto::reapi::{capabilities_client::CapabilitiesClient, GetCapabilitiesRequest};
use kiln_proto::worker::v1::{workers_client::WorkersClient, WorkerMessage};
use kiln_store::{Digest, DigestFunction, ResourceName};
use kiln_testkit::{ServedCoordinator, Stores};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

use crate::common::random_bytes;

/// Two seconds, so that a call answered "at once" meanwhile has a second to spare on a
/// busy machine and is still told apart from one that waited for the cut-off.
const IDLE: Duration = Duration::from_secs(2);

async fn serve() -> (ServedCoordinator, Channel) {
    let config = CoordinatorConfig {
        stream_idle_timeout_secs: IDLE.as_secs(),
        register_timeout_secs: IDLE.as_secs(),
        join_token: Some("token".into()),
        ..Default::default()
    };
    let server = ServedCoordinator::start(config, Stores::Memory)
        .await
        .unwrap();
    let channel = server.channel().await.unwrap();
    (server, channel)
}

/// Asserts that `call` failed with DEADLINE_EXCEEDED after about `IDLE`, not sooner and
/// not much later.
fn assert_cut_off<T: std::fmt::Debug>(result: Result<T, tonic::Status>, started: Instant) {
    let elapsed = started.elapsed();
    let status = result.expect_err("the silent stream must be cut off");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("nothing arrived"), "{status:?}");
    assert!(
        elapsed >= IDLE && elapsed < IDLE * 5,
        "cut off after {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_sends_nothing_is_cut_off_and_others_are_served_meanwhile() {
    let (server, channel) = serve().await;
    let (_silent, nothing) = mpsc::channel::<WriteRequest>(1);
    let started = Instant::now();
    let upload = tokio::spawn({
        let channel = channel.clone();
        async move {
            ByteStreamClient::new(channel)
                .write(ReceiverStream::new(nothing))
                .await
        }
    });
    // Meanwhile, on the same connection, other calls are answered at once.
    for _ in 0..5 {
        let asked = Instant::now();
        CapabilitiesClient::new(channel.clone())
            .get_capabilities(GetCapabilitiesRequest::default())
            .await
            .unwrap();
        assert!(asked.elapsed() < IDLE / 2, "{:?}", asked.elapsed());
    }
    assert_cut_off(upload.await.unwrap(), started);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_is_cut_off_and_keeps_what_arrived() {
    let (server, channel) = serve().await;
    let data = random_bytes(256 << 10, 7);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let name = ResourceName::write("", digest).to_string();
    let (sender, receiver) = mpsc::channel(1);
    sender
        .send(WriteRequest {
            resource_name: name.clone(),
            write_offset: 0,
            finish_write: false,
            data: bytes::Bytes::copy_from_slice(&data[..100 << 10]),
        })
        .await
        .unwrap();
    let started = Instant::now();
    let result = ByteStreamClient::new(channel.clone())
        .write(ReceiverStream::new(receiver))
        .await;
    assert_cut_off(result, started);
    drop(sender);
    let status = ByteStreamClient::new(channel)
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.committed_size, 100 << 10, "{status:?}");
    assert!(!status.complete);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_registers_is_cut_off() {
    let (server, channel) = serve().await;
    let (_silent, nothing) = mpsc::channel::<WorkerMessage>(1);
    let started = Instant::now();
    let result = WorkersClient::new(channel)
        .connect(ReceiverStream::new(nothing))
        .await;
    assert_cut_off(result, started);
    server.stop().await.unwrap();
}
