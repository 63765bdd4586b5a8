//! An S3 server for the tests: moto (`python3 -m moto.server`, from PyPI `moto[server]`, which `.ci/run`
//! installs) on a free loopback port, killed on drop; a boto3 client script (`tests/s3ctl.py`) to put and
//! get objects independently of dsort; and a TCP proxy in front of the server that can hold responses
//! after a number of bytes (to act "mid-job" on a real event, not a delay) or cut every connection and
//! refuse new ones (a server going away and coming back), and that reads the HTTP/1.1 it passes to count
//! the requests and their body bytes on the wire ([`Proxy::wire`]) and can answer object GETs itself with
//! a 503 (a server asking for a retry, [`Proxy::fail_gets`]).

use crate::{Run, dsort_bin};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long moto may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// True when moto's server can be started here.
pub fn have_moto() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server, boto3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A moto S3 server on loopback, or `None` (with a loud message) when moto is not installed. Under CI
/// (`CI` set) a missing moto is a failure: `.ci/run` installs it.
pub fn moto(test: &str) -> Option<S3Server> {
    if !have_moto() {
        assert!(std::env::var_os("CI").is_none(), "{test}: moto is not installed (`.ci/run` installs moto[server])");
        eprintln!("SKIPPED {test}: moto[server] is not installed (pip install 'moto[server]')");
        return None;
    }
    Some(S3Server::start(&[]))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A moto server process.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    env: Vec<(String, String)>,
    log: tempfile::NamedTempFile,
}

impl S3Server {
    /// Start moto with extra environment variables (e.g. `S3_UPLOAD_PART_MIN_SIZE`).
    pub fn start(env: &[(&str, &str)]) -> S3Server {
        let mut s = S3Server {
            child: None,
            port: free_port(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            log: tempfile::NamedTempFile::new().expect("log file"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = self.log.reopen().expect("log file");
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &self.port.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn moto");
        self.child = Some(child);
        // Ready when it answers; polled, with a deadline.
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < START_TIMEOUT,
                "moto did not start on port {}: {}",
                self.port,
                std::fs::read_to_string(self.log.path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop the server (its in-memory state is lost) and start a fresh one on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run the boto3 client script against this server; returns stdout, panics on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        ctl(&self.endpoint(), args)
    }

    pub fn mb(&self, buckets: &[&str]) {
        self.ctl(&[&["mb"], buckets].concat());
    }

    /// Upload every file of `dir` as `prefix` + its relative path.
    pub fn put_dir(&self, dir: &Path, bucket: &str, prefix: &str) {
        self.ctl(&["put", &dir.display().to_string(), bucket, prefix]);
    }

    /// Download every object under `prefix` into `dir`.
    pub fn get_prefix(&self, bucket: &str, prefix: &str, dir: &Path) {
        self.ctl(&["get", bucket, prefix, &dir.display().to_string()]);
    }

    /// (key, size) of every object under `prefix`, sorted.
    pub fn ls(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        self.ctl(&["ls", bucket, prefix])
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, s)| (k.to_string(), s.parse().expect("size")))
            .collect()
    }

    /// Multipart uploads of `bucket` neither completed nor aborted.
    pub fn open_uploads(&self, bucket: &str) -> usize {
        self.ctl(&["uploads", bucket]).trim().parse().expect("a count")
    }

    /// The environment that points dsort at `port` (this server, or a proxy in front of it).
    pub fn dsort_env(port: u16) -> Vec<(String, String)> {
        [
            ("DSORT_S3_ENDPOINT", format!("http://127.0.0.1:{port}")),
            ("DSORT_S3_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("DSORT_S3_RETRY_TIMEOUT", "60".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// `dsort ARGS...` against this server.
    pub fn dsort(&self, args: &[&str]) -> Run {
        dsort_env(&S3Server::dsort_env(self.port), args)
    }

    /// `dsort ARGS...` against this server; must succeed.
    pub fn dsort_ok(&self, args: &[&str]) -> String {
        let r = self.dsort(args);
        assert!(r.ok, "dsort {args:?} failed:\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
        r.stdout
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- moto log ---\n{}", std::fs::read_to_string(self.log.path()).unwrap_or_default());
        }
    }
}

/// Run `tests/s3ctl.py ENDPOINT ARGS...`.
pub fn ctl(endpoint: &str, args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("s3ctl.py");
    let out = Command::new("python3").arg(&script).arg(endpoint).args(args).output().expect("run s3ctl.py");
    assert!(out.status.success(), "s3ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dsort ARGS...` with extra environment variables.
pub fn dsort_env(env: &[(String, String)], args: &[&str]) -> Run {
    dsort_cmd(env, args).output().expect("run dsort").into()
}

/// The `dsort ARGS...` command with extra environment variables (to spawn it and act while it runs).
pub fn dsort_cmd(env: &[(String, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(dsort_bin());
    cmd.args(args).envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).stdin(Stdio::null());
    cmd
}

/// A TCP proxy on loopback in front of an S3 server (see the module doc).
pub struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
}

#[derive(Default)]
struct Flags {
    /// Responses are held (not forwarded) while set.
    holding: bool,
    /// Connections are cut and the port closed while set.
    severed: bool,
    /// The port is closed (the accept loop dropped its listener).
    closed: bool,
}

struct ProxyState {
    /// Requests and body bytes seen on the wire, over all connections.
    wire: Mutex<WireCounts>,
    /// Object GETs still to be answered 503 by the proxy itself (not forwarded), and those answered so.
    fail_gets: AtomicU64,
    failed_gets: AtomicU64,
    upstream: AtomicU64,
    /// Response bytes forwarded so far.
    forwarded: AtomicU64,
    /// Hold responses once `forwarded` reaches this (`u64::MAX`: never).
    hold_at: AtomicU64,
    flags: Mutex<Flags>,
    changed: Condvar,
    conns: Mutex<Vec<TcpStream>>,
}

impl ProxyState {
    fn wire(&self) -> std::sync::MutexGuard<'_, WireCounts> {
        self.wire.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flags(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Proxy {
    /// A proxy to `127.0.0.1:upstream` on a free port.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(ProxyState {
            wire: Mutex::new(WireCounts::default()),
            fail_gets: AtomicU64::new(0),
            failed_gets: AtomicU64::new(0),
            upstream: AtomicU64::new(u64::from(upstream)),
            forwarded: AtomicU64::new(0),
            hold_at: AtomicU64::new(u64::MAX),
            flags: Mutex::new(Flags::default()),
            changed: Condvar::new(),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        std::thread::spawn(move || accept_loop(listener, port, &st));
        Proxy { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Response bytes forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// The requests that went through so far, counted from the HTTP/1.1 bytes themselves. Bytes are counted
    /// before they are forwarded, so once the client has exited the counts are complete.
    pub fn wire(&self) -> WireCounts {
        self.state.wire().clone()
    }

    /// Answer the next `n` object GETs with `503 Slow Down` (and close their connections) instead of
    /// forwarding them; they are counted on the wire like any request.
    pub fn fail_gets(&self, n: u64) {
        self.state.fail_gets.store(n, Ordering::SeqCst);
    }

    /// Object GETs answered 503 by [`Proxy::fail_gets`] so far.
    pub fn failed_gets(&self) -> u64 {
        self.state.failed_gets.load(Ordering::SeqCst)
    }

    /// Hold every response once `bytes` response bytes in all have been forwarded.
    pub fn hold_after(&self, bytes: u64) {
        self.state.hold_at.store(bytes, Ordering::SeqCst);
    }

    /// Wait until responses are held; false after `timeout` (the client never read that many bytes).
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let flags = self.state.flags();
        let (flags, _) =
            self.state.changed.wait_timeout_while(flags, timeout, |f| !f.holding).unwrap_or_else(|p| p.into_inner());
        flags.holding
    }

    /// Forward responses again (and do not hold again).
    pub fn release(&self) {
        self.state.hold_at.store(u64::MAX, Ordering::SeqCst);
        self.state.flags().holding = false;
        self.state.changed.notify_all();
    }

    /// Cut every connection and close the port (clients get connection errors); returns once closed.
    pub fn sever(&self) {
        self.state.flags().severed = true;
        for c in self.state.conns.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.release();
        let flags = self.state.flags();
        drop(self.state.changed.wait_while(flags, |f| !f.closed).unwrap_or_else(|p| p.into_inner()));
    }

    /// Open the port again, forwarding to `upstream`.
    pub fn reopen(&self, upstream: u16) {
        self.state.upstream.store(u64::from(upstream), Ordering::SeqCst);
        self.state.flags().severed = false;
        self.state.changed.notify_all();
    }
}

fn accept_loop(listener: TcpListener, port: u16, st: &Arc<ProxyState>) {
    let mut listener = Some(listener);
    loop {
        let Some(l) = &listener else {
            // Closed: wait for `reopen`, then listen on the same port again.
            let flags = st.flags();
            drop(st.changed.wait_while(flags, |f| f.severed).unwrap_or_else(|p| p.into_inner()));
            listener = Some(TcpListener::bind(("127.0.0.1", port)).expect("re-bind proxy port"));
            st.flags().closed = false;
            continue;
        };
        let _ = l.set_nonblocking(true);
        match l.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let st = st.clone();
                std::thread::spawn(move || serve(client, &st));
            }
            Err(_) => {
                if st.flags().severed {
                    listener = None;
                    st.flags().closed = true;
                    st.changed.notify_all();
                } else {
                    // Nothing to accept: poll again shortly (the loop must also notice `sever`).
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
}

fn serve(client: TcpStream, st: &Arc<ProxyState>) {
    let upstream = st.upstream.load(Ordering::SeqCst) as u16;
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    {
        let mut conns = st.conns.lock().unwrap_or_else(|p| p.into_inner());
        for s in [&client, &server] {
            if let Ok(c) = s.try_clone() {
                conns.push(c);
            }
        }
    }
    let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) else { return };
    // Requests sent on this connection and not answered yet, oldest first (HTTP/1.1 answers in order).
    let asked: Arc<Mutex<VecDeque<Asked>>> = Arc::default();
    let (st_req, asked_req) = (st.clone(), asked.clone());
    std::thread::spawn(move || {
        let mut requests = Http1::default();
        let mut put = false;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match c_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Counted before it is forwarded: no response to it can come first.
            let mut refuse = false;
            requests.feed(&buf[..n], &mut |e| {
                if let Event::Head(line) = &e
                    && line.starts_with("GET ")
                    && !line.contains("list-type=")
                {
                    refuse =
                        st_req.fail_gets.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1)).is_ok();
                }
                count_request(&st_req, &asked_req, &mut put, e)
            });
            if refuse {
                // The client sends its next request only once this one is answered: nothing else is lost.
                st_req.failed_gets.fetch_add(1, Ordering::SeqCst);
                let _ = c_in.write_all(b"HTTP/1.1 503 Slow Down\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = c_in.shutdown(Shutdown::Both);
                break;
            }
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(Shutdown::Write);
    });
    let (mut s_in, mut c_out) = (server, client);
    let mut responses = Http1::default();
    let mut answering = None;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match s_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        responses.feed(&buf[..n], &mut |e| count_response(st, &asked, &mut answering, e));
        let total = st.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        {
            let mut flags = st.flags();
            if total >= st.hold_at.load(Ordering::SeqCst) && !flags.holding {
                flags.holding = true;
                st.changed.notify_all();
            }
            let flags = st.changed.wait_while(flags, |f| f.holding && !f.severed).unwrap_or_else(|p| p.into_inner());
            if flags.severed {
                break;
            }
        }
        if c_out.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = c_out.shutdown(Shutdown::Both);
    let _ = s_in.shutdown(Shutdown::Both);
}

/// Requests and body bytes counted on the wire by a [`Proxy`], with the kinds of `dsort reshard --json`'s
/// `s3` map: a GET with a `list-type` query parameter is a listing, any other GET an object GET (its
/// response body counted when the status is 2xx), a PUT a put (its request body counted), the rest other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireCounts {
    pub get_requests: u64,
    pub get_bytes: u64,
    pub put_requests: u64,
    pub put_bytes: u64,
    pub list_requests: u64,
    pub other_requests: u64,
    /// Bytes that did not read as HTTP/1.1 went through (the counts are then not to be trusted).
    pub unparsed: bool,
}

impl WireCounts {
    /// The same counts as one bucket's entry of a `--json` summary's `s3` map.
    pub fn as_json(&self) -> serde_json::Value {
        serde_json::json!({
            "get_requests": self.get_requests, "get_bytes": self.get_bytes, "put_requests": self.put_requests,
            "put_bytes": self.put_bytes, "list_requests": self.list_requests, "other_requests": self.other_requests,
        })
    }
}

/// What a request asked, to read and count its response.
#[derive(Debug, Clone, Copy)]
struct Asked {
    /// An object GET: its 2xx body is counted.
    get: bool,
    /// A HEAD: its response has no body whatever its headers say.
    head: bool,
}

/// What [`Http1`] read.
enum Event<'a> {
    /// A request line or status line (its headers were read too).
    Head(&'a str),
    /// Body bytes (chunked bodies: their data only) of the message whose head came last.
    Body(u64),
    /// Bytes that are not HTTP/1.1.
    Garbage,
}

/// Counts a request; `put` remembers whether the body being read is a PUT's. Returns whether the request
/// may have a body (as its headers say).
fn count_request(st: &ProxyState, asked: &Mutex<VecDeque<Asked>>, put: &mut bool, e: Event<'_>) -> bool {
    let mut w = st.wire();
    match e {
        Event::Head(line) => {
            let mut words = line.split(' ');
            let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let query = target.split_once('?').map_or("", |(_, q)| q);
            let listing = query.split('&').any(|p| p.split('=').next() == Some("list-type"));
            match method {
                "GET" if listing => w.list_requests += 1,
                "GET" => w.get_requests += 1,
                "PUT" => w.put_requests += 1,
                _ => w.other_requests += 1,
            }
            *put = method == "PUT";
            let a = Asked { get: method == "GET" && !listing, head: method == "HEAD" };
            asked.lock().unwrap_or_else(|p| p.into_inner()).push_back(a);
        }
        Event::Body(n) if *put => w.put_bytes += n,
        Event::Body(_) => {}
        Event::Garbage => w.unparsed = true,
    }
    true
}

/// Counts a response; `answering` is the request it answers, and whether it succeeded. Returns whether the
/// response has a body (none for a HEAD, an interim 1xx, a 204 or a 304).
fn count_response(
    st: &ProxyState,
    asked: &Mutex<VecDeque<Asked>>,
    answering: &mut Option<(Asked, bool)>,
    e: Event<'_>,
) -> bool {
    match e {
        Event::Head(line) => {
            let status: u16 = line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            if (100..200).contains(&status) {
                return false; // interim: the final response follows
            }
            let Some(a) = asked.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                st.wire().unparsed = true;
                return true;
            };
            *answering = Some((a, (200..300).contains(&status)));
            !(a.head || status == 204 || status == 304)
        }
        Event::Body(n) => {
            if let Some((Asked { get: true, .. }, true)) = answering {
                st.wire().get_bytes += n;
            }
            true
        }
        Event::Garbage => {
            st.wire().unparsed = true;
            true
        }
    }
}

/// Where [`Http1`] is in the stream.
#[derive(Debug, Clone, Copy, Default)]
enum Framing {
    #[default]
    Head,
    /// Body bytes left (`Content-Length`).
    Length(u64),
    /// A chunk-size line is next.
    ChunkSize,
    /// Chunk data bytes left, then CRLF.
    ChunkData(u64),
    ChunkEnd,
    /// Trailer lines up to an empty one.
    Trailer,
    /// A response without length: its body runs to the end of the connection.
    ToEnd,
    /// Gave up (not HTTP/1.1).
    Broken,
}

/// Reads one direction of an HTTP/1.1 connection as it passes, message by message: heads and body sizes
/// (`Content-Length`, chunked, or to the end of the connection for a response).
#[derive(Default)]
struct Http1 {
    buf: Vec<u8>,
    state: Framing,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Http1 {
    /// Read `bytes`; `on` gets each event, and for a head answers whether that message has a body.
    fn feed(&mut self, bytes: &[u8], on: &mut dyn FnMut(Event<'_>) -> bool) {
        if matches!(self.state, Framing::Broken) {
            return;
        }
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            match self.state {
                Framing::Broken => return,
                Framing::Head => {
                    let Some(end) = find(rest, b"\r\n\r\n") else { break };
                    let Ok(head) = std::str::from_utf8(&rest[..end]) else {
                        on(Event::Garbage);
                        self.state = Framing::Broken;
                        return;
                    };
                    let mut lines = head.split("\r\n");
                    let first = lines.next().unwrap_or("");
                    let (mut length, mut chunked) = (None, false);
                    for l in lines {
                        let Some((k, v)) = l.split_once(':') else { continue };
                        match k.trim().to_ascii_lowercase().as_str() {
                            "content-length" => length = v.trim().parse::<u64>().ok(),
                            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                            _ => {}
                        }
                    }
                    let response = first.starts_with("HTTP/");
                    let body = on(Event::Head(first));
                    at += end + 4;
                    self.state = match (body, chunked, length) {
                        (false, _, _) | (true, false, Some(0)) => Framing::Head,
                        (true, true, _) => Framing::ChunkSize,
                        (true, false, Some(n)) => Framing::Length(n),
                        (true, false, None) if response => Framing::ToEnd,
                        (true, false, None) => Framing::Head,
                    };
                }
                Framing::Length(n) | Framing::ChunkData(n) => {
                    if rest.is_empty() {
                        break;
                    }
                    let k = n.min(rest.len() as u64);
                    on(Event::Body(k));
                    at += k as usize;
                    self.state = match (self.state, k == n) {
                        (Framing::Length(_), true) => Framing::Head,
                        (Framing::Length(_), false) => Framing::Length(n - k),
                        (_, true) => Framing::ChunkEnd,
                        (_, false) => Framing::ChunkData(n - k),
                    };
                }
                Framing::ChunkSize => {
                    let Some(end) = find(rest, b"\r\n") else { break };
                    let size = std::str::from_utf8(&rest[..end])
                        .ok()
                        .and_then(|l| u64::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16).ok());
                    let Some(size) = size else {
                        on(Event::Garbage);
                        self.state = Framing::Broken;
                        return;
                    };
                    at += end + 2;
                    self.state = if size == 0 { Framing::Trailer } else { Framing::ChunkData(size) };
                }
                Framing::ChunkEnd => {
                    if rest.len() < 2 {
                        break;
                    }
                    if &rest[..2] != b"\r\n" {
                        on(Event::Garbage);
                        self.state = Framing::Broken;
                        return;
                    }
                    at += 2;
                    self.state = Framing::ChunkSize;
                }
                Framing::Trailer => {
                    let Some(end) = find(rest, b"\r\n") else { break };
                    at += end + 2;
                    if end == 0 {
                        self.state = Framing::Head;
                    }
                }
                Framing::ToEnd => {
                    if rest.is_empty() {
                        break;
                    }
                    on(Event::Body(rest.len() as u64));
                    at = self.buf.len();
                }
            }
        }
        self.buf.drain(..at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `step` bytes, answering for head `i` that it has a body unless
    /// `bodies[i]` is false; returns (first lines of the heads, body bytes).
    fn read(bytes: &[u8], step: usize, bodies: &[bool]) -> (Vec<String>, u64) {
        let (mut heads, mut body) = (Vec::<String>::new(), 0);
        let mut h = Http1::default();
        for piece in bytes.chunks(step) {
            h.feed(piece, &mut |e| match e {
                Event::Head(l) => {
                    heads.push(l.to_string());
                    bodies.get(heads.len() - 1).copied().unwrap_or(true)
                }
                Event::Body(n) => {
                    body += n;
                    true
                }
                Event::Garbage => panic!("not HTTP/1.1"),
            });
        }
        (heads, body)
    }

    #[test]
    fn http1_messages_are_read_whatever_the_pieces() {
        let requests = b"GET /b/k HTTP/1.1\r\nrange: bytes=0-9\r\n\r\nPUT /b/k HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
POST /b/k?uploads HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n10;x=y\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n\
HEAD /b/k HTTP/1.1\r\n\r\n";
        // The second response answers a HEAD (no body whatever its length says); the third runs to the end.
        let responses =
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nabcdHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n\
HTTP/1.0 206 Partial\r\n\r\nto the end";
        for step in [1, 3, 7, 1000] {
            let (heads, body) = read(requests, step, &[]);
            assert_eq!(
                heads,
                ["GET /b/k HTTP/1.1", "PUT /b/k HTTP/1.1", "POST /b/k?uploads HTTP/1.1", "HEAD /b/k HTTP/1.1"]
            );
            assert_eq!(body, 5 + 3 + 16, "step {step}");
            let (heads, body) = read(responses, step, &[true, false, true]);
            assert_eq!(heads, ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.0 206 Partial"]);
            assert_eq!(body, 4 + 10, "step {step}");
        }
    }
}
