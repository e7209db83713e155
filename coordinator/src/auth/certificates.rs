//! Mutual-TLS identities: a client certificate that the TLS layer already verified
//! against `tls.client_ca` names its holder in its subject's common name, which
//! `[[coordinator.auth.client_certificates]]` maps to scopes. A bearer token, when a call
//! carries one, takes precedence.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::scope::parse_scopes;
use super::tokens::TokenRecord;

/// Scopes for the certificates whose subject CN is `common_name`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateGrant {
    pub common_name: String,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub instance: Option<String>,
}

/// The configured grants, by common name.
#[derive(Clone, Default)]
pub(crate) struct CertificateGrants(Arc<HashMap<String, Arc<TokenRecord>>>);

impl CertificateGrants {
    pub(crate) fn new(grants: &[CertificateGrant]) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        for grant in grants {
            let scopes = parse_scopes(&grant.scopes.join(","))
                .map_err(|e| format!("client certificate {:?}: {e}", grant.common_name))?;
            let record = TokenRecord {
                id: format!("cert:{}", grant.common_name),
                name: format!("client certificate CN={}", grant.common_name),
                scopes,
                instance: grant.instance.clone(),
                created_unix: 0,
                expires_unix: None,
                configured: true,
            };
            by_name.insert(grant.common_name.clone(), Arc::new(record));
        }
        Ok(CertificateGrants(Arc::new(by_name)))
    }

    /// The grant of the certificate the connection presented, if any applies.
    pub(crate) fn of_connection(&self, extensions: &http::Extensions) -> Option<Arc<TokenRecord>> {
        if self.0.is_empty() {
            return None;
        }
        let certs = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()?
            .peer_certs()?;
        let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
        let common_name = cert.subject().iter_common_name().next()?.as_str().ok()?;
        self.0.get(common_name).cloned()
    }
}
