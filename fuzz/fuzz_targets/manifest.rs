//! Manifest and index parsing (kiln-registry `manifest::parse`), as a PUT to
//! `/v2/<name>/manifests/<ref>` delivers it: a Content-Type and a body.
#![no_main]

use kiln_registry::fuzzing::{parse_manifest, ParsedManifest};
use kiln_store::ContentHash;
use libfuzzer_sys::fuzz_target;

/// The Content-Types a client may send; the first input byte picks one, so the corpus
/// stays plain JSON after it.
const CONTENT_TYPES: [Option<&str>; 8] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/json"),
    Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
    Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
];

fn check(parsed: &ParsedManifest) {
    let image = parsed.media_type.ends_with("manifest.v1+json")
        || parsed.media_type.ends_with("manifest.v2+json");
    let index =
        parsed.media_type.ends_with("index.v1+json") || parsed.media_type.ends_with("list.v2+json");
    assert!(image ^ index, "accepted media type {}", parsed.media_type);
    // An image always names its config; an index names no blobs, only manifests.
    assert_eq!(image, !parsed.blobs.is_empty());
    if index {
        assert!(parsed.blobs.is_empty());
    } else {
        assert!(parsed.children.is_empty());
    }
    // Every digest the registry will look up names exactly what it printed.
    for reference in parsed
        .blobs
        .iter()
        .chain(&parsed.children)
        .chain(&parsed.subject)
    {
        let text = reference.hash.oci();
        assert_eq!(ContentHash::parse_oci(&text).unwrap(), reference.hash);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[selector as usize % CONTENT_TYPES.len()];
    let Ok(parsed) = parse_manifest(content_type, body) else {
        return;
    };
    check(&parsed);
    // The stored bytes are served back as they came; a client re-serialising them (any
    // JSON formatting) must get the same meaning.
    let value: serde_json::Value = serde_json::from_slice(body).unwrap();
    let again = parse_manifest(content_type, &serde_json::to_vec(&value).unwrap())
        .expect("re-serialised manifest refused");
    assert_eq!(format!("{parsed:?}"), format!("{again:?}"));
});
