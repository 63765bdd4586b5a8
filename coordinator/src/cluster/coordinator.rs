//! The coordinator process (`dsort serve coordinator`): membership and health of the targets, and the
//! object routes that find an object's owner and stream to or from it.
//!
//! Routes (credentials, when set: the client token on `/v1/objects` and the job API, the cluster secret on
//! `/v1/cluster/...`, see [`access`]; bodies of the cluster routes at most 64 KiB):
//!
//! | method, path | reply |
//! |---|---|
//! | `GET /v1/health` | 200 [`CoordinatorHealth`] `{"role":"coordinator","healthy_targets":N,"targets":{"<id>":"up"\|"down"},"rebalance":{...}}` |
//! | `POST /v1/cluster/targets` ([`TargetInfo`]) | 200 [`RegisterReply`]: register or re-register (new URL after a restart) |
//! | `POST /v1/cluster/targets/{id}/heartbeat` | 200; 404 unknown id (the target registers again) |
//! | `POST /v1/cluster/targets/{id}/leave` | 200: marked down at once (graceful shutdown) |
//! | `GET /v1/cluster/targets` | 200 `[TargetStatus]` sorted by id |
//! | `PUT /v1/objects/{bucket}/{object...}` | proxied, streaming, to the HRW owner among the healthy targets; the target's status, headers and body pass through; 502 target unreachable; 503 no healthy target |
//! | `GET`/`HEAD /v1/objects/{bucket}/{object...}` | the owner's answer, or, while it is 404, the next healthy target's in HRW order (get from neighbour); 404 when none holds it (naming the targets that are down) |
//! | `DELETE /v1/objects/{bucket}/{object...}` | every healthy target deletes its copy; 200 if one did, else 404 |
//! | `GET /v1/rebalance` | 200 [`super::rebalance::RebalanceStatus`] |
//! | `POST /v1/rebalance` | 200 the status: a rebalance pass is due (it starts now, or when no job runs) |
//! | `GET /v1/objects/{bucket}?prefix=P` | 200 `[{"name","size"}]`: every healthy target's listing, merged and sorted; header `x-dsort-down-targets` names targets that are down |
//!
//! Health: a target is `up` while its heartbeats arrive; after [`CoordinatorConfig::down_after`] without
//! one (or when it says it is leaving) it is `down`, and `up` again at its next heartbeat. Targets are
//! never forgotten: a target that is down stays in the map (its objects are not reachable meanwhile). Each
//! change of the healthy set is a new membership generation; the rebalance ([`super::rebalance`]) then
//! moves objects to their owners, and its state is the `rebalance` object of the health.

use super::api::{
    CoordinatorHealth, DOWN_TARGETS_HEADER, HealthQuery, ListQuery, OBJECTS, ObjectEntry, RegisterReply, TARGET_HEADER,
    TARGETS, TargetInfo, TargetState, TargetStatus,
};
use super::client::{Client, http_client};
use super::error::{ApiError, ClusterError, Result};
use super::http::{Access, Credentials, serve, with_auth};
use super::names::{check_bucket, check_object, check_target_id};
use super::rebalance::Rebalancer;
use crate::placement;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header::{CONTENT_LENGTH, RANGE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The body limit of the cluster routes (a registration, a leave reason).
const CONTROL_BODY: usize = 64 << 10;

/// How a coordinator is configured.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The client token: required on the public API (`/v1/sort`, `/v1/objects`).
    pub token: Option<String>,
    /// The cluster secret: required on the cluster routes (`/v1/cluster/...`), sent to targets (without
    /// one, the token does both; see [`Credentials`]).
    pub cluster_secret: Option<String>,
    /// The heartbeat period told to targets.
    pub heartbeat_interval: Duration,
    /// A target without a heartbeat for this long is `down`.
    pub down_after: Duration,
    /// A membership change starts a rebalance pass by itself (`--rebalance auto`), else only
    /// `POST /v1/rebalance` does (see [`super::rebalance`]).
    pub rebalance_auto: bool,
    /// An automatic pass starts once the membership has been stable this long.
    pub rebalance_settle: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            token: None,
            cluster_secret: None,
            heartbeat_interval: Duration::from_secs(1),
            down_after: Duration::from_secs(3),
            rebalance_auto: true,
            rebalance_settle: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    info: TargetInfo,
    last_seen: Instant,
    /// Why it left (graceful shutdown), until it registers or heartbeats again.
    left: Option<String>,
    /// It is shutting down: no new job until it leaves or registers again.
    draining: bool,
}

/// The coordinator's state: the cluster map and an HTTP client to reach targets.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    members: RwLock<BTreeMap<String, Member>>,
    http: reqwest::Client,
    /// The coordinator itself is shutting down (SIGTERM): readiness fails, no new job starts.
    draining: AtomicBool,
    /// Moving objects to their owners after membership changes.
    pub(crate) rebalance: Rebalancer,
}

impl Coordinator {
    pub fn new(config: CoordinatorConfig) -> Result<Arc<Self>> {
        Ok(Arc::new(Coordinator {
            rebalance: Rebalancer::new(config.rebalance_auto, config.rebalance_settle),
            config,
            members: RwLock::new(BTreeMap::new()),
            http: http_client()?,
            draining: AtomicBool::new(false),
        }))
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    fn members(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Member>> {
        // A panic while holding the lock leaves consistent data (every write is one insert or field store).
        self.members.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn members_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Member>> {
        self.members.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn state_of(&self, m: &Member, now: Instant) -> TargetState {
        if m.left.is_some() || now.saturating_duration_since(m.last_seen) > self.config.down_after {
            TargetState::Down
        } else if m.draining {
            TargetState::Draining
        } else {
            TargetState::Up
        }
    }

    /// Every registered target with its state, sorted by id.
    pub fn cluster_map(&self) -> Vec<TargetStatus> {
        let now = Instant::now();
        self.members()
            .values()
            .map(|m| TargetStatus {
                id: m.info.id.clone(),
                url: m.info.url.clone(),
                mountpaths: m.info.mountpaths.clone(),
                state: self.state_of(m, now),
                last_heartbeat_ms_ago: now.saturating_duration_since(m.last_seen).as_millis() as u64,
            })
            .collect()
    }

    /// The targets that are `up` or `draining` (a draining target still serves its objects), sorted by id:
    /// the set placement runs over.
    pub fn healthy_targets(&self) -> Vec<TargetInfo> {
        let now = Instant::now();
        self.members()
            .values()
            .filter(|m| matches!(self.state_of(m, now), TargetState::Up | TargetState::Draining))
            .map(|m| m.info.clone())
            .collect()
    }

    /// The ids of the targets that are shutting down, sorted.
    pub fn draining_targets(&self) -> Vec<String> {
        self.ids_in(TargetState::Draining)
    }

    /// The ids of the targets in `state`, sorted.
    fn ids_in(&self, state: TargetState) -> Vec<String> {
        let now = Instant::now();
        self.members().values().filter(|m| self.state_of(m, now) == state).map(|m| m.info.id.clone()).collect()
    }

    /// Why target `id` is down: the reason it gave when it left, else its silence.
    pub fn down_reason(&self, id: &str) -> String {
        match self.members().get(id).and_then(|m| m.left.clone()) {
            Some(reason) => format!("target {id} left the cluster ({reason})"),
            None => format!("target {id} stopped answering (no heartbeat)"),
        }
    }

    /// The coordinator is shutting down: readiness fails and no new job starts.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The ids of the targets that are `down`, sorted.
    pub fn down_targets(&self) -> Vec<String> {
        self.ids_in(TargetState::Down)
    }

    /// The owner of `bucket/object` among the healthy targets (HRW).
    pub fn owner_of(&self, bucket: &str, object: &str) -> Result<TargetInfo> {
        let healthy = self.healthy_targets();
        let ids: Vec<&str> = healthy.iter().map(|t| t.id.as_str()).collect();
        match placement::owner_target(bucket, object, &ids) {
            Some(id) => healthy.iter().find(|t| t.id == *id).cloned().ok_or_else(|| self.no_targets()),
            None => Err(self.no_targets()),
        }
    }

    /// The healthy targets in HRW order for `bucket/object`: the owner first, then the target that would own
    /// it were the owner gone, and so on (where to look for an object its owner does not hold).
    pub fn ranked_targets(&self, bucket: &str, object: &str) -> Result<Vec<TargetInfo>> {
        let healthy = self.healthy_targets();
        if healthy.is_empty() {
            return Err(self.no_targets());
        }
        let ids: Vec<&str> = healthy.iter().map(|t| t.id.as_str()).collect();
        let ranked = placement::rank(&placement::object_key(bucket, object), &ids);
        Ok(ranked.into_iter().filter_map(|id| healthy.iter().find(|t| t.id == *id).cloned()).collect())
    }

    /// Start reading `bucket/object` from whichever healthy target holds it: the owner first, then the
    /// others in HRW order; the owner's error when none does.
    pub async fn get_object(&self, bucket: &str, object: &str) -> Result<reqwest::Response> {
        let mut first_error = None;
        for t in self.ranked_targets(bucket, object)? {
            match self.target_client(&t)?.get(bucket, object, None).await {
                Ok(resp) => return Ok(resp),
                Err(e) if e.remote_status() == Some(404) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(first_error.unwrap_or_else(|| self.no_targets()))
    }

    fn no_targets(&self) -> ClusterError {
        let n = self.members().len();
        ClusterError::NoTargets {
            detail: if n == 0 { " (none registered)".into() } else { format!(" ({n} registered, all down)") },
        }
    }

    /// The credentials its routes require.
    pub fn credentials(&self) -> Credentials {
        Credentials::new(self.config.token.clone(), self.config.cluster_secret.clone())
    }

    /// A client of `target` sharing the coordinator's connection pool, with the cluster secret; its errors
    /// name the target.
    pub fn target_client(&self, target: &TargetInfo) -> Result<Client> {
        Ok(Client::with_http(self.http.clone(), &target.url, self.credentials().cluster())?
            .labelled(format!("target {}", target.id)))
    }

    /// Register (or re-register) a target.
    pub fn register(&self, info: TargetInfo) -> Result<RegisterReply> {
        check_target_id(&info.id)?;
        Client::new(&info.url, None)?;
        if info.mountpaths.is_empty() {
            return Err(ClusterError::BadRequest {
                what: format!("target {}", info.id),
                reason: "no mountpaths".into(),
            });
        }
        let mut members = self.members_mut();
        // Two live processes with one id (a copied mountpath, a reused --id) would fight over the same
        // objects: the second is refused while the first is up (a restarted target with a new address
        // gets in once the old one is down, or at once after a graceful stop).
        if let Some(m) = members.get(&info.id)
            && m.info.url != info.url
            && matches!(self.state_of(m, Instant::now()), TargetState::Up | TargetState::Draining)
        {
            return Err(ClusterError::Conflict {
                what: format!("target {}", info.id),
                reason: format!("this id is in use by the target at {}, which is up", m.info.url),
            });
        }
        let known = members.get(&info.id).map(|m| m.info.clone());
        if known.as_ref() != Some(&info) {
            let verb = if known.is_some() { "re-registered" } else { "registered" };
            eprintln!(
                "dsort coordinator: target {} {verb} at {} (mountpaths: {})",
                info.id,
                info.url,
                info.mountpaths.join(", ")
            );
        }
        members.insert(info.id.clone(), Member { info, last_seen: Instant::now(), left: None, draining: false });
        Ok(RegisterReply {
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            down_after_ms: self.config.down_after.as_millis() as u64,
        })
    }

    /// A heartbeat of target `id`; `NotFound` when it is not registered.
    pub fn heartbeat(&self, id: &str) -> Result<()> {
        match self.members_mut().get_mut(id) {
            Some(m) => {
                m.last_seen = Instant::now();
                m.left = None;
                Ok(())
            }
            None => Err(ClusterError::NotFound { what: format!("target {id} (not registered)") }),
        }
    }

    /// Target `id` leaves (graceful shutdown): down at once; `reason` is what the errors of its jobs say.
    pub fn leave(&self, id: &str, reason: &str) -> Result<()> {
        let reason = if reason.trim().is_empty() { "shutting down" } else { reason.trim() };
        match self.members_mut().get_mut(id) {
            Some(m) => {
                m.left = Some(reason.chars().take(512).collect());
                m.draining = false;
                eprintln!("dsort coordinator: target {id} is leaving ({reason})");
                Ok(())
            }
            None => Err(ClusterError::NotFound { what: format!("target {id} (not registered)") }),
        }
    }

    /// Target `id` is shutting down: it finishes its jobs but takes no new one (until it registers again).
    pub fn drain(&self, id: &str) -> Result<()> {
        match self.members_mut().get_mut(id) {
            Some(m) => {
                m.draining = true;
                eprintln!("dsort coordinator: target {id} is draining (shutting down once its jobs end)");
                Ok(())
            }
            None => Err(ClusterError::NotFound { what: format!("target {id} (not registered)") }),
        }
    }

    pub fn health(&self) -> CoordinatorHealth {
        let map = self.cluster_map();
        CoordinatorHealth {
            role: "coordinator".into(),
            draining: self.is_draining(),
            healthy_targets: map.iter().filter(|t| t.state == TargetState::Up).count(),
            targets: map.into_iter().map(|t| (t.id, t.state)).collect(),
            rebalance: self.rebalance.current(&self.healthy_targets()),
        }
    }

    /// The coordinator's own routes, without the token check (merge more routes into them, then wrap the
    /// whole with [`super::http::with_token`]; [`Coordinator::run`] does this).
    pub fn routes(self: &Arc<Self>) -> Router {
        let cluster = Router::new()
            .route(TARGETS, post(register).get(list_targets))
            .route(&format!("{TARGETS}/{{id}}/heartbeat"), post(heartbeat))
            .route(&format!("{TARGETS}/{{id}}/leave"), post(leave))
            .route(&format!("{TARGETS}/{{id}}/drain"), post(drain))
            .layer(axum::extract::DefaultBodyLimit::max(CONTROL_BODY));
        let objects = Router::new()
            .route(&format!("{OBJECTS}/{{bucket}}"), get(list_objects))
            .route(
                &format!("{OBJECTS}/{{bucket}}/{{*object}}"),
                get(proxy_object).put(proxy_object).delete(proxy_object),
            )
            .layer(axum::extract::DefaultBodyLimit::disable());
        let rebalance = Router::new().route(
            super::rebalance::REBALANCE,
            get(super::rebalance::status_route).post(super::rebalance::request_route),
        );
        Router::new()
            .route(super::api::HEALTH, get(health))
            .merge(cluster)
            .merge(objects)
            .merge(rebalance)
            .with_state(self.clone())
    }

    /// The coordinator's routes plus `extra` (e.g. the job API), each behind the credential [`access`]
    /// names for it.
    pub fn router(self: &Arc<Self>, extra: Router) -> Router {
        with_auth(self.routes().merge(extra), self.credentials(), access)
    }

    /// Serve on `listener` until `shutdown`: the coordinator's routes plus `extra` (pass `Router::new()`
    /// for none), all behind the token check; targets going down and coming back are logged.
    pub async fn run(self: Arc<Self>, listener: TcpListener, extra: Router, shutdown: CancellationToken) -> Result<()> {
        let watcher = tokio::spawn(self.clone().watch_health(shutdown.clone()));
        let rebalancer = tokio::spawn(super::rebalance::run(self.clone(), shutdown.clone()));
        let served = serve(listener, self.router(extra), shutdown.clone()).await;
        shutdown.cancel();
        let _ = watcher.await;
        let _ = rebalancer.await;
        served
    }

    async fn watch_health(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last: HashMap<String, TargetState> = HashMap::new();
        loop {
            for t in self.cluster_map() {
                let before = last.insert(t.id.clone(), t.state);
                if before.is_some_and(|b| b != t.state) {
                    match t.state {
                        TargetState::Down => eprintln!(
                            "dsort coordinator: target {} is down (no heartbeat for {} ms)",
                            t.id, t.last_heartbeat_ms_ago
                        ),
                        TargetState::Up => eprintln!("dsort coordinator: target {} is up again", t.id),
                        TargetState::Draining => {}
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Which credential a coordinator route needs: none for health; the client token for the public API
/// (`/v1/sort...`, `/v1/objects/...`, `/v1/rebalance`); either for `/metrics`; the cluster secret for everything else (the
/// cluster routes `/v1/cluster/...`, and any path not listed here: a new route is internal until made public).
pub fn access(path: &str) -> Access {
    let under = |p: &str, prefix: &str| p == prefix || p.strip_prefix(prefix).is_some_and(|r| r.starts_with('/'));
    if path == super::api::HEALTH {
        Access::Open
    } else if path == "/metrics" {
        Access::Either
    } else if under(path, super::jobs::SORT) || under(path, OBJECTS) || under(path, super::rebalance::REBALANCE) {
        Access::Client
    } else {
        Access::Cluster
    }
}

/// 200 with the cluster's health; a readiness probe gets 503 while the coordinator shuts down.
async fn health(State(c): State<Arc<Coordinator>>, Query(q): Query<HealthQuery>) -> Response {
    let h = c.health();
    let status = if q.readiness() && h.draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, axum::Json(h)).into_response()
}

async fn register(
    State(c): State<Arc<Coordinator>>,
    axum::Json(info): axum::Json<TargetInfo>,
) -> Result<axum::Json<RegisterReply>, ApiError> {
    Ok(axum::Json(c.register(info)?))
}

async fn heartbeat(State(c): State<Arc<Coordinator>>, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    c.heartbeat(&id)?;
    Ok(StatusCode::OK)
}

/// The body, if any, is the reason (plain text).
async fn leave(
    State(c): State<Arc<Coordinator>>,
    UrlPath(id): UrlPath<String>,
    body: String,
) -> Result<StatusCode, ApiError> {
    c.leave(&id, &body)?;
    Ok(StatusCode::OK)
}

async fn drain(State(c): State<Arc<Coordinator>>, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    c.drain(&id)?;
    Ok(StatusCode::OK)
}

async fn list_targets(State(c): State<Arc<Coordinator>>) -> axum::Json<Vec<TargetStatus>> {
    axum::Json(c.cluster_map())
}

/// Headers of a target's object reply that the proxy passes on.
const PASSED_HEADERS: [&str; 5] = ["content-length", "content-range", "accept-ranges", "content-type", TARGET_HEADER];

/// PUT, GET, HEAD and DELETE of one object, streaming both ways. A PUT goes to the owner. A GET or HEAD
/// goes to the owner, then, while the answer is 404, to the other healthy targets in HRW order (get from
/// neighbour: an object written while its owner was down, or not yet moved by a rebalance, is found where
/// it is). A DELETE goes to every healthy target (no copy may come back through get from neighbour).
async fn proxy_object(
    State(c): State<Arc<Coordinator>>,
    method: Method,
    UrlPath((bucket, object)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_bucket(&bucket)?;
    check_object(&object)?;
    let ranked = c.ranked_targets(&bucket, &object)?;
    if method == Method::DELETE {
        return delete_everywhere(&c, &bucket, &object, &ranked).await;
    }
    let tried = if method == Method::PUT { &ranked[..1] } else { &ranked[..] };
    let mut body = Some(body);
    let mut not_found = None;
    for target in tried {
        let client = c.target_client(target)?;
        let mut rb = client.object_request(method.clone(), &bucket, &object)?;
        for h in [CONTENT_LENGTH, RANGE] {
            if let Some(v) = headers.get(&h) {
                rb = rb.header(h, v);
            }
        }
        if method == Method::PUT
            && let Some(b) = body.take()
        {
            rb = rb.body(reqwest::Body::wrap_stream(b.into_data_stream()));
        }
        let resp = rb.send().await.map_err(|e| client.unreachable(e))?;
        if resp.status() == StatusCode::NOT_FOUND && method != Method::PUT {
            // The owner's answer is the one given if no target holds it.
            not_found.get_or_insert((client, resp));
            continue;
        }
        return pass_through(resp, &method);
    }
    let Some((client, resp)) = not_found else {
        return Err(c.no_targets().into());
    };
    let down = c.down_targets();
    if down.is_empty() {
        return pass_through(resp, &method);
    }
    let mut e = client.error_of(resp).await;
    if let ClusterError::Remote { message, .. } = &mut e {
        message.push_str(&format!(" (targets down, which may hold it: {})", down.join(", ")));
    }
    Err(e.into())
}

/// A target's object reply passed on: status, the headers clients use, and the body (streaming).
fn pass_through(resp: reqwest::Response, method: &Method) -> Result<Response, ApiError> {
    let mut out = Response::builder().status(resp.status());
    for name in PASSED_HEADERS {
        if let Some(v) = resp.headers().get(name) {
            out = out.header(name, v);
        }
    }
    let body = if *method == Method::HEAD { Body::empty() } else { Body::from_stream(resp.bytes_stream()) };
    out.body(body).map_err(|e| ApiError::from(ClusterError::io("proxy reply", std::io::Error::other(e))))
}

/// Delete every copy of an object on the healthy targets: the owner's answer when it held one, else the
/// first holder's, else the owner's 404.
async fn delete_everywhere(
    c: &Coordinator,
    bucket: &str,
    object: &str,
    ranked: &[TargetInfo],
) -> Result<Response, ApiError> {
    let clients = ranked.iter().map(|t| c.target_client(t)).collect::<Result<Vec<_>>>()?;
    let replies = futures_util::future::join_all(clients.iter().map(|cl| async move {
        let rb = cl.object_request(Method::DELETE, bucket, object)?;
        rb.timeout(super::client::CONTROL_TIMEOUT).send().await.map_err(|e| cl.unreachable(e))
    }))
    .await;
    let mut owners_404 = None;
    let mut deleted = None;
    for r in replies {
        let resp = r?;
        if resp.status() == StatusCode::NOT_FOUND {
            owners_404.get_or_insert(resp);
        } else if deleted.is_none() {
            deleted = Some(resp);
        }
    }
    match deleted.or(owners_404) {
        Some(resp) => pass_through(resp, &Method::DELETE),
        None => Err(c.no_targets().into()),
    }
}

/// A listing over every healthy target, merged and sorted; a name held by two targets (an object written
/// while its owner was down) is listed once, with the size its current owner holds.
async fn list_objects(
    State(c): State<Arc<Coordinator>>,
    UrlPath(bucket): UrlPath<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    check_bucket(&bucket)?;
    let healthy = c.healthy_targets();
    if healthy.is_empty() {
        return Err(c.no_targets().into());
    }
    let clients =
        healthy.iter().map(|t| c.target_client(t).map(|cl| (t.id.clone(), cl))).collect::<Result<Vec<_>>>()?;
    let listings = futures_util::future::join_all(clients.iter().map(|(id, cl)| {
        let (bucket, prefix) = (bucket.as_str(), q.prefix.as_str());
        async move { (id.as_str(), cl.list(bucket, prefix).await) }
    }))
    .await;
    let ids: Vec<&str> = healthy.iter().map(|t| t.id.as_str()).collect();
    let mut merged: BTreeMap<String, (u64, &str)> = BTreeMap::new();
    for (id, listing) in listings {
        for e in listing?.entries {
            let owner = placement::owner_target(&bucket, &e.name, &ids).copied();
            match merged.get(&e.name) {
                Some((_, holder)) if owner == Some(*holder) => {}
                Some(_) if owner != Some(id) => {}
                _ => {
                    merged.insert(e.name, (e.size, id));
                }
            }
        }
    }
    let entries: Vec<ObjectEntry> = merged.into_iter().map(|(name, (size, _))| ObjectEntry { name, size }).collect();
    let mut resp = axum::Json(entries).into_response();
    let down = c.down_targets();
    if !down.is_empty()
        && let Ok(v) = HeaderValue::from_str(&down.join(","))
    {
        resp.headers_mut().insert(DOWN_TARGETS_HEADER, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> TargetInfo {
        TargetInfo { id: id.into(), url: format!("http://127.0.0.1:1/{id}"), mountpaths: vec!["/mp0".into()] }
    }

    #[test]
    fn membership_and_health() {
        let c = Coordinator::new(CoordinatorConfig { down_after: Duration::from_millis(50), ..Default::default() })
            .unwrap();
        assert!(matches!(c.owner_of("b", "o"), Err(ClusterError::NoTargets { .. })));
        c.register(info("t1")).unwrap();
        c.register(info("t2")).unwrap();
        assert_eq!(c.health().healthy_targets, 2);
        assert!(c.register(TargetInfo { id: "bad id".into(), ..info("x") }).is_err());
        assert!(c.register(TargetInfo { mountpaths: vec![], ..info("t3") }).is_err());
        assert!(c.register(TargetInfo { url: "nope".into(), ..info("t3") }).is_err());
        assert!(matches!(c.heartbeat("t9"), Err(ClusterError::NotFound { .. })));
        std::thread::sleep(Duration::from_millis(80));
        c.heartbeat("t1").unwrap();
        let h = c.health();
        assert_eq!(h.healthy_targets, 1);
        assert_eq!(h.targets.get("t2"), Some(&TargetState::Down));
        assert_eq!(c.down_targets(), vec!["t2".to_string()]);
        // Every object goes to the only healthy target.
        assert_eq!(c.owner_of("b", "o").unwrap().id, "t1");
        c.leave("t1", "").unwrap();
        assert_eq!(c.health().healthy_targets, 0);
        assert!(matches!(c.owner_of("b", "o"), Err(ClusterError::NoTargets { .. })));
        c.heartbeat("t2").unwrap();
        assert_eq!(c.health().targets.get("t2"), Some(&TargetState::Up), "up again when heartbeats resume");
        // Re-registration with a new URL (a restart) replaces the old one once the old one is down...
        c.register(TargetInfo { url: "http://127.0.0.1:2".into(), ..info("t1") }).unwrap();
        assert_eq!(c.cluster_map()[0].url, "http://127.0.0.1:2");
        // ...but a second live process with the same id is refused.
        let dup = c.register(TargetInfo { url: "http://127.0.0.1:3".into(), ..info("t1") }).unwrap_err();
        assert_eq!(dup.status(), StatusCode::CONFLICT, "{dup}");
        c.register(TargetInfo { url: "http://127.0.0.1:2".into(), ..info("t1") }).unwrap();
    }

    #[test]
    fn route_access() {
        for (path, want) in [
            ("/v1/health", Access::Open),
            ("/metrics", Access::Either),
            ("/v1/sort", Access::Client),
            ("/v1/sort/abort", Access::Client),
            ("/v1/objects/b/o", Access::Client),
            ("/v1/objects/b", Access::Client),
            ("/v1/rebalance", Access::Client),
            ("/v1/cluster/targets", Access::Cluster),
            ("/v1/cluster/targets/t1/leave", Access::Cluster),
            ("/v1/sortx", Access::Cluster),
            ("/v1/objectsx/b", Access::Cluster),
            ("/v1/unknown", Access::Cluster),
        ] {
            assert_eq!(access(path), want, "{path}");
        }
    }

    #[test]
    fn draining_and_leaving_with_a_reason() {
        let c = Coordinator::new(CoordinatorConfig::default()).unwrap();
        c.register(info("t1")).unwrap();
        c.register(info("t2")).unwrap();
        c.drain("t2").unwrap();
        c.heartbeat("t2").unwrap();
        assert_eq!(c.health().targets.get("t2"), Some(&TargetState::Draining), "heartbeats keep it draining");
        assert_eq!(c.draining_targets(), ["t2"]);
        // A draining target still serves its objects: placement keeps it.
        assert_eq!(c.healthy_targets().len(), 2);
        assert!(c.down_targets().is_empty());
        c.leave("t2", "shutting down (SIGTERM)").unwrap();
        assert_eq!(c.down_targets(), ["t2"]);
        assert_eq!(c.down_reason("t2"), "target t2 left the cluster (shutting down (SIGTERM))");
        assert_eq!(c.down_reason("t1"), "target t1 stopped answering (no heartbeat)");
        // Registering again (a restart) clears both.
        c.register(info("t2")).unwrap();
        assert_eq!(c.health().targets.get("t2"), Some(&TargetState::Up));
        assert!(c.draining_targets().is_empty());
    }
}
