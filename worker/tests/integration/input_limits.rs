//! An input tree no worker can be made to expand without bound: too many paths (a DAG
//! that lists the same child twice at every level is 2^depth of them), too deep, or a
//! Directory message too large. Each fails the action with a clear error, quickly.

use crate::common;

use std::time::{Duration, Instant};

use common::{put_action_on, wire, ActionSpec, TestCas, TestRunner};
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode};
use kiln_store::{Digest, DigestFunction};
use kiln_worker::WorkerError;

/// A chain of `depth` directories under the root, each listing its child `fan_out` times.
async fn chain(cas: &TestCas, depth: usize, fan_out: usize) -> Digest {
    let mut child = cas.put_message(&Directory::default()).await;
    for level in 0..depth {
        let directory = Directory {
            directories: (0..fan_out)
                .map(|i| DirectoryNode {
                    name: format!("d{level}-{i}"),
                    digest: Some(wire(&child)),
                })
                .collect(),
            ..Default::default()
        };
        child = cas.put_message(&directory).await;
    }
    child
}

/// Runs `true` on the input root `root` and returns the error the action failed with.
async fn failure_on(cas: &TestCas, root: Digest) -> String {
    let runner = TestRunner::new(cas);
    let action = put_action_on(cas, &ActionSpec::shell("true"), root).await;
    let started = Instant::now();
    let outcome = runner.run(action).await;
    assert!(started.elapsed() < Duration::from_secs(60), "took too long");
    match outcome.error {
        Some(WorkerError::InvalidAction(message)) => message,
        other => panic!("expected InvalidAction, got {other:?}"),
    }
}

#[tokio::test]
async fn a_tree_of_two_to_the_thirty_paths_fails_cleanly() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let root = chain(&cas, 30, 2).await;
    let message = failure_on(&cas, root).await;
    assert!(message.contains("expands to more than"), "{message}");
}

#[tokio::test]
async fn a_tree_deeper_than_the_limit_fails_cleanly() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    let root = chain(&cas, 300, 1).await;
    let message = failure_on(&cas, root).await;
    assert!(message.contains("directories deep"), "{message}");
}

#[tokio::test]
async fn a_directory_message_over_the_limit_is_not_read() {
    let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
    // About 6 MiB of file entries; the files themselves need not exist: the size in the
    // digest refuses the Directory before anything is fetched.
    let missing = Digest::of_bytes(DigestFunction::Sha256, b"never stored");
    let directory = Directory {
        files: (0..60_000)
            .map(|i| FileNode {
                name: format!("file-{i:08}-with-a-long-enough-name-to-take-room"),
                digest: Some(wire(&missing)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let root = cas.put_message(&directory).await;
    assert!(root.size > 4 << 20, "{root}");
    let message = failure_on(&cas, root).await;
    assert!(message.contains("larger than"), "{message}");
}
