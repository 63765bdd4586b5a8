//! End to end: `dsort reshard` with S3 buckets, against a real S3 server (moto) on loopback.
//!
//! The reference for every job is the same job local → local: outputs must be byte-identical whatever
//! the buckets (s3 → s3, s3 → local, local → s3), for every algorithm; s3 → local outputs also pass
//! `dsort verify`. Then: `input_format.prefix` (listing) with compressed (streamed) shards and the spec's
//! `s3`/`aws` providers, multipart uploads, and faults: an input object deleted mid-job, the server
//! restarted mid-job (the job rides it out on retries), uploads rejected by the server. A failed job
//! leaves no partial object (every output object present is whole), no multipart upload open and an
//! empty temp folder. "Mid-job" is a real event: a proxy in front of the server holds its responses once
//! the job has read more bytes than its extraction can read. The request counts of `--json` (`s3`) are
//! checked against the same proxy reading the HTTP it passes.

use dsort_tests::s3::{Proxy, S3Server, ctl, dsort_cmd, dsort_env, moto};
use dsort_tests::{Run, dsort_ok, gen_shards, list_dir, tempdir};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

const SHARDS: &str = "{000..005}";

/// Files of a folder (recursively, names relative to it) with their bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("below dir").to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).expect("read output"));
            }
        }
    }
    out
}

fn names(m: &BTreeMap<String, Vec<u8>>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

/// Objects under `bucket/prefix`, downloaded.
fn objects(s3: &S3Server, bucket: &str, prefix: &str, scratch: &Path) -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::tempdir_in(scratch).expect("download dir");
    s3.get_prefix(bucket, prefix, dir.path());
    files(dir.path())
}

fn assert_fails(run: &Run, what: &str, needles: &[&str]) {
    assert!(!run.ok, "{what}: must fail but succeeded:\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
    for n in needles {
        assert!(run.stderr.contains(n), "{what}: expected {n:?} in the error:\n{}", run.stderr);
    }
}

fn algorithm_args(alg: &str) -> Vec<&str> {
    match alg {
        "shuffle" => vec!["--algorithm", "shuffle", "--seed", "7"],
        "content" => vec!["--algorithm", "content", "--key-ext", ".cls", "--key-type", "int"],
        other => vec!["--algorithm", other],
    }
}

fn reshard(input: &str, output: &str, tmp: &Path, extra: &[&str]) -> Vec<String> {
    let tmp = tmp.display().to_string();
    let mut a: Vec<String> =
        ["reshard", "--input", input, "--output", output, "--shard-size", "40KiB", "--tmp-dir", &tmp]
            .iter()
            .map(|s| s.to_string())
            .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// 6 tar shards of 40 records (`.jpg` 1..16 KiB + `.cls`) in `d/in`, also put under `s3://src/in/`.
fn dataset(s3: &S3Server, d: &Path) {
    gen_shards(&format!("{}/in/shard-{SHARDS}.tar", d.display()), 40, "1KiB..16KiB", ".jpg,.cls", 5);
    s3.mb(&["src", "dst"]);
    s3.put_dir(&d.join("in"), "src", "in/");
}

#[test]
fn s3_to_s3_s3_to_local_and_local_to_s3_match_local_to_local_for_every_algorithm() {
    let Some(s3) = moto("s3 matrix") else { return };
    let d = tempdir();
    let d = d.path();
    dataset(&s3, d);
    let tmp = d.join("tmp");
    let local_in = format!("{}/in/shard-{SHARDS}.tar", d.display());
    let s3_in = format!("s3://src/in/shard-{SHARDS}.tar");
    for alg in ["alphanumeric", "shuffle", "content", "none"] {
        let extra = algorithm_args(alg);
        let reference_dir = d.join(format!("ref-{alg}"));
        dsort_ok(&args(&reshard(
            &local_in,
            &format!("{}/o-{{0000..9999}}.tar", reference_dir.display()),
            &tmp,
            &extra,
        )));
        let reference = files(&reference_dir);
        assert!(reference.len() > 5, "{alg}: enough output shards ({})", reference.len());

        s3.dsort_ok(&args(&reshard(&s3_in, &format!("s3://dst/s3s3-{alg}/o-{{0000..9999}}.tar"), &tmp, &extra)));
        assert_eq!(objects(&s3, "dst", &format!("s3s3-{alg}/"), d), reference, "{alg}: s3 -> s3");

        // By default each input object is streamed once: the bytes read from S3 are the input's, whatever
        // the order. Read by ranges instead (`DSORT_S3_READ=ranges`), the output is the same.
        let s3_local = d.join(format!("s3local-{alg}"));
        let mut json = reshard(&s3_in, &format!("{}/o-{{0000..9999}}.tar", s3_local.display()), &tmp, &extra);
        json.push("--json".into());
        let r = dsort_env(&S3Server::dsort_env(s3.port()), &args(&json));
        assert_read_once(&r, input_bytes(d), &format!("{alg}: s3 -> local"));
        assert_eq!(files(&s3_local), reference, "{alg}: s3 -> local");
        let ranged = d.join(format!("s3ranges-{alg}"));
        let mut env = S3Server::dsort_env(s3.port());
        env.push(("DSORT_S3_READ".into(), "ranges".into()));
        let r = dsort_env(
            &env,
            &args(&reshard(&s3_in, &format!("{}/o-{{0000..9999}}.tar", ranged.display()), &tmp, &extra)),
        );
        assert!(r.ok, "{alg}: s3 -> local by ranges: {}", r.stderr);
        assert_eq!(files(&ranged), reference, "{alg}: s3 -> local by ranges");
        let mut verify = vec!["verify", "--input", &local_in];
        let out_tpl = format!("{}/o-{{0000..9999}}.tar", s3_local.display());
        verify.extend(["--output", &out_tpl, "--shard-size", "40KiB"]);
        verify.extend(&extra);
        dsort_ok(&verify);

        s3.dsort_ok(&args(&reshard(&local_in, &format!("s3://dst/locs3-{alg}/o-{{0000..9999}}.tar"), &tmp, &extra)));
        assert_eq!(objects(&s3, "dst", &format!("locs3-{alg}/"), d), reference, "{alg}: local -> s3");
    }
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder left behind");
}

#[test]
fn spec_with_s3_providers_takes_compressed_shards_under_a_prefix() {
    let Some(s3) = moto("s3 prefix") else { return };
    let d = tempdir();
    let d = d.path();
    let root = d.join("root");
    gen_shards(&format!("{}/srcdir/gz/shard-{{0..3}}.tar.gz", root.display()), 30, "1KiB..8KiB", ".jpg,.cls", 9);
    std::fs::write(root.join("srcdir/gz/readme.txt"), "not a shard").expect("write");
    gen_shards(&format!("{}/other/gz/x-{{0..0}}.tar", d.display()), 5, "1KiB", ".jpg", 1);
    s3.mb(&["src", "dst"]);
    s3.put_dir(&root.join("srcdir"), "src", "");
    s3.put_dir(&d.join("other"), "src", ""); // gz/x-0.tar: under the prefix, another format
    s3.put_dir(&root.join("srcdir/gz"), "src", "elsewhere/"); // outside the prefix
    let names: Vec<String> = (0..4).map(|i| format!("gz/shard-{i}.tar.gz")).collect();
    let tmp = d.join("tmp");
    let spec = |input: serde_json::Value, output: serde_json::Value, input_format: serde_json::Value| {
        serde_json::json!({
            "input_bck": input, "output_bck": output, "input_format": input_format,
            "input_extension": ".tar.gz", "output_format": "out/o-{000..999}.tar", "output_shard_size": "20KiB",
            "algorithm": {"kind": "shuffle", "seed": "5"},
        })
        .to_string()
    };
    let local_spec = d.join("local.json");
    std::fs::write(
        &local_spec,
        spec(serde_json::json!("srcdir"), serde_json::json!("outdir"), serde_json::json!({"objnames": names})),
    )
    .expect("write spec");
    let (root_s, tmp_s) = (root.display().to_string(), tmp.display().to_string());
    dsort_ok(&["reshard", "--spec", &local_spec.display().to_string(), "--root", &root_s, "--tmp-dir", &tmp_s]);
    let reference = files(&root.join("outdir"));
    assert!(reference.len() > 3);

    let s3_spec = d.join("s3.json");
    let input = serde_json::json!({"name": "src", "provider": "s3"});
    let output = serde_json::json!({"name": "dst", "provider": "aws"});
    std::fs::write(&s3_spec, spec(input, output.clone(), serde_json::json!({"prefix": "gz/"}))).expect("write spec");
    let out = s3.dsort_ok(&["reshard", "--spec", &s3_spec.display().to_string(), "--tmp-dir", &tmp_s, "--json"]);
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("json summary");
    assert_eq!(summary["input_shards"], 4, "the four .tar.gz objects under gz/ and nothing else: {summary}");
    assert_eq!(objects(&s3, "dst", "", d), reference, "s3 -> s3 from a prefix");
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder left behind");

    // An empty selection is refused before any work.
    std::fs::write(
        &s3_spec,
        spec(serde_json::json!({"name": "src", "provider": "s3"}), output, serde_json::json!({"prefix": "nothing/"})),
    )
    .expect("write spec");
    let r = s3.dsort(&["reshard", "--spec", &s3_spec.display().to_string(), "--tmp-dir", &tmp_s]);
    assert_fails(&r, "empty prefix", &["input_format.prefix \"nothing/\"", "s3://src"]);
}

/// 2 shards of 30 records of 200..400 KiB (about 18 MiB): one output shard of several 5 MiB parts.
fn big_dataset(d: &Path) -> String {
    let tpl = format!("{}/big/b-{{0..1}}.tar", d.display());
    gen_shards(&tpl, 30, "200KiB..400KiB", ".jpg", 3);
    tpl
}

fn multipart_env(port: u16) -> Vec<(String, String)> {
    let mut env = S3Server::dsort_env(port);
    env.push(("DSORT_S3_MULTIPART_THRESHOLD".into(), "5242880".into()));
    env.push(("DSORT_S3_PART_SIZE".into(), "5242880".into()));
    env
}

#[test]
fn large_outputs_go_by_multipart_upload_and_a_rejected_upload_leaves_nothing() {
    let Some(s3) = moto("s3 multipart") else { return };
    let d = tempdir();
    let d = d.path();
    let input = big_dataset(d);
    let tmp = d.join("tmp");
    let one_shard = ["--shard-records", "1000"];
    let reference_dir = d.join("ref");
    let job = |output: &str| {
        let mut a = reshard(&input, output, &tmp, &[]);
        a.retain(|x| x != "--shard-size" && x != "40KiB");
        a.extend(one_shard.iter().map(|s| s.to_string()));
        a
    };
    dsort_ok(&args(&job(&format!("{}/o-{{0..9}}.tar", reference_dir.display()))));
    let reference = files(&reference_dir);
    assert_eq!(names(&reference), ["o-0.tar"]);
    assert!(reference["o-0.tar"].len() > 10 << 20, "an output of several parts");
    s3.mb(&["dst"]);
    let mut json_job = job("s3://dst/mp/o-{0..9}.tar");
    json_job.push("--json".into());
    let r = dsort_env(&multipart_env(s3.port()), &args(&json_job));
    assert!(r.ok, "multipart job failed: {}", r.stderr);
    assert_eq!(objects(&s3, "dst", "mp/", d), reference);
    // One PUT per 5 MiB part (the last one shorter), carrying the shard's bytes once.
    let summary: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("json summary");
    let len = reference["o-0.tar"].len() as u64;
    assert_eq!(summary["s3"]["dst"]["put_requests"], len.div_ceil(5 << 20), "{summary}");
    assert_eq!(summary["s3"]["dst"]["put_bytes"], len, "{summary}");

    // A server that refuses parts under 64 MiB rejects the upload when it is completed.
    let strict = S3Server::start(&[("S3_UPLOAD_PART_MIN_SIZE", "67108864")]);
    strict.mb(&["dst"]);
    let r = dsort_env(&multipart_env(strict.port()), &args(&job("s3://dst/mp/o-{0..9}.tar")));
    assert_fails(&r, "rejected upload", &["s3://dst/mp/o-0.tar", "upload failed"]);
    assert_eq!(strict.ls("dst", ""), Vec::<(String, u64)>::new(), "no object after a rejected upload");
    assert_eq!(strict.open_uploads("dst"), 0, "the rejected multipart upload was aborted");
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder left behind");

    // A bucket that does not exist: refused before any work, naming the bucket.
    let r = s3.dsort(&args(&reshard(&input, "s3://nobucket/o-{0..9}.tar", &tmp, &[])));
    assert_fails(&r, "missing bucket", &["output bucket s3://nobucket", "NoSuchBucket"]);
    assert!(!r.stderr.contains("extract"), "refused before any work: {}", r.stderr);
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder left behind");
}

/// The s3 → s3 shuffle under a budget too small for fetch windows, so creation reads record by record.
fn slow_job(tmp: &Path, output: &str) -> Vec<String> {
    reshard(
        &format!("s3://src/in/shard-{SHARDS}.tar"),
        output,
        tmp,
        &["--algorithm", "shuffle", "--seed", "3", "--max-mem", "8MiB"],
    )
}

/// Sum of the input shards' sizes: extraction reads at most that many bytes of bodies.
fn input_bytes(d: &Path) -> u64 {
    list_dir(&d.join("in")).iter().map(|f| std::fs::metadata(d.join("in").join(f)).expect("stat").len()).sum()
}

/// The shuffle of the dataset local → local (the reference outputs), then the same job s3 → s3 through a
/// proxy, started and held once it is creating shards (past every byte its extraction can read, with
/// most records still to fetch). Returns the reference, the proxy (holding) and the running job.
fn job_held_mid_creation(s3: &S3Server, d: &Path, output: &str) -> (BTreeMap<String, Vec<u8>>, Proxy, Child) {
    job_held(s3, d, output, |total| total + total / 4)
}

/// Start a shuffle from `s3://src` to `output` (input read by ranges, `DSORT_S3_READ=ranges`) through a
/// proxy that stops passing bytes once `after(input bytes)` have gone through; returns the local run's
/// output (the reference), the proxy and the job.
fn job_held(
    s3: &S3Server,
    d: &Path,
    output: &str,
    after: impl Fn(u64) -> u64,
) -> (BTreeMap<String, Vec<u8>>, Proxy, Child) {
    dataset(s3, d);
    let tmp = d.join("tmp");
    let reference_dir = d.join("ref");
    let local = reshard(
        &format!("{}/in/shard-{SHARDS}.tar", d.display()),
        &format!("{}/o-{{0000..9999}}.tar", reference_dir.display()),
        &tmp,
        &["--algorithm", "shuffle", "--seed", "3"],
    );
    dsort_ok(&args(&local));
    let reference = files(&reference_dir);
    let proxy = Proxy::start(s3.port());
    let total = input_bytes(d);
    proxy.hold_after(after(total));
    // Records read by ranged GETs in output order, so that creation still reads from the server.
    let mut env = S3Server::dsort_env(proxy.port());
    env.push(("DSORT_S3_READ".into(), "ranges".into()));
    let child = dsort_cmd(&env, &args(&slow_job(&tmp, output)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dsort");
    assert!(proxy.wait_held(Duration::from_secs(120)), "the job never got to the held point");
    (reference, proxy, child)
}

#[test]
fn an_input_object_deleted_mid_job_fails_the_job_cleanly() {
    let Some(s3) = moto("s3 deleted mid-job") else { return };
    let d = tempdir();
    let d = d.path();
    let (reference, proxy, child) = job_held_mid_creation(&s3, d, "s3://dst/del/o-{0000..9999}.tar");
    s3.ctl(&["rm", "src", "in/shard-002.tar"]);
    proxy.release();
    let r: Run = child.wait_with_output().expect("wait dsort").into();
    assert_fails(&r, "deleted input", &["shard-002.tar", "s3://src/in", "not found"]);
    // All or nothing: the shards uploaded before the failure never appear (their uploads are aborted).
    assert!(!reference.is_empty());
    assert_eq!(s3.ls("dst", "del/"), Vec::<(String, u64)>::new(), "a failed job left output objects");
    assert_eq!(s3.open_uploads("dst"), 0);
    assert_eq!(list_dir(&d.join("tmp")), Vec::<String>::new(), "temp folder left behind");
}

/// The server goes away (connections cut, port closed) and comes back on the same address with its objects
/// (a disk-backed server keeps them); `snapshot` and `restore` stand for that with moto.
fn restart_keeping_objects(s3: &mut S3Server, proxy: &Proxy, d: &Path) {
    proxy.sever();
    let snapshot = d.join("snapshot");
    ctl(&s3.endpoint(), &["snapshot", &snapshot.display().to_string()]);
    s3.restart();
    ctl(&s3.endpoint(), &["restore", &snapshot.display().to_string()]);
    proxy.reopen(s3.port());
}

/// Mid-extraction (half of the input read, no upload open yet) a restart costs retries only.
#[test]
fn a_server_restarted_mid_job_is_ridden_out_by_retries() {
    let Some(mut s3) = moto("s3 restart mid-job") else { return };
    let d = tempdir();
    let d = d.path();
    let (reference, proxy, child) = job_held(&s3, d, "s3://dst/rs/o-{0000..9999}.tar", |total| total / 2);
    restart_keeping_objects(&mut s3, &proxy, d);
    let r: Run = child.wait_with_output().expect("wait dsort").into();
    assert!(r.ok, "the job did not survive the restart:\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert_eq!(objects(&s3, "dst", "rs/", d), reference, "outputs after a restart");
    assert_eq!(list_dir(&d.join("tmp")), Vec::<String>::new(), "temp folder left behind");
}

/// Outputs are multipart uploads completed together at the end (all or nothing). moto forgets open uploads
/// when it restarts (S3 does not): the job must then fail naming the output, and publish nothing.
#[test]
fn a_server_that_loses_open_uploads_fails_the_job_with_no_output() {
    let Some(mut s3) = moto("s3 restart mid-creation") else { return };
    let d = tempdir();
    let d = d.path();
    let (reference, proxy, child) = job_held_mid_creation(&s3, d, "s3://dst/lost/o-{0000..9999}.tar");
    assert!(!reference.is_empty());
    restart_keeping_objects(&mut s3, &proxy, d);
    let r: Run = child.wait_with_output().expect("wait dsort").into();
    assert_fails(&r, "uploads lost by a restart", &["dst", "lost/o-"]);
    assert_eq!(s3.ls("dst", "lost/"), Vec::<(String, u64)>::new(), "a failed job left output objects");
    assert_eq!(list_dir(&d.join("tmp")), Vec::<String>::new(), "temp folder left behind");
}

#[test]
fn missing_input_objects_follow_missing_shards() {
    let Some(s3) = moto("s3 missing shards") else { return };
    let d = tempdir();
    let d = d.path();
    dataset(&s3, d);
    let tmp = d.join("tmp");
    let spec = d.join("spec.json");
    let write = |reaction: &str| {
        let v = serde_json::json!({
            // shard-006.tar does not exist.
            "input_bck": "s3://src", "input_format": {"template": "in/shard-{000..006}.tar"},
            "output_bck": {"name": "dst", "provider": "s3"}, "output_format": format!("{reaction}/o-{{000..999}}.tar"),
            "output_shard_size": "40KiB", "config": {"missing_shards": reaction},
        });
        std::fs::write(&spec, v.to_string()).expect("write spec");
    };
    let tmp_s = tmp.display().to_string();
    write("abort");
    let r = s3.dsort(&["reshard", "--spec", &spec.display().to_string(), "--tmp-dir", &tmp_s]);
    assert_fails(&r, "missing shard, abort", &["in/shard-006.tar", "missing"]);
    assert_eq!(s3.ls("dst", "abort/"), Vec::<(String, u64)>::new());
    write("warn");
    let r = s3.dsort(&["reshard", "--spec", &spec.display().to_string(), "--tmp-dir", &tmp_s]);
    assert!(r.ok, "warn: {}", r.stderr);
    assert!(r.stderr.contains("in/shard-006.tar"), "the warning names the shard: {}", r.stderr);
    assert!(!s3.ls("dst", "warn/").is_empty());
    assert_eq!(list_dir(&tmp), Vec::<String>::new(), "temp folder left behind");
}

/// The `Bucket` calls the cluster will use directly, against the server: check, stat, list (a string
/// prefix, not a folder), ranged reads across objects, `put_file` (a staged file published by one PUT or a
/// multipart upload) and `delete`.
#[test]
fn bucket_calls_against_the_server() {
    use shardio::Bucket;
    use shardio::s3::{S3Bucket, S3Settings};
    let Some(s3) = moto("s3 bucket calls") else { return };
    let env: BTreeMap<String, String> = multipart_env(s3.port()).into_iter().collect();
    let settings = S3Settings::from_lookup(&|k| env.get(k).cloned()).expect("settings");
    s3.mb(&["calls"]);
    let missing = S3Bucket::new("nosuchbucket", "", &settings).expect("handle");
    assert!(missing.check().unwrap_err().to_string().contains("nosuchbucket"));
    let b = S3Bucket::new("calls", "p", &settings).expect("handle");
    b.check().expect("an existing bucket");
    let d = tempdir();
    let small = d.path().join("small");
    std::fs::write(&small, b"0123456789").expect("write");
    b.put_file("a/x-1.tar", &small).expect("put small");
    let big = d.path().join("big");
    let bytes: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &bytes).expect("write");
    b.put_file("a/x-2.tar", &big).expect("put by multipart");
    b.put_file("ab.tar", &small).expect("put small");
    assert_eq!(b.stat("a/x-2.tar").expect("stat"), Some(12 << 20));
    assert_eq!(b.stat("a/none.tar").expect("stat"), None);
    assert_eq!(b.list("a/x").expect("list"), ["a/x-1.tar", "a/x-2.tar"]);
    assert_eq!(b.list("a").expect("list"), ["a/x-1.tar", "a/x-2.tar", "ab.tar"], "a string prefix");
    let got = b.read_many(&[("a/x-1.tar", vec![2..4, 0..1]), ("a/x-2.tar", vec![5..9, (11 << 20)..(11 << 20) + 3])]);
    let got = got.expect("ranges");
    assert_eq!(got[0], [b"23".to_vec(), b"0".to_vec()]);
    assert_eq!(got[1], [bytes[5..9].to_vec(), bytes[11 << 20..(11 << 20) + 3].to_vec()]);
    assert_eq!(
        s3.ls("calls", ""),
        [("p/a/x-1.tar".into(), 10), ("p/a/x-2.tar".into(), 12 << 20), ("p/ab.tar".into(), 10)]
    );
    b.delete("ab.tar").expect("delete");
    b.delete("ab.tar").expect("deleting again");
    assert_eq!(b.list("").expect("list"), ["a/x-1.tar", "a/x-2.tar"]);
    let past_the_end = [5..20, 0..1];
    let err = b.read_ranges("a/x-1.tar", &past_the_end).unwrap_err().to_string();
    assert!(err.contains("s3://calls/p/a/x-1.tar") && err.contains("offset 0") && err.contains("shorter"), "{err}");
}

/// The `s3` counts of a `--json` summary; the bucket names it holds must be `buckets`.
fn s3_counts<'a>(summary: &'a serde_json::Value, buckets: &[&str]) -> &'a serde_json::Value {
    let got: Vec<&str> = summary["s3"].as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
    assert_eq!(got, buckets, "buckets counted: {summary}");
    &summary["s3"]
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// A `dsort reshard --json` run from `s3://src` succeeded having read from S3 every byte of the input's
/// `input` bytes once: at least all of them, at most 1.05 times as many.
fn assert_read_once(r: &Run, input: u64, what: &str) {
    assert!(r.ok, "{what}: {}", r.stderr);
    let summary: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("json summary");
    let read = n(&s3_counts(&summary, &["src"])["src"]["get_bytes"]);
    assert!(
        read >= input && read * 100 <= input * 105,
        "{what}: {read} bytes read from S3 for {input} bytes of input (at most 1.05x)"
    );
}

/// Large records (1–3 MiB, several per output shard) are read from S3 once too, in both orders that
/// scatter them (shuffle, alphanumeric), and come out as local → local makes them.
#[test]
fn large_records_are_read_from_s3_once() {
    let Some(s3) = moto("s3 large records") else { return };
    let d = tempdir();
    let d = d.path();
    gen_shards(&format!("{}/in/shard-{{0..3}}.tar", d.display()), 6, "1MiB..3MiB", ".bin,.cls", 21);
    s3.mb(&["src"]);
    s3.put_dir(&d.join("in"), "src", "in/");
    let tmp = d.join("tmp");
    let input = input_bytes(d);
    for alg in ["shuffle", "alphanumeric"] {
        let extra = algorithm_args(alg);
        let job = |input: &str, out: &Path| {
            let mut a = reshard(input, &format!("{}/o-{{000..999}}.tar", out.display()), &tmp, &extra);
            for v in a.iter_mut().filter(|v| v.as_str() == "40KiB") {
                *v = "4MiB".into(); // output shards of a few records each
            }
            a.push("--json".into());
            a
        };
        let reference = d.join(format!("ref-{alg}"));
        dsort_ok(&args(&job(&format!("{}/in/shard-{{0..3}}.tar", d.display()), &reference)));
        let got = d.join(format!("got-{alg}"));
        let r = dsort_env(&S3Server::dsort_env(s3.port()), &args(&job("s3://src/in/shard-{0..3}.tar", &got)));
        assert_read_once(&r, input, alg);
        let expected = files(&reference);
        assert!(expected.len() >= 3, "{alg}: several output shards: {}", expected.len());
        assert_eq!(files(&got), expected, "{alg}: s3 -> local");
    }
}

/// s3 → local: the job's own request counts are those of the HTTP that went over the wire (a proxy reads
/// it), retried requests included (the proxy answers the first GETs 503 itself), every content byte was
/// fetched at least once, and nothing was written.
#[test]
fn s3_to_local_request_counts_are_those_on_the_wire() {
    let Some(s3) = moto("s3 request counts") else { return };
    let d = tempdir();
    let d = d.path();
    dataset(&s3, d);
    let tmp = d.join("tmp");
    let proxy = Proxy::start(s3.port());
    let out = format!("{}/out/o-{{0000..9999}}.tar", d.display());
    let job =
        reshard(&format!("s3://src/in/shard-{SHARDS}.tar"), &out, &tmp, &["--algorithm", "shuffle", "--seed", "3"]);
    let mut json_job = job.clone();
    json_job.push("--json".into());
    proxy.fail_gets(3);
    let r = dsort_env(&S3Server::dsort_env(proxy.port()), &args(&json_job));
    assert!(r.ok, "dsort failed: {}", r.stderr);
    assert_eq!(proxy.failed_gets(), 3, "the job rode out three 503s");
    let summary: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("json summary");
    let wire = proxy.wire();
    assert!(!wire.unparsed, "the proxy could not read the HTTP: {wire:?}");
    let counts = &s3_counts(&summary, &["src"])["src"];
    assert_eq!(*counts, wire.as_json(), "the job's counts against the wire's, the three refused GETs included");
    let input_shards = n(&summary["input_shards"]);
    assert_eq!(input_shards, 6);
    assert!(n(&counts["get_bytes"]) >= n(&summary["bytes"]), "every content byte fetched at least once: {summary}");
    assert!(n(&counts["get_requests"]) >= input_shards, "{summary}");
    assert!(n(&counts["other_requests"]) >= input_shards, "a HEAD per input shard at least: {summary}");
    assert_eq!((n(&counts["put_requests"]), n(&counts["put_bytes"])), (0, 0), "nothing written to S3: {summary}");

    // The human summary: one line for the bucket.
    let text = dsort_env(&S3Server::dsort_env(s3.port()), &args(&job));
    assert!(text.ok, "dsort failed: {}", text.stderr);
    let line = text.stdout.lines().find(|l| l.starts_with("s3://src: ")).unwrap_or_else(|| panic!("{}", text.stdout));
    assert!(line.contains(" GET (") && line.contains(", 0 PUT (0.0 MB), ") && line.ends_with(" other"), "{line}");
}

/// local → s3: each output shard is one multipart upload of one part (below the part size): one PUT
/// carrying its bytes, a create and a complete (POST); plus the bucket check (one listing). No GET.
#[test]
fn local_to_s3_puts_each_shard_once() {
    let Some(s3) = moto("s3 put counts") else { return };
    let d = tempdir();
    let d = d.path();
    dataset(&s3, d);
    let tmp = d.join("tmp");
    let proxy = Proxy::start(s3.port());
    let job = reshard(
        &format!("{}/in/shard-{SHARDS}.tar", d.display()),
        "s3://dst/put/o-{0000..9999}.tar",
        &tmp,
        &["--algorithm", "alphanumeric", "--json"],
    );
    let r = dsort_env(&S3Server::dsort_env(proxy.port()), &args(&job));
    assert!(r.ok, "dsort failed: {}", r.stderr);
    let summary: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("json summary");
    let wire = proxy.wire();
    assert!(!wire.unparsed, "the proxy could not read the HTTP: {wire:?}");
    let counts = &s3_counts(&summary, &["dst"])["dst"];
    assert_eq!(*counts, wire.as_json(), "the job's counts against the wire's");
    let shards = n(&summary["output_shards"]);
    let stored = s3.ls("dst", "put/");
    assert_eq!(stored.len() as u64, shards);
    assert!(shards > 5, "{summary}");
    let stored_bytes: u64 = stored.iter().map(|(_, size)| size).sum();
    assert_eq!(n(&counts["put_requests"]), shards, "one part per shard: {summary}");
    assert_eq!(n(&counts["put_bytes"]), stored_bytes, "{summary}");
    assert_eq!(n(&summary["output_file_bytes"]), stored_bytes, "{summary}");
    assert_eq!(n(&counts["other_requests"]), 2 * shards, "a create and a complete per shard: {summary}");
    assert_eq!(n(&counts["list_requests"]), 1, "the bucket check: {summary}");
    assert_eq!((n(&counts["get_requests"]), n(&counts["get_bytes"])), (0, 0), "{summary}");
}
