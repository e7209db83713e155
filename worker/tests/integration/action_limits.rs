//! Per-action resource limits: rlimits reach the action, and a process killed for
//! passing one is told which.

use kiln_store::DigestFunction;
use kiln_worker::{ResourceLimits, SandboxMode};

use crate::common::{self, put_action, ActionSpec, TestCas, TestRunner};

#[tokio::test]
async fn rlimits_apply_to_the_action() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let limits = ResourceLimits {
        open_files: 123,
        memory_bytes: None,
        file_bytes: Some(4096),
        ..common::TEST_LIMITS
    };
    let worker = TestRunner::with(&cas, limits, SandboxMode::None, 1 << 30);
    let spec = ActionSpec::shell(
        "ulimit -n; ulimit -c; head -c 10000 /dev/zero > big 2>/dev/null; wc -c < big",
    );
    let digest = put_action(&cas, &spec).await;
    let outcome = worker.run(digest).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    let stdout = String::from_utf8(cas.get(result.stdout_digest.as_ref().unwrap()).await)?;
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    // RLIMIT_FSIZE stops the write at 4096 bytes (the shell counts in 1024-byte blocks).
    assert_eq!(lines, ["123", "0", "4096"], "{stdout}");
    Ok(())
}

/// A process past its CPU time limit gets SIGXCPU, and the action's stderr says which
/// limit it was, rather than leaving an exit code of 152 to decode.
#[tokio::test]
async fn an_action_past_its_cpu_limit_is_told_so() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let limits = ResourceLimits {
        cpu_secs: Some(1),
        ..common::TEST_LIMITS
    };
    let worker = TestRunner::with(&cas, limits, SandboxMode::None, 1 << 30);
    let spec = ActionSpec {
        timeout: Some(std::time::Duration::from_secs(30)),
        ..ActionSpec::shell("echo spinning >&2; while :; do :; done")
    };
    let outcome = worker.run(put_action(&cas, &spec).await).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    assert_eq!(result.exit_code, 128 + libc::SIGXCPU);
    let stderr = String::from_utf8(cas.get(result.stderr_digest.as_ref().unwrap()).await)?;
    assert!(stderr.starts_with("spinning\n"), "{stderr}");
    assert!(
        stderr.ends_with("kiln: the action exceeded its CPU time limit (worker.max_cpu_secs)\n"),
        "{stderr}"
    );
    Ok(())
}
