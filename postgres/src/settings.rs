//! Where the database is: `[metadata]` with `backend = "postgres"`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The connection settings. The password is never part of them as written: it comes
/// from `password_file`, or from the URL's own (for tests), or from `PGPASSWORD`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// `postgres://user@host:port/database?sslmode=require`, as libpq reads it
    /// (`sslmode`: disable, prefer or require; with TLS the server's certificate is
    /// checked against the system's roots or `ca_file`).
    pub url: String,
    /// A file holding the password (a Kubernetes Secret mounted as a file).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM certificates to trust for the server's certificate, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long to wait for a connection before the request fails (UNAVAILABLE / 503).
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
}

fn default_pool_size() -> usize {
    16
}

fn default_connect_timeout_secs() -> u64 {
    5
}

impl PostgresSettings {
    pub fn new(url: impl Into<String>) -> Self {
        PostgresSettings {
            url: url.into(),
            password_file: None,
            ca_file: None,
            pool_size: default_pool_size(),
            connect_timeout_secs: default_connect_timeout_secs(),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs.max(1))
    }
}

/// Printed without the URL's password, if it has one.
impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redact_url(&self.url))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .finish()
    }
}

/// The URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        let settings = PostgresSettings::new("postgres://kiln:hunter2@db:5432/kiln");
        let printed = format!("{settings:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("postgres://kiln:<redacted>@db:5432/kiln"));
        assert_eq!(
            redact_url("postgres://kiln@db/kiln"),
            "postgres://kiln@db/kiln"
        );
    }
}
