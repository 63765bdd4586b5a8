//! End to end: `dsort gen` writes datasets in every format, `dsort inspect` reads them back, and peer
//! tools (GNU tar, Python) agree on what is inside.

use dsort_tests::{dsort, dsort_ok, have, tempdir, webdataset_fixtures};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const FORMATS: &[&str] = &[".tar", ".tgz", ".tar.gz", ".tar.zst", ".tar.lz4", ".zip"];

fn generate(dir: &Path, ext: &str, extra: &[&str]) -> Value {
    generate_seeded(dir, ext, 11, extra)
}

/// Three shards of 20 `.jpg` + `.cls` + `.json` records in `dir`; the `gen --json` summary.
fn generate_seeded(dir: &Path, ext: &str, seed: u64, extra: &[&str]) -> Value {
    let tpl = format!("{}/shard-{{00..02}}{ext}", dir.display());
    let seed = seed.to_string();
    let mut args = vec![
        "gen",
        "--output",
        &tpl,
        "--records-per-shard",
        "20",
        "--record-size",
        "1KiB..8KiB",
        "--exts",
        ".jpg,.cls,.json",
        "--seed",
        &seed,
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(dsort_ok(&args).trim()).expect("gen --json prints JSON")
}

fn inspect_json(paths: &[String]) -> Value {
    let mut args = vec!["inspect", "--json"];
    args.extend(paths.iter().map(String::as_str));
    serde_json::from_str(dsort_ok(&args).trim()).expect("inspect --json prints one JSON document")
}

fn shards(dir: &Path, ext: &str) -> Vec<String> {
    (0..3).map(|i| format!("{}/shard-{i:02}{ext}", dir.display())).collect()
}

#[test]
fn every_format_round_trips_through_gen_and_inspect() {
    for ext in FORMATS {
        let dir = tempdir();
        let summary = generate(dir.path(), ext, &[]);
        assert_eq!(summary["shards"], 3, "{ext}");
        assert_eq!(summary["records"], 60, "{ext}");
        let doc = inspect_json(&shards(dir.path(), ext));
        assert_eq!(doc["records"], summary["records"], "{ext}");
        assert_eq!(doc["entries"], summary["entries"], "{ext}");
        assert_eq!(doc["bytes"], summary["bytes"], "{ext}");
        let mut names = Vec::new();
        for shard in doc["shards"].as_array().unwrap() {
            let fmt = shard["format"].as_str().unwrap();
            assert!(ext.ends_with(fmt) || (*ext == ".tgz" && fmt == "tar.gz"), "{ext} read as {fmt}");
            for rec in shard["records"].as_array().unwrap() {
                let name = rec["name"].as_str().unwrap();
                assert!(name.len() == 16 && name.chars().all(|c| c.is_ascii_hexdigit()), "record name {name}");
                let entries: Vec<&str> =
                    rec["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
                assert_eq!(entries, [format!("{name}.jpg"), format!("{name}.cls"), format!("{name}.json")]);
                let size: u64 = rec["entries"].as_array().unwrap().iter().map(|e| e["size"].as_u64().unwrap()).sum();
                assert!((1024..=8192).contains(&size), "record size {size}");
                names.push(name.to_string());
            }
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_ne!(names, sorted, "generated input order must not already be key order");
    }
}

#[test]
fn gen_is_deterministic_for_a_seed_in_every_format_and_flavour() {
    for (ext, flavour) in [
        (".tar", "pax"),
        (".tar", "gnu"),
        (".tar", "ustar"),
        (".tar.gz", "pax"),
        (".tar.zst", "pax"),
        (".tar.lz4", "pax"),
        (".zip", "pax"),
    ] {
        let a = tempdir();
        let b = tempdir();
        generate(a.path(), ext, &["--tar-format", flavour]);
        generate(b.path(), ext, &["--tar-format", flavour]);
        for (pa, pb) in shards(a.path(), ext).iter().zip(shards(b.path(), ext)) {
            assert_eq!(std::fs::read(pa).unwrap(), std::fs::read(&pb).unwrap(), "{ext}/{flavour}: {pa} differs");
        }
        let c = tempdir();
        generate_seeded(c.path(), ext, 12, &["--tar-format", flavour]);
        assert_ne!(
            std::fs::read(&shards(a.path(), ext)[0]).unwrap(),
            std::fs::read(&shards(c.path(), ext)[0]).unwrap()
        );
    }
}

/// Entry name -> size as GNU tar lists it (`tar -tvf`).
fn gnu_tar_listing(path: &str, extra: &[&str]) -> BTreeMap<String, u64> {
    let out = Command::new("tar").args(extra).args(["-tvf", path]).output().expect("run tar");
    assert!(out.status.success(), "GNU tar refused {path}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[5].to_string(), f[2].parse().unwrap())
        })
        .collect()
}

fn inspect_listing(path: &str) -> BTreeMap<String, u64> {
    let doc = inspect_json(&[path.to_string()]);
    doc["shards"][0]["records"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["entries"].as_array().unwrap().iter())
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["size"].as_u64().unwrap()))
        .collect()
}

#[test]
fn gnu_tar_and_python_agree_with_inspect_on_generated_shards() {
    if !have("tar") {
        eprintln!("SKIP: GNU tar not installed");
        return;
    }
    for (ext, flags) in [(".tar", vec![]), (".tar.gz", vec!["-z"])] {
        let dir = tempdir();
        generate(dir.path(), ext, &[]);
        for s in shards(dir.path(), ext) {
            assert_eq!(gnu_tar_listing(&s, &flags), inspect_listing(&s), "{s}");
        }
    }
    let dir = tempdir();
    generate(dir.path(), ".zip", &[]);
    let s = &shards(dir.path(), ".zip")[0];
    let py = Command::new("python3")
        .args(["-c", "import sys,zipfile,json; print(json.dumps({i.filename: i.file_size for i in zipfile.ZipFile(sys.argv[1]).infolist()}))", s])
        .output()
        .expect("python3");
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let listed: BTreeMap<String, u64> = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(listed, inspect_listing(s));
}

#[test]
fn inspect_sums_several_shards_and_reads_real_webdataset_shards() {
    let fixtures = webdataset_fixtures();
    let sample = fixtures.join("sample.tgz").display().to_string();
    let tendata = fixtures.join("tendata.tar").display().to_string();
    let text = dsort_ok(&["inspect", &sample, &tendata]);
    let summary = text.lines().last().unwrap();
    assert!(summary.starts_with("shards=2 records=190 entries=280 "), "{summary}");
    let doc = inspect_json(&[sample]);
    for rec in doc["shards"][0]["records"].as_array().unwrap() {
        let exts: Vec<String> = rec["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| shardio::split_name(e["name"].as_str().unwrap()).1.to_string())
            .collect();
        let mut exts = exts;
        exts.sort();
        assert_eq!(exts, [".cls", ".png"]);
    }
}

#[test]
fn inspect_names_the_bad_shard_and_keeps_going() {
    let dir = tempdir();
    generate(dir.path(), ".tar", &[]);
    let all = shards(dir.path(), ".tar");
    // Damage the second shard's first header checksum field.
    let bad = &all[1];
    let mut bytes = std::fs::read(bad).unwrap();
    bytes[150] ^= 0x11;
    std::fs::write(bad, &bytes).unwrap();
    let r = dsort(&["inspect", &all[0], bad, &all[2]]);
    assert!(!r.ok, "a damaged shard must fail the command");
    assert!(
        r.stderr.contains(bad.as_str()) && r.stderr.contains("checksum") && r.stderr.contains("offset 0"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("shards=2 records=40"), "the good shards are still listed: {}", r.stdout);
}
