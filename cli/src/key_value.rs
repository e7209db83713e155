//! `KEY=VALUE` flags (`--platform`, `--env`, `--label`), parsed one way for every command.

/// Splits at the first `=`, so the value may hold more; the key must not be empty.
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        Some(_) => Err(format!(
            "expected KEY=VALUE, got {text:?}: the key is empty"
        )),
        None => Err(format!("expected KEY=VALUE, got {text:?}: there is no '='")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_parse() {
        assert_eq!(
            parse_key_value("os=linux").unwrap(),
            ("os".into(), "linux".into())
        );
        assert_eq!(
            parse_key_value("A=b=c").unwrap(),
            ("A".into(), "b=c".into())
        );
        assert_eq!(parse_key_value("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_key_value("novalue").unwrap_err().contains("no '='"));
        assert!(parse_key_value("=x").unwrap_err().contains("key is empty"));
    }
}
