//! The cluster's first layer end to end, with real processes on loopback ports: a coordinator and targets
//! (`dsort serve`), the object verbs (`dsort put | get | ls`), placement on disk, restarts, a killed
//! target, and the bearer token.

use dsort_tests::{Cluster, assert_placement, gen_shards, list_dir};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Generate `n` small shards (plus one in a sub-folder) in `dir`; returns name -> bytes.
fn make_shards(dir: &Path, n: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    gen_shards(&format!("{}/shard-{{000..{:03}}}.tar", dir.display(), n - 1), 2, "512B..2KiB", ".jpg,.cls", seed);
    gen_shards(&format!("{}/sub/deep-{{0..0}}.tar", dir.display()), 3, "1KiB", ".png", seed + 1);
    let mut out = BTreeMap::new();
    for name in list_dir(dir) {
        let p = dir.join(&name);
        if p.is_file() {
            out.insert(name, std::fs::read(p).unwrap());
        }
    }
    out.insert("sub/deep-0.tar".into(), std::fs::read(dir.join("sub/deep-0.tar")).unwrap());
    out
}

/// `dsort ls` output parsed: name -> size.
fn parse_ls(out: &str) -> BTreeMap<String, u64> {
    out.lines()
        .map(|l| {
            let (name, size) = l.rsplit_once('\t').unwrap_or_else(|| panic!("ls line without a tab: {l:?}"));
            (name.to_string(), size.parse().unwrap_or_else(|_| panic!("ls size: {l:?}")))
        })
        .collect()
}

#[test]
fn put_ls_get_and_placement_on_disk() {
    let c = Cluster::start(3);
    let data = c.root().join("data");
    let shards = make_shards(&data, 100, 7); // 101 objects: every one of 6 mountpaths gets some
    let out = c.dsort_ok(&["put", data.to_str().unwrap(), "ais://ds/train/"]);
    assert!(out.contains(&format!("put {} object(s) into ais://ds", shards.len())), "{out}");

    // ls lists exactly them, with their sizes, sorted.
    let want: BTreeMap<String, u64> = shards.iter().map(|(n, d)| (format!("train/{n}"), d.len() as u64)).collect();
    let listed = c.dsort_ok(&["ls", "ais://ds"]);
    assert_eq!(parse_ls(&listed), want);
    let names: Vec<&str> = listed.lines().map(|l| l.split('\t').next().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "ls is sorted by name");
    let json: serde_json::Value = serde_json::from_str(&c.dsort_ok(&["ls", "ais://ds/train/sub/", "--json"])).unwrap();
    assert_eq!(json, serde_json::json!([{"name": "train/sub/deep-0.tar", "size": shards["sub/deep-0.tar"].len()}]));
    assert_eq!(parse_ls(&c.dsort_ok(&["ls", "ais://ds/train/shard-01"])).len(), 10);
    assert_eq!(parse_ls(&c.dsort_ok(&["ls", "ais://ds/train/shard-0"])).len(), 100);
    assert!(c.dsort_ok(&["ls", "ais://other"]).is_empty(), "an unknown bucket is empty");

    // get returns byte-identical files, written atomically (no temp file left).
    let got = c.root().join("got");
    std::fs::create_dir_all(&got).unwrap();
    for (name, bytes) in shards.iter().filter(|(n, _)| n.ends_with("0.tar")) {
        let local = got.join(name.replace('/', "_"));
        c.dsort_ok(&["get", &format!("ais://ds/train/{name}"), local.to_str().unwrap()]);
        assert_eq!(std::fs::read(&local).unwrap(), *bytes, "{name}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&c.dsort_ok(&["get", "ais://ds/train/shard-042.tar", got.to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(
        std::fs::read(got.join("shard-042.tar")).unwrap(),
        shards["shard-042.tar"],
        "a folder gets the base name"
    );
    assert_eq!(j["size"], shards["shard-042.tar"].len());
    assert!(j["target"].as_str().is_some_and(|t| t.starts_with("t-")), "{j}");
    assert!(list_dir(&got).iter().all(|n| !n.starts_with(".dsort-tmp")), "{:?}", list_dir(&got));

    // Objects are spread over the 3 targets and their mountpaths exactly as placement says.
    let prefixed: BTreeMap<String, Vec<u8>> = shards.iter().map(|(n, d)| (format!("train/{n}"), d.clone())).collect();
    let per_target = assert_placement(&c, "ds", &prefixed, true);
    assert_eq!(per_target.values().sum::<usize>(), shards.len());

    // A byte range through the coordinator (206 with exactly those bytes), and from the owner directly.
    let url = format!("{}/v1/objects/ds/train/shard-003.tar", c.url);
    let token = c.token.clone().unwrap_or_default();
    let r = reqwest::blocking::Client::new()
        .get(&url)
        .bearer_auth(&token)
        .header("Range", "bytes=512-1023")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 512-1023/{}", shards["shard-003.tar"].len()).as_str());
    assert_eq!(r.bytes().unwrap().as_ref(), &shards["shard-003.tar"][512..1024]);
    let past = reqwest::blocking::Client::new()
        .get(&url)
        .bearer_auth(&token)
        .header("Range", "bytes=99999999-")
        .send()
        .unwrap();
    assert_eq!(past.status().as_u16(), 416);

    // Errors name the object and the target.
    let r = c.dsort(&["get", "ais://ds/train/missing.tar", got.join("m").to_str().unwrap()]);
    assert!(!r.ok);
    assert!(r.stderr.contains("train/missing.tar") && r.stderr.contains("target t-"), "{}", r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    assert!(!got.join("m").exists());
    let r = c.dsort(&["ls", "s3://x"]);
    assert!(!r.ok && r.stderr.contains("ais://"), "{}", r.stderr);
    let r = c.dsort(&["put", data.join("shard-000.tar").to_str().unwrap(), "ais://ds/../"]);
    assert!(!r.ok && r.stderr.contains("object name"), "{}", r.stderr);

    // Names that need percent-encoding survive the trip; overwrite and delete through the coordinator.
    let odd = c.root().join("odd");
    std::fs::create_dir_all(odd.join("dir ü")).unwrap();
    std::fs::write(odd.join("dir ü/a b+c#d%e?.bin"), b"odd name").unwrap();
    c.dsort_ok(&["put", odd.to_str().unwrap(), "ais://ds/odd/"]);
    let listed = parse_ls(&c.dsort_ok(&["ls", "ais://ds/odd/dir ü/"]));
    assert_eq!(listed, BTreeMap::from([("odd/dir ü/a b+c#d%e?.bin".to_string(), 8)]));
    let local = got.join("odd.bin");
    c.dsort_ok(&["get", "ais://ds/odd/dir ü/a b+c#d%e?.bin", local.to_str().unwrap()]);
    assert_eq!(std::fs::read(&local).unwrap(), b"odd name");
    let (status, _) =
        c.request("DELETE", &format!("{}/v1/objects/ds/odd/dir%20%C3%BC/a%20b+c%23d%25e%3F.bin", c.url), true);
    assert_eq!(status, 200);
    let small = c.root().join("small.bin");
    std::fs::write(&small, b"hello").unwrap();
    c.dsort_ok(&["put", small.to_str().unwrap(), "ais://ds/train/"]);
    std::fs::write(&small, b"hello again").unwrap();
    c.dsort_ok(&["put", small.to_str().unwrap(), "ais://ds/train/"]);
    assert_eq!(parse_ls(&c.dsort_ok(&["ls", "ais://ds/train/small"]))["train/small.bin"], 11, "overwritten");
    let (status, _) = c.request("DELETE", &format!("{}/v1/objects/ds/train/small.bin", c.url), true);
    assert_eq!(status, 200);
    let (status, body) = c.request("DELETE", &format!("{}/v1/objects/ds/train/small.bin", c.url), true);
    assert_eq!(status, 404, "{body}");
    assert_eq!(parse_ls(&c.dsort_ok(&["ls", "ais://ds"])), want);
}

#[test]
fn restart_keeps_id_and_objects_and_a_killed_target_goes_down() {
    let mut c = Cluster::start(3);
    let data = c.root().join("data");
    let shards = make_shards(&data, 24, 11);
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://b/"]);

    // Graceful stop: the target says it leaves (down at once), then comes back with the same id.
    let id0 = c.targets[0].id.clone();
    let url0 = c.targets[0].url.clone();
    assert!(c.stop_target(0), "SIGTERM makes the target exit 0");
    c.wait_until("target 0 down after leaving", Duration::from_secs(5), |h| h["targets"][&id0] == "down");
    c.start_target(0);
    assert_eq!(c.targets[0].id, id0, "the id is kept in the first mountpath");
    assert_ne!(c.targets[0].url, url0, "a new port");
    c.wait_healthy(3);
    let map = c.cluster_map();
    assert_eq!(map.iter().find(|t| t["id"] == id0.as_str()).unwrap()["url"], c.targets[0].url.as_str());
    // Its objects are still served (every object, whoever holds it).
    let got = c.root().join("got");
    std::fs::create_dir_all(&got).unwrap();
    for (name, bytes) in &shards {
        let local = got.join(name.replace('/', "_"));
        c.dsort_ok(&["get", &format!("ais://b/{name}"), local.to_str().unwrap()]);
        assert_eq!(std::fs::read(&local).unwrap(), *bytes, "{name}");
    }
    assert_placement(&c, "b", &shards, false);

    // SIGKILL: down within ~5 s; the coordinator still answers.
    let id1 = c.targets[1].id.clone();
    let killed = Instant::now();
    c.kill_target(1);
    c.wait_until("killed target down", Duration::from_secs(6), |h| h["targets"][&id1] == "down");
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "down after {took:?}");
    let h = c.health();
    assert_eq!(h["healthy_targets"], 2, "{h}");
    let r = c.dsort(&["ls", "ais://b"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains(&id1), "ls warns that a target is down: {}", r.stderr);
    let listed = parse_ls(&r.stdout);
    assert!(!listed.is_empty() && listed.len() < shards.len(), "only the survivors' objects: {}", listed.len());
    // Objects of the survivors are still served.
    let name = listed.keys().next().unwrap();
    let local = got.join("after-kill");
    c.dsort_ok(&["get", &format!("ais://b/{name}"), local.to_str().unwrap()]);
    assert_eq!(std::fs::read(&local).unwrap(), shards[name]);

    // It comes back when its heartbeats resume.
    c.start_target(1);
    assert_eq!(c.targets[1].id, id1);
    c.wait_healthy(3);
    assert_eq!(parse_ls(&c.dsort_ok(&["ls", "ais://b"])).len(), shards.len());
}

#[test]
fn bearer_token_guards_every_route_but_health() {
    let c = Cluster::builder().targets(2).token("s3cret-token").via_env(true).start();
    let data = c.root().join("data");
    let shards = make_shards(&data, 4, 3);

    // Without the token (or with a wrong one): 401, on the coordinator and on a target.
    let target_url = &c.targets[0].url;
    for url in [
        format!("{}/v1/cluster/targets", c.url),
        format!("{}/v1/objects/b", c.url),
        format!("{}/v1/objects/b/x.tar", c.url),
        format!("{target_url}/v1/objects/b"),
        format!("{target_url}/v1/objects/b/x.tar"),
        format!("{}/v1/no-such-route", c.url),
    ] {
        let (status, body) = c.request("GET", &url, false);
        assert_eq!(status, 401, "GET {url}: {body}");
        assert!(body.contains("Bearer"), "{body}");
        let wrong = reqwest::blocking::Client::new().get(&url).bearer_auth("nope").send().unwrap();
        assert_eq!(wrong.status().as_u16(), 401, "GET {url} with a wrong token");
    }
    let (status, _) = c.request("PUT", &format!("{target_url}/v1/objects/b/x.tar"), false);
    assert_eq!(status, 401);
    // Health needs no token.
    for url in [&c.url, target_url] {
        let (status, body) = c.request("GET", &format!("{url}/v1/health"), false);
        assert_eq!(status, 200, "{body}");
    }

    // The CLI with the token works (DSORT_TOKEN from Cluster::command; --token explicitly too).
    c.dsort_ok(&["put", data.to_str().unwrap(), "ais://b/"]);
    let listed = c.dsort_ok(&["ls", "ais://b", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v.as_array().unwrap().len(), shards.len());
    let out = c
        .command(&["ls", "ais://b", "--token", "s3cret-token", "--url", &c.url])
        .env_remove("DSORT_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), shards.len());
    let local = c.root().join("one.tar");
    c.dsort_ok(&["get", "ais://b/shard-000.tar", local.to_str().unwrap()]);
    assert_eq!(std::fs::read(&local).unwrap(), shards["shard-000.tar"]);

    // Without it the CLI fails and says why.
    let out = c.command(&["ls", "ais://b"]).env_remove("DSORT_TOKEN").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("401") && err.contains("unauthorized"), "{err}");
}

#[test]
fn serve_flags_are_checked_before_serving() {
    let help = dsort_tests::dsort_ok(&["serve", "target", "--help"]);
    for env in ["DSORT_LISTEN", "DSORT_COORDINATOR", "DSORT_MOUNTPATHS", "DSORT_TARGET_ID", "DSORT_TMP_DIR"] {
        assert!(help.contains(env), "serve target --help names {env}:\n{help}");
    }
    let d = dsort_tests::tempdir();
    let mp = d.path().join("mp");
    let base = ["serve", "target", "--listen", "127.0.0.1:0", "--coordinator", "http://127.0.0.1:9"];
    let mp_s = mp.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--mountpath", mp_s, "--mountpath", &format!("{mp_s}/inner")], "overlap"),
        (&["--mountpath", mp_s, "--max-mem", "150%"], "--max-mem"),
        (&["--mountpath", mp_s, "--id", "bad/id"], "target id"),
        (&["--mountpath", mp_s, "--advertise-url", "nope"], "URL"),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let r = dsort_tests::dsort(&args);
        assert!(!r.ok && r.stderr.contains(want), "{args:?}: want {want:?} in:\n{}", r.stderr);
        assert!(r.stdout.is_empty(), "nothing is announced: {}", r.stdout);
    }
    let r = dsort_tests::dsort(&["serve", "coordinator", "--listen", "256.0.0.1:1"]);
    assert!(!r.ok && r.stderr.contains("cannot listen on 256.0.0.1:1"), "{}", r.stderr);
}
