//! The single-machine executor: extract every input shard (in parallel), sort all record metadata under
//! the memory budget (spilling sorted runs), cut the sorted stream into output shards and create them (in
//! parallel), publishing each atomically. The cluster reuses the same pieces.

use crate::create::{CreateCtx, Cut, Group, Sources, cut_and_create};
use crate::extract::{Decoded, ExtractCtx, Outcome};
use crate::extsort::ExternalSorter;
use crate::key::RecordCodec;
use crate::memory::{MemoryPool, budget, peak_rss_bytes, try_detect_memory_limit};
use crate::progress::{Phase, Progress};
use crate::spec::{AlgorithmKind, JobSpec, Reaction};
use serde::Serialize;
use shardio::{Bucket, WriteOptions};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Errors of a job: each says what and where (shard, record, field).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Spec(#[from] crate::spec::SpecErrors),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<crate::create::CreateError> for JobError {
    fn from(e: crate::create::CreateError) -> Self {
        match e {
            crate::create::CreateError::Failed(m) => JobError::Failed(m),
            crate::create::CreateError::Cancelled => JobError::Cancelled,
        }
    }
}

/// Where a job runs and how hard.
pub struct JobEnv {
    /// The input bucket and the output bucket: local folders ([`shardio::LocalBucket`]) or object stores
    /// (`shardio::s3::S3Bucket`), in any combination.
    pub input: Arc<dyn Bucket>,
    pub output: Arc<dyn Bucket>,
    /// Parent of the per-job temp folder (spill files); default: the system temp folder.
    pub tmp_dir: Option<PathBuf>,
    /// Parallel extractions / creations (0 = the number of cores).
    pub concurrency: usize,
    /// Text of the external key map when the spec names one (the caller fetches it).
    pub ekm_text: Option<String>,
    pub progress: Arc<dyn Progress>,
    pub cancel: Arc<AtomicBool>,
    pub tar_flavor: shardio::TarFlavor,
}

/// What a job did; printed as the final summary and as `--json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobSummary {
    pub records: u64,
    pub entries: u64,
    pub input_shards: u64,
    pub skipped_shards: u64,
    pub output_shards: u64,
    /// Content bytes (sum of entry sizes) moved.
    pub bytes: u64,
    pub input_file_bytes: u64,
    pub output_file_bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub extract_seconds: f64,
    pub sort_seconds: f64,
    pub create_seconds: f64,
    pub memory_budget: u64,
    pub peak_reserved: u64,
    pub peak_rss: Option<u64>,
    pub spilled_bytes: u64,
    pub sort_runs: u64,
    pub merge_levels: u32,
    /// Key ranges the final merge was split into, merged in parallel (1: one merge; 0: nothing spilled).
    pub merge_ranges: u32,
    pub seed: Option<u64>,
    pub dry_run: bool,
    /// The first [`MAX_KEPT_WARNINGS`] warnings, then one line counting the rest (all were reported
    /// to the progress output as they came).
    pub warnings: Vec<String>,
    /// Requests made to each S3 bucket (by bucket name), retries included; absent without S3 buckets.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub s3: BTreeMap<String, shardio::RequestCounts>,
}

/// The requests of the job's object-store buckets, summed by bucket name (input and output may be two
/// handles on one bucket); a handle given twice counts once.
pub fn bucket_requests(buckets: &[&Arc<dyn Bucket>]) -> BTreeMap<String, shardio::RequestCounts> {
    let mut seen: Vec<*const ()> = Vec::new();
    let mut out: BTreeMap<String, shardio::RequestCounts> = BTreeMap::new();
    for b in buckets {
        let at = Arc::as_ptr(b) as *const ();
        if seen.contains(&at) {
            continue;
        }
        seen.push(at);
        if let Some((name, counts)) = b.requests() {
            let sum = out.entry(name).or_default();
            *sum = sum.plus(counts);
        }
    }
    out
}

/// Warnings a job keeps for its summary: one per record or shard could otherwise grow without bound.
pub const MAX_KEPT_WARNINGS: usize = 1000;

/// A job's warnings list, bounded: the first [`MAX_KEPT_WARNINGS`] are kept, the rest only counted.
#[derive(Debug, Default)]
pub struct Warnings {
    kept: Mutex<(Vec<String>, u64)>,
}

impl Warnings {
    pub fn push(&self, m: String) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.0.len() < MAX_KEPT_WARNINGS {
            kept.0.push(m);
        } else {
            kept.1 += 1;
        }
    }

    /// The kept warnings, and a last line naming how many more there were.
    pub fn into_list(self) -> Vec<String> {
        let (mut list, more) = self.kept.into_inner().unwrap_or_else(|p| p.into_inner());
        if more > 0 {
            list.push(format!("... and {more} more warnings (only the first {MAX_KEPT_WARNINGS} are kept)"));
        }
        list
    }
}

/// Run one job to the end. Temp files are removed whatever happens (the temp folder is dropped).
pub fn run_job(spec: &JobSpec, env: &JobEnv) -> Result<JobSummary, JobError> {
    let started = Instant::now();
    crate::files::raise_open_files_limit();
    let warnings = Warnings::default();
    let warn = |m: String| {
        env.progress.warn(&m);
        warnings.push(m);
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let conc = |limit: usize| {
        let base = if env.concurrency == 0 { cores } else { env.concurrency };
        if limit == 0 { base } else { base.min(limit) }
    };

    // Plan everything that can be refused before any work.
    let Plan { objects, algorithm, seed: seed_used, ekm, mut groups } = plan_job(spec, env, &warn)?;

    check_buckets(env, spec.dry_run)?;
    let limit = try_detect_memory_limit().map_err(|e| JobError::Refused(e.to_string()))?;
    let pool_limit = budget(&limit, &spec.max_mem_usage);
    let pool = MemoryPool::new(pool_limit);
    // Creation's writers are paid for first (at most a quarter of a tiny budget; beyond that they are
    // the fixed overhead), so the later phases can never starve them.
    // The pool is empty here and the request is at most a quarter of it, so a refusal can only be a
    // broken pool: an error naming the owner and the limit, never silently unpaid writers.
    let writers = pool.reservation("output writers");
    let create_workers = conc(spec.create_concurrency_max_limit) as u64;
    let writers_mem = (crate::create::writer_mem(spec.output_extension) * create_workers).min(pool_limit / 4);
    writers.try_grow(writers_mem).map_err(|e| memory_refused("the output shards' writers", writers_mem, &e))?;
    // The external key map's names grow with its rules (templates expand): paid for the whole job.
    let ekm_mem = pool.reservation("external key map");
    if let Some(ekm) = &ekm {
        let need = ekm.mem_size();
        ekm_mem.try_grow(need).map_err(|e| memory_refused("the external key map's record names", need, &e))?;
    }
    let tmp = job_temp_dir(env)?;

    // Extract.
    let t_extract = Instant::now();
    let codec = Arc::new(RecordCodec::new(objects.clone(), spec.algorithm.decreasing));
    // The sorter's spill headroom (two run readers and a writer, its `min_memory`) is paid for before
    // extraction starts: parallel decoders could otherwise fill the pool first and leave the sort unable
    // to spill (a failure that depended on thread timing). Too small a budget still fails, at first push.
    // A budget without room for that headroom could not sort anything that spills: refused now, naming
    // what needed the memory, rather than failing at the first push after the work started.
    let metadata = pool.reservation("record metadata");
    let headroom = 3 * crate::extsort::DEFAULT_IO_BUFFER_SIZE as u64;
    metadata.try_grow(headroom).map_err(|e| memory_refused("the record sorter's spill buffers", headroom, &e))?;
    let sorter = Arc::new(Mutex::new(
        ExternalSorter::new(codec.clone(), metadata, tmp.path().to_path_buf(), env.cancel.clone())
            .with_max_fan_in(crate::files::merge_fan_in(crate::extsort::DEFAULT_MAX_FAN_IN))
            // The final merge uses as many threads as the job may (`--concurrency 1`: one merge).
            .with_merge_ranges(conc(0)),
    ));
    // An extraction that cannot pay for its shard's index makes the sorter spill (the pool holds it weakly).
    let spiller: Arc<dyn crate::memory::Spill> = sorter.clone();
    pool.set_spiller(Arc::downgrade(&spiller));
    drop(spiller);
    env.progress.start(Phase::Extract, Some(objects.len() as u64), "shards");
    let ectx = ExtractCtx {
        objects: &objects,
        bucket: env.input.as_ref(),
        input_format: spec.input_extension,
        algorithm: &algorithm,
        pool: &pool,
        spill_dir: tmp.path(),
        reactions: spec.reactions,
        warn: &warn,
    };
    let all: Vec<u32> = (0..objects.len() as u32).collect();
    // Records that read each shard's decoded copy: creation drops a copy after its last one.
    let decoded_uses: Vec<AtomicU64> = (0..objects.len()).map(|_| AtomicU64::new(0)).collect();
    let push = |records: Vec<crate::key::RecordItem>| {
        for r in &records {
            if r.entries.iter().any(|e| matches!(e.loc, crate::key::Loc::Decoded(_)))
                && let Some(n) = decoded_uses.get(r.shard as usize)
            {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut sorter = sorter.lock().unwrap_or_else(|p| p.into_inner());
        records.into_iter().try_for_each(|r| sorter.push(r))
    };
    let workers = conc(spec.extract_concurrency_max_limit);
    let extracted = extract_shards(&ectx, &all, workers, &env.cancel, env.progress.as_ref(), &push);
    env.progress.finish(Phase::Extract);
    let (mut summary, decoded) = extracted?;
    summary.extract_seconds = t_extract.elapsed().as_secs_f64();

    // Sort.
    let t_sort = Instant::now();
    env.progress.start(Phase::Sort, Some(summary.records), "records");
    let sorter = Arc::into_inner(sorter)
        .ok_or_else(|| JobError::Failed("internal: the sorter is still shared after extraction".into()))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let (sorted, sort_stats) = sorter.finish().map_err(|e| match e {
        crate::extsort::SortError::Cancelled => JobError::Cancelled,
        e => JobError::Failed(format!("sorting record metadata: {e}")),
    })?;
    env.progress.finish(Phase::Sort);
    summary.sort_seconds = t_sort.elapsed().as_secs_f64();
    summary.sort_runs = sort_stats.runs;
    summary.merge_levels = sort_stats.merge_levels;
    summary.merge_ranges = sort_stats.merge_ranges;
    summary.spilled_bytes += sort_stats.spilled_bytes;

    // Cut and create.
    let t_create = Instant::now();
    let cut = cut_rule(spec, &groups, summary.bytes);
    let mut sources = Sources::new(env.input.clone(), objects.clone(), decoded);
    let uses: Vec<u64> = decoded_uses.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    sources.release_after_use(&uses, tmp.path());
    let sources = Arc::new(sources);
    // The sorter is done: from now on, decoded copies are what the pool can ask back (moved to files).
    let spiller: Arc<dyn crate::memory::Spill> = sources.clone();
    pool.set_spiller(Arc::downgrade(&spiller));
    drop(spiller);
    env.progress.start(Phase::Create, Some(summary.bytes), "bytes");
    let on_shard = |_: &str, bytes: u64| env.progress.advance(Phase::Create, bytes);
    let cctx = CreateCtx {
        sources: &sources,
        out: env.output.as_ref(),
        staging: tmp.path(),
        format: spec.output_extension,
        options: WriteOptions { tar_flavor: env.tar_flavor, ..WriteOptions::default() },
        dry_run: spec.dry_run,
        concurrency: conc(spec.create_concurrency_max_limit),
        pool: &pool,
        cancel: &env.cancel,
        on_shard: &on_shard,
    };
    let router = EkmRouter {
        ekm: ekm.as_ref(),
        algorithm: &algorithm,
        objects: &objects,
        reaction: spec.reactions.ekm_missing_key,
    };
    // A record left out is one use of its decoded copy less, as if written.
    let route = |item: &crate::key::RecordItem| {
        let group = router.route(item, &warn);
        if matches!(group, Ok(None)) {
            sources.consumed(item);
        }
        group
    };
    let sorted = sorted.map(|r| r.map_err(|e| e.to_string()));
    // A zip holds each entry name once: a shard that would hold one twice is found before anything is
    // written (the stream is cut once more, ahead of creation).
    let sorted: Box<dyn Iterator<Item = Result<crate::key::RecordItem, String>>> =
        if spec.output_extension == shardio::Format::Zip {
            let quiet = |item: &crate::key::RecordItem| router.route(item, &|_| {});
            Box::new(crate::create::check_zip_names(
                sorted,
                codec.clone(),
                &objects,
                &groups,
                &cut,
                quiet,
                tmp.path(),
                &pool,
                &env.cancel,
            )?)
        } else {
            Box::new(sorted)
        };
    // Every shard is staged (written whole, synced, invisible); all are published at the end, or, when
    // anything fails first, all are removed as `staged` is dropped.
    // Sorted in memory (or spooled for the zip check), the stream's memory is all reserved already;
    // creation must not keep a share free for it on top.
    let feed = if sort_stats.runs == 0 || spec.output_extension == shardio::Format::Zip {
        crate::create::Feed::Reserved
    } else {
        crate::create::Feed::Merging
    };
    let (created, staged) = cut_and_create(&cctx, sorted, &mut groups, &cut, feed, route)?;
    env.progress.finish(Phase::Create);
    if created.records != summary.records && ekm.is_none() {
        return Err(JobError::Failed(format!(
            "internal: {} records extracted but {} written",
            summary.records, created.records
        )));
    }
    test_hold_before_publish(staged.len(), &env.cancel)?;
    staged.publish(env.output.as_ref()).map_err(JobError::Failed)?;
    summary.create_seconds = t_create.elapsed().as_secs_f64();
    summary.output_shards = created.shards;
    summary.output_file_bytes = created.output_bytes;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.mb_per_s = summary.bytes as f64 / 1e6 / summary.seconds.max(1e-9);
    summary.memory_budget = pool_limit;
    summary.peak_reserved = pool.peak();
    summary.peak_rss = peak_rss_bytes();
    summary.seed = seed_used;
    summary.dry_run = spec.dry_run;
    summary.warnings = warnings.into_list();
    drop(sources);
    drop(tmp);
    summary.s3 = bucket_requests(&[&env.input, &env.output]);
    Ok(summary)
}

/// The job's refusal when `what` cannot have the `bytes` it needs before any work starts: names the need,
/// the pool's limit (from `err`) and what to raise.
fn memory_refused(what: &str, bytes: u64, err: &crate::memory::MemoryError) -> JobError {
    JobError::Refused(format!(
        "max_mem_usage: {what} need {} of memory before the job starts, which the budget cannot give ({err})",
        crate::size::format_size(bytes)
    ))
}

/// Failpoint for fault tests: with `DSORT_TEST_HOLD=publish` in its environment, a job stops once every
/// output shard is staged, says so on stderr, and waits until it is cancelled (Ctrl-C, SIGTERM), so a
/// test can interrupt it at the last moment before anything is published, without guessing at timing.
fn test_hold_before_publish(staged: usize, cancel: &AtomicBool) -> Result<(), JobError> {
    if std::env::var("DSORT_TEST_HOLD").as_deref() != Ok("publish") {
        return Ok(());
    }
    eprintln!("dsort: holding {staged} staged output shards before publishing (DSORT_TEST_HOLD=publish)");
    while !cancel.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(JobError::Cancelled)
}

/// Routes records to output groups: group 0 without an external key map, else the group of the record's
/// EKM key (`None`: left out, after the `ekm_missing_key` reaction). Shared by the single-machine and the
/// distributed paths so both place every record the same way.
pub struct EkmRouter<'a> {
    pub ekm: Option<&'a crate::ekm::Ekm>,
    pub algorithm: &'a AlgorithmKind,
    pub objects: &'a [String],
    pub reaction: Reaction,
}

impl EkmRouter<'_> {
    pub fn route(&self, item: &crate::key::RecordItem, warn: &dyn Fn(String)) -> Result<Option<usize>, String> {
        let Some(ekm) = self.ekm else { return Ok(Some(0)) };
        let key_text = match self.algorithm {
            AlgorithmKind::Content { .. } => item.key.to_text(),
            _ => item.entries.first().map_or_else(String::new, |e| e.name.clone()),
        };
        match ekm.lookup_index(&item.name, &key_text) {
            Ok(g) => Ok(Some(g)),
            Err(e) => {
                let object = self.objects.get(item.shard as usize).map_or("?", String::as_str);
                let msg = format!("ekm_file: record {:?} of {object:?}: {e}", item.name);
                match self.reaction {
                    Reaction::Ignore => Ok(None),
                    Reaction::Warn => {
                        warn(format!("{msg}; the record is left out"));
                        Ok(None)
                    }
                    Reaction::Abort => Err(msg),
                }
            }
        }
    }
}

/// What a job will do, decided before any work (everything here can be refused up front).
pub struct Plan {
    /// Input object names, in input order (the index is a record's `shard`).
    pub objects: Arc<Vec<String>>,
    /// The algorithm with the shuffle seed resolved.
    pub algorithm: AlgorithmKind,
    pub seed: Option<u64>,
    pub ekm: Option<crate::ekm::Ekm>,
    /// Output shard names: one group per template (one without an external key map).
    pub groups: Vec<Group>,
}

/// Plan a job: input names, the resolved algorithm, the external key map and the output groups; refuses
/// an output that could overwrite an input.
pub fn plan_job(spec: &JobSpec, env: &JobEnv, warn: &(dyn Fn(String) + Sync)) -> Result<Plan, JobError> {
    let objects = Arc::new(match &spec.input {
        crate::spec::InputSelection::Prefix(prefix) => {
            let listed = env.input.list(prefix).map_err(|e| {
                JobError::Failed(format!("input_format.prefix {prefix:?}: listing {}: {e}", env.input.name()))
            })?;
            let names = spec.select_listed(listed);
            if names.is_empty() {
                return Err(JobError::Refused(format!(
                    "input_format.prefix {prefix:?}: no {} object in {}",
                    spec.input_extension_text,
                    env.input.name()
                )));
            }
            names
        }
        _ => spec.input_names()?,
    });
    let mut algorithm = spec.algorithm.kind.clone();
    let mut seed_used = None;
    if let AlgorithmKind::Shuffle { seed } = &mut algorithm {
        let s = seed.unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            warn(format!("shuffle without a seed: using seed {now} (pass it to repeat this order)"));
            now
        });
        *seed = Some(s);
        seed_used = Some(s);
    }
    let ekm = match (&spec.ekm, &env.ekm_text) {
        (Some(src), Some(text)) => {
            let (ekm, w) = crate::ekm::parse_ekm(text, &src.separator, spec.reactions.ekm_malformed_line)
                .map_err(|e| JobError::Refused(format!("ekm_file {}: {e}", src.location)))?;
            w.into_iter().for_each(&warn);
            Some(ekm)
        }
        (Some(src), None) => return Err(JobError::Refused(format!("ekm_file {}: not loaded", src.location))),
        _ => None,
    };
    let groups: Vec<Group> = match (&ekm, &spec.output_format) {
        (Some(ekm), _) => ekm
            .shard_templates()
            .iter()
            .map(|t| {
                // EKM names are used as written: one whose extension names another format than the
                // output's would hold bytes its name lies about (a zip called `.tar`).
                if let Some(f) = shardio::Format::from_name(t)
                    && f != spec.output_extension
                {
                    return Err(JobError::Refused(format!(
                        "ekm_file: output shard template {t:?} names a {} shard but the output format is {} \
                         (output_extension {:?}); rename the shards in the key map or set output_extension",
                        f.extension(),
                        spec.output_extension.extension(),
                        spec.output_extension_text
                    )));
                }
                crate::template::Template::parse(t)
                    .map(|t| Group::new(t, None))
                    .map_err(|e| JobError::Refused(format!("ekm_file: output shard template {t:?}: {e}")))
            })
            .collect::<Result<_, _>>()?,
        (None, Some(t)) => vec![Group::new(t.clone(), Some(spec.output_extension_text.clone()))],
        (None, None) => return Err(JobError::Refused("output_format: required without ekm_file".into())),
    };
    refuse_overwrite(env, &objects, &groups)?;
    Ok(Plan { objects, algorithm, seed: seed_used, ekm, groups })
}

/// Fail before any work when a bucket cannot be used (an object store's bucket missing or unreachable);
/// the output bucket is not checked in a dry run, which writes nothing.
pub fn check_buckets(env: &JobEnv, dry_run: bool) -> Result<(), JobError> {
    let output = (!dry_run).then_some(&env.output);
    for (what, b) in std::iter::once(("input", &env.input)).chain(output.map(|o| ("output", o))) {
        b.check().map_err(|e| JobError::Failed(format!("{what} bucket {}: {e}", b.name())))?;
    }
    Ok(())
}

/// The cut rule: a record count, a minimum size, or (neither given) the total content over the output
/// template's name count, as AIStore does.
pub fn cut_rule(spec: &JobSpec, groups: &[Group], total_bytes: u64) -> Cut {
    match (spec.output_shard_records, spec.output_shard_size) {
        (Some(n), _) if n > 0 => Cut::Records(n),
        (_, Some(n)) if n > 0 => Cut::Size(n),
        _ => {
            let count = groups.first().and_then(|g| g.template.count()).unwrap_or(1).max(1);
            Cut::Size(total_bytes.div_ceil(count).max(1))
        }
    }
}

/// The job's temp folder (`dsort-job-<pid>-*` under `--tmp-dir` or the system temp folder), after
/// removing those of dead jobs. Removed when dropped.
pub fn job_temp_dir(env: &JobEnv) -> Result<JobTempDir, JobError> {
    let tmp_parent = env.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    JobTempDir::new_in(&tmp_parent)
        .map_err(|e| JobError::Failed(format!("temp folder in {}: {e}", tmp_parent.display())))
}

/// A job's temp folder, owned through an exclusive `flock` on its [`LOCK_FILE`] for as long as this value
/// lives: the lock, not a pid, says the job is alive, so a `--tmp-dir` shared between containers (other
/// PID namespaces, where a pid means nothing) or a recycled pid never makes a live job's folder look
/// dead. The kernel drops the lock when the process dies, however it dies. Removed when dropped.
#[derive(Debug)]
pub struct JobTempDir {
    path: PathBuf,
    _lock: std::fs::File,
}

/// The lock file inside each job temp folder.
pub const LOCK_FILE: &str = "lock";
/// Prefix of a temp folder being set up: its lock is taken before it is renamed to [`TMP_PREFIX`]`*`, so
/// no folder under that prefix is ever seen unlocked while its job lives.
const INIT_PREFIX: &str = ".dsort-job-init-";
/// Age after which a folder being set up that still has no lock file is taken for dead.
const INIT_GRACE_SECS: u64 = 60;

impl JobTempDir {
    /// Create a locked folder `dsort-job-<pid>-<random>` in `parent` (created if missing), after removing
    /// the folders of dead jobs there ([`remove_dead_jobs_temp`]).
    pub fn new_in(parent: &std::path::Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(parent)?;
        remove_dead_jobs_temp(parent);
        let init = tempfile::Builder::new().prefix(INIT_PREFIX).tempdir_in(parent)?;
        let lock = std::fs::OpenOptions::new().create_new(true).write(true).open(init.path().join(LOCK_FILE))?;
        // Blocking: another process's cleaner may hold it for an instant while it looks (and leaves it).
        lock.lock()?;
        let suffix = init
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(INIT_PREFIX))
            .unwrap_or_default()
            .to_string();
        let path = parent.join(format!("{TMP_PREFIX}{}-{suffix}", std::process::id()));
        std::fs::rename(init.path(), &path)?;
        let _ = init.keep(); // renamed: nothing left to remove at the old name
        Ok(JobTempDir { path, _lock: lock })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for JobTempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Extract the input shards `indices` on `workers` threads, handing each shard's records to `push` (from
/// the worker threads; it may block, e.g. while a sorter spills) and keeping decoded copies by shard index.
/// Returns the extraction totals (records, entries, bytes, shards, spilled bytes) and the decoded copies.
pub fn extract_shards(
    ectx: &ExtractCtx<'_>,
    indices: &[u32],
    workers: usize,
    cancel: &AtomicBool,
    progress: &dyn Progress,
    push: &(dyn Fn(Vec<crate::key::RecordItem>) -> Result<(), crate::extsort::SortError> + Sync),
) -> Result<(JobSummary, Vec<Option<Decoded>>), JobError> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let decoded: Mutex<Vec<Option<Decoded>>> = Mutex::new((0..ectx.objects.len()).map(|_| None).collect());
    let totals = Mutex::new(JobSummary::default());
    let fail = |m: Option<String>| {
        if let Some(m) = m {
            failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(m);
        }
        cancel.store(true, Ordering::Relaxed);
    };
    std::thread::scope(|s| {
        for _ in 0..workers.max(1).min(indices.len().max(1)) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= indices.len() || cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = indices[k];
                    match ectx.extract(i) {
                        Outcome::Done(x) => {
                            {
                                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                                t.input_shards += u64::from(!x.skipped);
                                t.skipped_shards += u64::from(x.skipped);
                                t.records += x.records.len() as u64;
                                t.entries += x.entries;
                                t.bytes += x.bytes;
                                t.input_file_bytes += x.file_bytes;
                                t.spilled_bytes += x.spilled;
                            }
                            if let Some(d) = x.decoded {
                                decoded.lock().unwrap_or_else(|p| p.into_inner())[i as usize] = Some(d);
                            }
                            if let Err(e) = push_paid(push, x.records, x.memory) {
                                // A cancelled sorter is the user's Ctrl-C, not a failure of its own.
                                fail((!matches!(e, crate::extsort::SortError::Cancelled)).then(|| e.to_string()));
                                return;
                            }
                        }
                        Outcome::Failed(m) => {
                            fail(Some(m));
                            return;
                        }
                    }
                    progress.advance(Phase::Extract, 1);
                }
            });
        }
    });
    if let Some(m) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(JobError::Failed(m));
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(JobError::Cancelled);
    }
    let totals = totals.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((totals, decoded.into_inner().unwrap_or_else(|p| p.into_inner())))
}

/// Records handed to `push` at once by [`extract_shards`].
const PUSH_CHUNK: usize = 4096;

/// Push a shard's records by chunks, moving each chunk's memory from the extraction's payment (`paid`)
/// to the pusher (the sorter reserves it again as it buffers the records), so the same bytes are never
/// counted twice, nor left uncounted for more than a chunk.
fn push_paid(
    push: &(dyn Fn(Vec<crate::key::RecordItem>) -> Result<(), crate::extsort::SortError> + Sync),
    records: Vec<crate::key::RecordItem>,
    paid: Option<crate::memory::MemoryReservation>,
) -> Result<(), crate::extsort::SortError> {
    let Some(paid) = paid else { return push(records) };
    let inline = std::mem::size_of::<crate::key::RecordItem>();
    let mut records = records.into_iter();
    loop {
        let chunk: Vec<_> = records.by_ref().take(PUSH_CHUNK).collect();
        if chunk.is_empty() {
            return Ok(());
        }
        let heap: usize = chunk.iter().map(|r| r.mem_size() - inline).sum();
        paid.shrink((heap as u64).min(paid.size()));
        push(chunk)?;
    }
}

/// Prefix of per-job temp folders: `dsort-job-<pid>-<random>` (the pid is for people; ownership is the
/// folder's lock, see [`JobTempDir`]).
pub const TMP_PREFIX: &str = "dsort-job-";

/// Remove temp folders left by jobs that are gone (killed with SIGKILL, machine crash): a folder whose
/// [`LOCK_FILE`] can be locked, or that has none (left by a version before locks), has no live owner.
/// A folder whose lock is held is never touched, whatever process or container holds it.
pub fn remove_dead_jobs_temp(parent: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let (job, init) = (name.starts_with(TMP_PREFIX), name.starts_with(INIT_PREFIX));
        if !(job || init) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = e.path();
        // A folder being set up has its lock file unlocked, or none, for an instant (between creating the
        // file and locking it): only one still so a minute on was left by a process killed in that instant.
        let stale = || {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > std::time::Duration::from_secs(INIT_GRACE_SECS)))
        };
        match std::fs::File::open(dir.join(LOCK_FILE)) {
            // Held while removing, so no other cleaner races this one.
            Ok(lock) if lock.try_lock().is_ok() => {
                if job || stale() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if job || stale() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            Err(_) => {}
        }
    }
}

/// Refuse, before any work, an output template that could name an input object in the same bucket.
fn refuse_overwrite(env: &JobEnv, objects: &[String], groups: &[Group]) -> Result<(), JobError> {
    if env.input.identity() != env.output.identity() {
        return Ok(());
    }
    for g in groups {
        // In input order, so the message names the first input at risk (the same one every run).
        for name in objects {
            let bare_match = g.template.could_name(name);
            let ext_match = g
                .append_ext
                .as_deref()
                .is_some_and(|ext| name.strip_suffix(ext).is_some_and(|stem| g.template.could_name(stem)));
            if bare_match || ext_match {
                return Err(JobError::Refused(format!(
                    "output_format {:?} would overwrite input shard {name:?} (same bucket); choose another name or bucket",
                    g.template.as_str()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::synth::{GenSpec, generate};
    use std::path::Path;

    pub(crate) fn test_env(input: &Path, output: &Path, tmp: &Path) -> JobEnv {
        JobEnv {
            input: Arc::new(shardio::LocalBucket::new(input)),
            output: Arc::new(shardio::LocalBucket::new(output)),
            tmp_dir: Some(tmp.to_path_buf()),
            concurrency: 2,
            ekm_text: None,
            progress: Arc::new(NoProgress),
            cancel: Arc::new(AtomicBool::new(false)),
            tar_flavor: shardio::TarFlavor::Pax,
        }
    }

    /// `n` shards of `records` records each, named `s-{0..n-1}{ext}`, in `dir`.
    pub(crate) fn shards(dir: &Path, ext: &str, n: usize, records: u64, size: (u64, u64)) -> Vec<String> {
        generate(&GenSpec {
            output: format!("{}/s-{{0..{}}}{ext}", dir.display(), n - 1),
            records_per_shard: records,
            record_size: size,
            exts: vec![".jpg".into(), ".cls".into()],
            tar_flavor: shardio::TarFlavor::Pax,
            seed: 5,
            concurrency: 2,
        })
        .unwrap();
        (0..n).map(|i| format!("s-{i}{ext}")).collect()
    }

    pub(crate) fn spec_of(names: &[String], extra: serde_json::Value) -> JobSpec {
        let mut spec = serde_json::json!({
            "input_bck": {"name": "in"}, "input_format": {"objnames": names},
            "output_format": "o-{000..999}.tar", "output_shard_size": "20KiB",
            "algorithm": {"kind": "shuffle", "seed": "7"},
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        crate::spec::parse_spec(&spec.to_string(), true).unwrap().spec
    }

    /// Every file of `dir` by name, with its bytes (outputs compared byte for byte).
    pub(crate) fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
            })
            .collect()
    }

    /// A local folder that reports requests, as an object store does.
    struct Counted(shardio::LocalBucket, &'static str, u64);

    impl Bucket for Counted {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn identity(&self) -> String {
            self.0.identity()
        }
        fn local_path(&self, object: &str) -> Option<PathBuf> {
            self.0.local_path(object)
        }
        fn stat(&self, object: &str) -> shardio::Result<Option<u64>> {
            self.0.stat(object)
        }
        fn open(&self, object: &str) -> shardio::Result<Box<dyn shardio::ObjectRead>> {
            self.0.open(object)
        }
        fn read_ranges(&self, object: &str, ranges: &[std::ops::Range<u64>]) -> shardio::Result<Vec<Vec<u8>>> {
            self.0.read_ranges(object, ranges)
        }
        fn list(&self, prefix: &str) -> shardio::Result<Vec<String>> {
            self.0.list(prefix)
        }
        fn put_file(&self, object: &str, file: &Path) -> shardio::Result<()> {
            self.0.put_file(object, file)
        }
        fn delete(&self, object: &str) -> shardio::Result<()> {
            self.0.delete(object)
        }
        fn create(&self, object: &str, staging: &Path) -> shardio::Result<shardio::PendingObject> {
            self.0.create(object, staging)
        }
        fn requests(&self) -> Option<(String, shardio::RequestCounts)> {
            let n = self.2;
            Some((self.1.into(), shardio::RequestCounts { get_requests: n, get_bytes: 10 * n, ..Default::default() }))
        }
    }

    #[test]
    fn requests_are_summed_by_bucket_and_absent_without_object_stores() {
        let local: Arc<dyn Bucket> = Arc::new(shardio::LocalBucket::new("/nowhere"));
        let summary = JobSummary { s3: bucket_requests(&[&local, &local]), ..JobSummary::default() };
        let json = serde_json::to_value(&summary).unwrap();
        assert!(json.get("s3").is_none(), "no S3 bucket, no s3 key: {json}");
        let a: Arc<dyn Bucket> = Arc::new(Counted(shardio::LocalBucket::new("/a"), "bkt", 1));
        let b: Arc<dyn Bucket> = Arc::new(Counted(shardio::LocalBucket::new("/b"), "bkt", 2));
        let c: Arc<dyn Bucket> = Arc::new(Counted(shardio::LocalBucket::new("/c"), "other", 4));
        // `a` given twice is one handle: counted once; `a` and `b` are two handles on one bucket: summed.
        let summary = JobSummary { s3: bucket_requests(&[&a, &b, &a, &local, &c]), ..JobSummary::default() };
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["s3"]["bkt"]["get_requests"], 3, "{json}");
        assert_eq!(json["s3"]["bkt"]["get_bytes"], 30, "{json}");
        assert_eq!(json["s3"]["other"]["get_requests"], 4, "{json}");
        let keys: Vec<&String> = json["s3"]["bkt"].as_object().unwrap().keys().collect();
        let want = ["get_bytes", "get_requests", "list_requests", "other_requests", "put_bytes", "put_requests"];
        assert_eq!(keys, want, "the documented fields");
    }

    #[test]
    fn compressed_shards_whose_decoded_copies_exceed_the_budget_reshard_identically() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("in");
        // 6 shards of ~1.2 MiB decoded each: 7 MiB of decoded copies for a 2 MiB budget.
        let names = shards(&input, ".tar.gz", 6, 120, (8000, 12000));
        let tmp = root.path().join("tmp");
        let run = |mem: &str, out: &str| {
            let spec = spec_of(&names, serde_json::json!({"max_mem_usage": mem}));
            let s = run_job(&spec, &test_env(&input, &root.path().join(out), &tmp)).unwrap();
            assert_eq!(s.records, 720, "{mem}");
            s
        };
        let ample = run("256MiB", "ample");
        let small = run("2MiB", "small");
        assert!(ample.spilled_bytes == 0 && small.spilled_bytes > 0, "{} {}", ample.spilled_bytes, small.spilled_bytes);
        assert!(small.peak_reserved <= small.memory_budget, "{} > {}", small.peak_reserved, small.memory_budget);
        assert_eq!(files(&root.path().join("small")), files(&root.path().join("ample")));
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "temp folders removed");
    }

    #[test]
    fn warnings_are_kept_up_to_a_bound_and_the_rest_counted() {
        let w = Warnings::default();
        (0..MAX_KEPT_WARNINGS + 5).for_each(|i| w.push(format!("w{i}")));
        let list = w.into_list();
        assert_eq!(list.len(), MAX_KEPT_WARNINGS + 1);
        assert_eq!(list[MAX_KEPT_WARNINGS - 1], format!("w{}", MAX_KEPT_WARNINGS - 1));
        assert!(list[MAX_KEPT_WARNINGS].starts_with("... and 5 more warnings"), "{}", list[MAX_KEPT_WARNINGS]);
        let few = Warnings::default();
        few.push("one".into());
        assert_eq!(few.into_list(), ["one"]);
    }

    #[test]
    fn an_external_key_map_is_paid_from_the_pool() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("in");
        let names = shards(&input, ".tar", 1, 4, (10, 20));
        let ekm = "ekm.txt";
        let spec = spec_of(&names, serde_json::json!({"ekm_file": ekm, "ekm_file_sep": "\t", "max_mem_usage": "4MiB"}));
        let mut env = test_env(&input, &root.path().join("out"), &root.path().join("tmp"));
        // 100k names (~8 MiB of table and names) for a 4 MiB budget.
        env.ekm_text = Some("s-0/{0..99999}\tout-{0..9}.tar\n.*\tout-{0..9}.tar\n".into());
        let err = run_job(&spec, &env).unwrap_err();
        let JobError::Refused(m) = err else { panic!("{err:?}") };
        assert!(m.contains("external key map's record names") && m.contains("of the 4 MiB budget"), "{m}");
        // With room for it, the job runs.
        let spec =
            spec_of(&names, serde_json::json!({"ekm_file": ekm, "ekm_file_sep": "\t", "max_mem_usage": "64MiB"}));
        run_job(&spec, &env).unwrap();
    }

    #[test]
    fn a_budget_without_the_sorters_headroom_is_refused_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("in");
        let names = shards(&input, ".tar", 1, 4, (10, 20));
        let spec = spec_of(&names, serde_json::json!({"max_mem_usage": "100KiB"}));
        let err = run_job(&spec, &test_env(&input, &root.path().join("out"), &root.path().join("tmp"))).unwrap_err();
        let JobError::Refused(m) = err else { panic!("{err:?}") };
        assert!(m.contains("record sorter's spill buffers") && m.contains("192 KiB") && m.contains("100 KiB"), "{m}");
    }

    #[test]
    fn temp_folders_are_owned_by_their_lock_not_by_a_pid() {
        let parent = tempfile::tempdir().unwrap();
        let live = JobTempDir::new_in(parent.path()).unwrap();
        assert!(live.path().join(LOCK_FILE).is_file());
        // A live job in another PID namespace: its folder names a pid that does not exist here, but
        // its lock is held (by another open file description, as another process would hold it).
        let other = parent.path().join(format!("{TMP_PREFIX}999999999-abc"));
        std::fs::create_dir(&other).unwrap();
        let held = std::fs::File::create(other.join(LOCK_FILE)).unwrap();
        held.lock().unwrap();
        // A dead job (its lock free) and one from before locks (no lock file), both with our own pid.
        let dead = parent.path().join(format!("{TMP_PREFIX}{}-dead", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::File::create(dead.join(LOCK_FILE)).unwrap();
        let legacy = parent.path().join(format!("{TMP_PREFIX}1-old"));
        std::fs::create_dir_all(legacy.join("spill")).unwrap();
        // Set-up folders: one whose process died before the rename two minutes ago (lock free), two being set
        // up now (no lock file yet; a lock file not locked yet): those stay.
        let died = parent.path().join(format!("{INIT_PREFIX}died"));
        std::fs::create_dir(&died).unwrap();
        std::fs::File::create(died.join(LOCK_FILE)).unwrap();
        let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        std::fs::File::open(&died).unwrap().set_modified(two_minutes_ago).unwrap();
        let young = parent.path().join(format!("{INIT_PREFIX}young"));
        std::fs::create_dir(&young).unwrap();
        let unlocked = parent.path().join(format!("{INIT_PREFIX}unlocked"));
        std::fs::create_dir(&unlocked).unwrap();
        std::fs::File::create(unlocked.join(LOCK_FILE)).unwrap();
        std::fs::File::open(&unlocked).unwrap().set_modified(std::time::SystemTime::now()).unwrap();

        let next = JobTempDir::new_in(parent.path()).unwrap();
        assert!(live.path().is_dir(), "a live job's folder stays");
        assert!(other.is_dir(), "a folder whose lock is held stays, whatever pid it names");
        assert!(!dead.exists() && !legacy.exists(), "folders without a live owner are removed");
        assert!(!died.exists(), "a set-up folder whose lock is free a minute on is removed");
        assert!(young.exists(), "a folder being set up right now stays");
        assert!(unlocked.exists(), "a folder whose owner has not locked its lock file yet stays");
        drop(held);
        let live_path = live.path().to_path_buf();
        drop(live);
        assert!(!live_path.exists(), "a job's folder goes with it");
        remove_dead_jobs_temp(parent.path());
        assert!(!other.exists(), "once its owner is gone, the next cleanup removes it");
        assert!(next.path().is_dir());
    }
}
