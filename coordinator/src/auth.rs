//! Who may call the coordinator's APIs: scoped tokens, optionally per instance name.
//!
//! - [`Authenticator`] is a tower layer in front of every service. With auth on, each
//!   call must carry `authorization: Bearer <token>` naming a known, unexpired token, or
//!   it is refused UNAUTHENTICATED before any handler runs (a few calls that carry their
//!   own credentials, or reveal nothing, are let through: see `layer.rs`).
//! - Each handler then checks the scope it needs on the instance its request names
//!   ([`authorize`]); a missing scope is PERMISSION_DENIED naming the scope, never the
//!   token.
//! - Tokens are kept as hashes ([`TokenStore`]), in the metadata store (`kiln token
//!   create`) or in the configuration file.

mod caller;
mod certificates;
mod layer;
mod registry_blobs;
mod scope;
mod token_api;
mod tokens;

pub use caller::{authorize, caller_of, Caller};
pub use certificates::CertificateGrant;
pub(crate) use certificates::{common_name_in_pem, CERTIFICATE_ID_PREFIX};
pub(crate) use layer::FORWARDED_CERTIFICATE_HEADER;
pub use layer::{Authenticated, Authenticator};
pub(crate) use registry_blobs::RegistryBlobGuard;
pub use scope::{parse_scopes, Grant, Scope};
pub(crate) use token_api::{create as create_token, list as list_tokens, revoke as revoke_token};
pub use tokens::{generate_token, hash_token, ConfiguredToken, TokenHash, TokenRecord, TokenStore};
