//! Registry blobs through the CAS. The registry and the CAS share one blob store, so a
//! private image's layers could otherwise be read through ByteStream or BatchReadBlobs by
//! anyone holding `cas:read` and a digest (say, one pinned in a git repository). With auth
//! on, a blob that was pushed to the registry is readable through the CAS only by an
//! `admin` token: everyone else pulls it from the registry, under its own rules.

use std::sync::Arc;

use kiln_store::Digest;

use super::caller::Caller;
use crate::admin::RegistryCatalog;
use crate::CoordinatorError;

#[derive(Clone, Default)]
pub(crate) struct RegistryBlobGuard {
    registry: Option<Arc<dyn RegistryCatalog>>,
}

impl RegistryBlobGuard {
    pub(crate) fn new(registry: Option<Arc<dyn RegistryCatalog>>) -> Self {
        RegistryBlobGuard { registry }
    }

    /// Refuses `caller` a CAS read of `digest` when it is a registry blob.
    pub(crate) async fn check(
        &self,
        caller: &Caller,
        digest: &Digest,
    ) -> Result<(), CoordinatorError> {
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        if caller.is_admin() {
            return Ok(());
        }
        let owned = registry
            .owns_blob(&digest.content_hash())
            .await
            .map_err(CoordinatorError::Internal)?;
        if owned {
            return Err(CoordinatorError::RegistryBlob(*digest));
        }
        Ok(())
    }
}
