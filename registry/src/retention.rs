//! Retention rules: keep the newest N branch-SHA tags per branch, and delete manifests
//! nothing refers to once they are older than a grace period.
//!
//! A manifest counts as referred to while a tag points at it, while an index that is
//! kept lists it, or while it is a referrer of a subject that is kept (signatures and
//! SBOMs live exactly as long as their image). The grace period runs from the push.
//! Deleted manifests leave their blobs to GC.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::TryStreamExt;
use kiln_store::ContentHash;

use crate::error::Result;
use crate::repository_index::{ManifestRecord, TagRecord};
use crate::tag_policy::{classify, TagKind};
use crate::RegistryState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedTag {
    pub repository: String,
    pub tag: String,
    pub digest: ContentHash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedManifest {
    pub repository: String,
    pub digest: ContentHash,
}

/// What a retention run deleted, or would delete in a dry run.
#[derive(Debug, Clone, Default)]
pub struct RetentionReport {
    pub dry_run: bool,
    pub deleted_tags: Vec<RemovedTag>,
    pub deleted_manifests: Vec<RemovedManifest>,
}

pub async fn run(state: &RegistryState, dry_run: bool) -> Result<RetentionReport> {
    let rules = &state.config.retention;
    let mut report = RetentionReport {
        dry_run,
        ..RetentionReport::default()
    };
    if rules.keep_branch_tags.is_none() && rules.untagged_grace_secs.is_none() {
        return Ok(report);
    }
    // Exclusive, so no index can be pushed referring to a manifest being deleted.
    let _fence = state.gc_fence.write().await;
    let mut last: Option<String> = None;
    loop {
        let page = state
            .index
            .repositories(last.as_deref(), state.config.limits.max_page_size)
            .await?;
        let Some(page_last) = page.last().cloned() else {
            break;
        };
        for repository in page {
            plan_repository(state, &repository, &mut report).await?;
        }
        last = Some(page_last);
    }
    if !dry_run {
        for removed in &report.deleted_tags {
            state
                .index
                .remove_tag(&removed.repository, &removed.tag)
                .await?;
        }
        for removed in &report.deleted_manifests {
            state
                .index
                .remove_manifest(&removed.repository, &removed.digest)
                .await?;
        }
        state.index.flush().await?;
    }
    Ok(report)
}

/// Plans one repository's deletions. Its tags and manifest records are held while it is
/// planned: the rules relate them to each other.
async fn plan_repository(
    state: &RegistryState,
    repository: &str,
    report: &mut RetentionReport,
) -> Result<()> {
    let rules = &state.config.retention;
    let tags: Vec<(String, TagRecord)> = state.index.all_tags(repository).try_collect().await?;
    let mut removed_tags: HashSet<String> = HashSet::new();
    if let Some(keep) = rules.keep_branch_tags {
        let mut by_branch: BTreeMap<String, Vec<(u64, &str, ContentHash)>> = BTreeMap::new();
        for (tag, record) in &tags {
            if let TagKind::BranchSha { branch } = classify(tag) {
                by_branch.entry(branch).or_default().push((
                    record.pushed_at_ms,
                    tag,
                    record.digest,
                ));
            }
        }
        for (_, mut branch_tags) in by_branch {
            // Newest first; the tag name breaks ties between pushes in the same millisecond.
            branch_tags.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)));
            for (_, tag, digest) in branch_tags.into_iter().skip(keep) {
                removed_tags.insert(tag.to_string());
                report.deleted_tags.push(RemovedTag {
                    repository: repository.to_string(),
                    tag: tag.to_string(),
                    digest,
                });
            }
        }
    }
    let Some(grace) = rules.untagged_grace_secs else {
        return Ok(());
    };
    let cutoff = state
        .clock
        .now_millis()
        .saturating_sub(grace.saturating_mul(1000));
    let manifests: HashMap<ContentHash, ManifestRecord> =
        state.index.manifests_of(repository).try_collect().await?;
    let tagged: HashSet<ContentHash> = tags
        .iter()
        .filter(|(tag, _)| !removed_tags.contains(tag))
        .map(|(_, record)| record.digest)
        .collect();
    let mut doomed: HashSet<ContentHash> = manifests
        .iter()
        .filter(|(digest, record)| !tagged.contains(*digest) && record.pushed_at_ms < cutoff)
        .map(|(digest, _)| *digest)
        .collect();
    // Spare whatever a surviving manifest still needs, until nothing changes.
    loop {
        let spared: Vec<ContentHash> = doomed
            .iter()
            .copied()
            .filter(|digest| {
                let record = &manifests[digest];
                let needed_as_child = manifests
                    .iter()
                    .any(|(other, r)| !doomed.contains(other) && r.children.contains(digest));
                let subject_survives = record
                    .subject
                    .is_some_and(|s| manifests.contains_key(&s) && !doomed.contains(&s));
                needed_as_child || subject_survives
            })
            .collect();
        if spared.is_empty() {
            break;
        }
        for digest in spared {
            doomed.remove(&digest);
        }
    }
    let mut doomed: Vec<ContentHash> = doomed.into_iter().collect();
    doomed.sort_unstable_by_key(ContentHash::oci);
    report
        .deleted_manifests
        .extend(doomed.into_iter().map(|digest| RemovedManifest {
            repository: repository.to_string(),
            digest,
        }));
    Ok(())
}
