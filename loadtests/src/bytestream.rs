//! Writing and reading blobs through ByteStream, as Bazel does: 1 MiB chunks on one call.

use std::time::Instant;

use futures::StreamExt;
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
                data: data.slice((i * CHUNK).min(end)..end),
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

/// Writes `data` through ByteStream, reads it back, and returns (write, read) MB/s.
pub async fn round_trip(
    client: &ByteStreamClient<Channel>,
    data: &bytes::Bytes,
    digest: Digest,
    chunk: usize,
) -> anyhow::Result<(f64, f64)> {
    let segment = match digest.function {
        DigestFunction::Sha256 => String::new(),
        DigestFunction::Blake3 => "blake3/".to_string(),
    };
    let upload = format!(
        "uploads/{}/blobs/{segment}{}",
        uuid::Uuid::new_v4(),
        digest.reapi()
    );
    let chunks: Vec<WriteRequest> = (0..data.len().div_ceil(chunk))
        .map(|i| data.slice(i * chunk..((i + 1) * chunk).min(data.len())))
        .enumerate()
        .map(|(i, piece)| WriteRequest {
            resource_name: if i == 0 {
                upload.clone()
            } else {
                String::new()
            },
            write_offset: (i * chunk) as i64,
            finish_write: (i + 1) * chunk >= data.len(),
            data: piece,
        })
        .collect();
    let start = Instant::now();
    let committed = client
        .clone()
        .write(futures::stream::iter(chunks))
        .await?
        .into_inner()
        .committed_size;
    let write = crate::mb_per_s(data.len() as u64, start.elapsed());
    anyhow::ensure!(
        committed == data.len() as i64,
        "committed {committed} of {}",
        data.len()
    );

    let start = Instant::now();
    let mut stream = client
        .clone()
        .read(ReadRequest {
            resource_name: format!("blobs/{segment}{}", digest.reapi()),
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut hasher = digest.function.hasher();
    let mut received = 0u64;
    let mut pieces = Vec::new();
    while let Some(response) = stream.next().await {
        let piece = response?.data;
        received += piece.len() as u64;
        pieces.push(piece);
    }
    let read = crate::mb_per_s(received, start.elapsed());
    // Checked after the clock stops: the benchmark measures the server, not our hashing.
    for piece in &pieces {
        hasher.update(piece);
    }
    anyhow::ensure!(
        hasher.finalize() == digest.hash && received == digest.size,
        "read back different bytes"
    );
    Ok((write, read))
}
