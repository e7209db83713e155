//! Publishing to CNCF distribution (Debian's docker-registry), a registry kiln did not
//! write: push, tags, reproducible re-publish, `--base` with mounts, indexes, zstd.

use crate::support;

use std::path::Path;

use kiln_publish::{
    publish, BlobTransfer, Compression, CredentialStore, LayerContent, ManifestReference,
    Provenance, PublishError, PublishRequest, RegistryClient, RuntimeSettings, TargetPlatform,
};
use kiln_store::{ContentHash, NameError};
use support::distribution::Distribution;

fn request(registry: &str, repository: &str, content: &Path, tags: &[&str]) -> PublishRequest {
    PublishRequest {
        registry: registry.to_string(),
        insecure: false,
        registry_tls: Default::default(),
        repository: repository.to_string(),
        content: LayerContent::Directory(content.to_path_buf()),
        content_description: "from a directory".into(),
        base: None,
        compression: Compression::Gzip,
        runtime: RuntimeSettings {
            entrypoint: Some(vec!["/bin/app".into()]),
            ..Default::default()
        },
        provenance: Provenance {
            created_epoch: 1_700_000_000,
            revision: Some("0123456789abcdef0123456789abcdef01234567".into()),
            source: Some("https://git.example/org/app".into()),
            version: Some("v1.0.0".into()),
        },
        tags: tags.iter().map(|t| t.to_string()).collect(),
        credentials: CredentialStore::default(),
        progress: Default::default(),
    }
}

fn content(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, text).unwrap();
    }
    dir
}

async fn get_json(url: &str, accept: &str) -> (serde_json::Value, String, Vec<u8>) {
    let response = reqwest::Client::new()
        .get(url)
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = response.bytes().await.unwrap().to_vec();
    (serde_json::from_slice(&bytes).unwrap(), content_type, bytes)
}

/// Computed apart from kiln-publish, so that the digests it reports are checked.
fn sha256(bytes: &[u8]) -> ContentHash {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
    )
    .parse()
    .unwrap()
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[tokio::test]
#[ignore = "needs Debian's docker-registry; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn publishes_a_directory_with_tags_and_republishes_identically() {
    let registry = Distribution::start().await;
    let dir = content(&[
        ("bin/app", "#!/bin/sh\necho hi\n"),
        ("etc/app.toml", "x = 1\n"),
    ]);
    let tags = ["v1.0.0", "0123456", "main-0123456"];
    let outcome = publish(request(&registry.address, "team/app", dir.path(), &tags))
        .await
        .unwrap();
    assert_eq!(
        outcome.pinned_reference,
        format!("{}/team/app@{}", registry.address, outcome.manifest_digest)
    );
    assert_eq!(outcome.tags_pushed, tags);
    assert!(outcome.tags_refused.is_empty());
    assert_eq!(
        outcome.blobs,
        vec![
            (outcome.layer_digest, BlobTransfer::Uploaded),
            (outcome.config_digest, BlobTransfer::Uploaded)
        ]
    );

    let base = format!("http://{}/v2/team/app", registry.address);
    for tag in tags {
        let (manifest, content_type, bytes) =
            get_json(&format!("{base}/manifests/{tag}"), OCI_MANIFEST).await;
        assert_eq!(content_type, OCI_MANIFEST);
        assert_eq!(sha256(&bytes), outcome.manifest_digest);
        assert_eq!(
            manifest["config"]["digest"],
            outcome.config_digest.to_string()
        );
        assert_eq!(
            manifest["layers"][0]["digest"],
            outcome.layer_digest.to_string()
        );
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.created"],
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.revision"],
            "0123456789abcdef0123456789abcdef01234567"
        );
    }
    let (config, _, config_bytes) = get_json(
        &format!("{base}/blobs/{}", outcome.config_digest),
        "application/octet-stream",
    )
    .await;
    assert_eq!(sha256(&config_bytes), outcome.config_digest);
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"][0], "/bin/app");
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.version"],
        "v1.0.0"
    );
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.source"],
        "https://git.example/org/app"
    );
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    assert_eq!(config["rootfs"]["diff_ids"][0], outcome.diff_id.to_string());
    let layer = reqwest::get(format!("{base}/blobs/{}", outcome.layer_digest))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256(&layer), outcome.layer_digest);
    let (tag_list, _, _) = get_json(&format!("{base}/tags/list"), "application/json").await;
    let mut listed: Vec<String> = serde_json::from_value(tag_list["tags"].clone()).unwrap();
    listed.sort();
    let mut expected: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected);

    // The same content elsewhere on disk, written later: the same image, nothing uploaded.
    let again_dir = content(&[
        ("etc/app.toml", "x = 1\n"),
        ("bin/app", "#!/bin/sh\necho hi\n"),
    ]);
    let again = publish(request(
        &registry.address,
        "team/app",
        again_dir.path(),
        &tags,
    ))
    .await
    .unwrap();
    assert_eq!(again.manifest_digest, outcome.manifest_digest);
    assert!(again
        .blobs
        .iter()
        .all(|(_, transfer)| *transfer == BlobTransfer::Existed));
}

#[tokio::test]
#[ignore = "needs Debian's docker-registry; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn appends_to_a_base_image_mounting_its_layers() {
    let registry = Distribution::start().await;
    let base_dir = content(&[("etc/os-release", "ID=kiln-test\n")]);
    let base = publish(request(
        &registry.address,
        "base/os",
        base_dir.path(),
        &["v1"],
    ))
    .await
    .unwrap();

    let app_dir = content(&[("bin/app", "app\n")]);
    let mut app_request = request(&registry.address, "app", app_dir.path(), &["v2"]);
    app_request.base = Some("base/os:v1".into());
    app_request.runtime.env = vec!["MODE=prod".into()];
    let app = publish(app_request).await.unwrap();
    assert_eq!(app.blobs[0], (base.layer_digest, BlobTransfer::Mounted));
    assert_eq!(app.blobs[1], (app.layer_digest, BlobTransfer::Uploaded));

    let url = format!("http://{}/v2/app", registry.address);
    let (manifest, _, _) = get_json(&format!("{url}/manifests/v2"), OCI_MANIFEST).await;
    let layers: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        layers,
        vec![base.layer_digest.to_string(), app.layer_digest.to_string()]
    );
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.base.name"],
        "base/os:v1"
    );
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.base.digest"],
        base.manifest_digest.to_string()
    );
    let (config, _, _) = get_json(
        &format!("{url}/blobs/{}", app.config_digest),
        "application/octet-stream",
    )
    .await;
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([base.diff_id, app.diff_id])
    );
    assert_eq!(config["history"].as_array().unwrap().len(), 2);
    assert_eq!(config["config"]["Env"], serde_json::json!(["MODE=prod"]));

    // The base named by digest, from a registry-qualified reference, gives the same image.
    let mut by_digest = request(&registry.address, "app", app_dir.path(), &[]);
    by_digest.base = Some(format!(
        "{}/base/os@{}",
        registry.address, base.manifest_digest
    ));
    by_digest.runtime.env = vec!["MODE=prod".into()];
    let pinned = publish(by_digest).await.unwrap();
    assert_eq!(pinned.config_digest, app.config_digest);
    assert!(
        pinned
            .blobs
            .iter()
            .all(|(_, transfer)| *transfer == BlobTransfer::Existed),
        "{:?}",
        pinned.blobs
    );
}

#[tokio::test]
#[ignore = "needs Debian's docker-registry; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn a_base_index_resolves_to_the_platform_manifest() {
    let registry = Distribution::start().await;
    let base_dir = content(&[("etc/os-release", "ID=kiln-test\n")]);
    let base = publish(request(
        &registry.address,
        "multi",
        base_dir.path(),
        &["single"],
    ))
    .await
    .unwrap();
    let manifest_size = reqwest::get(format!(
        "http://{}/v2/multi/manifests/{}",
        registry.address, base.manifest_digest
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap()
    .len();
    // An index whose arm64 entry comes first; only amd64 exists for real, and both
    // entries point at the same (amd64) manifest.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": base.manifest_digest, "size": manifest_size,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": OCI_MANIFEST, "digest": base.manifest_digest, "size": manifest_size,
             "platform": {"os": "linux", "architecture": "amd64"}}
        ]
    });
    let client = RegistryClient::new(&registry.address, false, None).unwrap();
    client
        .put_manifest(
            "multi",
            &ManifestReference::Tag("index".into()),
            "application/vnd.oci.image.index.v1+json",
            &serde_json::to_vec(&index).unwrap(),
        )
        .await
        .unwrap();

    let app_dir = content(&[("app", "x\n")]);
    let mut amd64 = request(&registry.address, "multi-app", app_dir.path(), &["amd64"]);
    amd64.base = Some("multi:index".into());
    let app = publish(amd64).await.unwrap();
    assert_eq!(app.blobs[0].0, base.layer_digest);

    // arm64 picks the arm64 entry, whose config says amd64: refused, not mislabelled.
    let mut arm64 = request(&registry.address, "multi-app", app_dir.path(), &["arm64"]);
    arm64.base = Some("multi:index".into());
    arm64.runtime.platform = TargetPlatform {
        os: "linux".into(),
        architecture: "arm64".into(),
        variant: None,
    };
    let err = publish(arm64).await.unwrap_err();
    assert!(
        matches!(&err, PublishError::Image(m) if m.contains("linux/amd64")),
        "{err}"
    );

    let mut s390x = request(&registry.address, "multi-app", app_dir.path(), &["s390x"]);
    s390x.base = Some("multi:index".into());
    s390x.runtime.platform.architecture = "s390x".into();
    let err = publish(s390x).await.unwrap_err();
    assert!(
        err.to_string().contains("no manifest for linux/s390x"),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "needs Debian's docker-registry; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn zstd_layers_carry_the_zstd_media_type() {
    let registry = Distribution::start().await;
    let dir = content(&[("data.txt", "zstd please\n")]);
    let mut zstd = request(&registry.address, "zstd", dir.path(), &["v1"]);
    zstd.compression = Compression::Zstd;
    let outcome = publish(zstd).await.unwrap();
    let (manifest, _, _) = get_json(
        &format!("http://{}/v2/zstd/manifests/v1", registry.address),
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    assert_eq!(
        manifest["layers"][0]["digest"],
        outcome.layer_digest.to_string()
    );
}

#[tokio::test]
#[ignore = "needs Debian's docker-registry; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn bad_input_is_refused_before_anything_is_pushed() {
    let registry = Distribution::start().await;
    let dir = content(&[("a", "a\n")]);
    let err = publish(request(
        &registry.address,
        "app",
        dir.path(),
        &["ok", "bad/tag"],
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(err, PublishError::InvalidName(NameError::Tag(ref tag)) if tag == "bad/tag"),
        "{err}"
    );
    let err = publish(request(&registry.address, "Bad_Repo", dir.path(), &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::InvalidName(NameError::Repository { ref name, .. }) if name == "Bad_Repo"),
        "{err}"
    );
    let status = reqwest::get(format!("http://{}/v2/app/tags/list", registry.address))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404, "nothing was pushed");

    let mut missing_base = request(&registry.address, "app", dir.path(), &["v1"]);
    missing_base.base = Some("nothing:here".into());
    let err = publish(missing_base).await.unwrap_err();
    assert!(
        matches!(&err, PublishError::Registry { status: 404, code: Some(code), .. } if code == "MANIFEST_UNKNOWN"),
        "{err}"
    );
}
