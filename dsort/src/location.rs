//! Shards named on the command line: one folder (the bucket) and object names inside it. `reshard` and
//! `verify` both resolve `--input`/`--output` here, so a record's unique name (`<object name>|<record
//! name>`) is the same in both tools.

use crate::template::{Template, TemplateError, TemplateKind};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("{arg}: {source}")]
    Template {
        arg: String,
        #[source]
        source: TemplateError,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A folder and object names (relative paths) inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSet {
    pub dir: PathBuf,
    pub names: Vec<String>,
}

impl ShardSet {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn has_template_syntax(s: &str) -> bool {
    s.contains('{') || s.contains('@') || s.contains('%')
}

/// Split `DIR/tpl` at the last `/` before the template's first range character.
pub fn split_template(arg: &str) -> (PathBuf, String) {
    let first = arg.find(['{', '@', '%']).unwrap_or(arg.len());
    match arg[..first].rfind('/') {
        Some(i) => (PathBuf::from(if i == 0 { "/" } else { &arg[..i] }), arg[i + 1..].to_string()),
        None => (PathBuf::from("."), arg.to_string()),
    }
}

/// Resolve `--input`: one template (`DIR/shard-{000..099}.tar`, expanded in order) or a list of files
/// (their common parent folder is the bucket; names are relative to it, in the order given).
pub fn input_set(args: &[String]) -> Result<ShardSet, LocationError> {
    if args.is_empty() {
        return Err(LocationError::Invalid("--input: no shards given".into()));
    }
    if args.len() == 1 && has_template_syntax(&args[0]) {
        let (dir, tpl) = split_template(&args[0]);
        let t = Template::parse(&tpl).map_err(|source| LocationError::Template { arg: args[0].clone(), source })?;
        let names = t.expand_input().map_err(|source| LocationError::Template { arg: args[0].clone(), source })?;
        return Ok(ShardSet { dir, names });
    }
    let paths: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
    let mut dir: PathBuf = paths[0].parent().map(Path::to_path_buf).unwrap_or_default();
    for p in &paths[1..] {
        while !p.starts_with(&dir) {
            if !dir.pop() {
                break;
            }
        }
    }
    let names = paths
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(&dir).unwrap_or(p);
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(LocationError::Invalid(format!("--input: {} is not below {}", p.display(), dir.display())));
            }
            rel.to_str()
                .map(str::to_string)
                .ok_or_else(|| LocationError::Invalid(format!("--input: {} is not valid UTF-8", p.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    Ok(ShardSet { dir, names })
}

/// Resolve `--output`: `DIR/out-{00000..99999}.tar` → (DIR, template). fmt templates (`out-%05d.tar`) are
/// allowed (unbounded); a name without range syntax is refused.
pub fn output_template(arg: &str) -> Result<(PathBuf, Template), LocationError> {
    let (dir, tpl) = split_template(arg);
    let t = Template::parse(&tpl).map_err(|source| LocationError::Template { arg: arg.to_string(), source })?;
    if t.kind() == TemplateKind::PrefixOnly {
        return Err(LocationError::Invalid(format!(
            "--output: {arg:?} has no range (expecting e.g. 'DIR/out-{{00000..99999}}.tar')"
        )));
    }
    Ok((dir, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_split_at_the_folder() {
        let s = input_set(&["data/in/shard-{0..2}.tar".to_string()]).unwrap();
        assert_eq!(s.dir, PathBuf::from("data/in"));
        assert_eq!(s.names, ["shard-0.tar", "shard-1.tar", "shard-2.tar"]);
        let (d, t) = output_template("/x/out-{000..009}.tgz").unwrap();
        assert_eq!(d, PathBuf::from("/x"));
        assert_eq!(t.to_string(), "out-{000..009}.tgz");
        assert!(output_template("/x/out.tar").is_err());
    }

    #[test]
    fn lists_use_their_common_folder() {
        let s = input_set(&["/d/a/x.tar".into(), "/d/b/y.tar".into(), "/d/a/z.tar".into()]).unwrap();
        assert_eq!(s.dir, PathBuf::from("/d"));
        assert_eq!(s.names, ["a/x.tar", "b/y.tar", "a/z.tar"]);
        let s = input_set(&["x.tar".into()]).unwrap();
        assert_eq!((s.dir, s.names), (PathBuf::from("."), vec!["x.tar".to_string()]));
    }
}
