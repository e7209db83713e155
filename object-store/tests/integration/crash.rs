//! A writer that dies in the middle of a multipart upload (the process killed: no drop,
//! no abort) leaves the upload recorded; the upload sweep aborts it.

use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use kiln_store::{BlobStore, DigestFunction};
use kiln_testkit::Garage;
use object_store::path::Path;

use crate::support::{open_store, settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn the_sweep_aborts_multipart_uploads_a_crash_left() {
    let garage = Garage::start().expect("garage starts");
    let store = open_store(&garage, "crash").await;
    let bucket = kiln_object_store::connect_s3(&settings(&garage, 0, "")).unwrap();
    let markers = || {
        let bucket = bucket.clone();
        async move {
            bucket
                .list(Some(&Path::from("crash/multipart")))
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
        }
    };

    // 20 MiB: past the in-memory buffer, so parts are on their way to the bucket.
    let mut writer = store
        .begin_write(DigestFunction::Sha256, None)
        .await
        .unwrap();
    for _ in 0..20 {
        writer.write(Bytes::from(vec![7u8; 1 << 20])).await.unwrap();
    }
    // The process dies here: nothing completes or aborts the upload.
    std::mem::forget(writer);
    let recorded = markers().await;
    assert_eq!(recorded.len(), 1, "the upload in progress is recorded");
    let record = bucket
        .get(&recorded[0].location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let record = String::from_utf8(record.to_vec()).unwrap();
    let (path, id) = record.split_once('\n').expect("key and id");
    assert!(path.starts_with("crash/staging/"), "{path}");

    let (path, id) = (Path::from(path), id.to_string());
    let add_part = || bucket.put_part(&path, &id, 99, Bytes::from_static(b"x").into());
    // A day's TTL keeps it (its writer may still be alive): the upload still takes parts.
    store
        .sweep_uploads(Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(markers().await.len(), 1);
    add_part()
        .await
        .expect("the upload is alive before the sweep");
    // Past the TTL it is aborted.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let swept = store.sweep_uploads(Duration::from_millis(1)).await.unwrap();
    assert!(swept >= 1, "{swept}");
    assert!(
        markers().await.is_empty(),
        "the marker went with the upload"
    );
    // The upload itself is gone: it takes no more parts.
    assert!(
        add_part().await.is_err(),
        "the aborted upload still takes parts"
    );
}
