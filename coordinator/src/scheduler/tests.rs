use super::*;

fn action(operation: &str, invocation: &str, priority: i32) -> QueuedAction {
    QueuedAction {
        operation: operation.to_string(),
        priority,
        invocation: invocation.to_string(),
        platform: Platform::default(),
        affinity: *blake3::hash(operation.as_bytes()).as_bytes(),
        attempts: 0,
    }
}

fn scheduler_with(workers: &[(&str, usize)]) -> (Scheduler, Instant) {
    let now = Instant::now();
    let mut s = Scheduler::new(SchedulerConfig::default());
    for (id, slots) in workers {
        s.add_worker(id.to_string(), Platform::default(), *slots, now);
    }
    (s, now)
}

fn operations(assignments: &[Assignment]) -> Vec<&str> {
    assignments.iter().map(|a| a.operation.as_str()).collect()
}

#[test]
fn lower_priority_values_run_first() {
    let (mut s, _) = scheduler_with(&[("w", 1)]);
    s.enqueue(action("late", "i", 10));
    s.enqueue(action("urgent", "i", -5));
    assert_eq!(operations(&s.schedule()), ["urgent"]);
    assert_eq!(s.level_sizes(), [(10, 1)]);
}

#[test]
fn invocations_take_turns() {
    let (mut s, _) = scheduler_with(&[("w", 4)]);
    for i in 0..10 {
        s.enqueue(action(&format!("big-{i}"), "big-build", 0));
    }
    s.enqueue(action("small-0", "small-build", 0));
    s.enqueue(action("small-1", "small-build", 0));
    let first = s.schedule();
    assert_eq!(operations(&first), ["big-0", "small-0", "big-1", "small-1"]);
    assert_eq!(s.queue_depth(), 8);
}

#[test]
fn platform_requirements_are_matched() {
    let now = Instant::now();
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.add_worker("small".into(), Platform::new([("cores", "2")]), 4, now);
    s.add_worker("large".into(), Platform::new([("cores", "16")]), 4, now);
    let mut needs_8 = action("needs-8", "i", 0);
    needs_8.platform = Platform::new([("cores", "8")]);
    let mut needs_gpu = action("needs-gpu", "i", 0);
    needs_gpu.platform = Platform::new([("gpu", "1")]);
    s.enqueue(needs_gpu);
    s.enqueue(needs_8);
    let assigned = s.schedule();
    assert_eq!(
        assigned.len(),
        1,
        "the gpu action fits nowhere but must not block the other"
    );
    assert_eq!(
        (assigned[0].operation.as_str(), assigned[0].worker.as_str()),
        ("needs-8", "large")
    );
    assert_eq!(
        s.queue_depth_by_platform().into_iter().collect::<Vec<_>>(),
        [("gpu=1".to_string(), 1)]
    );
}

#[test]
fn the_same_input_root_returns_to_the_same_worker() {
    let (mut s, _) = scheduler_with(&[("a", 8), ("b", 8), ("c", 8), ("d", 8)]);
    let mut first_choice = HashMap::new();
    for round in 0..3 {
        for target in 0..6 {
            let mut a = action(&format!("t{target}-r{round}"), "i", 0);
            a.affinity = *blake3::hash(format!("root-{target}").as_bytes()).as_bytes();
            s.enqueue(a);
        }
        for assignment in s.schedule() {
            let target = assignment.operation.split('-').next().unwrap().to_string();
            let worker = first_choice
                .entry(target)
                .or_insert_with(|| assignment.worker.clone());
            assert_eq!(*worker, assignment.worker, "{} moved", assignment.operation);
            s.complete(&assignment.lease, &assignment.worker).unwrap();
        }
    }
    let distinct: HashSet<&String> = first_choice.values().collect();
    assert!(
        distinct.len() > 1,
        "six targets should not all hash to one worker"
    );
}

#[test]
fn a_full_warm_worker_falls_back_to_the_least_loaded() {
    let (mut s, _) = scheduler_with(&[("a", 1), ("b", 2), ("c", 4)]);
    let root = *blake3::hash(b"shared root").as_bytes();
    for i in 0..7 {
        let mut a = action(&format!("op{i}"), "i", 0);
        a.affinity = root;
        s.enqueue(a);
    }
    let assigned = s.schedule();
    assert_eq!(assigned.len(), 7);
    let per_worker = |id: &str| assigned.iter().filter(|a| a.worker == id).count();
    assert_eq!(
        (per_worker("a"), per_worker("b"), per_worker("c")),
        (1, 2, 4)
    );
    assert!(s.schedule().is_empty());
}

#[test]
fn a_silent_worker_loses_its_leases_and_they_run_elsewhere() {
    let (mut s, start) = scheduler_with(&[("doomed", 1)]);
    s.enqueue(action("op", "i", 0));
    assert_eq!(s.schedule()[0].worker, "doomed");
    s.add_worker(
        "healthy".into(),
        Platform::default(),
        1,
        start + Duration::from_secs(9),
    );
    let later = start + Duration::from_secs(11);
    s.heartbeat("healthy", later);
    let expired = s.expire_silent_workers(later);
    assert_eq!(
        expired,
        [(
            "doomed".to_string(),
            vec![LostLease::Requeued {
                operation: "op".into(),
                attempts: 1
            }]
        )]
    );
    let retry = s.schedule();
    assert_eq!((retry[0].worker.as_str(), retry[0].attempt), ("healthy", 2));
}

#[test]
fn retries_are_bounded() {
    let (mut s, now) = scheduler_with(&[]);
    s.enqueue(action("cursed", "i", 0));
    let mut outcomes = Vec::new();
    for round in 0..3 {
        let id = format!("w{round}");
        s.add_worker(id.clone(), Platform::default(), 1, now);
        assert_eq!(s.schedule().len(), 1);
        outcomes.extend(s.remove_worker(&id));
    }
    assert_eq!(
        outcomes,
        [
            LostLease::Requeued {
                operation: "cursed".into(),
                attempts: 1
            },
            LostLease::Requeued {
                operation: "cursed".into(),
                attempts: 2
            },
            LostLease::GaveUp {
                operation: "cursed".into(),
                attempts: 3
            },
        ]
    );
    assert_eq!(s.queue_depth(), 0);
}

#[test]
fn draining_workers_get_nothing_new() {
    let (mut s, _) = scheduler_with(&[("w", 2)]);
    s.enqueue(action("before", "i", 0));
    let lease = s.schedule().remove(0);
    s.drain_worker("w");
    s.enqueue(action("after", "i", 0));
    assert!(s.schedule().is_empty());
    assert_eq!(
        s.complete(&lease.lease, "w").map(|a| a.operation),
        Some("before".to_string())
    );
    assert_eq!(s.queue_depth(), 1);
}

#[test]
fn cancel_finds_queued_and_running_actions() {
    let (mut s, _) = scheduler_with(&[("w", 1)]);
    s.enqueue(action("running", "i", 0));
    s.enqueue(action("queued", "j", 0));
    let lease = s.schedule().remove(0);
    assert_eq!(s.cancel("queued"), Cancelled::Queued);
    assert_eq!(
        s.cancel("running"),
        Cancelled::Running {
            worker: "w".into(),
            lease: lease.lease.clone()
        }
    );
    assert_eq!(s.cancel("running"), Cancelled::NotFound);
    // A result for the cancelled lease is no longer current.
    assert_eq!(s.complete(&lease.lease, "w"), None);
    assert_eq!((s.queue_depth(), s.running()), (0, 0));
}

#[test]
fn a_result_from_the_wrong_worker_is_ignored() {
    let (mut s, _) = scheduler_with(&[("w", 1)]);
    s.enqueue(action("op", "i", 0));
    let lease = s.schedule().remove(0);
    assert_eq!(s.complete(&lease.lease, "impostor"), None);
    assert!(s.complete(&lease.lease, "w").is_some());
}

fn on_platform(operation: &str, pairs: &[(&str, &str)]) -> QueuedAction {
    QueuedAction {
        platform: Platform::new(pairs.iter().copied()),
        ..action(operation, "i", 0)
    }
}

#[test]
fn actions_no_worker_offers_are_taken_after_the_wait() {
    let now = Instant::now();
    let wait = Duration::from_secs(60);
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.add_worker(
        "linux".into(),
        Platform::new([("OSFamily", "linux")]),
        1,
        now,
    );
    s.enqueue(on_platform("fits", &[("OSFamily", "linux")]));
    s.enqueue(on_platform("sparc-1", &[("arch", "sparc")]));
    s.enqueue(on_platform("sparc-2", &[("arch", "sparc")]));
    // The clock starts at the first look, and the wait is not over yet.
    assert!(s.take_unmatched(now, wait).is_empty());
    assert!(s.take_unmatched(now + wait / 2, wait).is_empty());
    let taken = s.take_unmatched(now + wait, wait);
    assert_eq!(
        taken
            .iter()
            .map(|a| a.operation.as_str())
            .collect::<Vec<_>>(),
        ["sparc-1", "sparc-2"]
    );
    assert_eq!(s.queue_depth(), 1);
    assert_eq!(operations(&s.schedule()), ["fits"]);
}

#[test]
fn a_worker_joining_stops_the_unmatched_clock() {
    let now = Instant::now();
    let wait = Duration::from_secs(60);
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.enqueue(on_platform("sparc", &[("arch", "sparc")]));
    assert!(s.take_unmatched(now, wait).is_empty());
    s.add_worker("w".into(), Platform::new([("arch", "sparc")]), 0, now);
    // Offered (even with no free slot): it waits its turn, however long.
    assert!(s.take_unmatched(now + 10 * wait, wait).is_empty());
    // The worker leaves: the clock starts again from then.
    s.remove_worker("w");
    assert!(s.take_unmatched(now + 11 * wait, wait).is_empty());
    assert_eq!(s.take_unmatched(now + 12 * wait, wait).len(), 1);
}

#[test]
fn queue_depth_labels_are_what_workers_offer_plus_the_most_queued() {
    let offered = ["OSFamily=linux".to_string()].into_iter().collect();
    let queued = [("a=1", 5), ("b=2", 1), ("c=3", 3), ("OSFamily=linux", 2)]
        .into_iter()
        .map(|(p, n)| (p.to_string(), n))
        .collect();
    let labels = queue_depth_labels(offered, queued, 2);
    let mut labels: Vec<(String, usize)> = labels.into_iter().collect();
    labels.sort();
    assert_eq!(
        labels,
        [
            ("(other)".to_string(), 1),
            ("OSFamily=linux".to_string(), 2),
            ("a=1".to_string(), 5),
            ("c=3".to_string(), 3),
        ]
    );
}
