//! Publishing to kiln's own registry: the Docker token flow with credentials from the
//! environment's equivalent and from docker's config.json, and tag policy refusals that
//! leave the other tags in place; HTTPS with a CA and mutual TLS.

use crate::support;

use std::path::Path;

use base64::Engine as _;
use kiln_client::ClientTls;
use kiln_publish::{
    publish, Compression, CredentialStore, Credentials, LayerContent, Provenance, PublishError,
    PublishRequest, RegistryTls, RuntimeSettings,
};
use kiln_tls::test_certs::{Issued, MutualTls, TestCa};
use support::kiln_servers::{self, PASSWORD, USER};

fn request(
    registry: &str,
    content: &Path,
    tags: &[&str],
    credentials: CredentialStore,
) -> PublishRequest {
    PublishRequest {
        registry: registry.to_string(),
        insecure: false,
        registry_tls: Default::default(),
        repository: "app".into(),
        content: LayerContent::Directory(content.to_path_buf()),
        content_description: "test content".into(),
        base: None,
        compression: Compression::Gzip,
        runtime: RuntimeSettings::default(),
        provenance: Provenance {
            created_epoch: 1_700_000_000,
            ..Default::default()
        },
        tags: tags.iter().map(|t| t.to_string()).collect(),
        credentials,
        progress: Default::default(),
    }
}

fn explicit() -> CredentialStore {
    CredentialStore {
        explicit: Some(Credentials {
            username: USER.into(),
            password: PASSWORD.into(),
        }),
        docker_config: None,
        ..Default::default()
    }
}

fn dir_with(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.txt"), text).unwrap();
    dir
}

#[tokio::test]
async fn token_flow_with_credentials_and_without() {
    let registry = kiln_servers::registry(true).await;
    let dir = dir_with("one\n");

    let err = publish(request(
        &registry.address,
        dir.path(),
        &["v1.0.0"],
        CredentialStore::default(),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(&err, PublishError::Auth { reason, .. } if reason.contains("KILN_REGISTRY_USER")),
        "{err}"
    );

    let wrong = CredentialStore {
        explicit: Some(Credentials {
            username: USER.into(),
            password: "wrong".into(),
        }),
        docker_config: None,
        ..Default::default()
    };
    let err = publish(request(&registry.address, dir.path(), &["v1.0.0"], wrong))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Auth { .. }), "{err}");
    assert!(
        !err.to_string().contains("wrong"),
        "secrets stay out of errors: {err}"
    );

    let outcome = publish(request(
        &registry.address,
        dir.path(),
        &["v1.0.0"],
        explicit(),
    ))
    .await
    .unwrap();
    assert_eq!(outcome.tags_pushed, vec!["v1.0.0"]);

    // The same user through docker's config.json.
    let docker = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let config = docker.path().join("config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            registry.address
        ),
    )
    .unwrap();
    let from_docker = CredentialStore {
        explicit: None,
        docker_config: Some(config),
        ..Default::default()
    };
    let again = publish(request(
        &registry.address,
        dir.path(),
        &["v1.0.0"],
        from_docker,
    ))
    .await
    .unwrap();
    assert_eq!(again.manifest_digest, outcome.manifest_digest);
}

#[tokio::test]
async fn refused_tags_are_reported_and_the_others_land() {
    let registry = kiln_servers::registry(false).await;
    let first = dir_with("first\n");
    let outcome = publish(request(
        &registry.address,
        first.path(),
        &["v0.1.0", "abc1234", "main-abc1234"],
        CredentialStore::default(),
    ))
    .await
    .unwrap();
    assert_eq!(outcome.tags_pushed.len(), 3);
    assert!(outcome.tags_refused.is_empty());

    // Same content again: re-pushing an immutable semver tag with the same digest is fine.
    let same = publish(request(
        &registry.address,
        first.path(),
        &["v0.1.0"],
        CredentialStore::default(),
    ))
    .await
    .unwrap();
    assert_eq!(same.manifest_digest, outcome.manifest_digest);
    assert!(same.tags_refused.is_empty());

    // Other content under v0.1.0 is refused; `latest` is refused; the new SHA tag lands.
    let second = dir_with("second\n");
    let changed = publish(request(
        &registry.address,
        second.path(),
        &["v0.1.0", "latest", "def5678"],
        CredentialStore::default(),
    ))
    .await
    .unwrap();
    assert_ne!(changed.manifest_digest, outcome.manifest_digest);
    assert_eq!(changed.tags_pushed, vec!["def5678"]);
    let refused: Vec<&str> = changed
        .tags_refused
        .iter()
        .map(|(t, _)| t.as_str())
        .collect();
    assert_eq!(refused, vec!["v0.1.0", "latest"]);
    for (tag, reason) in &changed.tags_refused {
        assert!(
            reason.contains("DENIED") || reason.contains("TAG_INVALID"),
            "{tag}: {reason}"
        );
    }

    // v0.1.0 still names the first image.
    let response = reqwest::Client::new()
        .head(format!(
            "http://{}/v2/app/manifests/v0.1.0",
            registry.address
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["docker-content-digest"]
            .to_str()
            .unwrap(),
        outcome.manifest_digest.to_string()
    );
    // The refused push still left the image itself, pinned by digest.
    let response = reqwest::Client::new()
        .head(format!(
            "http://{}/v2/app/manifests/{}",
            registry.address, changed.manifest_digest
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
}

/// What the progress trait is told: every blob's start and how it ended, and for an
/// uploaded layer, bytes adding up to its size. The CLI's bars draw from nothing else.
#[tokio::test]
async fn progress_reports_every_blob_transfer() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use kiln_publish::{BlobTransfer, ProgressSink, PublishProgress};
    use kiln_store::ContentHash;

    #[derive(Default)]
    struct Recorded {
        sizes: Mutex<HashMap<ContentHash, u64>>,
        sent: Mutex<HashMap<ContentHash, u64>>,
        finished: Mutex<HashMap<ContentHash, BlobTransfer>>,
    }
    impl PublishProgress for Recorded {
        fn blob_started(&self, digest: &ContentHash, size: u64) {
            self.sizes.lock().unwrap().insert(*digest, size);
            self.sent.lock().unwrap().insert(*digest, 0);
        }
        fn blob_progressed(&self, digest: &ContentHash, bytes: u64) {
            *self.sent.lock().unwrap().entry(*digest).or_default() += bytes;
        }
        fn blob_finished(&self, digest: &ContentHash, transfer: BlobTransfer) {
            self.finished.lock().unwrap().insert(*digest, transfer);
        }
    }

    let registry = kiln_servers::registry(false).await;
    let dir = dir_with("reported\n");
    let recorded = Arc::new(Recorded::default());
    let mut publishing = request(
        &registry.address,
        dir.path(),
        &["v9.9.9"],
        CredentialStore::default(),
    );
    publishing.progress = ProgressSink(recorded.clone());
    let outcome = publish(publishing).await.unwrap();
    let layer = &outcome.layer_digest;
    let finished = recorded.finished.lock().unwrap();
    assert_eq!(finished.get(layer), Some(&BlobTransfer::Uploaded));
    let size = recorded.sizes.lock().unwrap()[layer];
    assert!(size > 0);
    assert_eq!(
        recorded.sent.lock().unwrap()[layer],
        size,
        "bytes sent add up"
    );
}

#[tokio::test]
async fn publishing_over_https_needs_the_ca_and_for_mutual_tls_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let mtls = MutualTls::new(certs.path(), &["127.0.0.1"]);
    let (server_ca, client_ca) = (&mtls.server_ca, &mtls.client_ca);
    let registry = kiln_servers::registry_over_tls(&mtls.files).await;
    let dir = dir_with("over https\n");
    let release_job = client_ca.issue("release-job", &[]);
    let over_https = |ca: Option<&TestCa>, identity: Option<&Issued>| {
        let mut request = request(
            &registry.address,
            dir.path(),
            &["v1.0.0"],
            CredentialStore::default(),
        );
        request.registry_tls = RegistryTls {
            // A loopback registry is plain HTTP unless told otherwise.
            force_https: true,
            client: ClientTls {
                ca_pem: ca.map(|ca| ca.pem().as_bytes().to_vec()),
                identity_pem: identity.map(|i| {
                    (
                        i.cert_pem.clone().into_bytes(),
                        i.key_pem.clone().into_bytes(),
                    )
                }),
                server_name: None,
            },
        };
        request
    };

    let outcome = publish(over_https(Some(server_ca), Some(&release_job)))
        .await
        .expect("the CA and a client certificate from the client CA");
    assert_eq!(outcome.tags_pushed, vec!["v1.0.0"]);

    let err = publish(over_https(Some(server_ca), None))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Http { .. }), "{err}");
    let err = publish(over_https(None, Some(&release_job)))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Http { .. }), "{err}");
    let err = publish(over_https(
        Some(server_ca),
        Some(&server_ca.issue("stranger", &[])),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, PublishError::Http { .. }), "{err}");
}
