//! Distributed jobs end to end: a coordinator and targets as real processes, shards loaded with
//! `dsort put`, a job started through the public API, its output fetched with `dsort get` and compared
//! byte for byte with `dsort reshard` on the same local data and spec.

use dsort_tests::{Cluster, dsort_json, gen_shards, list_dir, metric};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Poll the job until every target finished creation (or any aborted); the per-target infos.
fn wait(c: &Cluster, id: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = c.get_json(&format!("{}/v1/sort?uuid={id}", c.url));
        let infos: Vec<&serde_json::Value> = v.as_object().unwrap().values().collect();
        let aborted = infos.iter().any(|i| i["aborted"] == true);
        let done = infos.iter().all(|i| i["Metrics"]["shard_creation"]["finished"] == true);
        if aborted || done {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} did not end in {timeout:?}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until the job is observably running (some target in extraction or sorting, none finished), so an
/// abort or a kill lands mid-job; fails loudly if the job ends first (the test's job is then too small).
fn wait_running(c: &Cluster, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.get_json(&format!("{}/v1/sort?uuid={id}", c.url));
        let infos: Vec<&serde_json::Value> = v.as_object().map(|o| o.values().collect()).unwrap_or_default();
        let finished = infos.iter().any(|i| i["Metrics"]["shard_creation"]["finished"] == true);
        assert!(!finished, "job {id} finished before it could be interrupted (make the test job bigger): {v}");
        let running = infos.iter().any(|i| {
            i["Metrics"]["local_extraction"]["running"] == true || i["Metrics"]["meta_sorting"]["running"] == true
        });
        if running {
            return;
        }
        assert!(Instant::now() < deadline, "job {id} never started: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    list_dir(dir).into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap())).collect()
}

/// Run `spec` (buckets `src` → `dst`) on a cluster of `n` targets and locally; compare the outputs.
/// `verify` is the algorithm as `dsort verify` flags: the output is also checked by the independent verifier.
fn distributed_equals_local(n: usize, algorithm: &str, verify: &[&str], tag: &str) {
    distributed_on_equals_local(Cluster::start(n), algorithm, verify, tag);
}

fn distributed_on_equals_local(c: Cluster, algorithm: &str, verify: &[&str], tag: &str) {
    let n = c.targets.len();
    let root = c.root().join(format!("local-{tag}"));
    let src = root.join("src");
    gen_shards(&format!("{}/shard-{{0..9}}.tar", src.display()), 30, "200B..3KiB", ".jpg,.cls", 11);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    let spec = format!(
        r#"{{"input_bck":{{"name":"src"}},"input_format":{{"template":"shard-{{0..9}}.tar"}},
        "output_bck":{{"name":"dst"}},"output_format":"out-{{000..999}}.tar","output_shard_size":"12KiB",
        "algorithm":{algorithm},"description":"e2e {tag}"}}"#
    );
    let spec_path = root.join("spec.json");
    std::fs::write(&spec_path, &spec).unwrap();
    let summary =
        dsort_json(&["reshard", "--spec", spec_path.to_str().unwrap(), "--root", root.to_str().unwrap(), "--json"]);
    let expected = files(&root.join("dst"));
    assert_eq!(summary["output_shards"], serde_json::json!(expected.len()));
    assert!(expected.len() > 5, "{tag}: enough output shards to cross ranges");

    // Through the client verbs: start, wait, show, ls.
    let id = c.dsort_ok(&["start", spec_path.to_str().unwrap()]).trim().to_string();
    assert!(id.starts_with("srt-"), "{id}");
    let waited = c.dsort_ok(&["wait", &id, "--timeout", "2m"]);
    assert!(waited.contains(&format!("dsort[{id}] finished")), "{waited}");
    assert!(waited.contains(&format!("Created {} new shards. Job duration:", expected.len())), "{waited}");
    let shown = c.dsort_ok(&["show", &id, "--refresh", "100ms"]);
    assert!(shown.contains("Finished") && shown.contains(&format!("e2e {tag}")), "{shown}");
    assert!(shown.contains(&format!("Created {} new shards.", expected.len())), "{shown}");
    let json: serde_json::Value = serde_json::from_str(&c.dsort_ok(&["show", &id, "--json"])).unwrap();
    assert_eq!(json.as_object().unwrap().len(), n, "one JobInfo per target: {json}");
    let listed = c.dsort_ok(&["ls", "--all"]);
    assert!(listed.lines().any(|l| l.starts_with(&id)), "{listed}");
    assert!(!c.dsort_ok(&["ls"]).contains(&id), "a finished job is not active");
    let infos = wait(&c, &id, Duration::from_secs(120));
    for (t, i) in infos.as_object().unwrap() {
        assert_eq!(i["aborted"], false, "{tag}: target {t} aborted: {infos}");
    }
    let created: u64 = infos
        .as_object()
        .unwrap()
        .values()
        .map(|i| i["Metrics"]["shard_creation"]["created_count"].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(created as usize, expected.len(), "{tag}: {infos}");
    let extracted: u64 =
        infos.as_object().unwrap().values().map(|i| i["loc-objs"].as_str().unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(extracted, 10, "{tag}: every input shard extracted once");

    assert_eq!(c.object_names("dst"), expected.keys().cloned().collect::<Vec<_>>(), "{tag}: output names");
    let got = c.root().join(format!("got-{tag}"));
    c.get_objects("dst", expected.keys(), &got);
    let input = format!("{}/shard-{{0..9}}.tar", src.display());
    let output = format!("{}/out-{{000..999}}.tar", got.display());
    let mut args = vec!["verify", "--input", &input, "--output", &output, "--shard-size", "12KiB"];
    args.extend_from_slice(verify);
    let checked = dsort_tests::dsort(&args);
    assert!(checked.ok, "{tag}: dsort verify rejects the cluster's output:\n{}\n{}", checked.stdout, checked.stderr);
    let got = files(&got);
    for (name, bytes) in &expected {
        assert!(got[name] == *bytes, "{tag}: {name} differs from dsort reshard");
    }
    // Entry bytes crossed the network only between targets, and both sides counted the same; the metrics
    // of the targets and the coordinator's cluster totals agree with the job.
    let (mut sent, mut received, mut created_t, mut records_t) = (0.0, 0.0, 0.0, 0.0);
    for t in &c.targets {
        let (status, text) = c.request("GET", &format!("{}/metrics", t.url), true);
        assert_eq!(status, 200, "{text}");
        let value = |name: &str| metric(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        sent += value("dsort_network_bytes_sent_total");
        received += value("dsort_network_bytes_received_total");
        created_t += value("dsort_created_shards_total");
        records_t += value("dsort_extracted_records_total");
        assert!(value("dsort_memory_pool_limit_bytes") >= 0.0 && value("dsort_phase_seconds_total") > 0.0, "{text}");
    }
    assert_eq!(sent, received, "{tag}");
    assert_eq!(created_t as usize, expected.len(), "{tag}: shards created, by the targets' metrics");
    if n == 1 {
        assert_eq!(sent, 0.0, "{tag}: one target moves no bytes");
    } else {
        assert!(sent > 0.0, "{tag}: records move between targets");
    }
    let (status, text) = c.request("GET", &format!("{}/metrics", c.url), true);
    assert_eq!(status, 200, "{text}");
    assert_eq!(metric(&text, "dsort_created_shards_total"), Some(expected.len() as f64), "{tag}: {text}");
    assert_eq!(metric(&text, "dsort_extracted_records_total"), Some(records_t), "{tag}: {text}");
    assert!(text.contains("dsort_jobs{node_id=\"coordinator\",state=\"finished\"} 1"), "{tag}: {text}");
    c.dsort_ok(&["rm", &id]);
    assert!(!c.dsort(&["show", &id]).ok, "removed");
    // Temp files gone on every target.
    for t in 0..n {
        let tmp = c.root().join(format!("t{t}")).join("mp0").join(".dsort").join("tmp").join("jobs");
        let left: Vec<String> = list_dir(&tmp);
        assert!(left.is_empty(), "{tag}: temp files left on target {t}: {left:?}");
    }
}

#[test]
fn shuffle_on_three_targets_equals_reshard() {
    distributed_equals_local(
        3,
        r#"{"kind":"shuffle","seed":"42"}"#,
        &["--algorithm", "shuffle", "--seed", "42"],
        "shuffle3",
    );
}

#[test]
fn content_sort_on_three_targets_equals_reshard() {
    distributed_equals_local(
        3,
        r#"{"kind":"content","extension":".cls","content_key_type":"int","decreasing":true}"#,
        &["--algorithm", "content", "--key-ext", ".cls", "--key-type", "int", "--decreasing"],
        "content3",
    );
}

#[test]
fn alphanumeric_on_one_three_and_five_targets_equals_reshard() {
    distributed_equals_local(1, r#"{"kind":"alphanumeric"}"#, &[], "alpha1");
    distributed_equals_local(3, r#"{"kind":"alphanumeric"}"#, &[], "alpha3");
    distributed_equals_local(5, r#"{"kind":"alphanumeric"}"#, &[], "alpha5");
}

/// 8 targets: 7 peers stream records to every range owner and creators pull bytes from every holder at once;
/// the job matches `dsort reshard`, and no target runs more than 4 threads per core plus 12 (runtime, rayon,
/// extraction and creation workers, the I/O pool and the step in progress; streams hold none). At this size a
/// thread per stream stayed under that bound too (17 vs 14-18 measured): the bound guards against growth, the
/// proof that streams hold no thread is in the code (`records`, `bytes_route`).
#[test]
fn eight_targets_equal_reshard_with_threads_bounded_by_cores() {
    let c = Cluster::start(8);
    let pids: Vec<u32> = c.targets.iter().filter_map(|t| t.pid()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let threads = |pid: u32| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
            };
            let mut peak = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = pids.iter().map(|&p| threads(p)).max().unwrap_or(0).max(peak);
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    distributed_on_equals_local(
        c,
        r#"{"kind":"shuffle","seed":"7"}"#,
        &["--algorithm", "shuffle", "--seed", "7"],
        "capped8",
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    assert!(peak > 0, "the targets' threads were sampled");
    assert!(peak <= 4 * cores + 12, "a target ran {peak} threads on {cores} cores");
    eprintln!("peak threads of a target: {peak} ({cores} cores)");
}

/// Every target's runtime capped at two blocking threads (`DSORT_MAX_BLOCKING_THREADS`): a job's step holds
/// one, short file work (mapping a shard to serve it) takes the other. Eight targets still finish a job like
/// `dsort reshard`, because no stream between targets holds a thread: a design with a thread per incoming
/// stream has one thread to give to the up to 7 peers' streams each target faces at once, and stalls. (With
/// a cap of one the step's own thread leaves none to serve peers, and this job does stall: the test can fail.)
#[test]
fn eight_targets_finish_with_two_blocking_threads_each() {
    let c = Cluster::builder().targets(8).env_all("DSORT_MAX_BLOCKING_THREADS", "2").start();
    distributed_on_equals_local(
        c,
        r#"{"kind":"shuffle","seed":"8"}"#,
        &["--algorithm", "shuffle", "--seed", "8"],
        "blocking2",
    );
}

/// 16 targets as real processes: every algorithm gives the shards `dsort reshard` gives, byte for byte (the
/// ranges are many and small, so most output shards are cut across ranges and read from several holders).
#[test]
fn sixteen_targets_run_every_algorithm_like_reshard() {
    let c = Cluster::start(16);
    let root = c.root().join("local16");
    let src = root.join("src");
    gen_shards(&format!("{}/shard-{{0..19}}.tar", src.display()), 25, "200B..3KiB", ".jpg,.cls", 16);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    for (tag, algorithm) in [
        ("shuffle", r#"{"kind":"shuffle","seed":"16"}"#),
        ("alpha", r#"{"kind":"alphanumeric"}"#),
        ("alpha-dec", r#"{"kind":"alphanumeric","decreasing":true}"#),
        ("content", r#"{"kind":"content","extension":".cls","content_key_type":"int"}"#),
        ("none", r#"{"kind":"none"}"#),
    ] {
        let spec = format!(
            r#"{{"input_bck":{{"name":"src"}},"input_format":{{"template":"shard-{{0..19}}.tar"}},
            "output_bck":{{"name":"dst-{tag}"}},"output_format":"out-{{000..999}}.tar","output_shard_size":"8KiB",
            "algorithm":{algorithm}}}"#
        );
        let spec_path = root.join(format!("{tag}.json"));
        std::fs::write(&spec_path, &spec).unwrap();
        dsort_json(&["reshard", "--spec", spec_path.to_str().unwrap(), "--root", root.to_str().unwrap(), "--json"]);
        let expected = files(&root.join(format!("dst-{tag}")));
        assert!(expected.len() > 16, "{tag}: more output shards than targets: {}", expected.len());
        let id = c.dsort_ok(&["start", spec_path.to_str().unwrap()]).trim().to_string();
        c.dsort_ok(&["wait", &id, "--timeout", "3m"]);
        let names = c.object_names(&format!("dst-{tag}"));
        assert_eq!(names, expected.keys().cloned().collect::<Vec<_>>(), "{tag}: output names, no more, no fewer");
        let got = c.root().join(format!("got16-{tag}"));
        c.get_objects(&format!("dst-{tag}"), expected.keys(), &got);
        let got = files(&got);
        assert_eq!(got.len(), expected.len(), "{tag}: output shards");
        for (name, bytes) in &expected {
            assert!(got[name] == *bytes, "{tag}: {name} differs from dsort reshard");
        }
    }
}

#[test]
fn none_on_three_targets_equals_reshard() {
    distributed_equals_local(3, r#"{"kind":"none"}"#, &["--algorithm", "none"], "none3");
}

#[test]
fn a_target_error_aborts_the_job_everywhere() {
    let c = Cluster::start(3);
    let src = c.root().join("data");
    gen_shards(&format!("{}/shard-{{0..5}}.tar", src.display()), 10, "1KiB", ".jpg,.cls", 5);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    // shard-6 and shard-7 do not exist and missing shards abort.
    let spec = r#"{"input_bck":{"name":"src"},"input_format":{"template":"shard-{0..7}.tar"},
        "output_bck":{"name":"dst"},"output_format":"out-{0..99}.tar","output_shard_size":"4KiB",
        "config":{"missing_shards":"abort"},"description":"fails"}"#;
    let spec_path = c.root().join("spec.json");
    std::fs::write(&spec_path, spec).unwrap();
    let id = c.dsort_ok(&["start", spec_path.to_str().unwrap()]).trim().to_string();
    let r = c.dsort(&["wait", &id, "--timeout", "1m"]);
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.stderr.contains("was aborted") && r.stderr.contains("target t-"), "{}", r.stderr);
    let infos = wait(&c, &id, Duration::from_secs(30));
    for (t, i) in infos.as_object().unwrap() {
        assert_eq!(i["aborted"], true, "{t}: {infos}");
        assert_eq!(i["Metrics"]["aborted"], true, "{t}: {infos}");
    }
    assert!(c.dsort_ok(&["ls", "ais://dst"]).trim().is_empty(), "no output");
    // Abort and rm of an ended job; unknown ids are 404s.
    c.dsort_ok(&["abort", &id]);
    c.dsort_ok(&["rm", &id]);
    assert!(!c.dsort(&["abort", "srt-nope"]).ok);
    assert!(!c.dsort(&["rm", &id]).ok);
    for t in 0..3 {
        let tmp = c.root().join(format!("t{t}")).join("mp0").join(".dsort").join("tmp").join("jobs");
        assert!(list_dir(&tmp).is_empty(), "temp files left on target {t}: {:?}", list_dir(&tmp));
    }
    // The next job succeeds.
    let ok = spec.replace("shard-{0..7}", "shard-{0..5}").replace("\"dst\"", "\"dst2\"");
    std::fs::write(&spec_path, ok).unwrap();
    let id = c.dsort_ok(&["start", spec_path.to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &id, "--timeout", "1m"]);
}

/// Load a dataset big enough that a job takes a while (about 60 MB); returns the spec file.
fn big_job(c: &Cluster, bucket: &str, out: &str) -> std::path::PathBuf {
    let src = c.root().join(format!("big-{bucket}"));
    gen_shards(&format!("{}/shard-{{00..39}}.tar", src.display()), 100, "10KiB..20KiB", ".jpg,.cls", 3);
    c.dsort_ok(&["put", src.to_str().unwrap(), &format!("ais://{bucket}/")]);
    let spec = format!(
        r#"{{"input_bck":{{"name":"{bucket}"}},"input_format":{{"template":"shard-{{00..39}}.tar"}},
        "output_bck":{{"name":"{out}"}},"output_format":"out-{{0000..9999}}.tar","output_shard_size":"1MiB",
        "algorithm":{{"kind":"shuffle","seed":"1"}},"description":"big"}}"#
    );
    let path = c.root().join(format!("spec-{bucket}.json"));
    std::fs::write(&path, spec).unwrap();
    path
}

/// Every job temp folder of `targets` is gone within 30 s: a target removes it when the job's worker stops,
/// which on a loaded machine may take a while after the abort (the worker finishes the unit in hand).
fn assert_no_job_temp(c: &Cluster, targets: &[usize]) {
    assert_no_job_temp_within(c, targets, Duration::from_secs(30));
}

fn assert_no_job_temp_within(c: &Cluster, targets: &[usize], within: Duration) {
    let deadline = Instant::now() + within;
    for &t in targets {
        let tmp = c.root().join(format!("t{t}")).join("mp0").join(".dsort").join("tmp").join("jobs");
        while !list_dir(&tmp).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(list_dir(&tmp).is_empty(), "temp files left on target {t}: {:?}", list_dir(&tmp));
    }
}

/// A holder stopped (SIGSTOP) while the other targets create their shards, reading record bytes and
/// records from it: the coordinator aborts the job, and the creators waiting on the stopped target's
/// streams stop with the abort (they look at the job's cancel flag while they wait) instead of at the
/// streams' 60 s idle deadline: within 10 s the other targets hold no memory for the job any more (a
/// creator still waiting would hold its shard's stream buffers) and their job temp folders are gone.
#[test]
fn creators_waiting_on_a_stopped_holder_stop_with_the_abort() {
    let c = Cluster::start(3);
    let spec = big_job(&c, "big", "bigout");
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    wait_target_in(&c, &id, 0, "creation", |i| created(i) >= 1);
    c.signal_pause(1, true);
    let r = c.dsort(&["wait", &id, "--timeout", "30s"]);
    assert!(!r.ok && r.stderr.contains("was aborted"), "{}\n{}", r.stdout, r.stderr);
    let deadline = Instant::now() + Duration::from_secs(10);
    for t in [0, 2] {
        let reserved = || {
            let (status, text) = c.request("GET", &format!("{}/metrics", c.targets[t].url), true);
            assert_eq!(status, 200, "{text}");
            metric(&text, "dsort_memory_pool_reserved_bytes").unwrap_or_else(|| panic!("no pool gauge: {text}"))
        };
        while reserved() > 0.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(reserved(), 0.0, "target {t} still holds memory for the aborted job");
    }
    assert_no_job_temp_within(&c, &[0, 2], Duration::from_secs(10));
    c.signal_pause(1, false);
    assert!(c.dsort_ok(&["ls", "ais://bigout"]).trim().is_empty(), "no partial output");
    assert_no_job_temp(&c, &[1]);
}

#[test]
fn abort_stops_a_running_job() {
    let c = Cluster::start(3);
    let spec = big_job(&c, "big", "bigout");
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    wait_running(&c, &id);
    let out = c.dsort_ok(&["abort", &id]);
    assert!(out.contains("Stopped dsort job"), "{out}");
    let t0 = Instant::now();
    let r = c.dsort(&["wait", &id, "--timeout", "30s"]);
    assert!(!r.ok && r.stderr.contains("was aborted"), "{}\n{}", r.stdout, r.stderr);
    assert!(t0.elapsed() < Duration::from_secs(5), "abort took {:?}", t0.elapsed());
    let infos = c.get_json(&format!("{}/v1/sort?uuid={id}", c.url));
    assert!(infos.as_object().unwrap().values().all(|i| i["aborted"] == true), "{infos}");
    assert_no_job_temp(&c, &[0, 1, 2]);
    assert!(c.dsort_ok(&["ls", "ais://bigout"]).trim().is_empty(), "no partial output");
    // The next job succeeds.
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &id, "--timeout", "2m"]);
}

/// Kill -9 target 1 while it is held in `phase` (the `DSORT_TEST_HOLD` failpoint stops it there until the
/// job is aborted, so the kill lands in that phase, not near it): the job is aborted within 5 s
/// with an error naming the target, no output object and no temp file remains, the next job on the
/// remaining targets succeeds, and the killed target, restarted, publishes nothing it had staged.
fn killed_in_phase(phase: &str, reached: impl Fn(&serde_json::Value) -> bool) {
    let mut c = Cluster::builder().targets(3).target_env(1, "DSORT_TEST_HOLD", phase).start();
    let spec = big_job(&c, "big", "bigout");
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    let killed = c.targets[1].id.clone();
    wait_target_in(&c, &id, 1, phase, reached);
    c.kill_target(1);
    let t0 = Instant::now();
    let r = c.dsort(&["wait", &id, "--timeout", "30s"]);
    assert!(!r.ok && r.stderr.contains("was aborted"), "{phase}: {}\n{}", r.stdout, r.stderr);
    assert!(t0.elapsed() < Duration::from_secs(5), "{phase}: abort took {:?}", t0.elapsed());
    assert!(r.stderr.contains(&killed), "{phase}: the error names the killed target {killed}: {}", r.stderr);
    assert_no_job_temp(&c, &[0, 2]);
    c.wait_until("target down", Duration::from_secs(10), |h| h["healthy_targets"] == 2);
    assert!(c.dsort_ok(&["ls", "ais://bigout"]).trim().is_empty(), "{phase}: no partial output");
    let staged: Vec<String> =
        c.targets[1].mountpaths.iter().flat_map(|mp| list_dir(&mp.join(".dsort").join("staging"))).collect();
    if phase == "creation" {
        assert!(!staged.is_empty(), "the killed target had staged output shards");
    }
    // A job on the remaining targets succeeds.
    let src = c.root().join("small");
    gen_shards(&format!("{}/shard-{{0..3}}.tar", src.display()), 10, "1KiB", ".jpg,.cls", 8);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://small/"]);
    let small = r#"{"input_bck":{"name":"small"},"input_format":{"template":"shard-{0..3}.tar"},
        "output_bck":{"name":"smallout"},"output_format":"o-{0..99}.tar","output_shard_size":"8KiB"}"#;
    let path = c.root().join("small.json");
    std::fs::write(&path, small).unwrap();
    let next = c.dsort_ok(&["start", path.to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &next, "--timeout", "1m"]);
    assert!(!c.dsort_ok(&["ls", "ais://smallout"]).trim().is_empty(), "{phase}: the next job's output");
    // The killed target comes back: what it had staged is removed, never published; its job temp is gone.
    c.clear_target_env();
    c.start_target(1);
    c.wait_healthy(3);
    assert!(c.dsort_ok(&["ls", "ais://bigout"]).trim().is_empty(), "{phase}: staged shards never appear");
    for mp in &c.targets[1].mountpaths {
        let left = list_dir(&mp.join(".dsort").join("staging"));
        assert!(left.is_empty(), "{phase}: staging left on the restarted target: {left:?}");
    }
    assert_no_job_temp(&c, &[1]);
}

/// A target that stops answering without dying (SIGSTOP while held in sorting): the job is aborted within 5 s
/// naming it, the others clean up; when it answers again it drops the job too.
#[test]
fn a_target_that_stops_answering_aborts_the_job() {
    let c = Cluster::builder().targets(3).target_env(1, "DSORT_TEST_HOLD", "sorting").start();
    let spec = big_job(&c, "big", "bigout");
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    let stopped = c.targets[1].id.clone();
    wait_target_in(&c, &id, 1, "sorting", in_sorting);
    c.signal_pause(1, true);
    let t0 = Instant::now();
    let r = c.dsort(&["wait", &id, "--timeout", "30s"]);
    let took = t0.elapsed();
    c.signal_pause(1, false);
    assert!(!r.ok && r.stderr.contains("was aborted"), "{}\n{}", r.stdout, r.stderr);
    assert!(took < Duration::from_secs(5), "abort took {took:?}");
    assert!(r.stderr.contains(&stopped), "the error names the silent target {stopped}: {}", r.stderr);
    assert_no_job_temp(&c, &[0, 2]);
    assert!(c.dsort_ok(&["ls", "ais://bigout"]).trim().is_empty(), "no partial output");
    // Answering again, it is told to abort too and removes its temp files.
    assert_no_job_temp(&c, &[1]);
}

/// Wait (up to 60 s) until target `i`'s info of job `id` shows `phase` (`reached`); fails if the job aborts first.
fn wait_target_in(c: &Cluster, id: &str, i: usize, phase: &str, reached: impl Fn(&serde_json::Value) -> bool) {
    let target = &c.targets[i].id;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.get_json(&format!("{}/v1/sort?uuid={id}", c.url));
        if reached(&v[target]) {
            return;
        }
        assert!(v[target]["aborted"] != true, "{phase}: job aborted before target {target} got there: {v}");
        assert!(Instant::now() < deadline, "{phase}: target {target} never reached the phase: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn in_sorting(info: &serde_json::Value) -> bool {
    info["Metrics"]["meta_sorting"]["running"] == true
}

fn created(info: &serde_json::Value) -> u64 {
    info["Metrics"]["shard_creation"]["created_count"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn a_target_killed_during_extraction_aborts_the_job() {
    killed_in_phase("extraction", |i| i["Metrics"]["local_extraction"]["running"] == true);
}

#[test]
fn a_target_killed_during_sorting_aborts_the_job() {
    killed_in_phase("sorting", in_sorting);
}

#[test]
fn a_target_killed_during_creation_aborts_the_job() {
    killed_in_phase("creation", |i| created(i) >= 1);
}

/// Four jobs at once on targets with a small shared budget (`DSORT_MAX_MEM=8MiB`): every output equals
/// `dsort reshard`'s, and no target's jobs together ever reserved more than its budget.
#[test]
fn four_jobs_at_once() {
    let c = (0..3).fold(Cluster::builder().targets(3), |b, i| b.target_env(i, "DSORT_MAX_MEM", "8MiB")).start();
    let root = c.root().join("local");
    let src = root.join("src");
    gen_shards(&format!("{}/shard-{{0..7}}.tar", src.display()), 20, "300B..2KiB", ".jpg,.cls", 21);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    let algorithms = [
        r#"{"kind":"shuffle","seed":"7"}"#,
        r#"{"kind":"alphanumeric","decreasing":true}"#,
        r#"{"kind":"content","extension":".cls","content_key_type":"int"}"#,
        r#"{"kind":"none"}"#,
    ];
    let mut jobs = Vec::new();
    for (k, alg) in algorithms.iter().enumerate() {
        let spec = format!(
            r#"{{"input_bck":{{"name":"src"}},"input_format":{{"template":"shard-{{0..7}}.tar"}},
            "output_bck":{{"name":"dst{k}"}},"output_format":"o-{{00..99}}.tar","output_shard_records":"13",
            "algorithm":{alg}}}"#
        );
        let path = root.join(format!("spec{k}.json"));
        std::fs::write(&path, &spec).unwrap();
        dsort_json(&["reshard", "--spec", path.to_str().unwrap(), "--root", root.to_str().unwrap(), "--json"]);
        jobs.push((k, path));
    }
    let ids: Vec<(usize, String)> =
        jobs.iter().map(|(k, p)| (*k, c.dsort_ok(&["start", p.to_str().unwrap()]).trim().to_string())).collect();
    for (k, id) in &ids {
        c.dsort_ok(&["wait", id, "--timeout", "2m"]);
        let expected = files(&root.join(format!("dst{k}")));
        let got = c.root().join(format!("got{k}"));
        let bucket = format!("dst{k}");
        assert_eq!(c.object_names(&bucket), expected.keys().cloned().collect::<Vec<_>>(), "job {k}: output names");
        c.get_objects(&bucket, expected.keys(), &got);
        assert!(files(&got) == expected, "job {k}: output differs from dsort reshard");
    }
    for t in &c.targets {
        let (status, text) = c.request("GET", &format!("{}/metrics", t.url), true);
        assert_eq!(status, 200, "{text}");
        let limit = metric(&text, "dsort_memory_pool_limit_bytes").unwrap();
        let peak = metric(&text, "dsort_memory_pool_peak_bytes").unwrap();
        assert_eq!(limit, (8 << 20) as f64, "the budget all jobs share: {text}");
        assert!(peak > 0.0 && peak <= limit, "peak {peak} within the shared budget {limit}");
    }
}

/// The real AIStore Python SDK (`pip install aistore`), unchanged, as a client with the client token: start
/// from a spec file, wait, job info; a job aborted through the SDK makes `wait().success` false.
#[test]
fn aistore_python_sdk_drives_jobs() {
    let have_sdk =
        std::process::Command::new("python3").args(["-c", "import aistore"]).output().is_ok_and(|o| o.status.success());
    if !have_sdk {
        eprintln!("SKIPPED: the aistore Python SDK is not installed (pip install aistore; .ci/run does)");
        return;
    }
    let c = Cluster::start(3);
    let small = c.root().join("small");
    gen_shards(&format!("{}/shard-{{0..4}}.tar", small.display()), 10, "1KiB", ".jpg,.cls", 1);
    c.dsort_ok(&["put", small.to_str().unwrap(), "ais://sdkin/"]);
    let big = big_job(&c, "sdkbig", "sdkbigout");
    let spec = r#"{"input_bck":{"name":"sdkin"},"input_format":{"template":"shard-{0..4}.tar"},
        "output_bck":{"name":"sdkout"},"output_format":"o-{0..99}.tar","output_shard_size":"5KiB",
        "algorithm":{"kind":"shuffle","seed":"3"},"description":"sdk"}"#;
    let spec_path = c.root().join("sdk.json");
    std::fs::write(&spec_path, spec).unwrap();
    let script = format!(
        r#"
import time
from aistore import Client
c = Client("{url}", token="{token}")
d = c.dsort()
d.start("{spec}")
r = d.wait(timeout=60)
assert r.success, r
info = d.get_job_info()
assert len(info) == 3, info
created = sum(int(v.metrics.shard_creation.created_count) for v in info.values())
print("created", created)
a = c.dsort()
job = a.start("{big}")
# Abort mid-job: wait until a target reports a running phase (polling, not a fixed delay).
deadline = time.time() + 30
while True:
    info = a.get_job_info()
    ms = [v.metrics for v in info.values()]
    assert not any(m.shard_creation.finished for m in ms), "the job ended before it could be aborted"
    if any(m.local_extraction.running or m.meta_sorting.running for m in ms):
        break
    assert time.time() < deadline, "the job never started"
    time.sleep(0.005)
a.abort()
r = a.wait(timeout=60)
assert not r.success, r
print("aborted ok")
"#,
        url = c.url,
        token = c.token.as_deref().unwrap_or_default(),
        spec = spec_path.display(),
        big = big.display()
    );
    let out = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("aborted ok"), "{stdout}");
    let created: usize = stdout.lines().find_map(|l| l.strip_prefix("created ")).unwrap().trim().parse().unwrap();
    assert_eq!(c.dsort_ok(&["ls", "ais://sdkout"]).lines().count(), created);
}

/// An external key map (`ekm_file` in a bucket, regex keys) on 3 targets: the same shards, byte for byte, as
/// `dsort reshard` with the same map; the same from an http URL on an allowed host; a map given as a local
/// path, on a host not allowed, or missing is refused.
#[test]
fn external_key_map_on_three_targets_equals_reshard() {
    let c = Cluster::builder().targets(3).coordinator_args(&["--ekm-allow-host", "127.0.0.1"]).start();
    let root = c.root().join("local");
    let src = root.join("src");
    gen_shards(&format!("{}/shard-{{0..5}}.tar", src.display()), 30, "200B..3KiB", ".jpg,.cls", 17);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    let meta = root.join("meta");
    std::fs::create_dir_all(&meta).unwrap();
    std::fs::write(meta.join("ekm.txt"), "^[0-7].*\tlow-%03d.tar\n^[89a-f].*\thigh-%03d.tar\n").unwrap();
    c.dsort_ok(&["put", meta.join("ekm.txt").to_str().unwrap(), "ais://meta/"]);
    let spec = r#"{"input_bck":{"name":"src"},"input_format":{"template":"shard-{0..5}.tar"},
        "output_bck":{"name":"dst"},"output_shard_size":"10KiB","ekm_file":"ais://meta/ekm.txt",
        "algorithm":{"kind":"shuffle","seed":"3"}}"#;
    let (spec_path, expected) = dsort_tests::reshard_reference(&root, spec, "dst");
    assert!(expected.keys().any(|n| n.starts_with("low-")) && expected.keys().any(|n| n.starts_with("high-")));
    assert!(expected.len() > 6, "several shards per group: {:?}", expected.keys());

    let id = c.dsort_ok(&["start", spec_path.to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &id, "--timeout", "2m"]);
    assert_eq!(c.object_names("dst"), expected.keys().cloned().collect::<Vec<_>>(), "output names");
    let got = c.root().join("got");
    c.get_objects("dst", expected.keys(), &got);
    assert!(files(&got) == expected, "the cluster's shards differ from dsort reshard");

    // The same map served over HTTP by a host the coordinator allows.
    if let Some(server) = HttpServer::serve(&meta) {
        let by_url = spec
            .replace("ais://meta/ekm.txt", &format!("http://127.0.0.1:{}/ekm.txt", server.port))
            .replace("\"dst\"", "\"dst-url\"");
        let path = root.join("url.json");
        std::fs::write(&path, by_url).unwrap();
        let id = c.dsort_ok(&["start", path.to_str().unwrap()]).trim().to_string();
        c.dsort_ok(&["wait", &id, "--timeout", "2m"]);
        let got = c.root().join("got-url");
        c.get_objects("dst-url", expected.keys(), &got);
        assert!(files(&got) == expected, "EKM by URL: the cluster's shards differ from dsort reshard");
    }

    for (location, says) in [
        ("/etc/passwd", "ais://BUCKET/OBJECT"),
        ("http://example.invalid/ekm.txt", r#"host "example.invalid" is not allowed"#),
        ("ais://meta/missing.txt", "missing.txt"),
    ] {
        let bad = spec.replace("ais://meta/ekm.txt", location);
        let path = root.join("bad.json");
        std::fs::write(&path, bad).unwrap();
        let r = c.dsort(&["start", path.to_str().unwrap()]);
        assert!(!r.ok && r.stderr.contains("ekm_file") && r.stderr.contains(says), "{location}: {}", r.stderr);
    }
}

/// `python3 -m http.server` on a free loopback port serving `dir`, killed on drop; `None` (and a note) when
/// Python cannot be started.
struct HttpServer {
    child: std::process::Child,
    port: u16,
}

impl HttpServer {
    fn serve(dir: &Path) -> Option<HttpServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = std::process::Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("SKIPPED part: python3 -m http.server cannot start");
            return None;
        };
        let server = HttpServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "http.server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM to a target while a job runs on it (held in creation until the test releases it): the target
/// drains (readiness 503, `draining` in the cluster map, a new job refused with 503 naming it), lets the job
/// finish within its grace period, then leaves and exits 0; the job's output is complete and correct.
#[test]
fn sigterm_lets_a_running_job_finish_then_the_target_leaves() {
    let release = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let release_file = release.to_path_buf();
    drop(release); // the file must not exist until the test releases the hold
    let mut c = Cluster::builder()
        .targets(3)
        .target_env(1, "DSORT_TEST_HOLD", "creation")
        .target_env(1, "DSORT_TEST_HOLD_RELEASE", release_file.to_str().unwrap())
        .target_env(1, "DSORT_SHUTDOWN_GRACE", "2m")
        .start();
    let spec = big_job(&c, "big", "bigout");
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    let draining = c.targets[1].id.clone();
    wait_target_in(&c, &id, 1, "creation", |i| created(i) >= 1);
    c.terminate_target(1);
    c.wait_until("target 1 draining", Duration::from_secs(10), |h| h["targets"][&draining] == "draining");
    let t1 = c.targets[1].url.clone();
    assert_eq!(c.request("GET", &format!("{t1}/v1/health?readiness=true"), false).0, 503, "readiness fails");
    assert_eq!(c.request("GET", &format!("{t1}/v1/health"), false).0, 200, "liveness holds");
    let refused = c.dsort(&["start", c.small_job("refused").to_str().unwrap()]);
    assert!(!refused.ok, "a job is not started over a draining target: {}", refused.stdout);
    assert!(refused.stderr.contains(&draining) && refused.stderr.contains("shutting down"), "{}", refused.stderr);
    // Released, the job finishes on every target, the draining one included.
    std::fs::write(&release_file, b"").unwrap();
    let waited = c.dsort_ok(&["wait", &id, "--timeout", "2m"]);
    assert!(waited.contains(&format!("dsort[{id}] finished")), "{waited}");
    assert_eq!(c.wait_target_exit(1, Duration::from_secs(20)), Some(true), "the target exits 0 once its job ended");
    c.wait_until("target 1 left", Duration::from_secs(5), |h| h["targets"][&draining] == "down");
    let _ = std::fs::remove_file(&release_file);
    // The output is every input record once, in the job's order and cut (the draining target's shards too).
    c.start_target(1); // some output shards live on it
    c.wait_healthy(3);
    let got = c.root().join("got");
    c.get_objects("bigout", c.object_names("bigout"), &got);
    let input = format!("{}/shard-{{00..39}}.tar", c.root().join("big-big").display());
    let output = format!("{}/out-{{0000..9999}}.tar", got.display());
    let checked = dsort_tests::dsort(&[
        "verify",
        "--input",
        &input,
        "--output",
        &output,
        "--algorithm",
        "shuffle",
        "--seed",
        "1",
        "--shard-size",
        "1MiB",
    ]);
    assert!(checked.ok, "dsort verify rejects the output:\n{}\n{}", checked.stdout, checked.stderr);
}

/// SIGTERM to a target whose job outlasts its grace period (held in sorting): the job is aborted everywhere
/// with an error naming the target and the shutdown, the target removes its own temp files and exits 0, no
/// output remains, and the next job runs on the remaining targets.
#[test]
fn sigterm_aborts_a_job_that_outlasts_the_grace_period() {
    let mut c = Cluster::builder()
        .targets(3)
        .target_env(1, "DSORT_TEST_HOLD", "sorting")
        .target_env(1, "DSORT_SHUTDOWN_GRACE", "1s")
        .start();
    let spec = big_job(&c, "big", "bigout");
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    let stopping = c.targets[1].id.clone();
    wait_target_in(&c, &id, 1, "sorting", in_sorting);
    c.terminate_target(1);
    let r = c.dsort(&["wait", &id, "--timeout", "30s"]);
    assert!(!r.ok && r.stderr.contains("was aborted"), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&format!("target {stopping} shut down (SIGTERM) before the job finished")),
        "the error names the target and why: {}",
        r.stderr
    );
    assert_eq!(c.wait_target_exit(1, Duration::from_secs(20)), Some(true), "the target exits 0");
    assert_no_job_temp(&c, &[0, 1, 2]);
    assert!(c.dsort_ok(&["ls", "ais://bigout"]).trim().is_empty(), "no partial output");
    let next = c.dsort_ok(&["start", c.small_job("smallout").to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &next, "--timeout", "1m"]);
}

/// SIGTERM to the coordinator while a job runs: it refuses new jobs (503, readiness 503), aborts the running
/// job on every target when its grace period is over (temp files removed everywhere, no output), and exits 0.
#[test]
fn sigterm_on_the_coordinator_aborts_its_running_jobs() {
    let mut c = Cluster::builder()
        .targets(2)
        .target_env(1, "DSORT_TEST_HOLD", "extraction")
        .coordinator_args(&["--shutdown-grace", "3s"])
        .start();
    let spec = big_job(&c, "big", "bigout");
    let small = c.small_job("later");
    let id = c.dsort_ok(&["start", spec.to_str().unwrap()]).trim().to_string();
    wait_running(&c, &id);
    let url = c.url.clone();
    c.terminate_coordinator();
    c.wait_until("coordinator draining", Duration::from_secs(5), |h| h["draining"] == true);
    assert_eq!(c.request("GET", &format!("{url}/v1/health?readiness=true"), false).0, 503);
    let refused = c.dsort(&["start", small.to_str().unwrap()]);
    assert!(!refused.ok && refused.stderr.contains("coordinator is shutting down"), "{}", refused.stderr);
    assert_eq!(c.wait_coordinator_exit(Duration::from_secs(30)), Some(true), "the coordinator exits 0");
    assert_no_job_temp(&c, &[0, 1]);
    for t in &c.targets {
        for mp in &t.mountpaths {
            assert!(list_dir(&mp.join("bigout")).is_empty(), "no output on {}", mp.display());
        }
    }
}
