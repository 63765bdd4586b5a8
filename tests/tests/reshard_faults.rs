//! End to end: `dsort reshard` when things go wrong, through the binary.
//!
//! - spill: a budget that forces many sorted runs and a multi-level merge still gives verified output,
//!   and the temp folder (`--tmp-dir`) is empty after success, after a failure mid-job (extraction or
//!   creation) and after Ctrl-C;
//! - bad input: corrupt shards under each `corrupted_shards` reaction, a record without its content key,
//!   an output that would overwrite an input, missing shards under each `missing_shards` reaction;
//! - a table of bad specs and flags, each with the message it must produce.
//!
//! Contract for a failed, cancelled or interrupted job (issue 13, all-or-nothing): no output shard at
//! all (every shard is staged under a temporary name and published only when all are written), nothing
//! else left in the output folder (no `.dsort-tmp-*`), and the job's temp folder gone. Also: any number of
//! input shards under a small open-file limit, and a zip output that would hold a name twice refused
//! before anything is written.

use dsort_tests::{Run, dsort, dsort_bin, dsort_json, dsort_ok, gen_shards, list_dir, sha256_file, tempdir};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn args_of(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn assert_fails(run: &Run, what: &str, needles: &[&str]) {
    assert!(!run.ok, "{what}: must fail but succeeded:\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
    for n in needles {
        assert!(run.stderr.contains(n), "{what}: expected {n:?} in the error:\n{}", run.stderr);
    }
}

/// Files left in a folder that look like an unfinished publish.
fn temp_leftovers(dir: &Path) -> Vec<String> {
    list_dir(dir).into_iter().filter(|f| f.starts_with(".dsort-tmp")).collect()
}

/// 10 tar shards of 2000 small records (100..300 B, `.jpg` + `.cls`): 20k records of metadata.
fn small_records(dir: &Path) -> String {
    let tpl = format!("{}/in/s-{{00..09}}.tar", dir.display());
    gen_shards(&tpl, 2000, "100..300", ".jpg,.cls", 2);
    tpl
}

/// The spill job: shuffle under a 512 KiB budget (of which the writers and the sorter's I/O buffers
/// take most), so record metadata spills in many small runs.
fn spill_job(input: &str, output: &str, tmp: &Path, shard_size: &str, concurrency: &str) -> Vec<String> {
    [
        "reshard",
        "--input",
        input,
        "--output",
        output,
        "--shard-size",
        shard_size,
        "--algorithm",
        "shuffle",
        "--seed",
        "5",
        "--max-mem",
        "512KiB",
        "--tmp-dir",
        tmp.to_str().unwrap(),
        "--concurrency",
        concurrency,
    ]
    .map(String::from)
    .into()
}

#[test]
fn spill_with_many_runs_and_a_multi_level_merge_gives_verified_output() {
    let dir = tempdir();
    let d = dir.path();
    let input = small_records(d);
    let tmp = d.join("tmp");
    let output = format!("{}/out/o-{{0000..9999}}.tar", d.display());
    let mut args = spill_job(&input, &output, &tmp, "256KiB", "2");
    args.push("--json".into());
    let s = dsort_json(&args_of(&args));
    assert_eq!(s["records"], json!(20_000), "{s}");
    assert!(s["sort_runs"].as_u64().unwrap() >= 10, "at least 10 sorted runs expected: {s}");
    assert!(s["merge_levels"].as_u64().unwrap() >= 2, "a multi-level merge expected: {s}");
    assert!(s["spilled_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["peak_reserved"].as_u64().unwrap() <= 512 << 10, "the pool went over its budget: {s}");
    dsort_ok(&[
        "verify",
        "--input",
        &input,
        "--output",
        &output,
        "--algorithm",
        "shuffle",
        "--seed",
        "5",
        "--shard-size",
        "256KiB",
    ]);
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder not empty after success");
    assert_eq!(temp_leftovers(&d.join("out")), Vec::<String>::new());
}

#[test]
fn failure_while_extracting_removes_the_spill_files() {
    let dir = tempdir();
    let d = dir.path();
    let input = small_records(d);
    // A later shard is corrupt: by the time it is read (one shard at a time, in order), runs have spilled.
    let bad = d.join("in/s-08.tar");
    let off = flip_header_checksum(&bad, 1200);
    let tmp = d.join("tmp");
    let output = format!("{}/out/o-{{0000..9999}}.tar", d.display());
    let mut args = spill_job(&input, &output, &tmp, "256KiB", "1");
    args.extend(["--corrupted-shards", "abort"].map(String::from));
    let run = dsort(&args_of(&args));
    assert_fails(&run, "corrupt s-08.tar", &["s-08.tar", &format!("offset {off}"), "checksum"]);
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder not empty after the failure");
    assert!(!d.join("out").exists(), "extraction failed, yet outputs exist: {:?}", list_dir(&d.join("out")));
}

#[test]
fn failure_while_creating_leaves_no_output_shard_and_no_temp_files() {
    let dir = tempdir();
    let d = dir.path();
    let input = small_records(d);
    let tmp = d.join("tmp");
    // The clean run, for reference.
    let clean = format!("{}/clean/o-{{00..99}}.tar", d.display());
    dsort_ok(&args_of(&spill_job(&input, &clean, &tmp, "256KiB", "2")));
    let clean_dir = d.join("clean");
    let clean_count = list_dir(&clean_dir).len();
    assert!(clean_count > 8, "{clean_count}");
    // The output template runs out of names mid-creation.
    let short = format!("{}/short/o-{{00..04}}.tar", d.display());
    let run = dsort(&args_of(&spill_job(&input, &short, &tmp, "256KiB", "2")));
    assert_fails(&run, "template too short", &["exceeds the 5 names of the output template", "o-{00..04}.tar"]);
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder not empty after the failure");
    let out_dir = d.join("short");
    // The first five shards were written before the names ran out: none of them may stay.
    assert_eq!(list_dir(&out_dir), Vec::<String>::new(), "a failed job left output files");
}

/// A destination that cannot be replaced (a folder holds the shard's name): its rename fails at publish
/// time, after the shards before it (in name order) were published; those are taken back.
#[test]
fn failure_to_publish_one_shard_takes_back_the_others() {
    let dir = tempdir();
    let d = dir.path();
    let input = small_records(d);
    let tmp = d.join("tmp");
    let out_dir = d.join("out");
    std::fs::create_dir_all(out_dir.join("o-0002.tar")).unwrap();
    let output = format!("{}/o-{{0000..9999}}.tar", out_dir.display());
    let run = dsort(&args_of(&spill_job(&input, &output, &tmp, "256KiB", "2")));
    assert_fails(&run, "o-0002.tar is a folder", &["o-0002.tar", "Is a directory", "2 of 2 output shards"]);
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder not empty after the failure");
    assert_eq!(list_dir(&out_dir), vec!["o-0002.tar".to_string()], "only the folder that was there before");
}

#[test]
fn ctrl_c_stops_the_job_and_removes_its_temp_folder() {
    let dir = tempdir();
    let d = dir.path();
    // 100k small records in gzip shards: decoded copies and metadata runs spill under 512 KiB, and the
    // job runs for seconds in a debug build.
    let input = format!("{}/in/s-{{00..19}}.tar.gz", d.display());
    gen_shards(&input, 5000, "100..300", ".jpg,.cls", 3);
    let tmp = d.join("tmp");
    let output = format!("{}/out/o-{{0000..9999}}.tar", d.display());
    let args = spill_job(&input, &output, &tmp, "1MiB", "2");
    let started = Instant::now();
    let mut child =
        Command::new(dsort_bin()).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    // Wait until the job's temp folder holds spill files: the job is then surely mid-way.
    loop {
        let busy = list_dir(&tmp).iter().any(|j| !list_dir(&tmp.join(j)).is_empty());
        if busy {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the job ended before it spilled anything");
        assert!(started.elapsed() < Duration::from_secs(60), "no spill file after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(child.try_wait().unwrap().is_none(), "the job ended before the signal");
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("run kill");
    assert!(kill.success());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "an interrupted job exits 130:\n{stderr}");
    assert!(stderr.contains("interrupted") && stderr.contains("cancelled"), "{stderr}");
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder not empty after Ctrl-C");
    assert_eq!(list_dir(&d.join("out")), Vec::<String>::new(), "an interrupted job left output files");
}

/// Walk a tar's headers and flip a bit of the checksum of the first header at or after byte `from`;
/// returns that header's offset.
fn flip_header_checksum(path: &Path, from: u64) -> u64 {
    let mut b = std::fs::read(path).unwrap();
    let mut off = 0usize;
    loop {
        assert!(off + 512 <= b.len() && b[off] != 0, "no tar header at or after {from} in {}", path.display());
        if off as u64 >= from {
            b[off + 150] ^= 0x04;
            std::fs::write(path, &b).unwrap();
            return off as u64;
        }
        let size_field = std::str::from_utf8(&b[off + 124..off + 136]).unwrap();
        let size = u64::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8).unwrap();
        off += 512 + size.div_ceil(512) as usize * 512;
    }
}

/// 4 shards of 30 records in `DIR/in` with extension `ext`; returns their paths.
fn four_shards(dir: &Path, ext: &str) -> Vec<String> {
    gen_shards(&format!("{}/in/shard-{{0..3}}{ext}", dir.display()), 30, "1KiB..8KiB", ".jpg,.cls,.json", 6);
    (0..4).map(|i| format!("{}/in/shard-{i}{ext}", dir.display())).collect()
}

#[test]
fn corrupt_shards_are_skipped_with_a_warning_or_abort_the_job() {
    for ext in [".tar", ".tar.gz"] {
        let dir = tempdir();
        let d = dir.path();
        let shards = four_shards(d, ext);
        let bad = PathBuf::from(&shards[2]);
        // .tar: a header checksum flipped; .tar.gz: the stream cut in half.
        let needle = if ext == ".tar" {
            format!("offset {}", flip_header_checksum(&bad, 4096))
        } else {
            let len = std::fs::metadata(&bad).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&bad).unwrap().set_len(len / 2).unwrap();
            "truncated".to_string()
        };
        let input = format!("{}/in/shard-{{0..3}}{ext}", d.display());
        let base = |out: &str| -> Vec<String> {
            let output = format!("{}/{out}/o-{{00..99}}.tar", d.display());
            ["reshard", "--input", &input, "--output", &output, "--shard-records", "10"].map(String::from).into()
        };
        // skip: exit 0, a warning naming the shard, the summary counts it, the rest is resharded.
        let mut args = base("skip");
        args.extend(["--corrupted-shards", "skip", "--json"].map(String::from));
        let run = dsort(&args_of(&args));
        assert!(run.ok, "{ext} skip: {}", run.stderr);
        assert!(
            run.stderr.contains("warning") && run.stderr.contains(&format!("shard-2{ext}")),
            "{ext} skip: no warning naming the shard:\n{}",
            run.stderr
        );
        let s: Value = serde_json::from_str(run.stdout.trim()).unwrap();
        assert_eq!(s["skipped_shards"], json!(1), "{ext}: {s}");
        assert_eq!(s["input_shards"], json!(3), "{ext}: {s}");
        assert_eq!(s["records"], json!(90), "{ext}: {s}");
        assert!(s["warnings"].to_string().contains(&format!("shard-2{ext}")), "{ext}: {s}");
        let mut verify = vec!["verify".to_string(), "--input".into()];
        verify.extend([&shards[0], &shards[1], &shards[3]].map(String::clone));
        verify.extend(["--output".into(), format!("{}/skip/o-{{00..99}}.tar", d.display())]);
        verify.extend(["--shard-records".into(), "10".into()]);
        let v = dsort(&args_of(&verify));
        assert!(v.ok, "{ext} skip: the output is not the remaining inputs resharded:\n{}{}", v.stdout, v.stderr);
        // abort, given or by default: exit 1 naming the shard and where.
        for (out, extra) in [("abort", vec!["--corrupted-shards", "abort"]), ("default", vec![])] {
            let mut args = base(out);
            args.extend(extra.iter().map(|s| s.to_string()));
            let run = dsort(&args_of(&args));
            assert_fails(&run, &format!("{ext} {out}"), &[&format!("shard-2{ext}"), "offset", &needle]);
            assert!(!d.join(out).exists(), "{ext} {out}: outputs written: {:?}", list_dir(&d.join(out)));
        }
    }
}

#[test]
fn a_record_without_its_content_key_is_an_error_naming_it() {
    let dir = tempdir();
    let d = dir.path();
    gen_shards(&format!("{}/in/shard-{{0..2}}.tar", d.display()), 10, "1KiB..2KiB", ".jpg,.cls", 1);
    // shard-3 has no .cls entries at all.
    gen_shards(&format!("{}/other/shard-{{0..3}}.tar", d.display()), 10, "1KiB..2KiB", ".jpg,.json", 2);
    std::fs::rename(d.join("other/shard-3.tar"), d.join("in/shard-3.tar")).unwrap();
    let doc = dsort_json(&["inspect", "--json", d.join("in/shard-3.tar").to_str().unwrap()]);
    let names: Vec<String> = doc["shards"][0]["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    let input = format!("{}/in/shard-{{0..3}}.tar", d.display());
    let output = format!("{}/out/o-{{0..99}}.tar", d.display());
    let run = dsort(&[
        "reshard",
        "--input",
        &input,
        "--output",
        &output,
        "--algorithm",
        "content",
        "--key-ext",
        ".cls",
        "--key-type",
        "int",
        "--shard-records",
        "5",
    ]);
    assert_fails(&run, "missing .cls", &["shard-3.tar", "no .cls entry"]);
    assert!(names.iter().any(|n| run.stderr.contains(&format!("record {n:?}"))), "no record named:\n{}", run.stderr);
    assert!(!d.join("out").exists(), "outputs written: {:?}", list_dir(&d.join("out")));
}

#[test]
fn an_output_that_would_overwrite_an_input_is_refused_before_any_work() {
    let dir = tempdir();
    let d = dir.path();
    let shards = four_shards(d, ".tar");
    let hashes = |dir: &Path| -> BTreeMap<String, String> {
        list_dir(dir).into_iter().map(|f| (f.clone(), sha256_file(&dir.join(f)))).collect()
    };
    let before = hashes(&d.join("in"));
    let input = format!("{}/in/shard-{{0..3}}.tar", d.display());
    let tmp = d.join("tmp");
    for output in [
        format!("{}/in/shard-{{0..9}}.tar", d.display()),
        format!("{}/in/shard-%d.tar", d.display()),
        format!("{}/in/shard-{{0..9}}", d.display()),
        format!("{}/in/../in/shard-@9.tar", d.display()),
    ] {
        let run = dsort(&[
            "reshard",
            "--input",
            &input,
            "--output",
            &output,
            "--shard-records",
            "10",
            "--tmp-dir",
            tmp.to_str().unwrap(),
        ]);
        assert_fails(&run, &output, &["would overwrite input shard \"shard-0.tar\""]);
        assert_eq!(hashes(&d.join("in")), before, "{output}: inputs changed");
        assert!(!tmp.exists(), "{output}: refused after creating the temp folder");
    }
    // A list of inputs, and the spec form with the default output bucket (= the input bucket).
    let run = dsort(&[
        "reshard",
        "--input",
        &shards[1],
        &shards[3],
        "--output",
        &format!("{}/in/shard-{{3..5}}.tar", d.display()),
    ]);
    assert_fails(&run, "list", &["would overwrite input shard \"shard-3.tar\""]);
    let spec = d.join("spec.json");
    let v = json!({"input_bck": {"name": "in"}, "input_format": {"template": "shard-{0..3}"},
        "input_extension": ".tar", "output_format": "shard-{2..9}"});
    std::fs::write(&spec, v.to_string()).unwrap();
    let run = dsort(&["reshard", "--spec", spec.to_str().unwrap(), "--root", d.to_str().unwrap()]);
    assert_fails(&run, "spec", &["would overwrite input shard \"shard-2.tar\""]);
    assert_eq!(hashes(&d.join("in")), before, "inputs changed");
    assert_eq!(list_dir(d), vec!["in".to_string(), "spec.json".to_string()], "something was created");
}

#[test]
fn missing_shards_follow_the_reaction() {
    let dir = tempdir();
    let d = dir.path();
    gen_shards(&format!("{}/src/shard-{{0..3}}.tar", d.display()), 30, "1KiB..8KiB", ".jpg,.cls", 8);
    let root = d.to_str().unwrap();
    for reaction in ["ignore", "warn", "abort"] {
        let v = json!({
            "input_bck": {"name": "src"},
            "input_format": {"template": "shard-{0..4}.tar"},
            "output_bck": {"name": format!("dst-{reaction}")},
            "output_format": "out-{00..99}.tar",
            "output_shard_size": "50KiB",
            "config": {"missing_shards": reaction},
        });
        let spec = d.join(format!("{reaction}.json"));
        std::fs::write(&spec, v.to_string()).unwrap();
        let run = dsort(&["reshard", "--spec", spec.to_str().unwrap(), "--root", root, "--json"]);
        let dst = d.join(format!("dst-{reaction}"));
        if reaction == "abort" {
            assert_fails(&run, reaction, &["input shard \"shard-4.tar\" is missing"]);
            assert!(!dst.exists(), "abort: outputs written");
            continue;
        }
        assert!(run.ok, "{reaction}: {}", run.stderr);
        let s: Value = serde_json::from_str(run.stdout.trim()).unwrap();
        assert_eq!(s["records"], json!(120), "{reaction}: {s}");
        assert_eq!(s["input_shards"], json!(4), "{reaction}: {s}");
        let warned = run.stderr.contains("\"shard-4.tar\" is missing");
        assert_eq!(warned, reaction == "warn", "{reaction}: warning on stderr:\n{}", run.stderr);
        assert_eq!(s["warnings"].to_string().contains("shard-4.tar"), reaction == "warn", "{reaction}: {s}");
        dsort_ok(&[
            "verify",
            "--input",
            &format!("{root}/src/shard-{{0..3}}.tar"),
            "--output",
            &format!("{}/out-{{00..99}}.tar", dst.display()),
            "--shard-size",
            "50KiB",
        ]);
    }
}

/// Bad specs through `dsort reshard --spec`, each with the message it must produce (the full spec table
/// is in `dsort/src/spec.rs`; these prove the CLI reports them, with the file, before any work).
#[test]
fn bad_specs_and_flags_are_refused_with_a_message_naming_the_field() {
    let dir = tempdir();
    let d = dir.path();
    gen_shards(&format!("{}/src/shard-{{0..3}}.tar", d.display()), 5, "1KiB", ".jpg,.cls", 1);
    let base = r#""input_bck":{"name":"src"},"input_format":{"template":"shard-{0..3}.tar"}"#;
    let out = r#""output_format":"out-{000..999}.tar""#;
    let spec = |rest: &str| format!("{{{base},{out},{rest}}}");
    let no_out = |rest: &str| format!("{{{base},{rest}}}");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (spec(r#""bogus":1"#), vec!["bogus: unknown key"]),
        (
            spec(r#""output_shard_sise":"1KiB""#),
            vec!["output_shard_sise: unknown key", "did you mean \"output_shard_size\""],
        ),
        (spec(r#""algorithm":{"kind":"shuffle","seed":"-1"}"#), vec!["algorithm.seed: invalid seed \"-1\""]),
        (spec(r#""max_mem_usage":"120%""#), vec!["max_mem_usage: percent must be in the range (0, 100)"]),
        (spec(r#""max_mem_usage":"lots""#), vec!["max_mem_usage: invalid quantity", "\"lots\""]),
        (
            format!(r#"{{"input_format":{{"template":"shard-{{0..3}}.tar"}},{out}}}"#),
            vec!["input_bck: missing source bucket"],
        ),
        (spec(r#""algorithm":{"kind":"random"}"#), vec!["algorithm.kind: invalid sorting algorithm \"random\""]),
        (spec(r#""algorithm":{"kind":"content"}"#), vec!["algorithm.extension: invalid extension \"\""]),
        (
            spec(r#""algorithm":{"kind":"content","extension":".cls","content_key_type":"bytes"}"#),
            vec!["algorithm.content_key_type: invalid content sorting key \"bytes\""],
        ),
        (spec(r#""output_shard_size":"-5""#), vec!["output_shard_size: output shard size must be >= 0 (got -5)"]),
        (spec(r#""output_shard_records":-3"#), vec!["output_shard_records: must be >= 0 (got -3)"]),
        (no_out(r#""output_format":"out""#), vec!["output_format: prefix-only template not supported"]),
        (
            no_out(r#""output_format":"out-{9..0}.tar""#),
            vec!["output_format: invalid 'bash' template", "start 9 is greater than end 0"],
        ),
        (no_out(r#""output_format":"../out-{0..9}.tar""#), vec!["output_format:", "'..'"]),
        (
            no_out(r#""output_format":"out-%06d.tar""#),
            vec!["output_shard_size: must be set when output_format is unbounded"],
        ),
        (
            spec(r#""config":{"missing_shards":"sometimes"}"#),
            vec!["config.missing_shards: invalid distributed_sort.missing_shards: \"sometimes\""],
        ),
        (
            spec(r#""config":{"corrupted_shards":"maybe"}"#),
            vec!["config.corrupted_shards:", "expecting one of: [skip abort]"],
        ),
        (spec(r#""dsorter_type":"fast""#), vec!["dsorter_type: invalid dsorter type \"fast\""]),
        (spec(r#""input_extension":".zip""#), vec!["input_extension: \".zip\" vs \".tar\""]),
        (spec(r#""output_extension":".rar""#), vec!["output_extension: unknown archive extension \".rar\""]),
        (
            spec(r#""extract_concurrency_max_limit":-2"#),
            vec!["extract_concurrency_max_limit: negative concurrency limit ('extract', -2)"],
        ),
        (spec(r#""dry_run":"yes""#), vec!["dry_run: must be true or false, got \"yes\""]),
        (
            format!(r#"{{"input_bck":{{"name":"a/b"}},"input_format":{{"template":"shard-{{0..3}}.tar"}},{out}}}"#),
            vec!["input_bck.name: invalid bucket name \"a/b\""],
        ),
        (
            format!(
                r#"{{"input_bck":{{"name":"src","provider":"gcp"}},"input_format":{{"template":"shard-{{0..3}}.tar"}},{out}}}"#
            ),
            vec!["input_bck.provider", "provider \"gcp\" not supported"],
        ),
        (
            no_out(r#""ekm_file":"no-such-ekm.json","output_shard_size":"1KiB""#),
            vec!["ekm_file", "no-such-ekm.json", "No such file"],
        ),
        (
            no_out(r#""ekm_file":"http://example.com/x.json","output_shard_size":"1KiB""#),
            vec!["ekm_file", "not available offline"],
        ),
        // Every error at once, each naming its field.
        (
            spec(r#""algorithm":{"kind":"shuffle","seed":"x"},"max_mem_usage":"lots","Output_Format":"b-{0..9}.tar""#),
            vec![
                "output_format: key given more than once",
                "algorithm.seed: invalid seed \"x\"",
                "max_mem_usage: invalid quantity",
            ],
        ),
        ("[1,2]".to_string(), vec!["spec: must be an object of keys, got a list"]),
        (format!("{{{base},"), vec!["spec.json: spec is not valid JSON"]),
        ("input_bck: [unclosed\n".to_string(), vec!["spec.json: spec is not valid YAML"]),
    ];
    let root = d.to_str().unwrap();
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = d.join("spec.json");
        std::fs::write(&path, text).unwrap();
        let run = dsort(&["reshard", "--spec", path.to_str().unwrap(), "--root", root]);
        assert_fails(&run, &format!("case {i}: {text}"), needles);
        assert_eq!(list_dir(d), vec!["spec.json".to_string(), "src".to_string()], "case {i}: {text}: created files");
    }
    // Bad flags.
    let input = format!("{root}/src/shard-{{0..3}}.tar");
    let output = format!("{root}/dst/o-{{0..9}}.tar");
    let flag_cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (vec!["--shard-size".into(), "lots".into()], vec!["output_shard_size: invalid size \"lots\""]),
        (vec!["--shard-size".into(), "1KiB".into(), "--shard-records".into(), "3".into()], vec!["cannot be used with"]),
        (vec!["--algorithm".into(), "content".into()], vec!["algorithm.extension: invalid extension \"\""]),
        (vec!["--algorithm".into(), "random".into()], vec!["invalid value 'random'"]),
        (vec!["--max-mem".into(), "0".into()], vec!["max_mem_usage: invalid quantity"]),
        (vec!["--spec".into(), format!("{root}/nope.json")], vec!["cannot be used with"]),
    ];
    for (extra, needles) in &flag_cases {
        let mut args = vec!["reshard".to_string(), "--input".into(), input.clone(), "--output".into(), output.clone()];
        args.extend(extra.iter().cloned());
        assert_fails(&dsort(&args_of(&args)), &format!("{extra:?}"), needles);
    }
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--input", &format!("{root}/src/shard-{{0..3}}.dat"), "--output", &output],
            &["--input: \"shard-0.dat\" has no known archive extension"],
        ),
        (&["--input", &input, "--output", &format!("{root}/dst/o.tar")], &["--output:", "has no range"]),
        (&["--spec", &format!("{root}/nope.json")], &["nope.json", "No such file"]),
    ];
    for (args, needles) in cases {
        let mut v = vec!["reshard"];
        v.extend_from_slice(args);
        assert_fails(&dsort(&v), &format!("{args:?}"), needles);
    }
    assert_eq!(list_dir(d), vec!["spec.json".to_string(), "src".to_string()], "a bad flag created files");
}

/// `dsort reshard ARGS` run by `sh` under `ulimit -n LIMIT` (soft and hard: the job cannot raise it).
fn dsort_under_ulimit(limit: u32, args: &[&str]) -> Run {
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\"")).arg(dsort_bin()).args(args);
    sh.output().expect("run sh").into()
}

#[test]
fn more_input_shards_than_the_open_file_limit() {
    let dir = tempdir();
    let d = dir.path();
    // 1,500 tar shards (in place, zero-copy) and 300 gzip shards whose decoded copies spill (read back
    // from 300 spill files), each job under a limit of 256 open files.
    let tars = format!("{}/tar/s-{{0000..1499}}.tar", d.display());
    gen_shards(&tars, 2, "50..150", ".jpg,.cls", 7);
    let gzs = format!("{}/gz/s-{{000..299}}.tar.gz", d.display());
    gen_shards(&gzs, 2, "4KiB..8KiB", ".jpg,.cls", 8);
    for (input, max_mem) in [(&tars, "64MiB"), (&gzs, "1MiB")] {
        let output =
            format!("{}/out-{}/o-{{000..999}}.tar", d.display(), &input[d.display().to_string().len() + 1..][..2]);
        let tmp = d.join("tmp");
        let args = [
            "reshard",
            "--input",
            input,
            "--output",
            &output,
            "--shard-records",
            "100",
            "--algorithm",
            "shuffle",
            "--seed",
            "3",
            "--max-mem",
            max_mem,
            "--tmp-dir",
            tmp.to_str().unwrap(),
            "--json",
        ];
        let run = dsort_under_ulimit(256, &args);
        assert!(run.ok, "{input} under ulimit -n 256:\n{}", run.stderr);
        let s: Value = serde_json::from_str(run.stdout.trim()).unwrap();
        let shards = if input == &tars { 1500 } else { 300 };
        assert_eq!(s["input_shards"], json!(shards), "{s}");
        assert_eq!(s["records"], json!(2 * shards), "{s}");
        if input == &gzs {
            assert!(s["spilled_bytes"].as_u64().unwrap() > 0, "decoded copies were to spill: {s}");
        }
        dsort_ok(&[
            "verify",
            "--input",
            input,
            "--output",
            &output,
            "--algorithm",
            "shuffle",
            "--seed",
            "3",
            "--shard-records",
            "100",
        ]);
        assert_eq!(list_dir(&tmp), Vec::<String>::new());
    }
}

#[test]
fn a_zip_output_that_would_hold_a_name_twice_is_refused_before_anything_is_written() {
    let dir = tempdir();
    let d = dir.path();
    gen_shards(&format!("{}/in/s-{{0..3}}.tar", d.display()), 20, "1KiB..4KiB", ".jpg,.cls", 4);
    // s-4.tar holds the very records of s-1.tar: same record names, so same entry names.
    std::fs::copy(d.join("in/s-1.tar"), d.join("in/s-4.tar")).unwrap();
    let input = format!("{}/in/s-{{0..4}}.tar", d.display());
    let tmp = d.join("tmp");
    let out = d.join("out");
    // By name, a record of s-1 and its copy in s-4 are neighbours: they fall into the same output shard,
    // after several shards that are fine.
    let output = format!("{}/o-{{000..999}}.zip", out.display());
    let args =
        ["reshard", "--input", &input, "--output", &output, "--shard-records", "4", "--tmp-dir", tmp.to_str().unwrap()];
    let run = dsort(&args);
    assert_fails(
        &run,
        "duplicate names in a zip",
        &["s-1.tar", "s-4.tar", "would hold entry", "twice", "nothing was written"],
    );
    assert!(!out.exists(), "the output folder was created: {:?}", list_dir(&out));
    assert_eq!(list_dir(&tmp), Vec::<String>::new());
    // The same job to tar (which may hold a name twice) runs, and without the copy so does the zip job.
    dsort_ok(&[
        "reshard",
        "--input",
        &input,
        "--output",
        &format!("{}/t-{{000..999}}.tar", out.display()),
        "--shard-records",
        "4",
    ]);
    let fine = format!("{}/in/s-{{0..3}}.tar", d.display());
    dsort_ok(&[
        "reshard",
        "--input",
        &fine,
        "--output",
        &format!("{}/z/o-{{000..999}}.zip", d.display()),
        "--shard-records",
        "4",
    ]);
    assert_eq!(list_dir(&d.join("z")).len(), 20);
}

/// The test's own tmpfs of `size` at `dir`, unmounted when dropped; `None` (with a message) where
/// mounting is not permitted.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIP: cannot mount a tmpfs at {} (needs root and CAP_SYS_ADMIN)", dir.display());
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_mid_creation_leaves_no_output_shard() {
    let dir = tempdir();
    let d = dir.path();
    let input = small_records(d);
    let out = d.join("small-disk");
    let Some(_fs) = Tmpfs::mount(&out, "2m") else { return };
    // A shard already there (from an earlier job) with an output's name survives the failed job.
    std::fs::write(out.join("o-0000.tar"), b"earlier").unwrap();
    let tmp = d.join("tmp");
    let output = format!("{}/o-{{0000..9999}}.tar", out.display());
    let run = dsort(&args_of(&spill_job(&input, &output, &tmp, "256KiB", "2")));
    assert_fails(&run, "disk full", &["No space left on device"]);
    assert_eq!(list_dir(&out), vec!["o-0000.tar".to_string()], "a failed job left output files");
    assert_eq!(std::fs::read(out.join("o-0000.tar")).unwrap(), b"earlier");
    assert_eq!(list_dir(&tmp), Vec::<String>::new());
}

#[test]
fn sigterm_with_every_shard_staged_leaves_no_output_shard() {
    use std::io::BufRead;
    let dir = tempdir();
    let d = dir.path();
    let input = small_records(d);
    let tmp = d.join("tmp");
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("o-0001.tar"), b"earlier").unwrap();
    let output = format!("{}/o-{{0000..9999}}.tar", out.display());
    let mut child = Command::new(dsort_bin())
        .args(spill_job(&input, &output, &tmp, "256KiB", "2"))
        .env("DSORT_TEST_HOLD", "publish")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The failpoint's line says every output shard is written and staged: the job is at its last step.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("holding") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the job ended without holding: {said}");
        said.push_str(&line);
    }
    let staged = temp_leftovers(&out);
    assert!(staged.len() > 8, "every shard is staged in the output folder: {staged:?}");
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
    assert!(kill.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "an interrupted job exits 130:\n{said}{rest}");
    assert_eq!(list_dir(&out), vec!["o-0001.tar".to_string()], "an interrupted job left output files");
    assert_eq!(std::fs::read(out.join("o-0001.tar")).unwrap(), b"earlier", "an older file was replaced");
    assert_eq!(list_dir(&tmp), Vec::<String>::new());
}
