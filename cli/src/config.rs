//! kiln's configuration: a TOML file, then `KILN_*` environment variables, then flags.
//!
//! Flags and variables are declared together in [`CommonArgs`] (clap reads both, flags
//! winning); whatever they leave unset comes from the file, then from the defaults.
//! Unknown keys in the file, and unknown `KILN_*` variables, are errors: a typo must not
//! silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KilnConfig {
    /// Where blobs (`cas/`) and metadata (`metadata/`) live.
    pub data_dir: PathBuf,
    /// The coordinator's gRPC address (REAPI and, later, the worker protocol).
    pub grpc_addr: SocketAddr,
    /// The OCI registry's HTTP address.
    pub registry_addr: SocketAddr,
    /// How many local workers `kiln up` starts; unset means one per core, 0 means none
    /// (a server whose workers run elsewhere).
    pub workers: Option<usize>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served over HTTP. Unset, each role
    /// has its own port, so that a coordinator, a registry and a worker can share a host:
    /// see [`MetricsRole`].
    pub metrics_addr: Option<SocketAddr>,
    /// The secret workers present to join the coordinator. `kiln up` generates one for its
    /// local workers when none is set.
    pub join_token: Option<String>,
    /// A `tracing` filter, as in `RUST_LOG`.
    pub log: String,
    pub coordinator: kiln_coordinator::CoordinatorConfig,
    pub registry: kiln_registry::RegistryConfig,
    /// `kiln worker`'s settings, and those of `kiln up`'s local workers.
    pub worker: kiln_worker::WorkerConfig,
    pub telemetry: TelemetryConfig,
    /// The `[cas]` table: how much the blob store may hold, and how eviction keeps it so.
    /// With an object store, it bounds the local tier in front of it.
    pub cas: CasConfig,
    /// The `[storage]` table: where blobs live.
    pub storage: crate::storage_config::StorageConfig,
    /// The `[metadata]` table: where the action cache, the registry index, operations,
    /// sessions and tokens live.
    pub metadata: crate::storage_config::MetadataConfig,
    /// The `[tls]` table: the coordinator's gRPC and the registry's HTTP serve TLS with
    /// these files when `cert` and `key` are set.
    pub tls: TlsConfig,
    /// Serve unauthenticated APIs off loopback (`--allow-unauthenticated`); a flag only.
    #[serde(skip)]
    pub allow_unauthenticated: bool,
    /// `KILN_*` variables in the environment that name no setting. Not an error: a user's
    /// shell may hold variables of its own with that prefix (`KILN_BIN`), so `main` warns
    /// once logging is up and goes on. An unknown key in the file stays an error.
    #[serde(skip)]
    pub unknown_variables: Vec<String>,
}

/// The `[cas]` table. The blob store holds the CAS and the registry's blobs together;
/// eviction removes only what the registry does not answer for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CasConfig {
    /// The most the blob store may hold, with units (`"50GiB"`) or in bytes. Unset: half
    /// of what the data directory's filesystem has free at start-up plus what the store
    /// already holds, so that kiln never takes the last half of a laptop's free disk.
    pub max_bytes: Option<bytesize::ByteSize>,
    /// Eviction starts above this fraction of `max_bytes`…
    pub high_watermark: f64,
    /// …and stops at this one.
    pub low_watermark: f64,
    /// Blobs used within this many seconds are never evicted.
    pub grace_secs: u64,
    /// Seconds between eviction passes when no write wakes one earlier.
    pub eviction_interval_secs: u64,
}

impl Default for CasConfig {
    fn default() -> Self {
        let defaults = kiln_store::EvictionPolicy::with_max_bytes(0);
        CasConfig {
            max_bytes: None,
            high_watermark: defaults.high_watermark,
            low_watermark: defaults.low_watermark,
            grace_secs: defaults.grace.as_secs(),
            eviction_interval_secs: defaults.interval.as_secs(),
        }
    }
}

impl CasConfig {
    /// The eviction policy for a store in `data_dir` that holds `stored` bytes now.
    pub fn policy(
        &self,
        data_dir: &Path,
        stored: u64,
    ) -> anyhow::Result<kiln_store::EvictionPolicy> {
        let (low, high) = (self.low_watermark, self.high_watermark);
        if !(0.0 < low && low < high && high <= 1.0) {
            anyhow::bail!(
                "cas: need 0 < low_watermark < high_watermark <= 1, got {low} and {high}"
            );
        }
        let max_bytes = match self.max_bytes {
            Some(max) => max.as_u64(),
            None => {
                let free = free_bytes(data_dir)
                    .with_context(|| format!("reading free space under {}", data_dir.display()))?;
                (free + stored) / 2
            }
        };
        Ok(kiln_store::EvictionPolicy {
            max_bytes,
            high_watermark: high,
            low_watermark: low,
            grace: std::time::Duration::from_secs(self.grace_secs),
            interval: std::time::Duration::from_secs(self.eviction_interval_secs.max(1)),
            max_age: None,
        })
    }
}

/// Bytes an unprivileged process may still write on the filesystem holding `path`.
fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The `[tls]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Serve `/metrics`, `/healthz` and `/readyz` over TLS with the same certificate.
    pub metrics: bool,
}

impl TlsConfig {
    /// The files to serve with, if TLS is on; a certificate needs its key.
    pub fn files(&self) -> anyhow::Result<Option<kiln_tls::TlsFiles>> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some(kiln_tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            })),
            (None, None) if self.client_ca.is_none() => Ok(None),
            _ => anyhow::bail!(
                "tls: set cert and key together (--tls-cert, --tls-key); client_ca needs them too"
            ),
        }
    }

    /// The files `/metrics` serves with when `metrics` is set: the servers' certificate,
    /// but no client CA, since kubelet's HTTPS probes and most scrapers present no
    /// client certificate (the endpoints reveal no data; TLS keeps scrapes private).
    pub fn metrics_files(&self) -> anyhow::Result<Option<kiln_tls::TlsFiles>> {
        if !self.metrics {
            return Ok(None);
        }
        match self.files()? {
            Some(files) => Ok(Some(kiln_tls::TlsFiles {
                client_ca: None,
                ..files
            })),
            None => anyhow::bail!("tls.metrics (--tls-metrics) needs tls.cert and tls.key"),
        }
    }
}

/// The `[telemetry]` table: where spans go. The standard `OTEL_*` variables (read by the
/// OpenTelemetry SDK itself) work too; an endpoint set here wins over theirs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector to export spans to, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: Option<String>,
}

impl Default for KilnConfig {
    fn default() -> Self {
        KilnConfig {
            data_dir: PathBuf::from("kiln-data"),
            grpc_addr: "127.0.0.1:8980".parse().expect("valid default address"),
            registry_addr: "127.0.0.1:5000".parse().expect("valid default address"),
            workers: None,
            metrics_addr: None,
            join_token: None,
            log: "info".to_string(),
            coordinator: Default::default(),
            registry: Default::default(),
            worker: Default::default(),
            telemetry: Default::default(),
            cas: Default::default(),
            storage: Default::default(),
            metadata: Default::default(),
            tls: Default::default(),
            allow_unauthenticated: false,
            unknown_variables: Vec::new(),
        }
    }
}

/// Settings every server command shares, each as a flag and as a `KILN_*` variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// A TOML configuration file; flags and KILN_* variables override its keys.
    #[arg(long, env = "KILN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./kiln-data].
    #[arg(long, env = "KILN_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// gRPC address of the coordinator [default: 127.0.0.1:8980].
    #[arg(long, env = "KILN_GRPC_ADDR", global = true)]
    pub grpc_addr: Option<SocketAddr>,
    /// HTTP address of the registry [default: 127.0.0.1:5000].
    #[arg(long, env = "KILN_REGISTRY_ADDR", global = true)]
    pub registry_addr: Option<SocketAddr>,
    /// Local workers started by `kiln up`; 0 for none [default: one per core].
    #[arg(long, env = "KILN_WORKERS", global = true)]
    pub workers: Option<usize>,
    /// HTTP address of /metrics, /healthz and /readyz [default: 127.0.0.1:9090 for up and
    /// coordinator, :9091 for registry, :9092 for worker].
    #[arg(long, env = "KILN_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,
    /// The token workers present to join the coordinator [default: generated by `kiln up`].
    #[arg(long, env = "KILN_JOIN_TOKEN", global = true, hide_env_values = true)]
    pub join_token: Option<String>,
    /// Log filter, e.g. `info` or `kiln_coordinator=debug` [default: info].
    #[arg(long, env = "KILN_LOG", global = true)]
    pub log: Option<String>,
    /// OTLP/gRPC collector to export trace spans to [default: OTEL_EXPORTER_OTLP_ENDPOINT, else none].
    #[arg(long, env = "KILN_OTLP_ENDPOINT", global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// The most the blob store may hold, e.g. `50GiB` [default: half of the data
    /// directory's free space plus what the store holds].
    #[arg(long, env = "KILN_CAS_MAX_BYTES", global = true, value_name = "SIZE")]
    pub cas_max_bytes: Option<bytesize::ByteSize>,
    #[command(flatten)]
    pub storage: crate::storage_config::StorageArgs,
    /// PEM certificate chain the servers present (TLS on when set with --tls-key).
    #[arg(long, env = "KILN_TLS_CERT", global = true, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KILN_TLS_KEY", global = true, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA that client certificates must chain to; set, every client needs one (mTLS).
    #[arg(long, env = "KILN_TLS_CLIENT_CA", global = true, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz over TLS too, with --tls-cert (no client
    /// certificate asked for: probes and scrapers rarely have one).
    #[arg(long, env = "KILN_TLS_METRICS", global = true)]
    pub tls_metrics: bool,
    /// Require an API token on every coordinator call but GetCapabilities and health
    /// (`coordinator.auth.enabled`); `kiln token` makes them.
    #[arg(long, env = "KILN_COORDINATOR_AUTH", global = true)]
    pub coordinator_auth: bool,
    /// Run this coordinator as a replica of a farm on shared metadata (PostgreSQL) and
    /// blobs (a bucket), the URL being where the other replicas reach it, e.g.
    /// `http://10.0.0.7:8980` (`coordinator.farm`: one elected leader schedules, the
    /// others forward to it).
    #[arg(
        long,
        env = "KILN_FARM_ADVERTISE_URL",
        global = true,
        value_name = "URL"
    )]
    pub farm_advertise_url: Option<String>,
    /// Serve unauthenticated APIs on addresses other than loopback. Without it, a
    /// coordinator without auth or a registry without auth refuses to bind anything but
    /// loopback.
    #[arg(long, env = "KILN_ALLOW_UNAUTHENTICATED", global = true)]
    pub allow_unauthenticated: bool,
    /// Once every listener is up, write their bound addresses here as JSON (for port 0).
    #[arg(long, env = "KILN_READY_FILE", global = true, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
}

/// `KILN_*` variables read outside clap's flag declarations.
const VARIABLES_READ_DIRECTLY: &[&str] = &["KILN_REGISTRY_USER", "KILN_REGISTRY_PASSWORD"];

/// Every `KILN_*` variable kiln reads: those clap declares for any flag of any
/// subcommand, plus the few read directly. Anything else is reported as a mistake.
pub fn known_variables(command: &clap::Command) -> Vec<String> {
    fn collect(command: &clap::Command, out: &mut Vec<String>) {
        for arg in command.get_arguments() {
            if let Some(name) = arg.get_env().and_then(|n| n.to_str()) {
                out.push(name.to_string());
            }
        }
        for sub in command.get_subcommands() {
            collect(sub, out);
        }
    }
    let mut out: Vec<String> = VARIABLES_READ_DIRECTLY
        .iter()
        .map(|s| s.to_string())
        .collect();
    collect(command, &mut out);
    out.sort();
    out.dedup();
    out
}

/// Which server a process runs, for its default metrics port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsRole {
    /// `kiln up` and `kiln coordinator`: 9090.
    Coordinator,
    /// `kiln registry`: 9091.
    Registry,
    /// `kiln worker`: 9092.
    Worker,
}

impl KilnConfig {
    /// The metrics address: the configured one, or the role's default on loopback.
    pub fn metrics_addr_for(&self, role: MetricsRole) -> SocketAddr {
        let port = match role {
            MetricsRole::Coordinator => 9090,
            MetricsRole::Registry => 9091,
            MetricsRole::Worker => 9092,
        };
        self.metrics_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Resolves the configuration from the file named by `args.config` (if any), the
    /// environment and the flags.
    pub fn resolve(args: &CommonArgs, known_variables: &[String]) -> anyhow::Result<Self> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => KilnConfig::default(),
        };
        config.unknown_variables =
            unknown_variables(std::env::vars().map(|(k, _)| k), known_variables);
        if let Some(v) = &args.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = args.grpc_addr {
            config.grpc_addr = v;
        }
        if let Some(v) = args.registry_addr {
            config.registry_addr = v;
        }
        if let Some(v) = args.workers {
            config.workers = Some(v);
        }
        if let Some(v) = args.metrics_addr {
            config.metrics_addr = Some(v);
        }
        if let Some(v) = &args.join_token {
            config.join_token = Some(v.clone());
        }
        if let Some(v) = &args.log {
            config.log = v.clone();
        }
        if let Some(v) = &args.otlp_endpoint {
            config.telemetry.otlp_endpoint = Some(v.clone());
        }
        if let Some(v) = args.cas_max_bytes {
            config.cas.max_bytes = Some(v);
        }
        args.storage.apply(&mut config.storage)?;
        args.storage.apply_metadata(&mut config.metadata);
        config.allow_unauthenticated = args.allow_unauthenticated;
        config.coordinator.auth.enabled |= args.coordinator_auth;
        if let Some(url) = &args.farm_advertise_url {
            config.coordinator.farm.enabled = true;
            config.coordinator.farm.advertise_url = url.clone();
        }
        config.tls.metrics |= args.tls_metrics;
        for (flag, setting) in [
            (&args.tls_cert, &mut config.tls.cert),
            (&args.tls_key, &mut config.tls.key),
            (&args.tls_client_ca, &mut config.tls.client_ca),
        ] {
            if let Some(path) = flag {
                *setting = Some(path.clone());
            }
        }
        // Resolved once, here: everything below (the worker's sandbox above all) runs with
        // other working directories, where a relative path names nothing.
        config.data_dir = std::path::absolute(&config.data_dir)
            .with_context(|| format!("resolving {}", config.data_dir.display()))?;
        Ok(config)
    }

    /// How this process logs and exports spans.
    pub fn telemetry_options(&self) -> kiln_telemetry::TelemetryOptions {
        kiln_telemetry::TelemetryOptions {
            log_filter: self.log.clone(),
            otlp_endpoint: self.telemetry.otlp_endpoint.clone(),
        }
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in configuration file {}", path.display()))
    }
}

/// The `KILN_*` names among `names` that are no setting's variable.
fn unknown_variables(names: impl Iterator<Item = String>, known: &[String]) -> Vec<String> {
    names
        .filter(|name| name.starts_with("KILN_") && !known.contains(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(
            &path,
            "data_dir = \"/from/file\"\ngrpc_addr = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let args = CommonArgs {
            config: Some(path),
            grpc_addr: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        };
        let config = KilnConfig::resolve(&args, &[]).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.grpc_addr.port(), 2);
        assert_eq!(config.registry_addr.port(), 5000);
    }

    #[test]
    fn an_advertise_url_joins_a_farm() {
        let config = KilnConfig::resolve(&CommonArgs::default(), &[]).unwrap();
        assert!(!config.coordinator.farm.enabled);
        let args = CommonArgs {
            farm_advertise_url: Some("http://10.0.0.7:8980".into()),
            ..Default::default()
        };
        let config = KilnConfig::resolve(&args, &[]).unwrap();
        assert!(config.coordinator.farm.enabled);
        assert_eq!(
            config.coordinator.farm.advertise_url,
            "http://10.0.0.7:8980"
        );
        assert_eq!(config.coordinator.farm.lease_term_secs, 6);
    }

    #[test]
    fn a_farm_over_tls_is_configured_in_its_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        let table = "[coordinator.farm]\nenabled = true\nadvertise_url = \"https://10.0.0.7:8980\"\nca_file = \"/etc/kiln-tls/ca.crt\"\nserver_name = \"kiln-grpc.build.svc\"\n";
        std::fs::write(&path, table).unwrap();
        let farm = KilnConfig::from_file(&path).unwrap().coordinator.farm;
        assert!(farm.enabled);
        assert_eq!(farm.advertise_url, "https://10.0.0.7:8980");
        assert_eq!(
            farm.ca_file.as_deref(),
            Some(Path::new("/etc/kiln-tls/ca.crt"))
        );
        assert_eq!(farm.server_name.as_deref(), Some("kiln-grpc.build.svc"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "data_dri = \"typo\"\n").unwrap();
        let err = KilnConfig::from_file(&path).unwrap_err();
        assert!(format!("{err:#}").contains("data_dri"), "{err:#}");
        std::fs::write(&path, "[coordinator]\nno_such_key = 1\n").unwrap();
        assert!(KilnConfig::from_file(&path).is_err());
    }

    #[test]
    fn unknown_variables_are_found_not_refused() {
        let known = ["KILN_DATA_DIR".to_string(), "KILN_LOG".to_string()];
        let names = ["PATH", "KILN_DATA_DIR", "KILN_DATADIR", "KILN_BIN"].map(String::from);
        assert_eq!(
            unknown_variables(names.into_iter(), &known),
            ["KILN_DATADIR", "KILN_BIN"]
        );
        assert!(unknown_variables(["KILN_LOG".to_string()].into_iter(), &known).is_empty());
    }

    #[test]
    fn the_telemetry_table_and_otel_variables_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(
            &path,
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\n",
        )
        .unwrap();
        let config = KilnConfig::from_file(&path).unwrap();
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        std::fs::write(&path, "[telemetry]\nendpoint = \"typo\"\n").unwrap();
        assert!(KilnConfig::from_file(&path).is_err());
        // The OpenTelemetry SDK's own variables are not kiln's to police.
        let names = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SERVICE_NAME",
            "OTEL_RESOURCE_ATTRIBUTES",
        ]
        .map(String::from);
        assert!(unknown_variables(names.into_iter(), &[]).is_empty());
    }

    #[test]
    fn the_cas_limit_takes_units_from_the_file_and_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "[cas]\nmax_bytes = \"2GiB\"\ngrace_secs = 60\n").unwrap();
        let from_file = KilnConfig::from_file(&path).unwrap();
        let policy = from_file.cas.policy(dir.path(), 0).unwrap();
        assert_eq!(policy.max_bytes, 2 << 30);
        assert_eq!(policy.grace.as_secs(), 60);

        let args = CommonArgs {
            config: Some(path),
            cas_max_bytes: Some("50MiB".parse().unwrap()),
            ..Default::default()
        };
        let config = KilnConfig::resolve(&args, &[]).unwrap();
        assert_eq!(
            config.cas.policy(dir.path(), 0).unwrap().max_bytes,
            50 << 20
        );
    }

    #[test]
    fn the_default_cas_limit_is_half_of_what_the_disk_offers() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        let held = 1 << 30;
        let policy = CasConfig::default().policy(dir.path(), held).unwrap();
        // Free space moves between the two readings on a shared machine.
        let expected = (free + held) / 2;
        assert!(
            policy.max_bytes.abs_diff(expected) < expected / 10,
            "{policy:?}"
        );
    }

    #[test]
    fn watermarks_out_of_order_are_refused() {
        let cas = CasConfig {
            high_watermark: 0.5,
            low_watermark: 0.7,
            ..Default::default()
        };
        let err = cas.policy(Path::new("/"), 0).unwrap_err();
        assert!(err.to_string().contains("low_watermark"), "{err}");
    }
}
