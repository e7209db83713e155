//! `--from-action` / `--from-run`: an ActionResult in kiln's coordinator becomes layer
//! content, byte for byte the tree the action produced.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln_proto::prost::Message as _;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::batch_update_blobs_request::Request as BlobUpload;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    ActionResult, BatchUpdateBlobsRequest, Digest, Directory, DirectoryNode, FileNode,
    OutputDirectory, OutputFile, OutputSymlink, SymlinkNode, Tree, UpdateActionResultRequest,
};
use kiln_publish::{
    build_layer, fetch_outputs, parse_action_digest, Compression, CoordinatorSource, PublishError,
    RunManifest,
};
use kiln_store::DigestFunction;
use support::kiln_servers;

fn digest_of(bytes: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes)),
        size_bytes: bytes.len() as i64,
    }
}

struct Stored {
    action: Digest,
    big: Vec<u8>,
}

/// Uploads the blobs and the ActionResult of one fake (but well-formed) action.
async fn store_action(address: &str) -> Stored {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let app = b"#!/bin/sh\necho from action\n".to_vec();
    let lib = b"lib\n".to_vec();
    let deep = b"deep\n".to_vec();
    // Over the batch threshold, so it comes through ByteStream.
    let big: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let child = Directory {
        files: vec![FileNode {
            name: "deep.txt".into(),
            digest: Some(digest_of(&deep)),
            is_executable: false,
            ..Default::default()
        }],
        ..Default::default()
    };
    let child_bytes = child.encode_to_vec();
    let root = Directory {
        files: vec![
            FileNode {
                name: "big.bin".into(),
                digest: Some(digest_of(&big)),
                is_executable: false,
                ..Default::default()
            },
            FileNode {
                name: "lib.txt".into(),
                digest: Some(digest_of(&lib)),
                is_executable: false,
                ..Default::default()
            },
        ],
        directories: vec![DirectoryNode {
            name: "sub".into(),
            digest: Some(digest_of(&child_bytes)),
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
    }
    .encode_to_vec();
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let uploads = [&app, &lib, &deep, &big, &tree]
        .into_iter()
        .map(|data| BlobUpload {
            digest: Some(digest_of(data)),
            data: data.clone(),
            ..Default::default()
        })
        .collect();
    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: uploads,
            digest_function: DigestFunction::Sha256.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for entry in response.responses {
        assert_eq!(entry.status.map_or(0, |s| s.code), 0);
    }
    let action = digest_of(b"a fake action");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "bin/app".into(),
            digest: Some(digest_of(&app)),
            is_executable: true,
            ..Default::default()
        }],
        output_directories: vec![OutputDirectory {
            path: "share".into(),
            tree_digest: Some(digest_of(&tree)),
            ..Default::default()
        }],
        output_symlinks: vec![OutputSymlink {
            path: "app".into(),
            target: "bin/app".into(),
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    };
    ActionCacheClient::new(channel)
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(result),
            digest_function: DigestFunction::Sha256.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap();
    Stored { action, big }
}

/// The tree the action's outputs should become.
fn expected_tree(root: &Path, big: &[u8]) {
    let write = |path: &str, data: &[u8], mode: u32| {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, data).unwrap();
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("bin/app", b"#!/bin/sh\necho from action\n", 0o755);
    write("share/lib.txt", b"lib\n", 0o644);
    write("share/big.bin", big, 0o644);
    write("share/sub/deep.txt", b"deep\n", 0o644);
    std::os::unix::fs::symlink("lib.txt", root.join("share/link")).unwrap();
    std::os::unix::fs::symlink("bin/app", root.join("app")).unwrap();
}

fn source(address: &str) -> CoordinatorSource {
    CoordinatorSource {
        address: format!("grpc://{address}"),
        instance_name: String::new(),
        digest_function: DigestFunction::Sha256,
    }
}

#[tokio::test]
async fn an_action_result_becomes_the_same_layer_as_its_tree() {
    let coordinator = kiln_servers::coordinator().await;
    let stored = store_action(&coordinator.address).await;

    let staged = fetch_outputs(
        source(&coordinator.address),
        std::slice::from_ref(&stored.action),
    )
    .await
    .unwrap();
    let mode = |p: &str| {
        std::fs::metadata(staged.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("bin/app"), 0o755);
    assert_eq!(
        std::fs::read(staged.path().join("share/big.bin")).unwrap(),
        stored.big
    );
    assert_eq!(
        std::fs::read_link(staged.path().join("share/link")).unwrap(),
        Path::new("lib.txt")
    );

    let expected = tempfile::tempdir().unwrap();
    expected_tree(expected.path(), &stored.big);
    let from_action = build_layer(staged.path(), Compression::Gzip, 0).unwrap();
    let from_disk = build_layer(expected.path(), Compression::Gzip, 0).unwrap();
    assert_eq!(from_action.digest, from_disk.digest);

    // The same action through a run manifest, as `kiln run --output` records it.
    let manifest_dir = tempfile::tempdir().unwrap();
    let manifest_path = manifest_dir.path().join("run.json");
    std::fs::write(
        &manifest_path,
        format!(
            r#"{{"digest_function":"sha256","actions":[{{"action_digest":"{}/{}"}}]}}"#,
            stored.action.hash, stored.action.size_bytes
        ),
    )
    .unwrap();
    let manifest = RunManifest::read(&manifest_path).unwrap();
    // The shape `kiln run` writes (.kiln/last-run.json) names the same action.
    let run_written = manifest_dir.path().join("last-run.json");
    let shard = format!(
        r#"{{"index":0,"action_digest":"{}/{}","action_result_digest":null,"exit_code":EXIT,"cached":false,"error":null,"outputs":[]}}"#,
        stored.action.hash, stored.action.size_bytes
    );
    let kiln_run_manifest = |exit: i32| {
        format!(
            r#"{{"version":1,"tool_invocation_id":"t","instance_name":"","digest_function":"sha256","input_root_digest":"x/1","output_dir":"/o","exit_code":{exit},"shards":[{}]}}"#,
            shard.replace("EXIT", &exit.to_string())
        )
    };
    std::fs::write(&run_written, kiln_run_manifest(0)).unwrap();
    let from_kiln_run = RunManifest::read(&run_written).unwrap();
    assert_eq!(
        from_kiln_run.actions[0].action_digest,
        manifest.actions[0].action_digest
    );
    std::fs::write(&run_written, kiln_run_manifest(3)).unwrap();
    let refused = RunManifest::read(&run_written).unwrap_err().to_string();
    assert!(refused.contains("exited with 3"), "{refused}");
    let digests: Vec<Digest> = manifest
        .actions
        .iter()
        .map(|a| parse_action_digest(&a.action_digest).unwrap())
        .collect();
    let staged_again = fetch_outputs(source(&coordinator.address), &digests)
        .await
        .unwrap();
    let from_run = build_layer(staged_again.path(), Compression::Gzip, 0).unwrap();
    assert_eq!(from_run.digest, from_disk.digest);
}

#[tokio::test]
async fn unknown_actions_and_unreachable_coordinators_are_clear_errors() {
    let coordinator = kiln_servers::coordinator().await;
    let missing = digest_of(b"never ran");
    let err = fetch_outputs(source(&coordinator.address), &[missing])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Action { reason, .. } if reason.contains("no cached result")),
        "{err}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = fetch_outputs(source(&format!("127.0.0.1:{port}")), &[digest_of(b"x")])
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Coordinator { .. }), "{err}");
}
