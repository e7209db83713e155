//! The one REAPI CAS client, used by `kiln run`, `kiln publish --from-run` and the
//! workers: capabilities, finding missing blobs and the action cache here; uploads in
//! [`crate::cas_upload`], verified reads in [`crate::cas_read`].
//!
//! Its limits are one set for every caller, derived from what the server advertises.

use std::sync::Arc;

use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::reapi::{
    self, action_cache_client::ActionCacheClient, capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use kiln_store::{Digest, DigestFunction};
use kiln_telemetry::{traced, TracedChannel};
use tonic::transport::Channel;

use crate::endpoint::{endpoint_with_tls, ClientTls};
use crate::reapi_digest::from_reapi;
use crate::request_metadata::Invocation;
use crate::retry::retrying;
use crate::{ClientError, Result};

/// The batch size used when the server sets no limit, and the most kiln puts in one
/// batch whatever the server allows: small batches keep several transfers in flight.
const DEFAULT_MAX_BATCH_BYTES: u64 = 4 << 20;
/// What one batch entry costs beyond its data (digest, framing), for the size budget.
pub(crate) const BATCH_ENTRY_OVERHEAD: u64 = 128;
/// Digests per FindMissingBlobs call; keeps each request far below message limits.
const FIND_MISSING_CHUNK: usize = 10_000;
/// Uploads and downloads in flight at once.
pub(crate) const TRANSFER_CONCURRENCY: usize = 8;
/// Accepts responses as large as a server may send (full batches, inlined results).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// A connection to a REAPI server's CAS, ActionCache and ByteStream services, bound to
/// one instance name and one digest function.
#[derive(Clone)]
pub struct RemoteCas {
    channel: Channel,
    pub(crate) instance_name: String,
    pub(crate) function: DigestFunction,
    invocation: Invocation,
    capabilities: Arc<reapi::ServerCapabilities>,
    pub(crate) max_batch_bytes: u64,
}

impl RemoteCas {
    /// Connects, asks for the server's capabilities and checks that it accepts
    /// `function`.
    pub async fn connect(
        url: &str,
        instance_name: &str,
        function: DigestFunction,
        invocation: Invocation,
    ) -> Result<Self> {
        Self::connect_with_tls(
            url,
            &ClientTls::default(),
            instance_name,
            function,
            invocation,
        )
        .await
    }

    /// [`RemoteCas::connect`] with TLS settings for a `grpcs://` URL.
    pub async fn connect_with_tls(
        url: &str,
        tls: &ClientTls,
        instance_name: &str,
        function: DigestFunction,
        invocation: Invocation,
    ) -> Result<Self> {
        let channel = endpoint_with_tls(url, tls)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        Self::with_channel(channel, instance_name, function, invocation).await
    }

    pub async fn with_channel(
        channel: Channel,
        instance_name: &str,
        function: DigestFunction,
        invocation: Invocation,
    ) -> Result<Self> {
        let capabilities = CapabilitiesClient::new(traced(channel.clone()))
            .get_capabilities(invocation.request(
                reapi::GetCapabilitiesRequest {
                    instance_name: instance_name.to_string(),
                },
                "",
                "",
            ))
            .await
            .map_err(|s| ClientError::rpc("GetCapabilities", s))?
            .into_inner();
        let cache = capabilities.cache_capabilities.clone().unwrap_or_default();
        let server_limit = u64::try_from(cache.max_batch_total_size_bytes).unwrap_or(0);
        let max_batch_bytes = match server_limit {
            0 => DEFAULT_MAX_BATCH_BYTES,
            limit => limit.min(DEFAULT_MAX_BATCH_BYTES),
        };
        let cas = RemoteCas {
            channel,
            instance_name: instance_name.to_string(),
            function,
            invocation,
            capabilities: Arc::new(capabilities),
            max_batch_bytes,
        };
        cas.check_digest_function()?;
        Ok(cas)
    }

    /// The same server for another instance name and digest function, without asking for
    /// capabilities again (a worker serves every instance of its coordinator).
    pub fn for_instance(&self, instance_name: &str, function: DigestFunction) -> Result<Self> {
        let cas = RemoteCas {
            instance_name: instance_name.to_string(),
            function,
            ..self.clone()
        };
        cas.check_digest_function()?;
        Ok(cas)
    }

    fn check_digest_function(&self) -> Result<()> {
        let cache = self.capabilities.cache_capabilities.as_ref();
        let offered = cache.map(|c| c.digest_functions.as_slice()).unwrap_or(&[]);
        if !offered.is_empty() && !offered.contains(&self.function.reapi_value()) {
            return Err(ClientError::Unsupported(format!(
                "the {} digest function",
                self.function
            )));
        }
        Ok(())
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn instance_name(&self) -> &str {
        &self.instance_name
    }

    pub fn digest_function(&self) -> DigestFunction {
        self.function
    }

    pub fn invocation(&self) -> &Invocation {
        &self.invocation
    }

    pub fn capabilities(&self) -> &reapi::ServerCapabilities {
        &self.capabilities
    }

    /// The largest blob sent through BatchUpdateBlobs / read through BatchReadBlobs.
    pub fn max_batch_bytes(&self) -> u64 {
        self.max_batch_bytes
    }

    pub(crate) fn cas(&self) -> ContentAddressableStorageClient<TracedChannel> {
        ContentAddressableStorageClient::new(traced(self.channel.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub(crate) fn byte_stream(&self) -> ByteStreamClient<TracedChannel> {
        ByteStreamClient::new(traced(self.channel.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn action_cache(&self) -> ActionCacheClient<TracedChannel> {
        ActionCacheClient::new(traced(self.channel.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.invocation.request(message, "", "")
    }

    /// The digests among `digests` that the server does not hold. The empty blob is
    /// never reported missing: every REAPI server has it implicitly.
    pub async fn find_missing(
        &self,
        digests: impl IntoIterator<Item = Digest>,
    ) -> Result<Vec<Digest>> {
        let mut wanted: Vec<Digest> = digests.into_iter().filter(|d| !d.is_empty_blob()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut missing = Vec::new();
        for chunk in wanted.chunks(FIND_MISSING_CHUNK) {
            let response = retrying(move || async move {
                self.cas()
                    .find_missing_blobs(self.request(reapi::FindMissingBlobsRequest {
                        instance_name: self.instance_name.clone(),
                        blob_digests: chunk.iter().map(Digest::to_reapi).collect(),
                        digest_function: self.function.reapi_value(),
                    }))
                    .await
                    .map_err(|s| ClientError::rpc("FindMissingBlobs", s))
            })
            .await?
            .into_inner();
            for digest in &response.missing_blob_digests {
                missing.push(from_reapi(self.function, Some(digest), "a missing blob")?);
            }
        }
        Ok(missing)
    }

    /// The cached result of `action`, or `None` on a cache miss.
    pub async fn get_action_result(&self, action: &Digest) -> Result<Option<reapi::ActionResult>> {
        retrying(move || async move {
            let result = self
                .action_cache()
                .get_action_result(self.request(reapi::GetActionResultRequest {
                    instance_name: self.instance_name.clone(),
                    action_digest: Some(action.to_reapi()),
                    inline_stdout: false,
                    inline_stderr: false,
                    inline_output_files: vec![],
                    digest_function: self.function.reapi_value(),
                }))
                .await;
            match result {
                Ok(response) => Ok(Some(response.into_inner())),
                Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                Err(status) => Err(ClientError::rpc("GetActionResult", status)),
            }
        })
        .await
    }

    /// Stores `result` as the result of `action`.
    pub async fn update_action_result(
        &self,
        action: &Digest,
        result: reapi::ActionResult,
    ) -> Result<reapi::ActionResult> {
        let result = &result;
        retrying(move || async move {
            self.action_cache()
                .update_action_result(self.request(reapi::UpdateActionResultRequest {
                    instance_name: self.instance_name.clone(),
                    action_digest: Some(action.to_reapi()),
                    action_result: Some(result.clone()),
                    results_cache_policy: None,
                    digest_function: self.function.reapi_value(),
                }))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| ClientError::rpc("UpdateActionResult", s))
        })
        .await
    }
}

/// Packs items into batches whose summed cost stays within `max_bytes`, largest first so
/// that batches fill evenly. An item costlier than `max_bytes` gets a batch of its own
/// (callers send such blobs through ByteStream instead).
pub(crate) fn pack_batches<T>(
    mut items: Vec<T>,
    cost: impl Fn(&T) -> u64,
    max_bytes: u64,
) -> Vec<Vec<T>> {
    items.sort_by_key(|item| std::cmp::Reverse(cost(item)));
    let mut batches: Vec<Vec<T>> = Vec::new();
    let mut current = Vec::new();
    let mut current_bytes = 0;
    for item in items {
        let item_cost = cost(&item);
        if current_bytes + item_cost > max_bytes && !current.is_empty() {
            batches.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(item);
        current_bytes += item_cost;
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}
