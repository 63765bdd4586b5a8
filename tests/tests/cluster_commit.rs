//! Crash-safe commit with real processes: the coordinator decides a job's outcome before any target
//! publishes; a target killed (-9) in the middle of its publish finishes it when it comes back, so the
//! output is all there or none of it, never part.

use dsort_tests::s3::{S3Server, moto};
use dsort_tests::{Cluster, gen_shards, list_dir};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Start the cluster of `b` with target 1 held in the commit of every job (after its first published shard)
/// until `release` exists, and `ais://in/shard-{0..7}.tar` of `records` records each.
fn held_at_commit(b: dsort_tests::ClusterBuilder, release: &std::path::Path, records: usize) -> Cluster {
    let c = b
        .target_env(1, "DSORT_TEST_HOLD", "commit")
        .target_env(1, "DSORT_TEST_HOLD_RELEASE", release.to_str().unwrap())
        .start();
    let data = c.root().join("in");
    gen_shards(&format!("{}/shard-{{0..7}}.tar", data.display()), records, "1KiB", ".jpg,.cls", 6);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://in/"]);
    c
}

/// `dsort ls ais://BUCKET` as name → size.
fn listing(c: &Cluster, bucket: &str) -> BTreeMap<String, u64> {
    c.dsort_ok(&["ls", &format!("ais://{bucket}")])
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, s)| (n.to_string(), s.trim().parse().unwrap()))
        .collect()
}

/// Wait until `log` (a target's stderr) says job `id` is held in its commit; false if the job ended first.
fn held_in_commit(c: &Cluster, i: usize, id: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = format!("holding job {id} in phase commit");
    loop {
        if std::fs::read_to_string(&c.targets[i].log).unwrap_or_default().contains(&line) {
            return true;
        }
        let v = c.get_json(&format!("{}/v1/sort?uuid={id}", c.url));
        let ended = v.as_object().unwrap().values().all(|i| i["archived"] == true);
        if ended {
            return false;
        }
        assert!(Instant::now() < deadline, "job {id} never reached target {i}'s commit: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 20 times: a job whose target 1 is killed (-9) after publishing its first shard (the `DSORT_TEST_HOLD=commit`
/// failpoint holds it there), then restarted: the job succeeds and its output is exactly the reference
/// output (same names, same sizes), never a part of it; no staging or plan is left on the target.
#[test]
fn a_target_killed_during_the_commit_publishes_all_or_none_over_20_trials() {
    let release = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let mut c = held_at_commit(Cluster::builder().targets(3), &release, 20);
    let specs = c.root().to_path_buf();
    let spec = |out: &str| {
        let path = specs.join(format!("{out}.json"));
        let text = format!(
            r#"{{"input_bck":{{"name":"in"}},"input_format":{{"template":"shard-{{0..7}}.tar"}},
            "output_bck":{{"name":"{out}"}},"output_format":"o-{{000..999}}.tar","output_shard_records":4,
            "algorithm":{{"kind":"shuffle","seed":"5"}}}}"#
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    // The reference: the same job with the failpoint released.
    let reference_id = c.dsort_ok(&["start", spec("reference").to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &reference_id, "--timeout", "60s"]);
    let reference = listing(&c, "reference");
    assert_eq!(reference.len(), 40, "{reference:?}");
    std::fs::remove_file(&release).unwrap();

    let mut killed = 0;
    for trial in 0..20 {
        let out = format!("out{trial}");
        let id = c.dsort_ok(&["start", spec(&out).to_str().unwrap()]).trim().to_string();
        if held_in_commit(&c, 1, &id) {
            // Published one shard, the rest staged: kill it there, and bring it back.
            let partial = listing(&c, &out);
            assert!(partial.len() < reference.len(), "trial {trial}: the kill lands mid-commit");
            c.kill_target(1);
            c.start_target(1);
            killed += 1;
        }
        let r = c.dsort(&["wait", &id, "--timeout", "60s"]);
        assert!(r.ok, "trial {trial}: the decided job succeeds: {}\n{}", r.stdout, r.stderr);
        assert_eq!(listing(&c, &out), reference, "trial {trial}: all of the output, exactly");
        for mp in &c.targets[1].mountpaths {
            let staging = list_dir(&mp.join(".dsort").join("staging"));
            assert!(staging.is_empty(), "trial {trial}: staging left on target 1: {staging:?}");
        }
        let plans = list_dir(&c.targets[1].mountpaths[0].join(".dsort").join("plans"));
        assert!(plans.is_empty(), "trial {trial}: plans left on target 1: {plans:?}");
    }
    assert_eq!(killed, 20, "every trial killed target 1 mid-commit");
}

/// The same with an S3 output bucket (moto): target 1 is killed after uploading its first shard; back, it
/// uploads the rest from its plan, so the bucket holds exactly the reference output, and nothing is left.
#[test]
fn a_target_killed_while_uploading_to_s3_uploads_the_rest_when_back() {
    let Some(s3) = moto("a_target_killed_while_uploading_to_s3_uploads_the_rest_when_back") else { return };
    let release = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let builder = S3Server::dsort_env(s3.port()).into_iter().fold(Cluster::builder().targets(3), |b, (k, v)| {
        let k: &'static str = Box::leak(k.into_boxed_str());
        b.env_all(k, &v)
    });
    let mut c = held_at_commit(builder, &release, 20);
    let specs = c.root().to_path_buf();
    let spec = |out: &str| {
        let path = specs.join(format!("{out}.json"));
        let text = format!(
            r#"{{"input_bck":{{"name":"in"}},"input_format":{{"template":"shard-{{0..7}}.tar"}},
            "output_bck":{{"name":"{out}","provider":"s3"}},"output_format":"o-{{000..999}}.tar",
            "output_shard_records":4,"algorithm":{{"kind":"shuffle","seed":"5"}}}}"#
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    s3.mb(&["reference", "out0", "out1", "out2"]);
    let listing = |bucket: &str| s3.ls(bucket, "").into_iter().collect::<BTreeMap<String, u64>>();
    let reference_id = c.dsort_ok(&["start", spec("reference").to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &reference_id, "--timeout", "60s"]);
    let reference = listing("reference");
    assert_eq!(reference.len(), 40, "{reference:?}");
    std::fs::remove_file(&release).unwrap();
    for trial in 0..3 {
        let out = format!("out{trial}");
        let id = c.dsort_ok(&["start", spec(&out).to_str().unwrap()]).trim().to_string();
        assert!(held_in_commit(&c, 1, &id), "trial {trial}: target 1 uploads a shard of the job");
        let partial = listing(&out);
        assert!(partial.len() < reference.len(), "trial {trial}: the kill lands mid-commit: {}", partial.len());
        c.kill_target(1);
        c.start_target(1);
        let r = c.dsort(&["wait", &id, "--timeout", "60s"]);
        assert!(r.ok, "trial {trial}: the decided job succeeds: {}\n{}", r.stdout, r.stderr);
        assert_eq!(listing(&out), reference, "trial {trial}: all of the output, exactly");
        assert_eq!(s3.open_uploads(&out), 0, "trial {trial}: no upload left open");
        for mp in &c.targets[1].mountpaths {
            let staging = list_dir(&mp.join(".dsort").join("staging"));
            assert!(staging.is_empty(), "trial {trial}: staging left on target 1: {staging:?}");
        }
        let plans = list_dir(&c.targets[1].mountpaths[0].join(".dsort").join("plans"));
        assert!(plans.is_empty(), "trial {trial}: plans left on target 1: {plans:?}");
    }
}

/// While a job writing names of bucket `out` runs, a second job writing any of the same names there is
/// refused (409, naming the running job); other names, or the same names in another bucket, are not. The
/// running job, aborted after staging shards but before its commit, leaves the object it would have replaced
/// as it was; then the refused job is accepted.
#[test]
fn a_second_job_writing_the_same_names_is_refused_and_a_failed_job_replaces_nothing() {
    let c = Cluster::builder().targets(2).target_env(0, "DSORT_TEST_HOLD", "creation").start();
    let data = c.root().join("in");
    gen_shards(&format!("{}/shard-{{0..3}}.tar", data.display()), 10, "1KiB", ".jpg,.cls", 3);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://in/"]);
    let previous = c.root().join("previous").join("o-1.tar");
    std::fs::create_dir_all(previous.parent().unwrap()).unwrap();
    std::fs::write(&previous, b"the previous contents of o-1.tar").unwrap();
    c.dsort_ok(&["put", previous.to_str().unwrap(), "ais://out/"]);
    let spec = |name: &str, bucket: &str, template: &str| {
        let path = c.root().join(format!("{name}.json"));
        let text = format!(
            r#"{{"input_bck":{{"name":"in"}},"input_format":{{"template":"shard-{{0..3}}.tar"}},
            "output_bck":{{"name":"{bucket}"}},"output_format":"{template}","output_shard_records":4}}"#
        );
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let first = c.dsort_ok(&["start", &spec("first", "out", "o-{0..99}.tar")]).trim().to_string();
    // Overlapping names in the same bucket: refused while the first runs.
    let overlap = spec("overlap", "out", "o-{90..199}.tar");
    let r = c.dsort(&["start", &overlap]);
    assert!(!r.ok && r.stderr.contains("409") && r.stderr.contains(&first), "{}", r.stderr);
    // Other names in the same bucket, the same names in another bucket: accepted (then aborted).
    for (name, bucket, template) in [("other", "out", "p-{0..99}.tar"), ("elsewhere", "out2", "o-{0..99}.tar")] {
        let id = c.dsort_ok(&["start", &spec(name, bucket, template)]).trim().to_string();
        c.dsort_ok(&["abort", &id]);
    }
    // The first job fails after creating (staging) shards, before its commit: the object it would have
    // replaced is as it was.
    let held = format!("holding job {first} in phase creation");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&c.targets[0].log).unwrap_or_default().contains(&held) {
        assert!(Instant::now() < deadline, "job {first} never reached creation on target 0");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.dsort_ok(&["abort", &first]);
    let r = c.dsort(&["wait", &first, "--timeout", "30s"]);
    assert!(!r.ok, "{}", r.stdout);
    let got = c.root().join("got.bin");
    c.dsort_ok(&["get", "ais://out/o-1.tar", got.to_str().unwrap()]);
    assert_eq!(std::fs::read(&got).unwrap(), b"the previous contents of o-1.tar");
    assert_eq!(listing(&c, "out").len(), 1, "nothing else was written");
    // Once it ended, the overlapping job is accepted.
    let id = c.dsort_ok(&["start", &overlap]).trim().to_string();
    c.dsort_ok(&["abort", &id]);
}

/// The coordinator is killed (-9) while a job commits (target 1 held after publishing its first shard) and
/// restarted with its state dir: the decided commit is finished (the job ends as finished, every shard
/// published), not aborted.
#[test]
fn a_coordinator_restarted_during_the_commit_finishes_it() {
    let state = dsort_tests::tempdir();
    let release = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&release).unwrap();
    let b = Cluster::builder().targets(2).coordinator_args(&["--state-dir", state.path().to_str().unwrap()]);
    let mut c = held_at_commit(b, &release, 10);
    let spec = c.root().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"input_bck":{"name":"in"},"input_format":{"template":"shard-{0..7}.tar"},
        "output_bck":{"name":"out"},"output_format":"o-{00..99}.tar","output_shard_records":4}"#,
    )
    .unwrap();
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    assert!(held_in_commit(&c, 1, &id), "target 1 publishes some of the 20 shards");
    c.kill_coordinator();
    c.restart_coordinator();
    assert!(c.coordinator_log().contains(&format!("job {id} was committing when the coordinator stopped")));
    std::fs::write(&release, b"go").unwrap();
    let waited = c.dsort_ok(&["wait", &id, "--timeout", "60s"]);
    c.wait_healthy(2);
    assert_eq!(listing(&c, "out").len(), 20, "every shard published: {waited}");
}

/// A job aborted after some targets staged all of their shards (and wrote their commit plans) while another
/// was still creating (target 1 held there): the abort removes the plans with the staging, on every target
/// (the chaos trials found plans left behind until the target's next restart).
#[test]
fn an_aborted_job_leaves_no_commit_plan() {
    let c = Cluster::builder().targets(3).target_env(1, "DSORT_TEST_HOLD", "creation").start();
    let data = c.root().join("in");
    gen_shards(&format!("{}/shard-{{0..5}}.tar", data.display()), 20, "1KiB", ".jpg,.cls", 9);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://in/"]);
    let id = c.start_job(
        r#"{"input_bck":{"name":"in"},"input_format":{"template":"shard-{0..5}.tar"},
        "output_bck":{"name":"out"},"output_format":"o-{000..999}.tar","output_shard_records":4}"#,
    );
    let plans = |i: usize| list_dir(&c.targets[i].mountpaths[0].join(".dsort").join("plans"));
    // Wait until another target staged everything (its plan is written) while target 1 is held.
    let deadline = Instant::now() + Duration::from_secs(60);
    while plans(0).is_empty() && plans(2).is_empty() {
        assert!(Instant::now() < deadline, "no target wrote its commit plan for job {id}");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.dsort_ok(&["abort", &id]);
    let r = c.dsort(&["wait", &id, "--timeout", "30s"]);
    assert!(!r.ok, "the job was aborted: {}", r.stdout);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Each target removes the plan, then the rest of the job's files: wait for both.
    while (0..3).any(|i| !plans(i).is_empty()) || !c.temp_files().is_empty() {
        let left: Vec<Vec<String>> = (0..3).map(plans).collect();
        assert!(Instant::now() < deadline, "left after the abort of {id}: plans {left:?}, temp {:?}", c.temp_files());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(c.object_names("out").is_empty(), "no output");
}

/// Target 0 is stopped (SIGSTOP) once it has staged all of its shards (its plan is written) while target 1
/// is still creating (held); target 1 then goes on, so the commit is decided while target 0 is stopped, and
/// target 0 stays stopped for longer than its coordinator lease (2 s). Every input is on target 1 (put while
/// target 0 was down, no rebalance), so target 1 needs no byte of target 0 to finish. When target 0 resumes,
/// its lease has run out as far as it knows, and the coordinator asks it to commit: the job must end with all
/// of its output (the lease keeps a staged job's shards), never with part of it (the lease used to discard
/// the staging of a job the coordinator had decided to commit). In a few runs out of ten the stop lands before
/// target 0's answer reached the coordinator: then the job is aborted, with none of its output.
#[test]
fn a_target_stopped_between_staging_and_the_commit_loses_no_shard() {
    let release = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&release).unwrap();
    let mut b = Cluster::builder().targets(2).coordinator_args(&["--rebalance", "manual"]);
    for i in 0..2 {
        b = b.target_env(i, "DSORT_COORDINATOR_LEASE", "2s");
    }
    let b = b.target_env(1, "DSORT_TEST_HOLD", "creation").target_env(
        1,
        "DSORT_TEST_HOLD_RELEASE",
        release.to_str().unwrap(),
    );
    let mut c = b.start();
    // Every input on target 1.
    c.kill_target(0);
    let t0 = c.targets[0].id.clone();
    c.wait_until("target 0 down", Duration::from_secs(20), |h| h["targets"][&t0] == "down");
    let data = c.root().join("in");
    gen_shards(&format!("{}/shard-{{0..5}}.tar", data.display()), 20, "1KiB", ".jpg,.cls", 12);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://in/"]);
    c.start_target(0);
    c.wait_healthy(2);
    let spec = |out: &str| {
        format!(
            r#"{{"input_bck":{{"name":"in"}},"input_format":{{"template":"shard-{{0..5}}.tar"}},
            "output_bck":{{"name":"{out}"}},"output_format":"o-{{000..999}}.tar","output_shard_records":4}}"#
        )
    };
    let id = c.start_job(&spec("out"));
    let plans = |i: usize| list_dir(&c.targets[i].mountpaths[0].join(".dsort").join("plans"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while plans(0).is_empty() {
        assert!(Instant::now() < deadline, "target 0 never staged its shards for job {id}");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.signal_pause(0, true);
    std::fs::write(&release, b"go").unwrap();
    // The stop's length (the fault itself): longer than the lease.
    std::thread::sleep(Duration::from_secs(4));
    c.signal_pause(0, false);
    let r = c.dsort(&["wait", &id, "--timeout", "90s"]);
    let out = c.object_names("out");
    if r.ok {
        // The commit was decided while target 0 was stopped (the usual case): all of the output.
        let log = std::fs::read_to_string(&c.targets[0].log).unwrap();
        assert!(log.contains("stay staged until the coordinator commits or aborts it"), "{log}");
        let reference = c.start_job(&spec("reference"));
        c.dsort_ok(&["wait", &reference, "--timeout", "60s"]);
        assert_eq!(out, c.object_names("reference"), "finished: all of the output");
    } else {
        // The stop landed before target 0's answer to `create` reached the coordinator (a race of a few
        // milliseconds): not decided, aborted, none of the output.
        println!("note: job {id} was not decided before the stop: {}", r.stderr);
        assert!(r.stderr.contains("was aborted"), "{}", r.stderr);
        assert!(out.is_empty(), "aborted: none of the output: {out:?}\n{}", r.stderr);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.temp_files().is_empty() {
        assert!(Instant::now() < deadline, "temp files left: {:?}", c.temp_files());
        std::thread::sleep(Duration::from_millis(50));
    }
}
