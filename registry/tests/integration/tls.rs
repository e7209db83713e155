//! The registry serving HTTPS, to an HTTPS client like the one `kiln publish` uses
//! (reqwest on rustls): a blob pushed and pulled back, trust, and mutual TLS.

use kiln_registry::RegistryConfig;
use kiln_store::{Digest, DigestFunction};
use kiln_testkit::{ServedRegistry, Stores};
use kiln_tls::test_certs::{Issued, MutualTls, TestCa};
use kiln_tls::TlsFiles;

async fn serve(files: &TlsFiles) -> ServedRegistry {
    ServedRegistry::start_with_tls(RegistryConfig::default(), Stores::Memory, Some(files))
        .await
        .expect("the registry serves HTTPS")
}

/// A client that reaches `localhost` at the registry, trusting `ca` (the system's roots
/// without one) and presenting `identity`.
fn client(
    registry: &ServedRegistry,
    ca: Option<&TestCa>,
    identity: Option<&Issued>,
) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .resolve("localhost", registry.addr);
    if let Some(ca) = ca {
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap());
    }
    if let Some(issued) = identity {
        let pem = format!("{}{}", issued.key_pem, issued.cert_pem);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

fn url(registry: &ServedRegistry, path: &str) -> String {
    format!("https://localhost:{}{path}", registry.addr.port())
}

#[tokio::test]
async fn a_blob_goes_in_and_out_over_https_with_the_ca_and_not_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("server CA");
    let registry = serve(&ca.issue("kiln", &["localhost"]).server_files(dir.path())).await;
    let trusting = client(&registry, Some(&ca), None);

    let base = trusting.get(url(&registry, "/v2/")).send().await.unwrap();
    assert_eq!(base.status(), reqwest::StatusCode::OK);
    // ALPN offers http/1.1 only: the registry serves HTTP/1.1 (docker, skopeo and
    // containerd all speak it).
    assert_eq!(base.version(), reqwest::Version::HTTP_11);

    let blob = b"layer bytes over TLS".to_vec();
    let digest = Digest::of_bytes(DigestFunction::Sha256, &blob).oci();
    let pushed = trusting
        .post(url(
            &registry,
            &format!("/v2/app/blobs/uploads/?digest={digest}"),
        ))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), reqwest::StatusCode::CREATED);
    let pulled = trusting
        .get(url(&registry, &format!("/v2/app/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(pulled.status(), reqwest::StatusCode::OK);
    assert_eq!(pulled.bytes().await.unwrap().as_ref(), blob.as_slice());

    let untrusting = client(&registry, None, None);
    assert!(untrusting.get(url(&registry, "/v2/")).send().await.is_err());
    let plain = reqwest::get(format!("http://{}/v2/", registry.addr)).await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
}

#[tokio::test]
async fn mutual_tls_admits_only_certificates_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mtls = MutualTls::new(dir.path(), &["localhost"]);
    let (server_ca, client_ca) = (&mtls.server_ca, &mtls.client_ca);
    let registry = serve(&mtls.files).await;

    let publisher = client_ca.issue("release-job", &[]);
    let admitted = client(&registry, Some(server_ca), Some(&publisher))
        .get(url(&registry, "/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(admitted.status(), reqwest::StatusCode::OK);

    let without = client(&registry, Some(server_ca), None);
    assert!(without.get(url(&registry, "/v2/")).send().await.is_err());
    let foreign = TestCa::new("foreign CA").issue("release-job", &[]);
    let with_foreign = client(&registry, Some(server_ca), Some(&foreign));
    assert!(with_foreign
        .get(url(&registry, "/v2/"))
        .send()
        .await
        .is_err());
}
