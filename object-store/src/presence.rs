//! What this process knows to be in the bucket, so that FindMissingBlobs for thousands of
//! digests costs no request at all.
//!
//! An entry is trusted only for `ttl` after the bucket last confirmed it (a write or read
//! of the blob here, or a periodic listing). Past that, or for a blob never seen, the
//! answer is "missing": the client uploads again, which is harmless. The index is never
//! wrong the other way by more than `ttl`: a blob another replica deletes is believed
//! present here at most that long, and eviction by age only removes blobs unused for far
//! longer than `ttl` (a blob reported present is also touched, so it is not evicted then).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use kiln_store::{ContentHash, Digest};

pub(crate) struct PresenceIndex {
    entries: DashMap<ContentHash, Entry>,
    ttl: Duration,
    /// Bytes of the indexed blobs, for `stored_bytes` without a listing.
    bytes: AtomicU64,
}

#[derive(Clone, Copy)]
struct Entry {
    size: u64,
    confirmed: Instant,
}

impl PresenceIndex {
    pub fn new(ttl: Duration) -> Self {
        PresenceIndex {
            entries: DashMap::new(),
            ttl,
            bytes: AtomicU64::new(0),
        }
    }

    /// The bucket holds `hash` with `size` bytes as of `at`.
    pub fn confirm_at(&self, hash: ContentHash, size: u64, at: Instant) {
        let previous = self.entries.insert(
            hash,
            Entry {
                size,
                confirmed: at,
            },
        );
        match previous {
            Some(old) => {
                self.bytes.fetch_sub(old.size, Ordering::Relaxed);
                self.bytes.fetch_add(size, Ordering::Relaxed);
                // A listing that started before a newer confirmation must not age it.
                if old.confirmed > at {
                    if let Some(mut entry) = self.entries.get_mut(&hash) {
                        entry.confirmed = old.confirmed;
                    }
                }
            }
            None => {
                self.bytes.fetch_add(size, Ordering::Relaxed);
            }
        }
    }

    pub fn confirm(&self, hash: ContentHash, size: u64) {
        self.confirm_at(hash, size, Instant::now());
    }

    pub fn forget(&self, hash: &ContentHash) {
        if let Some((_, old)) = self.entries.remove(hash) {
            self.bytes.fetch_sub(old.size, Ordering::Relaxed);
        }
    }

    /// The size of `hash` if it was confirmed within the TTL.
    pub fn fresh_size(&self, hash: &ContentHash) -> Option<u64> {
        let entry = *self.entries.get(hash)?;
        (entry.confirmed.elapsed() < self.ttl).then_some(entry.size)
    }

    pub fn has(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || self.fresh_size(&digest.content_hash()) == Some(digest.size)
    }

    /// Drops entries a listing that started at `listing_started` did not see and that no
    /// one confirmed since: the blob is gone (another replica deleted it).
    pub fn forget_unconfirmed_since(&self, listing_started: Instant) {
        let mut gone = Vec::new();
        self.entries.retain(|_, entry| {
            let keep = entry.confirmed >= listing_started;
            if !keep {
                gone.push(entry.size);
            }
            keep
        });
        self.bytes
            .fetch_sub(gone.into_iter().sum::<u64>(), Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_store::DigestFunction;

    fn digest(data: &[u8]) -> Digest {
        Digest::of_bytes(DigestFunction::Sha256, data)
    }

    #[test]
    fn entries_are_trusted_for_the_ttl_and_by_size() {
        let index = PresenceIndex::new(Duration::from_secs(60));
        let a = digest(b"a");
        assert!(!index.has(&a), "never seen is missing");
        index.confirm(a.content_hash(), a.size);
        assert!(index.has(&a));
        assert!(
            !index.has(&a.content_hash().with_size(2)),
            "the size must match"
        );
        assert_eq!(index.bytes(), 1);

        let old = Instant::now() - Duration::from_secs(61);
        let b = digest(b"bb");
        index.confirm_at(b.content_hash(), b.size, old);
        assert!(!index.has(&b), "stale entries read as missing");
        assert!(index.has(&DigestFunction::Sha256.empty_digest()));
    }

    #[test]
    fn a_listing_forgets_what_it_did_not_see() {
        let index = PresenceIndex::new(Duration::from_secs(60));
        let (a, b) = (digest(b"a"), digest(b"bb"));
        index.confirm(a.content_hash(), a.size);
        let listing_started = Instant::now() + Duration::from_millis(1);
        // The listing sees b only; a was deleted elsewhere.
        index.confirm_at(b.content_hash(), b.size, listing_started);
        index.forget_unconfirmed_since(listing_started);
        assert!(!index.has(&a));
        assert!(index.has(&b));
        assert_eq!(index.bytes(), 2);
        // An older confirmation never ages a newer one.
        index.confirm_at(
            b.content_hash(),
            b.size,
            listing_started - Duration::from_secs(120),
        );
        assert!(index.has(&b));
    }
}
