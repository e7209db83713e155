//! How a follower reaches the leader: one HTTP/2 channel to the address the leader's lease
//! names, plain for `http://` and TLS for `https://`, where the follower checks the
//! leader's certificate and presents its own (the leader may ask for client
//! certificates, as every replica does with `tls.client_ca`).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::CoordinatorError;

/// A channel is made again after this long, so that certificates rotated on disk (this
/// replica's, or the CA) are read again well before the old ones expire.
const RELOAD_AFTER: Duration = Duration::from_secs(600);

/// TLS of the link, for `https://` advertise URLs.
#[derive(Clone, Debug, Default)]
pub(crate) struct LinkTls {
    /// PEM CA certificates the leader's certificate must chain to; unset: the system's.
    pub(crate) ca_file: Option<PathBuf>,
    /// The name the leader's certificate must carry, when advertise URLs name addresses
    /// (a pod's IP) rather than the names in the certificate.
    pub(crate) server_name: Option<String>,
    /// This replica's own certificate and key, presented to the leader.
    pub(crate) identity: Option<(PathBuf, PathBuf)>,
}

impl LinkTls {
    fn client_config(&self) -> Result<ClientTlsConfig, CoordinatorError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                CoordinatorError::Unavailable(format!(
                    "the farm's TLS: cannot read {}: {e}",
                    path.display()
                ))
            })
        };
        let mut config = match &self.ca_file {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// The channel to the current leader, kept while the leader's address stays the same
/// (and for at most [`RELOAD_AFTER`]).
pub(crate) struct LeaderLink {
    tls: LinkTls,
    current: Mutex<Option<(String, Channel, Instant)>>,
}

impl LeaderLink {
    pub(crate) fn new(tls: LinkTls) -> Self {
        LeaderLink {
            tls,
            current: Mutex::new(None),
        }
    }

    pub(crate) fn channel_to(&self, address: &str) -> Result<Channel, CoordinatorError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, channel, made)) = current.as_ref() {
            if known == address && made.elapsed() < RELOAD_AFTER {
                return Ok(channel.clone());
            }
        }
        let invalid = |e: &dyn std::fmt::Display| {
            CoordinatorError::Internal(format!("the farm leader's address {address:?}: {e}"))
        };
        let mut endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| invalid(&e))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        if address.starts_with("https://") {
            endpoint = endpoint
                .tls_config(self.tls.client_config()?)
                .map_err(|e| invalid(&e))?;
        }
        let channel = endpoint.connect_lazy();
        *current = Some((address.to_string(), channel.clone(), Instant::now()));
        Ok(channel)
    }
}
