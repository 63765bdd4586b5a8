//! An S3 server for the tests: moto (`python3 -m moto.server`, from PyPI `moto[server]`, which `.ci/run`
//! installs) on a free loopback port, killed on drop; a boto3 client script (`tests/s3ctl.py`) to put and
//! get objects independently of dsort; and a TCP proxy in front of the server that can hold responses
//! after a number of bytes (to act "mid-job" on a real event, not a delay) or cut every connection and
//! refuse new ones (a server going away and coming back).

use crate::{Run, dsort_bin};
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
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut s_out);
        let _ = s_out.shutdown(Shutdown::Write);
    });
    let (mut s_in, mut c_out) = (server, client);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match s_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
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
