//! Verified reads from a REAPI CAS: every byte is hashed on the way in and checked
//! against the digest asked for, so a server (or a network) that returns wrong bytes is
//! caught here, never written out as a build's input or output.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use kiln_proto::bytestream::ReadRequest;
use kiln_proto::reapi;
use kiln_store::{Digest, ResourceName};
use tokio::io::AsyncWriteExt;

use crate::reapi_digest::from_reapi;
use crate::remote_cas::{pack_batches, BATCH_ENTRY_OVERHEAD};
use crate::retry::retrying;
use crate::{ClientError, RemoteCas, Result};

/// How to fetch a set of blobs: small ones in BatchReadBlobs calls within the server's
/// limit, the rest one ByteStream Read each.
#[derive(Debug, Default)]
pub struct ReadPlan {
    pub batches: Vec<Vec<Digest>>,
    pub streamed: Vec<Digest>,
}

impl RemoteCas {
    /// Splits `digests` into batch reads and streamed reads.
    pub fn plan_reads(&self, digests: Vec<Digest>) -> ReadPlan {
        let (small, streamed): (Vec<Digest>, Vec<Digest>) =
            digests.into_iter().partition(|d| self.fits_in_batch(d));
        let cost = |digest: &Digest| digest.size + BATCH_ENTRY_OVERHEAD;
        ReadPlan {
            batches: pack_batches(small, cost, self.max_batch_bytes),
            streamed,
        }
    }

    fn fits_in_batch(&self, digest: &Digest) -> bool {
        digest.size + BATCH_ENTRY_OVERHEAD <= self.max_batch_bytes
    }

    /// Reads a whole blob into memory, checking it against its digest.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Bytes> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        if self.fits_in_batch(digest) {
            return self.read_one_batched(digest).await;
        }
        retrying(move || self.read_streamed_blob(digest)).await
    }

    async fn read_streamed_blob(&self, digest: &Digest) -> Result<Bytes> {
        let mut buffer = BytesMut::with_capacity(digest.size.min(64 << 20) as usize);
        let mut stream = self.read_stream(digest).await?;
        while let Some(chunk) = stream.next().await {
            buffer.extend_from_slice(&chunk?);
        }
        let data = buffer.freeze();
        check_digest(digest, &data)?;
        Ok(data)
    }

    /// Reads small blobs in one BatchReadBlobs call (see [`RemoteCas::plan_reads`]). Each
    /// entry is the blob's verified content, or `None` when the server does not have it.
    pub async fn read_blobs(&self, digests: &[Digest]) -> Result<Vec<(Digest, Option<Bytes>)>> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        let response = retrying(move || async move {
            self.cas()
                .batch_read_blobs(self.request(reapi::BatchReadBlobsRequest {
                    instance_name: self.instance_name.clone(),
                    digests: digests.iter().map(Digest::to_reapi).collect(),
                    acceptable_compressors: vec![],
                    digest_function: self.function.reapi_value(),
                }))
                .await
                .map_err(|s| ClientError::rpc("BatchReadBlobs", s))
        })
        .await?
        .into_inner();
        let mut blobs = Vec::with_capacity(response.responses.len());
        for entry in response.responses {
            let digest = from_reapi(self.function, entry.digest.as_ref(), "a batch entry")?;
            let status = entry.status.unwrap_or_default();
            let code = tonic::Code::from(status.code);
            if code == tonic::Code::NotFound {
                blobs.push((digest, None));
            } else if code != tonic::Code::Ok {
                return Err(ClientError::rpc(
                    "BatchReadBlobs",
                    tonic::Status::new(code, format!("{digest}: {}", status.message)),
                ));
            } else {
                let data = Bytes::from(entry.data);
                check_digest(&digest, &data)?;
                blobs.push((digest, Some(data)));
            }
        }
        Ok(blobs)
    }

    async fn read_one_batched(&self, digest: &Digest) -> Result<Bytes> {
        let entry = self.read_blobs(std::slice::from_ref(digest)).await?;
        match entry.into_iter().find(|(d, _)| d == digest) {
            Some((_, Some(data))) => Ok(data),
            Some((_, None)) => Err(ClientError::rpc(
                "BatchReadBlobs",
                tonic::Status::not_found(format!("{digest} is not in the CAS")),
            )),
            None => Err(ClientError::InvalidResponse(format!(
                "BatchReadBlobs returned nothing for {digest}"
            ))),
        }
    }

    /// Streams a blob into `path` (which is created or truncated) and syncs it, checking
    /// its digest before returning. The caller makes the write atomic. A blob the server
    /// lacks is an error whose [`ClientError::is_not_found`] is true.
    pub async fn read_blob_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        // A stream that breaks is read again from the start, into the file truncated.
        retrying(move || self.read_blob_to_file_once(digest, path)).await
    }

    async fn read_blob_to_file_once(&self, digest: &Digest, path: &Path) -> Result<()> {
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| ClientError::io(path, e))?;
        if self.fits_in_batch(digest) || digest.is_empty_blob() {
            let data = self.read_blob(digest).await?;
            file.write_all(&data)
                .await
                .map_err(|e| ClientError::io(path, e))?;
        } else {
            let mut hasher = self.function.hasher();
            let mut size = 0u64;
            let mut stream = self.read_stream(digest).await?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| ClientError::io(path, e))?;
            }
            let actual = Digest::new(self.function, hasher.finalize(), size);
            if actual != *digest {
                return Err(ClientError::CorruptBlob {
                    expected: *digest,
                    actual,
                });
            }
        }
        // A crash must not leave a short file that a later reader trusts by its name.
        file.sync_all()
            .await
            .map_err(|e| ClientError::io(path, e))?;
        Ok(())
    }

    async fn read_stream(
        &self,
        digest: &Digest,
    ) -> Result<impl futures::Stream<Item = Result<Bytes>> + use<>> {
        let resource_name = ResourceName::read(&self.instance_name, *digest).to_string();
        let stream = self
            .byte_stream()
            .read(self.request(ReadRequest {
                resource_name,
                read_offset: 0,
                read_limit: 0,
            }))
            .await
            .map_err(|s| ClientError::rpc("ByteStream.Read", s))?
            .into_inner();
        Ok(stream
            .map_ok(|response| response.data)
            .map_err(|s| ClientError::rpc("ByteStream.Read", s)))
    }

    /// Reads and decodes a proto stored as a blob (a Directory, a Tree, an Action…).
    pub async fn read_message<M: prost::Message + Default>(&self, digest: &Digest) -> Result<M> {
        let bytes = self.read_blob(digest).await?;
        M::decode(bytes).map_err(|e| {
            ClientError::InvalidResponse(format!(
                "blob {digest} is not a valid {}: {e}",
                std::any::type_name::<M>()
            ))
        })
    }
}

fn check_digest(digest: &Digest, data: &[u8]) -> Result<()> {
    let actual = Digest::of_bytes(digest.function, data);
    if actual != *digest {
        return Err(ClientError::CorruptBlob {
            expected: *digest,
            actual,
        });
    }
    Ok(())
}
