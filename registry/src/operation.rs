//! What a request asks for: its endpoint and method, parsed together into one
//! [`Operation`]. That one value decides both the scope the request needs and the handler
//! that serves it, so the two can never disagree, and a method an endpoint does not take
//! is refused once, here (405 UNSUPPORTED, as the spec says).

use axum::http::Method;
use kiln_store::ContentHash;

use crate::auth::Scope;
use crate::config::Action;
use crate::endpoint::{Endpoint, Reference};
use crate::error::{RegistryError, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `GET /v2/`: the version check.
    Base,
    Catalog,
    /// The token service; it authenticates on its own.
    Token,
    /// GET or HEAD of a manifest (the handler looks at the method for HEAD).
    PullManifest {
        name: String,
        reference: Reference,
    },
    PushManifest {
        name: String,
        reference: Reference,
    },
    DeleteManifest {
        name: String,
        reference: Reference,
    },
    /// GET or HEAD of a blob.
    PullBlob {
        name: String,
        digest: ContentHash,
    },
    DeleteBlob {
        name: String,
        digest: ContentHash,
    },
    StartUpload {
        name: String,
    },
    UploadStatus {
        name: String,
        id: String,
    },
    AppendUpload {
        name: String,
        id: String,
    },
    FinishUpload {
        name: String,
        id: String,
    },
    CancelUpload {
        name: String,
        id: String,
    },
    ListTags {
        name: String,
    },
    ListReferrers {
        name: String,
        digest: ContentHash,
    },
}

impl Operation {
    /// The operation `method` on `endpoint` is, or 405 when the endpoint does not take
    /// that method (or deletion is switched off).
    pub fn new(
        endpoint: Endpoint,
        method: &Method,
        path: &str,
        deletes_enabled: bool,
    ) -> Result<Self> {
        let read = *method == Method::GET || *method == Method::HEAD;
        let get = *method == Method::GET;
        let delete = *method == Method::DELETE && deletes_enabled;
        let operation = match endpoint {
            Endpoint::Base if read => Operation::Base,
            Endpoint::Catalog if get => Operation::Catalog,
            Endpoint::Token if get => Operation::Token,
            Endpoint::Manifest { name, reference } if read => {
                Operation::PullManifest { name, reference }
            }
            Endpoint::Manifest { name, reference } if *method == Method::PUT => {
                Operation::PushManifest { name, reference }
            }
            Endpoint::Manifest { name, reference } if delete => {
                Operation::DeleteManifest { name, reference }
            }
            Endpoint::Blob { name, digest } if read => Operation::PullBlob { name, digest },
            Endpoint::Blob { name, digest } if delete => Operation::DeleteBlob { name, digest },
            Endpoint::UploadStart { name } if *method == Method::POST => {
                Operation::StartUpload { name }
            }
            Endpoint::Upload { name, id } if get => Operation::UploadStatus { name, id },
            Endpoint::Upload { name, id } if *method == Method::PATCH => {
                Operation::AppendUpload { name, id }
            }
            Endpoint::Upload { name, id } if *method == Method::PUT => {
                Operation::FinishUpload { name, id }
            }
            Endpoint::Upload { name, id } if *method == Method::DELETE => {
                Operation::CancelUpload { name, id }
            }
            Endpoint::TagList { name } if get => Operation::ListTags { name },
            Endpoint::Referrers { name, digest } if get => {
                Operation::ListReferrers { name, digest }
            }
            // Anything else, deletion while it is disabled included: 405 UNSUPPORTED is how
            // the spec says an endpoint does not take a method.
            _ => {
                return Err(RegistryError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.to_string(),
                })
            }
        };
        Ok(operation)
    }

    /// The scope a caller needs for this operation.
    pub fn scope(&self) -> Scope {
        let repository = |name: &str, actions: &[Action]| Scope::Repository {
            name: name.to_string(),
            actions: actions.to_vec(),
        };
        match self {
            Operation::Base | Operation::Token => Scope::Base,
            Operation::Catalog => Scope::Catalog,
            Operation::PullManifest { name, .. }
            | Operation::PullBlob { name, .. }
            | Operation::ListTags { name }
            | Operation::ListReferrers { name, .. } => repository(name, &[Action::Pull]),
            Operation::PushManifest { name, .. }
            | Operation::StartUpload { name }
            | Operation::UploadStatus { name, .. }
            | Operation::AppendUpload { name, .. }
            | Operation::FinishUpload { name, .. }
            | Operation::CancelUpload { name, .. } => {
                repository(name, &[Action::Pull, Action::Push])
            }
            Operation::DeleteManifest { name, .. } | Operation::DeleteBlob { name, .. } => {
                repository(name, &[Action::Delete])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operation(method: Method, path: &str, deletes: bool) -> Result<Operation> {
        Operation::new(Endpoint::parse(path)?, &method, path, deletes)
    }

    #[test]
    fn one_value_decides_scope_and_handler() {
        let push = operation(Method::PUT, "/v2/a/b/manifests/v1", true).unwrap();
        assert!(matches!(push, Operation::PushManifest { ref name, .. } if name == "a/b"));
        assert_eq!(
            push.scope(),
            Scope::Repository {
                name: "a/b".into(),
                actions: vec![Action::Pull, Action::Push]
            }
        );
        let head = operation(Method::HEAD, "/v2/a/manifests/v1", true).unwrap();
        assert!(matches!(head, Operation::PullManifest { .. }));
        assert_eq!(
            operation(Method::GET, "/v2/", true).unwrap().scope(),
            Scope::Base
        );
    }

    #[test]
    fn methods_an_endpoint_does_not_take_are_refused() {
        for (method, path) in [
            (Method::POST, "/v2/a/manifests/v1"),
            (Method::PUT, "/v2/a/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            (Method::DELETE, "/v2/_catalog"),
            (Method::PATCH, "/v2/a/tags/list"),
            (Method::POST, "/token"),
        ] {
            assert!(
                matches!(operation(method.clone(), path, true), Err(RegistryError::MethodNotAllowed { .. })),
                "{method} {path}"
            );
        }
        // Deletion switched off is the same refusal.
        assert!(matches!(
            operation(Method::DELETE, "/v2/a/manifests/v1", false),
            Err(RegistryError::MethodNotAllowed { .. })
        ));
        assert!(operation(Method::DELETE, "/v2/a/manifests/v1", true).is_ok());
    }
}
