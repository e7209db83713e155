//! Manifest parsing and validation: which media types are accepted and what a manifest
//! refers to.

use std::collections::BTreeMap;

use kiln_store::ContentHash;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::error::{RegistryError, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// A referenced piece of content: its digest and the size the manifest claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub hash: ContentHash,
    pub size: u64,
}

/// What the registry needs to know about a manifest it is about to store.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    pub media_type: String,
    /// The type the referrers API reports: `artifactType`, else the config's media type.
    pub artifact_type: Option<String>,
    pub subject: Option<Reference>,
    /// Config and layers of an image manifest.
    pub blobs: Vec<Reference>,
    /// Child manifests of an index.
    pub children: Vec<Reference>,
    pub annotations: Option<BTreeMap<String, String>>,
}

fn strip_parameters(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

fn reference(descriptor: &Descriptor, role: &str) -> Result<Reference> {
    let text = descriptor.digest().to_string();
    let hash = ContentHash::parse_oci(&text).map_err(|e| {
        RegistryError::ManifestBlobUnknown(format!(
            "{role} {text}: this registry stores no such digest ({e})"
        ))
    })?;
    Ok(Reference {
        hash,
        size: descriptor.size(),
    })
}

fn sorted(
    annotations: &Option<std::collections::HashMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    annotations
        .as_ref()
        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Parses and validates a manifest pushed with `content_type`.
pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<ParsedManifest> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| RegistryError::ManifestInvalid(format!("not JSON: {e}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| RegistryError::ManifestInvalid("not a JSON object".into()))?;
    let declared = object.get("mediaType").and_then(|v| v.as_str());
    let header = content_type
        .map(strip_parameters)
        .filter(|t| !t.is_empty() && *t != "application/json" && *t != "application/octet-stream");
    let media_type = match (header, declared) {
        (Some(header), Some(declared)) if header != declared => {
            return Err(RegistryError::ManifestInvalid(format!(
                "Content-Type {header} differs from the manifest's mediaType {declared}"
            )))
        }
        (Some(t), _) | (None, Some(t)) => t.to_string(),
        // OCI makes mediaType optional; the shape tells which of the two it is.
        (None, None) if object.contains_key("manifests") => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };
    if object.get("schemaVersion").and_then(|v| v.as_u64()) != Some(2) {
        return Err(RegistryError::ManifestInvalid(
            "schemaVersion must be 2".into(),
        ));
    }
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => parse_image(media_type, json),
        OCI_INDEX | DOCKER_MANIFEST_LIST => parse_index(media_type, json),
        t if DOCKER_SCHEMA1.contains(&t) => Err(RegistryError::Unsupported(
            "Docker schema 1 manifests are not supported; push schema 2 or OCI".into(),
        )),
        other => Err(RegistryError::ManifestInvalid(format!(
            "unsupported manifest media type {other:?}; expected {OCI_MANIFEST}, {OCI_INDEX}, \
             {DOCKER_MANIFEST} or {DOCKER_MANIFEST_LIST}"
        ))),
    }
}

fn parse_image(media_type: String, json: serde_json::Value) -> Result<ParsedManifest> {
    let manifest: ImageManifest = serde_json::from_value(json)
        .map_err(|e| RegistryError::ManifestInvalid(format!("not an image manifest: {e}")))?;
    let mut blobs = vec![reference(manifest.config(), "config")?];
    for layer in manifest.layers() {
        // Foreign layers (Windows base images) live elsewhere by design.
        if layer.urls().as_ref().is_some_and(|urls| !urls.is_empty()) {
            continue;
        }
        blobs.push(reference(layer, "layer")?);
    }
    let artifact_type = manifest
        .artifact_type()
        .as_ref()
        .map(|t| t.to_string())
        .or_else(|| Some(manifest.config().media_type().to_string()));
    Ok(ParsedManifest {
        media_type,
        artifact_type,
        subject: manifest
            .subject()
            .as_ref()
            .map(|s| reference(s, "subject"))
            .transpose()?,
        blobs,
        children: Vec::new(),
        annotations: sorted(manifest.annotations()),
    })
}

fn parse_index(media_type: String, json: serde_json::Value) -> Result<ParsedManifest> {
    let index: ImageIndex = serde_json::from_value(json)
        .map_err(|e| RegistryError::ManifestInvalid(format!("not an image index: {e}")))?;
    let children = index
        .manifests()
        .iter()
        .map(|d| reference(d, "child manifest"))
        .collect::<Result<_>>()?;
    Ok(ParsedManifest {
        media_type,
        artifact_type: index.artifact_type().as_ref().map(|t| t.to_string()),
        subject: index
            .subject()
            .as_ref()
            .map(|s| reference(s, "subject"))
            .transpose()?,
        blobs: Vec::new(),
        children,
        annotations: sorted(index.annotations()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn image(config_type: &str, extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"{config_type}","digest":"{D1}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D2}","size":10}}]{extra}}}"#
        )
    }

    #[test]
    fn an_image_lists_its_blobs() {
        let parsed = parse(
            Some(OCI_MANIFEST),
            image("application/vnd.oci.image.config.v1+json", "").as_bytes(),
        )
        .unwrap();
        assert_eq!(parsed.blobs.len(), 2);
        assert_eq!(parsed.blobs[1].size, 10);
        assert_eq!(
            parsed.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert!(parsed.subject.is_none());
    }

    #[test]
    fn an_artifact_with_subject() {
        let body = image(
            "application/vnd.oci.empty.v1+json",
            &format!(
                r#","artifactType":"application/x-sbom","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":5}}"#
            ),
        );
        let parsed = parse(Some(OCI_MANIFEST), body.as_bytes()).unwrap();
        assert_eq!(parsed.artifact_type.as_deref(), Some("application/x-sbom"));
        assert_eq!(parsed.subject.unwrap().hash.oci(), D2);
    }

    #[test]
    fn an_index_lists_its_children() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D1}","size":7,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let parsed = parse(Some(DOCKER_MANIFEST_LIST), body.as_bytes()).unwrap();
        assert_eq!(parsed.children.len(), 1);
        assert!(parsed.blobs.is_empty());
    }

    #[test]
    fn invalid_manifests_are_refused() {
        let cases: [(Option<&str>, String); 6] = [
            (Some(OCI_MANIFEST), "not json".into()),
            (Some(OCI_MANIFEST), "[1]".into()),
            (Some(OCI_MANIFEST), r#"{"schemaVersion":1}"#.into()),
            (
                Some(OCI_MANIFEST),
                r#"{"schemaVersion":2,"layers":[]}"#.into(),
            ),
            (Some(OCI_INDEX), image("x/y", "")),
            (Some("text/plain"), image("x/y", "")),
        ];
        for (content_type, body) in cases {
            assert!(
                matches!(
                    parse(content_type, body.as_bytes()),
                    Err(RegistryError::ManifestInvalid(_))
                ),
                "{body}"
            );
        }
        assert!(matches!(
            parse(Some(DOCKER_SCHEMA1[1]), br#"{"schemaVersion":2}"#),
            Err(RegistryError::Unsupported(_))
        ));
    }

    #[test]
    fn media_type_falls_back_to_the_body() {
        let parsed = parse(None, image("x/y", "").as_bytes()).unwrap();
        assert_eq!(parsed.media_type, OCI_MANIFEST);
        let parsed = parse(Some("application/json"), image("x/y", "").as_bytes()).unwrap();
        assert_eq!(parsed.media_type, OCI_MANIFEST);
    }
}
