//! The worker's side of the REAPI CAS: BatchReadBlobs and ByteStream Read to fetch,
//! FindMissingBlobs, BatchUpdateBlobs and ByteStream Write to upload. Every fetched byte is
//! hashed on the way in and checked against the digest asked for.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_store::{Digest, DigestFunction, ResourceName};
use kiln_telemetry::TracedChannel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;

use crate::WorkerError;

/// Blobs up to this size travel in Batch calls; larger ones through ByteStream.
pub const BATCH_BLOB_LIMIT: u64 = 1 << 20;
/// The most bytes one Batch call carries: well under gRPC's default 4 MiB message limit
/// and the coordinator's `max_batch_total_size_bytes`.
pub const BATCH_TOTAL_LIMIT: u64 = 2 << 20;
/// ByteStream Write chunk size.
const WRITE_CHUNK: usize = 256 << 10;
/// Headroom for the per-entry framing of a batch on top of its blob bytes.
const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Blobs up to this size are uploaded without asking FindMissingBlobs first: sending a
/// few bytes the CAS may already have costs less than the extra round trip.
const UPLOAD_WITHOUT_ASKING: u64 = 4 << 10;

/// Where the bytes of a blob to upload come from.
#[derive(Clone, Debug)]
pub enum BlobSource {
    Memory(Vec<u8>),
    File(PathBuf),
    /// An open file, read from its start (an action's captured stdout or stderr).
    Open(Arc<File>),
}

/// A client for one coordinator's CAS and ByteStream services.
#[derive(Clone)]
pub struct CasClient {
    cas: ContentAddressableStorageClient<TracedChannel>,
    byte_stream: ByteStreamClient<TracedChannel>,
}

/// Parses a digest found in an Action, Command, Directory or CAS response.
pub(crate) fn from_reapi(
    function: DigestFunction,
    digest: Option<&reapi::Digest>,
    what: &str,
) -> Result<Digest, WorkerError> {
    let digest =
        digest.ok_or_else(|| WorkerError::InvalidAction(format!("{what} has no digest")))?;
    Digest::from_reapi(function, digest)
        .map_err(|e| WorkerError::InvalidAction(format!("{what}: {e}")))
}

fn check(expected: Digest, data: &[u8]) -> Result<(), WorkerError> {
    let actual = Digest::of_bytes(expected.function, data);
    if actual == expected {
        Ok(())
    } else {
        Err(WorkerError::CorruptBlob { expected, actual })
    }
}

impl CasClient {
    pub fn new(channel: Channel) -> Self {
        let channel = kiln_telemetry::traced(channel);
        CasClient {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            byte_stream: ByteStreamClient::new(channel),
        }
    }

    /// Reads small blobs in one BatchReadBlobs call. Each entry is the blob's verified
    /// content, or `None` when the CAS does not have it.
    pub async fn batch_read(
        &self,
        instance_name: &str,
        digests: &[Digest],
    ) -> Result<Vec<(Digest, Option<Vec<u8>>)>, WorkerError> {
        let Some(first) = digests.first() else {
            return Ok(Vec::new());
        };
        let request = reapi::BatchReadBlobsRequest {
            instance_name: instance_name.to_string(),
            digests: digests.iter().map(Digest::to_reapi).collect(),
            acceptable_compressors: Vec::new(),
            digest_function: first.function.reapi_value(),
        };
        let response = self
            .cas
            .clone()
            .batch_read_blobs(request)
            .await
            .map_err(WorkerError::rpc("BatchReadBlobs"))?
            .into_inner();
        let mut blobs = Vec::with_capacity(response.responses.len());
        for entry in response.responses {
            let digest = from_reapi(
                first.function,
                entry.digest.as_ref(),
                "a BatchReadBlobs entry",
            )?;
            let code = entry.status.as_ref().map_or(0, |s| s.code);
            if code == Code::NotFound as i32 {
                blobs.push((digest, None));
            } else if code != Code::Ok as i32 {
                let message = entry.status.map(|s| s.message).unwrap_or_default();
                return Err(WorkerError::Rpc {
                    call: "BatchReadBlobs",
                    status: tonic::Status::new(Code::from(code), message),
                });
            } else {
                check(digest, &entry.data)?;
                blobs.push((digest, Some(entry.data)));
            }
        }
        Ok(blobs)
    }

    /// Streams one blob into `file` through ByteStream Read, hashing as it goes. Returns
    /// `false` when the CAS does not have the blob.
    pub async fn read_to_file(
        &self,
        instance_name: &str,
        digest: &Digest,
        file: &mut tokio::fs::File,
    ) -> Result<bool, WorkerError> {
        let request = ReadRequest {
            resource_name: ResourceName::read(instance_name, *digest).to_string(),
            read_offset: 0,
            read_limit: 0,
        };
        let mut stream = match self.byte_stream.clone().read(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(false),
            Err(status) => return Err(WorkerError::rpc("ByteStream.Read")(status)),
        };
        let mut hasher = digest.function.hasher();
        let mut size = 0u64;
        while let Some(message) = stream.next().await {
            let chunk = match message {
                Ok(chunk) => chunk.data,
                Err(status) if status.code() == Code::NotFound && size == 0 => return Ok(false),
                Err(status) => return Err(WorkerError::rpc("ByteStream.Read")(status)),
            };
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(WorkerError::io("writing a fetched blob"))?;
        }
        let actual = Digest::new(digest.function, hasher.finalize(), size);
        if actual != *digest {
            return Err(WorkerError::CorruptBlob {
                expected: *digest,
                actual,
            });
        }
        file.flush()
            .await
            .map_err(WorkerError::io("writing a fetched blob"))?;
        Ok(true)
    }

    /// The subset of `digests` the CAS lacks.
    pub async fn find_missing(
        &self,
        instance_name: &str,
        digests: &[Digest],
    ) -> Result<Vec<Digest>, WorkerError> {
        let Some(first) = digests.first() else {
            return Ok(Vec::new());
        };
        let request = reapi::FindMissingBlobsRequest {
            instance_name: instance_name.to_string(),
            blob_digests: digests.iter().map(Digest::to_reapi).collect(),
            digest_function: first.function.reapi_value(),
        };
        let response = self
            .cas
            .clone()
            .find_missing_blobs(request)
            .await
            .map_err(WorkerError::rpc("FindMissingBlobs"))?
            .into_inner();
        response
            .missing_blob_digests
            .iter()
            .map(|d| from_reapi(first.function, Some(d), "a FindMissingBlobs entry"))
            .collect()
    }

    /// Uploads whichever of `blobs` the CAS lacks: small ones in batches, large ones
    /// through ByteStream Write. The empty blob is never sent (REAPI servers always have
    /// it), and tiny blobs are sent without asking first. Returns how many blobs were sent.
    pub async fn upload_missing(
        &self,
        instance_name: &str,
        blobs: Vec<(Digest, BlobSource)>,
    ) -> Result<usize, WorkerError> {
        let mut seen = std::collections::HashSet::new();
        let blobs: Vec<(Digest, BlobSource)> = blobs
            .into_iter()
            .filter(|(digest, _)| !digest.is_empty_blob() && seen.insert(*digest))
            .collect();
        let to_ask: Vec<Digest> = blobs
            .iter()
            .map(|(d, _)| *d)
            .filter(|d| d.size > UPLOAD_WITHOUT_ASKING)
            .collect();
        let missing: std::collections::HashSet<Digest> = self
            .find_missing(instance_name, &to_ask)
            .await?
            .into_iter()
            .collect();
        let mut batch: Vec<(Digest, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0u64;
        let mut sent = 0;
        for (digest, source) in blobs {
            if digest.size > UPLOAD_WITHOUT_ASKING && !missing.contains(&digest) {
                continue;
            }
            sent += 1;
            if digest.size > BATCH_BLOB_LIMIT {
                self.write_stream(instance_name, &digest, &source).await?;
                continue;
            }
            if batch_bytes + digest.size > BATCH_TOTAL_LIMIT {
                self.batch_update(instance_name, std::mem::take(&mut batch))
                    .await?;
                batch_bytes = 0;
            }
            batch_bytes += digest.size;
            batch.push((digest, read_source(&source).await?));
        }
        self.batch_update(instance_name, batch).await?;
        Ok(sent)
    }

    async fn batch_update(
        &self,
        instance_name: &str,
        blobs: Vec<(Digest, Vec<u8>)>,
    ) -> Result<(), WorkerError> {
        let Some((first, _)) = blobs.first() else {
            return Ok(());
        };
        let request = reapi::BatchUpdateBlobsRequest {
            instance_name: instance_name.to_string(),
            digest_function: first.function.reapi_value(),
            requests: blobs
                .into_iter()
                .map(
                    |(digest, data)| reapi::batch_update_blobs_request::Request {
                        digest: Some(digest.to_reapi()),
                        data,
                        compressor: 0,
                    },
                )
                .collect(),
        };
        let response = self
            .cas
            .clone()
            .batch_update_blobs(request)
            .await
            .map_err(WorkerError::rpc("BatchUpdateBlobs"))?
            .into_inner();
        for entry in response.responses {
            if let Some(status) = entry.status.filter(|s| s.code != Code::Ok as i32) {
                return Err(WorkerError::Rpc {
                    call: "BatchUpdateBlobs",
                    status: tonic::Status::new(Code::from(status.code), status.message),
                });
            }
        }
        Ok(())
    }

    async fn write_stream(
        &self,
        instance_name: &str,
        digest: &Digest,
        source: &BlobSource,
    ) -> Result<(), WorkerError> {
        let resource_name = ResourceName::write(instance_name, *digest).to_string();
        let mut chunks = ChunkReader::open(source.clone()).await?;
        let total = digest.size as i64;
        let (sender, receiver) = tokio::sync::mpsc::channel::<WriteRequest>(2);
        // Feeds the stream from a task so a file never sits whole in memory.
        let feeder = tokio::spawn(async move {
            let mut offset = 0i64;
            while let Some(data) = chunks.next_chunk().await? {
                let len = data.len() as i64;
                let request = WriteRequest {
                    resource_name: if offset == 0 {
                        resource_name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset,
                    finish_write: offset + len == total,
                    data,
                };
                offset += len;
                if sender.send(request).await.is_err() {
                    break;
                }
            }
            if total == 0 {
                let _ = sender
                    .send(WriteRequest {
                        resource_name,
                        write_offset: 0,
                        finish_write: true,
                        data: Vec::new(),
                    })
                    .await;
            }
            Ok::<(), WorkerError>(())
        });
        let result = self
            .byte_stream
            .clone()
            .write(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await;
        feeder
            .await
            .map_err(|e| WorkerError::Protocol(format!("upload task failed: {e}")))??;
        let response = result.map_err(WorkerError::rpc("ByteStream.Write"))?;
        if response.into_inner().committed_size != total {
            return Err(WorkerError::Protocol(format!(
                "ByteStream.Write of {digest} committed a different size"
            )));
        }
        Ok(())
    }
}

async fn read_source(source: &BlobSource) -> Result<Vec<u8>, WorkerError> {
    match source {
        BlobSource::Memory(data) => Ok(data.clone()),
        BlobSource::Open(file) => {
            let mut data = Vec::new();
            let mut reader = OpenFileReader::new(file.clone());
            reader
                .read_to_end(&mut data)
                .map_err(WorkerError::io("reading a captured log"))?;
            Ok(data)
        }
        BlobSource::File(path) => tokio::fs::read(path).await.map_err(WorkerError::io(format!(
            "reading output {}",
            path.display()
        ))),
    }
}

/// Reads a shared open file from its start with positional reads, leaving the file's own
/// offset alone.
pub(crate) struct OpenFileReader {
    file: Arc<File>,
    offset: u64,
}

impl OpenFileReader {
    pub(crate) fn new(file: Arc<File>) -> Self {
        OpenFileReader { file, offset: 0 }
    }
}

impl std::io::Read for OpenFileReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buffer, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Cuts a blob source into ByteStream Write chunks.
enum ChunkReader {
    Memory { data: Vec<u8>, offset: usize },
    File(tokio::fs::File),
    Open(OpenFileReader),
}

impl ChunkReader {
    async fn open(source: BlobSource) -> Result<Self, WorkerError> {
        match source {
            BlobSource::Memory(data) => Ok(ChunkReader::Memory { data, offset: 0 }),
            BlobSource::File(path) => Ok(ChunkReader::File(
                tokio::fs::File::open(&path)
                    .await
                    .map_err(WorkerError::io(format!(
                        "opening output {}",
                        path.display()
                    )))?,
            )),
            BlobSource::Open(file) => Ok(ChunkReader::Open(OpenFileReader::new(file))),
        }
    }

    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, WorkerError> {
        match self {
            ChunkReader::Memory { data, offset } => {
                if *offset >= data.len() {
                    return Ok(None);
                }
                let end = (*offset + WRITE_CHUNK).min(data.len());
                let chunk = data[*offset..end].to_vec();
                *offset = end;
                Ok(Some(chunk))
            }
            ChunkReader::File(file) => {
                let mut buffer = vec![0u8; WRITE_CHUNK];
                let mut filled = 0;
                while filled < buffer.len() {
                    let n = file
                        .read(&mut buffer[filled..])
                        .await
                        .map_err(WorkerError::io("reading an output for upload"))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buffer.truncate(filled);
                Ok((filled > 0).then_some(buffer))
            }
            ChunkReader::Open(reader) => {
                let mut buffer = Vec::with_capacity(WRITE_CHUNK);
                std::io::Read::by_ref(reader)
                    .take(WRITE_CHUNK as u64)
                    .read_to_end(&mut buffer)
                    .map_err(WorkerError::io("reading a captured log for upload"))?;
                Ok((!buffer.is_empty()).then_some(buffer))
            }
        }
    }
}
