//! The action cache's storage: encoded `ActionResult`s keyed by instance name and action
//! digest. Instance names are separate namespaces. The coordinator decodes and validates
//! the results; this layer only keeps them durable.

use std::sync::Arc;

use crate::{Digest, Keyspace, MetadataStore, Result};

const ACTION_CACHE: Keyspace = Keyspace("action_cache");

#[derive(Clone)]
pub struct ActionCache {
    metadata: Arc<dyn MetadataStore>,
}

impl ActionCache {
    pub fn new(metadata: Arc<dyn MetadataStore>) -> Self {
        ActionCache { metadata }
    }

    fn key(instance_name: &str, action: &Digest) -> Vec<u8> {
        // The NUL separator cannot appear in an instance name, so keys never collide.
        let mut key = Vec::with_capacity(instance_name.len() + 1 + 7 + 64);
        key.extend_from_slice(instance_name.as_bytes());
        key.push(0);
        key.extend_from_slice(action.function.name().as_bytes());
        key.push(b':');
        key.extend_from_slice(action.hex().as_bytes());
        key
    }

    pub async fn get(&self, instance_name: &str, action: &Digest) -> Result<Option<Vec<u8>>> {
        Ok(self
            .metadata
            .get(ACTION_CACHE, &Self::key(instance_name, action))
            .await?)
    }

    /// Stores an encoded result and makes it durable before returning.
    pub async fn put(
        &self,
        instance_name: &str,
        action: &Digest,
        encoded_result: &[u8],
    ) -> Result<()> {
        self.metadata
            .insert(
                ACTION_CACHE,
                &Self::key(instance_name, action),
                encoded_result,
            )
            .await?;
        Ok(self.metadata.flush().await?)
    }

    pub async fn remove(&self, instance_name: &str, action: &Digest) -> Result<()> {
        self.metadata
            .remove(ACTION_CACHE, &Self::key(instance_name, action))
            .await?;
        Ok(())
    }
}
