//! With the coordinator's auth on, a blob pushed to the registry cannot be read through
//! the CAS by a token that is not `admin`, whatever scopes it has: the real `kiln up`,
//! an image blob pushed over HTTP, and ByteStream / BatchReadBlobs calls with tokens.

use crate::support::*;
use kiln_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use kiln_proto::reapi::{
    content_addressable_storage_client::ContentAddressableStorageClient, BatchReadBlobsRequest,
    BatchUpdateBlobsRequest,
};
use kiln_store::{Digest, DigestFunction, ResourceName};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// `kiln token generate`: the token, with its configuration entry appended to `config`.
fn generate_token(config: &std::path::Path, scopes: &str) -> String {
    let output = std::process::Command::new(KILN)
        .args(["token", "generate", "--scopes", scopes])
        .output()
        .expect("kiln runs");
    assert!(output.status.success());
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config)
        .unwrap();
    std::io::Write::write_all(&mut file, &output.stdout).unwrap();
    String::from_utf8(output.stderr)
        .unwrap()
        .lines()
        .find(|line| line.starts_with("kiln_"))
        .expect("the token is printed")
        .to_string()
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn read(channel: &Channel, token: &str, digest: Digest) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = ByteStreamClient::new(channel.clone())
        .read(with_token(
            ReadRequest {
                resource_name: ResourceName::read("", digest).to_string(),
                ..Default::default()
            },
            token,
        ))
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        data.extend(chunk.data);
    }
    Ok(data)
}

async fn batch_read_code(channel: &Channel, token: &str, digest: Digest) -> i32 {
    let response = ContentAddressableStorageClient::new(channel.clone())
        .batch_read_blobs(with_token(
            BatchReadBlobsRequest {
                digests: vec![digest.to_reapi()],
                digest_function: DigestFunction::Sha256.reapi_value(),
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    response.responses[0].status.as_ref().map_or(0, |s| s.code)
}

#[test]
fn image_blobs_are_read_through_the_cas_only_by_admin_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    let admin = generate_token(&config, "admin");
    let reader = generate_token(&config, "cas:read,cas:write,ac:read,execute");
    let farm = Farm::start_with(
        &dir.path().join("data"),
        0,
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--coordinator-auth".as_ref(),
        ],
    );

    let layer = b"a private image's layer".to_vec();
    assert_eq!(push_blob(&farm.registry, "private/app", &layer), 201);
    let layer_digest = Digest::of_bytes(DigestFunction::Sha256, &layer);
    let cas_blob = b"an action's output".to_vec();
    let cas_digest = Digest::of_bytes(DigestFunction::Sha256, &cas_blob);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = Channel::from_shared(farm.grpc.replace("grpc://", "http://"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ContentAddressableStorageClient::new(channel.clone())
            .batch_update_blobs(with_token(
                BatchUpdateBlobsRequest {
                    requests: vec![kiln_proto::reapi::batch_update_blobs_request::Request {
                        digest: Some(cas_digest.to_reapi()),
                        data: cas_blob.clone(),
                        compressor: 0,
                    }],
                    digest_function: DigestFunction::Sha256.reapi_value(),
                    ..Default::default()
                },
                &reader,
            ))
            .await
            .unwrap();

        // The CAS's own blob: any cas:read token.
        assert_eq!(read(&channel, &reader, cas_digest).await.unwrap(), cas_blob);
        // The registry's blob: refused on both read paths, saying where to get it.
        let refused = read(&channel, &reader, layer_digest).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("registry"), "{refused:?}");
        assert_eq!(
            batch_read_code(&channel, &reader, layer_digest).await,
            Code::PermissionDenied as i32
        );
        assert_eq!(batch_read_code(&channel, &reader, cas_digest).await, 0);
        // An admin token reads it.
        assert_eq!(read(&channel, &admin, layer_digest).await.unwrap(), layer);
    });
}
