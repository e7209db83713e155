//! Shared setup for the worker's integration tests: the real coordinator CAS on
//! 127.0.0.1:0 over memory stores (kiln-testkit), helpers that put input trees and actions into
//! it, and an ActionRunner wired to it exactly as the worker wires its own.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::prost::Message;
use kiln_proto::reapi;
use kiln_store::{BlobStore, Digest, DigestFunction, ExpectedDigest};
use kiln_testkit::{ServedCoordinator, Stores};
use kiln_worker::{
    ActionRequest, ActionRunner, CasConnection, LocalCache, ProcessRunner, ResourceLimits,
    SandboxMode, SandboxSettings,
};
use tonic::transport::Channel;

/// The real coordinator's CAS, served over a real socket, on memory stores.
pub struct TestCas {
    pub url: String,
    pub blobs: Arc<dyn BlobStore>,
    pub channel: Channel,
    pub function: DigestFunction,
    server: Option<ServedCoordinator>,
}

impl TestCas {
    /// kiln-client's CAS client on this server's channel (instance "", SHA-256), as the
    /// worker holds it.
    pub async fn client(&self) -> kiln_client::RemoteCas {
        kiln_client::RemoteCas::with_channel(
            self.channel.clone(),
            "",
            DigestFunction::Sha256,
            kiln_client::Invocation::new(),
        )
        .await
        .expect("the test CAS answers GetCapabilities")
    }

    pub async fn start(function: DigestFunction) -> anyhow::Result<Self> {
        let server = ServedCoordinator::start(CoordinatorConfig::default(), Stores::Memory).await?;
        let url = server.http_url();
        let channel = Channel::from_shared(url.clone())?
            .connect()
            .await
            .context("connecting to the test CAS")?;
        Ok(TestCas {
            url,
            blobs: server.stores.blobs.clone(),
            channel,
            function,
            server: Some(server),
        })
    }

    pub async fn put(&self, data: &[u8]) -> Digest {
        let digest = Digest::of_bytes(self.function, data);
        self.blobs
            .put(ExpectedDigest::Exact(digest), data.to_vec().into())
            .await
            .expect("storing a test blob");
        digest
    }

    pub async fn put_message(&self, message: &impl Message) -> Digest {
        self.put(&message.encode_to_vec()).await
    }

    pub async fn get(&self, digest: &reapi::Digest) -> Vec<u8> {
        let digest = Digest::parse_reapi(self.function, &digest.hash, digest.size_bytes).unwrap();
        self.blobs
            .read_all(&digest)
            .await
            .unwrap_or_else(|e| panic!("{digest} is not in the CAS: {e}"))
            .to_vec()
    }

    pub async fn get_message<M: Message + Default>(&self, digest: &reapi::Digest) -> M {
        M::decode(self.get(digest).await.as_slice()).expect("a valid message")
    }

    pub async fn delete(&self, digest: &Digest) {
        self.blobs.delete(&digest.content_hash()).await.unwrap();
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.stop().await;
        }
    }
}

/// One entry of an input tree.
#[derive(Clone, Debug)]
pub enum Node {
    File(&'static str, Vec<u8>),
    Executable(&'static str, Vec<u8>),
    Symlink(&'static str, &'static str),
    Dir(&'static str, Vec<Node>),
}

/// Puts a Directory tree (and its files) into the CAS; returns the root's digest.
pub async fn put_tree(cas: &TestCas, nodes: &[Node]) -> Digest {
    Box::pin(put_directory(cas, nodes)).await.0
}

async fn put_directory(cas: &TestCas, nodes: &[Node]) -> (Digest, reapi::Directory) {
    let mut directory = reapi::Directory::default();
    let mut sorted = nodes.to_vec();
    sorted.sort_by_key(|n| match n {
        Node::File(name, _) | Node::Executable(name, _) | Node::Symlink(name, _) => *name,
        Node::Dir(name, _) => name,
    });
    for node in sorted {
        let is_executable = matches!(node, Node::Executable(..));
        match node {
            Node::File(name, data) | Node::Executable(name, data) => {
                let digest = cas.put(&data).await;
                directory.files.push(reapi::FileNode {
                    name: name.to_string(),
                    digest: Some(wire(&digest)),
                    is_executable,
                    node_properties: None,
                });
            }
            Node::Symlink(name, target) => directory.symlinks.push(reapi::SymlinkNode {
                name: name.to_string(),
                target: target.to_string(),
                node_properties: None,
            }),
            Node::Dir(name, children) => {
                let (digest, _) = Box::pin(put_directory(cas, &children)).await;
                directory.directories.push(reapi::DirectoryNode {
                    name: name.to_string(),
                    digest: Some(wire(&digest)),
                });
            }
        }
    }
    (cas.put_message(&directory).await, directory)
}

pub fn wire(digest: &Digest) -> reapi::Digest {
    digest.to_reapi()
}

/// What an action to put into the CAS looks like.
#[derive(Clone, Debug, Default)]
pub struct ActionSpec {
    pub arguments: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub working_directory: String,
    pub output_files: Vec<String>,
    pub output_directories: Vec<String>,
    pub output_paths: Vec<String>,
    pub inputs: Vec<Node>,
    pub timeout: Option<Duration>,
    /// Platform properties on the Action.
    pub platform: Vec<(String, String)>,
}

impl ActionSpec {
    /// An action running `script` with `sh -c`.
    pub fn shell(script: &str) -> Self {
        ActionSpec {
            arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
            environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
            ..Default::default()
        }
    }
}

/// Puts the Command, input tree and Action into the CAS; returns the Action's digest.
pub async fn put_action(cas: &TestCas, spec: &ActionSpec) -> Digest {
    let input_root = put_tree(cas, &spec.inputs).await;
    put_action_on(cas, spec, input_root).await
}

/// [`put_action`] with an input root already in the CAS (`spec.inputs` is ignored).
#[allow(deprecated)] // output_files and output_directories are what REAPI 2.0 clients send.
pub async fn put_action_on(cas: &TestCas, spec: &ActionSpec, input_root: Digest) -> Digest {
    let command = reapi::Command {
        arguments: spec.arguments.clone(),
        environment_variables: spec
            .environment
            .iter()
            .map(|(name, value)| reapi::command::EnvironmentVariable {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        working_directory: spec.working_directory.clone(),
        output_files: spec.output_files.clone(),
        output_directories: spec.output_directories.clone(),
        output_paths: spec.output_paths.clone(),
        ..Default::default()
    };
    let command_digest = cas.put_message(&command).await;
    let action = reapi::Action {
        command_digest: Some(wire(&command_digest)),
        input_root_digest: Some(wire(&input_root)),
        timeout: spec.timeout.map(|t| kiln_proto::protobuf::Duration {
            seconds: t.as_secs() as i64,
            nanos: t.subsec_nanos() as i32,
        }),
        platform: (!spec.platform.is_empty()).then(|| reapi::Platform {
            properties: spec
                .platform
                .iter()
                .map(|(name, value)| reapi::platform::Property {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
        }),
        ..Default::default()
    };
    cas.put_message(&action).await
}

pub fn request(action_digest: Digest) -> ActionRequest {
    ActionRequest {
        instance_name: String::new(),
        action_digest,
        timeout: None,
        queued_timestamp: Some(kiln_proto::protobuf::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        received_timestamp: None,
        inline_action: None,
        inline_command: None,
    }
}

pub const TEST_LIMITS: ResourceLimits = ResourceLimits {
    open_files: 1000,
    memory_bytes: None,
    file_bytes: None,
    cpu_secs: None,
    processes: None,
    log_bytes: 64 << 20,
};

/// An ActionRunner on a temp work dir, talking to `cas` over its socket.
pub struct TestRunner {
    pub runner: ActionRunner,
    pub work_dir: tempfile::TempDir,
}

impl TestRunner {
    pub fn new(cas: &TestCas) -> Self {
        Self::with(cas, TEST_LIMITS, SandboxMode::None, 1 << 30)
    }

    pub fn with(
        cas: &TestCas,
        limits: ResourceLimits,
        mode: SandboxMode,
        cache_bytes: u64,
    ) -> Self {
        let work_dir = tempfile::tempdir().unwrap();
        let cache = LocalCache::open(work_dir.path().join("cache"), cache_bytes).unwrap();
        let process_runner = ProcessRunner::new(limits, &SandboxSettings::new(mode))
            .unwrap_or_else(|e| panic!("{e} (apt-get install -y bubblewrap)"));
        let runner = ActionRunner::new(
            CasConnection::new(cas.channel.clone(), ""),
            Arc::new(cache),
            Arc::new(process_runner),
            work_dir.path().join("actions"),
            "test-worker".to_string(),
            Duration::from_secs(60),
        )
        .unwrap();
        TestRunner { runner, work_dir }
    }
}

impl TestRunner {
    /// Runs an action to its outcome with no cancellation.
    pub async fn run(&self, action_digest: Digest) -> kiln_worker::ActionOutcome {
        self.runner
            .run(
                &request(action_digest),
                &tokio_util::sync::CancellationToken::new(),
            )
            .await
    }
}

pub mod test_coordinator;
