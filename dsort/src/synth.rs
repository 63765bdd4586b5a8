//! Synthetic WebDataset shards for demos, tests and benchmarks: deterministic for a seed, random hex
//! record names (so input order is not key order), `.cls` entries holding an integer class as text, and
//! incompressible payloads whose record sizes are spread over a range.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use shardio::{EntrySource, Format, PendingObject, ShardWriter, TarFlavor, WriteOptions};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::template::{Template, TemplateError, with_extension};

/// Number of classes written into `.cls` entries (0..NUM_CLASSES).
pub const NUM_CLASSES: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("--output: {0}")]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Shard(#[from] shardio::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenSpec {
    /// Output template, e.g. `out/shard-{000..099}.tar`; the extension picks the format (`.tar` when none).
    pub output: String,
    pub records_per_shard: u64,
    /// Record size range in bytes (sum of a record's entries), inclusive.
    pub record_size: (u64, u64),
    /// Entry extensions of every record, e.g. `[".jpg", ".cls", ".json"]`.
    pub exts: Vec<String>,
    pub tar_flavor: TarFlavor,
    pub seed: u64,
    /// Shards written at once.
    pub concurrency: usize,
}

/// What was generated.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenSummary {
    pub shards: u64,
    pub records: u64,
    pub entries: u64,
    pub bytes: u64,
}

impl GenSpec {
    /// The output paths, in template order, each with its format.
    pub fn outputs(&self) -> Result<Vec<(PathBuf, Format)>, GenError> {
        let tpl = Template::parse(&self.output)?;
        let names = tpl.expand_input()?;
        names
            .into_iter()
            .map(|n| {
                let n = with_extension(&n, ".tar");
                let f = Format::from_name(&n)
                    .ok_or_else(|| GenError::Invalid(format!("--output: {n:?} has no known archive extension")))?;
                Ok((PathBuf::from(n), f))
            })
            .collect()
    }

    fn validate(&self) -> Result<(), GenError> {
        if self.records_per_shard == 0 {
            return Err(GenError::Invalid("--records-per-shard must be at least 1".into()));
        }
        if self.record_size.0 > self.record_size.1 {
            return Err(GenError::Invalid("--record-size: minimum is above maximum".into()));
        }
        if self.exts.is_empty() {
            return Err(GenError::Invalid("--exts: at least one extension is needed".into()));
        }
        for e in &self.exts {
            if !e.starts_with('.') || e.len() < 2 || e.contains('/') {
                return Err(GenError::Invalid(format!("--exts: {e:?} must look like .jpg")));
            }
        }
        let mut sorted = self.exts.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.exts.len() {
            return Err(GenError::Invalid("--exts: an extension is repeated".into()));
        }
        Ok(())
    }
}

/// Generate every shard of `spec` (atomically published), `concurrency` at a time.
pub fn generate(spec: &GenSpec) -> Result<GenSummary, GenError> {
    spec.validate()?;
    let outputs = spec.outputs()?;
    let total = Mutex::new(GenSummary::default());
    crate::parallel::try_for_each(spec.concurrency, &outputs, |i, (path, format)| -> Result<(), GenError> {
        let s = write_shard(spec, i as u64, path, *format)?;
        let mut t = lock(&total);
        t.shards += 1;
        t.records += s.records;
        t.entries += s.entries;
        t.bytes += s.bytes;
        Ok(())
    })?;
    Ok(lock(&total).clone())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_shard(spec: &GenSpec, index: u64, path: &std::path::Path, format: Format) -> Result<GenSummary, GenError> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    rng.set_stream(index);
    let mut pending = PendingObject::create(path.to_path_buf())?;
    let shard = path.display().to_string();
    let opts = WriteOptions { tar_flavor: spec.tar_flavor, ..WriteOptions::default() };
    let mut summary = GenSummary { shards: 1, ..GenSummary::default() };
    {
        let mut w = ShardWriter::new(&shard, format, pending.file(), opts)?;
        let mut buf = Vec::new();
        let payload_exts: Vec<&String> = spec.exts.iter().filter(|e| e.as_str() != ".cls").collect();
        for _ in 0..spec.records_per_shard {
            let name = format!("{:016x}", rng.next_u64());
            let (lo, hi) = spec.record_size;
            let size = lo + rng.next_u64() % (hi - lo + 1);
            let class = rng.next_u64() % NUM_CLASSES;
            let cls = class.to_string();
            let payload_total =
                if spec.exts.iter().any(|e| e == ".cls") { size.saturating_sub(cls.len() as u64) } else { size };
            let n = payload_exts.len() as u64;
            for (k, ext) in spec.exts.iter().enumerate() {
                let entry = format!("{name}{ext}");
                if ext == ".cls" {
                    w.append(&entry, cls.len() as u64, EntrySource::Bytes(cls.as_bytes()))?;
                    summary.bytes += cls.len() as u64;
                } else {
                    let pos = payload_exts.iter().position(|e| *e == ext).unwrap_or(k) as u64;
                    // Split the payload evenly; the first entries take the remainder.
                    let len = payload_total / n + u64::from(pos < payload_total % n);
                    buf.resize(len as usize, 0);
                    rng.fill_bytes(&mut buf);
                    w.append(&entry, len, EntrySource::Bytes(&buf))?;
                    summary.bytes += len;
                }
                summary.entries += 1;
            }
            summary.records += 1;
        }
        w.finish()?;
    }
    pending.commit()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &std::path::Path, ext: &str) -> GenSpec {
        GenSpec {
            output: format!("{}/s-{{0..2}}{ext}", dir.display()),
            records_per_shard: 5,
            record_size: (100, 2000),
            exts: vec![".jpg".into(), ".cls".into()],
            tar_flavor: TarFlavor::Pax,
            seed: 7,
            concurrency: 2,
        }
    }

    #[test]
    fn deterministic_for_a_seed_and_sizes_in_range() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = generate(&spec(a.path(), ".tar")).unwrap();
        let sb = generate(&spec(b.path(), ".tar")).unwrap();
        assert_eq!(sa, sb);
        assert_eq!((sa.shards, sa.records, sa.entries), (3, 15, 30));
        for i in 0..3 {
            let fa = std::fs::read(a.path().join(format!("s-{i}.tar"))).unwrap();
            let fb = std::fs::read(b.path().join(format!("s-{i}.tar"))).unwrap();
            assert_eq!(fa, fb, "shard {i} differs between runs");
            let idx = shardio::index_file(&a.path().join(format!("s-{i}.tar"))).unwrap();
            for r in &idx.records {
                assert!((100..=2000).contains(&r.size()), "record size {} out of range", r.size());
                let cls = r.entry_with_ext(".cls").unwrap();
                assert!(cls.size <= 3);
            }
        }
    }

    #[test]
    fn refuses_bad_specs() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec(d.path(), ".tar");
        s.exts = vec!["jpg".into()];
        assert!(generate(&s).unwrap_err().to_string().contains("--exts"));
        let mut s = spec(d.path(), ".tar");
        s.record_size = (10, 5);
        assert!(generate(&s).is_err());
    }
}
