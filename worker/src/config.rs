//! The worker's configuration (the `[worker]` keys of kiln's TOML file, then `KILN_*`
//! variables and `kiln worker` flags, which the CLI layers on top).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How actions are confined (`worker.sandbox`). The values of the key's old name,
/// `use_bubblewrap` (`always`, `never`), are still accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// bubblewrap when `bwrap` is installed and works on this host, unconfined otherwise
    /// (with a warning).
    #[default]
    Auto,
    /// Always bubblewrap; the worker refuses to start without a working `bwrap`.
    #[serde(alias = "always")]
    Bubblewrap,
    /// No sandbox: actions run directly, only in their own directory and process group,
    /// as the worker's user.
    #[serde(alias = "never")]
    None,
}

/// The first of the host uids (and gids) sandboxed actions run as, one per action
/// running at once: a range no account and no file on a usual host has.
pub const DEFAULT_SANDBOX_UID_BASE: u32 = 1_600_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// The coordinator's gRPC endpoint, e.g. `grpc://farm:8980`, or `grpcs://farm:8980`
    /// for TLS.
    pub coordinator: String,
    /// A separate endpoint for the CAS and ByteStream services; empty means the
    /// coordinator's own.
    pub cas: String,
    /// Actions run at once. 0 means one per CPU core.
    pub slots: usize,
    /// Platform properties offered to actions, e.g. `("OSFamily", "linux")`.
    pub platform: Vec<(String, String)>,
    /// The coordinator's join token.
    pub join_token: String,
    /// For a `grpcs://` coordinator: PEM CAs to trust instead of the system's roots, a
    /// client certificate and key for mutual TLS, and the name its certificate must carry
    /// when it is not the URL's host.
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub server_name: Option<String>,
    /// Where the blob cache and the action directories live. On one filesystem, copying
    /// an input from the cache can share its extents (XFS, btrfs). A relative path is
    /// resolved against the working directory once, when the worker starts.
    pub work_dir: PathBuf,
    /// The local blob cache's budget in bytes; least-recently-used blobs go beyond it.
    pub cache_bytes: u64,
    /// How actions are confined: `auto`, `bubblewrap` or `none` (old name:
    /// `use_bubblewrap`).
    #[serde(alias = "use_bubblewrap")]
    pub sandbox: SandboxMode,
    /// Sandboxed actions run as host uid and gid `sandbox_uid_base + n`, n counting the
    /// actions running at once: uids that own nothing outside the action's directory.
    pub sandbox_uid_base: u32,
    /// The worker's name in the pool. Empty means `<hostname>-<random>`.
    pub worker_id: String,
    /// Seconds between heartbeats, unless the coordinator asks for another interval.
    pub heartbeat_interval_secs: u64,
    /// Timeout for actions whose Assign and Action carry none, in seconds.
    pub default_timeout_secs: u64,
    /// On shutdown, how long running actions may take to finish before they are cancelled
    /// (and reported so), in seconds. Unset, `kiln worker` waits for them: its
    /// orchestrator's grace period bounds it. `kiln up`'s local workers give them 30 s.
    pub drain_timeout_secs: Option<u64>,
    /// RLIMIT_NOFILE for actions: the most open files per process.
    pub max_open_files: u64,
    /// RLIMIT_AS for actions, in bytes; 0 leaves it unlimited.
    pub max_memory_bytes: u64,
    /// RLIMIT_FSIZE for actions: the largest file a process may write, in bytes; 0 leaves it
    /// unlimited.
    pub max_file_bytes: u64,
    /// RLIMIT_CPU for actions: CPU seconds per process; 0 leaves it unlimited. A process
    /// past it gets SIGXCPU, and the action's stderr ends with a line saying so.
    pub max_cpu_secs: u64,
    /// RLIMIT_NPROC for sandboxed actions: the most processes (threads included) an action
    /// runs at once; 0 leaves it unlimited. Unsandboxed actions run as the worker's user,
    /// whose processes all count, and root is exempt: there it is not applied.
    pub max_processes: u64,
    /// The most of an action's stdout, and of its stderr, kept; past it the rest is
    /// dropped and the log ends with a line saying so.
    pub max_log_bytes: u64,
    /// The budget of unpacked container-image roots (`container-image`), least recently
    /// used first out; an image larger than this is refused.
    pub image_cache_bytes: u64,
    /// The longest resolving, pulling and unpacking an image may take, in seconds; past
    /// it the action fails with FAILED_PRECONDITION.
    pub image_pull_timeout_secs: u64,
    /// A docker `config.json` (a Kubernetes pull secret's `.dockerconfigjson`) with the
    /// credentials for the registries images come from.
    pub registry_auth_file: Option<PathBuf>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            coordinator: "http://127.0.0.1:8980".to_string(),
            cas: String::new(),
            slots: 0,
            platform: Vec::new(),
            join_token: String::new(),
            ca_cert: None,
            client_cert: None,
            client_key: None,
            server_name: None,
            work_dir: PathBuf::from("kiln-data/worker"),
            cache_bytes: 10 << 30,
            sandbox: SandboxMode::Auto,
            sandbox_uid_base: DEFAULT_SANDBOX_UID_BASE,
            worker_id: String::new(),
            heartbeat_interval_secs: 1,
            default_timeout_secs: 3600,
            drain_timeout_secs: None,
            max_open_files: 8192,
            max_memory_bytes: 0,
            max_file_bytes: 0,
            max_cpu_secs: 0,
            max_processes: 1024,
            max_log_bytes: 64 << 20,
            image_cache_bytes: 10 << 30,
            image_pull_timeout_secs: 600,
            registry_auth_file: None,
        }
    }
}

impl WorkerConfig {
    /// The number of slots, with 0 resolved to the number of CPU cores.
    pub fn effective_slots(&self) -> usize {
        if self.slots > 0 {
            self.slots
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The coordinator URL: `grpc://`, `grpcs://`, `http://` or `https://` (a bare
    /// `host:port` is plain gRPC).
    pub fn coordinator_url(&self) -> String {
        dialable(&self.coordinator)
    }

    /// The CAS endpoint, when it is not the coordinator's.
    pub fn cas_url(&self) -> Option<String> {
        (!self.cas.is_empty()).then(|| dialable(&self.cas))
    }

    /// The TLS settings for a `grpcs://` coordinator.
    pub fn client_tls(&self) -> Result<kiln_client::ClientTls, crate::WorkerError> {
        let mut tls = kiln_client::ClientTls::from_files(
            self.ca_cert.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )
        .map_err(|e| crate::WorkerError::Config(e.to_string()))?;
        tls.server_name = self.server_name.clone();
        Ok(tls)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_secs.max(1))
    }

    pub fn default_timeout(&self) -> Duration {
        Duration::from_secs(self.default_timeout_secs.max(1))
    }

    pub fn drain_timeout(&self) -> Option<Duration> {
        self.drain_timeout_secs.map(Duration::from_secs)
    }
}

fn dialable(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_keys_round_trip_and_unknown_keys_are_refused() {
        let config: WorkerConfig = toml::from_str(
            r#"
            coordinator = "grpc://farm:8980"
            slots = 3
            platform = [["OSFamily", "linux"], ["cores", "8"]]
            sandbox = "none"
            "#,
        )
        .unwrap();
        assert_eq!(config.slots, 3);
        assert_eq!(config.coordinator_url(), "grpc://farm:8980");
        assert_eq!(config.platform[1], ("cores".to_string(), "8".to_string()));
        assert_eq!(config.sandbox, SandboxMode::None);
        assert_eq!(config.max_processes, 1024);
        assert_eq!(config.cache_bytes, WorkerConfig::default().cache_bytes);

        // The key's old name and values.
        let old: WorkerConfig = toml::from_str(r#"use_bubblewrap = "always""#).unwrap();
        assert_eq!(old.sandbox, SandboxMode::Bubblewrap);
        let old: WorkerConfig = toml::from_str(r#"use_bubblewrap = "never""#).unwrap();
        assert_eq!(old.sandbox, SandboxMode::None);

        let err = toml::from_str::<WorkerConfig>("slot = 1").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
