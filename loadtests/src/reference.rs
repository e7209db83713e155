//! Reference figures measured in the same run as a benchmark: how fast this machine
//! hashes in memory, and how fast it moves bytes over loopback TCP.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kiln_store::{DigestFunction, Hasher};

/// Single-threaded in-memory hash speed of `function`, in MB/s, over `data`.
pub fn raw_hash_speed(function: DigestFunction, data: &[u8]) -> f64 {
    // Best of three: the figure is a ceiling, and a noisy neighbour only ever lowers it.
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let mut hasher: Hasher = function.hasher();
            hasher.update(data);
            std::hint::black_box(hasher.finalize());
            crate::mb_per_s(data.len() as u64, start.elapsed())
        })
        .fold(0.0, f64::max)
}

/// Loopback TCP throughput in MB/s, measured with `iperf3` (Debian package `iperf3`),
/// single stream for `seconds`.
pub fn loopback_tcp_iperf3(seconds: u32) -> anyhow::Result<f64> {
    Ok(loopback_tcp_iperf3_costed(seconds)?.0)
}

/// [`loopback_tcp_iperf3`], and what moving the bytes cost the sender and the receiver
/// together, in CPU milliseconds per MB (iperf3's own accounting): the floor under any
/// server and client on this machine's loopback.
pub fn loopback_tcp_iperf3_costed(seconds: u32) -> anyhow::Result<(f64, f64)> {
    let port = free_port()?;
    let mut server = KillOnDrop(
        Command::new("iperf3")
            .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running iperf3 (apt-get install iperf3)")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let output = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()
        .context("running the iperf3 client")?;
    let _ = server.0.wait();
    if !output.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report has no end.sum_received.bits_per_second")?;
    let mb_per_s = bits / 8.0 / 1e6;
    let cpu = &report["end"]["cpu_utilization_percent"];
    let busy_cores = (cpu["host_total"].as_f64().unwrap_or(f64::NAN)
        + cpu["remote_total"].as_f64().unwrap_or(f64::NAN))
        / 100.0;
    Ok((mb_per_s, busy_cores * 1e3 / mb_per_s))
}

/// How fast the disk under `dir` takes a blob the way a store must before acknowledging
/// an upload (write, then fsync), in MB/s, best of 3.
pub fn disk_write_fsync_speed(dir: &Path, data: &[u8]) -> anyhow::Result<f64> {
    use std::io::Write;
    let mut best = 0f64;
    for attempt in 0..3 {
        let path = dir.join(format!("fsync-probe-{attempt}"));
        let start = Instant::now();
        let mut file = std::fs::File::create(&path)?;
        file.write_all(data)?;
        file.sync_all()?;
        best = best.max(crate::mb_per_s(data.len() as u64, start.elapsed()));
        std::fs::remove_file(&path)?;
    }
    Ok(best)
}

/// Writes `bytes` of zeros into a new file in `dir`, then deletes it: the pages its page
/// cache took are free again, and the next writes reuse them.
pub fn write_and_delete_scratch(dir: &Path, bytes: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let path = dir.join("scratch-before-a-write");
    let zeros = vec![0u8; 1 << 20];
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..bytes.div_ceil(zeros.len()) {
        file.write_all(&zeros)?;
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
