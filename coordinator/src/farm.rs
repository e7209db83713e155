//! Many coordinators as one farm, on shared metadata (PostgreSQL) and a shared blob store.
//!
//! Every replica serves the CAS, the action cache, ByteStream, the registry and the admin
//! API from the shared stores. Scheduling is the leader's alone: one replica at a time,
//! elected through the metadata store (`election`), runs an execution engine; the others
//! send Execution, Operations and worker streams on to it (`forward`). When the leader
//! changes, the new one opens its engine exactly as a restarted coordinator does: it
//! reloads the unfinished operations from the metadata store and queues them again.

mod election;
mod forward;
mod link;

pub(crate) use election::{Election, Tenure, EPOCH_KEY, FARM};
pub use election::{Role, Standing};
pub(crate) use forward::{was_forwarded, Leader};
pub(crate) use link::{LeaderLink, LinkTls};
