//! Actions in container images: a busybox image (Debian's static busybox) published to
//! kiln's own registry with kiln-publish, then named by an action's `container-image`
//! by digest and by tag. The action sees the image's files and not the host's; the
//! ActionResult records the manifest digest a tag resolved to; a cached image needs no
//! registry; a wrong digest, a missing image and an unreachable registry fail with
//! FAILED_PRECONDITION naming the image. They need bubblewrap and busybox-static:
//! `cargo test -- --ignored` runs them (.ci/run does). The image cache's budget is tested
//! without a sandbox, in the plain run.

use std::path::Path;

use kiln_proto::prost::Message;
use kiln_publish::{publish, PublishRequest};
use kiln_registry::RegistryConfig;
use kiln_store::DigestFunction;
use kiln_testkit::{ServedRegistry, Stores};
use kiln_worker::{ImageSettings, ImageStore, SandboxMode, WorkerError, CONTAINER_IMAGE_PROPERTY};

use crate::common::{self, put_action, ActionSpec, TestCas, TestRunner};

const BUSYBOX: &str = "/bin/busybox";
const MARKER: &str = "this file is in the image, not on the host";

/// A root filesystem of busybox and its applets as links, and a marker file.
fn busybox_root(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::copy(BUSYBOX, bin.join("busybox"))
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (apt-get install -y busybox-static)"));
    for applet in ["sh", "cat", "ls", "echo", "test", "id"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(dir.join("etc/marker"), MARKER).unwrap();
}

/// Publishes the busybox root as `toolchains/busybox:v1.0.0`; returns the manifest digest.
async fn publish_busybox(registry: &str, root: &Path) -> String {
    let outcome = publish(busybox_request(registry, root))
        .await
        .expect("publish the busybox image");
    outcome.manifest_digest.to_string()
}

/// The request that publishes `root` as `toolchains/busybox:v1.0.0`.
fn busybox_request(registry: &str, root: &Path) -> PublishRequest {
    PublishRequest::directory(registry, "toolchains/busybox", root, &["v1.0.0"])
}

fn runner_with_images(cas: &TestCas) -> TestRunner {
    let TestRunner { runner, work_dir } =
        TestRunner::with(cas, common::TEST_LIMITS, SandboxMode::Bubblewrap, 1 << 30);
    let images = ImageStore::open(
        work_dir.path().join("images"),
        ImageSettings {
            max_bytes: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    TestRunner {
        runner: runner.with_images(images),
        work_dir,
    }
}

/// kiln's registry holding the busybox image, a CAS, and a sandboxed runner with images.
struct Setup {
    registry: ServedRegistry,
    /// The registry's `host:port`.
    host: String,
    /// The image's manifest digest.
    digest: String,
    cas: TestCas,
    runner: TestRunner,
}

impl Setup {
    async fn start() -> Self {
        let registry = ServedRegistry::start(RegistryConfig::default(), Stores::Memory)
            .await
            .unwrap();
        let host = registry.addr.to_string();
        let root = tempfile::tempdir().unwrap();
        busybox_root(root.path());
        let digest = publish_busybox(&host, root.path()).await;
        let cas = TestCas::start(DigestFunction::Sha256).await.unwrap();
        let runner = runner_with_images(&cas);
        Setup {
            registry,
            host,
            digest,
            cas,
            runner,
        }
    }
}

fn in_image(image: &str, script: &str) -> ActionSpec {
    ActionSpec {
        platform: vec![(CONTAINER_IMAGE_PROPERTY.into(), image.into())],
        output_files: vec!["out.txt".into()],
        ..ActionSpec::shell(script)
    }
}

/// The image a result says its action ran in: (reference, manifest digest).
fn image_used(result: &kiln_proto::reapi::ActionResult) -> (String, String) {
    let metadata = result.execution_metadata.as_ref().unwrap();
    let any = metadata
        .auxiliary_metadata
        .iter()
        .find(|any| any.type_url == kiln_proto::worker::v1::CONTAINER_IMAGE_USED_TYPE_URL)
        .expect("the result records its image");
    let used = kiln_proto::worker::v1::ContainerImageUsed::decode(any.value.as_slice()).unwrap();
    (used.image, used.manifest_digest)
}

#[tokio::test]
#[ignore = "needs bubblewrap and busybox-static; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn an_action_runs_in_its_image_by_digest_and_by_tag() {
    let Setup {
        registry,
        host,
        digest,
        cas,
        runner,
    } = Setup::start().await;

    // The image's files are there; the host's (a Rust toolchain, /usr) are not.
    let script = "cat /etc/marker; test -e /usr/bin/env && echo host-visible; \
                  test -e /bin/bash && echo host-bash; id -u; echo made-inside > out.txt";
    let by_digest = format!("docker://{host}/toolchains/busybox@{digest}");
    let outcome = runner
        .run(put_action(&cas, &in_image(&by_digest, script)).await)
        .await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    let stdout = String::from_utf8(cas.get(result.stdout_digest.as_ref().unwrap()).await).unwrap();
    let stderr = String::from_utf8(cas.get(result.stderr_digest.as_ref().unwrap()).await).unwrap();
    assert_eq!(result.exit_code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.starts_with(MARKER), "{stdout}");
    assert!(
        !stdout.contains("host-"),
        "the host shows through: {stdout}"
    );
    assert!(
        !stdout.contains("\n0\n"),
        "the action runs as root: {stdout}"
    );
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(
        cas.get(result.output_files[0].digest.as_ref().unwrap())
            .await,
        b"made-inside\n"
    );
    assert_eq!(image_used(&result), (by_digest.clone(), digest.clone()));

    // By tag: resolved to the same manifest, and recorded as such.
    let by_tag = format!("docker://{host}/toolchains/busybox:v1.0.0");
    let outcome = runner
        .run(put_action(&cas, &in_image(&by_tag, "cat /etc/marker > out.txt")).await)
        .await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(image_used(&result), (by_tag, digest.clone()));

    // Cached: with the registry gone, the image by digest still runs.
    registry.stop().await.unwrap();
    let outcome = runner
        .run(put_action(&cas, &in_image(&by_digest, "echo again > out.txt")).await)
        .await;
    assert!(
        outcome.error.is_none(),
        "a cached image needed its registry: {:?}",
        outcome.error
    );
    assert_eq!(outcome.action_result.unwrap().exit_code, 0);
}

#[tokio::test]
#[ignore = "needs bubblewrap and busybox-static; `cargo test -- --ignored` runs it (.ci/run does)"]
async fn a_wrong_digest_a_missing_image_and_no_registry_fail_naming_the_image() {
    // The registry keeps serving: a wrong digest and a missing image are its answers.
    let Setup {
        registry: _serving,
        host,
        cas,
        runner,
        ..
    } = Setup::start().await;

    let wrong = format!(
        "docker://{host}/toolchains/busybox@sha256:{}",
        "0".repeat(64)
    );
    let missing = format!("docker://{host}/toolchains/absent:v1");
    let unreachable = "docker://127.0.0.1:9/toolchains/busybox:v1.0.0".to_string();
    for image in [wrong, missing, unreachable] {
        let outcome = runner
            .run(put_action(&cas, &in_image(&image, "true")).await)
            .await;
        let error = outcome.error.expect("the action must fail");
        assert!(
            matches!(&error, WorkerError::ImageUnavailable { image: named, .. } if *named == image),
            "{error}"
        );
        assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error}");
        // The registry's own answer, where there is a registry.
        let answered = ["MANIFEST_UNKNOWN", "NAME_UNKNOWN"]
            .iter()
            .any(|code| error.to_string().contains(code));
        assert_eq!(answered, !image.contains(":9/"), "{error}");
        assert!(outcome.action_result.is_none());
    }
}

/// Publishes a directory of one `bytes`-sized file as `cache/NAME:v1.0.0`; returns its
/// reference by digest.
async fn publish_sized(registry: &str, name: &str, bytes: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..bytes).map(|i| (i * 7 + name.len()) as u8).collect();
    std::fs::write(dir.path().join(name), data).unwrap();
    let repository = format!("cache/{name}");
    let outcome = publish(PublishRequest::directory(
        registry,
        &repository,
        dir.path(),
        &["v1.0.0"],
    ))
    .await
    .unwrap();
    format!(
        "docker://{registry}/cache/{name}@{}",
        outcome.manifest_digest
    )
}

#[tokio::test]
async fn the_image_cache_keeps_to_its_budget_but_never_drops_a_root_in_use() {
    let registry = ServedRegistry::start(RegistryConfig::default(), Stores::Memory)
        .await
        .unwrap();
    let host = registry.addr.to_string();
    let mib = 1 << 20;
    let [a, b, c] = [
        publish_sized(&host, "a", mib).await,
        publish_sized(&host, "b", mib).await,
        publish_sized(&host, "c", mib).await,
    ];
    let too_big = publish_sized(&host, "big", 3 * mib).await;
    let dir = tempfile::tempdir().unwrap();
    let limit = 3 * mib as u64 / 2;
    let store = ImageStore::open(
        dir.path().join("images"),
        ImageSettings {
            max_bytes: limit,
            ..Default::default()
        },
    )
    .unwrap();

    // Two roots in use at once: over the budget, and both kept while they run.
    let root_a = store.root_for(&a).await.unwrap();
    let root_b = store.root_for(&b).await.unwrap();
    assert!(root_a.rootfs.join("a").exists() && root_b.rootfs.join("b").exists());
    assert_eq!(store.held_bytes(), 2 * mib as u64);
    let (path_a, path_b) = (root_a.rootfs.clone(), root_b.rootfs.clone());
    drop(root_a);
    drop(root_b);

    // A third once they ended: the least recently used go until it fits.
    let root_c = store.root_for(&c).await.unwrap();
    assert!(root_c.rootfs.join("c").exists());
    // Reachable by an action's own uid, not only by the worker's.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root_c.rootfs.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o005, 0o005, "the root's directory is {mode:o}");
    assert!(
        !path_a.exists() && !path_b.exists(),
        "idle roots past the budget stayed"
    );
    assert!(
        store.held_bytes() <= limit,
        "{} > {limit}",
        store.held_bytes()
    );

    // Larger than the whole budget: refused, naming the image.
    let refused = store.root_for(&too_big).await.err().expect("refused");
    assert!(
        matches!(&refused, WorkerError::ImageUnavailable { image, reason }
            if *image == too_big && reason.contains("image cache")),
        "{refused}"
    );
    drop(root_c);

    // A restart finds the complete root again, and needs no registry for it.
    registry.stop().await.unwrap();
    drop(store);
    let reopened = ImageStore::open(
        dir.path().join("images"),
        ImageSettings {
            max_bytes: limit,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(reopened.held_bytes(), mib as u64);
    assert!(reopened
        .root_for(&c)
        .await
        .unwrap()
        .rootfs
        .join("c")
        .exists());
}

/// A "registry" on loopback that answers every connection with `head` and then `body_bytes`
/// zeros (never, with `None`: it accepts and says nothing). Returns its address.
async fn hostile_registry(head: &'static str, body_bytes: Option<usize>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let Some(bytes) = body_bytes else {
                    // Hold the connection, answer nothing.
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                    return;
                };
                let _ = socket.write_all(head.as_bytes()).await;
                let zeros = vec![b' '; 64 << 10];
                let mut sent = 0;
                while sent < bytes {
                    let n = zeros.len().min(bytes - sent);
                    if socket.write_all(&zeros[..n]).await.is_err() {
                        return;
                    }
                    sent += n;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_registry_that_stalls_or_sends_an_endless_manifest_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(
        dir.path().join("images"),
        ImageSettings {
            // The silent registry must hit it; the endless manifests must be cut off by
            // size before it, 4 MiB read on a machine that may be busy.
            pull_timeout: std::time::Duration::from_secs(3),
            ..Default::default()
        },
    )
    .unwrap();
    let silent = hostile_registry("", None).await;
    let declared = hostile_registry(
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 104857600\r\n\r\n",
        Some(100 << 20),
    )
    .await;
    let undeclared = hostile_registry(
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n",
        Some(100 << 20),
    )
    .await;
    let cases = [
        (silent, "took longer than 3s"),
        (declared, "larger than the 4194304 bytes"),
        (undeclared, "larger than the 4194304 bytes"),
    ];
    for (host, expected) in cases {
        let image = format!("docker://{host}/hostile/image:v1.0.0");
        let started = std::time::Instant::now();
        let error = store.root_for(&image).await.err().expect("refused");
        assert!(
            matches!(&error, WorkerError::ImageUnavailable { image: named, reason }
                if *named == image && reason.contains(expected)),
            "{error}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{image}: {:?}",
            started.elapsed()
        );
    }
}
