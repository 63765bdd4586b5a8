//! The job verbs, through the coordinator's public API (AIStore-compatible): `dsort start SPEC_FILE`,
//! `dsort show [ID] [--refresh DUR]`, `dsort ls [--regex R] [--all]` (jobs), `dsort abort ID`,
//! `dsort rm ID`, `dsort wait ID [--timeout DUR]`.

use super::objects::{ClusterArgs, runtime};
use crate::cluster::jobinfo::{JobInfo, ZERO_TIME};
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The job spec (AIStore's JSON or YAML), a file; `-` reads it from stdin.
    pub spec: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print `{"id": ...}`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The job; without it, the jobs (like `dsort ls`).
    pub id: Option<String>,
    /// Refresh every DUR (e.g. 1s, 500ms) until the job ends, with per-phase progress.
    #[arg(long)]
    pub refresh: Option<String>,
    /// With no ID: every job, not only running ones.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print the per-target JobInfo map (with ID) or the aggregated list (without).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    pub id: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    pub id: String,
    /// Give up after DUR (e.g. 30s, 5m); default: no limit.
    #[arg(long)]
    pub timeout: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[arg(long)]
    pub json: bool,
}

/// `1s`, `500ms`, `2m`, `1h`, `1.5s`, or bare seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: f64 = num.parse().with_context(|| format!("duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("duration {s:?}: unit must be ms, s, m or h"),
    };
    if !secs.is_finite() || secs < 0.0 {
        bail!("duration {s:?}: must be positive");
    }
    Ok(Duration::from_secs_f64(secs))
}

fn status(j: &JobInfo) -> &'static str {
    if j.aborted {
        "Aborted"
    } else if j.finish_time == ZERO_TIME {
        "Running"
    } else {
        "Finished"
    }
}

fn bck(b: &crate::cluster::jobinfo::Bck) -> String {
    format!("{}://{}", if b.provider.is_empty() { "ais" } else { &b.provider }, b.name)
}

fn print_table(jobs: &[JobInfo]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "JOB ID\tSTATUS\tSTART\tFINISH\tSRC BUCKET\tDST BUCKET\tSRC SHARDS")?;
    for j in jobs {
        let finish = if j.finish_time == ZERO_TIME { "-" } else { j.finish_time.as_str() };
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            j.id,
            status(j),
            j.started_time,
            finish,
            bck(&j.src_bck),
            bck(&j.dst_bck),
            j.loc_objs
        )?;
    }
    Ok(())
}

/// Jobs, running first, then not aborted, then by start time.
fn sorted(mut jobs: Vec<JobInfo>) -> Vec<JobInfo> {
    jobs.sort_by(|a, b| {
        (status(a) != "Running", a.aborted, &a.started_time).cmp(&(status(b) != "Running", b.aborted, &b.started_time))
    });
    jobs
}

pub fn start(args: StartArgs) -> anyhow::Result<()> {
    let text = if args.spec == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the spec from stdin")?
    } else {
        std::fs::read_to_string(&args.spec).with_context(|| format!("spec {}", args.spec))?
    };
    let client = args.cluster.client()?;
    let id = runtime()?.block_on(client.job_start(&text)).context("start")?;
    if args.json {
        println!("{}", serde_json::json!({ "id": id }));
    } else {
        println!("{id}");
    }
    Ok(())
}

/// `dsort ls` without a bucket: the jobs (running ones unless `all`).
pub fn list(cluster: &ClusterArgs, regex: Option<&str>, all: bool, json: bool) -> anyhow::Result<()> {
    let client = cluster.client()?;
    let jobs = runtime()?.block_on(client.job_list(regex, !all)).context("listing jobs")?;
    let jobs = sorted(jobs);
    if json {
        println!("{}", serde_json::to_string(&jobs)?);
        return Ok(());
    }
    print_table(&jobs)
}

fn sum(infos: &BTreeMap<String, JobInfo>, f: impl Fn(&JobInfo) -> i64) -> i64 {
    infos.values().map(f).sum()
}

fn ended(infos: &BTreeMap<String, JobInfo>) -> bool {
    infos.values().any(|i| i.aborted) || infos.values().all(JobInfo::finished)
}

fn duration_of(infos: &BTreeMap<String, JobInfo>) -> Duration {
    let ns = infos
        .values()
        .map(|i| i.started_meta_sorting + i.started_shard_creation + i.finished_shard_creation)
        .max()
        .unwrap_or(0);
    Duration::from_nanos(ns.max(0) as u64)
}

fn final_lines(id: &str, infos: &BTreeMap<String, JobInfo>, out: &mut impl Write) -> anyhow::Result<()> {
    if infos.values().any(|i| i.aborted) {
        writeln!(out, "dsort job {id} was aborted")?;
    } else {
        let created = sum(infos, |i| i.metrics.shard_creation.created_count);
        writeln!(out, "Created {created} new shards. Job duration: {:.3?}", duration_of(infos))?;
    }
    let mut seen = Vec::new();
    for i in infos.values() {
        for e in i.metrics.errors.iter().chain(&i.metrics.warnings) {
            if !seen.contains(e) {
                seen.push(e.clone());
            }
        }
    }
    for e in seen {
        writeln!(out, "{e}")?;
    }
    Ok(())
}

fn progress_lines(infos: &BTreeMap<String, JobInfo>, out: &mut impl Write) -> anyhow::Result<()> {
    let [(e, et), (s, st), (c, ct)] = phase_counts(infos);
    writeln!(out, "Extraction phase: {e}/{et}")?;
    writeln!(out, "Sorting phase: {s}/{st}")?;
    writeln!(out, "Creation phase: {c}/{ct}")?;
    Ok(())
}

/// The three phases' counts: (done, total) for extraction (input shards), sorting (targets), creation
/// (output shards).
fn phase_counts(infos: &BTreeMap<String, JobInfo>) -> [(u64, u64); 3] {
    let n = |v: i64| v.max(0) as u64;
    let total = infos.values().map(|i| i.metrics.local_extraction.total_count).max().unwrap_or(0);
    let sorted = infos.values().filter(|i| i.metrics.meta_sorting.phase.finished).count() as u64;
    [
        (n(sum(infos, |i| i.metrics.local_extraction.extracted_count)), n(total)),
        (sorted, infos.len() as u64),
        (
            n(sum(infos, |i| i.metrics.shard_creation.created_count)),
            n(sum(infos, |i| i.metrics.shard_creation.to_create)),
        ),
    ]
}

/// Per-phase progress bars on a terminal (AIStore CLI style), redrawn at each refresh.
struct PhaseBars {
    _multi: indicatif::MultiProgress,
    bars: [indicatif::ProgressBar; 3],
}

impl PhaseBars {
    fn new() -> Self {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template("{prefix:<18} {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let bars = ["Extraction phase:", "Sorting phase:", "Creation phase:"].map(|p| {
            let b = multi.add(indicatif::ProgressBar::new(0));
            b.set_style(style.clone());
            b.set_prefix(p);
            b
        });
        PhaseBars { _multi: multi, bars }
    }

    fn update(&self, infos: &BTreeMap<String, JobInfo>) {
        for (bar, (done, total)) in self.bars.iter().zip(phase_counts(infos)) {
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    fn finish(&self) {
        self.bars.iter().for_each(indicatif::ProgressBar::finish);
    }
}

pub fn show(args: ShowArgs) -> anyhow::Result<()> {
    let Some(id) = &args.id else {
        return list(&args.cluster, None, args.all, args.json);
    };
    let client = args.cluster.client()?;
    let rt = runtime()?;
    let refresh = args.refresh.as_deref().map(parse_duration).transpose()?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut bars: Option<PhaseBars> = None;
    loop {
        let infos = rt.block_on(client.job_info(id)).with_context(|| format!("job {id}"))?;
        let done = ended(&infos);
        if let Some(b) = &bars {
            b.update(&infos);
        } else {
            let mut out = std::io::stdout().lock();
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&infos)?)?;
            } else if let Some(agg) = JobInfo::aggregate(infos.values()) {
                print_table(std::slice::from_ref(&agg))?;
                if !agg.metrics.description.is_empty() {
                    writeln!(out, "DESCRIPTION: {}", agg.metrics.description)?;
                }
                if refresh.is_some() && !done {
                    if tty {
                        let b = PhaseBars::new();
                        b.update(&infos);
                        bars = Some(b);
                    } else {
                        progress_lines(&infos, &mut out)?;
                    }
                }
            }
            out.flush()?;
        }
        if done {
            if let Some(b) = &bars {
                b.finish();
            }
            if !args.json {
                let mut out = std::io::stdout().lock();
                final_lines(id, &infos, &mut out)?;
                out.flush()?;
            }
        }
        match refresh {
            Some(d) if !done => std::thread::sleep(d),
            _ => return Ok(()),
        }
    }
}

pub fn abort(args: IdArgs) -> anyhow::Result<()> {
    let client = args.cluster.client()?;
    runtime()?.block_on(client.job_abort(&args.id)).with_context(|| format!("abort {}", args.id))?;
    println!("Stopped dsort job {}", args.id);
    Ok(())
}

pub fn rm(args: IdArgs) -> anyhow::Result<()> {
    let client = args.cluster.client()?;
    runtime()?.block_on(client.job_remove(&args.id)).with_context(|| format!("rm {}", args.id))?;
    println!("Removed finished dsort job {}", args.id);
    Ok(())
}

/// Wait for the job to end: success, or an error (aborted: the errors; timed out).
pub fn wait(args: WaitArgs) -> anyhow::Result<()> {
    let client = args.cluster.client()?;
    let rt = runtime()?;
    let timeout = args.timeout.as_deref().map(parse_duration).transpose()?;
    let t0 = Instant::now();
    loop {
        let infos = rt.block_on(client.job_info(&args.id)).with_context(|| format!("job {}", args.id))?;
        if ended(&infos) {
            let aborted = infos.values().any(|i| i.aborted);
            if args.json {
                println!("{}", serde_json::to_string(&infos)?);
            }
            if aborted {
                let mut errors: Vec<String> = Vec::new();
                for e in infos.values().flat_map(|i| i.metrics.errors.iter()) {
                    if !errors.contains(e) {
                        errors.push(e.clone());
                    }
                }
                bail!(
                    "dsort[{}] was aborted{}",
                    args.id,
                    if errors.is_empty() { String::new() } else { format!(": {}", errors.join("; ")) }
                );
            }
            if !args.json {
                println!("dsort[{}] finished", args.id);
                final_lines(&args.id, &infos, &mut std::io::stdout().lock())?;
            }
            return Ok(());
        }
        if let Some(t) = timeout
            && t0.elapsed() >= t
        {
            bail!("timed out waiting for dsort[{}] ({t:?})", args.id);
        }
        // Poll often at first (short jobs end soon after they start), then every 200 ms.
        std::thread::sleep(Duration::from_millis(if t0.elapsed() < Duration::from_secs(10) { 50 } else { 200 }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("x").is_err());
    }
}
