//! Server plumbing shared by both roles: binding, the credential checks ([`with_auth`]), serving with a
//! graceful shutdown, signals, and `Range` headers.

use super::error::{ApiError, ClusterError, Result};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bind `listen` (`HOST:PORT`; port 0 picks a free one).
pub async fn bind(listen: &str) -> Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|e| ClusterError::Config(format!("cannot listen on {listen}: {e}")))
}

/// The base URL of a bound listener, e.g. `http://127.0.0.1:43567`.
pub fn base_url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// The two credentials of a cluster, each optional: the client token guards the public API (jobs, objects);
/// the cluster secret guards everything between the coordinator and the targets (registration, heartbeats,
/// drain and leave, the job routes, record and byte streams, a target's object routes). Without a secret the
/// token guards the cluster routes too (one shared token, as before the split; `serve` refuses that off
/// loopback).
#[derive(Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub secret: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |c: &Option<String>| if c.is_some() { "set" } else { "none" };
        f.debug_struct("Credentials").field("token", &set(&self.token)).field("secret", &set(&self.secret)).finish()
    }
}

impl Credentials {
    /// Both credentials; an empty value is none.
    pub fn new(token: Option<String>, secret: Option<String>) -> Self {
        let some = |c: Option<String>| c.filter(|t| !t.is_empty());
        Credentials { token: some(token), secret: some(secret) }
    }

    /// What a cluster process presents to another (and requires on cluster routes): the secret, else the
    /// token.
    pub fn cluster(&self) -> Option<String> {
        self.secret.clone().or_else(|| self.token.clone())
    }
}

/// Which credential a route needs (see [`with_auth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// None: `GET /v1/health` (probes).
    Open,
    /// The client token: the public API.
    Client,
    /// The cluster secret (else the token, when no secret is set).
    Cluster,
    /// Either credential: read-only observability (`GET /metrics`).
    Either,
}

/// Wrap `router` so that every request carries the credential `access(path)` names for its path, as
/// `Authorization: Bearer <credential>` (401 without it; 403 for the client token on a cluster route). A
/// credential that is not configured is not required.
pub fn with_auth(router: Router, creds: Credentials, access: fn(&str) -> Access) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Arc::new((creds, access)), require_credential))
}

type AuthState = Arc<(Credentials, fn(&str) -> Access)>;

async fn require_credential(State(auth): State<AuthState>, req: Request, next: Next) -> Response {
    let (creds, access) = (&auth.0, auth.1);
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let is = |want: &Option<String>| match (want, given) {
        (Some(w), Some(g)) => constant_time_eq(g.as_bytes(), w.as_bytes()),
        _ => false,
    };
    let cluster = creds.cluster();
    let need = access(req.uri().path());
    let ok = match need {
        Access::Open => true,
        Access::Client => creds.token.is_none() || is(&creds.token),
        Access::Cluster => cluster.is_none() || is(&cluster),
        Access::Either => (creds.token.is_none() && cluster.is_none()) || is(&creds.token) || is(&cluster),
    };
    if ok {
        return next.run(req).await;
    }
    let error = match need {
        Access::Cluster if creds.secret.is_some() && is(&creds.token) => ClusterError::Forbidden {
            what: format!("{} {}", req.method(), req.uri().path()),
            reason: "the client token cannot call the cluster's internal routes (they need the cluster secret)".into(),
        },
        Access::Cluster if creds.secret.is_some() => ClusterError::Unauthorized { credential: "cluster secret" },
        _ => ClusterError::Unauthorized { credential: "token" },
    };
    ApiError::from(error).into_response()
}

/// Compare without an early exit on the first differing byte (the length still shows).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How long open requests (long object streams) may run on after shutdown starts before they are cut.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serve `router` on `listener` until `shutdown` is cancelled; then stop accepting, let open requests
/// finish for at most [`SHUTDOWN_GRACE`], and return.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> Result<()> {
    use axum::serve::ListenerExt;
    let stop = shutdown.clone();
    // No Nagle delay: a stream's last small chunk (the end of a reply, a short record batch) must not wait
    // for the peer's delayed ACK (40 ms on Linux), which would cost every small request/reply that much.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            eprintln!("dsort: cannot set TCP_NODELAY on an accepted connection: {e}");
        }
    });
    let server = axum::serve(listener, router).with_graceful_shutdown(async move { stop.cancelled().await });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => return r.map_err(|e| ClusterError::io("server", e)),
        () = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(r) => r.map_err(|e| ClusterError::io("server", e)),
        Err(_) => {
            eprintln!("dsort: shutdown: open requests still running after {SHUTDOWN_GRACE:?}: closing them");
            Ok(())
        }
    }
}

/// The drain of a graceful shutdown: wait until `running()` is 0 (`true`) or `deadline` passes (`false`),
/// counting again whenever `ended` is notified; `waiting(n)` hears each count still running.
pub async fn wait_until_idle(
    ended: &tokio::sync::Notify,
    deadline: tokio::time::Instant,
    running: impl Fn() -> usize,
    waiting: impl Fn(usize),
) -> bool {
    loop {
        // Registered before counting, so an end between the count and the wait is not missed.
        let notified = ended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let n = running();
        if n == 0 {
            return true;
        }
        waiting(n);
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

/// Cancel `token` on SIGTERM or Ctrl-C (SIGINT); a second signal exits the process at once (status 130).
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut signalled = false;
        loop {
            let sigterm = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = sigterm => {}
            }
            if signalled {
                eprintln!("dsort: second signal: exiting now");
                std::process::exit(130);
            }
            signalled = true;
            eprintln!("dsort: shutting down (signal again to exit at once)");
            token.cancel();
        }
    });
}

/// A single byte range resolved against an object's size: `start..=end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Always false: a resolved range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` value, e.g. `bytes 0-99/1000`.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{size}", self.start, self.end)
    }
}

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Resolve a `Range` header against `size`: `Ok(None)` serves the whole object (no header, another
/// unit, several ranges, or a malformed value, which RFC 9110 lets a server ignore), `Ok(Some(r))` one
/// range (206), `Err(Unsatisfiable)` a range past the end (416). Forms: `bytes=a-b`, `bytes=a-`,
/// `bytes=-n` (the last n bytes).
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
    let Some(spec) = header.map(str::trim).and_then(|h| h.strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return Ok(None) };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (false, _) => {
            let Some(start) = num(a) else { return Ok(None) };
            let end = if b.is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(e) if e >= start => e,
                    _ => return Ok(None),
                }
            };
            if start >= size {
                return Err(Unsatisfiable);
            }
            Ok(Some(ByteRange { start, end: end.min(size - 1) }))
        }
        (true, false) => {
            let Some(n) = num(b) else { return Ok(None) };
            if n == 0 || size == 0 {
                return Err(Unsatisfiable);
            }
            Ok(Some(ByteRange { start: size.saturating_sub(n), end: size - 1 }))
        }
        (true, true) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |s: &str, size| parse_range(Some(s), size);
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(r("bytes=0-3", 10), Ok(Some(ByteRange { start: 0, end: 3 })));
        assert_eq!(r("bytes=2-", 10), Ok(Some(ByteRange { start: 2, end: 9 })));
        assert_eq!(r("bytes=5-100", 10), Ok(Some(ByteRange { start: 5, end: 9 })));
        assert_eq!(r("bytes=-3", 10), Ok(Some(ByteRange { start: 7, end: 9 })));
        assert_eq!(r("bytes=-30", 10), Ok(Some(ByteRange { start: 0, end: 9 })));
        assert_eq!(r("bytes=10-", 10), Err(Unsatisfiable));
        assert_eq!(r("bytes=10-12", 10), Err(Unsatisfiable));
        assert_eq!(r("bytes=-0", 10), Err(Unsatisfiable));
        assert_eq!(r("bytes=0-0", 0), Err(Unsatisfiable));
        // Ignored: served whole.
        for ignored in ["bytes=3-1", "bytes=0-1,4-5", "items=0-1", "bytes=x-1", "bytes=-", "bytes=5"] {
            assert_eq!(r(ignored, 10), Ok(None), "{ignored}");
        }
        let b = ByteRange { start: 2, end: 4 };
        assert_eq!((b.len(), b.content_range(10)), (3, "bytes 2-4/10".to_string()));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
