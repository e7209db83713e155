//! Actions that run in an OCI image: the `container-image` platform property
//! (`docker://registry:5000/toolchains/gcc@sha256:…`, as Bazel, Buildbarn and BuildBuddy
//! write it) names the root filesystem the sandbox shows instead of the host's.
//!
//! The worker resolves the reference (a tag once per action, a digest never again),
//! downloads each layer to a file while hashing it and checks its digest before a byte
//! of it is unpacked, unpacks the layers once into `images/<manifest digest>/rootfs`,
//! and keeps that root, read-only to actions, for later ones: least recently used roots
//! go when the cache passes `worker.image_cache_bytes`, never one an action is using.
//! Anything wrong with the image (missing, unreachable, a bad digest, too large) fails
//! the action with FAILED_PRECONDITION naming it: another worker would fare no better.

pub(crate) mod unpack;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_publish::{
    CredentialStore, ImageReference, ManifestReference, RegistryClient, RegistryTls, TargetPlatform,
};
use kiln_store::ContentHash;

use crate::WorkerError;

/// The platform property that names an action's image.
pub const CONTAINER_IMAGE_PROPERTY: &str = "container-image";
/// The scheme REAPI clients put before a registry reference.
const DOCKER_SCHEME: &str = "docker://";
/// A root whose unpacking finished; a directory without it is a leftover.
const COMPLETE_MARKER: &str = "complete";
/// The most layers an image may have (Docker's own limit is 125): each is a file open
/// at once while the root is unpacked.
pub const MAX_LAYERS: usize = 128;

/// Where images come from and how much of them the worker keeps.
#[derive(Clone, Debug)]
pub struct ImageSettings {
    /// The most bytes of unpacked roots kept.
    pub max_bytes: u64,
    /// The longest resolving an image, and pulling and unpacking it, may take: a
    /// registry that stalls (any registry an action names) fails the action instead of
    /// holding the pull that other actions wait behind.
    pub pull_timeout: Duration,
    /// A docker `config.json` (what a Kubernetes pull secret holds) with credentials
    /// per registry.
    pub auth_file: Option<PathBuf>,
    /// HTTPS settings: a CA to trust instead of the system roots.
    pub tls: RegistryTls,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            max_bytes: 10 << 30,
            pull_timeout: Duration::from_secs(600),
            auth_file: None,
            tls: RegistryTls::default(),
        }
    }
}

/// The unpacked roots under a directory of the worker's.
pub struct ImageStore {
    dir: PathBuf,
    settings: ImageSettings,
    state: Mutex<CacheState>,
    /// One image is fetched and unpacked at a time: two actions wanting the same new
    /// image wait for one download, not two.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct CacheState {
    roots: HashMap<String, CachedRoot>,
    clock: u64,
}

impl CacheState {
    /// A root now complete, not yet used.
    fn add(&mut self, key: String, bytes: u64) {
        let root = CachedRoot {
            bytes,
            last_used: 0,
            pins: 0,
        };
        self.roots.insert(key, root);
    }
}

struct CachedRoot {
    bytes: u64,
    last_used: u64,
    /// Actions running in it now.
    pins: usize,
}

/// A root an action runs in; it stays in the cache while this is held.
pub struct ImageRoot {
    store: Arc<ImageStore>,
    key: String,
    /// The root filesystem.
    pub rootfs: PathBuf,
    /// The reference as the action named it.
    pub reference: String,
    /// The platform manifest the root was unpacked from.
    pub manifest_digest: ContentHash,
}

impl Drop for ImageRoot {
    fn drop(&mut self) {
        let mut state = self.store.state.lock().unwrap();
        if let Some(root) = state.roots.get_mut(&self.key) {
            root.pins -= 1;
        }
    }
}

impl ImageStore {
    /// Opens the cache in `dir`, dropping roots a previous run left half unpacked and
    /// counting the complete ones.
    pub fn open(dir: PathBuf, settings: ImageSettings) -> Result<Arc<Self>, WorkerError> {
        std::fs::create_dir_all(&dir).map_err(WorkerError::io("creating the image cache"))?;
        let mut state = CacheState::default();
        for entry in std::fs::read_dir(&dir).map_err(WorkerError::io("reading the image cache"))? {
            let path = entry
                .map_err(WorkerError::io("reading the image cache"))?
                .path();
            let key = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
            let size = std::fs::read_to_string(path.join(COMPLETE_MARKER))
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok());
            match (key, size) {
                (Some(key), Some(bytes)) => state.add(key, bytes),
                _ => remove_tree(&path),
            }
        }
        Ok(Arc::new(ImageStore {
            dir,
            settings,
            state: Mutex::new(state),
            fetching: tokio::sync::Mutex::new(()),
        }))
    }

    /// The root of the image `text` names, unpacked if it was not yet; FAILED_PRECONDITION
    /// naming the image for anything wrong with it.
    pub async fn root_for(self: &Arc<Self>, text: &str) -> Result<ImageRoot, WorkerError> {
        let unavailable = |reason: String| WorkerError::ImageUnavailable {
            image: text.to_string(),
            reason,
        };
        let reference = parse_reference(text).map_err(unavailable)?;
        // A digest names its manifest already: a cached root needs no registry at all.
        if let ManifestReference::Digest(digest) = &reference.reference {
            if let Some(root) = self.pin(text, digest) {
                return Ok(root);
            }
        }
        let client = self
            .client(&reference)
            .map_err(|e| unavailable(e.to_string()))?;
        // The worker's own architecture: an index's entry for another would not run here.
        let platform = TargetPlatform::of_this_machine().ok_or_else(|| {
            unavailable(format!(
                "this worker's architecture ({}) has no OCI platform name",
                std::env::consts::ARCH
            ))
        })?;
        let resolving = kiln_publish::resolve_image(&client, &reference, text, &platform);
        let image = self
            .within_deadline("resolving it", resolving)
            .await
            .map_err(unavailable)?
            .map_err(|e| unavailable(e.to_string()))?;
        let digest = image.manifest_digest;
        if let Some(root) = self.pin(text, &digest) {
            return Ok(root);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(root) = self.pin(text, &digest) {
            return Ok(root);
        }
        let fetching = self.fetch_and_unpack(&client, &reference.repository, &image, &digest);
        let bytes = self
            .within_deadline("pulling and unpacking it", fetching)
            .await
            .and_then(|fetched| fetched)
            .map_err(unavailable)?;
        self.insert(digest.hex(), bytes);
        // Pinned before making room, so the new root is not the one that goes.
        let root = self
            .pin(text, &digest)
            .ok_or_else(|| unavailable("gone as soon as unpacked".into()))?;
        self.make_room();
        Ok(root)
    }

    /// `work`, unless it outlasts the pull timeout.
    async fn within_deadline<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, String> {
        let deadline = self.settings.pull_timeout;
        tokio::time::timeout(deadline, work).await.map_err(|_| {
            format!("{what} took longer than {deadline:?} (worker.image_pull_timeout_secs)")
        })
    }

    fn client(&self, reference: &ImageReference) -> Result<RegistryClient, String> {
        let credentials = CredentialStore {
            docker_config: self.settings.auth_file.clone(),
            ..Default::default()
        };
        let credentials = credentials
            .for_registry(&reference.registry)
            .map_err(|e| e.to_string())?;
        RegistryClient::new_with_tls(&reference.registry, false, credentials, &self.settings.tls)
            .map_err(|e| e.to_string())
    }

    /// Downloads and checks every layer, then unpacks them into a new root; returns the
    /// bytes it holds.
    async fn fetch_and_unpack(
        &self,
        client: &RegistryClient,
        repository: &str,
        image: &kiln_publish::ResolvedImage,
        digest: &ContentHash,
    ) -> Result<u64, String> {
        if image.layers.len() > MAX_LAYERS {
            return Err(format!(
                "it has {} layers, more than the {MAX_LAYERS} a worker unpacks",
                image.layers.len()
            ));
        }
        let declared: u64 = image.layers.iter().map(|layer| layer.size()).sum();
        if declared > self.settings.max_bytes {
            return Err(format!(
                "its layers hold {declared} bytes, more than the image cache's {} (worker.image_cache_bytes)",
                self.settings.max_bytes
            ));
        }
        let staging = tempfile::Builder::new()
            .prefix(".unpacking-")
            .tempdir_in(&self.dir)
            .map_err(|e| format!("creating a staging directory: {e}"))?;
        let mut layers = Vec::with_capacity(image.layers.len());
        for (index, layer) in image.layers.iter().enumerate() {
            let expected = ContentHash::parse_oci(layer.digest().as_ref())
                .map_err(|e| format!("layer {index}: {e}"))?;
            let path = staging.path().join(format!("layer-{index}"));
            download_checked(client, repository, &expected, layer.size(), &path)
                .await
                .map_err(|e| format!("layer {index} ({expected}): {e}"))?;
            layers.push(std::fs::File::open(&path).map_err(|e| e.to_string())?);
        }
        let rootfs = staging.path().join("rootfs");
        let limit = self.settings.max_bytes;
        let unpacked = {
            let rootfs = rootfs.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir(&rootfs)?;
                let limits = unpack::Limits {
                    bytes: limit,
                    entries: unpack::MAX_ENTRIES,
                };
                unpack::unpack_layers(&rootfs, layers, limits)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("unpacking: {e}"))?
        };
        // Only the root stays: the layer files are removed before the directory moves.
        for index in 0..image.layers.len() {
            let _ = std::fs::remove_file(staging.path().join(format!("layer-{index}")));
        }
        // The root reaches the disk before it is marked complete: after a power loss, a
        // marked root holds every byte it was unpacked with (one syncfs, not an fsync per
        // file).
        sync_filesystem(staging.path()).map_err(|e| format!("syncing the root: {e}"))?;
        std::fs::write(staging.path().join(COMPLETE_MARKER), unpacked.to_string())
            .map_err(|e| e.to_string())?;
        // tempfile made it 0700; an action started as its own uid (bwrap in a user
        // namespace, in a container) must be able to reach the root below it.
        std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let staged = staging.keep();
        std::fs::rename(&staged, self.dir.join(digest.hex())).map_err(|e| {
            remove_tree(&staged);
            format!("moving the root into place: {e}")
        })?;
        Ok(unpacked)
    }

    fn insert(&self, key: String, bytes: u64) {
        self.state.lock().unwrap().add(key, bytes);
    }

    /// Pins the root of `digest`, if cached.
    fn pin(self: &Arc<Self>, reference: &str, digest: &ContentHash) -> Option<ImageRoot> {
        let key = digest.hex();
        let mut state = self.state.lock().unwrap();
        state.clock += 1;
        let clock = state.clock;
        let root = state.roots.get_mut(&key)?;
        root.pins += 1;
        root.last_used = clock;
        Some(ImageRoot {
            store: self.clone(),
            rootfs: self.dir.join(&key).join("rootfs"),
            key,
            reference: reference.to_string(),
            manifest_digest: *digest,
        })
    }

    /// Removes least recently used roots that no action holds until the cache fits.
    fn make_room(&self) {
        let doomed: Vec<String> = {
            let mut state = self.state.lock().unwrap();
            let mut total: u64 = state.roots.values().map(|r| r.bytes).sum();
            let mut idle: Vec<(u64, String, u64)> = state
                .roots
                .iter()
                .filter(|(_, root)| root.pins == 0)
                .map(|(key, root)| (root.last_used, key.clone(), root.bytes))
                .collect();
            idle.sort();
            let mut doomed = Vec::new();
            for (_, key, bytes) in idle {
                if total <= self.settings.max_bytes {
                    break;
                }
                total -= bytes;
                state.roots.remove(&key);
                doomed.push(key);
            }
            doomed
        };
        for key in doomed {
            tracing::info!(manifest = %key, "image root evicted from the cache");
            remove_tree(&self.dir.join(key));
        }
    }

    /// Bytes of the roots held.
    pub fn held_bytes(&self) -> u64 {
        self.state
            .lock()
            .unwrap()
            .roots
            .values()
            .map(|r| r.bytes)
            .sum()
    }
}

/// `docker://host/repo:tag`, `docker://host/repo@sha256:…` or the same without the
/// scheme. The host is required: a worker has no default registry.
fn parse_reference(text: &str) -> Result<ImageReference, String> {
    let bare = text.strip_prefix(DOCKER_SCHEME).unwrap_or(text);
    let reference = ImageReference::parse(bare, "").map_err(|e| e.to_string())?;
    if reference.registry.is_empty() {
        return Err("name the registry: docker://HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]".into());
    }
    Ok(reference)
}

/// Downloads a blob to `path`, hashing as it goes; fails unless it is exactly `size`
/// bytes with the `expected` digest.
async fn download_checked(
    client: &RegistryClient,
    repository: &str,
    expected: &ContentHash,
    size: u64,
    path: &Path,
) -> Result<(), String> {
    let mut response = client
        .get_blob(repository, expected)
        .await
        .map_err(|e| e.to_string())?;
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).map_err(|e| e.to_string())?,
    );
    let mut hasher = expected.function.hasher();
    let mut received: u64 = 0;
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        received += chunk.len() as u64;
        if received > size {
            return Err(format!("more than the {size} bytes the manifest declares"));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    file.flush().map_err(|e| e.to_string())?;
    let actual = ContentHash {
        function: expected.function,
        bytes: hasher.finalize(),
    };
    if received != size || actual != *expected {
        return Err(format!(
            "got {received} bytes with digest {actual}, expected {size} bytes with {expected}"
        ));
    }
    Ok(())
}

/// Flushes the filesystem holding `path` (syncfs(2)).
fn sync_filesystem(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(path)?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn remove_tree(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an image root");
        }
    }
}
