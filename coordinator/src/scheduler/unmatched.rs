//! Actions whose platform no connected worker offers. They would wait forever; after a
//! configured wait they are handed back to be failed, naming the platform.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{Platform, QueuedAction, Scheduler};

impl Scheduler {
    /// Removes and returns the queued actions whose platform no connected, undrained
    /// worker has offered for at least `wait` (counted from the first call that found it
    /// unmatched, so a worker leaving starts the clock and one joining stops it).
    pub fn take_unmatched(&mut self, now: Instant, wait: Duration) -> Vec<QueuedAction> {
        let queued: BTreeSet<Platform> = self
            .levels
            .values()
            .flat_map(|level| level.queues.values().flatten())
            .map(|action| action.platform.clone())
            .collect();
        self.unmatched_since
            .retain(|platform, _| queued.contains(platform));
        let mut expired = BTreeSet::new();
        for platform in queued {
            let offered = self
                .workers
                .values()
                .any(|w| !w.draining && w.platform.satisfies(&platform));
            if offered {
                self.unmatched_since.remove(&platform);
                continue;
            }
            let since = *self.unmatched_since.entry(platform.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= wait {
                self.unmatched_since.remove(&platform);
                expired.insert(platform);
            }
        }
        if expired.is_empty() {
            return Vec::new();
        }
        self.remove_queued(|action| expired.contains(&action.platform))
    }

    /// Removes every queued action `remove` picks, keeping the order of the rest.
    fn remove_queued(&mut self, remove: impl Fn(&QueuedAction) -> bool) -> Vec<QueuedAction> {
        let mut removed = Vec::new();
        for level in self.levels.values_mut() {
            for queue in level.queues.values_mut() {
                let (gone, kept): (VecDeque<_>, VecDeque<_>) =
                    std::mem::take(queue).into_iter().partition(|a| remove(a));
                *queue = kept;
                removed.extend(gone);
            }
            level.queues.retain(|_, q| !q.is_empty());
            level.rotation.retain(|inv| level.queues.contains_key(inv));
        }
        self.levels.retain(|_, level| !level.queues.is_empty());
        self.queued -= removed.len();
        removed
    }

    /// The platforms workers offer, as the queue-depth gauge labels them.
    pub fn offered_platforms(&self) -> BTreeSet<String> {
        self.workers
            .values()
            .map(|w| w.platform.to_string())
            .collect()
    }
}

/// The label set of the per-platform queue depth: every platform a worker offers, and the
/// `limit` most-queued platforms of queued work (a client chooses those, so they are
/// capped); the remaining queued work is summed under `(other)`.
pub fn queue_depth_labels(
    offered: BTreeSet<String>,
    mut queued: BTreeMap<String, usize>,
    limit: usize,
) -> HashMap<String, usize> {
    let mut labels: HashMap<String, usize> = offered
        .into_iter()
        .map(|platform| {
            let depth = queued.remove(&platform).unwrap_or(0);
            (platform, depth)
        })
        .collect();
    let mut rest: Vec<(String, usize)> = queued.into_iter().collect();
    rest.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let other: usize = rest.iter().skip(limit).map(|(_, depth)| depth).sum();
    labels.extend(rest.into_iter().take(limit));
    if other > 0 {
        labels.insert("(other)".to_string(), other);
    }
    labels
}
