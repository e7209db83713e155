//! kiln's protocol types.
//!
//! The REAPI v2 types (plus `google.longrunning` and `google.rpc`) come from the
//! `bazel-remote-apis` crate and are re-exported here so that every other crate names
//! them through one path; `google.bytestream` is compiled here, with `Bytes` payloads. kiln's own services live under [`worker`] (the
//! `kiln.worker.v1` protocol between workers and the coordinator) and [`admin`] (the
//! operator's `kiln.admin.v1` API behind `kiln status`).

pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
pub use bazel_remote_apis::build::bazel::semver;
pub use bazel_remote_apis::google::{longrunning, protobuf, rpc};

pub use prost;

/// `google.bytestream`, compiled here with `bytes::Bytes` payloads (`ReadResponse.data`,
/// `WriteRequest.data`), so chunks reach the store and the socket without a copy.
/// bazel-remote-apis' own copy (with `Vec<u8>`) is not used anywhere.
pub mod bytestream {
    tonic::include_proto!("google.bytestream");
}

/// `kiln.worker.v1`: the stream on which workers join the pool and receive actions.
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("kiln.worker.v1");

        /// The `Any` type URL of [`ContainerImageUsed`] in auxiliary metadata.
        pub const CONTAINER_IMAGE_USED_TYPE_URL: &str =
            "type.googleapis.com/kiln.worker.v1.ContainerImageUsed";
    }
}

/// `kiln.admin.v1`: the operator's view of a coordinator (`kiln status`, `kiln drain`).
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("kiln.admin.v1");
    }
}
