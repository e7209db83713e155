//! The HTTP edge: one handler parses the path into an [`Endpoint`], checks auth for the
//! scope the method needs, and dispatches; every response carries the API version header.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use kiln_telemetry::HttpServerSpan;

use crate::auth::Principal;
use crate::call::{json_response, Call, Query};
use crate::endpoint::{Endpoint, EndpointLabels};
use crate::error::Result;
use crate::operation::Operation;
use crate::{blob_api, listing_api, manifest_api, usage_metrics, RegistryState};

const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

pub fn router(state: Arc<RegistryState>) -> Router {
    Router::new()
        // Probes for orchestrators, outside /v2/ so auth never applies. Ready is the
        // process's readiness when the binary gives one (`Registry::set_readiness`), so
        // this port and the metrics port agree; else serving means ready.
        .route(
            "/healthz",
            axum::routing::get(|| std::future::ready("ok\n")),
        )
        .route("/readyz", axum::routing::get(readiness))
        .fallback(handle)
        .with_state(state)
        .layer(axum::middleware::map_response(add_api_version))
}

async fn readiness(State(state): State<Arc<RegistryState>>) -> Response {
    let probe = state
        .readiness
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let (ready, why) = probe.map_or_else(|| (true, "ready\n".to_string()), |probe| probe());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, why).into_response()
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

async fn dispatch(
    state: &Arc<RegistryState>,
    endpoint: Endpoint,
    request: Request,
) -> Result<Response> {
    let (parts, body) = request.into_parts();
    // Failed logins are counted per client address (see `auth::password_check`).
    let client = parts
        .extensions
        .get::<axum::extract::ConnectInfo<ClientAddress>>()
        .map(|info| info.0 .0.ip());
    let operation = Operation::new(
        endpoint,
        &parts.method,
        parts.uri.path(),
        state.config.deletes_enabled,
    )?;
    let query = Query::parse(parts.uri.query());
    if operation == Operation::Token {
        let token = state
            .auth
            .issue_token(&parts.headers, client, &query.all("scope"))
            .await?;
        return Ok(axum::Json(token).into_response());
    }
    let principal = if state.auth.enabled() {
        let scope = operation.scope();
        let principal = state
            .auth
            .authenticate(&parts.headers, client, &scope)
            .await?;
        state.auth.authorize(&principal, &scope)?;
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
    match operation {
        Operation::Base => Ok(json_response(StatusCode::OK, b"{}".to_vec())),
        Operation::Token => unreachable!("answered above, before authentication"),
        Operation::Catalog => listing_api::catalog(state, call).await,
        Operation::ListTags { name } => listing_api::tags(state, &name, call).await,
        Operation::ListReferrers { name, digest } => {
            manifest_api::referrers(state, &name, &digest, call).await
        }
        Operation::PullManifest { name, reference } => {
            manifest_api::get(state, &name, &reference, call).await
        }
        Operation::PushManifest { name, reference } => {
            manifest_api::put(state, &name, &reference, call).await
        }
        Operation::DeleteManifest { name, reference } => {
            manifest_api::delete(state, &name, &reference).await
        }
        Operation::PullBlob { name, digest } => blob_api::get(state, &name, &digest, call).await,
        Operation::DeleteBlob { name, digest } => blob_api::delete(state, &name, &digest).await,
        Operation::StartUpload { name } => blob_api::start_upload(state, &name, call).await,
        Operation::UploadStatus { name, id } => blob_api::upload_status(state, &name, &id).await,
        Operation::AppendUpload { name, id } => {
            blob_api::patch_upload(state, &name, &id, call).await
        }
        Operation::FinishUpload { name, id } => {
            blob_api::finish_upload(state, &name, &id, call).await
        }
        Operation::CancelUpload { name, id } => blob_api::cancel_upload(state, &name, &id).await,
    }
}

/// The client's address, as connect info for kiln's listeners (axum knows it for its own
/// `TcpListener` alone); failed logins are counted by it.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddress(pub std::net::SocketAddr);
