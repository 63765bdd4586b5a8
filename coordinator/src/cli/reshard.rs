//! `dsort reshard`: the offline engine on one machine, from a spec file or from flags.

use super::progress::CliProgress;
use anyhow::{Context, anyhow, bail};
use dsort::job::{JobEnv, JobSummary, run_job};
use dsort::location::{input_set, output_template};
use dsort::spec::{BucketRef, JobSpec, parse_spec};
use serde_json::{Value, json};
use shardio::Bucket;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AlgorithmArg {
    Alphanumeric,
    Shuffle,
    Content,
    None,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KeyTypeArg {
    Int,
    Float,
    String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CorruptArg {
    Skip,
    Abort,
}

#[derive(Debug, clap::Args)]
pub struct ReshardArgs {
    /// AIStore-compatible job spec (JSON or YAML); `ais` buckets are folders under --root, `s3` buckets are
    /// S3 buckets (settings from DSORT_S3_* / AWS_* environment variables).
    #[arg(long, conflicts_with_all = ["input", "output"])]
    pub spec: Option<PathBuf>,
    /// Folder holding the spec's buckets (bucket X is ROOT/X).
    #[arg(long, default_value = ".", requires = "spec")]
    pub root: PathBuf,
    /// Input shards: one template ('DIR/shard-{000..099}.tar', 's3://BUCKET/PREFIX/shard-{000..099}.tar') or
    /// a list of files.
    #[arg(long, num_args = 1.., required_unless_present = "spec")]
    pub input: Vec<String>,
    /// Output template; its extension picks the output format ('DIR/out-{00000..99999}.tar', or
    /// 's3://BUCKET/PREFIX/out-{00000..99999}.tar').
    #[arg(long, required_unless_present = "spec")]
    pub output: Option<String>,
    /// Minimum size of an output shard (content bytes), e.g. 256MiB.
    #[arg(long, conflicts_with = "shard_records")]
    pub shard_size: Option<String>,
    /// Records per output shard (instead of a size).
    #[arg(long)]
    pub shard_records: Option<u64>,
    #[arg(long, value_enum, default_value = "alphanumeric")]
    pub algorithm: AlgorithmArg,
    /// Shuffle seed (non-negative integer); the same seed gives the same order anywhere.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Content sort: the extension of the entry holding the key, e.g. .cls.
    #[arg(long)]
    pub key_ext: Option<String>,
    #[arg(long, value_enum)]
    pub key_type: Option<KeyTypeArg>,
    #[arg(long)]
    pub decreasing: bool,
    /// External key map (text `name<SEP>shard` lines, or JSON `{shard_template: [names|regexes]}`).
    #[arg(long)]
    pub ekm: Option<PathBuf>,
    #[arg(long)]
    pub ekm_sep: Option<String>,
    /// Memory budget: a share of the memory limit (40%) or a size (2GiB).
    #[arg(long)]
    pub max_mem: Option<String>,
    /// Parent folder of the job's temp folder (spill files).
    #[arg(long, env = "DSORT_TMP_DIR")]
    pub tmp_dir: Option<PathBuf>,
    /// Shards extracted and created at once (default: number of cores).
    #[arg(long, default_value_t = 0)]
    pub concurrency: usize,
    /// What to do with a corrupted input shard.
    #[arg(long, value_enum)]
    pub corrupted_shards: Option<CorruptArg>,
    /// Tar header flavour of tar outputs.
    #[arg(long, value_enum, default_value = "pax")]
    pub tar_format: super::gen_cmd::TarFormatArg,
    /// Run every phase but write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A parsed job and its buckets.
pub struct Prepared {
    pub spec: JobSpec,
    pub input: Arc<dyn Bucket>,
    pub output: Arc<dyn Bucket>,
    pub ekm_text: Option<String>,
    pub warnings: Vec<String>,
}

/// A `--input`/`--output` location: a local folder, or an S3 bucket and key prefix (`s3://b/p/...`).
fn bucket_of(dir: &Path, s3: Option<&str>, field: &str) -> anyhow::Result<Arc<dyn Bucket>> {
    let Some(bucket) = s3 else { return Ok(Arc::new(shardio::LocalBucket::new(dir))) };
    let prefix = dir.to_str().ok_or_else(|| anyhow!("{field}: the key prefix is not valid UTF-8"))?;
    let prefix = prefix.strip_prefix('.').unwrap_or(prefix);
    let bref = BucketRef { provider: "s3".into(), ..BucketRef::ais(bucket) };
    Ok(crate::buckets::resolve(&bref, prefix, field, &|_| PathBuf::new())?)
}

/// The arguments without their `s3://BUCKET/` head, and that bucket (all must name the same one).
fn strip_s3<'a>(args: &'a [String], field: &str) -> anyhow::Result<(Vec<String>, Option<&'a str>)> {
    let mut bucket = None;
    let mut rest = Vec::with_capacity(args.len());
    for a in args {
        let (b, r) = match crate::buckets::split_s3_url(a) {
            Some((b, r)) => (Some(b), r.to_string()),
            None => (None, a.clone()),
        };
        if !rest.is_empty() && b != bucket {
            bail!("{field}: all shards must be in one bucket ({a:?} is not)");
        }
        if b.is_some_and(|b| b.is_empty() || r.is_empty()) {
            bail!("{field}: {a:?} should be s3://BUCKET/OBJECTS");
        }
        bucket = b;
        rest.push(r);
    }
    Ok((rest, bucket))
}

fn load_ekm(location: &str, root: &Path) -> anyhow::Result<String> {
    let path = if let Some(rest) = location.strip_prefix("ais://") {
        root.join(rest)
    } else if location.starts_with("http://") || location.starts_with("https://") {
        bail!("ekm_file {location}: fetching over HTTP is not available offline; download it and pass the path");
    } else {
        PathBuf::from(location)
    };
    std::fs::read_to_string(&path).with_context(|| format!("ekm_file {}", path.display()))
}

/// Build the job from the flags or the spec file.
pub fn prepare(args: &ReshardArgs) -> anyhow::Result<Prepared> {
    if let Some(spec_path) = &args.spec {
        let text = std::fs::read_to_string(spec_path).with_context(|| format!("spec {}", spec_path.display()))?;
        let mut v = spec_value(&text).map_err(|e| anyhow!("{}: {e:#}", spec_path.display()))?;
        apply_overrides(&mut v, args);
        let parsed = parse_spec(&v.to_string(), true).map_err(|e| anyhow!("{}:\n{e}", spec_path.display()))?;
        let spec = parsed.spec;
        let local = |name: &str| args.root.join(name);
        let input = crate::buckets::resolve(&spec.input_bck, "", "input_bck", &local)?;
        let output = crate::buckets::resolve(&spec.output_bck, "", "output_bck", &local)?;
        let ekm_text = spec.ekm.as_ref().map(|e| load_ekm(&e.location, &args.root)).transpose()?;
        return Ok(Prepared { spec, input, output, ekm_text, warnings: parsed.warnings });
    }
    let (input_args, input_s3) = strip_s3(&args.input, "--input")?;
    let inputs = input_set(&input_args)?;
    let output = args.output.as_deref().ok_or_else(|| anyhow!("--output is required"))?;
    let output_arg = [output.to_string()];
    let (output_args, output_s3) = strip_s3(&output_arg, "--output")?;
    let (output_dir, template) = output_template(&output_args[0])?;
    let input_ext = inputs
        .names
        .first()
        .and_then(|n| shardio::Format::from_name(n))
        .ok_or_else(|| {
            anyhow!(
                "--input: {:?} has no known archive extension (expecting one of: .tar, .tgz, .tar.gz, .tar.zst, .tar.lz4, .zip)",
                inputs.names.first().map_or("", String::as_str)
            )
        })?
        .extension();
    let mut v = json!({
        "input_bck": {"name": "input"},
        "output_bck": {"name": "output"},
        "input_format": {"objnames": inputs.names},
        "input_extension": input_ext,
        "output_format": template.as_str(),
    });
    if let Some(ext) = template.template_extension() {
        v["output_extension"] = json!(ext);
    }
    apply_overrides(&mut v, args);
    let parsed = parse_spec(&v.to_string(), true).map_err(|e| anyhow!("{e}"))?;
    let ekm_text = args.ekm.as_ref().map(|p| load_ekm(&p.display().to_string(), Path::new("."))).transpose()?;
    let input = bucket_of(&inputs.dir, input_s3, "--input")?;
    let output = bucket_of(&output_dir, output_s3, "--output")?;
    Ok(Prepared { spec: parsed.spec, input, output, ekm_text, warnings: parsed.warnings })
}

fn spec_value(text: &str) -> anyhow::Result<Value> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).context("spec is not valid JSON");
    }
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).context("spec is not valid YAML")?;
    serde_json::to_value(yaml).context("spec YAML cannot be represented as JSON")
}

/// Flags given with a spec file override its fields (flags form: they are the spec).
fn apply_overrides(v: &mut Value, args: &ReshardArgs) {
    if let Some(s) = &args.shard_size {
        v["output_shard_size"] = json!(s);
    }
    if let Some(n) = args.shard_records {
        v["output_shard_records"] = json!(n);
    }
    if args.spec.is_none() || !matches!(args.algorithm, AlgorithmArg::Alphanumeric) || args.decreasing {
        let kind = match args.algorithm {
            AlgorithmArg::Alphanumeric => "alphanumeric",
            AlgorithmArg::Shuffle => "shuffle",
            AlgorithmArg::Content => "content",
            AlgorithmArg::None => "none",
        };
        let mut alg = json!({"kind": kind, "decreasing": args.decreasing});
        if let Some(seed) = args.seed {
            alg["seed"] = json!(seed.to_string());
        }
        if let Some(e) = &args.key_ext {
            alg["extension"] = json!(e);
        }
        if let Some(t) = args.key_type {
            alg["content_key_type"] = json!(match t {
                KeyTypeArg::Int => "int",
                KeyTypeArg::Float => "float",
                KeyTypeArg::String => "string",
            });
        }
        v["algorithm"] = alg;
    }
    if let Some(p) = &args.ekm {
        v["ekm_file"] = json!(p.display().to_string());
        v.as_object_mut().map(|o| o.remove("output_format"));
    }
    if let Some(s) = &args.ekm_sep {
        v["ekm_file_sep"] = json!(s);
    }
    if let Some(m) = &args.max_mem {
        v["max_mem_usage"] = json!(m);
    }
    if args.dry_run {
        v["dry_run"] = json!(true);
    }
    if let Some(c) = args.corrupted_shards {
        let r = match c {
            CorruptArg::Skip => "skip",
            CorruptArg::Abort => "abort",
        };
        if !v.get("config").is_some_and(Value::is_object) {
            v["config"] = json!({});
        }
        v["config"]["corrupted_shards"] = json!(r);
    }
}

/// Run a prepared job with the CLI's progress and Ctrl-C handling.
pub fn execute(p: &Prepared, args: &ReshardArgs, quiet: bool) -> anyhow::Result<JobSummary> {
    let progress = Arc::new(CliProgress::new(quiet));
    for w in &p.warnings {
        dsort::progress::Progress::warn(progress.as_ref(), w);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    super::on_ctrl_c(cancel.clone());
    let env = JobEnv {
        input: p.input.clone(),
        output: p.output.clone(),
        tmp_dir: args.tmp_dir.clone(),
        concurrency: args.concurrency,
        ekm_text: p.ekm_text.clone(),
        progress,
        cancel,
        tar_flavor: args.tar_format.into(),
    };
    Ok(run_job(&p.spec, &env)?)
}

pub fn print_summary(s: &JobSummary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!(
        "resharded records={} entries={} shards_in={} shards_out={} bytes={} in {:.2}s ({:.1} MB/s){}",
        s.records,
        s.entries,
        s.input_shards,
        s.output_shards,
        s.bytes,
        s.seconds,
        s.mb_per_s,
        if s.dry_run { " [dry run: nothing written]" } else { "" }
    );
    println!(
        "phases: extract {:.2}s, sort {:.2}s, create {:.2}s; memory: budget {}, peak reserved {}, peak RSS {}; spilled {} in {} runs ({} merge levels, final merge in {} ranges){}",
        s.extract_seconds,
        s.sort_seconds,
        s.create_seconds,
        dsort::format_size(s.memory_budget),
        dsort::format_size(s.peak_reserved),
        s.peak_rss.map_or("?".into(), dsort::format_size),
        dsort::format_size(s.spilled_bytes),
        s.sort_runs,
        s.merge_levels,
        s.merge_ranges,
        s.seed.map(|x| format!("; seed {x}")).unwrap_or_default(),
    );
    if s.skipped_shards > 0 {
        println!("skipped input shards: {}", s.skipped_shards);
    }
    for (bucket, r) in &s.s3 {
        println!("{}", s3_requests_line(bucket, r));
    }
    Ok(())
}

/// One bucket's requests for the human summary: `s3://bkt: 12 GET (327.6 MB), 3 PUT (64.0 MB), 1 LIST, 9 other`.
fn s3_requests_line(bucket: &str, r: &shardio::RequestCounts) -> String {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    format!(
        "s3://{bucket}: {} GET ({}), {} PUT ({}), {} LIST, {} other",
        r.get_requests,
        mb(r.get_bytes),
        r.put_requests,
        mb(r.put_bytes),
        r.list_requests,
        r.other_requests
    )
}

pub fn run(args: ReshardArgs) -> anyhow::Result<()> {
    let prepared = prepare(&args)?;
    let summary = execute(&prepared, &args, args.json)?;
    print_summary(&summary, args.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_requests_print_as_one_line_per_bucket() {
        let r = shardio::RequestCounts {
            get_requests: 12,
            get_bytes: 327_619_584,
            put_requests: 3,
            put_bytes: 64_000_000,
            list_requests: 1,
            other_requests: 9,
        };
        assert_eq!(s3_requests_line("bkt", &r), "s3://bkt: 12 GET (327.6 MB), 3 PUT (64.0 MB), 1 LIST, 9 other");
    }
}
