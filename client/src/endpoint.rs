//! Where a client connects, and how: `grpc://` (plain HTTP/2) or `grpcs://` (TLS, with
//! the system's roots or a CA of the user's, and a client certificate for mutual TLS).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::{ClientError, Result};

/// HTTP/2 flow-control windows of kiln's clients, the sizes the coordinator uses for its
/// own: the defaults (64 KiB) cap one ByteStream call at a few hundred MB/s even on
/// loopback.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// The largest HTTP/2 frame the client takes. With HTTP/2's default (16 KiB) the server
/// sends a 1 MiB ByteStream chunk as 64 frames, each a system call and a trip through the
/// HTTP/2 state machine on both sides: measured on loopback, reads ran at half the
/// registry's pull speed with 16 KiB frames and at its speed with 1 MiB frames.
const MAX_FRAME_SIZE: u32 = 1 << 20;

/// TLS settings of a client. Empty: the system's roots, no client certificate.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM CA certificates to trust instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate and key presented for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry, when it is not the URL's host (a
    /// server reached by IP address whose certificate names `localhost`).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .finish()
    }
}

impl ClientTls {
    /// Reads the files a command line names; a certificate needs its key and the reverse.
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Self> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| ClientError::InvalidEndpoint {
                url: path.display().to_string(),
                reason: format!("cannot read it: {e}"),
            })
        };
        let identity_pem = match (cert, key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => {
                return Err(ClientError::InvalidEndpoint {
                    url: String::new(),
                    reason: "a client certificate needs its key, and the key its certificate"
                        .into(),
                })
            }
        };
        Ok(ClientTls {
            ca_pem: ca.map(read).transpose()?,
            identity_pem,
            server_name: None,
        })
    }

    fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

/// Turns `grpc://host:port` (or `http://`) into a plain endpoint, and `grpcs://host:port`
/// (or `https://`) into a TLS one with `tls`.
pub fn endpoint_with_tls(url: &str, tls: &ClientTls) -> Result<Endpoint> {
    let invalid = |reason: String| ClientError::InvalidEndpoint {
        url: url.to_string(),
        reason,
    };
    let (scheme, rest) = if let Some(rest) = url
        .strip_prefix("grpc://")
        .or_else(|| url.strip_prefix("http://"))
    {
        ("http", rest)
    } else if let Some(rest) = url
        .strip_prefix("grpcs://")
        .or_else(|| url.strip_prefix("https://"))
    {
        ("https", rest)
    } else {
        return Err(invalid(
            "expected grpc://HOST:PORT or grpcs://HOST:PORT".into(),
        ));
    };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{rest}"))
        .map(|e| {
            e.tcp_nodelay(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
        })
        .map_err(|e| invalid(e.to_string()))?;
    if scheme == "https" {
        endpoint
            .tls_config(tls.config())
            .map_err(|e| invalid(format!("TLS: {e}")))
    } else {
        Ok(endpoint)
    }
}

/// [`endpoint_with_tls`] with the system's roots and no client certificate.
pub fn endpoint(url: &str) -> Result<Endpoint> {
    endpoint_with_tls(url, &ClientTls::default())
}
