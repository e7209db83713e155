//! A GiB pushed to and pulled from the registry streams through it: neither a monolithic
//! PUT, nor a chunked upload's PATCHes, nor a GET holds the blob whole. Measured on the
//! resident set, which is the whole process's (registry and client alike), so this is a
//! binary of its own and its tests run one at a time.

mod common;

use std::convert::Infallible;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_store::{Digest, DigestFunction};
use kiln_testkit::resident::{LargeContent, PeakSampler};
use tokio::sync::Mutex;

/// The tests measure one process-wide number: each holds this while it runs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// How far a GiB transfer may raise the resident set. Buffering the blob anywhere would
/// add 1024 MiB; streaming costs a few MiB chunks in flight, socket buffers and the
/// allocator's free lists.
const GROWTH_BOUND: u64 = 192 << 20;

const SAMPLE_EVERY: Duration = Duration::from_millis(20);

const REPO: &str = "big/image";

/// A request body of the content's pieces in `range`, each made when hyper asks for it.
fn pieces_body(content: Arc<LargeContent>, range: Range<u64>) -> RequestBody {
    let frames =
        range.map(move |i| Ok::<_, Infallible>(Frame::data(Bytes::from(content.piece(i)))));
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

/// Fails a step that hangs instead of letting the test run forever.
async fn within<T>(seconds: u64, step: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), step)
        .await
        .expect("test step timed out")
}

/// HEADs the blob: it is linked in the repository with the content's size.
async fn assert_blob_size(reg: &TestRegistry, digest: &Digest) {
    let head = reg
        .head(&format!("/v2/{REPO}/blobs/{}", digest.oci()))
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some(&*digest.size.to_string())
    );
    assert_eq!(head.header("docker-content-digest"), Some(&*digest.oci()));
}

/// A monolithic push (POST, then one PUT whose body is streamed with a Content-Length)
/// of a GiB, then a HEAD and a GET that hashes the body as it arrives: the resident set's
/// peak stays far below the blob's size both ways, and the blob pulls back intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_pushes_and_pulls_in_bounded_memory() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let content = Arc::new(LargeContent::new(1024, 0x6f63_6931));
    let digest = content.digest(DigestFunction::Sha256);
    let hashed = started.elapsed();

    let location = reg.start_upload(REPO).await;
    let length = content.len().to_string();
    let pushing = Instant::now();
    let sampler = PeakSampler::start(SAMPLE_EVERY);
    let created = within(
        60,
        reg.send(
            Method::PUT,
            &TestRegistry::with_digest(&location, &digest.oci()),
            &[
                ("content-type", "application/octet-stream"),
                ("content-length", &length),
            ],
            pieces_body(content.clone(), 0..content.pieces()),
        ),
    )
    .await
    .expect(StatusCode::CREATED);
    let push = sampler.finish();
    let push_time = pushing.elapsed();
    eprintln!("monolithic push of 1 GiB in {push_time:.1?}: {push}");
    assert_eq!(
        created.header("docker-content-digest"),
        Some(&*digest.oci())
    );
    assert!(
        push.growth() < GROWTH_BOUND,
        "pushing 1 GiB raised the resident set too far: {push}"
    );
    assert_blob_size(&reg, &digest).await;

    // A client of its own: the test kit's reads whole bodies, which is what must not
    // happen here.
    let client = Client::builder(TokioExecutor::new()).build_http::<RequestBody>();
    let pulling = Instant::now();
    let sampler = PeakSampler::start(SAMPLE_EVERY);
    let pulled = within(60, async {
        let request = hyper::Request::get(format!(
            "http://{}/v2/{REPO}/blobs/{}",
            reg.addr,
            digest.oci()
        ))
        .body(empty())
        .unwrap();
        let response = client.request(request).await.expect("the GET is answered");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut hasher = DigestFunction::Sha256.hasher();
        let mut size = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("the body streams").into_data() {
                hasher.update(&data);
                size += data.len() as u64;
            }
        }
        Digest::new(DigestFunction::Sha256, hasher.finalize(), size)
    })
    .await;
    let pull = sampler.finish();
    let pull_time = pulling.elapsed();
    eprintln!("pull of 1 GiB in {pull_time:.1?}: {pull}");
    assert_eq!(pulled, digest, "the blob pulls back as it was pushed");
    assert!(
        pull.growth() < GROWTH_BOUND,
        "pulling 1 GiB raised the resident set too far: {pull}"
    );

    drop(client);
    reg.stop().await;
    eprintln!(
        "hashing the content took {hashed:.1?}; the whole test {:.1?}",
        started.elapsed()
    );
}

/// A chunked push of a GiB: 64 MiB PATCHes with Content-Range, each acknowledged with the
/// range received so far, then an empty PUT with the digest, which the registry checks
/// against what it hashed on the way. The resident set stays bounded over the whole push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_pushed_in_chunks_stays_in_bounded_memory() {
    const CHUNK_PIECES: u64 = 64;
    let _alone = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let (_dir, reg) = TestRegistry::start(permissive_config()).await;
    let content = Arc::new(LargeContent::new(1024, 0x6f63_6932));
    let digest = content.digest(DigestFunction::Sha256);

    let mut location = reg.start_upload(REPO).await;
    let chunk_len = CHUNK_PIECES * LargeContent::PIECE as u64;
    let pushing = Instant::now();
    let sampler = PeakSampler::start(SAMPLE_EVERY);
    for first in (0..content.pieces()).step_by(CHUNK_PIECES as usize) {
        let start = first * LargeContent::PIECE as u64;
        let end = start + chunk_len - 1;
        let range = format!("{start}-{end}");
        let accepted = within(
            30,
            reg.send(
                Method::PATCH,
                &location,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-range", &range),
                    ("content-length", &chunk_len.to_string()),
                ],
                pieces_body(content.clone(), first..first + CHUNK_PIECES),
            ),
        )
        .await
        .expect(StatusCode::ACCEPTED);
        assert_eq!(accepted.header("range"), Some(&*format!("0-{end}")));
        location = accepted.header("location").expect("Location").to_string();
    }
    let created = within(30, reg.finish_upload(&location, &digest.oci())).await;
    let push = sampler.finish();
    let push_time = pushing.elapsed();
    eprintln!("chunked push of 1 GiB in {push_time:.1?}: {push}");
    assert_eq!(
        created.header("docker-content-digest"),
        Some(&*digest.oci())
    );
    assert!(
        push.growth() < GROWTH_BOUND,
        "pushing 1 GiB in chunks raised the resident set too far: {push}"
    );
    assert_blob_size(&reg, &digest).await;

    reg.stop().await;
    eprintln!("the whole test {:.1?}", started.elapsed());
}
