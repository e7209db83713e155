//! `kiln status` (the farm at a glance, from the coordinator's admin API) and
//! `kiln drain` (retire one worker).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use indicatif::{HumanBytes, HumanDuration};
use kiln_proto::admin::v1::{
    admin_client::AdminClient, DrainWorkerRequest, FarmStatus, GetStatusRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::client_args::CoordinatorArg;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: CoordinatorArg,
    /// Print the status as JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub target: CoordinatorArg,
    /// The worker to drain, as `kiln status` lists it.
    #[arg(value_name = "WORKER_ID")]
    pub worker_id: String,
}

pub async fn connect(target: &CoordinatorArg) -> anyhow::Result<AdminClient<Channel>> {
    let channel = kiln_client::endpoint_with_tls(&target.coordinator, &target.tls.load()?)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", target.coordinator))?;
    Ok(AdminClient::new(channel))
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.target).await?;
    let status = client
        .get_status(args.target.request(GetStatusRequest {})?)
        .await
        .with_context(|| format!("asking {} for its status", args.target.coordinator))?
        .into_inner();
    let report = StatusReport::from_proto(&status, SystemTime::now());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table(&args.target.coordinator));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn drain(args: DrainArgs, join_token: Option<&str>) -> anyhow::Result<ExitCode> {
    let token = join_token
        .context("draining a worker needs the pool's join token: --join-token, KILN_JOIN_TOKEN, or the data directory of `kiln up`")?;
    let mut client = connect(&args.target).await?;
    let mut request = tonic::Request::new(DrainWorkerRequest {
        worker_id: args.worker_id.clone(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the join token cannot travel in a gRPC header")?,
    );
    let response = client
        .drain_worker(request)
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))
        .with_context(|| format!("draining {}", args.worker_id))?
        .into_inner();
    println!(
        "{} is draining: it takes no new work and leaves after its {} running action(s)",
        args.worker_id, response.running
    );
    Ok(ExitCode::SUCCESS)
}

/// The status as `--json` prints it: plain numbers and RFC 3339 times, no protobuf.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub version: String,
    pub uptime_secs: u64,
    pub workers: Vec<WorkerReport>,
    pub queue: QueueReport,
    pub cache: CacheReport,
    pub storage: StorageReport,
    /// Absent when no registry runs in the coordinator's process. The first repositories
    /// in name order; `more_repositories` says whether others exist.
    pub registry: Option<Vec<RepositoryReport>>,
    pub more_repositories: bool,
}

#[derive(Debug, Serialize)]
pub struct WorkerReport {
    pub id: String,
    pub platform: Vec<(String, String)>,
    pub slots: u32,
    pub running: u32,
    pub draining: bool,
    pub version: String,
    pub cache_bytes: u64,
    /// Seconds since the worker's last heartbeat.
    pub last_heartbeat_secs_ago: f64,
    pub connected_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct QueueReport {
    pub queued: u64,
    pub running: u64,
    pub by_platform: Vec<(String, u64)>,
}

#[derive(Debug, Serialize)]
pub struct CacheReport {
    pub action_cache_hits: u64,
    pub action_cache_misses: u64,
    /// hits / (hits + misses), absent before the first lookup.
    pub hit_ratio: Option<f64>,
    pub actions_succeeded: u64,
    pub actions_failed: u64,
}

#[derive(Debug, Serialize)]
pub struct StorageReport {
    pub stored_bytes: u64,
    pub cas_bytes_read: u64,
    pub cas_bytes_written: u64,
}

#[derive(Debug, Serialize)]
pub struct RepositoryReport {
    pub name: String,
    pub tags: u64,
    pub manifests: u64,
}

fn system_time(t: &kiln_proto::protobuf::Timestamp) -> SystemTime {
    let since_epoch =
        Duration::from_secs(t.seconds.max(0) as u64) + Duration::from_nanos(t.nanos.max(0) as u64);
    SystemTime::UNIX_EPOCH + since_epoch
}

impl StatusReport {
    pub fn from_proto(status: &FarmStatus, now: SystemTime) -> Self {
        let cache = status.cache.unwrap_or_default();
        let lookups = cache.action_cache_hits + cache.action_cache_misses;
        let queue = status.queue.clone().unwrap_or_default();
        let storage = status.storage.unwrap_or_default();
        StatusReport {
            version: status.version.clone(),
            uptime_secs: status
                .uptime
                .as_ref()
                .map_or(0, |d| d.seconds.max(0) as u64),
            workers: status
                .workers
                .iter()
                .map(|w| WorkerReport {
                    id: w.id.clone(),
                    platform: w
                        .platform
                        .iter()
                        .flat_map(|p| &p.properties)
                        .map(|p| (p.name.clone(), p.value.clone()))
                        .collect(),
                    slots: w.slots,
                    running: w.running,
                    draining: w.draining,
                    version: w.version.clone(),
                    cache_bytes: w.cache_bytes,
                    last_heartbeat_secs_ago: w.last_heartbeat.as_ref().map_or(0.0, |t| {
                        now.duration_since(system_time(t))
                            .unwrap_or_default()
                            .as_secs_f64()
                    }),
                    connected_at: w
                        .connected_at
                        .as_ref()
                        .map(|t| humantime::format_rfc3339_seconds(system_time(t)).to_string()),
                })
                .collect(),
            queue: QueueReport {
                queued: queue.queued,
                running: queue.running,
                by_platform: queue
                    .platforms
                    .iter()
                    .map(|p| (p.platform.clone(), p.queued))
                    .collect(),
            },
            cache: CacheReport {
                action_cache_hits: cache.action_cache_hits,
                action_cache_misses: cache.action_cache_misses,
                hit_ratio: (lookups > 0).then(|| cache.action_cache_hits as f64 / lookups as f64),
                actions_succeeded: cache.actions_succeeded,
                actions_failed: cache.actions_failed,
            },
            storage: StorageReport {
                stored_bytes: storage.stored_bytes,
                cas_bytes_read: storage.cas_bytes_read,
                cas_bytes_written: storage.cas_bytes_written,
            },
            registry: status.registry.as_ref().map(|r| {
                r.repositories
                    .iter()
                    .map(|repo| RepositoryReport {
                        name: repo.name.clone(),
                        tags: repo.tags,
                        manifests: repo.manifests,
                    })
                    .collect()
            }),
            more_repositories: status.registry.as_ref().is_some_and(|r| r.more),
        }
    }

    /// The human-readable form: a header line, then one section per concern.
    pub fn table(&self, coordinator: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "kiln {} at {coordinator}, up {}",
            self.version,
            HumanDuration(Duration::from_secs(self.uptime_secs))
        );

        let slots: u32 = self.workers.iter().map(|w| w.slots).sum();
        let running: u32 = self.workers.iter().map(|w| w.running).sum();
        let _ = writeln!(
            out,
            "\nWorkers: {} connected, {slots} slots, {running} busy",
            self.workers.len()
        );
        if !self.workers.is_empty() {
            let rows = self.workers.iter().map(|w| {
                let platform = if w.platform.is_empty() {
                    "(any)".to_string()
                } else {
                    w.platform
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                vec![
                    w.id.clone(),
                    platform,
                    w.slots.to_string(),
                    w.running.to_string(),
                    if w.draining { "draining" } else { "ready" }.to_string(),
                    format!("{:.1}s ago", w.last_heartbeat_secs_ago),
                    HumanBytes(w.cache_bytes).to_string(),
                ]
            });
            write_table(
                &mut out,
                &[
                    "ID",
                    "PLATFORM",
                    "SLOTS",
                    "RUNNING",
                    "STATE",
                    "HEARTBEAT",
                    "CACHE",
                ],
                rows,
            );
        }

        let _ = writeln!(
            out,
            "\nQueue: {} queued, {} running",
            self.queue.queued, self.queue.running
        );
        if !self.queue.by_platform.is_empty() {
            let rows = self
                .queue
                .by_platform
                .iter()
                .map(|(platform, queued)| vec![platform.clone(), queued.to_string()]);
            write_table(&mut out, &["PLATFORM", "QUEUED"], rows);
        }

        let c = &self.cache;
        let ratio = c
            .hit_ratio
            .map_or("n/a".to_string(), |r| format!("{:.1}%", r * 100.0));
        let _ = writeln!(
            out,
            "\nAction cache: hit ratio {ratio} ({} hits, {} misses); actions run: {} succeeded, {} failed",
            c.action_cache_hits, c.action_cache_misses, c.actions_succeeded, c.actions_failed
        );
        let s = &self.storage;
        let _ = writeln!(
            out,
            "Storage: {} stored; CAS read {}, written {} since start",
            HumanBytes(s.stored_bytes),
            HumanBytes(s.cas_bytes_read),
            HumanBytes(s.cas_bytes_written)
        );

        match &self.registry {
            None => {
                let _ = writeln!(out, "\nRegistry: not in this process");
            }
            Some(repositories) => {
                let more = if self.more_repositories {
                    " listed (the first, in name order; there are more)"
                } else {
                    ""
                };
                let _ = writeln!(out, "\nRegistry: {} repositories{more}", repositories.len());
                if !repositories.is_empty() {
                    let rows = repositories
                        .iter()
                        .map(|r| vec![r.name.clone(), r.tags.to_string(), r.manifests.to_string()]);
                    write_table(&mut out, &["REPOSITORY", "TAGS", "MANIFESTS"], rows);
                }
            }
        }
        out
    }
}

/// Left-aligned columns, two spaces apart, indented under their section line.
fn write_table(out: &mut String, header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![0; header.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::from(" ");
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, " {cell:<width$} ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::admin::v1::{CacheStatus, WorkerStatus};

    #[test]
    fn the_table_lists_each_worker_and_the_hit_ratio() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let status = FarmStatus {
            version: "0.1.0".into(),
            workers: vec![WorkerStatus {
                id: "builder-a".into(),
                slots: 4,
                running: 1,
                last_heartbeat: Some(kiln_proto::protobuf::Timestamp {
                    seconds: 998,
                    nanos: 0,
                }),
                ..Default::default()
            }],
            cache: Some(CacheStatus {
                action_cache_hits: 3,
                action_cache_misses: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let report = StatusReport::from_proto(&status, now);
        assert_eq!(report.cache.hit_ratio, Some(0.75));
        assert_eq!(report.workers[0].last_heartbeat_secs_ago, 2.0);
        let table = report.table("grpc://farm:8980");
        assert!(
            table.contains("Workers: 1 connected, 4 slots, 1 busy"),
            "{table}"
        );
        let row = table
            .lines()
            .find(|l| l.contains("builder-a"))
            .expect("a row for the worker");
        for cell in ["(any)", "4", "1", "ready", "2.0s ago"] {
            assert!(row.contains(cell), "{cell:?} missing from {row:?}");
        }
        assert!(table.contains("hit ratio 75.0%"), "{table}");
        assert!(table.contains("Registry: not in this process"), "{table}");
    }
}
