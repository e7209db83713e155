//! Hashing a working tree, uploading only what the real coordinator is missing, and
//! downloading an ActionResult's outputs, all over real sockets.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::Bytes;
use kiln_client::output_download::download_outputs;
use kiln_client::{
    hash_tree, BlobSet, BlobSource, ClientError, DigestCache, InputTree, NoProgress,
    TreeHashOptions,
};
use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};
use prost::Message;
use support::{set_old_mtime, write_old, TestCoordinator};

fn hash(root: &Path, function: DigestFunction, cache: &mut DigestCache) -> InputTree {
    let options = TreeHashOptions {
        function,
        excluded_outputs: vec![],
    };
    hash_tree(root, &options, cache, &NoProgress).unwrap()
}

fn directory(tree: &InputTree, digest: &Digest) -> reapi::Directory {
    match tree.blobs.get(digest) {
        Some(BlobSource::Bytes(bytes)) => reapi::Directory::decode(bytes.clone()).unwrap(),
        other => panic!("{digest} is not an in-memory Directory: {other:?}"),
    }
}

fn child<'a>(directory: &'a reapi::Directory, name: &str) -> &'a reapi::DirectoryNode {
    directory
        .directories
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no directory {name} in {directory:?}"))
}

fn digest_of(node: Option<&reapi::Digest>) -> Digest {
    kiln_client::from_reapi(DigestFunction::Sha256, node, "test").unwrap()
}

#[test]
fn the_tree_respects_gitignore_and_keeps_its_shape() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_old(root, ".gitignore", b"target/\n*.log\n");
    write_old(root, "src/main.rs", b"fn main() {}\n");
    write_old(root, "src/zeta.rs", b"z");
    write_old(root, "src/alpha.rs", b"a");
    write_old(root, "run.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    write_old(root, ".hidden", b"dotfiles are inputs");
    write_old(root, "target/debug/big", b"ignored");
    write_old(root, "build.log", b"ignored");
    write_old(root, ".git/HEAD", b"ref: refs/heads/main");
    write_old(root, ".kiln/last-run.json", b"{}");
    std::fs::create_dir(root.join("empty")).unwrap();
    std::os::unix::fs::symlink("src/main.rs", root.join("main-link")).unwrap();

    let tree = hash(root, DigestFunction::Sha256, &mut DigestCache::disabled());
    let top = directory(&tree, &tree.root);
    let files: Vec<_> = top.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(files, [".gitignore", ".hidden", "run.sh"]);
    assert!(
        top.files
            .iter()
            .find(|f| f.name == "run.sh")
            .unwrap()
            .is_executable
    );
    assert!(
        !top.files
            .iter()
            .find(|f| f.name == ".hidden")
            .unwrap()
            .is_executable
    );
    let dirs: Vec<_> = top.directories.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        dirs,
        ["empty", "src"],
        "target/, .git/ and .kiln/ are not inputs"
    );
    assert_eq!(top.symlinks.len(), 1);
    assert_eq!(top.symlinks[0].name, "main-link");
    assert_eq!(top.symlinks[0].target, "src/main.rs");

    let empty = directory(&tree, &digest_of(child(&top, "empty").digest.as_ref()));
    assert_eq!(empty, reapi::Directory::default());
    let src = directory(&tree, &digest_of(child(&top, "src").digest.as_ref()));
    let names: Vec<_> = src.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["alpha.rs", "main.rs", "zeta.rs"], "sorted by name");

    // The encoding is REAPI's: rebuild src/ by hand and compare digests.
    let file = |name: &str, content: &[u8]| reapi::FileNode {
        name: name.into(),
        digest: Some((Digest::of_bytes(DigestFunction::Sha256, content)).to_reapi()),
        is_executable: false,
        node_properties: None,
    };
    let expected_src = reapi::Directory {
        files: vec![
            file("alpha.rs", b"a"),
            file("main.rs", b"fn main() {}\n"),
            file("zeta.rs", b"z"),
        ],
        ..Default::default()
    };
    assert_eq!(
        digest_of(child(&top, "src").digest.as_ref()),
        Digest::of_bytes(DigestFunction::Sha256, &expected_src.encode_to_vec())
    );
    assert_eq!(tree.stats.files, 6);
    assert_eq!(tree.stats.symlinks, 1);
}

#[test]
fn the_digest_cache_rehashes_only_changed_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..5 {
        write_old(
            root,
            &format!("f{i}.txt"),
            format!("content {i}").as_bytes(),
        );
    }
    let cache_path = root.join(".kiln/digest-cache");
    let run = || {
        let mut cache = DigestCache::load(&cache_path);
        let tree = hash(root, DigestFunction::Blake3, &mut cache);
        cache.save().unwrap();
        tree
    };

    let first = run();
    assert_eq!((first.stats.hashed_files, first.stats.cached_files), (5, 0));
    let second = run();
    assert_eq!(
        (second.stats.hashed_files, second.stats.cached_files),
        (0, 5)
    );
    assert_eq!(second.root, first.root);

    // Reading a file (a new access time) does not count as a change.
    let an_hour_later = std::time::SystemTime::now();
    std::fs::File::options()
        .write(true)
        .open(root.join("f0.txt"))
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_accessed(an_hour_later))
        .unwrap();
    let third = run();
    assert_eq!((third.stats.hashed_files, third.stats.cached_files), (0, 5));

    // A new mtime is re-hashed (the stamp changed) and gives the same digest.
    std::fs::write(root.join("f1.txt"), b"content 1").unwrap();
    set_old_mtime(&root.join("f1.txt"));
    let touched = run();
    assert_eq!(
        (touched.stats.hashed_files, touched.stats.cached_files),
        (1, 4)
    );
    assert_eq!(touched.root, first.root);

    // Changed content is re-hashed and changes the root.
    write_old(root, "f2.txt", b"changed!!");
    let changed = run();
    assert_eq!(
        (changed.stats.hashed_files, changed.stats.cached_files),
        (1, 4)
    );
    assert_ne!(changed.root, first.root);

    // A different digest function never reuses the other's digests.
    let mut cache = DigestCache::load(&cache_path);
    let sha = hash(root, DigestFunction::Sha256, &mut cache);
    assert_eq!(sha.stats.hashed_files, 5);
}

async fn upload_only_missing(function: DigestFunction) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let coordinator = TestCoordinator::start().await?;
    let cas = coordinator.connect(function).await?;
    // Larger than the batch limit (4 MiB), so it must go through ByteStream.
    let large: Vec<u8> = (0..6u32 << 20).map(|i| (i % 251) as u8).collect();
    write_old(work.path(), "assets/large.bin", &large);
    for i in 0..20 {
        write_old(
            work.path(),
            &format!("src/m{i}.rs"),
            format!("mod m{i};").as_bytes(),
        );
    }
    write_old(work.path(), "src/empty.rs", b"");
    let tree = hash(work.path(), function, &mut DigestCache::disabled());

    let first = cas.upload_missing(&tree.blobs, &NoProgress).await?;
    assert_eq!(first.checked, tree.blobs.len() as u64);
    // Everything but the empty blob, which every server holds implicitly.
    assert_eq!(first.uploaded_blobs, tree.blobs.len() as u64 - 1);
    assert_eq!(
        first.uploaded_blobs - first.batched_blobs,
        1,
        "one blob by ByteStream"
    );
    for digest in tree.blobs.digests() {
        assert!(
            coordinator.has(digest).await? || digest.is_empty_blob(),
            "{digest} not stored"
        );
    }
    let large_digest = Digest::of_bytes(function, &large);
    assert_eq!(&cas.read_blob(&large_digest).await?[..], &large[..]);

    let second = cas.upload_missing(&tree.blobs, &NoProgress).await?;
    assert_eq!(second.uploaded_blobs, 0, "a second upload sends nothing");
    assert!(cas
        .find_missing(tree.blobs.digests().copied())
        .await?
        .is_empty());

    // One changed file: exactly it and the directories above it are sent.
    write_old(work.path(), "src/m3.rs", b"mod changed;");
    let changed = hash(work.path(), function, &mut DigestCache::disabled());
    let third = cas.upload_missing(&changed.blobs, &NoProgress).await?;
    assert_eq!(third.uploaded_blobs, 3, "the file, src/ and the root");
    coordinator.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_send_only_missing_blobs_sha256() -> anyhow::Result<()> {
    upload_only_missing(DigestFunction::Sha256).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_send_only_missing_blobs_blake3() -> anyhow::Result<()> {
    upload_only_missing(DigestFunction::Blake3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_after_hashing_is_reported() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let coordinator = TestCoordinator::start().await?;
    let cas = coordinator.connect(DigestFunction::Sha256).await?;
    write_old(work.path(), "a.txt", b"before");
    let tree = hash(
        work.path(),
        DigestFunction::Sha256,
        &mut DigestCache::disabled(),
    );
    std::fs::write(work.path().join("a.txt"), b"after!")?;
    let err = cas
        .upload_missing(&tree.blobs, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InputChanged { .. }), "{err}");
    assert!(err.to_string().contains("a.txt"), "{err}");
    coordinator.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_result_outputs_are_downloaded() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let coordinator = TestCoordinator::start().await?;
    let function = DigestFunction::Sha256;
    let cas = coordinator.connect(function).await?;

    let mut blobs = BlobSet::new();
    let tool = blobs.add_bytes(function, Bytes::from_static(b"#!/bin/sh\n"));
    let large: Vec<u8> = (0..5u32 << 20).map(|i| (i % 13) as u8).collect();
    let large_digest = blobs.add_bytes(function, Bytes::from(large.clone()));
    let leaf = blobs.add_bytes(function, Bytes::from_static(b"leaf"));
    let inner = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "leaf.txt".into(),
            digest: Some(leaf.to_reapi()),
            is_executable: false,
            node_properties: None,
        }],
        ..Default::default()
    };
    let inner_digest = Digest::of_bytes(function, &inner.encode_to_vec());
    let tree = reapi::Tree {
        root: Some(reapi::Directory {
            directories: vec![reapi::DirectoryNode {
                name: "inner".into(),
                digest: Some(inner_digest.to_reapi()),
            }],
            symlinks: vec![reapi::SymlinkNode {
                name: "to-leaf".into(),
                target: "inner/leaf.txt".into(),
                node_properties: None,
            }],
            ..Default::default()
        }),
        children: vec![inner],
    };
    let tree_digest = blobs.add_bytes(function, Bytes::from(tree.encode_to_vec()));
    cas.upload_missing(&blobs, &NoProgress).await?;

    let result = reapi::ActionResult {
        output_files: vec![
            reapi::OutputFile {
                path: "bin/tool".into(),
                digest: Some(tool.to_reapi()),
                is_executable: true,
                ..Default::default()
            },
            reapi::OutputFile {
                path: "data/large.bin".into(),
                digest: Some(large_digest.to_reapi()),
                ..Default::default()
            },
        ],
        output_directories: vec![reapi::OutputDirectory {
            path: "gen".into(),
            tree_digest: Some(tree_digest.to_reapi()),
            ..Default::default()
        }],
        output_symlinks: vec![reapi::OutputSymlink {
            path: "latest".into(),
            target: "bin/tool".into(),
            node_properties: None,
        }],
        ..Default::default()
    };
    let action = Digest::of_bytes(function, b"a made-up action");
    cas.update_action_result(&action, result).await?;
    let fetched = cas
        .get_action_result(&action)
        .await?
        .expect("the result was stored");
    assert!(cas
        .get_action_result(&Digest::of_bytes(function, b"unknown"))
        .await?
        .is_none());

    // A stale output directory and a stale file from an earlier run.
    std::fs::create_dir_all(out.path().join("gen/stale"))?;
    std::fs::write(out.path().join("gen/stale/old.txt"), b"old")?;
    std::fs::write(out.path().join("bin"), b"a file where a directory belongs")?;

    let base = out.path().to_path_buf();
    let written = download_outputs(&cas, &fetched, &|_| base.clone()).await?;
    assert_eq!(written.len(), 4);
    let tool_path = out.path().join("bin/tool");
    assert_eq!(std::fs::read(&tool_path)?, b"#!/bin/sh\n");
    assert_eq!(
        std::fs::metadata(&tool_path)?.permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(std::fs::read(out.path().join("data/large.bin"))?, large);
    assert_eq!(
        std::fs::read(out.path().join("gen/inner/leaf.txt"))?,
        b"leaf"
    );
    assert_eq!(
        std::fs::read_link(out.path().join("gen/to-leaf"))?,
        Path::new("inner/leaf.txt")
    );
    assert_eq!(std::fs::read(out.path().join("gen/to-leaf"))?, b"leaf");
    assert!(
        !out.path().join("gen/stale").exists(),
        "the directory holds exactly the tree"
    );
    assert_eq!(
        std::fs::read_link(out.path().join("latest"))?,
        Path::new("bin/tool")
    );
    let leftovers: Vec<_> = std::fs::read_dir(out.path())?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with(".kiln"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );

    // A result that tries to escape is refused, and nothing lands outside.
    let evil = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "../escaped".into(),
            digest: Some(tool.to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let inner_base = out.path().join("inside");
    let err = download_outputs(&cas, &evil, &|_| inner_base.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::UnsafeOutputPath { .. }), "{err}");
    assert!(!out.path().join("escaped").exists());
    coordinator.stop().await
}

/// The calls the workers make: uploads from an open file with no path (a captured log),
/// batched reads that report absent blobs as `None`, streamed reads that report them as
/// not found, and the same connection rebound to another instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_file_uploads_and_batched_reads_serve_the_worker() -> anyhow::Result<()> {
    let coordinator = TestCoordinator::start().await?;
    let cas = coordinator
        .connect(DigestFunction::Sha256)
        .await?
        .for_instance("other", DigestFunction::Blake3)?;
    assert_eq!(cas.instance_name(), "other");
    let function = cas.digest_function();

    let mut log = tempfile::tempfile()?;
    let large: Vec<u8> = (0..5u32 << 20).map(|i| (i % 241) as u8).collect();
    std::io::Write::write_all(&mut log, &large)?;
    // The file's own offset is at its end; the upload must read from the start anyway.
    let large_digest = Digest::of_bytes(function, &large);
    let mut blobs = BlobSet::new();
    blobs.insert(large_digest, BlobSource::Open(std::sync::Arc::new(log)));
    let small = blobs.add_bytes(function, Bytes::from_static(b"small"));
    let stats = cas.upload_missing(&blobs, &NoProgress).await?;
    assert_eq!((stats.uploaded_blobs, stats.batched_blobs), (2, 1));

    let absent = Digest::of_bytes(function, b"never uploaded");
    let absent_large = Digest::of_bytes(function, &vec![7u8; 5 << 20]);
    let plan = cas.plan_reads(vec![small, absent, large_digest, absent_large]);
    assert_eq!(plan.batches.concat().len(), 2, "{plan:?}");
    assert_eq!(plan.streamed.len(), 2, "{plan:?}");
    let mut read = cas.read_blobs(&plan.batches.concat()).await?;
    read.sort_by_key(|(digest, _)| *digest == absent);
    assert_eq!(read[0], (small, Some(Bytes::from_static(b"small"))));
    assert_eq!(read[1], (absent, None));

    let out = tempfile::tempdir()?;
    cas.read_blob_to_file(&large_digest, &out.path().join("large"))
        .await?;
    assert_eq!(std::fs::read(out.path().join("large"))?, large);
    let err = cas
        .read_blob_to_file(&absent_large, &out.path().join("absent"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");

    // Stored under the other instance's digest function only.
    let sha = cas.for_instance("other", DigestFunction::Sha256)?;
    assert_eq!(
        sha.find_missing([Digest::of_bytes(DigestFunction::Sha256, b"small")])
            .await?
            .len(),
        1
    );
    coordinator.stop().await
}
