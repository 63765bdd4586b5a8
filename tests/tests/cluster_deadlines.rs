//! Deadlines and leases with real processes and real faults: a target that heartbeats but makes no progress
//! in a step aborts the job within the coordinator's `--stall-timeout`; a coordinator killed mid-job leaves
//! no job behind on the targets once their lease runs out.

use dsort_tests::{CLUSTER_SECRET, Cluster, list_dir};
use std::time::{Duration, Instant};

/// A small job (`ais://small` → `ais://out`); its id.
fn start_job(c: &Cluster) -> String {
    let spec = c.small_job("out");
    c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string()
}

/// Poll until target `i` reports its sorting phase running for job `id`.
fn wait_sorting(c: &Cluster, id: &str, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.get_json(&format!("{}/v1/sort?uuid={id}", c.url));
        let info = &v[&c.targets[i].id];
        if info["Metrics"]["meta_sorting"]["running"] == true {
            return;
        }
        assert!(info["aborted"] != true, "job {id} aborted early: {v}");
        assert!(Instant::now() < deadline, "target {i} never reached sorting: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn job_temp(c: &Cluster, i: usize) -> Vec<String> {
    list_dir(&c.targets[i].mountpaths[0].join(".dsort").join("tmp").join("jobs"))
}

/// Target 1 is held in its sorting step (`DSORT_TEST_HOLD`: alive, heartbeating, doing nothing): with
/// `--stall-timeout 2s` the job is aborted within a few seconds, the error naming target 1 and the step, the
/// target still up, no temp file left anywhere.
#[test]
fn a_stalled_target_aborts_the_job_within_the_stall_timeout() {
    let c = Cluster::builder()
        .targets(3)
        .coordinator_args(&["--stall-timeout", "2s"])
        .target_env(1, "DSORT_TEST_HOLD", "sorting")
        .start();
    let id = start_job(&c);
    wait_sorting(&c, &id, 1);
    let t0 = Instant::now();
    let r = c.dsort(&["wait", &id, "--timeout", "60s"]);
    let took = t0.elapsed();
    assert!(!r.ok && r.stderr.contains("was aborted"), "{}\n{}", r.stdout, r.stderr);
    let stalled = &c.targets[1].id;
    assert!(
        r.stderr.contains(&format!("target {stalled} in its distribute step (sorting) made no progress for 2s")),
        "the error names the stalled target and its step: {}",
        r.stderr
    );
    assert!(took < Duration::from_secs(12), "aborted {took:?} after the stall was reached (timeout 2 s)");
    assert_eq!(c.target_state(1), "up", "the stalled target was heartbeating all along");
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !job_temp(&c, i).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(job_temp(&c, i).is_empty(), "temp files left on target {i}: {:?}", job_temp(&c, i));
    }
    assert!(c.dsort_ok(&["ls", "ais://out"]).trim().is_empty(), "no output");
}

/// The coordinator is killed (-9) while every target is held in the sorting step of a job: with
/// `DSORT_COORDINATOR_LEASE=2s` each target drops the job on its own (temp files gone, its info aborted with
/// the reason) within a few seconds, and says so in its log.
#[test]
fn targets_drop_a_job_when_the_coordinator_lease_runs_out() {
    let mut b = Cluster::builder().targets(2);
    for i in 0..2 {
        b = b.target_env(i, "DSORT_TEST_HOLD", "sorting").target_env(i, "DSORT_COORDINATOR_LEASE", "2s");
    }
    let mut c = b.start();
    let id = start_job(&c);
    for i in 0..2 {
        wait_sorting(&c, &id, i);
        assert!(!job_temp(&c, i).is_empty(), "target {i} holds the job's temp files");
    }
    c.kill_coordinator();
    let t0 = Instant::now();
    for i in 0..2 {
        while !job_temp(&c, i).is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(20), "target {i} kept the job: {:?}", job_temp(&c, i));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "dropped {took:?} after the kill (lease 2 s)");
    for i in 0..2 {
        let log = std::fs::read_to_string(&c.targets[i].log).unwrap();
        assert!(log.contains(&format!("dropping job {id}")), "target {i} log:\n{log}");
        let http = reqwest::blocking::Client::new();
        let url = format!("{}/v1/sort/jobs/{id}/info", c.targets[i].url);
        let info: serde_json::Value = http.get(&url).bearer_auth(CLUSTER_SECRET).send().unwrap().json().unwrap();
        assert_eq!(info["aborted"], true, "{info}");
        let errors = info["Metrics"]["errors"].to_string();
        assert!(errors.contains("the coordinator was unreachable"), "{errors}");
        let staging: Vec<String> =
            c.targets[i].mountpaths.iter().flat_map(|mp| list_dir(&mp.join(".dsort").join("staging"))).collect();
        assert!(staging.is_empty(), "no staging left on target {i}: {staging:?}");
    }
}
