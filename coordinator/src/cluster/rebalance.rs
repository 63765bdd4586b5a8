//! Rebalance: after the set of targets objects are placed over changes (a target joins, leaves, comes back,
//! or registers other mountpaths), every target moves each object it holds whose HRW owner is now another
//! target to that owner, and each object on a mountpath other than its HRW one to that mountpath.
//!
//! **Membership generation.** The coordinator numbers the placement set (the healthy targets' ids and
//! mountpaths): the generation grows by one at each change. With `--rebalance auto` (the default, as
//! AIStore) a change starts a pass once the set has been stable for a short settle time (2 s: a restarting
//! target is not moved around twice); `--rebalance manual` waits for `dsort rebalance` (`POST /v1/rebalance`).
//!
//! **A pass** runs on every healthy target at once, over the same target list. Each target walks its
//! mountpaths; for an object owned elsewhere it *copies* the object to the owner (`PUT
//! /v1/cluster/rebalance/objects/...` with its size, xxh3 and modification time; the owner writes it under a
//! temporary name, checks size and checksum, fsyncs, renames, and answers), and only once the owner answered
//! with the same size and checksum it deletes its own copy (unless that file was replaced meanwhile). An
//! object on the wrong mountpath of its owner is copied to the right one (fsync, rename), then the old file
//! is removed; a copy on the HRW mountpath already wins (as a PUT would have left it). At every moment each
//! object has at least one whole copy, so a `kill -9` of any target at any point loses nothing: at worst two
//! copies exist, and the next pass (the generation changes when the target leaves and again when it returns;
//! a target that restarts unnoticed is given the pass again) finds the owner's copy identical and deletes the
//! other. When both copies differ (an object overwritten while its owner was down) the newer by modification
//! time wins; the mover keeps the time of the copy it moves.
//!
//! **Jobs and rebalance.** A job must never lose an input: the coordinator does not start a pass while a job
//! runs (the pass waits: state `waiting`), and a job that starts while a pass runs first stops it (each target
//! finishes the object in hand, so no object is half-moved) and the pass runs again, from the start (it is
//! idempotent), once no job runs. Jobs do not wait for placement to be right: they read inputs where they are
//! ([`super::reach`]).
//!
//! Routes on a target (intra-cluster): `POST /v1/cluster/rebalance` ([`PassRequest`] → [`PassStatus`]) starts
//! a pass (the same generation again is a no-op), `GET` its status, `DELETE` stops it (answers once it
//! stopped); `PUT /v1/cluster/rebalance/objects/{bucket}/{object...}` receives one object ([`ReceiveReply`]).
//! On the coordinator: `GET /v1/rebalance` ([`RebalanceStatus`], also in `GET /v1/health` as `rebalance`) and
//! `POST /v1/rebalance` (start a pass now, or once the running job ends).
//!
//! For fault tests only: `DSORT_TEST_HOLD=rebalance-send` stops a target after the new owner confirmed its
//! first object and before it deletes its own copy; `rebalance-recv` stops a target after it received an
//! object's bytes and before it publishes them (until `DSORT_TEST_HOLD_RELEASE` exists).

use super::api::TargetInfo;
use super::client::Client;
use super::coordinator::Coordinator;
use super::error::{ApiError, ClusterError, Result};
use super::store::StoredCopy;
use super::target::{Target, blocking};
use crate::placement;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::http::header::CONTENT_LENGTH;
use axum::routing::{post, put};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// The coordinator's public route.
pub const REBALANCE: &str = "/v1/rebalance";
/// A target's pass (intra-cluster).
pub const TARGET_PASS: &str = "/v1/cluster/rebalance";
/// A target receives one object here (intra-cluster): `PUT {TARGET_RECEIVE}/{bucket}/{object...}`.
pub const TARGET_RECEIVE: &str = "/v1/cluster/rebalance/objects";
/// The xxh3-64 of the object sent (16 lower-case hex digits).
pub const CHECKSUM_HEADER: &str = "x-dsort-xxh3";
/// The modification time of the copy sent, in nanoseconds since the epoch.
pub const MTIME_HEADER: &str = "x-dsort-mtime-ns";

/// How long a target may take to stop its pass (the objects in hand are finished, not cut).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Control calls of the coordinator to targets (start, status).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the coordinator looks at a running pass.
const POLL: Duration = Duration::from_millis(300);
/// Objects a target moves at once.
const PARALLEL: usize = 4;
/// Errors kept per pass (the first ones; the count says how many there were).
const MAX_ERRORS: usize = 20;
/// A failed pass is run again after this long, at most this many times per membership generation.
const RETRY_AFTER: Duration = Duration::from_secs(5);
const MAX_RETRIES: u32 = 3;
/// The longest a job waits for a running pass to stop before it is refused (503).
const JOB_WAIT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebalanceState {
    /// No pass since the coordinator started.
    #[default]
    Idle,
    /// A pass is due but a job runs: it starts when no job runs.
    Waiting,
    Running,
    /// The last pass moved every object it had to.
    Done,
    /// The last pass ended with errors (see `errors`); with `auto` it is run again a few times.
    Failed,
}

/// The rebalance as the coordinator sees it (`GET /v1/rebalance`, and `rebalance` in `GET /v1/health`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceStatus {
    pub state: RebalanceState,
    /// Passes start on their own after a membership change (`--rebalance auto`).
    pub auto: bool,
    /// Grows by one whenever the placement set (healthy targets and their mountpaths) changes.
    pub membership_generation: u64,
    /// The generation the last (or running) pass placed objects for; 0 before the first pass.
    pub pass_generation: u64,
    /// Passes started since the coordinator started.
    pub passes: u64,
    /// Another pass is due (a change, a request, or a retry), not started yet.
    pub pending: bool,
    /// Targets in the last pass, and how many of them finished it.
    pub targets: usize,
    pub targets_done: usize,
    /// Objects copied to their new owner (verified there), and moved (the old copy deleted too), in the
    /// last pass; bytes moved; objects moved to another mountpath of their target.
    pub objects_sent: u64,
    pub objects_moved: u64,
    pub bytes_moved: u64,
    pub objects_relocated: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The coordinator asks a target to run a pass over `targets` for membership `generation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassRequest {
    pub generation: u64,
    pub targets: Vec<TargetInfo>,
}

/// A target's pass (`GET /v1/cluster/rebalance`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassStatus {
    pub generation: u64,
    pub state: RebalanceState,
    pub objects_sent: u64,
    pub objects_moved: u64,
    pub bytes_moved: u64,
    pub objects_relocated: u64,
    /// Objects and bytes this target received from others (since it started).
    pub objects_received: u64,
    pub bytes_received: u64,
    #[serde(default)]
    pub errors: Vec<String>,
}

/// What the new owner holds once a transfer is answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveReply {
    pub size: u64,
    pub xxh3: String,
    /// The owner already held a newer copy and kept it (the sender's copy is stale).
    pub kept_newer: bool,
}

// ---------------------------------------------------------------------------------------------------------
// The target's side.

/// A target's rebalance: the pass it runs (at most one) and what it received.
#[derive(Debug, Default)]
pub struct TargetRebalance {
    pass: tokio::sync::Mutex<Option<RunningPass>>,
    status: std::sync::Mutex<PassStatus>,
    received: AtomicU64,
    received_bytes: AtomicU64,
}

#[derive(Debug)]
struct RunningPass {
    generation: u64,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TargetRebalance {
    fn lock(&self) -> std::sync::MutexGuard<'_, PassStatus> {
        self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn status(&self) -> PassStatus {
        let mut s = self.lock().clone();
        s.objects_received = self.received.load(Ordering::Relaxed);
        s.bytes_received = self.received_bytes.load(Ordering::Relaxed);
        s
    }

    fn error(&self, e: String) {
        let mut s = self.lock();
        if s.errors.len() < MAX_ERRORS {
            s.errors.push(e);
        }
    }

    /// Stop the running pass, if any: it finishes the objects in hand. `false` if it did not stop in time.
    pub(crate) async fn stop(&self) -> bool {
        let Some(mut p) = self.pass.lock().await.take() else { return true };
        p.cancel.cancel();
        tokio::time::timeout(STOP_TIMEOUT, &mut p.task).await.is_ok()
    }
}

/// The most a pass request (the membership it is for) may weigh.
const PASS_BODY: usize = 4 << 20;

/// The routes a target serves for rebalancing (merged into [`Target::routes`]).
pub fn target_routes() -> Router<Arc<Target>> {
    Router::new()
        .route(TARGET_PASS, post(start_pass).get(pass_status).delete(stop_pass))
        .layer(axum::extract::DefaultBodyLimit::max(PASS_BODY))
        // An object's bytes stream to disk; their size is the one the sender announced and is checked.
        .route(
            &format!("{TARGET_RECEIVE}/{{bucket}}/{{*object}}"),
            put(receive).layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

async fn start_pass(
    State(t): State<Arc<Target>>,
    axum::Json(req): axum::Json<PassRequest>,
) -> Result<axum::Json<PassStatus>, ApiError> {
    let err = |e| ApiError { error: e, node: Some(format!("target {}", t.id())) };
    if !req.targets.iter().any(|x| x.id == t.id()) {
        return Err(err(ClusterError::BadRequest {
            what: format!("rebalance generation {}", req.generation),
            reason: "this target is not in the pass's target list".into(),
        }));
    }
    let r = &t.rebalance;
    {
        let current = r.pass.lock().await;
        if current.as_ref().is_some_and(|p| p.generation == req.generation && !p.task.is_finished()) {
            return Ok(axum::Json(r.status()));
        }
    }
    if !r.stop().await {
        return Err(err(ClusterError::ShuttingDown {
            what: "the running rebalance pass".into(),
            reason: format!("it did not stop within {STOP_TIMEOUT:?}"),
        }));
    }
    let mut slot = r.pass.lock().await;
    *r.lock() = PassStatus { generation: req.generation, state: RebalanceState::Running, ..Default::default() };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_pass(t.clone(), req.clone(), cancel.clone()));
    *slot = Some(RunningPass { generation: req.generation, cancel, task });
    drop(slot);
    Ok(axum::Json(r.status()))
}

async fn pass_status(State(t): State<Arc<Target>>) -> axum::Json<PassStatus> {
    axum::Json(t.rebalance.status())
}

async fn stop_pass(State(t): State<Arc<Target>>) -> Result<axum::Json<PassStatus>, ApiError> {
    if !t.rebalance.stop().await {
        return Err(ApiError {
            error: ClusterError::ShuttingDown {
                what: "the running rebalance pass".into(),
                reason: format!("it did not stop within {STOP_TIMEOUT:?}"),
            },
            node: Some(format!("target {}", t.id())),
        });
    }
    Ok(axum::Json(t.rebalance.status()))
}

async fn run_pass(t: Arc<Target>, req: PassRequest, cancel: CancellationToken) {
    let started = Instant::now();
    t.log(format!("rebalance: pass for membership generation {} over {} target(s)", req.generation, req.targets.len()));
    let result = walk_and_move(&t, &req, &cancel).await;
    let r = &t.rebalance;
    if let Err(e) = result {
        r.error(e);
    }
    let mut s = r.lock();
    s.state = if cancel.is_cancelled() {
        RebalanceState::Idle
    } else if s.errors.is_empty() {
        RebalanceState::Done
    } else {
        RebalanceState::Failed
    };
    t.log(format!(
        "rebalance: pass {} {:?} in {:.1}s: {} object(s) moved ({} bytes), {} relocated, {} error(s)",
        req.generation,
        s.state,
        started.elapsed().as_secs_f64(),
        s.objects_moved,
        s.bytes_moved,
        s.objects_relocated,
        s.errors.len()
    ));
}

/// Move every object this target holds that belongs elsewhere; the errors of single objects are noted in
/// the status (the pass goes on), the returned error is one that stops the whole pass.
async fn walk_and_move(t: &Arc<Target>, req: &PassRequest, cancel: &CancellationToken) -> Result<(), String> {
    let store = t.store.clone();
    let copies = blocking(move || store.all_copies()).await.map_err(|e| e.to_string())?;
    let ids: Vec<&str> = req.targets.iter().map(|x| x.id.as_str()).collect();
    let mut peers = std::collections::HashMap::new();
    for x in req.targets.iter().filter(|x| x.id != t.id()) {
        peers.insert(x.id.as_str(), t.peer_client(x).map_err(|e| e.to_string())?);
    }
    futures_util::stream::iter(copies)
        .for_each_concurrent(PARALLEL, |copy| {
            let peers = &peers;
            let ids = &ids;
            async move {
                if cancel.is_cancelled() {
                    return;
                }
                let owner = placement::owner_target(&copy.bucket, &copy.name, ids).copied();
                let moved = match owner.and_then(|o| peers.get(o)) {
                    Some(peer) => send(t, peer, &copy, cancel).await,
                    None if !t.store.is_on_its_mountpath(&copy) => relocate(t, copy.clone()).await,
                    None => Ok(()),
                };
                if let Err(e) = moved {
                    t.rebalance.error(format!("target {}: {}/{}: {e}", t.id(), copy.bucket, copy.name));
                }
            }
        })
        .await;
    Ok(())
}

fn mtime_ns(m: &std::fs::Metadata) -> u64 {
    m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64)
}

/// The whole-request deadline of a transfer of `size` bytes: generous (a slow disk at 8 MiB/s), but finite.
fn transfer_timeout(size: u64) -> Duration {
    Duration::from_secs(30 + size / (8 << 20))
}

/// Copy `copy` to its owner `peer`; once the owner confirmed it holds the same bytes durably, delete it
/// here (unless the file was replaced meanwhile).
async fn send(t: &Arc<Target>, peer: &Client, copy: &StoredCopy, cancel: &CancellationToken) -> Result<(), String> {
    // Opened once: the bytes hashed are the bytes sent, and the file deleted is the one sent.
    let path = copy.path.clone();
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut f = std::fs::File::open(&path)?;
        let meta = f.metadata()?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        f.rewind()?;
        Ok((f, meta, format!("{:016x}", h.digest())))
    })
    .await
    .map_err(|e| e.to_string())?;
    let (file, meta, sum) = match opened {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()), // deleted meanwhile
        Err(e) => return Err(format!("reading it: {e}")),
    };
    let size = meta.len();
    let body = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(tokio::fs::File::from_std(file), size),
        256 << 10,
    );
    let url = peer
        .url(["v1", "cluster", "rebalance", "objects", copy.bucket.as_str()].into_iter().chain(copy.name.split('/')));
    let rb = peer
        .request(reqwest::Method::PUT, url)
        .header(CONTENT_LENGTH, size)
        .header(CHECKSUM_HEADER, &sum)
        .header(MTIME_HEADER, mtime_ns(&meta))
        .body(reqwest::Body::wrap_stream(body))
        .timeout(transfer_timeout(size));
    let resp = tokio::select! {
        r = peer.send(rb) => r.map_err(|e| e.to_string())?,
        () = cancel.cancelled() => return Ok(()), // the owner drops what it received
    };
    let reply: ReceiveReply = peer.json(resp).await.map_err(|e| e.to_string())?;
    if !reply.kept_newer && (reply.size != size || reply.xxh3 != sum) {
        return Err(format!(
            "the new owner holds {} bytes with xxh3 {}, this copy has {size} bytes with xxh3 {sum}: kept here",
            reply.size, reply.xxh3
        ));
    }
    t.rebalance.lock().objects_sent += 1;
    test_hold("rebalance-send", cancel).await;
    let (store, c) = (t.store.clone(), copy.clone());
    let deleted = blocking(move || {
        let now = std::fs::metadata(&c.path).map_err(|e| ClusterError::io(c.path.display().to_string(), e))?;
        let same = now.ino() == meta.ino() && now.dev() == meta.dev() && now.len() == size;
        if same && mtime_ns(&now) == mtime_ns(&meta) {
            store.remove_copy(&c)?;
            return Ok(true);
        }
        Ok(false)
    })
    .await;
    match deleted {
        Ok(true) => {
            let mut s = t.rebalance.lock();
            s.objects_moved += 1;
            s.bytes_moved += size;
            Ok(())
        }
        Ok(false) => Err("replaced here while it was moved: the new copy stays for the next pass".into()),
        Err(ClusterError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Move a copy of an object this target owns to its HRW mountpath: copied there (fsync, rename) unless a
/// copy is there already (it wins), then removed from where it was.
async fn relocate(t: &Arc<Target>, copy: StoredCopy) -> Result<(), String> {
    let store = t.store.clone();
    blocking(move || {
        let what = || format!("{}/{}", copy.bucket, copy.name);
        let io = |e: std::io::Error| ClusterError::io(what(), e);
        let to = store.path_for_write(&copy.bucket, &copy.name)?;
        if !std::fs::metadata(&to).is_ok_and(|m| m.is_file()) {
            let mut from = match std::fs::File::open(&copy.path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io(e)),
            };
            let modified = from.metadata().and_then(|m| m.modified()).map_err(io)?;
            let mut pending = store.create(&copy.bucket, &copy.name)?;
            std::io::copy(&mut from, pending.file()).map_err(io)?;
            pending.file().set_modified(modified).map_err(io)?;
            pending.commit().map_err(|e| super::store::map_commit_error(&copy.bucket, &copy.name, e))?;
        }
        store.remove_copy(&copy)
    })
    .await
    .map_err(|e| e.to_string())?;
    t.rebalance.lock().objects_relocated += 1;
    Ok(())
}

/// Receive one object from its old holder: written under a temporary name while its xxh3 is computed,
/// checked against the announced size and checksum, kept only if no newer copy is here, fsynced and
/// renamed into place; the answer comes once it is durable.
async fn receive(
    State(t): State<Arc<Target>>,
    UrlPath((bucket, object)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<ReceiveReply>, ApiError> {
    let what = format!("{bucket}/{object}");
    let err = |e: ClusterError| ApiError { error: e, node: Some(format!("target {}", t.id())) };
    let bad = |reason: String| err(ClusterError::BadRequest { what: what.clone(), reason });
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let len = header(CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok());
    let (Some(len), Some(want), Some(mtime)) =
        (len, header(CHECKSUM_HEADER), header(MTIME_HEADER).and_then(|v| v.parse::<u64>().ok()))
    else {
        return Err(bad(format!("a rebalance transfer needs Content-Length, {CHECKSUM_HEADER} and {MTIME_HEADER}")));
    };
    let want = want.to_ascii_lowercase();
    let (store, b, o) = (t.store.clone(), bucket.clone(), object.clone());
    let mut pending = blocking(move || store.create(&b, &o)).await.map_err(err)?;
    let io = |e: std::io::Error| err(ClusterError::io(what.clone(), e));
    let file = pending.file().try_clone().map_err(io)?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad(format!("transfer interrupted: {e}")))?;
        size += chunk.len() as u64;
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(io)?;
    }
    out.flush().await.map_err(io)?;
    drop(out);
    test_hold("rebalance-recv", &CancellationToken::new()).await;
    let got = format!("{:016x}", hasher.digest());
    if size != len || got != want {
        return Err(bad(format!("received {size} bytes with xxh3 {got}, the sender announced {len} with {want}")));
    }
    let (store, b, o) = (t.store.clone(), bucket.clone(), object.clone());
    let sent_time = UNIX_EPOCH + Duration::from_nanos(mtime);
    let kept_newer = blocking(move || {
        let newer_here = store
            .locate(&b, &o)
            .ok()
            .and_then(|(p, _)| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .is_some_and(|here: SystemTime| here > sent_time);
        if newer_here {
            return Ok(true); // the pending file is dropped (removed)
        }
        let what = format!("{b}/{o}");
        pending.file().set_modified(sent_time).map_err(|e| ClusterError::io(what.clone(), e))?;
        pending.commit().map_err(|e| super::store::map_commit_error(&b, &o, e))?;
        store.remove_stale_copies(&b, &o);
        Ok(false)
    })
    .await
    .map_err(err)?;
    if !kept_newer {
        t.rebalance.received.fetch_add(1, Ordering::Relaxed);
        t.rebalance.received_bytes.fetch_add(size, Ordering::Relaxed);
    }
    Ok(axum::Json(ReceiveReply { size, xxh3: got, kept_newer }))
}

/// The fault tests' failpoint `point` (see the module docs): waits until released or `cancel`.
async fn test_hold(point: &str, cancel: &CancellationToken) {
    let (held, release) = super::target_jobs::test_hold();
    if held.as_deref() != Some(point) {
        return;
    }
    eprintln!("dsort target: holding the rebalance at {point} (DSORT_TEST_HOLD)");
    while !release.as_ref().is_some_and(|f| f.exists()) {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
            () = cancel.cancelled() => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The coordinator's side.

/// The coordinator's rebalance: the membership generation, the pass (at most one), and the jobs that keep
/// passes from running.
#[derive(Debug)]
pub struct Rebalancer {
    inner: std::sync::Mutex<Inner>,
    /// Wakes the rebalance loop (a request, a job ending).
    wake: tokio::sync::Notify,
    /// Signalled when a pass stops running.
    idle: tokio::sync::Notify,
    settle: Duration,
}

#[derive(Debug)]
struct Inner {
    status: RebalanceStatus,
    /// The placement set the generation numbers: (id, mountpaths) of the healthy targets, sorted.
    key: Option<Vec<(String, Vec<String>)>>,
    changed_at: Instant,
    /// A pass is due.
    wanted: bool,
    retry_at: Option<Instant>,
    retries: u32,
    /// Jobs running or starting: no pass meanwhile.
    jobs: usize,
    /// A pass is running (targets may be moving objects).
    running: bool,
}

impl Rebalancer {
    /// `auto`: a membership change starts a pass once the set has been stable for `settle`.
    pub fn new(auto: bool, settle: Duration) -> Self {
        Rebalancer {
            inner: std::sync::Mutex::new(Inner {
                status: RebalanceStatus { auto, ..Default::default() },
                key: None,
                changed_at: Instant::now(),
                wanted: false,
                retry_at: None,
                retries: 0,
                jobs: 0,
                running: false,
            }),
            wake: tokio::sync::Notify::new(),
            idle: tokio::sync::Notify::new(),
            settle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn status(&self) -> RebalanceStatus {
        let i = self.lock();
        let mut s = i.status.clone();
        s.pending = i.wanted || i.retry_at.is_some();
        if s.pending && !i.running && i.jobs > 0 {
            s.state = RebalanceState::Waiting;
        }
        s
    }

    /// Ask for a pass now (or as soon as no job runs); the status after the request.
    pub fn request(&self) -> RebalanceStatus {
        self.lock().wanted = true;
        self.wake.notify_one();
        self.status()
    }

    /// The status as of now: the membership is looked at first, so a change shows at once (its generation,
    /// a pass pending), not at the rebalance loop's next turn.
    pub fn current(&self, healthy: &[TargetInfo]) -> RebalanceStatus {
        self.observe(healthy);
        self.status()
    }

    /// Note the current placement set: `true` when it changed (the generation grew).
    fn observe(&self, healthy: &[TargetInfo]) -> bool {
        let key: Vec<(String, Vec<String>)> = healthy.iter().map(|t| (t.id.clone(), t.mountpaths.clone())).collect();
        let mut i = self.lock();
        if i.key.as_ref() == Some(&key) {
            return false;
        }
        i.key = Some(key);
        i.changed_at = Instant::now();
        i.status.membership_generation += 1;
        i.retries = 0;
        i.retry_at = None;
        // The first set a coordinator sees gets a pass too (objects may be misplaced from before it started).
        if i.status.auto {
            i.wanted = true;
        }
        true
    }
}

/// The rebalance loop of the coordinator (spawned by [`Coordinator::run`]).
pub async fn run(c: Arc<Coordinator>, shutdown: CancellationToken) {
    let rb = &c.rebalance;
    loop {
        let healthy = c.healthy_targets();
        rb.observe(&healthy);
        let go = {
            let mut i = rb.lock();
            let due = i.wanted || i.retry_at.is_some_and(|t| Instant::now() >= t);
            if due && i.jobs == 0 && !healthy.is_empty() && i.changed_at.elapsed() >= rb.settle {
                i.running = true;
                i.wanted = false;
                i.retry_at = None;
                true
            } else {
                false
            }
        };
        if go {
            run_pass_everywhere(&c, healthy, &shutdown).await;
            rb.lock().running = false;
            rb.idle.notify_waiters();
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            () = rb.wake.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One pass over `targets`, until every target finished it, the membership changes, a job starts (the pass
/// is stopped and due again), or the coordinator shuts down.
async fn run_pass_everywhere(c: &Arc<Coordinator>, targets: Vec<TargetInfo>, shutdown: &CancellationToken) {
    let rb = &c.rebalance;
    let generation = {
        let mut i = rb.lock();
        let s = &mut i.status;
        *s = RebalanceStatus {
            state: RebalanceState::Running,
            auto: s.auto,
            membership_generation: s.membership_generation,
            pass_generation: s.membership_generation,
            passes: s.passes + 1,
            targets: targets.len(),
            ..Default::default()
        };
        s.membership_generation
    };
    eprintln!(
        "dsort coordinator: rebalance: pass for membership generation {generation} over {} target(s)",
        targets.len()
    );
    let clients: Vec<Client> = targets.iter().filter_map(|t| c.target_client(t).ok()).collect();
    let req = PassRequest { generation, targets: targets.clone() };
    let started = futures_util::future::join_all(clients.iter().map(|cl| cl.rebalance_start(&req))).await;
    let mut start_errors: Vec<String> = started.into_iter().filter_map(|r| r.err()).map(|e| e.to_string()).collect();
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => {
                stop_everywhere(&clients).await;
                return;
            }
        }
        rb.observe(&c.healthy_targets());
        let (changed, job) = {
            let i = rb.lock();
            (i.status.membership_generation != generation, i.jobs > 0)
        };
        if changed || job {
            let why = if changed { "the membership changed" } else { "a job starts" };
            eprintln!("dsort coordinator: rebalance: stopping pass {generation} ({why}); it runs again later");
            stop_everywhere(&clients).await;
            rb.lock().wanted = true;
            return;
        }
        let polled = futures_util::future::join_all(clients.iter().map(Client::rebalance_status)).await;
        let mut sum = RebalanceStatus::default();
        let mut errors = std::mem::take(&mut start_errors);
        for (cl, p) in clients.iter().zip(polled) {
            match p {
                Ok(p) if p.generation == generation => {
                    sum.objects_sent += p.objects_sent;
                    sum.objects_moved += p.objects_moved;
                    sum.bytes_moved += p.bytes_moved;
                    sum.objects_relocated += p.objects_relocated;
                    if matches!(p.state, RebalanceState::Done | RebalanceState::Failed) {
                        sum.targets_done += 1;
                    }
                    errors.extend(p.errors);
                }
                // A target that restarted without being noticed lost its pass: it gets it again.
                Ok(_) => {
                    if let Err(e) = cl.rebalance_start(&req).await {
                        start_errors.push(e.to_string());
                    }
                }
                Err(_) => {} // silent: the membership watch decides whether it is down
            }
        }
        errors.truncate(MAX_ERRORS);
        let mut i = rb.lock();
        let s = &mut i.status;
        s.objects_sent = sum.objects_sent;
        s.objects_moved = sum.objects_moved;
        s.bytes_moved = sum.bytes_moved;
        s.objects_relocated = sum.objects_relocated;
        s.targets_done = sum.targets_done;
        s.errors = errors;
        if sum.targets_done == targets.len() {
            let failed = !s.errors.is_empty();
            s.state = if failed { RebalanceState::Failed } else { RebalanceState::Done };
            eprintln!(
                "dsort coordinator: rebalance: pass {generation} {}: {} object(s) moved ({} bytes), {} relocated",
                if failed { "failed" } else { "done" },
                s.objects_moved,
                s.bytes_moved,
                s.objects_relocated
            );
            if failed && s.auto && i.retries < MAX_RETRIES {
                i.retries += 1;
                i.retry_at = Some(Instant::now() + RETRY_AFTER);
            }
            return;
        }
    }
}

/// Stop the pass on every target (each finishes the objects in hand).
async fn stop_everywhere(clients: &[Client]) {
    for r in futures_util::future::join_all(clients.iter().map(Client::rebalance_stop)).await {
        if let Err(e) = r {
            eprintln!("dsort coordinator: rebalance: stopping the pass: {e}");
        }
    }
}

/// Keeps rebalance passes from running while a job runs (dropped when the job ends).
#[derive(Debug)]
pub struct JobGuard(Arc<Coordinator>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        let rb = &self.0.rebalance;
        let mut i = rb.lock();
        i.jobs = i.jobs.saturating_sub(1);
        if i.jobs == 0 {
            rb.wake.notify_one();
        }
    }
}

/// A job is about to learn where its inputs are: no pass may move objects until it ends. Stops a running
/// pass (waiting for every target to finish the objects in hand) and keeps new ones from starting while the
/// returned guard lives.
pub async fn hold_for_job(c: &Arc<Coordinator>) -> Result<JobGuard> {
    let rb = &c.rebalance;
    rb.lock().jobs += 1;
    let guard = JobGuard(c.clone());
    rb.wake.notify_one();
    let deadline = tokio::time::Instant::now() + JOB_WAIT;
    loop {
        let idle = rb.idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        if !rb.lock().running {
            return Ok(guard);
        }
        tokio::select! {
            () = idle => {}
            () = tokio::time::sleep_until(deadline) => {
                return Err(ClusterError::ShuttingDown {
                    what: "the rebalance".into(),
                    reason: format!("it did not stop within {JOB_WAIT:?} to let the job start; start it again"),
                });
            }
        }
    }
}

impl Client {
    async fn rebalance_call(
        &self,
        method: reqwest::Method,
        timeout: Duration,
        body: Option<&PassRequest>,
    ) -> Result<PassStatus> {
        let mut rb = self.request(method, self.url(["v1", "cluster", "rebalance"])).timeout(timeout);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = self.send(rb).await?;
        self.json(r).await
    }

    /// Start a pass on a target (the same generation again is a no-op).
    pub async fn rebalance_start(&self, req: &PassRequest) -> Result<PassStatus> {
        self.rebalance_call(reqwest::Method::POST, STOP_TIMEOUT + CONTROL_TIMEOUT, Some(req)).await
    }

    /// A target's pass.
    pub async fn rebalance_status(&self) -> Result<PassStatus> {
        self.rebalance_call(reqwest::Method::GET, CONTROL_TIMEOUT, None).await
    }

    /// Stop a target's pass; answers once it stopped.
    pub async fn rebalance_stop(&self) -> Result<PassStatus> {
        self.rebalance_call(reqwest::Method::DELETE, STOP_TIMEOUT + CONTROL_TIMEOUT, None).await
    }

    /// The coordinator's rebalance (`GET /v1/rebalance`).
    pub async fn rebalance(&self) -> Result<RebalanceStatus> {
        let r = self
            .send(self.request(reqwest::Method::GET, self.url(["v1", "rebalance"])).timeout(CONTROL_TIMEOUT))
            .await?;
        self.json(r).await
    }

    /// Ask the coordinator for a pass (`POST /v1/rebalance`): the status right after the request.
    pub async fn rebalance_request(&self) -> Result<RebalanceStatus> {
        let r = self
            .send(self.request(reqwest::Method::POST, self.url(["v1", "rebalance"])).timeout(CONTROL_TIMEOUT))
            .await?;
        self.json(r).await
    }
}

/// `GET /v1/rebalance` on the coordinator.
pub async fn status_route(State(c): State<Arc<Coordinator>>) -> axum::Json<RebalanceStatus> {
    axum::Json(c.rebalance.current(&c.healthy_targets()))
}

/// `POST /v1/rebalance` on the coordinator.
pub async fn request_route(State(c): State<Arc<Coordinator>>) -> axum::Json<RebalanceStatus> {
    c.rebalance.current(&c.healthy_targets());
    axum::Json(c.rebalance.request())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{TargetConfig, http};

    /// The receiving end of a transfer on an in-process target: announced size and checksum are checked (a
    /// mismatch publishes nothing and leaves no temp file), a good copy is published with the sender's
    /// modification time, a newer copy already there is kept, and a pass for a list without this target is
    /// refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receiving_checks_size_checksum_and_keeps_the_newer_copy() {
        let dir = tempfile::tempdir().unwrap();
        let listener = http::bind("127.0.0.1:0").await.unwrap();
        let config = TargetConfig::new("http://127.0.0.1:9", vec![dir.path().join("a"), dir.path().join("b")]);
        let target = Target::open(config, listener.local_addr().unwrap()).unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(target.clone().run(listener, Router::new(), shutdown.clone()));
        let url = format!("{}{TARGET_RECEIVE}/bkt/dir/x.tar", target.info.url);
        let http = reqwest::Client::new();
        let data = b"0123456789".repeat(1000);
        let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&data));
        let at = |ns: u64| UNIX_EPOCH + Duration::from_nanos(ns);
        let send = |body: Vec<u8>, sum: &str, mtime: u64| {
            http.put(&url).header(CHECKSUM_HEADER, sum).header(MTIME_HEADER, mtime).body(body).send()
        };
        let files = || target.store.all_copies().unwrap();

        let r = http.put(&url).body(data.clone()).send().await.unwrap();
        assert_eq!(r.status(), 400, "headers are required");
        let r = send(data.clone(), "0000000000000000", 1_000_000_000).await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().contains("xxh3"));
        assert!(files().is_empty(), "nothing published");
        assert_eq!(target.store.remove_stale_temp_files(), 0);
        let tmp_left = walkdir(dir.path()).into_iter().filter(|p| p.contains(".dsort-tmp")).count();
        assert_eq!(tmp_left, 0, "no temp file left");

        let r = send(data.clone(), &sum, 2_000_000_000).await.unwrap();
        assert_eq!(r.status(), 200);
        let reply: ReceiveReply = r.json().await.unwrap();
        assert_eq!(reply, ReceiveReply { size: data.len() as u64, xxh3: sum.clone(), kept_newer: false });
        let (path, size) = target.store.locate("bkt", "dir/x.tar").unwrap();
        assert_eq!((std::fs::read(&path).unwrap(), size), (data.clone(), data.len() as u64));
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), at(2_000_000_000), "the sender's time");

        // An older copy arriving later does not replace the newer one here.
        let old = b"older".to_vec();
        let old_sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&old));
        let reply: ReceiveReply = send(old, &old_sum, 1_000_000_000).await.unwrap().json().await.unwrap();
        assert!(reply.kept_newer, "{reply:?}");
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(target.rebalance.status().objects_received, 1);

        let req = PassRequest { generation: 1, targets: vec![] };
        let r = http.post(format!("{}{TARGET_PASS}", target.info.url)).json(&req).send().await.unwrap();
        assert_eq!(r.status(), 400, "a pass for a list without this target");
        shutdown.cancel();
    }

    fn walkdir(root: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path().display().to_string());
                }
            }
        }
        out
    }
}
