//! The scheduler: which queued action runs on which worker, and when.
//!
//! This is a pure state machine with no I/O and no clock of its own: callers pass `now`
//! and act on what it returns (send an Assign, requeue, fail an operation). That keeps
//! every policy here testable in isolation:
//!
//! - **Priority.** Lower REAPI priority values run first.
//! - **Fairness.** Within a priority, invocations (`tool_invocation_id`) take turns, so
//!   one huge build cannot starve a small one queued behind it.
//! - **Matching.** A worker must satisfy the action's platform ([`Platform::satisfies`]).
//! - **Placement.** Rendezvous hashing of the input root over the eligible workers, so
//!   the same target returns to the worker whose cache is warm; when that worker is full,
//!   the least-loaded eligible worker with a free slot takes it.
//! - **Leases.** A worker that misses heartbeats loses its leases. They are requeued at
//!   the front of their queue until an action has been attempted `max_attempts` times,
//!   after which it fails instead of running forever.

mod platform;
mod unmatched;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use platform::Platform;
pub use unmatched::queue_depth_labels;

pub type WorkerId = String;
pub type LeaseId = String;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// How many times an action may be handed to a worker before it fails.
    pub max_attempts: u32,
    /// A worker silent for this long loses its leases.
    pub heartbeat_timeout: Duration,
    /// How far past the head of an invocation's queue to look for an action that fits a
    /// free worker (actions behind a head that fits nowhere may still fit somewhere).
    pub scan_depth: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_attempts: 3,
            heartbeat_timeout: Duration::from_secs(10),
            scan_depth: 32,
        }
    }
}

/// An action waiting for a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedAction {
    /// The operation name, which identifies the action to the execution layer.
    pub operation: String,
    pub priority: i32,
    /// `tool_invocation_id` from the client's RequestMetadata ("" when absent).
    pub invocation: String,
    pub platform: Platform,
    /// The input root's hash: the rendezvous key for cache affinity.
    pub affinity: [u8; 32],
    /// How many times it has been handed to a worker already.
    pub attempts: u32,
}

/// An action handed to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub lease: LeaseId,
    pub worker: WorkerId,
    pub operation: String,
    /// 1 for the first try.
    pub attempt: u32,
}

/// What became of a lease whose worker went away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostLease {
    /// Back in the queue, to be tried again.
    Requeued { operation: String, attempts: u32 },
    /// Tried `max_attempts` times: the operation must fail.
    GaveUp { operation: String, attempts: u32 },
}

/// What a cancellation found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// It was still queued and is gone now.
    Queued,
    /// It was running: the worker must be told to stop this lease.
    Running {
        worker: WorkerId,
        lease: LeaseId,
    },
    NotFound,
}

/// A worker as the status API shows it.
#[derive(Clone, Debug)]
pub struct WorkerSnapshot {
    pub id: WorkerId,
    pub platform: Platform,
    pub slots: usize,
    pub running: usize,
    pub draining: bool,
    pub since_heartbeat: Duration,
}

struct Worker {
    /// Shared by every worker offering the same platform, so that placement checks each
    /// distinct platform once per action rather than once per worker.
    platform: Arc<Platform>,
    /// The worker's side of its rendezvous score: a hash of its id, made once.
    key: u64,
    slots: usize,
    leases: HashSet<LeaseId>,
    last_heartbeat: Instant,
    draining: bool,
}

impl Worker {
    fn free_slots(&self) -> usize {
        if self.draining {
            0
        } else {
            self.slots.saturating_sub(self.leases.len())
        }
    }
}

struct Lease {
    action: QueuedAction,
    worker: WorkerId,
}

/// One priority's queues, one per invocation, served in rotation.
#[derive(Default)]
struct PriorityLevel {
    rotation: VecDeque<String>,
    queues: HashMap<String, VecDeque<QueuedAction>>,
}

impl PriorityLevel {
    fn push(&mut self, action: QueuedAction, front: bool) {
        let queue = self
            .queues
            .entry(action.invocation.clone())
            .or_insert_with(|| {
                self.rotation.push_back(action.invocation.clone());
                VecDeque::new()
            });
        if front {
            queue.push_front(action);
        } else {
            queue.push_back(action);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }
}

#[derive(Default)]
pub struct Scheduler {
    config: SchedulerConfig,
    workers: HashMap<WorkerId, Worker>,
    levels: BTreeMap<i32, PriorityLevel>,
    leases: HashMap<LeaseId, Lease>,
    queued: usize,
    next_lease: u64,
    /// Platforms of queued work that no worker offers, and since when (see `unmatched`).
    unmatched_since: HashMap<Platform, Instant>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        // Lease ids must not repeat across coordinator restarts, or a stale Result from
        // before the restart could complete a new lease.
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Scheduler {
            config,
            next_lease: epoch,
            ..Default::default()
        }
    }

    /// Adds (or replaces) a worker. A replaced worker's leases are lost.
    pub fn add_worker(
        &mut self,
        id: WorkerId,
        platform: Platform,
        slots: usize,
        now: Instant,
    ) -> Vec<LostLease> {
        let lost = self.remove_worker(&id);
        let platform = match self.workers.values().find(|w| *w.platform == platform) {
            Some(same) => same.platform.clone(),
            None => Arc::new(platform),
        };
        let key = worker_key(&id);
        self.workers.insert(
            id,
            Worker {
                platform,
                key,
                slots,
                leases: HashSet::new(),
                last_heartbeat: now,
                draining: false,
            },
        );
        lost
    }

    /// Removes a worker; its leases are requeued or given up.
    pub fn remove_worker(&mut self, id: &str) -> Vec<LostLease> {
        let Some(worker) = self.workers.remove(id) else {
            return Vec::new();
        };
        let mut leases: Vec<LeaseId> = worker.leases.into_iter().collect();
        leases.sort();
        let actions: Vec<QueuedAction> = leases
            .iter()
            .filter_map(|lease| self.leases.remove(lease))
            .map(|lease| lease.action)
            .collect();
        actions
            .into_iter()
            .map(|action| self.requeue(action))
            .collect()
    }

    pub fn heartbeat(&mut self, id: &str, now: Instant) -> bool {
        match self.workers.get_mut(id) {
            Some(worker) => {
                worker.last_heartbeat = now;
                true
            }
            None => false,
        }
    }

    /// A draining worker finishes what it holds and is given nothing new.
    /// Returns how many leases the worker still holds, or None if it is unknown.
    pub fn drain_worker(&mut self, id: &str) -> Option<usize> {
        let worker = self.workers.get_mut(id)?;
        worker.draining = true;
        Some(worker.leases.len())
    }

    /// Connected workers, and their slots in all.
    pub fn capacity(&self) -> (usize, usize) {
        let slots = self.workers.values().map(|w| w.slots).sum();
        (self.workers.len(), slots)
    }

    /// Removes every worker that has been silent past the heartbeat timeout.
    pub fn expire_silent_workers(&mut self, now: Instant) -> Vec<(WorkerId, Vec<LostLease>)> {
        let timeout = self.config.heartbeat_timeout;
        let mut silent: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_heartbeat) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        silent.sort();
        silent
            .into_iter()
            .map(|id| {
                let lost = self.remove_worker(&id);
                (id, lost)
            })
            .collect()
    }

    pub fn enqueue(&mut self, action: QueuedAction) {
        self.push(action, false);
    }

    fn push(&mut self, action: QueuedAction, front: bool) {
        self.queued += 1;
        self.levels
            .entry(action.priority)
            .or_default()
            .push(action, front);
    }

    fn requeue(&mut self, action: QueuedAction) -> LostLease {
        let operation = action.operation.clone();
        let attempts = action.attempts;
        if attempts >= self.config.max_attempts {
            return LostLease::GaveUp {
                operation,
                attempts,
            };
        }
        // It already waited its turn once.
        self.push(action, true);
        LostLease::Requeued {
            operation,
            attempts,
        }
    }

    /// Hands queued actions to workers with free slots, as far as they go.
    pub fn schedule(&mut self) -> Vec<Assignment> {
        let mut assignments = Vec::new();
        let mut free: usize = self.workers.values().map(Worker::free_slots).sum();
        if free == 0 || self.queued == 0 {
            return assignments;
        }
        let depth = self.config.scan_depth.max(1);
        for level in self.levels.values_mut() {
            while free > 0 {
                let mut placed_in_round = false;
                for _ in 0..level.rotation.len() {
                    let Some(invocation) = level.rotation.pop_front() else {
                        break;
                    };
                    let queue = level
                        .queues
                        .get_mut(&invocation)
                        .expect("rotation and queues agree");
                    let found = queue
                        .iter()
                        .take(depth)
                        .enumerate()
                        .find_map(|(i, action)| {
                            choose_worker(&self.workers, action).map(|w| (i, w))
                        });
                    if let Some((index, worker_id)) = found {
                        let mut action = queue.remove(index).expect("index from iteration");
                        action.attempts += 1;
                        self.next_lease += 1;
                        let lease = format!("lease-{:x}", self.next_lease);
                        let worker = self
                            .workers
                            .get_mut(&worker_id)
                            .expect("chosen worker exists");
                        worker.leases.insert(lease.clone());
                        assignments.push(Assignment {
                            lease: lease.clone(),
                            worker: worker_id.clone(),
                            operation: action.operation.clone(),
                            attempt: action.attempts,
                        });
                        self.leases.insert(
                            lease,
                            Lease {
                                action,
                                worker: worker_id,
                            },
                        );
                        self.queued -= 1;
                        free -= 1;
                        placed_in_round = true;
                    }
                    if queue.is_empty() {
                        level.queues.remove(&invocation);
                    } else {
                        level.rotation.push_back(invocation);
                    }
                    if free == 0 {
                        break;
                    }
                }
                if !placed_in_round {
                    break;
                }
            }
            if free == 0 {
                break;
            }
        }
        self.levels.retain(|_, level| !level.queues.is_empty());
        assignments
    }

    /// A lease finished (with any outcome). Returns the operation it was for, or `None`
    /// for a lease that is no longer current (its worker was given up on meanwhile).
    pub fn complete(&mut self, lease: &str, worker: &str) -> Option<QueuedAction> {
        if self.leases.get(lease)?.worker != worker {
            return None;
        }
        let lease_record = self.leases.remove(lease)?;
        if let Some(w) = self.workers.get_mut(worker) {
            w.leases.remove(lease);
        }
        Some(lease_record.action)
    }

    /// Removes an operation from the queue, or finds the lease that runs it.
    pub fn cancel(&mut self, operation: &str) -> Cancelled {
        for level in self.levels.values_mut() {
            for queue in level.queues.values_mut() {
                if let Some(index) = queue.iter().position(|a| a.operation == operation) {
                    queue.remove(index);
                    self.queued -= 1;
                    level.queues.retain(|_, q| !q.is_empty());
                    level.rotation.retain(|inv| level.queues.contains_key(inv));
                    self.levels.retain(|_, level| !level.queues.is_empty());
                    return Cancelled::Queued;
                }
            }
        }
        let running = self
            .leases
            .iter()
            .find(|(_, l)| l.action.operation == operation)
            .map(|(id, l)| (id.clone(), l.worker.clone()));
        match running {
            Some((lease, worker)) => {
                self.leases.remove(&lease);
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.leases.remove(&lease);
                }
                Cancelled::Running { worker, lease }
            }
            None => Cancelled::NotFound,
        }
    }

    /// Actions waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.queued
    }

    /// Queued actions per required platform (for metrics).
    pub fn queue_depth_by_platform(&self) -> BTreeMap<String, usize> {
        let mut depth = BTreeMap::new();
        for level in self.levels.values() {
            for action in level.queues.values().flatten() {
                *depth.entry(action.platform.to_string()).or_default() += 1;
            }
        }
        depth
    }

    pub fn running(&self) -> usize {
        self.leases.len()
    }

    pub fn workers(&self, now: Instant) -> Vec<WorkerSnapshot> {
        let mut out: Vec<WorkerSnapshot> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerSnapshot {
                id: id.clone(),
                platform: (*w.platform).clone(),
                slots: w.slots,
                running: w.leases.len(),
                draining: w.draining,
                since_heartbeat: now.saturating_duration_since(w.last_heartbeat),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Total queued, by level, for tests and status.
    #[cfg(test)]
    fn level_sizes(&self) -> Vec<(i32, usize)> {
        self.levels.iter().map(|(p, l)| (*p, l.len())).collect()
    }
}

/// The rendezvous score of `worker` for `affinity`: every coordinator computes the same
/// ranking, and adding or removing a worker moves only the keys that worker owned.
fn worker_key(worker: &str) -> u64 {
    let hash = blake3::hash(worker.as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// A worker's rendezvous score for an action: the worker's key and the action's input-root
/// hash, mixed (SplitMix64's finaliser). Placement scores every eligible worker for every
/// action, so this must cost nanoseconds: a cryptographic hash per worker made placement
/// among 1,000 workers cost about 140 µs an action (`loadtests/src/bin/farm-sim.rs`).
fn rendezvous_score(worker_key: u64, affinity: &[u8; 32]) -> u64 {
    let mut z = worker_key ^ u64::from_le_bytes(affinity[..8].try_into().expect("8 bytes"));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Whether each distinct offered platform satisfies one action's, worked out once each.
/// Workers registered alike share one `Arc<Platform>`, so identity is the key.
struct PlatformMatches<'a> {
    required: &'a Platform,
    known: Vec<(&'a Arc<Platform>, bool)>,
}

impl<'a> PlatformMatches<'a> {
    fn new(required: &'a Platform) -> Self {
        PlatformMatches {
            required,
            known: Vec::new(),
        }
    }

    fn satisfied_by(&mut self, offered: &'a Arc<Platform>) -> bool {
        if let Some((_, ok)) = self.known.iter().find(|(p, _)| Arc::ptr_eq(p, offered)) {
            return *ok;
        }
        let ok = offered.satisfies(self.required);
        self.known.push((offered, ok));
        ok
    }
}

/// The worker the action goes to: the eligible one with the highest rendezvous score when
/// it has a free slot (its cache most likely holds the inputs), else the least loaded
/// eligible one with a free slot. One pass over the workers.
fn choose_worker(workers: &HashMap<WorkerId, Worker>, action: &QueuedAction) -> Option<WorkerId> {
    let load = |w: &Worker| w.leases.len() as f64 / w.slots.max(1) as f64;
    let mut matches = PlatformMatches::new(&action.platform);
    let mut preferred: Option<(&WorkerId, &Worker, u64)> = None;
    let mut least_loaded: Option<(&WorkerId, &Worker)> = None;
    for (id, worker) in workers {
        if worker.draining || !matches.satisfied_by(&worker.platform) {
            continue;
        }
        let score = rendezvous_score(worker.key, &action.affinity);
        if preferred.is_none_or(|(best_id, _, best)| (score, id) > (best, best_id)) {
            preferred = Some((id, worker, score));
        }
        let less_loaded = |(other_id, other): (&WorkerId, &Worker)| {
            load(worker)
                .total_cmp(&load(other))
                .then_with(|| id.cmp(other_id))
                .is_lt()
        };
        if worker.free_slots() > 0 && least_loaded.is_none_or(less_loaded) {
            least_loaded = Some((id, worker));
        }
    }
    let (id, worker, _) = preferred?;
    if worker.free_slots() > 0 {
        return Some(id.clone());
    }
    // The warm worker is full: the least loaded (by share of slots in use) takes it.
    least_loaded.map(|(id, _)| id.clone())
}

#[cfg(test)]
mod tests;
