//! A large blob named as an Action is refused without being read: measured on the
//! resident set, which is the whole process's, so this test is a binary of its own (in
//! the shared integration binary, other tests' buffers would show up in it).

mod common;

use common::{assert_bad_request, wire, TestServer};
use kiln_proto::reapi::{execution_client::ExecutionClient, ExecuteRequest};
use kiln_store::DigestFunction;

/// This process's resident set, from /proc: the coordinator runs in it.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_named_as_an_action_does_not_grow_the_resident_set() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await.unwrap();
    // Large enough that reading it would show in the resident set many times over.
    let size = 256 << 20;
    let blob = server.store_zeros(DigestFunction::Blake3, size).await;
    let before = resident_bytes();
    let status = ExecutionClient::new(server.channel.clone())
        .execute(ExecuteRequest {
            action_digest: Some(wire(&blob)),
            skip_cache_lookup: true,
            digest_function: DigestFunction::Blake3.reapi_value(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let grown = resident_bytes().saturating_sub(before);
    assert_bad_request(&status, "action_digest");
    assert!(
        grown < 8 << 20,
        "the resident set grew by {grown} bytes refusing a {size}-byte Action"
    );
    server.stop().await.unwrap();
}
