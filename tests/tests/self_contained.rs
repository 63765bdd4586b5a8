//! The repository stands on its own: no tracked file points outside it. A fresh clone in an empty folder
//! must pass the README's commands, so every fixture a test reads and every document the project cites
//! lives in the repository (`.ci/run` also clones the repository into an empty folder and runs the fixture
//! tests there).
//!
//! Two checks over `git ls-files` (tracked files and new ones git does not ignore):
//! - no file names the reference shelf the project grew up beside (its test data, design notes);
//! - no relative path (`../...`) climbs above the repository root from where it is read: a Rust file's
//!   paths are read from its package (cargo's working folder and `CARGO_MANIFEST_DIR`), other files' from
//!   their own folder; Markdown may also show a snippet meant for a sub-folder, so a Markdown path passes
//!   when it names an existing file or folder of the repository from some folder under the document.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests package is a folder of the repository").into()
}

/// The files of the checkout (relative paths): tracked ones and new ones git does not ignore; None when
/// this is not a git checkout (a source tarball).
fn tracked_files(root: &Path) -> Option<Vec<String>> {
    let args = ["ls-files", "-z", "--cached", "--others", "--exclude-standard"];
    let out = Command::new("git").arg("-C").arg(root).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).expect("tracked paths are UTF-8");
    Some(text.split('\0').filter(|p| !p.is_empty()).map(str::to_string).collect())
}

/// Text that points at the shelf outside the repository. Built from parts so that this file does not
/// match itself.
fn forbidden() -> Vec<String> {
    let shelf = "shared";
    vec![
        format!("../{shelf}"),
        format!("{shelf}/testdata"),
        format!("{shelf}/design"),
        format!("{shelf}/reference"),
        format!("/work/{shelf}"),
    ]
}

/// Every relative path in `line` that starts with `../` at a word boundary: (number of `..` segments, the
/// rest of the path).
fn climbing_paths(line: &str) -> Vec<(usize, String)> {
    let bytes = line.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i + 3 <= bytes.len() {
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || b"_./-\\".contains(&bytes[i - 1]));
        if boundary && bytes[i..].starts_with(b"../") {
            let mut ups = 0;
            let mut j = i;
            while bytes[j..].starts_with(b"../") {
                ups += 1;
                j += 3;
            }
            let rest: String =
                line[j..].chars().take_while(|c| c.is_ascii_alphanumeric() || "_./-".contains(*c)).collect();
            let rest = rest.trim_end_matches(['.', '/']).to_string();
            i = j + rest.len();
            found.push((ups, rest));
        } else {
            i += 1;
        }
    }
    found
}

/// The folder a file's relative paths are read from (a relative path of the repository, "" for the root).
fn base_of(file: &str, files: &BTreeSet<String>) -> String {
    let mut dir = parent(file);
    if file.ends_with(".rs") {
        // The nearest folder with a Cargo.toml: the package.
        let mut d = dir.clone();
        loop {
            let manifest = if d.is_empty() { "Cargo.toml".to_string() } else { format!("{d}/Cargo.toml") };
            if files.contains(&manifest) {
                dir = d;
                break;
            }
            if d.is_empty() {
                break;
            }
            d = parent(&d);
        }
    }
    dir
}

fn parent(path: &str) -> String {
    path.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default()
}

fn depth(dir: &str) -> usize {
    if dir.is_empty() { 0 } else { dir.split('/').count() }
}

/// `dir` climbed `ups` folders then joined with `rest`, if it stays inside the repository.
fn resolve(dir: &str, ups: usize, rest: &str) -> Option<String> {
    let mut parts: Vec<&str> = if dir.is_empty() { vec![] } else { dir.split('/').collect() };
    if ups > parts.len() {
        return None;
    }
    parts.truncate(parts.len() - ups);
    parts.extend(rest.split('/').filter(|s| !s.is_empty()));
    Some(parts.join("/"))
}

/// Every folder that holds a tracked file ("" for the root).
fn tracked_dirs(files: &BTreeSet<String>) -> BTreeSet<String> {
    let mut dirs = BTreeSet::from([String::new()]);
    for f in files {
        let mut d = parent(f);
        while !d.is_empty() && dirs.insert(d.clone()) {
            d = parent(&d);
        }
    }
    dirs
}

/// The problems of one file's text (empty when it points nowhere outside the repository).
fn problems(file: &str, text: &str, files: &BTreeSet<String>, dirs: &BTreeSet<String>) -> Vec<String> {
    let forbidden = forbidden();
    let base = base_of(file, files);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{file}:{}", n + 1);
        for f in &forbidden {
            if line.contains(f.as_str()) {
                out.push(format!("{at}: names `{f}`, outside the repository: {}", line.trim()));
            }
        }
        for (ups, rest) in climbing_paths(line) {
            if ups <= depth(&base) {
                continue;
            }
            let snippet_for_subfolder = file.ends_with(".md")
                && dirs.iter().filter(|d| base.is_empty() || **d == base || d.starts_with(&format!("{base}/"))).any(
                    |d| resolve(d, ups, &rest).is_some_and(|p| p.is_empty() || files.contains(&p) || dirs.contains(&p)),
                );
            if !snippet_for_subfolder {
                let shown = format!("{}{rest}", "../".repeat(ups));
                let from = if base.is_empty() { "." } else { &base };
                out.push(format!("{at}: `{shown}` climbs above the repository root from `{from}/`"));
            }
        }
    }
    out
}

#[test]
fn no_tracked_file_points_outside_the_repository() {
    let root = repo_root();
    let Some(listed) = tracked_files(&root) else {
        eprintln!("SKIP: {} is not a git checkout (nothing to list)", root.display());
        return;
    };
    let files: BTreeSet<String> = listed.into_iter().collect();
    let dirs = tracked_dirs(&files);
    let this_file = "tests/tests/self_contained.rs";
    assert!(files.contains(this_file), "the listing holds this test");
    let mut all = Vec::new();
    let mut read = 0;
    // This file's own examples (the checker's test below) are the only paths it lets pass unread.
    for file in files.iter().filter(|f| *f != this_file) {
        // A file deleted in the worktree but still tracked is not read; binaries are not text.
        let Ok(bytes) = std::fs::read(root.join(file)) else { continue };
        let Ok(text) = String::from_utf8(bytes) else { continue };
        if text.contains('\0') {
            continue;
        }
        read += 1;
        all.extend(problems(file, &text, &files, &dirs));
    }
    assert!(read > 100, "read only {read} text files");
    assert!(all.is_empty(), "paths outside the repository:\n{}", all.join("\n"));
}

/// The checker itself: it flags what it must and passes what it must, on made-up files.
#[test]
fn the_checker_flags_paths_that_leave_and_passes_paths_that_stay() {
    let files: BTreeSet<String> = [
        "Cargo.toml",
        "README.md",
        "shardio/Cargo.toml",
        "shardio/tests/common/mod.rs",
        "fuzz/README.md",
        "deploy/README.md",
        "deploy/base/kustomization.yaml",
        "deploy/components/monitoring/kustomization.yaml",
        "deploy/overlays/x/kustomization.yaml",
        "tests/fixtures/webdataset/sample.tgz",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let dirs = tracked_dirs(&files);
    let check = |file: &str, text: &str| problems(file, text, &files, &dirs);
    let shelf = "shared";
    // The shelf, however it is reached.
    assert_eq!(check("README.md", &format!("See `../{shelf}/design.md`.")).len(), 3, "two names and a climb");
    assert_eq!(check("deploy/README.md", &format!("/work/{shelf}/testdata/x.tar")).len(), 2);
    // A Rust path is read from its package: two levels up from shardio/ leaves the repository, one stays.
    assert_eq!(check("shardio/tests/common/mod.rs", r#"join("../../elsewhere/x")"#).len(), 1);
    assert!(check("shardio/tests/common/mod.rs", r#"join("../tests/fixtures/webdataset")"#).is_empty());
    // Other files read paths from their own folder.
    assert!(check("deploy/overlays/x/kustomization.yaml", "resources:\n  - ../../base\n").is_empty());
    assert_eq!(check("deploy/base/kustomization.yaml", "  - ../../../base").len(), 1);
    assert_eq!(check("README.md", "cp ../x.tar .").len(), 1);
    // Markdown: a snippet for a sub-folder passes when it names something there, not otherwise.
    assert!(check("deploy/README.md", "`components: [../../components/monitoring]`").is_empty());
    assert_eq!(check("deploy/README.md", "`../../nothing/here`").len(), 1);
    assert!(check("fuzz/README.md", "cp ../tests/fixtures/webdataset/sample.tgz corpus/").is_empty());
    // Not paths: Rust ranges and rest patterns, `..` inside a word, a path after a name.
    assert!(check("shardio/tests/common/mod.rs", "let Foo { a, .. } = x; &v[..]; a..b; x/../../y").is_empty());
    assert_eq!(climbing_paths("a ../../b/c.md, (../d)"), [(2, "b/c.md".to_string()), (1, "d".to_string())]);
}
