//! The distributed order (design §4), as a library: how targets that each hold part of a dataset produce
//! exactly the output a single machine would, without any node holding all record metadata.
//!
//! 1. Each target extracts the input shards it owns and sorts their metadata locally (spilling under its
//!    budget), keeping a small sample of its records.
//! 2. The samples give `targets - 1` splitters ([`pick_splitters`]); target `r` owns the key range between
//!    splitters `r-1` and `r` ([`range_of`]) and receives that range's metadata from every target.
//! 3. Ranges are cut in range order with the open shard carried from one range to the next ([`Carry`]),
//!    so the cut equals a single-machine cut whatever the splitters: they only balance the work.
//! 4. Each output shard's records (in order, possibly from two adjacent ranges) go to its creator.
//!
//! [`simulate`] runs all of it inside one process (targets are threads of work over one filesystem); the
//! cluster runs the same steps with the messages sent over HTTP. Tests compare both with `run_job`.

use crate::create::{CreateCtx, Cut, Sources, write_shard};
use crate::extract::{Decoded, ExtractCtx};
use crate::extsort::{ExternalSorter, SortError};
use crate::job::{JobEnv, JobError, JobSummary, cut_rule, extract_shards, job_temp_dir, plan_job};
use crate::key::{RecordCodec, RecordItem};
use crate::memory::{MemoryPool, budget, try_detect_memory_limit};
use crate::progress::Phase;
use crate::spec::JobSpec;
use shardio::WriteOptions;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Records each target samples for choosing splitters, whatever the number of targets: the coordinator sorts
/// `SAMPLES_PER_TARGET · N` keys (O(N log N) as targets grow, not the O(N² log N) of a per-range sample), and
/// each of the N ranges still gets about this many weighted samples, so range sizes stay within a few percent.
pub const SAMPLES_PER_TARGET: usize = 256;

/// The state of the cut at a range boundary: the output shard the next record goes into, and what that
/// shard already holds (0/0 when it is new).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carry {
    pub shard: u64,
    pub bytes: u64,
    pub records: u64,
}

impl Carry {
    /// Place one record of `size` bytes: returns its output shard index and advances the cut exactly as
    /// the single-machine cutter does (a shard closes as soon as it reaches the rule).
    pub fn place(&mut self, cut: &Cut, size: u64) -> u64 {
        let shard = self.shard;
        self.bytes += size;
        self.records += 1;
        if cut.closes(self.bytes, self.records) {
            *self = Carry { shard: shard + 1, bytes: 0, records: 0 };
        }
        shard
    }
}

/// A fixed-size uniform sample of a stream (reservoir), deterministic for a seed. Only names and keys
/// are kept (entries are dropped), so a sample is small.
pub struct Reservoir {
    capacity: usize,
    seen: u64,
    state: u64,
    items: Vec<RecordItem>,
}

impl Reservoir {
    pub fn new(capacity: usize, seed: u64) -> Self {
        Reservoir { capacity: capacity.max(1), seen: 0, state: seed | 1, items: Vec::new() }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: good enough to sample, identical everywhere.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn offer(&mut self, item: &RecordItem) {
        self.seen += 1;
        let slot = if self.items.len() < self.capacity {
            None
        } else {
            let j = self.next() % self.seen;
            if (j as usize) < self.capacity { Some(j as usize) } else { return }
        };
        let light =
            RecordItem { key: item.key.clone(), shard: item.shard, name: item.name.clone(), entries: Vec::new() };
        match slot {
            None => self.items.push(light),
            Some(j) => self.items[j] = light,
        }
    }

    /// (sampled records, records seen).
    pub fn into_parts(self) -> (Vec<RecordItem>, u64) {
        (self.items, self.seen)
    }
}

/// Choose `ranges - 1` splitters from every target's sample, each sampled record weighted by how many
/// records it stands for, so that ranges hold about equal numbers of records.
pub fn pick_splitters(codec: &RecordCodec, samples: Vec<(Vec<RecordItem>, u64)>, ranges: usize) -> Vec<RecordItem> {
    let mut weighted: Vec<(RecordItem, f64)> = Vec::new();
    for (items, seen) in samples {
        if items.is_empty() {
            continue;
        }
        let w = seen as f64 / items.len() as f64;
        weighted.extend(items.into_iter().map(|i| (i, w)));
    }
    weighted.sort_by(|a, b| codec.compare(&a.0, &b.0));
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    let mut splitters = Vec::with_capacity(ranges.saturating_sub(1));
    let mut acc = 0.0;
    let mut next = 1;
    for (item, w) in weighted {
        acc += w;
        while next < ranges && acc >= total * next as f64 / ranges as f64 {
            splitters.push(item.clone());
            next += 1;
        }
    }
    splitters.dedup_by(|a, b| codec.compare(a, b) == Ordering::Equal);
    splitters
}

/// The range a record belongs to: the number of splitters at or below it.
pub fn range_of(codec: &RecordCodec, splitters: &[RecordItem], item: &RecordItem) -> usize {
    splitters.partition_point(|s| codec.compare(s, item) != Ordering::Greater)
}

/// Step 1 on one target: extract the input shards it owns (`owned`) into its local sorter, sampling every
/// record for the splitters. Returns the extraction totals, the decoded copies, the sorter and the sample.
#[allow(clippy::type_complexity)]
pub fn extract_local(
    ectx: &ExtractCtx<'_>,
    owned: &[u32],
    workers: usize,
    cancel: &std::sync::atomic::AtomicBool,
    progress: &dyn crate::progress::Progress,
    sorter: ExternalSorter<RecordCodec>,
    sample: Reservoir,
) -> Result<(JobSummary, Vec<Option<Decoded>>, ExternalSorter<RecordCodec>, Reservoir), JobError> {
    let sorter = Mutex::new(sorter);
    let sample = Mutex::new(sample);
    let push = |records: Vec<RecordItem>| {
        let mut s = sample.lock().unwrap_or_else(|p| p.into_inner());
        records.iter().for_each(|r| s.offer(r));
        drop(s);
        let mut sorter = sorter.lock().unwrap_or_else(|p| p.into_inner());
        records.into_iter().try_for_each(|r| sorter.push(r))
    };
    let (totals, decoded) = extract_shards(ectx, owned, workers, cancel, progress, &push)?;
    Ok((
        totals,
        decoded,
        sorter.into_inner().unwrap_or_else(|p| p.into_inner()),
        sample.into_inner().unwrap_or_else(|p| p.into_inner()),
    ))
}

/// Run a job as `targets` targets would, inside this process: each target extracts the input shards it
/// owns (by `owner`), sorts them locally, sends samples; splitters cut the order into ranges; each range
/// is sorted where it lands and cut with the carry of the previous ranges; shards are then created.
/// Output is byte-identical to [`crate::job::run_job`]. External key maps are not distributed yet.
pub fn simulate(
    spec: &JobSpec,
    env: &JobEnv,
    targets: usize,
    owner: &(dyn Fn(&str, usize) -> usize + Sync),
) -> Result<JobSummary, JobError> {
    let started = Instant::now();
    let targets = targets.max(1);
    let warnings = crate::job::Warnings::default();
    let warn = |m: String| {
        env.progress.warn(&m);
        warnings.push(m);
    };
    let plan = plan_job(spec, env, &warn)?;
    if plan.ekm.is_some() {
        return Err(JobError::Refused("external key maps are not distributed yet".into()));
    }
    let objects = plan.objects.clone();
    let codec = Arc::new(RecordCodec::new(objects.clone(), spec.algorithm.decreasing));
    let limit = try_detect_memory_limit().map_err(|e| JobError::Refused(e.to_string()))?;
    let per_target = (budget(&limit, &spec.max_mem_usage) / targets as u64).max(1 << 20);
    let tmp = job_temp_dir(env)?;
    let workers = if env.concurrency == 0 { 2 } else { env.concurrency };
    let sort_err = |e: SortError| match e {
        SortError::Cancelled => JobError::Cancelled,
        e => JobError::Failed(format!("sorting record metadata: {e}")),
    };

    // 1. Local extraction and sort on every target.
    let pools: Vec<Arc<MemoryPool>> = (0..targets).map(|_| MemoryPool::new(per_target)).collect();
    let mut local = Vec::with_capacity(targets);
    let mut decoded_all: Vec<Option<Decoded>> = (0..objects.len()).map(|_| None).collect();
    let mut summary = JobSummary::default();
    for (t, pool) in pools.iter().enumerate() {
        let owned: Vec<u32> =
            (0..objects.len() as u32).filter(|&i| owner(&objects[i as usize], targets) == t).collect();
        let dir = tmp.path().join(format!("target-{t}"));
        std::fs::create_dir_all(&dir).map_err(|e| JobError::Failed(format!("{}: {e}", dir.display())))?;
        let ectx = ExtractCtx {
            objects: &objects,
            bucket: env.input.as_ref(),
            input_format: spec.input_extension,
            algorithm: &plan.algorithm,
            pool,
            spill_dir: &dir,
            reactions: spec.reactions,
            warn: &warn,
        };
        let (totals, decoded, sorter, sample) = extract_local(
            &ectx,
            &owned,
            workers,
            &env.cancel,
            env.progress.as_ref(),
            ExternalSorter::new(codec.clone(), pool.reservation("local metadata"), dir.clone(), env.cancel.clone()),
            Reservoir::new(SAMPLES_PER_TARGET, t as u64 + 1),
        )?;
        for (i, d) in decoded.into_iter().enumerate() {
            if d.is_some() {
                decoded_all[i] = d;
            }
        }
        summary.input_shards += totals.input_shards;
        summary.skipped_shards += totals.skipped_shards;
        summary.records += totals.records;
        summary.entries += totals.entries;
        summary.bytes += totals.bytes;
        summary.input_file_bytes += totals.input_file_bytes;
        summary.spilled_bytes += totals.spilled_bytes;
        local.push((sorter, sample));
    }

    // 2. Splitters from the samples; every target sends each range its part, in order.
    let (sorters, samples): (Vec<_>, Vec<_>) = local.into_iter().map(|(s, r)| (s, r.into_parts())).unzip();
    let splitters = pick_splitters(&codec, samples, targets);
    let mut range_sorters: Vec<ExternalSorter<RecordCodec>> = (0..targets)
        .map(|r| {
            let dir = tmp.path().join(format!("range-{r}"));
            let _ = std::fs::create_dir_all(&dir);
            ExternalSorter::new(codec.clone(), pools[r].reservation("range metadata"), dir, env.cancel.clone())
        })
        .collect();
    for sorter in sorters {
        let (sorted, stats) = sorter.finish().map_err(sort_err)?;
        summary.spilled_bytes += stats.spilled_bytes;
        summary.sort_runs += stats.runs;
        // What a target sends each range is in order: one sorted run per (target, range), merged, not re-sorted.
        let mut runs =
            range_sorters.iter().map(ExternalSorter::run_writer).collect::<Result<Vec<_>, _>>().map_err(sort_err)?;
        for item in sorted {
            let item = item.map_err(sort_err)?;
            let r = range_of(&codec, &splitters, &item);
            runs[r].push(item).map_err(sort_err)?;
        }
        for (r, run) in runs.into_iter().enumerate() {
            range_sorters[r].add_run(run.into_run().map_err(sort_err)?);
        }
    }

    // 3. Cut range by range with the carry; 4. create each shard from its records in order.
    let cut = cut_rule(spec, &plan.groups, summary.bytes);
    let mut carry = Carry::default();
    let mut shards: BTreeMap<u64, Vec<RecordItem>> = BTreeMap::new();
    for sorter in range_sorters {
        let (sorted, stats) = sorter.finish().map_err(sort_err)?;
        summary.spilled_bytes += stats.spilled_bytes;
        summary.sort_runs += stats.runs;
        for item in sorted {
            let item = item.map_err(sort_err)?;
            let shard = carry.place(&cut, item.size());
            shards.entry(shard).or_default().push(item);
        }
    }
    let sources = Sources::new(env.input.clone(), objects.clone(), decoded_all);
    let pool = MemoryPool::new(per_target);
    let on_shard = |_: &str, bytes: u64| env.progress.advance(Phase::Create, bytes);
    let cctx = CreateCtx {
        sources: &sources,
        out: env.output.as_ref(),
        staging: tmp.path(),
        format: spec.output_extension,
        options: WriteOptions { tar_flavor: env.tar_flavor, ..WriteOptions::default() },
        dry_run: spec.dry_run,
        concurrency: 1,
        pool: &pool,
        cancel: &env.cancel,
        on_shard: &on_shard,
    };
    let group = plan.groups.first().ok_or_else(|| JobError::Refused("no output template".into()))?;
    for (index, items) in shards {
        let name = group.name_at(index).map_err(JobError::Failed)?;
        let (_, _, out) = write_shard(&cctx, &name, items).map_err(JobError::Failed)?;
        summary.output_shards += 1;
        summary.output_file_bytes += out;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.seed = plan.seed;
    summary.dry_run = spec.dry_run;
    summary.warnings = warnings.into_list();
    drop(sources);
    drop(tmp);
    Ok(summary)
}

/// Rendezvous (highest-random-weight) owner among `n` targets numbered 0..n: the placement `simulate`
/// uses when no cluster is around.
pub fn hrw_index(name: &str, n: usize) -> usize {
    (0..n)
        .max_by_key(|&t| xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), t as u64 ^ 0x9E37_79B9_7F4A_7C15))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::tests::{files, test_env as env};
    use crate::key::Key;
    use crate::spec::parse_spec;
    use crate::synth::{GenSpec, generate};

    #[test]
    fn distributed_output_is_byte_identical_to_one_machine() {
        let root = tempfile::tempdir().unwrap();
        for ext in [".tar", ".tar.gz"] {
            let input = root.path().join(format!("in{ext}"));
            generate(&GenSpec {
                output: format!("{}/s-{{0..5}}{ext}", input.display()),
                records_per_shard: 40,
                record_size: (100, 3000),
                exts: vec![".jpg".into(), ".cls".into()],
                tar_flavor: shardio::TarFlavor::Pax,
                seed: 9,
                concurrency: 2,
            })
            .unwrap();
            let names: Vec<String> = (0..6).map(|i| format!("s-{i}{ext}")).collect();
            for (k, alg) in [
                serde_json::json!({"kind": "alphanumeric"}),
                serde_json::json!({"kind": "shuffle", "seed": "3"}),
                serde_json::json!({"kind": "content", "extension": ".cls", "content_key_type": "int", "decreasing": true}),
                serde_json::json!({"kind": "none"}),
            ]
            .into_iter()
            .enumerate()
            {
                let spec = serde_json::json!({
                    "input_bck": {"name": "in"}, "input_format": {"objnames": names},
                    "output_format": "o-{000..999}.tar", "output_shard_size": "7KiB", "algorithm": alg,
                });
                let spec = parse_spec(&spec.to_string(), true).unwrap().spec;
                let one = root.path().join(format!("one-{k}{ext}"));
                let tmp = root.path().join("tmp");
                crate::job::run_job(&spec, &env(&input, &one, &tmp)).unwrap();
                let expected = files(&one);
                assert!(expected.len() > 5, "enough output shards to cross ranges");
                for n in [1, 2, 3, 5] {
                    let out = root.path().join(format!("dist-{k}-{n}{ext}"));
                    let s = simulate(&spec, &env(&input, &out, &tmp), n, &hrw_index).unwrap();
                    assert_eq!(s.records, 240);
                    assert_eq!(files(&out), expected, "{ext} algorithm {k} on {n} targets differs from one machine");
                }
                assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "temp folders removed");
            }
        }
    }

    #[test]
    fn carry_places_records_like_the_single_cutter() {
        let cut = Cut::Size(10);
        let sizes = [4u64, 4, 4, 20, 1, 9, 3];
        let mut whole = Carry::default();
        let all: Vec<u64> = sizes.iter().map(|&s| whole.place(&cut, s)).collect();
        assert_eq!(all, [0, 0, 0, 1, 2, 2, 3]);
        // Split anywhere: the carry reproduces the same placement.
        for split in 0..sizes.len() {
            let mut c = Carry::default();
            let mut got: Vec<u64> = sizes[..split].iter().map(|&s| c.place(&cut, s)).collect();
            let carried = c;
            let mut c2 = carried;
            got.extend(sizes[split..].iter().map(|&s| c2.place(&cut, s)));
            assert_eq!(got, all, "split at {split}");
        }
    }

    #[test]
    fn splitters_balance_ranges_and_route_in_order() {
        let codec = RecordCodec::new(Arc::new(vec!["a.tar".into()]), false);
        let item = |i: u64| RecordItem { key: Key::Seq(i), shard: 0, name: format!("{i:06}"), entries: Vec::new() };
        // Three targets saw disjoint, uneven slices of 0..9000.
        let mut samples = Vec::new();
        for (lo, hi) in [(0u64, 1000u64), (1000, 7000), (7000, 9000)] {
            let mut r = Reservoir::new(SAMPLES_PER_TARGET, lo + 1);
            (lo..hi).for_each(|i| r.offer(&item(i)));
            samples.push(r.into_parts());
        }
        let splitters = pick_splitters(&codec, samples, 4);
        assert_eq!(splitters.len(), 3);
        let mut counts = [0u64; 4];
        let mut last = 0;
        for i in 0..9000 {
            let r = range_of(&codec, &splitters, &item(i));
            assert!(r >= last, "ranges follow the order");
            last = r;
            counts[r] += 1;
        }
        for c in counts {
            assert!((1500..=3000).contains(&c), "unbalanced ranges: {counts:?}");
        }
    }

    #[test]
    fn a_fixed_sample_per_target_balances_many_ranges() {
        // 64 targets holding from 1,000 to 64,000 records each, interleaved in key order: the coordinator gets
        // SAMPLES_PER_TARGET keys from each (not 64 per range), and every one of the 64 ranges is within 25% of
        // the mean.
        let codec = RecordCodec::new(Arc::new(vec!["a.tar".into()]), false);
        let item = |i: u64| RecordItem { key: Key::Seq(i), shard: 0, name: String::new(), entries: Vec::new() };
        let targets = 64u64;
        let mut samples = Vec::new();
        let mut all = Vec::new();
        for t in 0..targets {
            let n = 1000 * (t + 1);
            let mut r = Reservoir::new(SAMPLES_PER_TARGET, t + 1);
            for j in 0..n {
                let k = j * targets * 7 + t; // each target's keys spread over the whole key space
                r.offer(&item(k));
                all.push(k);
            }
            samples.push(r.into_parts());
        }
        assert_eq!(samples.iter().map(|(s, _)| s.len()).sum::<usize>(), SAMPLES_PER_TARGET * targets as usize);
        let splitters = pick_splitters(&codec, samples, targets as usize);
        let mut counts = vec![0u64; targets as usize];
        for k in &all {
            counts[range_of(&codec, &splitters, &item(*k))] += 1;
        }
        let mean = all.len() as f64 / targets as f64;
        for (r, c) in counts.iter().enumerate() {
            assert!((*c as f64 - mean).abs() < 0.25 * mean, "range {r}: {c} records, mean {mean}: {counts:?}");
        }
    }
}
