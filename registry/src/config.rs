//! The registry's configuration: the `[registry]` table of kiln's TOML file.
//!
//! `RegistryConfig::default()` is what `kiln up` uses on loopback: no auth, the default
//! tag policy for every repository, garbage collection of the registry's own unreferenced
//! blobs, and no retention rules (deleting tags is an operator's decision).

use serde::Deserialize;

/// Everything the registry can be told. Unknown keys are an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Tag policies, matched against the repository name in order; the first whose
    /// `repositories` pattern matches applies. A repository no rule matches gets
    /// [`TagPolicyConfig::default`].
    pub tag_policies: Vec<TagPolicyConfig>,
    /// Authentication and authorisation; off unless `auth.enabled` is true.
    pub auth: AuthConfig,
    /// Retention rules for tags and untagged manifests.
    pub retention: RetentionConfig,
    /// Garbage collection of unreferenced blobs.
    pub gc: GcConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Whether clients may delete manifests, tags and blobs. When false, DELETE gets
    /// 405 UNSUPPORTED, as the spec allows.
    pub deletes_enabled: bool,
    /// Set by the binary when replicas share metadata and blobs: an upload session's
    /// bytes are saved at the end of every request, so that the next request of the
    /// session may land on another replica. (Otherwise the open writer stays in this
    /// process between requests, and a chunked upload hashes each byte once.)
    #[serde(skip)]
    pub shared_upload_sessions: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            tag_policies: Vec::new(),
            auth: AuthConfig::default(),
            retention: RetentionConfig::default(),
            gc: GcConfig::default(),
            limits: LimitsConfig::default(),
            deletes_enabled: true,
            shared_upload_sessions: false,
        }
    }
}

/// Which tags a set of repositories accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TagPolicyConfig {
    /// Repository name pattern; `*` matches any run of characters, `/` included.
    pub repositories: String,
    /// Regular expressions a tag must fully match (anchors are implied). Empty means the
    /// defaults: semver (`v1.2.3`, `1.2.3-rc.1`, build metadata written `_build.5`
    /// because tags cannot hold `+`), a short or full git SHA (`abc1234`), and
    /// branch-SHA (`main-abc1234`).
    pub allowed_tags: Vec<String>,
    /// Whether semver tags are immutable once pushed: re-pushing one with another digest,
    /// or deleting it, is DENIED.
    pub immutable_semver: bool,
    /// Whether the tag `latest` is accepted (in addition to `allowed_tags`).
    ///
    /// Off by default, also for `kiln up`: a moving `latest` makes deployments and
    /// rollbacks non-deterministic, `kiln publish` never needs it (it tags from git),
    /// and a sandbox that accepts it only teaches a habit production then refuses. The
    /// DENIED message names this key so turning it on is one line.
    pub allow_latest: bool,
}

impl Default for TagPolicyConfig {
    fn default() -> Self {
        TagPolicyConfig {
            repositories: "*".to_string(),
            allowed_tags: Vec::new(),
            immutable_semver: true,
            allow_latest: false,
        }
    }
}

/// Authentication. Passwords are argon2 PHC strings; clear-text secrets never appear in
/// the configuration or the logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether requests must authenticate. Off for `kiln up` on loopback.
    pub enabled: bool,
    /// The token endpoint URL sent in `WWW-Authenticate: Bearer realm=…`. Empty means
    /// `http://<Host header>/token`, which is right when clients reach the registry directly.
    pub realm: String,
    /// The `service` named in challenges and tokens.
    pub service: String,
    /// How long issued tokens stay valid, in seconds.
    pub token_ttl_secs: u64,
    /// Hex-encoded HMAC-SHA256 key (32 bytes) for signing tokens. Empty means a random key
    /// generated at start-up, so tokens do not survive a restart (clients just ask again).
    pub token_key_hex: String,
    /// The users and what they may do.
    pub users: Vec<UserConfig>,
    /// Repository name patterns anyone may pull from without credentials.
    pub anonymous_pull: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            realm: String::new(),
            service: "kiln-registry".to_string(),
            token_ttl_secs: 300,
            token_key_hex: String::new(),
            users: Vec::new(),
            anonymous_pull: Vec::new(),
        }
    }
}

/// One user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// The argon2 PHC string, e.g. from `argon2` or `kiln registry hash-password`:
    /// `$argon2id$v=19$m=19456,t=2,p=1$…`.
    pub password_hash: String,
    /// What the user may do where.
    #[serde(default)]
    pub grants: Vec<GrantConfig>,
}

/// Actions on the repositories matching a pattern.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// Repository name pattern; `*` matches any run of characters.
    pub repositories: String,
    /// Any of `pull`, `push`, `delete`.
    pub actions: Vec<Action>,
}

/// What a scope allows on a repository.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

/// Retention rules. Nothing is deleted unless a rule is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep only the newest N branch-SHA tags (`<branch>-<sha>`) per branch and
    /// repository; older ones are deleted. Unset keeps all.
    pub keep_branch_tags: Option<usize>,
    /// Delete manifests that no tag, index or existing subject refers to once they are
    /// older than this many seconds. Unset keeps them.
    pub untagged_grace_secs: Option<u64>,
    /// How often the server applies the rules, in seconds; 0 only on demand
    /// (`Registry::run_retention`).
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_branch_tags: None,
            untagged_grace_secs: None,
            interval_secs: 3600,
        }
    }
}

/// Online garbage collection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// A blob written less than this many seconds ago is never collected, so a layer
    /// uploaded moments before its manifest survives.
    pub grace_secs: u64,
    /// Upload sessions idle for longer than this many seconds are cancelled by GC.
    pub upload_ttl_secs: u64,
    /// How often the server collects, in seconds; 0 only on demand (`Registry::run_gc`).
    pub interval_secs: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace_secs: 3600,
            upload_ttl_secs: 24 * 3600,
            interval_secs: 3600,
        }
    }
}

/// Request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// The largest manifest accepted, in bytes (the spec asks for at least 4 MiB).
    pub max_manifest_bytes: u64,
    /// How many blob upload requests may stream at once; more get 429 TOOMANYREQUESTS.
    pub max_concurrent_uploads: usize,
    /// The `Retry-After` sent with 429, in seconds.
    pub retry_after_secs: u64,
    /// The most entries one tag-list, catalog or referrers page returns.
    pub max_page_size: usize,
    /// A request's headers must arrive within this many seconds of the connection (or of
    /// the previous response) or the connection is closed: slowloris gets nowhere.
    pub header_read_timeout_secs: u64,
    /// Open connections one client address may have; more are closed at once (0: no
    /// limit). Docker and containerd pull with a handful each.
    pub max_connections_per_address: usize,
    /// A request body (an upload, a manifest) that sends nothing for this long is cut
    /// off with 408, freeing its upload slot.
    pub body_idle_timeout_secs: u64,
    /// Past `body_idle_timeout_secs`, a body must average at least this many bytes a
    /// second (0: no floor), so a client dripping bytes cannot keep a slot either.
    pub min_body_bytes_per_sec: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_manifest_bytes: 4 << 20,
            max_concurrent_uploads: 64,
            retry_after_secs: 1,
            max_page_size: 10_000,
            header_read_timeout_secs: 30,
            max_connections_per_address: 256,
            body_idle_timeout_secs: 30,
            min_body_bytes_per_sec: 16 << 10,
        }
    }
}

/// A repository name pattern where `*` matches any run of characters.
#[derive(Debug, Clone)]
pub(crate) struct RepositoryPattern(regex::Regex);

impl RepositoryPattern {
    pub fn new(pattern: &str) -> Result<Self, crate::RegistryError> {
        let regex = format!("^{}$", regex::escape(pattern).replace(r"\*", ".*"));
        regex::Regex::new(&regex)
            .map(RepositoryPattern)
            .map_err(|e| crate::RegistryError::Config(format!("pattern {pattern:?}: {e}")))
    }

    pub fn matches(&self, repository: &str) -> bool {
        self.0.is_match(repository)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_is_the_default_and_unknown_keys_fail() {
        let config: RegistryConfig = toml::from_str("").unwrap();
        assert!(!config.auth.enabled);
        assert!(config.deletes_enabled);
        assert_eq!(config.limits.max_manifest_bytes, 4 << 20);
        assert!(toml::from_str::<RegistryConfig>("bogus = 1").is_err());
        assert!(toml::from_str::<RegistryConfig>("[gc]\nbogus = 1").is_err());
    }

    #[test]
    fn a_full_table_parses() {
        let config: RegistryConfig = toml::from_str(
            r#"
            deletes_enabled = false
            [[tag_policies]]
            repositories = "sandbox/*"
            allow_latest = true
            [auth]
            enabled = true
            anonymous_pull = ["public/*"]
            [[auth.users]]
            name = "ci"
            password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA"
            grants = [{ repositories = "*", actions = ["pull", "push"] }]
            [retention]
            keep_branch_tags = 5
            untagged_grace_secs = 86400
            "#,
        )
        .unwrap();
        assert!(config.tag_policies[0].allow_latest);
        assert_eq!(
            config.auth.users[0].grants[0].actions,
            [Action::Pull, Action::Push]
        );
        assert_eq!(config.retention.keep_branch_tags, Some(5));
    }

    #[test]
    fn repository_patterns() {
        let p = RepositoryPattern::new("team/*").unwrap();
        assert!(p.matches("team/app"));
        assert!(p.matches("team/a/b"));
        assert!(!p.matches("other/app"));
        assert!(RepositoryPattern::new("a.b").unwrap().matches("a.b"));
        assert!(!RepositoryPattern::new("a.b").unwrap().matches("axb"));
    }
}
