//! `kiln token`: the API tokens of a coordinator whose auth is on.
//!
//! `create`, `list` and `revoke` ask the running coordinator (with an `admin` token);
//! `generate` makes a token and its hash offline, for the configuration file: that is how
//! the first admin token comes to exist, and how GitOps set-ups declare theirs.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kiln_coordinator::auth::{generate_token, hash_token, parse_scopes};
use kiln_proto::admin::v1::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo};

use crate::client_args::CoordinatorArg;
use crate::status::connect;

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token on the running coordinator and print it (only this once).
    Create {
        #[command(flatten)]
        target: CoordinatorArg,
        #[command(flatten)]
        token: NewToken,
        /// How long the token is valid, e.g. `30d` or `12h` [default: no expiry].
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List the coordinator's tokens (never the tokens themselves).
    List {
        #[command(flatten)]
        target: CoordinatorArg,
    },
    /// Revoke a token by the id `kiln token list` shows.
    Revoke {
        #[command(flatten)]
        target: CoordinatorArg,
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Make a token offline: the token goes to stderr, and the `[[coordinator.auth.tokens]]`
    /// entry that declares it (only its hash) to stdout, for the configuration file.
    Generate {
        #[command(flatten)]
        token: NewToken,
    },
}

#[derive(Debug, clap::Args)]
pub struct NewToken {
    /// What the token is for, e.g. `ci` or `alice's laptop`.
    #[arg(long, default_value = "")]
    name: String,
    /// Comma-separated scopes: cas:read, cas:write, ac:read, ac:write, execute, admin.
    #[arg(long, value_name = "SCOPES", value_parser = parse_scope_list)]
    scopes: String,
    /// Limit the scopes to this instance name [default: every instance].
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
}

fn parse_scope_list(list: &str) -> Result<String, String> {
    parse_scopes(list).map(|_| list.to_string())
}

fn scopes(list: &str) -> Vec<String> {
    parse_scopes(list)
        .map(|scopes| scopes.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default()
}

pub async fn run(command: TokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::Create {
            target,
            token,
            expires,
        } => {
            let mut client = connect(&target).await?;
            let created = client
                .create_token(target.request(CreateTokenRequest {
                    name: token.name,
                    scopes: scopes(&token.scopes),
                    instance: token.instance.unwrap_or_default(),
                    valid_for: expires.map(|d| kiln_proto::protobuf::Duration {
                        seconds: d.as_secs() as i64,
                        nanos: 0,
                    }),
                })?)
                .await
                .map_err(|status| anyhow::anyhow!("{}", status.message()))
                .context("creating a token")?
                .into_inner();
            let info = created.info.unwrap_or_default();
            eprintln!(
                "created token {} ({}); it is shown only this once:",
                info.id,
                describe(&info)
            );
            println!("{}", created.token);
        }
        TokenCommand::List { target } => {
            let mut client = connect(&target).await?;
            let tokens = client
                .list_tokens(target.request(ListTokensRequest {})?)
                .await
                .map_err(|status| anyhow::anyhow!("{}", status.message()))
                .context("listing tokens")?
                .into_inner()
                .tokens;
            println!("{:<16}  {:<20}  GRANTS", "ID", "NAME");
            for info in &tokens {
                println!("{:<16}  {:<20}  {}", info.id, info.name, describe(info));
            }
        }
        TokenCommand::Revoke { target, id } => {
            let mut client = connect(&target).await?;
            client
                .revoke_token(target.request(RevokeTokenRequest { id: id.clone() })?)
                .await
                .map_err(|status| anyhow::anyhow!("{}", status.message()))
                .with_context(|| format!("revoking token {id}"))?;
            eprintln!("revoked token {id}");
        }
        TokenCommand::Generate { token } => {
            let secret = generate_token();
            // The token goes to the terminal, the entry to stdout: `>> kiln.toml` then
            // puts only the hash in the file.
            eprintln!("The token (keep it secret; it is shown only this once):\n{secret}");
            println!("[[coordinator.auth.tokens]]");
            println!("name = {:?}", token.name);
            println!("hash = \"{}\"", hex::encode(hash_token(&secret)));
            println!("scopes = {:?}", scopes(&token.scopes));
            if let Some(instance) = token.instance {
                println!("instance = {instance:?}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cas:read, ac:read on "ci", expires …`, for people.
fn describe(info: &TokenInfo) -> String {
    let mut text = info.scopes.join(", ");
    if !info.instance.is_empty() {
        text.push_str(&format!(" on {:?}", info.instance));
    }
    if let Some(expires) = &info.expires {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(expires.seconds.max(0) as u64);
        text.push_str(&format!(
            ", expires {}",
            humantime::format_rfc3339_seconds(at)
        ));
    }
    if info.configured {
        text.push_str(" (configuration file)");
    }
    text
}
