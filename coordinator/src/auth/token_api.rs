//! The admin API's token calls (`kiln token create | list | revoke`), between their
//! protobuf messages and the [`TokenStore`].

use kiln_proto::admin::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensResponse, TokenInfo,
};
use kiln_proto::protobuf::Timestamp;

use super::scope::parse_scopes;
use super::tokens::{now_unix, TokenRecord, TokenStore};
use crate::CoordinatorError;

/// The longest name a token may be given: it is shown, not parsed.
const MAX_NAME_CHARS: usize = 200;

pub(crate) async fn create(
    tokens: &TokenStore,
    request: CreateTokenRequest,
) -> Result<CreateTokenResponse, CoordinatorError> {
    if request.name.chars().count() > MAX_NAME_CHARS {
        return Err(CoordinatorError::bad_request(
            "name",
            format!("is longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    let scopes = parse_scopes(&request.scopes.join(","))
        .map_err(|e| CoordinatorError::bad_request("scopes", e))?;
    let expires_unix = match request.valid_for {
        None => None,
        Some(valid_for) if valid_for.seconds > 0 => {
            Some(now_unix().saturating_add(valid_for.seconds as u64))
        }
        Some(_) => {
            return Err(CoordinatorError::bad_request(
                "valid_for",
                "must be at least one second",
            ))
        }
    };
    let instance = (!request.instance.is_empty()).then_some(request.instance);
    let (token, record) = tokens
        .create(&request.name, scopes, instance, expires_unix)
        .await?;
    tracing::info!(id = %record.id, name = %record.name, "created a token");
    Ok(CreateTokenResponse {
        token,
        info: Some(info(&record)),
    })
}

pub(crate) async fn list(tokens: &TokenStore) -> Result<ListTokensResponse, CoordinatorError> {
    Ok(ListTokensResponse {
        tokens: tokens.list().await?.iter().map(info).collect(),
    })
}

pub(crate) async fn revoke(tokens: &TokenStore, id: &str) -> Result<(), CoordinatorError> {
    if tokens.revoke(id).await? {
        tracing::info!(%id, "revoked a token");
        Ok(())
    } else {
        Err(CoordinatorError::NotFound(format!(
            "no stored token has the id {id:?}"
        )))
    }
}

fn info(record: &TokenRecord) -> TokenInfo {
    let timestamp = |seconds: u64| Timestamp {
        seconds: seconds as i64,
        nanos: 0,
    };
    TokenInfo {
        id: record.id.clone(),
        name: record.name.clone(),
        scopes: record.scopes.iter().map(|s| s.to_string()).collect(),
        instance: record.instance.clone().unwrap_or_default(),
        created: (record.created_unix > 0).then(|| timestamp(record.created_unix)),
        expires: record.expires_unix.map(timestamp),
        configured: record.configured,
    }
}
