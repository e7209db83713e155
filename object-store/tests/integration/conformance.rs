//! The shared [`BlobStore`](kiln_store::BlobStore) contract, on Garage.

use crate::support::open_store;
use kiln_testkit::Garage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn the_object_store_conforms_on_garage() {
    let garage = Garage::start().expect("garage starts");
    let store = open_store(&garage, "conformance").await;
    kiln_store::conformance::blob_store::all(&store).await;
}

/// The configuration `kiln up` runs with an object store: a local filesystem tier in
/// front of Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Garage (.ci/run installs it)"]
async fn the_tiered_store_conforms_on_garage() {
    let garage = Garage::start().expect("garage starts");
    let slow = open_store(&garage, "tiered").await;
    let dir = tempfile::tempdir().unwrap();
    let fast = kiln_store::FsBlobStore::open(dir.path()).unwrap();
    let store =
        kiln_store::TieredBlobStore::new(std::sync::Arc::new(fast), std::sync::Arc::new(slow));
    kiln_store::conformance::blob_store::all(&store).await;
}
