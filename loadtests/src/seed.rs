//! Data a benchmark puts in place before it measures.

use kiln_proto::reapi::{
    self, action_cache_client::ActionCacheClient, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient, ActionResult,
    BatchUpdateBlobsRequest, OutputFile, UpdateActionResultRequest,
};
use kiln_store::{Digest, DigestFunction};
use tonic::transport::Channel;

/// Stores an action result whose one output file is present, and returns the action's
/// digest: every GetActionResult for it is a hit.
pub async fn action_result(channel: &Channel) -> anyhow::Result<reapi::Digest> {
    action_result_as(channel, None).await
}

/// [`action_result`] with a token (it needs `cas:write` and `ac:write`).
pub async fn action_result_as(
    channel: &Channel,
    token: Option<&str>,
) -> anyhow::Result<reapi::Digest> {
    let output = b"an output file".to_vec();
    let output_digest = Digest::of_bytes(DigestFunction::Sha256, &output).to_reapi();
    ContentAddressableStorageClient::new(channel.clone())
        .batch_update_blobs(crate::request(
            BatchUpdateBlobsRequest {
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(output_digest.clone()),
                    data: output,
                    ..Default::default()
                }],
                ..Default::default()
            },
            token,
        ))
        .await?;
    let action = Digest::of_bytes(DigestFunction::Sha256, b"benchmark action").to_reapi();
    ActionCacheClient::new(channel.clone())
        .update_action_result(crate::request(
            UpdateActionResultRequest {
                action_digest: Some(action.clone()),
                action_result: Some(ActionResult {
                    output_files: vec![OutputFile {
                        path: "out".into(),
                        digest: Some(output_digest),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            token,
        ))
        .await?;
    Ok(action)
}
