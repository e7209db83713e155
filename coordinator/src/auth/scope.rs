//! What a token may do: scopes, optionally limited to one instance name.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One permission, as written on a token and in error messages (`cas:read`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// FindMissingBlobs, BatchReadBlobs, GetTree, ByteStream Read.
    #[serde(rename = "cas:read")]
    CasRead,
    /// BatchUpdateBlobs, ByteStream Write and QueryWriteStatus (and FindMissingBlobs,
    /// which every upload starts with).
    #[serde(rename = "cas:write")]
    CasWrite,
    /// GetActionResult.
    #[serde(rename = "ac:read")]
    AcRead,
    /// UpdateActionResult. Results of remote execution reach the cache through the
    /// workers' own stream, so only trusted CI that runs actions locally needs this.
    #[serde(rename = "ac:write")]
    AcWrite,
    /// Execute and WaitExecution, and seeing or cancelling operations of the instance.
    #[serde(rename = "execute")]
    Execute,
    /// The admin API (status, draining, tokens), and every other scope on every instance.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::CasRead,
        Scope::CasWrite,
        Scope::AcRead,
        Scope::AcWrite,
        Scope::Execute,
        Scope::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scope::CasRead => "cas:read",
            Scope::CasWrite => "cas:write",
            Scope::AcRead => "ac:read",
            Scope::AcWrite => "ac:write",
            Scope::Execute => "execute",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Scope::ALL.iter().map(|s| s.name()).collect();
                format!("unknown scope {s:?} (known: {})", known.join(", "))
            })
    }
}

/// Parses `cas:read,ac:read` (commas or whitespace between scopes).
pub fn parse_scopes(list: &str) -> Result<BTreeSet<Scope>, String> {
    let scopes: BTreeSet<Scope> = list
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if scopes.is_empty() {
        return Err("a token needs at least one scope".into());
    }
    Ok(scopes)
}

/// The scopes a token grants, and the one instance name they apply to (all when unset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub scopes: BTreeSet<Scope>,
    pub instance: Option<String>,
}

impl Grant {
    /// Whether `scope` on `instance` is granted. `admin` holds every scope, and only an
    /// unrestricted grant reaches every instance.
    pub fn allows(&self, scope: Scope, instance: &str) -> bool {
        let on_instance = self.instance.as_deref().is_none_or(|only| only == instance);
        on_instance && (self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin))
    }

    /// Whether the admin API is open to it: `admin`, on every instance.
    pub fn is_admin(&self) -> bool {
        self.instance.is_none() && self.scopes.contains(&Scope::Admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_print_alike() {
        let scopes = parse_scopes("cas:read, ac:read execute").unwrap();
        assert_eq!(
            scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["cas:read", "ac:read", "execute"]
        );
        assert!(parse_scopes("cas:rw").unwrap_err().contains("cas:rw"));
        assert!(parse_scopes(" , ").is_err());
    }

    #[test]
    fn a_grant_reaches_its_instance_only_and_admin_holds_every_scope() {
        let ci = Grant {
            scopes: parse_scopes("cas:read,cas:write").unwrap(),
            instance: Some("ci".into()),
        };
        assert!(ci.allows(Scope::CasWrite, "ci"));
        assert!(!ci.allows(Scope::CasWrite, "other"));
        assert!(!ci.allows(Scope::Execute, "ci"));
        assert!(!ci.is_admin());
        let admin = Grant {
            scopes: parse_scopes("admin").unwrap(),
            instance: None,
        };
        assert!(admin.allows(Scope::AcWrite, "anything"));
        assert!(admin.is_admin());
    }
}
