//! Objects stay reachable and jobs read inputs where they are, whatever the membership does (real processes):
//! a target joins (the job over the old placement keeps every record, `dsort get` finds every object, a
//! rebalance moves the objects the newcomer owns, the next job reads every input on its owner); a target
//! leaves and returns (objects written and overwritten meanwhile end on their owner, newest version);
//! `kill -9` of the sender or of the receiver in the middle of a rebalance loses no object.

use dsort_tests::{Cluster, ClusterBuilder, assert_placement, dsort_json, gen_shards, list_dir, metric};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Fixed target ids (placement is then the same at every run): index `i` gets `IDS[i]`.
const IDS: [&str; 3] = ["t-alpha", "t-bravo", "t-charlie"];

fn builder(targets: usize) -> ClusterBuilder {
    IDS.iter()
        .enumerate()
        .fold(Cluster::builder().targets(targets), |b, (i, id)| b.target_env(i, "DSORT_TARGET_ID", id))
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    list_dir(dir).into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap())).collect()
}

/// Put `shards` generated shards (`records` records of `size` each) as `ais://b/shard-NN.tar` and wait until
/// the rebalance settled; name → bytes.
fn load(c: &Cluster, shards: usize, records: usize, size: &str, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let data = c.root().join("data");
    gen_shards(&format!("{}/shard-{{00..{:02}}}.tar", data.display(), shards - 1), records, size, ".jpg,.cls", seed);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://b/"]);
    c.wait_rebalanced(Duration::from_secs(30));
    files(&data)
}

/// The objects of `ais://BUCKET` whose HRW owner among the cluster's healthy targets is target `i`.
fn owned_by(c: &Cluster, bucket: &str, names: impl IntoIterator<Item = String>, i: usize) -> Vec<String> {
    let ids: Vec<String> = c.cluster_map().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect();
    names
        .into_iter()
        .filter(|n| coordinator::placement::owner_target(bucket, n, &ids).map(String::as_str) == Some(&c.targets[i].id))
        .collect()
}

/// Every target's metric `name`, summed.
fn cluster_metric(c: &Cluster, name: &str) -> f64 {
    c.targets
        .iter()
        .map(|t| {
            let (status, text) = c.request("GET", &format!("{}/metrics", t.url), true);
            assert_eq!(status, 200, "{text}");
            metric(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        })
        .sum()
}

/// Run the job of `spec_path` on the cluster; its output must be byte-identical to `expected` (the same
/// spec by `dsort reshard`). `out` is the job's output bucket.
fn job_equals_reshard(c: &Cluster, spec_path: &Path, out: &str, expected: &BTreeMap<String, Vec<u8>>) {
    let id = c.dsort_ok(&["start", spec_path.to_str().unwrap()]).trim().to_string();
    let waited = c.dsort_ok(&["wait", &id, "--timeout", "2m"]);
    assert!(waited.contains(&format!("Created {} new shards.", expected.len())), "{waited}");
    assert_eq!(c.object_names(out), expected.keys().cloned().collect::<Vec<_>>(), "output names of {out}");
    let got = c.root().join(format!("got-{out}"));
    c.get_objects(out, expected.keys(), &got);
    let got = files(&got);
    for (name, bytes) in expected {
        assert!(got[name] == *bytes, "{out}/{name} differs from dsort reshard");
    }
}

/// The issue's scenario: 2 targets, 12 shards of 200 records, a third target joins. Before any rebalance
/// the job's output holds every record (byte-identical to `dsort reshard`, checked by `dsort verify`), and
/// every object is reachable; `dsort rebalance --wait` moves exactly the objects the new target owns; the
/// next job reads every input on its owner.
#[test]
fn a_joining_target_loses_no_record_and_the_rebalance_moves_what_it_owns() {
    let mut c = builder(2).coordinator_args(&["--rebalance", "manual"]).start();
    let root = c.root().join("local");
    let src = root.join("src");
    gen_shards(&format!("{}/shard-{{00..11}}.tar", src.display()), 200, "100B..600B", ".jpg,.cls", 31);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    let objects = files(&src);
    let spec = |out: &str| {
        format!(
            r#"{{"input_bck":{{"name":"src"}},"input_format":{{"template":"shard-{{00..11}}.tar"}},
            "output_bck":{{"name":"{out}"}},"output_format":"out-{{000..999}}.tar","output_shard_size":"200KiB",
            "algorithm":{{"kind":"shuffle","seed":"5"}}}}"#
        )
    };
    let spec_path = root.join("spec.json");
    std::fs::write(&spec_path, spec("dst")).unwrap();
    dsort_json(&["reshard", "--spec", spec_path.to_str().unwrap(), "--root", root.to_str().unwrap(), "--json"]);
    let expected = files(&root.join("dst"));

    let new = c.add_target(2);
    let moved = owned_by(&c, "src", objects.keys().cloned(), new);
    assert!(!moved.is_empty() && moved.len() < objects.len(), "some objects change owner: {moved:?}");
    let h = c.health();
    assert_eq!(h["rebalance"]["auto"], false, "{h}");
    assert_eq!(h["rebalance"]["passes"], 0, "manual: no pass yet: {h}");

    // The job over the old placement: every record, exactly once, byte-identical to dsort reshard.
    job_equals_reshard(&c, &spec_path, "dst", &expected);
    let input = format!("{}/shard-{{00..11}}.tar", src.display());
    let output = format!("{}/out-{{000..999}}.tar", c.root().join("got-dst").display());
    let order = ["--algorithm", "shuffle", "--seed", "5", "--shard-size", "200KiB", "--json"];
    let verified = dsort_tests::dsort(&[&["verify", "--input", &input, "--output", &output][..], &order].concat());
    assert!(verified.ok, "dsort verify: {}\n{}", verified.stdout, verified.stderr);
    let v: serde_json::Value = serde_json::from_str(verified.stdout.trim()).unwrap();
    assert_eq!(v["records"], 2400, "every record in the output: {v}");
    assert_eq!(
        cluster_metric(&c, "dsort_extracted_off_owner_shards_total"),
        moved.len() as f64,
        "the moved objects were extracted by their holder"
    );

    // Every object is reachable (get from neighbour) and listed once.
    assert_eq!(c.object_names("src"), objects.keys().cloned().collect::<Vec<_>>());
    let got = c.root().join("got-src");
    c.get_objects("src", objects.keys(), &got);
    assert!(files(&got) == objects, "dsort get returns every object as it was put");
    let (status, _) = c.request("HEAD", &format!("{}/v1/objects/src/{}", c.url, moved[0]), true);
    assert_eq!(status, 200, "HEAD finds it too");

    // The rebalance moves exactly the objects the new target owns, then each object is on its owner only.
    let r: serde_json::Value =
        serde_json::from_str(c.dsort_ok(&["rebalance", "--wait", "--json"]).trim()).expect("rebalance --json");
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["objects_moved"], moved.len(), "{r}");
    assert_eq!(r["bytes_moved"], moved.iter().map(|n| objects[n].len()).sum::<usize>(), "{r}");
    assert_eq!(r["targets"], 3, "{r}");
    assert_placement(&c, "src", &objects, false);
    let h = c.health();
    assert_eq!(h["rebalance"]["state"], "done", "the health shows it: {h}");
    assert_eq!(h["rebalance"]["pass_generation"], h["rebalance"]["membership_generation"], "{h}");
    let text = c.dsort_ok(&["rebalance", "--status"]);
    assert!(text.contains("rebalance: done") && text.contains(&format!("{} object(s) moved", moved.len())), "{text}");

    // The next job reads every input on its owner: no shard extracted off its owner.
    std::fs::write(&spec_path, spec("dst2")).unwrap();
    let before = cluster_metric(&c, "dsort_extracted_off_owner_shards_total");
    job_equals_reshard(&c, &spec_path, "dst2", &expected);
    assert_eq!(cluster_metric(&c, "dsort_extracted_off_owner_shards_total"), before, "every input read on its owner");
    // A second pass finds nothing to move.
    let r: serde_json::Value =
        serde_json::from_str(c.dsort_ok(&["rebalance", "--wait", "--json"]).trim()).expect("rebalance --json");
    assert_eq!((r["state"].as_str(), r["objects_moved"].as_u64()), (Some("done"), Some(0)), "{r}");
}

/// A target leaves (SIGTERM) and comes back: objects put while it was away, and one of its objects
/// overwritten meanwhile, are reachable all along; the automatic rebalance brings each to its owner, the
/// newest version winning; a shard held nowhere is a missing shard for the job, not a silent skip.
#[test]
fn a_target_leaving_and_returning_keeps_every_object_reachable() {
    let mut c = builder(3).start();
    let mut objects = load(&c, 24, 5, "200B..1KiB", 41);
    let owned_by_1 = owned_by(&c, "b", objects.keys().cloned(), 1);
    assert!(!owned_by_1.is_empty());

    let id1 = c.targets[1].id.clone();
    assert!(c.stop_target(1));
    c.wait_until("target 1 down", Duration::from_secs(10), |h| h["targets"][&id1] == "down");
    // Meanwhile: new objects (some of them owned by target 1 once it is back), and a new version of one of
    // target 1's objects, written to the target that owns it among the two that are up.
    let later = c.root().join("later");
    gen_shards(&format!("{}/late-{{00..11}}.tar", later.display()), 5, "200B..1KiB", ".jpg,.cls", 42);
    c.dsort_ok(&["put", later.to_str().unwrap(), "ais://b/"]);
    objects.extend(files(&later));
    let overwritten = owned_by_1[0].clone();
    let newer = c.root().join("newer");
    std::fs::create_dir_all(&newer).unwrap();
    let version2 = std::fs::read(later.join("late-00.tar")).unwrap(); // another valid shard
    assert_ne!(version2, objects[&overwritten]);
    std::fs::write(newer.join(&overwritten), &version2).unwrap();
    c.dsort_ok(&["put", newer.join(&overwritten).to_str().unwrap(), "ais://b/"]);
    objects.insert(overwritten.clone(), version2);
    let away: BTreeMap<String, Vec<u8>> =
        files(&later).into_iter().chain([(overwritten.clone(), objects[&overwritten].clone())]).collect();
    c.get_objects("b", away.keys(), &c.root().join("got-away"));
    assert!(files(&c.root().join("got-away")) == away, "objects written while a target is away are reachable");
    // A job meanwhile runs over what the healthy targets hold and says that a target that is down may hold
    // the rest.
    let spec = r#"{"input_bck":{"name":"b"},"input_format":{"template":"shard-{00..23}.tar"},
        "output_bck":{"name":"while-down"},"output_format":"o-{0..99}.tar","output_shard_size":"64KiB"}"#;
    let id = c.start_job(spec);
    c.dsort_ok(&["wait", &id, "--timeout", "1m"]);
    let infos = c.get_json(&format!("{}/v1/sort?uuid={id}", c.url));
    let warned = infos.as_object().unwrap().values().flat_map(|i| i["Metrics"]["warnings"].as_array().unwrap().clone());
    let warned =
        warned.filter_map(|w| w.as_str().map(str::to_string)).any(|w| w.contains("may hold them") && w.contains(&id1));
    assert!(warned, "the job warns that a target that is down may hold inputs: {infos}");

    c.start_target(1);
    c.wait_healthy(3);
    let late_owned_by_1 = owned_by(&c, "b", files(&later).into_keys(), 1);
    assert!(!late_owned_by_1.is_empty(), "some objects written meanwhile belong to the returning target");
    // All reachable at once, before and after the rebalance, with the newest version.
    c.get_objects("b", objects.keys(), &c.root().join("got-back"));
    let h = c.wait_rebalanced(Duration::from_secs(60));
    assert!(h["rebalance"]["objects_moved"].as_u64().unwrap() >= late_owned_by_1.len() as u64, "{h}");
    assert_placement(&c, "b", &objects, false);
    c.get_objects("b", objects.keys(), &c.root().join("got-after"));
    assert!(files(&c.root().join("got-after")) == objects, "every object, newest version, after the rebalance");

    // A shard named by the spec that no target holds follows missing_shards (abort), naming it.
    let spec = r#"{"input_bck":{"name":"b"},"input_format":{"template":"shard-{00..24}.tar"},
        "output_bck":{"name":"o"},"output_format":"o-{0..99}.tar","output_shard_size":"64KiB",
        "config":{"missing_shards":"abort"}}"#;
    let id = c.start_job(spec);
    let r = c.dsort(&["wait", &id, "--timeout", "1m"]);
    assert!(!r.ok && r.stderr.contains("shard-24.tar"), "the missing shard is named: {}", r.stderr);
}

/// Kill -9 of target `victim` while it is held at failpoint `hold` in the first rebalance pass after a
/// third target joined: no object is lost, every object the survivors hold stays reachable, and once the
/// victim is back the rebalance ends with every object exactly once, on its owner.
fn killed_mid_rebalance(victim: usize, hold: &str, held_line: &str) {
    let mut c = builder(2).target_env(victim, "DSORT_TEST_HOLD", hold).start();
    let objects = load(&c, 30, 4, "1KiB..8KiB", 51);
    let new = c.add_target(2);
    let moving = owned_by(&c, "b", objects.keys().cloned(), new);
    assert!(!moving.is_empty());
    c.wait_log(victim, held_line);
    c.kill_target(victim);
    // The kill landed where it was meant to: with a copy confirmed by the new owner and not yet deleted by
    // the sender (the object is on both), or with bytes received and not yet published (temp files only).
    let (published, temp) = bucket_files(&c, new);
    if hold == "rebalance-send" {
        let (on_victim, _) = bucket_files(&c, victim);
        assert!(published.iter().any(|n| on_victim.contains(n)), "an object on both: {published:?} {on_victim:?}");
    } else {
        assert!(published.is_empty() && !temp.is_empty(), "received, unpublished: {published:?} {temp:?}");
    }
    let down = c.targets[victim].id.clone();
    c.wait_until("victim down", Duration::from_secs(10), |h| h["targets"][&down] == "down");
    // What the victim does not hold stays reachable.
    let survivors: Vec<String> = c.object_names("b");
    assert!(!survivors.is_empty());
    c.get_objects("b", &survivors, &c.root().join("got-while-down"));
    // Back without the failpoint: the rebalance resumes and ends; every object once, on its owner.
    c.clear_target_env();
    c.start_target(victim);
    c.wait_healthy(3);
    c.wait_rebalanced(Duration::from_secs(60));
    assert_placement(&c, "b", &objects, false);
    c.get_objects("b", objects.keys(), &c.root().join("got-after"));
    assert!(files(&c.root().join("got-after")) == objects, "every object, as it was put");
}

/// The names of bucket `b`'s files on target `i` (every mountpath): objects, and temporary files.
fn bucket_files(c: &Cluster, i: usize) -> (Vec<String>, Vec<String>) {
    let all: Vec<String> = c.targets[i]
        .mountpaths
        .iter()
        .flat_map(|mp| dsort_tests::files_under(&mp.join("b")))
        .map(|p| p.display().to_string())
        .collect();
    all.into_iter().partition(|n| !n.rsplit('/').next().unwrap_or_default().starts_with(".dsort-tmp"))
}

/// The sender dies after the new owner confirmed a copy and before it deleted its own.
#[test]
fn a_sender_killed_mid_rebalance_loses_no_object() {
    killed_mid_rebalance(0, "rebalance-send", "holding the rebalance at rebalance-send");
}

/// The receiver dies with an object received but not yet published.
#[test]
fn a_receiver_killed_mid_rebalance_loses_no_object() {
    killed_mid_rebalance(2, "rebalance-recv", "holding the rebalance at rebalance-recv");
}

/// A job started while a rebalance pass moves objects (a sender held after its first confirmed copy) stops
/// the pass first (no object moves while the job learns where its inputs are and reads them), runs over
/// whatever placement it finds with every record, byte-identical to `dsort reshard`; the pass runs again
/// after the job and ends with every object on its owner.
#[test]
fn a_job_started_mid_rebalance_stops_it_and_reads_every_input() {
    let (mut c, release) = held_at("rebalance-send");
    let root = c.root().join("local");
    let src = root.join("src");
    gen_shards(&format!("{}/shard-{{00..11}}.tar", src.display()), 50, "100B..600B", ".jpg,.cls", 61);
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    let objects = files(&src);
    let spec = r#"{"input_bck":{"name":"src"},"input_format":{"template":"shard-{00..11}.tar"},
        "output_bck":{"name":"dst"},"output_format":"out-{000..999}.tar","output_shard_size":"64KiB",
        "algorithm":{"kind":"content","extension":".cls","content_key_type":"int"}}"#;
    let spec_path = root.join("spec.json");
    std::fs::write(&spec_path, spec).unwrap();
    dsort_json(&["reshard", "--spec", spec_path.to_str().unwrap(), "--root", root.to_str().unwrap(), "--json"]);
    let expected = files(&root.join("dst"));
    c.wait_rebalanced(Duration::from_secs(30));
    let new = c.add_target(2);
    assert!(!owned_by(&c, "src", objects.keys().cloned(), new).is_empty());
    c.wait_log(0, "holding the rebalance at rebalance-send");
    let h = c.health();
    assert_eq!(h["rebalance"]["state"], "running", "{h}");

    job_equals_reshard(&c, &spec_path, "dst", &expected);
    std::fs::write(&release, b"").unwrap();
    let h = c.wait_rebalanced(Duration::from_secs(60));
    assert!(h["rebalance"]["passes"].as_u64().unwrap() >= 2, "the stopped pass ran again: {h}");
    assert_placement(&c, "src", &objects, false);
    let _ = std::fs::remove_file(&release);
}

/// Two targets, target 0 held at failpoint `point` until the returned file (not created yet) exists.
fn held_at(point: &str) -> (Cluster, std::path::PathBuf) {
    let p = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let release = p.to_path_buf();
    drop(p);
    let c = builder(2)
        .target_env(0, "DSORT_TEST_HOLD", point)
        .target_env(0, "DSORT_TEST_HOLD_RELEASE", release.to_str().unwrap())
        .start();
    (c, release)
}

/// A target restarted with one more mountpath: the rebalance moves each of its objects whose HRW mountpath
/// is the new one there (within the target), and every object stays reachable.
#[test]
fn a_mountpath_added_to_a_target_gets_its_objects() {
    let mut c = builder(2).start();
    let objects = load(&c, 30, 3, "200B..1KiB", 71);
    assert!(c.stop_target(1));
    let extra = c.root().join("t1").join("mp-new");
    c.targets[1].mountpaths.push(extra.clone());
    c.start_target(1);
    c.wait_healthy(2);
    let h = c.wait_rebalanced(Duration::from_secs(60));
    assert!(h["rebalance"]["objects_relocated"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(h["rebalance"]["objects_moved"], 0, "no object changes target: {h}");
    assert!(!dsort_tests::files_under(&extra.join("b")).is_empty(), "the new mountpath holds objects");
    assert_placement(&c, "b", &objects, false);
    c.get_objects("b", objects.keys(), &c.root().join("got"));
    assert!(files(&c.root().join("got")) == objects);
}

/// A target joins while a job runs (held in extraction): the rebalance waits (`waiting`, nothing moves under
/// the job), the job ends with every record, then the pass runs and places every object on its owner.
#[test]
fn a_rebalance_waits_for_the_running_job() {
    let (mut c, release) = held_at("extraction");
    let objects = load(&c, 12, 20, "200B..1KiB", 81);
    let id = c.start_job(
        r#"{"input_bck":{"name":"b"},"input_format":{"template":"shard-{00..11}.tar"},
        "output_bck":{"name":"o"},"output_format":"o-{0..99}.tar","output_shard_records":"50"}"#,
    );
    c.wait_log(0, "in phase extraction");
    let new = c.add_target(2);
    assert!(!owned_by(&c, "b", objects.keys().cloned(), new).is_empty());
    let h = c.wait_until("rebalance waiting", Duration::from_secs(10), |h| h["rebalance"]["state"] == "waiting");
    assert_eq!(h["rebalance"]["pending"], true, "{h}");
    std::fs::write(&release, b"").unwrap();
    let waited = c.dsort_ok(&["wait", &id, "--timeout", "1m"]);
    assert!(waited.contains("Created 5 new shards."), "every record (240 by 50): {waited}");
    c.wait_rebalanced(Duration::from_secs(60));
    assert_placement(&c, "b", &objects, false);
    let _ = std::fs::remove_file(&release);
}
