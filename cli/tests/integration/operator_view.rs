//! The operator's view end to end: the real `kiln` binary runs `kiln up` on loopback
//! ports chosen by the OS, known work goes through it (`kiln run` twice, `kiln publish`,
//! a blob pulled over HTTP), and then `kiln status`, `kiln status --json`, `/metrics`,
//! `/readyz` and `kiln drain` must all tell exactly that story.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// The samples of a Prometheus text exposition, keyed by `name{labels}` as printed.
fn scrape(metrics_addr: &str) -> BTreeMap<String, f64> {
    let (status, body) = http_get(&format!("http://{metrics_addr}/metrics"));
    assert_eq!(status, 200);
    String::from_utf8(body)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("{key} is not in /metrics: {samples:#?}"))
}

#[test]
fn status_metrics_and_drain_tell_what_the_farm_did() {
    let data = tempfile::tempdir().unwrap();
    let farm = Farm::start(&data.path().join("kiln"), 2);

    // Both local workers are listed by `kiln status`, in a table and as JSON.
    let status = farm.status_when(|s| s["workers"].as_array().unwrap().len() == 2);
    let ids: Vec<&str> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["local-0", "local-1"]);
    let table = farm.kiln(&["status", "--coordinator", &farm.grpc]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("Workers: 2 connected"), "{table}");
    for worker in ["local-0", "local-1"] {
        let row = table.lines().find(|l| l.contains(worker));
        assert!(
            row.is_some_and(|r| r.contains("ready")),
            "{worker}: {table}"
        );
    }
    let (ready, _) = http_get(&format!("http://{}/readyz", farm.metrics));
    assert_eq!(ready, 200);

    // Known work: one action run, then the same action again (a cache hit).
    let input = data.path().join("src");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("greeting.txt"), "hello\n").unwrap();
    let run = |_: ()| {
        farm.kiln(&[
            "run",
            "--coordinator",
            &farm.grpc,
            "--input",
            input.to_str().unwrap(),
            "--output",
            "copy.txt",
            "--",
            "cp",
            "greeting.txt",
            "copy.txt",
        ])
    };
    run(());
    run(());
    assert_eq!(std::fs::read(input.join("copy.txt")).unwrap(), b"hello\n");

    // Known registry work: publish one image with one tag, then pull its config blob.
    let image = data.path().join("image");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("app.txt"), "payload\n").unwrap();
    let published = farm.kiln(&[
        "publish",
        "--repo",
        "demo/app",
        "--from",
        image.to_str().unwrap(),
        "--registry",
        &farm.registry,
        "--insecure",
        "--tag",
        "v1.0.0",
        "--no-progress",
    ]);
    let published = String::from_utf8_lossy(&published.stdout).to_string();
    assert!(published.contains("demo/app@sha256:"), "{published}");
    let (status, manifest) = http_get(&format!(
        "http://{}/v2/demo/app/manifests/v1.0.0",
        farm.registry
    ));
    assert_eq!(status, 200);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let (status, config_blob) = http_get(&format!(
        "http://{}/v2/demo/app/blobs/{config_digest}",
        farm.registry
    ));
    assert_eq!(status, 200);

    // `kiln status` counts exactly that: Execute's cache lookup missed on the first run
    // and hit on the second, the action ran once and succeeded, and the registry holds
    // the one repository with its one tag.
    let status = farm.status_json();
    let cache = &status["cache"];
    assert_eq!(cache["actions_succeeded"], 1, "{status:#}");
    assert_eq!(cache["actions_failed"], 0, "{status:#}");
    assert_eq!(cache["action_cache_hits"], 1, "{status:#}");
    assert_eq!(cache["action_cache_misses"], 1, "{status:#}");
    assert_eq!(
        status["registry"],
        serde_json::json!([{"name": "demo/app", "tags": 1, "manifests": 1}])
    );
    assert!(status["storage"]["stored_bytes"].as_u64().unwrap() > 0);

    // /metrics agrees with the status and with what was done.
    let samples = scrape(&farm.metrics);
    assert_eq!(
        sample(&samples, "kiln_action_cache_requests_total{result=\"hit\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            "kiln_action_cache_requests_total{result=\"miss\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&samples, "kiln_actions_finished_total{outcome=\"success\"}"),
        1.0
    );
    for stage in ["queue", "fetch", "execute", "upload"] {
        let key = format!("kiln_action_stage_seconds_count{{stage=\"{stage}\"}}");
        assert_eq!(sample(&samples, &key), 1.0, "{key}");
    }
    assert_eq!(
        sample(&samples, "kiln_cas_bytes_written_total"),
        status["storage"]["cas_bytes_written"].as_u64().unwrap() as f64
    );
    assert_eq!(sample(&samples, "kiln_workers_connected"), 2.0);
    assert_eq!(
        sample(
            &samples,
            "kiln_registry_requests_total{endpoint=\"blob\",method=\"GET\",status=\"200\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            "kiln_registry_bytes_served_total{endpoint=\"blob\"}"
        ),
        config_blob.len() as f64
    );
    assert!(
        sample(
            &samples,
            "kiln_registry_requests_total{endpoint=\"manifest\",method=\"PUT\",status=\"201\"}"
        ) >= 1.0
    );
    assert!(sample(&samples, "kiln_store_bytes") > 0.0);

    // `kiln drain` (the token comes from kiln up's data directory) retires one worker.
    let drained = farm.kiln(&[
        "drain",
        "--data-dir",
        data.path().join("kiln").to_str().unwrap(),
        "--coordinator",
        &farm.grpc,
        "local-1",
    ]);
    assert!(String::from_utf8_lossy(&drained.stdout).contains("local-1 is draining"));
    let status = farm.status_when(|s| s["workers"].as_array().unwrap().len() == 1);
    assert_eq!(status["workers"][0]["id"], "local-0");
}

/// Polls `url` until it answers `want`.
fn wait_for_status(url: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http_get(url);
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} still answers {status} {}",
            String::from_utf8_lossy(&body)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_worker_is_ready_only_while_registered_with_its_coordinator() {
    let data = tempfile::tempdir().unwrap();
    let farm_dir = data.path().join("farm");
    let farm = Farm::start(&farm_dir, 0);
    let token = std::fs::read_to_string(farm_dir.join("join-token")).unwrap();
    let work_dir = data.path().join("worker");
    let args: Vec<&std::ffi::OsStr> = vec![
        "worker".as_ref(),
        "--coordinator".as_ref(),
        farm.grpc.as_ref(),
        "--join-token".as_ref(),
        token.trim().as_ref(),
        "--metrics-addr".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--work-dir".as_ref(),
        work_dir.as_os_str(),
        "--data-dir".as_ref(),
        data.path().as_os_str(),
        // What is tested is readiness and metrics, on machines without bubblewrap too.
        "--sandbox".as_ref(),
        "none".as_ref(),
    ];
    let (_worker, addresses) = spawn_kiln(&args, &[METRICS]);
    let ready = format!("http://{}/readyz", addresses[0]);
    wait_for_status(&ready, 200);
    let (alive, _) = http_get(&format!("http://{}/healthz", addresses[0]));
    assert_eq!(alive, 200);
    farm.status_when(|s| s["workers"].as_array().unwrap().len() == 1);

    // The coordinator goes away: the worker is alive but no longer ready.
    drop(farm);
    wait_for_status(&ready, 503);
    let (alive, _) = http_get(&format!("http://{}/healthz", addresses[0]));
    assert_eq!(alive, 200);
}

/// Two `kiln worker`s on one host both want the default metrics port; the second must
/// still serve (on a free port it logs), not exit.
#[test]
fn a_worker_whose_default_metrics_port_is_taken_serves_on_another() {
    // Hold the default port for the test's length. If something else already holds it,
    // it is taken all the same, which is the case under test.
    let _holder = std::net::TcpListener::bind("127.0.0.1:9092");
    let data = tempfile::tempdir().unwrap();
    let work_dir = data.path().join("worker");
    let args: Vec<&std::ffi::OsStr> = vec![
        "worker".as_ref(),
        // Nothing listens there: the worker keeps trying, which is all this test needs.
        "--coordinator".as_ref(),
        "grpc://127.0.0.1:9".as_ref(),
        "--join-token".as_ref(),
        "unused".as_ref(),
        "--work-dir".as_ref(),
        work_dir.as_os_str(),
        "--data-dir".as_ref(),
        data.path().as_os_str(),
        // What is tested is readiness and metrics, on machines without bubblewrap too.
        "--sandbox".as_ref(),
        "none".as_ref(),
    ];
    let (_worker, addresses) = spawn_kiln(&args, &[METRICS]);
    assert_ne!(addresses[0], "127.0.0.1:9092");
    let (alive, _) = http_get(&format!("http://{}/healthz", addresses[0]));
    assert_eq!(alive, 200);
}

/// An autoscaler's query of an idle farm must find the queue-depth series: the total is
/// there from start-up, before any worker or action.
#[test]
fn the_queue_depth_total_exists_from_start_up() {
    let data = tempfile::tempdir().unwrap();
    let farm = Farm::start(data.path(), 0);
    let samples = scrape(&farm.metrics);
    assert_eq!(
        samples.get("kiln_queue_depth{platform=\"*\"}"),
        Some(&0.0),
        "{samples:?}"
    );
}

/// The registry's GC shares a store with the CAS: a blob the registry wrote that an
/// action-cache entry also references survives GC, while one nothing references goes.
#[test]
fn registry_gc_keeps_what_the_action_cache_references() {
    // The grace period covers the build that makes the action-cache entry: GC runs every
    // second, and with no grace it could take the shared blob before the entry existed.
    const GRACE: Duration = Duration::from_secs(10);
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[registry.gc]\ngrace_secs = {}\ninterval_secs = 1\n",
            GRACE.as_secs()
        ),
    )
    .unwrap();
    let farm = Farm::start_with(
        &data.path().join("kiln"),
        1,
        &["--config".as_ref(), config.as_os_str()],
    );
    // Two blobs the registry writes and no manifest references.
    let shared = b"a layer that is also a build output\n";
    let orphan = b"a layer nothing references\n";
    let pushed = Instant::now();
    assert_eq!(push_blob(&farm.registry, "gc/test", shared), 201);
    assert_eq!(push_blob(&farm.registry, "gc/test", orphan), 201);
    // A build produces the first one's bytes: its action-cache entry references it.
    let work = data.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("layer.txt"), shared).unwrap();
    farm.kiln(&[
        "run",
        "--coordinator",
        &farm.grpc,
        "--input",
        work.to_str().unwrap(),
        "--output",
        "out.txt",
        "--",
        "cp",
        "layer.txt",
        "out.txt",
    ]);
    // Whether the entry was there before the shared blob's grace ran out; on a machine
    // too busy for that, GC may rightly have taken it first.
    let referenced_in_grace = pushed.elapsed() < GRACE;
    let blob_url = |content: &[u8]| {
        format!(
            "http://{}/v2/gc/test/blobs/{}",
            farm.registry,
            sha256(content)
        )
    };
    // GC runs every second: once out of its grace, the orphan goes, the shared blob stays.
    let deadline = Instant::now() + GRACE + Duration::from_secs(30);
    while http_get(&blob_url(orphan)).0 != 404 {
        assert!(Instant::now() < deadline, "GC never collected the orphan");
        std::thread::sleep(Duration::from_millis(200));
    }
    if referenced_in_grace {
        // Out of its grace at about the same time: a run or two more for GC to have
        // taken it too, were the action cache not consulted.
        std::thread::sleep(Duration::from_secs(2));
        let (status, body) = http_get(&blob_url(shared));
        assert_eq!(
            status, 200,
            "GC collected a blob the action cache references"
        );
        assert_eq!(body, shared);
    }
}

/// SIGTERM stops `kiln up` promptly: its local workers drain and exit although their
/// coordinator, in the same process, stops at the same moment (a draining worker once
/// kept reconnecting to it forever). Several rounds, since the order is a race.
#[test]
fn kiln_up_stops_on_sigterm_with_its_local_workers() {
    for round in 0..3 {
        let data = tempfile::tempdir().unwrap();
        let farm = Farm::start(data.path(), 2);
        farm.status_when(|s| s["workers"].as_array().unwrap().len() == 2);
        let pid = farm._process.0.id() as i32;
        // SAFETY: a signal to the child this test started and still holds (not reaped).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let mut farm = farm;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = farm._process.0.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "round {round}: kiln up exited with {status}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: kiln up did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts `command` (its output discarded) and waits, boundedly, for the ready file it was
/// given; returns the process and the addresses the file names.
fn start_with_ready_file(
    command: &mut Command,
    ready: &Path,
) -> (Background, BTreeMap<String, String>) {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln starts");
    let process = Background(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "no ready file within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let addresses =
        serde_json::from_slice(&std::fs::read(ready).unwrap()).expect("the ready file is JSON");
    (process, addresses)
}

/// `--ready-file`: a server started on port 0 writes every bound address as JSON once its
/// listeners are up, and each address answers.
#[test]
fn the_ready_file_names_every_listener() {
    let data = tempfile::tempdir().unwrap();
    let ready = data.path().join("ready.json");
    let mut command = Command::new(KILN);
    command
        .args([
            "up",
            "--workers",
            "1",
            "--grpc-addr",
            "127.0.0.1:0",
            "--registry-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data.path().join("kiln"))
        .arg("--ready-file")
        .arg(&ready)
        .env_remove("KILN_JOIN_TOKEN");
    let (_process, addresses) = start_with_ready_file(&mut command, &ready);
    assert_eq!(
        addresses.keys().collect::<Vec<_>>(),
        ["grpc", "metrics", "registry"]
    );
    for address in addresses.values() {
        let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
        assert_ne!(port, 0, "{addresses:?}");
    }
    assert_eq!(
        http_get(&format!("http://{}/healthz", addresses["metrics"])).0,
        200
    );
    // One readiness, answered on both ports.
    for port in ["metrics", "registry"] {
        let url = format!("http://{}/readyz", addresses[port]);
        assert_eq!(http_get(&url).0, 200, "{url}");
    }
    assert_eq!(
        http_get(&format!("http://{}/v2/", addresses["registry"])).0,
        200
    );
    std::net::TcpStream::connect(&addresses["grpc"]).expect("the gRPC port accepts");
}

/// Protected mode: a coordinator (no authentication yet) refuses a non-loopback address
/// unless told otherwise, and says why; with `--allow-unauthenticated` it starts.
#[test]
fn an_unauthenticated_server_off_loopback_needs_to_be_allowed() {
    let data = tempfile::tempdir().unwrap();
    let base = |extra: &[&str]| {
        let mut command = Command::new(KILN);
        command
            .args(["coordinator", "--grpc-addr", "0.0.0.0:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data.path())
            .args(extra)
            .env_remove("KILN_JOIN_TOKEN")
            .env_remove("KILN_ALLOW_UNAUTHENTICATED");
        command
    };
    let refused = base(&[]).output().expect("kiln runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to serve the coordinator's gRPC API on 0.0.0.0:0")
            && stderr.contains("--allow-unauthenticated"),
        "{stderr}"
    );

    let ready = data.path().join("ready.json");
    let mut command = base(&["--allow-unauthenticated", "--ready-file"]);
    command.arg(&ready);
    let (_process, addresses) = start_with_ready_file(&mut command, &ready);
    assert!(addresses["grpc"].starts_with("0.0.0.0:"), "{addresses:?}");
}
