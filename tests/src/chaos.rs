//! Chaos trials for the cluster (issue #11): a job on a fresh cluster of real processes (coordinator with a
//! state dir, 3 targets), one random fault at a random moment or phase, and checks of what the job left.
//!
//! A trial ([`run_trial`]) draws from its seed: the fault ([`Fault`]), the target it hits, when it hits (a
//! phase reached through the `DSORT_TEST_HOLD` failpoint, released right after the fault, or a random delay
//! after the start), the algorithm and the data. Then it checks:
//!
//! - the job ended (finished or aborted) within [`END_TIMEOUT`] of the fault, else it is `hung`;
//! - finished: the output is exactly the reference (`dsort reshard` of the same inputs and spec): the same
//!   names, byte for byte, every record once (`records lost` counts the reference records missing);
//! - aborted: no output object at all (a partial output otherwise); a fault in the commit (after the
//!   decision) must not abort the job;
//! - no temp file left on any target once the job ended ([`Cluster::temp_files`]: job temp folders, staging,
//!   commit plans, `.dsort-tmp-*` objects), within [`SETTLE_TIMEOUT`];
//! - the input objects are all there and unchanged;
//! - the cluster recovered: every target up again, and the next job (no fault) finishes with the reference
//!   output, leaving no temp file either.
//!
//! `tests/chaos/main.rs` (the `chaos` binary) runs N trials and prints a summary; `tests/tests/cluster_chaos.rs` runs one trial
//! per fault kind as a smoke test.

use crate::{Cluster, dsort, list_dir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A job that has not ended this long after the fault is `hung`.
pub const END_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after a job's end the targets may take to remove its temp files and to be up again.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long every target must stay up, without a break, before a trial checks the cluster (the coordinator
/// finds a target down after 3 s without a heartbeat).
pub const STABLE_FOR: Duration = Duration::from_millis(3500);
/// The coordinator's `--stall-timeout` in the trials.
pub const STALL_TIMEOUT: &str = "5s";
/// The targets' `--coordinator-lease` in the trials.
pub const COORDINATOR_LEASE: &str = "3s";
/// How long a stopped target stays stopped (SIGSTOP, then SIGCONT).
pub const STOP_FOR: Duration = Duration::from_secs(10);
/// The phases a trial can hold a target in before the fault (`DSORT_TEST_HOLD`).
pub const PHASES: [&str; 4] = ["extraction", "sorting", "creation", "commit"];

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// `kill -9` of a target, then it is started again (same mountpaths, same id).
    KillTarget,
    /// SIGSTOP of a target for [`STOP_FOR`], then SIGCONT.
    StopTarget,
    /// `kill -9` of the coordinator, then it is started again (same address, same state dir).
    KillCoordinator,
    /// A target in its own network namespace loses its link (veth down inside the namespace) for a few
    /// seconds (root and `ip` only).
    CutLink,
}

impl Fault {
    pub const ALL: [Fault; 4] = [Fault::KillTarget, Fault::StopTarget, Fault::KillCoordinator, Fault::CutLink];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillTarget => "kill-target",
            Fault::StopTarget => "stop-target",
            Fault::KillCoordinator => "kill-coordinator",
            Fault::CutLink => "cut-link",
        }
    }
}

/// The order of a trial's job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Shuffle(u64),
    Alphanumeric,
    None,
}

impl Algorithm {
    fn spec(self) -> String {
        match self {
            Algorithm::Shuffle(seed) => format!(r#"{{"kind":"shuffle","seed":"{seed}"}}"#),
            Algorithm::Alphanumeric => r#"{"kind":"alphanumeric"}"#.to_string(),
            Algorithm::None => r#"{"kind":"none"}"#.to_string(),
        }
    }

    fn name(self) -> String {
        match self {
            Algorithm::Shuffle(seed) => format!("shuffle:{seed}"),
            Algorithm::Alphanumeric => "alphanumeric".into(),
            Algorithm::None => "none".into(),
        }
    }
}

/// splitmix64: a small, seeded, reproducible generator (no dependency).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// What a trial does, drawn from its seed ([`TrialPlan::draw`]).
#[derive(Clone, Debug)]
pub struct TrialPlan {
    pub seed: u64,
    pub fault: Fault,
    /// The target the fault hits (for a coordinator kill: the target held in `phase`).
    pub target: usize,
    pub targets: usize,
    /// The phase the fault lands in (a target held there by the failpoint); `None`: after `delay`.
    pub phase: Option<&'static str>,
    pub delay: Duration,
    /// How long a cut link stays cut.
    pub outage: Duration,
    pub algorithm: Algorithm,
    pub shards: usize,
    pub records: usize,
}

impl TrialPlan {
    /// Draw a trial from `seed`: the fault among `faults` unless `fault` names it.
    pub fn draw(seed: u64, targets: usize, faults: &[Fault], fault: Option<Fault>) -> TrialPlan {
        let mut rng = Rng::new(seed);
        let drawn = faults[rng.below(faults.len() as u64) as usize];
        let phase = rng.below(PHASES.len() as u64 + 1) as usize;
        let algorithm = match rng.below(3) {
            0 => Algorithm::Shuffle(rng.below(1000)),
            1 => Algorithm::Alphanumeric,
            _ => Algorithm::None,
        };
        TrialPlan {
            seed,
            fault: fault.unwrap_or(drawn),
            target: rng.below(targets as u64) as usize,
            targets,
            phase: PHASES.get(phase).copied(),
            delay: Duration::from_millis(rng.below(800)),
            outage: Duration::from_millis(2000 + rng.below(4000)),
            algorithm,
            shards: 4 + rng.below(5) as usize,
            records: 20 + rng.below(40) as usize,
        }
    }

    /// `fault@phase t<i>`, e.g. `kill-target@commit t1` or `stop-target@+830ms t0`.
    pub fn describe(&self) -> String {
        let when = match self.phase {
            Some(p) => p.to_string(),
            None => format!("+{}ms", self.delay.as_millis()),
        };
        format!(
            "{}@{when} t{} {} {}x{}",
            self.fault.name(),
            self.target,
            self.algorithm.name(),
            self.shards,
            self.records
        )
    }
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    Finished,
    /// Aborted, with its errors.
    Aborted(String),
    /// Not ended within [`END_TIMEOUT`] of the fault.
    Hung,
}

/// What one trial found.
#[derive(Clone, Debug)]
pub struct TrialReport {
    pub plan: TrialPlan,
    pub job: String,
    pub ended: Option<Ended>,
    /// The fault landed after the job had ended already (the phase was never reached).
    pub late: bool,
    /// From the fault to the job's end.
    pub fault_to_end: Option<Duration>,
    pub records_lost: usize,
    /// Output objects of an aborted job, or a finished job's output that differs from the reference.
    pub partial_output: usize,
    /// Temp files left on the targets after the job ended (and after the next job).
    pub temp_left: Vec<PathBuf>,
    /// Everything that is not as it must be (empty: the trial is clean).
    pub problems: Vec<String>,
    /// Where the cluster's logs were saved (unclean trials, when asked).
    pub logs: Option<PathBuf>,
    pub took: Duration,
    /// A note (e.g. why a fault could not be injected as drawn).
    pub notes: Vec<String>,
}

impl TrialReport {
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// One line: `trial 3 seed 0x.. kill-target@commit t1 ...: finished in 4.2s (fault->end 1.1s) clean`.
    pub fn line(&self, index: usize) -> String {
        let ended = match &self.ended {
            Some(Ended::Finished) => "finished".to_string(),
            Some(Ended::Aborted(e)) => format!("aborted ({})", shorten(e, 160)),
            Some(Ended::Hung) => "HUNG".to_string(),
            None => "not started".to_string(),
        };
        let to_end = self.fault_to_end.map(|d| format!(", fault->end {:.1}s", d.as_secs_f64())).unwrap_or_default();
        let late = if self.late { ", fault after the end" } else { "" };
        let verdict =
            if self.clean() { "clean".to_string() } else { format!("NOT CLEAN: {}", self.problems.join("; ")) };
        let logs = self.logs.as_ref().map(|p| format!(" (logs: {})", p.display())).unwrap_or_default();
        let notes = if self.notes.is_empty() { String::new() } else { format!(" [{}]", self.notes.join("; ")) };
        format!(
            "trial {index:>3} seed {:#018x} {} {}: {ended}{to_end}{late}, {:.1}s: {verdict}{notes}{logs}",
            self.plan.seed,
            self.plan.describe(),
            self.job,
            self.took.as_secs_f64()
        )
    }
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}...", s.chars().take(n).collect::<String>()) }
}

/// Whether the cut-link fault can run here: root, `ip`, and network namespaces that can be created.
pub fn netns_available() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    if !Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success()) {
        return Err("`ip` (iproute2) not found".into());
    }
    NetNs::remove_stale();
    NetNs::create().map(drop)
}

/// A network namespace joined to the host by a veth pair: the host end `10.231.X.1`, the namespace end
/// `10.231.X.2` (X from the pid). Removed (namespace and veth) when dropped.
#[derive(Debug)]
pub struct NetNs {
    pub ns: String,
    host_if: String,
    peer_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

const NETNS_PREFIX: &str = "dsch";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetNs {
    pub fn create() -> Result<NetNs, String> {
        let pid = std::process::id();
        let n = NetNs {
            ns: format!("{NETNS_PREFIX}{pid}"),
            host_if: format!("{NETNS_PREFIX}{pid}h"),
            peer_if: format!("{NETNS_PREFIX}{pid}p"),
            host_ip: format!("10.231.{}.1", pid % 256),
            ns_ip: format!("10.231.{}.2", pid % 256),
        };
        ip(&["netns", "add", &n.ns])?;
        // From here on, dropping `n` removes what exists.
        ip(&["link", "add", &n.host_if, "type", "veth", "peer", "name", &n.peer_if])?;
        ip(&["link", "set", &n.peer_if, "netns", &n.ns])?;
        ip(&["addr", "add", &format!("{}/24", n.host_ip), "dev", &n.host_if])?;
        ip(&["link", "set", &n.host_if, "up"])?;
        n.exec(&["addr", "add", &format!("{}/24", n.ns_ip), "dev", &n.peer_if])?;
        n.exec(&["link", "set", &n.peer_if, "up"])?;
        n.exec(&["link", "set", "lo", "up"])?;
        Ok(n)
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.ns, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Take the namespace's end of the link down (`up: false`) or up again.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        self.exec(&["link", "set", &self.peer_if, if up { "up" } else { "down" }])
    }

    /// Remove the namespaces and veths of earlier runs whose process is gone (killed before its cleanup).
    pub fn remove_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else { continue };
            let Some(pid) = name.strip_prefix(NETNS_PREFIX).and_then(|p| p.parse::<u32>().ok()) else { continue };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let _ = ip(&["link", "del", &format!("{NETNS_PREFIX}{pid}h")]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The host end goes with its peer; either may be gone already.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// The state of job `id` as the coordinator reports it: `Ok(None)` while it runs.
pub fn job_end(c: &Cluster, id: &str) -> Result<Option<Ended>, String> {
    let v = c.job_infos(id)?;
    let infos = v.as_object().ok_or_else(|| format!("job {id}: not a JobInfo map: {v}"))?;
    if infos.values().any(|i| i["aborted"] == true) {
        let mut errors: Vec<String> = Vec::new();
        for e in infos.values().filter_map(|i| i["Metrics"]["errors"].as_array()).flatten() {
            let e = e.as_str().unwrap_or_default().to_string();
            if !errors.contains(&e) {
                errors.push(e);
            }
        }
        return Ok(Some(Ended::Aborted(errors.join("; "))));
    }
    if !infos.is_empty() && infos.values().all(|i| i["Metrics"]["shard_creation"]["finished"] == true) {
        return Ok(Some(Ended::Finished));
    }
    Ok(None)
}

/// Poll job `id` until it ends or `deadline`; the end and when it was seen.
fn wait_end(c: &Cluster, id: &str, deadline: Instant) -> (Ended, Instant) {
    loop {
        if let Ok(Some(e)) = job_end(c, id) {
            return (e, Instant::now());
        }
        if Instant::now() >= deadline {
            return (Ended::Hung, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Keep a fault on for `dur` (the fault's length, not a wait for a condition) while watching job `id`: the
/// first end seen is stored in `seen`.
fn hold_fault(c: &Cluster, id: &str, dur: Duration, seen: &mut Option<(Ended, Instant)>) {
    let until = Instant::now() + dur;
    while Instant::now() < until {
        if seen.is_none()
            && let Ok(Some(e)) = job_end(c, id)
        {
            *seen = Some((e, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
    }
}

/// The objects of `ais://BUCKET` (names, sorted), or why they could not be listed.
fn names(c: &Cluster, bucket: &str) -> Result<Vec<String>, String> {
    let r = c.dsort(&["ls", &format!("ais://{bucket}")]);
    if !r.ok {
        return Err(format!("dsort ls ais://{bucket}: {}", r.stderr.trim()));
    }
    Ok(r.stdout.lines().filter_map(|l| l.split('\t').next()).filter(|n| !n.is_empty()).map(String::from).collect())
}

/// Download every object of `ais://BUCKET` into `dir`; name -> bytes.
fn download(c: &Cluster, bucket: &str, dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = BTreeMap::new();
    for name in names(c, bucket)? {
        let local = dir.join(&name);
        let r = c.dsort(&["get", &format!("ais://{bucket}/{name}"), &local.display().to_string()]);
        if !r.ok {
            return Err(format!("dsort get ais://{bucket}/{name}: {}", r.stderr.trim()));
        }
        out.insert(name, std::fs::read(&local).map_err(|e| format!("{}: {e}", local.display()))?);
    }
    Ok(out)
}

/// The visible files of a local folder: name -> bytes.
fn read_folder(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    for name in list_dir(dir).into_iter().filter(|n| !n.starts_with('.')) {
        let p = dir.join(&name);
        out.insert(name, std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?);
    }
    Ok(out)
}

/// Record names (with repeats) of the shards in `dir`, by `dsort inspect --json`.
fn records(dir: &Path, names: impl IntoIterator<Item = String>) -> Result<Vec<String>, String> {
    let paths: Vec<String> = names.into_iter().map(|n| dir.join(n).display().to_string()).collect();
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let mut args = vec!["inspect", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let r = dsort(&args);
    if !r.ok {
        return Err(format!("dsort inspect: {}", r.stderr.trim()));
    }
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).map_err(|e| format!("inspect JSON: {e}"))?;
    let mut out = Vec::new();
    for shard in v["shards"].as_array().into_iter().flatten() {
        for rec in shard["records"].as_array().into_iter().flatten() {
            out.push(rec["name"].as_str().unwrap_or_default().to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// Records of `reference` missing from `got` (multisets).
fn missing(reference: &[String], got: &[String]) -> usize {
    let mut have: BTreeMap<&str, usize> = BTreeMap::new();
    for g in got {
        *have.entry(g).or_default() += 1;
    }
    let mut lost = 0;
    for r in reference {
        match have.get_mut(r.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => lost += 1,
        }
    }
    lost
}

/// Wait up to [`SETTLE_TIMEOUT`] for the targets to hold no temp file; what is left then.
fn settle_temp(c: &Cluster) -> Vec<PathBuf> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let left = c.temp_files();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Options of a run of trials.
#[derive(Clone, Debug, Default)]
pub struct TrialOptions {
    /// Save the cluster's logs of an unclean trial under this folder (`trial-<index>/`).
    pub save_logs: Option<PathBuf>,
}

/// Run one trial (see the module docs); never panics on what the cluster does: every finding is in the
/// report's `problems`.
pub fn run_trial(index: usize, plan: &TrialPlan, opts: &TrialOptions) -> TrialReport {
    let t0 = Instant::now();
    let mut report = TrialReport {
        plan: plan.clone(),
        job: String::new(),
        ended: None,
        late: false,
        fault_to_end: None,
        records_lost: 0,
        partial_output: 0,
        temp_left: Vec::new(),
        problems: Vec::new(),
        logs: None,
        took: Duration::ZERO,
        notes: Vec::new(),
    };
    let net = if plan.fault == Fault::CutLink {
        match NetNs::create() {
            Ok(n) => Some(n),
            Err(e) => {
                report.problems.push(format!("cannot set up the network namespace: {e}"));
                report.took = t0.elapsed();
                return report;
            }
        }
    } else {
        None
    };
    let state = crate::tempdir();
    let release = state.path().join("release");
    let mut b = Cluster::builder().targets(plan.targets).coordinator_args(&[
        "--state-dir",
        &state.path().display().to_string(),
        "--stall-timeout",
        STALL_TIMEOUT,
    ]);
    for i in 0..plan.targets {
        b = b.target_env(i, "DSORT_COORDINATOR_LEASE", COORDINATOR_LEASE);
    }
    if let Some(phase) = plan.phase {
        b = b.target_env(plan.target, "DSORT_TEST_HOLD", phase).target_env(
            plan.target,
            "DSORT_TEST_HOLD_RELEASE",
            &release.display().to_string(),
        );
    }
    if let Some(n) = &net {
        let prefix = ["ip", "netns", "exec", n.ns.as_str()];
        b = b.listen_host(&n.host_ip).target_wrapper(plan.target, &prefix, &n.ns_ip);
    }
    // Starting the cluster panics (with its logs) when it cannot start: that is a broken trial too.
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.start()));
    let mut c = match started {
        Ok(c) => c,
        Err(p) => {
            report.problems.push(format!("the cluster did not start: {}", panic_text(&*p)));
            report.took = t0.elapsed();
            return report;
        }
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        trial_body(&mut c, plan, &release, net.as_ref(), &mut report);
    }));
    if let Err(p) = r {
        report.problems.push(format!("the trial failed: {}", panic_text(&*p)));
    }
    // Whatever happened: no target left stopped, the link up (the cluster and the namespace go next).
    c.signal_pause(plan.target, false);
    if let Some(n) = &net {
        let _ = n.set_link(true);
    }
    if !report.clean()
        && let Some(dir) = &opts.save_logs
    {
        let dir = dir.join(format!("trial-{index}"));
        match c.save_logs(&dir) {
            Ok(()) => report.logs = Some(dir),
            Err(e) => report.notes.push(format!("logs not saved: {e}")),
        }
    }
    drop(c);
    drop(net);
    report.took = t0.elapsed();
    report
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let s = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
    shorten(&s.unwrap_or_else(|| "panic".into()), 400)
}

fn spec_text(plan: &TrialPlan, out: &str) -> String {
    format!(
        r#"{{"input_bck":{{"name":"in"}},"input_format":{{"template":"shard-{{0..{}}}.tar"}},
        "output_bck":{{"name":"{out}"}},"output_format":"o-{{000..999}}.tar","output_shard_records":7,
        "algorithm":{}}}"#,
        plan.shards - 1,
        plan.algorithm.spec()
    )
}

fn trial_body(c: &mut Cluster, plan: &TrialPlan, release: &Path, net: Option<&NetNs>, report: &mut TrialReport) {
    // The data, the inputs in the cluster, and the reference output (`dsort reshard` of the same spec).
    let root = c.root().to_path_buf();
    let input_dir = root.join("in");
    crate::gen_shards(
        &format!("{}/shard-{{0..{}}}.tar", input_dir.display(), plan.shards - 1),
        plan.records,
        "512B..4KiB",
        ".jpg,.cls",
        plan.seed,
    );
    let inputs = read_folder(&input_dir).expect("the generated inputs");
    c.dsort_ok(&["put", &input_dir.display().to_string(), "ais://in/"]);
    let ref_spec = root.join("reference.json");
    std::fs::write(&ref_spec, spec_text(plan, "reference")).expect("write the reference spec");
    crate::dsort_ok(&["reshard", "--spec", &ref_spec.display().to_string(), "--root", &root.display().to_string()]);
    let reference = read_folder(&root.join("reference")).expect("the reference output");
    assert!(!reference.is_empty(), "the reference job wrote shards");
    let reference_records = records(&root.join("reference"), reference.keys().cloned()).expect("reference records");

    // The job, and the fault.
    let id = c.start_job(&spec_text(plan, "out"));
    report.job = id.clone();
    let mut seen: Option<(Ended, Instant)> = None;
    match plan.phase {
        Some(phase) => {
            let line = format!("holding job {id} in phase {phase}");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if std::fs::read_to_string(&c.targets[plan.target].log).unwrap_or_default().contains(&line) {
                    break;
                }
                if let Ok(Some(e)) = job_end(c, &id) {
                    // Ended before the phase was reached on that target (it created no shard, say).
                    seen = Some((e, Instant::now()));
                    report.late = true;
                    break;
                }
                assert!(Instant::now() < deadline, "job {id} reached neither phase {phase} nor its end in 60 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        None => std::thread::sleep(plan.delay),
    }
    if seen.is_none()
        && let Ok(Some(e)) = job_end(c, &id)
    {
        seen = Some((e, Instant::now()));
        report.late = true;
    }
    let t_fault = Instant::now();
    let go = || std::fs::write(release, b"go").expect("write the release file");
    match plan.fault {
        Fault::KillTarget => {
            c.kill_target(plan.target);
            go();
            c.start_target(plan.target);
        }
        Fault::StopTarget => {
            c.signal_pause(plan.target, true);
            go();
            hold_fault(c, &id, STOP_FOR, &mut seen);
            c.signal_pause(plan.target, false);
        }
        Fault::KillCoordinator => {
            c.kill_coordinator();
            go();
            c.restart_coordinator();
        }
        Fault::CutLink => {
            let n = net.expect("a network namespace for a cut link");
            n.set_link(false).expect("take the link down");
            go();
            hold_fault(c, &id, plan.outage, &mut seen);
            n.set_link(true).expect("bring the link up");
        }
    }
    go();
    let (ended, at) = seen.unwrap_or_else(|| wait_end(c, &id, t_fault + END_TIMEOUT));
    if !report.late {
        report.fault_to_end = Some(at.saturating_duration_since(t_fault));
    }
    report.ended = Some(ended.clone());
    match &ended {
        Ended::Hung => {
            report.problems.push(format!("hung: job {id} did not end within {END_TIMEOUT:?} of the fault"));
            return;
        }
        Ended::Aborted(_) if plan.phase == Some("commit") && !report.late => {
            report.problems.push("aborted after the commit was decided (a fault held in the commit)".into());
        }
        _ => {}
    }

    // The cluster settles: every target up (for longer than the coordinator's down threshold: a target that
    // was silent may be found down a moment after it is back), no temp file left.
    if let Err(e) = c.try_wait_stable(STABLE_FOR, SETTLE_TIMEOUT) {
        report.problems.push(format!("the cluster did not recover: {e}"));
        return;
    }
    report.temp_left = settle_temp(c);
    if !report.temp_left.is_empty() {
        report.problems.push(format!("{} temp file(s) left: {:?}", report.temp_left.len(), report.temp_left));
    }

    // The output: all of the reference, exactly, or nothing.
    let got = download(c, "out", &root.join("got")).expect("download the output");
    match &ended {
        Ended::Finished => {
            let got_records = records(&root.join("got"), got.keys().cloned()).expect("output records");
            report.records_lost = missing(&reference_records, &got_records);
            if report.records_lost > 0 {
                report.problems.push(format!("{} record(s) lost", report.records_lost));
            }
            if got_records.len() != reference_records.len() {
                report.problems.push(format!(
                    "{} record(s) in the output, {} in the reference",
                    got_records.len(),
                    reference_records.len()
                ));
            }
            if got != reference {
                report.partial_output = got.len();
                let differ: Vec<&String> = reference
                    .keys()
                    .chain(got.keys())
                    .filter(|n| reference.get(*n) != got.get(*n))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                report.problems.push(format!(
                    "the output ({} shards) is not the reference ({} shards): these differ: {differ:?}",
                    got.len(),
                    reference.len()
                ));
            }
        }
        _ => {
            if !got.is_empty() {
                report.partial_output = got.len();
                report.problems.push(format!("partial output of an aborted job: {:?}", got.keys().collect::<Vec<_>>()));
            }
        }
    }

    // The inputs: all there, unchanged.
    let now = download(c, "in", &root.join("in-now")).expect("download the inputs");
    if now != inputs {
        report.problems.push(format!(
            "the inputs changed: {:?} now, {:?} before",
            now.keys().collect::<Vec<_>>(),
            inputs.keys().collect::<Vec<_>>()
        ));
    }

    // The cluster recovered: the next job finishes with the reference output and leaves nothing behind.
    let next = c.start_job(&spec_text(plan, "next"));
    let (next_end, _) = wait_end(c, &next, Instant::now() + END_TIMEOUT);
    if next_end != Ended::Finished {
        report.problems.push(format!("the next job {next} did not finish: {next_end:?}"));
        return;
    }
    let got = download(c, "next", &root.join("got-next")).expect("download the next output");
    if got != reference {
        report.problems.push(format!("the next job's output is not the reference ({} shards)", got.len()));
    }
    let left = settle_temp(c);
    if !left.is_empty() {
        report.problems.push(format!("{} temp file(s) left after the next job: {left:?}", left.len()));
        report.temp_left.extend(left);
    }
    // An aborted job's output must not appear later either (a late publish).
    let late = names(c, "out").expect("list the output again");
    if matches!(ended, Ended::Aborted(_)) && !late.is_empty() {
        report.partial_output = report.partial_output.max(late.len());
        report.problems.push(format!("output of the aborted job appeared later: {late:?}"));
    }
}

/// The summary of a run of trials, as a table.
pub fn summary(reports: &[TrialReport]) -> String {
    let clean = reports.iter().filter(|r| r.clean()).count();
    let finished = reports.iter().filter(|r| r.ended == Some(Ended::Finished)).count();
    let aborted = reports.iter().filter(|r| matches!(r.ended, Some(Ended::Aborted(_)))).count();
    let hung = reports.iter().filter(|r| r.ended == Some(Ended::Hung)).count();
    let lost: usize = reports.iter().map(|r| r.records_lost).sum();
    let partial = reports.iter().filter(|r| r.partial_output > 0).count();
    let temp: usize = reports.iter().filter(|r| !r.temp_left.is_empty()).count();
    let longest = reports
        .iter()
        .filter(|r| matches!(r.ended, Some(Ended::Aborted(_))))
        .filter_map(|r| r.fault_to_end.map(|d| (d, r.plan.describe())))
        .max_by_key(|(d, _)| *d);
    let late = reports.iter().filter(|r| r.late).count();
    let total: Duration = reports.iter().map(|r| r.took).sum();
    let mut s = String::new();
    let mut row = |k: &str, v: String| s.push_str(&format!("| {k:<28} | {v:<48} |\n"));
    row("trials", reports.len().to_string());
    row("clean", format!("{clean} of {}", reports.len()));
    row("finished", finished.to_string());
    row("aborted (cleanly or not)", aborted.to_string());
    row("hung", hung.to_string());
    row("records lost", lost.to_string());
    row("partial outputs", partial.to_string());
    row("trials with temp files left", temp.to_string());
    row(
        "longest fault -> abort",
        longest.map(|(d, what)| format!("{:.1}s ({what})", d.as_secs_f64())).unwrap_or_else(|| "-".into()),
    );
    row("faults after the job's end", late.to_string());
    row(
        "time",
        format!("{:.0}s ({:.1}s per trial)", total.as_secs_f64(), total.as_secs_f64() / reports.len().max(1) as f64),
    );
    for f in Fault::ALL {
        let of: Vec<&TrialReport> = reports.iter().filter(|r| r.plan.fault == f).collect();
        if of.is_empty() {
            continue;
        }
        let fin = of.iter().filter(|r| r.ended == Some(Ended::Finished)).count();
        let ab = of.iter().filter(|r| matches!(r.ended, Some(Ended::Aborted(_)))).count();
        let cl = of.iter().filter(|r| r.clean()).count();
        row(&format!("fault {}", f.name()), format!("{} trials: {fin} finished, {ab} aborted, {cl} clean", of.len()));
    }
    let mut table =
        String::from("| figure                       | value                                            |\n");
    table.push_str("|------------------------------|--------------------------------------------------|\n");
    table.push_str(&s);
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_cover_every_choice() {
        let faults = [Fault::KillTarget, Fault::StopTarget, Fault::KillCoordinator];
        let a: Vec<String> = (0..50).map(|s| TrialPlan::draw(s, 3, &faults, None).describe()).collect();
        let b: Vec<String> = (0..50).map(|s| TrialPlan::draw(s, 3, &faults, None).describe()).collect();
        assert_eq!(a, b);
        for f in faults {
            assert!(a.iter().any(|d| d.starts_with(f.name())), "{f:?} drawn in 50 trials: {a:?}");
        }
        for p in PHASES {
            assert!(a.iter().any(|d| d.contains(&format!("@{p} "))), "phase {p} drawn: {a:?}");
        }
        assert!(a.iter().any(|d| d.contains("@+")), "a random delay drawn: {a:?}");
    }

    #[test]
    fn missing_counts_a_multiset_difference() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(missing(&s(&["a", "b", "b", "c"]), &s(&["b", "a", "c", "b"])), 0);
        assert_eq!(missing(&s(&["a", "b", "b", "c"]), &s(&["a", "b", "d"])), 2);
    }
}
