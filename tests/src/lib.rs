//! Shared helpers for the end-to-end tests: find the built `dsort` binary, run it, make temp folders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `dsort` binary of this build: `$DSORT_BIN`, else `target/<profile>/dsort` next to the test binary
/// (cargo builds it because `dsort-coordinator` has integration tests of its own).
pub fn dsort_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DSORT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/dsort
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile> folder");
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
