//! `--from-action` / `--from-run`: ActionResults in kiln's coordinator become layer
//! content, byte for byte the tree the actions produced, pushed to kiln's registry.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln_client::{RemoteCas, RunManifest, ShardRecord};
use kiln_proto::prost::Message as _;
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode, Tree};
use kiln_publish::{
    build_layer, publish, Compression, CoordinatorSource, CredentialStore, LayerContent,
    Provenance, PublishError, PublishOutcome, PublishRequest, PublishedAction, RuntimeSettings,
};
use kiln_store::{ContentHash, Digest};
use support::fake_action::{cas, FakeAction, StoredAction, FUNCTION};
use support::kiln_servers::{self, Running};

const APP: &[u8] = b"#!/bin/sh\necho from action\n";

/// Over the client's batch limit, so it comes through ByteStream.
fn big_blob() -> Vec<u8> {
    (0..(5 << 20)).map(|i: u32| (i % 251) as u8).collect()
}

/// `bin/app` (executable), `app -> bin/app`, and `share/` holding `lib.txt`,
/// `big.bin`, `sub/deep.txt` and `link -> lib.txt`.
fn rich_action() -> FakeAction {
    let mut action = FakeAction::default();
    let child = Directory {
        files: vec![FileNode {
            name: "deep.txt".into(),
            digest: Some(action.blob(b"deep\n")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let root = Directory {
        files: vec![
            FileNode {
                name: "big.bin".into(),
                digest: Some(action.blob(&big_blob())),
                ..Default::default()
            },
            FileNode {
                name: "lib.txt".into(),
                digest: Some(action.blob(b"lib\n")),
                ..Default::default()
            },
        ],
        directories: vec![DirectoryNode {
            name: "sub".into(),
            digest: Some(action.blob(&child.encode_to_vec())),
        }],
        symlinks: vec![SymlinkNode {
            name: "link".into(),
            target: "lib.txt".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let tree = Tree {
        root: Some(root),
        children: vec![child],
    };
    action
        .file("bin/app", APP, true)
        .symlink("app", "bin/app")
        .directory("share", &tree)
}

/// The tree [`rich_action`]'s outputs should become.
fn write_rich_tree(root: &Path) {
    write(root, "bin/app", APP, 0o755);
    write(root, "share/lib.txt", b"lib\n", 0o644);
    write(root, "share/big.bin", &big_blob(), 0o644);
    write(root, "share/sub/deep.txt", b"deep\n", 0o644);
    std::os::unix::fs::symlink("lib.txt", root.join("share/link")).unwrap();
    std::os::unix::fs::symlink("bin/app", root.join("app")).unwrap();
}

fn write(root: &Path, path: &str, data: &[u8], mode: u32) {
    let full = root.join(path);
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    std::fs::write(&full, data).unwrap();
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The coordinator the actions' results are in and the registry images go to.
struct Servers {
    coordinator: Running,
    registry: Running,
    cas: RemoteCas,
}

impl Servers {
    async fn start() -> Self {
        let coordinator = kiln_servers::coordinator().await;
        let cas = cas(&coordinator.address).await;
        Servers {
            coordinator,
            registry: kiln_servers::registry(false).await,
            cas,
        }
    }
}

fn layer_digest_of(tree: &Path) -> ContentHash {
    build_layer(tree, Compression::Gzip, 0).unwrap().digest
}

fn source(address: &str) -> CoordinatorSource {
    CoordinatorSource {
        address: format!("grpc://{address}"),
        instance_name: String::new(),
        digest_function: FUNCTION,
        credentials: None,
        tls: Default::default(),
    }
}

async fn publish_content(
    registry: &str,
    content: LayerContent,
) -> Result<PublishOutcome, PublishError> {
    publish(PublishRequest {
        registry: registry.to_string(),
        insecure: false,
        registry_tls: Default::default(),
        repository: "app".into(),
        content,
        content_description: "from actions".into(),
        base: None,
        compression: Compression::Gzip,
        runtime: RuntimeSettings::default(),
        provenance: Provenance::default(),
        tags: vec![],
        credentials: CredentialStore::default(),
        progress: Default::default(),
    })
    .await
}

/// Publishes the outputs of the run recorded at `manifest`, read from `coordinator`.
async fn publish_run(
    registry: &str,
    coordinator: &str,
    manifest: &Path,
) -> Result<PublishOutcome, PublishError> {
    publish_content(registry, LayerContent::from_run(coordinator, manifest)?).await
}

/// The manifest `kiln run` would write for successful shards running `actions`.
fn run_manifest(dir: &Path, actions: &[(&StoredAction, bool)]) -> std::path::PathBuf {
    let manifest = RunManifest {
        version: 1,
        tool_invocation_id: "invocation".into(),
        instance_name: String::new(),
        digest_function: FUNCTION.name().into(),
        input_root_digest: Digest::of_bytes(FUNCTION, b"").reapi(),
        output_dir: dir.to_path_buf(),
        exit_code: 0,
        shards: actions
            .iter()
            .enumerate()
            .map(|(index, (stored, recorded))| ShardRecord {
                index: index as u32,
                action_digest: stored.action.reapi(),
                action_result_digest: recorded.then(|| stored.result.reapi()),
                exit_code: 0,
                cached: false,
                error: None,
                outputs: vec![],
            })
            .collect(),
    };
    let path = RunManifest::path_for(dir);
    manifest.save(&path).unwrap();
    path
}

#[tokio::test]
async fn an_action_result_becomes_the_same_layer_as_its_tree() {
    let servers = Servers::start().await;
    let stored = rich_action().store(&servers.cas, "rich", true).await;

    let expected = tempfile::tempdir().unwrap();
    write_rich_tree(expected.path());
    let content =
        LayerContent::from_action(source(&servers.coordinator.address), &stored.action.reapi())
            .unwrap();
    let outcome = publish_content(&servers.registry.address, content)
        .await
        .unwrap();
    assert_eq!(outcome.layer_digest, layer_digest_of(expected.path()));
}

#[tokio::test]
async fn a_run_merges_its_shards_outputs_and_uses_the_results_it_recorded() {
    let servers = Servers::start().await;
    let cached = rich_action().store(&servers.cas, "shard 0", true).await;
    // Run with --no-cache: the result is in the CAS only, named by the run manifest.
    let uncached = FakeAction::default()
        .file("bin/tool", b"tool\n", true)
        .file("bin/app", APP, true)
        .store(&servers.cas, "shard 1", false)
        .await;

    let expected = tempfile::tempdir().unwrap();
    write_rich_tree(expected.path());
    write(expected.path(), "bin/tool", b"tool\n", 0o755);
    let dir = tempfile::tempdir().unwrap();
    let manifest = run_manifest(dir.path(), &[(&cached, false), (&uncached, true)]);
    let address = format!("grpc://{}", servers.coordinator.address);
    let outcome = publish_run(&servers.registry.address, &address, &manifest)
        .await
        .unwrap();
    assert_eq!(outcome.layer_digest, layer_digest_of(expected.path()));

    // Without the recorded result the action cache is asked, and it has none.
    let manifest = run_manifest(dir.path(), &[(&uncached, false)]);
    let err = publish_run(&servers.registry.address, &address, &manifest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Action { action, reason }
            if *action == uncached.action.reapi() && reason.contains("no cached result")),
        "{err}"
    );
}

#[tokio::test]
async fn conflicting_shards_and_failed_runs_are_refused() {
    let servers = Servers::start().await;
    let one = FakeAction::default()
        .file("out/result.txt", b"one\n", false)
        .store(&servers.cas, "one", true)
        .await;
    let other = FakeAction::default()
        .file("out/result.txt", b"other\n", false)
        .store(&servers.cas, "other", true)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let address = format!("grpc://{}", servers.coordinator.address);

    let manifest = run_manifest(dir.path(), &[(&one, true), (&other, true)]);
    let err = publish_run(&servers.registry.address, &address, &manifest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Source { path, reason }
            if path.ends_with("out/result.txt") && reason.contains("different content")),
        "{err}"
    );

    let manifest = run_manifest(dir.path(), &[(&one, true)]);
    let mut failed = RunManifest::load(&manifest).unwrap();
    failed.exit_code = 3;
    failed.shards[0].exit_code = 3;
    failed.save(&manifest).unwrap();
    let err = LayerContent::from_run(&address, &manifest).unwrap_err();
    assert!(err.to_string().contains("exited with 3"), "{err}");

    // A result that says the action failed is refused too, whatever the manifest says.
    let mut failing = FakeAction::default().file("out/result.txt", b"partial\n", false);
    failing.result.exit_code = 1;
    let failing = failing.store(&servers.cas, "failing", false).await;
    let manifest = run_manifest(dir.path(), &[(&failing, true)]);
    let err = publish_run(&servers.registry.address, &address, &manifest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Action { reason, .. } if reason.contains("exit code 1")),
        "{err}"
    );

    let err = LayerContent::from_run(&address, &dir.path().join("missing.json")).unwrap_err();
    assert!(
        matches!(&err, PublishError::RunManifest(_)) && err.to_string().contains("missing.json"),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_actions_and_unreachable_coordinators_are_clear_errors() {
    let servers = Servers::start().await;
    let never_ran = Digest::of_bytes(FUNCTION, b"never ran").reapi();
    let content =
        LayerContent::from_action(source(&servers.coordinator.address), &never_ran).unwrap();
    let err = publish_content(&servers.registry.address, content)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Action { reason, .. } if reason.contains("no cached result")),
        "{err}"
    );

    let err = LayerContent::from_action(source(&servers.coordinator.address), "not-a-digest")
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Action { reason, .. } if reason.contains("<hex>/<size>")),
        "{err}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let content = LayerContent::ActionOutputs {
        coordinator: source(&format!("127.0.0.1:{port}")),
        actions: vec![PublishedAction {
            action: Digest::of_bytes(FUNCTION, b"x"),
            recorded_result: None,
        }],
    };
    let err = publish_content(&servers.registry.address, content)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Coordinator { address, .. } if address.ends_with(&port.to_string())),
        "{err}"
    );
}
