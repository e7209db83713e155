//! Writing a blob through ByteStream, as Bazel does: 1 MiB chunks on one call.

use kiln_proto::bytestream::{byte_stream_client::ByteStreamClient, WriteRequest};
use kiln_store::{Digest, DigestFunction, ResourceName};
use tonic::transport::Channel;

const CHUNK: usize = 1 << 20;

/// Writes `data` as a SHA-256 blob; a refusal comes back as the call's `tonic::Status`.
pub async fn write_blob(channel: &Channel, data: bytes::Bytes) -> Result<Digest, tonic::Status> {
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let name = ResourceName::write("", digest).to_string();
    let pieces = data.len().div_ceil(CHUNK).max(1);
    let requests: Vec<WriteRequest> = (0..pieces)
        .map(|i| {
            let end = ((i + 1) * CHUNK).min(data.len());
            WriteRequest {
                resource_name: if i == 0 { name.clone() } else { String::new() },
                write_offset: (i * CHUNK) as i64,
                finish_write: end == data.len(),
                data: data[(i * CHUNK).min(end)..end].to_vec(),
            }
        })
        .collect();
    ByteStreamClient::new(channel.clone())
        .write(futures::stream::iter(requests))
        .await?;
    Ok(digest)
}
