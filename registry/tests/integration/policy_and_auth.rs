//! Tag policy (allowed patterns, `latest`, semver immutability) and auth (basic, the
//! Docker token flow, scopes, anonymous pull) over real HTTP.

use crate::common;

use common::*;
use hyper::{Method, StatusCode};
use kiln_registry::RegistryConfig;

#[tokio::test]
async fn the_default_policy_accepts_release_tags_and_refuses_latest() {
    let (_dir, reg) = TestRegistry::start(RegistryConfig::default()).await;
    let (manifest, _) = reg.push_image("app", "v1.2.3", 1).await;
    for tag in [
        "1.2.3-rc.1",
        "abc1234",
        "main-abc1234",
        "feature.x-0123456789abcdef",
    ] {
        reg.put_manifest("app", tag, OCI_MANIFEST, &manifest)
            .await
            .expect(StatusCode::CREATED);
    }
    let latest = reg
        .put_manifest("app", "latest", OCI_MANIFEST, &manifest)
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
    assert!(String::from_utf8_lossy(&latest.body).contains("allow_latest"));
    reg.put_manifest("app", "nightly", OCI_MANIFEST, &manifest)
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
    // Pushing by digest needs no tag at all.
    reg.put_manifest("app", &sha256(&manifest), OCI_MANIFEST, &manifest)
        .await
        .expect(StatusCode::CREATED);
}

#[tokio::test]
async fn semver_tags_are_immutable() {
    let (_dir, reg) = TestRegistry::start(RegistryConfig::default()).await;
    let (first, digest) = reg.push_image("app", "v1.0.0", 1).await;
    // The same content again is fine (retries are idempotent).
    reg.put_manifest("app", "v1.0.0", OCI_MANIFEST, &first)
        .await
        .expect(StatusCode::CREATED);
    let (second, second_digest) = reg.push_image("app", "main-1234567", 2).await;
    reg.put_manifest("app", "v1.0.0", OCI_MANIFEST, &second)
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
    reg.delete("/v2/app/manifests/v1.0.0")
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
    reg.delete(&format!("/v2/app/manifests/{digest}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
    let pulled = reg
        .get("/v2/app/manifests/v1.0.0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.body, first);
    // Branch tags move freely.
    reg.put_manifest("app", "main-1234567", OCI_MANIFEST, &first)
        .await
        .expect(StatusCode::CREATED);
    reg.delete(&format!("/v2/app/manifests/{second_digest}"))
        .await
        .expect(StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_policy_per_repository_pattern() {
    let mut config = RegistryConfig::default();
    config.tag_policies.push(kiln_registry::TagPolicyConfig {
        repositories: "sandbox/*".into(),
        allowed_tags: vec!["dev-[0-9]+".into()],
        immutable_semver: false,
        allow_latest: true,
    });
    let (_dir, reg) = TestRegistry::start(config).await;
    let (manifest, _) = reg.push_image("sandbox/x", "latest", 1).await;
    reg.put_manifest("sandbox/x", "dev-42", OCI_MANIFEST, &manifest)
        .await
        .expect(StatusCode::CREATED);
    reg.put_manifest("sandbox/x", "v1.0.0", OCI_MANIFEST, &manifest)
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
    reg.push_blob("prod/x", b"{}").await;
    reg.put_manifest("prod/x", "latest", OCI_MANIFEST, &manifest)
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
}

#[tokio::test]
async fn unauthenticated_requests_get_a_bearer_challenge() {
    let (_dir, reg) = TestRegistry::start(auth_config()).await;
    let base = reg
        .get("/v2/")
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let challenge = base.header("www-authenticate").unwrap();
    let realm = format!("Bearer realm=\"http://{}/token\"", reg.addr);
    assert!(challenge.starts_with(&realm), "{challenge}");
    assert!(challenge.contains("service=\"kiln-registry\""));

    let pull = reg
        .get("/v2/team/app/tags/list")
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert!(pull
        .header("www-authenticate")
        .unwrap()
        .contains("scope=\"repository:team/app:pull\""));
    let push = reg
        .send(Method::POST, "/v2/team/app/blobs/uploads/", &[], empty())
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert!(push
        .header("www-authenticate")
        .unwrap()
        .contains("scope=\"repository:team/app:pull,push\""));
    send_as(&reg, &basic("ci", "wrong"), Method::GET, "/v2/", empty())
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
}

#[tokio::test]
async fn basic_auth_is_accepted_directly_with_per_repository_scopes() {
    let (_dir, reg) = TestRegistry::start(auth_config()).await;
    let ci = basic("ci", "ci-secret");
    send_as(&reg, &ci, Method::GET, "/v2/", empty())
        .await
        .expect(StatusCode::OK);
    let manifest = push_image_as(&reg, &ci, "team/app", "v1.0.0").await;
    let pulled = send_as(
        &reg,
        &ci,
        Method::GET,
        "/v2/team/app/manifests/v1.0.0",
        empty(),
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(pulled.body, manifest);
    // Outside its grants, an authenticated user is denied rather than challenged.
    send_as(&reg, &ci, Method::POST, "/v2/other/blobs/uploads/", empty())
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
    send_as(
        &reg,
        &ci,
        Method::DELETE,
        &format!("/v2/team/app/manifests/{}", sha256(&manifest)),
        empty(),
    )
    .await
    .expect_error(StatusCode::FORBIDDEN, "DENIED");
    // The catalog lists only what the caller may pull.
    push_image_as(&reg, &basic("admin", "admin-secret"), "secret/x", "v1.0.0").await;
    let catalog = send_as(&reg, &ci, Method::GET, "/v2/_catalog", empty())
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        catalog.json()["repositories"],
        serde_json::json!(["team/app"])
    );
}

#[tokio::test]
async fn the_docker_token_flow() {
    let (_dir, reg) = TestRegistry::start(auth_config()).await;
    let token_response = send_as(
        &reg,
        &basic("ci", "ci-secret"),
        Method::GET,
        "/token?service=kiln-registry&scope=repository%3Ateam%2Fapp%3Apull%2Cpush",
        empty(),
    )
    .await
    .expect(StatusCode::OK);
    let body = token_response.json();
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["access_token"], body["token"]);
    assert_eq!(body["expires_in"], 300);
    let bearer = format!("Bearer {token}");
    let manifest = push_image_as(&reg, &bearer, "team/app", "v1.0.0").await;
    let pulled = send_as(
        &reg,
        &bearer,
        Method::GET,
        "/v2/team/app/manifests/v1.0.0",
        empty(),
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(pulled.body, manifest);

    // A token is good only for its scopes: elsewhere the client is sent back for more.
    let elsewhere = send_as(
        &reg,
        &bearer,
        Method::GET,
        "/v2/team/other/tags/list",
        empty(),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let challenge = elsewhere.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );

    // Asking for more than the user has yields a token without it.
    let scope = "repository:secret/x:pull,push";
    let narrow = format!(
        "Bearer {}",
        issue_token(&reg, &basic("ci", "ci-secret"), scope).await
    );
    send_as(
        &reg,
        &narrow,
        Method::GET,
        "/v2/secret/x/tags/list",
        empty(),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");

    send_as(&reg, "Bearer not.a-token", Method::GET, "/v2/", empty())
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    send_as(
        &reg,
        &basic("ci", "wrong"),
        Method::GET,
        "/token?scope=repository:team/app:pull",
        empty(),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
}

#[tokio::test]
async fn anonymous_pull_per_repository() {
    let (_dir, reg) = TestRegistry::start(auth_config()).await;
    let admin = basic("admin", "admin-secret");
    let manifest = push_image_as(&reg, &admin, "public/tool", "v1.0.0").await;
    push_image_as(&reg, &admin, "team/app", "v1.0.0").await;

    let pulled = reg
        .get("/v2/public/tool/manifests/v1.0.0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(pulled.body, manifest);
    reg.get("/v2/team/app/manifests/v1.0.0")
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    reg.send(Method::POST, "/v2/public/tool/blobs/uploads/", &[], empty())
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");

    // Docker asks the token endpoint anonymously; it grants pull where anonymous pull is on.
    let token = reg
        .get("/token?scope=repository:public/tool:pull,push")
        .await
        .expect(StatusCode::OK);
    let bearer = format!("Bearer {}", token.json()["token"].as_str().unwrap());
    send_as(
        &reg,
        &bearer,
        Method::GET,
        "/v2/public/tool/manifests/v1.0.0",
        empty(),
    )
    .await
    .expect(StatusCode::OK);
    send_as(
        &reg,
        &bearer,
        Method::POST,
        "/v2/public/tool/blobs/uploads/",
        empty(),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
}

#[tokio::test]
async fn delete_needs_the_delete_scope() {
    let (_dir, reg) = TestRegistry::start(auth_config()).await;
    let admin = basic("admin", "admin-secret");
    let manifest = push_image_as(&reg, &admin, "team/app", "main-abc1234").await;
    let path = format!("/v2/team/app/manifests/{}", sha256(&manifest));
    send_as(
        &reg,
        &basic("ci", "ci-secret"),
        Method::DELETE,
        &path,
        empty(),
    )
    .await
    .expect_error(StatusCode::FORBIDDEN, "DENIED");
    send_as(&reg, &admin, Method::DELETE, &path, empty())
        .await
        .expect(StatusCode::ACCEPTED);
}

#[tokio::test]
async fn the_realm_never_comes_from_the_host_header() {
    let (_dir, reg) = TestRegistry::start(auth_config()).await;
    let challenged = reg
        .send(Method::GET, "/v2/", &[("host", "evil.example:80")], empty())
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let challenge = challenged.header("www-authenticate").unwrap();
    assert!(
        challenge.starts_with(&format!("Bearer realm=\"http://{}/token\"", reg.addr)),
        "{challenge}"
    );
    assert!(!challenge.contains("evil.example"), "{challenge}");
}

#[tokio::test]
async fn auth_off_loopback_needs_a_configured_realm() {
    let registry = kiln_registry::Registry::open(
        auth_config(),
        std::sync::Arc::new(kiln_store::MemoryBlobStore::new()),
        std::sync::Arc::new(kiln_store::MemoryMetadataStore::new()),
    )
    .unwrap();
    // Any non-loopback address this host has; 0.0.0.0 is one.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = registry
        .serve(listener, std::future::ready(()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("registry.auth.realm must be set"),
        "{err}"
    );
}

#[tokio::test]
async fn failed_logins_are_limited_per_client_address() {
    let (_dir, reg) = TestRegistry::start(auth_config()).await;
    // Unknown users and wrong passwords count alike.
    for attempt in 0..10 {
        let user = if attempt % 2 == 0 { "ci" } else { "nobody" };
        send_as(&reg, &basic(user, "guess"), Method::GET, "/v2/", empty())
            .await
            .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    }
    // From here on, this address is told to wait, even with the right password...
    let limited = send_as(
        &reg,
        &basic("ci", "ci-secret"),
        Method::GET,
        "/v2/",
        empty(),
    )
    .await
    .expect_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // ...on the token endpoint too.
    send_as(
        &reg,
        &basic("ci", "ci-secret"),
        Method::GET,
        "/token?service=kiln-registry&scope=repository:team/app:pull",
        empty(),
    )
    .await
    .expect_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
}
