//! A three-node Garage (every object on every node) losing a node to SIGKILL in the middle
//! of concurrent writes: every write the store acknowledged is readable afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_store::{BlobStore, Digest, DigestFunction, ExpectedDigest};
use kiln_testkit::Garage;

use crate::support::open_store;

/// Writers at once, and blobs each writes.
const WRITERS: usize = 6;
const BLOBS_PER_WRITER: usize = 12;

fn blob(writer: usize, index: usize) -> Bytes {
    // Mixed sizes: single PUTs and multipart uploads (past 8 MiB) both cross the kill.
    let len = if index % 4 == 3 {
        (9 << 20) + index
    } else {
        300_000 + index
    };
    (0..len)
        .map(|i| (i as u8) ^ (writer as u8 * 31) ^ (index as u8 * 7))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn acknowledged_writes_survive_a_node_killed_mid_write() {
    let mut garage = Garage::start_cluster(3).expect("a three-node garage starts");
    // kiln talks to node 0; node 2 dies.
    let store = Arc::new(open_store(&garage, "faults").await);
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                let mut refused = 0;
                for index in 0..BLOBS_PER_WRITER {
                    let data = blob(writer, index);
                    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
                    let mut writer = store.begin_write(DigestFunction::Sha256, None).await?;
                    let mut failed = false;
                    for piece in data.chunks(1 << 20) {
                        if writer.write(Bytes::copy_from_slice(piece)).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        refused += 1;
                        continue;
                    }
                    match writer.commit(ExpectedDigest::Exact(digest)).await {
                        Ok(stored) => acknowledged.push((stored, data)),
                        Err(_) => refused += 1,
                    }
                }
                anyhow::Ok((acknowledged, refused))
            })
        })
        .collect();
    // Kill a node once the writes are under way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    garage.kill(2).unwrap();
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for writer in writers {
        let (done, failed) = writer.await.unwrap().unwrap();
        acknowledged.extend(done);
        refused += failed;
    }
    eprintln!(
        "{} writes acknowledged, {refused} refused, in {:?}, with a node killed",
        acknowledged.len(),
        started.elapsed()
    );
    // Two of three nodes are a quorum: Garage keeps accepting writes.
    assert!(
        acknowledged.len() >= WRITERS * BLOBS_PER_WRITER / 2,
        "only {} of {} writes succeeded",
        acknowledged.len(),
        WRITERS * BLOBS_PER_WRITER
    );
    // Everything acknowledged reads back whole, before and after the node returns.
    for (digest, data) in &acknowledged {
        assert_eq!(&store.read_all(digest).await.unwrap(), data, "{digest}");
    }
    garage.restart(2).unwrap();
    let reopened = open_store(&garage, "faults").await;
    let digests: Vec<Digest> = acknowledged.iter().map(|(digest, _)| *digest).collect();
    assert!(
        reopened
            .has_many(&digests)
            .await
            .unwrap()
            .iter()
            .all(|&present| present),
        "a fresh listing finds every acknowledged blob"
    );
    for (digest, data) in &acknowledged {
        assert_eq!(&reopened.read_all(digest).await.unwrap(), data, "{digest}");
    }
}
