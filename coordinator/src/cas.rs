//! The ContentAddressableStorage service: existence checks, batch upload and download
//! of small blobs, and GetTree.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use kiln_proto::reapi::{
    batch_read_blobs_response, batch_update_blobs_request, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage, BatchReadBlobsRequest,
    BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetChunkMappingRequest,
    GetChunkMappingResponse, GetTreeRequest, GetTreeResponse, RegisterChunkMappingRequest,
    RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest,
    SplitBlobResponse,
};
use kiln_store::{BlobStore, Digest, DigestFunction, ExpectedDigest};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{authorize, caller_of, Caller, RegistryBlobGuard, Scope};
use crate::counters::Counters;
use crate::error::ok_rpc_status;
use crate::rpc_attributes;
use crate::tree::{TreeLimits, TreePages, TreeWalk};
use crate::{reapi_digest, zstd_codec, CoordinatorConfig, CoordinatorError};

/// How many blobs of one batch are stored or read at the same time.
const BATCH_CONCURRENCY: usize = 16;
/// Smaller blobs are returned uncompressed even when zstd is acceptable: the frame
/// overhead would eat the gain.
const MIN_COMPRESSIBLE_SIZE: usize = 512;

pub(crate) struct CasService {
    blobs: Arc<dyn BlobStore>,
    config: Arc<CoordinatorConfig>,
    counters: Arc<Counters>,
    registry_blobs: RegistryBlobGuard,
}

impl CasService {
    pub(crate) fn new(
        blobs: Arc<dyn BlobStore>,
        config: Arc<CoordinatorConfig>,
        counters: Arc<Counters>,
        registry_blobs: RegistryBlobGuard,
    ) -> Self {
        CasService {
            blobs,
            config,
            counters,
            registry_blobs,
        }
    }

    /// Refuses a batch whose blobs add up to more than the advertised limit.
    fn check_batch_size(&self, sizes: impl Iterator<Item = u64>) -> Result<(), CoordinatorError> {
        let total = sizes.fold(0u64, u64::saturating_add);
        let limit = self.config.max_batch_total_size_bytes;
        if total > limit {
            return Err(CoordinatorError::InvalidArgument(format!(
                "the batch holds {total} bytes, over max_batch_total_size_bytes ({limit}); \
                 split it or use ByteStream for large blobs"
            )));
        }
        Ok(())
    }

    async fn find_missing(
        &self,
        request: FindMissingBlobsRequest,
    ) -> Result<FindMissingBlobsResponse, CoordinatorError> {
        let function = reapi_digest::digest_function(request.digest_function)?;
        let digests = reapi_digest::parse_all(function, &request.blob_digests, "blob_digests")?;
        // Presence is answered from the store's in-memory index. Access times are not
        // refreshed here: a syscall per digest would dominate the call, and blobs a build
        // goes on to use are refreshed by the action cache hit that references them.
        let present = self.blobs.has_many(&digests).await?;
        let missing_blob_digests = request
            .blob_digests
            .into_iter()
            .zip(present)
            .filter_map(|(digest, present)| (!present).then_some(digest))
            .collect();
        Ok(FindMissingBlobsResponse {
            missing_blob_digests,
        })
    }

    async fn batch_update(
        &self,
        request: BatchUpdateBlobsRequest,
    ) -> Result<BatchUpdateBlobsResponse, CoordinatorError> {
        let function = reapi_digest::digest_function(request.digest_function)?;
        self.check_batch_size(request.requests.iter().map(|r| {
            let declared = r.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64);
            declared.max(r.data.len() as u64)
        }))?;
        let responses = futures::stream::iter(request.requests.into_iter().enumerate())
            .map(|(index, entry)| async move {
                let digest = entry.digest.clone();
                let status = match self.update_one(function, index, entry).await {
                    Ok(()) => ok_rpc_status(),
                    Err(e) => e.into_rpc_status(),
                };
                batch_update_blobs_response::Response {
                    digest,
                    status: Some(status),
                }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(BatchUpdateBlobsResponse { responses })
    }

    async fn update_one(
        &self,
        function: DigestFunction,
        index: usize,
        entry: batch_update_blobs_request::Request,
    ) -> Result<(), CoordinatorError> {
        let digest = reapi_digest::parse(function, entry.digest.as_ref(), || {
            format!("requests[{index}].digest")
        })?;
        let data = match compressor::Value::try_from(entry.compressor) {
            Ok(compressor::Value::Identity) => entry.data,
            Ok(compressor::Value::Zstd) => zstd_codec::decompress(&entry.data, digest.size)?,
            _ => {
                return Err(CoordinatorError::bad_request(
                    format!("requests[{index}].compressor"),
                    format!("compressor {} is not supported", entry.compressor),
                ))
            }
        };
        // The store hashes the data as it writes and refuses a mismatch.
        self.blobs
            .put(ExpectedDigest::Exact(digest), Bytes::from(data))
            .await?;
        self.counters.cas_written(digest.size);
        Ok(())
    }

    async fn batch_read(
        &self,
        caller: &Caller,
        request: BatchReadBlobsRequest,
    ) -> Result<BatchReadBlobsResponse, CoordinatorError> {
        let function = reapi_digest::digest_function(request.digest_function)?;
        let digests = reapi_digest::parse_all(function, &request.digests, "digests")?;
        self.check_batch_size(digests.iter().map(|d| d.size))?;
        let zstd_acceptable = request
            .acceptable_compressors
            .contains(&(compressor::Value::Zstd as i32));
        let responses = futures::stream::iter(request.digests.into_iter().zip(digests))
            .map(|(wire_digest, digest)| async move {
                let mut response = batch_read_blobs_response::Response {
                    digest: Some(wire_digest),
                    ..Default::default()
                };
                let read = match self.registry_blobs.check(caller, &digest).await {
                    Ok(()) => self.read_one(&digest, zstd_acceptable).await,
                    Err(e) => Err(e),
                };
                match read {
                    Ok((data, compressor)) => {
                        response.data = data;
                        response.compressor = compressor as i32;
                        response.status = Some(ok_rpc_status());
                    }
                    Err(e) => response.status = Some(e.into_rpc_status()),
                }
                response
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(BatchReadBlobsResponse { responses })
    }

    async fn read_one(
        &self,
        digest: &Digest,
        zstd_acceptable: bool,
    ) -> Result<(Vec<u8>, compressor::Value), CoordinatorError> {
        if self.blobs.size_of(&digest.content_hash()).await? != Some(digest.size) {
            return Err(CoordinatorError::NotFound(format!(
                "{digest} is not in the CAS"
            )));
        }
        let data = Vec::from(self.blobs.read_all(digest).await?);
        self.counters.cas_read(data.len() as u64);
        if zstd_acceptable && data.len() >= MIN_COMPRESSIBLE_SIZE {
            let compressed = zstd_codec::compress(&data, self.config.zstd_level)?;
            if compressed.len() < data.len() {
                return Ok((compressed, compressor::Value::Zstd));
            }
        }
        Ok((data, compressor::Value::Identity))
    }

    async fn get_tree_pages(&self, request: GetTreeRequest) -> Result<TreePages, CoordinatorError> {
        let function = reapi_digest::digest_function(request.digest_function)?;
        let root = reapi_digest::parse(function, request.root_digest.as_ref(), || {
            "root_digest".into()
        })?;
        let skip = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse::<u64>().map_err(|_| {
                CoordinatorError::bad_request("page_token", "is not a token this server handed out")
            })?
        };
        let max_page = self.config.max_tree_page_size.max(1) as usize;
        let page_size = match request.page_size {
            0 => max_page,
            n if n < 0 => {
                return Err(CoordinatorError::bad_request(
                    "page_size",
                    "must not be negative",
                ))
            }
            n => (n as usize).min(max_page),
        };
        let limits = TreeLimits {
            max_directories: self.config.max_tree_directories,
            max_message_bytes: self.config.max_message_bytes,
        };
        let walk = TreeWalk::start(self.blobs.clone(), root, limits).await?;
        Ok(TreePages::new(walk, skip, page_size))
    }
}

fn unimplemented<T>(what: &'static str) -> Result<T, Status> {
    Err(CoordinatorError::Unimplemented(what).into())
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let instance = &request.get_ref().instance_name;
        rpc_attributes::instance(instance);
        // Every upload starts with it, so either scope may ask what is missing.
        if !caller_of(&request).allows(Scope::CasWrite, instance) {
            authorize(&request, Scope::CasRead, instance)?;
        }
        rpc_attributes::count("kiln.digests", request.get_ref().blob_digests.len());
        Ok(Response::new(
            self.find_missing(request.into_inner()).await?,
        ))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        rpc_attributes::instance(&request.get_ref().instance_name);
        authorize(&request, Scope::CasWrite, &request.get_ref().instance_name)?;
        rpc_attributes::count("kiln.blobs", request.get_ref().requests.len());
        Ok(Response::new(
            self.batch_update(request.into_inner()).await?,
        ))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        rpc_attributes::instance(&request.get_ref().instance_name);
        authorize(&request, Scope::CasRead, &request.get_ref().instance_name)?;
        rpc_attributes::count("kiln.blobs", request.get_ref().digests.len());
        let caller = caller_of(&request);
        Ok(Response::new(
            self.batch_read(&caller, request.into_inner()).await?,
        ))
    }

    type GetTreeStream = BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        rpc_attributes::instance(&request.get_ref().instance_name);
        authorize(&request, Scope::CasRead, &request.get_ref().instance_name)?;
        let pages = self.get_tree_pages(request.into_inner()).await?;
        Ok(Response::new(
            pages.into_stream().map_err(Status::from).boxed(),
        ))
    }

    async fn split_blob(
        &self,
        _request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        unimplemented("SplitBlob")
    }

    type GetChunkMappingStream = BoxStream<'static, Result<GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        _request: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        unimplemented("GetChunkMapping")
    }

    async fn splice_blob(
        &self,
        _request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        unimplemented("SpliceBlob")
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        unimplemented("RegisterChunkMapping")
    }
}
