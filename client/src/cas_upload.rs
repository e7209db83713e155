//! Uploads to a REAPI CAS: small blobs in BatchUpdateBlobs calls within the server's
//! limit, large ones through ByteStream Write, several in flight at once.

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use kiln_proto::bytestream::WriteRequest;
use kiln_proto::reapi;
use kiln_store::{Digest, ResourceName};
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::blob_set::{BlobSet, BlobSource, OpenFileReader};
use crate::outcomes::UploadStats;
use crate::progress::Progress;
use crate::reapi_digest::from_reapi;
use crate::remote_cas::{pack_batches, BATCH_ENTRY_OVERHEAD, TRANSFER_CONCURRENCY};
use crate::retry::retrying;
use crate::{ClientError, RemoteCas, Result};

/// ByteStream chunk size for uploads.
const WRITE_CHUNK: usize = 1 << 20;

impl RemoteCas {
    /// Uploads every blob of `blobs` that the server is missing.
    pub async fn upload_missing(
        &self,
        blobs: &BlobSet,
        progress: &dyn Progress,
    ) -> Result<UploadStats> {
        let missing = self.find_missing(blobs.digests().copied()).await?;
        let mut stats = self.upload(blobs, &missing, progress).await?;
        stats.checked = blobs.len() as u64;
        Ok(stats)
    }

    /// Uploads the blobs `digests` (taken from `blobs`) without asking first: small ones
    /// in batches within the server's limit, large ones through ByteStream.
    pub async fn upload(
        &self,
        blobs: &BlobSet,
        digests: &[Digest],
        progress: &dyn Progress,
    ) -> Result<UploadStats> {
        let mut stats = UploadStats::default();
        let mut small = Vec::new();
        let mut large = Vec::new();
        for digest in digests {
            let source = blobs.get(digest).ok_or_else(|| {
                ClientError::InvalidRequest(format!("no source for blob {digest}"))
            })?;
            stats.uploaded_blobs += 1;
            stats.uploaded_bytes += digest.size;
            if digest.size + BATCH_ENTRY_OVERHEAD <= self.max_batch_bytes {
                small.push((*digest, source));
            } else {
                large.push((*digest, source));
            }
        }
        stats.batched_blobs = small.len() as u64;
        progress.upload_started(stats.uploaded_blobs, stats.uploaded_bytes);

        // Plain loops and boxed futures rather than iterator closures: closures over
        // borrowed blobs make the future's Send-ness higher-ranked, which rustc cannot
        // prove where callers need it (tonic handlers, spawned tasks).
        let mut jobs: Vec<BoxFuture<'_, Result<()>>> = Vec::new();
        let batches = pack_batches(
            small,
            |(digest, _)| digest.size + BATCH_ENTRY_OVERHEAD,
            self.max_batch_bytes,
        );
        for batch in batches {
            jobs.push(Box::pin(self.upload_batch(batch, progress)));
        }
        for (digest, source) in large {
            jobs.push(Box::pin(self.upload_by_stream(
                digest,
                source.clone(),
                progress,
            )));
        }
        futures::stream::iter(jobs)
            .buffer_unordered(TRANSFER_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        progress.upload_finished(&stats);
        Ok(stats)
    }

    async fn upload_batch(
        &self,
        batch: Vec<(Digest, &BlobSource)>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let (requests, bytes) = batch_requests(&batch).await?;
        // The first attempt sends what was read; only a retry (rare) reads the sources
        // again, rather than every attempt copying up to a whole batch of bytes.
        let mut unsent = Some(requests);
        let batch = &batch;
        let response = retrying(move || {
            let first = unsent.take();
            async move {
                let requests = match first {
                    Some(requests) => requests,
                    None => batch_requests(batch).await?.0,
                };
                self.cas()
                    .batch_update_blobs(self.request(reapi::BatchUpdateBlobsRequest {
                        instance_name: self.instance_name.clone(),
                        requests,
                        digest_function: self.function.reapi_value(),
                    }))
                    .await
                    .map_err(|s| ClientError::rpc("BatchUpdateBlobs", s))
            }
        })
        .await?
        .into_inner();
        for entry in response.responses {
            let status = entry.status.unwrap_or_default();
            if status.code == tonic::Code::Ok as i32 {
                continue;
            }
            let digest = from_reapi(self.function, entry.digest.as_ref(), "a batch response")?;
            let source = batch.iter().find(|(d, _)| *d == digest).map(|(_, s)| *s);
            return Err(upload_failure(
                "BatchUpdateBlobs",
                tonic::Status::new(tonic::Code::from(status.code), status.message),
                source,
            ));
        }
        progress.uploaded_bytes(bytes);
        Ok(())
    }

    async fn upload_by_stream(
        &self,
        digest: Digest,
        source: BlobSource,
        progress: &dyn Progress,
    ) -> Result<()> {
        // A write that breaks is made again as a new upload, from the start.
        let source = &source;
        retrying(move || self.upload_by_stream_once(digest, source, progress)).await
    }

    async fn upload_by_stream_once(
        &self,
        digest: Digest,
        source: &BlobSource,
        progress: &dyn Progress,
    ) -> Result<()> {
        let resource_name = ResourceName::write(&self.instance_name, digest).to_string();
        // A producer task feeds the call through a small channel, which bounds memory to
        // a few chunks whatever the blob's size.
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let producer = tokio::spawn(send_chunks(
            source.clone(),
            digest.size,
            resource_name,
            sender,
        ));
        let response = self
            .byte_stream()
            .write(self.request(ReceiverStream::new(receiver)))
            .await;
        let sent = producer.await.unwrap_or(0);
        let response = response
            .map_err(|s| upload_failure("ByteStream.Write", s, Some(source)))?
            .into_inner();
        if response.committed_size != digest.size as i64 {
            return Err(ClientError::InvalidResponse(format!(
                "ByteStream.Write of {digest} committed {} bytes",
                response.committed_size
            )));
        }
        progress.uploaded_bytes(sent.max(digest.size));
        Ok(())
    }
}

/// A failed upload of a file whose content no longer matches its digest means the
/// file changed after it was hashed; say so rather than relay the server's complaint.
fn upload_failure(
    call: &'static str,
    status: tonic::Status,
    source: Option<&BlobSource>,
) -> ClientError {
    match source {
        Some(BlobSource::File(path)) if status.code() == tonic::Code::InvalidArgument => {
            tracing::debug!(%status, "upload refused");
            ClientError::InputChanged { path: path.clone() }
        }
        _ => ClientError::rpc(call, status),
    }
}

/// Cuts a blob source into ByteStream Write chunks.
enum ChunkReader {
    Bytes(bytes::Bytes),
    File(tokio::fs::File),
    /// A memory-backed file (a captured log): plain reads do not block.
    Open(OpenFileReader),
}

impl ChunkReader {
    async fn open(source: BlobSource) -> std::io::Result<Self> {
        Ok(match source {
            BlobSource::Bytes(bytes) => ChunkReader::Bytes(bytes),
            BlobSource::File(path) => ChunkReader::File(tokio::fs::File::open(&path).await?),
            BlobSource::Open(file) => ChunkReader::Open(OpenFileReader::new(file)),
        })
    }

    /// Up to `want` bytes; fewer only at the end of the source.
    async fn next_chunk(&mut self, want: usize) -> std::io::Result<bytes::Bytes> {
        match self {
            // A slice of the blob: no copy.
            ChunkReader::Bytes(bytes) => Ok(bytes.split_to(want.min(bytes.len()))),
            ChunkReader::File(file) => {
                let mut buffer = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    match file.read(&mut buffer[filled..]).await? {
                        0 => break,
                        n => filled += n,
                    }
                }
                buffer.truncate(filled);
                Ok(buffer.into())
            }
            ChunkReader::Open(reader) => {
                let mut buffer = Vec::with_capacity(want);
                let mut limited = std::io::Read::take(std::io::Read::by_ref(reader), want as u64);
                std::io::Read::read_to_end(&mut limited, &mut buffer)?;
                Ok(buffer.into())
            }
        }
    }
}

/// Sends the blob's bytes as WriteRequests of [`WRITE_CHUNK`] bytes, the last flagged
/// `finish_write`, and returns how many bytes were sent. A read error ends the stream
/// early; the server then sees a short write and refuses it.
async fn send_chunks(
    source: BlobSource,
    size: u64,
    resource_name: String,
    sender: tokio::sync::mpsc::Sender<WriteRequest>,
) -> u64 {
    let what = match &source {
        BlobSource::Bytes(_) => "an in-memory blob".to_string(),
        BlobSource::File(path) => path.display().to_string(),
        BlobSource::Open(_) => "a captured log".to_string(),
    };
    let mut chunks = match ChunkReader::open(source).await {
        Ok(chunks) => chunks,
        Err(err) => {
            tracing::warn!(source = %what, %err, "cannot read a blob to upload");
            return 0;
        }
    };
    let mut sent = 0u64;
    loop {
        let want = (size - sent).min(WRITE_CHUNK as u64) as usize;
        let data = match chunks.next_chunk(want).await {
            Ok(data) => data,
            Err(err) => {
                tracing::warn!(source = %what, %err, "cannot read a blob to upload");
                return sent;
            }
        };
        let filled = data.len() as u64;
        // A source that shrank ends here; the server sees the short length.
        let last = sent + filled >= size || (filled as usize) < want;
        let request = WriteRequest {
            resource_name: if sent == 0 {
                resource_name.clone()
            } else {
                String::new()
            },
            write_offset: sent as i64,
            finish_write: last,
            data,
        };
        if sender.send(request).await.is_err() {
            break;
        }
        sent += filled;
        if last {
            break;
        }
    }
    sent
}

/// A batch's entries, read from their sources, and how many bytes they hold.
async fn batch_requests(
    batch: &[(Digest, &BlobSource)],
) -> Result<(Vec<reapi::batch_update_blobs_request::Request>, u64)> {
    let mut requests = Vec::with_capacity(batch.len());
    let mut bytes = 0;
    for (digest, source) in batch {
        let data = source.read_all().await?;
        bytes += data.len() as u64;
        requests.push(reapi::batch_update_blobs_request::Request {
            digest: Some(digest.to_reapi()),
            data,
            compressor: reapi::compressor::Value::Identity as i32,
        });
    }
    Ok((requests, bytes))
}
