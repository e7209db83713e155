//! The schema, applied at start-up: numbered migrations, run once each, under an advisory
//! lock so that replicas starting together do not race.

use tokio_postgres::Client;

/// Migration `i` brings the schema to version `i + 1`. Append; never edit one released.
const MIGRATIONS: &[&str] = &["CREATE TABLE kiln_metadata (
        keyspace TEXT NOT NULL,
        key BYTEA NOT NULL,
        value BYTEA NOT NULL,
        PRIMARY KEY (keyspace, key)
    )"];

/// The advisory lock key migrations hold ("kiln" in ASCII).
const MIGRATION_LOCK: i64 = 0x6b69_6c6e;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("the database's kiln schema is version {found}, newer than this kiln knows ({known}): upgrade kiln before pointing it at this database")]
    TooNew { found: i32, known: i32 },
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// Brings the schema up to date; returns its version.
pub async fn migrate(client: &mut Client) -> Result<i32, SchemaError> {
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    transaction
        .execute(
            "CREATE TABLE IF NOT EXISTS kiln_schema (version INTEGER NOT NULL)",
            &[],
        )
        .await?;
    let found: i32 = transaction
        .query_one("SELECT COALESCE(MAX(version), 0) FROM kiln_schema", &[])
        .await?
        .get(0);
    let known = MIGRATIONS.len() as i32;
    if found > known {
        return Err(SchemaError::TooNew { found, known });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        transaction.batch_execute(migration).await?;
        tracing::info!(version = index + 1, "applied a metadata schema migration");
    }
    if found < known {
        transaction.execute("DELETE FROM kiln_schema", &[]).await?;
        transaction
            .execute("INSERT INTO kiln_schema (version) VALUES ($1)", &[&known])
            .await?;
    }
    transaction.commit().await?;
    Ok(known)
}
