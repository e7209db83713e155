//! How `kiln publish` reaches its target registry over HTTPS: on loopback too (where plain
//! HTTP is the default) when asked, trusting a CA of the user's, and presenting a client
//! certificate to a registry that wants mutual TLS.

use kiln_client::ClientTls;

use crate::error::{PublishError, Result};

/// HTTPS settings for the registry a publish pushes to.
#[derive(Clone, Debug, Default)]
pub struct RegistryTls {
    /// HTTPS even for a loopback registry (one given as `https://HOST:PORT`).
    pub force_https: bool,
    /// CA certificates to trust instead of the system's roots, and a client certificate.
    /// (Its `server_name` does not apply: the registry's host is the name checked.)
    pub client: ClientTls,
}

impl RegistryTls {
    /// `builder` trusting the CA and presenting the client certificate, when given.
    pub(crate) fn configure(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder> {
        if let Some(pem) = &self.client.ca_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| PublishError::Option(format!("the CA certificate: {e}")))?;
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Some((cert, key)) = &self.client.identity_pem {
            // reqwest reads the key and the chain from one PEM; the error never holds them.
            let mut pem = key.clone();
            pem.push(b'\n');
            pem.extend_from_slice(cert);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| PublishError::Option(format!("the client certificate: {e}")))?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }
}
