//! The sandbox, from inside an action: each way out must fail. An action cannot see other
//! actions, the worker's cache or anything of the host outside the system directories;
//! cannot write outside its directory and /tmp; has no network unless its platform says
//! `network=on`; runs as a uid that owns nothing but its directory, with only its
//! Command's environment; leaves nothing running past its timeout, whatever it did to
//! escape its process group; cannot go past its memory and process limits; and cannot
//! have the worker create an output's parent through a symlink.
//! They need bubblewrap: `cargo test -- --ignored` runs them (.ci/run does).

use std::time::Duration;

use kiln_store::DigestFunction;
use kiln_worker::{ResourceLimits, SandboxMode, DEFAULT_SANDBOX_UID_BASE};

use crate::common::{self, put_action, ActionSpec, Node, TestCas, TestRunner};

async fn sandboxed(cas: &TestCas) -> TestRunner {
    sandboxed_with(cas, common::TEST_LIMITS)
}

fn sandboxed_with(cas: &TestCas, limits: ResourceLimits) -> TestRunner {
    TestRunner::with(cas, limits, SandboxMode::Bubblewrap, 1 << 30)
}

/// Runs `spec`; returns its exit code and stdout.
async fn run(cas: &TestCas, runner: &TestRunner, spec: &ActionSpec) -> (i32, String) {
    let outcome = runner.run(put_action(cas, spec).await).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    let stdout = cas.get(result.stdout_digest.as_ref().unwrap()).await;
    (result.exit_code, String::from_utf8(stdout).unwrap())
}

/// Whether a running action's directory under `actions` holds its secret: its own
/// directory there, or, in a warm sandbox, that sandbox's `exec` there.
fn neighbour_secret_exists(actions: &std::path::Path) -> bool {
    std::fs::read_dir(actions).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let dir = entry.path();
            dir.join("running-secret.txt").exists()
                || dir.join("exec").join("running-secret.txt").exists()
        })
    })
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
    // Data directories wherever they may be: /var/tmp, /tmp (the sandbox has its own),
    // and next to this crate (under /work on CI).
    let data_dirs = [
        tempfile::tempdir_in("/var/tmp").unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap(),
    ];
    for dir in &data_dirs {
        std::fs::write(dir.path().join("join-token"), "token").unwrap();
    }
    let data_tests: String = data_dirs
        .iter()
        .map(|d| {
            format!(
                "test -e {}/join-token && echo data-visible; ",
                d.path().display()
            )
        })
        .collect();

    let work = runner.work_dir.path().display().to_string();
    let script = format!(
        "ls -A {work}/actions | wc -l; \
         test -e {work}/cache && echo cache-visible; \
         test -e {other}/secret.txt && echo other-visible; \
         find / -name running-secret.txt 2>/dev/null | grep -q . && echo running-visible; \
         {data_tests} \
         test -e /proc/{worker} && echo worker-visible; \
         ls /proc | grep -c '^[0-9]'; id -u; stat -c %u .; \
         cat /etc/shadow >/dev/null 2>&1 && echo shadow-visible; true",
        other = other.display(),
        worker = std::process::id(),
    );
    // Probed while another action runs, its secret on the host's disk meanwhile.
    let neighbour = ActionSpec::shell("echo secret > running-secret.txt; sleep 4");
    let actions = runner.work_dir.path().join("actions");
    let probe = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !neighbour_secret_exists(&actions) {
            assert!(
                std::time::Instant::now() < deadline,
                "the neighbour never ran"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run(&cas, &runner, &ActionSpec::shell(&script)).await
    };
    let ((code, stdout), _) = tokio::join!(probe, run(&cas, &runner, &neighbour));
    assert_eq!(code, 0, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    // Only its own directory, nothing of the cache, the other actions or the data dir.
    assert_eq!(lines[0], "1", "{stdout}");
    assert!(!stdout.contains("visible"), "{stdout}");
    // Its own PID namespace: a handful of processes (bwrap's init, a warm sandbox's
    // holder, the script's), the worker not among them.
    assert!(lines[1].parse::<u32>().unwrap() <= 5, "{stdout}");
    // A uid of its own (the test runs as root, as CI does), which owns its directory and
    // nothing else: root's files, /etc/shadow among them, stay closed.
    // (Inside a user namespace, when bwrap starts as the uid as in a container, the uid
    // shows as 65534 there.)
    let uid: u32 = lines[2].parse().unwrap();
    assert!(uid >= DEFAULT_SANDBOX_UID_BASE || uid == 65534, "{stdout}");
    assert_eq!(lines[3], lines[2], "{stdout}");
    assert!(
        std::path::Path::new("/etc/shadow").exists(),
        "the host has no /etc/shadow to test with"
    );
}

/// The join token lives in the worker's environment (KILN_JOIN_TOKEN) or a file only root
/// reads; an action sees neither, and its environment is exactly its Command's.
#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn the_workers_environment_and_join_token_are_out_of_reach() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let runner = sandboxed(&cas).await;
    // A process of the host holding a token in its environment, as a worker would.
    let token = format!("{}", std::process::id() as u64 * 7919);
    let mut holder = std::process::Command::new("sleep")
        .arg("60")
        .env("KILN_JOIN_TOKEN", format!("join-{token}"))
        .spawn()
        .unwrap();
    // The script spells the token so that its own command line does not contain it.
    let script = format!(
        "t=join-; grep -l \"$t{token}\" /proc/*/environ 2>/dev/null; \
         cat /proc/{holder}/environ 2>/dev/null; echo; env",
        holder = holder.id(),
    );
    let spec = ActionSpec {
        environment: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("ONLY_MINE".into(), "yes".into()),
        ],
        ..ActionSpec::shell(&script)
    };
    let (code, stdout) = run(&cas, &runner, &spec).await;
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(code, 0, "{stdout}");
    assert!(!stdout.contains(&format!("join-{token}")), "{stdout}");
    assert!(!stdout.contains("KILN"), "{stdout}");
    let variables: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains('='))
        .map(|l| l.split('=').next().unwrap())
        .collect();
    assert!(variables.contains(&"ONLY_MINE"), "{stdout}");
    // The shell adds PWD; nothing of the worker's (HOME, USER, CARGO_*) is there.
    for variable in variables {
        assert!(
            ["PATH", "ONLY_MINE", "PWD"].contains(&variable),
            "{variable} leaked into the action: {stdout}"
        );
    }
}

/// RLIMIT_AS and RLIMIT_NPROC hold inside the sandbox: an allocation past the memory
/// limit fails (smaller ones work), and a bounded fork bomb stops at the process limit
/// with the shell saying why on the action's stderr.
#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn memory_and_process_limits_hold() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let runner = sandboxed_with(
        &cas,
        ResourceLimits {
            memory_bytes: Some(256 << 20),
            processes: Some(16),
            ..common::TEST_LIMITS
        },
    );
    // One 300 MB line, which sort must hold whole; then a 10 MB one, which fits.
    let memory = "head -c 300000000 /dev/zero | sort >/dev/null; echo big $?; \
                  head -c 10000000 /dev/zero | sort >/dev/null; echo small $?";
    let outcome = runner
        .run(put_action(&cas, &ActionSpec::shell(memory)).await)
        .await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    let stdout = String::from_utf8(cas.get(result.stdout_digest.as_ref().unwrap()).await).unwrap();
    let stderr = String::from_utf8(cas.get(result.stderr_digest.as_ref().unwrap()).await).unwrap();
    assert_eq!(stdout, "big 2\nsmall 0\n", "{stderr}");
    assert!(stderr.contains("memory exhausted"), "{stderr}");

    // 100 sleepers wanted, 16 processes allowed (the shell, sandbox and sleepers).
    let fork_bomb = "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; echo all started";
    let spec = ActionSpec {
        timeout: Some(Duration::from_secs(20)),
        ..ActionSpec::shell(fork_bomb)
    };
    let outcome = runner.run(put_action(&cas, &spec).await).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    let stdout = String::from_utf8(cas.get(result.stdout_digest.as_ref().unwrap()).await).unwrap();
    let stderr = String::from_utf8(cas.get(result.stderr_digest.as_ref().unwrap()).await).unwrap();
    assert_ne!(result.exit_code, 0, "{stdout}{stderr}");
    assert!(!stdout.contains("all started"), "{stdout}");
    assert!(stderr.contains("Cannot fork"), "{stderr}");
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
    use kiln_worker::{CommandRunner, CommandSpec, ProcessRunner, SandboxSettings, WorkerError};
    let runner = ProcessRunner::new(
        common::TEST_LIMITS,
        &SandboxSettings::new(SandboxMode::Bubblewrap),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = || std::sync::Arc::new(tempfile::tempfile().unwrap());
    let spec = CommandSpec {
        arguments: vec!["true".into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        exec_root: dir.path().to_path_buf(),
        // bwrap cannot enter it inside the sandbox.
        working_dir: dir.path().join("missing"),
        timeout: Duration::from_secs(10),
        network: false,
        image_root: None,
        stdout: log(),
        stderr: log(),
    };
    let error = runner
        .run(&spec, &tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("the sandbox cannot start in a missing directory");
    assert!(matches!(error, WorkerError::SandboxSetup(_)), "{error:?}");
    assert_eq!(error.code(), tonic::Code::Unavailable);
    // bwrap's own complaint, or, in a warm sandbox (a root worker), the step that failed.
    let message = error.to_string();
    assert!(
        message.contains("bwrap:") || message.contains("warm sandbox: chdir"),
        "{error}"
    );

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

/// A root worker runs actions in warm sandboxes, one after another: the next action in the
/// same sandbox finds nothing of the last, neither its processes (a new session's daemon
/// included) nor its `/tmp`; and a sandbox left holding a System V IPC object is replaced.
#[tokio::test]
#[ignore = "needs bubblewrap; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn an_action_in_a_warm_sandbox_finds_nothing_of_the_one_before() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("warm sandboxes are for root workers; run this test as root (CI does)");
    }
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let runner = sandboxed(&cas).await;
    // Which sandbox: its mount namespace, and when its init started (namespace numbers
    // are reused once freed).
    let namespace = "echo $(readlink /proc/self/ns/mnt) $(cut -d' ' -f22 /proc/1/stat)";
    let (code, first) = run(
        &cas,
        &runner,
        &ActionSpec::shell(&format!(
            "setsid sleep 300 </dev/null >/dev/null 2>&1 & \
             echo left > /tmp/leftover; {namespace}"
        )),
    )
    .await;
    assert_eq!(code, 0, "{first}");
    let probe = format!(
        "{namespace}; test -e /tmp/leftover && echo tmp-left; \
         grep -l '^sleep$' /proc/[0-9]*/comm 2>/dev/null | grep -q . && echo process-left; \
         ipcs -m | grep -c '^0x'; true"
    );
    let (code, second) = run(&cas, &runner, &ActionSpec::shell(&probe)).await;
    assert_eq!(code, 0, "{second}");
    let second: Vec<&str> = second.lines().collect();
    assert_eq!(
        second[0],
        first.trim(),
        "the second action had another sandbox"
    );
    assert!(!second.contains(&"tmp-left"), "{second:?}");
    assert!(!second.contains(&"process-left"), "{second:?}");

    // An IPC object outlives its creator: that sandbox is not used again.
    let (code, with_ipc) = run(
        &cas,
        &runner,
        &ActionSpec::shell(&format!("ipcmk -M 4096 >/dev/null; {namespace}")),
    )
    .await;
    assert_eq!(code, 0, "{with_ipc}");
    let (_, after) = run(&cas, &runner, &ActionSpec::shell(&probe)).await;
    let after: Vec<&str> = after.lines().collect();
    assert_ne!(
        after[0],
        with_ipc.trim(),
        "the sandbox holding IPC was used again"
    );
    assert_eq!(after.last(), Some(&"0"), "{after:?}");
}
