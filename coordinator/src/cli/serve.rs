//! `dsort serve coordinator|target`: run a cluster process until SIGTERM / Ctrl-C.
//!
//! The first line on stdout is `listening on http://HOST:PORT` (the bound address, so `--listen
//! 127.0.0.1:0` can be used and read back); logs go to stderr.

use crate::cluster::http::{base_url, bind, cancel_on_signals};
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
    /// Bearer token required on every route but /v1/health (the targets must be given the same one).
    #[arg(long, env = "DSORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
    /// Bearer token of the cluster (required on this target's routes, sent to the coordinator).
    #[arg(long, env = "DSORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// URL other processes reach this target at (default: the bound address; for 0.0.0.0, the local
    /// address that routes to the coordinator).
    #[arg(long, env = "DSORT_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// On SIGTERM: how long running jobs may take to finish before this target aborts them and leaves
    /// (keep it below the pod's terminationGracePeriodSeconds, with ~15 s to spare for the aborts).
    #[arg(long, env = "DSORT_SHUTDOWN_GRACE", default_value = "20s", value_parser = grace)]
    pub shutdown_grace: Duration,
}

fn grace(s: &str) -> Result<Duration, String> {
    super::jobs::parse_duration(s).map_err(|e| format!("{e:#}"))
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
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("dsort-serve").build()?;
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
                    ..CoordinatorConfig::default()
                })?;
                let listener = bind(&a.listen).await?;
                announce(listener.local_addr()?)?;
                cancel_on_signals(signal.clone());
                let hosts = a.ekm_allow_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty());
                let api = crate::cluster::JobApi::new(coordinator.clone(), hosts.collect());
                let (drain, grace) = (api.clone(), a.shutdown_grace);
                stop_after_drain(signal, shutdown.clone(), async move { drain.shut_down(grace).await });
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
                    advertise_url: a.advertise_url,
                    ..TargetConfig::new(a.coordinator, mountpaths)
                };
                let listener = bind(&a.listen).await?;
                let target = Target::open(config, listener.local_addr()?)?;
                announce(listener.local_addr()?)?;
                cancel_on_signals(signal.clone());
                let jobs = crate::cluster::target_jobs::TargetJobs::new(target.clone(), memory_limit);
                let (drain, grace) = (jobs.clone(), a.shutdown_grace);
                stop_after_drain(signal, shutdown.clone(), async move { drain.drain(grace).await });
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
