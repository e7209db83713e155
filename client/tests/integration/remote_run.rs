//! `kiln run` end to end against the real coordinator's CAS and action cache, with the
//! in-test Execution service of `support` standing in for the scheduler and workers.

use crate::support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kiln_client::{
    run, GrpcExecutor, Progress, RemoteCas, RunManifest, RunReport, RunRequest, ShardOutcome,
};
use kiln_store::{Digest, DigestFunction};
use support::{write_old, FakeExecution, TestCoordinator};

struct Farm {
    coordinator: TestCoordinator,
    execution: FakeExecution,
    executor: GrpcExecutor,
    function: DigestFunction,
}

impl Farm {
    async fn start(function: DigestFunction) -> anyhow::Result<Self> {
        let coordinator = TestCoordinator::start().await?;
        let execution = FakeExecution::start(&coordinator, function).await?;
        let executor = GrpcExecutor::new(execution.channel().await?, None);
        Ok(Farm {
            coordinator,
            execution,
            executor,
            function,
        })
    }

    /// A fresh connection: a new `kiln run` with its own invocation id.
    async fn cas(&self) -> anyhow::Result<RemoteCas> {
        self.coordinator.connect(self.function).await
    }

    async fn run(&self, request: &RunRequest) -> anyhow::Result<RunReport> {
        let log = Arc::new(ShardLog::default());
        let report = run(&self.cas().await?, &self.executor, request, log.clone()).await?;
        let mut reported = log.finished.lock().unwrap().clone();
        reported.sort_unstable();
        assert_eq!(
            reported,
            (0..request.shards).collect::<Vec<_>>(),
            "progress saw every shard"
        );
        Ok(report)
    }
}

/// Records which shards the progress callbacks reported.
#[derive(Default)]
struct ShardLog {
    finished: Mutex<Vec<u32>>,
}

impl Progress for ShardLog {
    fn shard_finished(&self, outcome: &ShardOutcome) {
        self.finished.lock().unwrap().push(outcome.index);
    }
}

fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_old(dir.path(), "src/input.txt", b"input file content\n");
    write_old(dir.path(), "README", b"readme");
    write_old(dir.path(), ".gitignore", b"*.tmp\n");
    dir
}

fn stdout(outcome: &ShardOutcome) -> String {
    String::from_utf8_lossy(&outcome.result.as_ref().unwrap().stdout).into_owned()
}

fn request(root: &Path, shards: u32, arguments: &[&str]) -> RunRequest {
    let mut request = RunRequest::new(root, arguments.iter().map(|a| a.to_string()).collect());
    request.shards = shards;
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_run_executes_each_shard_once_and_then_hits_the_cache() -> anyhow::Result<()> {
    let farm = Farm::start(DigestFunction::Sha256).await?;
    let work = workspace();
    let mut request = request(
        work.path(),
        3,
        &[
            "fake",
            "echo=hello {shard}/{total}",
            "read=src/input.txt",
            "err=warning from {shard}",
            "out=report-{shard}.xml:R{shard}",
            "out=summary.txt:S{shard}",
            "dir=gen:{shard}",
        ],
    );
    request.output_paths = vec![
        "report-{shard}.xml".into(),
        "summary.txt".into(),
        "gen".into(),
    ];

    let first = farm.run(&request).await?;
    assert_eq!(first.exit_code(), 0);
    assert_eq!(first.shards.len(), 3);
    assert_eq!(
        farm.execution.log.execution_counts(),
        [1, 1, 1],
        "each shard ran once"
    );
    let actions: HashSet<Digest> = first.shards.iter().map(|s| s.action_digest).collect();
    assert_eq!(actions.len(), 3, "the shards are distinct actions");
    for shard in &first.shards {
        let k = shard.index;
        let result = shard.result.as_ref().unwrap();
        assert!(!result.cached);
        let out = stdout(shard);
        assert!(out.contains(&format!("TEST_SHARD_INDEX={k}\n")), "{out}");
        assert!(out.contains("TEST_TOTAL_SHARDS=3\n"), "{out}");
        assert!(out.contains(&format!("hello {k}/3\n")), "{out}");
        assert!(
            out.contains("input file content\n"),
            "inputs reached the executor: {out}"
        );
        assert_eq!(
            String::from_utf8_lossy(&result.stderr),
            format!("warning from {k}\n")
        );
        // `{shard}` outputs land at their own path; the others per shard.
        let report = work.path().join(format!("report-{k}.xml"));
        assert_eq!(std::fs::read_to_string(&report)?, format!("R{k}"));
        let summary = work.path().join(format!("shard-{k}/summary.txt"));
        assert_eq!(std::fs::read_to_string(&summary)?, format!("S{k}"));
        let generated = work.path().join(format!("shard-{k}/gen/sub/b.txt"));
        assert_eq!(std::fs::read_to_string(&generated)?, format!("B{k}"));
        assert_eq!(result.outputs.len(), 3);
    }

    // Every call of one run carries one invocation id, each shard its own action id.
    let metadata = farm.execution.log.metadata.lock().unwrap().clone();
    assert_eq!(metadata.len(), 3);
    let invocations: HashSet<_> = metadata
        .iter()
        .map(|m| m.tool_invocation_id.clone())
        .collect();
    assert_eq!(invocations.len(), 1);
    assert_eq!(
        invocations.iter().next().unwrap(),
        &first.tool_invocation_id
    );
    let action_ids: HashSet<_> = metadata.iter().map(|m| m.action_id.clone()).collect();
    let expected: HashSet<_> = actions.iter().map(|d| d.hex()).collect();
    assert_eq!(action_ids, expected);
    assert!(metadata
        .iter()
        .all(|m| m.tool_details.as_ref().unwrap().tool_name == "kiln"));

    // The manifest names every shard's action and result.
    let manifest = RunManifest::load(&first.manifest_path)?;
    assert_eq!(manifest.shards.len(), 3);
    assert_eq!(manifest.input_root_digest, first.input_root.reapi());
    for (record, shard) in manifest.shards.iter().zip(&first.shards) {
        assert_eq!(record.action_digest, shard.action_digest.reapi());
        let result_digest = shard.result.as_ref().unwrap().action_result_digest;
        assert_eq!(record.action_result_digest, Some(result_digest.reapi()));
        assert!(
            farm.coordinator.has(&result_digest).await?,
            "the ActionResult is in the CAS"
        );
        assert!(!record.cached);
    }

    // The second run: the downloaded outputs are not inputs, so the input root, the
    // actions and hence the cache entries are the same. Nothing is uploaded or re-hashed.
    let second = farm.run(&request).await?;
    assert_eq!(second.input_root, first.input_root);
    assert_eq!(second.upload_stats.uploaded_blobs, 0);
    assert_eq!(second.hash_stats.hashed_files, 0);
    assert!(
        second
            .shards
            .iter()
            .all(|s| s.result.as_ref().unwrap().cached),
        "all cache hits"
    );
    assert_eq!(
        farm.execution.log.execution_counts(),
        [1, 1, 1],
        "nothing ran again"
    );
    assert!(
        stdout(&second.shards[2]).contains("hello 2/3"),
        "cached stdout is fetched too"
    );
    assert_ne!(second.tool_invocation_id, first.tool_invocation_id);
    assert!(RunManifest::load(&second.manifest_path)?
        .shards
        .iter()
        .all(|s| s.cached));
    farm.coordinator.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worst_shard_exit_code_wins() -> anyhow::Result<()> {
    let farm = Farm::start(DigestFunction::Blake3).await?;
    let work = workspace();
    let report = farm
        .run(&request(work.path(), 3, &["fake", "exit={shard}"]))
        .await?;
    let codes: Vec<i32> = report.shards.iter().map(ShardOutcome::exit_code).collect();
    assert_eq!(codes, [0, 1, 2]);
    assert_eq!(report.exit_code(), 2);

    // A shard that cannot run at all counts as exit code 1, and the others still report.
    let report = farm
        .run(&request(work.path(), 2, &["fake", "unrunnable={shard}"]))
        .await?;
    assert!(report.shards[0].result.is_ok());
    let err = report.shards[1].result.as_ref().unwrap_err();
    assert!(err.to_string().contains("the worker crashed"), "{err}");
    assert_eq!(report.exit_code(), 1);
    let manifest = RunManifest::load(&report.manifest_path)?;
    assert_eq!(manifest.exit_code, 1);
    assert!(manifest.shards[1]
        .error
        .as_deref()
        .unwrap()
        .contains("worker crashed"));
    assert_eq!(manifest.digest_function, "blake3");

    // Failed actions are not cached: running again executes them again.
    let before = farm.execution.log.execution_counts().iter().sum::<u32>();
    farm.run(&request(work.path(), 3, &["fake", "exit={shard}"]))
        .await?;
    let after = farm.execution.log.execution_counts().iter().sum::<u32>();
    assert_eq!(
        after - before,
        2,
        "shards 1 and 2 ran again; shard 0 was a cache hit"
    );
    farm.coordinator.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_shard_fails_with_its_status() -> anyhow::Result<()> {
    let farm = Farm::start(DigestFunction::Sha256).await?;
    let work = workspace();
    let mut request = request(
        work.path(),
        2,
        &["fake", "err=partial output", "deadline={shard}"],
    );
    request.timeout = Some(std::time::Duration::from_secs(1));
    let report = farm.run(&request).await?;
    assert_eq!(report.shards[0].exit_code(), 0);
    let timed_out = report.shards[1].result.as_ref().unwrap();
    let status = timed_out.error_status.as_ref().expect("the status is kept");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(
        &timed_out.stderr[..],
        b"partial output\n",
        "partial logs are still shown"
    );
    assert_eq!(
        report.shards[1].exit_code(),
        1,
        "exit code 0 with an error status is a failure"
    );
    assert_eq!(report.exit_code(), 1);
    farm.coordinator.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_is_resumed_with_wait_execution() -> anyhow::Result<()> {
    let farm = Farm::start(DigestFunction::Sha256).await?;
    let work = workspace();
    farm.execution
        .log
        .break_next_stream
        .store(true, Ordering::SeqCst);
    let mut request = request(work.path(), 1, &["fake", "out=o.txt:done"]);
    request.output_paths = vec!["o.txt".into()];
    let report = farm.run(&request).await?;
    assert_eq!(report.exit_code(), 0);
    assert_eq!(farm.execution.log.wait_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        farm.execution.log.execute_calls.load(Ordering::SeqCst),
        1,
        "not submitted twice"
    );
    assert_eq!(std::fs::read_to_string(work.path().join("o.txt"))?, "done");
    farm.coordinator.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_lost_before_execution_are_uploaded_again() -> anyhow::Result<()> {
    let farm = Farm::start(DigestFunction::Sha256).await?;
    let work = workspace();
    let input = Digest::of_bytes(DigestFunction::Sha256, b"input file content\n");
    *farm.execution.log.lose_before_execute.lock().unwrap() = Some(input);
    let report = farm
        .run(&request(work.path(), 1, &["fake", "read=src/input.txt"]))
        .await?;
    assert_eq!(report.exit_code(), 0, "{:?}", report.shards[0].result);
    assert_eq!(
        farm.execution.log.missing_reported.load(Ordering::SeqCst),
        1
    );
    assert_eq!(
        farm.execution.log.execute_calls.load(Ordering::SeqCst),
        2,
        "retried once"
    );
    assert!(farm.coordinator.has(&input).await?);
    assert!(stdout(&report.shards[0]).contains("input file content"));
    farm.coordinator.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_runs_every_time_and_outputs_can_go_elsewhere() -> anyhow::Result<()> {
    let farm = Farm::start(DigestFunction::Sha256).await?;
    let work = workspace();
    let elsewhere = tempfile::tempdir()?;
    let mut request = request(
        work.path(),
        1,
        &["fake", "exe=bin/tool:#!", "link=current:bin/tool"],
    );
    request.no_cache = true;
    request.output_paths = vec!["bin/tool".into(), "current".into()];
    request.output_dir = Some(elsewhere.path().to_path_buf());
    for _ in 0..2 {
        let report = farm.run(&request).await?;
        assert!(!report.shards[0].result.as_ref().unwrap().cached);
    }
    assert_eq!(farm.execution.log.execution_counts(), [2]);
    assert_eq!(
        std::fs::read_to_string(elsewhere.path().join("bin/tool"))?,
        "#!"
    );
    assert_eq!(
        std::fs::read_link(elsewhere.path().join("current"))?,
        Path::new("bin/tool")
    );
    assert!(!work.path().join("bin").exists());
    farm.coordinator.stop().await
}
