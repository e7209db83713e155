//! kiln's own registry and coordinator, in process on 127.0.0.1:0.

use std::sync::Arc;

use argon2::password_hash::{PasswordHasher, SaltString};
use kiln_registry::{Action, GrantConfig, Registry, RegistryConfig, UserConfig};
use kiln_store::{FsBlobStore, SledMetadataStore};

pub const USER: &str = "ci";
pub const PASSWORD: &str = "s3cret-pass";

/// A running server; dropping it shuts the server down.
pub struct Running {
    pub address: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    _data: tempfile::TempDir,
}

fn stores(data: &tempfile::TempDir) -> (Arc<FsBlobStore>, Arc<SledMetadataStore>) {
    let blobs = Arc::new(FsBlobStore::open(data.path().join("cas")).unwrap());
    let metadata = Arc::new(SledMetadataStore::open(data.path().join("metadata")).unwrap());
    (blobs, metadata)
}

/// The kiln registry with its default tag policy (immutable semver, no `latest`) and,
/// with `auth`, the token flow for one user allowed to pull and push everywhere.
pub async fn registry(auth: bool) -> Running {
    let data = tempfile::tempdir().unwrap();
    let (blobs, metadata) = stores(&data);
    let mut config = RegistryConfig::default();
    if auth {
        let salt = SaltString::encode_b64(b"kiln-publish-test").unwrap();
        let hash = argon2::Argon2::default()
            .hash_password(PASSWORD.as_bytes(), &salt)
            .unwrap()
            .to_string();
        config.auth.enabled = true;
        config.auth.users = vec![UserConfig {
            name: USER.into(),
            password_hash: hash,
            grants: vec![GrantConfig {
                repositories: "*".into(),
                actions: vec![Action::Pull, Action::Push],
            }],
        }];
    }
    let registry = Registry::open(config, blobs, metadata).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registry.serve(listener, async {
        let _ = stop.await;
    }));
    Running {
        address,
        _shutdown: shutdown,
        _data: data,
    }
}

/// The coordinator's REAPI cache services.
pub async fn coordinator() -> Running {
    let data = tempfile::tempdir().unwrap();
    let (blobs, metadata) = stores(&data);
    let coordinator = kiln_coordinator::Coordinator::new(Default::default(), blobs, metadata);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(coordinator.serve(listener, async {
        let _ = stop.await;
    }));
    Running {
        address,
        _shutdown: shutdown,
        _data: data,
    }
}
