//! The image configuration and manifest kiln publishes, and their canonical bytes.
//!
//! Everything that goes into them is derived from the inputs (content, commit, flags),
//! never from the clock, so publishing the same thing twice gives the same digests.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, UNIX_EPOCH};

use kiln_store::ContentHash;
use oci_spec::image::{
    Arch, Descriptor, History, ImageConfiguration, ImageManifest, MediaType, Os,
    ANNOTATION_BASE_IMAGE_DIGEST, ANNOTATION_BASE_IMAGE_NAME, ANNOTATION_CREATED,
    ANNOTATION_REVISION, ANNOTATION_SOURCE, ANNOTATION_VERSION,
};
use serde::Serialize;

use crate::error::{PublishError, Result};
use crate::oci_digest::oci_digest;

/// The default user: the conventional unprivileged "nonroot" uid/gid of distroless images.
pub const DEFAULT_USER: &str = "65532:65532";

/// os/architecture(/variant) of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPlatform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for TargetPlatform {
    fn default() -> Self {
        TargetPlatform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl TargetPlatform {
    /// The platform of the machine this runs on, in OCI's words (GOARCH names: `amd64`,
    /// `arm64` …), for picking an image's manifest out of an index; None where OCI has no
    /// name for the architecture.
    pub fn of_this_machine() -> Option<Self> {
        Self::linux_on(std::env::consts::ARCH)
    }

    fn linux_on(rust_arch: &str) -> Option<Self> {
        let architecture = match rust_arch {
            "x86_64" => "amd64",
            // Any variant: indexes list arm64 images as `v8` or with none.
            "aarch64" => "arm64",
            "x86" => "386",
            "riscv64" => "riscv64",
            "s390x" => "s390x",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            _ => return None,
        };
        Some(TargetPlatform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        })
    }
}

/// How the container runs: what `--entrypoint`, `--cmd`, `--env`, `--workdir`, `--user`
/// and `--label` set.
#[derive(Clone, Debug)]
pub struct RuntimeSettings {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `NAME=VALUE`; a name the base image also sets is overridden.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: String,
    pub labels: BTreeMap<String, String>,
    pub platform: TargetPlatform,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            workdir: None,
            user: DEFAULT_USER.into(),
            labels: BTreeMap::new(),
            platform: TargetPlatform::default(),
        }
    }
}

/// Where the image comes from: the `org.opencontainers.image.*` annotations and labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    /// Seconds since the epoch: the commit time (or SOURCE_DATE_EPOCH), never "now".
    pub created_epoch: u64,
    pub revision: Option<String>,
    pub source: Option<String>,
    pub version: Option<String>,
}

impl Provenance {
    /// RFC 3339, e.g. `2024-05-01T12:00:00Z`.
    pub fn created(&self) -> String {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(self.created_epoch))
            .to_string()
    }

    /// The OCI annotation keys and values this provenance yields.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert(ANNOTATION_CREATED.to_string(), self.created());
        let optional = [
            (ANNOTATION_REVISION, &self.revision),
            (ANNOTATION_SOURCE, &self.source),
            (ANNOTATION_VERSION, &self.version),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                out.insert(key.to_string(), value.clone());
            }
        }
        out
    }
}

/// An image resolved to its platform manifest: the base a layer goes on top of, or the
/// root filesystem an action runs in.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// As the user named it (`host/repo:tag`), for the base-name annotation.
    pub name: String,
    /// Digest of the platform manifest used.
    pub manifest_digest: ContentHash,
    pub config: ImageConfiguration,
    pub layers: Vec<Descriptor>,
}

/// One new layer, as the config and the manifest describe it.
#[derive(Clone, Debug)]
pub struct NewLayer {
    pub digest: ContentHash,
    pub size: u64,
    pub diff_id: ContentHash,
    pub media_type: String,
    /// Recorded in the history entry (e.g. "from directory out/").
    pub comment: String,
}

/// Builds the image configuration: the base's (if any) with the new layer appended and
/// the runtime settings and provenance applied.
pub fn build_config(
    base: Option<&ResolvedImage>,
    settings: &RuntimeSettings,
    provenance: &Provenance,
    layer: &NewLayer,
) -> Result<ImageConfiguration> {
    let created = provenance.created();
    let mut image = match base {
        Some(base) => base.config.clone(),
        None => ImageConfiguration::default(),
    };
    let mut runtime = image.config().clone().unwrap_or_default();

    if settings.entrypoint.is_some() {
        runtime.set_entrypoint(settings.entrypoint.clone());
        // As in a Dockerfile: a new entrypoint drops the base's cmd unless one is given.
        runtime.set_cmd(settings.cmd.clone());
    } else if settings.cmd.is_some() {
        runtime.set_cmd(settings.cmd.clone());
    }
    let env = merge_env(runtime.env().clone().unwrap_or_default(), &settings.env)?;
    runtime.set_env((!env.is_empty()).then_some(env));
    if let Some(workdir) = &settings.workdir {
        runtime.set_working_dir(Some(workdir.clone()));
    }
    runtime.set_user(Some(settings.user.clone()));
    let mut labels: HashMap<String, String> = runtime.labels().clone().unwrap_or_default();
    labels.extend(settings.labels.clone());
    labels.extend(provenance.annotations());
    runtime.set_labels(Some(labels));
    image.set_config(Some(runtime));

    image.set_created(Some(created.clone()));
    image.set_os(Os::from(settings.platform.os.as_str()));
    image.set_architecture(Arch::from(settings.platform.architecture.as_str()));
    image.set_variant(settings.platform.variant.clone());
    image
        .rootfs_mut()
        .diff_ids_mut()
        .push(layer.diff_id.to_string());

    // A base without history keeps none: a partial history would misattribute layers.
    let base_has_layers = base.is_some_and(|b| !b.layers.is_empty());
    if image.history().is_some() || !base_has_layers {
        let entry = oci_spec::image::HistoryBuilder::default()
            .created(created)
            .created_by("kiln publish")
            .comment(layer.comment.clone())
            .build()?;
        let mut history: Vec<History> = image.history().clone().unwrap_or_default();
        history.push(entry);
        image.set_history(Some(history));
    }
    Ok(image)
}

/// `NAME=VALUE` entries: later ones replace earlier ones with the same name, in place.
fn merge_env(mut env: Vec<String>, overrides: &[String]) -> Result<Vec<String>> {
    for entry in overrides {
        let (name, _) = entry.split_once('=').ok_or_else(|| {
            PublishError::Option(format!("environment entry {entry:?} is not NAME=VALUE"))
        })?;
        match env
            .iter_mut()
            .find(|existing| existing.split_once('=').map(|(n, _)| n) == Some(name))
        {
            Some(existing) => *existing = entry.clone(),
            None => env.push(entry.clone()),
        }
    }
    Ok(env)
}

/// Builds the OCI image manifest: base layers, then the new one.
pub fn build_manifest(
    config_digest: &ContentHash,
    config_size: u64,
    base: Option<&ResolvedImage>,
    layer: &NewLayer,
    provenance: &Provenance,
) -> Result<ImageManifest> {
    let mut layers: Vec<Descriptor> = base.map(|b| b.layers.clone()).unwrap_or_default();
    layers.push(Descriptor::new(
        MediaType::from(layer.media_type.as_str()),
        layer.size,
        oci_digest(&layer.digest),
    ));
    let mut annotations: HashMap<String, String> = provenance.annotations().into_iter().collect();
    if let Some(base) = base {
        annotations.insert(ANNOTATION_BASE_IMAGE_NAME.into(), base.name.clone());
        annotations.insert(
            ANNOTATION_BASE_IMAGE_DIGEST.into(),
            base.manifest_digest.to_string(),
        );
    }
    Ok(oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config_size,
            oci_digest(config_digest),
        ))
        .layers(layers)
        .annotations(annotations)
        .build()?)
}

/// JSON with object keys sorted at every level: oci-spec keeps labels and annotations in
/// `HashMap`s, whose order would otherwise change the digest from run to run.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let value = sort_keys(serde_json::to_value(value)?);
    Ok(serde_json::to_vec(&value)?)
}

fn sort_keys(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sort_keys).collect())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SHA-256 hash whose hex is `digit` 64 times.
    fn hash(digit: char) -> ContentHash {
        format!("sha256:{}", digit.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    fn layer() -> NewLayer {
        NewLayer {
            digest: hash('a'),
            size: 10,
            diff_id: hash('b'),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            comment: "from directory out".into(),
        }
    }

    fn provenance() -> Provenance {
        Provenance {
            created_epoch: 1_700_000_000,
            revision: Some("0123456789abcdef".into()),
            source: Some("https://example.com/app".into()),
            version: Some("v1.2.3".into()),
        }
    }

    #[test]
    fn config_carries_settings_labels_and_commit_time() {
        let settings = RuntimeSettings {
            entrypoint: Some(vec!["/app".into()]),
            cmd: Some(vec!["--serve".into()]),
            env: vec!["A=1".into()],
            workdir: Some("/srv".into()),
            labels: [("team".to_string(), "build".to_string())].into(),
            ..Default::default()
        };
        let config = build_config(None, &settings, &provenance(), &layer()).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&canonical_json(&config).unwrap()).unwrap();
        assert_eq!(json["created"], "2023-11-14T22:13:20Z");
        assert_eq!(json["os"], "linux");
        assert_eq!(json["architecture"], "amd64");
        assert_eq!(json["config"]["User"], DEFAULT_USER);
        assert_eq!(json["config"]["Entrypoint"][0], "/app");
        assert_eq!(json["config"]["Cmd"][0], "--serve");
        assert_eq!(json["config"]["Env"][0], "A=1");
        assert_eq!(json["config"]["WorkingDir"], "/srv");
        let labels = &json["config"]["Labels"];
        assert_eq!(labels["team"], "build");
        assert_eq!(labels[ANNOTATION_REVISION], "0123456789abcdef");
        assert_eq!(labels[ANNOTATION_SOURCE], "https://example.com/app");
        assert_eq!(labels[ANNOTATION_VERSION], "v1.2.3");
        assert_eq!(labels[ANNOTATION_CREATED], "2023-11-14T22:13:20Z");
        assert_eq!(json["rootfs"]["diff_ids"][0], layer().diff_id.to_string());
        assert_eq!(json["history"][0]["created_by"], "kiln publish");
    }

    #[test]
    fn this_machine_has_its_oci_name() {
        let arm = TargetPlatform::linux_on("aarch64").unwrap();
        assert_eq!(
            (arm.architecture.as_str(), arm.variant.as_deref()),
            ("arm64", None)
        );
        assert_eq!(
            TargetPlatform::linux_on("x86_64").unwrap().architecture,
            "amd64"
        );
        assert!(TargetPlatform::linux_on("mips").is_none());
        // Where the tests run (x86_64 or aarch64), there is a name.
        assert!(TargetPlatform::of_this_machine().is_some());
    }

    #[test]
    fn base_settings_are_kept_and_overridden() {
        let base_runtime = oci_spec::image::ConfigBuilder::default()
            .env(vec!["PATH=/bin".to_string(), "A=0".to_string()])
            .entrypoint(vec!["/bin/sh".to_string()])
            .cmd(vec!["-c".to_string()])
            .build()
            .unwrap();
        let mut base_config = ImageConfiguration::default();
        base_config.set_config(Some(base_runtime));
        base_config
            .rootfs_mut()
            .diff_ids_mut()
            .push(hash('c').to_string());
        let base = ResolvedImage {
            name: "127.0.0.1:5000/base:v1".into(),
            manifest_digest: hash('d'),
            config: base_config,
            layers: vec![Descriptor::new(
                MediaType::ImageLayerGzip,
                5,
                oci_digest(&hash('e')),
            )],
        };
        let settings = RuntimeSettings {
            env: vec!["A=1".into(), "B=2".into()],
            ..Default::default()
        };
        let config = build_config(Some(&base), &settings, &provenance(), &layer()).unwrap();
        let runtime = config.config().clone().unwrap();
        assert_eq!(
            runtime.env().clone().unwrap(),
            vec!["PATH=/bin", "A=1", "B=2"]
        );
        assert_eq!(runtime.entrypoint().clone().unwrap(), vec!["/bin/sh"]);
        assert_eq!(runtime.cmd().clone().unwrap(), vec!["-c"]);
        assert_eq!(config.rootfs().diff_ids().len(), 2);
        // The base had no history, so none is invented for its layer.
        assert!(config.history().is_none());

        let manifest =
            build_manifest(&hash('f'), 100, Some(&base), &layer(), &provenance()).unwrap();
        assert_eq!(manifest.layers().len(), 2);
        assert_eq!(
            manifest.layers()[1].digest().to_string(),
            layer().digest.to_string()
        );
        let annotations = manifest.annotations().clone().unwrap();
        assert_eq!(annotations[ANNOTATION_BASE_IMAGE_NAME], base.name);
        assert_eq!(annotations[ANNOTATION_CREATED], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn canonical_json_is_stable() {
        let settings = RuntimeSettings {
            labels: (0..50).map(|i| (format!("k{i}"), i.to_string())).collect(),
            ..Default::default()
        };
        let first =
            canonical_json(&build_config(None, &settings, &provenance(), &layer()).unwrap())
                .unwrap();
        for _ in 0..5 {
            let again =
                canonical_json(&build_config(None, &settings, &provenance(), &layer()).unwrap())
                    .unwrap();
            assert_eq!(first, again);
        }
    }

    #[test]
    fn bad_env_entries_are_refused() {
        let settings = RuntimeSettings {
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        };
        assert!(matches!(
            build_config(None, &settings, &provenance(), &layer()),
            Err(PublishError::Option(_))
        ));
    }
}
