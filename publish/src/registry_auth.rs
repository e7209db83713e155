//! HTTP to one registry, authenticated as it demands: the `WWW-Authenticate` challenge,
//! basic credentials, and the Docker token flow with bearer tokens cached by scope.

use std::collections::{BTreeSet, HashMap};

use base64::Engine as _;
use reqwest::header::{HeaderMap, AUTHORIZATION};
use reqwest::{StatusCode, Url};

use crate::credentials::Credentials;
use crate::error::{PublishError, Result};
use crate::registry_tls::RegistryTls;

/// `repository:<name>:<actions>`, the scope grammar of the token flow.
pub(crate) fn repository_scope(repository: &str, actions: &str) -> String {
    format!("repository:{repository}:{actions}")
}

/// How a registry asked us to authenticate.
#[derive(Clone, Debug)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

#[derive(Default)]
struct AuthState {
    challenge: Option<Challenge>,
    /// Bearer tokens by the scopes they were issued for.
    tokens: HashMap<String, String>,
}

/// An HTTP client for one registry host that answers its authentication challenges.
pub(crate) struct AuthenticatedHttp {
    http: reqwest::Client,
    base: Url,
    registry: String,
    credentials: Option<Credentials>,
    /// Hosts besides the registry's own whose token realm may receive the credentials.
    trusted_realm_hosts: Vec<String>,
    auth: tokio::sync::Mutex<AuthState>,
}

impl AuthenticatedHttp {
    /// A client for `registry` (`host[:port]`), reached at `base`.
    pub(crate) fn new(
        base: Url,
        registry: &str,
        credentials: Option<Credentials>,
        tls: &RegistryTls,
    ) -> Result<Self> {
        let builder = reqwest::Client::builder()
            .user_agent(concat!("kiln-publish/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(30));
        let http = tls
            .configure(builder)?
            .build()
            .map_err(|e| PublishError::http(&base, e))?;
        Ok(AuthenticatedHttp {
            http,
            base,
            registry: registry.to_string(),
            credentials,
            trusted_realm_hosts: Vec::new(),
            auth: Default::default(),
        })
    }

    /// Lets the credentials go to token realms on these hosts too (Docker Hub's realm is
    /// `auth.docker.io`, not the registry's host).
    pub(crate) fn trust_realm_hosts(&mut self, hosts: Vec<String>) {
        self.trusted_realm_hosts = hosts;
    }

    /// Whether the credentials may be sent to `realm`: only to the registry's own host
    /// (or one trusted explicitly), and never in clear text off loopback unless the
    /// registry itself is plain HTTP by choice. A registry's challenge names the realm, so
    /// without this a hostile or spoofed registry could collect them.
    fn check_realm(&self, realm: &Url) -> std::result::Result<(), String> {
        let host = realm.host_str().unwrap_or_default();
        let own = self.base.host_str().unwrap_or_default();
        if host != own && !self.trusted_realm_hosts.iter().any(|h| h == host) {
            return Err(format!(
                "the registry sends credentials to a token service on another host ({host}); \
                 trust it with --trust-token-realm {host} if it is meant to"
            ));
        }
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if realm.scheme() != "https" && !loopback && self.base.scheme() == "https" {
            return Err(format!(
                "the token service {realm} is plain HTTP: credentials would cross the network \
                 in clear text"
            ));
        }
        Ok(())
    }

    /// Builds requests; send them with [`Self::send`] or [`Self::send_once`].
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.http
    }

    pub(crate) fn base(&self) -> &Url {
        &self.base
    }

    pub(crate) fn registry(&self) -> &str {
        &self.registry
    }

    /// Sends a request built by `make`, authenticating as the registry demands: on a 401
    /// it reads the challenge, obtains a bearer token for `scopes` (or uses basic auth)
    /// and sends a fresh request once more.
    pub(crate) async fn send<F>(&self, scopes: &[String], make: F) -> Result<reqwest::Response>
    where
        F: Fn() -> Result<reqwest::RequestBuilder>,
    {
        let response = self.send_once(make()?, scopes).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(challenge) = parse_challenge(response.headers()) else {
            return Ok(response);
        };
        let mut scopes = scopes.to_vec();
        if let Challenge::Bearer {
            scope: Some(extra), ..
        } = &challenge
        {
            scopes.push(extra.clone());
        }
        {
            let mut state = self.auth.lock().await;
            state.challenge = Some(challenge);
            state.tokens.remove(&scope_key(&scopes));
        }
        let response = self.send_once(make()?, &scopes).await?;
        if response.status() == StatusCode::UNAUTHORIZED && self.credentials.is_none() {
            return Err(PublishError::Auth {
                registry: self.registry.clone(),
                reason: "the registry requires credentials; set KILN_REGISTRY_USER and \
                         KILN_REGISTRY_PASSWORD or log in with docker"
                    .into(),
            });
        }
        Ok(response)
    }

    /// Sends `request` once, authorized for `scopes` as the last challenge asks: for
    /// bodies that cannot be replayed after a 401.
    pub(crate) async fn send_once(
        &self,
        request: reqwest::RequestBuilder,
        scopes: &[String],
    ) -> Result<reqwest::Response> {
        let request = self.authorize(request, scopes).await?;
        self.execute(request).await
    }

    /// Sends one request in a client span of its own, whose context the registry's request
    /// span adopts as its parent.
    async fn execute(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let mut request = request
            .build()
            .map_err(|e| PublishError::http(&self.base, e))?;
        let (url, method) = (request.url().clone(), request.method().clone());
        let span = kiln_telemetry::HttpClientSpan::start(
            &method,
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default(),
            request.headers_mut(),
        );
        let response = self.http.execute(request).await;
        span.end(response.as_ref().ok().map(|r| r.status().as_u16()));
        response.map_err(|e| PublishError::http(&url, e))
    }

    /// Adds the `Authorization` header the last challenge calls for, fetching a bearer
    /// token for `scopes` if none is cached.
    async fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        scopes: &[String],
    ) -> Result<reqwest::RequestBuilder> {
        let mut state = self.auth.lock().await;
        let Some(challenge) = state.challenge.clone() else {
            return Ok(request);
        };
        match challenge {
            Challenge::Basic => Ok(match &self.credentials {
                Some(credentials) => request.header(AUTHORIZATION, basic_header(credentials)),
                None => request,
            }),
            Challenge::Bearer { realm, service, .. } => {
                let key = scope_key(scopes);
                let token = match state.tokens.get(&key) {
                    Some(token) => token.clone(),
                    None => {
                        let token = self.fetch_token(&realm, service.as_deref(), scopes).await?;
                        state.tokens.insert(key, token.clone());
                        token
                    }
                };
                Ok(request.header(AUTHORIZATION, format!("Bearer {token}")))
            }
        }
    }

    /// The Docker token flow: GET the realm with service and scopes, with basic
    /// credentials when we have them (anonymous tokens otherwise).
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<String> {
        let auth_error = |reason: String| PublishError::Auth {
            registry: self.registry.clone(),
            reason,
        };
        let mut url = Url::parse(realm)
            .map_err(|e| auth_error(format!("token realm {realm:?} is not a URL: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for scope in scopes.iter().collect::<BTreeSet<_>>() {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.http.get(url.clone());
        if let Some(credentials) = &self.credentials {
            self.check_realm(&url).map_err(auth_error)?;
            request = request.header(AUTHORIZATION, basic_header(credentials));
        }
        let response = self.execute(request).await?;
        if !response.status().is_success() {
            return Err(auth_error(format!(
                "the token service at {realm} answered HTTP {}",
                response.status().as_u16()
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = response
            .json()
            .await
            .map_err(|e| auth_error(format!("unreadable token response: {e}")))?;
        answer
            .token
            .or(answer.access_token)
            .ok_or_else(|| auth_error("the token response holds no token".into()))
    }
}

fn scope_key(scopes: &[String]) -> String {
    scopes
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

fn basic_header(credentials: &Credentials) -> String {
    let raw = format!("{}:{}", credentials.username, credentials.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Parses `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` or `Basic …`.
fn parse_challenge(headers: &HeaderMap) -> Option<Challenge> {
    let value = headers
        .get(reqwest::header::WWW_AUTHENTICATE)?
        .to_str()
        .ok()?;
    let (scheme, params) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_auth_params(params);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key="value",key=value` pairs; quoted values may hold commas (scopes do).
fn parse_auth_params(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = remaining.trim_start_matches([',', ' ']);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse() {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::WWW_AUTHENTICATE,
            r#"Bearer realm="http://127.0.0.1:1/token",service="kiln",scope="repository:app:pull,push""#
                .parse()
                .unwrap(),
        );
        match parse_challenge(&headers).unwrap() {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                assert_eq!(realm, "http://127.0.0.1:1/token");
                assert_eq!(service.as_deref(), Some("kiln"));
                assert_eq!(scope.as_deref(), Some("repository:app:pull,push"));
            }
            other => panic!("expected a bearer challenge, got {other:?}"),
        }
        headers.insert(
            reqwest::header::WWW_AUTHENTICATE,
            r#"Basic realm="x""#.parse().unwrap(),
        );
        assert!(matches!(parse_challenge(&headers), Some(Challenge::Basic)));
    }

    #[test]
    fn credentials_go_only_to_the_registrys_own_realm_or_a_trusted_one() {
        let client = |base: &str| {
            let credentials = Credentials {
                username: "u".into(),
                password: "p".into(),
            };
            AuthenticatedHttp::new(
                Url::parse(base).unwrap(),
                "r",
                Some(credentials),
                &RegistryTls::default(),
            )
            .unwrap()
        };
        let realm = |url: &str| Url::parse(url).unwrap();
        let mut https = client("https://registry.example.com/");
        assert!(https
            .check_realm(&realm("https://registry.example.com/token"))
            .is_ok());
        let foreign = https
            .check_realm(&realm("https://auth.example.org/token"))
            .unwrap_err();
        assert!(
            foreign.contains("--trust-token-realm auth.example.org"),
            "{foreign}"
        );
        // Plain HTTP off loopback, from an HTTPS registry: refused even on its own host.
        let clear = https
            .check_realm(&realm("http://registry.example.com/token"))
            .unwrap_err();
        assert!(clear.contains("clear text"), "{clear}");
        https.trust_realm_hosts(vec!["auth.example.org".into()]);
        assert!(https
            .check_realm(&realm("https://auth.example.org/token"))
            .is_ok());
        // A loopback registry over plain HTTP, and one the user chose to reach insecurely.
        let local = client("http://127.0.0.1:5000/");
        assert!(local
            .check_realm(&realm("http://127.0.0.1:5000/token"))
            .is_ok());
        assert!(local
            .check_realm(&realm("http://localhost:5000/token"))
            .is_err());
        let insecure = client("http://registry.lan:5000/");
        assert!(insecure
            .check_realm(&realm("http://registry.lan:5000/token"))
            .is_ok());
    }
}
