//! The registry's records in the metadata store: repositories, tags, manifest records,
//! the referrers index, which blobs each repository may serve, and which blobs the
//! registry itself wrote (the only ones its garbage collector may delete).
//!
//! Keys are `<repository>\0<item>`: repository names cannot contain NUL, and the prefix
//! `<repository>\0` scans one repository in key order (tags come out sorted).

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_store::{ContentHash, Keyspace, MetadataStore};
use serde::{Deserialize, Serialize};

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
    pub digest: String,
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
    pub subject: Option<String>,
    /// Config and layer digests.
    #[serde(default)]
    pub blobs: Vec<String>,
    /// Child manifest digests of an index.
    #[serde(default)]
    pub children: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    pub pushed_at_ms: u64,
}

pub fn now_secs() -> u64 {
    now_millis() / 1000
}

/// Record timestamps are milliseconds, so pushes within one second still order.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Internal(format!("corrupt registry record: {e}")))
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

/// Typed access to the registry's keyspaces.
#[derive(Clone)]
pub struct RepositoryIndex {
    store: Arc<dyn MetadataStore>,
}

impl RepositoryIndex {
    pub fn new(store: Arc<dyn MetadataStore>) -> Self {
        RepositoryIndex { store }
    }

    pub async fn flush(&self) -> Result<()> {
        Ok(self.store.flush().await?)
    }

    pub fn ensure_repository(&self, repository: &str) -> Result<()> {
        let _ = self.store.compare_and_swap(
            REPOSITORIES,
            repository.as_bytes(),
            None,
            Some(&millis_value(now_millis())),
        )?;
        Ok(())
    }

    pub fn repository_exists(&self, repository: &str) -> Result<bool> {
        Ok(self
            .store
            .get(REPOSITORIES, repository.as_bytes())?
            .is_some())
    }

    /// Fails with NAME_UNKNOWN unless the repository exists.
    pub fn require_repository(&self, repository: &str) -> Result<()> {
        if self.repository_exists(repository)? {
            Ok(())
        } else {
            Err(RegistryError::NameUnknown(repository.to_string()))
        }
    }

    /// Repository names in order, after `last`.
    pub fn repositories(&self, last: Option<&str>, limit: usize) -> Result<Vec<String>> {
        Ok(self
            .store
            .scan(REPOSITORIES, b"", last.map(str::as_bytes), limit)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect())
    }

    // Blob links and ownership.

    pub fn link_blob(&self, repository: &str, hash: &ContentHash) -> Result<()> {
        self.store.insert(
            BLOB_LINKS,
            &key(repository, &hash.oci()),
            &millis_value(now_millis()),
        )?;
        Ok(())
    }

    /// Whether `repository` may serve the blob. The empty blob is everywhere.
    pub fn is_linked(&self, repository: &str, hash: &ContentHash) -> Result<bool> {
        Ok(hash.is_empty_blob()
            || self
                .store
                .get(BLOB_LINKS, &key(repository, &hash.oci()))?
                .is_some())
    }

    pub fn unlink_blob(&self, repository: &str, hash: &ContentHash) -> Result<bool> {
        Ok(self
            .store
            .remove(BLOB_LINKS, &key(repository, &hash.oci()))?
            .is_some())
    }

    /// Every blob link as (repository, digest, linked at in milliseconds).
    pub fn blob_links(&self) -> Result<Vec<(String, String, u64)>> {
        Ok(self
            .store
            .scan(BLOB_LINKS, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| (repository_of(&k), item_of(&k), value_millis(&v)))
            .collect())
    }

    /// Records that the registry wrote (or just referenced) a blob, restarting its grace
    /// period.
    pub fn mark_owned(&self, hash: &ContentHash) -> Result<()> {
        self.store.insert(
            OWNED_BLOBS,
            hash.oci().as_bytes(),
            &millis_value(now_millis()),
        )?;
        Ok(())
    }

    /// Restarts the grace period of a blob the registry owns; CAS blobs stay unowned.
    pub fn refresh_owned(&self, hash: &ContentHash) -> Result<()> {
        if self
            .store
            .get(OWNED_BLOBS, hash.oci().as_bytes())?
            .is_some()
        {
            self.mark_owned(hash)?;
        }
        Ok(())
    }

    pub fn owned_blobs(&self) -> Result<Vec<(String, u64)>> {
        Ok(self
            .store
            .scan(OWNED_BLOBS, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), value_millis(&v)))
            .collect())
    }

    pub fn forget_owned(&self, digest: &str) -> Result<()> {
        self.store.remove(OWNED_BLOBS, digest.as_bytes())?;
        Ok(())
    }

    // Manifests.

    pub fn manifest(&self, repository: &str, digest: &str) -> Result<Option<ManifestRecord>> {
        self.store
            .get(MANIFESTS, &key(repository, digest))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn put_manifest(
        &self,
        repository: &str,
        digest: &str,
        record: &ManifestRecord,
    ) -> Result<()> {
        self.store
            .insert(MANIFESTS, &key(repository, digest), &encode(record))?;
        if let Some(subject) = &record.subject {
            self.store.insert(
                REFERRERS,
                &key(repository, &format!("{subject}\0{digest}")),
                b"",
            )?;
        }
        Ok(())
    }

    /// Removes a manifest record, its referrer entry and every tag pointing at it.
    /// Returns the removed tags.
    pub fn remove_manifest(&self, repository: &str, digest: &str) -> Result<Option<Vec<String>>> {
        let Some(old) = self.store.remove(MANIFESTS, &key(repository, digest))? else {
            return Ok(None);
        };
        let record: ManifestRecord = decode(&old)?;
        if let Some(subject) = &record.subject {
            self.store
                .remove(REFERRERS, &key(repository, &format!("{subject}\0{digest}")))?;
        }
        let mut removed = Vec::new();
        for (tag, tag_record) in self.tags(repository, None, usize::MAX)? {
            if tag_record.digest == digest {
                self.store.remove(TAGS, &key(repository, &tag))?;
                removed.push(tag);
            }
        }
        Ok(Some(removed))
    }

    /// Every manifest of every repository as (repository, digest, record).
    pub fn all_manifests(&self) -> Result<Vec<(String, String, ManifestRecord)>> {
        self.store
            .scan(MANIFESTS, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| Ok((repository_of(&k), item_of(&k), decode(&v)?)))
            .collect()
    }

    /// How many manifests and tags `repository` holds, without decoding them.
    pub fn counts(&self, repository: &str) -> Result<(u64, u64)> {
        let count = |keyspace| -> Result<u64> {
            Ok(self
                .store
                .scan(keyspace, &prefix(repository), None, usize::MAX)?
                .len() as u64)
        };
        Ok((count(MANIFESTS)?, count(TAGS)?))
    }

    pub fn manifests_of(&self, repository: &str) -> Result<Vec<(String, ManifestRecord)>> {
        self.store
            .scan(MANIFESTS, &prefix(repository), None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| Ok((item_of(&k), decode(&v)?)))
            .collect()
    }

    /// Digests of the manifests whose subject is `subject`.
    pub fn referrers(&self, repository: &str, subject: &str) -> Result<Vec<String>> {
        let prefix = key(repository, &format!("{subject}\0"));
        Ok(self
            .store
            .scan(REFERRERS, &prefix, None, usize::MAX)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect())
    }

    // Tags.

    pub fn tag(&self, repository: &str, tag: &str) -> Result<Option<TagRecord>> {
        self.store
            .get(TAGS, &key(repository, tag))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Points `tag` at `digest`. When `immutable`, a tag already pointing elsewhere is
    /// DENIED; the check and the write are one atomic step.
    pub fn set_tag(
        &self,
        repository: &str,
        tag: &str,
        digest: &str,
        immutable: bool,
    ) -> Result<()> {
        let key = key(repository, tag);
        let new = encode(&TagRecord {
            digest: digest.to_string(),
            pushed_at_ms: now_millis(),
        });
        let mut current = self.store.get(TAGS, &key)?;
        loop {
            if let Some(bytes) = &current {
                let existing: TagRecord = decode(bytes)?;
                if existing.digest == digest {
                    return Ok(());
                }
                if immutable {
                    return Err(RegistryError::Denied(format!(
                        "tag {tag:?} in {repository} is immutable and already points to {}",
                        existing.digest
                    )));
                }
            }
            match self
                .store
                .compare_and_swap(TAGS, &key, current.as_deref(), Some(&new))?
            {
                Ok(()) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    pub fn remove_tag(&self, repository: &str, tag: &str) -> Result<bool> {
        Ok(self.store.remove(TAGS, &key(repository, tag))?.is_some())
    }

    /// Tags in lexical order after `last`.
    pub fn tags(
        &self,
        repository: &str,
        last: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, TagRecord)>> {
        let after = last.map(|l| key(repository, l));
        self.store
            .scan(TAGS, &prefix(repository), after.as_deref(), limit)?
            .into_iter()
            .map(|(k, v)| Ok((item_of(&k), decode(&v)?)))
            .collect()
    }
}
