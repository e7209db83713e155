//! ActionResults in the coordinator for actions that never ran: their output blobs and
//! the encoded result go into the CAS, and the result into the action cache if asked,
//! which is all `kiln publish --from-action/--from-run` reads.

use bytes::Bytes;
use kiln_client::{BlobSet, Invocation, NoProgress, RemoteCas};
use kiln_proto::prost::Message as _;
use kiln_proto::reapi::{self, ActionResult, OutputDirectory, OutputFile, OutputSymlink};
use kiln_store::{Digest, DigestFunction};

pub const FUNCTION: DigestFunction = DigestFunction::Sha256;

/// Connects kiln's own client to the coordinator at `address` (`host:port`).
pub async fn cas(address: &str) -> RemoteCas {
    RemoteCas::connect(
        &format!("grpc://{address}"),
        "",
        FUNCTION,
        Invocation::new(),
    )
    .await
    .expect("the coordinator answers")
}

/// An ActionResult being put together, with the blobs it names.
#[derive(Default)]
pub struct FakeAction {
    pub blobs: BlobSet,
    pub result: ActionResult,
}

/// Where a stored action's outputs can be found.
pub struct StoredAction {
    pub action: Digest,
    /// The encoded ActionResult in the CAS, as `kiln run` records it.
    pub result: Digest,
}

impl FakeAction {
    /// Adds a blob and returns its REAPI digest.
    pub fn blob(&mut self, data: &[u8]) -> reapi::Digest {
        self.blobs
            .add_bytes(FUNCTION, Bytes::copy_from_slice(data))
            .to_reapi()
    }

    pub fn file(mut self, path: &str, data: &[u8], executable: bool) -> Self {
        let digest = self.blob(data);
        self.result.output_files.push(OutputFile {
            path: path.into(),
            digest: Some(digest),
            is_executable: executable,
            ..Default::default()
        });
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.result.output_symlinks.push(OutputSymlink {
            path: path.into(),
            target: target.into(),
            ..Default::default()
        });
        self
    }

    /// An output directory; the blobs of the tree's files must be added with [`blob`].
    pub fn directory(mut self, path: &str, tree: &reapi::Tree) -> Self {
        let digest = self.blob(&tree.encode_to_vec());
        self.result.output_directories.push(OutputDirectory {
            path: path.into(),
            tree_digest: Some(digest),
            ..Default::default()
        });
        self
    }

    /// Uploads the blobs and the ActionResult of the action named by `name`, and caches
    /// the result when `cached` (`kiln run --no-cache` leaves it in the CAS only).
    pub async fn store(mut self, cas: &RemoteCas, name: &str, cached: bool) -> StoredAction {
        let action = Digest::of_bytes(FUNCTION, name.as_bytes());
        let result = self
            .blobs
            .add_bytes(FUNCTION, Bytes::from(self.result.encode_to_vec()));
        cas.upload_missing(&self.blobs, &NoProgress)
            .await
            .expect("the blobs upload");
        if cached {
            cas.update_action_result(&action, self.result)
                .await
                .expect("the result is cached");
        }
        StoredAction { action, result }
    }
}
