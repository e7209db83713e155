//! Actions for execution benchmarks, each made unique by a nonce so that none is a cache
//! hit, uploaded in batches and executed to the end of their operation stream; and the
//! in-process workers that run them.

use std::time::SystemTime;

use futures::StreamExt;
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient, Action, BatchUpdateBlobsRequest, Command, ExecuteRequest,
    ExecuteResponse,
};
use kiln_store::{Digest, DigestFunction};
use tonic::transport::Channel;

/// An action running `argv`, with its blobs, made unique by `nonce` so that no two
/// actions share a cache entry.
pub fn action(
    argv: &[&str],
    nonce: usize,
    input_root: &Digest,
) -> (Digest, Vec<(Digest, Vec<u8>)>) {
    let command = Command {
        arguments: argv.iter().map(|s| s.to_string()).collect(),
        environment_variables: vec![kiln_proto::reapi::command::EnvironmentVariable {
            name: "KILN_BENCH_NONCE".into(),
            value: nonce.to_string(),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let command_digest = Digest::of_bytes(DigestFunction::Sha256, &command);
    let action = Action {
        command_digest: Some(command_digest.to_reapi()),
        input_root_digest: Some(input_root.to_reapi()),
        ..Default::default()
    }
    .encode_to_vec();
    let action_digest = Digest::of_bytes(DigestFunction::Sha256, &action);
    (
        action_digest,
        vec![(command_digest, command), (action_digest, action)],
    )
}

pub async fn upload(
    cas: &ContentAddressableStorageClient<Channel>,
    blobs: Vec<(Digest, Vec<u8>)>,
) -> anyhow::Result<()> {
    for chunk in blobs.chunks(500) {
        let requests = chunk
            .iter()
            .map(|(d, data)| batch_update_blobs_request::Request {
                digest: Some(d.to_reapi()),
                data: data.clone(),
                ..Default::default()
            })
            .collect();
        cas.clone()
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests,
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

/// Executes one action to completion and returns its response and when it was sent.
pub async fn execute(
    client: &ExecutionClient<Channel>,
    action: &Digest,
) -> anyhow::Result<(ExecuteResponse, SystemTime)> {
    let sent = SystemTime::now();
    let mut stream = client
        .clone()
        .execute(ExecuteRequest {
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(operation) = stream.next().await {
        let operation = operation?;
        if let Some(kiln_proto::longrunning::operation::Result::Response(any)) = operation.result {
            let response = ExecuteResponse::decode(any.value.as_slice())?;
            anyhow::ensure!(
                response.status.as_ref().is_none_or(|s| s.code == 0),
                "action failed: {:?}",
                response.status
            );
            // Read to the end (the trailers): dropping a stream early makes the client's
            // HTTP/2 library reset it, and after 1024 such resets it closes the connection
            // (h2's "too_many_internal_resets").
            while stream.next().await.is_some() {}
            return Ok((response, sent));
        }
    }
    anyhow::bail!("the operation stream ended without a result")
}

/// Workers in this process, joined to one coordinator (or a balancer in front of many).
pub struct Workers {
    /// `http://host:port`.
    pub coordinator: String,
    pub count: usize,
    pub slots: usize,
    pub join_token: String,
    pub sandbox: kiln_worker::SandboxMode,
    /// Each worker's work directory goes under it.
    pub dir: std::path::PathBuf,
}

impl Workers {
    /// Starts them; returns once every one is registered (30 s at most).
    pub async fn start(self) -> anyhow::Result<()> {
        let mut registrations = Vec::new();
        for index in 0..self.count {
            let worker = kiln_worker::WorkerConfig {
                coordinator: self.coordinator.clone(),
                slots: self.slots,
                join_token: self.join_token.clone(),
                work_dir: self.dir.join(format!("worker-{index}")),
                sandbox: self.sandbox,
                worker_id: format!("bench-{index}"),
                ..Default::default()
            };
            let (registered, registration) = tokio::sync::watch::channel(false);
            registrations.push(registration);
            tokio::spawn(kiln_worker::run_reporting(
                worker,
                futures::future::pending::<()>(),
                registered,
            ));
        }
        for mut registration in registrations {
            let registered = registration.wait_for(|registered| *registered);
            tokio::time::timeout(std::time::Duration::from_secs(30), registered).await??;
        }
        Ok(())
    }
}
