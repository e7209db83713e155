//! GetTree: a breadth-first walk over the Directory messages stored in the CAS, served
//! in pages.
//!
//! Page tokens are the number of directories already returned. The walk is
//! deterministic (children in the order their parent lists them, each distinct
//! directory once), so a later request with a token re-walks to the same position. That
//! re-reads the skipped directories but keeps the server stateless.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use kiln_proto::prost::Message;
use kiln_proto::reapi::{Directory, GetTreeResponse};
use kiln_store::{BlobStore, Digest, StoreError};

use crate::message_blob::check_message_size;
use crate::{reapi_digest, CoordinatorError};

/// How many queued directories are fetched in one round, and how many at once.
const READ_AHEAD: usize = 64;
const READ_CONCURRENCY: usize = 16;
/// A page ends early once its directories add up to this many bytes, keeping responses
/// well under the gRPC message limit.
const PAGE_BYTES: usize = 2 << 20;

/// What one walk may hold: each distinct directory is remembered (to visit it once) and
/// read whole into memory.
#[derive(Clone, Copy)]
pub(crate) struct TreeLimits {
    pub(crate) max_directories: usize,
    pub(crate) max_message_bytes: u64,
}

pub(crate) struct TreeWalk {
    blobs: Arc<dyn BlobStore>,
    limits: TreeLimits,
    /// Directories found but not yet read.
    queue: VecDeque<Digest>,
    seen: HashSet<Digest>,
    /// Directories read but not yet handed out.
    ready: VecDeque<Directory>,
}

impl TreeWalk {
    /// Reads the root; NOT_FOUND when it is absent, as REAPI specifies.
    pub(crate) async fn start(
        blobs: Arc<dyn BlobStore>,
        root: Digest,
        limits: TreeLimits,
    ) -> Result<Self, CoordinatorError> {
        check_message_size(&root, limits.max_message_bytes, || "root_digest".into())?;
        let data = read_blob(blobs.as_ref(), &root).await?.ok_or_else(|| {
            CoordinatorError::NotFound(format!("root directory {root} is not in the CAS"))
        })?;
        let root_directory = Directory::decode(data).map_err(|e| {
            CoordinatorError::bad_request("root_digest", format!("is not a Directory: {e}"))
        })?;
        let mut walk = TreeWalk {
            blobs,
            limits,
            queue: VecDeque::new(),
            seen: HashSet::from([root]),
            ready: VecDeque::new(),
        };
        walk.accept(root.function, root_directory)?;
        Ok(walk)
    }

    /// A walk over several trees at once, each distinct directory visited once across
    /// all of them. Roots are not read up front: one that is missing is left out like any
    /// missing subtree.
    pub(crate) fn over_roots(
        blobs: Arc<dyn BlobStore>,
        roots: impl IntoIterator<Item = Digest>,
        limits: TreeLimits,
    ) -> Self {
        let mut seen = HashSet::new();
        // A root too large to be a Directory message is not read: it cannot be one.
        let queue = roots
            .into_iter()
            .filter(|root| root.size <= limits.max_message_bytes && seen.insert(*root))
            .collect();
        TreeWalk {
            blobs,
            limits,
            queue,
            seen,
            ready: VecDeque::new(),
        }
    }

    /// Every directory digest the walk has found so far, read or not.
    pub(crate) fn found_directories(&self) -> &HashSet<Digest> {
        &self.seen
    }

    fn accept(
        &mut self,
        function: kiln_store::DigestFunction,
        directory: Directory,
    ) -> Result<(), CoordinatorError> {
        for child in &directory.directories {
            // A malformed child digest names nothing that could be in the CAS; like a
            // missing subtree, it is left out.
            if let Ok(digest) = reapi_digest::parse(function, child.digest.as_ref(), String::new) {
                check_message_size(&digest, self.limits.max_message_bytes, || {
                    format!("root_digest (subdirectory {:?})", child.name)
                })?;
                if self.seen.insert(digest) {
                    if self.seen.len() > self.limits.max_directories {
                        return Err(CoordinatorError::bad_request(
                            "root_digest",
                            format!(
                                "names a tree of more than {} distinct directories (coordinator.max_tree_directories)",
                                self.limits.max_directories
                            ),
                        ));
                    }
                    self.queue.push_back(digest);
                }
            }
        }
        self.ready.push_back(directory);
        Ok(())
    }

    /// Reads queued directories until one is ready or the walk is over.
    async fn fill(&mut self) -> Result<(), CoordinatorError> {
        while self.ready.is_empty() && !self.queue.is_empty() {
            let round: Vec<Digest> = self
                .queue
                .drain(..self.queue.len().min(READ_AHEAD))
                .collect();
            let blobs = self.blobs.as_ref();
            let read: Vec<(Digest, Option<bytes::Bytes>)> = futures::stream::iter(round)
                .map(|digest| async move {
                    Ok::<_, CoordinatorError>((digest, read_blob(blobs, &digest).await?))
                })
                .buffered(READ_CONCURRENCY)
                .try_collect()
                .await?;
            for (digest, data) in read {
                // REAPI: parts of the tree missing from the CAS are omitted.
                let Some(data) = data else { continue };
                match Directory::decode(data) {
                    Ok(directory) => self.accept(digest.function, directory)?,
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "GetTree: not a Directory; skipped")
                    }
                }
            }
        }
        Ok(())
    }

    /// The next directory in breadth-first order.
    pub(crate) async fn next(&mut self) -> Result<Option<Directory>, CoordinatorError> {
        self.fill().await?;
        Ok(self.ready.pop_front())
    }

    async fn has_more(&mut self) -> Result<bool, CoordinatorError> {
        self.fill().await?;
        Ok(!self.ready.is_empty())
    }
}

/// A blob's content, or `None` when it is not stored with that size.
async fn read_blob(
    blobs: &dyn BlobStore,
    digest: &Digest,
) -> Result<Option<bytes::Bytes>, CoordinatorError> {
    if blobs.size_of(&digest.content_hash()).await? != Some(digest.size) {
        return Ok(None);
    }
    match blobs.read_all(digest).await {
        Ok(data) => Ok(Some(data)),
        // Deleted between the check and the read.
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The responses of one GetTree call: every page from the token's position on.
pub(crate) struct TreePages {
    walk: TreeWalk,
    position: u64,
    skip: u64,
    page_size: usize,
}

impl TreePages {
    pub(crate) fn new(walk: TreeWalk, skip: u64, page_size: usize) -> Self {
        TreePages {
            walk,
            position: 0,
            skip,
            page_size,
        }
    }

    async fn next_page(mut self) -> Result<(GetTreeResponse, Option<Self>), CoordinatorError> {
        while self.position < self.skip && self.walk.next().await?.is_some() {
            self.position += 1;
        }
        let mut directories = Vec::new();
        let mut bytes = 0;
        while directories.len() < self.page_size && bytes < PAGE_BYTES {
            let Some(directory) = self.walk.next().await? else {
                break;
            };
            bytes += directory.encoded_len();
            directories.push(directory);
            self.position += 1;
        }
        let more = self.walk.has_more().await?;
        let response = GetTreeResponse {
            directories,
            next_page_token: if more {
                self.position.to_string()
            } else {
                String::new()
            },
        };
        Ok((response, more.then_some(self)))
    }

    pub(crate) fn into_stream(
        self,
    ) -> impl Stream<Item = Result<GetTreeResponse, CoordinatorError>> + Send + 'static {
        futures::stream::try_unfold(Some(self), |pages| async move {
            match pages {
                Some(pages) => pages.next_page().await.map(Some),
                None => Ok(None),
            }
        })
    }
}
