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

/// Stores 5,000 small blobs and returns 10,000 digests of which those 5,000 are present.
pub async fn find_missing_digests(
    cas: &ContentAddressableStorageClient<Channel>,
) -> anyhow::Result<Vec<kiln_proto::reapi::Digest>> {
    let mut all = Vec::with_capacity(10_000);
    for batch in 0..10 {
        let requests: Vec<batch_update_blobs_request::Request> = (0..500)
            .map(|i| {
                let data = format!("find-missing blob {batch}-{i}").into_bytes();
                let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
                all.push(digest.to_reapi());
                batch_update_blobs_request::Request {
                    digest: Some(digest.to_reapi()),
                    data,
                    ..Default::default()
                }
            })
            .collect();
        let response = cas
            .clone()
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests,
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::ensure!(response
            .responses
            .iter()
            .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0)));
    }
    for i in 0..5_000 {
        all.push(
            Digest::of_bytes(DigestFunction::Sha256, format!("absent {i}").as_bytes()).to_reapi(),
        );
    }
    Ok(all)
}
