//! Shared setup for the coordinator's integration tests: a real server on 127.0.0.1:0
//! over a filesystem blob store and a sled metadata store in a temp dir, and the
//! generated tonic clients pointed at it.
#![allow(dead_code)] // Each test binary uses a different part of this module.

pub mod actions;
pub mod traces;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::admin::v1::{admin_client::AdminClient, FarmStatus, GetStatusRequest};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::longrunning::Operation;
use kiln_proto::reapi::{
    self, action_cache_client::ActionCacheClient, batch_update_blobs_request,
    capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient, BatchUpdateBlobsRequest,
};
use kiln_store::{Digest, DigestFunction, FsBlobStore};
use kiln_testkit::{OpenStores, ServedCoordinator, Stores};
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

/// Clients accept messages this large (a full batch plus framing).
const CLIENT_MESSAGE_LIMIT: usize = 64 << 20;

pub struct TestServer {
    pub addr: SocketAddr,
    pub channel: Channel,
    /// The server's blob store, for tests that must lose a blob behind its back.
    pub blobs: FsBlobStore,
    server: ServedCoordinator,
}

impl TestServer {
    pub async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(data_dir, CoordinatorConfig::default()).await
    }

    /// Opens (or reopens) the stores under `data_dir` and serves them. On disk: restart
    /// tests reopen them, and some tests reach for the files.
    pub async fn start_with(data_dir: &Path, config: CoordinatorConfig) -> anyhow::Result<Self> {
        Self::serve(config, Stores::OnDisk(data_dir.to_path_buf())).await
    }

    /// A server on stores other servers use too (opened on disk): a farm's replica.
    pub async fn start_shared(
        stores: &OpenStores,
        config: CoordinatorConfig,
    ) -> anyhow::Result<Self> {
        Self::serve(config, Stores::Shared(stores.clone())).await
    }

    async fn serve(config: CoordinatorConfig, stores: Stores) -> anyhow::Result<Self> {
        let server = ServedCoordinator::start(config, stores).await?;
        let channel = Channel::from_shared(server.http_url())?
            .connect()
            .await
            .context("connecting to the test server")?;
        Ok(TestServer {
            addr: server.addr,
            channel,
            blobs: server.stores.fs_blobs.clone().expect("on-disk stores"),
            server,
        })
    }

    /// Stops the server and waits until it has released the stores.
    pub async fn stop(self) -> anyhow::Result<()> {
        drop(self.channel);
        self.server.stop().await
    }

    /// Writes `size` zero bytes straight into the server's blob store, a MiB at a time,
    /// so that the test itself never holds the blob in memory; returns its digest.
    pub async fn store_zeros(&self, function: DigestFunction, size: u64) -> Digest {
        use kiln_store::{BlobStore, ExpectedDigest};
        let chunk = bytes::Bytes::from(vec![0u8; 1 << 20]);
        let mut hasher = function.hasher();
        let mut writer = self.blobs.begin_write(function, None).await.unwrap();
        let mut written = 0;
        while written < size {
            let piece = chunk.slice(..(size - written).min(chunk.len() as u64) as usize);
            hasher.update(&piece);
            written += piece.len() as u64;
            writer.write(piece).await.unwrap();
        }
        let digest = Digest::new(function, hasher.finalize(), size);
        writer.commit(ExpectedDigest::Exact(digest)).await.unwrap()
    }

    /// The farm's status, as `kiln status` asks for it.
    pub async fn status(&self) -> FarmStatus {
        AdminClient::new(self.channel.clone())
            .get_status(GetStatusRequest {})
            .await
            .expect("GetStatus succeeds")
            .into_inner()
    }

    /// Polls the status until `done` holds (workers join and leave asynchronously); a
    /// wait on the event, bounded, rather than a guess at how long it takes.
    pub async fn status_when(&self, done: impl Fn(&FarmStatus) -> bool) -> FarmStatus {
        within(20, async {
            loop {
                let current = self.status().await;
                if done(&current) {
                    return current;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    pub fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel.clone())
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MESSAGE_LIMIT)
            .max_encoding_message_size(CLIENT_MESSAGE_LIMIT)
    }

    pub fn action_cache(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MESSAGE_LIMIT)
            .max_encoding_message_size(CLIENT_MESSAGE_LIMIT)
    }

    pub fn byte_stream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MESSAGE_LIMIT)
            .max_encoding_message_size(CLIENT_MESSAGE_LIMIT)
    }

    /// A second connection, for tests that break one on purpose.
    pub async fn new_channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?)
    }

    /// Stores blobs through BatchUpdateBlobs and checks that each one succeeded.
    pub async fn upload(
        &self,
        instance_name: &str,
        function: DigestFunction,
        blobs: &[&[u8]],
    ) -> anyhow::Result<Vec<Digest>> {
        let (request, digests) = batch_update(instance_name, function, blobs);
        let response = self.cas().batch_update_blobs(request).await?.into_inner();
        for entry in &response.responses {
            let code = entry.status.as_ref().map_or(0, |s| s.code);
            anyhow::ensure!(code == 0, "upload failed: {:?}", entry.status);
        }
        Ok(digests)
    }

    /// Reads a whole blob through ByteStream.
    pub async fn read_blob(&self, resource_name: String) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .byte_stream()
            .read(ReadRequest {
                resource_name,
                read_offset: 0,
                read_limit: 0,
            })
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(message) = stream.message().await? {
            data.extend_from_slice(&message.data);
        }
        Ok(data)
    }
}

/// A BatchUpdateBlobs request for `blobs`, and their digests in order.
pub fn batch_update(
    instance_name: &str,
    function: DigestFunction,
    blobs: &[&[u8]],
) -> (BatchUpdateBlobsRequest, Vec<Digest>) {
    let digests: Vec<Digest> = blobs
        .iter()
        .map(|b| Digest::of_bytes(function, b))
        .collect();
    let request = BatchUpdateBlobsRequest {
        instance_name: instance_name.into(),
        requests: blobs
            .iter()
            .zip(&digests)
            .map(|(data, digest)| batch_update_blobs_request::Request {
                digest: Some(wire(digest)),
                data: data.to_vec(),
                compressor: 0,
            })
            .collect(),
        digest_function: function.reapi_value(),
    };
    (request, digests)
}

pub fn wire(digest: &Digest) -> reapi::Digest {
    digest.to_reapi()
}

/// The resource-name segment for a digest function (omitted for SHA-256, as REAPI says).
pub fn function_segment(function: DigestFunction) -> &'static str {
    match function {
        DigestFunction::Sha256 => "",
        DigestFunction::Blake3 => "blake3/",
    }
}

pub fn blob_name(instance: &str, digest: &Digest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!(
        "{prefix}blobs/{}{}",
        function_segment(digest.function),
        digest.reapi()
    )
}

pub fn upload_name(instance: &str, uuid: &str, digest: &Digest, compressed: bool) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    let kind = if compressed {
        "compressed-blobs/zstd"
    } else {
        "blobs"
    };
    format!(
        "{prefix}uploads/{uuid}/{kind}/{}{}",
        function_segment(digest.function),
        digest.reapi()
    )
}

/// The messages of a Write stream carrying `data` from `offset`, `chunk` bytes each.
pub fn write_requests(
    resource_name: &str,
    data: &[u8],
    offset: u64,
    chunk: usize,
    finish: bool,
) -> Vec<WriteRequest> {
    let mut requests: Vec<WriteRequest> = data
        .chunks(chunk.max(1))
        .scan(offset, |position, piece| {
            let request = WriteRequest {
                resource_name: String::new(),
                write_offset: *position as i64,
                finish_write: false,
                data: bytes::Bytes::copy_from_slice(piece),
            };
            *position += piece.len() as u64;
            Some(request)
        })
        .collect();
    if requests.is_empty() {
        requests.push(WriteRequest {
            write_offset: offset as i64,
            ..Default::default()
        });
    }
    requests[0].resource_name = resource_name.to_string();
    requests.last_mut().expect("at least one").finish_write = finish;
    requests
}

/// Deterministic pseudo-random bytes (incompressible, unlike a repeated pattern).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Asserts an INVALID_ARGUMENT whose BadRequest detail names `field`.
pub fn assert_bad_request(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let violations = &details
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest detail in {status:?}"))
        .field_violations;
    assert!(
        violations.iter().any(|v| v.field == field),
        "expected a violation of {field:?} in {violations:?}"
    );
}

/// Fails a test that hangs instead of letting it run forever.
pub async fn within<T>(seconds: u64, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), future)
        .await
        .expect("test step timed out")
}

/// Reads an operation stream until the operation is done.
pub async fn finish(mut stream: tonic::Streaming<Operation>) -> Operation {
    within(60, async {
        loop {
            let operation = stream
                .message()
                .await
                .expect("the operation stream does not fail")
                .expect("the stream ends only after the operation is done");
            if operation.done {
                return operation;
            }
        }
    })
    .await
}
