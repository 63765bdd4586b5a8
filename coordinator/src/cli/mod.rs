//! The `dsort` command line: argument definitions (clap) and one handler per verb. `main.rs` only parses
//! and dispatches here, so every verb is testable as a library call.

pub mod demo;
pub mod gen_cmd;
pub mod inspect;
pub mod jobs;
pub mod objects;
pub mod progress;
pub mod rebalance;
pub mod reshard;
pub mod serve;
pub mod verify;

use clap::{Parser, Subcommand};

/// dsort: reshuffle, sort and re-cut datasets of tar shards (WebDataset style), on one machine or a cluster.
#[derive(Debug, Parser)]
#[command(name = "dsort", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the records of shards: each record with its entries and sizes, then a summary line.
    Inspect(inspect::InspectArgs),
    /// Generate synthetic WebDataset shards (deterministic for a seed).
    Gen(gen_cmd::GenArgs),
    /// Reshard offline: extract, sort (bounded memory, spilling), cut and create output shards.
    Reshard(reshard::ReshardArgs),
    /// Run the whole product on a built-in example: generate, reshard twice, verify both.
    Demo(demo::DemoArgs),
    /// Prove an output is an exact permutation of the input records, in the algorithm's order, cut by the rule.
    Verify(verify::VerifyArgs),
    /// Run a cluster process: `serve coordinator` or `serve target` (until SIGTERM / Ctrl-C).
    Serve(serve::ServeArgs),
    /// Upload local files (folders recursively) to a bucket of the cluster: LOCAL... ais://BUCKET/[PREFIX].
    Put(objects::PutArgs),
    /// Download an object of the cluster to a local file (atomically): ais://BUCKET/OBJECT LOCAL.
    Get(objects::GetArgs),
    /// List the objects of a bucket of the cluster (ais://BUCKET[/PREFIX]), or, without a bucket, the jobs.
    Ls(objects::LsArgs),
    /// Start a job on the cluster from a spec file (AIStore's JSON/YAML); prints the job id.
    Start(jobs::StartArgs),
    /// Show a job (per-phase progress with --refresh), or the jobs without an id.
    Show(jobs::ShowArgs),
    /// Abort a job on every target.
    Abort(jobs::IdArgs),
    /// Remove a finished (or aborted) job from the cluster's records.
    Rm(jobs::IdArgs),
    /// Wait for a job to end; fails when it was aborted or on --timeout.
    Wait(jobs::WaitArgs),
    /// Move objects to their owners after membership changes (start a pass, --wait for it, --status).
    Rebalance(rebalance::RebalanceArgs),
}

/// Run a parsed command line; the error is printed by `main`.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Gen(args) => gen_cmd::run(args),
        Command::Reshard(args) => reshard::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Put(args) => objects::put(args),
        Command::Get(args) => objects::get(args),
        Command::Ls(args) => objects::ls(args),
        Command::Start(args) => jobs::start(args),
        Command::Show(args) => jobs::show(args),
        Command::Abort(args) => jobs::abort(args),
        Command::Rm(args) => jobs::rm(args),
        Command::Wait(args) => jobs::wait(args),
        Command::Rebalance(args) => rebalance::run(args),
    }
}

/// Make Ctrl-C cancel the running job (which then removes its temp files) instead of killing the process.
pub fn on_ctrl_c(cancel: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let first = std::sync::atomic::AtomicBool::new(true);
    let _ = ctrlc::set_handler(move || {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("dsort: interrupted: stopping and removing temp files (Ctrl-C again to kill)");
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    });
}
