//! Repository names, tags, manifest references and digests in their OCI and REAPI forms
//! (kiln-store `oci_name`, `digest`; kiln-registry `endpoint`), against the spec's
//! grammars as regular expressions.
#![no_main]

use std::sync::LazyLock;

use kiln_registry::endpoint::{parse_digest, Reference};
use kiln_store::{
    parse_missing_blob_subject, validate_repository_name, validate_tag, ContentHash, Digest,
    DigestFunction, MAX_REPOSITORY_NAME_LEN,
};
use libfuzzer_sys::fuzz_target;
use regex::Regex;

/// The OCI distribution spec's grammars, anchored.
static NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$").unwrap()
});
static TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$").unwrap());

const FUNCTIONS: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

fuzz_target!(|data: &[u8]| {
    // A digest that parses names the bytes it claims: hash the input and round-trip it.
    for function in FUNCTIONS {
        let digest = Digest::of_bytes(function, data);
        assert_eq!(
            ContentHash::parse_oci(&digest.oci()).unwrap(),
            digest.content_hash()
        );
        assert_eq!(
            Digest::parse_hash_slash_size(function, &digest.reapi()).unwrap(),
            digest
        );
        let subject = kiln_store::missing_blob_subject(&digest);
        assert_eq!(parse_missing_blob_subject(function, &subject), Some(digest));
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let name_ok = validate_repository_name(text).is_ok();
    assert_eq!(
        name_ok,
        NAME.is_match(text) && text.len() <= MAX_REPOSITORY_NAME_LEN,
        "repository name {text:?}"
    );
    assert_eq!(
        validate_tag(text).is_ok(),
        TAG.is_match(text),
        "tag {text:?}"
    );

    // Digests have one spelling: whatever parses prints back as it came.
    if let Ok(hash) = ContentHash::parse_oci(text) {
        assert_eq!(hash.oci(), text);
    }
    if let Ok(hash) = parse_digest(text) {
        assert_eq!(ContentHash::parse_oci(&hash.oci()).unwrap(), hash);
    }
    for function in FUNCTIONS {
        if let Ok(digest) = Digest::parse_hash_slash_size(function, text) {
            assert_eq!(
                Digest::parse_hash_slash_size(function, &digest.reapi()).unwrap(),
                digest
            );
            assert!(digest.size <= i64::MAX as u64);
        }
        if let Some(digest) = parse_missing_blob_subject(function, text) {
            let subject = kiln_store::missing_blob_subject(&digest);
            assert_eq!(parse_missing_blob_subject(function, &subject), Some(digest));
        }
    }
    // A reference is a tag or a digest, and prints back to something that parses alike.
    if let Ok(reference) = Reference::parse(text) {
        match &reference {
            Reference::Tag(tag) => assert_eq!(tag, text),
            Reference::Digest(_) => assert!(!TAG.is_match(text)),
        }
        assert_eq!(Reference::parse(&reference.to_string()).unwrap(), reference);
    }
});
