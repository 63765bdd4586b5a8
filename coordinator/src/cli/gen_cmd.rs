//! `dsort gen`: synthetic WebDataset shards.

use dsort::synth::{GenSpec, generate};
use shardio::TarFlavor;
use std::time::Instant;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TarFormatArg {
    Gnu,
    Pax,
    Ustar,
}

impl From<TarFormatArg> for TarFlavor {
    fn from(a: TarFormatArg) -> Self {
        match a {
            TarFormatArg::Gnu => TarFlavor::Gnu,
            TarFormatArg::Pax => TarFlavor::Pax,
            TarFormatArg::Ustar => TarFlavor::Ustar,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct GenArgs {
    /// Output template; its extension picks the format, e.g. 'out/shard-{000..099}.tar'.
    #[arg(long)]
    pub output: String,
    /// Records in each shard.
    #[arg(long)]
    pub records_per_shard: u64,
    /// Record size or range (sum of its entries), e.g. 10KiB or 10KiB..100KiB.
    #[arg(long, default_value = "10KiB..100KiB")]
    pub record_size: String,
    /// Entry extensions of every record; `.cls` holds an integer class as text.
    #[arg(long, default_value = ".jpg,.cls", value_delimiter = ',')]
    pub exts: Vec<String>,
    /// Tar header flavour (tar outputs).
    #[arg(long, value_enum, default_value = "pax")]
    pub tar_format: TarFormatArg,
    /// Seed: the same seed gives byte-identical shards.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shards written at once (default: number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenArgs) -> anyhow::Result<()> {
    let record_size = dsort::parse_size_range(&args.record_size).map_err(|e| anyhow::anyhow!("--record-size: {e}"))?;
    let spec = GenSpec {
        output: args.output,
        records_per_shard: args.records_per_shard,
        record_size,
        exts: args.exts.iter().map(|e| e.trim().to_string()).collect(),
        tar_flavor: args.tar_format.into(),
        seed: args.seed,
        concurrency: args
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    };
    let start = Instant::now();
    let s = generate(&spec)?;
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
    } else {
        println!(
            "generated shards={} records={} entries={} bytes={} in {:.2}s ({:.1} MB/s)",
            s.shards,
            s.records,
            s.entries,
            s.bytes,
            secs,
            s.bytes as f64 / 1e6 / secs.max(1e-9)
        );
    }
    Ok(())
}
