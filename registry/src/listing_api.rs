//! Paginated listings: a repository's tags and the catalog of repositories.

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use crate::call::{json_response, next_link, pagination, Call};
use crate::config::Action;
use crate::error::Result;
use crate::RegistryState;

#[derive(serde::Serialize)]
struct TagList<'a> {
    name: &'a str,
    tags: Vec<String>,
}

#[derive(serde::Serialize)]
struct Catalog {
    repositories: Vec<String>,
}

/// A page of at most `n` items, with the `Link` to the next when there is one.
fn page(
    path: &str,
    n: usize,
    mut items: Vec<String>,
    body: impl FnOnce(Vec<String>) -> Vec<u8>,
) -> Response {
    let more = items.len() > n;
    items.truncate(n);
    let link = match items.last() {
        Some(last) if more => Some(next_link(path, n, last)),
        _ => None,
    };
    let mut response = json_response(StatusCode::OK, body(items));
    if let Some(link) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}

pub async fn tags(state: &Arc<RegistryState>, name: &str, call: Call) -> Result<Response> {
    state.index.require_repository(name).await?;
    let (n, last) = pagination(&call.query, state.config.limits.max_page_size)?;
    // One extra tells whether a next page exists.
    let tags: Vec<String> = state
        .index
        .tags(name, last.as_deref(), n.saturating_add(1))
        .await?
        .into_iter()
        .map(|(tag, _)| tag)
        .collect();
    Ok(page(&format!("/v2/{name}/tags/list"), n, tags, |tags| {
        serde_json::to_vec(&TagList { name, tags }).expect("tag lists serialise")
    }))
}

pub async fn catalog(state: &Arc<RegistryState>, call: Call) -> Result<Response> {
    let (n, last) = pagination(&call.query, state.config.limits.max_page_size)?;
    let mut repositories = state
        .index
        .repositories(last.as_deref(), n.saturating_add(1))
        .await?;
    if state.auth.enabled() {
        let principal = state.auth.catalog_principal(&call.principal);
        repositories.retain(|r| state.auth.allows(&principal, r, Action::Pull));
    }
    Ok(page("/v2/_catalog", n, repositories, |repositories| {
        serde_json::to_vec(&Catalog { repositories }).expect("catalogs serialise")
    }))
}
