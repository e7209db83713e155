//! Which tags a repository accepts, and which are immutable.

use std::sync::LazyLock;

use regex::Regex;

use crate::config::{RepositoryPattern, TagPolicyConfig};
use crate::error::{RegistryError, Result};

/// Semver 2.0 with an optional `v`; build metadata is written with `_` instead of `+`,
/// which the tag grammar does not allow (Helm does the same).
const SEMVER: &str = r"v?(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:_[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?";
/// A short (7+) or full git SHA.
const GIT_SHA: &str = r"[0-9a-f]{7,40}";
/// `<branch>-<sha>`; the branch is already sanitised to the tag grammar.
const BRANCH_SHA: &str = r"(?P<branch>[A-Za-z0-9_][A-Za-z0-9._-]*)-(?P<sha>[0-9a-f]{7,40})";

static SEMVER_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{SEMVER}$")).expect("semver regex is valid"));
static BRANCH_SHA_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{BRANCH_SHA}$")).expect("branch-SHA regex is valid"));

/// What kind of tag a tag is, for immutability and retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagKind {
    Semver,
    /// `<branch>-<sha>`, with the branch it belongs to.
    BranchSha {
        branch: String,
    },
    Other,
}

/// Classifies a tag. Semver wins over branch-SHA (`v1.2.3-abc1234` is a pre-release).
pub fn classify(tag: &str) -> TagKind {
    if SEMVER_TAG.is_match(tag) {
        TagKind::Semver
    } else if let Some(captures) = BRANCH_SHA_TAG.captures(tag) {
        TagKind::BranchSha {
            branch: captures["branch"].to_string(),
        }
    } else {
        TagKind::Other
    }
}

struct Rule {
    repositories: RepositoryPattern,
    allowed: Regex,
    immutable_semver: bool,
    allow_latest: bool,
}

impl Rule {
    fn new(config: &TagPolicyConfig) -> Result<Self> {
        let alternatives: Vec<String> = if config.allowed_tags.is_empty() {
            vec![SEMVER.into(), GIT_SHA.into(), BRANCH_SHA.into()]
        } else {
            config.allowed_tags.clone()
        };
        for pattern in &alternatives {
            Regex::new(pattern)
                .map_err(|e| RegistryError::Config(format!("allowed_tags {pattern:?}: {e}")))?;
        }
        let joined = alternatives
            .iter()
            .map(|p| format!("(?:{p})"))
            .collect::<Vec<_>>()
            .join("|");
        let allowed = Regex::new(&format!("^(?:{joined})$"))
            .map_err(|e| RegistryError::Config(format!("allowed_tags: {e}")))?;
        Ok(Rule {
            repositories: RepositoryPattern::new(&config.repositories)?,
            allowed,
            immutable_semver: config.immutable_semver,
            allow_latest: config.allow_latest,
        })
    }
}

/// The compiled tag policies.
pub struct TagPolicy {
    rules: Vec<Rule>,
    fallback: Rule,
}

impl TagPolicy {
    pub fn new(configs: &[TagPolicyConfig]) -> Result<Self> {
        Ok(TagPolicy {
            rules: configs.iter().map(Rule::new).collect::<Result<_>>()?,
            fallback: Rule::new(&TagPolicyConfig::default())?,
        })
    }

    fn rule_for(&self, repository: &str) -> &Rule {
        self.rules
            .iter()
            .find(|r| r.repositories.matches(repository))
            .unwrap_or(&self.fallback)
    }

    /// Whether `tag` may be pushed to `repository`. Refusals are DENIED with the reason.
    pub fn check_push(&self, repository: &str, tag: &str) -> Result<()> {
        let rule = self.rule_for(repository);
        if tag == "latest" {
            if rule.allow_latest {
                return Ok(());
            }
            return Err(RegistryError::Denied(format!(
                "tag \"latest\" is refused for {repository}: mutable tags make rollbacks \
                 non-deterministic; push a semver, git-SHA or branch-SHA tag, or set \
                 allow_latest = true in the repository's tag policy"
            )));
        }
        if !rule.allowed.is_match(tag) {
            return Err(RegistryError::Denied(format!(
                "tag {tag:?} is not allowed in {repository} by the tag policy (allowed: {})",
                rule.allowed.as_str()
            )));
        }
        Ok(())
    }

    /// Whether a pushed `tag` in `repository` may never move or disappear.
    pub fn is_immutable(&self, repository: &str, tag: &str) -> bool {
        self.rule_for(repository).immutable_semver && classify(tag) == TagKind::Semver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_accepts_the_publish_tags() {
        let policy = TagPolicy::new(&[]).unwrap();
        for tag in [
            "v1.2.3",
            "1.2.3",
            "v1.2.3-rc.1",
            "1.0.0-alpha-beta.7_build.42",
            "abc1234",
            "0123456789abcdef0123456789abcdef01234567",
            "main-abc1234",
            "feature_x.y-abc1234def",
        ] {
            policy
                .check_push("app", tag)
                .unwrap_or_else(|e| panic!("{tag}: {e}"));
        }
        for tag in ["latest", "v1.2", "01.2.3", "ABC1234", "dev", "main-xyz"] {
            assert!(
                matches!(policy.check_push("app", tag), Err(RegistryError::Denied(_))),
                "{tag}"
            );
        }
    }

    #[test]
    fn rules_match_by_repository_in_order() {
        let policy = TagPolicy::new(&[
            TagPolicyConfig {
                repositories: "sandbox/*".into(),
                allowed_tags: vec!["dev-.*".into()],
                immutable_semver: false,
                allow_latest: true,
            },
            TagPolicyConfig::default(),
        ])
        .unwrap();
        assert!(policy.check_push("sandbox/x", "latest").is_ok());
        assert!(policy.check_push("sandbox/x", "dev-1").is_ok());
        assert!(policy.check_push("sandbox/x", "v1.0.0").is_err());
        assert!(policy.check_push("prod/x", "latest").is_err());
        assert!(!policy.is_immutable("sandbox/x", "1.0.0"));
        assert!(policy.is_immutable("prod/x", "1.0.0"));
        assert!(!policy.is_immutable("prod/x", "main-abc1234"));
    }

    #[test]
    fn classification() {
        assert_eq!(classify("v2.0.0"), TagKind::Semver);
        assert_eq!(classify("v1.2.3-abc1234"), TagKind::Semver);
        assert_eq!(
            classify("release-1.x-abc1234"),
            TagKind::BranchSha {
                branch: "release-1.x".into()
            }
        );
        assert_eq!(classify("abc1234"), TagKind::Other);
    }

    #[test]
    fn a_bad_pattern_is_a_config_error() {
        let bad = TagPolicyConfig {
            allowed_tags: vec!["(".into()],
            ..TagPolicyConfig::default()
        };
        assert!(matches!(
            TagPolicy::new(&[bad]),
            Err(RegistryError::Config(_))
        ));
    }
}
