//! Authentication for every gRPC call, as a tower layer in front of all services: it
//! finds the caller's token before any handler runs and hands the handlers a [`Caller`]
//! to check scopes against (the instance name is in each request's message, which only
//! the handler decodes).

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower_service::Service;

use super::caller::Caller;
use super::certificates::{peer_common_name, CertificateGrant, CertificateGrants};
use super::scope::{parse_scopes, Scope};
use super::tokens::{hash_token, now_unix, TokenRecord, TokenStore};
use crate::secret::same_secret;
use crate::CoordinatorError;

/// Calls answered without credentials: the capabilities (Bazel 2.1 sends no headers on
/// GetCapabilities, and they reveal nothing secret), health probes, and the worker
/// protocol and DrainWorker, which check the join token themselves.
const OPEN_PREFIXES: &[&str] = &[
    "/build.bazel.remote.execution.v2.Capabilities/",
    "/grpc.health.v1.Health/",
    "/kiln.worker.v1.Workers/",
    "/kiln.admin.v1.Admin/DrainWorker",
];

/// Set by a farm replica that forwards a call whose caller it knew only by a client
/// certificate: that certificate's subject CN. The leader believes it only from another
/// replica (see [`Authenticator::replica_name`]), and a replica never passes on a value a
/// client sent.
pub(crate) const FORWARDED_CERTIFICATE_HEADER: &str = "x-kiln-forwarded-certificate";

/// Who may call: everyone (auth off: `kiln up` on loopback), or the holders of tokens.
#[derive(Clone)]
pub struct Authenticator {
    tokens: TokenStore,
    enabled: bool,
    /// Workers fetch inputs and upload outputs through the CAS with the join token.
    workers: Option<(String, Arc<TokenRecord>)>,
    /// Scopes of mutual-TLS client certificates, by subject CN.
    certificates: CertificateGrants,
    /// What a call without credentials may do; none when unset.
    anonymous: Option<Arc<TokenRecord>>,
    /// A farm replica's own certificate CN: a peer presenting a client certificate with
    /// it is another replica (they share the server certificate, or the operator gave
    /// theirs the same name), trusted to say which certificate its caller presented.
    replica_name: Option<String>,
}

impl Authenticator {
    /// The tokens exist either way (an admin may create them before turning auth on);
    /// they are required only when `enabled`.
    /// The join token, when set, is a token too: it grants the CAS access workers need
    /// (`cas:read`, `cas:write`) and nothing else.
    pub fn new(
        tokens: TokenStore,
        enabled: bool,
        join_token: Option<String>,
        certificates: &[CertificateGrant],
        anonymous_scopes: &[String],
    ) -> Result<Self, String> {
        let anonymous = if anonymous_scopes.is_empty() {
            None
        } else {
            let scopes = parse_scopes(&anonymous_scopes.join(","))
                .map_err(|e| format!("anonymous_scopes: {e}"))?;
            if scopes.contains(&Scope::Admin) {
                return Err("anonymous_scopes: admin cannot be granted to anonymous calls".into());
            }
            Some(Arc::new(TokenRecord {
                id: "anonymous".into(),
                name: "calls without credentials".into(),
                scopes,
                instance: None,
                created_unix: 0,
                expires_unix: None,
                configured: true,
            }))
        };
        let workers = join_token.map(|token| {
            let record = TokenRecord {
                id: "join-token".into(),
                name: "the pool's workers".into(),
                scopes: [Scope::CasRead, Scope::CasWrite].into(),
                instance: None,
                created_unix: 0,
                expires_unix: None,
                configured: true,
            };
            (token, Arc::new(record))
        });
        Ok(Authenticator {
            tokens,
            enabled,
            workers,
            certificates: CertificateGrants::new(certificates)?,
            anonymous,
            replica_name: None,
        })
    }

    /// Trusts peers whose certificate CN is `name` (this replica's own) to forward their
    /// callers' certificate identities.
    pub fn trusting_replicas_named(mut self, name: Option<String>) -> Self {
        self.replica_name = name;
        self
    }

    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    /// The caller behind `authorization: Bearer <token>`, or why there is none.
    pub async fn caller(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, CoordinatorError> {
        if !self.enabled {
            return Ok(Caller::Open);
        }
        let authorization = headers.get(http::header::AUTHORIZATION);
        if authorization.is_none() {
            if let Some(grant) = self.certificate_grant(headers, extensions) {
                return Ok(Caller::Token(grant));
            }
            if let Some(anonymous) = &self.anonymous {
                return Ok(Caller::Anonymous(anonymous.clone()));
            }
        }
        let token = authorization
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                CoordinatorError::Unauthenticated(
                    "this server needs a token: send `authorization: Bearer <token>` \
                     (Bazel: --remote_header=authorization=Bearer...; kiln: --token or KILN_TOKEN)"
                        .into(),
                )
            })?;
        if let Some((join_token, workers)) = &self.workers {
            if same_secret(join_token, token) {
                return Ok(Caller::Token(workers.clone()));
            }
        }
        let record = self
            .tokens
            .lookup(&hash_token(token))
            .await?
            .ok_or_else(|| {
                CoordinatorError::Unauthenticated(
                    "the token is not valid: unknown or revoked".into(),
                )
            })?;
        if record.expired(now_unix()) {
            return Err(CoordinatorError::Unauthenticated(format!(
                "token {} has expired",
                record.id
            )));
        }
        Ok(Caller::Token(Arc::new(record)))
    }

    /// The grant of the caller's client certificate: the connection's own, or, on a
    /// connection from another replica, the one it says its caller presented. A
    /// replica's own certificate never stands for a caller.
    fn certificate_grant(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Option<Arc<TokenRecord>> {
        if self.certificates.is_empty() {
            return None;
        }
        let peer = peer_common_name(extensions)?;
        if self.replica_name.as_deref() == Some(peer.as_str()) {
            let forwarded = headers.get(FORWARDED_CERTIFICATE_HEADER)?.to_str().ok()?;
            return self.certificates.named(forwarded);
        }
        self.certificates.named(&peer)
    }
}

impl<S> tower_layer::Layer<S> for Authenticator {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            authenticator: Arc::new(self.clone()),
        }
    }
}

/// A service whose calls carry their [`Caller`], or are refused UNAUTHENTICATED.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    /// Shared: each call takes a reference, not a copy of the join token and the stores.
    authenticator: Arc<Authenticator>,
}

impl<S, B, R> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh clone waits for the
        // next one (tower's usual hand-over).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authenticator = self.authenticator.clone();
        Box::pin(async move {
            let path = request.uri().path();
            let caller = if OPEN_PREFIXES.iter().any(|open| path.starts_with(open)) {
                Ok(Caller::Unchecked)
            } else {
                authenticator
                    .caller(request.headers(), request.extensions())
                    .await
            };
            match caller {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(error) => {
                    tracing::debug!(path = %request.uri().path(), %error, "refused a call");
                    Ok(tonic::Status::from(error).into_http())
                }
            }
        })
    }
}
