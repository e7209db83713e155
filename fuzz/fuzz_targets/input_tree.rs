//! Input-tree planning in kiln-worker (`input_tree::plan`): any DAG of REAPI Directory
//! messages is either refused or planned into paths that all stay inside the action root,
//! each named once, parents before children.
//!
//! The walk runs with limits a thousandth of the worker's: the property does not depend
//! on them, and a small DAG that expands to the worker's million paths would otherwise
//! cost seconds per input (unit tests cover the limits themselves).
#![no_main]

use arbitrary::Arbitrary;
use kiln_fuzz::{assert_planned_tree, block_on, directory_message, node_digest, node_index, Entry};
use kiln_proto::reapi::Directory;
use kiln_worker::fuzzing::{plan_input_tree, TreeLimits};
use kiln_worker::WorkerError;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Each directory's entries; a child directory is the index of another (modulo their
    /// count), so a tree can share and repeat subtrees, and refer to itself.
    directories: Vec<Vec<Entry>>,
    /// The root's claimed size, checked against the walk's limit.
    root_size: u16,
}

const LIMITS: TreeLimits = TreeLimits {
    nodes: 1_000,
    depth: 256,
    path_bytes: 256 << 10,
};

fn message(entries: &[Entry], count: usize) -> Directory {
    directory_message(
        entries,
        |_| node_digest(usize::MAX, 3),
        |child| node_digest(child as usize % count, 10),
    )
}

fuzz_target!(|input: Input| {
    if input.directories.is_empty() {
        return;
    }
    let count = input.directories.len();
    let messages: Vec<Directory> = input
        .directories
        .iter()
        .map(|entries| message(entries, count))
        .collect();
    let fetch = |digests: Vec<kiln_store::Digest>| {
        let found = digests
            .iter()
            .map(|d| messages[node_index(d)].clone())
            .collect();
        async move { Ok::<_, WorkerError>((found, Default::default())) }
    };
    let root = node_digest(0, input.root_size as u64);
    let Ok(plan) = block_on(plan_input_tree(root, LIMITS, fetch)) else {
        return;
    };
    assert!(plan.files.len() + plan.symlinks.len() + plan.directories.len() <= LIMITS.nodes);
    let leaves = plan
        .files
        .iter()
        .map(|(p, _)| p)
        .chain(plan.symlinks.iter().map(|(p, _)| p));
    assert_planned_tree(&plan.directories, leaves);
    assert!(plan.symlinks.iter().all(|(_, target)| !target.is_empty()));
});
