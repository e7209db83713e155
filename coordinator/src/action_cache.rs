//! The ActionCache service: action digest → ActionResult, one namespace per instance name.
//!
//! A result is only handed out while every blob it references is in the CAS, so a client
//! is never told to download outputs that are gone. Checking that must stay cheap (a hit
//! is the most frequent call a build makes), so the files inside output directories'
//! Trees are listed once, when the result is stored, in an extension field appended to
//! the encoded ActionResult (see [`TreeFileIndex`]). A hit is then one metadata lookup,
//! two decodes and one in-memory existence check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    self, action_cache_server::ActionCache, ActionResult, GetActionResultRequest,
    UpdateActionResultRequest,
};
use kiln_store::{BlobStore, ContentHash, Digest, DigestFunction, ExpectedDigest};
use tonic::{Request, Response, Status};

mod stored_result;
pub(crate) mod trimming;

pub(crate) use stored_result::{referenced_blobs, tree_files, TreeFileIndex};

use crate::auth::{authorize, Scope};
use crate::counters::Counters;
use crate::rpc_attributes;
use crate::{reapi_digest, CoordinatorConfig, CoordinatorError};

pub(crate) struct ActionCacheService {
    blobs: Arc<dyn BlobStore>,
    results: kiln_store::ActionCache,
    config: Arc<CoordinatorConfig>,
    counters: Arc<Counters>,
    /// When each (instance, action) hit last refreshed its blobs' access times.
    refreshed: DashMap<(String, Digest), Instant>,
}

/// Past this many remembered refreshes, stale ones are dropped.
const MAX_REMEMBERED_REFRESHES: usize = 100_000;

impl ActionCacheService {
    pub(crate) fn new(
        blobs: Arc<dyn BlobStore>,
        results: kiln_store::ActionCache,
        config: Arc<CoordinatorConfig>,
        counters: Arc<Counters>,
    ) -> Self {
        ActionCacheService {
            blobs,
            results,
            config,
            counters,
            refreshed: DashMap::new(),
        }
    }

    /// The stored results, for the trimming task.
    pub(crate) fn results(&self) -> kiln_store::ActionCache {
        self.results.clone()
    }

    /// Looks a result up, counting the hit or miss for the cache hit ratio.
    pub(crate) async fn get(
        &self,
        request: GetActionResultRequest,
    ) -> Result<ActionResult, CoordinatorError> {
        let found = self.lookup(request).await;
        match &found {
            Ok(_) => self.counters.action_cache_lookup(true),
            Err(CoordinatorError::NotFound(_)) => self.counters.action_cache_lookup(false),
            Err(_) => {} // a bad request or a store fault says nothing about the cache
        }
        found
    }

    async fn lookup(
        &self,
        request: GetActionResultRequest,
    ) -> Result<ActionResult, CoordinatorError> {
        let function = reapi_digest::digest_function(request.digest_function)?;
        let action = reapi_digest::parse(function, request.action_digest.as_ref(), || {
            "action_digest".into()
        })?;
        let not_cached = || {
            CoordinatorError::NotFound(format!(
                "no result for action {action} in instance {:?}",
                request.instance_name
            ))
        };
        let stored = self
            .results
            .get(&request.instance_name, &action)
            .await?
            .ok_or_else(not_cached)?;
        let Ok(mut result) = ActionResult::decode(stored.as_slice()) else {
            tracing::warn!(%action, "undecodable action cache entry; treated as a miss");
            return Err(not_cached());
        };
        let index = TreeFileIndex::decode(stored.as_slice()).unwrap_or_default();

        let mut referenced = match referenced_blobs(function, &result) {
            Ok(referenced) => referenced,
            Err(e) => {
                tracing::warn!(%action, error = %e, "action cache entry with a bad digest; treated as a miss");
                return Err(not_cached());
            }
        };
        if index.indexed {
            referenced.extend(index.digests(function));
        } else if !result.output_directories.is_empty() {
            // Stored without an index (not by this service): read the Trees.
            match tree_files(
                self.blobs.as_ref(),
                self.config.max_message_bytes,
                function,
                &result,
            )
            .await
            {
                Ok(files) => referenced.extend(files),
                Err(_) => return Err(not_cached()),
            }
        }
        let present = kiln_store::confirm_presence(self.blobs.as_ref(), &referenced).await?;
        let missing = present.iter().filter(|p| !**p).count();
        if missing > 0 {
            return Err(CoordinatorError::NotFound(format!(
                "the result for action {action} references {missing} blob(s) no longer in the CAS"
            )));
        }

        self.refresh_access_times(request.instance_name.clone(), action, &referenced)
            .await?;
        self.inline_outputs(function, &request, &mut result).await?;
        Ok(result)
    }

    /// Marks a hit's blobs as used, at most once per `access_refresh_interval_secs` for
    /// each action, so that eviction keeps what builds still use.
    async fn refresh_access_times(
        &self,
        instance_name: String,
        action: Digest,
        referenced: &[Digest],
    ) -> Result<(), CoordinatorError> {
        let interval = Duration::from_secs(self.config.access_refresh_interval_secs);
        let now = Instant::now();
        let key = (instance_name, action);
        if let Some(last) = self.refreshed.get(&key) {
            if now.duration_since(*last) < interval {
                return Ok(());
            }
        }
        let hashes: Vec<ContentHash> = referenced.iter().map(Digest::content_hash).collect();
        self.blobs.touch(&hashes).await?;
        self.results.mark_used(&key.0, &key.1).await?;
        if self.refreshed.len() >= MAX_REMEMBERED_REFRESHES {
            self.refreshed
                .retain(|_, last| now.duration_since(*last) < interval);
        }
        self.refreshed.insert(key, now);
        Ok(())
    }

    /// Fills in the inlined stdout, stderr and output files the client asked for, within
    /// `max_inline_bytes`; what does not fit stays a digest only, as REAPI allows.
    async fn inline_outputs(
        &self,
        function: DigestFunction,
        request: &GetActionResultRequest,
        result: &mut ActionResult,
    ) -> Result<(), CoordinatorError> {
        let mut budget = self.config.max_inline_bytes;
        if request.inline_stdout {
            if let Some(data) = self
                .read_inline(function, &result.stdout_digest, &mut budget)
                .await?
            {
                result.stdout_raw = data;
            }
        }
        if request.inline_stderr {
            if let Some(data) = self
                .read_inline(function, &result.stderr_digest, &mut budget)
                .await?
            {
                result.stderr_raw = data;
            }
        }
        if !request.inline_output_files.is_empty() {
            for file in &mut result.output_files {
                if request.inline_output_files.contains(&file.path) {
                    if let Some(data) = self
                        .read_inline(function, &file.digest, &mut budget)
                        .await?
                    {
                        file.contents = data;
                    }
                }
            }
        }
        Ok(())
    }

    async fn read_inline(
        &self,
        function: DigestFunction,
        digest: &Option<reapi::Digest>,
        budget: &mut u64,
    ) -> Result<Option<Vec<u8>>, CoordinatorError> {
        let Some(digest) = digest else {
            return Ok(None);
        };
        let digest = reapi_digest::parse(function, Some(digest), String::new)?;
        if digest.size > *budget {
            return Ok(None);
        }
        *budget -= digest.size;
        Ok(Some(Vec::from(self.blobs.read_all(&digest).await?)))
    }

    pub(crate) async fn update(
        &self,
        request: UpdateActionResultRequest,
    ) -> Result<ActionResult, CoordinatorError> {
        let function = reapi_digest::digest_function(request.digest_function)?;
        let action = reapi_digest::parse(function, request.action_digest.as_ref(), || {
            "action_digest".into()
        })?;
        let mut result = request
            .action_result
            .ok_or_else(|| CoordinatorError::bad_request("action_result", "is required"))?;
        self.store_inlined_outputs(function, &mut result).await?;
        check_paths(&result)?;

        let mut referenced = referenced_blobs(function, &result)?;
        let tree_files = tree_files(
            self.blobs.as_ref(),
            self.config.max_message_bytes,
            function,
            &result,
        )
        .await?;
        referenced.extend_from_slice(&tree_files);
        let present = kiln_store::confirm_presence(self.blobs.as_ref(), &referenced).await?;
        let missing: Vec<Digest> = referenced
            .into_iter()
            .zip(present)
            .filter_map(|(digest, present)| (!present).then_some(digest))
            .collect();
        if !missing.is_empty() {
            return Err(CoordinatorError::MissingBlobs(missing));
        }

        let mut stored = result.encode_to_vec();
        TreeFileIndex::new(&tree_files)
            .encode(&mut stored)
            .map_err(|e| {
                CoordinatorError::Internal(format!("encoding the tree file index: {e}"))
            })?;
        self.results
            .put(&request.instance_name, &action, &stored)
            .await?;
        Ok(result)
    }

    /// Moves outputs a client inlined (which REAPI discourages) into the CAS, so that the
    /// stored result refers to them by digest like any other.
    async fn store_inlined_outputs(
        &self,
        function: DigestFunction,
        result: &mut ActionResult,
    ) -> Result<(), CoordinatorError> {
        self.store_inlined(
            function,
            &mut result.stdout_raw,
            &mut result.stdout_digest,
            "action_result.stdout_digest".into(),
        )
        .await?;
        self.store_inlined(
            function,
            &mut result.stderr_raw,
            &mut result.stderr_digest,
            "action_result.stderr_digest".into(),
        )
        .await?;
        for (i, file) in result.output_files.iter_mut().enumerate() {
            self.store_inlined(
                function,
                &mut file.contents,
                &mut file.digest,
                format!("action_result.output_files[{i}].digest"),
            )
            .await?;
        }
        Ok(())
    }

    async fn store_inlined(
        &self,
        function: DigestFunction,
        raw: &mut Vec<u8>,
        digest: &mut Option<reapi::Digest>,
        field: String,
    ) -> Result<(), CoordinatorError> {
        if raw.is_empty() {
            return Ok(());
        }
        let actual = Digest::of_bytes(function, raw);
        if let Some(claimed) = digest.as_ref() {
            let claimed = reapi_digest::parse(function, Some(claimed), || field.clone())?;
            if claimed != actual {
                return Err(CoordinatorError::bad_request(
                    field,
                    format!("is {claimed} but the inlined content is {actual}"),
                ));
            }
        }
        self.blobs
            .put(
                ExpectedDigest::Exact(actual),
                Bytes::from(std::mem::take(raw)),
            )
            .await?;
        *digest = Some(actual.to_reapi());
        Ok(())
    }
}

/// Output paths are relative to the working directory (REAPI): never absolute, and a
/// file always has a name.
fn check_paths(result: &ActionResult) -> Result<(), CoordinatorError> {
    let files = result.output_files.iter().enumerate().map(|(i, f)| {
        (
            format!("action_result.output_files[{i}].path"),
            &f.path,
            false,
        )
    });
    let directories = result.output_directories.iter().enumerate().map(|(i, d)| {
        (
            format!("action_result.output_directories[{i}].path"),
            &d.path,
            true,
        )
    });
    for (field, path, may_be_empty) in files.chain(directories) {
        if path.starts_with('/') {
            return Err(CoordinatorError::bad_request(
                field,
                "must be a relative path",
            ));
        }
        if path.is_empty() && !may_be_empty {
            return Err(CoordinatorError::bad_request(field, "must not be empty"));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        rpc_attributes::instance(&request.get_ref().instance_name);
        authorize(&request, Scope::AcRead, &request.get_ref().instance_name)?;
        Ok(Response::new(self.get(request.into_inner()).await?))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        rpc_attributes::instance(&request.get_ref().instance_name);
        authorize(&request, Scope::AcWrite, &request.get_ref().instance_name)?;
        Ok(Response::new(self.update(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_rides_along_without_changing_the_action_result() {
        let result = ActionResult {
            exit_code: 3,
            stdout_raw: b"out".to_vec(),
            ..Default::default()
        };
        let file = Digest::of_bytes(DigestFunction::Blake3, b"file");
        let mut stored = result.encode_to_vec();
        TreeFileIndex::new(&[file]).encode(&mut stored).unwrap();

        assert_eq!(ActionResult::decode(stored.as_slice()).unwrap(), result);
        let index = TreeFileIndex::decode(stored.as_slice()).unwrap();
        assert!(index.indexed);
        assert_eq!(
            index.digests(DigestFunction::Blake3).collect::<Vec<_>>(),
            [file]
        );
        // A plain ActionResult has no index.
        assert!(
            !TreeFileIndex::decode(result.encode_to_vec().as_slice())
                .unwrap()
                .indexed
        );
    }

    #[test]
    fn absolute_and_empty_output_paths_are_refused() {
        let mut result = ActionResult::default();
        result.output_files.push(reapi::OutputFile {
            path: "/etc/passwd".into(),
            ..Default::default()
        });
        assert!(check_paths(&result).is_err());
        result.output_files[0].path.clear();
        assert!(check_paths(&result).is_err());
        result.output_files[0].path = "out/a".into();
        result.output_directories.push(reapi::OutputDirectory {
            path: String::new(),
            ..Default::default()
        });
        assert!(check_paths(&result).is_ok());
    }
}
