//! Slow uploads cannot hold the registry's upload slots: over raw TCP, clients that send
//! their headers and part of a body and then stall take every slot; a normal push is
//! refused (429) while they hold them, they are cut off (408) within the idle timeout,
//! and the normal push then succeeds. One address cannot hold more than its share of
//! connections either.

use std::time::{Duration, Instant};

use crate::common;

use common::*;
use hyper::{Method, StatusCode};
use kiln_registry::RegistryConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a monolithic upload of `len` bytes, sends `sent` of them and stalls.
async fn stalled_upload(reg: &TestRegistry, len: usize, sent: usize) -> TcpStream {
    let content = vec![7u8; len];
    let digest = sha256(&content);
    let mut stream = TcpStream::connect(reg.addr).await.unwrap();
    let head = format!(
        "POST /v2/app/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n",
        reg.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&content[..sent]).await.unwrap();
    stream
}

/// A monolithic upload of a small blob, sent at once.
async fn normal_push(reg: &TestRegistry) -> TestResponse {
    let data = b"a normal blob";
    let path = format!("/v2/app/blobs/uploads/?digest={}", sha256(data));
    reg.send(
        Method::POST,
        &path,
        &[("content-type", "application/octet-stream")],
        full(&data[..]),
    )
    .await
}

/// The status line's code, once the server answers (or closes).
async fn status_of(mut stream: TcpStream) -> Option<u16> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
    }
    let line = String::from_utf8_lossy(&answer);
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_are_cut_off_and_free_their_slots() {
    // The normal push below must come after the server took both slots and before it
    // cuts the stalled uploads off: a second for the first, two more for the second, as
    // a busy machine needs (with 200 ms and a 1 s timeout, either could miss).
    const IDLE_SECS: u64 = 3;
    let mut config = RegistryConfig::default();
    config.limits.max_concurrent_uploads = 2;
    config.limits.body_idle_timeout_secs = IDLE_SECS;
    let (_dir, reg) = TestRegistry::start(config).await;

    let started = Instant::now();
    let slow = [
        stalled_upload(&reg, 1 << 20, 1000).await,
        stalled_upload(&reg, 1 << 20, 10).await,
    ];
    // Both hold a slot: a normal push is told to come back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    normal_push(&reg)
        .await
        .expect_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    // Each is cut off with 408 within the idle timeout (plus scheduling).
    for stream in slow {
        assert_eq!(status_of(stream).await, Some(408));
    }
    assert!(
        started.elapsed() < Duration::from_secs(IDLE_SECS + 5),
        "{:?}",
        started.elapsed()
    );
    normal_push(&reg).await.expect(StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_drips_is_cut_off_by_the_rate_floor() {
    let mut config = RegistryConfig::default();
    config.limits.body_idle_timeout_secs = 1;
    config.limits.min_body_bytes_per_sec = 1 << 20;
    let (_dir, reg) = TestRegistry::start(config).await;
    let mut stream = stalled_upload(&reg, 1 << 20, 100).await;
    // A byte every 300 ms: never idle for a second, far under the floor.
    let dripping = async {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if stream.write_all(&[7]).await.is_err() {
                break;
            }
        }
        stream
    };
    let stream = tokio::time::timeout(Duration::from_secs(15), dripping)
        .await
        .unwrap();
    assert_eq!(status_of(stream).await, Some(408));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_limited_per_client_address() {
    let mut config = RegistryConfig::default();
    config.limits.max_connections_per_address = 2;
    let (_dir, reg) = TestRegistry::start(config).await;
    let held: Vec<TcpStream> =
        futures::future::join_all((0..2).map(|_| TcpStream::connect(reg.addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    // The third is closed without an answer; HTTP on it finds the door shut.
    let mut third = TcpStream::connect(reg.addr).await.unwrap();
    let _ = third
        .write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", reg.addr).as_bytes())
        .await;
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buffer))
        .await
        .expect("closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Once one closes, a new connection is served: as soon as the server has seen it go,
    // which a busy machine may take a while to do.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match push_on_a_new_connection(&reg).await {
            Some(201) => break,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("a new connection after the others closed: {other:?}"),
        }
    }
}

/// [`normal_push`] over a connection of its own; the status, or `None` when the server
/// closes the connection without answering.
async fn push_on_a_new_connection(reg: &TestRegistry) -> Option<u16> {
    let data = b"a normal blob";
    let mut stream = TcpStream::connect(reg.addr).await.ok()?;
    let head = format!(
        "POST /v2/app/blobs/uploads/?digest={} HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        sha256(data),
        reg.addr,
        data.len()
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    stream.write_all(data).await.ok()?;
    status_of(stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_sent_a_byte_at_a_time_are_cut_off() {
    let mut config = RegistryConfig::default();
    config.limits.header_read_timeout_secs = 1;
    let (_dir, reg) = TestRegistry::start(config).await;
    let mut slow = TcpStream::connect(reg.addr).await.unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    // A header line every 300 ms, for up to 10 s: never silent, never finished.
    let mut closed_after = None;
    for i in 0..33 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if slow
            .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buffer = [0u8; 256];
        if let Ok(Ok(read)) =
            tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buffer)).await
        {
            if read == 0 || String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 408") {
                closed_after = Some(started.elapsed());
                break;
            }
        }
    }
    let closed_after = closed_after.expect("the server never cut the slow headers off");
    assert!(closed_after < Duration::from_secs(4), "{closed_after:?}");
    // Meanwhile and after, normal requests are served.
    normal_push(&reg).await.expect(StatusCode::CREATED);
}
