//! The one error type of the cluster layer, its HTTP status, and its JSON body (`{"status", "message"}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::io;

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// What went wrong in a cluster process or client. Every variant names what it was about (bucket, object,
/// target, URL), so a message read in a log of a thousand-node job points at the culprit.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A bucket name, object name, target id or `ais://` URI that the rules refuse.
    #[error("invalid {what} {value:?}: {reason}")]
    BadName { what: &'static str, value: String, reason: String },
    /// Invalid configuration (flags, environment, files of a target).
    #[error("{0}")]
    Config(String),
    #[error("{what}: not found")]
    NotFound { what: String },
    /// The object's path is taken by a folder, or one of its folders by an object.
    #[error("{what}: conflict: {reason}")]
    Conflict { what: String, reason: String },
    #[error("{what}: range not satisfiable (object size {size})")]
    RangeNotSatisfiable { what: String, size: u64 },
    /// A request body that ended early or had the wrong length.
    #[error("{what}: bad request: {reason}")]
    BadRequest { what: String, reason: String },
    /// No valid credential for the route: `credential` names the one it needs (`token`: the client token,
    /// `cluster secret`).
    #[error("unauthorized: a valid 'Authorization: Bearer <{credential}>' header is required")]
    Unauthorized { credential: &'static str },
    /// A valid credential, but not one that may do this (the client token on a cluster route; a `bytes`
    /// request for a shard this target does not hold).
    #[error("{what}: forbidden: {reason}")]
    Forbidden { what: String, reason: String },
    /// A request body or a frame in it over its limit (413).
    #[error("{what}: too large: {reason}")]
    TooLarge { what: String, reason: String },
    #[error("no healthy target in the cluster{detail}")]
    NoTargets { detail: String },
    /// The process (or a target a job needs) is shutting down: try again later (503).
    #[error("{what} is shutting down: {reason}")]
    ShuttingDown { what: String, reason: String },
    /// A local file-system error; `what` names the object or path. (The cause is part of the message, not
    /// a chained source, so `{:#}` does not print it twice.)
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
    /// A peer (target, coordinator) could not be reached, timed out or broke the connection; `reason` is
    /// the whole cause chain.
    #[error("{peer}: {reason}")]
    Unreachable { peer: String, reason: String },
    /// A peer answered with an error status; `message` is its own message (which names its target).
    #[error("{peer}: HTTP {status}: {message}")]
    Remote { peer: String, status: u16, message: String },
    /// A peer answered something this build does not understand.
    #[error("{peer}: bad reply: {reason}")]
    BadReply { peer: String, reason: String },
}

impl ClusterError {
    pub fn io(what: impl Into<String>, error: io::Error) -> Self {
        ClusterError::Io { what: what.into(), error }
    }

    /// A transport error of a request to `peer`, with its cause chain (reqwest's `for url (...)` is left
    /// out: the peer is named already).
    pub fn unreachable(peer: impl Into<String>, e: &reqwest::Error) -> Self {
        let mut parts: Vec<String> = Vec::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            let mut msg = err.to_string();
            if let Some(i) = msg.find(" for url (") {
                msg.truncate(i);
            }
            if parts.last() != Some(&msg) {
                parts.push(msg);
            }
            cur = err.source();
        }
        if e.is_timeout() && !parts.iter().any(|p| p.contains("timed out")) {
            parts.push("timed out".into());
        }
        ClusterError::Unreachable { peer: peer.into(), reason: parts.join(": ") }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ClusterError::BadName { .. } | ClusterError::BadRequest { .. } | ClusterError::Config(_) => {
                StatusCode::BAD_REQUEST
            }
            ClusterError::NotFound { .. } => StatusCode::NOT_FOUND,
            ClusterError::Conflict { .. } => StatusCode::CONFLICT,
            ClusterError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ClusterError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ClusterError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ClusterError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ClusterError::NoTargets { .. } | ClusterError::ShuttingDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ClusterError::Io { error, .. } if error.kind() == io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ClusterError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ClusterError::Unreachable { .. } | ClusterError::BadReply { .. } => StatusCode::BAD_GATEWAY,
            ClusterError::Remote { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
        }
    }

    /// The status code of a remote error reply, if this is one.
    pub fn remote_status(&self) -> Option<u16> {
        match self {
            ClusterError::Remote { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The JSON body of every error reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub status: u16,
    pub message: String,
}

/// An error answered over HTTP, optionally prefixed with the answering node (`target t1: ...`).
#[derive(Debug)]
pub struct ApiError {
    pub error: ClusterError,
    pub node: Option<String>,
}

impl From<ClusterError> for ApiError {
    fn from(error: ClusterError) -> Self {
        ApiError { error, node: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.error.status();
        let message = match (&self.node, &self.error) {
            // A remote message already names its target.
            (_, ClusterError::Remote { message, .. }) => message.clone(),
            (Some(node), e) => format!("{node}: {e}"),
            (None, e) => e.to_string(),
        };
        (status, axum::Json(ErrorBody { status: status.as_u16(), message })).into_response()
    }
}
