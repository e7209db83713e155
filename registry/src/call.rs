//! What the HTTP edge hands the endpoint handlers and takes back: the request taken
//! apart ([`Call`], [`Query`]), the response helpers and the header names the spec uses.
//! A leaf: it imports no handler and not the edge, so neither imports the other.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::Principal;
use crate::error::{RegistryError, Result};

pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
pub const DOCKER_UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
pub const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
pub const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

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
    pub(crate) fn parse(query: Option<&str>) -> Self {
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
