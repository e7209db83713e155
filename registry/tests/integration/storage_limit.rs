//! The registry over a blob store with a size limit: a push that does not fit gets 507
//! with an OCI error body, and eviction removes the CAS's cold blobs but never a blob the
//! registry answers for.

use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use kiln_registry::RegistryConfig;
use kiln_store::{BlobStore, Digest, DigestFunction, EvictionPolicy, ExpectedDigest};

use crate::common::{full, pattern, sha256, TestRegistry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_answers_507_and_eviction_spares_the_registry() {
    let policy = EvictionPolicy {
        max_bytes: 64 << 10,
        low_watermark: 0.5,
        grace: Duration::ZERO,
        interval: Duration::from_secs(3600),
        ..EvictionPolicy::with_max_bytes(0)
    };
    let (_dir, reg) = TestRegistry::start_bounded(RegistryConfig::default(), policy).await;
    let store = reg.bounded.clone().unwrap();
    let (manifest, manifest_digest) = reg.push_image("team/app", "v1.0.0", 3).await;

    // The build farm's blobs fill the rest.
    let mut cas_blobs = Vec::new();
    for seed in 0..6u8 {
        let data = pattern(10 << 10, 100 + seed);
        let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
        store
            .put(ExpectedDigest::Exact(digest), data)
            .await
            .unwrap();
        cas_blobs.push(digest);
    }

    let late = pattern(20 << 10, 7);
    let location = reg.start_upload("team/app").await;
    let refused = reg
        .send(
            Method::PUT,
            &TestRegistry::with_digest(&location, &sha256(&late)),
            &[("content-type", "application/octet-stream")],
            full(late.clone()),
        )
        .await
        .expect_error(StatusCode::INSUFFICIENT_STORAGE, "BLOB_UPLOAD_INVALID");
    let message = refused.json()["errors"][0]["message"].to_string();
    assert!(message.contains("full"), "{message}");

    // The first pass spares everything used since the last; the second evicts the cold
    // CAS blobs and keeps the image.
    store.evict_once().await.unwrap();
    let report = store.evict_once().await.unwrap();
    assert!(report.evicted_blobs >= 3, "{report:?}");
    assert!(
        report.kept_retained >= 3,
        "config, layer and manifest: {report:?}"
    );
    let cas_left = store.has_many(&cas_blobs).await.unwrap();
    assert!(cas_left.iter().any(|present| !present), "{cas_left:?}");
    let pulled = reg
        .get(&format!("/v2/team/app/manifests/{manifest_digest}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.body, Bytes::from(manifest.clone()));
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    for layer in parsed["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        reg.get(&format!("/v2/team/app/blobs/{digest}"))
            .await
            .expect(StatusCode::OK);
    }

    // The push that was refused fits now.
    reg.push_blob("team/app", &late).await;
    reg.stop().await;
}
