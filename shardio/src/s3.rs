//! S3 buckets (AWS S3 and S3-compatible servers: AIStore's S3 API, MinIO), through `object_store`.
//!
//! The engine is synchronous (threads, rayon); each bucket owns a small tokio runtime and its calls block
//! on it. Reads are ranged GETs: a seekable [`S3Reader`] fetches blocks that grow while reading is
//! sequential (so a compressed shard streams in a few large requests, and a tar index walk over big
//! entries fetches little more than the headers), and [`Bucket::read_ranges`] coalesces neighbouring
//! ranges into concurrent requests. Every read after the first of an object carries `If-Match` with the
//! ETag seen first, so an object replaced mid-job is an error, never a mix of two versions. Writes are
//! staged in a local file and uploaded on commit, by one PUT or a multipart upload (aborted on failure):
//! S3 shows an object only once its upload completes, which makes publishing atomic. Every request of a
//! bucket's client (retries included) passes through one counting HTTP service ([`CountingConnector`]):
//! [`Bucket::requests`] reports them by kind, with their body bytes.

use crate::bucket::{
    Bucket, ObjectRead, PendingObject, Publish, RequestCounts, StagedUpload, TMP_PREFIX, check_object_name,
};
use crate::error::{Error, Location, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpResponseBody, HttpService, ReqwestConnector,
};
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Connection settings of S3 buckets, from the environment (see [`S3Settings::from_env`]).
#[derive(Debug, Clone, PartialEq)]
pub struct S3Settings {
    /// `http(s)://host:port[/path]` of an S3-compatible server; `None` for AWS.
    pub endpoint: Option<String>,
    pub region: String,
    /// Plain HTTP endpoints are refused unless this is set.
    pub allow_http: bool,
    /// Path-style requests (`endpoint/bucket/key`), as AIStore and MinIO need; else virtual-hosted style.
    pub path_style: bool,
    /// Unsigned requests (public buckets, AIStore without AuthN).
    pub anonymous: bool,
    pub max_retries: usize,
    /// No request is retried after this long from its first attempt.
    pub retry_timeout: Duration,
    /// Outputs of at least this size are sent by multipart upload; smaller ones by one PUT.
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (S3 requires at least 5 MiB for every part but the last).
    pub part_size: u64,
    /// Input objects are read where their records lie, by ranged GETs in output order (`ranges`), instead of
    /// streamed once into the job's temp folder (`once`, the default): ranged reads need no local space but
    /// read several times the input on shuffled orders (neighbouring records are merged into one request).
    pub read_ranges: bool,
    /// Static credentials (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`); other
    /// credential sources (web identity, container, instance) are found by the client itself.
    pub credentials: Option<Credentials>,
}

/// Static S3 credentials; `Debug` does not show the secrets.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    pub key_id: String,
    pub secret: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// Largest block one sequential read fetches at once.
const MAX_BLOCK: u64 = 8 << 20;
/// First block of a read that does not follow the previous one (a tar header after a skipped entry).
const MIN_BLOCK: u64 = 64 << 10;
/// Ranges closer than this are fetched by one request (the bytes between are read and dropped).
const COALESCE_GAP: u64 = 1 << 20;
/// A merged range is not grown past this (bounds the bytes one request holds and reads for nothing).
const MAX_REQUEST: u64 = 8 << 20;
/// Ranged requests of one [`Bucket::read_many`] in flight at once.
const REQUESTS_IN_FLIGHT: usize = 8;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 3;

fn env_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

impl S3Settings {
    /// Settings from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Settings from `get` (an environment): `DSORT_S3_ENDPOINT` (else `AWS_ENDPOINT_URL_S3`,
    /// `AWS_ENDPOINT_URL`, `AWS_ENDPOINT`), `DSORT_S3_REGION` (else `AWS_REGION`, `AWS_DEFAULT_REGION`,
    /// `us-east-1`), `DSORT_S3_ALLOW_HTTP` (else `AWS_ALLOW_HTTP`, default false), `DSORT_S3_PATH_STYLE`
    /// (default: true when an endpoint is set), `DSORT_S3_ANONYMOUS` (default: true when no credentials are
    /// in the environment), `DSORT_S3_MAX_RETRIES` (30), `DSORT_S3_RETRY_TIMEOUT` (seconds, 180),
    /// `DSORT_S3_MULTIPART_THRESHOLD` and `DSORT_S3_PART_SIZE` (bytes, 16 MiB each), `DSORT_S3_READ`
    /// (`once`, the default, or `ranges`: see [`S3Settings::read_ranges`]).
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let first = |keys: &[&str]| keys.iter().find_map(|k| get(k).filter(|v| !v.trim().is_empty()));
        let flag = |key: &str, alt: Option<&str>, default: bool| -> Result<bool> {
            let Some((k, v)) = std::iter::once(key).chain(alt).find_map(|k| get(k).map(|v| (k, v))) else {
                return Ok(default);
            };
            env_bool(&v).ok_or_else(|| Error::invalid(format!("{k}={v:?}: expecting true or false")))
        };
        let number = |key: &str, default: u64| -> Result<u64> {
            match get(key).filter(|v| !v.trim().is_empty()) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| Error::invalid(format!("{key}={v:?}: expecting a non-negative integer"))),
            }
        };
        let endpoint = first(&["DSORT_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"])
            .map(|e| e.trim().trim_end_matches('/').to_string());
        let region = first(&["DSORT_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"]).unwrap_or("us-east-1".into());
        let has_credentials = first(&[
            "AWS_ACCESS_KEY_ID",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ])
        .is_some();
        let credentials = match (first(&["AWS_ACCESS_KEY_ID"]), first(&["AWS_SECRET_ACCESS_KEY"])) {
            (Some(key_id), Some(secret)) => Some(Credentials { key_id, secret, token: first(&["AWS_SESSION_TOKEN"]) }),
            (Some(_), None) => return Err(Error::invalid("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")),
            _ => None,
        };
        let part_size = number("DSORT_S3_PART_SIZE", 16 << 20)?;
        if part_size < 5 << 20 {
            return Err(Error::invalid(format!(
                "DSORT_S3_PART_SIZE={part_size}: S3 parts must be at least 5 MiB (5242880 bytes)"
            )));
        }
        let read_ranges = match get("DSORT_S3_READ").as_deref().map(str::trim) {
            None | Some("") | Some("once") => false,
            Some("ranges") => true,
            Some(v) => return Err(Error::invalid(format!("DSORT_S3_READ={v:?}: expecting once or ranges"))),
        };
        Ok(S3Settings {
            read_ranges,
            path_style: flag("DSORT_S3_PATH_STYLE", None, endpoint.is_some())?,
            endpoint,
            region,
            allow_http: flag("DSORT_S3_ALLOW_HTTP", Some("AWS_ALLOW_HTTP"), false)?,
            anonymous: flag("DSORT_S3_ANONYMOUS", None, !has_credentials)?,
            max_retries: number("DSORT_S3_MAX_RETRIES", 30)? as usize,
            retry_timeout: Duration::from_secs(number("DSORT_S3_RETRY_TIMEOUT", 180)?),
            multipart_threshold: number("DSORT_S3_MULTIPART_THRESHOLD", 16 << 20)?,
            part_size,
            credentials,
        })
    }
}

/// A tokio runtime that is shut down without waiting (dropping a runtime from async code would panic).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        // Invariant: the runtime is present until drop.
        self.0.as_ref().expect("runtime present until drop").block_on(f)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The request counters of one bucket handle. Its client's HTTP service ([`CountingService`]) is their
/// only writer; each attempt of a retried request counts again, with the bytes it moved.
#[derive(Debug, Default)]
struct RequestCounters {
    get_requests: AtomicU64,
    get_bytes: AtomicU64,
    put_requests: AtomicU64,
    put_bytes: AtomicU64,
    list_requests: AtomicU64,
    other_requests: AtomicU64,
}

impl RequestCounters {
    fn snapshot(&self) -> RequestCounts {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestCounts {
            get_requests: n(&self.get_requests),
            get_bytes: n(&self.get_bytes),
            put_requests: n(&self.put_requests),
            put_bytes: n(&self.put_bytes),
            list_requests: n(&self.list_requests),
            other_requests: n(&self.other_requests),
        }
    }
}

/// What a request is, for the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Get,
    Put,
    List,
    Other,
}

/// A GET with a `list-type` query parameter is a listing (ListObjectsV2, the only listing the client
/// sends), any other GET an object read; a PUT is an object or a multipart part; the rest (HEAD, POST of
/// multipart create/complete, DELETE) is other.
fn request_kind(method: &str, query: Option<&str>) -> RequestKind {
    let listing = || query.unwrap_or("").split('&').any(|p| p.split('=').next() == Some("list-type"));
    match method {
        "GET" if listing() => RequestKind::List,
        "GET" => RequestKind::Get,
        "PUT" => RequestKind::Put,
        _ => RequestKind::Other,
    }
}

/// Gives the store's client (and its credential fetches) an HTTP service that counts every request it
/// sends into one handle's [`RequestCounters`]; the requests themselves go through `object_store`'s own
/// reqwest client, as without it.
#[derive(Debug)]
struct CountingConnector(Arc<RequestCounters>);

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(CountingService { inner, counts: self.0.clone() }))
    }
}

/// Counts a request when it is sent (one whose connection fails counts too: the client's retries are
/// attempts of their own), a PUT's body length as it is sent, and a successful GET's body bytes as they
/// arrive ([`CountedBody`]).
#[derive(Debug)]
struct CountingService {
    inner: HttpClient,
    counts: Arc<RequestCounters>,
}

#[async_trait::async_trait]
impl HttpService for CountingService {
    async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        let c = &self.counts;
        let kind = request_kind(req.method().as_str(), req.uri().query());
        match kind {
            RequestKind::Get => c.get_requests.fetch_add(1, Ordering::Relaxed),
            RequestKind::Put => {
                c.put_bytes.fetch_add(req.body().content_length() as u64, Ordering::Relaxed);
                c.put_requests.fetch_add(1, Ordering::Relaxed)
            }
            RequestKind::List => c.list_requests.fetch_add(1, Ordering::Relaxed),
            RequestKind::Other => c.other_requests.fetch_add(1, Ordering::Relaxed),
        };
        let response = self.inner.execute(req).await?;
        if kind != RequestKind::Get || !response.status().is_success() {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let body = HttpResponseBody::new(CountedBody { body, counts: self.counts.clone() });
        Ok(HttpResponse::from_parts(parts, body))
    }
}

/// A GET's response body that adds its bytes to `get_bytes` as they arrive (a body cut mid-way counts
/// what came; an error body, not wrapped, counts nothing).
#[derive(Debug)]
struct CountedBody {
    body: HttpResponseBody,
    counts: Arc<RequestCounters>,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, HttpError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counts.get_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What the bucket's readers, uploads and calls share.
struct Inner {
    store: AmazonS3,
    rt: Runtime,
    /// `s3://bucket` (with the key prefix, if any).
    name: String,
    bucket: String,
    /// Key prefix under which the bucket's objects live (empty, or ending with `/`).
    prefix: String,
    settings: S3Settings,
    /// ETag of each object as first seen by this process: later reads must match it.
    etags: Mutex<HashMap<String, String>>,
    /// Size of each object as first seen with its ETag (`stat`): `open` reuses it instead of asking again
    /// (reads are pinned to that ETag, so the size cannot change under them).
    sizes: Mutex<HashMap<String, u64>>,
    /// Every request of `store`'s client, counted by its HTTP service.
    requests: Arc<RequestCounters>,
}

/// An S3 bucket (or a key prefix inside one) as a [`Bucket`].
#[derive(Clone)]
pub struct S3Bucket {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Bucket").field("name", &self.inner.name).finish_non_exhaustive()
    }
}

fn store_err(shown: &str, offset: Option<u64>, e: object_store::Error) -> Error {
    let loc = Location { shard: shown.to_string(), entry: None, offset };
    match e {
        object_store::Error::NotFound { .. } => Error::NotFound { loc },
        object_store::Error::Precondition { .. } => Error::Io {
            loc,
            source: io::Error::other("the object changed since this job first read it (its ETag differs)"),
        },
        other => Error::Io { loc, source: io::Error::other(other) },
    }
}

impl S3Bucket {
    /// Bucket `bucket`, objects under the key prefix `prefix` (may be empty).
    pub fn new(bucket: &str, prefix: &str, settings: &S3Settings) -> Result<Self> {
        let mut prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            check_object_name(&prefix)?;
            prefix.push('/');
        }
        let name = format!("s3://{bucket}{}{}", if prefix.is_empty() { "" } else { "/" }, prefix.trim_end_matches('/'));
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: settings.max_retries,
            retry_timeout: settings.retry_timeout,
        };
        let client = ClientOptions::new()
            .with_allow_http(settings.allow_http)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(300));
        let requests = Arc::new(RequestCounters::default());
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(&settings.region)
            .with_allow_http(settings.allow_http)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_retry(retry)
            .with_client_options(client)
            .with_http_connector(CountingConnector(requests.clone()));
        if let Some(ep) = &settings.endpoint {
            builder = builder.with_endpoint(ep).with_config(AmazonS3ConfigKey::S3Endpoint, ep);
        }
        if let Some(c) = &settings.credentials {
            builder = builder.with_access_key_id(&c.key_id).with_secret_access_key(&c.secret);
            if let Some(t) = &c.token {
                builder = builder.with_token(t);
            }
        }
        if settings.anonymous {
            builder = builder.with_skip_signature(true);
        }
        let store = builder.build().map_err(|e| Error::invalid(format!("{name}: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dsort-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::Io { loc: Location::shard(&name), source: e })?;
        Ok(S3Bucket {
            inner: Arc::new(Inner {
                store,
                rt: Runtime(Some(rt)),
                name,
                bucket: bucket.to_string(),
                prefix,
                settings: settings.clone(),
                etags: Mutex::new(HashMap::new()),
                sizes: Mutex::new(HashMap::new()),
                requests,
            }),
        })
    }

    /// The bucket name (without `s3://` or prefix).
    pub fn bucket(&self) -> &str {
        &self.inner.bucket
    }
}

impl Inner {
    fn key(&self, object: &str) -> Result<StorePath> {
        check_object_name(object)?;
        let key = format!("{}{object}", self.prefix);
        StorePath::parse(&key)
            .map_err(|e| Error::BadName { loc: Location::shard(self.shown(object)), reason: e.to_string() })
    }

    fn shown(&self, object: &str) -> String {
        format!("{}/{object}", self.name)
    }

    fn etag(&self, object: &str) -> Option<String> {
        self.etags.lock().unwrap_or_else(|p| p.into_inner()).get(object).cloned()
    }

    /// Remember the first ETag seen for `object`.
    fn saw(&self, object: &str, etag: Option<&String>) {
        if let Some(t) = etag {
            self.etags.lock().unwrap_or_else(|p| p.into_inner()).entry(object.to_string()).or_insert_with(|| t.clone());
        }
    }

    /// One ranged GET, checked against the ETag first seen. The client retries the request itself (5xx,
    /// connection errors, with backoff); a body cut mid-way is retried here while the retry timeout allows.
    async fn get_range(&self, object: &str, key: &StorePath, range: Range<u64>) -> Result<Bytes> {
        let shown = self.shown(object);
        let started = Instant::now();
        loop {
            let opts =
                GetOptions::new().with_range(Some(GetRange::Bounded(range.clone()))).with_if_match(self.etag(object));
            let response = self.store.get_opts(key, opts).await.map_err(|e| store_err(&shown, Some(range.start), e))?;
            self.saw(object, response.meta.e_tag.as_ref());
            match response.bytes().await {
                Ok(b) if b.len() as u64 == range.end - range.start => return Ok(b),
                Ok(b) => {
                    return Err(Error::Truncated {
                        loc: Location::at(&shown, range.start),
                        detail: format!(
                            "asked for {} bytes, the store sent {} (the object is shorter than indexed)",
                            range.end - range.start,
                            b.len()
                        ),
                    });
                }
                Err(_) if started.elapsed() < self.settings.retry_timeout && self.settings.max_retries > 0 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(store_err(&shown, Some(range.start), e)),
            }
        }
    }
}

impl Bucket for S3Bucket {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn identity(&self) -> String {
        let ep = self.inner.settings.endpoint.as_deref().unwrap_or("aws");
        format!("s3:{ep}/{}/{}", self.inner.bucket, self.inner.prefix)
    }

    fn local_path(&self, _object: &str) -> Option<PathBuf> {
        None
    }

    fn ranged_reads(&self) -> bool {
        self.inner.settings.read_ranges
    }

    fn stat(&self, object: &str) -> Result<Option<u64>> {
        let key = self.inner.key(object)?;
        match self.inner.rt.block_on(self.inner.store.head(&key)) {
            Ok(meta) => {
                self.inner.saw(object, meta.e_tag.as_ref());
                if meta.e_tag.is_some() {
                    let mut sizes = self.inner.sizes.lock().unwrap_or_else(|p| p.into_inner());
                    sizes.entry(object.to_string()).or_insert(meta.size);
                }
                Ok(Some(meta.size))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(&self.inner.shown(object), None, e)),
        }
    }

    fn open(&self, object: &str) -> Result<Box<dyn ObjectRead>> {
        let known = self.inner.sizes.lock().unwrap_or_else(|p| p.into_inner()).get(object).copied();
        let len = match known {
            Some(len) => len,
            None => {
                self.stat(object)?.ok_or_else(|| Error::NotFound { loc: Location::shard(self.inner.shown(object)) })?
            }
        };
        let key = self.inner.key(object)?;
        Ok(Box::new(S3Reader {
            inner: self.inner.clone(),
            object: object.to_string(),
            key,
            len,
            pos: 0,
            block: Bytes::new(),
            block_start: 0,
            next_block: MIN_BLOCK,
        }))
    }

    fn read_ranges(&self, object: &str, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>> {
        Ok(self.read_many(&[(object, ranges.to_vec())])?.pop().unwrap_or_default())
    }

    fn read_many(&self, wants: &[(&str, Vec<Range<u64>>)]) -> Result<Vec<Vec<Vec<u8>>>> {
        let mut out: Vec<Vec<Vec<u8>>> = wants.iter().map(|(_, r)| vec![Vec::new(); r.len()]).collect();
        let mut requests = Vec::new();
        for (i, (object, ranges)) in wants.iter().enumerate() {
            let key = self.inner.key(object)?;
            for (range, parts) in merge_ranges(ranges) {
                requests.push((i, *object, key.clone(), range, parts));
            }
        }
        let inner = &self.inner;
        inner.rt.block_on(async {
            let mut fetched = futures_util::stream::iter(requests)
                .map(|(i, object, key, range, parts)| async move {
                    let bytes = inner.get_range(object, &key, range.clone()).await?;
                    Ok::<_, Error>((i, range, parts, bytes))
                })
                .buffer_unordered(REQUESTS_IN_FLIGHT);
            while let Some(got) = fetched.next().await {
                let (i, range, parts, bytes) = got?;
                for (j, part) in parts {
                    let at = (part.start - range.start) as usize;
                    out[i][j] = bytes[at..at + (part.end - part.start) as usize].to_vec();
                }
            }
            Ok(out)
        })
    }

    fn check(&self) -> Result<()> {
        let inner = &self.inner;
        let dir = StorePath::parse(inner.prefix.trim_end_matches('/'))
            .map_err(|e| Error::BadName { loc: Location::shard(&inner.name), reason: e.to_string() })?;
        let dir = (!inner.prefix.is_empty()).then_some(dir);
        // One listing request: a missing bucket, bad credentials or an unreachable endpoint show here.
        match inner.rt.block_on(async { inner.store.list(dir.as_ref()).next().await }) {
            Some(Err(e)) => Err(store_err(&inner.name, None, e)),
            _ => Ok(()),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let full = format!("{}{prefix}", self.inner.prefix);
        // Listings are by folder: list the folder holding the prefix, keep the names that start with it.
        let dir = full.rfind('/').map(|i| &full[..i]).filter(|d| !d.is_empty());
        let dir = dir
            .map(StorePath::parse)
            .transpose()
            .map_err(|e| Error::BadName { loc: Location::shard(self.inner.shown(prefix)), reason: e.to_string() })?;
        let inner = &self.inner;
        let mut names = inner.rt.block_on(async {
            let mut out = Vec::new();
            let mut stream = inner.store.list(dir.as_ref());
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(|e| store_err(&inner.shown(prefix), None, e))?;
                let key = meta.location.as_ref();
                let Some(rel) = key.strip_prefix(&inner.prefix) else { continue };
                let base = rel.rsplit('/').next().unwrap_or(rel);
                if key.starts_with(&full) && !base.starts_with(TMP_PREFIX) {
                    out.push(rel.to_string());
                }
            }
            Ok::<_, Error>(out)
        })?;
        names.sort();
        Ok(names)
    }

    fn put_file(&self, object: &str, file: &Path) -> Result<()> {
        let shown = self.inner.shown(object);
        let upload = S3Upload { inner: self.inner.clone(), key: self.inner.key(object)?, shown: shown.clone() };
        let loc = || Location::shard(format!("{} (for {shown})", file.display()));
        let mut f = File::open(file).map_err(|e| Error::Io { loc: loc(), source: e })?;
        let len = f.metadata().map_err(|e| Error::Io { loc: loc(), source: e })?.len();
        upload.publish(&mut f, len)
    }

    fn delete(&self, object: &str) -> Result<()> {
        let key = self.inner.key(object)?;
        match self.inner.rt.block_on(self.inner.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(&self.inner.shown(object), None, e)),
        }
    }

    fn requests(&self) -> Option<(String, RequestCounts)> {
        Some((self.inner.bucket.clone(), self.inner.requests.snapshot()))
    }

    fn create(&self, object: &str, staging: &Path) -> Result<PendingObject> {
        let key = self.inner.key(object)?;
        let shown = self.inner.shown(object);
        PendingObject::staged(
            staging,
            &shown,
            Box::new(S3Upload { inner: self.inner.clone(), key, shown: shown.clone() }),
        )
    }
}

/// Uploads a staged output on commit.
struct S3Upload {
    inner: Arc<Inner>,
    key: StorePath,
    shown: String,
}

impl S3Upload {
    fn failed(&self, e: object_store::Error) -> Error {
        Error::Io { loc: Location::shard(&self.shown), source: io::Error::other(format!("upload failed: {e}")) }
    }

    /// Send the `len` bytes of `file` as the parts of `upload` (at least one part, up to
    /// [`PARTS_IN_FLIGHT`] at once).
    fn send_parts(&self, upload: &mut dyn MultipartUpload, file: &mut File, len: u64) -> Result<()> {
        let io_err =
            |e: io::Error| Error::Io { loc: Location::shard(format!("staged copy of {}", self.shown)), source: e };
        let part = self.inner.settings.part_size;
        self.inner.rt.block_on(async {
            let mut in_flight = futures_util::stream::FuturesOrdered::new();
            let mut left = len;
            loop {
                let n = left.min(part);
                let mut buf = vec![0u8; n as usize];
                file.read_exact(&mut buf).map_err(io_err)?;
                in_flight.push_back(upload.put_part(PutPayload::from(buf)));
                left -= n;
                if in_flight.len() >= PARTS_IN_FLIGHT
                    && let Some(r) = in_flight.next().await
                {
                    r.map_err(|e| self.failed(e))?;
                }
                if left == 0 {
                    break;
                }
            }
            while let Some(r) = in_flight.next().await {
                r.map_err(|e| self.failed(e))?;
            }
            Ok::<_, Error>(())
        })
    }

    /// A multipart upload of the whole file, not completed; aborted if any part fails.
    fn upload_parts(&self, file: &mut File, len: u64) -> Result<Box<dyn MultipartUpload>> {
        let mut upload =
            self.inner.rt.block_on(self.inner.store.put_multipart(&self.key)).map_err(|e| self.failed(e))?;
        if let Err(e) = self.send_parts(upload.as_mut(), file, len) {
            // Nothing of a failed upload may stay: its parts are dropped by the store.
            let _ = self.inner.rt.block_on(upload.abort());
            return Err(e);
        }
        Ok(upload)
    }
}

impl Publish for S3Upload {
    fn publish(&self, file: &mut File, len: u64) -> Result<()> {
        if len < self.inner.settings.multipart_threshold {
            let io_err =
                |e: io::Error| Error::Io { loc: Location::shard(format!("staged copy of {}", self.shown)), source: e };
            let mut buf = Vec::with_capacity(len as usize);
            file.read_to_end(&mut buf).map_err(io_err)?;
            self.inner
                .rt
                .block_on(self.inner.store.put(&self.key, PutPayload::from(buf)))
                .map_err(|e| self.failed(e))?;
            return Ok(());
        }
        let upload = self.upload_parts(file, len)?;
        S3Staged { inner: self.inner.clone(), upload, shown: self.shown.clone() }.complete_now()
    }

    fn stage(&self, file: &mut File, len: u64) -> Result<Box<dyn StagedUpload>> {
        // Every size goes by multipart upload (one part below the part size): only a multipart upload can
        // hold all its bytes in the store and still show nothing until it is completed.
        let upload = self.upload_parts(file, len)?;
        Ok(Box::new(S3Staged { inner: self.inner.clone(), upload, shown: self.shown.clone() }))
    }
}

/// A multipart upload with every part sent, waiting for its completion (or abort).
struct S3Staged {
    inner: Arc<Inner>,
    upload: Box<dyn MultipartUpload>,
    shown: String,
}

impl S3Staged {
    fn complete_now(mut self) -> Result<()> {
        let done = self.inner.rt.block_on(self.upload.complete());
        if let Err(e) = done {
            let _ = self.inner.rt.block_on(self.upload.abort());
            return Err(Error::Io {
                loc: Location::shard(&self.shown),
                source: io::Error::other(format!("upload failed: {e}")),
            });
        }
        Ok(())
    }
}

impl StagedUpload for S3Staged {
    fn complete(self: Box<Self>) -> Result<()> {
        self.complete_now()
    }

    fn abort(mut self: Box<Self>) {
        let _ = self.inner.rt.block_on(self.upload.abort());
    }
}

/// Merge `ranges` (any order) into requests: neighbours less than [`COALESCE_GAP`] apart share one request
/// while it stays under [`MAX_REQUEST`]. Each request lists the (index, range) pairs it serves.
#[allow(clippy::type_complexity)]
fn merge_ranges(ranges: &[Range<u64>]) -> Vec<(Range<u64>, Vec<(usize, Range<u64>)>)> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&j| (ranges[j].start, ranges[j].end));
    let mut out: Vec<(Range<u64>, Vec<(usize, Range<u64>)>)> = Vec::new();
    for j in order {
        let r = ranges[j].clone();
        match out.last_mut() {
            Some((cur, parts))
                if r.start <= cur.end.saturating_add(COALESCE_GAP) && r.end.max(cur.end) - cur.start <= MAX_REQUEST =>
            {
                cur.end = cur.end.max(r.end);
                parts.push((j, r));
            }
            _ => out.push((r.clone(), vec![(j, r)])),
        }
    }
    out
}

/// A seekable reader over an S3 object by ranged GETs (see the module doc).
pub struct S3Reader {
    inner: Arc<Inner>,
    object: String,
    key: StorePath,
    len: u64,
    pos: u64,
    block: Bytes,
    block_start: u64,
    /// Size of the next fetch: doubles while reads are sequential, back to [`MIN_BLOCK`] after a jump.
    next_block: u64,
}

impl S3Reader {
    fn fetch(&mut self) -> io::Result<()> {
        let block_end = self.block_start + self.block.len() as u64;
        let sequential = !self.block.is_empty() && self.pos >= block_end && self.pos - block_end < self.next_block;
        self.next_block = if sequential { (self.next_block * 2).min(MAX_BLOCK) } else { MIN_BLOCK };
        let end = (self.pos + self.next_block).min(self.len);
        let range = self.pos..end;
        let got = self.inner.rt.block_on(self.inner.get_range(&self.object, &self.key, range));
        self.block = got.map_err(io_from)?;
        self.block_start = self.pos;
        Ok(())
    }
}

/// Keeps a store error's kind (not found) and text through `io::Error`.
fn io_from(e: Error) -> io::Error {
    let kind = if matches!(e, Error::NotFound { .. }) { io::ErrorKind::NotFound } else { io::ErrorKind::Other };
    io::Error::new(kind, e.to_string())
}

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.len {
            return Ok(0);
        }
        let block_end = self.block_start + self.block.len() as u64;
        if self.pos < self.block_start || self.pos >= block_end {
            self.fetch()?;
        }
        let at = (self.pos - self.block_start) as usize;
        let n = buf.len().min(self.block.len() - at);
        buf[..n].copy_from_slice(&self.block[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for S3Reader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<S3Settings> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        S3Settings::from_lookup(&|k| map.get(k).cloned())
    }

    #[test]
    fn settings_follow_the_environment() {
        let aws = settings(&[]).unwrap();
        assert_eq!(
            (aws.endpoint, aws.region.as_str(), aws.path_style, aws.allow_http),
            (None, "us-east-1", false, false)
        );
        assert!(aws.anonymous, "no credentials: unsigned requests");
        let ais = settings(&[
            ("AWS_ENDPOINT_URL", "http://gw:51080/s3/"),
            ("DSORT_S3_ALLOW_HTTP", "true"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret"),
        ])
        .unwrap();
        assert!(!format!("{ais:?}").contains("very-secret"), "secrets are not printed");
        assert_eq!(ais.credentials.as_ref().map(|c| c.key_id.as_str()), Some("k"));
        assert!(settings(&[("AWS_ACCESS_KEY_ID", "k")]).is_err(), "a key id without its secret");
        assert_eq!(ais.endpoint.as_deref(), Some("http://gw:51080/s3"));
        assert_eq!(
            (ais.region.as_str(), ais.path_style, ais.allow_http, ais.anonymous),
            ("eu-west-1", true, true, false)
        );
        let own = settings(&[
            ("DSORT_S3_ENDPOINT", "http://a"),
            ("AWS_ENDPOINT_URL", "http://b"),
            ("DSORT_S3_PATH_STYLE", "no"),
        ])
        .unwrap();
        assert_eq!((own.endpoint.as_deref(), own.path_style), (Some("http://a"), false));
        let err = settings(&[("DSORT_S3_ALLOW_HTTP", "maybe")]).unwrap_err().to_string();
        assert!(err.contains("DSORT_S3_ALLOW_HTTP"), "{err}");
        let err = settings(&[("DSORT_S3_PART_SIZE", "1024")]).unwrap_err().to_string();
        assert!(err.contains("at least 5 MiB"), "{err}");
        assert!(settings(&[("DSORT_S3_RETRY_TIMEOUT", "-1")]).is_err());
    }

    #[test]
    fn neighbouring_ranges_share_requests_up_to_a_size() {
        let mb = 1u64 << 20;
        let ranges = [5 * mb..5 * mb + 10, 0..100, 200..300, 3 * mb..3 * mb + 1, 20 * mb..30 * mb];
        let merged = merge_ranges(&ranges);
        let spans: Vec<Range<u64>> = merged.iter().map(|(r, _)| r.clone()).collect();
        // 0..100 and 200..300 merge (gap < 1 MiB); 3 MiB is 3 MiB away: its own request, as is 5 MiB; the
        // 10 MiB range is over the request size alone and is not split.
        assert_eq!(spans, [0..300, 3 * mb..3 * mb + 1, 5 * mb..5 * mb + 10, 20 * mb..30 * mb]);
        assert_eq!(merged[0].1, [(1, 0..100), (2, 200..300)], "each part keeps its index");
        let many: Vec<Range<u64>> = (0..100).map(|i| i * mb / 2..i * mb / 2 + 1000).collect();
        assert!(merge_ranges(&many).iter().all(|(r, _)| r.end - r.start <= MAX_REQUEST), "requests stay bounded");
        assert_eq!(merge_ranges(&many).iter().map(|(_, p)| p.len()).sum::<usize>(), 100);
    }

    /// A server in a box: a GET's body comes in three frames, `/b/missing` answers 404 with an error body,
    /// `/down` fails as a refused connection would.
    #[derive(Debug)]
    struct Canned;

    /// A body of several frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = HttpError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, HttpError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    #[async_trait::async_trait]
    impl HttpService for Canned {
        async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
            match req.uri().path() {
                "/down" => {
                    Err(HttpError::new(object_store::client::HttpErrorKind::Connect, io::Error::other("refused")))
                }
                "/b/missing" => {
                    let mut r = HttpResponse::new(HttpResponseBody::from("<Error>NoSuchKey</Error>".to_string()));
                    *r.status_mut() = 404u16.try_into().expect("a status");
                    Ok(r)
                }
                _ => {
                    let frames = ["0123", "", "456789"].map(|s| Bytes::from_static(s.as_bytes()));
                    Ok(HttpResponse::new(HttpResponseBody::new(Frames(frames.into()))))
                }
            }
        }
    }

    fn request(method: &str, uri: &str, body: &'static [u8]) -> HttpRequest {
        let mut r = HttpRequest::new(Bytes::from_static(body).into());
        *r.method_mut() = method.parse().expect("a method");
        *r.uri_mut() = uri.parse().expect("a uri");
        r
    }

    #[test]
    fn every_request_is_counted_by_kind_with_its_body_bytes() {
        assert_eq!(request_kind("GET", Some("list-type=2&prefix=a")), RequestKind::List);
        assert_eq!(request_kind("GET", Some("x-id=GetObject")), RequestKind::Get);
        assert_eq!(request_kind("GET", None), RequestKind::Get);
        assert_eq!(request_kind("PUT", Some("partNumber=1&uploadId=u")), RequestKind::Put);
        assert_eq!(request_kind("POST", Some("uploads")), RequestKind::Other);
        assert_eq!(request_kind("HEAD", None), RequestKind::Other);
        let counts = Arc::new(RequestCounters::default());
        let service = CountingService { inner: HttpClient::new(Canned), counts: counts.clone() };
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(async {
            let got = service.call(request("GET", "http://s/b/k", b"")).await.expect("get");
            assert_eq!(got.into_body().bytes().await.expect("body").len(), 10);
            let got = service.call(request("GET", "http://s/b/missing", b"")).await.expect("get");
            assert_eq!(got.status().as_u16(), 404);
            assert!(!got.into_body().bytes().await.expect("error body").is_empty());
            // A GET whose body is not read (yet) counts as a request, its bytes as they arrive.
            let unread = service.call(request("GET", "http://s/b/k", b"")).await.expect("get");
            assert!(service.call(request("GET", "http://s/down", b"")).await.is_err(), "a failed attempt");
            service.call(request("PUT", "http://s/b/k?partNumber=1&uploadId=u", b"1234567")).await.expect("put");
            service.call(request("GET", "http://s/b?list-type=2", b"")).await.expect("list");
            service.call(request("HEAD", "http://s/b/k", b"")).await.expect("head");
            service.call(request("POST", "http://s/b/k?uploads", b"")).await.expect("post");
            assert_eq!(counts.snapshot().get_bytes, 10, "no byte of the unread body yet");
            drop(unread);
        });
        let want = RequestCounts {
            get_requests: 4,
            get_bytes: 10,
            put_requests: 1,
            put_bytes: 7,
            list_requests: 1,
            other_requests: 2,
        };
        assert_eq!(counts.snapshot(), want, "the 404's body is not object data");
    }

    #[test]
    fn object_keys_live_under_the_prefix_and_names_are_checked() {
        let s = settings(&[("DSORT_S3_ENDPOINT", "http://127.0.0.1:9"), ("DSORT_S3_ALLOW_HTTP", "1")]).unwrap();
        let b = S3Bucket::new("bkt", "/data/x/", &s).unwrap();
        assert_eq!(b.name(), "s3://bkt/data/x");
        assert_eq!(b.inner.key("a/b.tar").unwrap().as_ref(), "data/x/a/b.tar");
        assert!(b.inner.key("../b.tar").is_err());
        assert!(b.local_path("a.tar").is_none());
        assert_ne!(b.identity(), S3Bucket::new("bkt", "", &s).unwrap().identity());
        assert_eq!(b.requests(), Some(("bkt".to_string(), RequestCounts::default())), "keyed by bucket, no prefix");
    }
}
