//! `dsort serve coordinator|target`: run a cluster process until SIGTERM / Ctrl-C.
//!
//! The first line on stdout is `listening on http://HOST:PORT` (the bound address, so `--listen
//! 127.0.0.1:0` can be used and read back); logs go to stderr.

use crate::cluster::http::{base_url, bind, cancel_on_signals};
use crate::cluster::jobs::JobConfig;
use crate::cluster::{Coordinator, CoordinatorConfig, Target, TargetConfig};
use dsort::MemQuantity;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(subcommand)]
    pub role: ServeRole,
}

#[derive(Debug, clap::Subcommand)]
pub enum ServeRole {
    /// The coordinator: cluster map and target health, object routes and the job API.
    Coordinator(CoordinatorArgs),
    /// A target: serves the objects of its mountpaths, registers with the coordinator and heartbeats.
    Target(TargetArgs),
}

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// Address to listen on (HOST:PORT; port 0 picks a free port, printed on the first line of stdout).
    #[arg(long, env = "DSORT_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// The client token: required on the public API (/v1/sort, /v1/objects) and given by clients.
    #[arg(long, env = "DSORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster secret: required on the routes between the coordinator and the targets (every target
    /// must be given the same one); without it the token guards them too.
    #[arg(long, env = "DSORT_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Serve on a non-loopback address without a token and a cluster secret (anyone who reaches the port
    /// can run jobs, read and write objects, and join as a target).
    #[arg(long, env = "DSORT_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// Hosts an `ekm_file` URL (http/https) may name (repeatable, or comma-separated in the environment);
    /// by default none: external key maps come from buckets (`ais://BUCKET/OBJECT`).
    #[arg(long = "ekm-allow-host", env = "DSORT_EKM_ALLOW_HOSTS", value_delimiter = ',')]
    pub ekm_allow_hosts: Vec<String>,
    /// On SIGTERM: how long running jobs may take to finish before they are aborted (keep it below the
    /// pod's terminationGracePeriodSeconds, with ~15 s to spare for the aborts).
    #[arg(long, env = "DSORT_SHUTDOWN_GRACE", default_value = "20s", value_parser = grace)]
    pub shutdown_grace: Duration,
    /// `auto`: a membership change (a target joins, leaves, comes back) starts a rebalance pass once the
    /// cluster has been stable for 2 s; `manual`: only `dsort rebalance` starts one.
    #[arg(long, env = "DSORT_REBALANCE", default_value = "auto", value_parser = ["auto", "manual"])]
    pub rebalance: String,
    /// A target inside a step of a job that makes no progress for this long (though it may still heartbeat)
    /// aborts the job, with an error naming it.
    #[arg(long, env = "DSORT_STALL_TIMEOUT", default_value = "60s", value_parser = grace)]
    pub stall_timeout: Duration,
    /// A target whose heartbeats (every second) stop for this long is down: its jobs abort and the cluster
    /// map stops routing to it. Longer rides out slow nodes; shorter notices a dead one sooner.
    #[arg(long, env = "DSORT_DOWN_AFTER", default_value = "3s", value_parser = down_after)]
    pub down_after: Duration,
    /// A folder where the job list (running, finished, aborted) is kept, so that it survives a restart; a job
    /// running when the coordinator stopped shows as aborted after it. Default: the list is in memory only.
    #[arg(long, env = "DSORT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Address to listen on (HOST:PORT; port 0 picks a free port, printed on the first line of stdout).
    #[arg(long, env = "DSORT_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: String,
    /// The coordinator's URL, e.g. http://dsort-coordinator:8080.
    #[arg(long, env = "DSORT_COORDINATOR")]
    pub coordinator: String,
    /// A folder this target stores objects in (repeat for several; one value may also list several,
    /// separated by ',' or ':'). Bucket X is <mountpath>/X/.
    #[arg(long = "mountpath", env = "DSORT_MOUNTPATHS", required = true)]
    pub mountpaths: Vec<String>,
    /// Stable target id (default: generated once and kept in <first mountpath>/.dsort/target-id).
    #[arg(long, env = "DSORT_TARGET_ID")]
    pub id: Option<String>,
    /// Folder for job temp files (default: <first mountpath>/.dsort/tmp).
    #[arg(long, env = "DSORT_TMP_DIR")]
    pub tmp_dir: Option<PathBuf>,
    /// Memory budget of all jobs on this target together (jobs running at once share it): NN% of the
    /// memory limit or a size (default 80%, AIStore's max_mem_usage default).
    #[arg(long, env = "DSORT_MAX_MEM")]
    pub max_mem: Option<MemQuantity>,
    /// The client token: here it only opens GET /metrics (clients reach objects through the coordinator).
    #[arg(long, env = "DSORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster secret (the coordinator's): required on this target's routes, sent to the coordinator and
    /// other targets; without it the token does this.
    #[arg(long, env = "DSORT_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Serve on a non-loopback address without a cluster secret (anyone who reaches the port can read and
    /// write its objects and drive its jobs).
    #[arg(long, env = "DSORT_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// URL other processes reach this target at (default: the bound address; for 0.0.0.0, the local
    /// address that routes to the coordinator).
    #[arg(long, env = "DSORT_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// On SIGTERM: how long running jobs may take to finish before this target aborts them and leaves
    /// (keep it below the pod's terminationGracePeriodSeconds, with ~15 s to spare for the aborts).
    #[arg(long, env = "DSORT_SHUTDOWN_GRACE", default_value = "20s", value_parser = grace)]
    pub shutdown_grace: Duration,
    /// When the coordinator has been unreachable (heartbeats failing) for this long, this target drops every
    /// job it runs (memory, temp files, staging): nobody is left to finish them.
    #[arg(long, env = "DSORT_COORDINATOR_LEASE", default_value = "30s", value_parser = grace)]
    pub coordinator_lease: Duration,
}

fn grace(s: &str) -> Result<Duration, String> {
    super::jobs::parse_duration(s).map_err(|e| format!("{e:#}"))
}

/// At least two heartbeat intervals, so one late heartbeat never takes a live target down.
fn down_after(s: &str) -> Result<Duration, String> {
    let d = grace(s)?;
    if d < Duration::from_secs(2) {
        return Err(format!("{s} is shorter than two heartbeats (2s)"));
    }
    Ok(d)
}

/// Split mountpath values on ',' and ':' (so one environment variable can list several).
pub fn split_mountpaths(values: &[String]) -> Vec<PathBuf> {
    values
        .iter()
        .flat_map(|v| v.split([',', ':']))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("dsort-serve");
    // The blocking pool's cap (tokio's default is 512). Streams between targets hold no blocking thread, so a
    // small cap must not stall a job; tests set it low to show that.
    if let Some(n) = std::env::var("DSORT_MAX_BLOCKING_THREADS").ok().filter(|v| !v.is_empty()) {
        let n: usize = n.parse().map_err(|e| anyhow::anyhow!("DSORT_MAX_BLOCKING_THREADS={n:?}: {e}"))?;
        rt.max_blocking_threads(n.max(1));
    }
    let rt = rt.build()?;
    rt.block_on(async move {
        // A first signal starts the drain (finish or abort the jobs within the grace period); the server
        // stops when the drain is over. A second signal exits at once.
        let signal = CancellationToken::new();
        let shutdown = CancellationToken::new();
        match args.role {
            ServeRole::Coordinator(a) => {
                let coordinator = Coordinator::new(CoordinatorConfig {
                    token: nonempty(a.token),
                    rebalance_auto: a.rebalance == "auto",
                    cluster_secret: nonempty(a.cluster_secret),
                    down_after: a.down_after,
                    ..CoordinatorConfig::default()
                })?;
                let listener = bind(&a.listen).await?;
                let creds = coordinator.credentials();
                let missing = [
                    ("a token (--token)", creds.token.is_none()),
                    ("a cluster secret (--cluster-secret)", creds.secret.is_none()),
                ];
                check_exposure("coordinator", listener.local_addr()?, &missing, a.allow_unauthenticated)?;
                let hosts = a.ekm_allow_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty());
                let jobs =
                    JobConfig { ekm_hosts: hosts.collect(), stall_timeout: a.stall_timeout, state_dir: a.state_dir };
                let api = crate::cluster::JobApi::with_config(coordinator.clone(), jobs)?;
                announce(listener.local_addr()?)?;
                cancel_on_signals(signal.clone());
                let (drain, grace) = (api.clone(), a.shutdown_grace);
                stop_after_drain(signal, shutdown.clone(), async move { drain.shut_down(grace).await });
                tokio::spawn(api.clone().reconcile(shutdown.clone()));
                coordinator.run(listener, api.routes(), shutdown).await?;
            }
            ServeRole::Target(a) => {
                // A bad DSORT_MEMORY_LIMIT is a startup error, not a silently ignored setting.
                let memory_limit = dsort::memory::try_detect_memory_limit()?;
                let mountpaths = split_mountpaths(&a.mountpaths);
                let config = TargetConfig {
                    id: a.id,
                    tmp_dir: a.tmp_dir,
                    max_mem: a.max_mem,
                    token: nonempty(a.token),
                    cluster_secret: nonempty(a.cluster_secret),
                    advertise_url: a.advertise_url,
                    ..TargetConfig::new(a.coordinator, mountpaths)
                };
                let listener = bind(&a.listen).await?;
                let missing = [("a cluster secret (--cluster-secret)", config.cluster_secret.is_none())];
                check_exposure("target", listener.local_addr()?, &missing, a.allow_unauthenticated)?;
                let target = Target::open(config, listener.local_addr()?)?;
                announce(listener.local_addr()?)?;
                cancel_on_signals(signal.clone());
                let jobs = crate::cluster::target_jobs::TargetJobs::new(target.clone(), memory_limit);
                let (drain, grace) = (jobs.clone(), a.shutdown_grace);
                stop_after_drain(signal, shutdown.clone(), async move { drain.drain(grace).await });
                tokio::spawn(jobs.clone().watch_lease(a.coordinator_lease, shutdown.clone()));
                tokio::spawn(jobs.clone().recover(shutdown.clone()));
                target.run(listener, jobs.routes(), shutdown).await?;
            }
        }
        anyhow::Ok(())
    })
}

/// After the first signal, `drain` (finish or abort the jobs), then stop the server.
fn stop_after_drain(
    signal: CancellationToken,
    shutdown: CancellationToken,
    drain: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        signal.cancelled().await;
        drain.await;
        shutdown.cancel();
    });
}

/// Refuse to serve on a non-loopback address while a credential in `missing` is not set, unless `allow`
/// (then say so loudly on stderr).
fn check_exposure(role: &str, addr: std::net::SocketAddr, missing: &[(&str, bool)], allow: bool) -> anyhow::Result<()> {
    let missing: Vec<&str> = missing.iter().filter(|(_, m)| *m).map(|(what, _)| *what).collect();
    if addr.ip().is_loopback() || missing.is_empty() {
        return Ok(());
    }
    let what = missing.join(" and ");
    if !allow {
        anyhow::bail!(
            "refusing to serve the {role} on {addr} (not a loopback address) without {what}: anyone who reaches \
             the port could use it; set {what} (or their DSORT_* variables), listen on 127.0.0.1, or pass \
             --allow-unauthenticated"
        );
    }
    eprintln!(
        "dsort {role}: WARNING: UNAUTHENTICATED: serving on {addr} without {what} (--allow-unauthenticated): \
         anyone who reaches this port can use it"
    );
    Ok(())
}

fn nonempty(s: Option<String>) -> Option<String> {
    s.filter(|t| !t.is_empty())
}

/// Print the bound address as the first line of stdout, flushed (scripts and tests read it).
fn announce(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {}", base_url(addr))?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountpath_lists() {
        let v = vec!["/a,/b".to_string(), "/c:/d".to_string(), " /e ".to_string(), ",".to_string()];
        assert_eq!(split_mountpaths(&v), ["/a", "/b", "/c", "/d", "/e"].map(PathBuf::from).to_vec());
    }
}
