//! Capabilities and ContentAddressableStorage over a real socket.

use crate::common;

use common::{assert_bad_request, random_bytes, wire, within, TestServer};
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    batch_update_blobs_request, compressor, digest_function, symlink_absolute_path_strategy,
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory, DirectoryNode, FileNode,
    FindMissingBlobsRequest, GetCapabilitiesRequest, GetTreeRequest, GetTreeResponse,
    SplitBlobRequest,
};
use kiln_store::{Digest, DigestFunction};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_advertise_what_the_server_supports() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let capabilities = server
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "any".into(),
        })
        .await?
        .into_inner();

    let cache = capabilities.cache_capabilities.expect("cache capabilities");
    let both = [
        digest_function::Value::Sha256 as i32,
        digest_function::Value::Blake3 as i32,
    ];
    assert_eq!(cache.digest_functions, both);
    let compressors = [
        compressor::Value::Identity as i32,
        compressor::Value::Zstd as i32,
    ];
    assert_eq!(cache.supported_compressors, compressors);
    assert_eq!(cache.supported_batch_update_compressors, compressors);
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert_eq!(
        cache.symlink_absolute_path_strategy,
        symlink_absolute_path_strategy::Value::Allowed as i32
    );

    let execution = capabilities.execution_capabilities.expect("execution");
    assert!(execution.exec_enabled);
    assert_eq!(
        execution.digest_function,
        digest_function::Value::Sha256 as i32
    );
    assert_eq!(execution.digest_functions, both);

    let low = capabilities.low_api_version.unwrap();
    let high = capabilities.high_api_version.unwrap();
    assert_eq!((low.major, low.minor), (2, 0));
    assert_eq!((high.major, high.minor), (2, 3));
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_blobs_names_exactly_the_absent_ones() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    for function in DigestFunction::ALL {
        let stored = server
            .upload("", function, &[b"present one", b"present two"])
            .await?;
        let absent = Digest::of_bytes(function, b"never uploaded");
        // The right hash with the wrong size is a different blob.
        let wrong_size = Digest::new(function, stored[0].hash, stored[0].size + 1);
        let empty = function.empty_digest();
        let response = server
            .cas()
            .find_missing_blobs(FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: vec![
                    wire(&stored[0]),
                    wire(&absent),
                    wire(&stored[1]),
                    wire(&wrong_size),
                    wire(&empty),
                ],
                digest_function: function.reapi_value(),
            })
            .await?
            .into_inner();
        assert_eq!(
            response.missing_blob_digests,
            [wire(&absent), wire(&wrong_size)],
            "{function}"
        );
    }

    // A SHA-256 blob is not a BLAKE3 blob with the same bytes for a name.
    let sha = server.upload("", DigestFunction::Sha256, &[b"x"]).await?;
    let as_blake3 = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&sha[0])],
            digest_function: DigestFunction::Blake3.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(as_blake3.missing_blob_digests.len(), 1);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_digests_and_unknown_functions_are_invalid_arguments() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let good = wire(&Digest::of_bytes(DigestFunction::Sha256, b"a"));
    let short_hash = kiln_proto::reapi::Digest {
        hash: "abc".into(),
        size_bytes: 1,
    };
    let err = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![good.clone(), short_hash],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_request(&err, "blob_digests[1]");

    let negative = kiln_proto::reapi::Digest {
        size_bytes: -5,
        ..good.clone()
    };
    let err = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![negative],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_request(&err, "blob_digests[0]");

    for unsupported in [digest_function::Value::Md5 as i32, 42] {
        let err = server
            .cas()
            .find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: vec![good.clone()],
                digest_function: unsupported,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_bad_request(&err, "digest_function");
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_update_and_read_round_trip_with_and_without_zstd() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    for function in DigestFunction::ALL {
        let compressible = b"compressible ".repeat(2_000);
        let incompressible = random_bytes(3_000, 7);
        let plain = Digest::of_bytes(function, &incompressible);
        let squeezed = Digest::of_bytes(function, &compressible);
        let response = server
            .cas()
            .batch_update_blobs(BatchUpdateBlobsRequest {
                instance_name: "ci".into(),
                requests: vec![
                    batch_update_blobs_request::Request {
                        digest: Some(wire(&plain)),
                        data: incompressible.clone(),
                        compressor: compressor::Value::Identity as i32,
                    },
                    batch_update_blobs_request::Request {
                        digest: Some(wire(&squeezed)),
                        data: zstd::bulk::compress(&compressible, 3)?,
                        compressor: compressor::Value::Zstd as i32,
                    },
                ],
                digest_function: function.reapi_value(),
            })
            .await?
            .into_inner();
        assert_eq!(response.responses.len(), 2);
        for entry in &response.responses {
            assert_eq!(entry.status.as_ref().unwrap().code, 0, "{entry:?}");
        }
        assert_eq!(response.responses[1].digest, Some(wire(&squeezed)));

        // Without zstd among the acceptable compressors, everything comes back plain.
        let read = server
            .cas()
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: "ci".into(),
                digests: vec![wire(&plain), wire(&squeezed)],
                acceptable_compressors: vec![],
                digest_function: function.reapi_value(),
            })
            .await?
            .into_inner();
        assert_eq!(read.responses[0].data, incompressible);
        assert_eq!(read.responses[1].data, compressible);
        assert!(read.responses.iter().all(|r| r.compressor == 0));

        // With zstd acceptable, the compressible blob travels compressed.
        let read = server
            .cas()
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: "ci".into(),
                digests: vec![wire(&squeezed), wire(&plain)],
                acceptable_compressors: vec![compressor::Value::Zstd as i32],
                digest_function: function.reapi_value(),
            })
            .await?
            .into_inner();
        let zstd_entry = &read.responses[0];
        assert_eq!(zstd_entry.compressor, compressor::Value::Zstd as i32);
        assert!(zstd_entry.data.len() < compressible.len());
        assert_eq!(
            zstd::bulk::decompress(&zstd_entry.data, compressible.len())?,
            compressible
        );
        let plain_entry = &read.responses[1];
        if plain_entry.compressor == compressor::Value::Zstd as i32 {
            assert_eq!(
                zstd::bulk::decompress(&plain_entry.data, incompressible.len())?,
                incompressible
            );
        } else {
            assert_eq!(plain_entry.data, incompressible);
        }
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_update_refuses_content_that_does_not_match_its_digest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let function = DigestFunction::Blake3;
    let claimed = Digest::of_bytes(function, b"what the client claims");
    let good = Digest::of_bytes(function, b"fine");
    let truncated_size = Digest::new(function, good.hash, good.size - 1);
    let response = server
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![
                batch_update_blobs_request::Request {
                    digest: Some(wire(&claimed)),
                    data: b"something else entirely".to_vec(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(wire(&good)),
                    data: b"fine".to_vec(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(wire(&truncated_size)),
                    data: b"fine".to_vec(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(wire(&claimed)),
                    data: b"not zstd at all".to_vec(),
                    compressor: compressor::Value::Zstd as i32,
                },
                batch_update_blobs_request::Request {
                    digest: Some(wire(&claimed)),
                    data: b"x".to_vec(),
                    compressor: compressor::Value::Brotli as i32,
                },
                batch_update_blobs_request::Request {
                    digest: None,
                    data: b"x".to_vec(),
                    compressor: 0,
                },
            ],
            digest_function: function.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(codes, [invalid, 0, invalid, invalid, invalid, invalid]);
    // The bad-request entries say which field was wrong.
    let brotli = response.responses[4].status.as_ref().unwrap();
    assert!(
        brotli.message.contains("requests[4].compressor"),
        "{brotli:?}"
    );
    assert!(!brotli.details.is_empty());

    // Nothing of the refused entries was stored.
    let missing = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&claimed), wire(&good)],
            digest_function: function.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(missing.missing_blob_digests, [wire(&claimed)]);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_the_limit_are_refused_whole() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = kiln_coordinator::CoordinatorConfig {
        max_batch_total_size_bytes: 64 << 10,
        ..Default::default()
    };
    let server = TestServer::start_with(dir.path(), config).await?;
    let function = DigestFunction::Sha256;
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(30 << 10, i)).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    let (request, digests) = common::batch_update("", function, &refs);
    let err = server.cas().batch_update_blobs(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_batch_total_size_bytes"),
        "{err:?}"
    );

    // Two fit; then reading all three at once is over the limit as well.
    server.upload("", function, &refs[..2]).await?;
    server.upload("", function, &refs[2..]).await?;
    let err = server
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: digests.iter().map(wire).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_read_reports_missing_blobs_per_entry() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let function = DigestFunction::Blake3;
    let stored = server.upload("", function, &[b"here"]).await?;
    let absent = Digest::of_bytes(function, b"gone");
    let read = server
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![
                wire(&absent),
                wire(&stored[0]),
                wire(&function.empty_digest()),
            ],
            digest_function: function.reapi_value(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let codes: Vec<i32> = read
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(codes, [Code::NotFound as i32, 0, 0]);
    assert_eq!(read.responses[1].data, b"here");
    assert!(read.responses[2].data.is_empty());
    server.stop().await
}

/// A directory tree in the CAS: root → {a, b, shared}, a → {shared, deep}, b → {missing}.
struct TestTree {
    root: Digest,
    /// Every distinct directory that is present, by digest.
    present: Vec<Digest>,
}

async fn store_tree(server: &TestServer, function: DigestFunction) -> anyhow::Result<TestTree> {
    let file = server.upload("", function, &[b"file content"]).await?[0];
    let encode = |d: &Directory| d.encode_to_vec();
    let dir_node = |name: &str, digest: &Digest| DirectoryNode {
        name: name.into(),
        digest: Some(wire(digest)),
    };
    let leaf = |tag: &str| Directory {
        files: vec![FileNode {
            name: tag.into(),
            digest: Some(wire(&file)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let deep = leaf("deep");
    let shared = leaf("shared");
    let missing = leaf("missing");
    let deep_d = Digest::of_bytes(function, &encode(&deep));
    let shared_d = Digest::of_bytes(function, &encode(&shared));
    let missing_d = Digest::of_bytes(function, &encode(&missing));
    let a = Directory {
        directories: vec![dir_node("deep", &deep_d), dir_node("shared", &shared_d)],
        ..Default::default()
    };
    let b = Directory {
        directories: vec![dir_node("missing", &missing_d)],
        ..Default::default()
    };
    let a_d = Digest::of_bytes(function, &encode(&a));
    let b_d = Digest::of_bytes(function, &encode(&b));
    let root = Directory {
        directories: vec![
            dir_node("a", &a_d),
            dir_node("b", &b_d),
            dir_node("shared", &shared_d),
        ],
        ..Default::default()
    };
    let root_d = Digest::of_bytes(function, &encode(&root));
    let encoded: Vec<Vec<u8>> = [&root, &a, &b, &shared, &deep]
        .iter()
        .map(|d| encode(d))
        .collect();
    let refs: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    server.upload("", function, &refs).await?;
    Ok(TestTree {
        root: root_d,
        present: vec![root_d, a_d, b_d, shared_d, deep_d],
    })
}

async fn get_tree(
    server: &TestServer,
    root: &Digest,
    page_size: i32,
    page_token: &str,
) -> Result<Vec<GetTreeResponse>, tonic::Status> {
    let mut stream = server
        .cas()
        .get_tree(GetTreeRequest {
            instance_name: String::new(),
            root_digest: Some(wire(root)),
            page_size,
            page_token: page_token.into(),
            digest_function: root.function.reapi_value(),
        })
        .await?
        .into_inner();
    let mut pages = Vec::new();
    while let Some(page) = stream.message().await? {
        pages.push(page);
    }
    Ok(pages)
}

fn digests_of(function: DigestFunction, pages: &[GetTreeResponse]) -> Vec<Digest> {
    pages
        .iter()
        .flat_map(|p| &p.directories)
        .map(|d| Digest::of_bytes(function, &d.encode_to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_walks_breadth_first_in_pages() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    for function in DigestFunction::ALL {
        let tree = store_tree(&server, function).await?;

        // One call, no page size: everything present, each directory once, root first,
        // the missing subtree left out.
        let all = within(10, get_tree(&server, &tree.root, 0, "")).await?;
        assert_eq!(all.len(), 1);
        assert!(all[0].next_page_token.is_empty());
        assert_eq!(digests_of(function, &all), tree.present);

        // Pages of two: 2 + 2 + 1, each pointing at the next, the last without a token.
        let pages = within(10, get_tree(&server, &tree.root, 2, "")).await?;
        let sizes: Vec<usize> = pages.iter().map(|p| p.directories.len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert!(pages[..2].iter().all(|p| !p.next_page_token.is_empty()));
        assert!(pages[2].next_page_token.is_empty());
        assert_eq!(digests_of(function, &pages), tree.present);

        // Resuming from the first page's token yields the rest.
        let rest = within(
            10,
            get_tree(&server, &tree.root, 2, &pages[0].next_page_token),
        )
        .await?;
        assert_eq!(digests_of(function, &rest), tree.present[2..]);
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let absent = Digest::of_bytes(DigestFunction::Sha256, b"no such directory");
    let err = get_tree(&server, &absent, 0, "").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let tree = store_tree(&server, DigestFunction::Sha256).await?;
    let err = get_tree(&server, &tree.root, 0, "not-a-token")
        .await
        .unwrap_err();
    assert_bad_request(&err, "page_token");
    let err = get_tree(&server, &tree.root, -1, "").await.unwrap_err();
    assert_bad_request(&err, "page_size");

    let not_a_directory = server
        .upload(
            "",
            DigestFunction::Sha256,
            &[b"\xff\xff\xff plainly not protobuf"],
        )
        .await?[0];
    let err = get_tree(&server, &not_a_directory, 0, "")
        .await
        .unwrap_err();
    assert_bad_request(&err, "root_digest");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunking_rpcs_are_unimplemented() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let err = server
        .cas()
        .split_blob(SplitBlobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    server.stop().await
}
