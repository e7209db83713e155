//! The OCI conformance workflows — pull, push, content discovery, content management —
//! against a real server, for every data type, plus every error code for its reason.

use crate::common;

use bytes::Bytes;
use common::*;
use hyper::{Method, StatusCode};

#[tokio::test]
async fn health_probes_answer_even_with_auth_on() {
    let mut config = permissive_config();
    config.auth.enabled = true;
    let (_dir, reg) = TestRegistry::start(config).await;
    reg.get("/healthz").await.expect(StatusCode::OK);
    reg.get("/readyz").await.expect(StatusCode::OK);
    reg.get("/v2/").await.expect(StatusCode::UNAUTHORIZED);
}

/// Given the process's readiness, `/readyz` answers from it (the binary gives every port
/// the same one); the liveness probe does not change.
#[tokio::test]
async fn readiness_follows_the_process() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let (ready, readiness) = tokio::sync::watch::channel(false);
    reg.registry.set_readiness(std::sync::Arc::new(move || {
        let ready = *readiness.borrow();
        (ready, format!("ready: {ready}\n"))
    }));
    reg.get("/readyz")
        .await
        .expect(StatusCode::SERVICE_UNAVAILABLE);
    reg.get("/healthz").await.expect(StatusCode::OK);
    ready.send_replace(true);
    reg.get("/readyz").await.expect(StatusCode::OK);
    ready.send_replace(false);
    reg.get("/readyz")
        .await
        .expect(StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn base_endpoint_answers_with_the_api_version() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let response = reg.get("/v2/").await.expect(StatusCode::OK);
    assert_eq!(response.json(), serde_json::json!({}));
    reg.get("/v2").await.expect(StatusCode::OK);
    reg.head("/v2/").await.expect(StatusCode::OK);
}

#[tokio::test]
async fn image_push_then_pull_by_tag_and_digest() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let (manifest, digest) = reg.push_image("team/app", "v1.0.0", 1).await;

    for reference in ["v1.0.0", digest.as_str()] {
        let response = reg
            .get(&format!("/v2/team/app/manifests/{reference}"))
            .await
            .expect(StatusCode::OK);
        assert_eq!(response.body, manifest, "stored byte for byte");
        assert_eq!(response.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(
            response.header("docker-content-digest"),
            Some(digest.as_str())
        );

        let head = reg
            .head(&format!("/v2/team/app/manifests/{reference}"))
            .await
            .expect(StatusCode::OK);
        assert!(head.body.is_empty());
        assert_eq!(
            head.header("content-length"),
            Some(manifest.len().to_string().as_str())
        );
        assert_eq!(head.header("docker-content-digest"), Some(digest.as_str()));
    }

    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layer_digest = parsed["layers"][0]["digest"].as_str().unwrap();
    let layer = reg
        .get(&format!("/v2/team/app/blobs/{layer_digest}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(layer.body, pattern(1001, 1));
    assert_eq!(layer.header("docker-content-digest"), Some(layer_digest));
    let head = reg
        .head(&format!("/v2/team/app/blobs/{layer_digest}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(head.header("content-length"), Some("1001"));
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn blob_range_requests() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let data = pattern(10_000, 7);
    let digest = reg.push_blob("ranges", &data).await;
    let path = format!("/v2/ranges/blobs/{digest}");
    let partial = reg
        .send(Method::GET, &path, &[("range", "bytes=100-199")], empty())
        .await
        .expect(StatusCode::PARTIAL_CONTENT);
    assert_eq!(partial.body, data.slice(100..200));
    assert_eq!(partial.header("content-range"), Some("bytes 100-199/10000"));
    let suffix = reg
        .send(Method::GET, &path, &[("range", "bytes=-10")], empty())
        .await
        .expect(StatusCode::PARTIAL_CONTENT);
    assert_eq!(suffix.body, data.slice(9990..));
    let past_end = reg
        .send(Method::GET, &path, &[("range", "bytes=10000-")], empty())
        .await
        .expect(StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(past_end.header("content-range"), Some("bytes */10000"));
}

#[tokio::test]
async fn docker_schema2_manifest_and_manifest_list() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = reg.push_blob("docker/app", config).await;
    let layer = pattern(4096, 3);
    let layer_digest = reg.push_blob("docker/app", &layer).await;
    let manifest = image_manifest(
        DOCKER_MANIFEST,
        (DOCKER_CONFIG, &config_digest, config.len()),
        &[(&layer_digest, layer.len())],
        None,
        None,
    );
    let manifest_digest = sha256(&manifest);
    reg.put_manifest("docker/app", &manifest_digest, DOCKER_MANIFEST, &manifest)
        .await
        .expect(StatusCode::CREATED);
    let list = index_manifest(
        DOCKER_LIST,
        &[(DOCKER_MANIFEST, &manifest_digest, manifest.len())],
    );
    reg.put_manifest("docker/app", "v2.0.0", DOCKER_LIST, &list)
        .await
        .expect(StatusCode::CREATED);
    let pulled = reg
        .get("/v2/docker/app/manifests/v2.0.0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.header("content-type"), Some(DOCKER_LIST));
    assert_eq!(pulled.body, list);
    let child = reg
        .get(&format!("/v2/docker/app/manifests/{manifest_digest}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(child.header("content-type"), Some(DOCKER_MANIFEST));
}

#[tokio::test]
async fn an_oci_index_needs_its_children() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let (child, child_digest) = reg.push_image("multi", "amd64-child", 5).await;
    let missing = sha256(b"not pushed");
    let bad = index_manifest(
        OCI_INDEX,
        &[
            (OCI_MANIFEST, &child_digest, child.len()),
            (OCI_MANIFEST, &missing, 10),
        ],
    );
    reg.put_manifest("multi", "v1.0.0", OCI_INDEX, &bad)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN");
    let good = index_manifest(OCI_INDEX, &[(OCI_MANIFEST, &child_digest, child.len())]);
    reg.put_manifest("multi", "v1.0.0", OCI_INDEX, &good)
        .await
        .expect(StatusCode::CREATED);
    let pulled = reg
        .get("/v2/multi/manifests/v1.0.0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.header("content-type"), Some(OCI_INDEX));
    assert_eq!(pulled.body, good);
}

#[tokio::test]
async fn artifacts_with_subject_and_the_referrers_api() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let (image, image_digest) = reg.push_image("app", "v1.0.0", 2).await;
    let empty_config = reg.push_blob("app", b"{}").await;
    let push_artifact = |artifact_type: &'static str, payload: &'static [u8]| {
        let reg = &reg;
        let image_digest = image_digest.clone();
        let empty_config = empty_config.clone();
        let image_len = image.len();
        async move {
            let blob = reg.push_blob("app", payload).await;
            let manifest = image_manifest(
                OCI_MANIFEST,
                (OCI_EMPTY, &empty_config, 2),
                &[(&blob, payload.len())],
                Some((OCI_MANIFEST, &image_digest, image_len)),
                Some(artifact_type),
            );
            let digest = sha256(&manifest);
            let response = reg
                .put_manifest("app", &digest, OCI_MANIFEST, &manifest)
                .await
                .expect(StatusCode::CREATED);
            assert_eq!(response.header("oci-subject"), Some(image_digest.as_str()));
            (digest, manifest.len())
        }
    };
    let (sbom, sbom_len) = push_artifact("application/spdx+json", b"{\"sbom\":1}").await;
    let (signature, _) = push_artifact("application/vnd.dev.cosign", b"signature").await;

    let all = reg
        .get(&format!("/v2/app/referrers/{image_digest}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(all.header("content-type"), Some(OCI_INDEX));
    assert!(all.header("oci-filters-applied").is_none());
    let index = all.json();
    assert_eq!(index["mediaType"], OCI_INDEX);
    let mut digests: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    digests.sort();
    let mut expected = vec![sbom.as_str(), signature.as_str()];
    expected.sort();
    assert_eq!(digests, expected);

    let filtered = reg
        .get(&format!(
            "/v2/app/referrers/{image_digest}?artifactType=application/spdx%2Bjson"
        ))
        .await
        .expect(StatusCode::OK);
    assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
    let manifests = filtered.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["digest"], sbom.as_str());
    assert_eq!(manifests[0]["artifactType"], "application/spdx+json");
    assert_eq!(manifests[0]["size"], sbom_len);

    // A referrer may arrive before its subject; it is indexed all the same.
    let absent_subject = sha256(b"an image pushed later");
    let blob = reg.push_blob("app", b"early").await;
    let early = image_manifest(
        OCI_MANIFEST,
        (OCI_EMPTY, &empty_config, 2),
        &[(&blob, 5)],
        Some((OCI_MANIFEST, &absent_subject, 123)),
        Some("application/x-early"),
    );
    reg.put_manifest("app", &sha256(&early), OCI_MANIFEST, &early)
        .await
        .expect(StatusCode::CREATED);
    let listed = reg
        .get(&format!("/v2/app/referrers/{absent_subject}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(listed.json()["manifests"][0]["digest"], sha256(&early));

    let none = reg
        .get(&format!("/v2/app/referrers/{}", sha256(b"nothing")))
        .await
        .expect(StatusCode::OK);
    assert_eq!(none.json()["manifests"], serde_json::json!([]));
}

#[tokio::test]
async fn the_empty_blob() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let digest = reg.push_blob("empty", b"").await;
    assert_eq!(digest, sha256(b""));
    let response = reg
        .get(&format!("/v2/empty/blobs/{digest}"))
        .await
        .expect(StatusCode::OK);
    assert!(response.body.is_empty());
    assert_eq!(response.header("content-length"), Some("0"));
}

#[tokio::test]
async fn a_blob_over_64_mib_in_chunks_and_back() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let data = pattern(65 << 20, 9);
    let digest = sha256(&data);
    let mut location = reg.start_upload("big").await;
    let chunk = 16 << 20;
    let mut offset = 0;
    while offset < data.len() {
        let end = (offset + chunk).min(data.len());
        let range = format!("{offset}-{}", end - 1);
        let response = reg
            .send(
                Method::PATCH,
                &location,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-range", &range),
                ],
                full(data.slice(offset..end)),
            )
            .await
            .expect(StatusCode::ACCEPTED);
        assert_eq!(
            response.header("range"),
            Some(format!("0-{}", end - 1).as_str())
        );
        location = response.header("location").unwrap().to_string();
        offset = end;
    }
    reg.finish_upload(&location, &digest).await;
    let pulled = reg
        .get(&format!("/v2/big/blobs/{digest}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.body.len(), data.len());
    assert_eq!(sha256(&pulled.body), digest);
}

#[tokio::test]
async fn chunked_upload_with_status_and_out_of_order_chunk() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let data = pattern(3000, 4);
    let digest = sha256(&data);
    let location = reg.start_upload("chunks").await;
    let id = location.rsplit('/').next().unwrap().to_string();

    let first = reg
        .send(
            Method::PATCH,
            &location,
            &[("content-range", "0-999"), ("content-length", "1000")],
            full(data.slice(..1000)),
        )
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(first.header("range"), Some("0-999"));
    assert_eq!(first.header("docker-upload-uuid"), Some(id.as_str()));

    let skipped = reg
        .send(
            Method::PATCH,
            &location,
            &[("content-range", "2000-2999")],
            full(data.slice(2000..)),
        )
        .await
        .expect(StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        skipped.header("range"),
        Some("0-999"),
        "the client learns where to resume"
    );
    assert!(skipped.header("location").is_some());

    let status = reg.get(&location).await.expect(StatusCode::NO_CONTENT);
    assert_eq!(status.header("range"), Some("0-999"));
    assert_eq!(status.header("docker-upload-uuid"), Some(id.as_str()));

    reg.send(
        Method::PATCH,
        &location,
        &[("content-range", "1000-1999")],
        full(data.slice(1000..2000)),
    )
    .await
    .expect(StatusCode::ACCEPTED);
    // The last chunk rides on the closing PUT.
    reg.send(
        Method::PUT,
        &TestRegistry::with_digest(&location, &digest),
        &[("content-range", "2000-2999")],
        full(data.slice(2000..)),
    )
    .await
    .expect(StatusCode::CREATED);
    let pulled = reg
        .get(&format!("/v2/chunks/blobs/{digest}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.body, data);
    // The session is gone once complete.
    reg.get(&location)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn streamed_upload_without_content_range() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let pieces: Vec<Bytes> = (0..8).map(|i| pattern(70_000, i)).collect();
    let whole: Vec<u8> = pieces.concat();
    let digest = sha256(&whole);
    let location = reg.start_upload("stream").await;
    let response = reg
        .send(Method::PATCH, &location, &[], streamed(pieces))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(
        response.header("range"),
        Some(format!("0-{}", whole.len() - 1).as_str())
    );
    let location = response.header("location").unwrap().to_string();
    reg.finish_upload(&location, &digest).await;
    let pulled = reg
        .get(&format!("/v2/stream/blobs/{digest}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.body, whole);
}

#[tokio::test]
async fn post_only_monolithic_upload() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let data = pattern(5000, 11);
    let digest = sha256(&data);
    let response = reg
        .send(
            Method::POST,
            &format!("/v2/mono/blobs/uploads/?digest={digest}"),
            &[("content-type", "application/octet-stream")],
            full(data.clone()),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(
        response.header("location"),
        Some(format!("/v2/mono/blobs/{digest}").as_str())
    );
    assert_eq!(
        response.header("docker-content-digest"),
        Some(digest.as_str())
    );
    assert_eq!(
        reg.get(&format!("/v2/mono/blobs/{digest}")).await.body,
        data
    );
}

#[tokio::test]
async fn cross_repository_mount() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let data = pattern(2000, 12);
    let digest = reg.push_blob("source", &data).await;
    let mounted = reg
        .send(
            Method::POST,
            &format!("/v2/target/blobs/uploads/?mount={digest}&from=source"),
            &[],
            empty(),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(
        mounted.header("location"),
        Some(format!("/v2/target/blobs/{digest}").as_str())
    );
    assert_eq!(
        reg.get(&format!("/v2/target/blobs/{digest}")).await.body,
        data
    );

    // Not in `from`: the client gets an upload session instead.
    let missing = sha256(b"never uploaded");
    let fallback = reg
        .send(
            Method::POST,
            &format!("/v2/target/blobs/uploads/?mount={missing}&from=source"),
            &[],
            empty(),
        )
        .await
        .expect(StatusCode::ACCEPTED);
    assert!(fallback
        .header("location")
        .unwrap()
        .contains("/blobs/uploads/"));
    assert!(fallback.header("docker-upload-uuid").is_some());
    let other = reg
        .send(
            Method::POST,
            &format!("/v2/third/blobs/uploads/?mount={digest}&from=nowhere"),
            &[],
            empty(),
        )
        .await
        .expect(StatusCode::ACCEPTED);
    assert!(other.header("location").is_some());
}

#[tokio::test]
async fn tag_listing_is_sorted_and_paginated() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let (manifest, _) = reg.push_image("tags", "v0.0.1", 1).await;
    for tag in ["c", "a", "e", "b", "d"] {
        reg.put_manifest("tags", tag, OCI_MANIFEST, &manifest)
            .await
            .expect(StatusCode::CREATED);
    }
    let all = reg.get("/v2/tags/tags/list").await.expect(StatusCode::OK);
    assert_eq!(
        all.json(),
        serde_json::json!({"name": "tags", "tags": ["a", "b", "c", "d", "e", "v0.0.1"]})
    );
    assert!(all.header("link").is_none());

    let first = reg
        .get("/v2/tags/tags/list?n=2")
        .await
        .expect(StatusCode::OK);
    assert_eq!(first.json()["tags"], serde_json::json!(["a", "b"]));
    let link = first.header("link").unwrap();
    assert_eq!(link, "</v2/tags/tags/list?n=2&last=b>; rel=\"next\"");
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let second = reg.get(next).await.expect(StatusCode::OK);
    assert_eq!(second.json()["tags"], serde_json::json!(["c", "d"]));
    let last = reg
        .get("/v2/tags/tags/list?n=2&last=d")
        .await
        .expect(StatusCode::OK);
    assert_eq!(last.json()["tags"], serde_json::json!(["e", "v0.0.1"]));
    assert!(last.header("link").is_none());
    let none = reg
        .get("/v2/tags/tags/list?n=0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(none.json()["tags"], serde_json::json!([]));
}

#[tokio::test]
async fn catalog_is_paginated() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    for repo in ["b/one", "a", "c"] {
        reg.push_blob(repo, b"x").await;
    }
    let all = reg.get("/v2/_catalog").await.expect(StatusCode::OK);
    assert_eq!(
        all.json()["repositories"],
        serde_json::json!(["a", "b/one", "c"])
    );
    let first = reg.get("/v2/_catalog?n=1").await.expect(StatusCode::OK);
    assert_eq!(first.json()["repositories"], serde_json::json!(["a"]));
    assert_eq!(
        first.header("link"),
        Some("</v2/_catalog?n=1&last=a>; rel=\"next\"")
    );
    let rest = reg
        .get("/v2/_catalog?n=5&last=a")
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        rest.json()["repositories"],
        serde_json::json!(["b/one", "c"])
    );
}

#[tokio::test]
async fn content_management_deletes() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let (manifest, digest) = reg.push_image("manage", "to-delete", 6).await;
    reg.put_manifest("manage", "keep-tag", OCI_MANIFEST, &manifest)
        .await
        .expect(StatusCode::CREATED);

    reg.delete("/v2/manage/manifests/to-delete")
        .await
        .expect(StatusCode::ACCEPTED);
    reg.get("/v2/manage/manifests/to-delete")
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    reg.get(&format!("/v2/manage/manifests/{digest}"))
        .await
        .expect(StatusCode::OK);

    reg.delete(&format!("/v2/manage/manifests/{digest}"))
        .await
        .expect(StatusCode::ACCEPTED);
    reg.get(&format!("/v2/manage/manifests/{digest}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    reg.get("/v2/manage/manifests/keep-tag")
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    let tags = reg.get("/v2/manage/tags/list").await.expect(StatusCode::OK);
    assert_eq!(tags.json()["tags"], serde_json::json!([]));
    reg.delete(&format!("/v2/manage/manifests/{digest}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");

    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layer = parsed["layers"][0]["digest"].as_str().unwrap();
    reg.delete(&format!("/v2/manage/blobs/{layer}"))
        .await
        .expect(StatusCode::ACCEPTED);
    reg.get(&format!("/v2/manage/blobs/{layer}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    reg.delete(&format!("/v2/manage/blobs/{layer}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn deletes_can_be_disabled() {
    let mut config = permissive_config();
    config.deletes_enabled = false;
    let (_dir, reg) = TestRegistry::start(config).await;
    let (_, digest) = reg.push_image("locked", "v1.0.0", 1).await;
    reg.delete(&format!("/v2/locked/manifests/{digest}"))
        .await
        .expect_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
    reg.get(&format!("/v2/locked/manifests/{digest}"))
        .await
        .expect(StatusCode::OK);
}

#[tokio::test]
async fn cancel_an_upload() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let location = reg.start_upload("cancel").await;
    reg.send(Method::PATCH, &location, &[], full(pattern(100, 1)))
        .await
        .expect(StatusCode::ACCEPTED);
    reg.delete(&location).await.expect(StatusCode::NO_CONTENT);
    reg.get(&location)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    reg.delete(&location)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn an_upload_session_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(300_000, 21);
    let digest = sha256(&data);
    let reg = TestRegistry::start_in(dir.path(), permissive_config()).await;
    let location = reg.start_upload("resume").await;
    reg.send(
        Method::PATCH,
        &location,
        &[("content-range", "0-99999")],
        full(data.slice(..100_000)),
    )
    .await
    .expect(StatusCode::ACCEPTED);
    reg.stop().await;

    let reg = TestRegistry::start_in(dir.path(), permissive_config()).await;
    let status = reg.get(&location).await.expect(StatusCode::NO_CONTENT);
    assert_eq!(status.header("range"), Some("0-99999"));
    reg.send(
        Method::PATCH,
        &location,
        &[("content-range", "100000-299999")],
        full(data.slice(100_000..)),
    )
    .await
    .expect(StatusCode::ACCEPTED);
    reg.finish_upload(&location, &digest).await;
    assert_eq!(
        reg.get(&format!("/v2/resume/blobs/{digest}")).await.body,
        data
    );
    reg.stop().await;
}

#[tokio::test]
async fn an_acknowledged_push_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let reg = TestRegistry::start_in(dir.path(), permissive_config()).await;
    let (manifest, digest) = reg.push_image("durable", "v1.0.0", 3).await;
    reg.stop().await;
    let reg = TestRegistry::start_in(dir.path(), permissive_config()).await;
    let pulled = reg
        .get("/v2/durable/manifests/v1.0.0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.body, manifest);
    assert_eq!(
        pulled.header("docker-content-digest"),
        Some(digest.as_str())
    );
    reg.stop().await;
}

// Error codes, each for the reason the spec gives.

#[tokio::test]
async fn error_blob_unknown_and_name_unknown() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    reg.push_blob("known", b"x").await;
    reg.get(&format!("/v2/known/blobs/{}", sha256(b"absent")))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    // A blob another repository holds is not served here.
    reg.push_blob("other", b"private").await;
    reg.get(&format!("/v2/known/blobs/{}", sha256(b"private")))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    reg.get("/v2/unknown/tags/list")
        .await
        .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    reg.get("/v2/unknown/manifests/v1.0.0")
        .await
        .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
}

#[tokio::test]
async fn error_upload_invalid_unknown_and_size_invalid() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    reg.send(
        Method::PATCH,
        "/v2/up/blobs/uploads/0123456789abcdef",
        &[],
        full("x"),
    )
    .await
    .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    let location = reg.start_upload("up").await;
    reg.send(
        Method::PATCH,
        &location,
        &[("content-range", "nonsense")],
        full("abc"),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID");
    reg.send(
        Method::PATCH,
        &location,
        &[("content-range", "0-9")],
        full("abc"),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "SIZE_INVALID");
    // A session belongs to its repository.
    let foreign = location.replace("/v2/up/", "/v2/elsewhere/");
    reg.get(&foreign)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn error_digest_invalid() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let location = reg.start_upload("digests").await;
    reg.send(
        Method::PUT,
        &TestRegistry::with_digest(&location, &sha256(b"other content")),
        &[],
        full("actual content"),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    assert!(!reg.has_blob_on_disk(&sha256(b"actual content")).await);
    let location = reg.start_upload("digests").await;
    reg.send(Method::PUT, &location, &[], full("no digest"))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    reg.send(
        Method::POST,
        "/v2/digests/blobs/uploads/?digest=sha256:zz",
        &[],
        full("x"),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    reg.get("/v2/digests/blobs/sha256:1234")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    let (manifest, _) = reg.push_image("digests", "v1.0.0", 1).await;
    reg.put_manifest("digests", &sha256(b"wrong"), OCI_MANIFEST, &manifest)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
}

#[tokio::test]
async fn error_manifest_invalid_blob_unknown_and_unknown() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let config = reg.push_blob("m", b"{}").await;
    reg.put_manifest("m", "v1.0.0", OCI_MANIFEST, b"{not json")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
    reg.put_manifest(
        "m",
        "v1.0.0",
        "application/x-unknown",
        b"{\"schemaVersion\":2}",
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
    let missing_layer = image_manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, &config, 2),
        &[(&sha256(b"no such layer"), 13)],
        None,
        None,
    );
    reg.put_manifest("m", "v1.0.0", OCI_MANIFEST, &missing_layer)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN");
    let wrong_size = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &config, 3), &[], None, None);
    reg.put_manifest("m", "v1.0.0", OCI_MANIFEST, &wrong_size)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
    reg.get("/v2/m/manifests/v9.9.9")
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    reg.get(&format!("/v2/m/manifests/{}", sha256(b"nope")))
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn manifests_up_to_four_mib_and_a_clear_error_beyond() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let config = reg.push_blob("sizes", b"{}").await;
    let with_padding = |bytes: usize| {
        let mut manifest: serde_json::Value = serde_json::from_slice(&image_manifest(
            OCI_MANIFEST,
            (OCI_CONFIG, &config, 2),
            &[],
            None,
            None,
        ))
        .unwrap();
        let base = serde_json::to_vec(&manifest).unwrap().len();
        let overhead = r#","annotations":{"pad":""}"#.len();
        manifest["annotations"] = serde_json::json!({"pad": "x".repeat(bytes - base - overhead)});
        let out = serde_json::to_vec(&manifest).unwrap();
        assert_eq!(out.len(), bytes);
        out
    };
    let four_mib = with_padding(4 << 20);
    reg.put_manifest("sizes", "v1.0.0", OCI_MANIFEST, &four_mib)
        .await
        .expect(StatusCode::CREATED);
    let too_big = with_padding((4 << 20) + 1);
    let response = reg
        .put_manifest("sizes", "v1.0.1", OCI_MANIFEST, &too_big)
        .await
        .expect_error(StatusCode::PAYLOAD_TOO_LARGE, "MANIFEST_INVALID");
    let message = response.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("max_manifest_bytes"), "{message}");
}

#[tokio::test]
async fn error_name_invalid_and_unsupported() {
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    reg.get("/v2/Upper/tags/list")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    reg.send(Method::POST, "/v2/bad..name/blobs/uploads/", &[], empty())
        .await
        .expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    reg.send(Method::PUT, "/v2/_catalog", &[], empty())
        .await
        .expect_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
    reg.put_manifest(
        "old",
        "v1.0.0",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        b"{\"schemaVersion\":2}",
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "UNSUPPORTED");
}

#[tokio::test]
async fn error_too_many_requests_with_retry_after() {
    let mut config = permissive_config();
    config.limits.max_concurrent_uploads = 1;
    config.limits.retry_after_secs = 7;
    let (_dir, reg) = TestRegistry::start(config).await;
    let first = reg.start_upload("busy").await;
    let second = reg.start_upload("busy").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body =
        http_body_util::StreamBody::new(futures::StreamExt::map(tokio_stream_from(rx), |b| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b))
        }));
    let held = {
        let reg = &reg;
        let first = first.clone();
        async move {
            reg.send(
                Method::PATCH,
                &first,
                &[],
                http_body_util::BodyExt::boxed(body),
            )
            .await
        }
    };
    let probe = async {
        tx.send(pattern(10, 1)).await.unwrap();
        // The held request is now streaming and owns the only upload slot.
        let mut refused = None;
        // Bounded in time, not in tries: 50 tries of 20 ms were about a second.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let response = reg.send(Method::PATCH, &second, &[], full("y")).await;
            if response.status == StatusCode::TOO_MANY_REQUESTS {
                refused = Some(response);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        drop(tx);
        refused.expect("a second concurrent upload is refused")
    };
    let (held, refused) = tokio::join!(held, probe);
    held.expect(StatusCode::ACCEPTED);
    let refused = refused.expect_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    assert_eq!(refused.header("retry-after"), Some("7"));
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
