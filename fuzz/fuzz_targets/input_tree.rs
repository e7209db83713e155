//! Input-tree planning in kiln-worker (`input_tree::plan`): any DAG of REAPI Directory
//! messages is either refused or planned into paths that all stay inside the action root,
//! each named once, parents before children.
#![no_main]

use std::collections::HashSet;
use std::path::PathBuf;

use arbitrary::Arbitrary;
use kiln_fuzz::{assert_plain_relative, block_on, node_digest, node_index};
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use kiln_worker::fuzzing::plan_input_tree;
use kiln_worker::WorkerError;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Node {
    File {
        name: String,
        executable: bool,
    },
    Symlink {
        name: String,
        target: String,
    },
    /// A child directory: the index of another node of the input (modulo their count), so
    /// a tree can share and repeat subtrees, and refer to itself.
    Directory {
        name: String,
        child: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    directories: Vec<Vec<Node>>,
    /// The root's claimed size, checked against the walk's limit.
    root_size: u16,
}

fn message(nodes: &[Node], count: usize) -> Directory {
    let mut directory = Directory::default();
    for node in nodes {
        match node {
            Node::File { name, executable } => directory.files.push(FileNode {
                name: name.clone(),
                digest: Some(node_digest(usize::MAX, 3).to_reapi()),
                is_executable: *executable,
                ..Default::default()
            }),
            Node::Symlink { name, target } => directory.symlinks.push(SymlinkNode {
                name: name.clone(),
                target: target.clone(),
                ..Default::default()
            }),
            Node::Directory { name, child } => directory.directories.push(DirectoryNode {
                name: name.clone(),
                digest: Some(node_digest(*child as usize % count, 10).to_reapi()),
            }),
        }
    }
    directory
}

fuzz_target!(|input: Input| {
    if input.directories.is_empty() {
        return;
    }
    let count = input.directories.len();
    let messages: Vec<Directory> = input
        .directories
        .iter()
        .map(|nodes| message(nodes, count))
        .collect();
    let fetch = |digests: Vec<kiln_store::Digest>| {
        let found = digests
            .iter()
            .map(|d| messages[node_index(d)].clone())
            .collect();
        async move { Ok::<_, WorkerError>((found, Default::default())) }
    };
    let root = node_digest(0, input.root_size as u64);
    let Ok(plan) = block_on(plan_input_tree(root, fetch)) else {
        return;
    };
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for directory in &plan.directories {
        assert_plain_relative(directory);
        // Breadth-first: a directory's parent was planned before it.
        let parent = directory.parent().unwrap();
        assert!(parent.as_os_str().is_empty() || seen.contains(parent));
        assert!(
            seen.insert(directory.clone()),
            "{} twice",
            directory.display()
        );
    }
    let leaves = plan
        .files
        .iter()
        .map(|(p, _)| p)
        .chain(plan.symlinks.iter().map(|(p, _)| p));
    for path in leaves {
        assert_plain_relative(path);
        let parent = path.parent().unwrap();
        assert!(parent.as_os_str().is_empty() || seen.contains(parent));
        assert!(seen.insert(path.clone()), "{} twice", path.display());
    }
    assert!(plan.symlinks.iter().all(|(_, target)| !target.is_empty()));
});
