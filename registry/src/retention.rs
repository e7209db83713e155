//! Retention rules: keep the newest N branch-SHA tags per branch, and delete manifests
//! nothing refers to once they are older than a grace period.
//!
//! A manifest counts as referred to while a tag points at it, while an index that is
//! kept lists it, or while it is a referrer of a subject that is kept (signatures and
//! SBOMs live exactly as long as their image). The grace period runs from the push.
//! Deleted manifests leave their blobs to GC.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::Result;
use crate::repository_index::{now_millis, ManifestRecord};
use crate::tag_policy::{classify, TagKind};
use crate::RegistryState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedTag {
    pub repository: String,
    pub tag: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedManifest {
    pub repository: String,
    pub digest: String,
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
            .repositories(last.as_deref(), state.config.limits.max_page_size)?;
        let Some(page_last) = page.last().cloned() else {
            break;
        };
        for repository in page {
            plan_repository(state, &repository, &mut report)?;
        }
        last = Some(page_last);
    }
    if !dry_run {
        for removed in &report.deleted_tags {
            state.index.remove_tag(&removed.repository, &removed.tag)?;
        }
        for removed in &report.deleted_manifests {
            state
                .index
                .remove_manifest(&removed.repository, &removed.digest)?;
        }
        state.index.flush().await?;
    }
    Ok(report)
}

fn plan_repository(
    state: &RegistryState,
    repository: &str,
    report: &mut RetentionReport,
) -> Result<()> {
    let rules = &state.config.retention;
    let tags = state.index.tags(repository, None, usize::MAX)?;
    let mut removed_tags: HashSet<String> = HashSet::new();
    if let Some(keep) = rules.keep_branch_tags {
        let mut by_branch: BTreeMap<String, Vec<(u64, &str, &str)>> = BTreeMap::new();
        for (tag, record) in &tags {
            if let TagKind::BranchSha { branch } = classify(tag) {
                by_branch.entry(branch).or_default().push((
                    record.pushed_at_ms,
                    tag,
                    &record.digest,
                ));
            }
        }
        for (_, mut branch_tags) in by_branch {
            // Newest first; the tag name breaks ties between pushes in the same second.
            branch_tags.sort_by(|a, b| b.cmp(a));
            for (_, tag, digest) in branch_tags.into_iter().skip(keep) {
                removed_tags.insert(tag.to_string());
                report.deleted_tags.push(RemovedTag {
                    repository: repository.to_string(),
                    tag: tag.to_string(),
                    digest: digest.to_string(),
                });
            }
        }
    }
    let Some(grace) = rules.untagged_grace_secs else {
        return Ok(());
    };
    let cutoff = now_millis().saturating_sub(grace.saturating_mul(1000));
    let manifests: HashMap<String, ManifestRecord> =
        state.index.manifests_of(repository)?.into_iter().collect();
    let tagged: HashSet<&str> = tags
        .iter()
        .filter(|(tag, _)| !removed_tags.contains(tag))
        .map(|(_, record)| record.digest.as_str())
        .collect();
    let mut doomed: HashSet<&str> = manifests
        .iter()
        .filter(|(digest, record)| {
            !tagged.contains(digest.as_str()) && record.pushed_at_ms < cutoff
        })
        .map(|(digest, _)| digest.as_str())
        .collect();
    // Spare whatever a surviving manifest still needs, until nothing changes.
    loop {
        let spared: Vec<&str> = doomed
            .iter()
            .copied()
            .filter(|digest| {
                let record = &manifests[*digest];
                let needed_as_child = manifests.iter().any(|(other, r)| {
                    !doomed.contains(other.as_str()) && r.children.iter().any(|c| c == digest)
                });
                let subject_survives = record
                    .subject
                    .as_deref()
                    .is_some_and(|s| manifests.contains_key(s) && !doomed.contains(s));
                needed_as_child || subject_survives
            })
            .collect();
        if spared.is_empty() {
            break;
        }
        for digest in spared {
            doomed.remove(digest);
        }
    }
    let mut doomed: Vec<&str> = doomed.into_iter().collect();
    doomed.sort_unstable();
    report
        .deleted_manifests
        .extend(doomed.into_iter().map(|digest| RemovedManifest {
            repository: repository.to_string(),
            digest: digest.to_string(),
        }));
    Ok(())
}
