//! `kiln up` on SIGTERM: its local workers drain first, while the coordinator is still
//! there to take their results, then everything stops, within a bound. It once never
//! exited: the coordinator stopped under a busy worker, which then retried forever.

use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Background, Farm, KILN};

/// `kiln run ARGS` against `farm` on the input directory `input` (one file).
fn kiln_run(farm: &Farm, input: &std::path::Path, args: &[&str]) -> Command {
    std::fs::create_dir_all(input).unwrap();
    std::fs::write(input.join("input.txt"), "input\n").unwrap();
    let mut command = Command::new(KILN);
    command
        .args(["run", "--coordinator", &farm.grpc, "--input"])
        .arg(input)
        .args(args)
        .env_remove("KILN_JOIN_TOKEN")
        .env("NO_COLOR", "1");
    command
}

/// `kiln run` in the background; its result is not waited for.
fn start_run(farm: &Farm, input: &std::path::Path, args: &[&str]) -> Background {
    let command = kiln_run(farm, input, args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    Background(command.expect("kiln run starts"))
}

/// Sends SIGTERM to `kiln up` once its worker runs an action; returns how it exited and
/// how long that took, failing after `bound`.
fn terminate(farm: &mut Farm, bound: Duration) -> (ExitStatus, Duration) {
    farm.status_when(|s| s["workers"][0]["running"] == 1);
    let process = &mut farm._process.0;
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    let sent = unsafe { libc::kill(process.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "SIGTERM could not be sent");
    let start = Instant::now();
    loop {
        if let Some(status) = process.try_wait().unwrap() {
            return (status, start.elapsed());
        }
        assert!(
            start.elapsed() < bound,
            "kiln up still runs {bound:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_lets_the_running_action_finish_then_kiln_up_exits() {
    let data = tempfile::tempdir().unwrap();
    let (kiln_dir, input) = (data.path().join("kiln"), data.path().join("project"));
    let command = ["--", "sh", "-c", "sleep 3; echo finished"];
    let mut farm = Farm::start(&kiln_dir, 1);
    // The client may not get to download the action's output before kiln up is gone.
    let _client = start_run(&farm, &input, &command);
    let (status, took) = terminate(&mut farm, Duration::from_secs(15));
    assert!(status.success(), "kiln up exited with {status}");
    eprintln!("kiln up exited {took:?} after SIGTERM");

    // The coordinator was still up when the action finished: it stored the result.
    let farm = Farm::start(&kiln_dir, 0);
    let Output {
        status,
        stdout,
        stderr,
    } = kiln_run(&farm, &input, &command).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr),
    );
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "finished\n");
    assert!(stderr.contains("cache hit, exit code 0"), "{stderr}");
}

#[test]
fn past_the_drain_timeout_kiln_up_cancels_the_action_and_exits() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("kiln.toml");
    std::fs::write(&config, "[worker]\ndrain_timeout_secs = 1\n").unwrap();
    let mut farm = Farm::start_with(
        &data.path().join("kiln"),
        1,
        &["--config".as_ref(), config.as_os_str()],
    );
    let input = data.path().join("project");
    let _client = start_run(&farm, &input, &["--", "sleep", "120"]);
    let (status, took) = terminate(&mut farm, Duration::from_secs(15));
    assert!(status.success(), "kiln up exited with {status}");
    eprintln!("kiln up exited {took:?} after SIGTERM");
}
