//! A farm replica's probes: `/readyz` on both the metrics and the registry port names
//! the replica's role, and `/metrics` carries it as `kiln_farm_leader` and
//! `kiln_farm_epoch`. One replica on its own sled store is a farm of one, so it leads at
//! epoch 1; losing the metadata store (PostgreSQL) is covered by
//! tests/interop/farm_faults.sh.

use std::time::{Duration, Instant};

use crate::support::*;

/// GETs `url` until `done(status, body)` holds (10 s at most), and returns the last answer.
fn get_until(url: &str, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(url);
        let body = String::from_utf8(body).unwrap();
        if done(status, &body) || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_farm_replica_says_its_role_on_every_probe_and_in_its_metrics() {
    let data = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &data.path().join("kiln"),
        0,
        &[
            "--farm-advertise-url".as_ref(),
            "http://127.0.0.1:1".as_ref(),
        ],
    );
    let leads = |_: u16, body: &str| body.contains("leader (epoch");
    for url in [
        format!("http://{}/readyz", farm.metrics),
        format!("http://{}/readyz", farm.registry),
    ] {
        let (status, body) = get_until(&url, leads);
        assert_eq!(status, 200, "{url}: {body}");
        assert_eq!(body, "ready: the farm's leader (epoch 1)\n", "{url}");
    }
    let (_, metrics) = get_until(&format!("http://{}/metrics", farm.metrics), |_, body| {
        body.contains("kiln_farm_leader 1")
    });
    assert!(metrics.contains("kiln_farm_leader 1\n"), "{metrics}");
    assert!(metrics.contains("kiln_farm_epoch 1\n"), "{metrics}");
}

#[test]
fn a_process_outside_a_farm_is_simply_ready() {
    let data = tempfile::tempdir().unwrap();
    let farm = Farm::start(&data.path().join("kiln"), 0);
    let (status, body) = get_until(&format!("http://{}/readyz", farm.metrics), |s, _| s == 200);
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (_, metrics) = http_get(&format!("http://{}/metrics", farm.metrics));
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(!metrics.contains("kiln_farm_leader "), "{metrics}");
}
