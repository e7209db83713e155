//! The MetadataStore contract on a real PostgreSQL, and what only a shared database can
//! show: two stores (two replicas) racing on one key. `#[ignore]`d in the plain run
//! (PostgreSQL is not part of the Rust toolchain); `.ci/run` installs it and runs them.

use std::sync::Arc;

use kiln_postgres::{PostgresMetadataStore, PostgresSettings};
use kiln_store::{Keyspace, MetadataError, MetadataStore, WriteBatch};
use kiln_testkit::Postgres;

async fn connect(postgres: &Postgres) -> PostgresMetadataStore {
    PostgresMetadataStore::connect(&PostgresSettings::new(postgres.url()))
        .await
        .expect("connects and migrates")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (.ci/run installs it)"]
async fn the_postgres_store_conforms() {
    let postgres = Postgres::start().unwrap();
    let store = connect(&postgres).await;
    kiln_store::conformance::metadata_store::all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (.ci/run installs it)"]
async fn two_replicas_racing_on_one_key_never_both_win() {
    const SPACE: Keyspace = Keyspace("race");
    let postgres = Postgres::start().unwrap();
    // Two pools, as two kiln processes would have; migrations race too.
    let (a, b) = tokio::join!(connect(&postgres), connect(&postgres));
    let stores = [Arc::new(a), Arc::new(b)];

    // Compare-and-swap from absent: of 32 racers on each key, exactly one wins.
    for round in 0..20u32 {
        let key = format!("cas-{round}");
        let racers = (0..32u32).map(|i| {
            let store = stores[i as usize % 2].clone();
            let key = key.clone();
            tokio::spawn(async move {
                store
                    .compare_and_swap(SPACE, key.as_bytes(), None, Some(&i.to_be_bytes()))
                    .await
                    .unwrap()
                    .is_ok()
            })
        });
        let wins = futures::future::join_all(racers)
            .await
            .into_iter()
            .filter(|won| *won.as_ref().unwrap())
            .count();
        assert_eq!(wins, 1, "round {round}");
    }

    // An immutable tag: batches that expect it absent and create it, from both replicas
    // at once. One succeeds; every other one is a Conflict, never a silent overwrite.
    for round in 0..10u32 {
        let tag = format!("v1.{round}.0");
        let pushes = (0..16u32).map(|i| {
            let store = stores[i as usize % 2].clone();
            let tag = tag.clone();
            tokio::spawn(async move {
                let mut batch = WriteBatch::new();
                batch.expect(SPACE, tag.as_bytes(), None);
                batch.put(SPACE, tag.as_bytes(), i.to_be_bytes());
                batch.put(
                    SPACE,
                    format!("log-{tag}-{i}").into_bytes(),
                    b"pushed".to_vec(),
                );
                store.apply(batch).await
            })
        });
        let mut won = Vec::new();
        for (i, outcome) in futures::future::join_all(pushes)
            .await
            .into_iter()
            .enumerate()
        {
            match outcome.unwrap() {
                Ok(()) => won.push(i as u32),
                Err(MetadataError::Conflict { .. }) => {}
                Err(other) => panic!("round {round}: {other}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        let stored = stores[0].get(SPACE, tag.as_bytes()).await.unwrap();
        assert_eq!(stored, Some(won[0].to_be_bytes().to_vec()));
        // The winner's other write landed with it; no loser's did.
        let logs = stores[1]
            .scan(SPACE, format!("log-{tag}-").as_bytes(), None, 100)
            .await
            .unwrap();
        assert_eq!(logs.len(), 1, "round {round}");
    }
}

/// PostgreSQL stopped at once (no checkpoint) and started again under a stream of
/// writes: while it is down, calls fail as Unavailable within the connect timeout; the
/// same store serves again afterwards, and every write it acknowledged is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (.ci/run installs it)"]
async fn a_restart_under_writes_loses_nothing_acknowledged() {
    const SPACE: Keyspace = Keyspace("restart");
    let postgres = Postgres::start().unwrap();
    let mut settings = PostgresSettings::new(postgres.url());
    settings.connect_timeout_secs = 2;
    let store = Arc::new(PostgresMetadataStore::connect(&settings).await.unwrap());
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut unavailable = 0;
            for i in 0..400u32 {
                let key = format!("key-{i:04}");
                match store.insert(SPACE, key.as_bytes(), &i.to_be_bytes()).await {
                    Ok(_) => acknowledged.push(key),
                    Err(MetadataError::Unavailable(_)) => unavailable += 1,
                    Err(other) => panic!("{key}: {other}"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            (acknowledged, unavailable)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    postgres.stop_immediately().unwrap();
    let down = store.get(SPACE, b"key-0000").await;
    assert!(
        matches!(down, Err(MetadataError::Unavailable(_))),
        "{down:?}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    postgres.restart().unwrap();
    let (acknowledged, unavailable) = writer.await.unwrap();
    assert!(unavailable > 0, "the writes never met the outage");
    assert!(
        acknowledged.len() > 100,
        "only {} writes went through",
        acknowledged.len()
    );
    for key in &acknowledged {
        assert!(
            store.get(SPACE, key.as_bytes()).await.unwrap().is_some(),
            "{key} was acknowledged and is gone"
        );
    }
}
