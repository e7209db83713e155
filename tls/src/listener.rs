//! Accepting connections for kiln's servers: at most so many per client address, and,
//! with TLS, handshakes that cannot hold up the others.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::connection_limit::{ConnectionLimit, Limited};

/// A client must finish its handshake within this; one that connects and says nothing
/// is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once rather than
/// queued, so a flood of idle connections cannot take the memory of a queue.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// A TLS session, holding its place under the connection limit.
pub type TlsStream = Limited<tokio_rustls::server::TlsStream<TcpStream>>;
/// A plain connection, holding its place under the connection limit.
pub type PlainStream = Limited<TcpStream>;

/// A TCP listener whose connections come out admitted (under the per-address limit) and,
/// for TLS, with the handshake done: each handshake runs in a task of its own, under
/// [`HANDSHAKE_TIMEOUT`].
pub struct ServerListener<Io> {
    local_addr: SocketAddr,
    accepted: mpsc::Receiver<(Io, SocketAddr)>,
    _accepting: AbortOnDrop,
}

/// The listener for TLS sessions.
pub type TlsListener = ServerListener<TlsStream>;
/// The listener for plain connections.
pub type PlainListener = ServerListener<PlainStream>;

/// Stops the accept loop when the listener goes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TlsListener {
    pub fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        limit: ConnectionLimit,
    ) -> std::io::Result<Self> {
        let acceptor = TlsAcceptor::from(config);
        ServerListener::accepting(listener, limit, move |tcp| {
            let acceptor = acceptor.clone();
            async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(result) => result,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    )),
                }
            }
        })
    }
}

impl PlainListener {
    pub fn new(listener: TcpListener, limit: ConnectionLimit) -> std::io::Result<Self> {
        ServerListener::accepting(listener, limit, |tcp| std::future::ready(Ok(tcp)))
    }
}

impl<Io: Send + 'static> ServerListener<Limited<Io>> {
    /// Accepts on `listener`, admits each connection under `limit`, and hands it over
    /// once `establish` (the handshake, or nothing) is done.
    fn accepting<F, Fut>(
        listener: TcpListener,
        limit: ConnectionLimit,
        establish: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = std::io::Result<Io>> + Send + 'static,
    {
        let local_addr = listener.local_addr()?;
        let (sessions, accepted) = mpsc::channel(64);
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
                let Some(slot) = limit.admit(peer.ip()) else {
                    tracing::debug!(%peer, "too many connections from this address; closed");
                    continue;
                };
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "too many handshakes in progress; closed");
                    continue;
                };
                // Nagle's algorithm would hold small gRPC frames back.
                let _ = tcp.set_nodelay(true);
                let (connection, sessions) = (establish(tcp), sessions.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match connection.await {
                        Ok(io) => {
                            let _ = sessions.send((Limited::new(io, slot), peer)).await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "connection set-up failed"),
                    }
                });
            }
        });
        Ok(ServerListener {
            local_addr,
            accepted,
            _accepting: AbortOnDrop(accepting),
        })
    }
}

impl<Io> ServerListener<Io> {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The connections as a stream, for `tonic`'s `serve_with_incoming`.
    pub fn into_stream(self) -> Incoming<Io> {
        Incoming(self)
    }

    async fn next_connection(&mut self) -> (Io, SocketAddr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop never ends by itself; if it did, serve nothing more.
            None => std::future::pending().await,
        }
    }
}

/// [`ServerListener`] as a `Stream` of connections.
pub struct Incoming<Io>(ServerListener<Io>);

impl<Io> futures::Stream for Incoming<Io> {
    type Item = std::io::Result<Io>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0
            .accepted
            .poll_recv(cx)
            .map(|connection| connection.map(|(io, _)| Ok(io)))
    }
}

impl<Io> axum::serve::Listener for ServerListener<Io>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next_connection().await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

impl<Io> fmt::Debug for ServerListener<Io> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerListener({})", self.local_addr)
    }
}
