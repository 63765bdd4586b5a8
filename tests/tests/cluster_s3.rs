//! The cluster with S3 buckets (moto on loopback): a coordinator and 3 targets read input shards from S3
//! and write output shards to S3, in every combination with local (`ais`) buckets. The reference is the
//! same job local → local with `dsort reshard`: the shards must be byte-identical.

use dsort_tests::s3::{S3Server, moto};
use dsort_tests::{Cluster, dsort_json, gen_shards, list_dir};
use std::collections::BTreeMap;
use std::path::Path;

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    list_dir(dir).into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap())).collect()
}

fn spec(input: (&str, &str), output: (&str, &str), shards: &str) -> String {
    format!(
        r#"{{"input_bck":{{"name":"{}","provider":"{}"}},"input_format":{{"template":"shard-{shards}.tar"}},
        "output_bck":{{"name":"{}","provider":"{}"}},"output_format":"out-{{000..999}}.tar",
        "output_shard_size":"12KiB","algorithm":{{"kind":"shuffle","seed":"5"}}}}"#,
        input.0, input.1, output.0, output.1
    )
}

#[test]
fn s3_buckets_in_and_out_of_the_cluster_equal_reshard() {
    let Some(s3) = moto("s3_buckets_in_and_out_of_the_cluster_equal_reshard") else { return };
    let builder = S3Server::dsort_env(s3.port()).into_iter().fold(Cluster::builder().targets(3), |b, (k, v)| {
        let k: &'static str = Box::leak(k.into_boxed_str());
        b.env_all(k, &v)
    });
    let c = builder.start();
    let root = c.root().join("local");
    let src = root.join("src");
    // Uncompressed shards: each streamed once from S3 by the target that extracts it, whose creators' byte
    // streams then serve its records' bytes (`DSORT_S3_READ=once`, the default).
    gen_shards(&format!("{}/shard-{{0..5}}.tar", src.display()), 25, "200B..3KiB", ".jpg,.cls", 23);
    s3.mb(&["src", "dst", "dst2"]);
    s3.put_dir(&src, "src", "");
    c.dsort_ok(&["put", src.to_str().unwrap(), "ais://src/"]);
    let reference = root.join("spec.json");
    std::fs::write(&reference, spec(("src", "ais"), ("dst", "ais"), "{0..5}")).unwrap();
    dsort_json(&["reshard", "--spec", reference.to_str().unwrap(), "--root", root.to_str().unwrap(), "--json"]);
    let expected = files(&root.join("dst"));
    assert!(expected.len() > 5, "enough shards to cross targets: {:?}", expected.keys());

    for (tag, input, output) in [
        ("s3-to-s3", ("src", "s3"), ("dst", "s3")),
        ("s3-to-ais", ("src", "s3"), ("dst-ais", "ais")),
        ("ais-to-s3", ("src", "ais"), ("dst2", "s3")),
    ] {
        let path = root.join(format!("{tag}.json"));
        std::fs::write(&path, spec(input, output, "{0..5}")).unwrap();
        let id = c.dsort_ok(&["start", path.to_str().unwrap()]).trim().to_string();
        c.dsort_ok(&["wait", &id, "--timeout", "2m"]);
        let got = c.root().join(format!("got-{tag}"));
        if output.1 == "s3" {
            std::fs::create_dir_all(&got).unwrap();
            s3.get_prefix(output.0, "", &got);
        } else {
            c.get_objects(output.0, expected.keys(), &got);
        }
        let got = files(&got);
        assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "{tag}: output names");
        assert!(got == expected, "{tag}: the cluster's shards differ from dsort reshard");
    }

    // Compressed shards taken by prefix (the coordinator lists them once): each decoded once by its holder
    // and streamed to the creators from there.
    let gz = root.join("gzsrc");
    gen_shards(&format!("{}/gz/shard-{{0..3}}.tar.gz", gz.display()), 25, "200B..3KiB", ".jpg,.cls", 29);
    s3.put_dir(&gz.join("gz"), "src", "gz/");
    let gz_spec = |input: &str, output: &str| {
        format!(
            r#"{{"input_bck":{input},"input_extension":".tar.gz","output_bck":{output},"output_extension":".tar",
            "output_format":"out-{{000..999}}.tar","output_shard_size":"12KiB","algorithm":{{"kind":"shuffle","seed":"5"}}}}"#
        )
    };
    let path = root.join("gz-ref.json");
    let local = gz_spec(r#"{"name":"gzsrc"}"#, r#"{"name":"gzdst"}"#).replacen(
        r#""input_extension""#,
        r#""input_format":{"template":"gz/shard-{0..3}.tar.gz"},"input_extension""#,
        1,
    );
    std::fs::write(&path, local).unwrap();
    dsort_json(&["reshard", "--spec", path.to_str().unwrap(), "--root", root.to_str().unwrap(), "--json"]);
    let expected = files(&root.join("gzdst"));
    assert!(expected.len() > 3, "{:?}", expected.keys());
    let by_prefix = gz_spec(r#"{"name":"src","provider":"s3"}"#, r#"{"name":"dst-gz","provider":"ais"}"#).replacen(
        r#""input_extension""#,
        r#""input_format":{"prefix":"gz/"},"input_extension""#,
        1,
    );
    std::fs::write(&path, by_prefix).unwrap();
    let id = c.dsort_ok(&["start", path.to_str().unwrap()]).trim().to_string();
    c.dsort_ok(&["wait", &id, "--timeout", "2m"]);
    let got = c.root().join("got-gz");
    c.get_objects("dst-gz", expected.keys(), &got);
    assert!(files(&got) == expected, "compressed shards by prefix: the cluster's shards differ from dsort reshard");

    // A missing S3 input bucket is refused before any work, naming it.
    let path = root.join("missing.json");
    std::fs::write(&path, spec(("no-such-bucket", "s3"), ("dst", "s3"), "{0..5}")).unwrap();
    let r = c.dsort(&["start", path.to_str().unwrap()]);
    assert!(!r.ok && r.stderr.contains("no-such-bucket"), "{}", r.stderr);
}
