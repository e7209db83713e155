//! Compare-and-swap races between two processes on one PostgreSQL, as two kiln replicas
//! on two machines would race: each process has its own pool, its own runtime and its own
//! connections, so nothing in this process can serialise them by accident.
//!
//! The test re-runs its own binary twice as the racers (`KILN_RACER_*` set in their
//! environment), starts them at the same instant and checks what they report against
//! the database. `#[ignore]`d in the plain run, like the other PostgreSQL tests.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_postgres::{PostgresMetadataStore, PostgresSettings};
use kiln_store::{Keyspace, MetadataError, MetadataStore, WriteBatch};
use kiln_testkit::Postgres;

const SPACE: Keyspace = Keyspace("two-processes");
const TEST_NAME: &str = "two_processes_racing_never_both_win_and_lose_no_update";
/// Increments of the shared counter by each racer.
const INCREMENTS: u32 = 150;
/// Keys both racers try to create, one after each of their first increments: even ones
/// by compare-and-swap, odd ones by a batch that expects the key absent and writes a
/// second record with it (as an immutable tag's push does).
const KEYS: u32 = 100;
const COUNTER: &[u8] = b"counter";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (.ci/run installs it)"]
async fn two_processes_racing_never_both_win_and_lose_no_update() {
    if let Ok(url) = std::env::var("KILN_RACER_URL") {
        return race(url).await;
    }
    let postgres = Postgres::start().unwrap();
    // Migrated once here, so that the racers race on data, not on the schema.
    let store = PostgresMetadataStore::connect(&PostgresSettings::new(postgres.url()))
        .await
        .unwrap();
    let start_at = now_ms() + 3000;
    let racers: Vec<_> = (0..2)
        .map(|id| {
            Command::new(std::env::current_exe().unwrap())
                .args([TEST_NAME, "--exact", "--include-ignored", "--nocapture"])
                .env("KILN_RACER_URL", postgres.url())
                .env("KILN_RACER_ID", id.to_string())
                .env("KILN_RACER_START_MS", start_at.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    let reports: Vec<Report> = racers
        .into_iter()
        .map(|racer| {
            let output = racer.wait_with_output().unwrap();
            let stdout = String::from_utf8(output.stdout).unwrap();
            assert!(output.status.success(), "a racer failed: {stdout}");
            Report::parse(&stdout)
        })
        .collect();

    // Both were racing at once, or the test proves nothing.
    let (a, b) = (&reports[0], &reports[1]);
    assert!(
        a.started_ms < b.finished_ms && b.started_ms < a.finished_ms,
        "the racers did not overlap: {a:?} {b:?}"
    );
    // Every increment landed exactly once: no lost update, no double count.
    let counter = store.get(SPACE, COUNTER).await.unwrap().unwrap();
    assert_eq!(
        u64::from_be_bytes(counter.try_into().unwrap()),
        2 * INCREMENTS as u64
    );
    // Every key has exactly one creator, and holds that creator's value.
    for key in 0..KEYS {
        let winners: Vec<u32> = reports
            .iter()
            .enumerate()
            .filter(|(_, r)| r.won.contains(&key))
            .map(|(id, _)| id as u32)
            .collect();
        assert_eq!(winners.len(), 1, "key {key}: won by {winners:?}");
        let stored = store.get(SPACE, &key_name(key)).await.unwrap();
        assert_eq!(stored, Some(winners[0].to_be_bytes().to_vec()), "key {key}");
        if !key.is_multiple_of(2) {
            // The winning batch's second record landed with it; the loser's did not.
            for racer in 0..2u32 {
                let record = store.get(SPACE, &record_name(key, racer)).await.unwrap();
                assert_eq!(record.is_some(), racer == winners[0], "key {key}");
            }
        }
    }
    // Both won some: the racers really met on the keys.
    assert!(
        !a.won.is_empty() && !b.won.is_empty(),
        "one racer won every key: {a:?} {b:?}"
    );
    println!(
        "two processes: {} increments each, {} and {} compare-and-swap conflicts retried; keys won {} and {}",
        INCREMENTS,
        a.conflicts,
        b.conflicts,
        a.won.len(),
        b.won.len()
    );
}

fn key_name(key: u32) -> Vec<u8> {
    format!("key-{key}").into_bytes()
}

fn record_name(key: u32, racer: u32) -> Vec<u8> {
    format!("record-{key}-{racer}").into_bytes()
}

/// One racer: increments the counter by compare-and-swap, retrying on conflicts, and
/// tries to create a key after each of its first increments; prints what it did for the
/// parent.
async fn race(url: String) {
    let id: u32 = std::env::var("KILN_RACER_ID").unwrap().parse().unwrap();
    let start_at: u64 = std::env::var("KILN_RACER_START_MS")
        .unwrap()
        .parse()
        .unwrap();
    let store = PostgresMetadataStore::connect(&PostgresSettings::new(url))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(now_ms()))).await;
    let started_ms = now_ms();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conflicts = 0u64;
    let mut won = Vec::new();
    for round in 0..INCREMENTS {
        loop {
            assert!(Instant::now() < deadline, "racer {id} is stuck");
            let current = store.get(SPACE, COUNTER).await.unwrap();
            let value = current
                .as_deref()
                .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
            let next = (value + 1).to_be_bytes();
            match store
                .compare_and_swap(SPACE, COUNTER, current.as_deref(), Some(&next))
                .await
            {
                Ok(Ok(())) => break,
                Ok(Err(_)) | Err(MetadataError::Conflict { .. }) => conflicts += 1,
                Err(other) => panic!("racer {id}: {other}"),
            }
        }
        if round < KEYS && create(&store, round, id).await {
            won.push(round);
        }
    }
    let finished_ms = now_ms();
    let won: Vec<String> = won.iter().map(u32::to_string).collect();
    println!(
        "RACER started={started_ms} finished={finished_ms} conflicts={conflicts} won={}",
        won.join(",")
    );
}

/// Tries to create `key` as racer `id`; whether this racer did.
async fn create(store: &PostgresMetadataStore, key: u32, id: u32) -> bool {
    let value = id.to_be_bytes();
    if key.is_multiple_of(2) {
        return store
            .compare_and_swap(SPACE, &key_name(key), None, Some(&value))
            .await
            .unwrap()
            .is_ok();
    }
    let mut batch = WriteBatch::new();
    batch.expect(SPACE, key_name(key), None);
    batch.put(SPACE, key_name(key), value.to_vec());
    batch.put(SPACE, record_name(key, id), b"pushed".to_vec());
    match store.apply(batch).await {
        Ok(()) => true,
        Err(MetadataError::Conflict { .. }) => false,
        Err(other) => panic!("racer {id}: {other}"),
    }
}

/// What a racer printed.
#[derive(Debug)]
struct Report {
    started_ms: u64,
    finished_ms: u64,
    conflicts: u64,
    won: Vec<u32>,
}

impl Report {
    fn parse(stdout: &str) -> Report {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RACER "))
            .unwrap_or_else(|| panic!("no report in: {stdout}"));
        let field = |name: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name} in {line}"))
        };
        Report {
            started_ms: field("started").parse().unwrap(),
            finished_ms: field("finished").parse().unwrap(),
            conflicts: field("conflicts").parse().unwrap(),
            won: field("won")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect(),
        }
    }
}
