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

/// How a certificate's grant names itself (`cert:<CN>`), as a token's id would.
pub(crate) const CERTIFICATE_ID_PREFIX: &str = "cert:";

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
                id: format!("{CERTIFICATE_ID_PREFIX}{}", grant.common_name),
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

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The grant of certificates whose subject CN is `common_name`, if any.
    pub(crate) fn named(&self, common_name: &str) -> Option<Arc<TokenRecord>> {
        self.0.get(common_name).cloned()
    }
}

/// The subject CN of the client certificate the connection presented (the TLS layer has
/// verified it against `tls.client_ca`).
pub(crate) fn peer_common_name(extensions: &http::Extensions) -> Option<String> {
    let certs = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    common_name_of(&cert)
}

fn common_name_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_string())
}

/// The subject CN of the first certificate in a PEM file (a server's own certificate).
pub(crate) fn common_name_in_pem(pem: &[u8]) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    common_name_of(&cert)
}
