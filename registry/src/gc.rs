//! Online mark-and-sweep garbage collection.
//!
//! Only blobs the registry wrote (its `OWNED_BLOBS` keyspace) are candidates, so blobs
//! the build farm's CAS wrote are never touched. A candidate survives when any stored
//! manifest refers to it (as config, layer, or as the manifest itself), when it was
//! written or referenced within the grace period (a layer uploaded moments before its
//! manifest), or when the [`GcRoots`] hook says something outside the registry needs it.
//! Upload sessions are files apart from blobs and are never swept; idle ones expire.

use std::collections::HashSet;

use futures::TryStreamExt;
use kiln_store::ContentHash;

use crate::error::{RegistryError, Result};
use crate::RegistryState;

/// Blobs something outside the registry still needs (e.g. the CAS's live outputs).
#[async_trait::async_trait]
pub trait GcRoots: Send + Sync {
    /// The hashes to keep, asked once per GC run before any blob is judged. An error
    /// stops the run: without its roots, GC cannot know what is safe to delete.
    async fn referenced(&self) -> std::result::Result<HashSet<ContentHash>, String>;
}

/// What a GC run deleted, or would delete in a dry run.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub dry_run: bool,
    /// Digests of the blobs deleted (or that would be).
    pub deleted_blobs: Vec<String>,
    pub freed_bytes: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub kept_in_grace: usize,
    /// Unreferenced blobs kept because the [`GcRoots`] hook needs them.
    pub kept_as_roots: usize,
    /// Upload sessions cancelled for being idle past `gc.upload_ttl_secs`.
    pub expired_uploads: Vec<String>,
}

pub async fn run(state: &RegistryState, dry_run: bool) -> Result<GcReport> {
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let now = state.clock.now_millis();
    let upload_cutoff = now.saturating_sub(state.config.gc.upload_ttl_secs.saturating_mul(1000));
    let mut sessions = state.uploads.all();
    while let Some((id, session)) = sessions.try_next().await? {
        if session.updated_at_ms < upload_cutoff {
            if !dry_run {
                let guard = state.uploads.lock(&session.repository, &id).await?;
                state.uploads.cancel(guard).await?;
            }
            report.expired_uploads.push(id);
        }
    }

    let roots = state
        .gc_roots
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let roots = match roots {
        Some(roots) => roots
            .referenced()
            .await
            .map_err(|e| RegistryError::Internal(format!("GC roots: {e}")))?,
        None => HashSet::new(),
    };
    let grace_cutoff = now.saturating_sub(state.config.gc.grace_secs.saturating_mul(1000));
    // Exclusive: no manifest push or mount can add a reference while this decides.
    let _fence = state.gc_fence.write().await;
    // Mark: the live set holds hashes only (the records stream by); sweep: owned blobs
    // stream by too. A record that does not parse fails the run instead of being skipped.
    let mut live: HashSet<ContentHash> = HashSet::new();
    let mut manifests = state.index.all_manifests();
    while let Some((_, digest, record)) = manifests.try_next().await? {
        live.insert(digest);
        live.extend(record.blobs);
    }
    let mut doomed = Vec::new();
    let mut owned = state.index.owned_blobs();
    while let Some((hash, owned_since)) = owned.try_next().await? {
        if live.contains(&hash) {
            continue;
        }
        if owned_since > grace_cutoff {
            report.kept_in_grace += 1;
            continue;
        }
        if roots.contains(&hash) {
            report.kept_as_roots += 1;
            continue;
        }
        doomed.push(hash);
    }
    drop(live);
    if doomed.is_empty() {
        return Ok(report);
    }
    for hash in &doomed {
        let size = state.blobs.size_of(hash).await?.unwrap_or(0);
        report.freed_bytes += size;
        report.deleted_blobs.push(hash.oci());
        if dry_run {
            continue;
        }
        state.blobs.delete(hash).await?;
        state.index.forget_owned(hash).await?;
    }
    if !dry_run {
        let doomed: HashSet<ContentHash> = doomed.into_iter().collect();
        let mut links = state.index.blob_links();
        while let Some(link) = links.try_next().await? {
            if doomed.contains(&link.hash) {
                state
                    .index
                    .unlink_blob(&link.repository, &link.hash)
                    .await?;
            }
        }
        state.index.flush().await?;
    }
    tracing::debug!(?report, "gc finished");
    Ok(report)
}

/// Every blob the registry answers for, which the CAS's eviction must keep: the blobs it
/// wrote or referenced (until this GC lets them go) and every blob linked into a
/// repository (a layer mounted from the CAS is served from there).
pub(crate) async fn retained_blobs(state: &RegistryState) -> Result<HashSet<ContentHash>> {
    let mut retained = HashSet::new();
    let mut owned = state.index.owned_blobs();
    while let Some((hash, _)) = owned.try_next().await? {
        retained.insert(hash);
    }
    let mut links = state.index.blob_links();
    while let Some(link) = links.try_next().await? {
        retained.insert(link.hash);
    }
    Ok(retained)
}
