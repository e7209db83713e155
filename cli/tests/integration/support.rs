//! What the binary's integration tests share: `kiln` processes in the background on
//! loopback ports the OS picks, and small HTTP helpers for the registry and /metrics.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// A kiln server process in the background; killed (by its PID) when dropped.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address after `marker` in a log line, up to the next space.
pub fn address_after(line: &str, marker: &str) -> Option<String> {
    let start = line.find(marker)? + marker.len();
    Some(line[start..].split_whitespace().next()?.to_string())
}

/// The marker before the address each server logs.
pub const GRPC: &str = "listening on grpc://";
pub const REGISTRY: &str = "registry listening on http://";
pub const METRICS: &str = "health listening on http://";

/// Starts `kiln ARGS` and waits until it has logged an address after each of `markers`;
/// returns them in the same order.
pub fn spawn_kiln(args: &[&std::ffi::OsStr], markers: &[&str]) -> (Background, Vec<String>) {
    let mut child = Command::new(KILN)
        .args(args)
        .env("KILN_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("KILN_JOIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts");
    // A reader thread hands the log lines over, then keeps draining stderr so the
    // process never blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
    let process = Background(child);
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut found: Vec<Option<String>> = vec![None; markers.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while found.iter().any(Option::is_none) {
        let line = received
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("kiln {args:?} did not log {markers:?} within 30 s"));
        for (slot, marker) in found.iter_mut().zip(markers) {
            *slot = slot.take().or_else(|| address_after(&line, marker));
        }
    }
    (process, found.into_iter().flatten().collect())
}

/// `kiln up` on loopback ports the OS picks.
pub struct Farm {
    pub _process: Background,
    pub grpc: String,
    pub registry: String,
    pub metrics: String,
}

impl Farm {
    pub fn start(data_dir: &Path, workers: usize) -> Farm {
        Self::start_with(data_dir, workers, &[])
    }

    /// [`Farm::start`] with more arguments for `kiln up` (e.g. `--config FILE`).
    pub fn start_with(data_dir: &Path, workers: usize, extra: &[&std::ffi::OsStr]) -> Farm {
        let workers = workers.to_string();
        let args = [
            "up",
            "--grpc-addr",
            "127.0.0.1:0",
            "--registry-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--workers",
            &workers,
        ];
        let mut args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        args.extend(["--data-dir".as_ref(), data_dir.as_os_str()]);
        args.extend(extra);
        let (process, addresses) = spawn_kiln(&args, &[GRPC, REGISTRY, METRICS]);
        let [grpc, registry, metrics] = <[String; 3]>::try_from(addresses).unwrap();
        Farm {
            _process: process,
            grpc: format!("grpc://{grpc}"),
            registry,
            metrics,
        }
    }

    /// Runs a kiln subcommand against this farm and returns its output.
    pub fn kiln(&self, args: &[&str]) -> Output {
        let output = Command::new(KILN)
            .args(args)
            .env_remove("KILN_JOIN_TOKEN")
            .env("NO_COLOR", "1")
            .output()
            .expect("kiln runs");
        assert!(
            output.status.success(),
            "kiln {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    pub fn status_json(&self) -> serde_json::Value {
        let output = self.kiln(&["status", "--coordinator", &self.grpc, "--json"]);
        serde_json::from_slice(&output.stdout).expect("--json prints JSON")
    }

    /// Waits until the status satisfies `done`.
    pub fn status_when(&self, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status_json();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "status never got there: {status:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn http_get(url: &str) -> (u16, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let response = reqwest::get(url).await.expect("the request is answered");
        let status = response.status().as_u16();
        (status, response.bytes().await.unwrap().to_vec())
    })
}

pub fn sha256(content: &[u8]) -> String {
    kiln_store::Digest::of_bytes(kiln_store::DigestFunction::Sha256, content).oci()
}

/// A monolithic blob upload (`POST …/blobs/uploads/?digest=`); returns the status.
pub fn push_blob(registry: &str, repository: &str, content: &[u8]) -> u16 {
    let digest = sha256(content);
    let url = format!("http://{registry}/v2/{repository}/blobs/uploads/?digest={digest}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        reqwest::Client::new()
            .post(url)
            .body(content.to_vec())
            .send()
            .await
            .expect("the upload is answered")
            .status()
            .as_u16()
    })
}
