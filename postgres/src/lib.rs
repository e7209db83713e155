//! kiln-postgres: the [`MetadataStore`](kiln_store::MetadataStore) on PostgreSQL.
//!
//! Every keyspace is rows of one table, `kiln_metadata (keyspace, key, value)`, keyed by
//! both; `bytea` compares bytewise, as sled does, so prefix scans page in the same order.
//! What sled does in one process, PostgreSQL does across replicas:
//! - compare-and-swap is one conditional statement (`INSERT … ON CONFLICT DO NOTHING`
//!   for "absent", `UPDATE`/`DELETE … WHERE value = expected` otherwise), so two replicas
//!   racing on one key never both win;
//! - a [`WriteBatch`](kiln_store::WriteBatch) is one READ COMMITTED transaction that
//!   locks exactly the keys it expects (`FOR UPDATE` a value, or claims an absent key by
//!   inserting it), then writes, so an immutable tag stays immutable under concurrent
//!   pushes anywhere;
//! - a commit is durable when it returns (`synchronous_commit` is PostgreSQL's default),
//!   so `flush` has nothing left to do.
//!
//! The schema is applied at start-up by numbered migrations under an advisory lock, and
//! a database whose schema is newer than this kiln knows is refused.

mod schema;
mod settings;
mod store;

pub use settings::PostgresSettings;
pub use store::PostgresMetadataStore;
