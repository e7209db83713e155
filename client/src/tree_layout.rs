//! Planning where an output Tree's entries go, before anything is created.
//!
//! A Tree comes from the server, which may be hostile or broken. Its directories form a
//! DAG, so a few kilobytes can name `2^depth` paths, and names are unbounded; a directory
//! naming a symlink and a file alike would have the file's download follow the link out
//! of the output directory. So the plan checks every name, refuses a name given twice in
//! one directory, and bounds the paths by count, depth and bytes before the caller touches
//! the disk.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};

use crate::reapi_digest::from_reapi;
use crate::{ClientError, Result};

/// How far a tree of Directory messages (an output Tree here, an input root on a worker)
/// may expand into paths before it is refused.
#[derive(Clone, Copy, Debug)]
pub struct TreeLimits {
    /// Files, directories and symlinks, counted as paths (a shared subtree counts each
    /// time it appears).
    pub nodes: usize,
    /// Directories below the root.
    pub depth: usize,
    /// All planned paths' bytes together.
    pub path_bytes: usize,
}

impl TreeLimits {
    /// What `kiln run` accepts: as many paths and bytes as a worker accepts in an input
    /// tree, and deeper nesting than PATH_MAX allows with short names.
    pub const OUTPUT: TreeLimits = TreeLimits {
        nodes: 1_000_000,
        depth: 512,
        path_bytes: 256 << 20,
    };
}

/// Where each entry of a Tree goes, relative to the output directory: parents before
/// children, every path a sequence of plain names, each path once.
#[derive(Debug, Default)]
pub struct TreeLayout {
    pub directories: Vec<PathBuf>,
    pub symlinks: Vec<(PathBuf, String)>,
    /// (path, digest, executable).
    pub files: Vec<(PathBuf, Digest, bool)>,
}

/// Plans `tree`, whose digests use `function`, within `limits`.
pub fn plan<'a>(
    function: DigestFunction,
    tree: &'a reapi::Tree,
    limits: TreeLimits,
) -> Result<TreeLayout> {
    let children: HashMap<Digest, &reapi::Directory> = tree
        .children
        .iter()
        .map(|child| {
            let encoded = prost::Message::encode_to_vec(child);
            (Digest::of_bytes(function, &encoded), child)
        })
        .collect();
    let root = tree
        .root
        .as_ref()
        .ok_or_else(|| invalid("an output Tree has no root".into()))?;
    let mut layout = TreeLayout::default();
    let mut path_bytes = 0usize;
    // Breadth-first, so that a Tree doubling at every level is refused once its count
    // passes the limit, not after its last level is built.
    let mut level: Vec<(PathBuf, &'a reapi::Directory)> = vec![(PathBuf::new(), root)];
    for depth in 0.. {
        if level.is_empty() {
            break;
        }
        if depth > limits.depth {
            return Err(invalid(format!(
                "an output Tree is more than {} directories deep",
                limits.depth
            )));
        }
        let mut next = Vec::new();
        for (dir_path, directory) in level {
            let mut names: HashSet<&str> = HashSet::new();
            let mut claim = |name: &'a str| -> Result<PathBuf> {
                checked_name(name)?;
                if !names.insert(name) {
                    return Err(invalid(format!(
                        "{name:?} appears twice in output directory {:?}",
                        dir_path.display()
                    )));
                }
                let path = dir_path.join(name);
                path_bytes += path.as_os_str().len();
                Ok(path)
            };
            for file in &directory.files {
                let digest = from_reapi(function, file.digest.as_ref(), "an output Tree's file")?;
                layout
                    .files
                    .push((claim(&file.name)?, digest, file.is_executable));
            }
            for symlink in &directory.symlinks {
                layout
                    .symlinks
                    .push((claim(&symlink.name)?, symlink.target.clone()));
            }
            for child in &directory.directories {
                let path = claim(&child.name)?;
                let digest = from_reapi(
                    function,
                    child.digest.as_ref(),
                    "an output Tree's directory",
                )?;
                let child_directory = children
                    .get(&digest)
                    .ok_or_else(|| invalid(format!("an output Tree lacks directory {digest}")))?;
                layout.directories.push(path.clone());
                next.push((path, *child_directory));
            }
            let nodes = layout.files.len() + layout.symlinks.len() + layout.directories.len();
            if nodes > limits.nodes {
                return Err(invalid(format!(
                    "an output Tree expands to more than {} files, directories and symlinks",
                    limits.nodes
                )));
            }
            if path_bytes > limits.path_bytes {
                return Err(invalid(format!(
                    "an output Tree's paths take more than {} bytes",
                    limits.path_bytes
                )));
            }
        }
        level = next;
    }
    Ok(layout)
}

fn invalid(message: String) -> ClientError {
    ClientError::InvalidResponse(message)
}

/// A name inside a Directory must be exactly one path component.
fn checked_name(name: &str) -> Result<&str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(ClientError::UnsafeOutputPath {
            path: name.to_string(),
            reason: "a name in an output tree must be a single path component",
        });
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FUNCTION: DigestFunction = DigestFunction::Sha256;

    fn file(name: &str) -> reapi::FileNode {
        reapi::FileNode {
            name: name.into(),
            digest: Some(Digest::of_bytes(FUNCTION, b"contents").to_reapi()),
            ..Default::default()
        }
    }

    fn directory_node(name: &str, directory: &reapi::Directory) -> reapi::DirectoryNode {
        let encoded = prost::Message::encode_to_vec(directory);
        reapi::DirectoryNode {
            name: name.into(),
            digest: Some(Digest::of_bytes(FUNCTION, &encoded).to_reapi()),
        }
    }

    #[test]
    fn a_tree_is_planned_parents_first() {
        let leaf = reapi::Directory {
            files: vec![file("b.txt")],
            ..Default::default()
        };
        let tree = reapi::Tree {
            root: Some(reapi::Directory {
                files: vec![file("a.txt")],
                directories: vec![directory_node("sub", &leaf)],
                ..Default::default()
            }),
            children: vec![leaf],
        };
        let layout = plan(FUNCTION, &tree, TreeLimits::OUTPUT).unwrap();
        assert_eq!(layout.directories, vec![PathBuf::from("sub")]);
        let files: Vec<&PathBuf> = layout.files.iter().map(|(p, _, _)| p).collect();
        assert_eq!(
            files,
            [&PathBuf::from("a.txt"), &PathBuf::from("sub/b.txt")]
        );
    }

    /// A symlink and a file of one name: the file's download would have followed the link.
    #[test]
    fn a_name_given_twice_in_a_directory_is_refused() {
        let tree = reapi::Tree {
            root: Some(reapi::Directory {
                files: vec![file("x")],
                symlinks: vec![reapi::SymlinkNode {
                    name: "x".into(),
                    target: "/tmp/elsewhere".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        };
        let refused = plan(FUNCTION, &tree, TreeLimits::OUTPUT).unwrap_err();
        assert!(refused.to_string().contains("twice"), "{refused}");
    }

    /// Each directory lists the next twice: 2^40 paths from 40 small messages.
    #[test]
    fn a_tree_doubling_at_every_level_is_refused_by_its_count() {
        let mut children = vec![reapi::Directory::default()];
        for level in 0..40 {
            let below = &children[level];
            let above = reapi::Directory {
                directories: vec![directory_node("a", below), directory_node("b", below)],
                ..Default::default()
            };
            children.push(above);
        }
        let tree = reapi::Tree {
            root: children.pop(),
            children,
        };
        let refused = plan(FUNCTION, &tree, TreeLimits::OUTPUT).unwrap_err();
        assert!(
            refused.to_string().contains("more than 1000000"),
            "{refused}"
        );
    }

    #[test]
    fn escaping_names_are_refused() {
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            let tree = reapi::Tree {
                root: Some(reapi::Directory {
                    files: vec![file(bad)],
                    ..Default::default()
                }),
                children: vec![],
            };
            assert!(
                plan(FUNCTION, &tree, TreeLimits::OUTPUT).is_err(),
                "{bad:?}"
            );
        }
    }
}
