//! kiln-client: kiln's own REAPI client, the engine of `kiln run`.
//!
//! - [`tree_hasher`] turns a working tree into REAPI `Directory` protos, respecting
//!   `.gitignore`, with a persistent [`DigestCache`] so unchanged files are not re-read.
//! - [`RemoteCas`] talks to the CAS, ByteStream and ActionCache services: it uploads only
//!   the blobs the server is missing (batched or streamed) and reads blobs back verified.
//!   It is the one REAPI CAS client: the workers use it too.
//! - [`Executor`] is the Execution service; [`GrpcExecutor`] is the real one, and
//!   [`execute_to_completion`] follows an operation, resuming with WaitExecution.
//! - [`remote_run::run`] ties them together for sharded runs, downloads outputs
//!   ([`output_download`]) and writes the [`RunManifest`].
//!
//! It is a library rather than part of the CLI so that `kiln publish --from-run` and
//! tests can reuse the same upload and download code.

mod blob_set;
mod cas_read;
mod cas_upload;
mod digest_cache;
mod endpoint;
mod error;
mod execution;
mod outcomes;
pub mod output_download;
mod progress;
mod reapi_digest;
mod remote_cas;
pub mod remote_run;
mod request_metadata;
mod retry;
mod run_manifest;
pub mod tree_hasher;
pub mod tree_layout;

pub use blob_set::{BlobSet, BlobSource, OpenFileReader};
pub use cas_read::ReadPlan;
pub use digest_cache::{DigestCache, FileStamp};
pub use endpoint::{endpoint, endpoint_with_tls, ClientTls};
pub use error::{ClientError, Result};
pub use execution::{
    execute_to_completion, missing_blobs, rpc_status_to_tonic, Executor, GrpcExecutor,
    OperationStream, ResumePolicy,
};
pub use outcomes::{HashStats, ShardOutcome, ShardResult, UploadStats};
pub use progress::{NoProgress, Progress};
pub use reapi_digest::from_reapi;
pub use remote_cas::RemoteCas;
pub use remote_run::{merge_exit_codes, run, RunReport, RunRequest};
pub use request_metadata::{
    from_request as request_metadata_of, request_with, Credentials, Invocation,
};
pub use run_manifest::{RunManifest, ShardRecord};
pub use tree_hasher::{hash_tree, InputTree, TreeHashOptions};
