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
