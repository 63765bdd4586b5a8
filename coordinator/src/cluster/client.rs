//! The HTTP client of the cluster: one type for the coordinator's routes and a target's routes (the object
//! routes are the same on both, so the same calls read an object through the coordinator or straight from
//! the target that holds it, e.g. a byte range of a record).

use super::api::{
    CoordinatorHealth, DOWN_TARGETS_HEADER, HEALTH, ObjectEntry, PutReply, RegisterReply, TARGET_HEADER, TARGETS,
    TargetHealth, TargetInfo, TargetStatus,
};
use super::error::{ClusterError, ErrorBody, Result};
use super::names::{check_bucket, check_object};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{CONTENT_LENGTH, RANGE};
use reqwest::{Method, RequestBuilder, Response, Url};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Timeout of control requests (health, registration, heartbeats, listings); object streams have none.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of listings (a fan-out over every target).
pub const LIST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A stream between targets (`bytes`) that delivers nothing for this long is broken: a peer that is
/// frozen (SIGSTOP) or cut off keeps its socket open, and keepalive alone does not end the read.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Chunk size of uploads read from files.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// A client of one cluster process (coordinator or target), with the cluster's bearer token if any.
/// Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    /// How errors name the peer, e.g. `target t-1a2b (http://10.0.0.7:8081)`; default: the URL.
    label: Option<String>,
}

/// A listing: the objects, sorted by name, and (from the coordinator) the targets that were down and whose
/// objects may be missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<ObjectEntry>,
    pub down_targets: Vec<String>,
}

/// What a download wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    pub size: u64,
    /// The target that served it (from the `x-dsort-target` header).
    pub target: Option<String>,
}

/// The HTTP client used by cluster processes and verbs: plain HTTP, a connect timeout, pooled connections.
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        // A peer that vanishes without closing its connections (power loss, a cut link) breaks a long phase
        // call or stream within about 30 s, instead of the system's hours.
        .tcp_keepalive(Duration::from_secs(10))
        .tcp_keepalive_interval(Duration::from_secs(5))
        .tcp_keepalive_retries(4u32)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ClusterError::Config(format!("cannot build the HTTP client: {e}")))
}

impl Client {
    /// A client of the process at `base_url` (`http://host:port`).
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self> {
        Self::with_http(http_client()?, base_url, token)
    }

    /// Like [`Client::new`] but sharing `http`'s connection pool (one per process is best).
    pub fn with_http(http: reqwest::Client, base_url: &str, token: Option<String>) -> Result<Self> {
        let base = Url::parse(base_url).map_err(|e| ClusterError::BadName {
            what: "URL",
            value: base_url.to_string(),
            reason: e.to_string(),
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClusterError::BadName {
                what: "URL",
                value: base_url.to_string(),
                reason: "expected http://HOST:PORT".into(),
            });
        }
        Ok(Client { http, base, token: token.filter(|t| !t.is_empty()), label: None })
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Name the peer in errors as `label (URL)`, e.g. `target t-1a2b (http://10.0.0.7:8081)`.
    pub fn labelled(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub(super) fn peer(&self) -> String {
        match &self.label {
            Some(l) => format!("{l} ({})", self.base_url()),
            None => self.base_url().to_string(),
        }
    }

    /// A request for an object route (names validated), with the token; for proxies.
    pub(crate) fn object_request(&self, method: Method, bucket: &str, object: &str) -> Result<RequestBuilder> {
        Ok(self.request(method, self.object_url(bucket, object)?))
    }

    /// A transport error that names this peer.
    pub(crate) fn unreachable(&self, e: reqwest::Error) -> ClusterError {
        ClusterError::unreachable(self.peer(), &e)
    }

    /// The URL of `path` segments under the base (each segment percent-encoded).
    pub(super) fn url<'a>(&self, segments: impl IntoIterator<Item = &'a str>) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty().extend(segments);
        }
        u
    }

    fn object_url(&self, bucket: &str, object: &str) -> Result<Url> {
        check_bucket(bucket)?;
        check_object(object)?;
        Ok(self.url(["v1", "objects", bucket].into_iter().chain(object.split('/'))))
    }

    pub(super) fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let rb = self.http.request(method, url);
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Send and turn a transport failure or an error status into a [`ClusterError`].
    pub(super) async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| ClusterError::unreachable(self.peer(), &e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.error_of(resp).await)
    }

    /// `method` on `/v1/sort/jobs/{job}/{op}?query` with a body (the intra-cluster job routes); the reply
    /// bytes, or an error naming this peer.
    pub async fn job_call(
        &self,
        method: Method,
        job: &str,
        op: &str,
        query: &[(&str, String)],
        body: impl Into<reqwest::Body>,
    ) -> Result<Bytes> {
        let mut url = self.url(["v1", "sort", "jobs", job, op]);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let resp = self.send(self.request(method, url).body(body.into())).await?;
        resp.bytes().await.map_err(|e| ClusterError::unreachable(self.peer(), &e))
    }

    /// Like [`Client::job_call`], but the reply is a stream of chunks (not buffered whole); a broken
    /// stream, or one idle for [`STREAM_IDLE_TIMEOUT`], is an error naming this peer.
    pub async fn job_stream(
        &self,
        method: Method,
        job: &str,
        op: &str,
        query: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes>> + Send>>> {
        let mut url = self.url(["v1", "sort", "jobs", job, op]);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let resp = self.send(self.request(method, url).body(body)).await?;
        let peer = self.peer();
        let broken = peer.clone();
        let chunks = resp.bytes_stream().map(move |r| r.map_err(|e| ClusterError::unreachable(broken.clone(), &e)));
        Ok(idle_deadline(chunks, peer, STREAM_IDLE_TIMEOUT))
    }

    /// `GET /v1/cluster/jobs/{id}/decision` of the coordinator: `commit`, `abort`, `pending` or `unknown`.
    pub async fn job_decision(&self, id: &str) -> Result<String> {
        let url = self.url(["v1", "cluster", "jobs", id, "decision"]);
        let r = self.send(self.request(Method::GET, url).timeout(CONTROL_TIMEOUT)).await?;
        Ok(r.text().await.map_err(|e| self.unreachable(e))?.trim().to_string())
    }

    /// `GET /v1/sort/jobs` of a target: the jobs it runs.
    pub async fn held_jobs(&self) -> Result<Vec<super::messages::HeldJob>> {
        let r = self.send(self.request(Method::GET, self.url(["v1", "sort", "jobs"])).timeout(CONTROL_TIMEOUT)).await?;
        self.json(r).await
    }

    /// `POST /v1/sort`: start a job from a spec (JSON or YAML text); its id.
    pub async fn job_start(&self, spec: &str) -> Result<String> {
        let resp = self.send(self.request(Method::POST, self.url(["v1", "sort"])).body(spec.to_string())).await?;
        Ok(resp.text().await.map_err(|e| ClusterError::unreachable(self.peer(), &e))?.trim().to_string())
    }

    /// `GET /v1/sort?uuid=ID`: the job's info per target.
    pub async fn job_info(&self, id: &str) -> Result<BTreeMap<String, super::jobinfo::JobInfo>> {
        let mut url = self.url(["v1", "sort"]);
        url.query_pairs_mut().append_pair("uuid", id);
        let resp = self.send(self.request(Method::GET, url)).await?;
        self.json(resp).await
    }

    /// `GET /v1/sort[?regex=R][&only_active=true]`: jobs, aggregated over targets.
    pub async fn job_list(&self, regex: Option<&str>, only_active: bool) -> Result<Vec<super::jobinfo::JobInfo>> {
        let mut url = self.url(["v1", "sort"]);
        if let Some(r) = regex {
            url.query_pairs_mut().append_pair("regex", r);
        }
        if only_active {
            url.query_pairs_mut().append_pair("only_active", "true");
        }
        let resp = self.send(self.request(Method::GET, url)).await?;
        self.json(resp).await
    }

    /// `DELETE /v1/sort/abort?uuid=ID`.
    pub async fn job_abort(&self, id: &str) -> Result<()> {
        let mut url = self.url(["v1", "sort", "abort"]);
        url.query_pairs_mut().append_pair("uuid", id);
        self.send(self.request(Method::DELETE, url)).await.map(drop)
    }

    /// `DELETE /v1/sort?uuid=ID`.
    pub async fn job_remove(&self, id: &str) -> Result<()> {
        let mut url = self.url(["v1", "sort"]);
        url.query_pairs_mut().append_pair("uuid", id);
        self.send(self.request(Method::DELETE, url)).await.map(drop)
    }

    /// The error of a reply with an error status (its JSON `message`, else its text).
    pub async fn error_of(&self, resp: Response) -> ClusterError {
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => b.message,
            Err(_) if text.trim().is_empty() => "(no message)".to_string(),
            Err(_) => text.trim().to_string(),
        };
        ClusterError::Remote { peer: self.peer(), status, message }
    }

    pub(super) async fn json<T: serde::de::DeserializeOwned>(&self, resp: Response) -> Result<T> {
        let bytes = resp.bytes().await.map_err(|e| ClusterError::unreachable(self.peer(), &e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClusterError::BadReply { peer: self.peer(), reason: e.to_string() })
    }

    /// `GET /v1/health` of a coordinator.
    pub async fn coordinator_health(&self) -> Result<CoordinatorHealth> {
        let r = self.send(self.request(Method::GET, self.url(segments(HEALTH))).timeout(CONTROL_TIMEOUT)).await?;
        self.json(r).await
    }

    /// `GET /v1/health` of a target.
    pub async fn target_health(&self) -> Result<TargetHealth> {
        let r = self.send(self.request(Method::GET, self.url(segments(HEALTH))).timeout(CONTROL_TIMEOUT)).await?;
        self.json(r).await
    }

    /// The coordinator's cluster map, sorted by target id.
    pub async fn targets(&self) -> Result<Vec<TargetStatus>> {
        let r = self.send(self.request(Method::GET, self.url(segments(TARGETS))).timeout(CONTROL_TIMEOUT)).await?;
        self.json(r).await
    }

    /// Register a target with the coordinator (again after a coordinator restart: it is idempotent).
    pub async fn register(&self, info: &TargetInfo) -> Result<RegisterReply> {
        let rb = self.request(Method::POST, self.url(segments(TARGETS))).json(info).timeout(CONTROL_TIMEOUT);
        let r = self.send(rb).await?;
        self.json(r).await
    }

    /// A target's heartbeat; a `Remote` error with status 404 means "register again".
    pub async fn heartbeat(&self, id: &str) -> Result<()> {
        let url = self.url(segments(TARGETS).chain([id, "heartbeat"]));
        self.send(self.request(Method::POST, url).timeout(CONTROL_TIMEOUT)).await.map(drop)
    }

    /// A target says it is leaving (graceful shutdown), and why: the coordinator marks it down at once and
    /// aborts its jobs with that reason.
    pub async fn leave(&self, id: &str, reason: &str) -> Result<()> {
        let url = self.url(segments(TARGETS).chain([id, "leave"]));
        self.send(self.request(Method::POST, url).body(reason.to_string()).timeout(CONTROL_TIMEOUT)).await.map(drop)
    }

    /// A target says it is shutting down: it finishes its jobs but must not be given a new one.
    pub async fn drain(&self, id: &str) -> Result<()> {
        let url = self.url(segments(TARGETS).chain([id, "drain"]));
        self.send(self.request(Method::POST, url).timeout(CONTROL_TIMEOUT)).await.map(drop)
    }

    /// Store `bucket/object` from a stream; `len`, when known, is sent as `Content-Length` and checked by
    /// the target. Memory stays bounded: the body is streamed as it is produced.
    pub async fn put(&self, bucket: &str, object: &str, body: reqwest::Body, len: Option<u64>) -> Result<PutReply> {
        let mut rb = self.request(Method::PUT, self.object_url(bucket, object)?).body(body);
        if let Some(n) = len {
            rb = rb.header(CONTENT_LENGTH, n);
        }
        let r = self.send(rb).await?;
        self.json(r).await
    }

    /// Store the local file `path` as `bucket/object`, streaming it.
    pub async fn put_file(&self, bucket: &str, object: &str, path: &Path) -> Result<PutReply> {
        let file = tokio::fs::File::open(path).await.map_err(|e| ClusterError::io(path.display().to_string(), e))?;
        let len = file.metadata().await.map_err(|e| ClusterError::io(path.display().to_string(), e))?.len();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, UPLOAD_CHUNK);
        let reply = self.put(bucket, object, reqwest::Body::wrap_stream(stream), Some(len)).await?;
        if reply.size != len {
            return Err(ClusterError::BadRequest {
                what: path.display().to_string(),
                reason: format!(
                    "{} bytes stored but the file has {len} (did it change during the upload?)",
                    reply.size
                ),
            });
        }
        Ok(reply)
    }

    /// Start reading `bucket/object`, or the inclusive byte range `start..=end` of it (206 from the
    /// server). The body streams: use [`Response::bytes_stream`] or [`Response::chunk`].
    pub async fn get(&self, bucket: &str, object: &str, range: Option<(u64, u64)>) -> Result<Response> {
        let mut rb = self.request(Method::GET, self.object_url(bucket, object)?);
        if let Some((a, b)) = range {
            rb = rb.header(RANGE, format!("bytes={a}-{b}"));
        }
        self.send(rb).await
    }

    /// Read the byte range `start..start+len` of `bucket/object` into memory (for small ranges: a record).
    pub async fn get_range_bytes(&self, bucket: &str, object: &str, start: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let r = self.get(bucket, object, Some((start, start + len - 1))).await?;
        let b = r.bytes().await.map_err(|e| ClusterError::unreachable(self.peer(), &e))?;
        if b.len() as u64 != len {
            return Err(ClusterError::BadReply {
                peer: self.peer(),
                reason: format!("{bucket}/{object}: asked for {len} bytes at {start}, got {}", b.len()),
            });
        }
        Ok(b)
    }

    /// Download `bucket/object` to the local file `dest`, atomically (temporary name next to it, fsync,
    /// rename): `dest` is whole or untouched.
    pub async fn get_to_file(&self, bucket: &str, object: &str, dest: &Path) -> Result<Download> {
        let resp = self.get(bucket, object, None).await?;
        let target = resp.headers().get(TARGET_HEADER).and_then(|v| v.to_str().ok()).map(String::from);
        let expected = resp.content_length();
        let what = || dest.display().to_string();
        let dest_owned = dest.to_path_buf();
        let mut pending = tokio::task::spawn_blocking(move || shardio::PendingObject::create(dest_owned))
            .await
            .map_err(|e| ClusterError::io(what(), std::io::Error::other(e)))?
            .map_err(|e| ClusterError::io(what(), std::io::Error::other(e)))?;
        let std_file = pending.file().try_clone().map_err(|e| ClusterError::io(what(), e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(std_file));
        let mut stream = resp.bytes_stream();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ClusterError::unreachable(self.peer(), &e))?;
            size += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(|e| ClusterError::io(what(), e))?;
        }
        out.flush().await.map_err(|e| ClusterError::io(what(), e))?;
        drop(out);
        if let Some(n) = expected.filter(|n| *n != size) {
            return Err(ClusterError::BadReply {
                peer: self.peer(),
                reason: format!("{bucket}/{object}: {size} bytes received, {n} announced"),
            });
        }
        tokio::task::spawn_blocking(move || pending.commit())
            .await
            .map_err(|e| ClusterError::io(what(), std::io::Error::other(e)))?
            .map_err(|e| ClusterError::io(what(), std::io::Error::other(e)))?;
        Ok(Download { size, target })
    }

    /// Delete `bucket/object`.
    pub async fn delete(&self, bucket: &str, object: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, self.object_url(bucket, object)?)).await.map(drop)
    }

    /// The objects of `bucket` whose names start with `prefix`, sorted by name.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Listing> {
        check_bucket(bucket)?;
        let mut url = self.url(["v1", "objects", bucket]);
        if !prefix.is_empty() {
            url.query_pairs_mut().append_pair("prefix", prefix);
        }
        let r = self.send(self.request(Method::GET, url).timeout(LIST_TIMEOUT)).await?;
        let down_targets = r
            .headers()
            .get(DOWN_TARGETS_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        let entries = self.json(r).await?;
        Ok(Listing { entries, down_targets })
    }
}

/// `stream`'s chunks, ending with an error naming `peer` when it breaks or when no chunk comes for `idle`.
fn idle_deadline<S, E>(
    stream: S,
    peer: String,
    idle: Duration,
) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes>> + Send>>
where
    S: futures_util::Stream<Item = std::result::Result<Bytes, E>> + Send + 'static,
    E: Into<ClusterError>,
{
    Box::pin(futures_util::stream::unfold(Some(Box::pin(stream)), move |state| {
        let peer = peer.clone();
        async move {
            let mut s = state?;
            match tokio::time::timeout(idle, s.next()).await {
                Ok(None) => None,
                Ok(Some(Ok(b))) => Some((Ok(b), Some(s))),
                Ok(Some(Err(e))) => Some((Err(e.into()), None)),
                Err(_) => Some((
                    Err(ClusterError::Unreachable {
                        peer,
                        reason: format!("stream idle: no bytes for {} s", idle.as_secs()),
                    }),
                    None,
                )),
            }
        }
    }))
}

/// The segments of a route path such as `/v1/health`.
fn segments<'a>(path: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    path.split('/').filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_that_goes_quiet_ends_with_an_error_naming_the_peer() {
        let first = futures_util::stream::iter([Ok::<_, ClusterError>(Bytes::from_static(b"abc"))]);
        let quiet = first.chain(futures_util::stream::pending());
        let mut s = idle_deadline(quiet, "target t-x".into(), Duration::from_millis(50));
        assert_eq!(s.next().await.expect("first chunk").expect("ok"), Bytes::from_static(b"abc"));
        let err = s.next().await.expect("an error, not the end").expect_err("idle");
        assert!(err.to_string().contains("target t-x") && err.to_string().contains("idle"), "{err}");
        assert!(s.next().await.is_none(), "nothing after the error");
        let done = futures_util::stream::iter([Ok::<_, ClusterError>(Bytes::from_static(b"x"))]);
        let mut s = idle_deadline(done, "p".into(), Duration::from_millis(50));
        assert!(s.next().await.is_some_and(|r| r.is_ok()));
        assert!(s.next().await.is_none(), "a stream that ends just ends");
    }

    #[test]
    fn urls_are_encoded_per_segment() {
        let c = Client::new("http://127.0.0.1:9/", None).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:9");
        let u = c.object_url("b", "dir/a b#?%.tar").unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:9/v1/objects/b/dir/a%20b%23%3F%25.tar");
        assert_eq!(c.url(segments(TARGETS).chain(["t1", "heartbeat"])).path(), "/v1/cluster/targets/t1/heartbeat");
        assert!(c.object_url("b", "../x").is_err());
        assert!(c.object_url("../b", "x").is_err());
        let prefixed = Client::new("http://h:1/base", None).unwrap();
        assert_eq!(prefixed.url(segments(HEALTH)).as_str(), "http://h:1/base/v1/health");
        assert!(Client::new("ftp://h/", None).is_err());
        assert!(Client::new("not a url", None).is_err());
    }
}
