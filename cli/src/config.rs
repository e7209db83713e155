//! kiln's configuration: a TOML file, then `KILN_*` environment variables, then flags.
//!
//! Flags and variables are declared together in [`CommonArgs`] (clap reads both, flags
//! winning); whatever they leave unset comes from the file, then from the defaults.
//! Unknown keys in the file, and unknown `KILN_*` variables, are errors: a typo must not
//! silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
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
    /// How many local workers `kiln up` starts (0: one per core).
    pub workers: usize,
    /// A `tracing` filter, as in `RUST_LOG`.
    pub log: String,
    pub coordinator: kiln_coordinator::CoordinatorConfig,
}

impl Default for KilnConfig {
    fn default() -> Self {
        KilnConfig {
            data_dir: PathBuf::from("kiln-data"),
            grpc_addr: "127.0.0.1:8980".parse().expect("valid default address"),
            registry_addr: "127.0.0.1:5000".parse().expect("valid default address"),
            workers: 0,
            log: "info".to_string(),
            coordinator: Default::default(),
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
    /// Local workers started by `kiln up` [default: one per core].
    #[arg(long, env = "KILN_WORKERS", global = true)]
    pub workers: Option<usize>,
    /// Log filter, e.g. `info` or `kiln_coordinator=debug` [default: info].
    #[arg(long, env = "KILN_LOG", global = true)]
    pub log: Option<String>,
}

/// Every `KILN_*` variable kiln reads; any other is reported as a mistake.
const KNOWN_VARIABLES: &[&str] = &[
    "KILN_CONFIG",
    "KILN_DATA_DIR",
    "KILN_GRPC_ADDR",
    "KILN_REGISTRY_ADDR",
    "KILN_WORKERS",
    "KILN_LOG",
    // `kiln publish`: registry credentials (never logged).
    "KILN_REGISTRY_USER",
    "KILN_REGISTRY_PASSWORD",
];

impl KilnConfig {
    /// Resolves the configuration from the file named by `args.config` (if any), the
    /// environment and the flags.
    pub fn resolve(args: &CommonArgs) -> anyhow::Result<Self> {
        check_environment(std::env::vars().map(|(k, _)| k))?;
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => KilnConfig::default(),
        };
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
            config.workers = v;
        }
        if let Some(v) = &args.log {
            config.log = v.clone();
        }
        Ok(config)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in configuration file {}", path.display()))
    }
}

fn check_environment(names: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let unknown: Vec<String> = names
        .filter(|name| name.starts_with("KILN_") && !KNOWN_VARIABLES.contains(&name.as_str()))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "unknown environment variable(s) {}; known: {}",
            unknown.join(", "),
            KNOWN_VARIABLES.join(", ")
        );
    }
    Ok(())
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
        let config = KilnConfig::resolve(&args).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.grpc_addr.port(), 2);
        assert_eq!(config.registry_addr.port(), 5000);
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
    fn unknown_variables_are_errors() {
        let names = ["PATH", "KILN_DATA_DIR", "KILN_DATADIR"].map(String::from);
        let err = check_environment(names.into_iter()).unwrap_err();
        assert!(err.to_string().contains("KILN_DATADIR"));
        assert!(check_environment(["KILN_LOG".to_string()].into_iter()).is_ok());
    }
}
