//! Accepting TLS connections without letting slow handshakes hold up the others.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// A client must finish its handshake within this; one that connects and says nothing
/// is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once rather than
/// queued, so a flood of idle connections cannot take the memory of a queue.
const MAX_PENDING_HANDSHAKES: usize = 1024;

pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A TCP listener whose connections come out as finished TLS sessions: each handshake
/// runs in a task of its own, under [`HANDSHAKE_TIMEOUT`].
pub struct TlsListener {
    local_addr: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream, SocketAddr)>,
    _accepting: AbortOnDrop,
}

/// Stops the accept loop when the listener goes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (sessions, accepted) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let accepting = tokio::spawn(async move {
            let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, typically: wait rather than spin.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "too many TLS handshakes in progress; closed");
                    continue;
                };
                // Nagle's algorithm would hold small gRPC frames back.
                let _ = tcp.set_nodelay(true);
                let (acceptor, sessions) = (acceptor.clone(), sessions.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(session)) => {
                            let _ = sessions.send((session, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            local_addr,
            accepted,
            _accepting: AbortOnDrop(accepting),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The sessions as a stream, for `tonic`'s `serve_with_incoming`.
    pub fn into_stream(self) -> TlsIncoming {
        TlsIncoming(self)
    }

    async fn next_session(&mut self) -> (TlsStream, SocketAddr) {
        match self.accepted.recv().await {
            Some(session) => session,
            // The accept loop never ends by itself; if it did, serve nothing more.
            None => std::future::pending().await,
        }
    }
}

/// [`TlsListener`] as a `Stream` of sessions.
pub struct TlsIncoming(TlsListener);

impl futures::Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0
            .accepted
            .poll_recv(cx)
            .map(|session| session.map(|(stream, _)| Ok(stream)))
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next_session().await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsListener({})", self.local_addr)
    }
}
