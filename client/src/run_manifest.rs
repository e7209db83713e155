//! The run manifest: a small JSON record of the last `kiln run`, written to
//! `<input root>/.kiln/last-run.json`, for `kiln publish --from-run` and for people.
//!
//! Format (version 1); digests are REAPI's `"{hex hash}/{size in bytes}"`, all under
//! `digest_function`:
//!
//! ```json
//! {
//!   "version": 1,
//!   "tool_invocation_id": "6f1c…",          // RequestMetadata.tool_invocation_id
//!   "instance_name": "",
//!   "digest_function": "sha256",            // or "blake3"
//!   "input_root_digest": "ab12…/1234",
//!   "output_dir": "/abs/path/outputs/went/under",
//!   "exit_code": 0,                         // the merged exit code of the run
//!   "shards": [
//!     {
//!       "index": 0,
//!       "action_digest": "cd34…/142",
//!       "action_result_digest": "ef56…/310", // null if the shard got no ActionResult
//!       "exit_code": 0,
//!       "cached": true,                      // ExecuteResponse.cached_result
//!       "error": null,                       // why the shard failed to run, if it did
//!       "outputs": ["/abs/path/out.txt"]     // local paths written for this shard
//!     }
//!   ]
//! }
//! ```
//!
//! The ActionResult named by `action_result_digest` is the encoded
//! `build.bazel.remote.execution.v2.ActionResult`, uploaded to the CAS by `kiln run`, so
//! it can be read back with a plain CAS read even when the action was not cacheable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tree_hasher::STATE_DIR;
use crate::{ClientError, Result};

pub const MANIFEST_VERSION: u32 = 1;
const FILE_NAME: &str = "last-run.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunManifest {
    pub version: u32,
    pub tool_invocation_id: String,
    pub instance_name: String,
    pub digest_function: String,
    pub input_root_digest: String,
    pub output_dir: PathBuf,
    pub exit_code: i32,
    pub shards: Vec<ShardRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub index: u32,
    pub action_digest: String,
    pub action_result_digest: Option<String>,
    pub exit_code: i32,
    pub cached: bool,
    pub error: Option<String>,
    pub outputs: Vec<PathBuf>,
}

impl RunManifest {
    /// Where `kiln run` writes the manifest for an input root.
    pub fn path_for(input_root: &Path) -> PathBuf {
        input_root.join(STATE_DIR).join(FILE_NAME)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ClientError::io(path, e))?;
        let manifest: RunManifest = serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        if manifest.version != MANIFEST_VERSION {
            return Err(ClientError::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "run manifest version {} is not {MANIFEST_VERSION}",
                        manifest.version
                    ),
                ),
            ));
        }
        Ok(manifest)
    }

    /// Writes the manifest atomically (temp file, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| ClientError::io(dir, e))?;
        let json = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        let temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| ClientError::io(dir, e))?;
        std::fs::write(temp.path(), json).map_err(|e| ClientError::io(temp.path(), e))?;
        temp.persist(path)
            .map_err(|e| ClientError::io(path, e.error))?;
        Ok(())
    }
}
