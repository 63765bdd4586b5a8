//! Shared helpers for the end-to-end tests: find the built `dsort` binary, run it, make temp folders.

pub mod chaos;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `dsort` binary of this build: `$DSORT_BIN`, else `target/<profile>/dsort` next to the test binary
/// (cargo builds it because `dsort-coordinator` has integration tests of its own) or next to a binary of
/// this crate (`target/<profile>/chaos`).
pub fn dsort_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DSORT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/dsort; target/<profile>/<bin> -> the same.
    let parent = exe.parent().expect("the binary's folder");
    let profile_dir = if parent.file_name().is_some_and(|n| n == "deps") { parent.parent() } else { Some(parent) };
    let profile_dir = profile_dir.expect("target/<profile> folder");
    let bin = profile_dir.join("dsort");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (or set DSORT_BIN)",
        bin.display()
    );
    bin
}

/// A finished `dsort` run.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Run `dsort ARGS...`.
pub fn dsort(args: &[&str]) -> Run {
    Command::new(dsort_bin()).args(args).output().expect("run dsort").into()
}

/// Run `dsort ARGS...` and insist that it succeeds; returns stdout.
pub fn dsort_ok(args: &[&str]) -> String {
    let r = dsort(args);
    assert!(r.ok, "dsort {args:?} failed:\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
    r.stdout
}

/// True when a program can be run (used to skip, loudly, tests whose peer tool is missing).
pub fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The real WebDataset shards of `tests/fixtures/webdataset/` (origin and license in `tests/fixtures/README.md`).
pub fn webdataset_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/webdataset")
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("dsort-e2e-").tempdir().expect("temp dir")
}

/// Run `dsort ARGS... --json`-style commands that must succeed and print one JSON document on stdout.
pub fn dsort_json(args: &[&str]) -> serde_json::Value {
    let out = dsort_ok(args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("dsort {args:?}: stdout is not JSON ({e}):\n{out}"))
}

/// `dsort gen --output TEMPLATE --records-per-shard N --record-size SIZE --exts EXTS --seed SEED`.
pub fn gen_shards(template: &str, records: usize, size: &str, exts: &str, seed: u64) {
    dsort_ok(&[
        "gen",
        "--output",
        template,
        "--records-per-shard",
        &records.to_string(),
        "--record-size",
        size,
        "--exts",
        exts,
        "--seed",
        &seed.to_string(),
    ]);
}

/// Names in a folder (files and folders, hidden ones too), sorted; empty when the folder is missing.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> =
        rd.map(|e| e.expect("read_dir entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Each file of `dir` (not recursive) with its bytes, by name.
pub fn read_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    list_dir(dir).into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).expect("read a file"))).collect()
}

/// `dsort reshard` of `spec` (JSON text, saved as `root/spec.json`) with its buckets as folders of `root`:
/// the spec's path and the output shards it wrote into bucket `out`, the reference a cluster's output is
/// compared with byte for byte.
pub fn reshard_reference(root: &Path, spec: &str, out: &str) -> (PathBuf, std::collections::BTreeMap<String, Vec<u8>>) {
    let spec_path = root.join("spec.json");
    std::fs::write(&spec_path, spec).expect("write the spec");
    dsort_json(&["reshard", "--spec", spec_path.to_str().unwrap(), "--root", root.to_str().unwrap(), "--json"]);
    (spec_path, read_files(&root.join(out)))
}

/// The sum of every sample of Prometheus series `name` (any labels) in `text`; `None` if there is none.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let value = if rest.starts_with('{') { rest.rsplit_once('}').map(|(_, v)| v) } else { Some(rest) };
        if let Some(v) = value.filter(|v| v.starts_with(' ')).and_then(|v| v.trim().parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// sha256 of a file, as lower-case hex, computed by `sha256sum` (coreutils), independently of dsort.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("sha256sum output").to_string()
}

/// One archive member as read by Python's `tarfile`/`zipfile`: name, size, sha256 of its bytes, and its
/// text when it is small (labels such as `.cls`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PyEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub text: Option<String>,
}

/// The independent reader: Python's `tarfile`/`zipfile` (zstd/lz4 through the `zstandard`/`lz4` modules
/// when importable, else through the `zstd`/`lz4` command-line tools). Returns, per path, its members in
/// archive order, or `None` for a path no available reader can open (the caller prints a note and skips).
const PY_READER: &str = r#"
import hashlib, io, json, shutil, subprocess, sys, tarfile, zipfile

def tar_bytes(path, module, attr, tool):
    try:
        mod = __import__(module, fromlist=[attr])
        with open(path, "rb") as f:
            if module == "zstandard":
                r = mod.ZstdDecompressor().stream_reader(f)
            else:
                r = mod.open(f)
            return b"".join(iter(lambda: r.read(1 << 20), b""))
    except ImportError:
        pass
    if shutil.which(tool):
        return subprocess.run([tool, "-dcq", path], check=True, capture_output=True).stdout
    return None

def entry(name, data):
    text = data.decode("utf-8", "replace") if len(data) <= 64 else None
    return [name, len(data), hashlib.sha256(data).hexdigest(), text]

out = {}
for path in sys.argv[1:]:
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            out[path] = [entry(i.filename, z.read(i)) for i in z.infolist() if not i.is_dir()]
        continue
    if path.endswith(".tar.zst"):
        data = tar_bytes(path, "zstandard", "ZstdDecompressor", "zstd")
    elif path.endswith(".tar.lz4"):
        data = tar_bytes(path, "lz4.frame", "open", "lz4")
    else:
        data = open(path, "rb").read()  # tarfile detects gzip itself
    if data is None:
        out[path] = None
        continue
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
        out[path] = [entry(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
json.dump(out, sys.stdout)
"#;

/// Read archives with the independent Python reader (see [`PY_READER`]); `None` when Python is missing.
pub fn py_read(paths: &[PathBuf]) -> Option<std::collections::BTreeMap<PathBuf, Option<Vec<PyEntry>>>> {
    if !have("python3") {
        eprintln!("note: python3 not found: skipping the independent reader");
        return None;
    }
    let out = Command::new("python3").arg("-c").arg(PY_READER).args(paths).output().expect("run python3");
    assert!(out.status.success(), "python reader failed on {paths:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("python reader JSON");
    let mut res = std::collections::BTreeMap::new();
    for p in paths {
        let key = p.display().to_string();
        let entries = v[&key].as_array().map(|a| {
            a.iter()
                .map(|e| PyEntry {
                    name: e[0].as_str().expect("name").to_string(),
                    size: e[1].as_u64().expect("size"),
                    sha256: e[2].as_str().expect("sha256").to_string(),
                    text: e[3].as_str().map(String::from),
                })
                .collect()
        });
        if entries.is_none() {
            eprintln!("note: no zstd/lz4 reader available to Python: {} not checked independently", p.display());
        }
        res.insert(p.clone(), entries);
    }
    Some(res)
}

// ---------------------------------------------------------------------------------------------------------
// A cluster of real processes on loopback ports, for end-to-end tests of the cluster.

/// Environment variables of `dsort` that a test cluster sets itself (cleared from children so the
/// caller's environment cannot leak in).
const DSORT_ENV: [&str; 18] = [
    "DSORT_STALL_TIMEOUT",
    "DSORT_COORDINATOR_LEASE",
    "DSORT_CLUSTER_SECRET",
    "DSORT_ALLOW_UNAUTHENTICATED",
    "DSORT_TEST_HOLD",
    "DSORT_TEST_HOLD_RELEASE",
    "DSORT_SHUTDOWN_GRACE",
    "DSORT_LISTEN",
    "DSORT_COORDINATOR",
    "DSORT_MOUNTPATHS",
    "DSORT_TARGET_ID",
    "DSORT_TMP_DIR",
    "DSORT_MAX_MEM",
    "DSORT_TOKEN",
    "DSORT_URL",
    "DSORT_ADVERTISE_URL",
    "DSORT_MEMORY_LIMIT",
    "DSORT_REBALANCE",
];

/// The client token of a [`Cluster`] unless the builder says otherwise.
pub const CLIENT_TOKEN: &str = "test-client-token";
/// The cluster secret of a [`Cluster`] unless the builder says otherwise.
pub const CLUSTER_SECRET: &str = "test-cluster-secret";

/// How long a process may take to print its address or the cluster to become healthy.
pub const CLUSTER_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    targets: usize,
    mountpaths: usize,
    token: Option<String>,
    cluster_secret: Option<String>,
    via_env: bool,
    target_env: Vec<(usize, &'static str, String)>,
    coordinator_args: Vec<String>,
    env_all: Vec<(&'static str, String)>,
    listen_host: String,
    target_net: Vec<(usize, Vec<String>, String)>,
}

impl ClusterBuilder {
    /// The address every process listens on and is reached at (default `127.0.0.1`; e.g. the host end of a
    /// veth pair, so that a target in a network namespace reaches the others).
    pub fn listen_host(mut self, host: &str) -> Self {
        self.listen_host = host.to_string();
        self
    }

    /// Run target `i` as `PREFIX... dsort serve target ...` (e.g. `ip netns exec NS`), listening on `host`.
    pub fn target_wrapper(mut self, i: usize, prefix: &[&str], host: &str) -> Self {
        self.target_net.push((i, prefix.iter().map(|a| a.to_string()).collect(), host.to_string()));
        self
    }

    /// An extra environment variable for every process of the cluster (e.g. S3 settings).
    pub fn env_all(mut self, key: &'static str, value: &str) -> Self {
        self.env_all.push((key, value.to_string()));
        self
    }

    /// Extra flags for the coordinator (e.g. `--ekm-allow-host 127.0.0.1`).
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// An extra environment variable for target `i`'s process (e.g. the `DSORT_TEST_HOLD` failpoint).
    pub fn target_env(mut self, i: usize, key: &'static str, value: &str) -> Self {
        self.target_env.push((i, key, value.to_string()));
        self
    }

    /// Number of targets (default 3).
    pub fn targets(mut self, n: usize) -> Self {
        self.targets = n;
        self
    }

    /// Mountpaths per target (default 2).
    pub fn mountpaths(mut self, n: usize) -> Self {
        self.mountpaths = n;
        self
    }

    /// The client token of every process (and of [`Cluster::dsort`] / [`Cluster::request`]); default:
    /// [`CLIENT_TOKEN`].
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// The cluster secret of every process (and of [`Cluster::request`] on cluster routes); default:
    /// [`CLUSTER_SECRET`].
    pub fn cluster_secret(mut self, secret: &str) -> Self {
        self.cluster_secret = Some(secret.to_string());
        self
    }

    /// Neither a client token nor a cluster secret (every route open, as on a loopback test bench).
    pub fn open(mut self) -> Self {
        self.token = None;
        self.cluster_secret = None;
        self
    }

    /// Configure the targets through `DSORT_*` environment variables instead of flags (mountpaths as one
    /// colon-separated `DSORT_MOUNTPATHS`).
    pub fn via_env(mut self, yes: bool) -> Self {
        self.via_env = yes;
        self
    }

    /// Start the coordinator and the targets and wait until every target is `up`.
    pub fn start(self) -> Cluster {
        let root = tempfile::Builder::new().prefix("dsort-cluster-").tempdir().expect("temp dir");
        let listen = format!("{}:0", self.listen_host);
        let mut args = vec!["serve".to_string(), "coordinator".into(), "--listen".into(), listen.clone()];
        if let Some(t) = &self.token {
            args.extend(["--token".to_string(), t.clone()]);
        }
        if let Some(s) = &self.cluster_secret {
            args.extend(["--cluster-secret".to_string(), s.clone()]);
        }
        args.extend(self.coordinator_args.iter().cloned());
        let log = root.path().join("coordinator.log");
        let (child, url) = spawn_server(&[], &args, &self.env_all, &log);
        // A restart listens where this one does.
        let at = url.trim_start_matches("http://").to_string();
        let coordinator_cmd =
            (args.iter().map(|a| if *a == listen { at.clone() } else { a.clone() }).collect(), self.env_all.clone());
        let http = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("http client");
        let mut cluster = Cluster {
            url,
            token: self.token.clone(),
            cluster_secret: self.cluster_secret.clone(),
            coordinator: Some(child),
            coordinator_log: log,
            coordinator_cmd,
            restarts: 0,
            targets: Vec::new(),
            via_env: self.via_env,
            target_env: (0..self.targets)
                .flat_map(|i| self.env_all.iter().map(move |(k, v)| (i, *k, v.clone())))
                .chain(self.target_env.iter().cloned())
                .collect(),
            http,
            root,
            listen_host: self.listen_host.clone(),
            target_net: self.target_net.clone(),
        };
        for i in 0..self.targets {
            let mountpaths = (0..self.mountpaths)
                .map(|m| cluster.root.path().join(format!("t{i}")).join(format!("mp{m}")))
                .collect();
            let log = cluster.root.path().join(format!("target-{i}.log"));
            cluster.targets.push(TargetProc { child: None, mountpaths, url: String::new(), id: String::new(), log });
            cluster.start_target(i);
        }
        cluster.wait_healthy(self.targets);
        cluster
    }
}

/// One target process of a [`Cluster`].
#[derive(Debug)]
pub struct TargetProc {
    child: Option<std::process::Child>,
    /// Its mountpaths (folders in the cluster's temp dir; created by the target).
    pub mountpaths: Vec<PathBuf>,
    /// Its base URL (changes on restart: the port is picked anew).
    pub url: String,
    /// Its id (stable across restarts: kept in its first mountpath).
    pub id: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl TargetProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }
}

/// A coordinator and targets as real `dsort serve` processes on loopback ports, in a temp dir. Dropping it
/// kills every process (and prints their logs when the test is failing).
#[derive(Debug)]
pub struct Cluster {
    /// The coordinator's base URL.
    pub url: String,
    pub token: Option<String>,
    pub cluster_secret: Option<String>,
    pub targets: Vec<TargetProc>,
    coordinator: Option<std::process::Child>,
    coordinator_log: PathBuf,
    /// The coordinator's arguments (its address fixed) and environment, for a restart.
    coordinator_cmd: (Vec<String>, Vec<(&'static str, String)>),
    restarts: usize,
    via_env: bool,
    target_env: Vec<(usize, &'static str, String)>,
    http: reqwest::blocking::Client,
    root: tempfile::TempDir,
    listen_host: String,
    target_net: Vec<(usize, Vec<String>, String)>,
}

/// Start `[PREFIX...] dsort ARGS` with stdout piped and stderr to `log`; return it and the URL it printed on
/// its first line (`listening on URL`). A prefix must exec the command (as `ip netns exec` does), so that the
/// child is the `dsort` process itself.
fn spawn_server(
    prefix: &[String],
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut cmd = Command::new(program);
            cmd.args(rest).arg(dsort_bin());
            cmd
        }
        None => Command::new(dsort_bin()),
    };
    for v in DSORT_ENV {
        cmd.env_remove(v);
    }
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"));
    let mut child = cmd.spawn().expect("spawn dsort serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stdout);
        let mut first = String::new();
        let _ = r.read_line(&mut first);
        let _ = tx.send(first);
        // Keep draining so the process never writes into a closed pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    let line: String = rx.recv_timeout(CLUSTER_START_TIMEOUT).unwrap_or_default();
    let Some(url) = line.trim().strip_prefix("listening on ").map(String::from) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "dsort {args:?} did not print its address (got {line:?}); its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    };
    (child, url)
}

impl Cluster {
    /// A coordinator and `n` targets with 2 mountpaths each, the test client token and cluster secret.
    pub fn start(n_targets: usize) -> Cluster {
        Cluster::builder().targets(n_targets).start()
    }

    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            targets: 3,
            mountpaths: 2,
            token: Some(CLIENT_TOKEN.into()),
            cluster_secret: Some(CLUSTER_SECRET.into()),
            via_env: false,
            target_env: Vec::new(),
            coordinator_args: Vec::new(),
            env_all: Vec::new(),
            listen_host: "127.0.0.1".into(),
            target_net: Vec::new(),
        }
    }

    /// The cluster's temp dir (put test data here: it is removed with the cluster).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Start (or restart, with the same mountpaths) target `i`; waits until it serves, not until the
    /// coordinator sees it (see [`Cluster::wait_healthy`] / [`Cluster::wait_until`]).
    pub fn start_target(&mut self, i: usize) {
        assert!(self.targets[i].child.is_none(), "target {i} is running");
        let t = &self.targets[i];
        let mut args = vec!["serve".to_string(), "target".into()];
        let mut env: Vec<(&str, String)> =
            self.target_env.iter().filter(|(t, _, _)| *t == i).map(|(_, k, v)| (*k, v.clone())).collect();
        let (prefix, host) = match self.target_net.iter().find(|(t, _, _)| *t == i) {
            Some((_, prefix, host)) => (prefix.clone(), host.clone()),
            None => (Vec::new(), self.listen_host.clone()),
        };
        let listen = format!("{host}:0");
        if self.via_env {
            env.push(("DSORT_LISTEN", listen));
            env.push(("DSORT_COORDINATOR", self.url.clone()));
            let mps: Vec<String> = t.mountpaths.iter().map(|p| p.display().to_string()).collect();
            env.push(("DSORT_MOUNTPATHS", mps.join(":")));
            if let Some(tok) = &self.token {
                env.push(("DSORT_TOKEN", tok.clone()));
            }
            if let Some(s) = &self.cluster_secret {
                env.push(("DSORT_CLUSTER_SECRET", s.clone()));
            }
        } else {
            args.extend(["--listen".to_string(), listen, "--coordinator".into(), self.url.clone()]);
            for mp in &t.mountpaths {
                args.extend(["--mountpath".to_string(), mp.display().to_string()]);
            }
            if let Some(tok) = &self.token {
                args.extend(["--token".to_string(), tok.clone()]);
            }
            if let Some(s) = &self.cluster_secret {
                args.extend(["--cluster-secret".to_string(), s.clone()]);
            }
        }
        let (child, url) = spawn_server(&prefix, &args, &env, &t.log);
        let health = self.get_json(&format!("{url}/v1/health"));
        let t = &mut self.targets[i];
        t.child = Some(child);
        t.url = url;
        t.id = health["id"].as_str().expect("target health has an id").to_string();
    }

    /// Start one more target (index `targets.len()`, with `mountpaths` mountpaths and the environment the
    /// builder gave that index) and wait until the coordinator sees every running target up; its index.
    pub fn add_target(&mut self, mountpaths: usize) -> usize {
        let i = self.targets.len();
        let mountpaths =
            (0..mountpaths).map(|m| self.root.path().join(format!("t{i}")).join(format!("mp{m}"))).collect();
        let log = self.root.path().join(format!("target-{i}.log"));
        self.targets.push(TargetProc { child: None, mountpaths, url: String::new(), id: String::new(), log });
        self.start_target(i);
        let running = self.targets.iter().filter(|t| t.child.is_some()).count();
        self.wait_healthy(running);
        i
    }

    /// Wait until the rebalance settled on the current membership: no pass due or running, and the last one
    /// done for the current membership generation over every healthy target. Returns the health.
    pub fn wait_rebalanced(&self, timeout: std::time::Duration) -> serde_json::Value {
        self.wait_until("rebalance done", timeout, |h| {
            let r = &h["rebalance"];
            r["state"] == "done"
                && r["pending"] == false
                && r["pass_generation"] == r["membership_generation"]
                && r["targets"] == h["healthy_targets"]
        })
    }

    /// Wait (up to 60 s) until target `i`'s log contains `line` (e.g. a failpoint saying it holds).
    pub fn wait_log(&self, i: usize, line: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::fs::read_to_string(&self.targets[i].log).unwrap_or_default().contains(line) {
            assert!(std::time::Instant::now() < deadline, "target {i} never logged {line:?}:\n{}", self.logs());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Drop the extra environment of every target (from the next start on).
    pub fn clear_target_env(&mut self) {
        self.target_env.clear();
    }

    /// SIGSTOP (`pause: true`) or SIGCONT target `i`: a process that stops answering without dying.
    pub fn signal_pause(&self, i: usize, pause: bool) {
        if let Some(c) = &self.targets[i].child {
            let sig = if pause { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILL target `i` and reap it.
    pub fn kill_target(&mut self, i: usize) {
        if let Some(mut c) = self.targets[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM target `i` (graceful shutdown) and wait for it to exit; returns whether it exited 0.
    pub fn stop_target(&mut self, i: usize) -> bool {
        self.terminate_target(i);
        self.wait_target_exit(i, std::time::Duration::from_secs(15)).unwrap_or(false)
    }

    /// SIGTERM target `i` without waiting (it drains: see [`Cluster::wait_target_exit`]).
    pub fn terminate_target(&self, i: usize) {
        if let Some(c) = &self.targets[i].child {
            sigterm(c);
        }
    }

    /// Wait up to `timeout` for target `i` to exit: `Some(exited 0)`, or `None` (then it is killed).
    pub fn wait_target_exit(&mut self, i: usize, timeout: std::time::Duration) -> Option<bool> {
        let c = self.targets[i].child.take()?;
        wait_exit(c, timeout)
    }

    /// Start the coordinator again (after [`Cluster::kill_coordinator`]), on the same address and with the same
    /// arguments; it logs to a new file ([`Cluster::coordinator_log`]). Waits until it serves, not for targets.
    pub fn restart_coordinator(&mut self) {
        assert!(self.coordinator.is_none(), "the coordinator is running");
        self.restarts += 1;
        let log = self.root.path().join(format!("coordinator-{}.log", self.restarts));
        let (args, env) = &self.coordinator_cmd;
        let (child, url) = spawn_server(&[], args, env, &log);
        assert_eq!(url, self.url, "the restarted coordinator listens where the first did");
        self.coordinator = Some(child);
        self.coordinator_log = log;
    }

    /// The current coordinator's stderr.
    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(&self.coordinator_log).unwrap_or_default()
    }

    /// SIGKILL the coordinator and reap it.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the coordinator without waiting (it drains: see [`Cluster::wait_coordinator_exit`]).
    pub fn terminate_coordinator(&self) {
        if let Some(c) = &self.coordinator {
            sigterm(c);
        }
    }

    /// Wait up to `timeout` for the coordinator to exit: `Some(exited 0)`, or `None` (then it is killed).
    pub fn wait_coordinator_exit(&mut self, timeout: std::time::Duration) -> Option<bool> {
        let c = self.coordinator.take()?;
        wait_exit(c, timeout)
    }

    /// `METHOD URL` with the credential its route needs (when `with_credential`): the cluster secret on a
    /// target's routes and on the coordinator's `/v1/cluster/...` (else the client token); status and body.
    pub fn request(&self, method: &str, url: &str, with_credential: bool) -> (u16, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self.http.request(m, url);
        if with_credential && let Some(c) = self.credential_for(url) {
            rb = rb.bearer_auth(c);
        }
        let r = rb.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = r.status().as_u16();
        (status, r.text().unwrap_or_default())
    }

    /// The credential a request to `url` needs (see [`Cluster::request`]).
    pub fn credential_for(&self, url: &str) -> Option<&str> {
        let internal = url.starts_with(&format!("{}/v1/cluster/", self.url))
            || self.targets.iter().any(|t| !t.url.is_empty() && url.starts_with(&format!("{}/", t.url)));
        let cluster = self.cluster_secret.as_deref().or(self.token.as_deref());
        if internal { cluster } else { self.token.as_deref() }
    }

    /// `GET URL` (with its credential) that must answer 200 with JSON.
    pub fn get_json(&self, url: &str) -> serde_json::Value {
        let (status, body) = self.request("GET", url, true);
        assert_eq!(status, 200, "GET {url}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
    }

    /// `GET URL` (with its credential) answering 200 with JSON, or why not (a connection error, another status,
    /// not JSON): for callers that must survive a coordinator being down, unlike [`Cluster::get_json`].
    pub fn try_get_json(&self, url: &str) -> Result<serde_json::Value, String> {
        let mut rb = self.http.get(url);
        if let Some(c) = self.credential_for(url) {
            rb = rb.bearer_auth(c);
        }
        let r = rb.send().map_err(|e| format!("GET {url}: {e}"))?;
        let status = r.status().as_u16();
        let body = r.text().unwrap_or_default();
        if status != 200 {
            return Err(format!("GET {url}: {status} {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("GET {url}: not JSON ({e}): {body}"))
    }

    /// Job `id`'s per-target JobInfo map (`GET /v1/sort?uuid=ID`), or why it could not be read.
    pub fn job_infos(&self, id: &str) -> Result<serde_json::Value, String> {
        self.try_get_json(&format!("{}/v1/sort?uuid={id}", self.url))
    }

    /// Wait up to `timeout` until every running target is up in the coordinator's health (which may be
    /// restarting meanwhile) at its current address in the cluster map (a restarted target is readmitted once
    /// its previous process is found down); `Err` with the last health or error when it is not.
    pub fn try_wait_healthy(&self, timeout: std::time::Duration) -> Result<(), String> {
        self.try_wait_stable(std::time::Duration::ZERO, timeout)
    }

    /// Like [`Cluster::try_wait_healthy`], but the condition must hold, polled without a break, for `window`
    /// (e.g. longer than the coordinator's 3 s down threshold: a target whose link just came back may still
    /// be found silent by it, its heartbeats stuck in TCP retransmission).
    pub fn try_wait_stable(&self, window: std::time::Duration, timeout: std::time::Duration) -> Result<(), String> {
        let running: Vec<&TargetProc> = self.targets.iter().filter(|t| t.child.is_some()).collect();
        let deadline = std::time::Instant::now() + timeout;
        let current = |map: &serde_json::Value| {
            running.iter().all(|t| {
                map.as_array().is_some_and(|a| a.iter().any(|m| m["id"] == t.id.as_str() && m["url"] == t.url.as_str()))
            })
        };
        let mut since: Option<std::time::Instant> = None;
        loop {
            let health = self.try_get_json(&format!("{}/v1/health", self.url));
            let map = self.try_get_json(&format!("{}/v1/cluster/targets", self.url));
            let last = match (health, map) {
                (Ok(h), Ok(m))
                    if h["healthy_targets"].as_u64() == Some(running.len() as u64)
                        && running.iter().all(|t| h["targets"][&t.id] == "up")
                        && current(&m) =>
                {
                    let t0 = *since.get_or_insert_with(std::time::Instant::now);
                    if t0.elapsed() >= window {
                        return Ok(());
                    }
                    String::from("up, not yet for the whole window")
                }
                (Ok(h), Ok(m)) => {
                    since = None;
                    format!("health {h}, map {m}")
                }
                (Err(e), _) | (_, Err(e)) => {
                    since = None;
                    e
                }
            };
            if std::time::Instant::now() >= deadline {
                return Err(format!("{} targets not up for {window:?} within {timeout:?}: {last}", running.len()));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Whether the coordinator process runs (it is not between [`Cluster::kill_coordinator`] and
    /// [`Cluster::restart_coordinator`]).
    pub fn coordinator_running(&self) -> bool {
        self.coordinator.is_some()
    }

    /// What jobs leave on the targets' disks while they run and must not leave once they ended: job temp
    /// folders (`<tmp dir>/jobs/*`, by default under the first mountpath's `.dsort/tmp`), staging folders
    /// (`<mountpath>/.dsort/staging/*`), commit plans (`<first mountpath>/.dsort/plans/*`) and temporary objects
    /// (`.dsort-tmp-*` anywhere in the buckets). Paths, sorted.
    pub fn temp_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for t in &self.targets {
            for (m, mp) in t.mountpaths.iter().enumerate() {
                let system = mp.join(".dsort");
                let mut dirs = vec![system.join("staging")];
                if m == 0 {
                    dirs.extend([system.join("tmp").join("jobs"), system.join("plans")]);
                }
                for d in dirs {
                    out.extend(list_dir(&d).into_iter().map(|n| d.join(n)));
                }
                for f in files_under(mp) {
                    let tmp = f.iter().any(|c| c.to_string_lossy().starts_with(shardio::bucket::TMP_PREFIX));
                    if tmp {
                        out.push(mp.join(f));
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Copy every log of the cluster (coordinator, restarted coordinators, targets) into `dir` (created).
    pub fn save_logs(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for name in list_dir(self.root()) {
            if name.ends_with(".log") {
                std::fs::copy(self.root().join(&name), dir.join(&name))?;
            }
        }
        Ok(())
    }

    /// The coordinator's `/v1/health`.
    pub fn health(&self) -> serde_json::Value {
        self.get_json(&format!("{}/v1/health", self.url))
    }

    /// The coordinator's cluster map (`/v1/cluster/targets`).
    pub fn cluster_map(&self) -> Vec<serde_json::Value> {
        self.get_json(&format!("{}/v1/cluster/targets", self.url)).as_array().expect("array").clone()
    }

    /// Poll the coordinator's health (every 50 ms) until `ok` holds; panics after `timeout`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: std::time::Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let h = self.health();
            if ok(&h) {
                return h;
            }
            assert!(std::time::Instant::now() < deadline, "cluster: {what} not reached in {timeout:?}; health: {h}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Wait until `n` targets are up, the running ones among them.
    pub fn wait_healthy(&self, n: usize) {
        let ids: Vec<String> = self.targets.iter().filter(|t| t.child.is_some()).map(|t| t.id.clone()).collect();
        self.wait_until(&format!("{n} healthy targets"), CLUSTER_START_TIMEOUT, |h| {
            h["healthy_targets"].as_u64() == Some(n as u64) && ids.iter().all(|id| h["targets"][id] == "up")
        });
    }

    /// The state (`up`/`down`) of target `i` in the coordinator's health.
    pub fn target_state(&self, i: usize) -> String {
        self.health()["targets"][&self.targets[i].id].as_str().unwrap_or("unknown").to_string()
    }

    /// A `dsort` command pointed at this cluster (`DSORT_URL`, and `DSORT_TOKEN` when it has a token).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(dsort_bin());
        for v in DSORT_ENV {
            cmd.env_remove(v);
        }
        cmd.args(args).env("DSORT_URL", &self.url);
        if let Some(t) = &self.token {
            cmd.env("DSORT_TOKEN", t);
        }
        cmd
    }

    /// Run `dsort ARGS` against this cluster.
    pub fn dsort(&self, args: &[&str]) -> Run {
        self.command(args).output().expect("run dsort").into()
    }

    /// Run `dsort ARGS` against this cluster and insist that it succeeds; returns stdout.
    pub fn dsort_ok(&self, args: &[&str]) -> String {
        let r = self.dsort(args);
        assert!(r.ok, "dsort {args:?} failed:\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
        r.stdout
    }

    /// Start a job from the spec text `spec` (`dsort start`, the spec in a file of the cluster's temp dir);
    /// its id.
    pub fn start_job(&self, spec: &str) -> String {
        let path = self.root().join(format!("spec-{}.json", xxhash_rust::xxh3::xxh3_64(spec.as_bytes())));
        std::fs::write(&path, spec).expect("write the spec");
        self.dsort_ok(&["start", path.to_str().expect("UTF-8 path")]).trim().to_string()
    }

    /// A small job on the cluster's buckets `small` → `out` (loads 4 shards of 10 records the first time); its
    /// spec file.
    pub fn small_job(&self, out: &str) -> PathBuf {
        let src = self.root().join("small");
        if !src.exists() {
            gen_shards(&format!("{}/shard-{{0..3}}.tar", src.display()), 10, "1KiB", ".jpg,.cls", 8);
            self.dsort_ok(&["put", src.to_str().expect("UTF-8 path"), "ais://small/"]);
        }
        let spec = format!(
            r#"{{"input_bck":{{"name":"small"}},"input_format":{{"template":"shard-{{0..3}}.tar"}},
            "output_bck":{{"name":"{out}"}},"output_format":"o-{{0..99}}.tar","output_shard_size":"8KiB"}}"#
        );
        let path = self.root().join(format!("small-{out}.json"));
        std::fs::write(&path, spec).expect("write the spec");
        path
    }

    /// The object names of `ais://BUCKET` as `dsort ls` lists them (sorted by name).
    pub fn object_names(&self, bucket: &str) -> Vec<String> {
        let listed = self.dsort_ok(&["ls", &format!("ais://{bucket}")]);
        listed.lines().filter_map(|l| l.split('\t').next()).map(str::to_string).collect()
    }

    /// `dsort get` each of `names` of `ais://BUCKET` into the folder `dir` (created), under its own name.
    pub fn get_objects<S: AsRef<str>>(&self, bucket: &str, names: impl IntoIterator<Item = S>, dir: &Path) {
        std::fs::create_dir_all(dir).expect("create the download folder");
        for name in names {
            let name = name.as_ref();
            self.dsort_ok(&["get", &format!("ais://{bucket}/{name}"), dir.join(name).to_str().expect("UTF-8 path")]);
        }
    }

    fn logs(&self) -> String {
        let mut s =
            format!("--- coordinator log:\n{}", std::fs::read_to_string(&self.coordinator_log).unwrap_or_default());
        for (i, t) in self.targets.iter().enumerate() {
            s.push_str(&format!(
                "--- target {i} ({}) log:\n{}",
                t.id,
                std::fs::read_to_string(&t.log).unwrap_or_default()
            ));
        }
        s
    }
}

fn sigterm(c: &std::process::Child) {
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (we hold its Child).
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// Wait for `c` to exit: `Some(success)`, or `None` after `timeout` (it is then killed).
fn wait_exit(mut c: std::process::Child, timeout: std::time::Duration) -> Option<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = c.try_wait() {
            return Some(status.success());
        }
        if std::time::Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children = self.targets.iter_mut().filter_map(|t| t.child.take()).chain(self.coordinator.take());
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Every regular file under `root` (relative paths), skipping dsort's own `.dsort` folder.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name() == ".dsort" {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Check that every object of `bucket` sits exactly where placement says (owner target by HRW over the cluster map's
/// ids, mountpath by HRW over the target's reported mountpaths) and nowhere else.
/// With `spread`, also insist that every target and every mountpath holds some object (use enough objects:
/// target ids are random, so the spread is only overwhelmingly likely).
pub fn assert_placement(
    c: &Cluster,
    bucket: &str,
    objects: &std::collections::BTreeMap<String, Vec<u8>>,
    spread: bool,
) -> std::collections::BTreeMap<String, usize> {
    let map = c.cluster_map();
    let ids: Vec<String> = map.iter().map(|t| t["id"].as_str().unwrap().to_string()).collect();
    let mountpaths: std::collections::BTreeMap<String, Vec<String>> = map
        .iter()
        .map(|t| {
            let mps = t["mountpaths"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
            (t["id"].as_str().unwrap().to_string(), mps)
        })
        .collect();
    let mut per_target: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut per_mountpath: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut expected_files: Vec<PathBuf> = Vec::new();
    for (name, data) in objects {
        let owner = coordinator::placement::owner_target(bucket, name, &ids).unwrap();
        let mps = &mountpaths[owner];
        let mp = &mps[coordinator::placement::mountpath_index(bucket, name, mps).unwrap()];
        let path = Path::new(mp).join(bucket).join(name);
        assert_eq!(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())), *data, "{name}");
        *per_target.entry(owner.clone()).or_default() += 1;
        *per_mountpath.entry(mp.clone()).or_default() += 1;
        expected_files.push(path);
    }
    // Nothing else of the bucket on any mountpath (no stray copy, no temp file).
    let mut all: Vec<PathBuf> = Vec::new();
    for mps in mountpaths.values() {
        for mp in mps {
            let dir = Path::new(mp).join(bucket);
            all.extend(files_under(&dir).into_iter().map(|f| dir.join(f)));
        }
    }
    all.sort();
    expected_files.sort();
    assert_eq!(all, expected_files, "the mountpaths hold exactly the objects, each once");
    if spread {
        assert_eq!(per_target.len(), ids.len(), "objects on every target: {per_target:?}");
        let n_mps: usize = mountpaths.values().map(Vec::len).sum();
        assert_eq!(per_mountpath.len(), n_mps, "objects on every mountpath: {per_mountpath:?}");
    }
    per_target
}
