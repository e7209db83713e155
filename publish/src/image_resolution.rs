//! Resolving an image reference to what it holds: its manifest (the platform's, when the
//! reference names an index), its config and its layers. `kiln publish` resolves its base
//! image this way, and the worker the image an action runs in.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};

use crate::error::{PublishError, Result};
use crate::image_config::{ResolvedImage, TargetPlatform};
use crate::image_reference::{ImageReference, ManifestReference};
use crate::oci_digest::content_hash;
use crate::registry_client::{RegistryClient, DOCKER_MANIFEST_LIST, OCI_INDEX};

/// Fetches an image's manifest and config, choosing `platform`'s manifest when the
/// reference names an index; `name` is the image as the user wrote it, for errors.
pub async fn resolve_image(
    client: &RegistryClient,
    reference: &ImageReference,
    name: &str,
    platform: &TargetPlatform,
) -> Result<ResolvedImage> {
    let mut fetched = client
        .get_manifest(&reference.repository, &reference.reference)
        .await?;
    if fetched.media_type == OCI_INDEX || fetched.media_type == DOCKER_MANIFEST_LIST {
        let index = ImageIndex::from_reader(fetched.bytes.as_slice())?;
        let chosen = pick_platform(index.manifests(), platform).ok_or_else(|| {
            PublishError::Image(format!(
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
        let chosen = content_hash(chosen.digest(), "platform manifest")?;
        fetched = client
            .get_manifest(&reference.repository, &ManifestReference::Digest(chosen))
            .await?;
    }
    let manifest = ImageManifest::from_reader(fetched.bytes.as_slice())?;
    let config_digest = content_hash(manifest.config().digest(), "image config")?;
    let config_bytes = client
        .get_blob_bytes(&reference.repository, &config_digest)
        .await?;
    let config = ImageConfiguration::from_reader(config_bytes.as_slice())?;
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if os != platform.os || arch != platform.architecture {
        return Err(PublishError::Image(format!(
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
    Ok(ResolvedImage {
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
