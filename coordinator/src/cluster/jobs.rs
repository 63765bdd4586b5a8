//! The job API of the coordinator (design §5, AIStore-compatible), merged into the coordinator's routes
//! with [`JobApi::routes`] (so the token check applies):
//!
//! | method, path | reply |
//! |---|---|
//! | `POST /v1/sort` (spec JSON or YAML, at most 16 MiB) | 200 plain-text id `srt-...`; 400 spec errors (all messages, one a line); 404 input bucket has no object on any healthy target; 409 a running job writes some of the same output names in the same bucket; 503 no healthy target |
//! | `GET /v1/sort?uuid=ID` | 200 `{"<target id>": JobInfo}`; 404 unknown |
//! | `GET /v1/sort[?regex=R][&only_active=true]` | 200 `[JobInfo]` aggregated per job (regex on the description); 400 bad regex |
//! | `DELETE /v1/sort/abort?uuid=ID` | 200 (also for a finished job, like AIStore); 404 unknown |
//! | `DELETE /v1/sort?uuid=ID` | 200; 400 while running; 404 unknown |
//! | `GET /v1/cluster/jobs/{id}/decision` (cluster secret) | `commit`, `abort`, `pending` or `unknown`: what a target restarted with a job's shards staged does |
//!
//! Every `uuid` must be a valid job id (400 otherwise).
//!
//! A job runs over the healthy targets at its start (sorted by id; the list is fixed for the job). Each
//! job is driven by one tokio task on the coordinator. No rebalance pass moves objects while a job runs (a
//! running pass is stopped before the job starts, see [`super::rebalance`]); before extraction the job asks
//! every target which input objects it holds and has each extracted by one holder ([`super::reach`]). The per-target [`JobInfo`]s are kept here, updated
//! by the driver.
//!
//! A job fails as a whole: the first error of any target, a target going down (the error says whether it
//! left or went silent), a target that makes no progress inside a step for the stall timeout
//! (`JobApi::watch_progress`) or an abort stops it on every target. On SIGTERM the coordinator takes no new
//! job, lets the running ones finish for its grace period, then aborts them ([`JobApi::shut_down`]).
//!
//! Once every shard is staged the outcome is decided (commit) and saved before any target publishes
//! (`JobApi::commit_all`): from then on the job cannot fail or be aborted; a target lost meanwhile publishes
//! when it is back. With a state dir the job list survives a restart (a running job loads as aborted, a
//! committing one is finished), and [`JobApi::reconcile`] ends on the targets the jobs this coordinator does
//! not run.

use super::api::TargetInfo;
use super::client::Client;
use super::coordinator::Coordinator;
use super::error::{ApiError, ClusterError};
use super::jobinfo::{Bck, JobInfo, rfc3339};
use super::messages::{CarryMsg, CreateMsg, CutMsg, CutReply, InitMsg, push_frame, read_frames};
use super::metrics::{JobStates, NodeMetrics, PHASES, Work};
use super::names::{AisUri, check_job_id};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use dsort::dist::pick_splitters;
use dsort::key::RecordCodec;
use dsort::spec::AlgorithmKind;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Public job routes.
pub const SORT: &str = "/v1/sort";
pub const SORT_ABORT: &str = "/v1/sort/abort";

struct JobRecord {
    /// Per target id, in the job's target order.
    infos: BTreeMap<String, JobInfo>,
    cancel: CancellationToken,
    targets: Vec<TargetInfo>,
    /// The driver ended (the infos are final).
    ended: bool,
    /// Why `cancel` was triggered when not by the user (the coordinator shutting down): the job's error.
    stop_reason: Option<String>,
    /// Decided (and saved before any target publishes): the output is published, the job cannot fail any
    /// more, a target that dies meanwhile finishes when it is back.
    committing: bool,
    /// The bucket and names it may write, while it runs (a second job writing one of them is refused).
    writes: Option<(Bck, OutputNames)>,
}

impl JobRecord {
    /// Aborted by a client (`DELETE /v1/sort/abort`): the job's errors stay the targets' own.
    fn aborted_by_user(&self) -> bool {
        self.cancel.is_cancelled() && self.stop_reason.is_none()
    }
}

/// What the coordinator settled before starting a job: the spec as sent, the external key map's text, and
/// the input object names every target works on.
struct Launch {
    text: String,
    ekm_text: Option<String>,
    objects: Vec<String>,
}

/// The jobs the coordinator knows (until removed).
pub struct JobApi {
    coordinator: Arc<Coordinator>,
    jobs: Mutex<BTreeMap<String, JobRecord>>,
    /// The cluster's totals (`GET /metrics` on the coordinator), added as each job ends.
    metrics: NodeMetrics,
    /// Hosts an `ekm_file` URL may name (lower case); empty: none.
    ekm_hosts: Vec<String>,
    /// Every job's driver task (so a shutdown can wait for their aborts to reach the targets).
    drivers: tokio_util::task::TaskTracker,
    /// Signalled whenever a job ends.
    job_ended: tokio::sync::Notify,
    /// A target inside a step of a job that makes no progress for this long aborts the job.
    stall_timeout: std::time::Duration,
    /// Where the job list is kept across restarts (`--state-dir`); `None`: in memory only.
    state_file: Option<std::path::PathBuf>,
    /// Held while the job list is written.
    saving: Mutex<()>,
}

/// How the job API is configured (the coordinator's flags).
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Hosts an `ekm_file` URL may name (names or addresses, any case).
    pub ekm_hosts: Vec<String>,
    /// A target inside a step of a job that makes no progress for this long aborts the job.
    pub stall_timeout: std::time::Duration,
    /// Where the job list is kept across restarts; `None`: in memory only.
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig { ekm_hosts: Vec::new(), stall_timeout: STALL_TIMEOUT, state_dir: None }
    }
}

/// The job list in the state dir.
const STATE_FILE: &str = "jobs.json";
/// How often [`JobApi::reconcile`] asks the targets which jobs they run.
const RECONCILE_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// The state file: every job the coordinator knows.
#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    jobs: BTreeMap<String, StoredJob>,
}

/// A job as kept in the state file.
#[derive(Serialize, Deserialize)]
struct StoredJob {
    infos: BTreeMap<String, JobInfo>,
    targets: Vec<TargetInfo>,
    ended: bool,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    committing: bool,
}

/// The job list kept in `dir` (none yet: empty). A job that had not ended was running when the coordinator
/// stopped: nobody drives it any more, so it is marked aborted with that reason.
fn load_jobs(dir: &std::path::Path) -> Result<BTreeMap<String, JobRecord>, ClusterError> {
    std::fs::create_dir_all(dir).map_err(|e| ClusterError::io(format!("--state-dir {}", dir.display()), e))?;
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(ClusterError::io(path.display().to_string(), e)),
    };
    let state: StateFile = serde_json::from_slice(&text)
        .map_err(|e| ClusterError::Config(format!("{}: not a dsort job list: {e}", path.display())))?;
    let reason = "the coordinator stopped while the job ran: job aborted".to_string();
    let mut jobs = BTreeMap::new();
    for (id, mut job) in state.jobs {
        if !job.ended && job.committing {
            eprintln!("dsort coordinator: job {id} was committing when the coordinator stopped: finishing it");
        } else if !job.ended {
            eprintln!("dsort coordinator: job {id} was running when the coordinator stopped: marked aborted");
            for info in job.infos.values_mut() {
                info.aborted = true;
                info.metrics.aborted = true;
                info.archived = true;
                info.metrics.archived = true;
                info.metrics.local_extraction.phase.running = false;
                if !info.metrics.errors.contains(&reason) {
                    info.metrics.errors.push(reason.clone());
                }
            }
            job.ended = true;
            job.stop_reason = Some(reason.clone());
        }
        let rec = JobRecord {
            infos: job.infos,
            cancel: CancellationToken::new(),
            targets: job.targets,
            ended: job.ended,
            stop_reason: job.stop_reason,
            committing: job.committing,
            writes: None,
        };
        jobs.insert(id, rec);
    }
    Ok(jobs)
}

/// How long a decided commit waits for a target that is gone to come back and publish.
const COMMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// The default of `--stall-timeout`.
pub const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The step each target of a running job is in (an outstanding call from the driver), by target index.
#[derive(Default)]
struct Steps(Mutex<BTreeMap<usize, &'static str>>);

impl Steps {
    /// Run `call` as target `i`'s step `op`.
    async fn run<T>(&self, i: usize, op: &'static str, call: impl std::future::Future<Output = T>) -> T {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(i, op);
        let r = call.await;
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&i);
        r
    }

    fn of(&self, i: usize) -> Option<&'static str> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&i).copied()
    }
}

/// The phase a step belongs to (for errors).
fn phase_of(op: &str) -> &'static str {
    match op {
        "init" => "extraction",
        "create" | "commit" => "creation",
        _ => "sorting",
    }
}

/// The most an external key map may weigh (it is held in memory by the coordinator and every target).
pub(crate) const EKM_MAX_BYTES: usize = 256 << 20;

#[derive(Debug, Default, Deserialize)]
struct JobQuery {
    uuid: Option<String>,
    regex: Option<String>,
    #[serde(default)]
    only_active: Option<String>,
}

impl JobQuery {
    /// The `uuid` parameter: a valid job id (400 otherwise), so no malformed id is ever sent on to a target.
    fn id(&self) -> Result<String, ClusterError> {
        let id = self.uuid.clone().unwrap_or_default();
        check_job_id(&id)?;
        Ok(id)
    }
}

/// The most a spec (`POST /v1/sort`) may weigh (an `objnames` list can be long).
const SPEC_BODY: usize = 16 << 20;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A short unique job id, `srt-` and 10 characters of `[0-9A-Za-z_-]` (AIStore's shape).
pub fn new_job_id() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-";
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let seed = format!("{nanos}/{}/{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
    let mut h = xxhash_rust::xxh3::xxh3_64(seed.as_bytes());
    let mut id = String::from("srt-");
    for _ in 0..10 {
        id.push(ALPHABET[(h & 63) as usize] as char);
        h >>= 6;
    }
    id
}

impl JobApi {
    /// The job API; `ekm_hosts`: the hosts an `ekm_file` URL may name (names or addresses, any case).
    pub fn new(coordinator: Arc<Coordinator>, ekm_hosts: Vec<String>) -> Arc<Self> {
        Self::build(coordinator, JobConfig { ekm_hosts, ..JobConfig::default() }, BTreeMap::new())
    }

    /// The job API as configured; with a state dir, the job list kept there is loaded (a job that was running
    /// when the coordinator stopped is marked aborted, and its targets are told by [`JobApi::reconcile`]).
    pub fn with_config(coordinator: Arc<Coordinator>, config: JobConfig) -> Result<Arc<Self>, ClusterError> {
        let jobs = match &config.state_dir {
            Some(dir) => load_jobs(dir)?,
            None => BTreeMap::new(),
        };
        let api = Self::build(coordinator, config, jobs);
        api.save();
        // A job whose commit was decided before the coordinator stopped is finished: its targets publish.
        let committing: Vec<(String, Vec<TargetInfo>)> = api
            .jobs()
            .iter()
            .filter(|(_, r)| r.committing && !r.ended)
            .map(|(id, r)| (id.clone(), r.targets.clone()))
            .collect();
        for (id, targets) in committing {
            let api2 = api.clone();
            api.drivers.spawn(async move {
                let result = api2.commit_all(&id, &targets).await;
                if let Err(e) = &result {
                    api2.note_error(&id, e);
                }
                api2.finish(&id, &result);
            });
        }
        Ok(api)
    }

    fn build(coordinator: Arc<Coordinator>, config: JobConfig, jobs: BTreeMap<String, JobRecord>) -> Arc<Self> {
        Arc::new(JobApi {
            stall_timeout: config.stall_timeout,
            coordinator,
            jobs: Mutex::new(jobs),
            metrics: NodeMetrics::new("coordinator", false),
            ekm_hosts: config.ekm_hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
            drivers: tokio_util::task::TaskTracker::new(),
            job_ended: tokio::sync::Notify::new(),
            state_file: config.state_dir.map(|d| d.join(STATE_FILE)),
            saving: Mutex::new(()),
        })
    }

    /// Write the job list to the state file (when there is one), atomically; an error is logged (the jobs
    /// go on; a restart would then see an older list).
    fn save(&self) {
        let Some(path) = &self.state_file else { return };
        // One save at a time, each a snapshot taken under this lock: the last written is the newest.
        let _one = self.saving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stored: BTreeMap<String, StoredJob> = self
            .jobs()
            .iter()
            .map(|(id, r)| {
                let job = StoredJob {
                    infos: r.infos.clone(),
                    targets: r.targets.clone(),
                    ended: r.ended,
                    stop_reason: r.stop_reason.clone(),
                    committing: r.committing,
                };
                (id.clone(), job)
            })
            .collect();
        let write = || -> Result<(), String> {
            let text = serde_json::to_vec(&StateFile { version: 1, jobs: stored }).map_err(|e| e.to_string())?;
            let mut f = shardio::PendingObject::create(path.clone()).map_err(|e| e.to_string())?;
            std::io::Write::write_all(f.file(), &text).map_err(|e| e.to_string())?;
            f.commit().map_err(|e| e.to_string())
        };
        if let Err(e) = write() {
            eprintln!("dsort coordinator: cannot save the job list to {}: {e}", path.display());
        }
    }

    /// Every few seconds, ask each healthy target which jobs it runs, and end there those this coordinator
    /// does not run: a job it does not know (an orphan of a coordinator that died) or one that ended here
    /// but not there is aborted there (a job that finished here, or an orphan already committed there, is
    /// cleaned up instead: its output stays). Runs until `shutdown`.
    pub async fn reconcile(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RECONCILE_PERIOD) => {}
                () = shutdown.cancelled() => return,
            }
            for t in self.coordinator.healthy_targets() {
                let Ok(client) = self.coordinator.target_client(&t) else { continue };
                let Ok(held) = client.held_jobs().await else { continue };
                for h in held {
                    let (op, why) = {
                        let jobs = self.jobs();
                        match jobs.get(&h.id) {
                            Some(r) if !r.ended => continue,
                            Some(r) if r.infos.values().any(|i| i.aborted) => ("abort", "was aborted"),
                            Some(_) => ("cleanup", "finished"),
                            None if h.committed => ("cleanup", "is unknown here (committed there: output kept)"),
                            None => ("abort", "is unknown here (an orphan)"),
                        }
                    };
                    eprintln!("dsort coordinator: target {} runs job {}, which {why}: {op} there", t.id, h.id);
                    let _ = control(client.job_call(Method::DELETE, &h.id, op, &[], Vec::new())).await;
                }
            }
        }
    }

    /// Graceful shutdown (SIGTERM): refuse new jobs at once, give the running ones up to `grace` to finish,
    /// then abort the rest (on every target: no output, temp files removed) with an error saying why, and
    /// wait (at most a few control timeouts) for those aborts to be delivered.
    pub async fn shut_down(&self, grace: std::time::Duration) {
        self.coordinator.set_draining();
        super::http::wait_until_idle(
            &self.job_ended,
            tokio::time::Instant::now() + grace,
            || self.jobs().values().filter(|r| !r.ended).count(),
            |n| eprintln!("dsort coordinator: shutting down: waiting for {n} running job(s) (up to {grace:?})"),
        )
        .await;
        let reason = format!("the coordinator shut down (SIGTERM) before the job finished (grace {grace:?})");
        for (id, rec) in self.jobs().iter_mut().filter(|(_, r)| !r.ended) {
            eprintln!("dsort coordinator: aborting job {id}: {reason}");
            rec.stop_reason = Some(reason.clone());
            rec.cancel.cancel();
        }
        self.drivers.close();
        if tokio::time::timeout(CONTROL_TIMEOUT * 5, self.drivers.wait()).await.is_err() {
            eprintln!("dsort coordinator: shutting down: some job aborts were not confirmed by their targets");
        }
    }

    /// The text of an external key map: `ais://BUCKET/OBJECT` read from the cluster, or an http(s) URL on
    /// an allowed host. Anything else (a local path means nothing to a cluster) is refused (400).
    async fn fetch_ekm(&self, location: &str) -> Result<String, ClusterError> {
        let refuse = |reason: String| ClusterError::BadRequest { what: format!("ekm_file {location:?}"), reason };
        let bytes = if location.starts_with("ais://") {
            let uri = AisUri::parse_object(location).map_err(|e| refuse(e.to_string()))?;
            let resp = self.coordinator.get_object(&uri.bucket, &uri.rest).await.map_err(|e| match e {
                ClusterError::NotFound { .. } | ClusterError::Remote { status: 404, .. } => {
                    ClusterError::NotFound { what: format!("ekm_file {location:?}") }
                }
                e => e,
            })?;
            read_limited(resp, EKM_MAX_BYTES).await.map_err(refuse)?
        } else if location.starts_with("http://") || location.starts_with("https://") {
            let url = reqwest::Url::parse(location).map_err(|e| refuse(format!("not a URL: {e}")))?;
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            if !self.ekm_hosts.contains(&host) {
                return Err(refuse(format!(
                    "host {host:?} is not allowed (the coordinator's --ekm-allow-host / DSORT_EKM_ALLOW_HOSTS)"
                )));
            }
            fetch_url(url, EKM_MAX_BYTES, EKM_FETCH_TIMEOUT).await.map_err(refuse)?
        } else {
            return Err(refuse(
                "on a cluster an external key map is an object (ais://BUCKET/OBJECT) or an http(s) URL on an \
                 allowed host"
                    .into(),
            ));
        };
        String::from_utf8(bytes).map_err(|_| refuse("not UTF-8 text".into()))
    }

    /// Clients of `targets` (a target whose URL cannot make one is left out: its calls would fail anyway).
    fn clients_of(&self, targets: &[TargetInfo]) -> Vec<Client> {
        targets.iter().filter_map(|t| self.coordinator.target_client(t).ok()).collect()
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, JobRecord>> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The routes to pass as `extra` to [`Coordinator::run`].
    pub fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                SORT,
                post(start).layer(axum::extract::DefaultBodyLimit::max(SPEC_BODY)).get(get_jobs).delete(remove),
            )
            .route(SORT_ABORT, delete(abort))
            .route("/v1/cluster/jobs/{id}/decision", get(decision))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Validate and start a job; its id.
    pub async fn start(self: &Arc<Self>, text: &str) -> Result<String, ClusterError> {
        if self.coordinator.is_draining() {
            return Err(ClusterError::ShuttingDown {
                what: "the coordinator".into(),
                reason: "it takes no new job; start the job again once it is back".into(),
            });
        }
        let parsed = dsort::spec::parse_spec(text, false)
            .map_err(|e| ClusterError::BadRequest { what: "dsort spec".into(), reason: e.to_string() })?;
        let spec = parsed.spec;
        let ekm_text = match &spec.ekm {
            Some(src) => Some(self.fetch_ekm(&src.location).await?),
            None => None,
        };
        // What a target's plan would refuse, refused now (400): output names that could overwrite inputs
        // of the same bucket, a malformed external key map, templates, an S3 bucket that cannot be used.
        // The input objects are settled here (for `input_format.prefix`, by listing the S3 bucket once) and
        // sent to every target, so that they all agree on them.
        let Planned { objects, outputs } = {
            let (spec, ekm_text) = (spec.clone(), ekm_text.clone());
            tokio::task::spawn_blocking(move || plan_on_coordinator(spec, ekm_text))
                .await
                .map_err(|e| ClusterError::BadRequest { what: "dsort spec".into(), reason: e.to_string() })?
                .map_err(|reason| ClusterError::BadRequest { what: "dsort spec".into(), reason })?
        };
        // No rebalance moves an object from now until the job ends (a running pass is stopped first).
        let no_rebalance = super::rebalance::hold_for_job(&self.coordinator).await?;
        let targets = self.coordinator.healthy_targets();
        if targets.is_empty() {
            return Err(ClusterError::NoTargets { detail: String::new() });
        }
        // A draining target holds input shards but will leave: refused now rather than aborted midway.
        let draining = self.coordinator.draining_targets();
        if !draining.is_empty() {
            return Err(ClusterError::ShuttingDown {
                what: format!("target {}", draining.join(", ")),
                reason: "it finishes its running jobs, then leaves; start the job again once it is back or gone".into(),
            });
        }
        // A cluster input bucket must hold objects somewhere (AIStore: 404 for a missing bucket); an S3
        // bucket was checked by the plan.
        if !crate::buckets::is_s3(&spec.input_bck) {
            let bucket = &spec.input_bck.name;
            let mut any = false;
            for t in &targets {
                if !self.coordinator.target_client(t)?.list(bucket, "").await?.entries.is_empty() {
                    any = true;
                    break;
                }
            }
            if !any {
                return Err(ClusterError::NotFound {
                    what: format!("bucket \"ais://{bucket}\" (no objects on any target)"),
                });
            }
        }
        let id = new_job_id();
        let src = Bck::from_ref(&spec.input_bck);
        let dst = Bck::from_ref(&spec.output_bck);
        let now = SystemTime::now();
        let total = objects.len() as i64;
        let infos = targets
            .iter()
            .map(|t| {
                let mut info = JobInfo::new(&id, src.clone(), dst.clone(), &spec.description);
                info.started_time = rfc3339(Some(now));
                info.metrics.warnings = parsed.warnings.clone();
                info.metrics.local_extraction.total_count = total;
                info.metrics.local_extraction.phase.begin(now);
                (t.id.clone(), info)
            })
            .collect();
        let cancel = CancellationToken::new();
        let writes = outputs.map(|o| (dst.clone(), o));
        {
            // Checked and registered under one lock: of two jobs started at once, one is refused.
            let mut jobs = self.jobs();
            if let Some((bck, names)) = &writes {
                for (other, rec) in jobs.iter().filter(|(_, r)| !r.ended) {
                    let Some((b, theirs)) = &rec.writes else { continue };
                    if b != bck {
                        continue;
                    }
                    if let Some(name) = names.shared_with(theirs) {
                        return Err(ClusterError::Conflict {
                            what: format!("output bucket {}", bck.name),
                            reason: format!(
                                "dsort job {other} is running and writes {name:?} there too; start this job once it \
                                 ended, or write other names"
                            ),
                        });
                    }
                }
            }
            jobs.insert(
                id.clone(),
                JobRecord {
                    infos,
                    cancel: cancel.clone(),
                    targets: targets.clone(),
                    ended: false,
                    stop_reason: None,
                    committing: false,
                    writes,
                },
            );
        }
        self.save();
        let api = self.clone();
        let job = id.clone();
        let text = text.to_string();
        self.drivers.spawn(async move {
            let _no_rebalance = no_rebalance;
            let launch = Launch { text, ekm_text, objects };
            let result = api.drive(&job, launch, &targets, &cancel).await;
            let committing = api.jobs().get(&job).is_some_and(|r| r.committing);
            if let Err(e) = &result
                && !committing
            {
                // The error first (a client polling sees `aborted` only with it), marked aborted at once (a
                // hung target must not delay it), then abort everywhere (temp files and partial output
                // removed), then the targets' own view of the failure.
                api.note_error(&job, e);
                api.finish(&job, &result);
                let clients = api.clients_of(&targets);
                let aborted = futures_util::future::join_all(
                    clients.iter().map(|c| control(c.job_call(Method::DELETE, &job, "abort", &[], Vec::new()))),
                )
                .await;
                // A target that did not answer (hung, or cut off) is asked again until it does, so it drops
                // the job's temp files when it comes back.
                for (c, r) in clients.iter().zip(aborted) {
                    if r.is_err() {
                        tokio::spawn(abort_until_answered(c.clone(), job.clone()));
                    }
                }
                api.refresh(&job, &clients).await;
            }
            api.finish(&job, &result);
            if result.is_ok() {
                api.clean_up(&job, &targets).await;
            }
            api.account(&job, result.is_ok());
            api.save();
        });
        Ok(id)
    }

    /// Run the job across its targets: the steps of `dsort::dist::simulate`, each a call to every target
    /// (or, for the carry chain, to one target after the other); see `target_jobs` for the routes.
    async fn drive(
        &self,
        id: &str,
        launch: Launch,
        targets: &[TargetInfo],
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let steps = Steps::default();
        let created = tokio::select! {
            r = self.steps(id, launch, targets, &steps) => r,
            () = cancel.cancelled() => {
                Err(self.jobs().get(id).and_then(|r| r.stop_reason.clone()).unwrap_or_else(|| "aborted".into()))
            }
            e = self.watch_targets(targets) => Err(e),
            e = self.watch_progress(id, targets, &steps) => Err(e),
        };
        // Every shard is staged: the outcome is decided (commit) and saved before any target publishes. From
        // here nothing aborts the job: a target lost meanwhile finishes its publish when it is back.
        let result = match created {
            Ok(()) => {
                self.decide_commit(id);
                self.commit_all(id, targets).await
            }
            Err(e) => Err(e),
        };
        // Committed everywhere: the job succeeded, even if a target leaves or dies from now on. The targets'
        // final infos are taken before they are told to clean up.
        if result.is_ok() {
            let clients = self.clients_of(targets);
            self.refresh(id, &clients).await;
        }
        result
    }

    /// Resolves when one of the job's targets is down (no heartbeat): the error names it.
    async fn watch_targets(&self, targets: &[TargetInfo]) -> String {
        loop {
            let down = self.coordinator.down_targets();
            if let Some(t) = targets.iter().find(|t| down.contains(&t.id)) {
                return format!("{}: job aborted", self.coordinator.down_reason(&t.id));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Resolves when a target inside a step (a call the driver waits for) made no progress (its job's ticks,
    /// `progress`) for the stall timeout, though it may still heartbeat: the error names it and the step.
    /// A target that ended its step and waits for the others is not stalled.
    async fn watch_progress(&self, id: &str, targets: &[TargetInfo], steps: &Steps) -> String {
        let stall = self.stall_timeout;
        let period = (stall / 8).clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(1));
        let clients = self.clients_of(targets);
        // Per target: the last ticks seen and since when.
        let mut last: Vec<(Option<u64>, std::time::Instant)> = vec![(None, std::time::Instant::now()); targets.len()];
        loop {
            tokio::time::sleep(period).await;
            let got = futures_util::future::join_all(
                clients.iter().map(|c| control(c.job_call(Method::GET, id, "progress", &[], Vec::new()))),
            )
            .await;
            let now = std::time::Instant::now();
            let mut stalled = Vec::new();
            for (i, reply) in got.into_iter().enumerate() {
                let ticks = reply.ok().and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse::<u64>().ok());
                let Some(op) = steps.of(i) else {
                    last[i] = (ticks, now); // between steps: waits for the others
                    continue;
                };
                if ticks.is_some() && ticks != last[i].0 {
                    last[i] = (ticks, now);
                } else if now.duration_since(last[i].1) >= stall {
                    stalled.push(format!("target {} in its {op} step ({})", targets[i].id, phase_of(op)));
                }
            }
            if !stalled.is_empty() {
                return format!(
                    "{} made no progress for {stall:?} (the coordinator's --stall-timeout): job aborted",
                    stalled.join(", ")
                );
            }
        }
    }

    async fn steps(&self, id: &str, launch: Launch, targets: &[TargetInfo], steps: &Steps) -> Result<(), String> {
        let Launch { text, ekm_text, objects } = launch;
        let text = text.as_str();
        let spec = dsort::spec::parse_spec(text, false).map_err(|e| e.to_string())?.spec;
        let seed = match &spec.algorithm.kind {
            AlgorithmKind::Shuffle { seed: None } => {
                let s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                self.warn(id, format!("shuffle without a seed: using seed {s} (pass it to repeat this order)"));
                Some(s)
            }
            AlgorithmKind::Shuffle { seed } => *seed,
            _ => None,
        };
        let codec = RecordCodec::new(Arc::new(objects.clone()), spec.algorithm.decreasing);
        let clients: Vec<Client> = targets
            .iter()
            .map(|t| self.coordinator.target_client(t))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let all = |op: &'static str, body: Vec<u8>| {
            let clients = &clients;
            async move {
                let replies = futures_util::future::join_all(
                    clients
                        .iter()
                        .enumerate()
                        .map(|(i, c)| steps.run(i, op, c.job_call(Method::POST, id, op, &[], body.clone()))),
                )
                .await;
                replies.into_iter().collect::<Result<Vec<Bytes>, ClusterError>>().map_err(|e| e.to_string())
            }
        };
        // 1. Where the inputs are (cluster buckets), then init and extraction on every target; samples back.
        let holders = if crate::buckets::is_s3(&spec.input_bck) {
            None
        } else {
            let located = super::reach::assign_holders(&clients, targets, &spec.input_bck.name, &objects)
                .await
                .map_err(|e| format!("locating the input objects: {e}"))?;
            let down = self.coordinator.down_targets();
            if located.missing > 0 && !down.is_empty() {
                self.warn(
                    id,
                    format!(
                        "{} input object(s) are on no healthy target; target(s) {} are down and may hold them",
                        located.missing,
                        down.join(", ")
                    ),
                );
            }
            Some(located.holders)
        };
        let init = InitMsg {
            spec: text.to_string(),
            targets: targets.to_vec(),
            seed,
            ekm_text,
            objects: Some(objects),
            holders,
        };
        let replies = all("init", serde_json::to_vec(&init).map_err(|e| e.to_string())?).await?;
        self.refresh(id, &clients).await;
        let mut samples = Vec::new();
        let mut total_bytes = 0u64;
        for r in &replies {
            if r.len() < 16 {
                return Err("bad init reply".into());
            }
            let seen = u64::from_le_bytes(r[0..8].try_into().unwrap_or_default());
            total_bytes += u64::from_le_bytes(r[8..16].try_into().unwrap_or_default());
            samples.push((read_frames(&codec, &r[16..]).map_err(|e| e.to_string())?, seen));
        }
        // 2. Splitters; every target sends each range its records; ranges sorted where they land.
        let splitters = pick_splitters(&codec, samples, targets.len());
        let mut body = Vec::new();
        splitters.iter().for_each(|s| push_frame(&codec, s, &mut body));
        all("distribute", body).await?;
        all("sortrange", Vec::new()).await?;
        // 3. The carry chain, range by range.
        let mut carry: Vec<CarryMsg> = Vec::new();
        let mut create = CreateMsg::default();
        for (i, c) in clients.iter().enumerate() {
            let msg = CutMsg { carry, total_bytes };
            let body = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
            let reply =
                steps.run(i, "cut", c.job_call(Method::POST, id, "cut", &[], body)).await.map_err(|e| e.to_string())?;
            let cut: CutReply = serde_json::from_slice(&reply).map_err(|e| format!("bad cut reply: {e}"))?;
            carry = cut.carry;
            create.spans.push(cut.spans);
        }
        // 4. Creation: each creator pulls its shards' records from the ranges that cut them, as it writes.
        self.refresh(id, &clients).await;
        all("create", serde_json::to_vec(&create).map_err(|e| e.to_string())?).await.map(drop)
        // 5. Every shard exists (staged): the commit ([`JobApi::commit_all`]).
    }

    fn decide_commit(&self, id: &str) {
        if let Some(rec) = self.jobs().get_mut(id) {
            rec.committing = true;
        }
        self.save();
    }

    /// Publish the job's shards on every target (`commit`), each asked again until it answers: a target that
    /// died meanwhile is asked at its new address once it is back (it publishes from its plan). Gives up
    /// after [`COMMIT_DEADLINE`] (the job then fails, but nothing is undone).
    async fn commit_all(&self, id: &str, targets: &[TargetInfo]) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + COMMIT_DEADLINE;
        let one = |t: TargetInfo| async move {
            let mut told = false;
            loop {
                // Its current address (a restart may have changed it), once it is back.
                let now = self.coordinator.healthy_targets().into_iter().find(|h| h.id == t.id);
                let r = match now.as_ref().map(|h| self.coordinator.target_client(h)) {
                    Some(Ok(c)) => c.job_call(Method::POST, id, "commit", &[], Vec::new()).await,
                    Some(Err(e)) => Err(e),
                    None => Err(ClusterError::Unreachable { peer: format!("target {}", t.id), reason: "down".into() }),
                };
                match r {
                    Ok(_) => return Ok(()),
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        return Err(format!(
                            "target {} did not publish its shards within {COMMIT_DEADLINE:?}: {e}",
                            t.id
                        ));
                    }
                    Err(e) => {
                        if !told {
                            eprintln!(
                                "dsort coordinator: job {id}: commit on target {}: {e}; asking again until it answers",
                                t.id
                            );
                            told = true;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            }
        };
        let results = futures_util::future::join_all(targets.iter().cloned().map(one)).await;
        results.into_iter().collect::<Result<Vec<()>, String>>().map(drop)
    }

    /// After a successful job: every target drops the job's working state (the job is no longer running
    /// there; a draining target may then leave).
    async fn clean_up(&self, id: &str, targets: &[TargetInfo]) {
        let clients = self.clients_of(targets);
        let _ = futures_util::future::join_all(
            clients.iter().map(|c| control(c.job_call(Method::DELETE, id, "cleanup", &[], Vec::new()))),
        )
        .await;
    }

    /// Record a job's failure on every target's info (unless the user aborted it).
    fn note_error(&self, id: &str, e: &str) {
        if let Some(rec) = self.jobs().get_mut(id) {
            if rec.aborted_by_user() {
                return;
            }
            for info in rec.infos.values_mut() {
                if !info.metrics.errors.iter().any(|x| x == e) {
                    info.metrics.errors.push(e.to_string());
                }
            }
        }
    }

    fn warn(&self, id: &str, m: String) {
        if let Some(rec) = self.jobs().get_mut(id) {
            rec.infos.values_mut().for_each(|i| i.metrics.warnings.push(m.clone()));
        }
    }

    /// Take every target's own JobInfo of the job (those that answer).
    async fn refresh(&self, id: &str, clients: &[Client]) {
        self.take_infos(id, clients, false).await;
    }

    /// Take the targets' JobInfos of the job, or (`while_running`) drop them if the job ended meanwhile: a
    /// client's view must not overwrite the final infos (an answer from before the end would make a finished
    /// job look running again).
    async fn take_infos(&self, id: &str, clients: &[Client], while_running: bool) {
        let got = futures_util::future::join_all(
            clients.iter().map(|c| control(c.job_call(Method::GET, id, "info", &[], Vec::new()))),
        )
        .await;
        let mut jobs = self.jobs();
        let Some(rec) = jobs.get_mut(id) else { return };
        if while_running && rec.ended {
            return;
        }
        let ids: Vec<String> = rec.infos.keys().cloned().collect();
        for (tid, reply) in ids.iter().zip(got) {
            if let Ok(bytes) = reply
                && let Ok(mut info) = serde_json::from_slice::<JobInfo>(&bytes)
                && let Some(old) = rec.infos.get(tid)
            {
                let merge = |old: &[String], new: &mut Vec<String>| {
                    let mut w = old.to_vec();
                    for x in new.drain(..) {
                        if !w.contains(&x) {
                            w.push(x);
                        }
                    }
                    *new = w;
                };
                merge(&old.metrics.warnings, &mut info.metrics.warnings);
                merge(&old.metrics.errors, &mut info.metrics.errors);
                rec.infos.insert(tid.clone(), info);
            }
        }
    }

    /// Mark the job ended (aborted with its error, or finished) on every target's info.
    fn finish(&self, id: &str, result: &Result<(), String>) {
        self.mark_ended(id, result);
        self.save();
    }

    fn mark_ended(&self, id: &str, result: &Result<(), String>) {
        let now = SystemTime::now();
        let mut jobs = self.jobs();
        let Some(rec) = jobs.get_mut(id) else { return };
        let aborted_by_user = rec.aborted_by_user();
        rec.ended = true;
        self.job_ended.notify_waiters();
        for info in rec.infos.values_mut() {
            let phase = &mut info.metrics.local_extraction.phase;
            phase.running = false;
            match &result {
                Ok(()) => {
                    if info.finish_time == super::jobinfo::ZERO_TIME {
                        info.finish_time = rfc3339(Some(now));
                    }
                    // Committed everywhere (a target that restarted during the commit could not say so).
                    let creation = &mut info.metrics.shard_creation.phase;
                    creation.running = false;
                    creation.finished = true;
                }
                Err(e) => {
                    info.aborted = true;
                    info.metrics.aborted = true;
                    if !aborted_by_user && !info.metrics.errors.iter().any(|x| x == e) {
                        info.metrics.errors.push(e.clone());
                    }
                }
            }
            info.archived = true;
            info.metrics.archived = true;
        }
    }

    /// Add an ended job to the coordinator's metrics: each target's final counts, each phase as long as its
    /// slowest target.
    fn account(&self, id: &str, ok: bool) {
        let jobs = self.jobs();
        let Some(rec) = jobs.get(id) else { return };
        let infos = rec.infos.values();
        let (mut extracted, mut spilled, mut created_shards) = (Work::default(), 0u64, 0u64);
        let mut phases = [0i64; 3];
        for i in infos {
            let e = &i.metrics.local_extraction;
            extracted.shards += e.extracted_count.max(0) as u64;
            extracted.records += e.extracted_record_count.max(0) as u64;
            extracted.bytes += e.extracted_size.max(0) as u64;
            spilled += e.extracted_to_disk_size.max(0) as u64;
            created_shards += i.metrics.shard_creation.created_count.max(0) as u64;
            let m = &i.metrics;
            for (p, e) in phases.iter_mut().zip([&e.phase, &m.meta_sorting.phase, &m.shard_creation.phase]) {
                *p = (*p).max(e.elapsed);
            }
        }
        for (name, ns) in PHASES.iter().zip(phases) {
            self.metrics.phase(name, ns.max(0) as f64 / 1e9);
        }
        self.metrics.extracted(extracted);
        self.metrics.spilled(spilled);
        if ok {
            // Every extracted record is in exactly one output shard.
            self.metrics.created(Work { shards: created_shards, ..extracted });
        }
    }

    fn infos(&self, id: &str) -> Option<BTreeMap<String, JobInfo>> {
        self.jobs().get(id).map(|r| r.infos.clone())
    }

    fn not_found(id: &str) -> ClusterError {
        ClusterError::NotFound { what: format!("dsort job \"{id}\" does not exist") }
    }
}

/// How long a control call to a target (abort, info, cleanup, remove) may take: a target that hangs without
/// dying must not hang the job's abort nor a client's `GET /v1/sort` (its last known info is shown).
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn control(call: impl std::future::Future<Output = Result<Bytes, ClusterError>>) -> Result<Bytes, ClusterError> {
    tokio::time::timeout(CONTROL_TIMEOUT, call).await.unwrap_or_else(|_| {
        Err(ClusterError::Unreachable {
            peer: "target".into(),
            reason: format!("no answer within {CONTROL_TIMEOUT:?}"),
        })
    })
}

/// Retry a job's abort on one target every second until it answers (for at most an hour).
async fn abort_until_answered(client: Client, job: String) {
    for _ in 0..3600 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if control(client.job_call(Method::DELETE, &job, "abort", &[], Vec::new())).await.is_ok() {
            return;
        }
    }
}

/// The coordinator's dry plan of a job: refuses what a target's plan would refuse, checks S3 buckets, and
/// settles the input object names. Blocking (S3 calls): run it off the async runtime.
fn plan_on_coordinator(mut spec: dsort::spec::JobSpec, ekm_text: Option<String>) -> Result<Planned, String> {
    // Local (`ais`) buckets live on the targets: a stand-in folder that holds nothing is enough here.
    let in_folder = |name: &str| std::path::PathBuf::from(format!("/nonexistent/dsort-plan/{name}"));
    let out_folder = |name: &str| std::path::PathBuf::from(format!("/nonexistent/dsort-plan-out/{name}"));
    let input = crate::buckets::resolve(&spec.input_bck, "", "input_bck", &in_folder).map_err(|e| e.to_string())?;
    let output = if spec.output_bck == spec.input_bck {
        input.clone()
    } else {
        crate::buckets::resolve(&spec.output_bck, "", "output_bck", &out_folder).map_err(|e| e.to_string())?
    };
    let env = dsort::job::JobEnv {
        input,
        output,
        tmp_dir: None,
        concurrency: 1,
        ekm_text,
        progress: Arc::new(dsort::progress::NoProgress),
        cancel: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        tar_flavor: shardio::TarFlavor::Pax,
    };
    // Only the S3 buckets are checked here (a local stand-in holds nothing); the output only when written.
    if crate::buckets::is_s3(&spec.input_bck) {
        env.input.check().map_err(|e| format!("input bucket {}: {e}", env.input.name()))?;
    }
    if crate::buckets::is_s3(&spec.output_bck) && !spec.dry_run {
        env.output.check().map_err(|e| format!("output bucket {}: {e}", env.output.name()))?;
    }
    if let AlgorithmKind::Shuffle { seed } = &mut spec.algorithm.kind {
        seed.get_or_insert(0);
    }
    let plan = dsort::job::plan_job(&spec, &env, &|_| {}).map_err(|e| e.to_string())?;
    let outputs = (!spec.dry_run).then(|| output_names(&plan.groups));
    Ok(Planned { objects: plan.objects.to_vec(), outputs })
}

/// What the coordinator's plan settled: the input names, and the names the job may write (`None`: a dry run
/// writes nothing).
struct Planned {
    objects: Vec<String>,
    outputs: Option<OutputNames>,
}

/// The output names a job may write: every name of its templates, or (a template with more than
/// [`MAX_NAMES_COMPARED`] names, or one that cannot be counted) all of the bucket.
#[derive(Debug, Clone)]
enum OutputNames {
    Names(Arc<std::collections::HashSet<String>>),
    All,
}

/// The most output names a job's templates are expanded to when compared with another job's.
const MAX_NAMES_COMPARED: u64 = 1 << 20;

fn output_names(groups: &[dsort::create::Group]) -> OutputNames {
    let mut names = std::collections::HashSet::new();
    for g in groups {
        match g.template.count() {
            Some(n) if n <= MAX_NAMES_COMPARED && names.len() as u64 + n <= MAX_NAMES_COMPARED => {
                for k in 0..n {
                    match g.name_at(k) {
                        Ok(name) => names.insert(name),
                        Err(_) => return OutputNames::All,
                    };
                }
            }
            _ => return OutputNames::All,
        }
    }
    OutputNames::Names(Arc::new(names))
}

impl OutputNames {
    /// A name both may write (`*` for "the whole bucket"), if any.
    fn shared_with(&self, other: &OutputNames) -> Option<String> {
        match (self, other) {
            (OutputNames::Names(a), OutputNames::Names(b)) => {
                let (small, big) = if a.len() <= b.len() { (a, b) } else { (b, a) };
                let mut shared: Vec<&String> = small.iter().filter(|n| big.contains(*n)).collect();
                shared.sort();
                shared.first().map(|n| n.to_string())
            }
            _ => Some("*".into()),
        }
    }
}

/// How long fetching an `ekm_file` URL may take, all of it.
const EKM_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// GET `url` (an `ekm_file` on an allowed host): no redirect is followed (it could lead to a host not
/// allowed), the whole fetch must end within `timeout`, and the body must stay within `limit` bytes.
async fn fetch_url(url: reqwest::Url, limit: usize, timeout: std::time::Duration) -> Result<Vec<u8>, String> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout.min(std::time::Duration::from_secs(5)))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let fetch = async {
        let resp = http.get(url).send().await.map_err(|e| ClusterError::unreachable("GET", &e).to_string())?;
        if resp.status().is_redirection() {
            let to = resp.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("?");
            return Err(format!("GET answered {} to {to}: redirects are not followed", resp.status()));
        }
        if !resp.status().is_success() {
            return Err(format!("GET answered {}", resp.status()));
        }
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(format!("larger than {} bytes", limit));
        }
        read_limited(resp, limit).await
    };
    tokio::time::timeout(timeout, fetch).await.unwrap_or_else(|_| Err(format!("no whole answer within {timeout:?}")))
}

/// A response body, refused beyond `limit` bytes.
async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading it: {e}"))?;
        if out.len() + chunk.len() > limit {
            return Err(format!("larger than {} bytes", limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn metrics(State(api): State<Arc<JobApi>>) -> impl IntoResponse {
    let mut states = JobStates::default();
    for rec in api.jobs().values() {
        if !rec.ended {
            states.running += 1;
        } else if rec.infos.values().any(|i| i.aborted) {
            states.aborted += 1;
        } else {
            states.finished += 1;
        }
    }
    api.metrics.set_jobs(states);
    ([(axum::http::header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], api.metrics.encode())
}

async fn start(State(api): State<Arc<JobApi>>, body: String) -> Result<Response, ApiError> {
    let id = api.start(&body).await?;
    Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], id).into_response())
}

async fn get_jobs(State(api): State<Arc<JobApi>>, Query(q): Query<JobQuery>) -> Result<Response, ApiError> {
    if q.uuid.as_deref().is_some_and(|s| !s.is_empty()) {
        let id = q.id()?;
        // A running job: take the targets' live view first.
        let live = api.jobs().get(&id).filter(|r| !r.ended).map(|r| r.targets.clone());
        if let Some(targets) = live {
            let clients = api.clients_of(&targets);
            api.take_infos(&id, &clients, true).await;
        }
        let infos = api.infos(&id).ok_or_else(|| JobApi::not_found(&id))?;
        return Ok(axum::Json(infos).into_response());
    }
    let re = match q.regex.as_deref().filter(|r| !r.is_empty()) {
        Some(r) => Some(
            regex::Regex::new(r)
                .map_err(|e| ClusterError::BadRequest { what: format!("regex {r:?}"), reason: e.to_string() })?,
        ),
        None => None,
    };
    let only_active = q.only_active.as_deref().is_some_and(|v| matches!(v, "true" | "1" | "yes"));
    let jobs = api.jobs();
    let list: Vec<JobInfo> = jobs
        .values()
        .filter_map(|r| JobInfo::aggregate(r.infos.values()))
        .filter(|j| re.as_ref().is_none_or(|re| re.is_match(&j.metrics.description)))
        .filter(|j| !only_active || j.active())
        .collect();
    Ok(axum::Json(list).into_response())
}

async fn abort(State(api): State<Arc<JobApi>>, Query(q): Query<JobQuery>) -> Result<StatusCode, ApiError> {
    let id = q.id()?;
    let jobs = api.jobs();
    let rec = jobs.get(&id).ok_or_else(|| JobApi::not_found(&id))?;
    rec.cancel.cancel();
    Ok(StatusCode::OK)
}

/// `GET /v1/cluster/jobs/{id}/decision` (cluster secret): what a target that restarted with a job's shards
/// staged must do: `commit` (publish them), `abort` or `unknown` (discard them), `pending` (ask again).
async fn decision(
    State(api): State<Arc<JobApi>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<String, ApiError> {
    check_job_id(&id)?;
    let jobs = api.jobs();
    let d = match jobs.get(&id) {
        None => "unknown",
        Some(r) if r.committing => "commit",
        Some(r) if r.ended => "abort",
        Some(_) => "pending",
    };
    Ok(d.to_string())
}

async fn remove(State(api): State<Arc<JobApi>>, Query(q): Query<JobQuery>) -> Result<StatusCode, ApiError> {
    let id = q.id()?;
    let targets = {
        let mut jobs = api.jobs();
        let rec = jobs.get(&id).ok_or_else(|| JobApi::not_found(&id))?;
        if !rec.ended || rec.infos.values().any(|i| !i.archived) {
            return Err(ClusterError::BadRequest {
                what: format!("dsort job {id}"),
                reason: format!("dsort process {id} still in progress and cannot be removed"),
            }
            .into());
        }
        jobs.remove(&id).map(|r| r.targets).unwrap_or_default()
    };
    api.save();
    let clients = api.clients_of(&targets);
    let _ = futures_util::future::join_all(
        clients.iter().map(|c| control(c.job_call(Method::DELETE, &id, "remove", &[], Vec::new()))),
    )
    .await;
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{CoordinatorConfig, Target, TargetConfig, http};
    use std::time::Duration;

    /// An `ekm_file` URL: a redirect is not followed (to any host), a body over the cap and a server that
    /// does not answer within the timeout are refused; a plain answer is read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ekm_fetch_follows_no_redirect_and_is_bounded() {
        use axum::response::Redirect;
        let shutdown = CancellationToken::new();
        let app = Router::new()
            .route("/ok", get(|| async { "a.jpg shard-{0..9}.tar\n" }))
            .route("/redirect", get(|| async { Redirect::temporary("/ok") }))
            .route("/big", get(|| async { vec![b'x'; 4096] }))
            .route(
                "/slow",
                get(|| async {
                    // The fault under test: a server that does not answer in time.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            );
        let listener = http::bind("127.0.0.1:0").await.unwrap();
        let base = http::base_url(listener.local_addr().unwrap());
        tokio::spawn(http::serve(listener, app, shutdown.clone()));
        let url = |p: &str| reqwest::Url::parse(&format!("{base}{p}")).unwrap();
        let fetch = |p: &str| fetch_url(url(p), 1024, Duration::from_millis(500));
        assert_eq!(fetch("/ok").await.unwrap(), b"a.jpg shard-{0..9}.tar\n");
        let e = fetch("/redirect").await.unwrap_err();
        assert!(e.contains("307") && e.contains("redirects are not followed"), "{e}");
        let e = fetch("/big").await.unwrap_err();
        assert!(e.contains("larger than 1024 bytes"), "{e}");
        let t0 = std::time::Instant::now();
        let e = fetch("/slow").await.unwrap_err();
        assert!(e.contains("no whole answer within"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        shutdown.cancel();
    }

    #[test]
    fn job_ids_are_short_and_unique() {
        let a = new_job_id();
        let b = new_job_id();
        assert!(a.starts_with("srt-") && a.len() == 14, "{a}");
        assert_ne!(a, b);
    }

    /// The public job routes on an in-process coordinator with one target: status codes and JSON shapes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn job_routes() {
        let shutdown = CancellationToken::new();
        let coordinator = Coordinator::new(CoordinatorConfig::default()).unwrap();
        let listener = http::bind("127.0.0.1:0").await.unwrap();
        let url = http::base_url(listener.local_addr().unwrap());
        let api = JobApi::new(coordinator.clone(), Vec::new());
        tokio::spawn(coordinator.clone().run(listener, api.routes(), shutdown.clone()));
        let dir = tempfile::tempdir().unwrap();
        let listener = http::bind("127.0.0.1:0").await.unwrap();
        let target =
            Target::open(TargetConfig::new(url.clone(), vec![dir.path().join("m")]), listener.local_addr().unwrap())
                .unwrap();
        let target_jobs =
            super::super::target_jobs::TargetJobs::new(target.clone(), dsort::memory::detect_memory_limit()).routes();
        tokio::spawn(target.clone().run(listener, target_jobs, shutdown.clone()));
        let client = Client::new(&url, None).unwrap();
        while client.coordinator_health().await.unwrap().healthy_targets < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.put("in", "a.tar", reqwest::Body::from(vec![0u8; 1024]), Some(1024)).await.unwrap();
        let http = reqwest::Client::new();
        let sort = format!("{url}{SORT}");

        // Spec errors: 400 with every message.
        let bad = r#"{"input_bck":{"name":"in"},"input_format":{"template":"a-{0..3}.tar"},"output_format":"o-{0..9}.tar","output_shard_size":"-1","algorithm":{"kind":"nope"}}"#;
        let r = http.post(&sort).body(bad).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let msg = r.text().await.unwrap();
        assert!(msg.contains("algorithm") && msg.contains("output_shard_size"), "{msg}");
        // Output names that could overwrite inputs of the same bucket: 400 before any work.
        let clash = r#"{"input_bck":{"name":"in"},"output_bck":{"name":"in"},"input_format":{"objnames":["o-1.tar"]},"output_format":"o-{0..9}.tar","output_shard_size":"1KiB"}"#;
        let r = http.post(&sort).body(clash).send().await.unwrap();
        assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
        // An input bucket with no object: 404.
        let spec = |b: &str| {
            format!(
                r#"{{"input_bck":{{"name":"{b}"}},"input_format":{{"objnames":["a.tar"]}},"output_format":"o-{{0..9}}.tar","output_shard_size":"1KiB","description":"first job"}}"#
            )
        };
        assert_eq!(http.post(&sort).body(spec("none")).send().await.unwrap().status(), 404);
        // A job: plain-text id, per-target info, in the list.
        let r = http.post(&sort).body(spec("in")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let id = r.text().await.unwrap();
        assert!(id.starts_with("srt-"), "{id}");
        let info: serde_json::Value = http.get(format!("{sort}?uuid={id}")).send().await.unwrap().json().await.unwrap();
        let mine = &info[target.id()];
        assert_eq!(mine["id"], id.as_str());
        assert_eq!(mine["src-bck"]["name"], "in");
        assert_eq!(mine["Metrics"]["local_extraction"]["total_count"], "1");
        assert_eq!(http.get(format!("{sort}?uuid=srt-nope")).send().await.unwrap().status(), 404);
        assert_eq!(http.get(format!("{sort}?regex=(")).send().await.unwrap().status(), 400);
        let list: Vec<JobInfo> = http.get(format!("{sort}?regex=^first")).send().await.unwrap().json().await.unwrap();
        assert_eq!(list.len(), 1);
        let none: Vec<JobInfo> = http.get(format!("{sort}?regex=zzz")).send().await.unwrap().json().await.unwrap();
        assert!(none.is_empty());
        // Abort and remove.
        assert_eq!(http.delete(format!("{url}{SORT_ABORT}?uuid={id}")).send().await.unwrap().status(), 200);
        assert_eq!(http.delete(format!("{url}{SORT_ABORT}?uuid=srt-nope")).send().await.unwrap().status(), 404);
        let mut waited = 0;
        while !api.jobs().get(&id).is_some_and(|r| r.ended) {
            waited += 1;
            assert!(waited < 500, "job never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let active: Vec<JobInfo> =
            http.get(format!("{sort}?only_active=true")).send().await.unwrap().json().await.unwrap();
        assert!(active.is_empty());
        assert_eq!(http.delete(format!("{sort}?uuid={id}")).send().await.unwrap().status(), 200);
        assert_eq!(http.delete(format!("{sort}?uuid={id}")).send().await.unwrap().status(), 404);
        shutdown.cancel();
    }
}
