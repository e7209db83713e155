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
