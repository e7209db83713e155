//! Who is calling, as the handlers see it.

use std::sync::Arc;

use tonic::Request;

use super::scope::Scope;
use super::tokens::TokenRecord;
use crate::CoordinatorError;

/// The caller of one gRPC call, put in its extensions by the auth layer.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Authentication is off: everything is allowed.
    Open,
    /// A call the layer lets through without a token because the handler checks its own
    /// credentials (the join token) or needs none (capabilities, health).
    Unchecked,
    /// The holder of a valid token.
    Token(Arc<TokenRecord>),
    /// No credentials, where `coordinator.auth.anonymous_scopes` grants some scopes.
    Anonymous(Arc<TokenRecord>),
}

impl Caller {
    /// Whether `scope` on `instance` is allowed.
    pub fn allows(&self, scope: Scope, instance: &str) -> bool {
        match self {
            Caller::Open => true,
            Caller::Unchecked => false,
            Caller::Token(record) | Caller::Anonymous(record) => {
                record.grant().allows(scope, instance)
            }
        }
    }

    pub fn require(&self, scope: Scope, instance: &str) -> Result<(), CoordinatorError> {
        match self {
            _ if self.allows(scope, instance) => Ok(()),
            // Someone who sent nothing is told to send a token, not that one lacks a scope.
            Caller::Anonymous(_) => Err(CoordinatorError::Unauthenticated(format!(
                "{scope} needs a token: send `authorization: Bearer <token>`"
            ))),
            _ => Err(CoordinatorError::PermissionDenied {
                scope,
                instance: instance.to_string(),
            }),
        }
    }

    /// Whether the admin API is open to it.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Unchecked => false,
            Caller::Token(record) => record.grant().is_admin(),
            Caller::Anonymous(_) => false,
        }
    }
}

/// The caller of `request`. A request that did not pass the auth layer is nobody's: it
/// may do nothing.
pub fn caller_of<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Unchecked)
}

/// Refuses `request` unless its caller holds `scope` on `instance`.
pub fn authorize<T>(
    request: &Request<T>,
    scope: Scope,
    instance: &str,
) -> Result<(), CoordinatorError> {
    match request.extensions().get::<Caller>() {
        Some(caller) => caller.require(scope, instance),
        None => Caller::Unchecked.require(scope, instance),
    }
}
