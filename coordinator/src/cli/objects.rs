//! The object verbs, through the coordinator (users need not know which target holds what):
//! `dsort put LOCAL... ais://BUCKET/[PREFIX]`, `dsort get ais://BUCKET/OBJECT LOCAL`,
//! `dsort ls ais://BUCKET[/PREFIX]`.

use crate::cluster::api::ObjectEntry;
use crate::cluster::names::check_object;
use crate::cluster::{AisUri, Client};
use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to reach the cluster (shared by every client verb).
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// The coordinator's URL.
    #[arg(long, env = "DSORT_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token of the cluster.
    #[arg(long, env = "DSORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClusterArgs {
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.url, self.token.clone().filter(|t| !t.is_empty())).context("--url")
    }
}

/// A small runtime for one client verb (`main` stays synchronous).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

#[derive(Debug, clap::Args)]
pub struct PutArgs {
    /// Local files or folders (a folder uploads its files recursively, named by their path inside it),
    /// then the destination ais://BUCKET/[PREFIX]: each object is named PREFIX + the file's name, so end
    /// PREFIX with '/' to put the files in a virtual folder.
    #[arg(required = true, num_args = 2.., value_name = "LOCAL... ais://BUCKET/[PREFIX]")]
    pub paths: Vec<String>,
    /// Uploads at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print the result as JSON: {"objects":[{"bucket","name","size","target"}],"count","bytes","seconds"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The object, ais://BUCKET/OBJECT.
    pub object: String,
    /// Local file to write (atomically); an existing folder gets the object's base name; '-' is stdout.
    pub local: PathBuf,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print the result as JSON: {"bucket","name","size","path","target"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// ais://BUCKET[/PREFIX]: list the bucket's objects (name and size in bytes, tab-separated, one per
    /// line, sorted by name).
    pub bucket: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print the listing as JSON: [{"name","size"}] (jobs: [JobInfo]).
    #[arg(long)]
    pub json: bool,
    /// Without a bucket: only jobs whose description matches this regex.
    #[arg(long)]
    pub regex: Option<String>,
    /// Without a bucket: every job, not only running ones.
    #[arg(long)]
    pub all: bool,
}

/// One file to upload and the object name it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Upload {
    local: PathBuf,
    object: String,
}

/// The uploads of `locals` into PREFIX `prefix`: files by their name, folders recursively by their path
/// inside the folder (sorted). Object names are validated and must be distinct.
fn plan_uploads(locals: &[String], prefix: &str) -> anyhow::Result<Vec<Upload>> {
    let mut out: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut add = |object: String, local: PathBuf| -> anyhow::Result<()> {
        check_object(&object).with_context(|| format!("{}", local.display()))?;
        if let Some(prev) = out.insert(object.clone(), local.clone()) {
            bail!("{} and {} would both be stored as {object:?}", prev.display(), local.display());
        }
        Ok(())
    };
    for l in locals {
        let path = PathBuf::from(l);
        let meta = std::fs::metadata(&path).with_context(|| l.clone())?;
        if meta.is_file() {
            let name =
                path.file_name().and_then(|n| n.to_str()).with_context(|| format!("{l}: not a UTF-8 file name"))?;
            add(format!("{prefix}{name}"), path)?;
        } else if meta.is_dir() {
            for (rel, file) in walk_files(&path)? {
                add(format!("{prefix}{rel}"), file)?;
            }
        } else {
            bail!("{l}: neither a file nor a folder");
        }
    }
    Ok(out.into_iter().map(|(object, local)| Upload { local, object }).collect())
}

/// Regular files under `root` (symlinks to files followed, symlinked folders skipped), as
/// (relative path with '/', path), sorted.
fn walk_files(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let ent = ent.with_context(|| format!("{}", dir.display()))?;
            let path = ent.path();
            let ft = ent.file_type().with_context(|| format!("{}", path.display()))?;
            let is_file = if ft.is_symlink() { path.metadata().is_ok_and(|m| m.is_file()) } else { ft.is_file() };
            if ft.is_dir() {
                stack.push(path);
            } else if is_file {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
                let rel = parts.with_context(|| format!("{}: not a UTF-8 path", path.display()))?.join("/");
                out.push((rel, path));
            } else if ft.is_symlink() {
                eprintln!("dsort: note: skipping {} (a link to a folder or a broken link)", path.display());
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn put(args: PutArgs) -> anyhow::Result<()> {
    let Some((dest, locals)) = args.paths.split_last() else { bail!("put: give LOCAL... ais://BUCKET/[PREFIX]") };
    let dest = AisUri::parse(dest).context("put: destination")?;
    let uploads = plan_uploads(locals, &dest.rest).context("put")?;
    if uploads.is_empty() {
        bail!("put: no files to upload in {}", locals.join(", "));
    }
    let client = args.cluster.client()?;
    let start = Instant::now();
    let results = runtime()?.block_on(async {
        futures_util::stream::iter(uploads.iter().map(|u| {
            let (client, bucket) = (&client, dest.bucket.as_str());
            async move {
                client
                    .put_file(bucket, &u.object, &u.local)
                    .await
                    .with_context(|| format!("put {} -> ais://{bucket}/{}", u.local.display(), u.object))
            }
        }))
        .buffer_unordered(args.concurrency.max(1))
        .try_collect::<Vec<_>>()
        .await
    })?;
    let secs = start.elapsed().as_secs_f64();
    let bytes: u64 = results.iter().map(|r| r.size).sum();
    if args.json {
        let mut objects = results;
        objects.sort_by(|a, b| a.name.cmp(&b.name));
        let v = serde_json::json!({ "objects": objects, "count": objects.len(), "bytes": bytes, "seconds": secs });
        println!("{v}");
    } else {
        println!(
            "put {} object(s) into ais://{}, {} in {:.2}s ({:.1} MB/s)",
            results.len(),
            dest.bucket,
            dsort::format_size(bytes),
            secs,
            bytes as f64 / 1e6 / secs.max(1e-9)
        );
    }
    Ok(())
}

pub fn get(args: GetArgs) -> anyhow::Result<()> {
    let src = AisUri::parse_object(&args.object).context("get")?;
    let client = args.cluster.client()?;
    let ctx = || format!("get {src}");
    if args.local.as_os_str() == "-" {
        let n = runtime()?.block_on(async {
            let resp = client.get(&src.bucket, &src.rest, None).await?;
            let mut stream = resp.bytes_stream();
            let mut out = std::io::stdout().lock();
            let mut n = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                out.write_all(&chunk)?;
                n += chunk.len() as u64;
            }
            out.flush()?;
            anyhow::Ok(n)
        });
        return n.map(drop).with_context(ctx);
    }
    let dest = if args.local.is_dir() {
        let base = src.rest.rsplit('/').next().unwrap_or(&src.rest);
        args.local.join(base)
    } else {
        args.local.clone()
    };
    let start = Instant::now();
    let d = runtime()?.block_on(client.get_to_file(&src.bucket, &src.rest, &dest)).with_context(ctx)?;
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        let v = serde_json::json!({
            "bucket": src.bucket, "name": src.rest, "size": d.size, "path": dest, "target": d.target, "seconds": secs,
        });
        println!("{v}");
    } else {
        println!("got {src} -> {} ({}) in {:.2}s", dest.display(), dsort::format_size(d.size), secs);
    }
    Ok(())
}

pub fn ls(args: LsArgs) -> anyhow::Result<()> {
    let Some(bucket) = &args.bucket else {
        return super::jobs::list(&args.cluster, args.regex.as_deref(), args.all, args.json);
    };
    let uri = AisUri::parse(bucket).context("ls")?;
    let client = args.cluster.client()?;
    let listing = runtime()?.block_on(client.list(&uri.bucket, &uri.rest)).with_context(|| format!("ls {bucket}"))?;
    if !listing.down_targets.is_empty() {
        eprintln!("dsort: warning: target(s) {} down: their objects are not listed", listing.down_targets.join(", "));
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&listing.entries)?)?;
    } else {
        for ObjectEntry { name, size } in &listing.entries {
            writeln!(out, "{name}\t{size}")?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_named_by_prefix_and_relative_path() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("dir/sub")).unwrap();
        for f in ["a.tar", "dir/b.tar", "dir/sub/c.tar"] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let s = |p: &str| root.join(p).display().to_string();
        let plan = plan_uploads(&[s("a.tar"), s("dir")], "pre/").unwrap();
        let names: Vec<&str> = plan.iter().map(|u| u.object.as_str()).collect();
        assert_eq!(names, ["pre/a.tar", "pre/b.tar", "pre/sub/c.tar"]);
        assert_eq!(plan[2].local, root.join("dir/sub/c.tar"));
        let plan = plan_uploads(&[s("a.tar")], "").unwrap();
        assert_eq!(plan[0].object, "a.tar");
        // Two files that would get one name.
        std::fs::write(root.join("dir/a.tar"), b"y").unwrap();
        let e = plan_uploads(&[s("a.tar"), s("dir/a.tar")], "").unwrap_err();
        assert!(format!("{e:#}").contains("both be stored as"), "{e:#}");
        assert!(plan_uploads(&[s("missing")], "").is_err());
        assert!(plan_uploads(&[s("a.tar")], "../").is_err(), "the prefix cannot escape the bucket");
    }
}
