//! Record metadata at rest (issue #13, compact record metadata): bytes per record in memory and in spill
//! runs, the engine's sorter against what the records cost as `RecordItem`s (the form the sorter buffered
//! before), in one run. Records: two entries (`.jpg` 10..100 KiB, `.cls` 1..3 B), 20-byte hex names,
//! 1000 per input shard, at their offsets in an uncompressed tar.
//!
//! Usage: `metadata_bench [RECORDS (default 2000000)] [SPILL_BUDGET_MIB (default 64)]`.
//! Memory is measured two ways: the pool's charge (what the budget pays) and the live heap counted by
//! this binary's allocator. Spill is the bytes of the level-0 runs on disk over the records.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use dsort::extsort::ExternalSorter;
use dsort::key::{ItemEntry, Key, Loc, RecordCodec, RecordItem, shuffle_key};
use dsort::memory::MemoryPool;
use rayon::slice::ParallelSliceMut;

/// Counts live heap bytes (requested sizes).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const RECORDS_PER_SHARD: u64 = 1000;

#[derive(Clone, Copy, PartialEq)]
enum Order {
    Shuffle,
    Alphanumeric,
}

/// Record `i`, deterministic: a 20-character hex name, `.jpg` + `.cls` at their tar offsets.
fn record(i: u64, order: Order, objects: &[String]) -> RecordItem {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 29;
    let name = format!("{:016x}{:04x}", x, i % 0xffff);
    let shard = (i / RECORDS_PER_SHARD) as u32;
    let jpg = 10_240 + x % 92_160;
    let at = (i % RECORDS_PER_SHARD) * (512 + 55 * 1024 + 1024);
    let entries = vec![
        ItemEntry { name: format!("{name}.jpg"), size: jpg, loc: Loc::Input(at + 512) },
        ItemEntry {
            name: format!("{name}.cls"),
            size: 1 + x % 3,
            loc: Loc::Input(at + 1024 + jpg.next_multiple_of(512)),
        },
    ];
    let key = match order {
        Order::Shuffle => shuffle_key(&objects[shard as usize], &name, 7),
        Order::Alphanumeric => Key::Bytes(entries[0].name.clone().into_bytes()),
    };
    RecordItem { key, shard, name, entries }
}

/// The size a record had in the spill format before compact metadata: fixed `u64` lengths, whole entry
/// names, a `u32` shard and a `u32` frame length (that format: `4 + tag + key + shard + name + count +
/// per entry name + size + loc tag + offset`).
fn old_spill_len(r: &RecordItem) -> usize {
    let key = match &r.key {
        Key::Bytes(b) => 8 + b.len(),
        _ => 8,
    };
    4 + 1 + key + 4 + 8 + r.name.len() + 8 + r.entries.iter().map(|e| 8 + e.name.len() + 8 + 1 + 8).sum::<usize>()
}

struct Figures {
    old_charge: f64,
    old_heap: f64,
    old_spill: f64,
    new_charge: f64,
    new_heap: f64,
    run_charge: f64,
    new_spill: f64,
    grown: f64,
    runs: u64,
    sort_s: f64,
    old_sort_s: f64,
    decode_s: f64,
}

fn measure(n: u64, order: Order, spill_budget: u64) -> Figures {
    let shards = n.div_ceil(RECORDS_PER_SHARD);
    let objects: Arc<Vec<String>> = Arc::new((0..shards).map(|s| format!("train/shard-{s:06}.tar")).collect());

    // Before: the records as the sorter buffered them (a Vec of RecordItem), charged by `mem_size`.
    let before = LIVE.load(Ordering::Relaxed);
    let items: Vec<RecordItem> = (0..n).map(|i| record(i, order, &objects)).collect();
    let old_heap = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    let old_charge = items.iter().map(RecordItem::mem_size).sum::<usize>() as f64 / n as f64;
    let old_spill = items.iter().map(old_spill_len).sum::<usize>() as f64 / n as f64;
    let codec = Arc::new(RecordCodec::new(Arc::clone(&objects), false));
    // The sort as it was: RecordItems in a Vec, on all cores (with today's item comparator).
    let mut items = items;
    let t = Instant::now();
    items.par_sort_unstable_by(|a, b| codec.compare(a, b));
    let old_sort_s = t.elapsed().as_secs_f64();
    drop(items);

    let cancel = Arc::new(AtomicBool::new(false));
    let dir = tempfile::tempdir().expect("temp folder");

    // Now, everything in memory: the sorter's charge and its live heap, over the records.
    let pool = MemoryPool::new(64 << 30);
    let mut sorter = ExternalSorter::new(codec.clone(), pool.reservation("bench"), dir.path().into(), cancel.clone());
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..n {
        sorter.push(record(i, order, &objects)).expect("push");
    }
    let grown = sorter.buffer_bytes() as f64 / n as f64;
    let t = Instant::now();
    let (sorted, _) = sorter.finish().expect("finish");
    let sort_s = t.elapsed().as_secs_f64();
    // Sorted and at rest until handed out: the pool's charge and the live heap.
    let new_heap = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    let new_charge = pool.reserved() as f64 / n as f64;
    let t = Instant::now();
    let mut count = 0u64;
    for item in sorted {
        std::hint::black_box(item.expect("sorted item"));
        count += 1;
    }
    assert_eq!(count, n);
    let decode_s = t.elapsed().as_secs_f64();

    // Now, under a budget that spills: bytes on disk per record, and the charge of a full buffer per
    // record of a run (the buffer keeps its capacity from run to run).
    let pool = MemoryPool::new(spill_budget);
    let mut sorter = ExternalSorter::new(codec, pool.reservation("bench"), dir.path().into(), cancel);
    for i in 0..n {
        sorter.push(record(i, order, &objects)).expect("push");
    }
    let full_runs = sorter.stats().runs;
    assert!(full_runs > 0, "the spill budget must be small enough to spill");
    let per_run = (n - sorter.buffered_items() as u64) as f64 / full_runs as f64;
    let run_charge = sorter.buffer_bytes() as f64 / per_run;
    sorter.spill_now().expect("spill");
    let stats = *sorter.stats();
    let runs = stats.runs;
    let new_spill = stats.spilled_bytes as f64 / n as f64;
    drop(sorter);
    Figures {
        old_charge,
        old_heap,
        old_spill,
        new_charge,
        new_heap,
        grown,
        run_charge,
        new_spill,
        runs,
        sort_s,
        old_sort_s,
        decode_s,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(2_000_000, |a| a.parse().expect("RECORDS: a number"));
    let budget_mib: u64 = args.next().map_or(64, |a| a.parse().expect("SPILL_BUDGET_MIB: a number"));
    println!("{n} two-entry records, 20-byte names; spill budget {budget_mib} MiB");
    println!(
        "{:<13} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>9}",
        "order",
        "old_charge",
        "old_heap",
        "new_charge",
        "new_heap",
        "run_charge",
        "mem_ratio",
        "old_spill",
        "new_spill",
        "spill_rat"
    );
    for (label, order) in [("shuffle", Order::Shuffle), ("alphanumeric", Order::Alphanumeric)] {
        let f = measure(n, order, budget_mib << 20);
        println!(
            "{label:<13} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9.2} {:>10.1} {:>10.1} {:>9.2}",
            f.old_charge,
            f.old_heap,
            f.new_charge,
            f.new_heap,
            f.run_charge,
            f.run_charge / f.old_charge,
            f.old_spill,
            f.new_spill,
            f.new_spill / f.old_spill
        );
        // 1B records at a 2 GiB budget: runs of budget / charge records each, and temp space for them.
        let project = |charge: f64, spill: f64| (1e9 * charge / (2u64 << 30) as f64, 1e9 * spill / 1e9);
        let (old_runs, old_gb) = project(f.old_charge, f.old_spill);
        let (new_runs, new_gb) = project(f.run_charge, f.new_spill);
        println!(
            "  {label}: {} runs at {budget_mib} MiB; buffer while growing {:.1} B/record; in memory: sort {:.2} s (RecordItems: {:.2} s), \
             decode {:.2} s; 1B records at 2 GiB: old {old_runs:.0} runs / {old_gb:.0} GB temp, new {new_runs:.0} runs \
             / {new_gb:.0} GB temp",
            f.runs, f.grown, f.sort_s, f.old_sort_s, f.decode_s
        );
    }
}
