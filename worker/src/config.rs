//! The worker's configuration (the `[worker]` keys of kiln's TOML file, then `KILN_*`
//! variables and `kiln worker` flags, which the CLI layers on top).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether actions run under bubblewrap (`bwrap`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BubblewrapMode {
    /// Use bubblewrap when `bwrap` is installed and works on this host.
    #[default]
    Auto,
    /// Always use it; the worker refuses to start without a working `bwrap`.
    Always,
    /// Never use it: actions run directly, only in their own directory and process group.
    Never,
}

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
    /// Whether to sandbox actions with bubblewrap.
    pub use_bubblewrap: BubblewrapMode,
    /// The worker's name in the pool. Empty means `<hostname>-<random>`.
    pub worker_id: String,
    /// Seconds between heartbeats, unless the coordinator asks for another interval.
    pub heartbeat_interval_secs: u64,
    /// Timeout for actions whose Assign and Action carry none, in seconds.
    pub default_timeout_secs: u64,
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
    /// The most of an action's stdout, and of its stderr, kept; past it the rest is
    /// dropped and the log ends with a line saying so.
    pub max_log_bytes: u64,
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
            use_bubblewrap: BubblewrapMode::Auto,
            worker_id: String::new(),
            heartbeat_interval_secs: 1,
            default_timeout_secs: 3600,
            max_open_files: 8192,
            max_memory_bytes: 0,
            max_file_bytes: 0,
            max_cpu_secs: 0,
            max_log_bytes: 64 << 20,
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
            use_bubblewrap = "never"
            "#,
        )
        .unwrap();
        assert_eq!(config.slots, 3);
        assert_eq!(config.coordinator_url(), "grpc://farm:8980");
        assert_eq!(config.platform[1], ("cores".to_string(), "8".to_string()));
        assert_eq!(config.use_bubblewrap, BubblewrapMode::Never);
        assert_eq!(config.cache_bytes, WorkerConfig::default().cache_bytes);

        let err = toml::from_str::<WorkerConfig>("slot = 1").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
