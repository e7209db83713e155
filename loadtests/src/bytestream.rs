//! Writing and reading blobs through ByteStream, as Bazel does: 1 MiB chunks on one call.

use std::time::Instant;

use futures::StreamExt;
use kiln_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use kiln_store::{Compression, Digest, DigestFunction, ResourceName};
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

/// How fast one transfer went, and what it cost this whole process (client and server
/// when the server runs in it).
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub mb_per_s: f64,
    /// Process CPU time per MB moved, in milliseconds: on a shared machine, a sturdier
    /// measure than throughput.
    pub cpu_ms_per_mb: f64,
}

impl Transfer {
    /// Times `bytes` moved from `start` (with the process CPU time then) until now.
    pub fn since(start: Instant, cpu_at_start: std::time::Duration, bytes: u64) -> Self {
        let cpu = crate::load::process_cpu_time().saturating_sub(cpu_at_start);
        Transfer {
            mb_per_s: crate::mb_per_s(bytes, start.elapsed()),
            cpu_ms_per_mb: cpu.as_secs_f64() * 1e3 / (bytes as f64 / 1e6),
        }
    }
}

/// A blob written through ByteStream and read back.
#[derive(Clone, Copy, Debug)]
pub struct RoundTrip {
    pub write: Transfer,
    pub read: Transfer,
}

impl RoundTrip {
    /// (write, read) in MB/s.
    pub fn rates(&self) -> (f64, f64) {
        (self.write.mb_per_s, self.read.mb_per_s)
    }
}

/// Writes `data` through ByteStream and reads it back.
pub async fn round_trip(
    client: &ByteStreamClient<Channel>,
    data: &bytes::Bytes,
    digest: Digest,
    chunk: usize,
) -> anyhow::Result<RoundTrip> {
    let write = write_timed(client, data, digest, chunk).await?;
    let read = read_checked(client, data, digest).await?;
    Ok(RoundTrip { write, read })
}

/// Writes `data` (whose digest is `digest`) through ByteStream in `chunk`-byte messages.
pub async fn write_timed(
    client: &ByteStreamClient<Channel>,
    data: &bytes::Bytes,
    digest: Digest,
    chunk: usize,
) -> anyhow::Result<Transfer> {
    let (start, cpu) = (Instant::now(), crate::load::process_cpu_time());
    let committed = upload(client, &ResourceName::write("", digest), data, chunk).await?;
    let write = Transfer::since(start, cpu, data.len() as u64);
    anyhow::ensure!(
        committed == data.len() as i64,
        "committed {committed} of {}",
        data.len()
    );
    Ok(write)
}

/// Reads the blob `digest` through ByteStream, comparing it with `data` as it arrives.
pub async fn read_checked(
    client: &ByteStreamClient<Channel>,
    data: &bytes::Bytes,
    digest: Digest,
) -> anyhow::Result<Transfer> {
    let (start, cpu) = (Instant::now(), crate::load::process_cpu_time());
    let mut content = crate::SameBytes::new(data);
    download(client, &ResourceName::read("", digest), |piece| {
        content.check(&piece)
    })
    .await?;
    let read = Transfer::since(start, cpu, digest.size);
    content.finish()?;
    Ok(read)
}

/// [`round_trip`] through `compressed-blobs/zstd/`: the blob goes up as one zstd frame
/// of `compressed` (made before the clock starts) and comes back compressed by the
/// server. Returns (write, read) in MB/s of the blob's own (uncompressed) bytes.
pub async fn compressed_round_trip(
    client: &ByteStreamClient<Channel>,
    compressed: &bytes::Bytes,
    digest: Digest,
    chunk: usize,
) -> anyhow::Result<(f64, f64)> {
    let compress = |mut name: ResourceName| {
        name.compression = Compression::Zstd;
        name
    };
    let start = Instant::now();
    let committed = upload(
        client,
        &compress(ResourceName::write("", digest)),
        compressed,
        chunk,
    )
    .await?;
    let write = crate::mb_per_s(digest.size, start.elapsed());
    anyhow::ensure!(
        committed == compressed.len() as i64,
        "committed {committed} of {} compressed bytes",
        compressed.len()
    );

    let start = Instant::now();
    let mut wire = Vec::new();
    download(client, &compress(ResourceName::read("", digest)), |piece| {
        wire.extend_from_slice(&piece);
        Ok(())
    })
    .await?;
    let read = crate::mb_per_s(digest.size, start.elapsed());
    let blob = zstd::decode_all(&wire[..])?;
    anyhow::ensure!(
        Digest::of_bytes(digest.function, &blob) == digest,
        "read back different bytes"
    );
    Ok((write, read))
}

/// Sends `wire` in `chunk`-byte WriteRequests on one call; returns the committed size.
async fn upload(
    client: &ByteStreamClient<Channel>,
    name: &ResourceName,
    wire: &bytes::Bytes,
    chunk: usize,
) -> Result<i64, tonic::Status> {
    let name = name.to_string();
    let requests: Vec<WriteRequest> = (0..wire.len().div_ceil(chunk))
        .map(|i| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * chunk) as i64,
            finish_write: (i + 1) * chunk >= wire.len(),
            data: wire.slice(i * chunk..((i + 1) * chunk).min(wire.len())),
        })
        .collect();
    Ok(client
        .clone()
        .write(futures::stream::iter(requests))
        .await?
        .into_inner()
        .committed_size)
}

/// Reads a resource whole, handing each piece to `receive` as it arrives.
async fn download(
    client: &ByteStreamClient<Channel>,
    name: &ResourceName,
    mut receive: impl FnMut(bytes::Bytes) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stream = client
        .clone()
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    while let Some(response) = stream.next().await {
        receive(response?.data)?;
    }
    Ok(())
}
