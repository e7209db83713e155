//! Output-Tree planning in kiln-client (`tree_layout::plan`), which `kiln run` uses to lay
//! out an output directory the server describes: any Tree is either refused or planned
//! into paths that all stay inside the output directory, each named once (so no file's
//! download can follow a symlink of the same name), parents before children, within the
//! limits.
#![no_main]

use std::collections::HashSet;

use arbitrary::Arbitrary;
use kiln_client::tree_layout::{plan, TreeLimits};
use kiln_fuzz::{assert_planned_tree, directory_dag, Entry};
use kiln_proto::reapi::Tree;
use kiln_store::DigestFunction;
use libfuzzer_sys::fuzz_target;

/// Small limits: the property does not depend on them (unit tests cover the real ones).
const LIMITS: TreeLimits = TreeLimits {
    nodes: 1_000,
    depth: 64,
    path_bytes: 256 << 10,
};

const FUNCTION: DigestFunction = DigestFunction::Sha256;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The first is the root; the others are its `children`. A child directory is
    /// another directory of the input after this one (a Tree names its children by the
    /// digest of their encoding, so only a DAG can be built), or, when the index points
    /// before it, a digest the Tree lacks.
    directories: Vec<Vec<Entry>>,
    /// Children left out of the Tree, by index: references to them dangle.
    omitted: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let count = input.directories.len();
    if count == 0 {
        return;
    }
    let (messages, _) = directory_dag(&input.directories);
    let omitted: HashSet<usize> = input.omitted.iter().map(|i| *i as usize % count).collect();
    let mut messages = messages.into_iter();
    let tree = Tree {
        root: messages.next(),
        children: messages
            .enumerate()
            .filter(|(i, _)| !omitted.contains(&(i + 1)))
            .map(|(_, m)| m)
            .collect(),
    };

    let Ok(layout) = plan(FUNCTION, &tree, LIMITS) else {
        return;
    };
    let leaves = layout
        .symlinks
        .iter()
        .map(|(p, _)| p)
        .chain(layout.files.iter().map(|(p, _, _)| p));
    let total = assert_planned_tree(&layout.directories, leaves);
    assert!(total <= LIMITS.nodes, "{total} paths planned");
    assert!(layout
        .directories
        .iter()
        .all(|d| d.components().count() <= LIMITS.depth + 1));
});
