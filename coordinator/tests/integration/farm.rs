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
            ..FarmConfig::default()
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

/// An action (`true`, no inputs) put straight into the farm's shared blob store.
async fn stored_action(stores: &OpenStores) -> Digest {
    use kiln_proto::reapi::{Action, Command, Directory};
    use kiln_store::ExpectedDigest;
    let put = |bytes: Vec<u8>| {
        let blobs = stores.blobs.clone();
        async move {
            let digest = Digest::of_bytes(DigestFunction::Sha256, &bytes);
            blobs
                .put(ExpectedDigest::Exact(digest), bytes.into())
                .await
                .unwrap()
        }
    };
    let command = put(Command {
        arguments: vec!["true".into()],
        ..Default::default()
    }
    .encode_to_vec())
    .await;
    let root = put(Directory::default().encode_to_vec()).await;
    put(Action {
        command_digest: Some(common::wire(&command)),
        input_root_digest: Some(common::wire(&root)),
        ..Default::default()
    }
    .encode_to_vec())
    .await
}

/// Three replicas serving mutual TLS with one CA for servers and clients alike, their
/// shared stores, and which one leads.
struct TlsFarm {
    ca: kiln_tls::test_certs::TestCa,
    files: kiln_tls::TlsFiles,
    stores: OpenStores,
    replicas: Vec<kiln_testkit::ServedCoordinator>,
    leader: usize,
    _dir: tempfile::TempDir,
}

impl TlsFarm {
    async fn start(config: CoordinatorConfig) -> anyhow::Result<Self> {
        use kiln_testkit::ServedCoordinator;
        let dir = tempfile::tempdir()?;
        let ca = kiln_tls::test_certs::TestCa::new("farm CA");
        let ca_file = ca.write(dir.path());
        let files = kiln_tls::TlsFiles {
            client_ca: Some(ca_file.clone()),
            ..ca.issue("kiln replica", &["localhost"])
                .server_files(dir.path())
        };
        let stores = Stores::OnDisk(dir.path().join("stores")).open().await?;
        let mut config = config;
        config.farm.ca_file = Some(ca_file);
        let mut replicas = Vec::new();
        for _ in 0..3 {
            let shared = Stores::Shared(stores.clone());
            let replica = ServedCoordinator::start_with_tls(config.clone(), shared, Some(&files));
            replicas.push(replica.await?);
        }
        let leader = leader_other_than(&stores, None).await;
        let leader = replicas
            .iter()
            .position(|r| format!("https://localhost:{}", r.addr.port()) == leader)
            .expect("a replica leads");
        Ok(TlsFarm {
            ca,
            files,
            stores,
            replicas,
            leader,
            _dir: dir,
        })
    }

    fn follower(&self) -> &kiln_testkit::ServedCoordinator {
        &self.replicas[(self.leader + 1) % 3]
    }

    /// A TLS channel to `server` with a client certificate named `client`.
    async fn channel(
        &self,
        server: &kiln_testkit::ServedCoordinator,
        client: &str,
    ) -> anyhow::Result<tonic::transport::Channel> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let issued = self.ca.issue(client, &[]);
        let tls = ClientTlsConfig::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(self.ca.pem()))
            .identity(Identity::from_pem(&issued.cert_pem, &issued.key_pem));
        let url = format!("https://127.0.0.1:{}", server.addr.port());
        Ok(Endpoint::from_shared(url)?
            .tls_config(tls)?
            .connect()
            .await?)
    }
}

async fn queue_an_action(
    channel: tonic::transport::Channel,
    stores: &OpenStores,
) -> Result<Operation, tonic::Status> {
    let action = stored_action(stores).await;
    let mut stream = ExecutionClient::new(channel)
        .execute(ExecuteRequest {
            action_digest: Some(common::wire(&action)),
            digest_function: DigestFunction::Sha256.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(within(10, stream.message()).await?.expect("an operation"))
}

async fn status(
    channel: tonic::transport::Channel,
    pretending: Option<&str>,
) -> Result<kiln_proto::admin::v1::FarmStatus, tonic::Status> {
    use kiln_proto::admin::v1::{admin_client::AdminClient, GetStatusRequest};
    let mut request = tonic::Request::new(GetStatusRequest {});
    if let Some(name) = pretending {
        request
            .metadata_mut()
            .insert("x-kiln-forwarded-certificate", name.parse().unwrap());
    }
    Ok(AdminClient::new(channel)
        .get_status(request)
        .await?
        .into_inner())
}

/// Replicas serving mutual TLS forward to the leader over TLS too: each checks the
/// leader's certificate against `farm.ca_file` and presents its own, which the leader's
/// client CA accepts. A client's Execute and GetStatus through a follower reach the
/// leader's engine; a follower that does not trust the leader's CA cannot forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_forward_to_the_leader_over_mutual_tls() -> anyhow::Result<()> {
    let farm = TlsFarm::start(farm_config()).await?;
    let channel = farm.channel(farm.follower(), "a client").await?;
    // Execute through the follower: queued by the leader's engine (no worker yet).
    let first = queue_an_action(channel.clone(), &farm.stores).await?;
    assert!(!first.done, "{first:?}");
    // The leader's status, through the follower: the action waits in its queue.
    let queued = status(channel, None).await?.queue.map(|q| q.queued);
    assert_eq!(queued, Some(1));

    // A replica that does not trust the leader's CA (the system's roots) cannot forward.
    let mut untrusting = farm_config();
    untrusting.farm.ca_file = None;
    let shared = Stores::Shared(farm.stores.clone());
    let stranger =
        kiln_testkit::ServedCoordinator::start_with_tls(untrusting, shared, Some(&farm.files))
            .await?;
    let channel = farm.channel(&stranger, "a client").await?;
    // It may take a round to learn who leads.
    let deadline = Instant::now() + TERM * 2;
    let refused = loop {
        match status(channel.clone(), None).await {
            Err(status) if status.message().contains("no leader") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    let refused = refused.expect_err("forwarded to a leader it cannot verify");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(!refused.message().contains("no leader"), "{refused:?}");
    Ok(())
}

/// With auth on and callers known by their client certificates, a follower tells the
/// leader which certificate its caller presented (the leader sees the follower's own):
/// the caller keeps its grants through any replica. The leader believes that only from
/// a replica; a client claiming another certificate's name gets nothing by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_caller_keeps_its_grants_through_a_follower() -> anyhow::Result<()> {
    let mut config = farm_config();
    config.auth.enabled = true;
    let grant = |name: &str, scopes: &[&str]| kiln_coordinator::auth::CertificateGrant {
        common_name: name.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        instance: None,
    };
    config.auth.client_certificates = vec![
        grant("operator", &["admin"]),
        grant("builder", &["execute", "cas:read", "cas:write"]),
    ];
    let farm = TlsFarm::start(config).await?;

    let operator = farm.channel(farm.follower(), "operator").await?;
    let builder = farm.channel(farm.follower(), "builder").await?;
    // Both reach the leader as themselves: it queues the builder's action and answers
    // the operator's status, which needs admin.
    queue_an_action(builder.clone(), &farm.stores).await?;
    let queued = status(operator, None).await?.queue.map(|q| q.queued);
    assert_eq!(queued, Some(1));
    let denied = status(builder, None)
        .await
        .expect_err("the builder is no admin");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // Straight to the leader, the builder cannot pass for the operator.
    let leader = &farm.replicas[farm.leader];
    let builder_at_leader = farm.channel(leader, "builder").await?;
    let denied = status(builder_at_leader, Some("operator"))
        .await
        .expect_err("a client's claim is not believed");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    Ok(())
}
