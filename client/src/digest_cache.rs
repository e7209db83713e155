//! A persistent cache of file digests, so that a second `kiln run` re-hashes only the
//! files that changed.
//!
//! An entry is trusted when the file's path, size, modification time (to the
//! nanosecond) and inode all match what was recorded, and the digest function is the
//! same. Files modified within [`RACY_WINDOW`] of the moment they were hashed are not
//! recorded: on a filesystem with coarse timestamps a second write in that window could
//! keep size and mtime unchanged (git calls these "racily clean" entries).
//!
//! The cache is one compact binary file, read whole at start and replaced atomically
//! (temp file, rename) at the end. It holds only the entries seen by the last run, so
//! deleted files drop out. A missing, truncated or foreign file is an empty cache, never
//! an error: the cache can only save work, never change a digest.
//!
//! Record layout after the 8-byte magic, all integers little-endian:
//! `u32 path_len, path (UTF-8, relative, '/'-separated), u64 size, i64 mtime_secs,
//! u32 mtime_nanos, u64 inode, u8 digest_function (REAPI value), [u8; 32] hash`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_store::{Digest, DigestFunction};

const MAGIC: &[u8; 8] = b"KILNDC1\n";

/// Files modified this close to the start of hashing are hashed but not cached.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    pub inode: u64,
}

impl FileStamp {
    pub fn of(metadata: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            size: metadata.len(),
            mtime_secs: metadata.mtime(),
            mtime_nanos: metadata.mtime_nsec() as u32,
            inode: metadata.ino(),
        }
    }

    fn modified(&self) -> Option<SystemTime> {
        let since_epoch = Duration::new(self.mtime_secs.try_into().ok()?, self.mtime_nanos);
        UNIX_EPOCH.checked_add(since_epoch)
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    stamp: FileStamp,
    digest: Digest,
}

/// The cache as loaded, plus the entries recorded during this run.
pub struct DigestCache {
    path: PathBuf,
    previous: HashMap<String, Entry>,
    current: HashMap<String, Entry>,
    started: SystemTime,
}

impl DigestCache {
    /// Loads the cache file at `path` (an empty cache if it is missing or unreadable).
    pub fn load(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let previous = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).unwrap_or_else(|| {
                tracing::warn!(path = %path.display(), "ignoring an unreadable digest cache");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        };
        DigestCache {
            path,
            previous,
            current: HashMap::new(),
            started: SystemTime::now(),
        }
    }

    /// An empty cache that is never saved anywhere useful; for callers that opt out.
    pub fn disabled() -> Self {
        DigestCache {
            path: PathBuf::new(),
            previous: HashMap::new(),
            current: HashMap::new(),
            started: SystemTime::now(),
        }
    }

    /// The recorded digest of `path`, if its stamp still matches. A hit is carried over
    /// into the next saved cache.
    pub fn lookup(
        &mut self,
        path: &str,
        stamp: FileStamp,
        function: DigestFunction,
    ) -> Option<Digest> {
        let entry = self.previous.get(path)?;
        if entry.stamp != stamp || entry.digest.function != function {
            return None;
        }
        let entry = *entry;
        self.current.insert(path.to_string(), entry);
        Some(entry.digest)
    }

    /// Records a freshly computed digest, unless the file changed too recently to trust
    /// its stamp next time.
    pub fn record(&mut self, path: &str, stamp: FileStamp, digest: Digest) {
        let trusted = stamp
            .modified()
            .is_some_and(|modified| modified + RACY_WINDOW <= self.started);
        if trusted {
            self.current
                .insert(path.to_string(), Entry { stamp, digest });
        }
    }

    /// Replaces the cache file with this run's entries (temp file, then rename).
    pub fn save(&self) -> std::io::Result<()> {
        if self.path.as_os_str().is_empty() {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        {
            let mut out = std::io::BufWriter::new(file.as_file_mut());
            out.write_all(&encode(&self.current))?;
            out.flush()?;
        }
        file.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn encode(entries: &HashMap<String, Entry>) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + entries.len() * 96);
    out.extend_from_slice(MAGIC);
    for (path, entry) in entries {
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(&entry.stamp.size.to_le_bytes());
        out.extend_from_slice(&entry.stamp.mtime_secs.to_le_bytes());
        out.extend_from_slice(&entry.stamp.mtime_nanos.to_le_bytes());
        out.extend_from_slice(&entry.stamp.inode.to_le_bytes());
        out.push(entry.digest.function.reapi_value() as u8);
        out.extend_from_slice(&entry.digest.hash);
    }
    out
}

fn decode(bytes: &[u8]) -> Option<HashMap<String, Entry>> {
    let mut input = bytes.strip_prefix(MAGIC.as_slice())?;
    let mut entries = HashMap::new();
    while !input.is_empty() {
        let path_len = u32::from_le_bytes(take(&mut input)?) as usize;
        let path = std::str::from_utf8(input.get(..path_len)?)
            .ok()?
            .to_string();
        input = &input[path_len..];
        let size = u64::from_le_bytes(take(&mut input)?);
        let mtime_secs = i64::from_le_bytes(take(&mut input)?);
        let mtime_nanos = u32::from_le_bytes(take(&mut input)?);
        let inode = u64::from_le_bytes(take(&mut input)?);
        let [function] = take::<1>(&mut input)?;
        let function = DigestFunction::from_reapi_value(i32::from(function)).ok()?;
        let hash: [u8; 32] = take(&mut input)?;
        let stamp = FileStamp {
            size,
            mtime_secs,
            mtime_nanos,
            inode,
        };
        let digest = Digest::new(function, hash, size);
        entries.insert(path, Entry { stamp, digest });
    }
    Some(entries)
}

fn take<const N: usize>(input: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = input.split_first_chunk::<N>()?;
    *input = rest;
    Some(*head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old_stamp(size: u64) -> FileStamp {
        FileStamp {
            size,
            mtime_secs: 1_000_000,
            mtime_nanos: 5,
            inode: 42,
        }
    }

    #[test]
    fn entries_survive_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digest-cache");
        let digest = Digest::of_bytes(DigestFunction::Blake3, b"hello");
        let mut cache = DigestCache::load(&path);
        cache.record("src/a.rs", old_stamp(5), digest);
        cache.save().unwrap();

        let mut reloaded = DigestCache::load(&path);
        assert_eq!(
            reloaded.lookup("src/a.rs", old_stamp(5), DigestFunction::Blake3),
            Some(digest)
        );
        // Any change of stamp or function is a miss.
        let mut touched = old_stamp(5);
        touched.mtime_nanos += 1;
        assert_eq!(
            reloaded.lookup("src/a.rs", touched, DigestFunction::Blake3),
            None
        );
        assert_eq!(
            reloaded.lookup("src/a.rs", old_stamp(5), DigestFunction::Sha256),
            None
        );
        assert_eq!(
            reloaded.lookup("src/b.rs", old_stamp(5), DigestFunction::Blake3),
            None
        );
    }

    #[test]
    fn recently_modified_files_are_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digest-cache");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let fresh = FileStamp {
            size: 1,
            mtime_secs: now.as_secs() as i64,
            mtime_nanos: now.subsec_nanos(),
            inode: 7,
        };
        let mut cache = DigestCache::load(&path);
        cache.record(
            "fresh",
            fresh,
            Digest::of_bytes(DigestFunction::Sha256, b"x"),
        );
        cache.save().unwrap();
        let mut reloaded = DigestCache::load(&path);
        assert_eq!(
            reloaded.lookup("fresh", fresh, DigestFunction::Sha256),
            None
        );
    }

    #[test]
    fn a_corrupt_file_is_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digest-cache");
        let digest = Digest::of_bytes(DigestFunction::Sha256, b"x");
        let mut cache = DigestCache::load(&path);
        cache.record("a", old_stamp(1), digest);
        cache.save().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        let mut reloaded = DigestCache::load(&path);
        assert_eq!(
            reloaded.lookup("a", old_stamp(1), DigestFunction::Sha256),
            None
        );
        std::fs::write(&path, b"garbage").unwrap();
        let mut reloaded = DigestCache::load(&path);
        assert_eq!(
            reloaded.lookup("a", old_stamp(1), DigestFunction::Sha256),
            None
        );
    }
}
