//! Bounded-memory external sort: buffer items, encoded, in one arena under a [`MemoryReservation`], spill
//! sorted runs to disk when the pool says no, and merge the runs k-way, in several levels when the fan-in
//! would not fit.
//!
//! ```text
//!  push ──► encode ──► arena + index (reserved) ──full──► spill thread: par_sort, write run + sparse index
//!                      (a fresh buffer keeps filling meanwhile; one spill in flight)     │  (level 0 runs)
//!                                                                                         ▼
//!  finish:  no run? ─► par_sort the index, decode items in order from the arena
//!           else    ─► spill the rest; while the read buffers of all runs do not fit (or there are more
//!                      than max_fan_in): merge the k smallest runs into one bigger run (level + 1),
//!                      deleting its inputs; then the final k-way merge (BinaryHeap), split into key
//!                      ranges at splitters from the runs' indexes: range 0 is merged as it is read,
//!                      ranges 1.. on their own threads into runs, read in turn after it
//! ```
//!
//! Items rest in their codec's byte form: the buffer is one arena of length-prefixed encoded items plus
//! an index of (`u32` sort prefix, `u32` arena offset) slots, sorted in place by prefix and, on ties, by
//! [`SortCodec::compare_encoded`]; so an item costs its encoded bytes and 8 more, not its heap blocks; items are decoded only when handed out. Merges
//! compare encoded items too, and intermediate merges copy them without decoding.
//!
//! The design follows DataFusion's `ExternalSorter` and multi-level merge. A full buffer is handed, with its
//! reservation (split off under the pool's lock), to a thread that sorts and writes it; the next buffer pays
//! for itself from the pool, and when the pool is short the pusher waits for that spill to end (it frees
//! its buffer) before cutting another run, so the budget holds and runs stay above a minimum size. The
//! final merge's ranges partition the order, so reading them in turn yields exactly one merge's order.
//! Memory invariants:
//! - the arena's and index's capacities are charged to the reservation before they grow, so the
//!   sorter's use never exceeds what it holds from the pool;
//! - on its first push the sorter reserves a fixed *headroom* of three I/O buffers (two run readers and
//!   one writer), kept until `finish`, so a merge can always make progress once spilling has started;
//!   if even that does not fit, `push` fails with a clear memory error;
//! - a merge reserves, per input run, its read buffer plus twice its largest encoded item (its head in
//!   the heap, and the merge's output buffer), and gives each back as its run is exhausted; a final merge
//!   in R ranges reserves that R times (with a share of the I/O buffer each) plus a writer per later range;
//! - a buffer's charge includes its run's index (at most about 64 items, see `RunIndex::bound`), which
//!   the spill takes along; an intermediate merge pays for its output's index the same way.
//!
//! Run files are length-prefixed encoded items (a LEB128 length, then the codec's bytes), named
//! `dsort-run-*.bin` inside the spill folder. Each is a [`TempPath`]: it is deleted when its owner (the
//! sorter, a merge, the [`Sorted`] iterator) is dropped, on success, error, cancellation or early drop
//! alike. Idle runs hold no file descriptor, so thousands of runs are fine. Items read back are checked
//! ([`SortCodec::check`]) before they are compared, so a corrupt run fails with its path and offset.
//!
//! The codec's order must be total (ties broken down to identity), so the unstable parallel sort and the
//! merge give one deterministic output whatever the budget; the merge still breaks ties by run index.

use std::cmp::Ordering;
use std::collections::binary_heap::PeekMut;
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rayon::slice::ParallelSliceMut;
use tempfile::TempPath;

use crate::key::{get_varint, put_varint};
use crate::memory::{MemoryError, MemoryPool, MemoryReservation, Spill};
use crate::size::format_size;

/// Default size of each run reader's and the run writer's buffer.
pub const DEFAULT_IO_BUFFER_SIZE: usize = 64 << 10;

/// Default cap on the runs merged at once (bounds open files as well as memory).
pub const DEFAULT_MAX_FAN_IN: usize = 128;

/// A merge needs at least two inputs to make progress.
const MIN_FAN_IN: usize = 2;

/// The buffer's reservation grows in chunks of this size to keep pool traffic low.
const GROW_CHUNK: u64 = 1 << 20;

/// The arena grows by at least this many bytes (unless the pool has only the next item's room left).
const MIN_ARENA_GROW: usize = 64 << 10;

/// The index grows by at least this many slots (same exception).
const MIN_INDEX_GROW: usize = 1024;

/// Bytes of one index slot.
const SLOT: usize = size_of::<Slot>();

/// Items between two looks at the cancel flag in the write and merge loops.
const CANCEL_CHECK_EVERY: u64 = 4096;

/// The least I/O buffer a range of a split final merge reads each run with (its share of the default).
const MIN_RANGE_IO_BUFFER: usize = 8 << 10;

/// A buffer is not cut into a run below this size while a spill in flight can still free memory (nor
/// below an eighth of a smaller pool), so a contended pool does not make thousands of tiny runs.
const MIN_RUN_BYTES: u64 = 8 << 20;

/// Most key ranges a final merge is split into (one thread each).
const MAX_MERGE_RANGES: usize = 8;

/// Run indexes grow only while this share of the pool stays free (they are optional: a run without one is
/// merged whole, in one range).
const INDEX_FREE_SHARE_DIVISOR: u64 = 8;

/// A run of known size is indexed at about this many items (and not more often than once per I/O buffer).
const INDEX_ENTRIES: u64 = 64;

/// How an item is written to the arena and to runs, read back, ordered and checked (`'static`: spills sort
/// on their own thread).
pub trait SortCodec: Send + Sync + 'static {
    type Item: Send;
    /// Appends the item's bytes to `out`.
    fn encode(&self, item: &Self::Item, out: &mut Vec<u8>);
    /// Reads back what `encode` wrote (exactly those bytes).
    fn decode(&self, bytes: &[u8]) -> io::Result<Self::Item>;
    /// A total order over encoded items: `Equal` only for items that are interchangeable in the output.
    /// Only bytes that `encode` wrote or that `check` accepted are compared; it must not panic on others.
    fn compare_encoded(&self, a: &[u8], b: &[u8]) -> Ordering;
    /// A summary of an encoded item's place in the order, so most comparisons of a sort need not read the
    /// items: `sort_prefix(a) < sort_prefix(b)` must imply `compare_encoded(a, b) == Less` (equal prefixes
    /// decide nothing). Default: 0 for every item.
    fn sort_prefix(&self, _item: &[u8]) -> u32 {
        0
    }
    /// Whether bytes read back from a run are a valid item (default: they decode).
    fn check(&self, bytes: &[u8]) -> io::Result<()> {
        self.decode(bytes).map(drop)
    }
}

/// What a sort did, for job metrics and summaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SortStats {
    /// Items pushed.
    pub items: u64,
    /// Sorted runs spilled from the memory buffer (not counting runs made by intermediate merges).
    pub runs: u64,
    /// Bytes written to spill files, intermediate merges included.
    pub spilled_bytes: u64,
    /// Depth of the merge tree: 0 when nothing spilled, 1 for a single k-way merge of the spilled runs,
    /// more when runs were first merged into bigger runs.
    pub merge_levels: u32,
    /// The most this sorter held in its reservation at once (the final merge's buffers included).
    pub peak_reserved: u64,
    /// Key ranges the final merge was split into, merged in parallel (1: one merge; 0: nothing spilled).
    pub merge_ranges: u32,
}

/// Why a sort failed. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum SortError {
    /// Creating, writing or reading a spill file.
    #[error("spill file {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    /// Not enough memory to make progress, even after spilling.
    #[error("external sort: {context}: {source}")]
    Memory { context: String, source: MemoryError },
    /// The cancel flag was set.
    #[error("external sort cancelled")]
    Cancelled,
    /// The thread that sorts and writes a spilled run in the background died (a bug: it panicked).
    #[error("the background spill of a run into {} stopped: {reason}", .dir.display())]
    SpillThread { dir: PathBuf, reason: String },
    /// A run file did not decode (truncated or corrupt, or the codec refused the bytes).
    #[error("corrupt spill run {} at byte offset {offset}: {source}", .path.display())]
    Decode { path: PathBuf, offset: u64, source: io::Error },
    /// A run handed over as sorted ([`ExternalSorter::run_writer`]) was not in order.
    #[error("run {} is not in order: item {item} sorts below the one before it", .path.display())]
    OutOfOrder { path: PathBuf, item: u64 },
    /// An encoded item handed to a sorted run (from a peer) is not one the codec accepts.
    #[error("a record received did not decode: {0}")]
    Received(io::Error),
    /// An item buffered in memory did not decode: the codec's `decode` refused what its `encode` wrote.
    #[error("an item buffered in memory did not decode: {0}")]
    Buffered(io::Error),
}

/// Configuration and shared handles, used by the sorter and by each merge.
struct Ctx<C> {
    codec: Arc<C>,
    spill_dir: PathBuf,
    cancel: Arc<AtomicBool>,
    io_buffer: usize,
    max_fan_in: usize,
    /// Where run indexes are paid from.
    pool: Arc<MemoryPool>,
    /// Key ranges the final merge is split into, merged in parallel (1: one sequential merge).
    merge_ranges: usize,
}

/// Cloned into the background spill thread (the codec and cancel flag are shared).
impl<C> Clone for Ctx<C> {
    fn clone(&self) -> Self {
        Ctx {
            codec: Arc::clone(&self.codec),
            spill_dir: self.spill_dir.clone(),
            cancel: Arc::clone(&self.cancel),
            io_buffer: self.io_buffer,
            max_fan_in: self.max_fan_in,
            pool: Arc::clone(&self.pool),
            merge_ranges: self.merge_ranges,
        }
    }
}

impl<C: SortCodec> Ctx<C> {
    fn check_cancel(&self) -> Result<(), SortError> {
        if self.cancel.load(AtomicOrdering::Relaxed) { Err(SortError::Cancelled) } else { Ok(()) }
    }

    /// Memory a merge needs to read `run`: its buffer, its head item and a share of the output buffer.
    fn read_cost(&self, run: &Run) -> u64 {
        self.io_buffer as u64 + 2 * run.max_encoded
    }

    /// Starts a new run file of merge level `level`.
    fn run_writer(&self, level: u32) -> Result<RunWriter, SortError> {
        let (file, path) = tempfile::Builder::new()
            .prefix("dsort-run-")
            .suffix(".bin")
            .tempfile_in(&self.spill_dir)
            .map_err(|source| SortError::Io { path: self.spill_dir.clone(), source })?
            .into_parts();
        Ok(RunWriter {
            run: Run { path, items: 0, bytes: 0, max_encoded: 0, level, index: None },
            out: BufWriter::with_capacity(self.io_buffer, file),
            len: Vec::with_capacity(10),
            index_every: self.io_buffer as u64,
            next_index_at: 0,
        })
    }
}

/// Some items of a run with their offsets (about one per I/O buffer of the run, the first item always), so
/// a range merge starts reading near its first key. Paid from the pool; dropped if the pool cannot pay.
struct RunIndex {
    entries: Vec<IndexEntry>,
    memory: MemoryReservation,
    /// Bytes of `memory` the entries take.
    used: u64,
}

impl RunIndex {
    /// The most the index of a run of `bytes` bytes, whose items are at most `max_item` bytes, holds.
    fn bound(bytes: u64, max_item: u64, io_buffer: usize) -> u64 {
        let entries = (bytes / RunIndex::every(bytes, io_buffer)).saturating_add(1);
        entries.saturating_mul(max_item + size_of::<IndexEntry>() as u64)
    }

    /// Bytes of run between two entries, for a run of `bytes` bytes.
    fn every(bytes: u64, io_buffer: usize) -> u64 {
        (bytes / INDEX_ENTRIES).max(io_buffer as u64).max(1)
    }
}

/// One indexed item: its bytes, its byte offset in the run and how many items come before it.
struct IndexEntry {
    item: Vec<u8>,
    offset: u64,
    before: u64,
}

/// Appends encoded items (already in order) to a run file.
struct RunWriter {
    run: Run,
    out: BufWriter<File>,
    len: Vec<u8>,
    /// Bytes of run between two index entries, and the offset from which the next item is indexed.
    index_every: u64,
    next_index_at: u64,
}

impl RunWriter {
    fn write(&mut self, item: &[u8]) -> Result<(), SortError> {
        if self.run.bytes >= self.next_index_at {
            self.next_index_at = self.run.bytes + self.index_every;
            self.add_index_entry(item);
        }
        self.len.clear();
        put_varint(&mut self.len, item.len() as u64);
        self.out
            .write_all(&self.len)
            .and_then(|()| self.out.write_all(item))
            .map_err(|source| SortError::Io { path: self.run.path.to_path_buf(), source })?;
        self.run.items += 1;
        self.run.bytes += (self.len.len() + item.len()) as u64;
        self.run.max_encoded = self.run.max_encoded.max(item.len() as u64);
        Ok(())
    }

    /// Indexes `item`, about to be written, if the pool pays for it (else the run has no index).
    fn add_index_entry(&mut self, item: &[u8]) {
        let Some(index) = &mut self.run.index else { return };
        let cost = (item.len() + size_of::<IndexEntry>()) as u64;
        let keep = index.memory.pool().limit() / INDEX_FREE_SHARE_DIVISOR;
        let paid = index.used + cost <= index.memory.size() || index.memory.try_grow_leaving(cost, keep).is_ok();
        if !paid {
            self.run.index = None;
            return;
        }
        index.used += cost;
        index.entries.push(IndexEntry { item: item.to_vec(), offset: self.run.bytes, before: self.run.items });
    }

    /// Indexes the run, expected to hold `bytes`, at about [`INDEX_ENTRIES`] items, paid from `memory` (and
    /// the pool beyond it).
    fn index_within(mut self, bytes: u64, memory: MemoryReservation) -> Self {
        self.index_every = RunIndex::every(bytes, self.index_every as usize);
        self.run.index = Some(RunIndex { entries: Vec::new(), memory, used: 0 });
        self
    }

    fn finish(mut self) -> Result<Run, SortError> {
        self.out.flush().map_err(|source| SortError::Io { path: self.run.path.to_path_buf(), source })?;
        if let Some(index) = &self.run.index {
            index.memory.shrink(index.memory.size().saturating_sub(index.used));
        }
        Ok(self.run)
    }
}

/// Writes a run that arrives already in order from elsewhere (a peer's sorted stream, see
/// [`ExternalSorter::run_writer`]), an item at a time. The order is checked: an item below the one before
/// is an error, since the merge relies on every run being in order.
pub struct SortedRunWriter<C: SortCodec> {
    codec: Arc<C>,
    cancel: Arc<AtomicBool>,
    writer: RunWriter,
    /// The item being written, and the one before (encoded).
    item: Vec<u8>,
    prev: Vec<u8>,
    /// Pays for the write buffer while the writer lives.
    _buffer: MemoryReservation,
}

impl<C: SortCodec> SortedRunWriter<C> {
    /// Appends `item`, which must not sort below the item before it.
    pub fn push(&mut self, item: C::Item) -> Result<(), SortError> {
        let n = self.writer.run.items;
        if n.is_multiple_of(CANCEL_CHECK_EVERY) && self.cancel.load(AtomicOrdering::Relaxed) {
            return Err(SortError::Cancelled);
        }
        self.item.clear();
        self.codec.encode(&item, &mut self.item);
        self.write_item()
    }

    /// Appends an item already encoded by the codec (a record frame as it came from a peer: the wire and the
    /// runs share the encoding, so it is checked, not decoded and encoded again).
    pub fn push_encoded(&mut self, item: &[u8]) -> Result<(), SortError> {
        let n = self.writer.run.items;
        if n.is_multiple_of(CANCEL_CHECK_EVERY) && self.cancel.load(AtomicOrdering::Relaxed) {
            return Err(SortError::Cancelled);
        }
        self.codec.check(item).map_err(SortError::Received)?;
        self.item.clear();
        self.item.extend_from_slice(item);
        self.write_item()
    }

    /// Writes `self.item` after checking it does not sort below the item before.
    fn write_item(&mut self) -> Result<(), SortError> {
        let n = self.writer.run.items;
        if n > 0 && self.codec.compare_encoded(&self.prev, &self.item) == Ordering::Greater {
            return Err(SortError::OutOfOrder { path: self.writer.run.path.to_path_buf(), item: n });
        }
        self.writer.write(&self.item)?;
        std::mem::swap(&mut self.prev, &mut self.item);
        Ok(())
    }

    /// The run written, for [`ExternalSorter::add_run`].
    pub fn into_run(self) -> Result<SortedRun, SortError> {
        self.writer.finish().map(SortedRun)
    }
}

/// A run written by a [`SortedRunWriter`], ready to be merged.
pub struct SortedRun(Run);

/// A sorted run on disk, deleted when dropped.
struct Run {
    path: TempPath,
    items: u64,
    bytes: u64,
    max_encoded: u64,
    level: u32,
    index: Option<RunIndex>,
}

/// Buffered items: `index` holds a slot per item, its sort prefix and its arena offset; the item is
/// stored there as its encoded length (LEB128) and bytes. Offsets are `u32`, so the arena spills before it
/// passes 4 GiB.
#[derive(Default)]
struct Arena {
    bytes: Vec<u8>,
    index: Vec<Slot>,
}

/// One buffered item in the index: the sort compares prefixes in place, reading the arena only on ties.
#[derive(Clone, Copy)]
struct Slot {
    prefix: u32,
    offset: u32,
}

impl Arena {
    /// The encoded item at `offset`.
    fn item(&self, offset: u32) -> &[u8] {
        framed(&self.bytes, offset)
    }

    /// Sorts the index on all cores by the codec's order of the items.
    fn sort<C: SortCodec>(&mut self, codec: &C) {
        let bytes = &self.bytes;
        self.index.par_sort_unstable_by(|a, b| {
            a.prefix
                .cmp(&b.prefix)
                .then_with(|| codec.compare_encoded(framed(bytes, a.offset), framed(bytes, b.offset)))
        });
    }
}

/// The length-prefixed item at `offset` of `bytes` (empty if the offset is not one the arena gave out,
/// which cannot happen).
fn framed(bytes: &[u8], offset: u32) -> &[u8] {
    let at = bytes.get(offset as usize..).unwrap_or_default();
    match get_varint(at) {
        Some((len, n)) => at.get(n..n.saturating_add(len as usize)).unwrap_or_default(),
        None => &[],
    }
}

/// Sorts items of any number under a memory reservation, spilling sorted runs to `spill_dir`.
pub struct ExternalSorter<C: SortCodec> {
    ctx: Ctx<C>,
    reservation: MemoryReservation,
    /// Held from the first push until `finish`: two read buffers and a write buffer.
    headroom: u64,
    buffer: Arena,
    /// Charged for the buffer: the arena's and the index's capacities.
    buffer_bytes: u64,
    /// The arena spills before an item would start past this offset (`u32::MAX`; lower in tests).
    arena_limit: usize,
    /// Where the item being pushed is encoded (one item; dropped when a large one grew it).
    scratch: Vec<u8>,
    runs: Vec<Run>,
    stats: SortStats,
    /// The buffer grows only while this much of the pool stays free (for other jobs sharing the pool).
    leave_free: u64,
    /// The run being sorted and written on its own thread (at most one), holding its buffer's memory.
    pending: Option<PendingSpill>,
    /// The buffer is handed to a background spill once it is charged this much: unbounded until the first
    /// spill (a sort that fits stays in memory), then half of what the sorter could hold at its last spill,
    /// so the next buffer fills in the other half while that one is written.
    spill_at: u64,
    /// The least a buffer is charged before it is cut into a run while a spill in flight can free memory.
    min_run: u64,
    /// The largest item buffered, and the one being stored: the buffer's charge includes the index its run
    /// will have (see [`RunIndex::bound`]), so a spill never needs memory the pool may not have.
    max_item: u64,
    incoming: u64,
    /// Test hook: the spill thread calls it once its buffer is sorted, before it writes.
    #[cfg(test)]
    spill_gate: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// A buffer being sorted and written as a run on a background thread, which owns the buffer and the
/// reservation that pays for it, and frees both before it ends.
struct PendingSpill {
    thread: JoinHandle<Result<Run, SortError>>,
    /// What the thread holds for the buffer, shared only to read its size (the sorter's peak); the thread
    /// frees it once the buffer is gone.
    reservation: Arc<MemoryReservation>,
    /// Set when the sorter is dropped: the thread stops at its next check and deletes its file.
    stop: Arc<AtomicBool>,
}

impl<C: SortCodec> ExternalSorter<C> {
    /// `reservation` is this sorter's share of the pool (it grows it as needed, and may be handed in
    /// non-empty); `spill_dir` a per-job temp folder (already created; the sorter creates files inside
    /// it and deletes them when done/dropped); `cancel` checked between batches.
    pub fn new(codec: Arc<C>, reservation: MemoryReservation, spill_dir: PathBuf, cancel: Arc<AtomicBool>) -> Self {
        let min_run = MIN_RUN_BYTES.min(reservation.pool().limit() / 8);
        ExternalSorter {
            ctx: Ctx {
                pool: Arc::clone(reservation.pool()),
                codec,
                spill_dir,
                cancel,
                io_buffer: DEFAULT_IO_BUFFER_SIZE,
                max_fan_in: DEFAULT_MAX_FAN_IN,
                merge_ranges: std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_MERGE_RANGES),
            },
            reservation,
            headroom: 0,
            buffer: Arena::default(),
            buffer_bytes: 0,
            arena_limit: u32::MAX as usize,
            scratch: Vec::new(),
            runs: Vec::new(),
            stats: SortStats::default(),
            leave_free: 0,
            pending: None,
            spill_at: u64::MAX,
            min_run,
            max_item: 0,
            incoming: 0,
            #[cfg(test)]
            spill_gate: None,
        }
    }

    /// The limit of the pool this sorter draws from.
    pub fn pool_limit(&self) -> u64 {
        self.reservation.pool().limit()
    }

    /// Bytes charged for the items buffered in memory now (the arena's and the index's capacities).
    pub fn buffer_bytes(&self) -> u64 {
        self.buffer_bytes
    }

    /// Items buffered in memory now (not yet in a run).
    pub fn buffered_items(&self) -> usize {
        self.buffer.index.len()
    }

    /// Grow the in-memory buffer only while `bytes` of the pool stay free (spill sooner instead), so that
    /// other consumers of a shared pool can always get their minimum (default 0: take what is free).
    pub fn leaving_free(mut self, bytes: u64) -> Self {
        self.leave_free = bytes;
        self
    }

    /// Size of each run reader's and writer's buffer (default 64 KiB, at least 512 bytes). The least
    /// memory the sorter needs is three of them.
    pub fn with_io_buffer_size(mut self, bytes: usize) -> Self {
        self.ctx.io_buffer = bytes.max(512);
        self
    }

    /// Key ranges the final merge of spilled runs is split into, each merged on its own thread (default: the
    /// cores, at most 8; 1 merges sequentially). The output is the same whatever the number.
    pub fn with_merge_ranges(mut self, ranges: usize) -> Self {
        self.ctx.merge_ranges = ranges.clamp(1, MAX_MERGE_RANGES);
        self
    }

    /// Most runs merged at once (default 128, at least 2).
    pub fn with_max_fan_in(mut self, runs: usize) -> Self {
        self.ctx.max_fan_in = runs.max(MIN_FAN_IN);
        self
    }

    /// The least memory this sorter needs to make progress (without counting items bigger than buffers).
    pub fn min_memory(&self) -> u64 {
        (MIN_FAN_IN as u64 + 1) * self.ctx.io_buffer as u64
    }

    /// Statistics so far.
    pub fn stats(&self) -> &SortStats {
        &self.stats
    }

    /// Adds one item (encoded into the arena; the item itself is dropped); when its memory cannot be
    /// reserved, the buffer is sorted (on all cores) and written as a run file, and its items' memory
    /// given back.
    ///
    /// The sort runs on rayon's global pool: do not call this from a rayon task while holding a lock
    /// that other rayon tasks take (a waiting rayon thread may steal such a task and deadlock).
    pub fn push(&mut self, item: C::Item) -> Result<(), SortError> {
        self.ctx.check_cancel()?;
        self.ensure_headroom()?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        self.ctx.codec.encode(&item, &mut scratch);
        drop(item);
        let stored = self.store(&scratch);
        if scratch.capacity() <= MIN_ARENA_GROW {
            self.scratch = scratch;
        }
        stored
    }

    /// Appends one encoded item to the arena. A full buffer goes to a background spill; when the pool
    /// cannot pay for the item, the spill in flight is waited for first (it frees its buffer), and only
    /// then is this buffer cut too.
    fn store(&mut self, item: &[u8]) -> Result<(), SortError> {
        self.collect_spill(false)?;
        let need = varint_len(item.len() as u64) + item.len();
        self.incoming = item.len() as u64;
        if self.buffer.bytes.len() > self.arena_limit || self.buffer_bytes >= self.spill_at {
            self.start_spill()?;
        }
        if !self.make_room(need) {
            self.collect_spill(true)?;
            if !self.make_room(need) {
                self.start_spill()?;
                if !self.make_room(need) {
                    self.collect_spill(true)?;
                    if !self.make_room(need) {
                        let context = format!(
                            "an item of {} does not fit in memory even after spilling",
                            format_size(need as u64)
                        );
                        return Err(self.memory_error(context, (need + SLOT) as u64));
                    }
                }
            }
        }
        self.max_item = self.max_item.max(self.incoming);
        let offset = u32::try_from(self.buffer.bytes.len()).unwrap_or(u32::MAX);
        self.buffer.index.push(Slot { prefix: self.ctx.codec.sort_prefix(item), offset });
        put_varint(&mut self.buffer.bytes, item.len() as u64);
        self.buffer.bytes.extend_from_slice(item);
        self.stats.items += 1;
        Ok(())
    }

    /// A writer for a run that arrives already in order (a peer's sorted stream), used without this sorter
    /// (so several can be written at once), then handed back with [`ExternalSorter::add_run`]: `finish`
    /// merges such runs with the rest and never sorts them again. Its write buffer is paid from the pool.
    pub fn run_writer(&self) -> Result<SortedRunWriter<C>, SortError> {
        let buffer = self.reservation.pool().reservation("sorted run writer");
        buffer.try_grow(self.ctx.io_buffer as u64).map_err(|source| SortError::Memory {
            context: format!("a write buffer of {} for a sorted run", format_size(self.ctx.io_buffer as u64)),
            source,
        })?;
        Ok(SortedRunWriter {
            codec: Arc::clone(&self.ctx.codec),
            cancel: Arc::clone(&self.ctx.cancel),
            // Its size is unknown: indexed once per I/O buffer, paid from the pool while it has room.
            writer: self.ctx.run_writer(0)?.index_within(0, self.ctx.pool.reservation("spill run index")),
            item: Vec::new(),
            prev: Vec::new(),
            _buffer: buffer,
        })
    }

    /// Adds a run written by [`ExternalSorter::run_writer`].
    pub fn add_run(&mut self, run: SortedRun) {
        self.stats.items += run.0.items;
        self.stats.runs += 1;
        self.stats.spilled_bytes += run.0.bytes;
        self.runs.push(run.0);
    }

    /// Gives buffered memory back to the pool now, for another consumer that needs it (see [`Spill`]):
    /// waits for the spill in flight, and spills the buffer too (returning once it is written) unless that
    /// wait freed memory and the buffer is below the minimum run size. Does nothing when nothing is buffered.
    pub fn spill_now(&mut self) -> Result<(), SortError> {
        let waited = self.pending.is_some();
        self.collect_spill(true)?;
        if waited && self.buffer_bytes < self.min_run {
            return Ok(());
        }
        self.spill()
    }

    /// Whether a run is being sorted and written in the background now.
    pub fn spilling(&self) -> bool {
        self.pending.is_some()
    }

    /// Finishes: sorts in memory if nothing spilled, else spills the rest and merges the runs (in
    /// several levels when they do not all fit). Memory stays reserved until the iterator is dropped or
    /// exhausted; run files are deleted as they are consumed.
    pub fn finish(mut self) -> Result<(Sorted<C>, SortStats), SortError> {
        self.ctx.check_cancel()?;
        self.collect_spill(true)?;
        if self.runs.is_empty() {
            self.buffer.sort(&*self.ctx.codec);
            // The headroom was for spilling, and the buffer's growth slack for more items: only the items
            // stay charged (shrinking a large block is a remap, not a copy).
            self.buffer.bytes.shrink_to_fit();
            self.buffer.index.shrink_to_fit();
            self.buffer_bytes = (self.buffer.bytes.capacity() + self.buffer.index.capacity() * SLOT) as u64;
            let keep = self.buffer_bytes.min(self.reservation.size());
            self.reservation.shrink(self.reservation.size() - keep);
            let Arena { bytes, index } = std::mem::take(&mut self.buffer);
            let remaining = index.len() as u64;
            let sorted = Sorted {
                inner: Inner::Memory { arena: Arena { bytes, index: Vec::new() }, order: index.into_iter() },
                codec: Arc::clone(&self.ctx.codec),
                reservation: self.take_reservation(),
                cancel: Arc::clone(&self.ctx.cancel),
                yielded: 0,
                remaining,
                done: false,
            };
            return Ok((sorted, self.stats));
        }
        self.spill()?;
        // The buffer went with its spill; what stays is the headroom and any growth slack, resized below.
        let runs = std::mem::take(&mut self.runs);
        let reservation = self.take_reservation();
        let (merger, remaining) = merge_runs(&self.ctx, &reservation, runs, &mut self.stats)?;
        let sorted = Sorted {
            inner: Inner::Merge(merger),
            codec: Arc::clone(&self.ctx.codec),
            reservation,
            cancel: Arc::clone(&self.ctx.cancel),
            yielded: 0,
            remaining,
            done: false,
        };
        Ok((sorted, self.stats))
    }

    /// Moves the reservation out, leaving an empty one from the same pool.
    fn take_reservation(&mut self) -> MemoryReservation {
        let empty = self.reservation.pool().reservation(self.reservation.owner());
        std::mem::replace(&mut self.reservation, empty)
    }

    /// Reserve the least memory the sorter needs now rather than at the first push: on a pool shared with
    /// other jobs, a job is then refused at its start, not halfway, when the pool is exhausted.
    pub fn reserve_headroom(&mut self) -> Result<(), SortError> {
        self.ensure_headroom()
    }

    /// Reserves the headroom on the first push.
    fn ensure_headroom(&mut self) -> Result<(), SortError> {
        if self.headroom > 0 {
            return Ok(());
        }
        let headroom = self.min_memory();
        let missing = headroom.saturating_sub(self.reservation.size());
        if let Err(source) = self.reservation.try_grow(missing) {
            let context = format!(
                "needs at least {} (3 I/O buffers of {}) to sort with spilling",
                format_size(headroom),
                format_size(self.ctx.io_buffer as u64)
            );
            return Err(SortError::Memory { context, source });
        }
        self.headroom = headroom;
        self.note_peak();
        Ok(())
    }

    /// Makes sure the index has a free slot and the arena `need` free bytes, reserving what they grow by;
    /// false if the pool is full. Both grow by a half, an eighth or a 64th of their size while the pool
    /// allows (few reallocations, little slack when the pool runs out), else by just enough.
    fn make_room(&mut self, need: usize) -> bool {
        // The run index's share grows with the largest item (and the arena's size, charged below).
        if !self.reserve_bytes(0) {
            return false;
        }
        let index = &self.buffer.index;
        if index.len() == index.capacity() {
            let cap = index.capacity();
            let steps = [cap / 2, cap / 8, cap / 64].map(|s| s.max(MIN_INDEX_GROW));
            let Some(slots) = steps.into_iter().chain([1]).find(|&s| self.reserve_bytes((s * SLOT) as u64)) else {
                return false;
            };
            // Vec::reserve_exact allocates exactly `slots` more for a full vector of a non-zero-sized item.
            self.buffer.index.reserve_exact(slots);
            self.buffer_bytes += ((self.buffer.index.capacity() - cap) * SLOT) as u64;
        }
        let arena = &self.buffer.bytes;
        let spare = arena.capacity() - arena.len();
        if spare < need {
            let (cap, missing) = (arena.capacity(), need - spare);
            let steps = [cap / 2, cap / 8, cap / 64].map(|s| s.max(MIN_ARENA_GROW).max(missing));
            let Some(grow) = steps.into_iter().chain([missing]).find(|&g| self.reserve_bytes(g as u64)) else {
                return false;
            };
            self.buffer.bytes.reserve_exact(spare + grow);
            self.buffer_bytes += (self.buffer.bytes.capacity() - cap) as u64;
        }
        true
    }

    /// Ensures `n` bytes beyond the headroom and the buffer's charge are reserved, growing by chunks.
    fn reserve_bytes(&mut self, n: u64) -> bool {
        let max_item = self.max_item.max(self.incoming);
        let index = RunIndex::bound(self.buffer.bytes.capacity() as u64 + n, max_item, self.ctx.io_buffer);
        let total = self.headroom + self.buffer_bytes + index + n;
        if total <= self.reservation.size() {
            return true;
        }
        let want = total - self.reservation.size();
        // Grow by chunks while `leave_free` stays free; an empty buffer (just spilled) may still take the
        // exact room of its next item.
        let keep = self.leave_free;
        let last = if self.buffer.index.is_empty() { 0 } else { keep };
        let ok = self.reservation.try_grow_leaving(want.max(GROW_CHUNK), keep).is_ok()
            || self.reservation.try_grow_leaving(want, last).is_ok();
        if ok {
            self.note_peak();
        }
        ok
    }

    /// Sorts the buffer and writes it as a run, in the foreground: returns once it is written and its
    /// memory is back in the pool.
    fn spill(&mut self) -> Result<(), SortError> {
        self.start_spill()?;
        self.collect_spill(true)
    }

    /// Hands the buffer, with the bytes reserved for it, to a thread that sorts it and writes it as a run,
    /// after waiting for the spill in flight (one at a time: their buffers share the pool, and the headroom
    /// pays for one writer). The next buffer starts empty and pays for itself. Nothing to do when empty.
    fn start_spill(&mut self) -> Result<(), SortError> {
        if self.buffer.index.is_empty() {
            return Ok(());
        }
        self.collect_spill(true)?;
        self.ctx.check_cancel()?;
        let arena = std::mem::take(&mut self.buffer);
        let index_bytes = RunIndex::bound(arena.bytes.len() as u64, self.max_item, self.ctx.io_buffer);
        self.max_item = 0;
        let reserved = std::mem::take(&mut self.buffer_bytes);
        let reservation = Arc::new(self.reservation.split(reserved + index_bytes));
        let held = Arc::clone(&reservation);
        // Half of what this buffer and the pool's free bytes come to: the next buffer fills while this one
        // is written, never below the minimum run size.
        let free = self.reservation.pool().available().saturating_sub(self.leave_free);
        self.spill_at = ((reserved + free) / 2).max(self.min_run);
        let ctx = self.ctx.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        #[cfg(test)]
        let gate = self.spill_gate.clone();
        let thread = std::thread::Builder::new()
            .name("dsort-spill".into())
            .spawn(move || {
                let mut arena = arena;
                arena.sort(&*ctx.codec);
                #[cfg(test)]
                if let Some(gate) = gate {
                    gate();
                }
                let index = held.split(index_bytes);
                let run = write_arena(&ctx, &arena, index, &stopped);
                // The items are gone whether or not the write worked: their memory goes back, then its bytes.
                drop(arena);
                release_freed_memory();
                held.free();
                run
            })
            .map_err(|source| SortError::Io { path: self.ctx.spill_dir.clone(), source })?;
        self.pending = Some(PendingSpill { thread, reservation, stop });
        self.note_peak();
        Ok(())
    }

    /// Takes the result of the spill in flight: when it has ended, or always (waiting for it) if `wait`.
    /// Its run joins the others; its error (naming the run file) is returned here.
    fn collect_spill(&mut self, wait: bool) -> Result<(), SortError> {
        let Some(pending) = self.pending.take_if(|p| wait || p.thread.is_finished()) else { return Ok(()) };
        let run = pending.thread.join().map_err(|panic| SortError::SpillThread {
            dir: self.ctx.spill_dir.clone(),
            reason: panic_message(panic.as_ref()),
        })??;
        self.stats.runs += 1;
        self.stats.spilled_bytes += run.bytes;
        self.runs.push(run);
        Ok(())
    }

    /// The most held at once: the reservation plus the buffer of the spill in flight (read first: only
    /// this thread changes the reservation, so the sum was held at once).
    fn note_peak(&mut self) {
        let in_flight = self.pending.as_ref().map_or(0, |p| p.reservation.size());
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.reservation.size() + in_flight);
    }

    fn memory_error(&mut self, context: String, requested: u64) -> SortError {
        let source = match self.reservation.try_grow(requested) {
            Err(e) => e,
            Ok(()) => {
                self.reservation.shrink(requested);
                let pool = self.reservation.pool();
                MemoryError::ResourcesExhausted {
                    owner: self.reservation.owner().to_string(),
                    requested,
                    reserved: pool.reserved(),
                    limit: pool.limit(),
                }
            }
        };
        SortError::Memory { context, source }
    }

    /// Test hook: spill before the arena passes `bytes` (instead of 4 GiB).
    #[cfg(test)]
    fn with_arena_limit(mut self, bytes: usize) -> Self {
        self.arena_limit = bytes;
        self
    }

    /// Test hook: each spill thread calls `gate` between sorting its buffer and writing it.
    #[cfg(test)]
    fn with_spill_gate(mut self, gate: impl Fn() + Send + Sync + 'static) -> Self {
        self.spill_gate = Some(Arc::new(gate));
        self
    }
}

/// A sorter dropped with a spill in flight stops that spill and waits for it, so its run file is deleted
/// and its memory given back before the drop returns.
impl<C: SortCodec> Drop for ExternalSorter<C> {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.stop.store(true, AtomicOrdering::Relaxed);
            // Its result (a run, deleted as it is dropped, or an error) is of no use any more.
            drop(pending.thread.join());
        }
    }
}

/// Writes a sorted arena's items, in index order, as a level-0 run; stops on cancellation or `stop`.
/// Its index is paid from `index` (see [`RunIndex::bound`]).
fn write_arena<C: SortCodec>(
    ctx: &Ctx<C>,
    arena: &Arena,
    index: MemoryReservation,
    stop: &AtomicBool,
) -> Result<Run, SortError> {
    // The arena holds the items as the run will: length-prefixed, as many bytes.
    let mut writer = ctx.run_writer(0)?.index_within(arena.bytes.len() as u64, index);
    for (n, &Slot { offset, .. }) in arena.index.iter().enumerate() {
        if (n as u64).is_multiple_of(CANCEL_CHECK_EVERY) {
            ctx.check_cancel()?;
            if stop.load(AtomicOrdering::Relaxed) {
                return Err(SortError::Cancelled);
            }
        }
        writer.write(arena.item(offset))?;
    }
    writer.finish()
}

/// What a panicking thread said, for an error message.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the thread panicked".to_string())
}

/// Bytes of `v` as a LEB128 varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// A shared sorter spills when another consumer of its pool is short (registered with
/// [`crate::memory::MemoryPool::set_spiller`]; extraction asks when it cannot pay for a shard's index).
impl<C: SortCodec + 'static> Spill for Mutex<ExternalSorter<C>>
where
    C::Item: 'static,
{
    fn spill(&self) -> Result<(), String> {
        let mut sorter = self.lock().unwrap_or_else(PoisonError::into_inner);
        sorter.spill_now().map_err(|e| format!("sorting record metadata: {e}"))
    }
}

/// Hands memory freed around a spill back to the operating system. Pushed items were allocated and freed
/// by whichever threads extracted them, each in its own malloc arena; without this, freed pages stay with
/// those arenas and the resident size drifts above what the pool accounts for. glibc only; elsewhere a no-op.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns free heap pages to the kernel; it is safe to call at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Merges `runs` down to one final merge that fits `reservation` and `max_fan_in`, writing intermediate
/// runs as needed; returns the final merge and its item count, with `reservation` sized for it.
fn merge_runs<C: SortCodec>(
    ctx: &Ctx<C>,
    reservation: &MemoryReservation,
    mut runs: Vec<Run>,
    stats: &mut SortStats,
) -> Result<(FinalMerge<C>, u64), SortError> {
    let note_peak = |stats: &mut SortStats, r: &MemoryReservation| {
        stats.peak_reserved = stats.peak_reserved.max(r.size());
    };
    loop {
        ctx.check_cancel()?;
        // Smallest first: intermediate merges take the runs that cost least to rewrite.
        runs.sort_by_key(|r| (r.bytes, r.level));
        if runs.len() <= ctx.max_fan_in {
            let need: u64 = runs.iter().map(|r| ctx.read_cost(r)).sum();
            let levels = runs.iter().map(|r| r.level).max().unwrap_or(0) + 1;
            let items = runs.iter().map(|r| r.items).sum();
            let splitters = range_splitters(ctx, &runs);
            // As many ranges as there are splitters and memory for: each range reads every run, with its share
            // of the I/O buffer (so more ranges cost about what one merge does); each but the first also writes
            // its merged items (and keeps the cost of one reader of them, no more than its readers took).
            let max_encoded = runs.iter().map(|r| r.max_encoded).max().unwrap_or(0);
            let plan = |r: usize, runs: &[Run]| {
                let rctx =
                    Ctx { io_buffer: (ctx.io_buffer / r).max(ctx.io_buffer.min(MIN_RANGE_IO_BUFFER)), ..ctx.clone() };
                let need: u64 = runs.iter().map(|run| rctx.read_cost(run)).sum();
                let writer_cost = rctx.io_buffer as u64 + max_encoded;
                (r as u64 * need + (r as u64 - 1) * writer_cost, need, rctx)
            };
            let mut chosen = (1..=splitters.len() + 1)
                .rev()
                .map(|r| plan(r, &runs))
                .enumerate()
                .find(|(_, (total, ..))| reservation.resize(*total).is_ok());
            // Short of memory: the indexes go if that is enough for one merge (else a pass merges some runs
            // first, and the rest keep their indexes for the final merge).
            let indexes: u64 = runs.iter().filter_map(|r| r.index.as_ref()).map(|i| i.memory.size()).sum();
            if chosen.is_none() && indexes > 0 && reservation.resize(need.saturating_sub(indexes)).is_ok() {
                runs.iter_mut().for_each(|r| r.index = None);
                chosen = reservation.resize(need).is_ok().then(|| (splitters.len(), plan(1, &runs)));
            }
            if let Some((skipped, (_, need, rctx))) = chosen {
                let ranges = splitters.len() + 1 - skipped;
                note_peak(stats, reservation);
                stats.merge_levels = levels;
                stats.merge_ranges = ranges as u32;
                let merge = FinalMerge::start(&rctx, reservation, runs, &splitters[..ranges - 1], need, levels)?;
                return Ok((merge, items));
            }
        }
        // How many of the smallest runs fit, with a writer, in what we hold plus what the pool gives now.
        // Only grow here: giving memory back first could let another consumer take it.
        // A pass writes one run, with its index (see `RunIndex::bound`).
        let writer_cost = |runs: &[Run]| {
            let max_encoded = runs.iter().map(|r| r.max_encoded).max().unwrap_or(0);
            let index = RunIndex::bound(runs.iter().map(|r| r.bytes).sum(), max_encoded, ctx.io_buffer);
            ctx.io_buffer as u64 + max_encoded + index
        };
        let pass_cost = |runs: &[Run]| writer_cost(runs) + runs.iter().map(|r| ctx.read_cost(r)).sum::<u64>();
        let mut fit = 0;
        while fit < runs.len().min(ctx.max_fan_in) {
            let need = pass_cost(&runs[..=fit]);
            if need > reservation.size() && reservation.resize(need).is_err() {
                break;
            }
            fit += 1;
        }
        note_peak(stats, reservation);
        if fit < MIN_FAN_IN {
            let need = pass_cost(&runs[..MIN_FAN_IN.min(runs.len())]);
            let context = format!(
                "merging {} spilled runs needs at least {} (2 run readers and a writer)",
                runs.len(),
                format_size(need)
            );
            let source = match reservation.try_grow(need.saturating_sub(reservation.size())) {
                Err(e) => e,
                Ok(()) => MemoryError::ResourcesExhausted {
                    owner: reservation.owner().to_string(),
                    requested: need,
                    reserved: reservation.pool().reserved(),
                    limit: reservation.pool().limit(),
                },
            };
            return Err(SortError::Memory { context, source });
        }
        // Merge just enough that the rest fits the next pass (the final one if the estimate holds).
        // The memory reserved for `fit` runs is kept for the next pass.
        let take = fit.min(runs.len() + 1 - fit).max(MIN_FAN_IN);
        let inputs: Vec<Run> = runs.drain(..take).collect();
        let level = inputs.iter().map(|r| r.level).max().unwrap_or(0) + 1;
        let max_encoded = inputs.iter().map(|r| r.max_encoded).max().unwrap_or(0);
        let index = RunIndex::bound(inputs.iter().map(|r| r.bytes).sum(), max_encoded, ctx.io_buffer);
        let index = Some(reservation.split(index));
        let slices = inputs.into_iter().map(RunSlice::whole).collect();
        let run = merge_to_run(ctx, slices, level, index, &AtomicBool::new(false))?;
        stats.spilled_bytes += run.bytes;
        runs.push(run);
    }
}

/// Merges `slices` into one run of merge level `level`, indexed if `index` pays for it (see
/// [`RunIndex::bound`]); stops on cancellation or `stop`. Items are copied as they were read (and checked),
/// never decoded.
fn merge_to_run<C: SortCodec>(
    ctx: &Ctx<C>,
    slices: Vec<RunSlice>,
    level: u32,
    index: Option<MemoryReservation>,
    stop: &AtomicBool,
) -> Result<Run, SortError> {
    let bytes = slices.iter().map(|s| s.bytes).sum();
    let mut merger = Merger::new(ctx, slices)?;
    let mut writer = ctx.run_writer(level)?;
    if let Some(index) = index {
        writer = writer.index_within(bytes, index);
    }
    let mut n = 0u64;
    while let Some((item, _)) = merger.next()? {
        if n.is_multiple_of(CANCEL_CHECK_EVERY) {
            ctx.check_cancel()?;
            if stop.load(AtomicOrdering::Relaxed) {
                return Err(SortError::Cancelled);
            }
        }
        n += 1;
        writer.write(item)?;
    }
    drop(merger);
    writer.finish()
}

/// Up to `merge_ranges - 1` items that split the runs' items into key ranges of about equal bytes, picked
/// from the runs' indexes (an entry stands for about one I/O buffer of its run); none when a run has no
/// index or the final merge is not split.
fn range_splitters<C: SortCodec>(ctx: &Ctx<C>, runs: &[Run]) -> Vec<Arc<Vec<u8>>> {
    if ctx.merge_ranges < 2 || runs.len() < 2 || runs.iter().any(|r| r.index.is_none()) {
        return Vec::new();
    }
    let mut keys: Vec<&[u8]> =
        runs.iter().flat_map(|r| r.index.iter().flat_map(|i| i.entries.iter().map(|e| e.item.as_slice()))).collect();
    keys.sort_unstable_by(|a, b| ctx.codec.compare_encoded(a, b));
    let mut splitters: Vec<Arc<Vec<u8>>> = Vec::new();
    for j in 1..ctx.merge_ranges {
        let Some(&key) = keys.get(j * keys.len() / ctx.merge_ranges) else { break };
        // Distinct and above the smallest key: no range is empty by construction.
        let above = splitters.last().map_or(keys.first().map(|k| &k[..]), |l| Some(&l[..]));
        if above.is_some_and(|a| ctx.codec.compare_encoded(a, key) == Ordering::Less) {
            splitters.push(Arc::new(key.to_vec()));
        }
    }
    splitters
}

/// The slice of `run` in the key range `[lower, upper)`, starting at the last
/// index entry below `lower`.
fn range_slice<C: SortCodec>(
    ctx: &Ctx<C>,
    run: &SharedRun,
    lower: Option<&Arc<Vec<u8>>>,
    upper: Option<&Arc<Vec<u8>>>,
) -> RunSlice {
    let start = match (lower, &run.index) {
        (Some(lower), Some(index)) => {
            let n = index.entries.partition_point(|e| ctx.codec.compare_encoded(&e.item, lower) == Ordering::Less);
            n.checked_sub(1).and_then(|n| index.entries.get(n)).map(|e| (e.offset, e.before))
        }
        _ => None,
    };
    let (offset, before) = start.unwrap_or((0, 0));
    RunSlice {
        path: Arc::clone(&run.path),
        items: run.items - before,
        bytes: run.bytes - offset,
        offset,
        max_encoded: run.max_encoded,
        lower: lower.cloned(),
        upper: upper.cloned(),
    }
}

/// The final merge: the first key range merged as it is read; each later range merged on its own thread
/// into a run, read whole once the ranges before it are done. Ranges partition the order, so reading them
/// in turn gives exactly the items of one merge of all runs, in its order.
struct FinalMerge<C: SortCodec> {
    /// The range being read (`None` only while starting).
    current: Option<Merger<C>>,
    /// The later ranges' threads: each gives its run, and the memory to read it.
    later: VecDeque<JoinHandle<Result<(Run, MemoryReservation), SortError>>>,
    /// Stops the later ranges' threads (set when the iterator is dropped or fails).
    stop: Arc<AtomicBool>,
    ctx: Ctx<C>,
}

impl<C: SortCodec> FinalMerge<C> {
    /// Starts the merge of `runs` split at `splitters` (none: one merge). `reservation` holds `need` (every
    /// run's reader) per range, and a writer per later range: each later thread takes its share along, keeps
    /// what reading its run back costs and gives that to the reader; the rest stays for the first range.
    fn start(
        ctx: &Ctx<C>,
        reservation: &MemoryReservation,
        runs: Vec<Run>,
        splitters: &[Arc<Vec<u8>>],
        need: u64,
        levels: u32,
    ) -> Result<Self, SortError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut merge = FinalMerge { current: None, later: VecDeque::new(), stop, ctx: ctx.clone() };
        if splitters.is_empty() {
            merge.current = Some(Merger::new(ctx, runs.into_iter().map(RunSlice::whole).collect())?);
            return Ok(merge);
        }
        let writer_cost = ctx.io_buffer as u64 + runs.iter().map(|r| r.max_encoded).max().unwrap_or(0);
        let runs: Vec<SharedRun> = runs.into_iter().map(SharedRun::from).collect();
        let bounds: Vec<Option<&Arc<Vec<u8>>>> =
            std::iter::once(None).chain(splitters.iter().map(Some)).chain(std::iter::once(None)).collect();
        let slices = |j: usize| -> Vec<RunSlice> {
            runs.iter().map(|r| range_slice(ctx, r, bounds[j], bounds[j + 1])).collect()
        };
        for j in 1..=splitters.len() {
            let (slices, memory) = (slices(j), reservation.split(need + writer_cost));
            let (ctx, stop) = (ctx.clone(), Arc::clone(&merge.stop));
            let thread = std::thread::Builder::new()
                .name("dsort-merge".into())
                .spawn(move || {
                    // Read once, in order: no index.
                    let run = merge_to_run(&ctx, slices, levels, None, &stop)?;
                    memory.shrink(memory.size().saturating_sub(ctx.read_cost(&run)));
                    Ok((run, memory))
                })
                .map_err(|source| SortError::Io { path: merge.ctx.spill_dir.clone(), source })?;
            merge.later.push_back(thread);
        }
        merge.current = Some(Merger::new(ctx, slices(0))?);
        Ok(merge)
    }

    /// The next item, from the range being read or, when it is done, from the next range's run (whose
    /// reader's memory joins `reservation`).
    fn next(&mut self, reservation: &MemoryReservation) -> Result<Option<(&[u8], Origin)>, SortError> {
        while self.current.as_ref().is_none_or(|m| m.heap.is_empty()) {
            let Some(thread) = self.later.pop_front() else { break };
            let (run, memory) = thread.join().map_err(|panic| SortError::SpillThread {
                dir: self.ctx.spill_dir.clone(),
                reason: panic_message(panic.as_ref()),
            })??;
            reservation.absorb(memory);
            let freed = self.current.as_ref().map_or(0, |m| m.freed);
            let mut next = Merger::new(&self.ctx, vec![RunSlice::whole(run)])?;
            next.freed += freed;
            self.current = Some(next);
        }
        match &mut self.current {
            Some(merger) => merger.next(),
            None => Ok(None),
        }
    }
}

/// Dropped before its end (an early drop, an error), the later ranges' threads are stopped and waited for,
/// so their files are deleted and their memory given back.
impl<C: SortCodec> Drop for FinalMerge<C> {
    fn drop(&mut self) {
        self.stop.store(true, AtomicOrdering::Relaxed);
        for thread in self.later.drain(..) {
            drop(thread.join());
        }
    }
}

/// A run whose file is shared by its slices in every key range.
struct SharedRun {
    path: Arc<TempPath>,
    items: u64,
    bytes: u64,
    max_encoded: u64,
    index: Option<RunIndex>,
}

impl From<Run> for SharedRun {
    fn from(run: Run) -> Self {
        SharedRun {
            path: Arc::new(run.path),
            items: run.items,
            bytes: run.bytes,
            max_encoded: run.max_encoded,
            index: run.index,
        }
    }
}

/// The head item of one run in the merge heap, encoded; reversed order makes `BinaryHeap` a min-heap.
/// Each head carries the codec, moved from head to head, so comparing needs no lookup and no refcounting.
struct Head<C: SortCodec> {
    item: Vec<u8>,
    run: usize,
    /// The item's byte offset in its run file, for errors.
    offset: u64,
    codec: Arc<C>,
}

impl<C: SortCodec> Ord for Head<C> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.codec.compare_encoded(&other.item, &self.item).then_with(|| other.run.cmp(&self.run))
    }
}

impl<C: SortCodec> PartialOrd for Head<C> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<C: SortCodec> PartialEq for Head<C> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<C: SortCodec> Eq for Head<C> {}

/// The part of a run a merge reads: from `offset` (with `items` items from there to the end), the items
/// at or above `lower` and below `upper` (a key range; `None`: unbounded). The file is deleted when the
/// last slice of it (or reader) is dropped.
struct RunSlice {
    path: Arc<TempPath>,
    items: u64,
    /// Bytes from `offset` to the end of the run.
    bytes: u64,
    offset: u64,
    max_encoded: u64,
    lower: Option<Arc<Vec<u8>>>,
    upper: Option<Arc<Vec<u8>>>,
}

impl RunSlice {
    /// The whole run.
    fn whole(run: Run) -> Self {
        RunSlice {
            path: Arc::new(run.path),
            items: run.items,
            bytes: run.bytes,
            offset: 0,
            max_encoded: run.max_encoded,
            lower: None,
            upper: None,
        }
    }
}

/// Reads one run slice sequentially; the file is deleted when its last reader or slice is dropped.
struct RunReader {
    path: Arc<TempPath>,
    input: BufReader<File>,
    remaining: u64,
    offset: u64,
    max_encoded: u64,
    /// The slice ends before the first item at or above this one.
    upper: Option<Arc<Vec<u8>>>,
    /// What the merge reserved for this reader.
    cost: u64,
}

impl RunReader {
    /// Reads the next item of the slice into `buf` and checks it; false at the end of the slice.
    fn next<C: SortCodec>(&mut self, codec: &C, buf: &mut Vec<u8>) -> Result<bool, SortError> {
        if !self.next_item(codec, buf)? {
            return Ok(false);
        }
        if self.upper.as_ref().is_some_and(|upper| codec.compare_encoded(buf, upper) != Ordering::Less) {
            self.remaining = 0;
            return Ok(false);
        }
        Ok(true)
    }

    /// Reads the next item of the run into `buf` and checks it; false at the end of the run.
    fn next_item<C: SortCodec>(&mut self, codec: &C, buf: &mut Vec<u8>) -> Result<bool, SortError> {
        if self.remaining == 0 {
            return Ok(false);
        }
        let (len, n) = self.read_len()?;
        if len > self.max_encoded {
            let msg = format!("item length {len} is above the run's largest item ({})", self.max_encoded);
            return Err(self.decode_error(io::Error::new(io::ErrorKind::InvalidData, msg)));
        }
        buf.clear();
        buf.resize(len as usize, 0);
        io::Read::read_exact(&mut self.input, buf).map_err(|e| self.read_error(e))?;
        codec.check(buf).map_err(|e| self.decode_error(e))?;
        self.offset += n + len;
        self.remaining -= 1;
        Ok(true)
    }

    /// Reads an item's LEB128 length: its value and how many bytes it took.
    fn read_len(&mut self) -> Result<(u64, u64), SortError> {
        let mut len = [0u8; 10];
        for n in 0..len.len() {
            let byte = match self.input.fill_buf() {
                Ok([b, ..]) => *b,
                Ok([]) => return Err(self.read_error(io::ErrorKind::UnexpectedEof.into())),
                Err(e) => return Err(self.read_error(e)),
            };
            self.input.consume(1);
            len[n] = byte;
            if byte < 0x80 {
                return match get_varint(&len[..=n]) {
                    Some((v, _)) => Ok((v, n as u64 + 1)),
                    None => Err(self.decode_error(io::Error::new(io::ErrorKind::InvalidData, "bad item length"))),
                };
            }
        }
        Err(self.decode_error(io::Error::new(io::ErrorKind::InvalidData, "item length over 10 bytes")))
    }

    /// A short read is corruption (the run's item count is known); anything else is I/O.
    fn read_error(&self, e: io::Error) -> SortError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.decode_error(io::Error::new(io::ErrorKind::UnexpectedEof, "run file is truncated"))
        } else {
            SortError::Io { path: self.path.to_path_buf(), source: e }
        }
    }

    fn decode_error(&self, source: io::Error) -> SortError {
        SortError::Decode { path: self.path.to_path_buf(), offset: self.offset, source }
    }
}

/// Where a merged item was read: its run's index in the merge and its byte offset there.
struct Origin {
    run: usize,
    offset: u64,
}

/// A k-way merge of runs.
struct Merger<C: SortCodec> {
    heap: BinaryHeap<Head<C>>,
    readers: Vec<Option<RunReader>>,
    /// Each run's path, kept after its reader is gone, to name it in an error.
    paths: Vec<PathBuf>,
    /// The item last handed out (the former head of its run).
    out: Vec<u8>,
    /// Reserved bytes of exhausted readers, not yet given back by the owner of the reservation.
    freed: u64,
}

impl<C: SortCodec> Merger<C> {
    /// Opens every run slice and reads its first item. Runs that cannot be opened are still deleted
    /// (dropped).
    fn new(ctx: &Ctx<C>, slices: Vec<RunSlice>) -> Result<Self, SortError> {
        let mut merger = Merger {
            heap: BinaryHeap::with_capacity(slices.len()),
            readers: Vec::with_capacity(slices.len()),
            paths: Vec::with_capacity(slices.len()),
            out: Vec::new(),
            freed: 0,
        };
        for slice in slices {
            let cost = ctx.io_buffer as u64 + 2 * slice.max_encoded;
            let opened = File::open(&**slice.path).and_then(|mut f| {
                io::Seek::seek(&mut f, io::SeekFrom::Start(slice.offset))?;
                Ok(f)
            });
            let file = opened.map_err(|source| SortError::Io { path: slice.path.to_path_buf(), source })?;
            merger.paths.push(slice.path.to_path_buf());
            let mut reader = RunReader {
                input: BufReader::with_capacity(ctx.io_buffer, file),
                remaining: slice.items,
                offset: slice.offset,
                max_encoded: slice.max_encoded,
                upper: slice.upper,
                cost,
                path: slice.path,
            };
            let index = merger.readers.len();
            let mut item = Vec::new();
            let mut offset = reader.offset;
            let mut more = reader.next(&*ctx.codec, &mut item)?;
            // Items below the range's start (read from the index entry before it) are skipped.
            if let Some(lower) = &slice.lower {
                while more && ctx.codec.compare_encoded(&item, lower) == Ordering::Less {
                    offset = reader.offset;
                    more = reader.next(&*ctx.codec, &mut item)?;
                }
            }
            if more {
                merger.heap.push(Head { item, run: index, offset, codec: Arc::clone(&ctx.codec) });
                merger.readers.push(Some(reader));
            } else {
                merger.freed += cost;
                merger.readers.push(None);
            }
        }
        Ok(merger)
    }

    /// The smallest remaining item, with where it was read.
    fn next(&mut self) -> Result<Option<(&[u8], Origin)>, SortError> {
        let Some(mut top) = self.heap.peek_mut() else { return Ok(None) };
        let (run, offset) = (top.run, top.offset);
        let reader = self.readers.get_mut(run).and_then(Option::as_mut);
        let next_offset = reader.as_ref().map_or(0, |r| r.offset);
        let more = match reader {
            Some(reader) => reader.next(&*top.codec, &mut self.out)?,
            None => false,
        };
        if more {
            // The next item becomes the run's head (re-sifted when `top` is dropped); the old one is out.
            std::mem::swap(&mut top.item, &mut self.out);
            top.offset = next_offset;
        } else {
            self.out = PeekMut::pop(top).item;
            if let Some(reader) = self.readers.get_mut(run).and_then(Option::take) {
                self.freed += reader.cost;
            }
        }
        Ok(Some((&self.out, Origin { run, offset })))
    }
}

enum Inner<C: SortCodec> {
    /// Nothing spilled: the arena's items, in the order of `order` (its sorted index).
    Memory {
        arena: Arena,
        order: std::vec::IntoIter<Slot>,
    },
    Merge(FinalMerge<C>),
}

/// The sorted items, in the codec's order, decoded one at a time. Holds the memory and the run files it
/// reads until it is exhausted or dropped; after an error (or cancellation) it yields nothing more and has
/// let go of both.
pub struct Sorted<C: SortCodec> {
    inner: Inner<C>,
    codec: Arc<C>,
    reservation: MemoryReservation,
    cancel: Arc<AtomicBool>,
    yielded: u64,
    remaining: u64,
    done: bool,
}

impl<C: SortCodec> Sorted<C> {
    /// Lets go of the memory and deletes the remaining run files.
    fn release(&mut self) {
        self.done = true;
        self.inner = Inner::Memory { arena: Arena::default(), order: Vec::new().into_iter() };
        self.reservation.free();
    }
}

impl<C: SortCodec> Iterator for Sorted<C> {
    type Item = Result<C::Item, SortError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let codec = &*self.codec;
        let result = match &mut self.inner {
            Inner::Memory { arena, order } => match order.next() {
                Some(Slot { offset, .. }) => codec.decode(arena.item(offset)).map(Some).map_err(SortError::Buffered),
                None => Ok(None),
            },
            Inner::Merge(merge) => {
                if self.remaining > 0
                    && self.yielded.is_multiple_of(CANCEL_CHECK_EVERY)
                    && self.cancel.load(AtomicOrdering::Relaxed)
                {
                    Err(SortError::Cancelled)
                } else {
                    let next = match merge.next(&self.reservation) {
                        Ok(Some((bytes, Origin { run, offset }))) => codec.decode(bytes).map(Some).map_err(|source| {
                            let path = merge.current.as_ref().and_then(|m| m.paths.get(run)).cloned();
                            SortError::Decode { path: path.unwrap_or_default(), offset, source }
                        }),
                        Ok(None) => Ok(None),
                        Err(e) => Err(e),
                    };
                    let freed = merge.current.as_mut().map_or(0, |m| std::mem::take(&mut m.freed));
                    self.reservation.shrink(freed.min(self.reservation.size()));
                    next
                }
            }
        };
        match result {
            Ok(Some(item)) => {
                self.yielded += 1;
                self.remaining = self.remaining.saturating_sub(1);
                Some(Ok(item))
            }
            Ok(None) => {
                self.release();
                None
            }
            Err(e) => {
                self.release();
                Some(Err(e))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            return (0, Some(0));
        }
        let remaining = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        match self.inner {
            Inner::Memory { .. } => (remaining, Some(remaining)),
            // An error may end the merge early, and takes the place of an item.
            Inner::Merge(_) => (0, Some(remaining)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryPool;
    use proptest::prelude::*;
    use std::sync::mpsc;

    type Item = (Vec<u8>, u64);

    /// `(key, n)` ordered by key then n; decode fails on `n == fail_on`.
    struct PairCodec {
        fail_on: Option<u64>,
    }

    impl SortCodec for PairCodec {
        type Item = Item;
        fn encode(&self, item: &Item, out: &mut Vec<u8>) {
            out.extend_from_slice(&item.1.to_le_bytes());
            out.extend_from_slice(&item.0);
        }
        fn decode(&self, bytes: &[u8]) -> io::Result<Item> {
            let (n, key) = bytes
                .split_first_chunk::<8>()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short item"))?;
            let n = u64::from_le_bytes(*n);
            if Some(n) == self.fail_on {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "marker item"));
            }
            Ok((key.to_vec(), n))
        }
        /// The key's first byte, plus one (0 for an empty key).
        fn sort_prefix(&self, item: &[u8]) -> u32 {
            item.get(8).map_or(0, |&b| u32::from(b) + 1)
        }
        fn compare_encoded(&self, a: &[u8], b: &[u8]) -> Ordering {
            match (a.split_first_chunk::<8>(), b.split_first_chunk::<8>()) {
                (Some((na, ka)), Some((nb, kb))) => {
                    ka.cmp(kb).then(u64::from_le_bytes(*na).cmp(&u64::from_le_bytes(*nb)))
                }
                _ => a.cmp(b),
            }
        }
    }

    fn items(n: usize, seed: u64) -> Vec<Item> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n as u64)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = (x % 13) as usize;
                let key = (0..len).map(|j| (x >> (j * 5)) as u8 % 8 + b'a').collect();
                (key, i % 1000)
            })
            .collect()
    }

    struct Setup {
        pool: Arc<MemoryPool>,
        dir: tempfile::TempDir,
        cancel: Arc<AtomicBool>,
    }

    impl Setup {
        fn new(limit: u64) -> Self {
            Setup {
                pool: MemoryPool::new(limit),
                dir: tempfile::tempdir().unwrap(),
                cancel: Arc::new(AtomicBool::new(false)),
            }
        }
        fn sorter(&self, fail_on: Option<u64>, io_buffer: usize, fan_in: usize) -> ExternalSorter<PairCodec> {
            ExternalSorter::new(
                Arc::new(PairCodec { fail_on }),
                self.pool.reservation("extsort[test]"),
                self.dir.path().to_path_buf(),
                Arc::clone(&self.cancel),
            )
            .with_io_buffer_size(io_buffer)
            .with_max_fan_in(fan_in)
        }
        fn spill_files(&self) -> usize {
            std::fs::read_dir(self.dir.path()).unwrap().count()
        }
        /// Never over the budget, and every file and byte given back.
        fn assert_all_given_back(&self) {
            assert!(self.pool.peak() <= self.pool.limit());
            assert_eq!(self.spill_files(), 0);
            assert_eq!(self.pool.reserved(), 0);
        }
    }

    fn sort_all(setup: &Setup, input: &[Item], io_buffer: usize, fan_in: usize) -> (Vec<Item>, SortStats) {
        sort_in_ranges(setup, input, io_buffer, fan_in, 1)
    }

    fn sort_in_ranges(
        setup: &Setup,
        input: &[Item],
        io_buffer: usize,
        fan_in: usize,
        ranges: usize,
    ) -> (Vec<Item>, SortStats) {
        let mut sorter = setup.sorter(None, io_buffer, fan_in).with_merge_ranges(ranges);
        for item in input {
            sorter.push(item.clone()).unwrap();
        }
        let (sorted, stats) = sorter.finish().unwrap();
        let out = sorted.collect::<Result<Vec<_>, _>>().unwrap();
        (out, stats)
    }

    fn std_sorted(input: &[Item]) -> Vec<Item> {
        let mut v = input.to_vec();
        v.sort();
        v
    }

    #[test]
    fn sorted_runs_are_merged_with_pushed_items_without_a_sort() {
        // Three runs written at once (as peers' streams arrive) plus pushed items: one sorted output; the
        // runs' items are counted, and every file is gone after.
        let setup = Setup::new(64 << 20);
        let mut sorter = setup.sorter(None, 4096, 16);
        let input = items(30_000, 5);
        let mut runs: Vec<Vec<Item>> = input.chunks(9_000).map(std_sorted).collect();
        let pushed = runs.pop().unwrap();
        let writers: Vec<_> = runs.iter().map(|_| sorter.run_writer().unwrap()).collect();
        for (mut w, run) in writers.into_iter().zip(&runs) {
            for item in run {
                w.push(item.clone()).unwrap();
            }
            sorter.add_run(w.into_run().unwrap());
        }
        for item in pushed {
            sorter.push(item).unwrap();
        }
        let (sorted, stats) = sorter.finish().unwrap();
        assert_eq!(stats.items, input.len() as u64);
        assert_eq!(sorted.collect::<Result<Vec<_>, _>>().unwrap(), std_sorted(&input));
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0, "the writers' buffers were given back");
    }

    #[test]
    fn encoded_items_go_into_a_sorted_run_checked_not_decoded() {
        let setup = Setup::new(64 << 20);
        let mut sorter = setup.sorter(Some(99), 4096, 16);
        let codec = PairCodec { fail_on: Some(99) };
        let mut w = sorter.run_writer().unwrap();
        let mut input = items(2_000, 3);
        input.retain(|i| i.1 != 99);
        for item in std_sorted(&input) {
            let mut bytes = Vec::new();
            codec.encode(&item, &mut bytes);
            w.push_encoded(&bytes).unwrap();
        }
        sorter.add_run(w.into_run().unwrap());
        let (sorted, _) = sorter.finish().unwrap();
        assert_eq!(sorted.collect::<Result<Vec<_>, _>>().unwrap(), std_sorted(&input));
        // Bytes the codec refuses (the marker item) are an error, as are items out of order.
        let mut w = setup.sorter(Some(99), 4096, 16).run_writer().unwrap();
        let mut bad = Vec::new();
        codec.encode(&(b"x".to_vec(), 99), &mut bad);
        assert!(matches!(w.push_encoded(&bad), Err(SortError::Received(_))));
    }

    #[test]
    fn a_sorted_run_out_of_order_is_refused() {
        let setup = Setup::new(64 << 20);
        let sorter = setup.sorter(None, 4096, 16);
        let mut w = sorter.run_writer().unwrap();
        w.push((b"b".to_vec(), 1)).unwrap();
        w.push((b"b".to_vec(), 2)).unwrap();
        let err = w.push((b"a".to_vec(), 3)).unwrap_err();
        assert!(matches!(err, SortError::OutOfOrder { item: 2, .. }), "{err}");
    }

    #[test]
    fn leaving_free_keeps_room_for_another_sorter_of_the_pool() {
        let setup = Setup::new(4 << 20);
        let input = items(300_000, 9);
        let mut greedy = setup.sorter(None, 4096, 16).leaving_free(1 << 20);
        for item in &input {
            greedy.push(item.clone()).unwrap();
        }
        assert!(setup.pool.reserved() <= 3 << 20, "the buffer stopped growing with 1 MiB free");
        assert!(greedy.stats.runs > 0, "it spilled instead");
        // Another consumer of the pool still gets its minimum and sorts.
        let (out, _) = sort_all(&setup, &input[..1000], 4096, 16);
        assert_eq!(out, std_sorted(&input[..1000]));
        let (sorted, _) = greedy.finish().unwrap();
        assert_eq!(sorted.collect::<Result<Vec<_>, _>>().unwrap(), std_sorted(&input));
    }

    #[test]
    fn in_memory_when_it_fits() {
        let setup = Setup::new(64 << 20);
        let input = items(5000, 1);
        let (out, stats) = sort_all(&setup, &input, 4096, 16);
        assert_eq!(out, std_sorted(&input));
        assert_eq!((stats.items, stats.runs, stats.merge_levels, stats.spilled_bytes), (5000, 0, 0, 0));
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0);
        assert!(stats.peak_reserved > 0 && setup.pool.peak() <= setup.pool.limit());
    }

    #[test]
    fn many_runs_and_multi_level_merge_by_fan_in() {
        let setup = Setup::new(48 << 10);
        let input = items(30_000, 2);
        let (out, stats) = sort_all(&setup, &input, 1024, 4);
        assert_eq!(out, std_sorted(&input));
        assert!(stats.runs >= 10, "{stats:?}");
        assert!(stats.merge_levels >= 2, "{stats:?}");
        assert!(stats.spilled_bytes > 30_000 * 12, "{stats:?}");
        assert!(stats.peak_reserved <= setup.pool.limit());
        assert!(setup.pool.peak() <= setup.pool.limit());
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0);
    }

    #[test]
    fn multi_level_merge_forced_by_memory() {
        // 24 KiB: after spilling, about five 4 KiB readers fit, far fewer than the runs.
        let setup = Setup::new(24 << 10);
        let input = items(20_000, 3);
        let (out, stats) = sort_all(&setup, &input, 4096, 1000);
        assert_eq!(out, std_sorted(&input));
        assert!(stats.runs >= 10 && stats.merge_levels >= 2, "{stats:?}");
        assert!(setup.pool.peak() <= setup.pool.limit());
        assert_eq!(setup.spill_files(), 0);
    }

    #[test]
    fn spill_dir_empty_after_decode_error_mid_merge() {
        let input = items(30_000, 4);
        // Intermediate merges (fan-in 2) hit the marker: finish fails.
        let setup = Setup::new(48 << 10);
        let mut sorter = setup.sorter(Some(777), 1024, 2);
        for item in &input {
            sorter.push(item.clone()).unwrap();
        }
        assert!(setup.spill_files() >= 10);
        let err = sorter.finish().err().expect("the marker must fail the merge");
        match &err {
            SortError::Decode { path, .. } => {
                assert!(path.file_name().unwrap().to_string_lossy().starts_with("dsort-run-"), "{err}")
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("byte offset"), "{err}");
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0);

        // A wide fan-in fails in the final merge, while iterating.
        let setup = Setup::new(256 << 10);
        let mut sorter = setup.sorter(Some(777), 1024, 1000);
        for item in &input {
            sorter.push(item.clone()).unwrap();
        }
        let (mut sorted, stats) = sorter.finish().unwrap();
        assert_eq!(stats.merge_levels, 1, "{stats:?}");
        let err = sorted.find_map(Result::err).expect("the marker must fail the iteration");
        assert!(matches!(err, SortError::Decode { .. }), "{err}");
        assert!(sorted.next().is_none(), "the iterator is fused after an error");
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0);
    }

    #[test]
    fn dropping_the_iterator_early_cleans_up() {
        let setup = Setup::new(48 << 10);
        let mut sorter = setup.sorter(None, 1024, 8);
        for item in items(10_000, 5) {
            sorter.push(item).unwrap();
        }
        let (mut sorted, _) = sorter.finish().unwrap();
        for _ in 0..10 {
            sorted.next().unwrap().unwrap();
        }
        assert!(setup.spill_files() > 0);
        assert!(setup.pool.reserved() > 0);
        drop(sorted);
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0);

        // Dropping the sorter before finish, too.
        let mut sorter = setup.sorter(None, 1024, 8);
        for item in items(10_000, 6) {
            sorter.push(item).unwrap();
        }
        assert!(setup.spill_files() > 0);
        drop(sorter);
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0);
    }

    #[test]
    fn cancellation_stops_work() {
        let setup = Setup::new(48 << 10);
        let mut sorter = setup.sorter(None, 1024, 8);
        for item in items(10_000, 7) {
            sorter.push(item).unwrap();
        }
        let (mut sorted, _) = sorter.finish().unwrap();
        sorted.next().unwrap().unwrap();
        setup.cancel.store(true, AtomicOrdering::Relaxed);
        let rest: Vec<_> = sorted.by_ref().collect();
        assert!(rest.len() <= CANCEL_CHECK_EVERY as usize, "stopped after {} items", rest.len());
        assert!(matches!(rest.last(), Some(Err(SortError::Cancelled))));
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0);

        // Pushing and finishing see the flag too.
        let mut sorter = setup.sorter(None, 1024, 8);
        assert!(matches!(sorter.push((vec![1], 1)), Err(SortError::Cancelled)));
        assert!(matches!(sorter.finish(), Err(SortError::Cancelled)));
    }

    #[test]
    fn too_little_memory_is_a_clear_error() {
        let setup = Setup::new(1000);
        let mut sorter = setup.sorter(None, 4096, 8);
        let err = sorter.push((vec![1], 1)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("needs at least 12 KiB") && msg.contains("extsort[test]"), "{msg}");

        // One item bigger than the whole budget.
        let setup = Setup::new(16 << 10);
        let mut sorter = setup.sorter(None, 1024, 8);
        sorter.push((vec![0; 10], 1)).unwrap();
        let err = sorter.push((vec![0; 32 << 10], 2)).unwrap_err();
        assert!(err.to_string().contains("does not fit in memory even after spilling"), "{err}");
        drop(sorter);
        assert_eq!(setup.spill_files(), 0);
        assert_eq!(setup.pool.reserved(), 0);
    }

    #[test]
    fn the_arena_spills_before_its_offsets_would_overflow() {
        let setup = Setup::new(64 << 20);
        let mut sorter = setup.sorter(None, 1024, 8).with_arena_limit(4096);
        let input = items(2000, 8);
        for item in &input {
            sorter.push(item.clone()).unwrap();
        }
        assert!(sorter.stats().runs >= 5, "{:?}", sorter.stats());
        // The arena never grew past its first step: it spilled at its limit instead.
        assert_eq!(sorter.buffer_bytes(), (MIN_ARENA_GROW + MIN_INDEX_GROW * SLOT) as u64);
        let (sorted, _) = sorter.finish().unwrap();
        assert_eq!(sorted.collect::<Result<Vec<_>, _>>().unwrap(), std_sorted(&input));
        assert_eq!(setup.spill_files(), 0);
    }

    /// A sorter whose second spill (its first in the background: the first buffer took the whole pool)
    /// stops after sorting, tells `started`, and waits for `release` (or for it to be dropped) to write.
    fn gated_sorter(
        setup: &Setup,
        on_gate: impl Fn() + Send + Sync + 'static,
    ) -> (ExternalSorter<PairCodec>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (started_tx, started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let spills = std::sync::atomic::AtomicUsize::new(0);
        let sorter = setup.sorter(None, 4096, 16).with_spill_gate(move || {
            if spills.fetch_add(1, AtomicOrdering::Relaxed) == 1 {
                on_gate();
                started_tx.send(()).ok();
                release_rx.lock().unwrap_or_else(PoisonError::into_inner).recv().ok();
            }
        });
        (sorter, started, release)
    }

    /// Pushes `input` until a spill is running in the background; returns how many it pushed.
    fn push_until_spilling(sorter: &mut ExternalSorter<PairCodec>, input: &[Item]) -> usize {
        let mut n = 0;
        while sorter.stats().runs == 0 || !sorter.spilling() {
            let item = input.get(n).expect("the input is large enough for two spills");
            sorter.push(item.clone()).unwrap();
            n += 1;
        }
        n
    }

    #[test]
    fn pushes_continue_while_a_spill_is_written_within_the_budget() {
        let setup = Setup::new(4 << 20);
        let (mut sorter, started, release) = gated_sorter(&setup, || {});
        let input = items(600_000, 11);
        let mut pushed = push_until_spilling(&mut sorter, &input);
        started.recv().unwrap();
        // The spill is held between its sort and its write: every push below must return without it.
        let more = 20_000;
        let (done_tx, done) = mpsc::channel();
        std::thread::scope(|scope| {
            let sorter = &mut sorter;
            let batch = &input[pushed..pushed + more];
            let pool = &setup.pool;
            let pusher = scope.spawn(move || {
                let buffered = sorter.buffered_items();
                for item in batch {
                    sorter.push(item.clone()).unwrap();
                }
                done_tx.send((sorter.spilling(), sorter.buffered_items() - buffered, pool.reserved())).ok();
            });
            // A timeout only turns a hang (pushes waiting for the held spill) into a failure.
            let seen = done.recv_timeout(std::time::Duration::from_secs(120));
            drop(release);
            let (still_spilling, buffered, reserved) = seen.expect("pushes waited for the spill in flight");
            assert!(still_spilling, "the held spill was still in flight after the pushes");
            assert_eq!(buffered, more, "every push went into the fresh buffer");
            assert!(reserved <= setup.pool.limit());
            pusher.join().unwrap();
        });
        pushed += more;
        for item in &input[pushed..] {
            sorter.push(item.clone()).unwrap();
        }
        let (sorted, stats) = sorter.finish().unwrap();
        assert_eq!(sorted.collect::<Result<Vec<_>, _>>().unwrap(), std_sorted(&input));
        assert!(stats.runs >= 3, "{stats:?}");
        assert!(stats.peak_reserved <= setup.pool.limit(), "{stats:?}");
        setup.assert_all_given_back();
    }

    #[test]
    fn a_background_spill_error_surfaces_with_its_path_and_leaves_nothing() {
        let setup = Setup::new(4 << 20);
        // The spill folder disappears while the run is sorted: its file cannot be created.
        let dir = setup.dir.path().to_path_buf();
        let gone = dir.clone();
        let (mut sorter, started, release) = gated_sorter(&setup, move || {
            std::fs::remove_dir_all(&gone).unwrap();
        });
        let input = items(600_000, 12);
        let pushed = push_until_spilling(&mut sorter, &input);
        started.recv().unwrap();
        drop(release);
        let pushing = input[pushed..].iter().try_for_each(|item| sorter.push(item.clone()));
        let err = match pushing {
            Err(e) => {
                drop(sorter);
                e
            }
            Ok(()) => sorter.finish().err().expect("the failed spill must fail the sort"),
        };
        assert!(matches!(&err, SortError::Io { path, .. } if *path == dir), "{err}");
        assert_eq!(setup.pool.reserved(), 0, "the failed spill gave its buffer back; the sorter is gone");
    }

    #[test]
    fn key_ranges_merged_in_parallel_give_the_one_merge_order() {
        // Many runs, equal items across runs (n repeats every 1000 items), merged in 1 to 5 ranges.
        let input = items(60_000, 13);
        let setup = Setup::new(512 << 10);
        let (one, stats) = sort_in_ranges(&setup, &input, 1024, 128, 1);
        assert_eq!(one, std_sorted(&input));
        assert!(stats.runs >= 3 && stats.merge_ranges == 1, "{stats:?}");
        for ranges in 2..=5 {
            let setup = Setup::new(512 << 10);
            let (out, stats) = sort_in_ranges(&setup, &input, 1024, 128, ranges);
            assert!(out == one, "{ranges} ranges: not the one merge's order");
            assert_eq!(stats.merge_ranges, ranges as u32, "{stats:?}");
            assert!(stats.peak_reserved <= setup.pool.limit(), "{stats:?}");
            setup.assert_all_given_back();
        }
    }

    #[test]
    fn an_early_drop_or_a_failing_range_stops_the_range_threads_and_cleans_up() {
        let input = items(60_000, 14);
        let setup = Setup::new(1 << 20);
        let mut sorter = setup.sorter(None, 1024, 128).with_merge_ranges(4);
        for item in &input {
            sorter.push(item.clone()).unwrap();
        }
        let (mut sorted, stats) = sorter.finish().unwrap();
        assert_eq!(stats.merge_ranges, 4, "{stats:?}");
        sorted.next().unwrap().unwrap();
        drop(sorted);
        setup.assert_all_given_back();

        // The marker item (n == 999, the largest n of the largest keys) is in the last range: its thread
        // fails, and the error comes out in order, after every item before it, naming a run file.
        let mut sorter = setup.sorter(Some(999), 1024, 128).with_merge_ranges(4);
        for item in &input {
            sorter.push(item.clone()).unwrap();
        }
        let (sorted, stats) = sorter.finish().unwrap();
        assert_eq!(stats.merge_ranges, 4, "{stats:?}");
        let got: Vec<_> = sorted.collect();
        let first_marker = std_sorted(&input).iter().position(|i| i.1 == 999).unwrap();
        assert!(got.len() > 1 && got.len() <= first_marker + 1, "{} items before the error", got.len());
        match got.last() {
            Some(Err(e @ SortError::Decode { path, .. })) => {
                assert!(path.file_name().unwrap().to_string_lossy().starts_with("dsort-run-"), "{e}")
            }
            other => {
                panic!("expected a decode error last, got {:?}", other.map(|r| r.as_ref().err().map(|e| e.to_string())))
            }
        }
        setup.assert_all_given_back();
    }

    #[test]
    fn empty_input() {
        let setup = Setup::new(1 << 20);
        let (sorted, stats) = setup.sorter(None, 1024, 8).finish().unwrap();
        assert_eq!(sorted.count(), 0);
        assert_eq!(stats, SortStats::default());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn matches_std_sort(
            input in proptest::collection::vec((proptest::collection::vec(0u8..4, 0..10), 0u64..50), 0..3000),
            limit_kib in 16u64..256,
            io_buffer in 512usize..4096,
            fan_in in 2usize..12,
            ranges in 1usize..5,
        ) {
            let setup = Setup::new(limit_kib << 10);
            let (out, stats) = sort_in_ranges(&setup, &input, io_buffer, fan_in, ranges);
            prop_assert_eq!(out, std_sorted(&input));
            prop_assert_eq!(stats.items, input.len() as u64);
            prop_assert!(setup.pool.peak() <= setup.pool.limit());
            prop_assert!(stats.peak_reserved <= setup.pool.limit());
            prop_assert_eq!(setup.spill_files(), 0);
            prop_assert_eq!(setup.pool.reserved(), 0);
        }
    }
}
