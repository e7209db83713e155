//! The HTTP edge: one handler parses the path into an [`Endpoint`], checks auth for the
//! scope the method needs, and dispatches; every response carries the API version header.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use kiln_telemetry::HttpServerSpan;

use crate::auth::{Principal, Scope};
use crate::config::Action;
use crate::endpoint::{Endpoint, EndpointLabels};
use crate::error::{RegistryError, Result};
use crate::{blob_api, listing_api, manifest_api, usage_metrics, RegistryState};

pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
pub const DOCKER_UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
pub const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
pub const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

pub fn router(state: Arc<RegistryState>) -> Router {
    Router::new()
        // Probes for orchestrators. Outside /v2/, so auth never applies; the metadata and
        // blob stores are open before the router exists, so serving means ready.
        .route(
            "/healthz",
            axum::routing::get(|| std::future::ready("ok\n")),
        )
        .route(
            "/readyz",
            axum::routing::get(|| std::future::ready("ready\n")),
        )
        .fallback(handle)
        .with_state(state)
        .layer(axum::middleware::map_response(add_api_version))
}

async fn add_api_version(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    response
}

/// Every request under /v2/ (and /token): parsed once, traced when export is on (the
/// probes are not: a span every few seconds per kubelet says nothing), counted.
async fn handle(State(state): State<Arc<RegistryState>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let uri = request.uri().clone();
    let endpoint = Endpoint::parse(uri.path());
    let labels = endpoint
        .as_ref()
        .map_or(EndpointLabels::UNMATCHED, Endpoint::labels);
    let span = HttpServerSpan::start(&method, labels.route, request.headers());
    let serve = async {
        let response = match endpoint {
            Ok(endpoint) => dispatch(&state, endpoint, request).await,
            Err(e) => Err(e),
        };
        response.unwrap_or_else(IntoResponse::into_response)
    };
    let response = match &span {
        Some(span) => span.instrument(serve).await,
        None => serve.await,
    };
    usage_metrics::record_request(labels.kind, &method, &response, started.elapsed());
    tracing::debug!(%method, %uri, status = response.status().as_u16(), "request");
    match span {
        Some(span) => span.respond(response).map(Body::new),
        None => response,
    }
}

/// One request, taken apart for the handlers.
pub struct Call {
    pub method: Method,
    pub headers: HeaderMap,
    pub query: Query,
    pub body: Body,
    pub principal: Principal,
}

/// Query parameters in order; repeated keys are kept.
pub struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        Query(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

fn not_allowed(method: &Method, path: &str) -> RegistryError {
    RegistryError::MethodNotAllowed {
        method: method.to_string(),
        path: path.to_string(),
    }
}

/// What the method on the endpoint needs, or why it is refused outright.
fn required_scope(
    state: &RegistryState,
    endpoint: &Endpoint,
    method: &Method,
    path: &str,
) -> Result<Scope> {
    let repository = |actions: &[Action]| Scope::Repository {
        name: endpoint.repository().unwrap_or_default().to_string(),
        actions: actions.to_vec(),
    };
    let is_read = *method == Method::GET || *method == Method::HEAD;
    let scope = match endpoint {
        Endpoint::Base if is_read => Scope::Base,
        Endpoint::Catalog if *method == Method::GET => Scope::Catalog,
        // The token endpoint authenticates on its own.
        Endpoint::Token if *method == Method::GET => Scope::Base,
        Endpoint::Manifest { .. } | Endpoint::Blob { .. } if is_read => repository(&[Action::Pull]),
        Endpoint::TagList { .. } | Endpoint::Referrers { .. } if *method == Method::GET => {
            repository(&[Action::Pull])
        }
        Endpoint::Manifest { .. } if *method == Method::PUT => {
            repository(&[Action::Pull, Action::Push])
        }
        Endpoint::UploadStart { .. } if *method == Method::POST => {
            repository(&[Action::Pull, Action::Push])
        }
        Endpoint::Upload { .. }
            if [Method::GET, Method::PATCH, Method::PUT, Method::DELETE].contains(method) =>
        {
            repository(&[Action::Pull, Action::Push])
        }
        Endpoint::Manifest { .. } | Endpoint::Blob { .. } if *method == Method::DELETE => {
            if !state.config.deletes_enabled {
                // 405 UNSUPPORTED is how the spec says deletion is disabled.
                return Err(not_allowed(method, path));
            }
            repository(&[Action::Delete])
        }
        _ => return Err(not_allowed(method, path)),
    };
    Ok(scope)
}

async fn dispatch(
    state: &Arc<RegistryState>,
    endpoint: Endpoint,
    request: Request,
) -> Result<Response> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let scope = required_scope(state, &endpoint, &parts.method, path)?;
    let query = Query::parse(parts.uri.query());
    if endpoint == Endpoint::Token {
        let token = state
            .auth
            .issue_token(&parts.headers, &query.all("scope"))
            .await?;
        return Ok(axum::Json(token).into_response());
    }
    let principal = if state.auth.enabled() {
        let principal = state.auth.authenticate(&parts.headers, &scope).await?;
        state.auth.authorize(&parts.headers, &principal, &scope)?;
        principal
    } else {
        Principal::Anonymous
    };
    let call = Call {
        method: parts.method,
        headers: parts.headers,
        query,
        body,
        principal,
    };
    match endpoint {
        Endpoint::Base => Ok(json_response(StatusCode::OK, b"{}".to_vec())),
        Endpoint::Token => unreachable!("handled above"),
        Endpoint::Catalog => listing_api::catalog(state, call).await,
        Endpoint::TagList { name } => listing_api::tags(state, &name, call).await,
        Endpoint::Referrers { name, digest } => {
            manifest_api::referrers(state, &name, &digest, call).await
        }
        Endpoint::Manifest { name, reference } => match call.method {
            Method::GET | Method::HEAD => manifest_api::get(state, &name, &reference, call).await,
            Method::PUT => manifest_api::put(state, &name, &reference, call).await,
            _ => manifest_api::delete(state, &name, &reference).await,
        },
        Endpoint::Blob { name, digest } => match call.method {
            Method::GET | Method::HEAD => blob_api::get(state, &name, &digest, call).await,
            _ => blob_api::delete(state, &name, &digest).await,
        },
        Endpoint::UploadStart { name } => blob_api::start_upload(state, &name, call).await,
        Endpoint::Upload { name, id } => match call.method {
            Method::GET => blob_api::upload_status(state, &name, &id).await,
            Method::PATCH => blob_api::patch_upload(state, &name, &id, call).await,
            Method::PUT => blob_api::finish_upload(state, &name, &id, call).await,
            _ => blob_api::cancel_upload(state, &name, &id).await,
        },
    }
}

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A response with no body and the given headers. Values that cannot be headers (they
/// come from validated names and digests, so never in practice) are left out.
pub fn empty_response(status: StatusCode, headers: &[(HeaderName, String)]) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    let map = response.headers_mut();
    map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            map.insert(name.clone(), value);
        }
    }
    response
}

/// The `Link` header for the next page of a paginated list.
pub fn next_link(path: &str, n: usize, last: &str) -> String {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("n", &n.to_string())
        .append_pair("last", last)
        .finish();
    format!("<{path}?{query}>; rel=\"next\"")
}

/// Parses `n` and `last` of a paginated list; `n` is capped at `max`.
pub fn pagination(query: &Query, max: usize) -> Result<(usize, Option<String>)> {
    let n = match query.get("n") {
        None | Some("") => max,
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| RegistryError::Unsupported(format!("n={n:?} is not a number")))?
            .min(max),
    };
    Ok((n, query.get("last").map(str::to_string)))
}
