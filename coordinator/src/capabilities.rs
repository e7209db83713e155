//! The Capabilities service: what this server supports, so clients pick digest
//! functions, compressors and batch sizes that work.

use kiln_proto::reapi::{
    self, capabilities_server::Capabilities, compressor, digest_function,
    symlink_absolute_path_strategy, ActionCacheUpdateCapabilities, CacheCapabilities,
    ExecutionCapabilities, GetCapabilitiesRequest, ServerCapabilities,
};
use kiln_proto::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::CoordinatorConfig;

pub(crate) struct CapabilitiesService {
    capabilities: ServerCapabilities,
}

impl CapabilitiesService {
    pub(crate) fn new(config: &CoordinatorConfig) -> Self {
        let digest_functions = vec![
            digest_function::Value::Sha256 as i32,
            digest_function::Value::Blake3 as i32,
        ];
        let compressors = vec![
            compressor::Value::Identity as i32,
            compressor::Value::Zstd as i32,
        ];
        let version = |major, minor| SemVer {
            major,
            minor,
            patch: 0,
            prerelease: String::new(),
        };
        let capabilities = ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: digest_functions.clone(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: i64::try_from(config.max_batch_total_size_bytes)
                    .unwrap_or(i64::MAX),
                // Blobs are opaque to a cache; absolute symlink targets in results are the
                // client's business.
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: compressors.clone(),
                supported_batch_update_compressors: compressors,
                ..Default::default()
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                digest_function: digest_function::Value::Sha256 as i32,
                exec_enabled: true,
                digest_functions,
                ..Default::default()
            }),
            low_api_version: Some(version(2, 0)),
            high_api_version: Some(version(2, 3)),
            ..Default::default()
        };
        CapabilitiesService { capabilities }
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        Ok(Response::new(self.capabilities.clone()))
    }
}
