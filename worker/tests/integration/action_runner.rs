//! The action runner against the real coordinator CAS over a real socket: inputs,
//! outputs, timeouts, cancellation, rlimits, escapes and missing inputs.

use crate::common;

use std::time::{Duration, Instant};

use common::{put_action, request, ActionSpec, Node, TestCas, TestRunner};
use kiln_proto::prost::Message;
use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};
use kiln_worker::{ResourceLimits, SandboxMode, WorkerError};
use tokio_util::sync::CancellationToken;
use tonic::Code;

fn ts(t: &Option<kiln_proto::protobuf::Timestamp>) -> (i64, i32) {
    let t = t.expect("timestamp is set");
    (t.seconds, t.nanos)
}

#[tokio::test]
async fn outputs_files_directories_and_logs_are_uploaded() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Blake3).await?;
    let worker = TestRunner::new(&cas);
    let mut spec = ActionSpec::shell(
        "set -e
         cat ../src/in.txt ../src/sub/more.txt > out/both.txt
         ../src/tool.sh > out/tool.txt
         mkdir -p tree/nested && echo leaf > tree/nested/leaf.txt && ln -s nested/leaf.txt tree/link
         printf '#!/bin/sh\\n' > tree/run.sh && chmod +x tree/run.sh
         echo \"$GREETING from $(pwd)\"
         echo oops >&2
         exit 3",
    );
    spec.working_directory = "work".into();
    spec.environment.push(("GREETING".into(), "hello".into()));
    spec.output_files = vec![
        "out/both.txt".into(),
        "out/tool.txt".into(),
        "never/made".into(),
    ];
    spec.output_directories = vec!["tree".into()];
    spec.inputs = vec![
        Node::Dir(
            "src",
            vec![
                Node::File("in.txt", b"one\n".to_vec()),
                Node::Dir("sub", vec![Node::File("more.txt", b"two\n".to_vec())]),
                Node::Executable("tool.sh", b"#!/bin/sh\necho tool ran\n".to_vec()),
                Node::Symlink("alias", "in.txt"),
            ],
        ),
        Node::Dir("work", vec![]),
    ];
    let digest = put_action(&cas, &spec).await;
    let outcome = worker.run(digest).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.expect("an ActionResult");
    assert_eq!(result.exit_code, 3);

    let stdout = cas.get(result.stdout_digest.as_ref().unwrap()).await;
    let exec_root_work = String::from_utf8(stdout)?;
    assert!(
        exec_root_work.starts_with("hello from /"),
        "{exec_root_work}"
    );
    // The working directory is `work` in the action's own directory.
    assert!(
        exec_root_work.trim_end().ends_with("/work")
            && exec_root_work.contains(&format!(
                "{}/",
                worker.work_dir.path().join("actions").display()
            )),
        "{exec_root_work}"
    );
    assert_eq!(
        cas.get(result.stderr_digest.as_ref().unwrap()).await,
        b"oops\n"
    );

    let files: Vec<&str> = result
        .output_files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(
        files,
        ["out/both.txt", "out/tool.txt"],
        "never/made is left out"
    );
    assert_eq!(
        cas.get(result.output_files[0].digest.as_ref().unwrap())
            .await,
        b"one\ntwo\n"
    );
    assert_eq!(
        cas.get(result.output_files[1].digest.as_ref().unwrap())
            .await,
        b"tool ran\n"
    );
    assert!(!result.output_files[0].is_executable);

    assert_eq!(result.output_directories.len(), 1);
    let dir = &result.output_directories[0];
    assert_eq!(dir.path, "tree");
    let tree: reapi::Tree = cas.get_message(dir.tree_digest.as_ref().unwrap()).await;
    let root = tree.root.clone().unwrap();
    let root_from_cas: reapi::Directory = cas
        .get_message(dir.root_directory_digest.as_ref().unwrap())
        .await;
    assert_eq!(root_from_cas, root);
    assert_eq!(root.symlinks[0].name, "link");
    assert_eq!(root.symlinks[0].target, "nested/leaf.txt");
    assert_eq!(root.files[0].name, "run.sh");
    assert!(root.files[0].is_executable);
    assert_eq!(root.directories[0].name, "nested");
    assert_eq!(tree.children.len(), 1);
    let nested = &tree.children[0];
    assert_eq!(nested.files[0].name, "leaf.txt");
    assert_eq!(
        cas.get(nested.files[0].digest.as_ref().unwrap()).await,
        b"leaf\n"
    );

    let m = result.execution_metadata.expect("metadata");
    assert_eq!(m.worker, "test-worker");
    assert_eq!(ts(&m.queued_timestamp), (1, 0));
    let order = [
        ts(&m.worker_start_timestamp),
        ts(&m.input_fetch_start_timestamp),
        ts(&m.input_fetch_completed_timestamp),
        ts(&m.execution_start_timestamp),
        ts(&m.execution_completed_timestamp),
        ts(&m.output_upload_start_timestamp),
        ts(&m.output_upload_completed_timestamp),
        ts(&m.worker_completed_timestamp),
    ];
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    Ok(())
}

#[tokio::test]
async fn output_paths_report_files_directories_and_symlinks() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::new(&cas);
    let mut spec = ActionSpec::shell(
        "echo data > a.txt && mkdir -p d/e && echo x > d/e/x && ln -s a.txt link && chmod +x a.txt
         head -c 3000000 /dev/zero | tr '\\0' 'z' > d/big.bin",
    );
    // output_paths supersedes the REAPI 2.0 fields, which must then be ignored.
    spec.output_paths = vec!["a.txt".into(), "d".into(), "link".into(), "absent".into()];
    spec.output_files = vec!["ignored".into()];
    let digest = put_action(&cas, &spec).await;
    let outcome = worker.run(digest).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "a.txt");
    assert!(result.output_files[0].is_executable);
    assert_eq!(
        cas.get(result.output_files[0].digest.as_ref().unwrap())
            .await,
        b"data\n"
    );
    assert_eq!(result.output_directories.len(), 1);
    let tree: reapi::Tree = cas
        .get_message(result.output_directories[0].tree_digest.as_ref().unwrap())
        .await;
    let root = tree.root.unwrap();
    assert_eq!(root.directories[0].name, "e");
    // Above the batch limit, so it went up through ByteStream Write.
    assert_eq!(root.files[0].name, "big.bin");
    assert_eq!(
        cas.get(root.files[0].digest.as_ref().unwrap()).await,
        vec![b'z'; 3_000_000]
    );
    assert_eq!(tree.children[0].files[0].name, "x");
    assert_eq!(result.output_symlinks.len(), 1);
    assert_eq!(result.output_symlinks[0].path, "link");
    assert_eq!(result.output_symlinks[0].target, "a.txt");
    Ok(())
}

/// Whether `pid` still runs (a zombie awaiting its reaper counts as gone).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::new(&cas);
    let pid_file = worker.work_dir.path().join("background.pid");
    let mut spec = ActionSpec::shell(&format!(
        "sleep 30 & echo $! > {} ; echo started; wait",
        pid_file.display()
    ));
    // Long enough for the shell to start the sleep and write its logs and pid first on a
    // busy machine (what is checked below), far short of the sleep's 30 s.
    let timeout = Duration::from_secs(3);
    spec.timeout = Some(timeout);
    let digest = put_action(&cas, &spec).await;
    let started = Instant::now();
    let outcome = worker.run(digest).await;
    assert!(
        started.elapsed() < timeout + Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let error = outcome.error.expect("a timeout error");
    assert!(
        matches!(error, WorkerError::Timeout(t) if t == timeout),
        "{error}"
    );
    assert_eq!(error.to_rpc_status().code, Code::DeadlineExceeded as i32);
    // The logs written before the timeout are still reported.
    let result = outcome.action_result.expect("a partial ActionResult");
    assert_eq!(
        cas.get(result.stdout_digest.as_ref().unwrap()).await,
        b"started\n"
    );

    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !alive(pid),
        "the background sleep {pid} survived the timeout"
    );
    Ok(())
}

#[tokio::test]
async fn cancelling_kills_the_process_group() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::new(&cas);
    let pid_file = worker.work_dir.path().join("child.pid");
    let spec = ActionSpec::shell(&format!(
        "sleep 30 & echo $! > {}; wait",
        pid_file.display()
    ));
    let digest = put_action(&cas, &spec).await;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let pid_path = pid_file.clone();
    tokio::spawn(async move {
        while !pid_path.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        trigger.cancel();
    });
    let started = Instant::now();
    let outcome = worker.runner.run(&request(digest), &cancel).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(outcome.error, Some(WorkerError::Cancelled)),
        "{:?}",
        outcome.error
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    // The kill is sent before run returns; the process may take a moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!alive(pid), "the background sleep survived the cancel");
    Ok(())
}

/// A command that prints 1 GiB keeps only the cap of it, and the log says it was cut;
/// stderr has its own cap. The worker never holds the gigabyte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_are_capped() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let limits = ResourceLimits {
        log_bytes: 1 << 20,
        ..common::TEST_LIMITS
    };
    let worker = TestRunner::with(&cas, limits, SandboxMode::None, 1 << 30);
    let spec = ActionSpec::shell(
        "head -c 1073741824 /dev/zero; head -c 100 /dev/zero | tr '\\0' e >&2; echo done >&2",
    );
    let digest = put_action(&cas, &spec).await;
    let outcome = worker.run(digest).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    assert_eq!(result.exit_code, 0);
    let stdout = cas.get(result.stdout_digest.as_ref().unwrap()).await;
    assert!(stdout[..1 << 20].iter().all(|b| *b == 0));
    let note = String::from_utf8_lossy(&stdout[1 << 20..]);
    assert!(
        note.contains(
            "stdout truncated: the action wrote 1073741824 bytes; only the first 1048576 are kept"
        ),
        "{note}"
    );
    let stderr = String::from_utf8(cas.get(result.stderr_digest.as_ref().unwrap()).await)?;
    assert_eq!(stderr, format!("{}done\n", "e".repeat(100)));
    Ok(())
}

async fn run_expecting_escape(spec: ActionSpec) -> String {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let worker = TestRunner::new(&cas);
    let digest = put_action(&cas, &spec).await;
    let outcome = worker.run(digest).await;
    let Some(error) = outcome.error else {
        panic!("no escape error for {spec:?}: {:?}", outcome.action_result);
    };
    assert!(
        matches!(error, WorkerError::OutputPathEscapes { .. }),
        "unexpected error {error}"
    );
    let status = error.to_rpc_status();
    assert_eq!(status.code, Code::InvalidArgument as i32);
    status.message
}

#[tokio::test]
async fn output_paths_escaping_the_action_directory_are_errors() {
    let outside = tempfile::tempdir().unwrap();
    let marker = outside.path().join("marker");

    // `..` and absolute paths are refused before the command runs.
    let mut dotdot = ActionSpec::shell(&format!("touch {}", marker.display()));
    dotdot.output_files = vec!["../escape".into()];
    let message = run_expecting_escape(dotdot).await;
    assert!(message.contains("../escape"), "{message}");
    assert!(!marker.exists(), "the command must not run");

    let mut absolute = ActionSpec::shell("true");
    absolute.output_paths = vec!["/etc/passwd".into()];
    assert!(run_expecting_escape(absolute).await.contains("absolute"));

    let mut climbing = ActionSpec::shell("true");
    climbing.working_directory = "sub".into();
    climbing.output_directories = vec!["../../up".into()];
    run_expecting_escape(climbing).await;

    // Symlinks are caught when the outputs are collected.
    let target = outside.path().display().to_string();
    std::fs::write(outside.path().join("secret"), "host file").unwrap();
    let mut via_parent = ActionSpec::shell(&format!("rmdir out && ln -s {target} out"));
    via_parent.output_files = vec!["out/secret".into()];
    let message = run_expecting_escape(via_parent).await;
    assert!(message.contains("out/secret"), "{message}");

    let mut link_out = ActionSpec::shell("ln -s ../../../../../../etc/passwd link");
    link_out.output_paths = vec!["link".into()];
    run_expecting_escape(link_out).await;

    let mut followed = ActionSpec::shell(&format!("ln -s {target}/secret f"));
    followed.output_files = vec!["f".into()];
    run_expecting_escape(followed).await;

    let mut in_tree = ActionSpec::shell("mkdir d && ln -s /etc d/etc");
    in_tree.output_directories = vec!["d".into()];
    run_expecting_escape(in_tree).await;
}

#[tokio::test]
async fn missing_inputs_are_listed() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::new(&cas);
    let mut spec = ActionSpec::shell("cat a b");
    spec.inputs = vec![
        Node::File("a", b"first".to_vec()),
        Node::File("b", b"second".to_vec()),
        Node::File("c", b"kept".to_vec()),
    ];
    let digest = put_action(&cas, &spec).await;
    let gone_a = Digest::of_bytes(DigestFunction::Sha256, b"first");
    let gone_b = Digest::of_bytes(DigestFunction::Sha256, b"second");
    cas.delete(&gone_a).await;
    cas.delete(&gone_b).await;

    let outcome = worker.run(digest).await;
    let error = outcome.error.expect("missing inputs");
    let WorkerError::MissingInputs(missing) = &error else {
        panic!("unexpected error {error}");
    };
    let mut expected = vec![gone_a, gone_b];
    expected.sort();
    assert_eq!(missing, &expected);
    assert!(outcome.action_result.is_none());

    let status = error.to_rpc_status();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    let tonic_status = tonic::Status::with_details(
        Code::FailedPrecondition,
        status.message.clone(),
        status.encode_to_vec().into(),
    );
    let details = tonic_types::StatusExt::get_error_details(&tonic_status);
    let violations = &details
        .precondition_failure()
        .expect("a PreconditionFailure")
        .violations;
    let subjects: Vec<&str> = violations.iter().map(|v| v.subject.as_str()).collect();
    assert_eq!(
        subjects,
        expected
            .iter()
            .map(|d| format!("blobs/{}", d.reapi()))
            .collect::<Vec<_>>()
    );
    assert!(violations.iter().all(|v| v.r#type == "MISSING"));

    // The action itself missing is reported the same way.
    let absent_action = Digest::of_bytes(DigestFunction::Sha256, b"no such action");
    let outcome = worker.run(absent_action).await;
    assert!(
        matches!(&outcome.error, Some(WorkerError::MissingInputs(m)) if m == &[absent_action]),
        "{:?}",
        outcome.error
    );
    Ok(())
}

#[tokio::test]
async fn a_second_run_of_the_same_inputs_fetches_nothing() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Blake3).await?;
    let worker = TestRunner::new(&cas);
    let big = vec![7u8; 3 << 20]; // above the batch limit: fetched through ByteStream
    let mut spec = ActionSpec::shell("cat small big dir/small_too | wc -c; ./tool");
    spec.inputs = vec![
        Node::File("small", b"0123456789".to_vec()),
        Node::File("big", big.clone()),
        // The same content as a plain file and as an executable: one download.
        Node::Dir(
            "dir",
            vec![Node::File("small_too", b"#!/bin/sh\necho tool\n".to_vec())],
        ),
        Node::Executable("tool", b"#!/bin/sh\necho tool\n".to_vec()),
    ];
    let digest = put_action(&cas, &spec).await;

    let first = worker.run(digest).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    // Action, Command, two Directories, three distinct file contents.
    assert_eq!(first.inputs_fetched.blobs, 7, "{:?}", first.inputs_fetched);
    let result = first.action_result.unwrap();
    let stdout = cas.get(result.stdout_digest.as_ref().unwrap()).await;
    let expected = format!("{}\ntool\n", 10 + big.len() + 20);
    assert_eq!(String::from_utf8(stdout)?, expected);

    // Take every input away from the CAS: the second run must not need any of them.
    let tool = Digest::of_bytes(DigestFunction::Blake3, b"#!/bin/sh\necho tool\n");
    for data in [&b"0123456789"[..], &big[..]] {
        cas.delete(&Digest::of_bytes(DigestFunction::Blake3, data))
            .await;
    }
    cas.delete(&tool).await;
    let second = worker.run(digest).await;
    assert!(second.error.is_none(), "{:?}", second.error);
    assert_eq!(second.inputs_fetched.blobs, 0);
    assert_eq!(second.inputs_fetched.bytes, 0);
    let result = second.action_result.unwrap();
    assert_eq!(
        String::from_utf8(cas.get(result.stdout_digest.as_ref().unwrap()).await)?,
        expected
    );
    Ok(())
}

#[tokio::test]
async fn inputs_are_read_only_copies_and_the_action_directory_is_removed() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::new(&cas);
    let mut spec = ActionSpec::shell(
        "stat -c '%h %a' input; if echo x >> input 2>/dev/null; then echo writable; fi",
    );
    spec.inputs = vec![Node::File("input", b"shared".to_vec())];
    let digest = put_action(&cas, &spec).await;
    let outcome = worker.run(digest).await;
    let result = outcome.action_result.unwrap();
    let stdout = String::from_utf8(cas.get(result.stdout_digest.as_ref().unwrap()).await)?;
    // A copy of its own (one link: no hardlink to the cache an action could write
    // through), mode 0444 (root may still write, so the second line depends on the user
    // and is not asserted).
    assert!(stdout.starts_with("1 444\n"), "{stdout}");
    let actions = worker.work_dir.path().join("actions");
    assert_eq!(std::fs::read_dir(actions)?.count(), 0);
    Ok(())
}

#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn bubblewrap_confines_writes_to_the_action_directory() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::with(&cas, common::TEST_LIMITS, SandboxMode::Bubblewrap, 1 << 30);
    // Outside /tmp, which the sandbox replaces with its own.
    let outside = tempfile::tempdir_in("/var/tmp")?;
    let mut spec = ActionSpec::shell(&format!(
        "echo inside > out.txt; if touch {}/escaped 2>/dev/null; then echo escaped; else echo blocked; fi",
        outside.path().display()
    ));
    spec.output_files = vec!["out.txt".into()];
    let digest = put_action(&cas, &spec).await;
    let outcome = worker.run(digest).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    let stdout = String::from_utf8(cas.get(result.stdout_digest.as_ref().unwrap()).await)?;
    assert_eq!(stdout, "blocked\n");
    assert!(!outside.path().join("escaped").exists());
    assert_eq!(
        cas.get(result.output_files[0].digest.as_ref().unwrap())
            .await,
        b"inside\n"
    );
    Ok(())
}

#[tokio::test]
async fn an_inline_action_and_command_are_used_only_when_they_match_their_digests(
) -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::new(&cas);
    let function = DigestFunction::Sha256;
    // Neither message is in the CAS, and the input root is the empty Directory.
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), "echo inline".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let command_digest = Digest::of_bytes(function, &command);
    let action = reapi::Action {
        command_digest: Some(common::wire(&command_digest)),
        input_root_digest: Some(common::wire(&function.empty_digest())),
        ..Default::default()
    }
    .encode_to_vec();
    let action_digest = Digest::of_bytes(function, &action);
    let mut inline = request(action_digest);
    inline.inline_action = Some(action.clone());
    inline.inline_command = Some(command.clone());

    let outcome = worker.runner.run(&inline, &CancellationToken::new()).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert_eq!(outcome.inputs_fetched.blobs, 0, "nothing came from the CAS");
    let result = outcome.action_result.unwrap();
    assert_eq!(
        cas.get(result.stdout_digest.as_ref().unwrap()).await,
        b"inline\n"
    );
    // Nothing on stderr: the empty blob, which the CAS always has and nobody uploads.
    assert_eq!(
        result.stderr_digest,
        Some(common::wire(&function.empty_digest()))
    );

    // A Command that does not match its digest is not trusted: the worker asks the CAS,
    // which does not have it.
    let mut tampered = inline.clone();
    tampered.inline_command = Some(
        reapi::Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), "echo tampered".into()],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let outcome = worker
        .runner
        .run(&tampered, &CancellationToken::new())
        .await;
    assert!(
        matches!(&outcome.error, Some(WorkerError::MissingInputs(m)) if m == &[command_digest]),
        "{:?}",
        outcome.error
    );
    // Once the CAS has it, the same request runs the real Command.
    cas.put(&command).await;
    let outcome = worker
        .runner
        .run(&tampered, &CancellationToken::new())
        .await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let stdout = outcome.action_result.unwrap().stdout_digest.unwrap();
    assert_eq!(cas.get(&stdout).await, b"inline\n");
    Ok(())
}

/// Actions start with default signal dispositions and nothing blocked (the worker itself
/// ignores SIGPIPE, as Rust programs do), are found on their own PATH, and a program that
/// cannot start is a clear error.
#[tokio::test]
async fn commands_start_with_default_signals_on_their_own_path() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::new(&cas);
    for (signal, code) in [("PIPE", 128 + 13), ("TERM", 128 + 15)] {
        let spec = ActionSpec::shell(&format!("kill -{signal} $$; echo survived"));
        let outcome = worker.run(put_action(&cas, &spec).await).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(
            outcome.action_result.unwrap().exit_code,
            code,
            "SIG{signal}"
        );
    }

    // `tool` is looked up on the action's PATH, here a directory of the input root.
    let mut on_path = ActionSpec {
        arguments: vec!["tool".into()],
        environment: vec![("PATH".into(), "/nonexistent:bin".into())],
        ..Default::default()
    };
    on_path.inputs = vec![Node::Dir(
        "bin",
        vec![Node::Executable(
            "tool",
            b"#!/bin/sh\necho found on PATH\n".to_vec(),
        )],
    )];
    let outcome = worker.run(put_action(&cas, &on_path).await).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let stdout = outcome.action_result.unwrap().stdout_digest.unwrap();
    assert_eq!(cas.get(&stdout).await, b"found on PATH\n");

    let missing = ActionSpec {
        arguments: vec!["/no/such/program".into()],
        ..Default::default()
    };
    let outcome = worker.run(put_action(&cas, &missing).await).await;
    let error = outcome.error.expect("the program does not exist");
    assert!(
        matches!(&error, WorkerError::InvalidAction(m) if m.contains("/no/such/program") && m.contains("No such file")),
        "{error}"
    );
    assert_eq!(error.to_rpc_status().code, Code::InvalidArgument as i32);
    Ok(())
}

/// An action that leaves its directory empty hands it to the next action; one that leaves
/// anything behind has its directory removed, so no action ever sees another's files.
#[tokio::test]
async fn only_an_untouched_action_directory_is_reused() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let worker = TestRunner::new(&cas);
    let stdout = |outcome: kiln_worker::ActionOutcome| {
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        outcome.action_result.unwrap().stdout_digest.unwrap()
    };
    let run = |script: &'static str| {
        let (worker, cas) = (&worker, &cas);
        async move {
            let digest = put_action(cas, &ActionSpec::shell(script)).await;
            String::from_utf8(cas.get(&stdout(worker.run(digest).await)).await).unwrap()
        }
    };
    let first = run("pwd").await;
    let second = run("pwd; touch leftover").await;
    assert_eq!(second, first, "the empty directory is reused");
    let third = run("pwd; ls -A").await;
    assert_eq!(
        third.lines().count(),
        1,
        "a fresh, empty directory: {third:?}"
    );
    assert_ne!(third, first);
    let locked = run("pwd; chmod 500 .").await;
    assert_eq!(
        locked, third,
        "the third action's empty directory is reused"
    );
    // The directory the action locked is gone; the second's leftover too.
    let actions = worker.work_dir.path().join("actions");
    let left: Vec<_> = std::fs::read_dir(&actions)?.collect::<Result<_, _>>()?;
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}
