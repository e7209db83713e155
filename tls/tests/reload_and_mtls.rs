//! TLS sessions over real sockets: the certificate served follows its files without a
//! restart (a broken replacement keeps the old one), mutual TLS refuses clients without
//! a certificate from the client CA, a client that never handshakes delays nobody, and
//! the server's cipher preference wins.

use std::sync::Arc;
use std::time::Duration;

use kiln_tls::test_certs::{Issued, MutualTls, TestCa};
use kiln_tls::{
    server_config, ConnectionLimit, TlsFiles, TlsListener, HANDSHAKE_TIMEOUT, RELOAD_CHECK_INTERVAL,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Serves `files`; every session echoes one byte back.
async fn serve(files: &TlsFiles) -> std::net::SocketAddr {
    let config = server_config(files, &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut listener = TlsListener::new(tcp, config, ConnectionLimit::new(0)).unwrap();
    let addr = listener.local_addr();
    tokio::spawn(async move {
        loop {
            let (mut session, _) = axum::serve::Listener::accept(&mut listener).await;
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                if session.read_exact(&mut byte).await.is_ok() {
                    let _ = session.write_all(&byte).await;
                }
            });
        }
    });
    addr
}

/// What a client saw of a session.
struct Session {
    /// The server's certificate, DER.
    certificate: Vec<u8>,
    suite: rustls::CipherSuite,
}

/// Connects trusting `ca`, optionally with a client certificate, and sends one byte there
/// and back.
async fn connect(
    addr: std::net::SocketAddr,
    ca: &TestCa,
    client: Option<&Issued>,
) -> std::io::Result<Session> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(issued) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let mut session = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    session.write_all(b"x").await?;
    let mut echo = [0u8; 1];
    session.read_exact(&mut echo).await?;
    let (_, connection) = session.get_ref();
    Ok(Session {
        certificate: connection.peer_certificates().unwrap()[0].to_vec(),
        suite: connection.negotiated_cipher_suite().unwrap().suite(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_follows_its_files_and_a_broken_one_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let first = ca.issue("kiln", &["localhost"]);
    let files = first.server_files(dir.path());
    let addr = serve(&files).await;
    assert_eq!(
        connect(addr, &ca, None).await.unwrap().certificate,
        first.der
    );

    // Rotated in place: new connections get the new certificate, without a restart.
    let second = ca.issue("kiln", &["localhost"]);
    second.write(dir.path(), "server");
    tokio::time::sleep(RELOAD_CHECK_INTERVAL + Duration::from_millis(500)).await;
    assert_eq!(
        connect(addr, &ca, None).await.unwrap().certificate,
        second.der
    );

    // A replacement that does not parse: the last good certificate stays.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    tokio::time::sleep(RELOAD_CHECK_INTERVAL + Duration::from_millis(500)).await;
    assert_eq!(
        connect(addr, &ca, None).await.unwrap().certificate,
        second.der
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mtls = MutualTls::new(dir.path(), &["localhost"]);
    let (server_ca, client_ca) = (&mtls.server_ca, &mtls.client_ca);
    let addr = serve(&mtls.files).await;

    let worker = client_ca.issue("worker-1", &[]);
    assert!(connect(addr, server_ca, Some(&worker)).await.is_ok());
    assert!(connect(addr, server_ca, None).await.is_err());
    // Signed by another CA (here, the server's): refused too.
    let stranger = server_ca.issue("stranger", &[]);
    assert!(connect(addr, server_ca, Some(&stranger)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_handshakes_delays_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let issued = ca.issue("kiln", &["localhost"]);
    let addr = serve(&issued.server_files(dir.path())).await;
    let _silent: Vec<TcpStream> = futures::future::join_all(
        (0..16).map(|_| async { TcpStream::connect(addr).await.unwrap() }),
    )
    .await;
    let started = std::time::Instant::now();
    assert_eq!(
        connect(addr, &ca, None).await.unwrap().certificate,
        issued.der
    );
    // Well before the silent ones' handshakes time out, which is what the connection
    // would otherwise wait for; with room for a busy machine.
    assert!(
        started.elapsed() < HANDSHAKE_TIMEOUT / 2,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_128_gcm_wins_over_the_clients_preference() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let addr = serve(&ca.issue("kiln", &["localhost"]).server_files(dir.path())).await;
    // rustls's client, like tonic's, offers AES-256-GCM first.
    let offered = rustls::crypto::ring::default_provider().cipher_suites[0].suite();
    assert_eq!(offered, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let session = connect(addr, &ca, None).await.unwrap();
    assert_eq!(session.suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
}
