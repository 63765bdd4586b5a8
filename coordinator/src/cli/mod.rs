//! The `dsort` command line: argument definitions (clap) and one handler per verb. `main.rs` only parses
//! and dispatches here, so every verb is testable as a library call.

pub mod gen_cmd;
pub mod inspect;

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
}

/// Run a parsed command line; the error is printed by `main`.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Gen(args) => gen_cmd::run(args),
    }
}
