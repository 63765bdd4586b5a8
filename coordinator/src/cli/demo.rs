//! `dsort demo`: the whole product on a built-in example. Generates a small WebDataset in a temporary
//! folder, reshards it twice (a seeded shuffle into plain tars, a content sort by class into .tar.gz),
//! verifies both outputs independently and prints the summaries.

use super::{Cli, Command};
use anyhow::{Context, bail};
use clap::Parser;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the demo folder instead of removing it at the end.
    #[arg(long)]
    pub keep: bool,
    /// Records in each of the 8 input shards.
    #[arg(long, default_value_t = 250)]
    pub records_per_shard: u64,
}

fn step(title: &str, argv: &[&str]) -> anyhow::Result<()> {
    let shown: Vec<String> =
        argv.iter().map(|a| if a.contains(['{', ' ', '*']) { format!("'{a}'") } else { a.to_string() }).collect();
    println!("\n== {title}\n$ dsort {}", shown.join(" "));
    let cli = Cli::try_parse_from(std::iter::once("dsort").chain(argv.iter().copied()))
        .with_context(|| format!("demo step {title:?}"))?;
    if matches!(cli.command, Command::Demo(_)) {
        bail!("demo cannot run itself");
    }
    super::run(cli)
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("dsort-demo-").tempdir().context("demo folder")?;
    let root = dir.path().display().to_string();
    let input = format!("{root}/input/shard-{{000..007}}.tar");
    let shuffled = format!("{root}/shuffled/shuffled-{{0000..9999}}.tar");
    let by_class = format!("{root}/by-class/class-sorted-{{0000..9999}}.tar.gz");
    let records = args.records_per_shard.to_string();
    println!("dsort demo in {root}");
    step(
        "generate 8 WebDataset shards (.jpg + .cls + .json records, random names)",
        &[
            "gen",
            "--output",
            &input,
            "--records-per-shard",
            &records,
            "--record-size",
            "4KiB..64KiB",
            "--exts",
            ".jpg,.cls,.json",
            "--seed",
            "7",
        ],
    )?;
    let shuffle =
        ["--input", &input, "--output", &shuffled, "--algorithm", "shuffle", "--seed", "42", "--shard-size", "4MiB"];
    step("reshard: shuffle with seed 42 into shards of at least 4 MiB", &[&["reshard"][..], &shuffle].concat())?;
    step("verify the shuffled output independently", &[&["verify"][..], &shuffle].concat())?;
    let content = [
        "--input",
        &input,
        "--output",
        &by_class,
        "--algorithm",
        "content",
        "--key-ext",
        ".cls",
        "--key-type",
        "int",
        "--shard-records",
        "200",
    ];
    step(
        "reshard: sort by the class in each record's .cls entry, 200 records per .tar.gz",
        &[&["reshard"][..], &content].concat(),
    )?;
    step("verify the class-sorted output independently", &[&["verify"][..], &content].concat())?;
    if args.keep {
        let kept = dir.keep();
        println!("\ndemo folder kept: {}", kept.display());
    } else {
        println!("\ndemo done; folder removed (use --keep to look at it)");
    }
    Ok(())
}
