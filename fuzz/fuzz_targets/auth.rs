//! Registry credentials (kiln-registry auth): Basic credentials decoding and bearer token
//! verification. A token verifies only as issued, and a changed token never verifies
//! as anything else.
#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kiln_registry::fuzzing::{decode_basic, Authenticator, TokenAccess, TokenClaims};
use kiln_registry::AuthConfig;
use libfuzzer_sys::fuzz_target;

static AUTH: LazyLock<Authenticator> = LazyLock::new(|| {
    Authenticator::new(&AuthConfig {
        enabled: true,
        token_key_hex: "42".repeat(32),
        ..AuthConfig::default()
    })
    .unwrap()
});

/// Far enough in the future for any run, and what a fresh token carries.
const LATER: u64 = 4_000_000_000;

#[derive(Arbitrary, Debug)]
enum Input {
    /// What follows `Authorization: Basic `.
    Basic(String),
    /// What follows `Authorization: Bearer `.
    Bearer(String),
    /// A token the registry issued, then perhaps altered in transit.
    Issued {
        sub: String,
        expired: bool,
        access: Vec<(String, String, Vec<String>)>,
        flip: Option<(usize, u8)>,
    },
}

fn same(a: &TokenClaims, b: &TokenClaims) -> bool {
    a.sub == b.sub && a.exp == b.exp && a.access == b.access
}

fuzz_target!(|input: Input| match input {
    Input::Basic(encoded) => {
        if let Some((user, password)) = decode_basic(&encoded) {
            // The first colon splits: user names cannot hold one, passwords can.
            assert!(!user.contains(':'));
            let again = STANDARD.encode(format!("{user}:{password}"));
            assert_eq!(decode_basic(&again), Some((user, password)));
        }
    }
    Input::Bearer(token) => {
        // Without the key nothing verifies; anything that did must re-issue identically.
        if let Some(claims) = AUTH.fuzz_verify_token(&token) {
            let again = AUTH
                .fuzz_verify_token(&AUTH.fuzz_encode_token(&claims))
                .unwrap();
            assert!(same(&claims, &again));
        }
    }
    Input::Issued {
        sub,
        expired,
        access,
        flip,
    } => {
        let claims = TokenClaims {
            sub,
            exp: if expired { 1 } else { LATER },
            access: access
                .into_iter()
                .map(|(kind, name, actions)| TokenAccess {
                    kind,
                    name,
                    actions,
                })
                .collect(),
        };
        let mut token = AUTH.fuzz_encode_token(&claims).into_bytes();
        let verified = AUTH.fuzz_verify_token(std::str::from_utf8(&token).unwrap());
        assert_eq!(verified.is_some(), !expired);
        if let Some((at, xor)) = flip {
            let at = at % token.len();
            token[at] ^= xor.max(1);
            if let Ok(altered) = std::str::from_utf8(&token) {
                if let Some(verified) = AUTH.fuzz_verify_token(altered) {
                    panic!("altered token {altered} verified as {verified:?}");
                }
            }
        }
    }
});
