//! The coordinator serving `grpcs`: REAPI calls over TLS with the right trust, mutual TLS,
//! and a rotated certificate taken up by new connections without a restart. (kiln-tls's
//! own tests cover the handshake details; these go through tonic clients end to end.)

use std::net::SocketAddr;
use std::time::Duration;

use kiln_coordinator::CoordinatorConfig;
use kiln_proto::reapi::{capabilities_client::CapabilitiesClient, GetCapabilitiesRequest};
use kiln_testkit::{ServedCoordinator, Stores};
use kiln_tls::test_certs::{Issued, MutualTls, TestCa};
use kiln_tls::{TlsFiles, RELOAD_CHECK_INTERVAL};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A GetCapabilities call over a fresh TLS connection, trusting `ca` (the system's roots
/// without one) and presenting `identity`. Err says what failed, handshake or call.
async fn get_capabilities(
    addr: SocketAddr,
    ca: Option<&TestCa>,
    identity: Option<&Issued>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new().domain_name("localhost");
    tls = match ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(ca.pem())),
        None => tls.with_native_roots(),
    };
    if let Some(issued) = identity {
        tls = tls.identity(Identity::from_pem(&issued.cert_pem, &issued.key_pem));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    CapabilitiesClient::new(channel)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .map(|_| ())
        .map_err(|status| format!("call: {status:?}"))
}

async fn serve(files: &TlsFiles) -> ServedCoordinator {
    ServedCoordinator::start_with_tls(CoordinatorConfig::default(), Stores::Memory, Some(files))
        .await
        .expect("the coordinator serves TLS")
}

#[tokio::test]
async fn reapi_over_tls_works_with_the_ca_and_not_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("server CA");
    let server = serve(&ca.issue("kiln", &["localhost"]).server_files(dir.path())).await;

    get_capabilities(server.addr, Some(&ca), None)
        .await
        .expect("trusting the CA");
    assert!(get_capabilities(server.addr, None, None).await.is_err());
    let stranger = TestCa::new("another CA");
    assert!(get_capabilities(server.addr, Some(&stranger), None)
        .await
        .is_err());
    // Plaintext gRPC against the TLS port gets nowhere either.
    let plain = async {
        let channel = Endpoint::from_shared(server.http_url())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        CapabilitiesClient::new(channel)
            .get_capabilities(GetCapabilitiesRequest::default())
            .await?;
        anyhow::Ok(())
    };
    assert!(plain.await.is_err());
}

#[tokio::test]
async fn mutual_tls_admits_only_certificates_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mtls = MutualTls::new(dir.path(), &["localhost"]);
    let (server_ca, client_ca) = (&mtls.server_ca, &mtls.client_ca);
    let server = serve(&mtls.files).await;

    let client = client_ca.issue("ci", &[]);
    get_capabilities(server.addr, Some(server_ca), Some(&client))
        .await
        .expect("a certificate from the client CA");
    assert!(get_capabilities(server.addr, Some(server_ca), None)
        .await
        .is_err());
    let foreign = TestCa::new("foreign CA").issue("ci", &[]);
    assert!(
        get_capabilities(server.addr, Some(server_ca), Some(&foreign))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old CA");
    let files = old_ca
        .issue("kiln", &["localhost"])
        .server_files(dir.path());
    let server = serve(&files).await;
    get_capabilities(server.addr, Some(&old_ca), None)
        .await
        .expect("the first certificate");

    // Rotated to a certificate from another CA, so that trust tells which one is served.
    let new_ca = TestCa::new("new CA");
    new_ca
        .issue("kiln", &["localhost"])
        .server_files(dir.path());
    tokio::time::sleep(RELOAD_CHECK_INTERVAL + Duration::from_millis(500)).await;
    get_capabilities(server.addr, Some(&new_ca), None)
        .await
        .expect("the rotated certificate");
    assert!(get_capabilities(server.addr, Some(&old_ca), None)
        .await
        .is_err());

    // A broken replacement keeps the last good certificate.
    std::fs::write(&files.key, "not a key").unwrap();
    tokio::time::sleep(RELOAD_CHECK_INTERVAL + Duration::from_millis(500)).await;
    get_capabilities(server.addr, Some(&new_ca), None)
        .await
        .expect("still the rotated certificate");
}
