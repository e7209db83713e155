//! Actions for the execution tests: a [`Spec`] becomes Command, input root and Action
//! blobs in a test server's CAS.

use kiln_proto::prost::Message;
use kiln_proto::reapi::{Action, Command, Directory, FileNode};
use kiln_store::{Digest, DigestFunction};

use super::{wire, TestServer};

const F: DigestFunction = DigestFunction::Sha256;

/// What an action runs; turned into Command, input root and Action blobs in the CAS.
pub struct Spec<'a> {
    pub argv: &'a [&'a str],
    pub output_files: &'a [&'a str],
    pub inputs: &'a [(&'a str, &'a [u8])],
    pub timeout_secs: i64,
    pub do_not_cache: bool,
    /// Leave the input root out of the CAS.
    pub skip_input_root: bool,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Spec {
            argv: &["true"],
            output_files: &[],
            inputs: &[],
            timeout_secs: 0,
            do_not_cache: false,
            skip_input_root: false,
        }
    }
}

/// Uploads the action's blobs and returns the Action's digest (and the input root's).
pub async fn upload_action(server: &TestServer, spec: Spec<'_>) -> (Digest, Digest) {
    #[allow(deprecated)] // output_files is what Bazel 2.1 sends, so it is what we test
    let command = Command {
        arguments: spec.argv.iter().map(|s| s.to_string()).collect(),
        output_files: spec.output_files.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let input_contents: Vec<&[u8]> = spec.inputs.iter().map(|(_, data)| *data).collect();
    let input_digests = server.upload("", F, &input_contents).await.unwrap();
    let mut files: Vec<FileNode> = spec
        .inputs
        .iter()
        .zip(&input_digests)
        .map(|((name, _), digest)| FileNode {
            name: name.to_string(),
            digest: Some(wire(digest)),
            is_executable: false,
            ..Default::default()
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let root = Directory {
        files,
        ..Default::default()
    }
    .encode_to_vec();
    let command_digest = Digest::of_bytes(F, &command);
    let root_digest = Digest::of_bytes(F, &root);
    let action = Action {
        command_digest: Some(wire(&command_digest)),
        input_root_digest: Some(wire(&root_digest)),
        timeout: (spec.timeout_secs > 0).then_some(kiln_proto::protobuf::Duration {
            seconds: spec.timeout_secs,
            nanos: 0,
        }),
        do_not_cache: spec.do_not_cache,
        ..Default::default()
    }
    .encode_to_vec();
    let mut blobs: Vec<&[u8]> = vec![&command, &action];
    if !spec.skip_input_root {
        blobs.push(&root);
    }
    server.upload("", F, &blobs).await.unwrap();
    (Digest::of_bytes(F, &action), root_digest)
}

/// A shell action: `sh -c SCRIPT`, producing `outputs`.
pub async fn shell_action(server: &TestServer, script: &str, outputs: &[&str]) -> Digest {
    upload_action(
        server,
        Spec {
            argv: &["sh", "-c", script],
            output_files: outputs,
            ..Spec::default()
        },
    )
    .await
    .0
}
