//! Tokens: made here, shown once, kept only as a hash.
//!
//! A token is `kiln_` and 64 hex digits of randomness (256 bits). What is stored, in the
//! metadata store or in the configuration file, is its BLAKE3 hash. A slow password hash
//! such as argon2 protects secrets a person chose, which can be guessed; a 256-bit random
//! token cannot be, so a fast hash loses nothing, and it lets every RPC be checked with
//! one hash and one key lookup instead of tens of milliseconds of argon2.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_store::{Keyspace, MetadataStore};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::scope::{parse_scopes, Grant, Scope};
use crate::CoordinatorError;

/// Tokens made by `kiln token create`, by hash.
const TOKENS: Keyspace = Keyspace("auth.tokens");

const PREFIX: &str = "kiln_";

/// A token's hash: how it is stored and looked up.
pub type TokenHash = [u8; 32];

pub fn hash_token(token: &str) -> TokenHash {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// A new random token, as its holder will send it.
pub fn generate_token() -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("{PREFIX}{}", hex::encode(secret))
}

/// What is known of a token, never the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public and short: the start of the hash. `kiln token list` shows it and
    /// `kiln token revoke` takes it.
    pub id: String,
    /// What the token is for, as its creator put it.
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    /// The one instance name the scopes apply to; every instance when unset.
    pub instance: Option<String>,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
    /// From the configuration file: listed, but revoked by editing the file.
    #[serde(default)]
    pub configured: bool,
}

impl TokenRecord {
    pub fn grant(&self) -> Grant {
        Grant {
            scopes: self.scopes.clone(),
            instance: self.instance.clone(),
        }
    }

    pub fn expired(&self, now_unix: u64) -> bool {
        self.expires_unix.is_some_and(|at| at <= now_unix)
    }
}

fn id_of(hash: &TokenHash) -> String {
    hex::encode(&hash[..8])
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token declared in the configuration file, for GitOps set-ups: only its hash is in
/// the file (`kiln token generate` prints both).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfiguredToken {
    pub name: String,
    /// The token's BLAKE3 hash, 64 hex digits.
    pub hash: String,
    /// E.g. `["cas:read", "ac:read"]`.
    pub scopes: Vec<String>,
    #[serde(default)]
    pub instance: Option<String>,
    /// Unix seconds after which the token is refused.
    #[serde(default)]
    pub expires_unix: Option<u64>,
}

impl ConfiguredToken {
    fn record(&self) -> Result<(TokenHash, TokenRecord), String> {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&self.hash, &mut hash).map_err(|_| {
            format!(
                "token {:?}: hash must be 64 hex digits (kiln token generate prints it)",
                self.name
            )
        })?;
        let scopes = parse_scopes(&self.scopes.join(","))
            .map_err(|e| format!("token {:?}: {e}", self.name))?;
        Ok((
            hash,
            TokenRecord {
                id: id_of(&hash),
                name: self.name.clone(),
                scopes,
                instance: self.instance.clone(),
                created_unix: 0,
                expires_unix: self.expires_unix,
                configured: true,
            },
        ))
    }
}

/// Every token the coordinator accepts: the configured ones and the stored ones.
#[derive(Clone)]
pub struct TokenStore {
    metadata: Arc<dyn MetadataStore>,
    configured: Arc<HashMap<TokenHash, TokenRecord>>,
}

impl TokenStore {
    pub fn new(
        metadata: Arc<dyn MetadataStore>,
        configured: &[ConfiguredToken],
    ) -> Result<Self, String> {
        let configured = configured
            .iter()
            .map(ConfiguredToken::record)
            .collect::<Result<_, _>>()?;
        Ok(TokenStore {
            metadata,
            configured: Arc::new(configured),
        })
    }

    /// The record of the token with this hash, expired or not.
    pub async fn lookup(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, CoordinatorError> {
        if let Some(record) = self.configured.get(hash) {
            return Ok(Some(record.clone()));
        }
        let Some(value) = self.metadata.get(TOKENS, hash).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&value)
            .map(Some)
            .map_err(|e| CoordinatorError::Internal(format!("a stored token does not decode: {e}")))
    }

    /// Makes a token; returns it (the only time it exists outside its holder) and its
    /// record. The record is flushed before the token is returned.
    pub async fn create(
        &self,
        name: &str,
        scopes: BTreeSet<Scope>,
        instance: Option<String>,
        expires_unix: Option<u64>,
    ) -> Result<(String, TokenRecord), CoordinatorError> {
        let token = generate_token();
        let hash = hash_token(&token);
        let record = TokenRecord {
            id: id_of(&hash),
            name: name.to_string(),
            scopes,
            instance,
            created_unix: now_unix(),
            expires_unix,
            configured: false,
        };
        let value = serde_json::to_vec(&record).expect("token records serialise");
        self.metadata.insert(TOKENS, &hash, &value).await?;
        self.metadata.flush().await?;
        Ok((token, record))
    }

    /// Every token, configured ones first, then stored ones in hash order.
    pub async fn list(&self) -> Result<Vec<TokenRecord>, CoordinatorError> {
        let mut records: Vec<TokenRecord> = self.configured.values().cloned().collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records.extend(self.stored().await?.into_iter().map(|(_, record)| record));
        Ok(records)
    }

    /// Revokes the stored token with this id; false when there is none. A configured
    /// token is revoked by removing it from the file.
    pub async fn revoke(&self, id: &str) -> Result<bool, CoordinatorError> {
        if self.configured.values().any(|record| record.id == id) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "token {id} comes from the configuration file: remove it there"
            )));
        }
        let Some((key, _)) = self
            .stored()
            .await?
            .into_iter()
            .find(|(_, record)| record.id == id)
        else {
            return Ok(false);
        };
        self.metadata.remove(TOKENS, &key).await?;
        self.metadata.flush().await?;
        Ok(true)
    }

    /// The stored tokens with their keys. A farm has tens of tokens, not millions, so
    /// listing them all is what revoking by id costs.
    async fn stored(&self) -> Result<Vec<(Vec<u8>, TokenRecord)>, CoordinatorError> {
        let mut stored = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .metadata
                .scan(TOKENS, b"", after.as_deref(), kiln_store::MAX_SCAN_PAGE)
                .await?;
            let Some((last, _)) = page.last() else {
                return Ok(stored);
            };
            after = Some(last.clone());
            stored.extend(
                page.into_iter()
                    .filter_map(|(key, value)| Some((key, serde_json::from_slice(&value).ok()?))),
            );
        }
    }
}
