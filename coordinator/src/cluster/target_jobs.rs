//! A target's side of a distributed job: the steps of [`dsort::dist::simulate`], each one an intra-cluster
//! route the coordinator (or a peer) calls. All routes are under `/v1/sort/jobs/{id}/` on the target:
//!
//! | method, op | body → reply | step |
//! |---|---|---|
//! | `POST init` | [`InitMsg`] JSON → samples (frames, see below) | plan, extract the input shards assigned to this target (`holders`: it holds them; else the ones it owns by HRW) into the local sorter, sample |
//! | `POST distribute` | splitters (frames) → `""` | finish the local sort, send each record to its range owner (`records`) |
//! | `POST records` | records (frames, one streaming body per sender) → `""` | (from peers) push into this target's range sorter |
//! | `POST sortrange` | → `"<records>"` | finish the range sorter into a local file; keep the record sizes |
//! | `POST cut` | [`CutMsg`] JSON → [`Carry`] JSON | place this range's records with the carry-in; the carry-out |
//! | `POST send` | → `""` | send each output shard's records (range-tagged) to the shard's creator (`shard`) |
//! | `POST shard?k=&r=` | records (frames) → `""` | (from peers) keep shard `k`'s records of range `r` in a local file |
//! | `POST create` | → `"<shards>"` | write every shard received into the staging folder: local bytes read locally, others pulled once (`bytes`) |
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
//! for the frame messages, `cut` and `bytes`, 64 KiB for the rest; `records` streams.
//!
//! Frames: each a `u32` little-endian length (at most [`MAX_FRAME`]) and a [`RecordCodec`]-encoded record. The `init` reply is two
//! `u64` (records seen, content bytes) then the sample's frames. A wanted entry is `u32` shard, `u8` kind
//! (0 input, 1 decoded), `u64` offset, `u64` size.
//!
//! The input bucket's assigned objects are linked (symlinks) into one folder of the job's temp dir so the
//! single-folder extractor and `Sources` read them where the object store keeps them (any mountpath).

use super::api::TargetInfo;
use super::client::Client;
use super::error::{ApiError, ClusterError};
use super::jobinfo::{Bck, JobInfo, rfc3339};
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
use dsort::dist::{Carry, Reservoir, SAMPLES_PER_RANGE, extract_local, range_of};
use dsort::extract::{Decoded, ExtractCtx};
use dsort::extsort::{ExternalSorter, SortCodec};
use dsort::job::{EkmRouter, JobEnv, cut_rule, job_temp_dir, plan_job};
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

/// Records per message between targets.
const BATCH_BYTES: usize = 4 << 20;
/// Chunks of a record stream (`records`), and how many may wait per destination.
const STREAM_CHUNK: usize = 1 << 20;
const QUEUED: usize = 4;
/// A wanted entry in a `bytes` request: `u32` shard, `u8` kind, `u64` offset, `u64` size.
const WANT_LEN: usize = 21;
/// Chunks of a `bytes` reply, and the most a creator buffers per stream (backpressure: a creator that writes
/// slowly slows the holder's reads down); the creator pays the buffer from the pool.
const BYTES_CHUNK: usize = 256 << 10;
const STREAM_BUFFER: u64 = 16 * BYTES_CHUNK as u64;
/// The longest record frame accepted (a record's metadata: names, offsets, key), in every stream and message.
pub const MAX_FRAME: usize = 16 << 20;
/// Body limits of the job routes: `init` carries the spec, the input names and the external key map; the
/// frame messages (`distribute`, `shard`), `cut` and `bytes` requests are bounded by their batches; the other
/// routes take no body. `records` streams (any length: a frame at a time, each at most [`MAX_FRAME`]).
const INIT_BODY: usize = super::jobs::EKM_MAX_BYTES + (64 << 20);
const MESSAGE_BODY: usize = 64 << 20;
const CONTROL_BODY: usize = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitMsg {
    /// The spec as the user sent it.
    pub spec: String,
    /// The job's targets, in order (range `r` is owned by `targets[r]`).
    pub targets: Vec<TargetInfo>,
    /// The shuffle seed the coordinator settled (every target must use the same).
    pub seed: Option<u64>,
    /// The external key map's text when the spec names one (the coordinator fetched it).
    #[serde(default)]
    pub ekm_text: Option<String>,
    /// The input object names as the coordinator settled them (for `input_format.prefix`, its listing), so
    /// that every target works on the same list.
    #[serde(default)]
    pub objects: Option<Vec<String>>,
    /// Per input object, the index in `targets` of the target that extracts it (a target holding it, see
    /// [`super::reach`]); `None` (S3 inputs): each object's HRW owner.
    #[serde(default)]
    pub holders: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CutMsg {
    /// The open shard of each output group (one group without an external key map), from the ranges before.
    pub carry: Vec<CarryMsg>,
    /// Content bytes of the whole job (the default cut rule divides it by the output name count).
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CarryMsg {
    pub shard: u64,
    pub bytes: u64,
    pub records: u64,
}

impl From<Carry> for CarryMsg {
    fn from(c: Carry) -> Self {
        CarryMsg { shard: c.shard, bytes: c.bytes, records: c.records }
    }
}

impl From<CarryMsg> for Carry {
    fn from(c: CarryMsg) -> Self {
        Carry { shard: c.shard, bytes: c.bytes, records: c.records }
    }
}

pub fn push_frame(codec: &RecordCodec, item: &RecordItem, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    codec.encode(item, out);
    let n = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&n.to_le_bytes());
}

pub fn read_frames(codec: &RecordCodec, mut buf: &[u8]) -> Result<Vec<RecordItem>, String> {
    let mut items = Vec::new();
    while !buf.is_empty() {
        if buf.len() < 4 {
            return Err("truncated frame".into());
        }
        let n = frame_len(&buf[..4])?;
        let body = buf.get(4..4 + n).ok_or("truncated frame")?;
        items.push(codec.decode(body).map_err(|e| format!("bad record frame: {e}"))?);
        buf = &buf[4 + n..];
    }
    Ok(items)
}

/// The length of the frame whose 4-byte header is `header`; over [`MAX_FRAME`] is an error (a peer never
/// sends one: a bad length must not make the receiver buffer gigabytes waiting for its end).
fn frame_len(header: &[u8]) -> Result<usize, String> {
    let n = u32::from_le_bytes(header.try_into().map_err(|_| "truncated frame")?) as usize;
    if n > MAX_FRAME {
        return Err(format!("a record frame of {n} bytes is over the limit ({MAX_FRAME} bytes)"));
    }
    Ok(n)
}

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
    /// Record sizes and output groups of this range, in order (after `sortrange`; group `u32::MAX`: the
    /// record is left out), and their output shard indices in their group (after `cut`).
    sizes: Mutex<Vec<(u64, u32)>>,
    placed: Mutex<Vec<u64>>,
    /// Output shards received: (group, shard index) → ranges that sent records.
    received: Mutex<BTreeMap<(u32, u64), Vec<u64>>>,
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
    fn check(&self) -> Result<(), String> {
        self.ticks.fetch_add(1, Ordering::Relaxed);
        if self.cancel.load(Ordering::Relaxed) {
            Err(self.abort_reason.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| "aborted".into()))
        } else {
            Ok(())
        }
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
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.placed.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.tmp.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Remove the job's staging folders (every mountpath), shards written but never published, and its commit
    /// plan, which names them (an aborted job's plan would otherwise stay until the target restarts).
    fn remove_staging(&self, store: &ObjectStore) {
        self.staged.lock().unwrap_or_else(|p| p.into_inner()).clear();
        discard_plan(store, &self.id);
    }

    fn shard_file(&self, g: u32, k: u64, r: u64) -> PathBuf {
        self.tmp_path.join(format!("shard-{g}-{k}-r{r}.bin"))
    }
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
}

#[derive(Debug, Default, Deserialize)]
struct ShardQuery {
    #[serde(default)]
    g: u32,
    k: u64,
    r: u64,
}

type Reply = Result<Bytes, ApiError>;

/// A read-only memory map of a whole file, as `Bytes` (slices share the map; unmapped with the last one).
fn map_file(path: &std::path::Path) -> Result<Bytes, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if f.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the file is an input shard in this target's store or a spill file of this job. Objects are
    // only ever replaced by rename (a new inode), never truncated or rewritten in place, so the mapped
    // pages stay valid for the map's life.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Bytes::from_owner(map))
}

type BytesSender = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// The creator's end of a `bytes` stream, as a blocking reader (called from creation threads, never from
/// the async runtime). Counts the bytes received.
struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
    metrics: Arc<NodeMetrics>,
}

impl BufRead for StreamReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.metrics.received(b.len() as u64);
                    self.cur = b;
                }
                Some(Err(m)) => return Err(std::io::Error::other(m)),
                None => break,
            }
        }
        Ok(&self.cur)
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.cur.len());
        bytes::Buf::advance(&mut self.cur, n);
    }
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = buf.len().min(avail.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// A sorter on the target's shared pool: its least memory reserved now (a job is refused at its start when
/// the jobs already running leave too little), and its buffer leaves a quarter of the pool free, so that the
/// jobs running at once keep room to work.
fn sorter(s: ExternalSorter<RecordCodec>) -> Result<ExternalSorter<RecordCodec>, String> {
    let keep = s.pool_limit() / 4;
    let mut s = s.leaving_free(keep);
    s.reserve_headroom().map_err(|e| format!("not enough memory for another job on this target: {e}"))?;
    Ok(s)
}

/// Parallel extractions or creations on this target: its cores (as `dsort reshard`), at most the spec's
/// limit when it sets one.
fn concurrency(limit: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    if limit == 0 { cores } else { cores.min(limit) }
}

/// Where a job's finished output shards wait, on the mountpath they will be published to (so publishing
/// is a rename): `<mountpath>/.dsort/staging/<job>/`. A target removes every staging folder when it starts:
/// a job it ran before a crash is gone, and its shards must never appear.
pub fn staging_dir(mountpath: &std::path::Path, job: &str) -> PathBuf {
    mountpath.join(SYSTEM_DIR).join(STAGING).join(job)
}

/// The folder under `<mountpath>/.dsort/` that holds every job's staging folder.
pub const STAGING: &str = "staging";

/// The failpoint settings of fault tests, read once: `DSORT_TEST_HOLD` (where to stop) and
/// `DSORT_TEST_HOLD_RELEASE` (a file whose existence releases the hold). Unset in production.
pub(crate) fn test_hold() -> &'static (Option<String>, Option<PathBuf>) {
    static HOLD: std::sync::OnceLock<(Option<String>, Option<PathBuf>)> = std::sync::OnceLock::new();
    HOLD.get_or_init(|| {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        (var("DSORT_TEST_HOLD"), var("DSORT_TEST_HOLD_RELEASE").map(PathBuf::from))
    })
}

/// Where a target keeps the commit plans of its jobs (`<first mountpath>/.dsort/plans/<job>.json`): written
/// (synced) when a job's shards are all staged, removed when they are published or discarded. A target that
/// restarts keeps the staging of a job with a plan and asks the coordinator's decision ([`TargetJobs::recover`]).
pub fn plans_dir(store: &ObjectStore) -> PathBuf {
    store.mountpaths()[0].join(SYSTEM_DIR).join("plans")
}

/// A job's commit plan: the output bucket and the names staged for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    bucket: String,
    names: Vec<String>,
}

fn plan_path(store: &ObjectStore, job: &str) -> PathBuf {
    plans_dir(store).join(format!("{job}.json"))
}

fn read_plan(store: &ObjectStore, job: &str) -> Option<Plan> {
    serde_json::from_slice(&std::fs::read(plan_path(store, job)).ok()?).ok()
}

/// Write the plan atomically and durably.
fn write_plan(store: &ObjectStore, job: &str, plan: &Plan) -> Result<(), String> {
    let dir = plans_dir(store);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let text = serde_json::to_vec(plan).map_err(|e| e.to_string())?;
    let mut f = shardio::PendingObject::create(plan_path(store, job)).map_err(|e| e.to_string())?;
    f.file().write_all(&text).map_err(|e| e.to_string())?;
    f.commit().map_err(|e| e.to_string())
}

/// Publish what the plan of `job` names (renames of its staged shards; a name already published is skipped),
/// then remove its staging and the plan. Idempotent: a publish cut short is finished by the next call.
fn publish_plan(
    store: &ObjectStore,
    job: &str,
    plan: &Plan,
    on_published: &dyn Fn(&str) -> Result<(), String>,
) -> Result<(), String> {
    let mut dirs = std::collections::BTreeSet::new();
    for name in &plan.names {
        check_object(name).map_err(|e| e.to_string())?;
        let from = staging_dir(store.mountpath_of(&plan.bucket, name), job).join(name);
        if !from.exists() {
            continue;
        }
        let to = store.path_for_write(&plan.bucket, name).map_err(|e| e.to_string())?;
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            dirs.insert(dir.to_path_buf());
        }
        std::fs::rename(&from, &to).map_err(|e| format!("publishing {}/{name}: {e}", plan.bucket))?;
        store.remove_stale_copies(&plan.bucket, name);
        on_published(name)?;
    }
    for dir in dirs {
        if let Ok(d) = std::fs::File::open(&dir) {
            d.sync_all().map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    discard_plan(store, job);
    Ok(())
}

/// Remove a job's staging folders and its plan.
fn discard_plan(store: &ObjectStore, job: &str) {
    for mp in store.mountpaths() {
        let _ = std::fs::remove_dir_all(staging_dir(mp, job));
    }
    let _ = std::fs::remove_file(plan_path(store, job));
}

/// Failpoint for fault tests: with `DSORT_TEST_HOLD=<phase>` (`extraction`, `sorting` or `creation`) in its
/// environment, a target stops in that phase of every job (after the first output shard, for `creation`)
/// until the job is aborted, or until the file named by `DSORT_TEST_HOLD_RELEASE` exists (then the job
/// goes on), so a test can kill or stop it there deterministically. Unset in production.
fn hold(job: &TJob, phase: &str) -> Result<(), String> {
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

    /// The job routes, each refusing (400) a job id that is not [`check_job_id`]'s before its handler runs,
    /// and each with its body limit (413 over it).
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

    /// Publish the plan of a job this target no longer runs (it restarted during the commit), if any.
    fn publish_recovered(&self, id: &str) -> Result<(), String> {
        let _one = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        match read_plan(&self.target.store, id) {
            Some(plan) => {
                publish_plan(&self.target.store, id, &plan, &|_| Ok(()))?;
                self.target.log(format!("published the {} staged shard(s) of job {id} (recovered)", plan.names.len()));
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// After a restart: for each job with a commit plan (its shards staged before the crash), ask the
    /// coordinator's decision until it answers: `commit` publishes them, `abort` or a job it does not know
    /// discards them. Runs until every plan is settled or `shutdown`.
    pub async fn recover(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let Ok(entries) = std::fs::read_dir(plans_dir(&self.target.store)) else { return };
        let mut pending: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(String::from))
            .filter(|id| super::names::check_job_id(id).is_ok())
            .collect();
        let Ok(client) = self.target.coordinator_client() else { return };
        while !pending.is_empty() {
            let mut left = Vec::new();
            for id in pending {
                let decision = client.job_decision(&id).await;
                let me = self.clone();
                let (id2, store) = (id.clone(), self.target.store.clone());
                match decision.as_deref() {
                    Ok("commit") => {
                        let r = tokio::task::spawn_blocking(move || me.publish_recovered(&id2)).await;
                        if !matches!(r, Ok(Ok(()))) {
                            left.push(id);
                        }
                    }
                    Ok("abort") | Ok("unknown") => {
                        let _one = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
                        discard_plan(&store, &id);
                        self.target.log(format!(
                            "discarded the staged output of job {id} (coordinator: {})",
                            decision.as_deref().unwrap_or("")
                        ));
                    }
                    _ => left.push(id),
                }
            }
            pending = left;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    pub fn routes(self: &Arc<Self>) -> Router {
        use axum::extract::DefaultBodyLimit;
        let p = |op: &str| format!("/v1/sort/jobs/{{id}}/{op}");
        let message = || DefaultBodyLimit::max(MESSAGE_BODY);
        Router::new()
            .route(&p("init"), post(init).layer(DefaultBodyLimit::max(INIT_BODY)))
            .route(&p("distribute"), post(distribute).layer(message()))
            .route(&p("records"), post(records))
            .route(&p("sortrange"), post(sortrange))
            .route(&p("cut"), post(cut).layer(message()))
            .route(&p("send"), post(send))
            .route(&p("shard"), post(shard).layer(message()))
            .route(&p("create"), post(create))
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

    fn peer(&self, t: &TargetInfo) -> Result<Client, String> {
        self.target.peer_client(t).map_err(|e| e.to_string())
    }

    /// Run blocking work of a job; its error (text) becomes a 400 naming this target.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        id: &str,
        f: impl FnOnce(&Arc<Self>, &tokio::runtime::Handle) -> Result<T, String> + Send + 'static,
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
        .map_err(|e| format!("worker panicked: {e}"))
        .and_then(|r| r);
        r.map_err(|m| {
            if let Ok(job) = self.job(id) {
                job.info().metrics.errors.push(format!("target {}: {m}", self.target.id()));
            }
            self.failed(id, m)
        })
    }

    fn do_init(self: &Arc<Self>, id: &str, msg: InitMsg) -> Result<Vec<u8>, String> {
        let mut spec = dsort::spec::parse_spec(&msg.spec, false).map_err(|e| e.to_string())?.spec;
        if let AlgorithmKind::Shuffle { seed } = &mut spec.algorithm.kind {
            *seed = msg.seed.or(*seed);
        }
        if let Some(list) = msg.objects.clone() {
            spec.input = dsort::spec::InputSelection::Objnames(list);
        }
        let (input_s3, out_s3) = (crate::buckets::is_s3(&spec.input_bck), crate::buckets::is_s3(&spec.output_bck));
        let me = msg.targets.iter().position(|t| t.id == self.target.id()).ok_or("this target is not in the job")?;
        let parent = self.target.tmp_dir.join("jobs");
        let warnings = Mutex::new(Vec::<String>::new());
        let warn = |m: String| warnings.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        let mk_env = |input: Arc<dyn shardio::Bucket>, output: Arc<dyn shardio::Bucket>| JobEnv {
            input,
            output,
            tmp_dir: Some(parent.clone()),
            concurrency: 2,
            ekm_text: msg.ekm_text.clone(),
            progress: Arc::new(dsort::progress::NoProgress),
            cancel: Arc::new(AtomicBool::new(false)),
            tar_flavor: shardio::TarFlavor::Pax,
        };
        let nowhere = || -> Arc<dyn shardio::Bucket> { Arc::new(shardio::LocalBucket::new(PathBuf::new())) };
        let tmp = job_temp_dir(&mk_env(nowhere(), nowhere())).map_err(|e| e.to_string())?;
        let farm = tmp.path().join("input");
        let empty_out = tmp.path().join("out-check");
        std::fs::create_dir_all(&empty_out).map_err(|e| e.to_string())?;
        let input =
            crate::buckets::resolve(&spec.input_bck, "", "input_bck", &|_| farm.clone()).map_err(|e| e.to_string())?;
        let output = crate::buckets::resolve(&spec.output_bck, "", "output_bck", &|_| empty_out.clone())
            .map_err(|e| e.to_string())?;
        let env = mk_env(input.clone(), output.clone());
        let plan = plan_job(&spec, &env, &warn).map_err(|e| e.to_string())?;
        let objects = plan.objects.clone();
        // Names that reach this target's folders: bucket and object names as the store accepts them.
        if !input_s3 {
            check_bucket(&spec.input_bck.name).map_err(|e| format!("input_bck: {e}"))?;
            objects.iter().try_for_each(|o| check_object(o)).map_err(|e| format!("input: {e}"))?;
        }
        if !out_s3 {
            check_bucket(&spec.output_bck.name).map_err(|e| format!("output_bck: {e}"))?;
        }
        let ids: Vec<&str> = msg.targets.iter().map(|t| t.id.as_str()).collect();
        let bucket = spec.input_bck.name.clone();
        let holders = msg.holders.clone().filter(|h| h.len() == objects.len() && !input_s3);
        let mut owned = Vec::new();
        let mut off_owner = 0u64;
        for (i, o) in objects.iter().enumerate() {
            let owner = placement::owner_index(&placement::object_key(&bucket, o), &ids);
            let mine = match &holders {
                Some(h) => h[i] as usize == me,
                None => owner == Some(me),
            };
            if !mine {
                continue;
            }
            off_owner += u64::from(owner != Some(me));
            owned.push(i as u32);
            if input_s3 {
                continue;
            }
            if let Ok((path, _)) = self.target.store.locate(&bucket, o) {
                let link = farm.join(o);
                if let Some(parent) = link.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                std::os::unix::fs::symlink(&path, &link).map_err(|e| format!("{}: {e}", link.display()))?;
            }
        }
        std::fs::create_dir_all(&farm).map_err(|e| e.to_string())?;
        let pool = self.pool.clone();
        let codec = Arc::new(RecordCodec::new(objects.clone(), spec.algorithm.decreasing));
        let cancel = Arc::new(AtomicBool::new(false));
        let mut info =
            JobInfo::new(id, Bck::from_ref(&spec.input_bck), Bck::from_ref(&spec.output_bck), &spec.description);
        let now = SystemTime::now();
        info.started_time = rfc3339(Some(now));
        info.metrics.local_extraction.phase.begin(now);
        info.metrics.local_extraction.total_count = objects.len() as i64;
        let job = Arc::new(TJob {
            id: id.to_string(),
            objects: objects.clone(),
            codec: codec.clone(),
            targets: msg.targets.clone(),
            me,
            holders,
            groups: plan.groups,
            ekm: plan.ekm,
            algorithm: plan.algorithm.clone(),
            cancel: cancel.clone(),
            tmp_path: tmp.path().to_path_buf(),
            tmp: Mutex::new(Some(tmp)),
            farm: farm.clone(),
            input: input.clone(),
            input_s3,
            output_s3: out_s3.then(|| output.clone()),
            pool: pool.clone(),
            local: Mutex::new(None),
            decoded: Mutex::new(Vec::new()),
            range: Mutex::new(None),
            sizes: Mutex::new(Vec::new()),
            placed: Mutex::new(Vec::new()),
            received: Mutex::new(BTreeMap::new()),
            info: Mutex::new(info),
            phase_start: Mutex::new(Instant::now()),
            staged: Mutex::new(Vec::new()),
            published: Mutex::new(Vec::new()),
            abort_reason: Mutex::new(None),
            held: owned.iter().copied().collect(),
            ticks: AtomicU64::new(0),
            commit_started: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            spec,
        });
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), job.clone());
        if self.aborted_early.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            self.abort_job(id);
            return Err("aborted".into());
        }
        let spill = job.tmp_path.join("local");
        let rdir = job.tmp_path.join("range");
        std::fs::create_dir_all(&spill).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&rdir).map_err(|e| e.to_string())?;
        *job.range.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(sorter(ExternalSorter::new(codec.clone(), pool.reservation("range metadata"), rdir, cancel.clone()))?);
        hold(&job, "extraction")?;
        let ectx = ExtractCtx {
            objects: &objects,
            bucket: job.input.as_ref(),
            input_format: job.spec.input_extension,
            algorithm: &plan.algorithm,
            pool: &pool,
            spill_dir: &spill,
            reactions: job.spec.reactions,
            warn: &warn,
        };
        let started = Instant::now();
        let (totals, decoded, sorter, sample) = extract_local(
            &ectx,
            &owned,
            concurrency(job.spec.extract_concurrency_max_limit),
            &cancel,
            &Ticks(&job.ticks),
            sorter(ExternalSorter::new(
                codec.clone(),
                pool.reservation("local metadata"),
                spill.clone(),
                cancel.clone(),
            ))?,
            Reservoir::new(SAMPLES_PER_RANGE * msg.targets.len(), me as u64 + 1),
        )
        .map_err(|e| e.to_string())?;
        *job.decoded.lock().unwrap_or_else(|p| p.into_inner()) = decoded;
        *job.local.lock().unwrap_or_else(|p| p.into_inner()) = Some(sorter);
        {
            let mut info = job.info();
            let e = &mut info.metrics.local_extraction;
            e.phase.end(SystemTime::now(), started.elapsed());
            e.extracted_count = totals.input_shards as i64;
            e.extracted_size = totals.bytes as i64;
            e.extracted_record_count = totals.records as i64;
            e.extracted_to_disk_size = totals.spilled_bytes as i64;
            info.loc_objs = totals.input_shards as i64;
            info.loc_bytes = totals.bytes as i64;
            info.started_meta_sorting = started.elapsed().as_nanos() as i64;
            info.metrics.warnings.extend(warnings.into_inner().unwrap_or_else(|p| p.into_inner()));
        }
        self.metrics.extracted(Work { shards: totals.input_shards, records: totals.records, bytes: totals.bytes });
        self.metrics.extracted_off_owner(off_owner);
        self.metrics.spilled(totals.spilled_bytes);
        self.metrics.phase("extraction", started.elapsed().as_secs_f64());
        let (items, seen) = sample.into_parts();
        let mut out = Vec::new();
        out.extend_from_slice(&seen.to_le_bytes());
        out.extend_from_slice(&totals.bytes.to_le_bytes());
        for it in &items {
            push_frame(&codec, it, &mut out);
        }
        Ok(out)
    }

    fn do_distribute(
        self: &Arc<Self>,
        job: &Arc<TJob>,
        rt: &tokio::runtime::Handle,
        body: &[u8],
    ) -> Result<(), String> {
        {
            let mut info = job.info();
            info.metrics.meta_sorting.phase.begin(SystemTime::now());
        }
        *job.phase_start.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        hold(job, "sorting")?;
        let splitters = read_frames(&job.codec, body)?;
        let sorter = job.local.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or("no local sort")?;
        let (sorted, stats) = sorter.finish().map_err(|e| e.to_string())?;
        self.metrics.spilled(stats.spilled_bytes);
        // One streaming request per other target, fed through a small bounded channel (backpressure:
        // at most QUEUED chunks of STREAM_CHUNK bytes in flight per destination).
        let mut senders: Vec<Option<tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>>> = Vec::new();
        let mut calls = Vec::new();
        for (r, t) in job.targets.iter().enumerate() {
            if r == job.me {
                senders.push(None);
                continue;
            }
            let client = self.peer(t)?;
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(QUEUED);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
            let id = job.id.clone();
            calls.push(rt.spawn(async move {
                client
                    .job_call(Method::POST, &id, "records", &[], reqwest::Body::wrap_stream(stream))
                    .await
                    .map_err(|e| e.to_string())
            }));
            senders.push(Some(tx));
        }
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); job.targets.len()];
        let flush = |r: usize, buf: Vec<u8>| -> Result<(), String> {
            let t0 = Instant::now();
            match &senders[r] {
                None => {
                    let items = read_frames(&job.codec, &buf)?;
                    let mut g = job.range.lock().unwrap_or_else(|p| p.into_inner());
                    let s = g.as_mut().ok_or("range sorter gone")?;
                    for it in items {
                        s.push(it).map_err(|e| e.to_string())?;
                    }
                }
                Some(tx) => {
                    tx.blocking_send(Ok(Bytes::from(buf)))
                        .map_err(|_| format!("target {}: the record stream broke", job.targets[r].id))?;
                }
            }
            job.info().metrics.meta_sorting.sent_stats.add(t0.elapsed());
            Ok(())
        };
        let sent: Result<(), String> = (|| {
            for item in sorted {
                job.check()?;
                let item = item.map_err(|e| e.to_string())?;
                let r = range_of(&job.codec, &splitters, &item);
                push_frame(&job.codec, &item, &mut bufs[r]);
                if bufs[r].len() >= STREAM_CHUNK {
                    flush(r, std::mem::take(&mut bufs[r]))?;
                }
            }
            for (r, buf) in std::mem::take(&mut bufs).into_iter().enumerate() {
                if !buf.is_empty() {
                    flush(r, buf)?;
                }
            }
            Ok(())
        })();
        // End the streams (or, on an error, cut them short: the receivers see a broken body).
        drop(senders);
        let mut first: Option<String> = None;
        for call in calls {
            let r = rt.block_on(call).map_err(|e| e.to_string()).and_then(|r| r);
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        // A broken stream is reported by the call's own error, which names the peer.
        match (first, sent) {
            (Some(e), _) => Err(e),
            (None, r) => r,
        }
    }

    fn do_sortrange(&self, job: &Arc<TJob>) -> Result<u64, String> {
        let sorter = job.range.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or("no range sort")?;
        let (sorted, stats) = sorter.finish().map_err(|e| e.to_string())?;
        self.metrics.spilled(stats.spilled_bytes);
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(job.tmp_path.join("range.bin")).map_err(|e| e.to_string())?);
        let mut sizes = Vec::new();
        let mut buf = Vec::new();
        let router = EkmRouter {
            ekm: job.ekm.as_ref(),
            algorithm: &job.algorithm,
            objects: &job.objects,
            reaction: job.spec.reactions.ekm_missing_key,
        };
        let warn = |m: String| job.info().metrics.warnings.push(m);
        for item in sorted {
            job.check()?;
            let item = item.map_err(|e| e.to_string())?;
            let group = router.route(&item, &warn)?.map_or(u32::MAX, |g| g as u32);
            sizes.push((item.size(), group));
            buf.clear();
            push_frame(&job.codec, &item, &mut buf);
            f.write_all(&buf).map_err(|e| e.to_string())?;
        }
        f.flush().map_err(|e| e.to_string())?;
        let n = sizes.len() as u64;
        *job.sizes.lock().unwrap_or_else(|p| p.into_inner()) = sizes;
        Ok(n)
    }

    /// Place this range's records: each group's open shard carried in from the ranges before, carried out.
    fn do_cut(job: &Arc<TJob>, msg: CutMsg) -> Result<Vec<CarryMsg>, String> {
        let rule = cut_rule(&job.spec, &job.groups, msg.total_bytes);
        let mut carry: Vec<Carry> = msg.carry.into_iter().map(Carry::from).collect();
        carry.resize(job.groups.len(), Carry::default());
        let sizes = job.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let placed: Vec<u64> = sizes
            .iter()
            .map(|&(size, g)| carry.get_mut(g as usize).map_or(u64::MAX, |c| c.place(&rule, size)))
            .collect();
        *job.placed.lock().unwrap_or_else(|p| p.into_inner()) = placed;
        Ok(carry.into_iter().map(CarryMsg::from).collect())
    }

    /// This range's sorted records, streamed from `range.bin` (one frame in memory at a time).
    fn range_records(job: &TJob) -> Result<impl Iterator<Item = Result<RecordItem, String>> + '_, String> {
        let f = std::fs::File::open(job.tmp_path.join("range.bin")).map_err(|e| e.to_string())?;
        let mut r = std::io::BufReader::new(f);
        let mut buf = Vec::new();
        Ok(std::iter::from_fn(move || {
            let mut len = [0u8; 4];
            match r.read_exact(&mut len) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
                Err(e) => return Some(Err(e.to_string())),
                Ok(()) => {}
            }
            buf.resize(u32::from_le_bytes(len) as usize, 0);
            if let Err(e) = r.read_exact(&mut buf) {
                return Some(Err(e.to_string()));
            }
            Some(job.codec.decode(&buf).map_err(|e| e.to_string()))
        }))
    }

    fn do_send(self: &Arc<Self>, job: &Arc<TJob>, rt: &tokio::runtime::Handle) -> Result<(), String> {
        let placed = std::mem::take(&mut *job.placed.lock().unwrap_or_else(|p| p.into_inner()));
        let sizes = std::mem::take(&mut *job.sizes.lock().unwrap_or_else(|p| p.into_inner()));
        let items = Self::range_records(job)?;
        let ids: Vec<&str> = job.targets.iter().map(|t| t.id.as_str()).collect();
        let out_bucket = job.spec.output_bck.name.clone();
        // Per output group, the shard being filled: (index, creator, frames). In sorted order a group's
        // shard is complete when the next record of the group goes to the next shard.
        let mut cur: Vec<Option<(u64, usize, Vec<u8>)>> = vec![None; job.groups.len()];
        let send = |g: usize, k: u64, c: usize, buf: Vec<u8>| -> Result<(), String> {
            let client = self.peer(&job.targets[c])?;
            let q = [("g", g.to_string()), ("k", k.to_string()), ("r", job.me.to_string())];
            rt.block_on(client.job_call(Method::POST, &job.id, "shard", &q, buf)).map_err(|e| e.to_string())?;
            Ok(())
        };
        for ((item, k), (_, g)) in items.zip(placed).zip(sizes) {
            job.check()?;
            let item = &item?;
            let g = g as usize;
            let Some(slot) = cur.get_mut(g) else { continue }; // left out (no EKM group)
            if slot.as_ref().is_some_and(|(ck, _, _)| *ck != k)
                && let Some((ck, c, buf)) = slot.take()
            {
                send(g, ck, c, buf)?;
            }
            if slot.is_none() {
                let name = job.groups[g].name_at(k)?;
                let c = placement::owner_index(&placement::object_key(&out_bucket, &name), &ids).unwrap_or(0);
                *slot = Some((k, c, Vec::new()));
            }
            if let Some((ck, c, buf)) = slot.as_mut() {
                push_frame(&job.codec, item, buf);
                if buf.len() >= BATCH_BYTES {
                    let b = std::mem::take(buf);
                    send(g, *ck, *c, b)?;
                }
            }
        }
        for (g, slot) in cur.into_iter().enumerate() {
            if let Some((ck, c, buf)) = slot
                && !buf.is_empty()
            {
                send(g, ck, c, buf)?;
            }
        }
        let mut info = job.info();
        let start = *job.phase_start.lock().unwrap_or_else(|p| p.into_inner());
        info.metrics.meta_sorting.phase.end(SystemTime::now(), start.elapsed());
        info.started_shard_creation = start.elapsed().as_nanos() as i64;
        self.metrics.phase("sorting", start.elapsed().as_secs_f64());
        Ok(())
    }

    fn do_create(self: &Arc<Self>, job: &Arc<TJob>, rt: &tokio::runtime::Handle) -> Result<u64, String> {
        let started = Instant::now();
        let received = job.received.lock().unwrap_or_else(|p| p.into_inner()).clone();
        {
            let mut info = job.info();
            info.metrics.shard_creation.phase.begin(SystemTime::now());
            info.metrics.shard_creation.to_create = received.len() as i64;
        }
        let out_bucket = job.spec.output_bck.name.clone();
        let created = std::sync::atomic::AtomicU64::new(0);
        let work: Vec<((u32, u64), Vec<u64>)> = received.into_iter().collect();
        // Staged shards are synced on another thread while the workers write the next ones (as `dsort
        // reshard` frees a writer before its shard's sync); at most `workers` wait for it.
        let workers = concurrency(job.spec.create_concurrency_max_limit);
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<PathBuf>(workers);
        let sync_tx = Mutex::new(Some(sync_tx));
        let create_one = |(g, k): (u32, u64), mut ranges: Vec<u64>| -> Result<(), String> {
            job.check()?;
            ranges.sort_unstable();
            ranges.dedup();
            let mut items = Vec::new();
            for r in ranges {
                let bytes = std::fs::read(job.shard_file(g, k, r)).map_err(|e| e.to_string())?;
                items.extend(read_frames(&job.codec, &bytes)?);
            }
            // Sources of this shard: this target's inputs and decoded copies, and one byte stream per other
            // target holding some of its records (each record's bytes cross the network once, in order).
            let decoded: Vec<Option<Decoded>> = {
                let local = job.decoded.lock().unwrap_or_else(|p| p.into_inner());
                let zero = MemoryPool::new(0);
                (0..job.objects.len())
                    .map(|s| match local.get(s).and_then(Option::as_ref) {
                        Some(Decoded::Mem(buf, _)) => Some(Decoded::Mem(buf.clone(), zero.reservation("shared"))),
                        Some(Decoded::File(p)) => Some(Decoded::File(p.clone())),
                        None => None,
                    })
                    .collect()
            };
            let mut sources = Sources::new(job.input.clone(), job.objects.clone(), decoded);
            let mut by_holder: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
            for (i, it) in items.iter().enumerate() {
                let h = job.holder(it.shard);
                // Entries of an S3 input shard read in place come from S3 directly, not through its holder.
                let direct = |j: &usize| job.input_s3 && matches!(it.entries[*j].loc, Loc::Input(_));
                if h != job.me && !(0..it.entries.len()).all(|j| direct(&j)) {
                    by_holder
                        .entry(h)
                        .or_default()
                        .extend((0..it.entries.len()).filter(|j| !direct(j)).map(|j| (i, j)));
                }
            }
            // The streams' buffers are paid from the pool first, all at once (a worker never holds some and
            // waits for more, which could deadlock with another worker), at most an eighth of the pool, and only
            // while a quarter of it stays free (the room sorters of jobs running at once count on).
            let streams = by_holder.len() as u64;
            let per_stream = (job.pool.limit() / 8 / streams.max(1)).clamp(BYTES_CHUNK as u64, STREAM_BUFFER);
            let buffers = job.pool.reservation("creation streams");
            buffers
                .grow_wait_leaving(per_stream * streams, job.pool.limit() / 4, &job.cancel)
                .map_err(|e| e.to_string())?;
            let queued = (per_stream / BYTES_CHUNK as u64).max(1) as usize;
            for (h, list) in by_holder {
                let mut want = Vec::with_capacity(list.len() * WANT_LEN);
                for &(i, j) in &list {
                    let e = &items[i].entries[j];
                    want.extend_from_slice(&items[i].shard.to_le_bytes());
                    let (kind, off) = match e.loc {
                        Loc::Input(o) => (0u8, o),
                        Loc::Decoded(o) => (1u8, o),
                    };
                    want.push(kind);
                    want.extend_from_slice(&off.to_le_bytes());
                    want.extend_from_slice(&e.size.to_le_bytes());
                }
                let shards: std::collections::BTreeSet<u32> = list.iter().map(|&(i, _)| items[i].shard).collect();
                let reader = self.pull(rt, &job.targets[h], &job.id, want, queued)?;
                sources.add_stream(shards, Box::new(reader));
            }
            let name = job.groups.get(g as usize).ok_or("bad output group")?.name_at(k)?;
            // Staged under the staging folder whatever the output bucket: a name must not leave it.
            check_object(&name).map_err(|e| format!("output: {e}"))?;
            // Written whole into the staging folder; published by `commit` once every creator is done.
            let out_dir = staging_dir(self.target.store.mountpath_of(&out_bucket, &name), &job.id);
            std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
            let on_shard = |_: &str, _: u64| {};
            let ctx = CreateCtx {
                sources: &sources,
                out: &shardio::LocalBucket::new(&out_dir),
                staging: &job.tmp_path,
                format: job.spec.output_extension,
                options: shardio::WriteOptions { tar_flavor: shardio::TarFlavor::Pax, ..Default::default() },
                dry_run: job.spec.dry_run,
                concurrency: 1,
                pool: &job.pool,
                cancel: &job.cancel,
                on_shard: &on_shard,
            };
            let (records, bytes, _) = write_shard_staged(&ctx, &name, items)?;
            self.metrics.created(Work { shards: 1, records, bytes });
            if !job.spec.dry_run {
                job.staged.lock().unwrap_or_else(|p| p.into_inner()).push(name.clone());
                let tx = sync_tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
                tx.ok_or("creation ended")?
                    .send(out_dir.join(&name))
                    .map_err(|_| "the staged-shard syncer stopped".to_string())?;
            }
            drop(sources);
            drop(buffers);
            let n = created.fetch_add(1, Ordering::Relaxed) + 1;
            {
                let mut info = job.info();
                let c = &mut info.metrics.shard_creation.created_count;
                *c = (*c).max(n as i64);
            }
            if n == 1 {
                hold(job, "creation")?;
            }
            Ok(())
        };
        // Shards are independent: as many at once as this machine has cores (as `dsort reshard`), at most
        // the spec's create limit.
        let created_all = std::thread::scope(|scope| {
            let syncer = scope.spawn(|| {
                for path in sync_rx {
                    if let Err(e) = std::fs::File::open(&path).and_then(|f| f.sync_all()) {
                        job.cancel.store(true, Ordering::Relaxed);
                        return Err(format!("syncing {}: {e}", path.display()));
                    }
                }
                Ok(())
            });
            let created =
                dsort::parallel::try_for_each(workers, &work, |_, (k, ranges)| create_one(*k, ranges.clone()));
            // Every worker is done: the syncer drains what is left and stops.
            sync_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
            let synced = syncer.join().unwrap_or_else(|_| Err("the staged-shard syncer panicked".into()));
            // A failed sync cancels the job: its error, not the workers' "aborted", is the cause.
            synced.and(created)
        });
        created_all?;
        if !job.spec.dry_run && job.output_s3.is_none() {
            let names = job.staged.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let plan = Plan { bucket: out_bucket.clone(), names };
            write_plan(&self.target.store, &job.id, &plan)?;
        }
        *job.phase_start.lock().unwrap_or_else(|p| p.into_inner()) = started;
        // Temp files stay until every creator is done (peers may still pull bytes): `cleanup`.
        Ok(created.into_inner())
    }

    /// Publish the staged output shards (renames on their mountpaths), once every target created its
    /// shards: no output of a job that fails before this point is ever visible.
    fn do_commit(&self, job: &TJob) -> Result<(), String> {
        // Aborted here before its commit began (its lease on the coordinator ran out, say): its staging and
        // plan are gone, so publishing "the plan" would publish nothing and report success. Fail instead.
        if !job.commit_started.load(Ordering::Relaxed) {
            job.check().map_err(|e| format!("job {} was aborted on this target before its commit: {e}", job.id))?;
        }
        // From here the coordinator has decided: this job's output is published, even across a crash (the
        // plan written at creation lets a restarted target finish), and nothing may abort it here.
        job.commit_started.store(true, Ordering::Relaxed);
        let _one = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(out) = &job.output_s3 {
            let staged = std::mem::take(&mut *job.staged.lock().unwrap_or_else(|p| p.into_inner()));
            return self.upload_staged(job, out.as_ref(), staged);
        }
        // A commit asked again (the coordinator retries) finds the names published already and skips them.
        let bucket = job.spec.output_bck.name.clone();
        let plan = read_plan(&self.target.store, &job.id).unwrap_or(Plan { bucket, names: Vec::new() });
        publish_plan(&self.target.store, &job.id, &plan, &|name| {
            let mut published = job.published.lock().unwrap_or_else(|p| p.into_inner());
            published.push(name.to_string());
            let first = published.len() == 1;
            drop(published);
            if first { hold(job, "commit") } else { Ok(()) }
        })?;
        self.committed(job);
        Ok(())
    }

    /// Commit to an object store: upload each staged shard (a few at once); each is visible only when its
    /// upload completed, and an abort deletes the ones already uploaded.
    fn upload_staged(&self, job: &TJob, out: &dyn shardio::Bucket, staged: Vec<String>) -> Result<(), String> {
        let bucket = &job.spec.output_bck.name;
        let workers = concurrency(job.spec.create_concurrency_max_limit);
        dsort::parallel::try_for_each(workers, &staged, |_, name| -> Result<(), String> {
            job.check()?;
            let from = staging_dir(self.target.store.mountpath_of(bucket, name), &job.id).join(name);
            out.put_file(name, &from).map_err(|e| e.to_string())?;
            job.published.lock().unwrap_or_else(|p| p.into_inner()).push(name.clone());
            let _ = std::fs::remove_file(&from);
            if job.cancel.load(Ordering::Relaxed) {
                // Aborted meanwhile: the abort may have taken the list before this name.
                let _ = out.delete(name);
                return Err("aborted".into());
            }
            Ok(())
        })?;
        job.check()?;
        self.committed(job);
        Ok(())
    }

    /// The end of a successful commit: staging and plan gone, creation finished.
    fn committed(&self, job: &TJob) {
        job.remove_staging(&self.target.store);
        let started = *job.phase_start.lock().unwrap_or_else(|p| p.into_inner());
        let mut info = job.info();
        let now = SystemTime::now();
        info.metrics.shard_creation.phase.end(now, started.elapsed());
        info.finished_shard_creation = started.elapsed().as_nanos() as i64;
        info.finish_time = rfc3339(Some(now));
        self.metrics.phase("creation", started.elapsed().as_secs_f64());
    }

    /// Serve a `bytes` request: the wanted entries' bytes, in the order asked, into `tx`. Entries of files
    /// (input shards, spilled decoded copies) go out as slices of a memory map of the file: the page cache
    /// is copied once, into the socket, not first into a buffer. In-memory decoded copies are copied into
    /// chunks.
    fn stream_bytes(&self, job: &TJob, want: &[u8], tx: &BytesSender) -> Result<(), String> {
        if !want.len().is_multiple_of(WANT_LEN) {
            return Err("bad bytes request".into());
        }
        let mut maps: HashMap<PathBuf, Bytes> = HashMap::new();
        let mut out: Vec<u8> = Vec::new();
        let send = |b: Bytes| -> Result<(), String> {
            let n = b.len() as u64;
            tx.blocking_send(Ok(b)).map_err(|_| "the creator went away".to_string())?;
            self.metrics.sent(n);
            Ok(())
        };
        for w in want.chunks(WANT_LEN) {
            job.check()?;
            let shard = u32::from_le_bytes(w[0..4].try_into().unwrap_or_default()) as usize;
            let kind = w[4];
            let off = u64::from_le_bytes(w[5..13].try_into().unwrap_or_default());
            let size = u64::from_le_bytes(w[13..21].try_into().unwrap_or_default());
            let decoded = job.decoded.lock().unwrap_or_else(|p| p.into_inner());
            let path = match (kind, decoded.get(shard).and_then(Option::as_ref)) {
                (1, Some(Decoded::Mem(buf, _))) => {
                    let s = usize::try_from(off).map_err(|_| "offset")?;
                    out.extend_from_slice(buf.get(s..s + size as usize).ok_or("decoded bytes out of range")?);
                    if out.len() >= BYTES_CHUNK {
                        send(Bytes::from(std::mem::take(&mut out)))?;
                    }
                    continue;
                }
                (1, Some(Decoded::File(p))) => p.clone(),
                (1, None) => return Err(format!("decoded copy of input shard {shard} is gone")),
                _ => job.farm.join(job.objects.get(shard).ok_or("bad shard index")?),
            };
            drop(decoded);
            if !out.is_empty() {
                send(Bytes::from(std::mem::take(&mut out)))?;
            }
            let map = match maps.entry(path) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let m = map_file(v.key())?;
                    v.insert(m)
                }
            };
            let (start, end) = (off as usize, (off + size) as usize);
            if end > map.len() {
                return Err(format!("input shard {shard}: {size} bytes at {off} are past its end (it shrank)"));
            }
            // Large entries go in pieces so that the stream's backpressure stays fine-grained.
            let mut at = start;
            while at < end {
                let next = (at + BYTES_CHUNK).min(end);
                send(map.slice(at..next))?;
                at = next;
            }
        }
        if !out.is_empty() {
            send(Bytes::from(out))?;
        }
        Ok(())
    }

    /// Pull entry bytes from `holder`: a `bytes` request whose reply streams into a blocking reader (the
    /// shard writer reads it in the order of `want`).
    fn pull(
        &self,
        rt: &tokio::runtime::Handle,
        holder: &TargetInfo,
        job: &str,
        want: Vec<u8>,
        queued: usize,
    ) -> Result<StreamReader, String> {
        use futures_util::StreamExt;
        let client = self.peer(holder)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(queued);
        let job = job.to_string();
        rt.spawn(async move {
            match client.job_stream(Method::POST, &job, "bytes", want).await {
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                }
                Ok(stream) => {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(chunk) = stream.next().await {
                        let failed = chunk.is_err();
                        if tx.send(chunk.map_err(|e| e.to_string())).await.is_err() || failed {
                            break;
                        }
                    }
                }
            }
        });
        Ok(StreamReader { rx, cur: Bytes::new(), metrics: self.metrics.clone() })
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

async fn init(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Reply {
    if s.target.is_draining() {
        return Err(s.err(ClusterError::ShuttingDown {
            what: format!("target {}", s.target.id()),
            reason: format!("it takes no new job (dsort job {id})"),
        }));
    }
    let msg: InitMsg = serde_json::from_slice(&body).map_err(|e| s.failed(&id, format!("bad init message: {e}")))?;
    let id2 = id.clone();
    let out = s.blocking(&id, move |s, _| s.do_init(&id2, msg)).await?;
    Ok(out.into())
}

async fn distribute(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Reply {
    let job = s.job(&id)?;
    s.blocking(&id, move |s, rt| s.do_distribute(&job, rt, &body)).await?;
    Ok(Bytes::new())
}

/// A record stream from a peer: frames may straddle chunks; each complete frame goes into the range sorter
/// (on a blocking thread, fed through a bounded channel, so a slow sorter slows the sender down).
async fn records(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: axum::body::Body) -> Reply {
    use futures_util::StreamExt;
    let job = s.job(&id)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUED);
    let worker = s.blocking(&id, move |_, _| {
        let t0 = Instant::now();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            job.check()?;
            pending.extend_from_slice(&chunk);
            let mut at = 0;
            let mut items = Vec::new();
            while pending.len() - at >= 4 {
                let n = frame_len(&pending[at..at + 4])?;
                if pending.len() - at - 4 < n {
                    break;
                }
                items.push(
                    job.codec.decode(&pending[at + 4..at + 4 + n]).map_err(|e| format!("bad record frame: {e}"))?,
                );
                at += 4 + n;
            }
            pending.drain(..at);
            let mut g = job.range.lock().unwrap_or_else(|p| p.into_inner());
            let sorter = g.as_mut().ok_or("range sorter gone")?;
            for it in items {
                sorter.push(it).map_err(|e| e.to_string())?;
            }
        }
        if !pending.is_empty() {
            return Err("record stream ended inside a frame".into());
        }
        job.info().metrics.meta_sorting.recv_stats.add(t0.elapsed());
        Ok(())
    });
    let feed = async move {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("record stream: {e}"))?;
            if tx.send(chunk).await.is_err() {
                break; // the worker failed: its error is the answer
            }
        }
        Ok::<(), String>(())
    };
    let (fed, worked) = tokio::join!(feed, worker);
    worked?;
    fed.map_err(|m| s.failed(&id, m))?;
    Ok(Bytes::new())
}

async fn sortrange(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.job(&id)?;
    let n = s.blocking(&id, move |s, _| s.do_sortrange(&job)).await?;
    Ok(n.to_string().into())
}

async fn cut(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Reply {
    let job = s.job(&id)?;
    let msg: CutMsg = serde_json::from_slice(&body).map_err(|e| s.failed(&id, format!("bad cut message: {e}")))?;
    let c = s.blocking(&id, move |_, _| TargetJobs::do_cut(&job, msg)).await?;
    Ok(serde_json::to_vec(&c).unwrap_or_default().into())
}

async fn send(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.job(&id)?;
    s.blocking(&id, move |s, rt| s.do_send(&job, rt)).await?;
    Ok(Bytes::new())
}

async fn shard(
    State(s): State<Arc<TargetJobs>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ShardQuery>,
    body: Bytes,
) -> Reply {
    let job = s.job(&id)?;
    s.blocking(&id, move |_, _| {
        job.check()?;
        if q.g as usize >= job.groups.len() {
            return Err(format!("output group {} does not exist", q.g));
        }
        let path = job.shard_file(q.g, q.k, q.r);
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| e.to_string())?;
        f.write_all(&body).map_err(|e| e.to_string())?;
        job.received.lock().unwrap_or_else(|p| p.into_inner()).entry((q.g, q.k)).or_default().push(q.r);
        Ok(())
    })
    .await?;
    Ok(Bytes::new())
}

async fn create(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.job(&id)?;
    let n = s.blocking(&id, move |s, rt| s.do_create(&job, rt)).await?;
    Ok(n.to_string().into())
}

/// Publish the job's staged shards. A job this target does not know (it restarted during the commit) is
/// published from its plan; without a plan there is nothing left to publish here (done, or nothing staged).
async fn commit(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = match s.job(&id) {
        Ok(job) => job,
        Err(_) => {
            let id2 = id.clone();
            s.blocking(&id, move |s, _| s.publish_recovered(&id2)).await?;
            return Ok(Bytes::new());
        }
    };
    s.blocking(&id, move |s, _| s.do_commit(&job)).await?;
    Ok(Bytes::new())
}

/// Entry bytes for a creator, streamed as they are read (see [`TargetJobs::stream_bytes`]); an error cuts
/// the stream short, which the creator reports naming this target.
async fn bytes_route(
    State(s): State<Arc<TargetJobs>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let job = s.job(&id)?;
    check_wanted(&job, &body).map_err(|e| s.err(e))?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(m) = s2.stream_bytes(&job, &body, &tx) {
            let m = format!("target {}: serving record bytes: {m}", s2.target.id());
            if !job.cancel.load(Ordering::Relaxed) {
                job.info().metrics.errors.push(m.clone());
            }
            let _ = tx.blocking_send(Err(std::io::Error::other(m)));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok(axum::body::Body::from_stream(stream).into_response())
}

/// A `bytes` request may name only input shards this target holds for the job (extracted here), and entries
/// of an S3 input shard only from its decoded copy (the creator reads the rest from S3 itself): 403 otherwise,
/// before a byte is sent.
fn check_wanted(job: &TJob, want: &[u8]) -> Result<(), ClusterError> {
    let what = || format!("dsort job {} bytes", job.id);
    if !want.len().is_multiple_of(WANT_LEN) {
        return Err(ClusterError::BadRequest {
            what: what(),
            reason: format!("{} bytes is not a list of {WANT_LEN}-byte entries", want.len()),
        });
    }
    for w in want.chunks(WANT_LEN) {
        let shard = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let name = job.objects.get(shard as usize).map_or("(none)", String::as_str);
        if !job.held.contains(&shard) {
            return Err(ClusterError::Forbidden {
                what: what(),
                reason: format!("input shard {shard} ({name}) is not held by this target"),
            });
        }
        if w[4] == 0 && job.input_s3 {
            return Err(ClusterError::Forbidden {
                what: what(),
                reason: format!("input shard {shard} ({name}) is in S3: read it there"),
            });
        }
    }
    Ok(())
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

/// A job this target runs (`GET /v1/sort/jobs`): what a restarted coordinator asks to find orphans.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldJob {
    pub id: String,
    /// Its output is published here (the commit step is done).
    pub committed: bool,
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
