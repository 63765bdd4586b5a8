//! `dsort inspect`: what is inside shards, record by record.

use anyhow::bail;
use serde::Serialize;
use shardio::ShardIndex;
use std::io::{self, Write};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Shard files (.tar, .tgz, .tar.gz, .tar.zst, .tar.lz4, .zip).
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct JsonEntry<'a> {
    name: &'a str,
    size: u64,
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    name: &'a str,
    entries: Vec<JsonEntry<'a>>,
}

#[derive(Serialize)]
struct JsonShard<'a> {
    path: String,
    format: &'static str,
    records: Vec<JsonRecord<'a>>,
}

#[derive(Serialize)]
struct JsonDoc<'a> {
    shards: Vec<JsonShard<'a>>,
    records: u64,
    entries: u64,
    bytes: u64,
}

/// Totals over all shards inspected.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub shards: u64,
    pub records: u64,
    pub entries: u64,
    pub bytes: u64,
}

impl Totals {
    fn add(&mut self, idx: &ShardIndex) {
        self.shards += 1;
        self.records += idx.records.len() as u64;
        self.entries += idx.entry_count() as u64;
        self.bytes += idx.content_bytes();
    }
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let mut indexes = Vec::with_capacity(args.shards.len());
    let mut failed = 0;
    for path in &args.shards {
        match shardio::index_file(path) {
            Ok(idx) => {
                for d in &idx.duplicates {
                    eprintln!(
                        "warning: shard {:?}: entry {:?} repeated at offset {} (first at {}); the repeat is ignored",
                        idx.shard, d.name, d.offset, d.first_offset
                    );
                }
                indexes.push(idx);
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut totals = Totals::default();
    for idx in &indexes {
        totals.add(idx);
    }
    let written =
        if args.json { write_json(&mut out, &indexes, totals) } else { write_text(&mut out, &indexes, totals) };
    match written.and_then(|_| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if failed > 0 {
        bail!("{failed} of {} shards could not be read", args.shards.len());
    }
    Ok(())
}

fn write_text(out: &mut impl Write, indexes: &[ShardIndex], t: Totals) -> io::Result<()> {
    for idx in indexes {
        writeln!(out, "{} ({}): {} records", idx.shard, idx.format, idx.records.len())?;
        for r in &idx.records {
            write!(out, "  {}:", r.name)?;
            for e in &r.entries {
                write!(out, " {} {}", e.name, e.size)?;
            }
            writeln!(out)?;
        }
    }
    writeln!(out, "shards={} records={} entries={} bytes={}", t.shards, t.records, t.entries, t.bytes)
}

fn write_json(out: &mut impl Write, indexes: &[ShardIndex], t: Totals) -> io::Result<()> {
    let doc = JsonDoc {
        shards: indexes
            .iter()
            .map(|idx| JsonShard {
                path: idx.shard.clone(),
                format: idx.format.name(),
                records: idx
                    .records
                    .iter()
                    .map(|r| JsonRecord {
                        name: &r.name,
                        entries: r.entries.iter().map(|e| JsonEntry { name: &e.name, size: e.size }).collect(),
                    })
                    .collect(),
            })
            .collect(),
        records: t.records,
        entries: t.entries,
        bytes: t.bytes,
    };
    serde_json::to_writer(&mut *out, &doc).map_err(io::Error::other)?;
    writeln!(out)
}
