//! `publish`: a directory becomes a layer, the layer an image (on a base, if asked), and
//! the image is pushed and tagged.

use kiln_store::ContentHash;

use crate::action_outputs::{stage_outputs, LayerContent};
use crate::credentials::CredentialStore;
use crate::error::{PublishError, Result};
use crate::image_config::{
    build_config, build_manifest, canonical_json, NewLayer, Provenance, ResolvedImage,
    RuntimeSettings,
};
use crate::image_reference::{ImageReference, ManifestReference};
use crate::image_resolution::resolve_image;
use crate::layer::{build_layer, sha256_digest, Compression, LayerBlob};
use crate::oci_digest::content_hash;
use crate::progress::{BlobProgress, BlobTransfer, ProgressSink};
use crate::registry_client::{MountOutcome, RegistryClient, SourceRepository, OCI_MANIFEST};
use crate::registry_tls::RegistryTls;

/// Everything one `kiln publish` needs.
#[derive(Debug)]
pub struct PublishRequest {
    /// `host[:port]` of the registry to push to.
    pub registry: String,
    /// Plain HTTP even for non-loopback hosts.
    pub insecure: bool,
    /// HTTPS to the registry (a base image on another registry gets the defaults).
    pub registry_tls: RegistryTls,
    pub repository: String,
    /// What becomes the new layer.
    pub content: LayerContent,
    /// Says where the content came from, for the history entry.
    pub content_description: String,
    /// `[host/]repo:tag` or `…@sha256:…` of a base image.
    pub base: Option<String>,
    pub compression: Compression,
    pub runtime: RuntimeSettings,
    pub provenance: Provenance,
    /// Tags to push; each is checked against the tag grammar before anything is pushed.
    pub tags: Vec<String>,
    pub credentials: CredentialStore,
    /// Where blob transfers are reported (the CLI draws bars; nothing by default).
    pub progress: ProgressSink,
}

impl PublishRequest {
    /// A request to publish `dir` as `registry/repository` with `tags`, and defaults for
    /// the rest: no base, gzip, no runtime settings, created at the epoch (reproducible),
    /// no credentials. Set fields on the result for anything else.
    pub fn directory(
        registry: &str,
        repository: &str,
        dir: &std::path::Path,
        tags: &[&str],
    ) -> Self {
        PublishRequest {
            registry: registry.to_string(),
            insecure: false,
            registry_tls: RegistryTls::default(),
            repository: repository.to_string(),
            content: LayerContent::Directory(dir.to_path_buf()),
            content_description: format!("directory {}", dir.display()),
            base: None,
            compression: Compression::Gzip,
            runtime: RuntimeSettings::default(),
            provenance: Provenance::default(),
            tags: tags.iter().map(|tag| tag.to_string()).collect(),
            credentials: CredentialStore::default(),
            progress: ProgressSink::default(),
        }
    }
}

#[derive(Debug)]
pub struct PublishOutcome {
    /// `host/repository@sha256:…`, for pinning.
    pub pinned_reference: String,
    pub manifest_digest: ContentHash,
    pub config_digest: ContentHash,
    pub layer_digest: ContentHash,
    pub diff_id: ContentHash,
    /// Every blob of the image and how it reached the registry, layers first.
    pub blobs: Vec<(ContentHash, BlobTransfer)>,
    pub tags_pushed: Vec<String>,
    /// Tags the registry refused, with its reason; the image itself is pushed.
    pub tags_refused: Vec<(String, String)>,
}

/// Builds the image from `request.content` and pushes it with its tags, in phases:
/// resolve the target and the base, build the image, push its blobs, then the manifest
/// and the tags. Everything runs in one `publish` span whose context goes with every
/// request, so a publish is one trace across the coordinator and the registry.
#[tracing::instrument(name = "publish", skip_all, fields(repository = %request.repository))]
pub async fn publish(request: PublishRequest) -> Result<PublishOutcome> {
    kiln_store::validate_repository_name(&request.repository)?;
    for tag in &request.tags {
        kiln_store::validate_tag(tag)?;
    }
    let target = RegistryClient::new_with_tls(
        &request.registry,
        request.insecure,
        request.credentials.for_registry(&request.registry)?,
        &request.registry_tls,
    )?
    .trusting_realm_hosts(request.credentials.trusted_realm_hosts.clone());
    let base = match &request.base {
        Some(text) => Some(Base::resolve(&request, &target, text).await?),
        None => None,
    };
    let image = build_image(&request, base.as_ref().map(|b| &b.image)).await?;
    let mut blobs = Vec::new();
    if let Some(base) = &base {
        blobs.extend(push_base_layers(&request, &target, base).await?);
    }
    blobs.extend(push_image_blobs(&request, &target, &image).await?);
    let (manifest_digest, tags_pushed, tags_refused) =
        push_manifest_and_tags(&request, &target, &image.manifest_bytes).await?;
    Ok(PublishOutcome {
        pinned_reference: format!(
            "{}/{}@{manifest_digest}",
            request.registry, request.repository
        ),
        manifest_digest,
        config_digest: image.config_digest,
        layer_digest: image.layer.digest,
        diff_id: image.layer.diff_id,
        blobs,
        tags_pushed,
        tags_refused,
    })
}

/// The base image: where it lives and what it holds.
struct Base {
    reference: ImageReference,
    /// A client for the base's registry when it is not the target's.
    client: Option<RegistryClient>,
    image: ResolvedImage,
}

impl Base {
    async fn resolve(
        request: &PublishRequest,
        target: &RegistryClient,
        text: &str,
    ) -> Result<Self> {
        let reference = ImageReference::parse(text, &request.registry)?;
        let client = if reference.registry == request.registry {
            None
        } else {
            Some(
                RegistryClient::new(
                    &reference.registry,
                    request.insecure,
                    request.credentials.for_registry(&reference.registry)?,
                )?
                .trusting_realm_hosts(request.credentials.trusted_realm_hosts.clone()),
            )
        };
        let image = resolve_image(
            client.as_ref().unwrap_or(target),
            &reference,
            text,
            &request.runtime.platform,
        )
        .await?;
        Ok(Base {
            reference,
            client,
            image,
        })
    }
}

/// The new image, built and not yet pushed.
struct BuiltImage {
    layer: LayerBlob,
    config_digest: ContentHash,
    config_bytes: Vec<u8>,
    manifest_bytes: Vec<u8>,
}

/// Builds the new layer (staging action outputs first), the config and the manifest.
async fn build_image(request: &PublishRequest, base: Option<&ResolvedImage>) -> Result<BuiltImage> {
    // Action outputs are staged in a temporary directory that lives until the layer is built.
    let staged;
    let content = match &request.content {
        LayerContent::Directory(dir) => dir.clone(),
        LayerContent::ActionOutputs {
            coordinator,
            actions,
        } => {
            staged = stage_outputs(coordinator, actions).await?;
            staged.tree()
        }
    };
    let compression = request.compression;
    let mtime = request.provenance.created_epoch;
    let layer: LayerBlob =
        tokio::task::spawn_blocking(move || build_layer(&content, compression, mtime))
            .await
            .map_err(|e| PublishError::io("building the layer", std::io::Error::other(e)))??;
    tracing::info!(
        digest = %layer.digest,
        diff_id = %layer.diff_id,
        bytes = layer.size,
        entries = layer.entries,
        "layer built"
    );
    let new_layer = NewLayer {
        digest: layer.digest,
        size: layer.size,
        diff_id: layer.diff_id,
        media_type: layer.media_type().to_string(),
        comment: request.content_description.clone(),
    };
    let config = build_config(base, &request.runtime, &request.provenance, &new_layer)?;
    let config_bytes = canonical_json(&config)?;
    let config_digest = sha256_digest(&config_bytes);
    let manifest = build_manifest(
        &config_digest,
        config_bytes.len() as u64,
        base,
        &new_layer,
        &request.provenance,
    )?;
    Ok(BuiltImage {
        manifest_bytes: canonical_json(&manifest)?,
        layer,
        config_digest,
        config_bytes,
    })
}

/// Makes the base's layers present in the target: already there, mounted from the base's
/// repository, or copied from the base's registry.
async fn push_base_layers(
    request: &PublishRequest,
    target: &RegistryClient,
    base: &Base,
) -> Result<Vec<(ContentHash, BlobTransfer)>> {
    let repository = &request.repository;
    let mut blobs = Vec::new();
    for descriptor in &base.image.layers {
        let digest = content_hash(descriptor.digest(), "base image layer")?;
        let progress = BlobProgress::new(&request.progress, digest, descriptor.size());
        let transfer = if target.blob_exists(repository, &digest).await? {
            BlobTransfer::Existed
        } else {
            let session = match &base.client {
                None => {
                    match target
                        .mount_blob(repository, &digest, &base.reference.repository)
                        .await?
                    {
                        MountOutcome::Mounted => None,
                        MountOutcome::UploadStarted(session) => Some(session),
                    }
                }
                Some(_) => Some(target.start_upload(repository).await?),
            };
            match session {
                None => BlobTransfer::Mounted,
                Some(session) => {
                    let source = SourceRepository {
                        client: base.client.as_ref().unwrap_or(target),
                        repository: &base.reference.repository,
                    };
                    target
                        .copy_blob_from(
                            source,
                            repository,
                            session,
                            &digest,
                            descriptor.size(),
                            &progress,
                        )
                        .await?;
                    BlobTransfer::Copied
                }
            }
        };
        progress.finish(transfer);
        tracing::info!(%digest, ?transfer, "base layer");
        blobs.push((digest, transfer));
    }
    Ok(blobs)
}

/// Pushes the new layer and the config, unless the registry has them.
async fn push_image_blobs(
    request: &PublishRequest,
    target: &RegistryClient,
    image: &BuiltImage,
) -> Result<Vec<(ContentHash, BlobTransfer)>> {
    let repository = &request.repository;
    let layer = &image.layer;
    let progress = BlobProgress::new(&request.progress, layer.digest, layer.size);
    let transfer = if target.blob_exists(repository, &layer.digest).await? {
        BlobTransfer::Existed
    } else {
        let session = target.start_upload(repository).await?;
        target
            .upload_file(
                repository,
                session,
                layer.path(),
                &layer.digest,
                layer.size,
                &progress,
            )
            .await?;
        BlobTransfer::Uploaded
    };
    progress.finish(transfer);
    tracing::info!(digest = %layer.digest, ?transfer, "layer");
    let mut blobs = vec![(layer.digest, transfer)];

    let transfer = if target.blob_exists(repository, &image.config_digest).await? {
        BlobTransfer::Existed
    } else {
        target
            .upload_bytes(repository, &image.config_digest, image.config_bytes.clone())
            .await?;
        BlobTransfer::Uploaded
    };
    blobs.push((image.config_digest, transfer));
    Ok(blobs)
}

/// Pushes the manifest by digest, then under each tag: the image lands (and can be
/// pinned) even if every tag is refused. Returns the digest, the tags pushed and the
/// refused ones with the registry's reason.
async fn push_manifest_and_tags(
    request: &PublishRequest,
    target: &RegistryClient,
    manifest_bytes: &[u8],
) -> Result<(ContentHash, Vec<String>, Vec<(String, String)>)> {
    let repository = &request.repository;
    let manifest_digest = sha256_digest(manifest_bytes);
    let by_digest = ManifestReference::Digest(manifest_digest);
    target
        .put_manifest(repository, &by_digest, OCI_MANIFEST, manifest_bytes)
        .await?;
    let mut tags_pushed = Vec::new();
    let mut tags_refused = Vec::new();
    for tag in &request.tags {
        let by_tag = ManifestReference::Tag(tag.clone());
        match target
            .put_manifest(repository, &by_tag, OCI_MANIFEST, manifest_bytes)
            .await
        {
            Ok(_) => {
                tracing::info!(%tag, "tagged");
                tags_pushed.push(tag.clone());
            }
            Err(error) => {
                tracing::warn!(%tag, %error, "tag refused");
                tags_refused.push((tag.clone(), error.to_string()));
            }
        }
    }
    Ok((manifest_digest, tags_pushed, tags_refused))
}
