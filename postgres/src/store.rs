//! [`PostgresMetadataStore`]: the trait's operations as SQL on `kiln_metadata`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use kiln_store::MAX_SCAN_PAGE;
use kiln_store::{Entry, Keyspace, MetadataError, MetadataResult, MetadataStore, WriteBatch};
use tokio_postgres::error::SqlState;

use crate::schema;
use crate::settings::{redact_url, PostgresSettings};

/// Attempts of a batch that PostgreSQL aborts for a concurrent one (a deadlock between
/// batches that lock the same keys in another order; retrying is the protocol).
const BATCH_ATTEMPTS: usize = 20;

#[derive(Clone)]
pub struct PostgresMetadataStore {
    pool: Pool,
}

fn backend(what: &str, error: impl std::fmt::Display) -> MetadataError {
    MetadataError::Backend(format!("postgres: {what}: {error}"))
}

/// A driver error as the store's: a lost or refused connection (no SQLSTATE) is
/// `Unavailable`, which clients retry; anything the server answered is `Backend`.
fn failed(what: &str, error: tokio_postgres::Error) -> MetadataError {
    if error.is_closed() || error.code().is_none() {
        MetadataError::Unavailable(format!("postgres: {what}: {error}"))
    } else {
        backend(what, error)
    }
}

/// Whether PostgreSQL aborted a transaction for a concurrent one, which a retry resolves.
fn is_contention(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            | Some(&SqlState::T_R_DEADLOCK_DETECTED)
            | Some(&SqlState::UNIQUE_VIOLATION)
    )
}

/// The smallest byte string above every key that starts with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl PostgresMetadataStore {
    /// Connects a pool, applies the schema's migrations, and checks its version.
    pub async fn connect(settings: &PostgresSettings) -> MetadataResult<Self> {
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| backend(&format!("parsing {}", redact_url(&settings.url)), e))?;
        if let Some(path) = &settings.password_file {
            let password = std::fs::read_to_string(path)?;
            config.password(password.trim_end_matches(['\n', '\r']));
        } else if config.get_password().is_none() {
            if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        config.connect_timeout(settings.connect_timeout());
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(settings)?);
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let timeout = Some(settings.connect_timeout());
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .build()
            .map_err(|e| backend("building the pool", e))?;
        let store = PostgresMetadataStore { pool };
        let mut client = store.client().await?;
        let version = schema::migrate(&mut client)
            .await
            .map_err(|e| backend("migrating the schema", e))?;
        tracing::info!(
            url = %redact_url(&settings.url),
            schema_version = version,
            "metadata in PostgreSQL"
        );
        Ok(store)
    }

    async fn client(&self) -> MetadataResult<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| MetadataError::Unavailable(format!("postgres: getting a connection: {e}")))
    }

    /// One attempt at a batch; `Ok(Err(error))` when PostgreSQL aborted it for a
    /// concurrent transaction (a deadlock) and it should be retried.
    ///
    /// READ COMMITTED with explicit locks rather than SERIALIZABLE: PostgreSQL's
    /// serializable checks lock B-tree *pages*, so batches on neighbouring keys (a leader's
    /// operation records, all under one prefix) aborted each other under load although
    /// they shared no key (64 Executes in flight failed that way). Each expectation locks
    /// exactly its key instead, in key order:
    /// - a value expected present is read `FOR UPDATE`: a concurrent writer of that row
    ///   waits for this transaction, and one that committed first is seen;
    /// - a key expected absent is claimed by inserting it: a concurrent inserter of that
    ///   key waits on the unique index until this transaction ends, and one that
    ///   committed first makes the insert do nothing (a conflict). A claim the batch does
    ///   not write is deleted before commit, so no reader ever sees it.
    ///
    /// Keys the batch writes without expecting anything are last-writer-wins, as on sled.
    async fn try_apply(
        &self,
        batch: &WriteBatch,
    ) -> MetadataResult<Result<(), tokio_postgres::Error>> {
        let mut client = self.client().await?;
        let attempt = async {
            let transaction = client.transaction().await?;
            let mut expectations: Vec<_> = batch.expectations().collect();
            expectations.sort_by(|a, b| (a.0 .0, a.1).cmp(&(b.0 .0, b.1)));
            expectations.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1 && a.2 == b.2);
            let mut claimed: Vec<(Keyspace, &[u8])> = Vec::new();
            for (space, key, expected) in expectations {
                let holds = match expected {
                    Some(expected) => {
                        let lock = transaction
                            .prepare_cached(
                                "SELECT value FROM kiln_metadata
                                 WHERE keyspace = $1 AND key = $2 FOR UPDATE",
                            )
                            .await?;
                        let current: Option<Vec<u8>> = transaction
                            .query_opt(&lock, &[&space.0, &key])
                            .await?
                            .map(|row| row.get(0));
                        current.as_deref() == Some(expected)
                    }
                    None => {
                        let claim = transaction
                            .prepare_cached(
                                "INSERT INTO kiln_metadata (keyspace, key, value) VALUES ($1, $2, '')
                                 ON CONFLICT (keyspace, key) DO NOTHING",
                            )
                            .await?;
                        let inserted = transaction.execute(&claim, &[&space.0, &key]).await?;
                        claimed.push((space, key));
                        inserted == 1
                    }
                };
                if !holds {
                    // Dropping the transaction rolls it back (and releases the claims).
                    return Ok(Err(MetadataError::Conflict {
                        space: space.0,
                        key: String::from_utf8_lossy(key).into_owned(),
                    }));
                }
            }
            let upsert = transaction.prepare_cached(UPSERT).await?;
            let delete = transaction
                .prepare_cached("DELETE FROM kiln_metadata WHERE keyspace = $1 AND key = $2")
                .await?;
            for (space, key, value) in batch.writes() {
                match value {
                    Some(value) => {
                        transaction
                            .execute(&upsert, &[&space.0, &key, &value])
                            .await?
                    }
                    None => transaction.execute(&delete, &[&space.0, &key]).await?,
                };
            }
            for (space, key) in claimed {
                let written = batch.writes().any(|(s, k, _)| s == space && k == key);
                if !written {
                    transaction.execute(&delete, &[&space.0, &key]).await?;
                }
            }
            transaction.commit().await?;
            Ok(Ok(()))
        };
        match attempt.await {
            Ok(Ok(())) => Ok(Ok(())),
            Ok(Err(conflict)) => Err(conflict),
            Err(error) if is_contention(&error) => Ok(Err(error)),
            Err(error) => Err(failed("applying a batch", error)),
        }
    }
}

async fn read_value(
    client: &Object,
    space: Keyspace,
    key: &[u8],
) -> MetadataResult<Option<Vec<u8>>> {
    let statement = client
        .prepare_cached("SELECT value FROM kiln_metadata WHERE keyspace = $1 AND key = $2")
        .await
        .map_err(|e| failed("get", e))?;
    Ok(client
        .query_opt(&statement, &[&space.0, &key])
        .await
        .map_err(|e| failed("get", e))?
        .map(|row| row.get(0)))
}

const UPSERT: &str = "INSERT INTO kiln_metadata (keyspace, key, value) VALUES ($1, $2, $3)
     ON CONFLICT (keyspace, key) DO UPDATE SET value = EXCLUDED.value";

/// rustls on ring, trusting the system's roots and `ca_file`; used only when the URL's
/// `sslmode` asks for TLS.
fn tls_config(settings: &PostgresSettings) -> MetadataResult<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(certificate);
    }
    if let Some(path) = &settings.ca_file {
        use rustls::pki_types::pem::PemObject;
        for certificate in rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| backend(&format!("reading {}", path.display()), e))?
        {
            let certificate =
                certificate.map_err(|e| backend(&format!("reading {}", path.display()), e))?;
            roots
                .add(certificate)
                .map_err(|e| backend(&format!("trusting {}", path.display()), e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| backend("TLS", e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[async_trait]
impl MetadataStore for PostgresMetadataStore {
    async fn get(&self, space: Keyspace, key: &[u8]) -> MetadataResult<Option<Vec<u8>>> {
        read_value(&self.client().await?, space, key).await
    }

    async fn insert(
        &self,
        space: Keyspace,
        key: &[u8],
        value: &[u8],
    ) -> MetadataResult<Option<Vec<u8>>> {
        // Both statements see one snapshot: `old` is the value before the upsert.
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH old AS (
                     SELECT value FROM kiln_metadata WHERE keyspace = $1 AND key = $2 FOR UPDATE
                 ), written AS (
                     INSERT INTO kiln_metadata (keyspace, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (keyspace, key) DO UPDATE SET value = EXCLUDED.value
                 )
                 SELECT value FROM old",
            )
            .await
            .map_err(|e| failed("insert", e))?;
        Ok(client
            .query_opt(&statement, &[&space.0, &key, &value])
            .await
            .map_err(|e| failed("insert", e))?
            .map(|row| row.get(0)))
    }

    async fn remove(&self, space: Keyspace, key: &[u8]) -> MetadataResult<Option<Vec<u8>>> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "DELETE FROM kiln_metadata WHERE keyspace = $1 AND key = $2 RETURNING value",
            )
            .await
            .map_err(|e| failed("remove", e))?;
        Ok(client
            .query_opt(&statement, &[&space.0, &key])
            .await
            .map_err(|e| failed("remove", e))?
            .map(|row| row.get(0)))
    }

    async fn compare_and_swap(
        &self,
        space: Keyspace,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> MetadataResult<std::result::Result<(), Option<Vec<u8>>>> {
        // One connection throughout: a second one from the pool while holding this could
        // wait forever when every connection is held by a racer doing the same.
        let client = self.client().await?;
        let on_error = |e| failed("compare-and-swap", e);
        let changed = match (expected, new) {
            (None, Some(new)) => {
                let statement = client
                    .prepare_cached(
                        "INSERT INTO kiln_metadata (keyspace, key, value) VALUES ($1, $2, $3)
                         ON CONFLICT (keyspace, key) DO NOTHING",
                    )
                    .await
                    .map_err(on_error)?;
                client.execute(&statement, &[&space.0, &key, &new]).await
            }
            (Some(expected), Some(new)) => {
                let statement = client
                    .prepare_cached(
                        "UPDATE kiln_metadata SET value = $3
                         WHERE keyspace = $1 AND key = $2 AND value = $4",
                    )
                    .await
                    .map_err(on_error)?;
                client
                    .execute(&statement, &[&space.0, &key, &new, &expected])
                    .await
            }
            (Some(expected), None) => {
                let statement = client
                    .prepare_cached(
                        "DELETE FROM kiln_metadata
                         WHERE keyspace = $1 AND key = $2 AND value = $3",
                    )
                    .await
                    .map_err(on_error)?;
                client
                    .execute(&statement, &[&space.0, &key, &expected])
                    .await
            }
            // Nothing to write: succeeds exactly when the key is absent.
            (None, None) => Ok(0),
        }
        .map_err(on_error)?;
        if changed == 1 {
            return Ok(Ok(()));
        }
        let current = read_value(&client, space, key).await?;
        if expected.is_none() && new.is_none() && current.is_none() {
            return Ok(Ok(()));
        }
        Ok(Err(current))
    }

    async fn apply(&self, batch: WriteBatch) -> MetadataResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        for attempt in 1..=BATCH_ATTEMPTS {
            match self.try_apply(&batch).await? {
                Ok(()) => return Ok(()),
                Err(error) if attempt == BATCH_ATTEMPTS => {
                    return Err(backend("applying a batch under contention", error))
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(2 * attempt as u64)).await;
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn scan(
        &self,
        space: Keyspace,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> MetadataResult<Vec<Entry>> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT key, value FROM kiln_metadata
                 WHERE keyspace = $1 AND key >= $2
                   AND ($3::bytea IS NULL OR key > $3)
                   AND ($4::bytea IS NULL OR key < $4)
                 ORDER BY key LIMIT $5",
            )
            .await
            .map_err(|e| failed("scan", e))?;
        let end = prefix_end(prefix);
        let limit = limit.min(MAX_SCAN_PAGE) as i64;
        let rows = client
            .query(&statement, &[&space.0, &prefix, &after, &end, &limit])
            .await
            .map_err(|e| failed("scan", e))?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    async fn flush(&self) -> MetadataResult<()> {
        // Every statement above committed durably before it returned.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255, 255]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
