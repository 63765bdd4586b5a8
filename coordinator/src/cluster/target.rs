//! The target process (`dsort serve target`): serves the objects of its mountpaths, registers with the
//! coordinator and heartbeats.
//!
//! Routes (all but health and `/metrics` need the cluster secret when one is set, see [`access`]):
//!
//! | method, path | reply |
//! |---|---|
//! | `GET /v1/health` | 200 [`TargetHealth`] |
//! | `PUT /v1/objects/{bucket}/{object...}` | 200 [`PutReply`]; streaming body up to [`MAX_OBJECT_SIZE`] (413 beyond), atomic publish; 400 bad name or short body; 409 folder/object clash |
//! | `GET`/`HEAD /v1/objects/{bucket}/{object...}` | 200 streaming, or 206 for `Range: bytes=a-b` / `a-` / `-n`; 416 past the end; 404 |
//! | `DELETE /v1/objects/{bucket}/{object...}` | 200; 404 |
//! | `GET /v1/objects/{bucket}?prefix=P` | 200 `[{"name","size"}]` sorted by name (a bucket with no folder here is empty) |
//! | `POST`/`GET`/`DELETE /v1/cluster/rebalance`, `PUT /v1/cluster/rebalance/objects/{bucket}/{object...}` | intra-cluster: a rebalance pass and its transfers ([`super::rebalance`]) |
//! | `POST /v1/cluster/held/{bucket}` | intra-cluster: which of a job's input objects this target holds ([`super::reach`]) |
//!
//! Errors are `{"status","message"}` with the message starting `target <id>: `.

use super::api::{OBJECTS, PutReply, TARGET_HEADER, TargetHealth, TargetInfo};
use super::client::{Client, http_client};
use super::error::{ApiError, ClusterError, Result};
use super::http::{Access, Credentials, base_url, parse_range, serve, with_auth};
use super::names::check_target_id;
use super::store::{ObjectStore, SYSTEM_DIR, map_commit_error};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dsort::MemQuantity;
use futures_util::StreamExt;
use std::io::{SeekFrom, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where a generated target id is kept, relative to the first mountpath.
pub const TARGET_ID_FILE: &str = ".dsort/target-id";
/// Chunk size of object reads streamed to clients.
const READ_CHUNK: usize = 256 * 1024;
/// The largest object a PUT may store (S3's limit): bodies stream to disk, this only bounds a runaway one.
pub const MAX_OBJECT_SIZE: u64 = 5 << 40;
/// Write buffer of uploads.
const WRITE_BUF: usize = 1 << 20;

/// How a target is configured (flags / environment of `dsort serve target`).
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The coordinator's base URL.
    pub coordinator: String,
    pub mountpaths: Vec<PathBuf>,
    /// Stable id; `None`: the one kept in the first mountpath, generated there on first start.
    pub id: Option<String>,
    /// Where jobs keep temporary files; `None`: `<first mountpath>/.dsort/tmp`.
    pub tmp_dir: Option<PathBuf>,
    /// Memory budget of all jobs on this target together; `None`: 80% of the memory limit.
    pub max_mem: Option<MemQuantity>,
    /// The client token: only opens `GET /metrics` here (clients reach objects through the coordinator).
    pub token: Option<String>,
    /// The cluster secret: required on this target's routes, sent to the coordinator and to other targets
    /// (without one, the token does this; see [`Credentials`]).
    pub cluster_secret: Option<String>,
    /// The URL others reach this target at; `None`: derived from the bound address (an unspecified
    /// address such as `0.0.0.0` is replaced by the local address that routes to the coordinator).
    pub advertise_url: Option<String>,
    /// Heartbeat period until the coordinator says otherwise.
    pub heartbeat_interval: Duration,
}

impl TargetConfig {
    pub fn new(coordinator: impl Into<String>, mountpaths: Vec<PathBuf>) -> Self {
        TargetConfig {
            coordinator: coordinator.into(),
            mountpaths,
            id: None,
            tmp_dir: None,
            max_mem: None,
            token: None,
            cluster_secret: None,
            advertise_url: None,
            heartbeat_interval: Duration::from_secs(1),
        }
    }
}

/// A target ready to serve: its id, store and the identity it registers with.
#[derive(Debug)]
pub struct Target {
    pub info: TargetInfo,
    pub store: Arc<ObjectStore>,
    pub tmp_dir: PathBuf,
    pub max_mem: Option<MemQuantity>,
    config: TargetConfig,
    registered: AtomicBool,
    http: reqwest::Client,
    /// Shutting down: no new job, readiness fails (see [`Target::set_draining`]).
    draining: AtomicBool,
    /// Cancelled to stop heartbeating and leave the cluster with `leave_reason`.
    leaving: CancellationToken,
    leave_reason: std::sync::Mutex<Option<String>>,
    /// Signalled once the membership loop has said goodbye (or given up).
    left: tokio::sync::Notify,
    /// Moving objects to their owners (see [`super::rebalance`]).
    pub(crate) rebalance: super::rebalance::TargetRebalance,
    /// When the coordinator last accepted a registration or heartbeat (or the target started).
    last_contact: std::sync::Mutex<std::time::Instant>,
}

impl Target {
    /// Open the mountpaths, settle the id, and work out the advertised URL for the bound address `bound`.
    pub fn open(config: TargetConfig, bound: SocketAddr) -> Result<Arc<Self>> {
        let store = ObjectStore::open(&config.mountpaths)?;
        let id = resolve_target_id(config.id.as_deref(), &store.mountpaths()[0])?;
        let url = match &config.advertise_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => base_url(advertised_addr(bound, &config.coordinator)),
        };
        // Validate the URLs now rather than at the first heartbeat.
        Client::new(&url, None)?;
        Client::new(&config.coordinator, None)?;
        let tmp_dir = config.tmp_dir.clone().unwrap_or_else(|| store.mountpaths()[0].join(SYSTEM_DIR).join("tmp"));
        std::fs::create_dir_all(&tmp_dir)
            .map_err(|e| ClusterError::io(format!("--tmp-dir {}", tmp_dir.display()), e))?;
        let info = TargetInfo { id, url, mountpaths: store.mountpath_ids().to_vec() };
        Ok(Arc::new(Target {
            info,
            store: Arc::new(store),
            tmp_dir,
            max_mem: config.max_mem,
            config,
            registered: AtomicBool::new(false),
            http: http_client()?,
            draining: AtomicBool::new(false),
            leaving: CancellationToken::new(),
            leave_reason: std::sync::Mutex::new(None),
            left: tokio::sync::Notify::new(),
            rebalance: super::rebalance::TargetRebalance::default(),
            last_contact: std::sync::Mutex::new(std::time::Instant::now()),
        }))
    }

    /// The target starts shutting down: it refuses new jobs (503), its readiness probe fails, and the
    /// coordinator is told, so that no job is started over it; running jobs go on.
    pub async fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        let told = match self.coordinator_client() {
            Ok(c) => c.drain(&self.info.id).await,
            Err(e) => Err(e),
        };
        if let Err(e) = told {
            self.log(format!("could not tell the coordinator this target is draining: {e}"));
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stop heartbeating and leave the cluster: the coordinator marks this target down at once and aborts
    /// its jobs with `reason`. Returns once the coordinator was told (or could not be, within a few seconds).
    pub async fn leave(&self, reason: &str) {
        *self.leave_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        let left = self.left.notified();
        self.leaving.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), left).await;
    }

    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// How long since the coordinator last accepted a registration or heartbeat (the lease of its jobs).
    pub fn since_contact(&self) -> Duration {
        self.last_contact.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }

    /// Whether the coordinator accepted the last registration or heartbeat.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    fn err(&self, e: ClusterError) -> ApiError {
        ApiError { error: e, node: Some(format!("target {}", self.info.id)) }
    }

    pub(crate) fn log(&self, msg: impl std::fmt::Display) {
        eprintln!("dsort target {}: {msg}", self.info.id);
    }

    /// The target's own routes, without the token check (merge more routes into them, then wrap the whole
    /// with [`super::http::with_token`]; [`Target::run`] does this).
    pub fn routes(self: &Arc<Self>) -> Router {
        let objects = Router::new()
            .route(&format!("{OBJECTS}/{{bucket}}"), get(list_objects))
            .route(&format!("{OBJECTS}/{{bucket}}/{{*object}}"), get(get_object).put(put_object).delete(delete_object))
            .layer(axum::extract::DefaultBodyLimit::disable());
        Router::new()
            .route(super::api::HEALTH, get(health))
            .merge(objects)
            .merge(super::rebalance::target_routes())
            .merge(super::reach::target_routes())
            .with_state(self.clone())
    }

    /// The target's routes plus `extra` (e.g. the job routes), each behind the credential [`access`] names.
    pub fn router(self: &Arc<Self>, extra: Router) -> Router {
        with_auth(self.routes().merge(extra), self.credentials(), access)
    }

    /// The credentials its routes require.
    pub fn credentials(&self) -> Credentials {
        Credentials::new(self.config.token.clone(), self.config.cluster_secret.clone())
    }

    /// A client of the coordinator (shared connection pool, the cluster secret).
    pub fn coordinator_client(&self) -> Result<Client> {
        Ok(Client::with_http(self.http.clone(), &self.config.coordinator, self.credentials().cluster())?
            .labelled("coordinator"))
    }

    /// A client of another target (shared connection pool, the cluster secret); errors name the target.
    pub fn peer_client(&self, peer: &TargetInfo) -> Result<Client> {
        Ok(Client::with_http(self.http.clone(), &peer.url, self.credentials().cluster())?
            .labelled(format!("target {}", peer.id)))
    }

    /// Serve on `listener` until `shutdown`: the target's routes plus `extra` (pass `Router::new()` for
    /// none), all behind the token check; meanwhile register and heartbeat. On shutdown the target tells
    /// the coordinator it is leaving.
    pub async fn run(self: Arc<Self>, listener: TcpListener, extra: Router, shutdown: CancellationToken) -> Result<()> {
        // Jobs do not outlive the process: shards a job staged before a crash must never appear, unless the
        // job had reached its commit (a plan is kept): those wait for the coordinator's decision
        // (`TargetJobs::recover`). Done before serving, so no new job's staging folder can be caught.
        let plans = super::target_jobs::plans_dir(&self.store);
        for mp in self.store.mountpaths() {
            let staging = mp.join(SYSTEM_DIR).join(super::target_jobs::STAGING);
            let Ok(entries) = std::fs::read_dir(&staging) else { continue };
            for e in entries.flatten() {
                let job = e.file_name().to_string_lossy().into_owned();
                if plans.join(format!("{job}.json")).exists() {
                    continue;
                }
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => self.log(format!("removed unpublished output of interrupted job {job}")),
                    Err(err) => self.log(format!("cannot remove {}: {err}", e.path().display())),
                }
            }
        }
        let sweep = self.store.clone();
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            dsort::job::remove_dead_jobs_temp(&me.tmp_dir.join("jobs"));
            let n = sweep.remove_stale_temp_files();
            if n > 0 {
                me.log(format!("removed {n} temporary file(s) of interrupted uploads"));
            }
        });
        self.log(format!("serving at {} (mountpaths: {})", self.info.url, self.info.mountpaths.join(", ")));
        let membership = tokio::spawn(self.clone().membership(shutdown.clone()));
        let served = serve(listener, self.router(extra), shutdown.clone()).await;
        shutdown.cancel();
        let _ = membership.await;
        served
    }

    /// Register, then heartbeat every interval; register again whenever the coordinator forgets us or
    /// cannot be reached. Errors are logged once per change, not per beat.
    async fn membership(self: Arc<Self>, shutdown: CancellationToken) {
        let client = match self.coordinator_client() {
            Ok(c) => c,
            Err(e) => {
                self.log(format!("cannot reach the coordinator: {e}"));
                return;
            }
        };
        let mut interval = self.config.heartbeat_interval;
        let mut last_error: Option<String> = None;
        loop {
            let result = if self.is_registered() {
                client.heartbeat(&self.info.id).await
            } else {
                client.register(&self.info).await.map(|reply| {
                    interval = Duration::from_millis(reply.heartbeat_interval_ms.clamp(100, 60_000));
                    self.log(format!("registered with the coordinator at {}", client.base_url()));
                })
            };
            match result {
                Ok(()) => {
                    self.registered.store(true, Ordering::Relaxed);
                    *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
                    last_error = None;
                }
                Err(e) => {
                    let was = self.registered.swap(false, Ordering::Relaxed);
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        self.log(format!("coordinator: {msg}"));
                        last_error = Some(msg);
                    }
                    if was && e.remote_status() == Some(404) {
                        continue; // the coordinator restarted: register again at once
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => break,
                () = self.leaving.cancelled() => break,
            }
        }
        if self.is_registered() {
            let reason = self.leave_reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let reason = reason.unwrap_or_else(|| "shutting down".into());
            if let Err(e) = client.leave(&self.info.id, &reason).await {
                self.log(format!("could not tell the coordinator this target leaves: {e}"));
            }
            self.registered.store(false, Ordering::Relaxed);
        }
        self.left.notify_one();
    }
}

/// The target id: `given` (validated; also written to the id file when there is none yet), else the
/// one in `<mountpath>/.dsort/target-id`, else a new one written there.
pub fn resolve_target_id(given: Option<&str>, first_mountpath: &Path) -> Result<String> {
    let file = first_mountpath.join(TARGET_ID_FILE);
    let stored = match std::fs::read_to_string(&file) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ClusterError::io(file.display().to_string(), e)),
    };
    if let Some(s) = &stored {
        check_target_id(s).map_err(|e| ClusterError::Config(format!("{}: {e}", file.display())))?;
    }
    let id = match (given, &stored) {
        (Some(g), _) => {
            check_target_id(g)?;
            if let Some(s) = stored.as_deref().filter(|s| *s != g) {
                eprintln!(
                    "dsort target {g}: warning: {} holds the id {s:?}; using the given id (objects placed for {s:?} may move)",
                    file.display()
                );
            }
            g.to_string()
        }
        (None, Some(s)) => return Ok(s.clone()),
        (None, None) => generate_target_id(first_mountpath),
    };
    if stored.is_none() {
        let mut p = shardio::PendingObject::create(file.clone())
            .map_err(|e| ClusterError::io(file.display().to_string(), std::io::Error::other(e)))?;
        p.file()
            .write_all(format!("{id}\n").as_bytes())
            .map_err(|e| ClusterError::io(file.display().to_string(), e))?;
        p.commit().map_err(|e| ClusterError::io(file.display().to_string(), std::io::Error::other(e)))?;
    }
    Ok(id)
}

/// A new id `t-<12 hex digits>` from the clock, the pid and the mountpath.
fn generate_target_id(mountpath: &Path) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let seed = format!("{nanos}/{}/{}", std::process::id(), mountpath.display());
    let h = xxhash_rust::xxh3::xxh3_64(seed.as_bytes());
    format!("t-{:012x}", h & 0xffff_ffff_ffff)
}

/// The address to advertise for a listener bound to `bound`: itself, unless it is unspecified
/// (`0.0.0.0`/`::`), then the local address the system would use to reach the coordinator.
fn advertised_addr(bound: SocketAddr, coordinator: &str) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let hostport = coordinator.split("://").nth(1).unwrap_or(coordinator).split('/').next().unwrap_or("");
    let local = hostport.to_socket_addrs().ok().and_then(|mut a| a.next()).and_then(|remote| {
        let any: SocketAddr =
            if remote.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (IpAddr::from([0u16; 8]), 0).into() };
        let s = UdpSocket::bind(any).ok()?;
        s.connect(remote).ok()?; // no packet is sent: this only asks for the route
        s.local_addr().ok()
    });
    match local {
        Some(l) if !l.ip().is_unspecified() => SocketAddr::new(l.ip(), bound.port()),
        _ => SocketAddr::new([127, 0, 0, 1].into(), bound.port()),
    }
}

/// Run a blocking store call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ClusterError::io("blocking task", std::io::Error::other(e)))?
}

/// Which credential a target route needs: none for health, either for `/metrics`, the cluster secret for
/// everything else (its object routes are reached through the coordinator, its job routes by the coordinator
/// and other targets).
pub fn access(path: &str) -> Access {
    match path {
        super::api::HEALTH => Access::Open,
        "/metrics" => Access::Either,
        _ => Access::Cluster,
    }
}

/// 200 with the target's state; a readiness probe gets 503 while it shuts down.
async fn health(State(t): State<Arc<Target>>, Query(q): Query<super::api::HealthQuery>) -> Response {
    let h = TargetHealth {
        role: "target".into(),
        id: t.info.id.clone(),
        registered: t.is_registered(),
        draining: t.is_draining(),
    };
    let status = if q.readiness() && h.draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, axum::Json(h)).into_response()
}

async fn list_objects(
    State(t): State<Arc<Target>>,
    UrlPath(bucket): UrlPath<String>,
    Query(q): Query<super::api::ListQuery>,
) -> Result<Response, ApiError> {
    let store = t.store.clone();
    let entries = blocking(move || store.list(&bucket, &q.prefix)).await.map_err(|e| t.err(e))?;
    Ok(axum::Json(entries).into_response())
}

async fn put_object(
    State(t): State<Arc<Target>>,
    UrlPath((bucket, object)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let what = format!("{bucket}/{object}");
    let io = |e: std::io::Error| t.err(ClusterError::io(what.clone(), e));
    let announced = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let too_large = |n: u64| {
        t.err(ClusterError::TooLarge {
            what: what.clone(),
            reason: format!("{n} bytes, over the {MAX_OBJECT_SIZE}-byte limit of an object"),
        })
    };
    if let Some(n) = announced.filter(|n| *n > MAX_OBJECT_SIZE) {
        return Err(too_large(n));
    }
    let (store, b, o) = (t.store.clone(), bucket.clone(), object.clone());
    let mut pending = blocking(move || store.create(&b, &o)).await.map_err(|e| t.err(e))?;
    let file = pending.file().try_clone().map_err(io)?;
    let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUF, tokio::fs::File::from_std(file));
    let mut stream = body.into_data_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            t.err(ClusterError::BadRequest { what: what.clone(), reason: format!("upload interrupted: {e}") })
        })?;
        size += chunk.len() as u64;
        if size > MAX_OBJECT_SIZE {
            return Err(too_large(size));
        }
        out.write_all(&chunk).await.map_err(io)?;
    }
    out.flush().await.map_err(io)?;
    drop(out);
    if let Some(n) = announced.filter(|n| *n != size) {
        return Err(t.err(ClusterError::BadRequest {
            what,
            reason: format!("received {size} bytes, Content-Length says {n}"),
        }));
    }
    let (store, b, o) = (t.store.clone(), bucket.clone(), object.clone());
    blocking(move || {
        pending.commit().map_err(|e| map_commit_error(&b, &o, e))?;
        store.remove_stale_copies(&b, &o);
        Ok(())
    })
    .await
    .map_err(|e| t.err(e))?;
    let reply = PutReply { bucket, name: object, size, target: t.info.id.clone() };
    Ok(([(TARGET_HEADER, t.info.id.clone())], axum::Json(reply)).into_response())
}

async fn get_object(
    State(t): State<Arc<Target>>,
    UrlPath((bucket, object)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let what = format!("{bucket}/{object}");
    let io = |e: std::io::Error| t.err(ClusterError::io(what.clone(), e));
    let store = t.store.clone();
    let (path, _) = blocking(move || store.locate(&bucket, &object)).await.map_err(|e| t.err(e))?;
    let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
    // The size of the file actually opened (an overwrite may have renamed a new one into place meanwhile).
    let size = file.metadata().await.map_err(io)?.len();
    let range = parse_range(headers.get(RANGE).and_then(|v| v.to_str().ok()), size);
    let mut resp = Response::builder()
        .header(ACCEPT_RANGES, "bytes")
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(TARGET_HEADER, t.info.id.as_str());
    let (start, len) = match range {
        Ok(None) => (0, size),
        Ok(Some(r)) => {
            resp = resp.status(StatusCode::PARTIAL_CONTENT).header(CONTENT_RANGE, r.content_range(size));
            (r.start, r.len())
        }
        Err(_) => {
            let mut e = t.err(ClusterError::RangeNotSatisfiable { what, size }).into_response();
            if let Ok(v) = format!("bytes */{size}").parse() {
                e.headers_mut().insert(CONTENT_RANGE, v);
            }
            return Ok(e);
        }
    };
    if start > 0 {
        file.seek(SeekFrom::Start(start)).await.map_err(io)?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), READ_CHUNK);
    resp.header(CONTENT_LENGTH, len)
        .body(Body::from_stream(stream))
        .map_err(|e| t.err(ClusterError::io(what.clone(), std::io::Error::other(e))))
}

async fn delete_object(
    State(t): State<Arc<Target>>,
    UrlPath((bucket, object)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let store = t.store.clone();
    blocking(move || store.delete(&bucket, &object)).await.map_err(|e| t.err(e))?;
    Ok(([(TARGET_HEADER, t.info.id.clone())], StatusCode::OK).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_id_is_generated_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let id = resolve_target_id(None, d.path()).unwrap();
        assert!(id.starts_with("t-") && id.len() == 14, "{id}");
        assert_eq!(resolve_target_id(None, d.path()).unwrap(), id, "stable across restarts");
        assert_eq!(resolve_target_id(Some("given-1"), d.path()).unwrap(), "given-1", "a given id wins");
        assert_eq!(resolve_target_id(None, d.path()).unwrap(), id, "the kept id is not overwritten");
        let e = tempfile::tempdir().unwrap();
        assert_eq!(resolve_target_id(Some("given-2"), e.path()).unwrap(), "given-2");
        assert_eq!(resolve_target_id(None, e.path()).unwrap(), "given-2", "a given id is kept when none was");
        assert!(resolve_target_id(Some("bad/id"), e.path()).is_err());
        std::fs::write(e.path().join(TARGET_ID_FILE), "../evil\n").unwrap();
        assert!(resolve_target_id(None, e.path()).is_err(), "a corrupt id file is an error");
    }

    #[test]
    fn advertised_address() {
        let bound: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertised_addr(bound, "http://127.0.0.1:1"), bound);
        let any: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        let a = advertised_addr(any, "http://127.0.0.1:8080");
        assert_eq!(a, "127.0.0.1:4000".parse().unwrap());
    }
}
