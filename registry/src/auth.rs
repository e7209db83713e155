//! Authentication and authorisation: basic auth with argon2-hashed passwords, the Docker
//! token flow with HMAC-signed expiring tokens, per-repository scopes and anonymous pull.
//!
//! Passwords and tokens never reach a log line: errors name the user at most.

mod password_check;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use argon2::password_hash::PasswordHash;
use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::{Action, AuthConfig, RepositoryPattern};
use crate::error::{RegistryError, Result};
use crate::repository_index::now_secs;

type HmacSha256 = Hmac<Sha256>;

/// How long a successful basic-auth check is remembered, so that a push of many layers
/// pays for argon2 once rather than per request.
const VERIFIED_CACHE_TTL: Duration = Duration::from_secs(60);

/// What a request wants to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `/v2/`: any authenticated caller.
    Base,
    /// `/v2/_catalog`: results are filtered per repository afterwards.
    Catalog,
    Repository {
        name: String,
        actions: Vec<Action>,
    },
}

impl Scope {
    /// The Docker scope string, as used in challenges and token requests.
    fn challenge_scope(&self) -> Option<String> {
        match self {
            Scope::Base => None,
            Scope::Catalog => Some("registry:catalog:*".to_string()),
            Scope::Repository { name, actions } => Some(format!(
                "repository:{name}:{}",
                actions
                    .iter()
                    .map(|a| a.name())
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        }
    }
}

/// Who made a request.
#[derive(Debug, Clone)]
pub enum Principal {
    Anonymous,
    /// Basic auth with a verified password.
    User(String),
    /// A bearer token the token endpoint issued.
    Token(TokenClaims),
}

/// One access entry of a token, in the Docker token format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenAccess {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// What a token says: who, until when, and which scopes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenClaims {
    /// The user, or empty for an anonymous token.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    pub access: Vec<TokenAccess>,
}

/// The token endpoint's answer.
#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
}

struct User {
    password_hash: String,
    grants: Vec<(RepositoryPattern, Vec<Action>)>,
}

pub struct Authenticator {
    enabled: bool,
    realm: String,
    service: String,
    token_ttl: u64,
    key: [u8; 32],
    users: HashMap<String, User>,
    anonymous_pull: Vec<RepositoryPattern>,
    /// SHA-256 of `user:password` → (user, expiry) for recently verified basic auth.
    verified: DashMap<[u8; 32], (String, Instant)>,
    passwords: password_check::PasswordChecker,
    /// The realm derived from the address the registry serves on, when none is configured.
    bound_realm: std::sync::OnceLock<String>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Result<Self> {
        let key = if config.token_key_hex.is_empty() {
            rand::random::<[u8; 32]>()
        } else {
            let mut key = [0u8; 32];
            hex::decode_to_slice(&config.token_key_hex, &mut key).map_err(|_| {
                RegistryError::Config("auth.token_key_hex must be 64 hex characters".into())
            })?;
            key
        };
        let mut users = HashMap::new();
        for user in &config.users {
            PasswordHash::new(&user.password_hash).map_err(|e| {
                RegistryError::Config(format!(
                    "auth.users {:?}: password_hash is not a PHC string: {e}",
                    user.name
                ))
            })?;
            let grants = user
                .grants
                .iter()
                .map(|g| Ok((RepositoryPattern::new(&g.repositories)?, g.actions.clone())))
                .collect::<Result<_>>()?;
            users.insert(
                user.name.clone(),
                User {
                    password_hash: user.password_hash.clone(),
                    grants,
                },
            );
        }
        Ok(Authenticator {
            enabled: config.enabled,
            realm: config.realm.clone(),
            service: config.service.clone(),
            token_ttl: config.token_ttl_secs,
            key,
            users,
            anonymous_pull: config
                .anonymous_pull
                .iter()
                .map(|p| RepositoryPattern::new(p))
                .collect::<Result<_>>()?,
            verified: DashMap::new(),
            passwords: password_check::PasswordChecker::new(),
            bound_realm: std::sync::OnceLock::new(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Settles the token realm for a registry serving on `addr`. The realm is where
    /// clients send their passwords, so it never comes from a request's Host header: it is
    /// `auth.realm`, or, on a loopback address only, `<scheme>://<addr>/token`. Serving off
    /// loopback with auth on and no realm configured is refused.
    pub fn bind_realm(&self, scheme: &str, addr: std::net::SocketAddr) -> Result<()> {
        if !self.enabled || !self.realm.is_empty() {
            return Ok(());
        }
        if !addr.ip().is_loopback() {
            return Err(RegistryError::Config(format!(
                "registry.auth.realm must be set when auth is on and the registry serves on \
                 {addr}: it is where clients send their passwords, e.g. \
                 https://registry.example.com/token"
            )));
        }
        let _ = self.bound_realm.set(format!("{scheme}://{addr}/token"));
        Ok(())
    }

    fn realm(&self) -> &str {
        if !self.realm.is_empty() {
            return &self.realm;
        }
        self.bound_realm
            .get()
            .map_or("http://127.0.0.1/token", String::as_str)
    }

    fn challenge(&self, scope: &Scope, insufficient: bool) -> RegistryError {
        let mut challenge = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.realm(),
            self.service
        );
        if let Some(scope) = scope.challenge_scope() {
            challenge.push_str(&format!(",scope=\"{scope}\""));
        }
        if insufficient {
            challenge.push_str(",error=\"insufficient_scope\"");
        }
        RegistryError::Unauthorized { challenge }
    }

    /// Identifies the caller from the `Authorization` header; `client` is its address,
    /// against which failed logins count.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
        scope: &Scope,
    ) -> Result<Principal> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Principal::Anonymous);
        };
        let value = value.to_str().map_err(|_| self.challenge(scope, false))?;
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            match self.verify_basic(credentials, client).await? {
                Some(user) => Ok(Principal::User(user)),
                None => Err(self.challenge(scope, false)),
            }
        } else if scheme.eq_ignore_ascii_case("bearer") {
            self.verify_token(credentials)
                .map(Principal::Token)
                .ok_or_else(|| self.challenge(scope, false))
        } else {
            Err(self.challenge(scope, false))
        }
    }

    /// Checks that `principal` may do what `scope` says. With auth off, everything is allowed.
    pub fn authorize(&self, principal: &Principal, scope: &Scope) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let allowed = match scope {
            Scope::Base | Scope::Catalog => !matches!(principal, Principal::Anonymous),
            Scope::Repository { name, actions } => {
                actions.iter().all(|a| self.allows(principal, name, *a))
            }
        };
        if allowed {
            return Ok(());
        }
        match principal {
            Principal::Anonymous => Err(self.challenge(scope, false)),
            // The client may ask the token endpoint for a wider token.
            Principal::Token(_) => Err(self.challenge(scope, true)),
            Principal::User(user) => Err(RegistryError::Denied(format!(
                "user {user:?} may not {} here",
                scope.challenge_scope().unwrap_or_default()
            ))),
        }
    }

    /// Whether `principal` may do `action` on `repository`.
    pub fn allows(&self, principal: &Principal, repository: &str, action: Action) -> bool {
        if !self.enabled {
            return true;
        }
        let anonymous_ok =
            action == Action::Pull && self.anonymous_pull.iter().any(|p| p.matches(repository));
        anonymous_ok
            || match principal {
                Principal::Anonymous => false,
                Principal::User(user) => self.user_allows(user, repository, action),
                Principal::Token(claims) => claims.access.iter().any(|a| {
                    a.kind == "repository"
                        && a.name == repository
                        && a.actions.iter().any(|x| x == action.name() || x == "*")
                }),
            }
    }

    fn user_allows(&self, user: &str, repository: &str, action: Action) -> bool {
        self.users.get(user).is_some_and(|u| {
            u.grants
                .iter()
                .any(|(pattern, actions)| actions.contains(&action) && pattern.matches(repository))
        })
    }

    /// Verifies `base64(user:password)`; returns the user, or None for wrong credentials.
    /// An address with too many failed logins gets 429 before any check.
    async fn verify_basic(&self, encoded: &str, client: Option<IpAddr>) -> Result<Option<String>> {
        let Some((user, password)) = decode_basic(encoded) else {
            return Ok(None);
        };
        let cache_key: [u8; 32] = Sha256::digest(format!("{user}:{password}").as_bytes()).into();
        if let Some(entry) = self.verified.get(&cache_key) {
            if entry.1 > Instant::now() {
                return Ok(Some(entry.0.clone()));
            }
        }
        self.passwords.admit(client)?;
        let stored = self.users.get(&user).map(|u| u.password_hash.as_str());
        if !self.passwords.verify(client, stored, &password).await {
            tracing::info!(%user, "basic auth failed");
            return Ok(None);
        }
        self.verified
            .retain(|_, (_, expiry)| *expiry > Instant::now());
        self.verified.insert(
            cache_key,
            (user.clone(), Instant::now() + VERIFIED_CACHE_TTL),
        );
        Ok(Some(user))
    }

    fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload);
        mac.finalize().into_bytes().to_vec()
    }

    /// `base64url(payload).base64url(HMAC(payload))`, what `verify_token` accepts.
    fn encode_token(&self, claims: &TokenClaims) -> String {
        let payload = serde_json::to_vec(claims).expect("claims serialise");
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(self.sign(&payload))
        )
    }

    fn verify_token(&self, token: &str) -> Option<TokenClaims> {
        let (payload, signature) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(&payload);
        mac.verify_slice(&signature).ok()?;
        let claims: TokenClaims = serde_json::from_slice(&payload).ok()?;
        (claims.exp > now_secs()).then_some(claims)
    }

    /// The token endpoint: authenticates the caller (basic auth or anonymous) and issues a
    /// token for the requested scopes, narrowed to what the caller may do.
    pub async fn issue_token(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
        scopes: &[String],
    ) -> Result<TokenResponse> {
        let principal = match self.authenticate(headers, client, &Scope::Base).await? {
            Principal::Token(_) => {
                return Err(RegistryError::Denied(
                    "the token endpoint takes basic auth or none, not a bearer token".into(),
                ))
            }
            p => p,
        };
        let subject = match &principal {
            Principal::User(user) => user.clone(),
            _ => String::new(),
        };
        let mut access = Vec::new();
        for scope in scopes.iter().flat_map(|s| s.split(' ')) {
            let mut parts = scope.splitn(3, ':');
            let (Some(kind), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let granted: Vec<String> = match kind {
                "repository" => actions
                    .split(',')
                    .filter_map(Action::from_name)
                    .filter(|a| self.allows(&principal, name, *a))
                    .map(|a| a.name().to_string())
                    .collect(),
                "registry" if name == "catalog" && !subject.is_empty() => vec!["*".into()],
                _ => Vec::new(),
            };
            access.push(TokenAccess {
                kind: kind.to_string(),
                name: name.to_string(),
                actions: granted,
            });
        }
        let claims = TokenClaims {
            sub: subject,
            exp: now_secs() + self.token_ttl,
            access,
        };
        let token = self.encode_token(&claims);
        Ok(TokenResponse {
            access_token: token.clone(),
            token,
            expires_in: self.token_ttl,
        })
    }

    /// The user a principal acts for, for filtering the catalog.
    pub fn catalog_principal(&self, principal: &Principal) -> Principal {
        match principal {
            Principal::Token(claims) if !claims.sub.is_empty() => {
                Principal::User(claims.sub.clone())
            }
            other => other.clone(),
        }
    }
}

/// The user and password of Basic credentials (`base64(user:password)`), or None when
/// they are not that shape.
fn decode_basic(encoded: &str) -> Option<(String, String)> {
    let text = String::from_utf8(STANDARD.decode(encoded).ok()?).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Entry points for the fuzz targets in `fuzz/`; not an API.
#[cfg(feature = "fuzzing")]
impl Authenticator {
    pub fn fuzz_encode_token(&self, claims: &TokenClaims) -> String {
        self.encode_token(claims)
    }

    pub fn fuzz_verify_token(&self, token: &str) -> Option<TokenClaims> {
        self.verify_token(token)
    }
}

#[cfg(feature = "fuzzing")]
pub fn fuzz_decode_basic(encoded: &str) -> Option<(String, String)> {
    decode_basic(encoded)
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use argon2::Argon2;

    use super::*;
    use crate::config::{GrantConfig, UserConfig};

    fn hash(password: &str) -> String {
        let salt = SaltString::encode_b64(b"fixed-test-salt!").unwrap();
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(&AuthConfig {
            enabled: true,
            users: vec![UserConfig {
                name: "ci".into(),
                password_hash: hash("s3cret"),
                grants: vec![GrantConfig {
                    repositories: "team/*".into(),
                    actions: vec![Action::Pull, Action::Push],
                }],
            }],
            anonymous_pull: vec!["public/*".into()],
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    fn push(name: &str) -> Scope {
        Scope::Repository {
            name: name.into(),
            actions: vec![Action::Pull, Action::Push],
        }
    }

    #[tokio::test]
    async fn basic_auth_and_grants() {
        let auth = authenticator();
        let headers = basic("ci", "s3cret");
        let principal = auth
            .authenticate(&headers, None, &push("team/a"))
            .await
            .unwrap();
        assert!(auth.authorize(&principal, &push("team/a")).is_ok());
        assert!(matches!(
            auth.authorize(&principal, &push("other")),
            Err(RegistryError::Denied(_))
        ));
        assert!(matches!(
            auth.authenticate(&basic("ci", "wrong"), None, &push("team/a"))
                .await,
            Err(RegistryError::Unauthorized { .. })
        ));
    }

    #[tokio::test]
    async fn tokens_carry_only_granted_scopes_and_expire() {
        let auth = authenticator();
        let response = auth
            .issue_token(
                &basic("ci", "s3cret"),
                None,
                &["repository:team/a:pull,push,delete".into()],
            )
            .await
            .unwrap();
        let claims = auth.verify_token(&response.token).unwrap();
        assert_eq!(claims.access[0].actions, ["pull", "push"]);
        let principal = Principal::Token(claims);
        assert!(auth.allows(&principal, "team/a", Action::Push));
        assert!(!auth.allows(&principal, "team/a", Action::Delete));
        assert!(!auth.allows(&principal, "team/b", Action::Pull));

        let mut tampered = response.token.clone();
        tampered.insert(3, 'x');
        assert!(auth.verify_token(&tampered).is_none());
        let expired = TokenClaims {
            sub: "ci".into(),
            exp: now_secs() - 1,
            access: vec![],
        };
        let payload = serde_json::to_vec(&expired).unwrap();
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(auth.sign(&payload))
        );
        assert!(auth.verify_token(&token).is_none());
    }

    #[tokio::test]
    async fn anonymous_pull_is_per_repository() {
        let auth = authenticator();
        let pull = |name: &str| Scope::Repository {
            name: name.into(),
            actions: vec![Action::Pull],
        };
        assert!(auth
            .authorize(&Principal::Anonymous, &pull("public/x"))
            .is_ok());
        let err = auth
            .authorize(&Principal::Anonymous, &pull("team/x"))
            .unwrap_err();
        let RegistryError::Unauthorized { challenge } = err else {
            panic!("expected a challenge");
        };
        assert!(challenge.contains("scope=\"repository:team/x:pull\""));
        assert!(auth
            .authorize(&Principal::Anonymous, &push("public/x"))
            .is_err());
    }
}
