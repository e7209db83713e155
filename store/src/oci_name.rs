//! The OCI Distribution Spec's grammar for repository names and tags, shared by the
//! registry (which refuses bad names in requests) and `kiln publish` (which refuses them
//! before pushing anything).
//!
//! - name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
//!   at most [`MAX_REPOSITORY_NAME_LEN`] bytes;
//! - tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
//!
//! Both are matched by hand: they are small, and kiln-store has no regex engine.

/// A name outside the grammar. It is not a [`StoreError`](crate::StoreError): no storage
/// operation produces it, and the protocol crates map storage errors exhaustively.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid repository name {name:?}: {reason}")]
    Repository { name: String, reason: String },
    #[error("invalid tag {0:?}: tags must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Tag(String),
}

/// Docker and distribution refuse longer names, so a longer one could never be pulled.
pub const MAX_REPOSITORY_NAME_LEN: usize = 255;
/// The tag grammar's length limit.
pub const MAX_TAG_LEN: usize = 128;

/// Checks `name` against the repository name grammar.
pub fn validate_repository_name(name: &str) -> Result<(), NameError> {
    let invalid = |reason: String| NameError::Repository {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if name.len() > MAX_REPOSITORY_NAME_LEN {
        return Err(invalid(format!(
            "it is {} characters; at most {MAX_REPOSITORY_NAME_LEN} are allowed",
            name.len()
        )));
    }
    match name
        .split('/')
        .find(|component| !is_path_component(component))
    {
        None => Ok(()),
        Some(component) => Err(invalid(format!(
            "component {component:?} is not runs of [a-z0-9] joined by '.', '_', '__' or dashes"
        ))),
    }
}

/// Checks `tag` against the tag grammar.
pub fn validate_tag(tag: &str) -> Result<(), NameError> {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && tag.len() <= MAX_TAG_LEN {
        Ok(())
    } else {
        Err(NameError::Tag(tag.to_string()))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: alphanumeric runs, each separator followed by
/// another run.
fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let mut at = 0;
    loop {
        let run_start = at;
        while bytes.get(at).is_some_and(|b| is_lower_alnum(*b)) {
            at += 1;
        }
        if at == run_start {
            return false;
        }
        match bytes.get(at) {
            None => return true,
            Some(b'.') => at += 1,
            Some(b'_') => {
                at += if bytes.get(at + 1) == Some(&b'_') {
                    2
                } else {
                    1
                }
            }
            Some(b'-') => {
                while bytes.get(at) == Some(&b'-') {
                    at += 1;
                }
            }
            Some(_) => return false,
        }
    }
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_grammar() {
        for good in [
            "app",
            "team/app",
            "a/b/c",
            "a.b",
            "a_b",
            "a__b",
            "a-b",
            "a---b",
            "0x/9",
            "library/ubuntu-22.04",
        ] {
            validate_repository_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for bad in [
            "", "App", "a/", "/a", "a//b", ".a", "a.", "a..b", "a___b", "a._b", "a-.b", "a_-b",
            "_a", "a-", "a b", "a:b", "é",
        ] {
            let err = validate_repository_name(bad).unwrap_err();
            assert!(
                matches!(&err, NameError::Repository { name, .. } if name == bad),
                "{bad:?}: {err}"
            );
        }
        validate_repository_name(&format!("a/{}", "b".repeat(MAX_REPOSITORY_NAME_LEN - 2)))
            .unwrap();
        let err = validate_repository_name(&"b".repeat(MAX_REPOSITORY_NAME_LEN + 1)).unwrap_err();
        assert!(err.to_string().contains("at most 255"), "{err}");
    }

    #[test]
    fn tags_follow_the_grammar() {
        for good in ["v1.2.3", "_x", "main-abc1234", "A", "a-_.b"] {
            validate_tag(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        validate_tag(&"a".repeat(MAX_TAG_LEN)).unwrap();
        for bad in ["", ".x", "-x", "a/b", "a:b", "é"] {
            assert!(
                matches!(validate_tag(bad), Err(NameError::Tag(ref t)) if t == bad),
                "{bad:?} was accepted"
            );
        }
        assert!(validate_tag(&"a".repeat(MAX_TAG_LEN + 1)).is_err());
    }
}
