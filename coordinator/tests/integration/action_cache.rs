//! ActionCache Get and Update over a real socket.

use crate::common;

use std::time::{Duration, SystemTime};

use common::{assert_bad_request, blob_name, wire, TestServer};
use futures::TryStreamExt;
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    ActionResult, Directory, DirectoryNode, FileNode, GetActionResultRequest, OutputDirectory,
    OutputFile, Tree, UpdateActionResultRequest,
};
use kiln_store::{BlobStore, Digest, DigestFunction};
use tonic::Code;
use tonic_types::StatusExt;

/// Blobs of a stored action: one output file, one output directory (a Tree with a file
/// at its root and one in a subdirectory) and stdout.
struct Outputs {
    action: Digest,
    result: ActionResult,
    file: Digest,
    tree: Digest,
    tree_root_file: Digest,
    tree_child_file: Digest,
    stdout: Digest,
}

async fn store_outputs(
    server: &TestServer,
    function: DigestFunction,
    tag: &str,
) -> anyhow::Result<Outputs> {
    let file_data = format!("output file {tag}");
    let root_file_data = format!("tree root file {tag}");
    let child_file_data = format!("tree child file {tag}");
    let stdout_data = format!("stdout of {tag}");
    let blobs = server
        .upload(
            "",
            function,
            &[
                file_data.as_bytes(),
                root_file_data.as_bytes(),
                child_file_data.as_bytes(),
                stdout_data.as_bytes(),
            ],
        )
        .await?;
    let (file, tree_root_file, tree_child_file, stdout) = (blobs[0], blobs[1], blobs[2], blobs[3]);
    let child = Directory {
        files: vec![FileNode {
            name: "inner.txt".into(),
            digest: Some(wire(&tree_child_file)),
            is_executable: false,
            ..Default::default()
        }],
        ..Default::default()
    };
    let child_digest = Digest::of_bytes(function, &child.encode_to_vec());
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "top.txt".into(),
                digest: Some(wire(&tree_root_file)),
                is_executable: true,
                ..Default::default()
            }],
            directories: vec![DirectoryNode {
                name: "sub".into(),
                digest: Some(wire(&child_digest)),
            }],
            ..Default::default()
        }),
        children: vec![child],
    };
    let tree_bytes = tree.encode_to_vec();
    let tree_digest = server.upload("", function, &[&tree_bytes]).await?[0];
    let action = Digest::of_bytes(function, format!("action {tag}").as_bytes());
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out/a.txt".into(),
            digest: Some(wire(&file)),
            ..Default::default()
        }],
        output_directories: vec![OutputDirectory {
            path: "out/dir".into(),
            tree_digest: Some(wire(&tree_digest)),
            ..Default::default()
        }],
        exit_code: 0,
        stdout_digest: Some(wire(&stdout)),
        ..Default::default()
    };
    Ok(Outputs {
        action,
        result,
        file,
        tree: tree_digest,
        tree_root_file,
        tree_child_file,
        stdout,
    })
}

async fn update(
    server: &TestServer,
    instance: &str,
    action: &Digest,
    result: ActionResult,
) -> Result<ActionResult, tonic::Status> {
    Ok(server
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(wire(action)),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: action.function.reapi_value(),
        })
        .await?
        .into_inner())
}

fn get_request(instance: &str, action: &Digest) -> GetActionResultRequest {
    GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(wire(action)),
        digest_function: action.function.reapi_value(),
        ..Default::default()
    }
}

async fn get(
    server: &TestServer,
    request: GetActionResultRequest,
) -> Result<ActionResult, tonic::Status> {
    Ok(server
        .action_cache()
        .get_action_result(request)
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_round_trip_in_separate_instance_namespaces() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    for function in DigestFunction::ALL {
        let outputs = store_outputs(&server, function, "x").await?;
        let stored = update(&server, "main", &outputs.action, outputs.result.clone()).await?;
        assert_eq!(stored, outputs.result);
        assert_eq!(
            get(&server, get_request("main", &outputs.action)).await?,
            outputs.result
        );

        // Another instance has its own namespace: a miss there, then its own result.
        let err = get(&server, get_request("main/other", &outputs.action))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let different = ActionResult {
            exit_code: 7,
            ..outputs.result.clone()
        };
        update(&server, "main/other", &outputs.action, different.clone()).await?;
        assert_eq!(
            get(&server, get_request("main/other", &outputs.action)).await?,
            different
        );
        assert_eq!(
            get(&server, get_request("main", &outputs.action)).await?,
            outputs.result
        );
    }
    // An action nobody stored.
    let unknown = Digest::of_bytes(DigestFunction::Sha256, b"never run");
    let err = get(&server, get_request("", &unknown)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_blobs_are_gone_is_not_found() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let function = DigestFunction::Blake3;
    let outputs = store_outputs(&server, function, "lossy").await?;
    update(&server, "", &outputs.action, outputs.result.clone()).await?;
    let contents = |digest: &Digest| -> anyhow::Result<Vec<u8>> {
        Ok(match *digest {
            d if d == outputs.file => b"output file lossy".to_vec(),
            d if d == outputs.tree_root_file => b"tree root file lossy".to_vec(),
            d if d == outputs.tree_child_file => b"tree child file lossy".to_vec(),
            d if d == outputs.stdout => b"stdout of lossy".to_vec(),
            _ => anyhow::bail!("unknown blob"),
        })
    };

    // Losing any one referenced blob, even a file deep inside an output directory's
    // Tree, turns the hit into NOT_FOUND; putting it back restores the hit.
    for lost in [
        outputs.file,
        outputs.tree_root_file,
        outputs.tree_child_file,
        outputs.stdout,
    ] {
        assert!(server.blobs.delete(&lost.content_hash()).await?);
        let err = get(&server, get_request("", &outputs.action))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "after losing {lost}");
        server.upload("", function, &[&contents(&lost)?]).await?;
        get(&server, get_request("", &outputs.action)).await?;
    }
    // The Tree itself.
    let tree_bytes = server.read_blob(blob_name("", &outputs.tree)).await?;
    server.blobs.delete(&outputs.tree.content_hash()).await?;
    let err = get(&server, get_request("", &outputs.action))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.upload("", function, &[&tree_bytes]).await?;
    get(&server, get_request("", &outputs.action)).await?;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_refuses_results_that_reference_missing_blobs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let function = DigestFunction::Sha256;
    let outputs = store_outputs(&server, function, "incomplete").await?;
    let never_uploaded = Digest::of_bytes(function, b"never uploaded");
    let mut result = outputs.result.clone();
    result.output_files.push(OutputFile {
        path: "out/missing".into(),
        digest: Some(wire(&never_uploaded)),
        ..Default::default()
    });
    let err = update(&server, "", &outputs.action, result)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let details = err.get_error_details();
    let violations = &details
        .precondition_failure()
        .expect("PreconditionFailure")
        .violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].r#type, "MISSING");
    assert_eq!(
        violations[0].subject,
        format!("blobs/{}", never_uploaded.reapi())
    );

    // A file missing inside a Tree counts too.
    server
        .blobs
        .delete(&outputs.tree_child_file.content_hash())
        .await?;
    let err = update(&server, "", &outputs.action, outputs.result.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Nothing was stored.
    let err = get(&server, get_request("", &outputs.action))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_inlines_what_was_asked_for_within_the_budget() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = CoordinatorConfig {
        max_inline_bytes: 10_000,
        ..Default::default()
    };
    let server = TestServer::start_with(dir.path(), config).await?;
    let function = DigestFunction::Blake3;
    let mut outputs = store_outputs(&server, function, "inline").await?;
    let big = vec![b'z'; 20_000];
    let big_digest = server.upload("", function, &[&big]).await?[0];
    outputs.result.output_files.push(OutputFile {
        path: "out/big.bin".into(),
        digest: Some(wire(&big_digest)),
        ..Default::default()
    });
    update(&server, "", &outputs.action, outputs.result.clone()).await?;

    // Nothing asked for, nothing inlined.
    let plain = get(&server, get_request("", &outputs.action)).await?;
    assert!(plain.stdout_raw.is_empty());
    assert!(plain.output_files.iter().all(|f| f.contents.is_empty()));

    let inlined = get(
        &server,
        GetActionResultRequest {
            inline_stdout: true,
            inline_stderr: true,
            inline_output_files: vec!["out/a.txt".into(), "out/big.bin".into()],
            ..get_request("", &outputs.action)
        },
    )
    .await?;
    assert_eq!(inlined.stdout_raw, b"stdout of inline");
    // No stderr digest, so nothing to inline.
    assert!(inlined.stderr_raw.is_empty());
    assert_eq!(inlined.output_files[0].contents, b"output file inline");
    // Over max_inline_bytes: left as a digest only.
    assert!(inlined.output_files[1].contents.is_empty());
    assert_eq!(inlined.output_files[1].digest, Some(wire(&big_digest)));
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_refreshes_the_access_time_of_its_blobs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let outputs = store_outputs(&server, DigestFunction::Sha256, "touched").await?;
    update(&server, "", &outputs.action, outputs.result.clone()).await?;
    let accessed = |store: kiln_store::FsBlobStore, digest: Digest| async move {
        let listed: Vec<_> = store.list().try_collect().await?;
        let info = listed
            .into_iter()
            .find(|info| info.hash == digest.content_hash())
            .ok_or_else(|| anyhow::anyhow!("{digest} not listed"))?;
        anyhow::Ok(info.accessed)
    };
    // Age the blob's access time, then hit the action.
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    let path = server
        .blobs
        .blob_path(&outputs.tree_child_file.content_hash());
    std::fs::File::options()
        .write(true)
        .open(&path)?
        .set_times(std::fs::FileTimes::new().set_accessed(long_ago))?;
    assert!(
        accessed(server.blobs.clone(), outputs.tree_child_file).await?
            < SystemTime::now() - Duration::from_secs(3000)
    );
    get(&server, get_request("", &outputs.action)).await?;
    let refreshed = accessed(server.blobs.clone(), outputs.tree_child_file).await?;
    assert!(
        refreshed > SystemTime::now() - Duration::from_secs(60),
        "{refreshed:?}"
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inlined_outputs_sent_to_update_are_moved_into_the_cas() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let function = DigestFunction::Blake3;
    let action = Digest::of_bytes(function, b"inline action");
    let result = ActionResult {
        stdout_raw: b"printed".to_vec(),
        output_files: vec![OutputFile {
            path: "f".into(),
            digest: Some(wire(&Digest::of_bytes(function, b"content"))),
            contents: b"content".to_vec(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let stored = update(&server, "", &action, result).await?;
    let stdout = Digest::of_bytes(function, b"printed");
    assert_eq!(stored.stdout_digest, Some(wire(&stdout)));
    assert!(stored.stdout_raw.is_empty());
    assert!(stored.output_files[0].contents.is_empty());
    assert_eq!(server.read_blob(blob_name("", &stdout)).await?, b"printed");
    assert_eq!(get(&server, get_request("", &action)).await?, stored);

    // Inlined content that contradicts its digest is refused.
    let lying = ActionResult {
        output_files: vec![OutputFile {
            path: "f".into(),
            digest: Some(wire(&Digest::of_bytes(function, b"content"))),
            contents: b"other".to_vec(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = update(&server, "", &action, lying).await.unwrap_err();
    assert_bad_request(&err, "action_result.output_files[0].digest");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_action_cache_requests_are_invalid_arguments() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let function = DigestFunction::Sha256;
    let action = Digest::of_bytes(function, b"act");
    let file = server.upload("", function, &[b"f"]).await?[0];

    let err = get(&server, GetActionResultRequest::default())
        .await
        .unwrap_err();
    assert_bad_request(&err, "action_digest");
    let mut bad_hash = get_request("", &action);
    bad_hash.action_digest.as_mut().unwrap().hash = "XYZ".into();
    let err = get(&server, bad_hash).await.unwrap_err();
    assert_bad_request(&err, "action_digest");
    let err = get(
        &server,
        GetActionResultRequest {
            digest_function: 3,
            ..get_request("", &action)
        },
    )
    .await
    .unwrap_err();
    assert_bad_request(&err, "digest_function");

    let err = server
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(wire(&action)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_request(&err, "action_result");

    let with_file = |path: &str, digest| ActionResult {
        output_files: vec![OutputFile {
            path: path.into(),
            digest,
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = update(
        &server,
        "",
        &action,
        with_file("/abs/path", Some(wire(&file))),
    )
    .await
    .unwrap_err();
    assert_bad_request(&err, "action_result.output_files[0].path");
    let err = update(&server, "", &action, with_file("ok", None))
        .await
        .unwrap_err();
    assert_bad_request(&err, "action_result.output_files[0].digest");
    let mut short = wire(&file);
    short.hash.truncate(10);
    let err = update(&server, "", &action, with_file("ok", Some(short)))
        .await
        .unwrap_err();
    assert_bad_request(&err, "action_result.output_files[0].digest");

    // A tree digest that names something other than a Tree.
    let not_a_tree = server
        .upload("", function, &[b"\xff\xfe not protobuf"])
        .await?[0];
    let result = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "d".into(),
            tree_digest: Some(wire(&not_a_tree)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = update(&server, "", &action, result).await.unwrap_err();
    assert_bad_request(&err, "action_result.output_directories[0].tree_digest");
    server.stop().await
}

/// Past `max_action_cache_entries`, the least recently used entries go (checked at
/// start-up, before serving, and every minute): a restart with a smaller bound trims at once, keeping
/// the entry a hit used last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_bounded_least_recently_used_first() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let function = DigestFunction::Sha256;
    let config = CoordinatorConfig {
        access_refresh_interval_secs: 0,
        ..Default::default()
    };
    let server = TestServer::start_with(dir.path(), config.clone()).await?;
    let actions: Vec<Digest> = (0..5u8).map(|n| Digest::of_bytes(function, &[n])).collect();
    for (n, action) in actions.iter().enumerate() {
        let result = ActionResult {
            exit_code: n as i32,
            ..Default::default()
        };
        update(&server, "", action, result).await?;
    }
    // A hit on the oldest makes it the most recently used.
    get(&server, get_request("", &actions[0])).await?;
    server.stop().await?;

    let bounded = CoordinatorConfig {
        max_action_cache_entries: 2,
        ..config
    };
    // Trimmed before it serves.
    let server = TestServer::start_with(dir.path(), bounded).await?;
    let mut kept = Vec::new();
    for (n, action) in actions.iter().enumerate() {
        if get(&server, get_request("", action)).await.is_ok() {
            kept.push(n);
        }
    }
    assert_eq!(kept, [0, 4], "the hit entry and the newest stay");
    server.stop().await
}
