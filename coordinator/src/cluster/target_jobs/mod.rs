//! A target's side of a distributed job: the steps of [`dsort::dist::simulate`], each one an intra-cluster
//! route the coordinator (or a peer) calls. All routes are under `/v1/sort/jobs/{id}/` on the target:
//!
//! | method, op | body → reply | step |
//! |---|---|---|
//! | `POST init` | [`InitMsg`] JSON → samples (frames, see below) | plan, extract the input shards assigned to this target (`holders`: it holds them; else the ones it owns by HRW) into the local sorter, sample |
//! | `POST distribute` | splitters (frames) → `""` | finish the local sort, send each record to its range owner (`records`) |
//! | `POST records` | records (frames, one streaming body per sender) → `""` | (from peers) push into this target's range sorter |
//! | `POST sortrange` | → `"<records>"` | finish the range sorter into a local file (`range.bin`); keep the record sizes |
//! | `POST cut` | [`CutMsg`] JSON → [`CutReply`] JSON | place this range's records with the carry-in; the carry-out and the output shards this range placed records in |
//! | `POST create` | [`CreateMsg`] JSON → `"<shards>"` | write the output shards this target owns (HRW) into the staging folder as their records arrive from the ranges that cut them (`shardrecs`); local bytes read locally, others pulled a window of records at a time (`bytes`) |
//! | `POST shardrecs?g=&k=` | → records (frames) | (from creators) stream output shard `k` of group `g`'s records of this range, in order, read from `range.bin` a batch at a time |
//! | `POST commit` | → `""` | publish the staged shards (renames, from the commit plan; idempotent: asked again after a crash, a job unknown here is published from its plan), once the coordinator decided |
//! | `POST bytes` | wanted entries → their bytes, concatenated | (from creators) read entry bytes of input shards this target extracted (403 for any other, before a byte is sent) |
//! | `GET info` | → [`JobInfo`] | |
//! | `GET /v1/sort/jobs` | → `[HeldJob]` | the jobs running here (a coordinator finds orphans with it) |
//! | `GET progress` | → `"<ticks>"` | work done so far (grows while the target works on the job; the coordinator's stall check) |
//! | `GET /metrics` | Prometheus text: `dsort_network_bytes_sent_total`, `dsort_network_bytes_received_total` (entry bytes moved between targets for creation) | |
//! | `DELETE abort` | → `""` | cancel, remove temp files (marks the job aborted unless it finished) |
//! | `DELETE cleanup` | → `""` | remove temp files once every creator is done |
//! | `DELETE remove` | → `""` | forget the job (the coordinator's `DELETE /v1/sort`) |
//!
//! Every route refuses (400) a job id that is not 1 to 64 of `[A-Za-z0-9_-]` before its handler runs (the
//! job's staging and temp folders are named after it), and has a body limit (413): 320 MiB for `init`, 64 MiB
//! for the frame messages, `cut`, `create` and `bytes`, 64 KiB for the rest; `records` streams.
//!
//! Frames: each a `u32` little-endian length (at most [`MAX_FRAME`]) and a [`RecordCodec`]-encoded record. The `init` reply is two
//! `u64` (records seen, content bytes) then the sample's frames. A wanted entry is `u32` shard, `u8` kind
//! (0 input, 1 decoded), `u64` offset, `u64` size.
//!
//! The input bucket's assigned objects are linked (symlinks) into one folder of the job's temp dir so the
//! single-folder extractor and `Sources` read them where the object store keeps them (any mountpath).
//!
//! Layout: this module holds a job's state ([`TJob`]), the job table, the routes and the control calls
//! (`info`, `progress`, `abort`, `cleanup`, `remove`, the lease); each step lives in the module named after it
//! ([`extract`], [`range`], [`cut`], [`create`], [`commit`], [`streams`]); the message types are shared with
//! the coordinator in [`super::messages`].

mod commit;
mod create;
mod cut;
mod extract;
mod range;
mod streams;

pub use super::messages::{HeldJob, MAX_FRAME};
pub use commit::{STAGING, plans_dir, staging_dir};
use commit::{discard_plan, read_plan};

use super::api::TargetInfo;
use super::client::Client;
use super::error::{ApiError, ClusterError};
use super::jobinfo::{Bck, JobInfo, rfc3339};
use super::messages::*;
use super::metrics::{JobStates, NodeMetrics, Work};
use super::names::{check_bucket, check_object};
use super::store::{ObjectStore, SYSTEM_DIR};
use super::target::Target;
use crate::placement;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use dsort::create::{CreateCtx, Sources, write_shard_staged};
use dsort::dist::{Carry, Reservoir, SAMPLES_PER_TARGET, extract_local, range_of};
use dsort::extract::{Decoded, ExtractCtx};
use dsort::extsort::{ExternalSorter, SortCodec};
use dsort::job::{EkmRouter, JobEnv, JobError, cut_rule, job_temp_dir, plan_job};
use dsort::key::{Loc, RecordCodec, RecordItem};
use dsort::memory::{MemoryPool, budget};
use dsort::spec::{AlgorithmKind, JobSpec};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Body limits of the job routes: `init` carries the spec, the input names and the external key map; the
/// frame messages (`distribute`), `cut`, `create` and `bytes` requests are bounded by their batches; the other
/// routes take no body. `records` streams (any length: a frame at a time, each at most [`MAX_FRAME`]).
const INIT_BODY: usize = super::jobs::EKM_MAX_BYTES + (64 << 20);
const MESSAGE_BODY: usize = 64 << 20;
const CONTROL_BODY: usize = 64 << 10;

/// Why a step of a job failed on this target: the route answers 400 with its message (naming this target),
/// and callers tell an abort, which is no failure of its own, from the rest by its kind.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    /// The job was aborted here (by the coordinator, a lease that ran out, a shutdown): the reason.
    #[error("{0}")]
    Aborted(String),
    /// The engine refused or failed (spec, extraction, creation): its message names shard and entry.
    #[error(transparent)]
    Job(#[from] dsort::job::JobError),
    #[error("{0}")]
    Spec(#[from] dsort::spec::SpecErrors),
    #[error(transparent)]
    Bucket(#[from] crate::buckets::BucketError),
    #[error("sorting record metadata: {0}")]
    Sort(#[from] dsort::extsort::SortError),
    /// A job refused at its start: the jobs already running leave too little of the pool.
    #[error("not enough memory for another job on this target: {0}")]
    NoMemory(dsort::extsort::SortError),
    /// A peer call, the object store or a name check failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A name of the spec's `field` that this target's store refuses.
    #[error("{field}: {source}")]
    Name { field: &'static str, source: ClusterError },
    /// A shard read or written through a bucket (an S3 upload, a local object); its error names the object.
    #[error("{what}: {source}")]
    Shard { what: String, source: Box<shardio::Error> },
    /// A local file: which one, and what the system said.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A message, stream or step order that breaks the protocol between the coordinator and the targets.
    #[error("{0}")]
    Protocol(String),
}

impl StepError {
    fn io(what: impl std::fmt::Display, source: std::io::Error) -> Self {
        StepError::Io { what: what.to_string(), source }
    }

    /// A file-system error on `path`.
    fn path(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |e| StepError::io(path.display(), e)
    }

    fn protocol(m: impl Into<String>) -> Self {
        StepError::Protocol(m.into())
    }
}

type StepResult<T> = Result<T, StepError>;

/// One job on this target.
struct TJob {
    id: String,
    spec: JobSpec,
    objects: Arc<Vec<String>>,
    codec: Arc<RecordCodec>,
    targets: Vec<TargetInfo>,
    me: usize,
    /// Who extracted each input shard (see [`InitMsg::holders`]); `None`: its HRW owner.
    holders: Option<Vec<u32>>,
    groups: Vec<dsort::create::Group>,
    cancel: Arc<AtomicBool>,
    tmp: Mutex<Option<dsort::job::JobTempDir>>,
    tmp_path: PathBuf,
    farm: PathBuf,
    /// The input bucket: the farm (a folder of links to the assigned objects) for `ais`, or an S3 bucket.
    input: Arc<dyn shardio::Bucket>,
    input_s3: bool,
    /// The output bucket when it is an object store (shards are uploaded at commit); `None`: `ais`.
    output_s3: Option<Arc<dyn shardio::Bucket>>,
    pool: Arc<MemoryPool>,
    local: Mutex<Option<ExternalSorter<RecordCodec>>>,
    decoded: Mutex<Vec<Option<Decoded>>>,
    range: Mutex<Option<ExternalSorter<RecordCodec>>>,
    /// Per record of this range, in order (after `sortrange`): content size, output group (`u32::MAX`: the
    /// record is left out) and frame length in `range.bin` (its bytes after the 4-byte header).
    sizes: Mutex<RangeSizes>,
    /// Where each output shard's records of this range lie in `range.bin` (after `cut`): what `shardrecs`
    /// serves to the shard's creator.
    spans: Mutex<HashMap<(u32, u64), range::Span>>,
    /// The memory this job's outgoing streams may hold in flight here (reserved at the first one).
    serving: Mutex<Option<Arc<streams::Serving>>>,
    /// The floor of the serving budget, reserved at the job's start until `serving` takes it.
    serving_floor: Mutex<Option<dsort::memory::MemoryReservation>>,
    /// Memory maps of the files `bytes` requests read (input shards, spilled decoded copies), by (kind,
    /// shard), kept across requests: mapping a file per request cost more than sending its few records.
    /// At most [`streams::MAX_MAPS`]; page cache, not pool memory.
    maps: Mutex<HashMap<(u8, usize), Bytes>>,
    ekm: Option<dsort::ekm::Ekm>,
    algorithm: AlgorithmKind,
    info: Mutex<JobInfo>,
    phase_start: Mutex<Instant>,
    /// Output shards written whole into the job's staging folders, not yet visible (see [`TargetJobs::do_commit`]).
    staged: Mutex<Vec<String>>,
    /// Output objects this target published (removed if the job aborts).
    published: Mutex<Vec<String>>,
    /// Why the job was aborted here when it was not the coordinator's call (this target shutting down).
    abort_reason: Mutex<Option<String>>,
    /// The input shards (indices into `objects`) this target extracted for the job: the only ones whose
    /// bytes it serves (`bytes`).
    held: std::collections::HashSet<u32>,
    /// The commit step began: the coordinator decided to publish; nothing may abort the job here any more.
    commit_started: AtomicBool,
    /// The coordinator was unreachable for the lease after this target had staged all of the job's shards
    /// (its plan written): the job's working state is released, its staging and plan are kept until the
    /// coordinator, once it answers, commits the job (it may have decided to already) or aborts it.
    parked: AtomicBool,
    /// Work done so far, in no particular unit (a record, a chunk, a shard): the coordinator reads it
    /// (`progress`) to tell a slow target from a stalled one.
    ticks: AtomicU64,
}

/// Extraction's progress as ticks of its job.
struct Ticks<'a>(&'a AtomicU64);

impl dsort::progress::Progress for Ticks<'_> {
    fn start(&self, _: dsort::progress::Phase, _: Option<u64>, _: &'static str) {}
    fn advance(&self, _: dsort::progress::Phase, _: u64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn finish(&self, _: dsort::progress::Phase) {}
    fn warn(&self, _: &str) {}
}

impl TJob {
    fn info(&self) -> std::sync::MutexGuard<'_, JobInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the job may go on (every loop of every step asks, so each call is also a tick of progress).
    fn check(&self) -> StepResult<()> {
        self.ticks.fetch_add(1, Ordering::Relaxed);
        if self.cancel.load(Ordering::Relaxed) {
            let reason = self.abort_reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Err(StepError::Aborted(reason.unwrap_or_else(|| "aborted".into())))
        } else {
            Ok(())
        }
    }

    /// Work on the range sorter, which lives from `init` to `sortrange`.
    fn with_range<T>(&self, f: impl FnOnce(&mut ExternalSorter<RecordCodec>) -> T) -> StepResult<T> {
        let mut g = self.range.lock().unwrap_or_else(|p| p.into_inner());
        let sorter =
            g.as_mut().ok_or_else(|| StepError::protocol("the range sort is over (records after sortrange)"))?;
        Ok(f(sorter))
    }

    /// Running here: neither finished (cleaned up) nor aborted.
    fn is_active(&self) -> bool {
        !self.info().archived
    }

    /// Its output is published here, or being published (the commit step began: the coordinator decided),
    /// whatever the other targets do.
    fn is_committed(&self) -> bool {
        if self.commit_started.load(Ordering::Relaxed) {
            return true;
        }
        let info = self.info();
        info.metrics.shard_creation.phase.finished && !info.aborted
    }

    /// The target that extracted input shard `shard` (creators read its records' bytes there).
    fn holder(&self, shard: u32) -> usize {
        if let Some(h) = self.holders.as_ref().and_then(|h| h.get(shard as usize)) {
            return *h as usize;
        }
        let ids: Vec<&str> = self.targets.iter().map(|t| t.id.as_str()).collect();
        let obj = self.objects.get(shard as usize).map_or("", String::as_str);
        placement::owner_index(&placement::object_key(&self.spec.input_bck.name, obj), &ids).unwrap_or(0)
    }

    /// Drop everything the job holds but its info (decoded copies, sorters, temp files).
    fn release(&self) {
        self.decoded.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.local.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.range.lock().unwrap_or_else(|p| p.into_inner()).take();
        *self.sizes.lock().unwrap_or_else(|p| p.into_inner()) = RangeSizes::default();
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.serving.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.serving_floor.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.maps.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.tmp.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Remove the job's staging folders (every mountpath), shards written but never published, and its commit
    /// plan, which names them (an aborted job's plan would otherwise stay until the target restarts).
    fn remove_staging(&self, store: &ObjectStore) {
        self.staged.lock().unwrap_or_else(|p| p.into_inner()).clear();
        discard_plan(store, &self.id);
    }
}

/// A range's per-record sizes (see `TJob::sizes`) with the pool memory that pays for them.
#[derive(Default)]
struct RangeSizes {
    rows: Vec<(u64, u32, u32)>,
    _paid: Option<dsort::memory::MemoryReservation>,
}

/// The jobs of one target.
pub struct TargetJobs {
    target: Arc<Target>,
    jobs: Mutex<HashMap<String, Arc<TJob>>>,
    /// Jobs aborted before their `init` registered them here (an abort racing the start).
    aborted_early: Mutex<std::collections::HashSet<String>>,
    /// This target's Prometheus metrics (`GET /metrics`).
    metrics: Arc<NodeMetrics>,
    /// The memory of every job on this target: one pool, so jobs running at once share the budget
    /// (`--max-mem`, default 80% of the memory limit) instead of each taking all of it.
    pool: Arc<MemoryPool>,
    /// Signalled whenever a job stops running here (finished, aborted or removed).
    job_ended: tokio::sync::Notify,
    /// Held while publishing (a commit, or a plan recovered after a restart), so the two never interleave.
    publishing: Mutex<()>,
    /// Slots of the I/O pool: the short blocking work of the streams between targets (a batch of a record
    /// stream, a file mapped for a `bytes` stream, a batch of a `shardrecs` stream) takes one, so streams hold no thread
    /// between batches and the threads they use stay bounded whatever the number of peers and jobs.
    io_slots: Arc<tokio::sync::Semaphore>,
}

/// Slots of the I/O pool ([`TargetJobs::io`]): twice the cores, at least 4.
fn io_slots() -> usize {
    (2 * std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)).max(4)
}

type Reply = Result<Bytes, ApiError>;

/// A sorter on the target's shared pool: its least memory reserved now (a job is refused at its start when
/// the jobs already running leave too little), and its buffer leaves a quarter of the pool free, so that the
/// jobs running at once keep room to work.
fn sorter(s: ExternalSorter<RecordCodec>) -> StepResult<ExternalSorter<RecordCodec>> {
    let keep = s.pool_limit() / 4;
    let mut s = s.leaving_free(keep);
    s.reserve_headroom().map_err(StepError::NoMemory)?;
    Ok(s)
}

/// Parallel extractions or creations on this target: its cores (as `dsort reshard`), at most the spec's
/// limit when it sets one.
fn concurrency(limit: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    if limit == 0 { cores } else { cores.min(limit) }
}

/// The failpoint settings of fault tests, read once: `DSORT_TEST_HOLD` (where to stop) and
/// `DSORT_TEST_HOLD_RELEASE` (a file whose existence releases the hold). Unset in production.
pub(crate) fn test_hold() -> &'static (Option<String>, Option<PathBuf>) {
    static HOLD: std::sync::OnceLock<(Option<String>, Option<PathBuf>)> = std::sync::OnceLock::new();
    HOLD.get_or_init(|| {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        (var("DSORT_TEST_HOLD"), var("DSORT_TEST_HOLD_RELEASE").map(PathBuf::from))
    })
}

/// Failpoint for fault tests: with `DSORT_TEST_HOLD=<phase>` (`extraction`, `sorting` or `creation`) in its
/// environment, a target stops in that phase of every job (after the first output shard, for `creation`)
/// until the job is aborted, or until the file named by `DSORT_TEST_HOLD_RELEASE` exists (then the job
/// goes on), so a test can kill or stop it there deterministically. Unset in production.
fn hold(job: &TJob, phase: &str) -> StepResult<()> {
    let (held, release) = test_hold();
    if held.as_deref() != Some(phase) {
        return Ok(());
    }
    eprintln!("dsort target: holding job {} in phase {phase} (DSORT_TEST_HOLD)", job.id);
    while !job.cancel.load(Ordering::Relaxed) {
        if release.as_ref().is_some_and(|f| f.exists()) {
            eprintln!("dsort target: releasing job {} (DSORT_TEST_HOLD_RELEASE)", job.id);
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    job.check()
}

impl TargetJobs {
    /// The jobs of `target`, all drawing from one pool: `--max-mem` of `limit` (the process's memory limit).
    pub fn new(target: Arc<Target>, limit: dsort::memory::MemoryLimit) -> Arc<Self> {
        let budget = budget(&limit, &target.max_mem.unwrap_or_default()).max(1 << 20);
        target.log(format!(
            "memory budget of all jobs: {} ({} of {}, {})",
            dsort::format_size(budget),
            target.max_mem.unwrap_or_default(),
            dsort::format_size(limit.bytes),
            limit.source
        ));
        Arc::new(TargetJobs {
            jobs: Mutex::new(HashMap::new()),
            aborted_early: Mutex::new(std::collections::HashSet::new()),
            metrics: Arc::new(NodeMetrics::new(target.id(), true)),
            pool: MemoryPool::new(budget),
            target,
            job_ended: tokio::sync::Notify::new(),
            publishing: Mutex::new(()),
            io_slots: Arc::new(tokio::sync::Semaphore::new(io_slots())),
        })
    }

    fn active_jobs(&self) -> Vec<Arc<TJob>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values().filter(|j| j.is_active()).cloned().collect()
    }

    /// Graceful shutdown (SIGTERM): take no new job, let the running ones finish for up to `grace` (until the
    /// coordinator's cleanup, so that this target does not leave between the job's commit and its end), then
    /// abort the rest here (no output of theirs stays published, their temp files go) after leaving the
    /// cluster with the reason, which the coordinator gives as the jobs' error when it aborts them on every
    /// other target. A job already committed here is left as it is. Returns when this target may stop serving.
    pub async fn drain(self: &Arc<Self>, grace: Duration) {
        self.target.set_draining().await;
        let idle = super::http::wait_until_idle(
            &self.job_ended,
            tokio::time::Instant::now() + grace,
            || self.active_jobs().len(),
            |n| self.target.log(format!("shutting down: waiting for {n} running job(s) (up to {grace:?})")),
        )
        .await;
        if idle {
            self.target.leave("shutting down").await;
            return;
        }
        let reason =
            format!("target {} shut down (SIGTERM) before the job finished (grace {grace:?})", self.target.id());
        self.target.leave(&reason).await;
        for job in self.active_jobs() {
            if job.is_committed() {
                // Published here, and maybe everywhere: the coordinator, not a leaving target, decides
                // whether the job failed (its abort, retried until answered, would remove these shards).
                self.target.log(format!("keeping the published output of job {} (committed here)", job.id));
                continue;
            }
            self.target.log(format!("aborting job {}: {reason}", job.id));
            *job.abort_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
            job.info().metrics.errors.push(reason.clone());
            let (me, id) = (self.clone(), job.id.clone());
            let _ = tokio::task::spawn_blocking(move || me.abort_job(&id)).await;
        }
    }

    /// The coordinator's lease: while heartbeats fail for longer than `lease` (the coordinator died or is cut
    /// off), every job running here is dropped (temp files, staging and memory released, marked aborted with
    /// the reason); a job already committed here keeps its output (see [`TargetJobs::drain`]). Runs until
    /// `shutdown`.
    pub async fn watch_lease(self: Arc<Self>, lease: Duration, shutdown: tokio_util::sync::CancellationToken) {
        let period = (lease / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = shutdown.cancelled() => return,
            }
            let silent = self.target.since_contact();
            if silent <= lease {
                continue;
            }
            for job in self.active_jobs() {
                let reason = format!(
                    "target {}: the coordinator was unreachable for {:.1?} (lease {lease:?}): job dropped",
                    self.target.id(),
                    silent
                );
                if job.parked.load(Ordering::Relaxed) {
                    continue;
                }
                if job.is_committed() {
                    self.target.log(format!("dropping job {}: {reason}", job.id));
                    self.end_job(job).await;
                    continue;
                }
                if !job.cancel.load(Ordering::Relaxed) && read_plan(&self.target.store, &job.id).is_some() {
                    // Every shard is staged here: the coordinator may have decided to commit while it was out
                    // of reach, and would then find nothing to publish. Keep the staging and the plan; the
                    // coordinator commits the job or aborts it (reconcile) once it answers.
                    job.parked.store(true, Ordering::Relaxed);
                    self.target.log(format!(
                        "job {}: the coordinator was unreachable for {silent:.1?} (lease {lease:?}): its shards \
                         stay staged until the coordinator commits or aborts it",
                        job.id
                    ));
                    let j = job.clone();
                    let _ = tokio::task::spawn_blocking(move || j.release()).await;
                    continue;
                }
                self.target.log(format!("dropping job {}: {reason}", job.id));
                *job.abort_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                job.info().metrics.errors.push(reason);
                let (me, id) = (self.clone(), job.id.clone());
                let _ = tokio::task::spawn_blocking(move || me.abort_job(&id)).await;
            }
        }
    }

    /// A job is over here (finished, or committed and its coordinator gone): release what it holds, keep its
    /// info (archived).
    async fn end_job(&self, job: Arc<TJob>) {
        let _ = tokio::task::spawn_blocking(move || {
            job.release();
            let mut info = job.info();
            info.archived = true;
            info.metrics.archived = true;
        })
        .await;
        self.job_ended.notify_waiters();
    }

    /// The job routes, each refusing (400) a job id that is not [`check_job_id`]'s before its handler runs,
    /// and each with its body limit (413 over it).
    pub fn routes(self: &Arc<Self>) -> Router {
        use axum::extract::DefaultBodyLimit;
        use commit::commit;
        use create::create;
        use cut::cut;
        use extract::init;
        use range::{distribute, records, shardrecs, sortrange};
        use streams::bytes_route;
        let p = |op: &str| format!("/v1/sort/jobs/{{id}}/{op}");
        let message = || DefaultBodyLimit::max(MESSAGE_BODY);
        Router::new()
            .route(&p("init"), post(init).layer(DefaultBodyLimit::max(INIT_BODY)))
            .route(&p("distribute"), post(distribute).layer(message()))
            .route(&p("records"), post(records))
            .route(&p("sortrange"), post(sortrange))
            .route(&p("cut"), post(cut).layer(message()))
            .route(&p("create"), post(create).layer(message()))
            .route(&p("shardrecs"), post(shardrecs))
            .route(&p("commit"), post(commit))
            .route(&p("bytes"), post(bytes_route).layer(message()))
            .route(&p("info"), get(info))
            .route(&p("progress"), get(progress))
            .route(&p("abort"), delete(abort))
            .route(&p("cleanup"), delete(cleanup))
            .route("/metrics", get(metrics))
            .route("/v1/sort/jobs", get(held_jobs))
            .route(&p("remove"), delete(remove))
            .route_layer(axum::middleware::from_fn(valid_job_id))
            .layer(DefaultBodyLimit::max(CONTROL_BODY))
            .with_state(self.clone())
    }

    fn job(&self, id: &str) -> Result<Arc<TJob>, ApiError> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| self.err(ClusterError::NotFound { what: format!("dsort job {id}") }))
    }

    fn err(&self, e: ClusterError) -> ApiError {
        ApiError { error: e, node: Some(format!("target {}", self.target.id())) }
    }

    fn failed(&self, job: &str, m: String) -> ApiError {
        self.err(ClusterError::BadRequest { what: format!("dsort job {job}"), reason: m })
    }

    fn peer(&self, t: &TargetInfo) -> StepResult<Client> {
        Ok(self.target.peer_client(t)?)
    }

    /// Run blocking work of a job; its error (text) becomes a 400 naming this target.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        id: &str,
        f: impl FnOnce(&Arc<Self>, &tokio::runtime::Handle) -> StepResult<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = self.clone();
        let handle = tokio::runtime::Handle::current();
        let id2 = id.to_string();
        // Held from the start, so a job removed (`rm`) while the worker runs is still cleaned up after it.
        let known = self.job(id).ok();
        // The clean-up runs in the worker itself, not after the await: a caller that hangs up (the coordinator
        // drops its phase calls when it aborts) drops this future, yet the worker runs on.
        let r = tokio::task::spawn_blocking(move || {
            let r = f(&me, &handle);
            // A worker still writing when the job was aborted can leave files in a folder the abort had
            // already removed (a removal racing a write leaves the folder): remove what is left now it stopped.
            if let Some(job) = known.or_else(|| me.job(&id2).ok())
                && job.cancel.load(Ordering::Relaxed)
            {
                let _ = std::fs::remove_dir_all(&job.tmp_path);
                job.remove_staging(&me.target.store);
            }
            r
        })
        .await
        .map_err(|e| StepError::protocol(format!("worker panicked: {e}")))
        .and_then(|r| r);
        r.map_err(|e| {
            let m = e.to_string();
            if let Ok(job) = self.job(id) {
                job.info().metrics.errors.push(format!("target {}: {m}", self.target.id()));
            }
            self.failed(id, m)
        })
    }

    /// [`TargetJobs::blocking`] work that is short (never waits on a peer), on a slot of the bounded I/O pool.
    async fn io<T: Send + 'static>(
        self: &Arc<Self>,
        id: &str,
        f: impl FnOnce(&Arc<Self>, &tokio::runtime::Handle) -> StepResult<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _slot = self.io_slots.acquire().await.map_err(|e| self.failed(id, format!("I/O pool: {e}")))?;
        self.blocking(id, f).await
    }

    /// Short blocking work that writes nothing of a job (mapping a file), on a slot of the I/O pool.
    async fn io_read<T: Send + 'static>(&self, f: impl FnOnce() -> StepResult<T> + Send + 'static) -> StepResult<T> {
        let _slot = self.io_slots.acquire().await.map_err(|e| StepError::protocol(format!("I/O pool: {e}")))?;
        tokio::task::spawn_blocking(f).await.map_err(|e| StepError::protocol(format!("worker panicked: {e}")))?
    }

    fn abort_job(&self, id: &str) {
        let job = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
        if job.is_none() {
            self.aborted_early.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string());
        }
        if let Some(job) = job {
            if job.commit_started.load(Ordering::Relaxed) {
                // Decided: the publish goes on (or resumes from the plan after a restart); never undone.
                self.target.log(format!("not aborting job {id}: its commit was decided and began"));
                return;
            }
            job.cancel.store(true, Ordering::Relaxed);
            let mut info = job.info();
            // The coordinator aborts only a job that did not finish everywhere.
            info.aborted = true;
            info.metrics.aborted = true;
            info.archived = true;
            info.metrics.archived = true;
            drop(info);
            // No partial output: what this target published for the job goes.
            let names = std::mem::take(&mut *job.published.lock().unwrap_or_else(|p| p.into_inner()));
            for n in names {
                let _ = match &job.output_s3 {
                    Some(out) => out.delete(&n).map_err(|e| e.to_string()),
                    None => self.target.store.delete(&job.spec.output_bck.name, &n).map_err(|e| e.to_string()),
                };
            }
            job.remove_staging(&self.target.store);
            job.release();
        }
        self.job_ended.notify_waiters();
    }
}

/// Route layer of the job routes: the `{id}` of the path must be a valid job id (400 otherwise), so that no
/// handler ever sees one such as `..%2F..%2Fvictim` (a target names folders after it).
async fn valid_job_id(
    UrlPath(params): UrlPath<HashMap<String, String>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match params.get("id").map(|id| super::names::check_job_id(id)) {
        Some(Err(e)) => ApiError::from(e).into_response(),
        _ => next.run(req).await,
    }
}

async fn info(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Result<axum::Json<JobInfo>, ApiError> {
    let job = s.job(&id)?;
    let info = job.info().clone();
    Ok(axum::Json(info))
}

/// The jobs running here (neither finished nor aborted), sorted by id.
async fn held_jobs(State(s): State<Arc<TargetJobs>>) -> axum::Json<Vec<HeldJob>> {
    let mut held: Vec<HeldJob> =
        s.active_jobs().iter().map(|j| HeldJob { id: j.id.clone(), committed: j.is_committed() }).collect();
    held.sort_by(|a, b| a.id.cmp(&b.id));
    axum::Json(held)
}

/// The job's ticks of progress (a number, as text).
async fn progress(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.job(&id)?;
    Ok(job.ticks.load(Ordering::Relaxed).to_string().into())
}

async fn abort(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let s2 = s.clone();
    let _ = tokio::task::spawn_blocking(move || s2.abort_job(&id)).await;
    Ok(Bytes::new())
}

async fn cleanup(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.job(&id)?;
    s.end_job(job).await;
    Ok(Bytes::new())
}

async fn remove(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    if let Some(job) = job {
        let _ = tokio::task::spawn_blocking(move || job.release()).await;
    }
    s.job_ended.notify_waiters();
    Ok(Bytes::new())
}

async fn metrics(State(s): State<Arc<TargetJobs>>) -> impl axum::response::IntoResponse {
    let mut states = JobStates::default();
    for job in s.jobs.lock().unwrap_or_else(|p| p.into_inner()).values() {
        let info = job.info();
        if info.aborted {
            states.aborted += 1;
        } else if info.metrics.shard_creation.phase.finished {
            states.finished += 1;
        } else {
            states.running += 1;
        }
    }
    s.metrics.set_jobs(states);
    s.metrics.set_pool(s.pool.reserved(), s.pool.limit(), s.pool.peak());
    ([(axum::http::header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], s.metrics.encode())
}
