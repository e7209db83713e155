//! The action cache's storage: encoded `ActionResult`s keyed by instance name and action
//! digest. Instance names are separate namespaces. The coordinator decodes and validates
//! the results; this layer only keeps them durable.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;

use crate::{scan_stream, Digest, DigestFunction, Keyspace, MetadataStore, Result};

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

    /// Every stored result, with its action's digest function, a page at a time (for
    /// whoever must know what the cache as a whole references).
    pub fn entries(&self) -> BoxStream<'static, Result<(DigestFunction, Vec<u8>)>> {
        scan_stream(self.metadata.clone(), ACTION_CACHE, Vec::new())
            .filter_map(|entry| async move {
                let (key, value) = match entry {
                    Ok(entry) => entry,
                    Err(e) => return Some(Err(e.into())),
                };
                // `instance \0 function:hex`; a key of another shape is no entry of ours.
                let function = key
                    .iter()
                    .position(|b| *b == 0)
                    .and_then(|nul| key[nul + 1..].split(|b| *b == b':').next())
                    .and_then(|name| std::str::from_utf8(name).ok())
                    .and_then(DigestFunction::from_name)?;
                Some(Ok((function, value)))
            })
            .boxed()
    }

    pub async fn remove(&self, instance_name: &str, action: &Digest) -> Result<()> {
        self.metadata
            .remove(ACTION_CACHE, &Self::key(instance_name, action))
            .await?;
        Ok(())
    }
}
