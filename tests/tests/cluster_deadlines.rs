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

/// Wait until targets `which` hold no job temp files; fails at `deadline`.
fn wait_no_job_temp(c: &Cluster, which: &[usize], deadline: Instant) {
    for &i in which {
        while !job_temp(c, i).is_empty() {
            assert!(Instant::now() < deadline, "target {i} kept the job's temp files: {:?}", job_temp(c, i));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
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
    wait_no_job_temp(&c, &[0, 1, 2], Instant::now() + Duration::from_secs(10));
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
    wait_no_job_temp(&c, &[0, 1], t0 + Duration::from_secs(20));
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

/// The job list survives a coordinator restart (`--state-dir`): a finished job shows finished, the job that
/// ran when the coordinator was killed (-9) shows aborted with the reason, and the targets, which still held
/// that job (their lease, 30 s, had not run out), are told to drop it as soon as they register again; the
/// next job succeeds.
#[test]
fn a_restarted_coordinator_keeps_its_job_list_and_aborts_what_ran() {
    let state = dsort_tests::tempdir();
    let release = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let state_dir = state.path().to_str().unwrap();
    let mut b = Cluster::builder().targets(2).coordinator_args(&["--state-dir", state_dir]);
    for i in 0..2 {
        b = b.target_env(i, "DSORT_TEST_HOLD", "sorting").target_env(
            i,
            "DSORT_TEST_HOLD_RELEASE",
            release.to_str().unwrap(),
        );
    }
    let mut c = b.start();
    // A job that finishes (the hold is released), then one held in sorting on both targets.
    let done = c.dsort_ok(&["start", c.small_job("out1").to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &done, "--timeout", "60s"]);
    std::fs::remove_file(&release).unwrap();
    let held = c.dsort_ok(&["start", c.small_job("out2").to_str().unwrap()]).trim().to_string();
    for i in 0..2 {
        wait_sorting(&c, &held, i);
    }
    c.kill_coordinator();
    c.restart_coordinator();
    let t0 = Instant::now();
    c.wait_healthy(2);
    wait_no_job_temp(&c, &[0, 1], t0 + Duration::from_secs(20));
    assert!(t0.elapsed() < Duration::from_secs(20), "dropped after {:?}, before any lease", t0.elapsed());
    let log = c.coordinator_log();
    assert!(log.contains(&format!("job {held} was running when the coordinator stopped")), "{log}");
    assert!(log.contains(&format!("runs job {held}, which was aborted: abort there")), "{log}");
    // The list: the finished job finished, the held one aborted with the reason.
    let r = c.dsort(&["wait", &held, "--timeout", "10s"]);
    assert!(!r.ok && r.stderr.contains("the coordinator stopped while the job ran"), "{}", r.stderr);
    c.dsort_ok(&["wait", &done, "--timeout", "10s"]);
    let all = c.dsort_ok(&["ls", "--all"]);
    assert!(all.contains(&done) && all.contains(&held), "{all}");
    assert!(c.dsort_ok(&["ls", "ais://out2"]).trim().is_empty(), "no output of the aborted job");
    assert!(!c.object_names("out1").is_empty(), "the finished job's output stays");
    // The next job succeeds.
    std::fs::write(&release, b"go").unwrap();
    let next = c.dsort_ok(&["start", c.small_job("out3").to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &next, "--timeout", "60s"]);
    assert!(!c.object_names("out3").is_empty());
}

/// Without a state dir the restarted coordinator knows no job: the job the targets still hold is an orphan,
/// aborted there as soon as they register again (well before their lease would drop it).
#[test]
fn a_restarted_coordinator_aborts_the_orphans_the_targets_hold() {
    let mut b = Cluster::builder().targets(2);
    for i in 0..2 {
        b = b.target_env(i, "DSORT_TEST_HOLD", "sorting");
    }
    let mut c = b.start();
    let id = start_job(&c);
    for i in 0..2 {
        wait_sorting(&c, &id, i);
    }
    c.kill_coordinator();
    c.restart_coordinator();
    let t0 = Instant::now();
    wait_no_job_temp(&c, &[0, 1], t0 + Duration::from_secs(20));
    let log = c.coordinator_log();
    assert!(log.contains(&format!("runs job {id}, which is unknown here (an orphan): abort there")), "{log}");
    let r = c.dsort(&["show", &id]);
    assert!(!r.ok, "the restarted coordinator does not know job {id}: {}", r.stdout);
}
