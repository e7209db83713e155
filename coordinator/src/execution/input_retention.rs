//! What CAS eviction must keep for the operations still to run: each one's Action,
//! Command and every blob of its input tree.
//!
//! Without it only the store's grace period protects a queued action's inputs, and an
//! action that waits longer than that in a busy queue could find them evicted when a
//! worker finally fetches them. The set is worked out when a pass asks for it, and passes
//! run only above the high watermark, so Execute pays nothing for it.

use std::collections::HashSet;
use std::sync::{Arc, RwLock, Weak};

use async_trait::async_trait;
use kiln_proto::prost::Message;
use kiln_proto::reapi::{Action, Directory};
use kiln_store::{ContentHash, Digest, DigestFunction, RetainedBlobs};

use super::{ExecutionEngine, Inner};
use crate::message_blob::read_message_blob;
use crate::reapi_digest;
use crate::tree::{TreeLimits, TreeWalk};

/// The most input blobs kept for unfinished operations in one pass. Past it, the
/// operations that have waited longest are covered and the rest rely on the grace period:
/// the set is held in memory while the pass runs (about 50 bytes a blob).
pub(crate) const MAX_RETAINED_INPUTS: usize = 2_000_000;

/// The inputs of every unfinished operation, as [`RetainedBlobs`] for the CAS's eviction.
///
/// It is handed to the store before the coordinator serves; until the engine is open (it
/// reloads the operations a previous run left), a pass is told it cannot know, and skips.
#[derive(Default)]
pub struct InFlightInputs {
    /// The engine now running: in a farm, a replica runs one only while it leads, and a
    /// pass on a replica without one skips (it cannot know the leader's queue).
    engine: RwLock<Weak<Inner>>,
}

impl InFlightInputs {
    /// Weak, so that the store holding this does not keep the engine alive after shutdown.
    pub(crate) fn attach(&self, engine: &ExecutionEngine) {
        *self.engine.write().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(&engine.inner);
    }
}

#[async_trait]
impl RetainedBlobs for InFlightInputs {
    async fn retained(&self) -> Result<HashSet<ContentHash>, String> {
        let inner = self
            .engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .upgrade()
            .ok_or("the coordinator runs no engine now (not open yet, stopped, or a follower)")?;
        let engine = ExecutionEngine { inner };
        engine
            .unfinished_inputs(MAX_RETAINED_INPUTS)
            .await
            .map_err(|e| e.to_string())
    }
}

impl ExecutionEngine {
    /// The Action, Command and input-tree blobs of unfinished operations, those waiting
    /// longest first, up to `max_blobs`.
    async fn unfinished_inputs(
        &self,
        max_blobs: usize,
    ) -> Result<HashSet<ContentHash>, crate::CoordinatorError> {
        let mut actions: Vec<(u64, Digest, String)> = self
            .state()
            .operations
            .values()
            .filter(|live| live.completed.is_none())
            .map(|live| {
                let record = &live.record;
                (
                    record.queued_at_unix_nanos,
                    record.action_digest(),
                    record.name.clone(),
                )
            })
            .collect();
        actions.sort_unstable_by_key(|(queued_at, _, _)| *queued_at);

        let blobs = &self.inner.blobs;
        let max_message = self.inner.limits.max_message_bytes;
        let mut kept = HashSet::new();
        let mut roots = Vec::new();
        for (_, action_digest, operation) in actions {
            if kept.len() >= max_blobs {
                break;
            }
            kept.insert(action_digest.content_hash());
            // Gone already (evicted, or never there after a restart): its worker will
            // report it missing, and the client uploads it again.
            let Ok(action) = read_message_blob(blobs.as_ref(), &action_digest, max_message, || {
                "action_digest".into()
            })
            .await
            .map(Action::decode) else {
                continue;
            };
            let Ok(action) = action else {
                tracing::debug!(%operation, "an unfinished operation's Action does not decode");
                continue;
            };
            let function = action_digest.function;
            let parse = |digest: &Option<_>| {
                reapi_digest::parse(function, digest.as_ref(), String::new).ok()
            };
            if let Some(command) = parse(&action.command_digest) {
                kept.insert(command.content_hash());
            }
            roots.extend(parse(&action.input_root_digest));
        }
        // A tree's files are named with its directories' digest function.
        for function in DigestFunction::ALL {
            let roots: Vec<Digest> = roots
                .iter()
                .filter(|root| root.function == function)
                .copied()
                .collect();
            if !roots.is_empty() {
                self.add_input_trees(function, roots, max_blobs, &mut kept)
                    .await;
            }
        }
        Ok(kept)
    }

    /// Adds every directory and file of the trees under `roots` until `kept` holds
    /// `max_blobs`.
    async fn add_input_trees(
        &self,
        function: DigestFunction,
        roots: Vec<Digest>,
        max_blobs: usize,
        kept: &mut HashSet<ContentHash>,
    ) {
        let limits = TreeLimits {
            max_directories: max_blobs,
            max_message_bytes: self.inner.limits.max_message_bytes,
        };
        let mut walk = TreeWalk::over_roots(self.inner.blobs.clone(), roots, limits);
        let mut complete = true;
        loop {
            let directory: Directory = match walk.next().await {
                Ok(Some(directory)) => directory,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "stopped listing the inputs of queued actions");
                    complete = false;
                    break;
                }
            };
            kept.extend(directory.files.iter().filter_map(|file| {
                let digest = file.digest.as_ref()?;
                ContentHash::parse_hex(function, &digest.hash).ok()
            }));
            if kept.len() + walk.found_directories().len() >= max_blobs {
                complete = false;
                break;
            }
        }
        kept.extend(walk.found_directories().iter().map(Digest::content_hash));
        if !complete {
            tracing::warn!(
                kept = kept.len(),
                "the inputs of queued actions exceed what one eviction pass keeps; the \
                 longest-waiting actions' are kept, the rest rely on the grace period"
            );
        }
    }
}
