//! Everything the action cache references, as a set of hashes: what a collector of a
//! store the CAS shares (the registry's GC) must keep.

use std::collections::HashSet;
use std::sync::Arc;

use futures::TryStreamExt;
use kiln_proto::prost::Message;
use kiln_proto::reapi::ActionResult;
use kiln_store::{ActionCache, BlobStore, ContentHash, MetadataStore};

use crate::action_cache::{referenced_blobs, tree_files, TreeFileIndex};
use crate::CoordinatorError;

/// The hashes of every blob an action-cache entry names: outputs, output Trees and the
/// files in them, stdout and stderr. Entries are streamed; the set holds hashes only.
/// An entry that does not decode references nothing (it is a miss for clients too).
pub async fn action_cache_references(
    metadata: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    max_message_bytes: u64,
) -> Result<HashSet<ContentHash>, CoordinatorError> {
    let mut referenced = HashSet::new();
    let mut entries = ActionCache::new(metadata).entries();
    while let Some((function, stored)) = entries.try_next().await? {
        let Ok(result) = ActionResult::decode(stored.as_slice()) else {
            continue;
        };
        let Ok(direct) = referenced_blobs(function, &result) else {
            continue;
        };
        referenced.extend(direct.iter().map(|d| d.content_hash()));
        let index = TreeFileIndex::decode(stored.as_slice()).unwrap_or_default();
        if index.indexed {
            referenced.extend(index.digests(function).map(|d| d.content_hash()));
        } else if !result.output_directories.is_empty() {
            // Stored without an index: the Trees say (a Tree that is gone says nothing).
            if let Ok(files) =
                tree_files(blobs.as_ref(), max_message_bytes, function, &result).await
            {
                referenced.extend(files.iter().map(|d| d.content_hash()));
            }
        }
    }
    Ok(referenced)
}
