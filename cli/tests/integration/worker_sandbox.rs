//! `kiln worker` runs strangers' actions, so it refuses to start when it cannot sandbox
//! them, and says how to go on; `--sandbox none` starts it, unconfined, with a warning.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::KILN;

#[test]
fn a_worker_without_bubblewrap_refuses_to_start_unless_told_none() {
    let data = tempfile::tempdir().unwrap();
    let worker = |sandbox: Option<&str>| {
        let mut command = Command::new(KILN);
        command
            .args([
                "worker",
                "--coordinator",
                "grpc://127.0.0.1:9",
                "--join-token",
                "x",
            ])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--work-dir")
            .arg(data.path().join("worker"))
            // No bwrap on this PATH, whatever the machine has.
            .env("PATH", "/nonexistent")
            .env("KILN_LOG", "info")
            .env_remove("KILN_SANDBOX")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(mode) = sandbox {
            command.args(["--sandbox", mode]);
        }
        command.spawn().unwrap()
    };

    let refused = worker(None).wait_with_output().unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("--sandbox none"), "{message}");

    // Unconfined on request: it starts (and keeps trying to reach the coordinator).
    let mut unconfined = crate::support::Background(worker(Some("none")));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        unconfined.0.try_wait().unwrap().is_none(),
        "the unconfined worker exited"
    );
    drop(unconfined.0.stderr.take());
}
