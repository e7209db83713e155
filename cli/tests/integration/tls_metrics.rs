//! `--tls-metrics`: `/metrics`, `/healthz` and `/readyz` over HTTPS with the servers'
//! certificate, without asking for a client certificate even when the APIs do (mTLS),
//! since kubelet probes and most scrapers have none.

use kiln_tls::test_certs::MutualTls;

use crate::support::*;

const METRICS_TLS: &str = "health listening on https://";

#[test]
fn metrics_serve_https_with_the_servers_certificate_and_no_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls = MutualTls::new(dir.path(), &["localhost"]);
    let client_ca = tls.files.client_ca.as_ref().unwrap();
    let data = dir.path().join("data");
    let args: Vec<&std::ffi::OsStr> = vec![
        "coordinator".as_ref(),
        "--grpc-addr".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--metrics-addr".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--tls-cert".as_ref(),
        tls.files.cert.as_os_str(),
        "--tls-key".as_ref(),
        tls.files.key.as_os_str(),
        "--tls-client-ca".as_ref(),
        client_ca.as_os_str(),
        "--tls-metrics".as_ref(),
    ];
    let (_coordinator, addresses) = spawn_kiln(&args, &[METRICS_TLS]);
    let port = addresses[0].rsplit(':').next().unwrap().to_string();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let ca = reqwest::Certificate::from_pem(tls.server_ca.pem().as_bytes()).unwrap();
        let trusting = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        for path in ["metrics", "healthz", "readyz"] {
            let response = trusting
                .get(format!("https://localhost:{port}/{path}"))
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!("GET /{path} over TLS without a client certificate: {e}")
                });
            assert_eq!(response.status(), 200, "/{path}");
            let body = response.text().await.unwrap();
            if path == "metrics" {
                assert!(body.contains("kiln_store_bytes"), "{body}");
            }
        }
        // Plain HTTP gets no answer, and a client that does not trust the CA is refused.
        let plain = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await;
        assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
        let untrusting = reqwest::get(format!("https://localhost:{port}/metrics")).await;
        assert!(
            untrusting.is_err(),
            "an unknown CA was accepted: {untrusting:?}"
        );
    });
}

#[test]
fn tls_metrics_without_a_certificate_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(KILN)
        .args([
            "coordinator",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--tls-metrics")
        .env_remove("KILN_JOIN_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs tls.cert and tls.key"), "{stderr}");
}
