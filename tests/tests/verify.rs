//! End to end: `dsort verify` against outputs built here, without the reshard engine: the test reads the
//! input records, orders them itself (by first-entry name, `.cls` int, xxh3 with a seed, input order),
//! cuts them by size or count and writes the output shards with `shardio`. Then `verify` must pass, and
//! must fail, naming the violation, on each kind of damage.

use dsort_tests::{Run, dsort, gen_shards, tempdir};
use shardio::{EntrySource, Format, ShardWriter, WriteOptions, open_shard, read_entries, split_name};
use std::path::Path;
use xxhash_rust::xxh3::xxh3_64_with_seed;

type Entry = (String, Vec<u8>);

/// One input record, with its bytes.
#[derive(Clone, Debug)]
struct Rec {
    shard: String,
    shard_idx: usize,
    pos: usize,
    name: String,
    entries: Vec<Entry>,
}

impl Rec {
    fn uname(&self) -> String {
        format!("{}|{}", self.shard, self.name)
    }
    fn size(&self) -> u64 {
        self.entries.iter().map(|e| e.1.len() as u64).sum()
    }
    fn class(&self) -> Option<i64> {
        let (_, b) = self.entries.iter().find(|(n, _)| split_name(n).1 == ".cls")?;
        std::str::from_utf8(b).ok()?.trim().parse().ok()
    }
}

#[derive(Clone, Copy, Debug)]
enum Alg {
    Alnum,
    Shuffle(u64),
    ContentInt,
    None,
}

impl Alg {
    fn args(self) -> Vec<String> {
        let v: Vec<&str> = match self {
            Alg::Alnum => vec!["--algorithm", "alphanumeric"],
            Alg::Shuffle(_) => vec!["--algorithm", "shuffle"],
            Alg::ContentInt => vec!["--algorithm", "content", "--key-ext", ".cls", "--key-type", "int"],
            Alg::None => vec!["--algorithm", "none"],
        };
        let mut v: Vec<String> = v.into_iter().map(String::from).collect();
        if let Alg::Shuffle(seed) = self {
            v.extend(["--seed".to_string(), seed.to_string()]);
        }
        v
    }
}

#[derive(Clone, Copy, Debug)]
enum Cut {
    Size(u64),
    Count(usize),
    Unchecked(usize),
}

impl Cut {
    fn args(self) -> Vec<String> {
        match self {
            Cut::Size(n) => vec!["--shard-size".into(), n.to_string()],
            Cut::Count(n) => vec!["--shard-records".into(), n.to_string()],
            Cut::Unchecked(_) => vec![],
        }
    }
}

/// Four generated tar shards of 20 records (`.jpg` + `.cls`) in `DIR/in`; returns the `--input` template.
fn generate(dir: &Path, seed: u64) -> String {
    let tpl = format!("{}/in/shard-{{00..03}}.tar", dir.display());
    gen_shards(&tpl, 20, "1KiB..8KiB", ".jpg,.cls", seed);
    tpl
}

fn input_names() -> Vec<String> {
    (0..4).map(|i| format!("shard-{i:02}.tar")).collect()
}

/// Every entry of a shard, in archive order.
fn read_shard(path: &Path) -> Vec<Entry> {
    let (file, format) = open_shard(path).expect("open shard");
    let mut entries = Vec::new();
    read_entries(&path.display().to_string(), format, file, |meta, r| {
        let mut b = Vec::new();
        r.read_to_end(&mut b)?;
        entries.push((meta.name.clone(), b));
        Ok(())
    })
    .expect("read shard");
    entries
}

/// The records of the input shards `names` in `dir`, in input order.
fn load(dir: &Path, names: &[String]) -> Vec<Rec> {
    let mut recs = Vec::new();
    for (shard_idx, name) in names.iter().enumerate() {
        let mut shard: Vec<Rec> = Vec::new();
        for (entry, bytes) in read_shard(&dir.join(name)) {
            let rec = split_name(&entry).0.to_string();
            match shard.iter_mut().find(|r| r.name == rec) {
                Some(r) => r.entries.push((entry, bytes)),
                None => {
                    let pos = shard.len();
                    shard.push(Rec { shard: name.clone(), shard_idx, pos, name: rec, entries: vec![(entry, bytes)] })
                }
            }
        }
        recs.extend(shard);
    }
    recs
}

/// The order, computed here: key (reversed when decreasing), then unique name ascending.
fn sorted(mut recs: Vec<Rec>, alg: Alg, decreasing: bool) -> Vec<Rec> {
    recs.sort_by(|a, b| {
        let k = match alg {
            Alg::Alnum => a.entries[0].0.as_bytes().cmp(b.entries[0].0.as_bytes()),
            Alg::Shuffle(seed) => {
                xxh3_64_with_seed(a.uname().as_bytes(), seed).cmp(&xxh3_64_with_seed(b.uname().as_bytes(), seed))
            }
            Alg::ContentInt => a.class().cmp(&b.class()),
            Alg::None => (a.shard_idx, a.pos).cmp(&(b.shard_idx, b.pos)),
        };
        let k = if decreasing { k.reverse() } else { k };
        k.then_with(|| a.uname().cmp(&b.uname()))
    });
    recs
}

fn cut(recs: Vec<Rec>, rule: Cut) -> Vec<Vec<Rec>> {
    let mut out = Vec::new();
    let mut cur: Vec<Rec> = Vec::new();
    let mut size = 0;
    for r in recs {
        size += r.size();
        cur.push(r);
        let close = match rule {
            Cut::Size(n) => size >= n,
            Cut::Count(n) | Cut::Unchecked(n) => cur.len() == n,
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

fn flatten(shards: &[Vec<Rec>]) -> Vec<Vec<Entry>> {
    shards.iter().map(|s| s.iter().flat_map(|r| r.entries.iter().cloned()).collect()).collect()
}

fn write_shard(path: &Path, entries: &[Entry]) {
    let format = Format::from_name(&path.display().to_string()).expect("known format");
    let file = std::fs::File::create(path).expect("create output shard");
    let mut w = ShardWriter::new(&path.display().to_string(), format, file, WriteOptions::default()).expect("writer");
    for (name, bytes) in entries {
        w.append(name, bytes.len() as u64, EntrySource::Bytes(bytes)).expect("append");
    }
    w.finish().expect("finish shard");
}

/// Write `shards` as `DIR/<sub>/part-000<ext>`, ...; returns the `--output` template.
fn write_outputs(dir: &Path, sub: &str, ext: &str, shards: &[Vec<Entry>]) -> String {
    let out = dir.join(sub);
    std::fs::create_dir_all(&out).expect("output folder");
    for (i, entries) in shards.iter().enumerate() {
        write_shard(&out.join(format!("part-{i:03}{ext}")), entries);
    }
    format!("{}/part-{{000..999}}{ext}", out.display())
}

fn verify(input: &[String], output: &str, extra: &[String]) -> Run {
    let mut args: Vec<&str> = vec!["verify", "--input"];
    args.extend(input.iter().map(String::as_str));
    args.extend(["--output", output]);
    args.extend(extra.iter().map(String::as_str));
    dsort(&args)
}

fn assert_passes(run: &Run, what: &str) {
    assert!(run.ok, "{what}: verify failed:\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with("verified: records="), "{what}: {}", run.stdout);
}

fn assert_fails(run: &Run, what: &str, needles: &[&str]) {
    assert!(!run.ok, "{what}: verify passed but must fail:\nstdout: {}", run.stdout);
    assert!(run.stderr.contains("verify: FAILED: "), "{what}: {}", run.stderr);
    for n in needles {
        assert!(run.stderr.contains(n), "{what}: expected {n:?} in the message:\n{}", run.stderr);
    }
}

fn args(alg: Alg, cut: Cut, decreasing: bool) -> Vec<String> {
    let mut v = alg.args();
    v.extend(cut.args());
    if decreasing {
        v.push("--decreasing".into());
    }
    v
}

#[test]
fn every_algorithm_passes_in_every_output_format() {
    let dir = tempdir();
    let input = vec![generate(dir.path(), 3)];
    let recs = load(&dir.path().join("in"), &input_names());
    assert_eq!(recs.len(), 80);
    let cases = [
        (Alg::Alnum, Cut::Count(7), false),
        (Alg::Shuffle(7), Cut::Size(16 * 1024), false),
        (Alg::ContentInt, Cut::Count(9), false),
        (Alg::None, Cut::Size(30 * 1024), false),
        (Alg::Alnum, Cut::Size(20 * 1024), true),
        (Alg::ContentInt, Cut::Size(12 * 1024), true),
        (Alg::Shuffle(0), Cut::Unchecked(11), true),
        (Alg::None, Cut::Count(80), true),
    ];
    for (i, (alg, rule, dec)) in cases.into_iter().enumerate() {
        let shards = flatten(&cut(sorted(recs.clone(), alg, dec), rule));
        for ext in [".tar", ".tar.gz", ".zip"] {
            let what = format!("{alg:?} {rule:?} decreasing={dec} {ext}");
            let out = write_outputs(dir.path(), &format!("out-{i}{}", ext.replace('.', "-")), ext, &shards);
            let run = verify(&input, &out, &args(alg, rule, dec));
            assert_passes(&run, &what);
            let want = format!(
                "verified: records=80 entries=160 bytes={} input_shards=4 output_shards={}",
                recs.iter().map(Rec::size).sum::<u64>(),
                shards.len()
            );
            assert!(run.stdout.starts_with(&want), "{what}: {}", run.stdout);
        }
    }
}

#[test]
fn order_is_checked_against_the_algorithm_and_its_parameters() {
    let dir = tempdir();
    let input = vec![generate(dir.path(), 5)];
    let recs = load(&dir.path().join("in"), &input_names());
    // Increasing output checked as decreasing, and the reverse.
    let out = write_outputs(
        dir.path(),
        "inc",
        ".tar",
        &flatten(&cut(sorted(recs.clone(), Alg::Alnum, false), Cut::Count(10))),
    );
    assert_passes(&verify(&input, &out, &args(Alg::Alnum, Cut::Count(10), false)), "alnum");
    assert_fails(
        &verify(&input, &out, &args(Alg::Alnum, Cut::Count(10), true)),
        "as decreasing",
        &["out of decreasing alphanumeric order"],
    );
    // Shuffle with another seed.
    let out = write_outputs(
        dir.path(),
        "shuf",
        ".tar",
        &flatten(&cut(sorted(recs.clone(), Alg::Shuffle(42), false), Cut::Count(10))),
    );
    assert_passes(&verify(&input, &out, &args(Alg::Shuffle(42), Cut::Count(10), false)), "shuffle 42");
    assert_fails(
        &verify(&input, &out, &args(Alg::Shuffle(43), Cut::Count(10), false)),
        "seed 43",
        &["out of shuffle order"],
    );
    // Content order with ties broken by descending unique name is not the rule: ties stay ascending.
    let mut by_class = sorted(recs.clone(), Alg::ContentInt, true);
    let out = write_outputs(dir.path(), "content", ".tar", &flatten(&cut(by_class.clone(), Cut::Count(10))));
    assert_passes(&verify(&input, &out, &args(Alg::ContentInt, Cut::Count(10), true)), "content decreasing");
    let tie = by_class.windows(2).position(|w| w[0].class() == w[1].class()).expect("generated classes tie");
    by_class.swap(tie, tie + 1);
    let out = write_outputs(dir.path(), "content-ties", ".tar", &flatten(&cut(by_class, Cut::Count(10))));
    assert_fails(
        &verify(&input, &out, &args(Alg::ContentInt, Cut::Count(10), true)),
        "tie order",
        &["ties with that of the previous record"],
    );
    // Input order.
    let out = write_outputs(dir.path(), "none", ".tar.gz", &flatten(&cut(recs.clone(), Cut::Count(10))));
    assert_passes(&verify(&input, &out, &args(Alg::None, Cut::Count(10), false)), "none");
    assert_fails(
        &verify(&input, &out, &args(Alg::Alnum, Cut::Count(10), false)),
        "none as alnum",
        &["out of alphanumeric order"],
    );
}

/// A correct alphanumeric output, cut by `rule`, and the arguments that verify it.
struct Case {
    dir: tempfile::TempDir,
    input: Vec<String>,
    shards: Vec<Vec<Rec>>,
    args: Vec<String>,
    n: usize,
}

impl Case {
    fn new(rule: Cut) -> Case {
        let dir = tempdir();
        let input = vec![generate(dir.path(), 9)];
        let recs = load(&dir.path().join("in"), &input_names());
        let shards = cut(sorted(recs, Alg::Alnum, false), rule);
        let full = &shards[..shards.len() - 1];
        assert!(shards.len() >= 4 && full.iter().all(|s| s.len() >= 3), "{rule:?}: {} shards", shards.len());
        Case { dir, input, shards, args: args(Alg::Alnum, rule, false), n: 0 }
    }

    fn run(&mut self, shards: &[Vec<Entry>], ext: &str) -> Run {
        self.n += 1;
        let out = write_outputs(self.dir.path(), &format!("out-{}", self.n), ext, shards);
        verify(&self.input, &out, &self.args)
    }

    fn check_fails(&mut self, what: &str, shards: &[Vec<Entry>], needles: &[&str]) {
        for ext in [".tar", ".zip"] {
            let run = self.run(shards, ext);
            assert_fails(&run, &format!("{what} ({ext})"), needles);
        }
    }
}

#[test]
fn every_kind_of_damage_is_named() {
    let mut c = Case::new(Cut::Count(7));
    let good = flatten(&c.shards);
    assert_passes(&c.run(&good, ".tar"), "untouched");

    let mut s = c.shards.clone();
    let gone = s[2].remove(3);
    c.check_fails("missing record", &flatten(&s), &["is missing from the output", &gone.uname()]);

    let mut s = flatten(&c.shards);
    let last = s.len() - 1;
    s[last].push(("zzzz-extra.jpg".into(), b"not from the input".to_vec()));
    c.check_fails("extra record", &s, &["extra record", "zzzz-extra"]);

    let mut s = c.shards.clone();
    let dup = s[1][2].clone();
    // In another shard: a zip cannot hold one entry name twice.
    s[3].insert(0, dup.clone());
    c.check_fails("duplicated record", &flatten(&s), &["duplicated record", &dup.uname(), "part-001"]);

    // The last record of shard 0 keeps its first entry; the rest opens shard 1.
    let mut s = flatten(&c.shards);
    let split = c.shards[0].last().expect("records").clone();
    let rest: Vec<Entry> = split.entries[1..].to_vec();
    let keep = s[0].len() - rest.len();
    s[0].truncate(keep);
    s[1].splice(0..0, rest);
    c.check_fails("split record", &s, &["split across output shards", &split.uname(), "part-000"]);

    let mut s = c.shards.clone();
    s[1][1].entries.reverse();
    let name = s[1][1].name.clone();
    c.check_fails("entries reordered", &flatten(&s), &["entries out of order", &name, "part-001"]);

    let mut s = c.shards.clone();
    let target = s[2][0].entries[0].0.clone();
    s[2][0].entries[0].1[10] ^= 1;
    c.check_fails("one byte changed", &flatten(&s), &["content of entry", &target, "differs", "part-002"]);

    let mut s = c.shards.clone();
    s[0].swap(1, 2);
    let moved = s[0][2].name.clone();
    c.check_fails("records swapped", &flatten(&s), &["out of alphanumeric order", "part-000", "record 3 ", &moved]);

    let mut s = c.shards.clone();
    let r = s[0].pop().expect("records");
    s[1].insert(0, r);
    c.check_fails("count cut too early", &flatten(&s), &["part-000", "cut too early", "--shard-records 7"]);

    let mut s = c.shards.clone();
    let r = s[1].remove(0);
    s[0].push(r);
    c.check_fails("count cut too late", &flatten(&s), &["part-000", "cut too late"]);

    let mut s = flatten(&c.shards);
    s.insert(2, Vec::new());
    c.args.retain(|a| a != "--shard-records" && a != "7");
    c.check_fails("empty shard", &s, &["part-002", "is empty"]);
}

#[test]
fn size_cut_too_early_and_too_late() {
    let mut c = Case::new(Cut::Size(24 * 1024));
    assert_passes(&c.run(&flatten(&c.shards), ".tar.gz"), "untouched");
    let mut s = c.shards.clone();
    let r = s[1].pop().expect("records");
    s[2].insert(0, r);
    c.check_fails("size cut too early", &flatten(&s), &["part-001", "cut too early", "--shard-size 24576"]);
    let mut s = c.shards.clone();
    let r = s[2].remove(0);
    s[1].push(r);
    c.check_fails("size cut too late", &flatten(&s), &["part-001", "cut too late", "--shard-size 24576"]);
}

#[test]
fn a_missing_content_key_names_the_record() {
    let dir = tempdir();
    let input = vec![generate(dir.path(), 13)];
    let in_dir = dir.path().join("in");
    // Drop the .cls entry of one record of shard-01.
    let path = in_dir.join("shard-01.tar");
    let mut entries = read_shard(&path);
    let at = entries.iter().position(|(n, _)| n.ends_with(".cls")).map(|i| i + 6).expect("a .cls entry");
    let (victim, _) = entries.remove(at);
    write_shard(&path, &entries);
    let recs = load(&in_dir, &input_names());
    let shards = flatten(&cut(sorted(recs, Alg::ContentInt, false), Cut::Count(10)));
    let out = write_outputs(dir.path(), "out", ".tar", &shards);
    let run = verify(&input, &out, &args(Alg::ContentInt, Cut::Count(10), false));
    let rec = format!("shard-01.tar|{}", split_name(&victim).0);
    assert_fails(&run, "missing key", &["has no entry with extension .cls", &rec]);
    // The same output checked by name passes: only the content order needs the key.
    let recs = load(&in_dir, &input_names());
    let shards = flatten(&cut(sorted(recs, Alg::Alnum, false), Cut::Count(10)));
    let out = write_outputs(dir.path(), "out-alnum", ".tar", &shards);
    assert_passes(&verify(&input, &out, &args(Alg::Alnum, Cut::Count(10), false)), "alnum");
}

#[test]
fn records_with_the_same_name_in_several_inputs_are_told_apart_by_content() {
    let dir = tempdir();
    let in_dir = dir.path().join("in");
    std::fs::create_dir_all(&in_dir).unwrap();
    let e = |n: &str, b: &str| (n.to_string(), b.as_bytes().to_vec());
    // a.tar and c.tar hold the very same record x; b.tar holds another x.
    write_shard(&in_dir.join("a.tar"), &[e("x.jpg", "aaaa"), e("y.jpg", "yyyy"), e("x.cls", "1"), e("y.cls", "5")]);
    write_shard(&in_dir.join("b.tar"), &[e("x.jpg", "bbbb"), e("x.cls", "2")]);
    write_shard(&in_dir.join("c.tar"), &[e("x.cls", "9"), e("w.jpg", "w"), e("x.jpg", "q"), e("w.cls", "0")]);
    write_shard(&in_dir.join("d.tar"), &[e("x.jpg", "aaaa"), e("x.cls", "1")]);
    let names: Vec<String> = ["a.tar", "b.tar", "c.tar", "d.tar"].iter().map(|s| s.to_string()).collect();
    let input: Vec<String> = names.iter().map(|n| in_dir.join(n).display().to_string()).collect();
    let recs = load(&in_dir, &names);
    assert_eq!(recs.len(), 6);
    for alg in [Alg::Alnum, Alg::Shuffle(1), Alg::ContentInt, Alg::None] {
        let order = sorted(recs.clone(), alg, false);
        let out = write_outputs(dir.path(), &format!("{alg:?}"), ".tar", &flatten(std::slice::from_ref(&order)));
        assert_passes(&verify(&input, &out, &alg.args()), &format!("{alg:?}"));
        // Two records x of different content swapped.
        let mut bad = order.clone();
        let i = bad.iter().position(|r| r.uname() == "b.tar|x").unwrap();
        let j = bad.iter().position(|r| r.uname() == "a.tar|x").unwrap();
        bad.swap(i, j);
        let out = write_outputs(dir.path(), &format!("{alg:?}-swapped"), ".tar", &flatten(&[bad]));
        let what = format!("{alg:?} swapped");
        let run = verify(&input, &out, &alg.args());
        if matches!(alg, Alg::ContentInt) {
            // a|x (1) and b|x (2) then d|x (1): keys differ, so the swap breaks the order.
            assert_fails(&run, &what, &["out of content order"]);
        } else {
            assert_fails(&run, &what, &["order"]);
        }
        // One copy of the twin x dropped: the other stays matched, one is missing.
        let mut short = order.clone();
        let k = short.iter().position(|r| r.uname() == "d.tar|x").unwrap();
        short.remove(k);
        let out = write_outputs(dir.path(), &format!("{alg:?}-short"), ".tar", &flatten(&[short]));
        assert_fails(&verify(&input, &out, &alg.args()), &format!("{alg:?} short"), &["is missing from the output"]);
    }
}

#[test]
fn outputs_without_extension_take_the_input_one_and_json_reports() {
    let dir = tempdir();
    let input = vec![generate(dir.path(), 21)];
    let recs = load(&dir.path().join("in"), &input_names());
    let shards = flatten(&cut(sorted(recs, Alg::Alnum, false), Cut::Count(25)));
    let out = write_outputs(dir.path(), "out", ".tar", &shards);
    let bare = out.trim_end_matches(".tar").to_string();
    let run = verify(&input, &bare, &args(Alg::Alnum, Cut::Count(25), false));
    assert_passes(&run, "bare template");

    let mut a = args(Alg::Alnum, Cut::Count(25), false);
    a.push("--json".into());
    let out_good = out.clone();
    let run = verify(&input, &out, &a);
    assert!(run.ok, "{}", run.stderr);
    let doc: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("one JSON document");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["records"], 80);
    assert_eq!(doc["output_shards"], 4);
    assert_eq!(doc["outputs"][3], "part-003.tar");
    assert_eq!(doc["violation"], serde_json::Value::Null);

    // Damage: a JSON report with the violation, and the failure.
    let mut damaged = shards.clone();
    let keep = damaged[1].len() - 2;
    damaged[1].truncate(keep);
    let out = write_outputs(dir.path(), "bad", ".tar", &damaged);
    let run = verify(&input, &out, &a);
    assert!(!run.ok);
    let doc: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("one JSON document");
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["violation"]["kind"], "missing_record");
    assert!(doc["violations"].as_u64().unwrap() >= 2, "a missing record and a cut too early: {doc}");

    // A missing input shard is skipped with a warning (reshard's default `missing_shards: ignore`).
    let wider = vec![input[0].replace("{00..03}", "{00..04}")];
    let run = verify(&wider, &out_good, &a);
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stderr.contains("shard-04.tar does not exist"), "{}", run.stderr);
    let doc: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("one JSON document");
    assert_eq!(doc["missing_inputs"][0], "shard-04.tar");
    assert_eq!(doc["input_shards"], 4);

    // Shuffle needs its seed.
    let run = verify(&input, &out_good, &["--algorithm".into(), "shuffle".into()]);
    assert!(!run.ok && run.stderr.contains("needs --seed"), "{}", run.stderr);

    // No output shard at all.
    let run = verify(&input, &format!("{}/nothing-{{0..9}}.tar", dir.path().display()), &[]);
    assert!(!run.ok && run.stderr.contains("no output shard"), "{}", run.stderr);
}
