//! What a stored action-cache entry references: the ActionResult's own digests, and the
//! files inside its output directories' Trees, listed once when the result is stored in
//! an extension field appended to the encoded ActionResult ([`TreeFileIndex`]).

use bytes::Bytes;
use kiln_proto::prost::Message;
use kiln_proto::reapi::{self, ActionResult};
use kiln_store::{BlobStore, Digest, DigestFunction};

use crate::message_blob::read_message_blob;
use crate::{reapi_digest, CoordinatorError};

/// The digests of every file in a result's output directories, stored after the
/// ActionResult's own fields. Protobuf decoders skip unknown fields, so the stored bytes
/// still decode as a plain ActionResult for any reader.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TreeFileIndex {
    /// Whether the index was computed (a result with no files in its trees has an empty
    /// list, which protobuf does not tell apart from an absent one).
    #[prost(bool, tag = "100000")]
    pub(crate) indexed: bool,
    /// 40 bytes per file: the 32-byte hash, then the size as little-endian u64. The
    /// function is the action's own.
    #[prost(bytes = "bytes", tag = "100001")]
    files: Bytes,
}

const INDEX_RECORD: usize = 40;

impl TreeFileIndex {
    pub(crate) fn new(files: &[Digest]) -> Self {
        let mut packed = Vec::with_capacity(files.len() * INDEX_RECORD);
        for file in files {
            packed.extend_from_slice(&file.hash);
            packed.extend_from_slice(&file.size.to_le_bytes());
        }
        TreeFileIndex {
            indexed: true,
            files: packed.into(),
        }
    }

    pub(crate) fn digests(&self, function: DigestFunction) -> impl Iterator<Item = Digest> + '_ {
        self.files.chunks_exact(INDEX_RECORD).map(move |record| {
            let (hash, size) = record.split_at(32);
            Digest::new(
                function,
                hash.try_into().expect("split at 32"),
                u64::from_le_bytes(size.try_into().expect("8 bytes remain")),
            )
        })
    }
}

/// Every blob a result names directly: output files, output directories' Trees (and
/// their root directories), stdout and stderr.
pub(crate) fn referenced_blobs(
    function: DigestFunction,
    result: &ActionResult,
) -> Result<Vec<Digest>, CoordinatorError> {
    let mut referenced = Vec::with_capacity(result.output_files.len() + 2);
    for (i, file) in result.output_files.iter().enumerate() {
        referenced.push(reapi_digest::parse(function, file.digest.as_ref(), || {
            format!("action_result.output_files[{i}].digest")
        })?);
    }
    for (i, directory) in result.output_directories.iter().enumerate() {
        referenced.push(reapi_digest::parse(
            function,
            directory.tree_digest.as_ref(),
            || format!("action_result.output_directories[{i}].tree_digest"),
        )?);
        if directory.root_directory_digest.is_some() {
            referenced.push(reapi_digest::parse(
                function,
                directory.root_directory_digest.as_ref(),
                || format!("action_result.output_directories[{i}].root_directory_digest"),
            )?);
        }
    }
    for (digest, field) in [
        (&result.stdout_digest, "action_result.stdout_digest"),
        (&result.stderr_digest, "action_result.stderr_digest"),
    ] {
        if digest.is_some() {
            referenced.push(reapi_digest::parse(function, digest.as_ref(), || {
                field.into()
            })?);
        }
    }
    Ok(referenced)
}

/// The digests of every file in the result's output directories, read from the Trees.
pub(crate) async fn tree_files(
    blobs: &dyn BlobStore,
    max_message_bytes: u64,
    function: DigestFunction,
    result: &ActionResult,
) -> Result<Vec<Digest>, CoordinatorError> {
    let mut files = Vec::new();
    for (i, directory) in result.output_directories.iter().enumerate() {
        let field = || format!("action_result.output_directories[{i}].tree_digest");
        let tree_digest = reapi_digest::parse(function, directory.tree_digest.as_ref(), field)?;
        if blobs.size_of(&tree_digest.content_hash()).await? != Some(tree_digest.size) {
            // Reported with the other missing blobs.
            continue;
        }
        let encoded = read_message_blob(blobs, &tree_digest, max_message_bytes, field).await?;
        let tree = reapi::Tree::decode(encoded)
            .map_err(|e| CoordinatorError::bad_request(field(), format!("is not a Tree: {e}")))?;
        for node in tree
            .root
            .iter()
            .chain(&tree.children)
            .flat_map(|d| &d.files)
        {
            files.push(reapi_digest::parse(function, node.digest.as_ref(), || {
                format!("{} (file {:?})", field(), node.name)
            })?);
        }
    }
    Ok(files)
}
