//! `kiln up` on a Garage bucket, killed with SIGKILL in the middle of a large ByteStream
//! write and a chunked registry upload: afterwards no object under a content key is
//! anything but a verified blob, and a second kiln on the same bucket takes the uploads
//! from where the bucket says they are.

use std::path::Path;
use std::sync::Arc;

use futures::TryStreamExt;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use kiln_store::{ContentHash, Digest, DigestFunction, ResourceName};
use kiln_testkit::{Garage, GARAGE_BUCKET};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

const PREFIX: &str = "crash";

/// The bucket's settings, and `more` after them.
fn config_with(garage: &Garage, dir: &Path, more: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("kiln.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\nbackend = \"s3\"\nbucket = \"{GARAGE_BUCKET}\"\nendpoint = \"{}\"\n\
             region = \"{}\"\nprefix = \"{PREFIX}\"\naccess_key_id = \"{}\"\n\
             secret_access_key = \"{}\"\n",
            garage.endpoint(0),
            garage.region(),
            garage.access_key_id(),
            garage.secret_access_key()
        ) + more,
    )
    .unwrap();
    path
}

/// `kiln up` (no workers) on the bucket, with `more` settings in `[storage]`, and a gRPC
/// channel to it.
async fn start(garage: &Garage, dir: &Path, more: &str) -> (Farm, tonic::transport::Channel) {
    let config = config_with(garage, dir, more);
    let farm = Farm::start_with(
        &dir.join("data"),
        0,
        &["--config".as_ref(), config.as_os_str()],
    );
    let channel = tonic::transport::Channel::from_shared(farm.grpc.replace("grpc://", "http://"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (farm, channel)
}

/// The bucket, read directly.
fn bucket(garage: &Garage) -> Arc<dyn ObjectStore> {
    let mut settings = kiln_object_store::S3Settings::new(GARAGE_BUCKET);
    settings.endpoint = Some(garage.endpoint(0));
    settings.region = garage.region().into();
    settings.access_key_id = Some(garage.access_key_id().into());
    settings.secret_access_key = Some(kiln_object_store::SecretString::new(
        garage.secret_access_key(),
    ));
    kiln_object_store::connect_s3(&settings).unwrap()
}

/// Where kiln keeps a SHA-256 blob in the bucket.
fn content_key(digest: &Digest) -> ObjectPath {
    ObjectPath::from(format!("{PREFIX}/cas/sha256/{}", digest.hex()))
}

/// A blob read straight from the bucket, bypassing kiln.
async fn read_from_bucket(bucket: &dyn ObjectStore, digest: &Digest) -> Vec<u8> {
    bucket
        .get(&content_key(digest))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

/// Every object under `cas/` hashes to its own name.
async fn every_content_key_is_verified(bucket: &dyn ObjectStore) -> usize {
    let root = ObjectPath::from(format!("{PREFIX}/cas"));
    let keys: Vec<_> = bucket.list(Some(&root)).try_collect().await.unwrap();
    for meta in &keys {
        let parts: Vec<_> = meta.location.parts().collect();
        let [.., function, hex] = parts.as_slice() else {
            panic!("odd key {}", meta.location)
        };
        let function = DigestFunction::from_name(function.as_ref()).unwrap();
        let named = ContentHash::parse_hex(function, hex.as_ref()).unwrap();
        let data = bucket
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let actual = Digest::of_bytes(function, &data).content_hash();
        assert_eq!(actual, named, "{} holds other bytes", meta.location);
    }
    keys.len()
}

fn write_request(name: &str, offset: u64, data: &[u8], finish: bool) -> WriteRequest {
    WriteRequest {
        resource_name: if offset == 0 {
            name.to_string()
        } else {
            String::new()
        },
        write_offset: offset as i64,
        finish_write: finish,
        data: kiln_proto::prost::bytes::Bytes::copy_from_slice(data),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn a_kill_mid_upload_leaves_no_partial_blob_and_another_kiln_takes_over() {
    let garage = Garage::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (farm, channel) = start(&garage, &dir.path().join("first"), "").await;

    let data: Vec<u8> = (0..40 << 20).map(|i: u32| (i % 253) as u8).collect();
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let name = ResourceName::write("", digest).to_string();

    // A ByteStream write that has sent 24 MiB (multipart parts are in flight) and stalls.
    let (requests, received) = tokio::sync::mpsc::channel(8);
    let mut client = ByteStreamClient::new(channel);
    let call = tokio::spawn(async move { client.write(ReceiverStream::new(received)).await });
    let chunk = 1 << 20;
    for offset in (0..24 << 20).step_by(chunk) {
        let piece = &data[offset..offset + chunk];
        requests
            .send(write_request(&name, offset as u64, piece, false))
            .await
            .unwrap();
    }
    // A chunked registry upload that has sent its first 12 MiB.
    let http = reqwest::Client::new();
    let started = http
        .post(format!("http://{}/v2/crash/blobs/uploads/", farm.registry))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let patched = http
        .patch(format!("http://{}{location}", farm.registry))
        .header("content-type", "application/octet-stream")
        .body(data[..12 << 20].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 202);
    // Let the bytes reach the bucket's staging area, then SIGKILL.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    drop(farm);
    let _ = call.await;

    let bucket = bucket(&garage);
    assert_eq!(
        bucket
            .head(&content_key(&digest))
            .await
            .map(|_| ())
            .map_err(|e| matches!(e, object_store::Error::NotFound { .. })),
        Err(true),
        "nothing is visible under the blob's name"
    );
    every_content_key_is_verified(bucket.as_ref()).await;

    // Another kiln on the bucket (a replica, or this one restarted elsewhere): the
    // ByteStream upload resumes where the bucket says, and completes.
    // Kept alive to the end of the test: dropping it kills the process.
    let (_second, channel) = start(&garage, &dir.path().join("second"), "").await;
    let mut client = ByteStreamClient::new(channel);
    let status = client
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let resume_at = status.committed_size as usize;
    assert!(!status.complete);
    let rest: Vec<WriteRequest> = (resume_at..data.len())
        .step_by(chunk)
        .map(|offset| {
            let end = (offset + chunk).min(data.len());
            let mut request =
                write_request(&name, offset as u64, &data[offset..end], end == data.len());
            request.resource_name = name.clone();
            request
        })
        .collect();
    let written = client
        .write(futures::stream::iter(rest))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.committed_size as usize, data.len());
    let stored = read_from_bucket(bucket.as_ref(), &digest).await;
    assert!(stored == data, "the completed upload is the blob");
    assert!(every_content_key_is_verified(bucket.as_ref()).await >= 1);
}

/// Two `kiln registry` replicas on one bucket and one PostgreSQL: a chunked upload whose
/// requests alternate between them completes, and the blob reads back from either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage and PostgreSQL (.ci/run installs them)"]
async fn a_chunked_upload_alternating_between_replicas_completes() {
    let garage = Garage::start().unwrap();
    let postgres = kiln_testkit::Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metadata = format!(
        "[metadata]\nbackend = \"postgres\"\nurl = \"{}\"\n",
        postgres.url()
    );
    let replicas: Vec<(Background, String)> = ["a", "b"]
        .iter()
        .map(|name| {
            let config = config_with(&garage, &dir.path().join(name), &metadata);
            let data = dir.path().join(name).join("data");
            let args: Vec<&std::ffi::OsStr> = vec![
                "registry".as_ref(),
                "--registry-addr".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--metrics-addr".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--data-dir".as_ref(),
                data.as_os_str(),
                "--config".as_ref(),
                config.as_os_str(),
            ];
            let (process, mut addresses) = spawn_kiln(&args, &[REGISTRY]);
            (process, addresses.remove(0))
        })
        .collect();
    let replica = |i: usize| &replicas[i % 2].1;

    let data: Vec<u8> = (0..(20 << 20) + 4321)
        .map(|i: u32| (i % 241) as u8)
        .collect();
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let http = reqwest::Client::new();
    let started = http
        .post(format!("http://{}/v2/ha/blobs/uploads/", replica(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let pieces = [0..(6 << 20), (6 << 20)..(13 << 20), (13 << 20)..data.len()];
    for (i, piece) in pieces.iter().enumerate() {
        let url = format!("http://{}{location}", replica(i));
        // The other replica reports the offset this one will continue from.
        let status = http
            .get(format!("http://{}{location}", replica(i + 1)))
            .send()
            .await
            .unwrap();
        assert_eq!(status.status(), 204);
        let range = status.headers()["range"].to_str().unwrap().to_string();
        let expected = if piece.start == 0 {
            "0-0".to_string()
        } else {
            format!("0-{}", piece.start - 1)
        };
        assert_eq!(range, expected, "piece {i}");
        let patched = http
            .patch(url)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{}-{}", piece.start, piece.end - 1),
            )
            .body(data[piece.clone()].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            patched.status(),
            202,
            "piece {i}: {}",
            patched.text().await.unwrap()
        );
    }
    let finished = http
        .put(format!("http://{}{location}", replica(1)))
        .query(&[("digest", digest.oci())])
        .send()
        .await
        .unwrap();
    assert_eq!(finished.status(), 201, "{}", finished.text().await.unwrap());
    for i in 0..2 {
        let pulled = http
            .get(format!(
                "http://{}/v2/ha/blobs/{}",
                replica(i),
                digest.oci()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(pulled.status(), 200);
        assert!(pulled.bytes().await.unwrap() == data, "replica {i}");
    }
}

/// Writes `data` in one ByteStream call; the call's status on failure.
async fn bytestream_write(
    channel: &tonic::transport::Channel,
    data: &[u8],
) -> Result<(), tonic::Status> {
    let digest = Digest::of_bytes(DigestFunction::Sha256, data);
    let name = ResourceName::write("", digest).to_string();
    let request = write_request(&name, 0, data, true);
    ByteStreamClient::new(channel.clone())
        .write(futures::stream::iter([request]))
        .await
        .map(drop)
}

/// Garage stopped under a running `kiln up`: ByteStream answers UNAVAILABLE and the
/// registry 503, each saying why, promptly; once Garage is back the same kiln serves
/// again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn a_bucket_outage_is_unavailable_then_heals_without_a_restart() {
    let mut garage = Garage::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (farm, channel) = start(&garage, dir.path(), "retry_timeout_secs = 2\n").await;
    bytestream_write(&channel, b"before the outage")
        .await
        .unwrap();

    garage.kill(0).unwrap();
    let started = std::time::Instant::now();
    let refused = bytestream_write(&channel, b"during the outage")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("object store"),
        "{}",
        refused.message()
    );
    let blob = b"a layer pushed during the outage".to_vec();
    let digest = Digest::of_bytes(DigestFunction::Sha256, &blob);
    let push = || {
        reqwest::Client::new()
            .post(format!(
                "http://{}/v2/outage/blobs/uploads/?digest={}",
                farm.registry,
                digest.oci()
            ))
            .header("content-type", "application/octet-stream")
            .body(blob.clone())
            .send()
    };
    let pushed = push().await.unwrap();
    assert_eq!(pushed.status(), 503);
    let body = pushed.text().await.unwrap();
    assert!(
        body.contains("\"errors\"") && body.contains("unavailable"),
        "{body}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "refusing took {:?}",
        started.elapsed()
    );

    garage.restart(0).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Err(status) = bytestream_write(&channel, b"after the outage").await {
        assert!(
            std::time::Instant::now() < deadline,
            "still refused: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(push().await.unwrap().status(), 201);
}

/// A three-node Garage (every object on every node) loses a node to SIGKILL while clients
/// push images and write ByteStream blobs through `kiln up`: clients see at most
/// retries, and every acknowledged write reads back whole afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn acknowledged_writes_survive_a_garage_node_killed_mid_push() {
    let mut garage = Garage::start_cluster(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (farm, channel) = start(&garage, dir.path(), "").await;
    let registry = farm.registry.clone();
    // Blob i of writer w: mixed sizes, some past the 8 MiB multipart threshold.
    let blob = |w: usize, i: usize| -> Vec<u8> {
        let len = if i % 3 == 2 {
            (9 << 20) + i
        } else {
            200_000 + i
        };
        (0..len)
            .map(|n| (n as u8) ^ (w as u8 * 17) ^ (i as u8))
            .collect()
    };
    let writers = (0..6).map(|w| {
        let (channel, registry) = (channel.clone(), registry.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut retries = 0;
            let mut written = Vec::new();
            for i in 0..6 {
                let data = blob(w, i);
                let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
                // Even writers use ByteStream, odd ones push to the registry; a failure
                // is retried, as clients do, a bounded number of times.
                let mut attempt = 0;
                loop {
                    let ok = if w % 2 == 0 {
                        bytestream_write(&channel, &data).await.is_ok()
                    } else {
                        http.post(format!(
                            "http://{registry}/v2/faults/blobs/uploads/?digest={}",
                            digest.oci()
                        ))
                        .body(data.clone())
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 201)
                    };
                    if ok {
                        break;
                    }
                    attempt += 1;
                    retries += 1;
                    assert!(attempt < 10, "writer {w} blob {i} never went through");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                written.push((digest, data));
            }
            (written, retries)
        })
    });
    let writers: Vec<_> = writers.collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    garage.kill(2).unwrap();
    let mut acknowledged = Vec::new();
    let mut retries = 0;
    for writer in writers {
        let (written, retried) = writer.await.unwrap();
        acknowledged.extend(written);
        retries += retried;
    }
    eprintln!(
        "{} writes acknowledged, {retries} retries",
        acknowledged.len()
    );
    assert_eq!(acknowledged.len(), 36);
    let http = reqwest::Client::new();
    for (digest, data) in &acknowledged {
        let pulled = http
            .get(format!(
                "http://{registry}/v2/faults/blobs/{}",
                digest.oci()
            ))
            .send()
            .await
            .unwrap();
        // ByteStream blobs are not linked into the repository: read them by their name
        // in the bucket instead.
        if pulled.status() == 200 {
            assert!(pulled.bytes().await.unwrap() == *data, "{digest}");
        } else {
            let stored = read_from_bucket(bucket(&garage).as_ref(), digest).await;
            assert!(stored == *data, "{digest}");
        }
    }
}
