//! The cluster's hardened routes, end to end with real processes: job ids that would reach a path are
//! refused, a target serves record bytes only of the input shards it holds, the client token opens none of
//! the routes between the coordinator and the targets, bodies and frames over their limits are refused, and
//! `serve` will not listen on an exposed address without its credentials.

use dsort_tests::{CLIENT_TOKEN, CLUSTER_SECRET, Cluster, gen_shards, list_dir};
use std::path::Path;
use std::time::{Duration, Instant};

/// `METHOD URL` with `body` and `bearer` (if any): status and body text.
fn call(method: &str, url: &str, bearer: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let (status, bytes) = call_bytes(method, url, bearer, body);
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Like [`call`], the body as bytes.
fn call_bytes(method: &str, url: &str, bearer: Option<&str>, body: Vec<u8>) -> (u16, Vec<u8>) {
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    // JSON, so that the JSON routes read the body (and refuse it for its size, not its type).
    let mut rb = http
        .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    let r = rb.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    (r.status().as_u16(), r.bytes().map(|b| b.to_vec()).unwrap_or_default())
}

/// The files under `dir` (recursively) with their bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in list_dir(dir) {
        let p = dir.join(&name);
        if p.is_dir() {
            out.extend(tree(&p).into_iter().map(|(n, b)| (format!("{name}/{n}"), b)));
        } else {
            out.push((name, std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// An `init` body a target accepts: a job over `bucket`'s `shard-{0..n}.tar` on every target of `c`.
fn init_body(c: &Cluster, bucket: &str, n: usize) -> Vec<u8> {
    let spec = format!(
        r#"{{"input_bck":{{"name":"{bucket}"}},"input_format":{{"template":"shard-{{0..{}}}.tar"}},
        "output_bck":{{"name":"{bucket}-out"}},"output_format":"o-{{0..99}}.tar","output_shard_size":"4KiB"}}"#,
        n - 1
    );
    let objects: Vec<String> = (0..n).map(|i| format!("shard-{i}.tar")).collect();
    serde_json::to_vec(&serde_json::json!({
        "spec": spec, "targets": c.cluster_map(), "seed": null, "objects": objects,
    }))
    .unwrap()
}

/// The issue's attack: `POST .../jobs/..%2F..%2Fvictim/init` with a valid body, then `DELETE .../abort`,
/// deleted bucket `victim` from the mountpath. Now both (and every other malformed id) are refused with 400
/// before any work, and the bucket is intact; the same body under a valid id is accepted (the 400 is the
/// id's). The coordinator refuses malformed `uuid`s too.
#[test]
fn traversal_job_ids_are_refused_and_the_bucket_stays() {
    let c = Cluster::builder().targets(1).mountpaths(1).start();
    let data = c.root().join("victim");
    gen_shards(&format!("{}/shard-{{0..3}}.tar", data.display()), 5, "1KiB", ".jpg,.cls", 1);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://victim/"]);
    let bucket_dir = c.targets[0].mountpaths[0].join("victim");
    let before = tree(&bucket_dir);
    assert_eq!(before.len(), 4, "the victim bucket holds its 4 objects on the one mountpath");
    let t = c.targets[0].url.clone();
    let body = init_body(&c, "victim", 4);
    let long = "x".repeat(65);
    // (A literal `..` or `%2E%2E` segment is resolved by the URL itself before it is sent.)
    for id in ["..%2F..%2Fvictim", "..%2F..%2F..%2Fvictim", "%2E%2E%2Fvictim", "a%20b", "a%00b", long.as_str()] {
        let (status, text) = call("POST", &format!("{t}/v1/sort/jobs/{id}/init"), Some(CLUSTER_SECRET), body.clone());
        assert_eq!(status, 400, "init of job {id:?}: {text}");
        assert!(text.contains("job id"), "the error names the job id: {text}");
        for op in ["abort", "cleanup", "remove"] {
            let (status, text) = call("DELETE", &format!("{t}/v1/sort/jobs/{id}/{op}"), Some(CLUSTER_SECRET), vec![]);
            assert_eq!(status, 400, "{op} of job {id:?}: {text}");
        }
        let (status, text) = call("GET", &format!("{t}/v1/sort/jobs/{id}/info"), Some(CLUSTER_SECRET), vec![]);
        assert_eq!(status, 400, "info of job {id:?}: {text}");
    }
    assert_eq!(tree(&bucket_dir), before, "bucket victim is intact");
    let staging = c.targets[0].mountpaths[0].join(".dsort").join("staging");
    assert!(list_dir(&staging).is_empty(), "no staging folder was made: {:?}", list_dir(&staging));

    // The same body under a valid id is a job (its abort removes only its own folders).
    let (status, text) = call("POST", &format!("{t}/v1/sort/jobs/srt-legit_1/init"), Some(CLUSTER_SECRET), body);
    assert_eq!(status, 200, "{text}");
    let (status, text) = call("DELETE", &format!("{t}/v1/sort/jobs/srt-legit_1/abort"), Some(CLUSTER_SECRET), vec![]);
    assert_eq!(status, 200, "{text}");
    assert_eq!(tree(&bucket_dir), before, "bucket victim is intact after a real job's abort");
    assert_eq!(c.object_names("victim").len(), 4);

    // The coordinator: a malformed uuid is a 400 on every job route, an unknown valid one a 404.
    for q in ["..%2F..%2Fvictim", "a%2Fb", long.as_str()] {
        for (method, path) in [("GET", "/v1/sort"), ("DELETE", "/v1/sort/abort"), ("DELETE", "/v1/sort")] {
            let (status, text) = c.request(method, &format!("{}{path}?uuid={q}", c.url), true);
            assert_eq!(status, 400, "{method} {path}?uuid={q}: {text}");
        }
    }
    assert_eq!(c.request("GET", &format!("{}/v1/sort?uuid=srt-nope", c.url), true).0, 404);
}

/// Poll the job until every target reports `meta_sorting.running` (held there by `DSORT_TEST_HOLD`).
fn wait_all_sorting(c: &Cluster, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.get_json(&format!("{}/v1/sort?uuid={id}", c.url));
        let infos: Vec<&serde_json::Value> = v.as_object().unwrap().values().collect();
        assert!(!infos.iter().any(|i| i["aborted"] == true), "job {id} aborted: {v}");
        if infos.len() == c.targets.len() && infos.iter().all(|i| i["Metrics"]["meta_sorting"]["running"] == true) {
            return;
        }
        assert!(Instant::now() < deadline, "job {id} never reached sorting on every target: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `bytes` entry: shard, kind 0 (input), offset, size.
fn want(shard: u32, off: u64, size: u64) -> Vec<u8> {
    let mut w = shard.to_le_bytes().to_vec();
    w.push(0);
    w.extend_from_slice(&off.to_le_bytes());
    w.extend_from_slice(&size.to_le_bytes());
    w
}

/// With a job held in sorting on 3 targets: every input shard's bytes are served by exactly one target (the
/// one that extracted it), the other two refuse (403, naming the shard) before sending a byte, as does any
/// request mixing a held shard with one that is not; the client token is refused on the same route. Frames
/// over the limit in a record stream and bodies over their limits are refused (400/413) at once.
#[test]
fn bytes_only_for_held_shards_and_limits_on_bodies_and_frames() {
    let mut b = Cluster::builder().targets(3);
    for i in 0..3 {
        b = b.target_env(i, "DSORT_TEST_HOLD", "sorting");
    }
    let c = b.start();
    let n = 9;
    let data = c.root().join("in");
    gen_shards(&format!("{}/shard-{{0..{}}}.tar", data.display(), n - 1), 5, "1KiB", ".jpg,.cls", 2);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://in/"]);
    let spec = format!(
        r#"{{"input_bck":{{"name":"in"}},"input_format":{{"template":"shard-{{0..{}}}.tar"}},
        "output_bck":{{"name":"out"}},"output_format":"o-{{0..99}}.tar","output_shard_size":"4KiB"}}"#,
        n - 1
    );
    let spec_path = c.root().join("spec.json");
    std::fs::write(&spec_path, spec).unwrap();
    let id = c.dsort_ok(&["start", spec_path.to_str().unwrap()]).trim().to_string();
    wait_all_sorting(&c, &id);

    let bytes_url = |t: usize| format!("{}/v1/sort/jobs/{id}/bytes", c.targets[t].url);
    let mut holder_of = Vec::new();
    for s in 0..n as u32 {
        let local = std::fs::read(data.join(format!("shard-{s}.tar"))).unwrap();
        let mut holders = Vec::new();
        for t in 0..3 {
            let (status, body) = call_bytes("POST", &bytes_url(t), Some(CLUSTER_SECRET), want(s, 0, 512));
            let text = String::from_utf8_lossy(&body);
            match status {
                200 => {
                    assert_eq!(body, &local[..512], "shard {s} from target {t}");
                    holders.push(t);
                }
                403 => assert!(text.contains(&format!("input shard {s} (shard-{s}.tar) is not held")), "{text}"),
                other => panic!("bytes of shard {s} from target {t}: {other} {text}"),
            }
        }
        assert_eq!(holders.len(), 1, "shard {s} is served by exactly one target: {holders:?}");
        holder_of.push(holders[0]);
    }
    // A request mixing a held shard with one held elsewhere is refused whole.
    let t = holder_of[0];
    let other = (0..n).find(|&s| holder_of[s] != t).expect("shards are spread over the targets") as u32;
    let mut mixed = want(0, 0, 512);
    mixed.extend(want(other, 0, 512));
    let (status, text) = call("POST", &bytes_url(t), Some(CLUSTER_SECRET), mixed);
    assert_eq!(status, 403, "{text}");
    // A shard index past the job's inputs, and a body that is not a list of entries.
    assert_eq!(call("POST", &bytes_url(t), Some(CLUSTER_SECRET), want(u32::MAX, 0, 1)).0, 403);
    assert_eq!(call("POST", &bytes_url(t), Some(CLUSTER_SECRET), vec![0; 5]).0, 400);
    // The client token cannot read record bytes.
    assert_eq!(call("POST", &bytes_url(t), Some(CLIENT_TOKEN), want(0, 0, 512)).0, 403);

    // A record frame announcing 4 GiB is refused at once (not buffered while waiting for its end).
    let records = format!("{}/v1/sort/jobs/{id}/records", c.targets[0].url);
    let mut frame = u32::MAX.to_le_bytes().to_vec();
    frame.extend_from_slice(&[7; 64]);
    let t0 = Instant::now();
    let (status, text) = call("POST", &records, Some(CLUSTER_SECRET), frame);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("over the limit"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(10), "refused in {:?}", t0.elapsed());
    // Bodies over their route's limit: 413.
    let t1 = (c.targets[1].url.clone(), c.targets[1].id.clone());
    for (url, limit, bearer) in [
        (format!("{}/v1/sort/jobs/{id}/create", t1.0), 64 << 20, CLUSTER_SECRET),
        (format!("{}/v1/sort/jobs/{id}/cut", t1.0), 64 << 20, CLUSTER_SECRET),
        (format!("{}/v1/sort/jobs/{id}/bytes", t1.0), 64 << 20, CLUSTER_SECRET),
        (format!("{}/v1/sort", c.url), 16 << 20, CLIENT_TOKEN),
        (format!("{}/v1/cluster/targets", c.url), 64 << 10, CLUSTER_SECRET),
        (format!("{}/v1/cluster/targets/{}/leave", c.url, t1.1), 64 << 10, CLUSTER_SECRET),
    ] {
        let (status, text) = call("POST", &url, Some(bearer), vec![b'x'; limit + 1]);
        assert_eq!(status, 413, "POST {url} with {limit} + 1 bytes: {text}");
    }
    assert_eq!(c.health()["targets"][&t1.1], "up", "the refused leave did not go through");

    c.dsort_ok(&["abort", &id]);
    let r = c.dsort(&["wait", &id, "--timeout", "30s"]);
    assert!(!r.ok && r.stderr.contains("was aborted"), "{}", r.stderr);
    assert!(c.dsort_ok(&["ls", "ais://out"]).trim().is_empty());
    assert!(c.dsort_ok(&["ls", "ais://in"]).lines().count() == n, "the input is untouched");
}

/// Every route between the coordinator and the targets refuses the client token (403) and no credential
/// (401), and the state they would change is unchanged; the public API takes the client token and refuses
/// the cluster secret's absence of it.
#[test]
fn a_client_token_is_refused_on_every_cluster_route() {
    let c = Cluster::builder().targets(2).start();
    let data = c.root().join("b");
    gen_shards(&format!("{}/shard-{{0..1}}.tar", data.display()), 2, "1KiB", ".cls", 1);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://b/"]);
    let (t0, t1) = (c.targets[0].id.clone(), c.targets[0].url.clone());
    let registration = serde_json::to_vec(&c.cluster_map()[0]).unwrap();
    let mut routes: Vec<(&str, String, Vec<u8>)> = vec![
        ("POST", format!("{}/v1/cluster/targets", c.url), registration),
        ("GET", format!("{}/v1/cluster/targets", c.url), vec![]),
        ("POST", format!("{}/v1/cluster/targets/{t0}/heartbeat", c.url), vec![]),
        ("POST", format!("{}/v1/cluster/targets/{t0}/drain", c.url), vec![]),
        ("POST", format!("{}/v1/cluster/targets/{t0}/leave", c.url), b"bye".to_vec()),
        ("GET", format!("{t1}/v1/objects/b"), vec![]),
        ("GET", format!("{t1}/v1/objects/b/shard-0.tar"), vec![]),
        ("PUT", format!("{t1}/v1/objects/b/new.tar"), b"x".to_vec()),
        ("DELETE", format!("{t1}/v1/objects/b/shard-0.tar"), vec![]),
    ];
    for op in ["init", "distribute", "records", "sortrange", "cut", "create", "shardrecs", "commit", "bytes"] {
        routes.push(("POST", format!("{t1}/v1/sort/jobs/srt-x/{op}"), b"{}".to_vec()));
    }
    routes.push(("GET", format!("{t1}/v1/sort/jobs/srt-x/info"), vec![]));
    for op in ["abort", "cleanup", "remove"] {
        routes.push(("DELETE", format!("{t1}/v1/sort/jobs/srt-x/{op}"), vec![]));
    }
    for (method, url, body) in &routes {
        let (status, text) = call(method, url, Some(CLIENT_TOKEN), body.clone());
        assert_eq!(status, 403, "{method} {url} with the client token: {text}");
        assert!(text.contains("cluster secret"), "{text}");
        let (status, text) = call(method, url, None, body.clone());
        assert_eq!(status, 401, "{method} {url} without a credential: {text}");
        let (status, _) = call(method, url, Some("wrong"), body.clone());
        assert_eq!(status, 401, "{method} {url} with a wrong credential");
    }
    // Nothing changed: both targets up (no leave or drain went through), the objects all there.
    c.wait_healthy(2);
    assert_eq!(c.health()["targets"][&t0], "up");
    assert_eq!(c.object_names("b"), ["shard-0.tar", "shard-1.tar"]);
    // The cluster secret opens them (the cluster map), the client token the public API.
    let (status, text) = call("GET", &format!("{}/v1/cluster/targets", c.url), Some(CLUSTER_SECRET), vec![]);
    assert_eq!(status, 200, "{text}");
    let (status, text) = call("GET", &format!("{}/v1/objects/b", c.url), Some(CLIENT_TOKEN), vec![]);
    assert_eq!(status, 200, "{text}");
    assert_eq!(call("GET", &format!("{}/v1/sort", c.url), Some(CLIENT_TOKEN), vec![]).0, 200);
    // The cluster secret is not a client token, nor is no credential.
    assert_eq!(call("GET", &format!("{}/v1/objects/b", c.url), Some(CLUSTER_SECRET), vec![]).0, 401);
    assert_eq!(call("GET", &format!("{}/v1/sort", c.url), None, vec![]).0, 401);
    // Metrics take either credential; health none.
    for bearer in [CLIENT_TOKEN, CLUSTER_SECRET] {
        assert_eq!(call("GET", &format!("{}/metrics", c.url), Some(bearer), vec![]).0, 200);
        assert_eq!(call("GET", &format!("{t1}/metrics"), Some(bearer), vec![]).0, 200);
    }
    assert_eq!(call("GET", &format!("{t1}/metrics"), None, vec![]).0, 401);
    assert_eq!(call("GET", &format!("{t1}/v1/health"), None, vec![]).0, 200);
}

/// `serve` refuses a non-loopback address without its credentials (naming what is missing), serves there
/// with `--allow-unauthenticated` and says so loudly; on loopback no credential is needed.
#[test]
fn serve_refuses_an_exposed_address_without_credentials() {
    let d = dsort_tests::tempdir();
    let mp = d.path().join("mp");
    let mp = mp.to_str().unwrap();
    let target = ["serve", "target", "--listen", "0.0.0.0:0", "--coordinator", "http://127.0.0.1:9", "--mountpath", mp];
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["serve", "coordinator", "--listen", "0.0.0.0:0"], "a token (--token) and a cluster secret"),
        (vec!["serve", "coordinator", "--listen", "0.0.0.0:0", "--token", "t"], "without a cluster secret"),
        (vec!["serve", "coordinator", "--listen", "0.0.0.0:0", "--cluster-secret", "s"], "without a token (--token)"),
        (target.to_vec(), "without a cluster secret"),
    ];
    for (args, want) in cases {
        let r = dsort_tests::dsort(&args);
        assert!(!r.ok && r.stderr.contains("refusing") && r.stderr.contains(want), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "nothing is announced: {}", r.stdout);
    }
    // With --allow-unauthenticated it serves, and warns.
    let log = d.path().join("coordinator.log");
    let mut child = std::process::Command::new(dsort_tests::dsort_bin())
        .args(["serve", "coordinator", "--listen", "0.0.0.0:0", "--allow-unauthenticated"])
        .env_remove("DSORT_TOKEN")
        .env_remove("DSORT_CLUSTER_SECRET")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("listening on http://0.0.0.0:"), "{line}");
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("WARNING: UNAUTHENTICATED"), "{stderr}");
    // On loopback, no credential at all: a cluster works.
    let c = Cluster::builder().targets(1).open().start();
    let data = c.root().join("b");
    gen_shards(&format!("{}/shard-{{0..1}}.tar", data.display()), 2, "1KiB", ".cls", 1);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://b/"]);
    assert_eq!(c.object_names("b").len(), 2);
}
