//! The messages of the cluster's routes (JSON), and the route paths, in one place for servers and clients.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `GET /v1/health` (both roles, never needs the token).
pub const HEALTH: &str = "/v1/health";
/// `POST` register (body [`TargetInfo`], reply [`RegisterReply`]); `GET` the cluster map ([`TargetStatus`] list).
pub const TARGETS: &str = "/v1/cluster/targets";
/// Object routes: `/v1/objects/{bucket}` (list) and `/v1/objects/{bucket}/{object...}` (PUT, GET, HEAD, DELETE).
pub const OBJECTS: &str = "/v1/objects";

/// Header naming the target that stored or served an object (set by targets, passed on by the coordinator).
pub const TARGET_HEADER: &str = "x-dsort-target";
/// Header on a coordinator listing: comma-separated ids of the targets that are down (the listing may miss
/// their objects).
pub const DOWN_TARGETS_HEADER: &str = "x-dsort-down-targets";

/// What a target tells the coordinator about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// Stable id (given with `--id`, else generated once and kept in the first mountpath).
    pub id: String,
    /// Base URL other processes reach the target at, e.g. `http://10.0.0.7:8081`.
    pub url: String,
    /// The target's mountpaths as absolute, canonical paths: the identities HRW places objects over.
    pub mountpaths: Vec<String>,
}

/// The coordinator's answer to a registration: how often to heartbeat, and when a silent target is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReply {
    pub heartbeat_interval_ms: u64,
    pub down_after_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Heartbeats arrive.
    Up,
    /// No heartbeat for `down_after_ms`, or the target said it is leaving; it is `up` again as soon as
    /// heartbeats resume.
    Down,
    /// Shutting down: it finishes the jobs it runs and serves its objects, but takes no new job (a job
    /// started now is refused, 503, rather than run without its shards). `down` once it leaves.
    Draining,
}

/// One target in the coordinator's cluster map (`GET /v1/cluster/targets`, sorted by id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub id: String,
    pub url: String,
    pub mountpaths: Vec<String>,
    pub state: TargetState,
    /// Milliseconds since the last heartbeat (or registration).
    pub last_heartbeat_ms_ago: u64,
}

/// `GET /v1/health` on the coordinator: always 200 once it serves; `healthy_targets` counts targets `up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorHealth {
    /// `"coordinator"`.
    pub role: String,
    pub healthy_targets: usize,
    /// Shutting down (SIGTERM): `GET /v1/health?readiness=true` answers 503.
    #[serde(default)]
    pub draining: bool,
    /// Every registered target's state by id.
    pub targets: BTreeMap<String, TargetState>,
    /// The rebalance: state, membership generation, progress of the last pass.
    #[serde(default)]
    pub rebalance: super::rebalance::RebalanceStatus,
}

/// `GET /v1/health` on a target: 200 once it serves its mountpaths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetHealth {
    /// `"target"`.
    pub role: String,
    pub id: String,
    /// Whether the coordinator has accepted its registration (and its last heartbeat).
    pub registered: bool,
    /// Shutting down (SIGTERM): `GET /v1/health?readiness=true` answers 503.
    #[serde(default)]
    pub draining: bool,
}

/// `GET /v1/health?readiness=true`: 503 while the process drains (Kubernetes readiness probes).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HealthQuery {
    #[serde(default)]
    pub readiness: Option<String>,
}

impl HealthQuery {
    /// A readiness probe (`readiness=true`, or the bare parameter).
    pub fn readiness(&self) -> bool {
        self.readiness.as_deref().is_some_and(|v| v.is_empty() || v.eq_ignore_ascii_case("true") || v == "1")
    }
}

/// One object of a listing (`GET /v1/objects/{bucket}?prefix=`), sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectEntry {
    pub name: String,
    pub size: u64,
}

/// The reply to an object PUT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutReply {
    pub bucket: String,
    pub name: String,
    pub size: u64,
    /// The target that stored it.
    pub target: String,
}

/// Query of a listing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub prefix: String,
}
