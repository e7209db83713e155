//! The `[tls]` table of kiln's configuration.

use std::path::PathBuf;

use serde::Deserialize;

/// PEM files for a TLS server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to. Set, every client must
    /// present one (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}
