//! `kiln.admin.v1.Admin`: the operator's view of the farm (`kiln status`) and draining a
//! worker (`kiln drain`).

use std::sync::Arc;
use std::time::Instant;

use kiln_proto::admin::v1::{
    admin_server::Admin, CacheStatus, CreateTokenRequest, CreateTokenResponse, DrainWorkerRequest,
    DrainWorkerResponse, FarmStatus, GetStatusRequest, ListTokensRequest, ListTokensResponse,
    RegistryStatus, RepositoryStatus, RevokeTokenRequest, RevokeTokenResponse, StorageStatus,
};
use kiln_store::BlobStore;
use tonic::{Request, Response, Status};

use crate::auth::{self, caller_of, TokenStore};
use crate::counters::Counters;
use crate::execution::{proto_duration, Executor, Route};
use crate::secret::same_secret;
use crate::CoordinatorError;

/// A repository as `kiln status` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositorySummary {
    pub name: String,
    pub tags: u64,
    pub manifests: u64,
}

/// The registry's side of the status, when a registry runs in the coordinator's process.
/// The coordinator never imports the registry; the binary that runs both connects them.
#[tonic::async_trait]
pub trait RegistryCatalog: Send + Sync {
    /// The first `limit` repositories in name order, and whether there are more.
    async fn repositories(&self, limit: usize) -> Result<(Vec<RepositorySummary>, bool), String>;

    /// Whether the blob was pushed to the registry (an image's layer, config or
    /// manifest), so that the registry's own access rules, not the CAS's, govern reading
    /// it. One key lookup: it is asked on CAS reads when auth is on.
    async fn owns_blob(&self, hash: &kiln_store::ContentHash) -> Result<bool, String>;
}

/// How many repositories GetStatus lists: a status is read by a person, and a registry
/// may hold any number.
const STATUS_REPOSITORIES: usize = 100;

pub(crate) struct AdminService {
    executor: Executor,
    join_token: Option<String>,
    counters: Arc<Counters>,
    blobs: Arc<dyn BlobStore>,
    registry: Option<Arc<dyn RegistryCatalog>>,
    tokens: TokenStore,
    started: Instant,
}

impl AdminService {
    pub(crate) fn new(
        executor: Executor,
        join_token: Option<String>,
        counters: Arc<Counters>,
        blobs: Arc<dyn BlobStore>,
        registry: Option<Arc<dyn RegistryCatalog>>,
        tokens: TokenStore,
    ) -> Self {
        AdminService {
            executor,
            join_token,
            counters,
            blobs,
            registry,
            tokens,
            started: Instant::now(),
        }
    }

    async fn registry_status(&self) -> Result<Option<RegistryStatus>, CoordinatorError> {
        let Some(registry) = &self.registry else {
            return Ok(None);
        };
        let (repositories, more) = registry
            .repositories(STATUS_REPOSITORIES)
            .await
            .map_err(CoordinatorError::Internal)?;
        let repositories = repositories
            .into_iter()
            .map(|r| RepositoryStatus {
                name: r.name,
                tags: r.tags,
                manifests: r.manifests,
            })
            .collect();
        Ok(Some(RegistryStatus { repositories, more }))
    }

    /// The status (every repository's name among it) and the tokens are an admin's.
    fn require_admin<T>(request: &Request<T>) -> Result<(), CoordinatorError> {
        match caller_of(request) {
            caller if caller.is_admin() => Ok(()),
            auth::Caller::Anonymous(_) => Err(CoordinatorError::Unauthenticated(
                "the admin API needs a token with the admin scope".into(),
            )),
            _ => Err(CoordinatorError::PermissionDenied {
                scope: auth::Scope::Admin,
                instance: String::new(),
            }),
        }
    }

    /// DrainWorker needs the join token as a bearer token; with none configured no
    /// worker can join, and none may be drained either.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match (self.join_token.as_deref(), presented) {
            (Some(expected), Some(presented)) if same_secret(expected, presented) => Ok(()),
            (None, _) => Err(Status::permission_denied(
                "this coordinator has no join token, so no worker may be drained",
            )),
            _ => Err(Status::unauthenticated(
                "draining a worker needs the join token as `authorization: Bearer <token>`",
            )),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<FarmStatus>, Status> {
        Self::require_admin(&request)?;
        // The pool and the queue are the leader's: a follower's status is the leader's.
        let engine = match self.executor.route(&request)? {
            Route::Here(engine) => engine,
            Route::Leader(leader) => return leader.get_status(request).await,
        };
        let counters = self.counters.snapshot();
        let uptime = self.started.elapsed();
        Ok(Response::new(FarmStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime: Some(proto_duration(uptime)),
            workers: engine.worker_statuses(),
            queue: Some(engine.queue_status()),
            cache: Some(CacheStatus {
                action_cache_hits: counters.action_cache_hits,
                action_cache_misses: counters.action_cache_misses,
                actions_succeeded: counters.actions_succeeded,
                actions_failed: counters.actions_failed,
            }),
            storage: Some(StorageStatus {
                stored_bytes: self
                    .blobs
                    .stored_bytes()
                    .await
                    .map_err(CoordinatorError::from)?,
                cas_bytes_read: counters.cas_bytes_read,
                cas_bytes_written: counters.cas_bytes_written,
            }),
            registry: self.registry_status().await?,
        }))
    }

    async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        kiln_telemetry::current_span::set_attribute(
            "kiln.worker",
            request.get_ref().worker_id.clone(),
        );
        self.authorize(&request)?;
        let engine = match self.executor.route(&request)? {
            Route::Here(engine) => engine,
            Route::Leader(leader) => return leader.drain_worker(request).await,
        };
        let running = engine.drain_worker(&request.get_ref().worker_id)?;
        Ok(Response::new(DrainWorkerResponse {
            running: running as u32,
        }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        Self::require_admin(&request)?;
        Ok(Response::new(
            auth::create_token(&self.tokens, request.into_inner()).await?,
        ))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        Self::require_admin(&request)?;
        Ok(Response::new(auth::list_tokens(&self.tokens).await?))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        Self::require_admin(&request)?;
        auth::revoke_token(&self.tokens, &request.get_ref().id).await?;
        Ok(Response::new(RevokeTokenResponse {}))
    }
}
