//! The eviction pass: least recently used first, between the watermarks, never touching
//! what must stay.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::TryStreamExt;

use super::{retained_union, saturating_sub, BoundedBlobStore};
use crate::{ContentHash, Result};

/// How big the store may grow and how eviction keeps it there.
#[derive(Clone, Debug)]
pub struct EvictionPolicy {
    /// Writes that would take the store past this are refused.
    pub max_bytes: u64,
    /// A pass starts once the store holds more than this fraction of `max_bytes`…
    pub high_watermark: f64,
    /// …and removes blobs until it holds no more than this fraction.
    pub low_watermark: f64,
    /// Blobs used within this long are never evicted, so that a FindMissingBlobs answer
    /// still holds when the Execute or the manifest that relies on it arrives.
    pub grace: Duration,
    /// How often a pass runs when nothing wakes it earlier; accesses are handed to the
    /// backend at the same rhythm.
    pub interval: Duration,
    /// Blobs unused for longer than this are evicted whatever the store's size (an
    /// object store, which has room but should not keep what nobody uses). With it set,
    /// every pass lists the store, so its interval should be long.
    pub max_age: Option<Duration>,
}

impl EvictionPolicy {
    /// The limit with kiln's default watermarks (90 % / 80 %), grace (10 minutes) and
    /// interval (10 seconds).
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        EvictionPolicy {
            max_bytes,
            high_watermark: 0.9,
            low_watermark: 0.8,
            grace: Duration::from_secs(600),
            interval: Duration::from_secs(10),
            max_age: None,
        }
    }

    pub(super) fn high_bytes(&self) -> u64 {
        (self.max_bytes as f64 * self.high_watermark) as u64
    }

    fn low_bytes(&self) -> u64 {
        (self.max_bytes as f64 * self.low_watermark) as u64
    }
}

/// Blobs that eviction must keep whatever their age. The registry is one: a blob that a
/// manifest references, or that it holds within its own grace, is the registry's until
/// its GC lets go.
#[async_trait]
pub trait RetainedBlobs: Send + Sync {
    /// Asked once per pass, before any blob is judged. An error stops the pass: without
    /// it, eviction cannot know what is safe to remove.
    async fn retained(&self) -> std::result::Result<HashSet<ContentHash>, String>;
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvictionReport {
    /// The store's usage when the pass began, after a fresh measurement.
    pub used_before: u64,
    pub used_after: u64,
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    /// Candidates spared: retained, or used within the grace period or since the last
    /// pass (accesses reach the backend once per pass, so within one interval they are
    /// all equally recent).
    pub kept_retained: u64,
    pub kept_in_grace: u64,
}

impl BoundedBlobStore {
    /// Hands recent accesses to the backend, measures the store, and evicts if it is over
    /// its high watermark, or anything older than the policy's `max_age`.
    pub async fn evict_once(&self) -> Result<EvictionReport> {
        let _one_pass = self.shared.pass.lock().await;
        let used_since_last_pass = self.hand_accesses_to_backend().await?;
        self.measure().await?;
        let used_before = self.shared.used();
        let mut report = EvictionReport {
            used_before,
            used_after: used_before,
            ..Default::default()
        };
        let over_limit = used_before > self.shared.policy.high_bytes();
        if !over_limit && self.shared.policy.max_age.is_none() {
            return Ok(report);
        }
        let sources = self
            .shared
            .retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let retained = retained_union(sources).await?;
        let now = SystemTime::now();
        let grace_cutoff = now
            .checked_sub(self.shared.policy.grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let age_cutoff = self
            .shared
            .policy
            .max_age
            .and_then(|age| now.checked_sub(age));
        let mut candidates = Vec::new();
        let mut listed = self.inner.list();
        while let Some(blob) = listed.try_next().await? {
            if blob.hash.is_empty_blob() {
                continue;
            }
            if retained.contains(&blob.hash) {
                report.kept_retained += 1;
            } else if blob.accessed > grace_cutoff || used_since_last_pass.contains(&blob.hash) {
                report.kept_in_grace += 1;
            } else {
                candidates.push((blob.accessed, blob.hash, blob.size));
            }
        }
        candidates.sort_unstable_by_key(|(accessed, _, _)| *accessed);
        let target = self.shared.policy.low_bytes();
        for (accessed, hash, size) in candidates {
            // Oldest first: the expired ones go whatever the size, then the rest only
            // while the store is above its low watermark.
            let expired = age_cutoff.is_some_and(|cutoff| accessed < cutoff);
            if !expired && self.shared.used() <= target {
                break;
            }
            // Used since it was listed: it stays (the next pass sees its new time).
            if self.shared.was_used_recently(&hash) {
                report.kept_in_grace += 1;
                continue;
            }
            if self.inner.delete(&hash).await? {
                saturating_sub(&self.shared.measured, size);
                report.evicted_blobs += 1;
                report.evicted_bytes += size;
            }
        }
        report.used_after = self.shared.used();
        let label = self.shared.label;
        metrics::counter!("kiln_cas_evicted_blobs_total", "store" => label)
            .increment(report.evicted_blobs);
        metrics::counter!("kiln_cas_evicted_bytes_total", "store" => label)
            .increment(report.evicted_bytes);
        if report.evicted_blobs > 0 || over_limit {
            tracing::info!(?report, "evicted least recently used blobs");
        }
        Ok(report)
    }

    /// Runs [`BoundedBlobStore::evict_once`] every interval, and whenever a write crosses
    /// the high watermark, until `stop` resolves. Errors are logged; the next pass tries
    /// again.
    pub async fn run_eviction(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let passes = async {
            loop {
                if let Err(e) = self.evict_once().await {
                    tracing::warn!(error = %e, "eviction pass failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(self.shared.policy.interval) => {}
                    () = self.shared.wake.notified() => {}
                }
            }
        };
        tokio::select! {
            () = passes => {}
            () = stop => {}
        }
    }

    /// Hands the accesses noted since the last pass to the backend; returns them.
    async fn hand_accesses_to_backend(&self) -> Result<HashSet<ContentHash>> {
        let recent = self.shared.take_recent();
        for chunk in recent.chunks(10_000) {
            self.inner.touch(chunk).await?;
        }
        Ok(recent.into_iter().collect())
    }

    /// Replaces the running account with the backend's own figure. Commits that land
    /// while it is asked for stay counted (at worst twice, until the next measurement).
    async fn measure(&self) -> Result<()> {
        let committed_before = self.shared.committed.load(Ordering::Relaxed);
        let stored = self.inner.stored_bytes().await?;
        self.shared.measured.store(stored, Ordering::Relaxed);
        saturating_sub(&self.shared.committed, committed_before);
        metrics::gauge!("kiln_cas_used_bytes", "store" => self.shared.label)
            .set(self.shared.used() as f64);
        Ok(())
    }
}
