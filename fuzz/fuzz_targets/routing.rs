//! The registry's routing of a request target: the path into an `Endpoint`, the query
//! string into parameters and pagination. What routes must route again, unchanged, from
//! its canonical path.
#![no_main]

use kiln_fuzz::split_once;
use kiln_registry::endpoint::Endpoint;
use kiln_registry::fuzzing::{pagination, parse_query};
use kiln_store::validate_repository_name;
use libfuzzer_sys::fuzz_target;

/// The path that names `endpoint`, as a client would write it.
fn canonical_path(endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Base => "/v2/".into(),
        Endpoint::Catalog => "/v2/_catalog".into(),
        Endpoint::Token => "/token".into(),
        Endpoint::Manifest { name, reference } => format!("/v2/{name}/manifests/{reference}"),
        Endpoint::Blob { name, digest } => format!("/v2/{name}/blobs/{digest}"),
        Endpoint::UploadStart { name } => format!("/v2/{name}/blobs/uploads/"),
        Endpoint::Upload { name, id } => format!("/v2/{name}/blobs/uploads/{id}"),
        Endpoint::TagList { name } => format!("/v2/{name}/tags/list"),
        Endpoint::Referrers { name, digest } => format!("/v2/{name}/referrers/{digest}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let (path, query) = split_once(data, b'?');
    if let Ok(path) = std::str::from_utf8(path) {
        if let Ok(endpoint) = Endpoint::parse(path) {
            // Handlers use the name as a storage key: it must be valid wherever it came from.
            if let Some(name) = endpoint.repository() {
                validate_repository_name(name).unwrap();
            }
            let labels = endpoint.labels();
            assert_ne!(labels.kind, "unknown");
            let again = Endpoint::parse(&canonical_path(&endpoint));
            assert_eq!(again.ok().as_ref(), Some(&endpoint), "{path}");
        }
    }
    if let Some(query) = query {
        let query = parse_query(&String::from_utf8_lossy(query));
        for max in [0, 1, 1000] {
            if let Ok((n, _)) = pagination(&query, max) {
                assert!(n <= max);
            }
        }
        let _ = (query.get("digest"), query.all("scope"));
    }
});
