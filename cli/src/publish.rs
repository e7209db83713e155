//! `kiln publish`: build outputs become an OCI image, pushed and tagged.
//! The work happens in kiln-publish; this is the command line around it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use kiln_publish::{
    Compression, CoordinatorSource, CredentialStore, GitMetadata, LayerContent, Provenance,
    PublishRequest, RegistryTls, RuntimeSettings, TargetPlatform, DEFAULT_USER,
};
use kiln_store::DigestFunction;

use crate::client_args::CoordinatorArg;
use crate::key_value::parse_key_value;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "from_action", "from_run"])))]
pub struct PublishArgs {
    /// Repository to push to, e.g. `app` or `team/app`.
    #[arg(long)]
    pub repo: String,
    /// Publish the content of this directory.
    #[arg(long, value_name = "DIR")]
    pub from: Option<PathBuf>,
    /// Publish the outputs of this cached action (`<hex>/<size>`) from the coordinator.
    #[arg(long, value_name = "DIGEST")]
    pub from_action: Option<String>,
    /// Publish the outputs of every action in this run manifest (written by `kiln run`).
    #[arg(long, value_name = "FILE")]
    pub from_run: Option<PathBuf>,
    /// Registry to push to. Loopback registries are plain HTTP unless written
    /// `https://HOST:PORT`; --ca-cert, --client-cert and --client-key apply to the
    /// registry as to the coordinator (kiln serves both with one certificate).
    #[arg(
        long,
        value_name = "[https://]HOST:PORT",
        default_value = "127.0.0.1:5000"
    )]
    pub registry: String,
    /// Use plain HTTP (always the case for loopback registries not written `https://`).
    #[arg(long)]
    pub insecure: bool,
    /// A host whose token service may receive the registry credentials although it is
    /// not the registry's host (Docker Hub: `auth.docker.io`); repeatable.
    #[arg(long = "trust-token-realm", value_name = "HOST")]
    pub trusted_realm_hosts: Vec<String>,
    /// Put the layer on top of this image (`[host/]repo:tag` or `…@sha256:…`).
    #[arg(long, value_name = "REF")]
    pub base: Option<String>,
    /// Layer compression: gzip (pullable by every client) or zstd.
    #[arg(long, default_value = "gzip", value_parser = ["gzip", "zstd"])]
    pub compression: String,
    /// A tag to push; repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Also tag `vX.Y.Z` (semver tags on HEAD), the short SHA and `<branch>-<sha>`.
    #[arg(long)]
    pub tags_from_git: bool,
    /// The git checkout to read HEAD from [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub git_dir: Option<PathBuf>,
    /// Branch name for `<branch>-<sha>` when HEAD is detached (as in many CI checkouts).
    #[arg(long)]
    pub branch: Option<String>,
    /// One element of the entrypoint argv; repeat for more.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub entrypoint: Vec<String>,
    /// One element of the default arguments; repeat for more.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub cmd: Vec<String>,
    /// An environment variable, NAME=VALUE; repeatable.
    #[arg(long, value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the container.
    #[arg(long)]
    pub workdir: Option<String>,
    /// User (uid:gid or name) the container runs as.
    #[arg(long, default_value = DEFAULT_USER)]
    pub user: String,
    /// An image label, KEY=VALUE; repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub label: Vec<(String, String)>,
    #[arg(long, default_value = "linux")]
    pub os: String,
    #[arg(long, default_value = "amd64")]
    pub arch: String,
    /// CPU variant, e.g. v8 for arm64.
    #[arg(long)]
    pub variant: Option<String>,
    /// The coordinator holding the action cache, for --from-action and --from-run.
    #[command(flatten)]
    pub target: CoordinatorArg,
    /// REAPI instance name for --from-action.
    #[arg(long, default_value = "")]
    pub instance_name: String,
    /// Digest function of --from-action's digest: sha256 or blake3.
    #[arg(long, default_value = "sha256", value_parser = ["sha256", "blake3"])]
    pub digest_function: String,
    /// Never draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let git_dir = match &args.git_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir()?,
    };
    // Labels come from git whenever we are in a checkout; tags only when asked.
    let git = match GitMetadata::read(&git_dir) {
        Ok(git) => Some(git),
        Err(e) if args.tags_from_git => return Err(e).context("--tags-from-git"),
        Err(e) => {
            tracing::debug!(error = %e, "no git metadata; revision and source stay unset");
            None
        }
    };
    let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => Some(
            value
                .trim()
                .parse::<u64>()
                .context("SOURCE_DATE_EPOCH must be seconds since the epoch")?,
        ),
        Err(_) => None,
    };
    let provenance = match &git {
        Some(git) => git.provenance(source_date_epoch),
        None => Provenance {
            created_epoch: source_date_epoch.unwrap_or(0),
            ..Default::default()
        },
    };
    let mut tags = args.tags.clone();
    if args.tags_from_git {
        let git = git.as_ref().expect("read above when --tags-from-git");
        for tag in git.derive_tags(args.branch.as_deref()) {
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
    }
    let labels: BTreeMap<String, String> = args.label.iter().cloned().collect();
    let runtime = RuntimeSettings {
        entrypoint: (!args.entrypoint.is_empty()).then(|| args.entrypoint.clone()),
        cmd: (!args.cmd.is_empty()).then(|| args.cmd.clone()),
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        labels,
        platform: TargetPlatform {
            os: args.os.clone(),
            architecture: args.arch.clone(),
            variant: args.variant.clone(),
        },
    };

    let (content, content_description) = if let Some(dir) = &args.from {
        // Not the path: where the checkout sits on disk must not change the digest.
        (
            LayerContent::Directory(dir.clone()),
            "from a directory".to_string(),
        )
    } else if let Some(action) = &args.from_action {
        let digest_function =
            DigestFunction::from_name(&args.digest_function).context("--digest-function")?;
        let coordinator = CoordinatorSource {
            address: args.target.coordinator.clone(),
            instance_name: args.instance_name.clone(),
            digest_function,
            credentials: None,
            tls: Default::default(),
        };
        (
            LayerContent::from_action(coordinator, action)?
                .with_credentials(args.target.credentials()?, args.target.tls.load()?),
            format!("from action {action}"),
        )
    } else {
        let path = args.from_run.as_ref().expect("clap requires one source");
        (
            LayerContent::from_run(&args.target.coordinator, path)?
                .with_credentials(args.target.credentials()?, args.target.tls.load()?),
            format!("from run {}", path.display()),
        )
    };

    let (registry, force_https) = registry_address(&args.registry);
    if force_https && args.insecure {
        bail!("--insecure contradicts an https:// registry");
    }
    let request = PublishRequest {
        registry: registry.to_string(),
        insecure: args.insecure || args.registry.starts_with("http://"),
        registry_tls: RegistryTls {
            force_https,
            client: args.target.tls.load()?,
        },
        repository: args.repo.clone(),
        content,
        content_description,
        base: args.base.clone(),
        compression: args.compression.parse::<Compression>()?,
        runtime,
        provenance,
        tags,
        credentials: CredentialStore {
            trusted_realm_hosts: args.trusted_realm_hosts.clone(),
            ..CredentialStore::from_environment()?
        },
        progress: kiln_publish::ProgressSink(std::sync::Arc::new(
            crate::publish_bars::PublishBars::new(!args.no_progress),
        )),
    };
    let outcome = kiln_publish::publish(request).await?;
    println!("{}", outcome.pinned_reference);
    for tag in &outcome.tags_pushed {
        eprintln!("tagged {registry}/{}:{tag}", args.repo);
    }
    for (tag, reason) in &outcome.tags_refused {
        eprintln!("refused {registry}/{}:{tag}: {reason}", args.repo);
    }
    if !outcome.tags_refused.is_empty() {
        bail!(
            "{} of {} tags were refused (the image itself is pushed as {})",
            outcome.tags_refused.len(),
            outcome.tags_refused.len() + outcome.tags_pushed.len(),
            outcome.pinned_reference
        );
    }
    Ok(())
}

/// `--registry` as `host[:port]`, and whether it was written `https://` (which a loopback
/// registry, plain HTTP otherwise, needs to be reached over TLS).
fn registry_address(text: &str) -> (&str, bool) {
    let (address, https) = match text.strip_prefix("https://") {
        Some(rest) => (rest, true),
        None => (text.strip_prefix("http://").unwrap_or(text), false),
    };
    (address.trim_end_matches('/'), https)
}
