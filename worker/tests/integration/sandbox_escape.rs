//! The sandbox, from inside an action: each way out must fail. An action cannot see other
//! actions, the worker's cache or anything of the host outside the system directories;
//! cannot write outside its directory and /tmp; has no network unless its platform says
//! `network=on`; leaves nothing running past its timeout, whatever it did to escape its
//! process group; and cannot have the worker create an output's parent through a symlink.
//! They need bubblewrap: `cargo test -- --ignored` runs them (.ci/run does).

use std::time::Duration;

use kiln_store::DigestFunction;
use kiln_worker::BubblewrapMode;

use crate::common::{self, put_action, ActionSpec, Node, TestCas, TestRunner};

async fn sandboxed(cas: &TestCas) -> TestRunner {
    if let Err(e) = kiln_worker::ProcessRunner::new(common::TEST_LIMITS, BubblewrapMode::Always) {
        panic!("bubblewrap is not usable here ({e}); apt-get install -y bubblewrap");
    }
    TestRunner::with(cas, common::TEST_LIMITS, BubblewrapMode::Always, 1 << 30)
}

/// Runs `spec`; returns its exit code and stdout.
async fn run(cas: &TestCas, runner: &TestRunner, spec: &ActionSpec) -> (i32, String) {
    let outcome = runner.run(put_action(cas, spec).await).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    let stdout = cas.get(result.stdout_digest.as_ref().unwrap()).await;
    (result.exit_code, String::from_utf8(stdout).unwrap())
}

#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn an_action_sees_neither_other_actions_nor_the_cache_nor_the_host() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let runner = sandboxed(&cas).await;
    // Something in the cache and in another action's place, and a "data directory".
    run(
        &cas,
        &runner,
        &ActionSpec {
            inputs: vec![Node::File("cached.txt", b"in the cache".to_vec())],
            ..ActionSpec::shell("true")
        },
    )
    .await;
    let other = runner
        .work_dir
        .path()
        .join("actions")
        .join("another-action");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("secret.txt"), "other action").unwrap();
    let data_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::write(data_dir.path().join("join-token"), "token").unwrap();

    let work = runner.work_dir.path().display().to_string();
    let script = format!(
        "ls -A {work}/actions | wc -l; \
         test -e {work}/cache && echo cache-visible; \
         test -e {other}/secret.txt && echo other-visible; \
         test -e {data}/join-token && echo data-visible; \
         test -e /proc/{worker} && echo worker-visible; \
         ls /proc | grep -c '^[0-9]'; id -u",
        other = other.display(),
        data = data_dir.path().display(),
        worker = std::process::id(),
    );
    let (code, stdout) = run(&cas, &runner, &ActionSpec::shell(&script)).await;
    assert_eq!(code, 0, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    // Only its own directory, nothing of the cache, the other action or the data dir.
    assert_eq!(lines[0], "1", "{stdout}");
    assert!(!stdout.contains("visible"), "{stdout}");
    // Its own PID namespace: a handful of processes, the worker not among them.
    assert!(lines[1].parse::<u32>().unwrap() <= 4, "{stdout}");
    assert_eq!(lines[2], "65534", "{stdout}");
}

#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn writes_outside_the_action_and_tmp_fail() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let runner = sandboxed(&cas).await;
    let script = "for p in /usr/x /etc/x /x /var/x /home/x; do \
                  if touch $p 2>/dev/null; then echo wrote $p; fi; done; \
                  touch /tmp/ok && touch ./ok && echo fine";
    let (_, stdout) = run(&cas, &runner, &ActionSpec::shell(script)).await;
    assert_eq!(stdout, "fine\n");
    for path in ["/usr/x", "/etc/x", "/x"] {
        assert!(!std::path::Path::new(path).exists(), "{path}");
    }
}

/// Connects to `port` from inside the action: bash's /dev/tcp, 0 on success.
fn connect_script(port: u16) -> String {
    format!("exec bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' 2>/dev/null; echo refused")
}

#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn the_network_is_there_only_with_network_on() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let runner = sandboxed(&cas).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();

    let (code, _) = run(&cas, &runner, &ActionSpec::shell(&connect_script(port))).await;
    assert_ne!(
        code, 0,
        "the action reached the host's loopback without network=on"
    );

    let with_network = ActionSpec {
        platform: vec![("network".into(), "on".into())],
        ..ActionSpec::shell(&connect_script(port))
    };
    let (code, stdout) = run(&cas, &runner, &with_network).await;
    assert_eq!(code, 0, "{stdout}");
    tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("the connection arrived")
        .unwrap();
}

#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn nothing_outlives_a_timeout_not_even_a_new_session_or_a_double_fork() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let runner = sandboxed(&cas).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Two escapees phone home 3 s later; the action's timeout is 1 s.
    let call_home = format!("sleep 3; bash -c 'echo alive > /dev/tcp/127.0.0.1/{port}'");
    let script = format!("setsid sh -c \"{call_home}\" & (sh -c \"{call_home}\" &) ; sleep 30");
    let spec = ActionSpec {
        platform: vec![("network".into(), "on".into())],
        timeout: Some(Duration::from_secs(1)),
        ..ActionSpec::shell(&script)
    };
    let outcome = runner.run(put_action(&cas, &spec).await).await;
    assert!(
        matches!(outcome.error, Some(kiln_worker::WorkerError::Timeout(..))),
        "{:?}",
        outcome.error
    );
    let called = tokio::time::timeout(Duration::from_secs(6), listener.accept()).await;
    assert!(called.is_err(), "a process outlived the action's timeout");
}

#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn an_output_parent_through_a_symlink_is_refused() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let runner = sandboxed(&cas).await;
    let target = tempfile::tempdir_in("/var/tmp").unwrap();
    let link: &'static str = Box::leak(target.path().display().to_string().into_boxed_str());
    let spec = ActionSpec {
        inputs: vec![Node::Symlink("out", link)],
        output_files: vec!["out/sub/file.txt".into()],
        ..ActionSpec::shell("true")
    };
    let outcome = runner.run(put_action(&cas, &spec).await).await;
    let error = outcome.error.expect("the action is refused");
    assert!(error.to_string().contains("symlink"), "{error}");
    assert!(
        !target.path().join("sub").exists(),
        "the worker created a directory outside"
    );
}

/// bubblewrap failing to build the sandbox is the worker's failure (UNAVAILABLE, to be
/// tried again), not the action's exit code 1.
#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn a_sandbox_that_cannot_start_is_an_infrastructure_error() {
    use kiln_worker::{CommandRunner, CommandSpec, ProcessRunner, WorkerError};
    let runner = ProcessRunner::new(common::TEST_LIMITS, BubblewrapMode::Always).unwrap();
    // The directory to bind into the sandbox is not there.
    let missing = std::path::PathBuf::from("/nonexistent/kiln-action");
    let dir = tempfile::tempdir().unwrap();
    let log = || std::sync::Arc::new(tempfile::tempfile().unwrap());
    let spec = CommandSpec {
        arguments: vec!["true".into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        exec_root: missing,
        working_dir: dir.path().to_path_buf(),
        timeout: Duration::from_secs(10),
        network: false,
        stdout: log(),
        stderr: log(),
    };
    let error = runner
        .run(&spec, &tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("the sandbox cannot start without its directory");
    assert!(matches!(error, WorkerError::SandboxSetup(_)), "{error:?}");
    assert_eq!(error.code(), tonic::Code::Unavailable);
    assert!(error.to_string().contains("bwrap:"), "{error}");

    // An action that fails on its own is still its own exit code.
    let own = CommandSpec {
        arguments: vec!["sh".into(), "-c".into(), "echo failing >&2; exit 1".into()],
        exec_root: dir.path().to_path_buf(),
        working_dir: dir.path().to_path_buf(),
        stdout: log(),
        stderr: log(),
        ..spec
    };
    let exit = runner
        .run(&own, &tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(exit.exit_code(), 1);
}
