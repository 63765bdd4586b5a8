//! `dsort verify`: prove that a reshard's output is an exact permutation of its input records, in the
//! algorithm's order, cut by the rule (see `dsort::verify` for every check and choice).

use anyhow::{Context, anyhow, bail};
use dsort::location::{input_set, output_template};
use dsort::verify::{Algorithm, ContentKey, CutRule, KeyType, Order, Report, VerifySpec, verify};
use std::io::{self, Write};
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Input shards: one template ('DIR/shard-{000..099}.tar') or a list of files, as given to reshard.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// Output template ('DIR/out-{00000..99999}.tar'); shards are its names up to the first missing one.
    #[arg(long)]
    pub output: String,
    /// Ordering algorithm: alphanumeric, shuffle, content or none.
    #[arg(long, default_value = "alphanumeric")]
    pub algorithm: String,
    /// Shuffle seed (a non-negative integer), as given to or reported by reshard; required by shuffle.
    #[arg(long)]
    pub seed: Option<String>,
    /// Content sort: extension of the entry holding the key, e.g. .cls.
    #[arg(long)]
    pub key_ext: Option<String>,
    /// Content sort: how the key is parsed: int, float or string.
    #[arg(long)]
    pub key_type: Option<String>,
    /// The order is decreasing (ties still break by unique name, ascending).
    #[arg(long)]
    pub decreasing: bool,
    /// Check the size cut: every shard but the last reaches this size and closes as soon as it does.
    #[arg(long, conflicts_with = "shard_records")]
    pub shard_size: Option<String>,
    /// Check the count cut: every shard but the last has exactly this many records.
    #[arg(long)]
    pub shard_records: Option<u64>,
    /// Shards read at once (default: number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Build the verification spec from the command line.
pub fn spec(args: &VerifyArgs) -> anyhow::Result<VerifySpec> {
    let algorithm = Algorithm::parse(&args.algorithm).ok_or_else(|| {
        anyhow!("--algorithm: {:?} is not one of alphanumeric, shuffle, content, none", args.algorithm)
    })?;
    let seed = match args.seed.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => {
            s.parse::<u64>().map_err(|_| anyhow!("--seed: {s:?} is not a non-negative integer"))?
        }
        _ if algorithm == Algorithm::Shuffle => {
            bail!("--algorithm shuffle needs --seed: the order depends on it (reshard reports the seed it used)")
        }
        _ => 0,
    };
    let content = if algorithm == Algorithm::Content {
        let ext = args.key_ext.as_deref().map(str::trim).filter(|e| !e.is_empty());
        let ext = ext.ok_or_else(|| anyhow!("--algorithm content needs --key-ext (e.g. .cls)"))?;
        let ext = if ext.starts_with('.') { ext.to_string() } else { format!(".{ext}") };
        let t =
            args.key_type.as_deref().ok_or_else(|| anyhow!("--algorithm content needs --key-type int|float|string"))?;
        let key_type =
            KeyType::parse(t).ok_or_else(|| anyhow!("--key-type: {t:?} is not one of int, float, string"))?;
        Some(ContentKey { ext, key_type })
    } else {
        None
    };
    let cut = match (&args.shard_size, args.shard_records) {
        (Some(s), _) => {
            let n = dsort::parse_size(s).map_err(|e| anyhow!("--shard-size: {e}"))?;
            (n > 0).then_some(CutRule::Size(n))
        }
        (None, Some(n)) => (n > 0).then_some(CutRule::Records(n)),
        (None, None) => None,
    };
    let input = input_set(&args.input)?;
    let (output_dir, output) = output_template(&args.output)?;
    let concurrency = args
        .concurrency
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    Ok(VerifySpec {
        input,
        output_dir,
        output,
        order: Order { algorithm, decreasing: args.decreasing, seed, content },
        cut,
        concurrency,
    })
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let spec = spec(&args)?;
    let start = Instant::now();
    let report = verify(&spec).context("verify")?;
    let secs = start.elapsed().as_secs_f64();
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let printed = if args.json { print_json(&report, secs) } else { print_text(&report, secs) };
    match printed {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(v) = &report.violation {
        let more = match report.violations.saturating_sub(1) {
            0 => String::new(),
            n => format!("\n({n} more violation(s) found; --json reports their count)"),
        };
        bail!("verify: FAILED: {v}{more}");
    }
    Ok(())
}

fn print_text(r: &Report, secs: f64) -> io::Result<()> {
    if r.violation.is_some() {
        return Ok(());
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "verified: records={} entries={} bytes={} input_shards={} output_shards={} in {secs:.2}s ({:.1} MB/s)",
        r.records,
        r.entries,
        r.bytes,
        r.input_shards,
        r.output_shards,
        r.bytes as f64 / 1e6 / secs.max(1e-9)
    )?;
    out.flush()
}

fn print_json(r: &Report, secs: f64) -> io::Result<()> {
    let mut v = serde_json::to_value(r).map_err(io::Error::other)?;
    v["seconds"] = serde_json::json!(secs);
    let mut out = io::stdout().lock();
    writeln!(out, "{v}")?;
    out.flush()
}
