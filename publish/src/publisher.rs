//! `publish`: a directory becomes a layer, the layer an image (on a base, if asked), and
//! the image is pushed and tagged.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};

use crate::action_outputs::{stage_outputs, LayerContent};
use crate::credentials::CredentialStore;
use crate::error::{PublishError, Result};
use crate::image_config::{
    build_config, build_manifest, canonical_json, BaseImage, NewLayer, Provenance, RuntimeSettings,
    TargetPlatform,
};
use crate::image_reference::ImageReference;
use crate::layer::{build_layer, sha256_digest, Compression, LayerBlob};
use crate::progress::Progress;
use crate::registry_client::{
    BlobSource, MountOutcome, RegistryClient, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST,
};

/// Everything one `kiln publish` needs.
#[derive(Debug)]
pub struct PublishRequest {
    /// `host[:port]` of the registry to push to.
    pub registry: String,
    /// Plain HTTP even for non-loopback hosts.
    pub insecure: bool,
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
    pub show_progress: bool,
}

/// What happened to one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobTransfer {
    /// The registry already had it.
    Existed,
    /// Mounted from the base image's repository.
    Mounted,
    /// Copied from the base image's registry.
    Copied,
    Uploaded,
}

#[derive(Debug)]
pub struct PublishOutcome {
    /// `host/repository@sha256:…`, for pinning.
    pub pinned_reference: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digest: String,
    pub diff_id: String,
    /// Every blob of the image and how it reached the registry, layers first.
    pub blobs: Vec<(String, BlobTransfer)>,
    pub tags_pushed: Vec<String>,
    /// Tags the registry refused, with its reason; the image itself is pushed.
    pub tags_refused: Vec<(String, String)>,
}

/// Builds the image from `request.content` and pushes it with its tags. Everything runs
/// in one `publish` span whose context goes with every request, so a publish is one
/// trace across the coordinator and the registry.
#[tracing::instrument(name = "publish", skip_all, fields(repository = %request.repository))]
pub async fn publish(request: PublishRequest) -> Result<PublishOutcome> {
    kiln_store::validate_repository_name(&request.repository)?;
    for tag in &request.tags {
        kiln_store::validate_tag(tag)?;
    }
    let target = RegistryClient::new(
        &request.registry,
        request.insecure,
        request.credentials.for_registry(&request.registry)?,
    )?;
    let base = match &request.base {
        Some(text) => {
            let reference = ImageReference::parse(text, &request.registry)?;
            let client = if reference.registry == request.registry {
                None
            } else {
                Some(RegistryClient::new(
                    &reference.registry,
                    request.insecure,
                    request.credentials.for_registry(&reference.registry)?,
                )?)
            };
            let image = resolve_base(
                client.as_ref().unwrap_or(&target),
                &reference,
                text,
                &request.runtime.platform,
            )
            .await?;
            Some((reference, client, image))
        }
        None => None,
    };

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
        digest: layer.digest.clone(),
        size: layer.size,
        diff_id: layer.diff_id.clone(),
        media_type: layer.media_type().to_string(),
        comment: request.content_description.clone(),
    };
    let base_image = base.as_ref().map(|(_, _, image)| image);
    let config = build_config(
        base_image,
        &request.runtime,
        &request.provenance,
        &new_layer,
    )?;
    let config_bytes = canonical_json(&config)?;
    let config_digest = sha256_digest(&config_bytes);
    let manifest = build_manifest(
        &config_digest,
        config_bytes.len() as u64,
        base_image,
        &new_layer,
        &request.provenance,
    )?;
    let manifest_bytes = canonical_json(&manifest)?;

    let progress = Progress::new(request.show_progress);
    let repository = &request.repository;
    let mut blobs = Vec::new();
    if let Some((reference, source_client, image)) = &base {
        for descriptor in &image.layers {
            let digest = descriptor.digest().to_string();
            let bar = progress.blob(&short(&digest), descriptor.size());
            let transfer = if target.blob_exists(repository, &digest).await? {
                BlobTransfer::Existed
            } else {
                let session = match source_client {
                    None => {
                        match target
                            .mount_blob(repository, &digest, &reference.repository)
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
                        let source = BlobSource {
                            client: source_client.as_ref().unwrap_or(&target),
                            repository: &reference.repository,
                        };
                        target
                            .copy_blob_from(
                                source,
                                repository,
                                session,
                                &digest,
                                descriptor.size(),
                                &bar,
                            )
                            .await?;
                        BlobTransfer::Copied
                    }
                }
            };
            finish_bar(&bar, transfer);
            tracing::info!(%digest, ?transfer, "base layer");
            blobs.push((digest, transfer));
        }
    }

    let bar = progress.blob(&short(&layer.digest), layer.size);
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
                &bar,
            )
            .await?;
        BlobTransfer::Uploaded
    };
    finish_bar(&bar, transfer);
    tracing::info!(digest = %layer.digest, ?transfer, "layer");
    blobs.push((layer.digest.clone(), transfer));

    let transfer = if target.blob_exists(repository, &config_digest).await? {
        BlobTransfer::Existed
    } else {
        target
            .upload_bytes(repository, &config_digest, config_bytes)
            .await?;
        BlobTransfer::Uploaded
    };
    blobs.push((config_digest.clone(), transfer));

    // By digest first: the image lands (and can be pinned) even if every tag is refused.
    let manifest_digest = sha256_digest(&manifest_bytes);
    target
        .put_manifest(repository, &manifest_digest, OCI_MANIFEST, &manifest_bytes)
        .await?;
    let mut tags_pushed = Vec::new();
    let mut tags_refused = Vec::new();
    for tag in &request.tags {
        match target
            .put_manifest(repository, tag, OCI_MANIFEST, &manifest_bytes)
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
    Ok(PublishOutcome {
        pinned_reference: format!("{}/{repository}@{manifest_digest}", request.registry),
        manifest_digest,
        config_digest,
        layer_digest: layer.digest.clone(),
        diff_id: layer.diff_id.clone(),
        blobs,
        tags_pushed,
        tags_refused,
    })
}

fn short(digest: &str) -> String {
    digest
        .split_once(':')
        .map_or(digest, |(_, hex)| hex)
        .chars()
        .take(12)
        .collect()
}

fn finish_bar(bar: &indicatif::ProgressBar, transfer: BlobTransfer) {
    let message = match transfer {
        BlobTransfer::Existed => "exists",
        BlobTransfer::Mounted => "mounted",
        BlobTransfer::Copied => "copied",
        BlobTransfer::Uploaded => "pushed",
    };
    if let Some(total) = bar.length() {
        bar.set_position(total);
    }
    bar.finish_with_message(message);
}

/// Fetches the base image's manifest and config, choosing the platform's manifest when
/// the reference names an index.
async fn resolve_base(
    client: &RegistryClient,
    reference: &ImageReference,
    name: &str,
    platform: &TargetPlatform,
) -> Result<BaseImage> {
    let mut fetched = client
        .get_manifest(&reference.repository, &reference.reference)
        .await?;
    if fetched.media_type == OCI_INDEX || fetched.media_type == DOCKER_MANIFEST_LIST {
        let index = ImageIndex::from_reader(fetched.bytes.as_slice())?;
        let chosen = pick_platform(index.manifests(), platform).ok_or_else(|| {
            PublishError::BaseImage(format!(
                "{name} has no manifest for {}/{}{}",
                platform.os,
                platform.architecture,
                platform
                    .variant
                    .as_ref()
                    .map(|v| format!("/{v}"))
                    .unwrap_or_default()
            ))
        })?;
        fetched = client
            .get_manifest(&reference.repository, chosen.digest().as_ref())
            .await?;
    }
    let manifest = ImageManifest::from_reader(fetched.bytes.as_slice())?;
    let config_digest = manifest.config().digest().to_string();
    let config_bytes = client
        .get_blob_bytes(&reference.repository, &config_digest)
        .await?;
    let config = ImageConfiguration::from_reader(config_bytes.as_slice())?;
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if os != platform.os || arch != platform.architecture {
        return Err(PublishError::BaseImage(format!(
            "{name} is {os}/{arch}, but the image is for {}/{}",
            platform.os, platform.architecture
        )));
    }
    let layers = manifest
        .layers()
        .iter()
        .cloned()
        .map(as_oci_layer)
        .collect();
    Ok(BaseImage {
        name: name.to_string(),
        manifest_digest: fetched.digest,
        config,
        layers,
    })
}

fn pick_platform<'a>(
    manifests: &'a [Descriptor],
    platform: &TargetPlatform,
) -> Option<&'a Descriptor> {
    manifests.iter().find(|descriptor| {
        descriptor.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == platform.os
                && p.architecture().to_string() == platform.architecture
                && (platform.variant.is_none() || p.variant() == &platform.variant)
        })
    })
}

/// Docker's layer media types name the same bytes as OCI's; the manifest kiln writes is
/// OCI, so its layers say so too.
fn as_oci_layer(mut descriptor: Descriptor) -> Descriptor {
    let oci = match descriptor.media_type().as_ref() {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(MediaType::ImageLayerGzip),
        "application/vnd.docker.image.rootfs.diff.tar" => Some(MediaType::ImageLayer),
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            Some(MediaType::ImageLayerNonDistributableGzip)
        }
        _ => None,
    };
    if let Some(media_type) = oci {
        descriptor.set_media_type(media_type);
    }
    descriptor
}
