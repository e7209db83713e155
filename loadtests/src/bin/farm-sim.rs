//! A farm at scale, simulated on one machine, for docs/SCALING.md:
//!
//! - **The leader's scheduler**: kiln's scheduler state machine (the one the leader runs)
//!   driven by 1,000 simulated workers of 10 slots and a stream of actions that keeps all
//!   10,000 slots busy, on a virtual clock. Workers heartbeat once a second; actions take
//!   0.5–3.5 s (2 s on average), so about 5,000 actions start and finish per virtual
//!   second. Every scheduler call is timed in real CPU time: what one action costs the
//!   leader's core, and how many actions a second one core can schedule.
//! - **The metadata store**: the writes the farm makes per action (the new operation's
//!   record, fenced, then flushed; the finished record; the action-cache entry), on a
//!   throwaway PostgreSQL through kiln's own `PostgresMetadataStore`, 16 at a time as the
//!   pool allows: what one action costs PostgreSQL, and how many a second it sustains
//!   here.
//!
//! `cargo run --release -p kiln-loadtests --bin farm-sim` (PostgreSQL from Debian's
//! `postgresql` package; `--no-postgres` skips that half).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_coordinator::simulation::{Platform, QueuedAction, Scheduler, SchedulerConfig};
use kiln_store::{Keyspace, MetadataStore, WriteBatch};

#[derive(Parser)]
struct Args {
    /// Simulated workers.
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 10)]
    slots: usize,
    /// Virtual seconds to simulate.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Actions per metadata measurement.
    #[arg(long, default_value_t = 4000)]
    metadata_actions: usize,
    /// Skip the PostgreSQL half.
    #[arg(long)]
    no_postgres: bool,
}

/// Virtual time advances in steps of this much.
const STEP: Duration = Duration::from_millis(10);

/// A small deterministic generator: the same run every time.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() % 1_000_000) as f64 / 1_000_000.0
    }
}

#[derive(Default)]
struct Costs {
    enqueue: Duration,
    schedule: Duration,
    complete: Duration,
    heartbeat: Duration,
    expire: Duration,
}

fn simulate(args: &Args) -> anyhow::Result<()> {
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    let start = Instant::now();
    let platform = Platform::new([("OSFamily", "Linux")]);
    let mut workers = Vec::new();
    for w in 0..args.workers {
        let id = format!("worker-{w:04}");
        scheduler.add_worker(id.clone(), platform.clone(), args.slots, start);
        workers.push(id);
    }
    let capacity = args.workers * args.slots;
    // Arrivals a little above what the slots finish (2 s mean), so the queue never runs
    // dry and every slot stays busy.
    let per_second = capacity as f64 / 2.0 * 1.05;
    let mut random = Lcg(42);
    let mut finishing: BinaryHeap<Reverse<(Duration, String, String)>> = BinaryHeap::new();
    let mut costs = Costs::default();
    let (mut arrived, mut assigned, mut completed, mut arrivals_due) = (0u64, 0u64, 0u64, 0.0f64);
    let mut virtual_now = Duration::ZERO;
    let end = Duration::from_secs(args.seconds);
    let mut heartbeat_cursor = 0usize;
    let wall = Instant::now();
    while virtual_now < end {
        virtual_now += STEP;
        let now = start + virtual_now;
        // New actions: distinct input roots, so rendezvous hashing spreads them.
        arrivals_due += per_second * STEP.as_secs_f64();
        let began = Instant::now();
        while arrivals_due >= 1.0 {
            arrivals_due -= 1.0;
            arrived += 1;
            let mut affinity = [0u8; 32];
            affinity[..8].copy_from_slice(&random.next().to_le_bytes());
            scheduler.enqueue(QueuedAction {
                operation: format!("op-{arrived}"),
                priority: 0,
                invocation: format!("build-{}", arrived % 50),
                platform: platform.clone(),
                affinity,
                attempts: 0,
            });
        }
        costs.enqueue += began.elapsed();
        // Results of the actions that finish by now.
        let began = Instant::now();
        while finishing
            .peek()
            .is_some_and(|Reverse((at, ..))| *at <= virtual_now)
        {
            let Reverse((_, lease, worker)) = finishing.pop().expect("peeked");
            scheduler.complete(&lease, &worker);
            completed += 1;
        }
        costs.complete += began.elapsed();
        // Each worker heartbeats once a virtual second, spread over the second.
        let beats = (args.workers as f64 * STEP.as_secs_f64()).ceil() as usize;
        let began = Instant::now();
        for _ in 0..beats {
            scheduler.heartbeat(&workers[heartbeat_cursor % workers.len()], now);
            heartbeat_cursor += 1;
        }
        costs.heartbeat += began.elapsed();
        let began = Instant::now();
        let assignments = scheduler.schedule();
        costs.schedule += began.elapsed();
        for assignment in assignments {
            assigned += 1;
            let runs = Duration::from_secs_f64(0.5 + 3.0 * random.unit());
            finishing.push(Reverse((
                virtual_now + runs,
                assignment.lease,
                assignment.worker,
            )));
        }
        // The dispatcher's housekeeping runs every 250 ms.
        if virtual_now.as_millis().is_multiple_of(250) {
            let began = Instant::now();
            let lost = scheduler.expire_silent_workers(now);
            costs.expire += began.elapsed();
            anyhow::ensure!(lost.is_empty(), "a heartbeating worker expired");
        }
    }
    let wall = wall.elapsed();
    let per_action = |d: Duration| d.as_secs_f64() * 1e6 / completed.max(1) as f64;
    let scheduling = costs.enqueue + costs.schedule + costs.complete;
    println!(
        "## The leader's scheduler: {} workers x {} slots, {} virtual s\n",
        args.workers, args.slots, args.seconds
    );
    println!(
        "{arrived} actions arrived, {assigned} assigned, {completed} completed ({:.0} a virtual second); {} running at the end; simulated in {:.2} s of real time\n",
        completed as f64 / args.seconds as f64,
        scheduler.running(),
        wall.as_secs_f64()
    );
    println!("| scheduler call | CPU per action | share of one core at this rate |");
    println!("|---|---|---|");
    let rate = completed as f64 / args.seconds as f64;
    for (name, cost) in [
        ("enqueue", costs.enqueue),
        ("schedule (placement)", costs.schedule),
        ("complete", costs.complete),
        ("heartbeats (1/s per worker)", costs.heartbeat),
        ("silent-worker expiry (4/s)", costs.expire),
    ] {
        println!(
            "| {name} | {:.2} µs | {:.1}% |",
            per_action(cost),
            per_action(cost) * rate / 1e4
        );
    }
    let all = scheduling + costs.heartbeat + costs.expire;
    println!(
        "| all | {:.2} µs | {:.1}% |\n",
        per_action(all),
        per_action(all) * rate / 1e4
    );
    println!(
        "One core schedules at most about {:.0} actions a second like this (scheduler calls only).",
        1e6 / per_action(all)
    );
    Ok(())
}

/// The farm's metadata writes per action, on a throwaway PostgreSQL.
async fn metadata_writes(args: &Args) -> anyhow::Result<()> {
    let postgres = kiln_testkit::Postgres::start()?;
    let settings = kiln_postgres::PostgresSettings::new(postgres.url());
    let store: Arc<dyn MetadataStore> =
        Arc::new(kiln_postgres::PostgresMetadataStore::connect(&settings).await?);
    const OPERATIONS: Keyspace = Keyspace("operations");
    const ACTION_CACHE: Keyspace = Keyspace("action_cache");
    const FARM: Keyspace = Keyspace("farm");
    store.insert(FARM, b"epoch", &7u64.to_be_bytes()).await?;
    // About the size of an operation record and of a small action result.
    let record = vec![b'r'; 600];
    let result = vec![b'a'; 300];
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(args.metadata_actions);
    let mut tasks = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    let mut next = 0;
    while next < args.metadata_actions || !tasks.is_empty() {
        while next < args.metadata_actions && tasks.len() < 16 {
            let (store, record, result) = (store.clone(), record.clone(), result.clone());
            let name = format!("operation-{next:08}");
            tasks.push(async move {
                let began = Instant::now();
                // Admission: the record, fenced by the epoch, then flushed.
                let mut batch = WriteBatch::new();
                batch.expect(FARM, b"epoch".to_vec(), Some(7u64.to_be_bytes().to_vec()));
                batch.put(OPERATIONS, name.as_bytes(), record.clone());
                store.apply(batch).await?;
                store.flush().await?;
                // The result: the action cache entry, then the finished record, fenced.
                store.insert(ACTION_CACHE, name.as_bytes(), &result).await?;
                let mut batch = WriteBatch::new();
                batch.expect(FARM, b"epoch".to_vec(), Some(7u64.to_be_bytes().to_vec()));
                batch.put(OPERATIONS, name.as_bytes(), record);
                store.apply(batch).await?;
                store.flush().await?;
                Ok::<_, anyhow::Error>(began.elapsed())
            });
            next += 1;
        }
        if let Some(done) = tasks.next().await {
            latencies.push(done?);
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let rate = args.metadata_actions as f64 / elapsed.as_secs_f64();
    println!("\n## The farm's metadata writes per action, on PostgreSQL (throwaway cluster, fsync off)\n");
    println!("| actions | writes per action | actions/s | p50 | p99 |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | 3 (2 fenced batches, 1 insert) | {rate:.0} | {:.2} ms | {:.2} ms |",
        args.metadata_actions,
        latencies[latencies.len() / 2].as_secs_f64() * 1e3,
        latencies[latencies.len() * 99 / 100].as_secs_f64() * 1e3
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    simulate(&args)?;
    if !args.no_postgres {
        metadata_writes(&args).await?;
    }
    Ok(())
}
