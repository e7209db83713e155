//! Three coordinators on shared stores as one farm: one elected leader schedules, the
//! others send Execution, Operations and worker streams on to it, a leader that stops
//! hands over, and a deposed leader's writes are fenced off by the epoch.

use std::time::{Duration, Instant};

use crate::common::{self, finish, within, TestServer};
use crate::execution::RealWorker;
use kiln_coordinator::{CoordinatorConfig, FarmConfig};
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{operation, GetOperationRequest, Operation};
use kiln_proto::prost::Message;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{ExecuteRequest, ExecuteResponse};
use kiln_store::{Digest, DigestFunction, Keyspace};
use kiln_testkit::{OpenStores, Stores};
use tonic::Code;

const TOKEN: &str = "join-secret";
const TERM: Duration = Duration::from_secs(2);
const FARM: Keyspace = Keyspace("farm");

fn farm_config() -> CoordinatorConfig {
    CoordinatorConfig {
        join_token: Some(TOKEN.into()),
        farm: FarmConfig {
            enabled: true,
            lease_term_secs: TERM.as_secs(),
            // Each replica's own address, filled in by the test kit once it has bound.
            advertise_url: String::new(),
        },
        ..CoordinatorConfig::default()
    }
}

/// The lease record's fields, as the farm's leader wrote them.
fn lease(stored: &[u8]) -> serde_json::Value {
    serde_json::from_slice(stored).expect("the lease is JSON")
}

/// The address of the replica holding the lease, once one does and it is not `not`.
async fn leader_other_than(stores: &OpenStores, not: Option<&str>) -> String {
    let deadline = Instant::now() + TERM * 4;
    loop {
        if let Some(stored) = stores.metadata.get(FARM, b"leader").await.unwrap() {
            let address = lease(&stored)["address"].as_str().unwrap().to_string();
            if Some(address.as_str()) != not {
                return address;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new leader within {:?}",
            TERM * 4
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(server: &TestServer, action: &Digest) -> Result<Operation, tonic::Status> {
    let stream = ExecutionClient::new(server.channel.clone())
        .execute(ExecuteRequest {
            action_digest: Some(common::wire(action)),
            skip_cache_lookup: true,
            digest_function: DigestFunction::Sha256.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(finish(stream).await)
}

fn response(operation: &Operation) -> ExecuteResponse {
    match &operation.result {
        Some(operation::Result::Response(any)) => {
            ExecuteResponse::decode(any.value.as_slice()).expect("an ExecuteResponse")
        }
        other => panic!("no response: {other:?}"),
    }
}

fn url(server: &TestServer) -> String {
    format!("http://{}", server.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_executes_and_a_stopping_leader_hands_over() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let stores = Stores::OnDisk(dir.path().to_path_buf()).open().await?;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(TestServer::start_shared(&stores, farm_config()).await?);
    }
    let leader = leader_other_than(&stores, None).await;
    let at = replicas
        .iter()
        .position(|r| url(r) == leader)
        .expect("a replica leads");
    let (first, second) = ((at + 1) % 3, (at + 2) % 3);

    // The worker joins through one follower, the client executes through the other: both
    // reach the leader's engine through them.
    let worker = RealWorker::start(&replicas[first], "farm-worker", 2);
    let action =
        common::actions::shell_action(&replicas[second], "echo farm > out", &["out"]).await;
    let done = within(30, run(&replicas[second], &action)).await?;
    let result = response(&done).result.expect("an ActionResult");
    assert_eq!(result.exit_code, 0, "{result:?}");
    let out = result.output_files[0].digest.clone().unwrap();
    assert_eq!(
        out.hash,
        Digest::of_bytes(DigestFunction::Sha256, b"farm\n").hex()
    );
    // The operation is the leader's; any replica finds it.
    let found = OperationsClient::new(replicas[first].channel.clone())
        .get_operation(GetOperationRequest {
            name: done.name.clone(),
        })
        .await?
        .into_inner();
    assert!(found.done);

    // The leader stops: it gives the lease up, another replica leads, the worker's
    // stream is re-made through a replica that is still there, and work goes on.
    let epoch_before = lease(&stores.metadata.get(FARM, b"leader").await?.unwrap())["epoch"]
        .as_u64()
        .unwrap();
    let stopping = replicas.remove(at);
    let stopped_at = Instant::now();
    within(20, stopping.stop()).await?;
    let new_leader = leader_other_than(&stores, Some(&leader)).await;
    let handover = stopped_at.elapsed();
    assert!(replicas.iter().any(|r| url(r) == new_leader));
    let epoch_after = lease(&stores.metadata.get(FARM, b"leader").await?.unwrap())["epoch"]
        .as_u64()
        .unwrap();
    assert!(
        epoch_after > epoch_before,
        "{epoch_after} after {epoch_before}"
    );
    assert!(handover < TERM * 2, "handed over in {handover:?}");

    let action = common::actions::shell_action(&replicas[0], "echo again > out", &["out"]).await;
    // Until the worker has rejoined, the action waits in the new leader's queue.
    let done = within(60, async {
        loop {
            match run(&replicas[0], &action).await {
                Ok(done) => return done,
                // Between the old leader's end and the new one's engine.
                Err(status) if status.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(status) => panic!("{status}"),
            }
        }
    })
    .await;
    assert_eq!(response(&done).result.expect("a result").exit_code, 0);
    worker.stop().await.ok();
    for replica in replicas {
        within(20, replica.stop()).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_records_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let stores = Stores::OnDisk(dir.path().to_path_buf()).open().await?;
    // A long term: the election's next round (a quarter term on) comes after the test's
    // Execute, so what refuses the write is the fence, not the round.
    let mut config = farm_config();
    config.farm.lease_term_secs = 60;
    let replica = TestServer::start_shared(&stores, config).await?;
    let leader = leader_other_than(&stores, None).await;
    assert_eq!(leader, url(&replica));
    let action = common::actions::shell_action(&replica, "true", &[]).await;

    // What a new leader does when this one has been paused past its term: the lease and
    // the epoch move on. (The address is of nobody: nothing may be forwarded there.)
    let stored = stores.metadata.get(FARM, b"leader").await?.unwrap();
    let epoch = lease(&stored)["epoch"].as_u64().unwrap();
    let mut batch = kiln_store::WriteBatch::new();
    let usurper = serde_json::json!({
        "holder": "another replica", "address": "http://127.0.0.1:9", "epoch": epoch + 1, "renewals": 0
    });
    batch.put(FARM, b"leader".to_vec(), serde_json::to_vec(&usurper)?);
    batch.put(FARM, b"epoch".to_vec(), (epoch + 1).to_be_bytes().to_vec());
    stores.metadata.apply(batch).await?;

    // Before its next election round notices, the old leader's engine still runs; its
    // write of the new operation carries the old epoch and is refused, so the client is
    // told to try again and no operation of the old epoch exists.
    let refused = run(&replica, &action).await.expect_err("a fenced write");
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    assert!(
        refused.message().contains("no longer the farm's leader"),
        "{refused}"
    );
    let operations = stores
        .metadata
        .scan(Keyspace("operations"), b"", None, 10)
        .await?;
    assert!(operations.is_empty(), "{operations:?}");
    within(20, replica.stop()).await?;
    Ok(())
}

/// A follower relaying a worker's stream to the leader still stops promptly: the relayed
/// stream ends with its shutdown (UNAVAILABLE: the worker joins again elsewhere), rather than the
/// follower waiting for the worker to hang up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_relaying_a_worker_stream_still_stops_promptly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let stores = Stores::OnDisk(dir.path().to_path_buf()).open().await?;
    let first = TestServer::start_shared(&stores, farm_config()).await?;
    let leader = leader_other_than(&stores, None).await;
    assert_eq!(leader, url(&first));
    let follower = TestServer::start_shared(&stores, farm_config()).await?;
    let worker = RealWorker::start(&follower, "relayed-worker", 1);
    let action = common::actions::shell_action(&first, "echo relayed > out", &["out"]).await;
    let done = within(30, run(&first, &action)).await?;
    assert_eq!(response(&done).result.expect("a result").exit_code, 0);

    // The test kit gives a stop 10 s; a follower waiting on the worker's stream never
    // stopped at all.
    within(15, follower.stop()).await?;
    worker.stop().await.ok();
    within(20, first.stop()).await?;
    Ok(())
}
