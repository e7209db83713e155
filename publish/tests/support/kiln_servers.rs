//! kiln's own registry and coordinator, in process on 127.0.0.1:0 over memory stores.

use argon2::password_hash::{PasswordHasher, SaltString};
use kiln_registry::{Action, GrantConfig, RegistryConfig, UserConfig};
use kiln_testkit::{ServedCoordinator, ServedRegistry, Stores};
use kiln_tls::TlsFiles;

pub const USER: &str = "ci";
pub const PASSWORD: &str = "s3cret-pass";

/// A running server; dropping it shuts the server down.
pub struct Running {
    pub address: String,
    _server: Served,
}

enum Served {
    Coordinator(ServedCoordinator),
    Registry(ServedRegistry),
}

/// The kiln registry with its default tag policy (immutable semver, no `latest`) and,
/// with `auth`, the token flow for one user allowed to pull and push everywhere.
pub async fn registry(auth: bool) -> Running {
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
    let registry = ServedRegistry::start(config, Stores::Memory).await.unwrap();
    Running {
        address: registry.addr.to_string(),
        _server: Served::Registry(registry),
    }
}

/// The kiln registry without auth, serving HTTPS with `tls`.
pub async fn registry_over_tls(tls: &TlsFiles) -> Running {
    let registry =
        ServedRegistry::start_with_tls(RegistryConfig::default(), Stores::Memory, Some(tls))
            .await
            .unwrap();
    Running {
        address: registry.addr.to_string(),
        _server: Served::Registry(registry),
    }
}

/// The coordinator's REAPI cache services.
pub async fn coordinator() -> Running {
    let coordinator = ServedCoordinator::start(Default::default(), Stores::Memory)
        .await
        .unwrap();
    Running {
        address: coordinator.addr.to_string(),
        _server: Served::Coordinator(coordinator),
    }
}
