//! Registry credentials: `KILN_REGISTRY_USER`/`KILN_REGISTRY_PASSWORD`, or the
//! `auths` section of docker's `config.json`.

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::error::{PublishError, Result};

/// A user name and password (or token). `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where credentials for a registry come from: explicit ones (from the environment)
/// win, then docker's config file.
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    pub explicit: Option<Credentials>,
    pub docker_config: Option<PathBuf>,
    /// Token-realm hosts the credentials may be sent to besides the registry itself
    /// (`--trust-token-realm`).
    pub trusted_realm_hosts: Vec<String>,
}

impl CredentialStore {
    /// From `KILN_REGISTRY_USER`/`KILN_REGISTRY_PASSWORD` and the docker config at
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub fn from_environment() -> Result<Self> {
        let user = std::env::var("KILN_REGISTRY_USER").ok();
        let password = std::env::var("KILN_REGISTRY_PASSWORD").ok();
        let explicit = match (user, password) {
            (Some(username), Some(password)) => Some(Credentials { username, password }),
            (None, None) => None,
            _ => {
                return Err(PublishError::Credentials(
                    "set both KILN_REGISTRY_USER and KILN_REGISTRY_PASSWORD, or neither".into(),
                ))
            }
        };
        let docker_config = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")))
            .map(|dir| dir.join("config.json"));
        Ok(CredentialStore {
            explicit,
            docker_config,
            trusted_realm_hosts: Vec::new(),
        })
    }

    /// Credentials for `registry` (`host[:port]`), if any are configured.
    pub fn for_registry(&self, registry: &str) -> Result<Option<Credentials>> {
        if let Some(explicit) = &self.explicit {
            return Ok(Some(explicit.clone()));
        }
        match &self.docker_config {
            Some(path) if path.exists() => docker_config_credentials(path, registry),
            _ => Ok(None),
        }
    }
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Looks `registry` up in a docker config file. Keys may carry a scheme or a path
/// (`https://host/v1/`), so they are compared by host only.
pub fn docker_config_credentials(path: &Path, registry: &str) -> Result<Option<Credentials>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PublishError::io(format!("reading {}", path.display()), e))?;
    let config: DockerConfig = serde_json::from_str(&text).map_err(|e| {
        PublishError::Credentials(format!("{} is not a docker config: {e}", path.display()))
    })?;
    let entry = config.auths.iter().find(|(key, _)| {
        let host = key.split_once("://").map_or(key.as_str(), |(_, rest)| rest);
        host.split('/').next() == Some(registry)
    });
    let Some((_, auth)) = entry else {
        return Ok(None);
    };
    if let Some(encoded) = &auth.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| {
                PublishError::Credentials(format!(
                    "auths.{registry}.auth in {} is not base64",
                    path.display()
                ))
            })?;
        let decoded = String::from_utf8(decoded).map_err(|_| {
            PublishError::Credentials(format!("auths.{registry}.auth is not UTF-8"))
        })?;
        let (username, password) = decoded.split_once(':').ok_or_else(|| {
            PublishError::Credentials(format!("auths.{registry}.auth is not user:password"))
        })?;
        return Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (&auth.username, &auth.password) {
        (Some(username), Some(password)) => Ok(Some(Credentials {
            username: username.clone(),
            password: password.clone(),
        })),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auth_is_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://127.0.0.1:5000/v1/":{{"auth":"{auth}"}},"other:1":{{}}}}}}"#
            ),
        )
        .unwrap();
        let found = docker_config_credentials(&path, "127.0.0.1:5000")
            .unwrap()
            .unwrap();
        assert_eq!(found.username, "alice");
        assert_eq!(found.password, "s3cret");
        assert!(!format!("{found:?}").contains("s3cret"));
        assert_eq!(docker_config_credentials(&path, "other:1").unwrap(), None);
        assert_eq!(docker_config_credentials(&path, "nowhere:2").unwrap(), None);
    }
}
