//! The worker loop over real sockets: `kiln_worker::run` against a test coordinator that
//! speaks `kiln.worker.v1`, with actions fetched from and uploaded to the real CAS.

use crate::common;

use std::time::Duration;

use common::test_coordinator::{Event, TestCoordinator};
use common::{put_action, wire, ActionSpec, TestCas};
use kiln_proto::worker::v1 as proto;
use kiln_proto::worker::v1::coordinator_message::Message as ToWorker;
use kiln_store::{Digest, DigestFunction};
use kiln_worker::{SandboxMode, WorkerConfig, WorkerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

const TOKEN: &str = "s3cret";

struct RunningWorker {
    task: JoinHandle<Result<(), WorkerError>>,
    shutdown: Option<oneshot::Sender<()>>,
    _work_dir: tempfile::TempDir,
}

impl RunningWorker {
    fn start(coordinator: &TestCoordinator, cas: &TestCas, join_token: &str) -> Self {
        Self::start_with(coordinator, cas, join_token, None)
    }

    fn start_with(
        coordinator: &TestCoordinator,
        cas: &TestCas,
        join_token: &str,
        drain_timeout_secs: Option<u64>,
    ) -> Self {
        let work_dir = tempfile::tempdir().unwrap();
        let config = WorkerConfig {
            coordinator: coordinator.url().replace("http://", "grpc://"),
            cas: cas.url.clone(),
            slots: 2,
            platform: vec![("OSFamily".into(), "linux".into())],
            join_token: join_token.into(),
            work_dir: work_dir.path().to_path_buf(),
            sandbox: SandboxMode::None,
            worker_id: "loop-worker".into(),
            drain_timeout_secs,
            ..WorkerConfig::default()
        };
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(kiln_worker::run(config, async {
            let _ = signal.await;
        }));
        RunningWorker {
            task,
            shutdown: Some(shutdown),
            _work_dir: work_dir,
        }
    }

    fn shut_down(&mut self) {
        let _ = self.shutdown.take().unwrap().send(());
    }

    async fn exit(self) -> Result<(), WorkerError> {
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the worker exits within 20 s")
            .expect("the worker task does not panic")
    }
}

fn assign(lease_id: &str, action: Digest, timeout: Option<Duration>) -> ToWorker {
    ToWorker::Assign(proto::Assign {
        lease_id: lease_id.into(),
        instance_name: String::new(),
        action_digest: Some(wire(&action)),
        digest_function: action.function.reapi_value(),
        timeout: timeout.map(|t| kiln_proto::protobuf::Duration {
            seconds: t.as_secs() as i64,
            nanos: t.subsec_nanos() as i32,
        }),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        tracestate: String::new(),
        queued_timestamp: Some(kiln_proto::protobuf::Timestamp {
            seconds: 42,
            nanos: 0,
        }),
        ..Default::default()
    })
}

/// An action that runs until the test creates `gate` (at most a minute), then prints
/// `message`: it is still running whenever the test needs it to be, however slow the
/// machine (a fixed `sleep` once decided that instead).
fn gated(gate: &std::path::Path, message: &str) -> ActionSpec {
    ActionSpec::shell(&format!(
        "i=0; while [ ! -e '{}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo {message}",
        gate.display()
    ))
}

fn code(result: &proto::LeaseResult) -> Code {
    Code::from(result.status.as_ref().expect("a status").code)
}

#[tokio::test]
async fn a_worker_registers_runs_assignments_and_drains_on_shutdown() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let mut coordinator = TestCoordinator::start(TOKEN).await;
    let mut worker = RunningWorker::start(&coordinator, &cas, TOKEN);

    let register = coordinator.registered().await;
    assert_eq!(register.worker_id, "loop-worker");
    assert_eq!(register.slots, 2);
    assert_eq!(register.version, env!("CARGO_PKG_VERSION"));
    let platform = register.platform.unwrap().properties;
    assert_eq!(
        (platform[0].name.as_str(), platform[0].value.as_str()),
        ("OSFamily", "linux")
    );
    assert_eq!(register.cache.unwrap().blobs, 0);

    // A heartbeat arrives at the interval the RegisterAck set (200 ms).
    let heartbeat = coordinator
        .wait_for(|e| match e {
            Event::Heartbeat(h) => Some(h),
            _ => None,
        })
        .await;
    assert_eq!(heartbeat.free_slots, 2);
    assert!(!heartbeat.draining);

    let hello = put_action(&cas, &ActionSpec::shell("echo hello")).await;
    let sent = std::time::SystemTime::now();
    coordinator.send(assign("lease-1", hello, None)).await;
    let result = coordinator.result().await;
    assert_eq!(result.lease_id, "lease-1");
    assert_eq!(code(&result), Code::Ok);
    let action_result = result.action_result.unwrap();
    assert_eq!(action_result.exit_code, 0);
    assert_eq!(
        cas.get(action_result.stdout_digest.as_ref().unwrap()).await,
        b"hello\n"
    );
    let metadata = action_result.execution_metadata.unwrap();
    assert_eq!(metadata.worker, "loop-worker");
    assert_eq!(metadata.queued_timestamp.unwrap().seconds, 42);
    // worker_start_timestamp is when the worker received the Assign (REAPI), before it
    // began fetching inputs.
    let nanos = |t: Option<kiln_proto::protobuf::Timestamp>| {
        let t = t.unwrap();
        t.seconds as i128 * 1_000_000_000 + t.nanos as i128
    };
    let sent = sent.duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i128;
    let received = nanos(metadata.worker_start_timestamp);
    assert!(sent <= received, "received before it was sent");
    assert!(received <= nanos(metadata.input_fetch_start_timestamp));

    // A timeout from the Assign wins over the action's own (none here).
    let slow = put_action(&cas, &ActionSpec::shell("sleep 30")).await;
    coordinator
        .send(assign("lease-2", slow, Some(Duration::from_millis(300))))
        .await;
    let result = coordinator.result().await;
    assert_eq!(result.lease_id, "lease-2");
    assert_eq!(code(&result), Code::DeadlineExceeded);

    // Cancel stops a running lease.
    coordinator.send(assign("lease-3", slow, None)).await;
    coordinator.running(&["lease-3"]).await;
    coordinator
        .send(ToWorker::Cancel(proto::Cancel {
            lease_id: "lease-3".into(),
        }))
        .await;
    let result = coordinator.result().await;
    assert_eq!(result.lease_id, "lease-3");
    assert_eq!(code(&result), Code::Cancelled);

    // Shutdown drains: the running action finishes and reports, new work is refused.
    let gates = tempfile::tempdir()?;
    let gate = gates.path().join("finish");
    let finishing = put_action(&cas, &gated(&gate, "finished")).await;
    coordinator.send(assign("lease-4", finishing, None)).await;
    coordinator.running(&["lease-4"]).await;
    worker.shut_down();
    coordinator.draining().await;
    coordinator.send(assign("lease-5", hello, None)).await;
    let refused = coordinator.result().await;
    assert_eq!(refused.lease_id, "lease-5");
    assert_eq!(code(&refused), Code::ResourceExhausted);
    std::fs::write(&gate, "")?;
    let finished = coordinator.result().await;
    assert_eq!(finished.lease_id, "lease-4");
    assert_eq!(code(&finished), Code::Ok);
    let stdout = finished.action_result.unwrap().stdout_digest.unwrap();
    assert_eq!(cas.get(&stdout).await, b"finished\n");
    worker.exit().await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_join_token_is_refused() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let coordinator = TestCoordinator::start(TOKEN).await;
    let worker = RunningWorker::start(&coordinator, &cas, "guessed");
    let error = worker.exit().await.expect_err("refused");
    assert!(
        matches!(&error, WorkerError::Rejected(reason) if reason == "wrong join token"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn a_restarted_coordinator_gets_its_worker_back_and_drain_ends_it() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Blake3).await?;
    let mut coordinator = TestCoordinator::start(TOKEN).await;
    let worker = RunningWorker::start(&coordinator, &cas, TOKEN);
    coordinator.registered().await;

    // A lease still running when the coordinator dies is announced on re-registration,
    // and its result is delivered on the new stream.
    let gates = tempfile::tempdir()?;
    let gate = gates.path().join("finish");
    let action = put_action(&cas, &gated(&gate, "survived")).await;
    coordinator.send(assign("lease-a", action, None)).await;
    coordinator.running(&["lease-a"]).await;
    let mut coordinator = coordinator.restart(TOKEN).await;
    let register = coordinator.registered().await;
    std::fs::write(&gate, "")?;
    let result = coordinator.result().await;
    assert_eq!(result.lease_id, "lease-a");
    assert_eq!(code(&result), Code::Ok);
    let stdout = result.action_result.unwrap().stdout_digest.unwrap();
    assert_eq!(cas.get(&stdout).await, b"survived\n");
    // The action was still running when the worker registered again: it waits for the
    // gate, opened only after that.
    assert_eq!(register.running_lease_ids, ["lease-a"]);

    // Drain from the coordinator ends the worker cleanly once it is idle.
    coordinator.send(ToWorker::Drain(proto::Drain {})).await;
    worker.exit().await?;
    Ok(())
}

/// A coordinator that promised heartbeat acknowledgements and sends none is taken for
/// dead after three heartbeat intervals (600 ms here): the worker reconnects on its own,
/// as it must when a paused farm leader keeps its connection open.
#[tokio::test]
async fn a_silent_coordinator_is_left_and_joined_again() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let mut coordinator = TestCoordinator::start_silent(TOKEN).await;
    let mut worker = RunningWorker::start(&coordinator, &cas, TOKEN);
    coordinator.registered().await;
    let left_at = tokio::time::Instant::now();
    coordinator
        .wait_for(|e| matches!(e, Event::Disconnected).then_some(()))
        .await;
    assert!(
        left_at.elapsed() >= Duration::from_millis(500),
        "{:?}",
        left_at.elapsed()
    );
    coordinator.registered().await;
    worker.shut_down();
    worker.exit().await?;
    Ok(())
}

/// An Assign from an older leader epoch than one the worker has already run is refused
/// (RESOURCE_EXHAUSTED, which a coordinator requeues): a deposed farm leader cannot hand
/// out work the new one may hand out too.
#[tokio::test]
async fn an_assign_from_a_deposed_leader_is_refused() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let mut coordinator = TestCoordinator::start(TOKEN).await;
    let mut worker = RunningWorker::start(&coordinator, &cas, TOKEN);
    coordinator.registered().await;
    let action = put_action(&cas, &ActionSpec::shell("echo epoch")).await;
    let with_epoch = |lease: &str, epoch: u64| match assign(lease, action, None) {
        ToWorker::Assign(assign) => ToWorker::Assign(proto::Assign {
            leader_epoch: epoch,
            ..assign
        }),
        _ => unreachable!(),
    };
    coordinator.send(with_epoch("from-epoch-5", 5)).await;
    assert_eq!(code(&coordinator.result().await), Code::Ok);
    coordinator.send(with_epoch("from-epoch-4", 4)).await;
    let refused = coordinator.result().await;
    assert_eq!(refused.lease_id, "from-epoch-4");
    assert_eq!(code(&refused), Code::ResourceExhausted);
    assert!(
        refused.status.unwrap().message.contains("leader epoch 4"),
        "the refusal names the stale epoch"
    );
    // The current leader's next Assign still runs.
    coordinator.send(with_epoch("from-epoch-5-again", 5)).await;
    assert_eq!(code(&coordinator.result().await), Code::Ok);
    worker.shut_down();
    worker.exit().await?;
    Ok(())
}

/// A worker told to shut down whose coordinator is gone, in either order, ends within
/// seconds and kills the action it was running: it does not wait for a coordinator that
/// may never come back (`kiln up` stops its own right after its workers). It once
/// retried every 10 s forever, the finished lease never leaving its running set.
#[tokio::test]
async fn a_worker_told_to_stop_without_its_coordinator_cancels_what_runs_and_ends(
) -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    for coordinator_goes_first in [false, true] {
        let mut coordinator = TestCoordinator::start(TOKEN).await;
        let mut worker = RunningWorker::start(&coordinator, &cas, TOKEN);
        coordinator.registered().await;
        let dir = tempfile::tempdir()?;
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > '{}'; exec sleep 60", pid_file.display());
        let action = put_action(&cas, &ActionSpec::shell(&script)).await;
        coordinator.send(assign("lease-1", action, None)).await;
        let pid = wait_for_pid(&pid_file).await;

        if coordinator_goes_first {
            drop(coordinator);
            // Shutdown finds the worker waiting to reconnect.
            tokio::time::sleep(Duration::from_millis(500)).await;
            worker.shut_down();
        } else {
            worker.shut_down();
            coordinator.draining().await;
            drop(coordinator);
        }
        let stopping = tokio::time::Instant::now();
        worker.exit().await?;
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "coordinator gone first: {coordinator_goes_first}; took {:?}",
            stopping.elapsed()
        );
        // The action's process was killed (and reaped), not left running.
        let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while proc.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the action still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// With `drain_timeout_secs`, a drain on shutdown lasts that long: then what still runs
/// is cancelled, the coordinator hears so (CANCELLED), and the worker ends.
#[tokio::test]
async fn past_its_drain_timeout_a_worker_cancels_what_runs_and_reports_it() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let mut coordinator = TestCoordinator::start(TOKEN).await;
    let mut worker = RunningWorker::start_with(&coordinator, &cas, TOKEN, Some(1));
    coordinator.registered().await;
    let gates = tempfile::tempdir()?;
    let action = put_action(&cas, &gated(&gates.path().join("never"), "finished")).await;
    coordinator.send(assign("lease-1", action, None)).await;
    coordinator.running(&["lease-1"]).await;
    worker.shut_down();
    let stopping = tokio::time::Instant::now();
    let result = coordinator.result().await;
    assert_eq!(result.lease_id, "lease-1");
    assert_eq!(code(&result), Code::Cancelled);
    let waited = stopping.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(10)).contains(&waited),
        "cancelled after {waited:?}"
    );
    worker.exit().await?;
    Ok(())
}

/// The pid an action wrote to `file`, once it has (within 20 s).
async fn wait_for_pid(file: &std::path::Path) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the action did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
