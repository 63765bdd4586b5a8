//! `dsort rebalance [--wait] [--status] [--json]`: start a rebalance pass on the cluster (or look at it) and
//! optionally wait for it to end. See `crate::cluster::rebalance` for what a pass does.

use super::jobs::parse_duration;
use super::objects::{ClusterArgs, runtime};
use crate::cluster::rebalance::{RebalanceState, RebalanceStatus};
use anyhow::{Context, bail};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct RebalanceArgs {
    /// Wait until the pass ends; fail when it failed.
    #[arg(long)]
    pub wait: bool,
    /// Only show the rebalance's state (with --wait: wait for the running or pending pass), start nothing.
    #[arg(long)]
    pub status: bool,
    /// With --wait: give up after DUR (e.g. 30s, 5m).
    #[arg(long, default_value = "10m")]
    pub timeout: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print the coordinator's rebalance status as JSON (the `rebalance` object of its health).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: RebalanceArgs) -> anyhow::Result<()> {
    let client = args.cluster.client()?;
    let rt = runtime()?;
    let timeout = parse_duration(&args.timeout).context("--timeout")?;
    let first = if args.status { rt.block_on(client.rebalance()) } else { rt.block_on(client.rebalance_request()) }
        .context("rebalance")?;
    if !args.wait {
        return print(&first, args.json);
    }
    let t0 = Instant::now();
    loop {
        let s = rt.block_on(client.rebalance()).context("rebalance")?;
        // Asked for a pass: one that started after the request. Only looking: whatever is due or running.
        let started = args.status || s.passes > first.passes;
        let over =
            !s.pending && matches!(s.state, RebalanceState::Done | RebalanceState::Failed | RebalanceState::Idle);
        if started && over {
            print(&s, args.json)?;
            if s.state == RebalanceState::Failed {
                bail!("the rebalance pass for membership generation {} failed", s.pass_generation);
            }
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            print(&s, args.json)?;
            bail!("timed out waiting for the rebalance ({timeout:?})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print(s: &RebalanceStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    let state = serde_json::to_value(s.state)?.as_str().unwrap_or_default().to_string();
    println!(
        "rebalance: {state}{} (membership generation {}, last pass for {}, {} pass(es)): {} object(s) moved ({}), \
         {} relocated between mountpaths; {}/{} target(s) done; {}",
        if s.pending { ", another pass due" } else { "" },
        s.membership_generation,
        s.pass_generation,
        s.passes,
        s.objects_moved,
        dsort::format_size(s.bytes_moved),
        s.objects_relocated,
        s.targets_done,
        s.targets,
        if s.auto { "automatic" } else { "manual" },
    );
    for e in &s.errors {
        println!("  error: {e}");
    }
    Ok(())
}
