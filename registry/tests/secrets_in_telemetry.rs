//! Credentials never reach spans or logs. A registry with basic auth and the token flow
//! serves pushes and pulls with passwords and bearer tokens, right and wrong, while it
//! exports every span to an in-process OTLP receiver and keeps its log lines at `trace`
//! in memory. No password, `user:password` encoding, token, token key or password hash
//! may appear in any span or any log line.
//!
//! A test binary of its own, since it sets the `tracing` dispatchers its threads use.

mod common;

use common::*;
use hyper::{Method, StatusCode};
use kiln_telemetry::receiver::{recorded_secrets, TraceCollector};

/// Everything, dependencies included (the test's HTTP client too), at their most verbose.
const LOG_FILTER: &str = "trace";

#[test]
fn credentials_stay_out_of_spans_and_logs() {
    const PASSWORD: &str = "ci-secret";
    const WRONG_PASSWORD: &str = "wrong-password-5c2e8a";
    const FORGED_TOKEN: &str = "eyJmb3JnZWQiOnRydWV9.Zm9yZ2VkLXNpZ25hdHVyZQ";
    let collector = TraceCollector::start().unwrap();
    let (registry, logs) = collector
        .process_capturing_logs("kiln-registry", LOG_FILTER)
        .unwrap();
    let mut config = auth_config();
    config.auth.token_key_hex = hex::encode(rand::random::<[u8; 32]>());
    let password_hashes: Vec<String> = config
        .auth
        .users
        .iter()
        .map(|user| user.password_hash.clone())
        .collect();
    let token_key = config.auth.token_key_hex.clone();
    let ci = basic("ci", PASSWORD);
    let wrong = basic("ci", WRONG_PASSWORD);

    let token = registry.block_on(async {
        let (_dir, reg) = TestRegistry::start(config).await;
        push_image_as(&reg, &ci, "team/app", "v1.0.0").await;
        send_as(&reg, &wrong, Method::GET, "/v2/", empty())
            .await
            .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        let token_path = "/token?service=kiln-registry&scope=repository:team/app:pull,push";
        send_as(&reg, &wrong, Method::GET, token_path, empty())
            .await
            .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        let token = issue_token(&reg, &ci, "repository:team/app:pull,push").await;
        let bearer = format!("Bearer {token}");
        send_as(
            &reg,
            &bearer,
            Method::GET,
            "/v2/team/app/manifests/v1.0.0",
            empty(),
        )
        .await
        .expect(StatusCode::OK);
        let blob = b"pushed with a bearer token";
        send_as(
            &reg,
            &bearer,
            Method::POST,
            &format!("/v2/team/app/blobs/uploads/?digest={}", sha256(blob)),
            full(&blob[..]),
        )
        .await
        .expect(StatusCode::CREATED);
        send_as(
            &reg,
            &format!("Bearer {FORGED_TOKEN}"),
            Method::GET,
            "/v2/team/app/manifests/v1.0.0",
            empty(),
        )
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        reg.stop().await;
        token
    });
    registry.flush();
    let spans = collector.spans();
    let lines = logs.lines();

    // The test saw real work, so that it cannot pass by capturing nothing.
    let routes: Vec<&str> = spans.iter().map(|s| s.span.name.as_str()).collect();
    for route in [
        "POST /v2/{name}/blobs/uploads/",
        "PUT /v2/{name}/manifests/{reference}",
        "GET /token",
        "GET /v2/",
        "GET /v2/{name}/manifests/{reference}",
    ] {
        assert!(
            routes.contains(&route),
            "no {route:?} span among {routes:?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("kiln_registry")),
        "the registry logs at debug level: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("basic auth failed")),
        "the failed logins are logged"
    );

    let signature = token.split_once('.').expect("payload.signature").1;
    let mut secrets = vec![
        PASSWORD.to_string(),
        WRONG_PASSWORD.to_string(),
        ci.trim_start_matches("Basic ").to_string(),
        wrong.trim_start_matches("Basic ").to_string(),
        token.clone(),
        signature.to_string(),
        FORGED_TOKEN.to_string(),
        token_key,
    ];
    secrets.extend(password_hashes);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let leaks = recorded_secrets(&secrets, &spans, &lines);
    assert!(leaks.is_empty(), "credentials were recorded: {leaks:#?}");
}
