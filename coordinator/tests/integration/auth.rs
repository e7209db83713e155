//! Token authentication and scopes, over a real socket: every REAPI call and admin call
//! is tried without a token (UNAUTHENTICATED), with a token lacking its scope
//! (PERMISSION_DENIED naming the scope), with its scope on another instance only
//! (PERMISSION_DENIED), and with its scope (allowed). Expired and revoked tokens are
//! refused, operations are visible only on instances the caller may execute on, and
//! GetCapabilities needs nothing.

use std::time::Duration;

use kiln_coordinator::auth::{hash_token, ConfiguredToken};
use kiln_coordinator::{AuthConfig, CoordinatorConfig};
use kiln_proto::admin::v1::{
    admin_client::AdminClient, CreateTokenRequest, GetStatusRequest, ListTokensRequest,
    RevokeTokenRequest,
};
use kiln_proto::bytestream::{
    byte_stream_client::ByteStreamClient, QueryWriteStatusRequest, ReadRequest,
};
use kiln_proto::longrunning::{
    operations_client::OperationsClient, CancelOperationRequest, GetOperationRequest,
    ListOperationsRequest,
};
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    action_cache_client::ActionCacheClient, capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient, Action, ActionResult, BatchReadBlobsRequest, Command,
    Directory, ExecuteRequest, FindMissingBlobsRequest, GetActionResultRequest,
    GetCapabilitiesRequest, GetTreeRequest, UpdateActionResultRequest, WaitExecutionRequest,
};
use kiln_store::{Digest, DigestFunction, ResourceName};
use kiln_testkit::{ServedCoordinator, Stores};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::common::{batch_update, wire, write_requests};

const F: DigestFunction = DigestFunction::Sha256;
const ADMIN_TOKEN: &str = "kiln_0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab";
const EXPIRED_TOKEN: &str = "kiln_expired00000000000000000000000000000000000000000000000000000";

type Authorized =
    InterceptedService<Channel, Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>>;

/// A channel whose calls carry `token` as a bearer token (none when `None`).
fn as_holder(channel: &Channel, token: Option<&str>) -> Authorized {
    let header: Option<MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().expect("ASCII token"));
    InterceptedService::new(
        channel.clone(),
        Box::new(move |mut request: Request<()>| {
            if let Some(header) = &header {
                request
                    .metadata_mut()
                    .insert("authorization", header.clone());
            }
            Ok(request)
        }),
    )
}

fn configured(
    name: &str,
    token: &str,
    scopes: &[&str],
    expires_unix: Option<u64>,
) -> ConfiguredToken {
    ConfiguredToken {
        name: name.into(),
        hash: hex::encode(hash_token(token)),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        instance: None,
        expires_unix,
    }
}

async fn serve_with_auth() -> (ServedCoordinator, Channel) {
    serve_with(Vec::new()).await
}

/// A coordinator with auth on, granting `anonymous` scopes to calls without credentials.
async fn serve_with(anonymous: Vec<String>) -> (ServedCoordinator, Channel) {
    let config = CoordinatorConfig {
        auth: AuthConfig {
            enabled: true,
            tokens: vec![
                configured("bootstrap", ADMIN_TOKEN, &["admin"], None),
                configured("old", EXPIRED_TOKEN, &["cas:read"], Some(1)),
            ],
            anonymous_scopes: anonymous,
            ..Default::default()
        },
        ..Default::default()
    };
    let server = ServedCoordinator::start(config, Stores::Memory)
        .await
        .unwrap();
    let channel = server.channel().await.unwrap();
    (server, channel)
}

async fn create_token(channel: &Channel, scopes: &[&str], instance: &str) -> String {
    AdminClient::new(as_holder(channel, Some(ADMIN_TOKEN)))
        .create_token(CreateTokenRequest {
            name: format!("{scopes:?} on {instance:?}"),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            instance: instance.into(),
            valid_for: None,
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Every call checked, with the scope it needs.
#[derive(Clone, Copy, Debug)]
enum Call {
    FindMissingBlobs,
    BatchUpdateBlobs,
    BatchReadBlobs,
    GetTree,
    Read,
    Write,
    QueryWriteStatus,
    GetActionResult,
    UpdateActionResult,
    Execute,
    WaitExecution,
    GetOperation,
    CancelOperation,
    GetStatus,
    ListTokens,
}

impl Call {
    const ALL: [Call; 15] = [
        Call::FindMissingBlobs,
        Call::BatchUpdateBlobs,
        Call::BatchReadBlobs,
        Call::GetTree,
        Call::Read,
        Call::Write,
        Call::QueryWriteStatus,
        Call::GetActionResult,
        Call::UpdateActionResult,
        Call::Execute,
        Call::WaitExecution,
        Call::GetOperation,
        Call::CancelOperation,
        Call::GetStatus,
        Call::ListTokens,
    ];

    fn scope(self) -> &'static str {
        match self {
            Call::FindMissingBlobs | Call::BatchReadBlobs | Call::GetTree | Call::Read => {
                "cas:read"
            }
            Call::BatchUpdateBlobs | Call::Write | Call::QueryWriteStatus => "cas:write",
            Call::GetActionResult => "ac:read",
            Call::UpdateActionResult => "ac:write",
            Call::Execute | Call::WaitExecution | Call::GetOperation | Call::CancelOperation => {
                "execute"
            }
            Call::GetStatus | Call::ListTokens => "admin",
        }
    }

    /// Whether the call is about one instance (the admin calls are about the farm).
    fn per_instance(self) -> bool {
        !matches!(self, Call::GetStatus | Call::ListTokens)
    }
}

/// What the calls act on: a blob, and an operation queued on instance "ci".
struct Fixture {
    blob: Vec<u8>,
    digest: Digest,
    action: Digest,
    operation: String,
}

async fn fixture(channel: &Channel) -> Fixture {
    let command = Command {
        arguments: vec!["true".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = Directory::default().encode_to_vec();
    let action = Action {
        command_digest: Some(wire(&Digest::of_bytes(F, &command))),
        input_root_digest: Some(wire(&Digest::of_bytes(F, &root))),
        ..Default::default()
    }
    .encode_to_vec();
    let blob = b"a blob".to_vec();
    let (request, digests) = batch_update("ci", F, &[&command, &root, &action, &blob]);
    ContentAddressableStorageClient::new(as_holder(channel, Some(ADMIN_TOKEN)))
        .batch_update_blobs(request)
        .await
        .unwrap();
    // No worker joins: the operation stays queued for the calls that follow it.
    let mut stream = ExecutionClient::new(as_holder(channel, Some(ADMIN_TOKEN)))
        .execute(ExecuteRequest {
            instance_name: "ci".into(),
            action_digest: Some(wire(&digests[2])),
            digest_function: F.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let operation = stream.message().await.unwrap().unwrap().name;
    Fixture {
        blob,
        digest: digests[3],
        action: digests[2],
        operation,
    }
}

/// Makes `call` on `instance` as the holder of `token`; only the status matters.
async fn make(
    call: Call,
    channel: &Channel,
    token: Option<&str>,
    instance: &str,
    f: &Fixture,
) -> Result<(), Status> {
    let holder = as_holder(channel, token);
    let instance = instance.to_string();
    match call {
        Call::FindMissingBlobs => ContentAddressableStorageClient::new(holder)
            .find_missing_blobs(FindMissingBlobsRequest {
                instance_name: instance,
                blob_digests: vec![wire(&f.digest)],
                digest_function: F.reapi_value(),
            })
            .await
            .map(drop),
        Call::BatchUpdateBlobs => ContentAddressableStorageClient::new(holder)
            .batch_update_blobs(batch_update(&instance, F, &[&f.blob]).0)
            .await
            .map(drop),
        Call::BatchReadBlobs => ContentAddressableStorageClient::new(holder)
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: instance,
                digests: vec![wire(&f.digest)],
                digest_function: F.reapi_value(),
                ..Default::default()
            })
            .await
            .map(drop),
        Call::GetTree => {
            let root = Digest::of_bytes(F, &Directory::default().encode_to_vec());
            let mut stream = ContentAddressableStorageClient::new(holder)
                .get_tree(GetTreeRequest {
                    instance_name: instance,
                    root_digest: Some(wire(&root)),
                    digest_function: F.reapi_value(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        Call::Read => {
            let mut stream = ByteStreamClient::new(holder)
                .read(ReadRequest {
                    resource_name: ResourceName::read(&instance, f.digest).to_string(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        Call::Write => {
            let name = ResourceName::write(&instance, f.digest).to_string();
            let requests = write_requests(&name, &f.blob, 0, 1024, true);
            ByteStreamClient::new(holder)
                .write(futures::stream::iter(requests))
                .await
                .map(drop)
        }
        Call::QueryWriteStatus => ByteStreamClient::new(holder)
            .query_write_status(QueryWriteStatusRequest {
                resource_name: ResourceName::write(&instance, f.digest).to_string(),
            })
            .await
            .map(drop),
        Call::GetActionResult => ActionCacheClient::new(holder)
            .get_action_result(GetActionResultRequest {
                instance_name: instance,
                action_digest: Some(wire(&f.action)),
                digest_function: F.reapi_value(),
                ..Default::default()
            })
            .await
            .map(drop),
        Call::UpdateActionResult => ActionCacheClient::new(holder)
            .update_action_result(UpdateActionResultRequest {
                instance_name: instance,
                action_digest: Some(wire(&f.action)),
                action_result: Some(ActionResult::default()),
                digest_function: F.reapi_value(),
                ..Default::default()
            })
            .await
            .map(drop),
        Call::Execute => ExecutionClient::new(holder)
            .execute(ExecuteRequest {
                instance_name: instance,
                action_digest: Some(wire(&f.action)),
                digest_function: F.reapi_value(),
                ..Default::default()
            })
            .await
            .map(drop),
        // The operation lives on "ci": these calls name it, not an instance.
        Call::WaitExecution => ExecutionClient::new(holder)
            .wait_execution(WaitExecutionRequest {
                name: f.operation.clone(),
            })
            .await
            .map(drop),
        Call::GetOperation => OperationsClient::new(holder)
            .get_operation(GetOperationRequest {
                name: f.operation.clone(),
            })
            .await
            .map(drop),
        // Cancelling an unknown name still checks nothing but existence, so the check
        // is made against the real operation; the allowed case cancels it last.
        Call::CancelOperation => OperationsClient::new(holder)
            .cancel_operation(CancelOperationRequest {
                name: f.operation.clone(),
            })
            .await
            .map(drop),
        Call::GetStatus => AdminClient::new(holder)
            .get_status(GetStatusRequest {})
            .await
            .map(drop),
        Call::ListTokens => AdminClient::new(holder)
            .list_tokens(ListTokensRequest {})
            .await
            .map(drop),
    }
}

fn assert_refused(result: Result<(), Status>, code: Code, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
}

fn assert_allowed(result: Result<(), Status>, what: &str) {
    if let Err(status) = result {
        assert!(
            !matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ),
            "{what}: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_its_scope_on_its_instance() {
    let (server, channel) = serve_with_auth().await;
    let f = fixture(&channel).await;
    // A token with every scope but the call's, and one with the call's scope on "other".
    let all = ["cas:read", "cas:write", "ac:read", "ac:write", "execute"];
    // The operation-naming calls act on "ci" whatever instance the request could name.
    for call in Call::ALL {
        let what = format!("{call:?}");
        // FindMissingBlobs starts every upload, so cas:write allows it too.
        let also = matches!(call, Call::FindMissingBlobs).then_some("cas:write");
        let others: Vec<&str> = all
            .iter()
            .copied()
            .filter(|s| *s != call.scope() && Some(*s) != also)
            .collect();
        let lacking = create_token(&channel, &others, "").await;
        assert_refused(
            make(call, &channel, None, "ci", &f).await,
            Code::Unauthenticated,
            &what,
        );
        assert_refused(
            make(call, &channel, Some("kiln_not-a-token"), "ci", &f).await,
            Code::Unauthenticated,
            &what,
        );
        let denied = make(call, &channel, Some(&lacking), "ci", &f)
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{what}: {denied:?}");
        assert!(
            denied.message().contains(call.scope()),
            "{what}: {denied:?}"
        );
        assert!(
            !denied.message().contains(&lacking),
            "the token leaked: {denied:?}"
        );
        if call.per_instance() {
            let elsewhere = create_token(&channel, &[call.scope()], "other").await;
            assert_refused(
                make(call, &channel, Some(&elsewhere), "ci", &f).await,
                Code::PermissionDenied,
                &format!("{what} with the scope on another instance"),
            );
        }
        if let Some(also) = also {
            let writer = create_token(&channel, &[also], "").await;
            assert_allowed(make(call, &channel, Some(&writer), "ci", &f).await, &what);
        }
        let holder = create_token(&channel, &[call.scope()], "").await;
        assert_allowed(make(call, &channel, Some(&holder), "ci", &f).await, &what);
        let on_ci = create_token(
            &channel,
            &[call.scope()],
            if call.per_instance() { "ci" } else { "" },
        )
        .await;
        assert_allowed(make(call, &channel, Some(&on_ci), "ci", &f).await, &what);
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_are_open_and_expired_or_revoked_tokens_are_refused() {
    let (server, channel) = serve_with_auth().await;
    let f = fixture(&channel).await;
    CapabilitiesClient::new(channel.clone())
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities needs no token");

    let expired = make(Call::Read, &channel, Some(EXPIRED_TOKEN), "ci", &f)
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated, "{expired:?}");
    assert!(expired.message().contains("expired"), "{expired:?}");

    let reader = create_token(&channel, &["cas:read"], "").await;
    assert_allowed(
        make(Call::Read, &channel, Some(&reader), "ci", &f).await,
        "before revoking",
    );
    let mut admin = AdminClient::new(as_holder(&channel, Some(ADMIN_TOKEN)));
    let listed = admin
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let id = listed
        .iter()
        .find(|t| t.scopes == ["cas:read"] && !t.configured)
        .expect("the new token is listed")
        .id
        .clone();
    assert!(listed.iter().any(|t| t.name == "bootstrap" && t.configured));
    admin
        .revoke_token(RevokeTokenRequest { id: id.clone() })
        .await
        .unwrap();
    assert_refused(
        make(Call::Read, &channel, Some(&reader), "ci", &f).await,
        Code::Unauthenticated,
        "a revoked token",
    );
    let again = admin
        .revoke_token(RevokeTokenRequest { id })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    // A configured token is revoked by editing the file, and says so.
    let bootstrap = listed
        .iter()
        .find(|t| t.name == "bootstrap")
        .unwrap()
        .id
        .clone();
    let refused = admin
        .revoke_token(RevokeTokenRequest { id: bootstrap })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // A token that lives a few seconds. Expiry is kept in whole seconds, so it lasts
    // between LIFETIME - 1 and LIFETIME: with one second, a fresh token expired whenever
    // the clock's second turned over between its creation and its use.
    const LIFETIME: u64 = 3;
    let created = std::time::Instant::now();
    let brief = admin
        .create_token(CreateTokenRequest {
            name: "brief".into(),
            scopes: vec!["cas:read".into()],
            instance: String::new(),
            valid_for: Some(kiln_proto::protobuf::Duration {
                seconds: LIFETIME as i64,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let fresh = make(Call::Read, &channel, Some(&brief), "ci", &f).await;
    // Only asserted while the token cannot yet have expired, so that a busy machine does
    // not fail it.
    if created.elapsed() < Duration::from_secs(LIFETIME - 1) {
        assert_allowed(fresh, "a fresh token");
    }
    tokio::time::sleep(Duration::from_secs(LIFETIME) + Duration::from_millis(100)).await;
    assert_refused(
        make(Call::Read, &channel, Some(&brief), "ci", &f).await,
        Code::Unauthenticated,
        "a token past its expiry",
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_listed_only_on_instances_the_caller_may_execute_on() {
    let (server, channel) = serve_with_auth().await;
    let f = fixture(&channel).await;
    let list = |token: String| {
        let channel = channel.clone();
        async move {
            OperationsClient::new(as_holder(&channel, Some(&token)))
                .list_operations(ListOperationsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .operations
                .into_iter()
                .map(|o| o.name)
                .collect::<Vec<_>>()
        }
    };
    let on_ci = create_token(&channel, &["execute"], "ci").await;
    let elsewhere = create_token(&channel, &["execute"], "other").await;
    assert_eq!(list(on_ci).await, vec![f.operation.clone()]);
    assert!(list(elsewhere).await.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_scopes_allow_what_they_name_and_ask_for_a_token_otherwise() {
    let (server, channel) = serve_with(vec!["cas:write".into()]).await;
    let f = fixture(&channel).await;
    // No credentials at all: uploads pass (what Bazel 2.1 needs), the rest asks for one.
    make(Call::Write, &channel, None, "ci", &f).await.unwrap();
    make(Call::FindMissingBlobs, &channel, None, "ci", &f)
        .await
        .unwrap();
    for call in [Call::Read, Call::Execute, Call::GetStatus] {
        let refused = make(call, &channel, None, "ci", &f).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "{call:?}: {refused:?}"
        );
    }
    // A token still counts as itself: a reader's token does not gain the anonymous write.
    let reader = create_token(&channel, &["cas:read"], "").await;
    assert_refused(
        make(Call::Write, &channel, Some(&reader), "ci", &f).await,
        Code::PermissionDenied,
        "a token without cas:write",
    );
    server.stop().await.unwrap();
}
