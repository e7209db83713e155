//! Blob upload sessions.
//!
//! A session's record (repository, start time) lives in the metadata store and its bytes
//! in the blob store's resumable upload file named by the session id, so a session
//! survives a restart: the next request re-opens the file, which re-hashes what is there.
//! While the process runs, the open writer is kept between requests so a chunked upload
//! hashes each byte once.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use kiln_store::{
    scan_stream, BlobStore, BlobWriter, ContentHash, Digest, DigestFunction, ExpectedDigest,
    Keyspace, MetadataStore,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::clock::Clock;
use crate::error::{RegistryError, Result};
use crate::request_body::BodyReader;

/// Upload id → [`SessionRecord`].
pub const UPLOADS: Keyspace = Keyspace("registry.uploads");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub repository: String,
    /// When the session was created (milliseconds since the epoch).
    pub started_at_ms: u64,
    /// When a request last touched it; idle sessions expire.
    pub updated_at_ms: u64,
    /// Bytes received as of the last request (informational: after a crash the upload
    /// file is the truth, and may hold less).
    pub offset: u64,
}

struct OpenWriter {
    function: DigestFunction,
    writer: Box<dyn BlobWriter>,
}

/// The writer slot of one session; holding its guard serialises requests to the session.
pub struct SessionGuard {
    id: String,
    slot: OwnedMutexGuard<Option<OpenWriter>>,
}

pub struct UploadSessions {
    metadata: Arc<dyn MetadataStore>,
    clock: Arc<dyn Clock>,
    blobs: Arc<dyn BlobStore>,
    slots: dashmap::DashMap<String, Arc<Mutex<Option<OpenWriter>>>>,
    /// Whether the next request of a session may land on another replica.
    shared: bool,
}

impl UploadSessions {
    pub fn new(
        metadata: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        UploadSessions {
            metadata,
            clock,
            blobs,
            slots: dashmap::DashMap::new(),
            shared: false,
        }
    }

    /// Saves each session's bytes at the end of every request (see
    /// `RegistryConfig::shared_upload_sessions`).
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// Ends a request's hold on its session. With shared sessions the writer is
    /// suspended, its bytes saved where any replica can resume them; otherwise it stays
    /// open here for the session's next request.
    pub async fn release(&self, mut session: SessionGuard) -> Result<()> {
        if self.shared {
            if let Some(open) = session.slot.take() {
                open.writer.suspend().await?;
            }
        }
        Ok(())
    }

    /// Starts a session and makes it durable, so its id stays valid across a restart.
    pub async fn create(&self, repository: &str) -> Result<String> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let now = self.clock.now_millis();
        let record = SessionRecord {
            repository: repository.to_string(),
            started_at_ms: now,
            updated_at_ms: now,
            offset: 0,
        };
        self.save(&id, &record).await?;
        self.metadata.flush().await?;
        Ok(id)
    }

    async fn save(&self, id: &str, record: &SessionRecord) -> Result<()> {
        let bytes = serde_json::to_vec(record).expect("session records serialise");
        self.metadata.insert(UPLOADS, id.as_bytes(), &bytes).await?;
        Ok(())
    }

    async fn record(&self, id: &str) -> Result<Option<SessionRecord>> {
        self.metadata
            .get(UPLOADS, id.as_bytes())
            .await?
            .map(|bytes| decode_session(&bytes))
            .transpose()
    }

    /// Every session, for expiry, a page at a time.
    pub fn all(&self) -> BoxStream<'static, Result<(String, SessionRecord)>> {
        scan_stream(self.metadata.clone(), UPLOADS, Vec::new())
            .map(|entry| {
                let (k, v) = entry?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    decode_session(&v)?,
                ))
            })
            .boxed()
    }

    /// Locks the session `id` of `repository` for one request.
    pub async fn lock(&self, repository: &str, id: &str) -> Result<SessionGuard> {
        let unknown =
            || RegistryError::BlobUploadUnknown(format!("no upload {id:?} in {repository}"));
        match self.record(id).await? {
            Some(record) if record.repository == repository => {}
            _ => return Err(unknown()),
        }
        let slot = self.slots.entry(id.to_string()).or_default().clone();
        let guard = slot.lock_owned().await;
        // The session may have completed or been cancelled while this request waited.
        if self.record(id).await?.is_none() {
            return Err(unknown());
        }
        Ok(SessionGuard {
            id: id.to_string(),
            slot: guard,
        })
    }

    /// The session's writer for `function`, re-opening (and so re-hashing) the upload
    /// file when the process restarted or the final digest uses another function.
    async fn writer<'a>(
        &self,
        session: &'a mut SessionGuard,
        function: DigestFunction,
    ) -> Result<&'a mut Box<dyn BlobWriter>> {
        if session
            .slot
            .as_ref()
            .is_some_and(|w| w.function != function)
        {
            // Dropping keeps the bytes; the new writer waits for the file lock.
            *session.slot = None;
        }
        if session.slot.is_none() {
            let writer = self.blobs.begin_write(function, Some(&session.id)).await?;
            *session.slot = Some(OpenWriter { function, writer });
        }
        Ok(&mut session.slot.as_mut().expect("just filled").writer)
    }

    /// How many bytes the session holds.
    pub async fn offset(&self, session: &mut SessionGuard) -> Result<u64> {
        let function = session
            .slot
            .as_ref()
            .map_or(DigestFunction::Sha256, |w| w.function);
        Ok(self.writer(session, function).await?.bytes_written())
    }

    /// Appends a request body. `expected_start` is the Content-Range start, when given;
    /// a chunk that does not start at the current offset appends nothing.
    pub async fn append(
        &self,
        session: &mut SessionGuard,
        expected_start: Option<u64>,
        mut body: BodyReader,
        location: &str,
    ) -> Result<u64> {
        let offset = self.offset(session).await?;
        if let Some(start) = expected_start {
            if start != offset {
                return Err(RegistryError::RangeNotSatisfiable {
                    offset,
                    got: start,
                    location: location.to_string(),
                    upload_id: session.id.clone(),
                });
            }
        }
        let function = session
            .slot
            .as_ref()
            .map_or(DigestFunction::Sha256, |w| w.function);
        let writer = self.writer(session, function).await?;
        while let Some(chunk) = body.next().await? {
            writer.write(chunk).await?;
        }
        let offset = writer.bytes_written();
        if let Some(mut record) = self.record(&session.id).await? {
            record.offset = offset;
            record.updated_at_ms = self.clock.now_millis();
            self.save(&session.id, &record).await?;
        }
        Ok(offset)
    }

    /// Finishes the session: checks the content against `digest` and makes it a blob.
    /// The session ends either way; on a mismatch nothing is stored.
    pub async fn complete(&self, mut session: SessionGuard, digest: ContentHash) -> Result<Digest> {
        self.writer(&mut session, digest.function).await?;
        let open = session.slot.take().expect("writer was just opened");
        let result = open.writer.commit(ExpectedDigest::Hash(digest)).await;
        self.forget(&session.id).await?;
        result.map_err(RegistryError::from_commit)
    }

    /// Cancels the session and discards its bytes.
    pub async fn cancel(&self, mut session: SessionGuard) -> Result<()> {
        let function = session
            .slot
            .as_ref()
            .map_or(DigestFunction::Sha256, |w| w.function);
        self.writer(&mut session, function).await?;
        let open = session.slot.take().expect("writer was just opened");
        let result = open.writer.abort().await;
        self.forget(&session.id).await?;
        Ok(result?)
    }

    async fn forget(&self, id: &str) -> Result<()> {
        self.metadata.remove(UPLOADS, id.as_bytes()).await?;
        self.slots.remove(id);
        Ok(())
    }
}

fn decode_session(bytes: &[u8]) -> Result<SessionRecord> {
    serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Internal(format!("corrupt upload session: {e}")))
}
