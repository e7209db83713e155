//! kiln-registry: kiln's OCI registry.
//!
//! - The OCI Distribution Spec v1.1 HTTP API with Docker Registry v2 compatibility
//!   ([`Registry::router`], [`Registry::serve`]); requests are parsed into an
//!   [`endpoint::Endpoint`] and errors mapped once to OCI bodies by [`RegistryError`].
//! - Per-repository tag policy (`tag_policy`), auth with the Docker token flow (`auth`),
//!   retention rules and online mark-and-sweep GC ([`Registry::run_retention`],
//!   [`Registry::run_gc`]).
//!
//! Blobs, manifest bytes included, live in the [`BlobStore`] the build farm's CAS shares;
//! everything else is a small record in the [`MetadataStore`].

mod auth;
mod blob_api;
mod call;
mod clock;
mod config;
pub mod endpoint;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod gc;
mod http;
mod listing_api;
mod manifest;
mod manifest_api;
mod operation;
mod repository_index;
mod request_body;
mod retention;
mod serving;
mod tag_policy;
mod upload_session;
mod usage_metrics;

use std::future::Future;
use std::sync::Arc;

use kiln_store::{BlobStore, MetadataStore};

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    Action, AuthConfig, GcConfig, GrantConfig, LimitsConfig, RegistryConfig, RetentionConfig,
    TagPolicyConfig, UserConfig,
};
pub use error::RegistryError;
pub use gc::{GcReport, GcRoots};
pub use retention::{RemovedManifest, RemovedTag, RetentionReport};
pub use tag_policy::{classify as classify_tag, TagKind};
pub use usage_metrics::{describe_metrics, names as metric_names, REQUEST_BUCKETS};

use crate::auth::Authenticator;
use crate::repository_index::RepositoryIndex;
use crate::tag_policy::TagPolicy;
use crate::upload_session::UploadSessions;

/// Everything the request handlers share.
pub(crate) struct RegistryState {
    pub config: RegistryConfig,
    pub blobs: Arc<dyn BlobStore>,
    pub index: RepositoryIndex,
    pub uploads: UploadSessions,
    pub policy: TagPolicy,
    pub auth: Authenticator,
    /// Bounds concurrently streaming uploads; beyond it requests get 429.
    pub upload_slots: Arc<tokio::sync::Semaphore>,
    /// Manifest pushes and mounts hold it shared while they check and record references;
    /// GC and retention hold it exclusively while they decide and delete, so a manifest
    /// never lands referring to a blob being collected.
    pub gc_fence: tokio::sync::RwLock<()>,
    pub gc_roots: std::sync::RwLock<Option<Arc<dyn GcRoots>>>,
    /// What `/readyz` answers from; unset, serving means ready.
    pub readiness: std::sync::RwLock<Option<ReadinessProbe>>,
    /// Where record timestamps and GC/retention cut-offs come from.
    pub clock: Arc<dyn Clock>,
}

/// Answers `/readyz`: whether the process is ready to serve, and one line saying so or
/// why not.
pub type ReadinessProbe = Arc<dyn Fn() -> (bool, String) + Send + Sync>;

/// A repository and how much it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositoryStats {
    pub name: String,
    pub tags: u64,
    pub manifests: u64,
}

/// The OCI registry. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Registry {
    state: Arc<RegistryState>,
    /// Set: the registry serves HTTPS (HTTP/1.1 over TLS).
    tls: Option<Arc<kiln_tls::rustls::ServerConfig>>,
}

impl Registry {
    /// Opens the registry over the shared blob store and the metadata store, checking
    /// the configuration (tag patterns, password hashes, token key).
    pub fn open(
        config: RegistryConfig,
        blobs: Arc<dyn BlobStore>,
        metadata: Arc<dyn MetadataStore>,
    ) -> Result<Self, RegistryError> {
        Self::open_with_clock(config, blobs, metadata, Arc::new(SystemClock))
    }

    /// [`Registry::open`] on a clock of the caller's (tests decide what time it is).
    pub fn open_with_clock(
        config: RegistryConfig,
        blobs: Arc<dyn BlobStore>,
        metadata: Arc<dyn MetadataStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, RegistryError> {
        let policy = TagPolicy::new(&config.tag_policies)?;
        let auth = Authenticator::new(&config.auth)?;
        if config.limits.max_page_size == 0 {
            return Err(RegistryError::Config(
                "limits.max_page_size must be at least 1".into(),
            ));
        }
        let state = RegistryState {
            upload_slots: Arc::new(tokio::sync::Semaphore::new(
                config.limits.max_concurrent_uploads,
            )),
            index: RepositoryIndex::new(metadata.clone(), clock.clone()),
            uploads: UploadSessions::new(metadata, blobs.clone(), clock.clone())
                .shared(config.shared_upload_sessions),
            clock,
            blobs,
            policy,
            auth,
            gc_fence: tokio::sync::RwLock::new(()),
            gc_roots: std::sync::RwLock::new(None),
            readiness: std::sync::RwLock::new(None),
            config,
        };
        Ok(Registry {
            state: Arc::new(state),
            tls: None,
        })
    }

    /// Serves HTTPS with these files (see kiln-tls: certificates reload as they change).
    pub fn with_tls(mut self, files: &kiln_tls::TlsFiles) -> Result<Self, RegistryError> {
        let config = kiln_tls::server_config(files, &[b"http/1.1"])
            .map_err(|e| RegistryError::Config(e.to_string()))?;
        self.tls = Some(config);
        Ok(self)
    }

    /// Tells the garbage collector about blobs something outside the registry (the build
    /// farm's CAS) still needs. Without it, GC only ever deletes blobs the registry wrote.
    pub fn set_gc_roots(&self, roots: Arc<dyn GcRoots>) {
        *self
            .state
            .gc_roots
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(roots);
    }

    /// Makes `/readyz` answer from `probe`, the process's one readiness (so that every
    /// port's probe says the same: not ready while starting or shutting down, or
    /// whatever else the process knows that the registry does not).
    pub fn set_readiness(&self, probe: ReadinessProbe) {
        *self
            .state
            .readiness
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(probe);
    }

    /// The HTTP API as an axum router (for embedding next to other services).
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Serves the API on `listener` until `shutdown` resolves, running retention and GC
    /// on their configured intervals meanwhile.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RegistryError> {
        let addr = listener.local_addr()?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.state.auth.bind_realm(scheme, addr)?;
        tracing::info!("registry listening on {scheme}://{addr}");
        let maintenance = self.spawn_maintenance();
        let limits = &self.state.config.limits;
        let limit = kiln_tls::ConnectionLimit::new(limits.max_connections_per_address);
        let headers = std::time::Duration::from_secs(limits.header_read_timeout_secs.max(1));
        match &self.tls {
            Some(config) => {
                let listener = kiln_tls::TlsListener::new(listener, config.clone(), limit)?;
                serving::serve(listener, self.router(), headers, shutdown).await
            }
            None => {
                let listener = kiln_tls::PlainListener::new(listener, limit)?;
                serving::serve(listener, self.router(), headers, shutdown).await
            }
        }
        for task in maintenance {
            task.abort();
        }
        Ok(())
    }

    /// Applies the retention rules; with `dry_run`, only reports what they would delete.
    pub async fn run_retention(&self, dry_run: bool) -> Result<RetentionReport, RegistryError> {
        let report = retention::run(&self.state, dry_run).await?;
        usage_metrics::record_retention(&report);
        Ok(report)
    }

    /// Collects unreferenced blobs the registry wrote and cancels expired upload
    /// sessions; with `dry_run`, only reports.
    pub async fn run_gc(&self, dry_run: bool) -> Result<GcReport, RegistryError> {
        let report = gc::run(&self.state, dry_run).await?;
        usage_metrics::record_gc(&report);
        Ok(report)
    }

    /// The blobs the registry answers for (see [`kiln_store::RetainedBlobs`]).
    pub async fn retained_blobs(
        &self,
    ) -> Result<std::collections::HashSet<kiln_store::ContentHash>, RegistryError> {
        gc::retained_blobs(&self.state).await
    }

    /// Whether the blob was pushed through the registry (the CAS keeps such blobs from
    /// readers without the admin scope when its auth is on).
    pub async fn owns_blob(&self, hash: &kiln_store::ContentHash) -> Result<bool, RegistryError> {
        self.state.index.owns(hash).await
    }

    /// The first `limit` repositories with their tag and manifest counts, for `kiln
    /// status`, and whether more exist.
    pub async fn repository_stats(
        &self,
        limit: usize,
    ) -> Result<(Vec<RepositoryStats>, bool), RegistryError> {
        let index = &self.state.index;
        let mut names = index.repositories(None, limit.saturating_add(1)).await?;
        let more = names.len() > limit;
        names.truncate(limit);
        let mut stats = Vec::with_capacity(names.len());
        for name in names {
            let (manifests, tags) = index.counts(&name).await?;
            stats.push(RepositoryStats {
                name,
                tags,
                manifests,
            });
        }
        Ok((stats, more))
    }

    /// Starts the periodic retention and GC tasks that are configured.
    fn spawn_maintenance(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let retention = &self.state.config.retention;
        let retention_rules =
            retention.keep_branch_tags.is_some() || retention.untagged_grace_secs.is_some();
        let mut tasks = Vec::new();
        if retention_rules && retention.interval_secs > 0 {
            let registry = self.clone();
            tasks.push(tokio::spawn(every(retention.interval_secs, move || {
                let registry = registry.clone();
                async move {
                    match registry.run_retention(false).await {
                        Ok(report) => tracing::info!(
                            tags = report.deleted_tags.len(),
                            manifests = report.deleted_manifests.len(),
                            "retention applied"
                        ),
                        Err(e) => tracing::warn!(error = %e, "retention failed"),
                    }
                }
            })));
        }
        if self.state.config.gc.interval_secs > 0 {
            let registry = self.clone();
            tasks.push(tokio::spawn(every(
                self.state.config.gc.interval_secs,
                move || {
                    let registry = registry.clone();
                    async move {
                        match registry.run_gc(false).await {
                            Ok(report) => tracing::info!(
                                blobs = report.deleted_blobs.len(),
                                bytes = report.freed_bytes,
                                "garbage collected"
                            ),
                            Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                        }
                    }
                },
            )));
        }
        tasks
    }
}

/// Runs `job` every `secs` seconds, the first time one period after start.
async fn every<F, Fut>(secs: u64, job: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let period = std::time::Duration::from_secs(secs);
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        job().await;
    }
}

/// The CAS's eviction keeps every blob the registry answers for.
#[async_trait::async_trait]
impl kiln_store::RetainedBlobs for Registry {
    async fn retained(&self) -> Result<std::collections::HashSet<kiln_store::ContentHash>, String> {
        self.retained_blobs().await.map_err(|e| e.to_string())
    }
}
