//! What `--tags-from-git` and the image's annotations learn from the git checkout: the
//! commit, its time, the branch, semver tags on HEAD and where the source lives.
//!
//! It runs the `git` CLI, which every CI machine has, rather than linking a git library.

use std::path::Path;
use std::process::Command;

use kiln_store::MAX_TAG_LEN;

use crate::error::{PublishError, Result};
use crate::image_config::Provenance;

/// Facts about HEAD of a git checkout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitMetadata {
    /// The full commit id of HEAD.
    pub commit: String,
    /// Commit time of HEAD, seconds since the Unix epoch.
    pub commit_time: i64,
    /// The checked-out branch; `None` on a detached HEAD.
    pub branch: Option<String>,
    /// Tags on HEAD that are semantic versions (`v1.2.3`, `1.2.3-rc.1`), as written.
    pub semver_tags: Vec<String>,
    /// `remote.origin.url`, without credentials and in https form when it was scp-like.
    pub source_url: Option<String>,
}

/// The length of the short SHA tag.
pub const SHORT_SHA_LEN: usize = 7;

impl GitMetadata {
    /// Reads HEAD of the checkout that contains `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let commit = git(dir, &["rev-parse", "--verify", "HEAD"])?
            .ok_or_else(|| PublishError::Git(format!("{} has no commit at HEAD", dir.display())))?;
        let commit_time = git(dir, &["show", "-s", "--format=%ct", "HEAD"])?
            .unwrap_or_default()
            .parse::<i64>()
            .map_err(|e| PublishError::Git(format!("unreadable commit time: {e}")))?;
        // Fails (exit 1) on a detached HEAD, which is how we tell.
        let branch = git(dir, &["symbolic-ref", "--quiet", "--short", "HEAD"])?;
        let semver_tags = git(dir, &["tag", "--points-at", "HEAD"])?
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|tag| parse_semver_tag(tag).is_some())
            .map(str::to_string)
            .collect();
        let source_url =
            git(dir, &["config", "--get", "remote.origin.url"])?.map(|url| public_source_url(&url));
        Ok(GitMetadata {
            commit,
            commit_time,
            branch,
            semver_tags,
            source_url,
        })
    }

    /// The image's provenance: this commit, its source URL, the version tag, and the
    /// commit time as `created` unless `source_date_epoch` (SOURCE_DATE_EPOCH) overrides it.
    pub fn provenance(&self, source_date_epoch: Option<u64>) -> Provenance {
        Provenance {
            created_epoch: source_date_epoch.unwrap_or(self.commit_time.max(0) as u64),
            revision: Some(self.commit.clone()),
            source: self.source_url.clone(),
            version: self.version(),
        }
    }

    pub fn short_sha(&self) -> &str {
        &self.commit[..SHORT_SHA_LEN.min(self.commit.len())]
    }

    /// The highest semver tag on HEAD, as an image tag (`v1.2.3`).
    pub fn version(&self) -> Option<String> {
        self.semver_tags
            .iter()
            .filter_map(|tag| parse_semver_tag(tag))
            .max()
            .map(|version| version_tag(&version))
    }

    /// The tags `--tags-from-git` pushes: `vX.Y.Z` for each semver tag on HEAD, the short
    /// SHA, and `<branch>-<sha>` unless HEAD is detached. `branch_override` stands in for
    /// the branch (CI systems often check out a detached HEAD and name the branch in an
    /// environment variable).
    pub fn derive_tags(&self, branch_override: Option<&str>) -> Vec<String> {
        let mut versions: Vec<semver::Version> = self
            .semver_tags
            .iter()
            .filter_map(|tag| parse_semver_tag(tag))
            .collect();
        versions.sort();
        versions.dedup();
        let mut tags: Vec<String> = versions.iter().map(version_tag).collect();
        let sha = self.short_sha();
        tags.push(sha.to_string());
        if let Some(branch) = branch_override.or(self.branch.as_deref()) {
            tags.push(branch_tag(branch, sha));
        }
        tags
    }
}

/// Runs git in `dir`; `Ok(None)` when git exits 1 (a missing ref or config key), an error
/// for anything worse.
fn git(dir: &Path, args: &[&str]) -> Result<Option<String>> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|e| PublishError::Git(format!("cannot run git: {e}")))?;
    if output.status.success() {
        return Ok(Some(
            String::from_utf8_lossy(&output.stdout).trim().to_string(),
        ));
    }
    if output.status.code() == Some(1) {
        return Ok(None);
    }
    Err(PublishError::Git(format!(
        "git {} in {}: {}",
        args.join(" "),
        dir.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// `v1.2.3` and `1.2.3` (with optional pre-release and build metadata) are versions.
fn parse_semver_tag(tag: &str) -> Option<semver::Version> {
    semver::Version::parse(tag.strip_prefix('v').unwrap_or(tag)).ok()
}

/// `v` + the version; `+` (build metadata) is outside the tag grammar and becomes `_`,
/// as Helm does for OCI charts.
fn version_tag(version: &semver::Version) -> String {
    format!("v{version}").replace('+', "_")
}

/// `<branch>-<sha>` with the branch mapped onto the tag grammar
/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`: other characters become `-` (runs collapsed),
/// leading `.`/`-` are dropped, and the branch is shortened so the tag fits 128 bytes.
pub fn branch_tag(branch: &str, short_sha: &str) -> String {
    let mut sanitised = String::with_capacity(branch.len());
    for c in branch.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
            c
        } else {
            '-'
        };
        if c == '-' && sanitised.ends_with('-') {
            continue;
        }
        sanitised.push(c);
    }
    let trimmed = sanitised.trim_start_matches(['.', '-']);
    let room = MAX_TAG_LEN - 1 - short_sha.len();
    let branch_part = trimmed[..trimmed.len().min(room)].trim_end_matches(['.', '-']);
    if branch_part.is_empty() {
        return short_sha.to_string();
    }
    format!("{branch_part}-{short_sha}")
}

/// The remote URL as it belongs in `org.opencontainers.image.source`: credentials
/// removed, `git@host:org/repo.git` rewritten as `https://host/org/repo`.
fn public_source_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        return format!("{scheme}://{host}/{path}");
    }
    if let Some((user_host, path)) = url.split_once(':') {
        let host = user_host
            .rsplit_once('@')
            .map_or(user_host, |(_, host)| host);
        return format!("https://{host}/{}", path.trim_end_matches(".git"));
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names_are_sanitised_to_the_tag_grammar() {
        assert_eq!(branch_tag("main", "abc1234"), "main-abc1234");
        assert_eq!(branch_tag("feature/x", "abc1234"), "feature-x-abc1234");
        assert_eq!(branch_tag("-weird//name!", "abc1234"), "weird-name-abc1234");
        assert_eq!(branch_tag("üñí", "abc1234"), "abc1234");
        let long = branch_tag(&"b".repeat(300), "abc1234");
        assert_eq!(long.len(), 128);
        kiln_store::validate_tag(&long).unwrap();
    }

    #[test]
    fn semver_tags_become_v_tags() {
        assert_eq!(
            version_tag(&parse_semver_tag("1.2.3+build.5").unwrap()),
            "v1.2.3_build.5"
        );
        assert!(parse_semver_tag("v1.2").is_none());
        assert!(parse_semver_tag("release").is_none());
    }

    #[test]
    fn source_urls_lose_credentials() {
        assert_eq!(
            public_source_url("https://user:secret@example.com/org/repo.git"),
            "https://example.com/org/repo.git"
        );
        assert_eq!(
            public_source_url("git@example.com:org/repo.git"),
            "https://example.com/org/repo"
        );
    }
}
