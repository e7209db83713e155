//! The listeners of kiln's servers: TLS, and a limit on connections per client address.
//! The coordinator's gRPC and the registry's HTTP share one set of files (`[tls]`:
//! `cert`, `key`, optionally `client_ca` for mutual TLS).
//!
//! - **rustls on ring**: pure Rust and C-free but for ring's assembly, so no cmake or
//!   aws-lc build on two cores; AES-GCM and ChaCha20 are fast at the rates kiln serves.
//! - **Reloading** ([`ReloadingCertificate`], [`ReloadingClientCa`]): at most every
//!   [`RELOAD_CHECK_INTERVAL`], a handshake looks at the files' modification times and
//!   sizes, and reloads them when they changed (cert-manager replaces them in place, or
//!   swaps a symlink). A file that does not parse keeps the previous certificate, with a
//!   warning: rotation must never take a server down. Checked lazily, on handshakes,
//!   rather than by a task of its own: nothing to start or stop, and an idle server does
//!   no work.
//! - **Handshakes off the accept loop** ([`TlsListener`]): each runs in a task of its own
//!   with a deadline, so a client that connects and says nothing delays nobody.

mod connection_limit;
mod files;
mod listener;
mod reload;
#[cfg(feature = "test-certs")]
pub mod test_certs;

use std::path::PathBuf;

pub use connection_limit::{AddressSlot, ConnectionLimit, Limited};
pub use files::TlsFiles;
pub use listener::{
    Incoming, PlainListener, PlainStream, ServerListener, TlsListener, TlsStream, HANDSHAKE_TIMEOUT,
};
pub use reload::{ReloadingCertificate, ReloadingClientCa, RELOAD_CHECK_INTERVAL};
/// The rustls the servers are configured with, for crates that hold its types.
pub use rustls;

/// What can go wrong setting TLS up. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A rustls server configuration over `files`, offering the `alpn` protocols (`h2` for
/// gRPC, `http/1.1` for the registry). Certificates reload as the module says.
pub fn server_config(
    files: &TlsFiles,
    alpn: &[&[u8]],
) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
    let provider = std::sync::Arc::new(aes_128_first(rustls::crypto::ring::default_provider()));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => builder.with_client_cert_verifier(std::sync::Arc::new(
            ReloadingClientCa::load(ca.clone(), provider)?,
        )),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(std::sync::Arc::new(ReloadingCertificate::load(
        files.cert.clone(),
        files.key.clone(),
    )?));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The server's order decides, not the client's (rustls and Go clients offer
    // AES-256-GCM first).
    config.ignore_client_order = true;
    Ok(std::sync::Arc::new(config))
}

/// The provider with AES-128-GCM preferred: TLS 1.3's mandatory suite, ample for
/// session keys, and the cheapest per byte where the bulk data is (four fewer AES rounds
/// than AES-256; 6.1 against 5.4 GB/s per core on the benchmark machine). The other
/// suites stay, in rustls's order, for clients without it.
fn aes_128_first(mut provider: rustls::crypto::CryptoProvider) -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite::{
        TLS13_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    };
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            TLS13_AES_128_GCM_SHA256
                | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}
