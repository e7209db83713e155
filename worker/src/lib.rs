//! kiln-worker: joins a coordinator's pool and runs REAPI actions.
//!
//! - [`run`] is the worker: one `kiln.worker.v1.Workers/Connect` stream, up to `slots`
//!   actions at once, heartbeats, reconnects, and draining on shutdown.
//! - [`ActionRunner`] runs one action: inputs from the [`LocalCache`] (fetching only what it
//!   lacks from the CAS through kiln-client's `RemoteCas`, the one REAPI client), the command through a [`CommandRunner`] in its own process group
//!   with a timeout and rlimits (under bubblewrap when available), outputs uploaded back.
//! - [`ImageStore`] keeps the root filesystems of the container images actions name
//!   (`container-image`), pulled through kiln-publish's registry client.
//!
//! The worker talks to the coordinator only over gRPC; it never links the coordinator.

mod action_platform;
mod action_runner;
mod cas_connection;
mod command_runner;
mod config;
mod container_image;
mod error;
/// Entry points for the fuzz targets in `fuzz/`; not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::container_image::unpack::{unpack_layers, Limits, UnpackError};
    pub use crate::input_tree::{plan as plan_input_tree, InputPlan};
    pub use crate::output_collector::check_paths;
    pub use kiln_client::tree_layout::TreeLimits;

    /// Where output `path` lies, lexically, as `check_paths` resolves it.
    pub fn output_location(
        exec_root: &std::path::Path,
        working_directory: &str,
        path: &str,
    ) -> Result<std::path::PathBuf, String> {
        crate::output_collector::output_location(exec_root, working_directory, path)
    }
}
mod input_tree;
mod lease_messages;
mod local_cache;
mod log_capture;
mod output_collector;
mod process_spawn;
mod sandbox;
mod worker;

pub use action_runner::{ActionOutcome, ActionRequest, ActionRunner};
pub use cas_connection::CasConnection;
pub use command_runner::{
    CommandExit, CommandRunner, CommandSpec, ProcessRunner, ResourceLimits, SandboxSettings,
};
pub use config::{SandboxMode, WorkerConfig, DEFAULT_SANDBOX_UID_BASE};
pub use container_image::{ImageRoot, ImageSettings, ImageStore, CONTAINER_IMAGE_PROPERTY};
pub use error::WorkerError;
pub use input_tree::materialise;
pub use lease_messages::lease_result;
pub use local_cache::{CacheKey, CachePin, CacheSummary, FetchStats, LocalCache};
pub use output_collector::{collect as collect_outputs, CollectedOutputs};
pub use worker::{run, run_reporting};
