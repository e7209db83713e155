//! Leader election through the metadata store: one lease record that the leader renews
//! and the others watch.
//!
//! The record names the holder, the address the others forward to, an epoch and a
//! renewal count. Time is never compared across machines: a follower takes over once it
//! has seen the same record, unchanged, for a whole lease term by its own monotonic
//! clock, and the leader trusts its lease only for three quarters of a term from the
//! moment it *started* its last successful renewal. Since a follower's term starts after
//! it read that renewal, which committed after the leader started it, the leader's trust
//! always ends before any follower may take over, clock drift aside (hence the quarter).
//!
//! Taking over writes the lease and a separate `epoch` key in one conditional batch; the
//! epoch is the fencing token. The leader's operation writes expect it unchanged, and its
//! Assigns carry it, so a deposed leader that wakes up can neither record nor hand out
//! work (see `docs/ARCHITECTURE.md`, "A farm of coordinators").

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_store::{Keyspace, MetadataError, MetadataStore, WriteBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::counters::names;

/// The farm's shared records: the lease and the fencing epoch.
pub(crate) const FARM: Keyspace = Keyspace("farm");
const LEASE_KEY: &[u8] = b"leader";
pub(crate) const EPOCH_KEY: &[u8] = b"epoch";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseRecord {
    /// The replica holding the lease (unique per process).
    holder: String,
    /// Where the others forward Execution, Operations and worker streams.
    address: String,
    epoch: u64,
    /// Bumped by every renewal, so that followers see the leader is alive.
    renewals: u64,
}

/// What this replica is in the farm right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// No lease read yet, or this replica lost its lease and has not read the new one.
    #[default]
    Unknown,
    Leader {
        epoch: u64,
    },
    Follower {
        epoch: u64,
        address: String,
    },
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Unknown => f.write_str("no leader known (an election is under way)"),
            Role::Leader { epoch } => write!(f, "the farm's leader (epoch {epoch})"),
            Role::Follower { epoch, address } => {
                write!(f, "a follower of the leader at {address} (epoch {epoch})")
            }
        }
    }
}

/// A replica's standing in the farm, as its `/readyz` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    pub role: Role,
    /// Whether an election round has reached the metadata store since this replica
    /// started. Until one has, it knows neither its role nor where the leader is.
    pub joined: bool,
    /// Whether a whole lease term has passed without a round reaching the metadata store.
    /// Every replica shares that store, so an outage of it is everyone's at once.
    pub store_unreachable: bool,
}

/// The leader's hold on its lease, shared with its execution engine, which checks it
/// before every assignment.
#[derive(Debug)]
pub(crate) struct Tenure {
    pub(crate) epoch: u64,
    valid_until: Mutex<Instant>,
}

impl Tenure {
    fn new(epoch: u64, valid_until: Instant) -> Arc<Self> {
        Arc::new(Tenure {
            epoch,
            valid_until: Mutex::new(valid_until),
        })
    }

    /// Whether this replica may still act as the leader.
    pub(crate) fn holds(&self, now: Instant) -> bool {
        now < *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn extend(&self, until: Instant) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    /// The fencing token as stored under [`EPOCH_KEY`].
    pub(crate) fn epoch_bytes(&self) -> Vec<u8> {
        self.epoch.to_be_bytes().to_vec()
    }
}

/// One replica's side of the election. [`Election::step`] is one round; [`Election::run`]
/// repeats it.
pub(crate) struct Election {
    metadata: Arc<dyn MetadataStore>,
    replica: String,
    address: String,
    term: Duration,
    role: watch::Sender<Role>,
    tenure: Option<Arc<Tenure>>,
    /// The last lease record read, and when this replica first saw it as it is.
    observed: Option<(Vec<u8>, Instant)>,
}

impl Election {
    pub(crate) fn new(
        metadata: Arc<dyn MetadataStore>,
        address: String,
        term: Duration,
    ) -> (Self, watch::Receiver<Role>) {
        let (role, watching) = watch::channel(Role::Unknown);
        let election = Election {
            metadata,
            replica: uuid::Uuid::new_v4().to_string(),
            address,
            term,
            role,
            tenure: None,
            observed: None,
        };
        (election, watching)
    }

    /// The tenure of the current leadership, while this replica leads.
    #[cfg(test)]
    fn tenure(&self) -> Option<Arc<Tenure>> {
        self.tenure.clone()
    }

    /// Rounds every quarter term until `closing` resolves; then gives the lease up, so
    /// that a replica stopping on purpose hands over at once rather than after a term.
    /// After each round, `standing` says where this replica stands.
    pub(crate) async fn run(
        mut self,
        closing: impl std::future::Future<Output = ()>,
        tenures: watch::Sender<Option<Arc<Tenure>>>,
        standing: watch::Sender<Standing>,
    ) {
        tokio::pin!(closing);
        let mut last_contact: Option<Instant> = None;
        loop {
            let started = Instant::now();
            match self.step(started).await {
                Ok(()) => last_contact = Some(started),
                Err(error) => tracing::warn!(%error, "farm election round failed"),
            }
            // One failed round is a blip; a whole term without one is an outage.
            let unreachable = last_contact.is_none_or(|at| at.elapsed() >= self.term);
            self.report(&standing, last_contact.is_some(), unreachable);
            tenures.send_if_modified(|current| {
                let changed = match (current.as_ref(), self.tenure.as_ref()) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                    (None, None) => false,
                    _ => true,
                };
                if changed {
                    *current = self.tenure.clone();
                }
                changed
            });
            tokio::select! {
                _ = &mut closing => break,
                _ = tokio::time::sleep(self.term / 4) => {}
            }
        }
        self.resign().await;
    }

    /// One round: renew, watch or take over.
    pub(crate) async fn step(&mut self, now: Instant) -> Result<(), MetadataError> {
        // A round that cannot finish within a quarter term is a failed round: the leader's
        // tenure then runs out on its own.
        let read = tokio::time::timeout(self.term / 4, self.metadata.get(FARM, LEASE_KEY)).await;
        let current = match read {
            Ok(Ok(current)) => current,
            Ok(Err(e)) => {
                self.lapse_if_expired(now);
                return Err(e);
            }
            Err(_) => {
                self.lapse_if_expired(now);
                return Err(MetadataError::Unavailable(
                    "reading the farm's lease timed out".into(),
                ));
            }
        };
        let Some(bytes) = current else {
            let epoch = self.last_epoch().await? + 1;
            return self.take_over(None, epoch, now).await;
        };
        let record: LeaseRecord = serde_json::from_slice(&bytes)
            .map_err(|e| MetadataError::Backend(format!("the farm's lease record: {e}")))?;
        let mine = self.tenure.as_ref().map(|t| t.epoch);
        if record.holder == self.replica && Some(record.epoch) == mine {
            return self.renew(bytes, record, now).await;
        }
        if mine.is_some() {
            tracing::warn!(epoch = record.epoch, leader = %record.address, "lost the farm's lease");
            self.tenure = None;
        }
        let unchanged_since = match &self.observed {
            Some((seen, since)) if *seen == bytes => *since,
            _ => {
                self.observed = Some((bytes.clone(), now));
                now
            }
        };
        if now.duration_since(unchanged_since) >= self.term {
            tracing::warn!(
                epoch = record.epoch,
                leader = %record.address,
                "the farm's leader has not renewed its lease for a term; taking over"
            );
            return self.take_over(Some(bytes), record.epoch + 1, now).await;
        }
        self.role.send_if_modified(|role| {
            let follower = Role::Follower {
                epoch: record.epoch,
                address: record.address.clone(),
            };
            let changed = *role != follower;
            *role = follower;
            changed
        });
        Ok(())
    }

    async fn renew(
        &mut self,
        bytes: Vec<u8>,
        record: LeaseRecord,
        started: Instant,
    ) -> Result<(), MetadataError> {
        let renewed = LeaseRecord {
            renewals: record.renewals + 1,
            ..record
        };
        let mut batch = WriteBatch::new();
        batch.expect(FARM, LEASE_KEY, Some(bytes));
        batch.put(FARM, LEASE_KEY, encode(&renewed));
        match self.apply(batch).await {
            Ok(()) => {
                if let Some(tenure) = &self.tenure {
                    tenure.extend(started + self.trusted_term());
                }
                Ok(())
            }
            Err(MetadataError::Conflict { .. }) => {
                tracing::warn!("the farm's lease changed hands during a renewal; stepping down");
                self.step_down();
                Ok(())
            }
            Err(e) => {
                self.lapse_if_expired(Instant::now());
                Err(e)
            }
        }
    }

    async fn take_over(
        &mut self,
        expected: Option<Vec<u8>>,
        epoch: u64,
        started: Instant,
    ) -> Result<(), MetadataError> {
        let record = LeaseRecord {
            holder: self.replica.clone(),
            address: self.address.clone(),
            epoch,
            renewals: 0,
        };
        let mut batch = WriteBatch::new();
        batch.expect(FARM, LEASE_KEY, expected);
        batch.put(FARM, LEASE_KEY, encode(&record));
        batch.put(FARM, EPOCH_KEY, epoch.to_be_bytes().to_vec());
        match self.apply(batch).await {
            Ok(()) => {
                tracing::info!(epoch, address = %self.address, "this replica leads the farm");
                self.tenure = Some(Tenure::new(epoch, started + self.trusted_term()));
                self.observed = None;
                self.role.send_replace(Role::Leader { epoch });
                Ok(())
            }
            // Another replica got there first; the next round follows it.
            Err(MetadataError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up by deleting it, if it is still this replica's.
    async fn resign(&mut self) {
        let Some(tenure) = self.tenure.take() else {
            return;
        };
        tenure.extend(Instant::now());
        let Ok(Some(bytes)) = self.metadata.get(FARM, LEASE_KEY).await else {
            return;
        };
        let ours = serde_json::from_slice::<LeaseRecord>(&bytes)
            .is_ok_and(|r| r.holder == self.replica && r.epoch == tenure.epoch);
        if ours {
            let mut batch = WriteBatch::new();
            batch.expect(FARM, LEASE_KEY, Some(bytes));
            batch.delete(FARM, LEASE_KEY);
            let _ = self.apply(batch).await;
        }
    }

    async fn apply(&self, batch: WriteBatch) -> Result<(), MetadataError> {
        match tokio::time::timeout(self.term / 4, self.metadata.apply(batch)).await {
            Ok(result) => result,
            Err(_) => Err(MetadataError::Unavailable(
                "writing the farm's lease timed out".into(),
            )),
        }
    }

    /// Publishes this replica's standing, and the role gauges `/metrics` shows.
    fn report(&self, standing: &watch::Sender<Standing>, joined: bool, store_unreachable: bool) {
        let role = self.role.borrow().clone();
        let (leading, epoch) = match &role {
            Role::Leader { epoch } => (1.0, *epoch),
            Role::Follower { epoch, .. } => (0.0, *epoch),
            Role::Unknown => (0.0, 0),
        };
        metrics::gauge!(names::FARM_LEADER).set(leading);
        if epoch > 0 {
            metrics::gauge!(names::FARM_EPOCH).set(epoch as f64);
        }
        standing.send_if_modified(|current| {
            let now = Standing {
                role,
                joined,
                store_unreachable,
            };
            let changed = *current != now;
            *current = now;
            changed
        });
    }

    async fn last_epoch(&self) -> Result<u64, MetadataError> {
        // Bounded like every other read of a round.
        let read = tokio::time::timeout(self.term / 4, self.metadata.get(FARM, EPOCH_KEY));
        let stored = read.await.map_err(|_| {
            MetadataError::Unavailable("reading the farm's epoch timed out".into())
        })??;
        Ok(stored
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Three quarters of a term: the margin covers clocks that run at slightly
    /// different rates on different machines.
    fn trusted_term(&self) -> Duration {
        self.term * 3 / 4
    }

    fn lapse_if_expired(&mut self, now: Instant) {
        if self.tenure.as_ref().is_some_and(|t| !t.holds(now)) {
            tracing::warn!("the farm's lease could not be renewed in time; stepping down");
            self.step_down();
        }
    }

    fn step_down(&mut self) {
        if let Some(tenure) = self.tenure.take() {
            tenure.extend(Instant::now());
        }
        self.observed = None;
        self.role.send_replace(Role::Unknown);
    }
}

fn encode(record: &LeaseRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("lease records serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_store::MemoryMetadataStore;

    const TERM: Duration = Duration::from_secs(4);

    fn replica(store: &Arc<dyn MetadataStore>, address: &str) -> (Election, watch::Receiver<Role>) {
        Election::new(store.clone(), address.into(), TERM)
    }

    #[tokio::test]
    async fn the_first_replica_leads_and_the_second_follows_it() {
        let store: Arc<dyn MetadataStore> = Arc::new(MemoryMetadataStore::new());
        let (mut a, a_role) = replica(&store, "http://a");
        let (mut b, b_role) = replica(&store, "http://b");
        let now = Instant::now();
        a.step(now).await.unwrap();
        b.step(now).await.unwrap();
        assert_eq!(*a_role.borrow(), Role::Leader { epoch: 1 });
        assert_eq!(
            *b_role.borrow(),
            Role::Follower {
                epoch: 1,
                address: "http://a".into()
            }
        );
        assert!(a.tenure().unwrap().holds(now));
        assert!(!a.tenure().unwrap().holds(now + TERM * 3 / 4));
        assert!(b.tenure().is_none());
    }

    #[tokio::test]
    async fn a_follower_takes_over_only_after_a_whole_term_without_renewal() {
        let store: Arc<dyn MetadataStore> = Arc::new(MemoryMetadataStore::new());
        let (mut a, _) = replica(&store, "http://a");
        let (mut b, b_role) = replica(&store, "http://b");
        let start = Instant::now();
        a.step(start).await.unwrap();
        b.step(start).await.unwrap();
        // The leader renews: the follower's clock starts again.
        a.step(start + TERM / 2).await.unwrap();
        b.step(start + TERM / 2).await.unwrap();
        b.step(start + TERM).await.unwrap();
        assert!(matches!(*b_role.borrow(), Role::Follower { epoch: 1, .. }));
        // No renewal for a whole term after the follower saw the last one.
        b.step(start + TERM / 2 + TERM).await.unwrap();
        assert_eq!(*b_role.borrow(), Role::Leader { epoch: 2 });
        // The old leader's next round finds the lease gone to the new epoch.
        a.step(start + TERM * 2).await.unwrap();
        assert!(a.tenure().is_none());
        let stored = store.get(FARM, EPOCH_KEY).await.unwrap().unwrap();
        assert_eq!(stored, 2u64.to_be_bytes().to_vec());
    }

    #[tokio::test]
    async fn a_resigning_leader_hands_over_without_waiting_a_term() {
        let store: Arc<dyn MetadataStore> = Arc::new(MemoryMetadataStore::new());
        let (mut a, _) = replica(&store, "http://a");
        let (mut b, b_role) = replica(&store, "http://b");
        let now = Instant::now();
        a.step(now).await.unwrap();
        b.step(now).await.unwrap();
        let tenure = a.tenure().unwrap();
        a.resign().await;
        assert!(!tenure.holds(Instant::now()));
        b.step(now).await.unwrap();
        // The epoch goes on from the last one, never back to 1.
        assert_eq!(*b_role.borrow(), Role::Leader { epoch: 2 });
    }
}
