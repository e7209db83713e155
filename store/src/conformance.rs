//! Conformance suites: the contract of [`BlobStore`](crate::BlobStore) and of
//! [`MetadataStore`](crate::MetadataStore), written once and run against every backend.
//!
//! A backend crate enables the `conformance` feature in its dev-dependencies and calls
//! `blob_store::all` / `metadata_store::all` on a fresh, empty store:
//!
//! ```ignore
//! #[tokio::test]
//! async fn conforms() {
//!     kiln_store::conformance::blob_store::all(&my_backend().await).await;
//! }
//! ```
//!
//! A failed check panics with what was expected, like any test assertion. kiln-store runs
//! both suites on its own backends in its unit tests.

pub mod blob_store;
pub mod metadata_store;
