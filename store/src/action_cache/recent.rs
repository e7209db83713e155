//! Action-cache entries read a moment ago, kept in memory so that a hot entry costs a
//! shared metadata store (PostgreSQL, a network round trip away) one read per interval
//! rather than one per lookup. Bazel asks for the same few results again and again in a
//! build; sled, in the process, needs no such help but loses nothing by it.
//!
//! Only entries that exist are kept: a result stored on another replica is seen at its
//! first lookup. What another replica replaces or removes may be served for up to the
//! interval: a replaced result was as valid an answer for the action, and the lookup
//! checks every blob a result references before answering with it. What this instance
//! stores or removes is seen at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Entries larger than this are not kept (a result with many outputs); the store
/// answers for them every time.
const LARGEST_KEPT: usize = 64 << 10;

pub(crate) struct RecentEntries {
    fresh_for: Duration,
    max_bytes: usize,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    entries: HashMap<Vec<u8>, (Arc<[u8]>, Instant), foldhash::fast::RandomState>,
    bytes: usize,
}

impl RecentEntries {
    pub(crate) fn new(fresh_for: Duration, max_bytes: usize) -> Self {
        RecentEntries {
            fresh_for,
            max_bytes,
            kept: Mutex::default(),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry under `key`, if it was read or stored within the interval.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let kept = self.kept();
        let (value, read_at) = kept.entries.get(key)?;
        (read_at.elapsed() < self.fresh_for).then(|| value.to_vec())
    }

    pub(crate) fn keep(&self, key: &[u8], value: &[u8]) {
        if value.len() > LARGEST_KEPT {
            return self.forget(key);
        }
        let mut kept = self.kept();
        let size = key.len() + value.len();
        if kept.bytes + size > self.max_bytes {
            // Full: drop what has gone stale; if that is not enough, start over (the
            // store still has everything).
            let fresh_for = self.fresh_for;
            kept.entries
                .retain(|_, (_, read_at)| read_at.elapsed() < fresh_for);
            kept.bytes = kept
                .entries
                .iter()
                .map(|(k, (v, _))| k.len() + v.len())
                .sum();
            if kept.bytes + size > self.max_bytes {
                kept.entries.clear();
                kept.bytes = 0;
            }
        }
        let replaced = kept
            .entries
            .insert(key.to_vec(), (Arc::from(value), Instant::now()));
        kept.bytes += size;
        if let Some((old, _)) = replaced {
            kept.bytes -= key.len() + old.len();
        }
    }

    pub(crate) fn forget(&self, key: &[u8]) {
        let mut kept = self.kept();
        if let Some((old, _)) = kept.entries.remove(key) {
            kept.bytes -= key.len() + old.len();
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.kept().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_served_while_fresh_and_forgotten_on_request() {
        let recent = RecentEntries::new(Duration::from_secs(60), 1 << 20);
        assert_eq!(recent.get(b"a"), None);
        recent.keep(b"a", b"one");
        assert_eq!(recent.get(b"a").as_deref(), Some(&b"one"[..]));
        recent.keep(b"a", b"two");
        assert_eq!(recent.get(b"a").as_deref(), Some(&b"two"[..]));
        assert_eq!(recent.bytes(), 4);
        recent.forget(b"a");
        assert_eq!(recent.get(b"a"), None);
        assert_eq!(recent.bytes(), 0);
    }

    #[test]
    fn a_stale_entry_is_not_served() {
        let recent = RecentEntries::new(Duration::ZERO, 1 << 20);
        recent.keep(b"a", b"one");
        assert_eq!(recent.get(b"a"), None);
    }

    #[test]
    fn the_memory_stays_within_its_bound_and_large_entries_are_not_kept() {
        let recent = RecentEntries::new(Duration::from_secs(60), 1000);
        for n in 0..100u32 {
            recent.keep(&n.to_be_bytes(), &[7; 96]);
            assert!(recent.bytes() <= 1000, "{} bytes after {n}", recent.bytes());
        }
        // The newest entry is always there after a keep.
        assert!(recent.get(&99u32.to_be_bytes()).is_some());
        recent.keep(b"big", &vec![0; LARGEST_KEPT + 1]);
        assert_eq!(recent.get(b"big"), None);
    }
}
