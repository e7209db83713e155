//! How client commands (`run`, `publish`, `status`, `drain`, `token`) reach the
//! coordinator: its URL, a token, and TLS settings, each a flag and a `KILN_*` variable.

use std::path::PathBuf;

use anyhow::Context;

/// Where client commands (`run`, `publish`, `status`, `drain`) find the coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArg {
    /// The coordinator's gRPC endpoint.
    #[arg(
        long,
        env = "KILN_COORDINATOR",
        default_value = "grpc://127.0.0.1:8980",
        value_name = "URL"
    )]
    pub coordinator: String,
    /// A token for a coordinator whose auth is on, sent as `authorization: Bearer`.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// How a client reaches a `grpcs://` server.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM CA certificates to trust for grpcs:// [default: the system's roots].
    #[arg(long, env = "KILN_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a server that wants mutual TLS.
    #[arg(
        long,
        env = "KILN_CLIENT_CERT",
        value_name = "PEM",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(
        long,
        env = "KILN_CLIENT_KEY",
        value_name = "PEM",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    pub fn load(&self) -> anyhow::Result<kiln_client::ClientTls> {
        Ok(kiln_client::ClientTls::from_files(
            self.ca_cert.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )?)
    }
}

impl CoordinatorArg {
    /// The credentials `--token` / `KILN_TOKEN` give, if any.
    pub fn credentials(&self) -> anyhow::Result<Option<kiln_client::Credentials>> {
        self.token
            .as_deref()
            .map(|token| {
                kiln_client::Credentials::bearer(token)
                    .context("the token has characters a gRPC header cannot carry")
            })
            .transpose()
    }

    /// `message` as a request carrying the credentials.
    pub fn request<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(credentials) = self.credentials()? {
            credentials.apply(&mut request);
        }
        Ok(request)
    }
}
