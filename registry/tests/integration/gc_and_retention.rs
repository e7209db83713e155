//! Retention rules and online garbage collection, including the races GC must lose:
//! a blob uploaded just before its manifest, an upload in flight, and CAS blobs.

use crate::common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use hyper::{Method, StatusCode};
use kiln_registry::{GcRoots, RegistryConfig};
use kiln_store::{BlobStore, ContentHash, DigestFunction, ExpectedDigest};

fn config(grace_secs: u64) -> RegistryConfig {
    let mut config = RegistryConfig::default();
    config.gc.grace_secs = grace_secs;
    config.gc.interval_secs = 0;
    config.retention.interval_secs = 0;
    config
}

fn layer_of(manifest: &[u8]) -> String {
    let parsed: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    parsed["layers"][0]["digest"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn gc_sweeps_unreferenced_blobs_and_keeps_referenced_ones() {
    let (_dir, reg) = TestRegistry::start(config(0)).await;
    let (kept_manifest, kept_digest) = reg.push_image("app", "v1.0.0", 1).await;
    let (gone_manifest, gone_digest) = reg.push_image("app", "main-abc1234", 2).await;
    let orphan = reg.push_blob("app", &pattern(500, 9)).await;
    reg.delete(&format!("/v2/app/manifests/{gone_digest}"))
        .await
        .expect(StatusCode::ACCEPTED);

    let dry = reg.registry.run_gc(true).await.unwrap();
    assert!(dry.dry_run);
    let mut expected = vec![
        gone_digest.clone(),
        layer_of(&gone_manifest),
        orphan.clone(),
    ];
    // The config blobs differ by seed, so the deleted image's config goes too.
    let gone_config = serde_json::from_slice::<serde_json::Value>(&gone_manifest).unwrap()
        ["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    expected.push(gone_config);
    expected.sort();
    let mut reported = dry.deleted_blobs.clone();
    reported.sort();
    assert_eq!(reported, expected);
    assert!(
        reg.has_blob_on_disk(&orphan).await,
        "a dry run deletes nothing"
    );

    let report = reg.registry.run_gc(false).await.unwrap();
    assert_eq!(report.deleted_blobs.len(), expected.len());
    assert!(report.freed_bytes > 500);
    for digest in &expected {
        assert!(!reg.has_blob_on_disk(digest).await, "{digest} was swept");
    }
    reg.get(&format!("/v2/app/blobs/{orphan}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    let pulled = reg
        .get("/v2/app/manifests/v1.0.0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.body, kept_manifest);
    reg.get(&format!("/v2/app/blobs/{}", layer_of(&kept_manifest)))
        .await
        .expect(StatusCode::OK);
    assert!(reg.has_blob_on_disk(&kept_digest).await);
    assert!(reg
        .registry
        .run_gc(false)
        .await
        .unwrap()
        .deleted_blobs
        .is_empty());
}

#[tokio::test]
async fn a_blob_uploaded_before_its_manifest_survives_gc() {
    let (_dir, reg) = TestRegistry::start(config(3600)).await;
    let config_digest = reg.push_blob("race", b"{}").await;
    let layer = pattern(2048, 4);
    let layer_digest = reg.push_blob("race", &layer).await;
    let report = reg.registry.run_gc(false).await.unwrap();
    assert!(report.deleted_blobs.is_empty());
    assert_eq!(report.kept_in_grace, 2);
    let manifest = image_manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, &config_digest, 2),
        &[(&layer_digest, layer.len())],
        None,
        None,
    );
    reg.put_manifest("race", "v1.0.0", OCI_MANIFEST, &manifest)
        .await
        .expect(StatusCode::CREATED);
}

#[tokio::test]
async fn an_upload_in_flight_survives_gc() {
    let (_dir, reg) = TestRegistry::start(config(0)).await;
    let data = pattern(100_000, 5);
    let digest = sha256(&data);
    let location = reg.start_upload("inflight").await;
    reg.send(
        Method::PATCH,
        &location,
        &[("content-range", "0-49999")],
        full(data.slice(..50_000)),
    )
    .await
    .expect(StatusCode::ACCEPTED);
    let report = reg.registry.run_gc(false).await.unwrap();
    assert!(report.expired_uploads.is_empty());
    reg.send(
        Method::PUT,
        &TestRegistry::with_digest(&location, &digest),
        &[("content-range", "50000-99999")],
        full(data.slice(50_000..)),
    )
    .await
    .expect(StatusCode::CREATED);
    assert_eq!(
        reg.get(&format!("/v2/inflight/blobs/{digest}")).await.body,
        data
    );
}

#[tokio::test]
async fn idle_upload_sessions_expire() {
    let mut config = config(0);
    config.gc.upload_ttl_secs = 0;
    let (_dir, reg) = TestRegistry::start(config).await;
    let location = reg.start_upload("idle").await;
    reg.clock.advance(std::time::Duration::from_millis(1));
    let report = reg.registry.run_gc(false).await.unwrap();
    assert_eq!(report.expired_uploads.len(), 1);
    reg.get(&location)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

struct Roots(Vec<ContentHash>);

#[async_trait::async_trait]
impl GcRoots for Roots {
    async fn referenced(&self) -> Result<std::collections::HashSet<ContentHash>, String> {
        Ok(self.0.iter().copied().collect())
    }
}

#[tokio::test]
async fn cas_blobs_and_gc_roots_are_never_collected() {
    let (_dir, reg) = TestRegistry::start(config(0)).await;
    // A build output the CAS wrote straight into the shared store.
    let output = Bytes::from_static(b"a layer the build farm produced");
    let cas_digest = reg
        .blobs
        .put(
            ExpectedDigest::Hash(
                kiln_store::Digest::of_bytes(DigestFunction::Sha256, &output).content_hash(),
            ),
            output.clone(),
        )
        .await
        .unwrap();
    // Publishing mounts it without a second upload (auth is off, so no `from` is needed).
    reg.send(
        Method::POST,
        &format!("/v2/published/blobs/uploads/?mount={}", cas_digest.oci()),
        &[],
        empty(),
    )
    .await
    .expect(StatusCode::CREATED);
    let rooted = reg.push_blob("published", b"kept by the hook").await;
    reg.registry.set_gc_roots(Arc::new(Roots(vec![
        ContentHash::parse_oci(&rooted).unwrap()
    ])));

    let report = reg.registry.run_gc(false).await.unwrap();
    assert!(report.deleted_blobs.is_empty(), "{report:?}");
    assert_eq!(report.kept_as_roots, 1);
    assert!(reg.has_blob_on_disk(&cas_digest.oci()).await);
    assert!(reg.has_blob_on_disk(&rooted).await);
    assert_eq!(
        reg.get(&format!("/v2/published/blobs/{}", cas_digest.oci()))
            .await
            .body,
        output
    );
}

#[tokio::test]
async fn retention_keeps_the_newest_branch_tags_per_branch() {
    let mut config = config(0);
    config.retention.keep_branch_tags = Some(2);
    let (_dir, reg) = TestRegistry::start(config).await;
    let (manifest, _) = reg.push_image("svc", "v1.0.0", 1).await;
    let tags = [
        "main-aaaaaaa",
        "main-bbbbbbb",
        "main-ccccccc",
        "dev-1111111",
        "dev-2222222",
        "dev-3333333",
        "abc1234",
    ];
    for tag in tags {
        reg.put_manifest("svc", tag, OCI_MANIFEST, &manifest)
            .await
            .expect(StatusCode::CREATED);
        reg.clock.advance(std::time::Duration::from_millis(1));
    }
    let dry = reg.registry.run_retention(true).await.unwrap();
    let mut removed: Vec<&str> = dry.deleted_tags.iter().map(|t| t.tag.as_str()).collect();
    removed.sort();
    assert_eq!(removed, ["dev-1111111", "main-aaaaaaa"]);
    let listed = reg.get("/v2/svc/tags/list").await.expect(StatusCode::OK);
    assert_eq!(
        listed.json()["tags"].as_array().unwrap().len(),
        8,
        "dry run"
    );

    reg.registry.run_retention(false).await.unwrap();
    let listed = reg.get("/v2/svc/tags/list").await.expect(StatusCode::OK);
    assert_eq!(
        listed.json()["tags"],
        serde_json::json!([
            "abc1234",
            "dev-2222222",
            "dev-3333333",
            "main-bbbbbbb",
            "main-ccccccc",
            "v1.0.0"
        ])
    );
}

#[tokio::test]
async fn retention_deletes_untagged_manifests_but_not_what_survivors_need() {
    let mut config = config(0);
    config.retention.untagged_grace_secs = Some(0);
    let (_dir, reg) = TestRegistry::start(config).await;
    let (_, tagged) = reg.push_image("r", "v1.0.0", 1).await;
    let (child, child_digest) = reg.push_image("r", "main-1111111", 2).await;
    let (_, untagged) = reg.push_image("r", "main-2222222", 3).await;
    // The index keeps its child; a signature of the tagged image stays with it.
    let index = index_manifest(OCI_INDEX, &[(OCI_MANIFEST, &child_digest, child.len())]);
    reg.put_manifest("r", "v2.0.0", OCI_INDEX, &index)
        .await
        .expect(StatusCode::CREATED);
    let empty_config = reg.push_blob("r", b"{}").await;
    let signature_blob = reg.push_blob("r", b"sig").await;
    let tagged_len = reg
        .get(&format!("/v2/r/manifests/{tagged}"))
        .await
        .body
        .len();
    let signature = image_manifest(
        OCI_MANIFEST,
        (OCI_EMPTY, &empty_config, 2),
        &[(&signature_blob, 3)],
        Some((OCI_MANIFEST, &tagged, tagged_len)),
        Some("application/vnd.dev.sig"),
    );
    reg.put_manifest("r", &sha256(&signature), OCI_MANIFEST, &signature)
        .await
        .expect(StatusCode::CREATED);
    // Untag the child and the third image by moving their branch tags away.
    for tag in ["main-1111111", "main-2222222"] {
        reg.delete(&format!("/v2/r/manifests/{tag}"))
            .await
            .expect(StatusCode::ACCEPTED);
    }
    reg.clock.advance(std::time::Duration::from_millis(1));

    let report = reg.registry.run_retention(false).await.unwrap();
    let deleted: Vec<String> = report
        .deleted_manifests
        .iter()
        .map(|m| m.digest.oci())
        .collect();
    assert_eq!(deleted, std::slice::from_ref(&untagged));
    reg.get(&format!("/v2/r/manifests/{untagged}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    reg.get(&format!("/v2/r/manifests/{child_digest}"))
        .await
        .expect(StatusCode::OK);
    reg.get(&format!("/v2/r/manifests/{}", sha256(&signature)))
        .await
        .expect(StatusCode::OK);
    // GC then takes the deleted image's blobs.
    let gc = reg.registry.run_gc(false).await.unwrap();
    assert!(gc.deleted_blobs.contains(&untagged));
}

/// Counter values recorded under `recorder`, keyed `name{k=v,…}` with labels sorted.
fn counters(
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> std::collections::BTreeMap<String, u64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let metrics_util::debugging::DebugValue::Counter(count) = value else {
                return None;
            };
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            Some((format!("{}{{{}}}", key.name(), labels.join(",")), count))
        })
        .collect()
}

#[tokio::test]
async fn gc_retention_and_requests_are_counted_in_metrics() {
    // The test runtime is single-threaded, so the server's tasks record here too.
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let (_dir, reg) = TestRegistry::start(config(0)).await;
    let orphan = reg.push_blob("app", &pattern(500, 9)).await;
    reg.get(&format!("/v2/app/blobs/{orphan}"))
        .await
        .expect(StatusCode::OK);
    reg.get("/v2/app/manifests/nope")
        .await
        .expect(StatusCode::NOT_FOUND);

    let dry = reg.registry.run_gc(true).await.unwrap();
    let report = reg.registry.run_gc(false).await.unwrap();
    assert_eq!(dry.deleted_blobs, std::slice::from_ref(&orphan));
    assert_eq!(report.deleted_blobs, [orphan]);
    reg.registry.run_retention(false).await.unwrap();

    let counted = counters(&snapshotter);
    let count = |key: &str| counted.get(key).copied().unwrap_or_default();
    assert_eq!(
        count("kiln_registry_gc_runs_total{dry_run=true}"),
        1,
        "{counted:#?}"
    );
    assert_eq!(
        count("kiln_registry_gc_runs_total{dry_run=false}"),
        1,
        "{counted:#?}"
    );
    assert_eq!(count("kiln_registry_gc_deleted_blobs_total{}"), 1);
    assert_eq!(count("kiln_registry_gc_freed_bytes_total{}"), 500);
    assert_eq!(
        count("kiln_registry_retention_runs_total{dry_run=false}"),
        1
    );
    assert_eq!(
        count("kiln_registry_requests_total{endpoint=blob,method=GET,status=200}"),
        1,
        "{counted:#?}"
    );
    assert_eq!(
        count("kiln_registry_bytes_served_total{endpoint=blob}"),
        500
    );
    assert_eq!(
        count("kiln_registry_requests_total{endpoint=manifest,method=GET,status=404}"),
        1
    );
}
