//! The registry's records in the metadata store: repositories, tags, manifest records,
//! the referrers index, which blobs each repository may serve, and which blobs the
//! registry itself wrote (the only ones its garbage collector may delete).
//!
//! Keys are `<repository>\0<item>`: repository names cannot contain NUL, and the prefix
//! `<repository>\0` scans one repository in key order (tags come out sorted). Digests in
//! records are typed ([`ContentHash`], stored as `"sha256:<hex>"`); a record that does
//! not parse is an error, never skipped.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use kiln_store::{
    scan_stream, scan_stream_after, ContentHash, Keyspace, MetadataError, MetadataStore, WriteBatch,
};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::error::{RegistryError, Result};

/// Repository name → the time it was created (milliseconds since the epoch).
pub const REPOSITORIES: Keyspace = Keyspace("registry.repositories");
/// `<repo>\0<tag>` → [`TagRecord`].
pub const TAGS: Keyspace = Keyspace("registry.tags");
/// `<repo>\0<manifest digest>` → [`ManifestRecord`].
pub const MANIFESTS: Keyspace = Keyspace("registry.manifests");
/// `<repo>\0<subject digest>\0<referrer digest>` → empty.
pub const REFERRERS: Keyspace = Keyspace("registry.referrers");
/// `<repo>\0<blob digest>` → when the blob was linked (milliseconds). A repository serves
/// only blobs linked to it, so one repository's credentials do not read another's.
pub const BLOB_LINKS: Keyspace = Keyspace("registry.blob_links");
/// Blob digest → when the registry last wrote or referenced it (milliseconds). Blobs the
/// build farm's CAS wrote are never listed here, so GC never deletes them.
pub const OWNED_BLOBS: Keyspace = Keyspace("registry.owned_blobs");

/// Where a tag points.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: ContentHash,
    /// When the tag was last pushed (milliseconds since the epoch); retention orders by it.
    pub pushed_at_ms: u64,
}

/// What the registry knows about a stored manifest; the bytes are a blob.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestRecord {
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<ContentHash>,
    /// Config and layer digests.
    #[serde(default)]
    pub blobs: Vec<ContentHash>,
    /// Child manifest digests of an index.
    #[serde(default)]
    pub children: Vec<ContentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    pub pushed_at_ms: u64,
}

/// Wall-clock seconds, for token expiry (see [`crate::clock`]).
pub fn now_secs() -> u64 {
    crate::clock::wall_clock_millis() / 1000
}

fn key(repository: &str, item: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(repository.len() + 1 + item.len());
    key.extend_from_slice(repository.as_bytes());
    key.push(0);
    key.extend_from_slice(item.as_bytes());
    key
}

fn prefix(repository: &str) -> Vec<u8> {
    key(repository, "")
}

fn referrer_key(repository: &str, subject: &ContentHash, referrer: &ContentHash) -> Vec<u8> {
    key(repository, &format!("{subject}\0{referrer}"))
}

/// The part of a key after `<repository>\0`.
fn item_of(key: &[u8]) -> String {
    let start = key.iter().position(|b| *b == 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&key[start..]).into_owned()
}

/// The repository part of a key.
fn repository_of(key: &[u8]) -> String {
    let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    String::from_utf8_lossy(&key[..end]).into_owned()
}

fn corrupt(what: impl std::fmt::Display) -> RegistryError {
    RegistryError::Internal(format!("corrupt registry record: {what}"))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(corrupt)
}

/// A digest kept as a key's text.
fn parse_hash(text: &str) -> Result<ContentHash> {
    ContentHash::parse_oci(text).map_err(|e| corrupt(format!("{text:?}: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("registry records always serialise")
}

fn millis_value(millis: u64) -> [u8; 8] {
    millis.to_be_bytes()
}

fn value_millis(bytes: &[u8]) -> u64 {
    bytes.try_into().map_or(0, u64::from_be_bytes)
}

/// A blob link, as GC visits them.
pub struct BlobLink {
    pub repository: String,
    pub hash: ContentHash,
}

/// A manifest PUT, written as one atomic batch: the repository (if new), the manifest's
/// link and record, its referrer entry, and its tag.
pub struct ManifestPut<'a> {
    pub repository: &'a str,
    pub digest: ContentHash,
    pub record: &'a ManifestRecord,
    /// The tag to point at it, and whether a tag pointing elsewhere may not move.
    pub tag: Option<(&'a str, bool)>,
}

/// Typed access to the registry's keyspaces.
#[derive(Clone)]
pub struct RepositoryIndex {
    store: Arc<dyn MetadataStore>,
    /// Record timestamps are its milliseconds, so pushes within one second still order.
    clock: Arc<dyn Clock>,
}

impl RepositoryIndex {
    pub fn new(store: Arc<dyn MetadataStore>, clock: Arc<dyn Clock>) -> Self {
        RepositoryIndex { store, clock }
    }

    fn now_millis(&self) -> u64 {
        self.clock.now_millis()
    }

    pub async fn flush(&self) -> Result<()> {
        Ok(self.store.flush().await?)
    }

    /// Adds the repository's creation to `batch` unless it exists (and expects it still
    /// not to, so that two first pushes do not both create it).
    fn create_repository_if_new(&self, batch: &mut WriteBatch, exists: bool, repository: &str) {
        if !exists {
            batch.expect(REPOSITORIES, repository.as_bytes(), None);
            batch.put(
                REPOSITORIES,
                repository.as_bytes(),
                millis_value(self.now_millis()),
            );
        }
    }

    pub async fn ensure_repository(&self, repository: &str) -> Result<()> {
        let _ = self
            .store
            .compare_and_swap(
                REPOSITORIES,
                repository.as_bytes(),
                None,
                Some(&millis_value(self.now_millis())),
            )
            .await?;
        Ok(())
    }

    pub async fn repository_exists(&self, repository: &str) -> Result<bool> {
        Ok(self
            .store
            .get(REPOSITORIES, repository.as_bytes())
            .await?
            .is_some())
    }

    /// Fails with NAME_UNKNOWN unless the repository exists.
    pub async fn require_repository(&self, repository: &str) -> Result<()> {
        if self.repository_exists(repository).await? {
            Ok(())
        } else {
            Err(RegistryError::NameUnknown(repository.to_string()))
        }
    }

    /// Repository names in order, after `last`; at most `limit`.
    pub async fn repositories(&self, last: Option<&str>, limit: usize) -> Result<Vec<String>> {
        let after = last.map(|l| l.as_bytes().to_vec());
        Ok(
            scan_stream_after(self.store.clone(), REPOSITORIES, Vec::new(), after)
                .map_ok(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                .take(limit)
                .try_collect()
                .await?,
        )
    }

    // Blob links and ownership.

    pub async fn link_blob(&self, repository: &str, hash: &ContentHash) -> Result<()> {
        self.store
            .insert(
                BLOB_LINKS,
                &key(repository, &hash.oci()),
                &millis_value(self.now_millis()),
            )
            .await?;
        Ok(())
    }

    /// Whether `repository` may serve the blob. The empty blob is everywhere.
    pub async fn is_linked(&self, repository: &str, hash: &ContentHash) -> Result<bool> {
        Ok(hash.is_empty_blob()
            || self
                .store
                .get(BLOB_LINKS, &key(repository, &hash.oci()))
                .await?
                .is_some())
    }

    pub async fn unlink_blob(&self, repository: &str, hash: &ContentHash) -> Result<bool> {
        Ok(self
            .store
            .remove(BLOB_LINKS, &key(repository, &hash.oci()))
            .await?
            .is_some())
    }

    /// Every blob link, a page at a time.
    pub fn blob_links(&self) -> BoxStream<'static, Result<BlobLink>> {
        scan_stream(self.store.clone(), BLOB_LINKS, Vec::new())
            .map(|entry| {
                let (k, _) = entry?;
                Ok(BlobLink {
                    repository: repository_of(&k),
                    hash: parse_hash(&item_of(&k))?,
                })
            })
            .boxed()
    }

    /// Records that the registry wrote (or just referenced) a blob, restarting its grace
    /// period.
    pub async fn mark_owned(&self, hash: &ContentHash) -> Result<()> {
        self.store
            .insert(
                OWNED_BLOBS,
                hash.oci().as_bytes(),
                &millis_value(self.now_millis()),
            )
            .await?;
        Ok(())
    }

    /// Restarts the grace period of a blob the registry owns; CAS blobs stay unowned.
    pub async fn refresh_owned(&self, hash: &ContentHash) -> Result<()> {
        if self
            .store
            .get(OWNED_BLOBS, hash.oci().as_bytes())
            .await?
            .is_some()
        {
            self.mark_owned(hash).await?;
        }
        Ok(())
    }

    /// Whether the registry wrote the blob (pushed through the OCI API), as opposed to
    /// the CAS.
    pub async fn owns(&self, hash: &ContentHash) -> Result<bool> {
        Ok(self
            .store
            .get(OWNED_BLOBS, hash.oci().as_bytes())
            .await?
            .is_some())
    }

    /// Every blob the registry owns, with when it was last written or referenced.
    pub fn owned_blobs(&self) -> BoxStream<'static, Result<(ContentHash, u64)>> {
        scan_stream(self.store.clone(), OWNED_BLOBS, Vec::new())
            .map(|entry| {
                let (k, v) = entry?;
                Ok((parse_hash(&String::from_utf8_lossy(&k))?, value_millis(&v)))
            })
            .boxed()
    }

    pub async fn forget_owned(&self, hash: &ContentHash) -> Result<()> {
        self.store
            .remove(OWNED_BLOBS, hash.oci().as_bytes())
            .await?;
        Ok(())
    }

    // Manifests.

    pub async fn manifest(
        &self,
        repository: &str,
        digest: &ContentHash,
    ) -> Result<Option<ManifestRecord>> {
        self.store
            .get(MANIFESTS, &key(repository, &digest.oci()))
            .await?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Stores a pushed manifest: repository, link, record, referrer entry and tag in one
    /// atomic batch. When `tag` is immutable and already points elsewhere, nothing is
    /// written and the result is DENIED; a concurrent change of the tag is retried.
    pub async fn put_manifest(&self, put: ManifestPut<'_>) -> Result<()> {
        let ManifestPut {
            repository,
            digest,
            record,
            tag,
        } = put;
        let digest_text = digest.oci();
        loop {
            let mut batch = WriteBatch::new();
            let exists = self.repository_exists(repository).await?;
            self.create_repository_if_new(&mut batch, exists, repository);
            batch.put(
                BLOB_LINKS,
                key(repository, &digest_text),
                millis_value(self.now_millis()),
            );
            batch.put(MANIFESTS, key(repository, &digest_text), encode(record));
            if let Some(subject) = &record.subject {
                batch.put(
                    REFERRERS,
                    referrer_key(repository, subject, &digest),
                    Vec::new(),
                );
            }
            if let Some((tag, immutable)) = tag {
                let tag_key = key(repository, tag);
                let current = self.store.get(TAGS, &tag_key).await?;
                if let Some(bytes) = &current {
                    let existing: TagRecord = decode(bytes)?;
                    if existing.digest != digest && immutable {
                        return Err(RegistryError::Denied(format!(
                            "tag {tag:?} in {repository} is immutable and already points to {}",
                            existing.digest
                        )));
                    }
                }
                batch.expect(TAGS, tag_key.clone(), current);
                let record = TagRecord {
                    digest,
                    pushed_at_ms: self.now_millis(),
                };
                batch.put(TAGS, tag_key, encode(&record));
            }
            match self.store.apply(batch).await {
                Err(MetadataError::Conflict { .. }) => continue,
                result => return Ok(result?),
            }
        }
    }

    /// Removes a manifest record, its referrer entry and every tag pointing at it, in one
    /// atomic batch. Returns the removed tags, or None when there was no such manifest.
    pub async fn remove_manifest(
        &self,
        repository: &str,
        digest: &ContentHash,
    ) -> Result<Option<Vec<String>>> {
        let manifest_key = key(repository, &digest.oci());
        loop {
            let Some(old) = self.store.get(MANIFESTS, &manifest_key).await? else {
                return Ok(None);
            };
            let record: ManifestRecord = decode(&old)?;
            let mut batch = WriteBatch::new();
            batch.expect(MANIFESTS, manifest_key.clone(), Some(old));
            batch.delete(MANIFESTS, manifest_key.clone());
            if let Some(subject) = &record.subject {
                batch.delete(REFERRERS, referrer_key(repository, subject, digest));
            }
            let mut removed = Vec::new();
            let mut tags = self.all_tags(repository);
            while let Some((tag, tag_record)) = tags.try_next().await? {
                if tag_record.digest == *digest {
                    let tag_key = key(repository, &tag);
                    batch.expect(TAGS, tag_key.clone(), Some(encode(&tag_record)));
                    batch.delete(TAGS, tag_key);
                    removed.push(tag);
                }
            }
            match self.store.apply(batch).await {
                Err(MetadataError::Conflict { .. }) => continue,
                result => {
                    result?;
                    return Ok(Some(removed));
                }
            }
        }
    }

    /// Every manifest of every repository as (repository, digest, record), a page at a
    /// time.
    pub fn all_manifests(
        &self,
    ) -> BoxStream<'static, Result<(String, ContentHash, ManifestRecord)>> {
        scan_stream(self.store.clone(), MANIFESTS, Vec::new())
            .map(|entry| {
                let (k, v) = entry?;
                Ok((repository_of(&k), parse_hash(&item_of(&k))?, decode(&v)?))
            })
            .boxed()
    }

    /// How many manifests and tags `repository` holds, without decoding them.
    pub async fn counts(&self, repository: &str) -> Result<(u64, u64)> {
        let count = |keyspace| async move {
            let mut entries = scan_stream(self.store.clone(), keyspace, prefix(repository));
            let mut count = 0u64;
            while entries.try_next().await?.is_some() {
                count += 1;
            }
            Ok::<_, RegistryError>(count)
        };
        Ok((count(MANIFESTS).await?, count(TAGS).await?))
    }

    /// The manifests of one repository, a page at a time.
    pub fn manifests_of(
        &self,
        repository: &str,
    ) -> BoxStream<'static, Result<(ContentHash, ManifestRecord)>> {
        scan_stream(self.store.clone(), MANIFESTS, prefix(repository))
            .map(|entry| {
                let (k, v) = entry?;
                Ok((parse_hash(&item_of(&k))?, decode(&v)?))
            })
            .boxed()
    }

    /// Digests of the manifests whose subject is `subject`, a page at a time.
    pub fn referrers(
        &self,
        repository: &str,
        subject: &ContentHash,
    ) -> BoxStream<'static, Result<ContentHash>> {
        let prefix = key(repository, &format!("{subject}\0"));
        let skip = prefix.len();
        scan_stream(self.store.clone(), REFERRERS, prefix)
            .map(move |entry| {
                let (k, _) = entry?;
                parse_hash(&String::from_utf8_lossy(&k[skip..]))
            })
            .boxed()
    }

    // Tags.

    pub async fn tag(&self, repository: &str, tag: &str) -> Result<Option<TagRecord>> {
        self.store
            .get(TAGS, &key(repository, tag))
            .await?
            .map(|v| decode(&v))
            .transpose()
    }

    pub async fn remove_tag(&self, repository: &str, tag: &str) -> Result<bool> {
        Ok(self
            .store
            .remove(TAGS, &key(repository, tag))
            .await?
            .is_some())
    }

    /// Tags in lexical order after `last`; at most `limit`.
    pub async fn tags(
        &self,
        repository: &str,
        last: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, TagRecord)>> {
        let after = last.map(|l| key(repository, l));
        scan_stream_after(self.store.clone(), TAGS, prefix(repository), after)
            .take(limit)
            .map(|entry| {
                let (k, v) = entry?;
                Ok((item_of(&k), decode(&v)?))
            })
            .try_collect()
            .await
    }

    /// Every tag of a repository in lexical order, a page at a time.
    pub fn all_tags(&self, repository: &str) -> BoxStream<'static, Result<(String, TagRecord)>> {
        scan_stream(self.store.clone(), TAGS, prefix(repository))
            .map(|entry| {
                let (k, v) = entry?;
                Ok((item_of(&k), decode(&v)?))
            })
            .boxed()
    }
}
