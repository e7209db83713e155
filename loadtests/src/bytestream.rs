//! Writing and reading blobs through ByteStream, as Bazel does: 1 MiB chunks on one call.

use kiln_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use kiln_store::{Digest, DigestFunction, ResourceName};
use tonic::transport::Channel;

const CHUNK: usize = 1 << 20;

/// Writes `data` as a SHA-256 blob; a refusal comes back as the call's `tonic::Status`.
pub async fn write_blob(channel: &Channel, data: bytes::Bytes) -> Result<Digest, tonic::Status> {
    write_blob_as(channel, None, data).await
}

/// [`write_blob`] with a token.
pub async fn write_blob_as(
    channel: &Channel,
    token: Option<&str>,
    data: bytes::Bytes,
) -> Result<Digest, tonic::Status> {
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
        .write(crate::request(futures::stream::iter(requests), token))
        .await?;
    Ok(digest)
}

/// Reads a blob whole through ByteStream; returns its length.
pub async fn read_blob_as(
    channel: &Channel,
    token: Option<&str>,
    digest: Digest,
) -> Result<u64, tonic::Status> {
    let name = ResourceName::read("", digest).to_string();
    let mut stream = ByteStreamClient::new(channel.clone())
        .read(crate::request(
            ReadRequest {
                resource_name: name,
                ..Default::default()
            },
            token,
        ))
        .await?
        .into_inner();
    let mut read = 0;
    while let Some(chunk) = stream.message().await? {
        read += chunk.data.len() as u64;
    }
    Ok(read)
}
