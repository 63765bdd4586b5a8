//! Streams between targets under a slow reader: a creator that stalls mid-creation (SIGSTOP) does not grow
//! the memory of the target serving it its record bytes; once it goes on, the job ends with the shards
//! `dsort reshard` writes, byte for byte.

use dsort_tests::{Cluster, gen_shards, metric, read_files, reshard_reference};
use std::time::{Duration, Instant};

/// Target `i`'s metric `name` (a gauge or counter of its `GET /metrics`).
fn target_metric(c: &Cluster, i: usize, name: &str) -> f64 {
    let (status, text) = c.request("GET", &format!("{}/metrics", c.targets[i].url), true);
    assert_eq!(status, 200, "{text}");
    metric(&text, name).unwrap_or_else(|| panic!("{name} missing on target {i}:\n{text}"))
}

/// The anonymous resident memory of process `pid` (bytes, from `/proc`): its heap and stacks, not the
/// page cache of the files it maps (input shards served as slices of a map).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    kib << 10
}

/// Two targets with a small memory budget (10 MiB limit: an 8 MiB pool, so each job's outgoing streams may
/// hold 512 KiB, two chunks, in flight) and output shards of 32 MiB, so that a creator asks its holder for
/// megabytes at once. A creator is stopped while it pulls record bytes from the other target, its holder:
/// the holder's buffers in flight fill up to its budget (within an entry: the budget, not the streams'
/// queues, stops them) and no further (its socket buffers take the rest), its pool stays under its limit
/// and its anonymous memory does not grow by more than the pool. Resumed, the job finishes like `dsort
/// reshard`. (The stop lands between two of the creator's streams at times: then it is tried again.)
#[test]
fn a_stalled_creator_holds_its_holder_at_its_stream_budget() {
    // The coordinator waits 60 s before it takes the stopped target as down, and the targets keep their jobs
    // for 5 minutes without the coordinator (their lease), so stops never abort the job.
    let c = Cluster::builder()
        .targets(2)
        .env_all("DSORT_MEMORY_LIMIT", "10MiB")
        .env_all("DSORT_COORDINATOR_LEASE", "5m")
        .coordinator_args(&["--down-after", "60s"])
        .start();
    let root = c.root().join("local");
    let src = root.join("src");
    // Entries of 1 MiB: the holder sends each in 256 KiB pieces, so the one byte stream a creator has per
    // holder can hold more than the 512 KiB budget in its queues; the budget is what stops it.
    gen_shards(&format!("{}/shard-{{0..15}}.tar", src.display()), 16, "1MiB", ".bin", 5);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    let spec = r#"{"input_bck":{"name":"src"},"input_format":{"template":"shard-{0..15}.tar"},
        "output_bck":{"name":"dst"},"output_format":"out-{000..999}.tar","output_shard_size":"32MiB",
        "algorithm":{"kind":"shuffle","seed":"3"}}"#;
    let (spec_path, expected) = reshard_reference(&root, spec, "dst");
    assert!(expected.len() >= 6, "enough output shards for both targets: {}", expected.len());

    let pids: Vec<u32> = c.targets.iter().map(|t| t.pid().expect("the target runs")).collect();
    let idle_rss: Vec<u64> = pids.iter().map(|&p| rss(p)).collect();
    let limit = target_metric(&c, 0, "dsort_memory_pool_limit_bytes");
    let budget = (limit / 16.0).clamp(512.0 * 1024.0, 64.0 * 1024.0 * 1024.0);
    let full = budget - 64.0 * 1024.0;
    let received = |i: usize| target_metric(&c, i, "dsort_network_bytes_received_total");

    let id = c.dsort_ok(&["start", spec_path.to_str().unwrap()]).trim().to_string();
    let mut before = [0.0, 0.0];
    let mut stalls = 0;
    let (holder, in_flight, stalled_rss) = loop {
        // A creator receiving record bytes from the other target now.
        let deadline = Instant::now() + Duration::from_secs(30);
        let creator = loop {
            if let Some(i) = (0..2).find(|&i| received(i) > before[i]) {
                break i;
            }
            if Instant::now() >= deadline {
                let r = c.dsort(&["show", &id]);
                panic!("no creator pulls record bytes: {}{}", r.stdout, r.stderr);
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let holder = 1 - creator;
        c.signal_pause(creator, true);
        // Stopped until the holder's buffers fill, or 10 s (well inside the coordinator's 60 s).
        let stopped = Instant::now();
        let (mut in_flight, mut peak_rss) = (0.0, 0);
        while stopped.elapsed() < Duration::from_secs(10) && in_flight < full {
            in_flight = target_metric(&c, holder, "dsort_stream_buffered_bytes");
            peak_rss = peak_rss.max(rss(pids[holder]));
            std::thread::sleep(Duration::from_millis(5));
        }
        c.signal_pause(creator, false);
        stalls += 1;
        if in_flight >= full {
            break (holder, in_flight, peak_rss);
        }
        assert!(stalls < 20, "the holder's streams never filled their budget in {stalls} stalls");
        before = [received(0), received(1)];
    };
    let peak = target_metric(&c, holder, "dsort_stream_buffered_peak_bytes");
    assert!(peak <= budget, "target {holder} held {peak} bytes of streams in flight, over its budget {budget}");
    let pool_peak = target_metric(&c, holder, "dsort_memory_pool_peak_bytes");
    assert!(pool_peak <= limit, "target {holder}'s pool peaked at {pool_peak} over its limit {limit}");
    let idle = idle_rss[holder];
    assert!(
        (stalled_rss as f64) <= idle as f64 + limit,
        "target {holder}'s anonymous memory grew from {idle} to {stalled_rss} (pool limit {limit})"
    );

    let waited = c.dsort_ok(&["wait", &id, "--timeout", "3m"]);
    assert!(waited.contains(&format!("Created {} new shards.", expected.len())), "{waited}");
    let got = c.root().join("got");
    c.get_objects("dst", expected.keys(), &got);
    let got = read_files(&got);
    assert_eq!(got.len(), expected.len());
    for (name, bytes) in &expected {
        assert!(got[name] == *bytes, "{name} differs from dsort reshard");
    }
    eprintln!(
        "holder {holder} after {stalls} stall(s): streams in flight {in_flight} (peak {peak}, budget {budget}); \
         pool peak {pool_peak} of {limit}; anonymous memory {idle} idle, {stalled_rss} stalled"
    );
}
