//! The binary's surface: version, help on every verb, exit codes. (Its presence also makes cargo build
//! the `dsort` binary for the workspace's end-to-end tests.)

use std::process::Command;

fn dsort(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dsort")).args(args).output().expect("run dsort")
}

#[test]
fn version_and_help_on_every_verb() {
    let v = dsort(&["--version"]);
    assert!(v.status.success());
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), format!("dsort {}", env!("CARGO_PKG_VERSION")));
    for verb in ["inspect", "gen"] {
        let h = dsort(&[verb, "--help"]);
        assert!(h.status.success(), "{verb} --help failed");
        let text = String::from_utf8_lossy(&h.stdout);
        assert!(text.contains("Usage: dsort") && text.contains(verb), "{verb} --help: {text}");
    }
    let top = String::from_utf8_lossy(&dsort(&["--help"]).stdout).into_owned();
    assert!(top.contains("inspect") && top.contains("gen"));
}

#[test]
fn unknown_verb_and_missing_file_fail_with_a_message() {
    let r = dsort(&["frobnicate"]);
    assert!(!r.status.success());
    let r = dsort(&["inspect", "/nonexistent/x.tar"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("/nonexistent/x.tar") && err.contains("not found"), "{err}");
}
