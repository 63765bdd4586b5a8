//! End to end: `dsort reshard` through the binary, on data made by `dsort gen`.
//!
//! Each output is checked twice: by `dsort verify` (with the job's flags and cut), and by an independent
//! reader (Python `tarfile`/`zipfile`, see `dsort_tests::py_read`) whose view of the output must be the
//! input records, read by the same Python, ordered and cut by the rules as this file computes them
//! (exact entry names, sizes and sha256, in order). The magic bytes of every output must match its name.
//!
//! The matrix is complete, not the minimal cover: every job (alphanumeric decreasing, shuffle, content,
//! none, a text EKM with decreasing content order, a JSON EKM with shuffle; cut by size and by count) ×
//! every input format (.tar .tar.gz .tar.zst .tar.lz4 .zip) × every output format (the same and .tgz):
//! 180 jobs on 4 shards of 30 records, one test per input format so they run in parallel (about 15 s in
//! a debug build on 2 cores). EKM outputs are not given to `dsort verify` (it has no key map); the
//! independent reader checks them: only the group's records, in the algorithm's order, each exactly once.
//!
//! Also: determinism across concurrency and memory budgets, dry run, a YAML spec, EKM name checks.

use dsort_tests::{PyEntry, dsort, dsort_json, dsort_ok, gen_shards, list_dir, py_read, sha256_file, tempdir};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64_with_seed;

const OUTPUT_EXTS: [&str; 6] = [".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.lz4", ".zip"];
const SHARDS: usize = 4;
const RECORDS: usize = 30;
/// EKM groups: a record goes to group `class % GROUPS`.
const GROUPS: i64 = 3;

/// One input record as the independent reader saw it.
#[derive(Clone, Debug)]
struct Rec {
    object: String,
    shard_idx: usize,
    pos: usize,
    name: String,
    entries: Vec<PyEntry>,
}

impl Rec {
    fn uname(&self) -> String {
        format!("{}|{}", self.object, self.name)
    }
    fn size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
    fn class(&self) -> i64 {
        let e = self.entries.iter().find(|e| e.name.ends_with(".cls")).expect("record has a .cls entry");
        e.text.as_deref().expect(".cls text").trim().parse().expect(".cls holds an integer")
    }
}

/// The record name of an entry: its path up to the first dot of its basename.
fn record_name(entry: &str) -> &str {
    let base = entry.rfind('/').map_or(0, |i| i + 1);
    entry[base..].find('.').map_or(entry, |d| &entry[..base + d])
}

/// Records of the input shards (`objects` in `dir`), in input order, read by Python.
fn load_inputs(dir: &Path, objects: &[String]) -> Option<Vec<Rec>> {
    let paths: Vec<PathBuf> = objects.iter().map(|o| dir.join(o)).collect();
    let read = py_read(&paths)?;
    let mut recs = Vec::new();
    for (shard_idx, (object, path)) in objects.iter().zip(&paths).enumerate() {
        let entries = read[path].clone()?;
        let mut shard: Vec<Rec> = Vec::new();
        for e in entries {
            let name = record_name(&e.name).to_string();
            match shard.iter_mut().find(|r| r.name == name) {
                Some(r) => r.entries.push(e),
                None => {
                    let pos = shard.len();
                    shard.push(Rec { object: object.clone(), shard_idx, pos, name, entries: vec![e] })
                }
            }
        }
        recs.extend(shard);
    }
    Some(recs)
}

#[derive(Clone, Copy, Debug)]
enum Order {
    Alnum,
    Shuffle(u64),
    Content,
    None,
}

impl Order {
    fn args(self) -> Vec<String> {
        let v: Vec<String> = match self {
            Order::Alnum => vec!["--algorithm".into(), "alphanumeric".into()],
            Order::Shuffle(seed) => vec!["--algorithm".into(), "shuffle".into(), "--seed".into(), seed.to_string()],
            Order::Content => {
                ["--algorithm", "content", "--key-ext", ".cls", "--key-type", "int"].map(String::from).into()
            }
            Order::None => vec!["--algorithm".into(), "none".into()],
        };
        v
    }

    /// The order, computed here: the key (reversed when decreasing), then the unique name ascending.
    fn sort(self, mut recs: Vec<Rec>, decreasing: bool) -> Vec<Rec> {
        recs.sort_by(|a, b| {
            let k = match self {
                Order::Alnum => a.entries[0].name.as_bytes().cmp(b.entries[0].name.as_bytes()),
                Order::Shuffle(seed) => {
                    xxh3_64_with_seed(a.uname().as_bytes(), seed).cmp(&xxh3_64_with_seed(b.uname().as_bytes(), seed))
                }
                Order::Content => a.class().cmp(&b.class()),
                Order::None => (a.shard_idx, a.pos).cmp(&(b.shard_idx, b.pos)),
            };
            let k = if decreasing { k.reverse() } else { k };
            k.then_with(|| a.uname().cmp(&b.uname()))
        });
        recs
    }
}

#[derive(Clone, Copy, Debug)]
enum Cut {
    Size(u64),
    Records(usize),
}

impl Cut {
    fn args(self) -> Vec<String> {
        match self {
            Cut::Size(n) => vec!["--shard-size".into(), n.to_string()],
            Cut::Records(n) => vec!["--shard-records".into(), n.to_string()],
        }
    }

    fn cut(self, recs: Vec<Rec>) -> Vec<Vec<Rec>> {
        let mut out = Vec::new();
        let (mut cur, mut size) = (Vec::new(), 0);
        for r in recs {
            size += r.size();
            cur.push(r);
            let close = match self {
                Cut::Size(n) => size >= n,
                Cut::Records(n) => cur.len() == n,
            };
            if close {
                out.push(std::mem::take(&mut cur));
                size = 0;
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

#[derive(Clone, Copy, Debug)]
enum Ekm {
    Text,
    Json,
}

/// One reshard job of the matrix.
#[derive(Clone, Copy, Debug)]
struct Job {
    name: &'static str,
    order: Order,
    cut: Cut,
    decreasing: bool,
    ekm: Option<Ekm>,
}

impl Job {
    /// The ordering flags, shared by `reshard` and `verify`.
    fn order_args(self) -> Vec<String> {
        let mut v = self.order.args();
        if self.decreasing {
            v.push("--decreasing".into());
        }
        v
    }
}

const JOBS: [Job; 6] = [
    Job { name: "alnum-dec", order: Order::Alnum, cut: Cut::Size(40 << 10), decreasing: true, ekm: None },
    Job { name: "shuffle", order: Order::Shuffle(7), cut: Cut::Records(7), decreasing: false, ekm: None },
    Job { name: "content", order: Order::Content, cut: Cut::Size(100 << 10), decreasing: false, ekm: None },
    Job { name: "none", order: Order::None, cut: Cut::Records(16), decreasing: false, ekm: None },
    Job { name: "ekm-text-dec", order: Order::Content, cut: Cut::Records(6), decreasing: true, ekm: Some(Ekm::Text) },
    Job {
        name: "ekm-json",
        order: Order::Shuffle(11),
        cut: Cut::Size(20 << 10),
        decreasing: false,
        ekm: Some(Ekm::Json),
    },
];

fn group_shard(g: i64, i: usize, ext: &str) -> String {
    format!("cls-{g}-{i:03}{ext}")
}

/// Write the job's key map (record name -> `cls-{class % 3}-...{ext}`) in `dir`; returns its path.
fn write_ekm(dir: &Path, kind: Ekm, recs: &[Rec], ext: &str) -> PathBuf {
    match kind {
        Ekm::Text => {
            let path = dir.join(format!("ekm{ext}.txt"));
            let text: String =
                recs.iter().map(|r| format!("{}\tcls-{}-%03d{ext}\n", r.name, r.class() % GROUPS)).collect();
            std::fs::write(&path, text).expect("write text EKM");
            path
        }
        Ekm::Json => {
            let path = dir.join(format!("ekm{ext}.json"));
            let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for r in recs {
                map.entry(format!("cls-{}-{{000..099}}{ext}", r.class() % GROUPS)).or_default().push(r.name.clone());
            }
            std::fs::write(&path, serde_json::to_string(&map).unwrap()).expect("write JSON EKM");
            path
        }
    }
}

/// The magic bytes of a shard must match its extension.
fn assert_magic(path: &Path) {
    let bytes = std::fs::read(path).expect("read output shard");
    let name = path.display().to_string();
    let ok = if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        bytes.starts_with(&[0x1f, 0x8b])
    } else if name.ends_with(".tar.zst") {
        bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
    } else if name.ends_with(".tar.lz4") {
        bytes.starts_with(&[0x04, 0x22, 0x4d, 0x18])
    } else if name.ends_with(".zip") {
        bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
    } else {
        bytes.len() >= 512 && &bytes[257..262] == b"ustar"
    };
    assert!(ok, "{name}: magic bytes do not match the extension: {:02x?}", &bytes[..bytes.len().min(8)]);
}

fn reshard_args<'a>(input: &'a str, output: &'a str, extra: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["reshard", "--input", input, "--output", output];
    args.extend(extra.iter().map(String::as_str));
    args
}

/// The output shards a job must produce: (file name, its records in order).
type Expected = Vec<(String, Vec<Rec>)>;

/// Run the whole matrix for one input format.
fn matrix(input_ext: &str) {
    let t0 = std::time::Instant::now();
    let dir = tempdir();
    let d = dir.path();
    let in_dir = d.join("in");
    let input = format!("{}/shard-{{0..{}}}{input_ext}", in_dir.display(), SHARDS - 1);
    gen_shards(&input, RECORDS, "1KiB..8KiB", ".jpg,.cls,.json", 5);
    let objects: Vec<String> = (0..SHARDS).map(|i| format!("shard-{i}{input_ext}")).collect();
    let recs = load_inputs(&in_dir, &objects);
    if let Some(recs) = &recs {
        assert_eq!(recs.len(), SHARDS * RECORDS);
    }
    // What each output folder must hold: (job, ext, folder, expected shards as (name, records)).
    let mut checks: Vec<(Job, &str, PathBuf, Option<Expected>)> = Vec::new();
    for job in JOBS {
        for out_ext in OUTPUT_EXTS {
            let what = format!("{input_ext} -> {} {out_ext}", job.name);
            let out_dir = d.join(format!("out-{}{}", job.name, out_ext.replace('.', "_")));
            let output = format!("{}/part-{{000..999}}{out_ext}", out_dir.display());
            let mut extra = job.order_args();
            extra.extend(job.cut.args());
            extra.push("--json".into());
            let ekm_recs = match job.ekm {
                // The EKM is built from what Python read; without Python there is nothing to map.
                Some(kind) => match &recs {
                    Some(recs) => {
                        extra.extend(["--ekm".into(), write_ekm(d, kind, recs, out_ext).display().to_string()]);
                        Some(recs)
                    }
                    None => continue,
                },
                None => None,
            };
            let summary = dsort_json(&reshard_args(&input, &output, &extra));
            assert_eq!(summary["records"], json!(SHARDS * RECORDS), "{what}: {summary}");
            assert_eq!(summary["input_shards"], json!(SHARDS), "{what}");
            assert_eq!(summary["skipped_shards"], json!(0), "{what}");
            assert_eq!(summary["dry_run"], json!(false), "{what}");
            let produced = list_dir(&out_dir);
            assert_eq!(summary["output_shards"], json!(produced.len()), "{what}: {produced:?}");
            for f in &produced {
                assert!(!f.starts_with(".dsort-tmp"), "{what}: temp file left: {f}");
                assert_magic(&out_dir.join(f));
            }
            let expected = match (ekm_recs, &recs) {
                (Some(recs), _) => {
                    // Each group holds its records in the algorithm's order, cut by the rule.
                    let mut shards = Vec::new();
                    for g in 0..GROUPS {
                        let members: Vec<Rec> = recs.iter().filter(|r| r.class() % GROUPS == g).cloned().collect();
                        for (i, s) in job.cut.cut(job.order.sort(members, job.decreasing)).into_iter().enumerate() {
                            shards.push((group_shard(g, i, out_ext), s));
                        }
                    }
                    shards.sort_by(|a, b| a.0.cmp(&b.0));
                    Some(shards)
                }
                (None, Some(recs)) => {
                    let shards = job.cut.cut(job.order.sort(recs.clone(), job.decreasing));
                    Some(shards.into_iter().enumerate().map(|(i, s)| (format!("part-{i:03}{out_ext}"), s)).collect())
                }
                (None, None) => None,
            };
            if let Some(exp) = &expected {
                let names: Vec<&String> = exp.iter().map(|(n, _)| n).collect();
                assert_eq!(produced.iter().collect::<Vec<_>>(), names, "{what}: output shard names");
            }
            if job.ekm.is_none() {
                let mut v = vec!["verify".to_string(), "--input".into(), input.clone(), "--output".into(), output];
                v.extend(job.order_args());
                v.extend(job.cut.args());
                let v: Vec<&str> = v.iter().map(String::as_str).collect();
                let run = dsort(&v);
                assert!(run.ok, "{what}: dsort verify failed:\n{}{}", run.stdout, run.stderr);
                assert!(
                    run.stdout.starts_with(&format!("verified: records={}", SHARDS * RECORDS)),
                    "{what}: {}",
                    run.stdout
                );
            }
            checks.push((job, out_ext, out_dir, expected));
        }
    }
    // The independent reader, once for every output of this input format.
    let paths: Vec<PathBuf> =
        checks.iter().flat_map(|(_, _, dir, _)| list_dir(dir).into_iter().map(move |f| dir.join(f))).collect();
    if let Some(read) = py_read(&paths) {
        for (job, out_ext, out_dir, expected) in &checks {
            let what = format!("{input_ext} -> {} {out_ext}", job.name);
            let Some(expected) = expected else { continue };
            for (name, recs) in expected {
                let path = out_dir.join(name);
                let Some(got) = &read[&path] else { continue };
                let want: Vec<&PyEntry> = recs.iter().flat_map(|r| &r.entries).collect();
                let got: Vec<&PyEntry> = got.iter().collect();
                assert_eq!(got.len(), want.len(), "{what}: {name}: entry count");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        (&g.name, g.size, &g.sha256),
                        (&w.name, w.size, &w.sha256),
                        "{what}: {name}: entry {i} differs from the input record's"
                    );
                }
            }
        }
    }
    eprintln!("matrix {input_ext}: {} jobs in {:.1}s", checks.len(), t0.elapsed().as_secs_f64());
}

#[test]
fn matrix_from_tar() {
    matrix(".tar");
}

#[test]
fn matrix_from_tar_gz() {
    matrix(".tar.gz");
}

#[test]
fn matrix_from_tar_zst() {
    matrix(".tar.zst");
}

#[test]
fn matrix_from_tar_lz4() {
    matrix(".tar.lz4");
}

#[test]
fn matrix_from_zip() {
    matrix(".zip");
}

/// sha256 of every file in a folder, by name.
fn hashes(dir: &Path) -> BTreeMap<String, String> {
    list_dir(dir).into_iter().map(|f| (f.clone(), sha256_file(&dir.join(f)))).collect()
}

#[test]
fn output_is_byte_identical_at_any_concurrency_and_memory_budget() {
    let t0 = std::time::Instant::now();
    let dir = tempdir();
    let d = dir.path();
    // 8 shards of 200 records (about 7 MiB of content): the 1 MiB budget cannot hold the decoded
    // copies of compressed shards (they spill), the 2 GiB budget holds everything.
    let plain = format!("{}/tar/s-{{0..7}}.tar", d.display());
    let packed = format!("{}/gz/s-{{0..7}}.tar.gz", d.display());
    gen_shards(&plain, 200, "1KiB..8KiB", ".jpg,.cls,.json", 9);
    gen_shards(&packed, 200, "1KiB..8KiB", ".jpg,.cls,.json", 9);
    let algorithms: [(&str, Order); 2] = [("shuffle", Order::Shuffle(3)), ("content", Order::Content)];
    // (input, output extension): tar to tar is the zero-copy path; gzip in, gzip out decodes and re-encodes.
    let inputs = [("tar", &plain, ".tar"), ("gz", &packed, ".tar.gz")];
    let mut content_tar_outputs = Vec::new();
    for (in_name, input, out_ext) in inputs {
        for (alg_name, order) in algorithms {
            let mut first: Option<BTreeMap<String, String>> = None;
            for conc in ["1", "8"] {
                for mem in ["1MiB", "2GiB"] {
                    let what = format!("{in_name} {alg_name} --concurrency {conc} --max-mem {mem}");
                    let out_dir = d.join(format!("out-{in_name}-{alg_name}-{conc}-{mem}"));
                    let output = format!("{}/p-{{000..999}}{out_ext}", out_dir.display());
                    let mut extra = order.args();
                    extra.extend(
                        ["--shard-size", "512KiB", "--concurrency", conc, "--max-mem", mem, "--json"].map(String::from),
                    );
                    let summary = dsort_json(&reshard_args(input, &output, &extra));
                    assert_eq!(summary["records"], json!(1600), "{what}");
                    if in_name == "gz" && mem == "1MiB" {
                        assert!(summary["spilled_bytes"].as_u64().unwrap() > 0, "{what}: nothing spilled: {summary}");
                    }
                    if mem == "2GiB" {
                        assert_eq!(summary["spilled_bytes"], json!(0), "{what}: spilled with 2 GiB: {summary}");
                    }
                    let h = hashes(&out_dir);
                    assert!(h.len() > 5, "{what}: {h:?}");
                    match &first {
                        None => {
                            let mut v =
                                vec!["verify".to_string(), "--input".into(), input.clone(), "--output".into(), output];
                            v.extend(order.args());
                            v.extend(["--shard-size".into(), "512KiB".into()]);
                            dsort_ok(&v.iter().map(String::as_str).collect::<Vec<_>>());
                            first = Some(h);
                        }
                        Some(f) => assert_eq!(&h, f, "{what}: output differs from the first run's"),
                    }
                }
            }
            if alg_name == "content" {
                content_tar_outputs.push(first.expect("runs"));
            }
        }
    }
    // The same records in the same content order: the decoding path writes, once re-encoded as plain tar,
    // what the zero-copy path writes. (Ties break by unique name, and "s-0.tar|" and "s-0.tar.gz|" order
    // the shards alike.)
    let out_dir = d.join("out-gz-content-to-tar");
    let output = format!("{}/p-{{000..999}}.tar", out_dir.display());
    let mut extra = Order::Content.args();
    extra.extend(["--shard-size", "512KiB", "--max-mem", "1MiB"].map(String::from));
    dsort_ok(&reshard_args(&packed, &output, &extra));
    let from_tar = &content_tar_outputs[0];
    assert_eq!(&hashes(&out_dir), from_tar, "content sort of .tar.gz to .tar differs from .tar to .tar");
    eprintln!("determinism: {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn the_final_merge_in_parallel_key_ranges_writes_what_one_merge_writes_for_every_algorithm() {
    let dir = tempdir();
    let d = dir.path();
    // 40000 small records: their metadata spills into several runs under a 1 MiB budget.
    let input = format!("{}/s-{{0..7}}.tar", d.display());
    gen_shards(&input, 5000, "16B..64B", ".jpg,.cls", 21);
    for (name, order) in
        [("alnum", Order::Alnum), ("shuffle", Order::Shuffle(5)), ("content", Order::Content), ("none", Order::None)]
    {
        let mut first: Option<BTreeMap<String, String>> = None;
        // --concurrency 1 merges in one range; 4 splits the final merge into up to 4 ranges.
        for conc in ["1", "4"] {
            let what = format!("{name} --concurrency {conc}");
            let out_dir = d.join(format!("out-{name}-{conc}"));
            let output = format!("{}/p-{{000..999}}.tar", out_dir.display());
            let mut extra = order.args();
            extra.extend(
                ["--shard-records", "997", "--concurrency", conc, "--max-mem", "1MiB", "--json"].map(String::from),
            );
            let s = dsort_json(&reshard_args(&input, &output, &extra));
            assert_eq!(s["records"], json!(40000), "{what}");
            assert!(s["sort_runs"].as_u64().unwrap() >= 3, "{what}: several runs expected: {s}");
            let ranges = s["merge_ranges"].as_u64().unwrap();
            if conc == "1" {
                assert_eq!(ranges, 1, "{what}: {s}");
            } else {
                assert!(ranges > 1, "{what}: a split final merge expected: {s}");
            }
            let h = hashes(&out_dir);
            assert_eq!(h.len(), 41, "{what}");
            match &first {
                None => first = Some(h),
                Some(f) => assert_eq!(&h, f, "{what}: output differs from the one merge's"),
            }
        }
    }
}

#[test]
fn dry_run_writes_nothing() {
    let dir = tempdir();
    let d = dir.path();
    let input = format!("{}/in/shard-{{0..3}}.tar", d.display());
    gen_shards(&input, RECORDS, "1KiB..8KiB", ".jpg,.cls", 1);
    let before = list_dir(&d.join("in"));
    for out_ext in [".tar", ".tar.zst", ".zip"] {
        let out_dir = d.join(format!("out{out_ext}"));
        let output = format!("{}/p-{{00..99}}{out_ext}", out_dir.display());
        let args = ["reshard", "--input", &input, "--output", &output, "--shard-records", "10", "--dry-run"];
        let text = dsort_ok(&args);
        assert!(text.contains("dry run"), "{out_ext}: the summary must say dry run:\n{text}");
        assert!(text.contains("records=120") && text.contains("shards_out=12"), "{out_ext}: {text}");
        let mut json_args = args.to_vec();
        json_args.push("--json");
        let summary = dsort_json(&json_args);
        assert_eq!(summary["dry_run"], json!(true), "{out_ext}");
        assert_eq!(summary["output_shards"], json!(12), "{out_ext}");
        assert!(!out_dir.exists(), "{out_ext}: dry run created {}: {:?}", out_dir.display(), list_dir(&out_dir));
    }
    assert_eq!(list_dir(&d.join("in")), before, "dry run touched the input folder");
}

#[test]
fn yaml_spec_runs_like_json() {
    let dir = tempdir();
    let d = dir.path();
    gen_shards(&format!("{}/src/shard-{{0..3}}.tar", d.display()), RECORDS, "1KiB..8KiB", ".jpg,.cls", 4);
    let yaml = "\
# a YAML spec, keys in any case
input_bck:
  name: src
input_format:
  template: shard-{0..3}.tar
Output_Bck: {name: dst}
output_format: out-{00..99}.tar.gz
output_shard_size: 30KiB
algorithm:
  kind: content
  extension: .cls
  content_key_type: int
  decreasing: true
config:
  missing_shards: abort
";
    let spec = d.join("spec.yaml");
    std::fs::write(&spec, yaml).unwrap();
    let root = d.display().to_string();
    let summary = dsort_json(&["reshard", "--spec", spec.to_str().unwrap(), "--root", &root, "--json"]);
    assert_eq!(summary["records"], json!(120), "{summary}");
    let out = list_dir(&d.join("dst"));
    assert_eq!(summary["output_shards"], json!(out.len()));
    assert!(out.len() > 3 && out.iter().all(|f| f.starts_with("out-") && f.ends_with(".tar.gz")), "{out:?}");
    let run = dsort(&[
        "verify",
        "--input",
        &format!("{root}/src/shard-{{0..3}}.tar"),
        "--output",
        &format!("{root}/dst/out-{{00..99}}.tar.gz"),
        "--algorithm",
        "content",
        "--key-ext",
        ".cls",
        "--key-type",
        "int",
        "--decreasing",
        "--shard-size",
        "30KiB",
    ]);
    assert!(run.ok, "verify: {}{}", run.stdout, run.stderr);
    // The same job as JSON gives the same bytes.
    let json_spec = json!({
        "input_bck": {"name": "src"},
        "input_format": {"template": "shard-{0..3}.tar"},
        "output_bck": {"name": "dst-json"},
        "output_format": "out-{00..99}.tar.gz",
        "output_shard_size": "30KiB",
        "algorithm": {"kind": "content", "extension": ".cls", "content_key_type": "int", "decreasing": true},
    });
    let spec = d.join("spec.json");
    std::fs::write(&spec, json_spec.to_string()).unwrap();
    dsort_ok(&["reshard", "--spec", spec.to_str().unwrap(), "--root", &root]);
    assert_eq!(hashes(&d.join("dst-json")), hashes(&d.join("dst")), "YAML and JSON specs differ in output");
}

#[test]
fn ekm_names_that_contradict_the_output_format_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    let input = format!("{}/in/shard-{{0..1}}.tar", d.display());
    gen_shards(&input, 10, "1KiB..2KiB", ".jpg,.cls", 2);
    let Some(recs) = load_inputs(&d.join("in"), &["shard-0.tar".into(), "shard-1.tar".into()]) else { return };
    let ekm = write_ekm(d, Ekm::Text, &recs, ".tar");
    let output = format!("{}/out/p-{{0..9}}.zip", d.display());
    let run = dsort(&[
        "reshard",
        "--input",
        &input,
        "--output",
        &output,
        "--ekm",
        ekm.to_str().unwrap(),
        "--shard-records",
        "5",
    ]);
    assert!(!run.ok, "a zip written under a .tar name must be refused:\n{}", run.stdout);
    assert!(run.stderr.contains("names a .tar shard but the output format is .zip"), "{}", run.stderr);
    assert!(!d.join("out").exists(), "refused before any work, yet created {:?}", list_dir(&d.join("out")));
}
