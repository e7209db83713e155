//! What one request may make the coordinator hold, over a real socket: messages read
//! into memory, action timeouts, unfinished operations per instance and in all, and the
//! directories of one GetTree walk.

use crate::common;

use common::actions::{upload_action, Spec};
use common::{assert_bad_request, wire, TestServer};
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    action_cache_client::ActionCacheClient, execution_client::ExecutionClient, Action,
    ActionResult, Directory, DirectoryNode, ExecuteRequest, GetTreeRequest, OutputDirectory,
    UpdateActionResultRequest,
};
use kiln_store::{Digest, DigestFunction};
use tonic::Code;

const F: DigestFunction = DigestFunction::Blake3;

async fn execute(
    server: &TestServer,
    instance: &str,
    action: &Digest,
) -> Result<(), tonic::Status> {
    let request = ExecuteRequest {
        instance_name: instance.into(),
        action_digest: Some(wire(action)),
        skip_cache_lookup: true,
        digest_function: action.function.reapi_value(),
        ..Default::default()
    };
    ExecutionClient::new(server.channel.clone())
        .execute(request)
        .await
        .map(|_| ())
}

/// Uploads a Command that runs `true`.
async fn true_command(server: &TestServer) -> Digest {
    let command = kiln_proto::reapi::Command {
        arguments: vec!["true".into()],
        ..Default::default()
    }
    .encode_to_vec();
    server.upload("", F, &[&command]).await.unwrap()[0]
}

/// Uploads an Action whose command and input root are `command` and an empty
/// directory, with `timeout` if given.
async fn action_with(server: &TestServer, command: Digest, timeout: Option<(i64, i32)>) -> Digest {
    action_on(server, command, timeout, &[]).await
}

/// [`action_with`], requiring the `platform` properties.
async fn action_on(
    server: &TestServer,
    command: Digest,
    timeout: Option<(i64, i32)>,
    platform: &[(&str, &str)],
) -> Digest {
    let root = Directory::default().encode_to_vec();
    let root_digest = Digest::of_bytes(F, &root);
    let action = Action {
        command_digest: Some(wire(&command)),
        input_root_digest: Some(wire(&root_digest)),
        timeout: timeout.map(|(seconds, nanos)| kiln_proto::protobuf::Duration { seconds, nanos }),
        platform: Some(kiln_proto::reapi::Platform {
            properties: platform
                .iter()
                .map(|(name, value)| kiln_proto::reapi::platform::Property {
                    name: name.to_string(),
                    value: value.to_string(),
                })
                .collect(),
        }),
        ..Default::default()
    }
    .encode_to_vec();
    server.upload("", F, &[&root, &action]).await.unwrap();
    Digest::of_bytes(F, &action)
}

/// (That nothing is read is measured in `tests/resident_memory.rs`, a process of its own,
/// since the resident set is the whole process's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_named_as_an_action_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await.unwrap();
    // Past the 4 MiB default.
    let blob = server.store_zeros(F, 5 << 20).await;
    let status = execute(&server, "", &blob).await.unwrap_err();
    assert_bad_request(&status, "action_digest");
    assert!(status.message().contains("max_message_bytes"), "{status:?}");

    // The same holds for the Command an Action names.
    let action = action_with(&server, blob, None).await;
    let status = execute(&server, "", &action).await.unwrap_err();
    assert_bad_request(&status, "action.command_digest");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_timeouts_past_the_maximum_or_negative_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        max_action_timeout_secs: 3600,
        ..CoordinatorConfig::default()
    };
    let server = TestServer::start_with(dir.path(), config).await.unwrap();
    let command = true_command(&server).await;
    for (timeout, why) in [
        ((3601, 0), "over the maximum"),
        ((-1, 0), "negative"),
        ((0, -1), "negative nanoseconds"),
        ((1, 1_000_000_000), "a whole second of nanoseconds"),
        // Once a u64 of nanoseconds overflowed here.
        ((i64::MAX, 999_999_999), "as long as protobuf allows"),
    ] {
        let action = action_with(&server, command, Some(timeout)).await;
        let status = execute(&server, "", &action).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
        assert_bad_request(&status, "action.timeout");
    }
    // At the maximum is fine: it is queued (no worker runs it here).
    let action = action_with(&server, command, Some((3600, 0))).await;
    execute(&server, "", &action).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_operations_are_bounded_per_instance_and_in_all() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        max_in_flight_per_instance: 2,
        max_in_flight: 3,
        ..CoordinatorConfig::default()
    };
    let server = TestServer::start_with(dir.path(), config).await.unwrap();
    // No worker joins: every accepted action stays queued.
    let mut actions = Vec::new();
    for i in 0..4 {
        let argv = ["echo", &i.to_string()].map(str::to_owned);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let spec = Spec {
            argv: &argv,
            ..Spec::default()
        };
        actions.push(upload_action(&server, spec).await.0);
    }
    execute(&server, "a", &actions[0]).await.unwrap();
    execute(&server, "a", &actions[1]).await.unwrap();
    // An identical action joins the one in flight: it holds nothing new.
    execute(&server, "a", &actions[1]).await.unwrap();
    let status = execute(&server, "a", &actions[2]).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_in_flight_per_instance"),
        "{status:?}"
    );
    // Another instance has room of its own, until the server as a whole is full.
    execute(&server, "b", &actions[2]).await.unwrap();
    let status = execute(&server, "c", &actions[3]).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_in_flight"), "{status:?}");
    server.stop().await.unwrap();
}

/// A chain of `depth` directories below a root, each listing its child twice: 2^depth
/// paths, `depth + 1` distinct directories. Returns the root's digest.
async fn doubling_tree(server: &TestServer, depth: usize) -> Digest {
    let mut child = Directory::default().encode_to_vec();
    let mut blobs = vec![child.clone()];
    for level in 0..depth {
        let digest = Digest::of_bytes(F, &child);
        let node = |name: &str| DirectoryNode {
            name: format!("{name}{level}"),
            digest: Some(wire(&digest)),
        };
        child = Directory {
            directories: vec![node("a"), node("b")],
            ..Default::default()
        }
        .encode_to_vec();
        blobs.push(child.clone());
    }
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    server.upload("", F, &refs).await.unwrap();
    Digest::of_bytes(F, &child)
}

async fn get_tree(server: &TestServer, root: &Digest) -> Result<usize, tonic::Status> {
    let mut stream = server
        .cas()
        .get_tree(GetTreeRequest {
            root_digest: Some(wire(root)),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut directories = 0;
    while let Some(page) = stream.message().await? {
        directories += page.directories.len();
    }
    Ok(directories)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_visits_each_directory_once_and_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        max_tree_directories: 40,
        ..CoordinatorConfig::default()
    };
    let server = TestServer::start_with(dir.path(), config).await.unwrap();
    // 2^30 paths, 31 directories: walked as 31.
    let doubling = doubling_tree(&server, 30).await;
    assert_eq!(get_tree(&server, &doubling).await.unwrap(), 31);

    // 60 distinct directories under one root: past the bound.
    let leaves: Vec<Vec<u8>> = (0..60)
        .map(|i| {
            Directory {
                node_properties: None,
                files: Vec::new(),
                directories: Vec::new(),
                symlinks: vec![kiln_proto::reapi::SymlinkNode {
                    name: format!("l{i}"),
                    target: "t".into(),
                    ..Default::default()
                }],
            }
            .encode_to_vec()
        })
        .collect();
    let root = Directory {
        directories: leaves
            .iter()
            .enumerate()
            .map(|(i, leaf)| DirectoryNode {
                name: format!("d{i:02}"),
                digest: Some(wire(&Digest::of_bytes(F, leaf))),
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut blobs: Vec<&[u8]> = leaves.iter().map(Vec::as_slice).collect();
    blobs.push(&root);
    server.upload("", F, &blobs).await.unwrap();
    let status = get_tree(&server, &Digest::of_bytes(F, &root))
        .await
        .unwrap_err();
    assert_bad_request(&status, "root_digest");
    assert!(
        status.message().contains("max_tree_directories"),
        "{status:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_result_naming_an_oversized_tree_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        max_message_bytes: 1024,
        ..CoordinatorConfig::default()
    };
    let server = TestServer::start_with(dir.path(), config).await.unwrap();
    let big = common::random_bytes(4096, 7);
    let tree = server.upload("", F, &[&big]).await.unwrap()[0];
    let action = server.upload("", F, &[b"an action"]).await.unwrap()[0];
    let result = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            tree_digest: Some(wire(&tree)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = ActionCacheClient::new(server.channel.clone())
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(wire(&action)),
            action_result: Some(result),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_request(&status, "action_result.output_directories[0].tree_digest");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_whose_platform_no_worker_offers_fails_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        unmatched_platform_timeout_secs: 1,
        ..CoordinatorConfig::default()
    };
    let server = TestServer::start_with(dir.path(), config).await.unwrap();
    let command = true_command(&server).await;
    let action = action_on(&server, command, None, &[("arch", "sparc")]).await;
    let request = ExecuteRequest {
        action_digest: Some(wire(&action)),
        digest_function: F.reapi_value(),
        ..Default::default()
    };
    let stream = ExecutionClient::new(server.channel.clone())
        .execute(request)
        .await
        .unwrap()
        .into_inner();
    let operation = common::finish(stream).await;
    let Some(kiln_proto::longrunning::operation::Result::Response(any)) = operation.result else {
        panic!("no response in {operation:?}");
    };
    let response = kiln_proto::reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap();
    let status = response.status.expect("a status");
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(status.message.contains("arch=sparc"), "{status:?}");
    server.stop().await.unwrap();
}
