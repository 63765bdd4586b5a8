//! Cutting and creation: the sorted records stream in, are cut into output shards by the rule (minimum
//! size, record count, or an external key map's groups), and each output shard is written by its own
//! worker while the next one is being cut. At most `concurrency` shards are being written at once (and
//! as many being synced, which holds no buffers) and each worker's queue is bounded, so memory stays
//! bounded whatever the dataset size. Every shard is published atomically (temporary name, sync,
//! rename) or, in a dry run, written nowhere.

use crate::extract::Decoded;
use crate::files::{FileKind, OpenFiles};
use crate::key::{Loc, RecordItem};
use crate::memory::MemoryPool;
use crate::template::Template;
use shardio::{Bucket, EntrySource, Format, PendingObject, ShardWriter, Sink, WriteOptions};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

/// Records handed to an output shard's worker at once: one channel operation (and at most one wake-up
/// of the worker) per batch instead of per record. Per record, the wake-ups cost more than the record's
/// copy on a 2-core machine (measured: 330k context switches and 40% longer creation for 200k records).
const BATCH: usize = 64;
/// Buffered shards leave this share of the pool free (an eighth, like decoded copies and shard indexes):
/// buffering only buys parallel writers, and the merge feeding the cutter may still need to grow.
const FREE_SHARE_DIVISOR: u64 = 8;
/// Batches queued to one output shard's worker (with the batch being filled: at most 320 records).
const QUEUE: usize = 4;
/// Record bytes one writer fetches from an object store at once: the larger, the closer the records of one
/// input shard and the fewer bytes read for nothing between them (shuffled small records); paid from the
/// pool, smaller windows when it is short.
const FETCH_WINDOWS: [u64; 3] = [64 << 20, 16 << 20, 4 << 20];
/// Records in one fetch window at most (small records: bounds the window's metadata and latency).
const FETCH_RECORDS: usize = 4096;

/// Memory an open output shard's writer holds (buffers, codec state), by format. The job reserves it
/// for all writers before extraction starts, so creation never waits for memory (waiting while other
/// phases hold the pool could deadlock).
pub fn writer_mem(format: Format) -> u64 {
    match format {
        Format::Tar | Format::Zip => 512 << 10,
        Format::TarGz => 1 << 20,
        Format::TarLz4 => 3 << 20,
        Format::TarZst => 4 << 20,
    }
}

/// How sorted records become output shards.
pub enum Cut {
    /// Close a shard as soon as its content size reaches this many bytes.
    Size(u64),
    /// Close a shard when it holds this many records.
    Records(u64),
}

impl Cut {
    pub fn closes(&self, bytes: u64, records: u64) -> bool {
        match self {
            Cut::Size(n) => bytes >= *n,
            Cut::Records(n) => records >= *n,
        }
    }
}

/// Names of output shards, one group per template (one group without an external key map).
pub struct Group {
    pub template: Template,
    /// Extension appended to names without a known archive extension (`None`: names used as written).
    pub append_ext: Option<String>,
    next: u64,
}

impl Group {
    pub fn new(template: Template, append_ext: Option<String>) -> Self {
        Group { template, append_ext, next: 0 }
    }

    fn next_name(&mut self) -> Result<String, String> {
        let name = self.name_at(self.next)?;
        self.next += 1;
        Ok(name)
    }

    /// The name of this group's `index`-th output shard (extension appended when configured).
    pub fn name_at(&self, index: u64) -> Result<String, String> {
        let name = self.template.name_at(index).ok_or_else(|| {
            format!(
                "number of output shards exceeds the {} names of the output template {:?}",
                self.template.count().map_or("available".to_string(), |c| c.to_string()),
                self.template.as_str()
            )
        })?;
        Ok(match &self.append_ext {
            Some(ext) => crate::template::with_extension(&name, ext),
            None => name,
        })
    }
}

/// Where creation reads record bytes from: the input bucket (local files read in place, object-store
/// objects by ranged GETs) and the decoded copies.
pub struct Sources {
    pub bucket: Arc<dyn Bucket>,
    pub objects: Arc<Vec<String>>,
    /// Decoded copies by input shard; see [`Sources::release_after_use`].
    decoded: Vec<DecodedSlot>,
    /// Where a decoded copy goes when the pool asks for memory back (`None`: copies stay in memory).
    spill_dir: Option<std::path::PathBuf>,
    /// The input bucket is an object store (its objects have no local path).
    remote: bool,
    /// Input shards and decoded spill files being read, at most as many open as the open-file limit
    /// allows ([`crate::files::open_files_budget`]): any number of input shards works.
    files: OpenFiles,
    /// Input shards whose entry bytes arrive on a stream (another machine holds them): shard → stream.
    /// Invariant: a stream yields its entries' bytes in exactly the order creation consumes them.
    streamed: HashMap<u32, usize>,
    /// The streams, each with whether it carries only the decoded entries of its shards (the entries read
    /// in place come from the object store).
    streams: Vec<(Mutex<Box<dyn BufRead + Send>>, bool)>,
}

/// One input shard's decoded copy and the records still to be written from it. Invariant: once `left`
/// reaches zero the copy is dropped (its buffer and reservation go back); [`NOT_COUNTED`] keeps it until
/// the sources are dropped (a cluster target serves it to other targets, whose uses it cannot count).
struct DecodedSlot {
    copy: std::sync::RwLock<Option<Decoded>>,
    left: AtomicU64,
}

/// [`DecodedSlot::left`] of a copy whose uses are not counted.
const NOT_COUNTED: u64 = u64::MAX;

impl Sources {
    pub fn new(bucket: Arc<dyn Bucket>, objects: Arc<Vec<String>>, decoded: Vec<Option<Decoded>>) -> Self {
        let remote = objects.first().is_some_and(|o| bucket.local_path(o).is_none());
        Sources {
            remote,
            bucket,
            objects,
            decoded: decoded
                .into_iter()
                .map(|d| DecodedSlot { copy: std::sync::RwLock::new(d), left: AtomicU64::new(NOT_COUNTED) })
                .collect(),
            spill_dir: None,
            files: OpenFiles::new(crate::files::open_files_budget(
                std::thread::available_parallelism().map_or(1, |c| c.get()),
            )),
            streamed: HashMap::new(),
            streams: Vec::new(),
        }
    }

    /// Counts the records that will read each decoded copy (`uses[shard]`, from the records the sorter
    /// received), so that a copy is dropped, with its reservation, as soon as its last record is written
    /// or left out ([`Sources::consumed`]), instead of when the job ends. Copies may also be moved to
    /// files in `spill_dir` when the pool asks for memory ([`crate::memory::Spill`]).
    pub fn release_after_use(&mut self, uses: &[u64], spill_dir: &Path) {
        for (slot, &n) in self.decoded.iter_mut().zip(uses) {
            slot.left = AtomicU64::new(n);
            if n == 0 {
                *slot.copy.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
        self.spill_dir = Some(spill_dir.to_path_buf());
    }

    /// One record of `item.shard` is written or left out: drops the shard's decoded copy after its last
    /// counted record. A record that reads no decoded bytes changes nothing.
    pub fn consumed(&self, item: &RecordItem) {
        if !item.entries.iter().any(|e| matches!(e.loc, Loc::Decoded(_))) {
            return;
        }
        let Some(slot) = self.decoded.get(item.shard as usize) else { return };
        let before = slot.left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match n {
            NOT_COUNTED | 0 => None,
            n => Some(n - 1),
        });
        if before == Ok(1) {
            slot.copy.write().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// Bytes of decoded copies held in memory now (for tests and summaries).
    pub fn decoded_in_memory(&self) -> u64 {
        self.decoded
            .iter()
            .map(|s| match &*s.copy.read().unwrap_or_else(|p| p.into_inner()) {
                Some(Decoded::Mem(buf, _)) => buf.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Moves the largest in-memory decoded copy still needed to a file in the spill folder, giving its
    /// reservation back; `Ok(false)` when there is none (or no spill folder). Readers holding the old
    /// buffer finish their record from it.
    fn spill_largest(&self) -> Result<bool, String> {
        let Some(dir) = &self.spill_dir else { return Ok(false) };
        let largest = self
            .decoded
            .iter()
            .enumerate()
            .filter(|(_, s)| s.left.load(Ordering::Acquire) != 0)
            .filter_map(|(i, s)| match &*s.copy.read().unwrap_or_else(|p| p.into_inner()) {
                Some(Decoded::Mem(buf, _)) => Some((buf.len(), i)),
                _ => None,
            })
            .max();
        let Some((_, i)) = largest else { return Ok(false) };
        let mut copy = self.decoded[i].copy.write().unwrap_or_else(|p| p.into_inner());
        let Some(Decoded::Mem(buf, _)) = &*copy else { return Ok(true) }; // changed meanwhile: still progress
        let object = self.objects.get(i).map_or("?", String::as_str);
        let path = crate::extract::spill_decoded(dir, object, buf)
            .map_err(|e| format!("spilling the decoded copy of {object:?} to {}: {e}", dir.display()))?;
        *copy = Some(Decoded::File(path)); // drops the buffer (once no reader holds it) and its reservation
        Ok(true)
    }

    /// Read the entries of input shards `shards` from `stream`, which must yield their bytes in the order
    /// the shard being created consumes them (items in order, each item's entries in order).
    pub fn add_stream(&mut self, shards: impl IntoIterator<Item = u32>, stream: Box<dyn BufRead + Send>) {
        self.add_stream_of(shards, stream, false);
    }

    /// [`Sources::add_stream`]; with `decoded_only`, the stream carries only the shards' decoded entries
    /// (entries read in place come from the input bucket, an object store).
    pub fn add_stream_of(
        &mut self,
        shards: impl IntoIterator<Item = u32>,
        stream: Box<dyn BufRead + Send>,
        decoded_only: bool,
    ) {
        let i = self.streams.len();
        self.streams.push((Mutex::new(stream), decoded_only));
        for s in shards {
            self.streamed.insert(s, i);
        }
    }

    /// The local file of input shard `shard`; `None` when it lives in an object store.
    fn input(&self, shard: u32) -> Result<Option<Arc<File>>, String> {
        let object = self.objects.get(shard as usize).map_or("?", String::as_str);
        let Some(path) = self.bucket.local_path(object) else { return Ok(None) };
        self.files.get(FileKind::Input, shard, &path).map(Some).map_err(|e| format!("input shard {object:?}: {e}"))
    }

    /// The in-place bytes of `items`' entries that live in an object store, by (shard, offset): fetched all
    /// at once (the store merges neighbouring ranges and runs the requests concurrently).
    fn fetch_remote(&self, items: &[RecordItem]) -> Result<HashMap<(u32, u64), Vec<u8>>, String> {
        let mut by_shard: std::collections::BTreeMap<u32, Vec<std::ops::Range<u64>>> = Default::default();
        for it in items {
            for e in &it.entries {
                // Shards arriving on a stream are read from it, not fetched.
                let streamed = self.streamed.get(&it.shard).and_then(|&i| self.streams.get(i));
                if let Loc::Input(off) = e.loc
                    && self.remote
                    && streamed.is_none_or(|(_, decoded_only)| *decoded_only)
                {
                    by_shard.entry(it.shard).or_default().push(off..off.saturating_add(e.size));
                }
            }
        }
        let wants: Vec<(&str, Vec<std::ops::Range<u64>>)> = by_shard
            .iter()
            .map(|(s, r)| (self.objects.get(*s as usize).map_or("?", String::as_str), r.clone()))
            .collect();
        let got = self
            .bucket
            .read_many(&wants)
            .map_err(|e| format!("reading records of input shards from {}: {e}", self.bucket.name()))?;
        let mut out = HashMap::new();
        for ((shard, ranges), bytes) in by_shard.into_iter().zip(got) {
            for (r, b) in ranges.into_iter().zip(bytes) {
                out.insert((shard, r.start), b);
            }
        }
        Ok(out)
    }

    fn spilled(&self, shard: u32, path: &Path) -> Result<Arc<File>, String> {
        self.files.get(FileKind::Spill, shard, path).map_err(|e| format!("spill file {}: {e}", path.display()))
    }
}

/// Decoded copies are the memory creation can give back: spilled to files, the largest first.
impl crate::memory::Spill for Sources {
    fn spill(&self) -> Result<(), String> {
        self.spill_largest().map(|_| ())
    }
}

/// A sink that keeps nothing (dry runs): counts bytes, supports the seeks a zip writer makes.
#[derive(Default)]
pub struct NullSink {
    pos: u64,
    len: u64,
}

impl Write for NullSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pos += buf.len() as u64;
        self.len = self.len.max(self.pos);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for NullSink {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(n) => {
                self.pos = n;
                return Ok(n);
            }
            SeekFrom::End(d) => (self.len, d),
            SeekFrom::Current(d) => (self.pos, d),
        };
        self.pos = base.0.checked_add_signed(base.1).ok_or_else(|| io::Error::other("seek before start"))?;
        Ok(self.pos)
    }
}

impl Sink for NullSink {}

/// Creation settings.
pub struct CreateCtx<'a> {
    pub sources: &'a Sources,
    /// The output bucket; each shard is published into it atomically.
    pub out: &'a dyn Bucket,
    /// Folder for the staged copies of shards bound for an object store (the job's temp folder).
    pub staging: &'a Path,
    pub format: Format,
    pub options: WriteOptions,
    pub dry_run: bool,
    pub concurrency: usize,
    pub pool: &'a Arc<MemoryPool>,
    pub cancel: &'a AtomicBool,
    pub on_shard: &'a (dyn Fn(&str, u64) + Sync),
}

/// What creation did.
#[derive(Debug, Default, Clone)]
pub struct CreateStats {
    pub shards: u64,
    pub records: u64,
    pub bytes: u64,
    pub output_bytes: u64,
    pub names: Vec<String>,
}

/// An output shard being cut: buffered until it closes, then handed whole to its worker, or streamed to
/// its worker (started early) once its records no longer fit in memory. With one group, buffering lets
/// the cutter run a whole shard ahead, so `concurrency` shards are written at once; a shard streamed
/// from its start would keep one writer busy at a time. With several groups (an external key map,
/// where open shards could outnumber workers) records are always buffered.
struct Open {
    tx: Option<SyncSender<Vec<RecordItem>>>,
    /// Records of a streamed shard not yet sent to its worker (sent by [`BATCH`]).
    batch: Vec<RecordItem>,
    buffered: Vec<RecordItem>,
    /// Pool bytes paid for `buffered` (one group: the records' memory; several: their codec estimate).
    charged: u64,
    bytes: u64,
    records: u64,
}

/// What the sorted stream handed to [`cut_and_create`] may still reserve from the pool. An in-memory
/// sorted run holds its reservation for all its items already: keeping a share free "for it" as well
/// counted its memory twice, and sent every shard to the single-writer path once the pool was 7/8 full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// Everything it holds is already reserved (an in-memory sorted run, a spooled stream): creation's
    /// buffers may take every free byte of the pool.
    Reserved,
    /// A merge of spilled runs, which may still grow: creation's buffers leave a share of the pool free
    /// ([`FREE_SHARE_DIVISOR`]).
    Merging,
}

/// Cut the sorted stream and create every output shard. `route` picks a record's group (0 without an
/// external key map); `Ok(None)` drops the record (a reaction decided so).
pub fn cut_and_create<I>(
    ctx: &CreateCtx<'_>,
    sorted: I,
    groups: &mut [Group],
    cut: &Cut,
    feed: Feed,
    mut route: impl FnMut(&RecordItem) -> Result<Option<usize>, String>,
) -> Result<(CreateStats, StagedShards), CreateError>
where
    I: Iterator<Item = Result<RecordItem, String>>,
{
    let stats = Mutex::new(CreateStats::default());
    let staged = Mutex::new(StagedShards::default());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let output_bytes = AtomicU64::new(0);
    let workers = ctx.concurrency.max(1);
    let (token_tx, token_rx) = sync_channel::<()>(workers);
    for _ in 0..workers {
        let _ = token_tx.send(());
    }
    // A failure is kept (the first one); a cancellation only stops the others.
    let fail = |e: CreateError| {
        if let CreateError::Failed(m) = e {
            failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(m);
        }
        ctx.cancel.store(true, Ordering::Relaxed);
    };
    // Shards being synced and renamed after their writer gave its slot back (see below).
    let publishing = Permits::new(workers);
    let streaming = groups.len() == 1;
    let buffer_res = ctx.pool.reservation("output groups");
    let codec_size =
        |it: &RecordItem| (std::mem::size_of::<RecordItem>() + it.name.len() + it.entries.len() * 64) as u64;
    std::thread::scope(|scope| {
        // Start a worker for the next name of group `g` (waits for a free slot); it gives `charged` bytes
        // back to the pool when its shard is written.
        let spawn =
            |g: usize, groups: &mut [Group], charged: u64| -> Result<SyncSender<Vec<RecordItem>>, CreateError> {
                loop {
                    match token_rx.recv_timeout(std::time::Duration::from_millis(100)) {
                        Ok(()) => break,
                        Err(_) if ctx.cancel.load(Ordering::Relaxed) => return Err(failure_text(&failure)),
                        Err(_) => {}
                    }
                }
                let name = groups[g].next_name()?;
                let (tx, rx) = sync_channel::<Vec<RecordItem>>(QUEUE);
                let token_tx = token_tx.clone();
                let (stats, fail, output_bytes, publishing, staged) =
                    (&stats, &fail, &output_bytes, &publishing, &staged);
                let buffer_res = &buffer_res;
                scope.spawn(move || {
                    let mut slot = Some(token_tx);
                    let written = write_unpublished(ctx, &name, rx.into_iter().flatten());
                    buffer_res.shrink(charged.min(buffer_res.size()));
                    // Once its bytes are written, a shard gives its slot to the next one while it is synced (or
                    // uploaded) under its temporary name: the sync waits on the disk, not the CPU, and the next
                    // shard's writes keep the disk's queue full meanwhile (at most `workers` shards are being
                    // staged at once). Nothing is visible until the job publishes every staged shard.
                    let published = written.and_then(|(records, bytes, out, pending)| {
                        if let Some(pending) = pending {
                            let _permit = publishing.acquire();
                            if let Some(t) = slot.take() {
                                let _ = t.send(());
                            }
                            let shard = pending.stage().map_err(|e| CreateError::Failed(e.to_string()))?;
                            staged.lock().unwrap_or_else(|p| p.into_inner()).0.push((name.clone(), shard));
                        }
                        Ok((records, bytes, out))
                    });
                    match published {
                        Ok((records, bytes, out)) => {
                            output_bytes.fetch_add(out, Ordering::Relaxed);
                            (ctx.on_shard)(&name, bytes);
                            let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                            s.shards += 1;
                            s.records += records;
                            s.bytes += bytes;
                            s.names.push(name);
                        }
                        Err(e) => fail(e),
                    }
                    if let Some(t) = slot.take() {
                        let _ = t.send(());
                    }
                });
                Ok(tx)
            };
        let mut open: HashMap<usize, Open> = HashMap::new();
        // Send records to a worker by batches (waits while its queue is full).
        let send_all = |tx: &SyncSender<Vec<RecordItem>>, items: Vec<RecordItem>| -> Result<(), CreateError> {
            let mut items = items.into_iter().peekable();
            while items.peek().is_some() {
                tx.send(items.by_ref().take(BATCH).collect()).map_err(|_| failure_text(&failure))?;
            }
            Ok(())
        };
        let close = |o: Open, g: usize, groups: &mut [Group]| -> Result<(), CreateError> {
            if let Some(tx) = o.tx {
                if !o.batch.is_empty() {
                    tx.send(o.batch).map_err(|_| failure_text(&failure))?;
                }
                return Ok(()); // dropping the sender ends the worker's shard
            }
            if streaming {
                // The whole shard in one message (its queue is empty): the cutter goes on at once.
                let tx = spawn(g, groups, o.charged)?;
                return tx.send(o.buffered).map_err(|_| failure_text(&failure));
            }
            let tx = spawn(g, groups, 0)?;
            send_all(&tx, o.buffered)?;
            buffer_res.shrink(o.charged);
            Ok(())
        };
        let result: Result<(), CreateError> = (|| {
            for item in sorted {
                if ctx.cancel.load(Ordering::Relaxed) {
                    return Err(failure_text(&failure));
                }
                let item = item?;
                let Some(g) = route(&item)? else { continue };
                let o = match open.entry(g) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => v.insert(Open {
                        tx: None,
                        batch: Vec::new(),
                        buffered: Vec::new(),
                        charged: 0,
                        bytes: 0,
                        records: 0,
                    }),
                };
                o.bytes += item.size();
                o.records += 1;
                if o.tx.is_none() && streaming {
                    let size = item.mem_size() as u64;
                    let keep = match feed {
                        Feed::Reserved => 0,
                        Feed::Merging => ctx.pool.limit() / FREE_SHARE_DIVISOR,
                    };
                    // Short of memory, a shard asks the pool's spiller (decoded copies) once before it falls
                    // back to a single streamed writer.
                    let fits = buffer_res.try_grow_leaving(size, keep).is_ok()
                        || (o.records == 1
                            && ctx.sources.spill_largest()?
                            && buffer_res.try_grow_leaving(size, keep).is_ok());
                    if fits {
                        o.charged += size;
                        o.buffered.push(item);
                    } else {
                        // The shard's records no longer fit in memory: stream the rest to its writer.
                        let tx = spawn(g, groups, std::mem::take(&mut o.charged))?;
                        send_all(&tx, std::mem::take(&mut o.buffered))?;
                        o.batch.push(item);
                        o.tx = Some(tx);
                    }
                } else if let Some(tx) = &o.tx {
                    o.batch.push(item);
                    if o.batch.len() >= BATCH {
                        let batch = std::mem::replace(&mut o.batch, Vec::with_capacity(BATCH));
                        tx.send(batch).map_err(|_| failure_text(&failure))?;
                    }
                } else {
                    let size = codec_size(&item);
                    // Records of open groups have nowhere else to go: decoded copies are spilled first.
                    while buffer_res.try_grow(size).is_err() && ctx.sources.spill_largest()? {}
                    buffer_res.try_grow(size).map_err(|e| {
                        format!("records of the external key map's open output shards do not fit in memory: {e}")
                    })?;
                    o.charged += size;
                    o.buffered.push(item);
                }
                if cut.closes(o.bytes, o.records)
                    && let Some(o) = open.remove(&g)
                {
                    close(o, g, groups)?;
                }
            }
            // Last shards of every group, in group order.
            let mut rest: Vec<(usize, Open)> = open.drain().collect();
            rest.sort_by_key(|(g, _)| *g);
            for (g, o) in rest {
                close(o, g, groups)?;
            }
            Ok(())
        })();
        drop(open);
        if let Err(e) = result {
            fail(e);
        }
    });
    let staged = staged.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(CreateError::Failed(e)); // `staged` is dropped: every staged shard is removed
    }
    if ctx.cancel.load(Ordering::Relaxed) {
        return Err(CreateError::Cancelled);
    }
    let mut s = stats.into_inner().unwrap_or_else(|p| p.into_inner());
    s.output_bytes = output_bytes.into_inner();
    s.names.sort();
    Ok((s, staged))
}

/// Why creation stopped: a failure (its message names the shard and record), or the job's cancellation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<String> for CreateError {
    fn from(m: String) -> Self {
        CreateError::Failed(m)
    }
}

/// The error that stopped creation: the first failure, else the cancellation.
fn failure_text(f: &Mutex<Option<String>>) -> CreateError {
    f.lock().unwrap_or_else(|p| p.into_inner()).clone().map_or(CreateError::Cancelled, CreateError::Failed)
}

/// Output shards written whole and made durable under temporary names, none visible yet. [`publish`]
/// shows them all; dropped instead (a failed, cancelled or interrupted job), every one is removed (local
/// files deleted, uploads aborted), so a job leaves all its output shards or none, and an object that had
/// an output's name before the job is untouched unless the job succeeds.
///
/// [`publish`]: StagedShards::publish
#[derive(Debug, Default)]
pub struct StagedShards(Vec<(String, shardio::StagedObject)>);

impl StagedShards {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Publish every staged shard (renames, or upload completions), in name order. If one fails, the
    /// ones already published by this call are deleted again from `out` and the rest removed, so nothing
    /// of the job stays; an object they replaced is lost then (a rename or completion replaces it).
    pub fn publish(mut self, out: &dyn Bucket) -> Result<(), String> {
        self.0.sort_by(|a, b| a.0.cmp(&b.0));
        let mut done: Vec<String> = Vec::with_capacity(self.0.len());
        let mut rest = std::mem::take(&mut self.0).into_iter();
        for (name, shard) in rest.by_ref() {
            if let Err(e) = shard.publish() {
                let undone = done.iter().filter(|n| out.delete(n).is_ok()).count();
                return Err(format!(
                    "publishing output shard {name:?}: {e}; the {undone} of {} output shards published before it \
                     were removed again, the others never appeared",
                    done.len()
                ));
            }
            done.push(name);
        }
        Ok(())
    }
}

/// Write one output shard named `name` from its records, in order, and publish it (or, in a dry run,
/// count it); returns (records, content bytes, bytes written). Used by the streaming cutter here and by
/// the distributed creator, which receives a shard's records from the targets that cut it.
pub fn write_shard(
    ctx: &CreateCtx<'_>,
    name: &str,
    items: impl IntoIterator<Item = RecordItem>,
) -> Result<(u64, u64, u64), String> {
    write_committed(ctx, name, items, true)
}

/// [`write_shard`] into a staging folder, not synced ([`PendingObject::commit_unsynced`]): the caller syncs
/// it before it publishes it.
pub fn write_shard_staged(
    ctx: &CreateCtx<'_>,
    name: &str,
    items: impl IntoIterator<Item = RecordItem>,
) -> Result<(u64, u64, u64), String> {
    write_committed(ctx, name, items, false)
}

fn write_committed(
    ctx: &CreateCtx<'_>,
    name: &str,
    items: impl IntoIterator<Item = RecordItem>,
    sync: bool,
) -> Result<(u64, u64, u64), String> {
    let (r, b, out, pending) = write_unpublished(ctx, name, items).map_err(|e| e.to_string())?;
    if let Some(pending) = pending {
        let committed = if sync { pending.commit() } else { pending.commit_unsynced() };
        committed.map_err(|e| e.to_string())?;
    }
    Ok((r, b, out))
}

/// [`write_shard`] without the publish: the shard written under its temporary name (not synced), to be
/// committed by the caller (`None` in a dry run).
fn write_unpublished(
    ctx: &CreateCtx<'_>,
    name: &str,
    items: impl IntoIterator<Item = RecordItem>,
) -> Result<(u64, u64, u64, Option<PendingObject>), CreateError> {
    let items = items.into_iter();
    if ctx.dry_run {
        let mut sink = NullSink::default();
        let (r, b) = fill(ctx, name, &mut sink, items)?;
        return Ok((r, b, sink.len, None));
    }
    let mut pending = ctx.out.create(name, ctx.staging).map_err(|e| e.to_string())?;
    let (r, b) = fill(ctx, name, pending.file(), items)?;
    let out = pending.file().stream_position().map_err(|e| format!("output {name}: {e}"))?;
    Ok((r, b, out, Some(pending)))
}

/// A counting semaphore (the standard library has none).
struct Permits {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// Held while a shard is published; gives its permit back when dropped.
struct Permit<'a>(&'a Permits);

impl Permits {
    fn new(n: usize) -> Self {
        Permits { free: Mutex::new(n.max(1)), freed: std::sync::Condvar::new() }
    }

    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

fn fill<S: Sink>(
    ctx: &CreateCtx<'_>,
    name: &str,
    sink: S,
    items: impl Iterator<Item = RecordItem>,
) -> Result<(u64, u64), CreateError> {
    let mut w = ShardWriter::new(name, ctx.format, sink, ctx.options).map_err(|e| e.to_string())?;
    let (mut records, mut bytes) = (0u64, 0u64);
    // Records whose bytes live in an object store are fetched by windows (up to FETCH_WINDOW bytes, paid
    // from the pool; one record at a time when the pool is short), so neighbouring ranges coalesce.
    let remote_input = ctx.sources.remote;
    let window_mem = ctx.pool.reservation(&format!("fetched records of {name}"));
    let window_bytes = match remote_input {
        true => FETCH_WINDOWS.into_iter().find(|&w| window_mem.try_grow(w).is_ok()).unwrap_or(0),
        false => 0,
    };
    let mut items = items.peekable();
    while items.peek().is_some() {
        let mut window = Vec::new();
        let mut size = 0;
        for item in items.by_ref() {
            size += item.size();
            window.push(item);
            if size >= window_bytes || window.len() >= FETCH_RECORDS || !remote_input {
                break;
            }
        }
        let fetched = if remote_input { ctx.sources.fetch_remote(&window)? } else { HashMap::new() };
        for item in window {
            if ctx.cancel.load(Ordering::Relaxed) {
                return Err(CreateError::Cancelled);
            }
            let stream = ctx.sources.streamed.get(&item.shard).and_then(|&i| ctx.sources.streams.get(i));
            for e in &item.entries {
                let mut guard = match stream {
                    Some((_, true)) if matches!(e.loc, Loc::Input(_)) => None,
                    Some((m, _)) => Some(m.lock().map_err(|_| "stream lock poisoned".to_string())?),
                    None => None,
                };
                // The open file an entry is read from, held while it is copied (the LRU may close it after).
                let mut held: Option<Arc<File>> = None;
                let mut held_mem: Option<Arc<Vec<u8>>> = None;
                let src = match (guard.as_deref_mut(), e.loc) {
                    (Some(r), _) => EntrySource::Buffered(&mut **r),
                    (None, Loc::Input(off)) => match ctx.sources.input(item.shard)? {
                        Some(file) => EntrySource::FileRange { file: held.insert(file), offset: off },
                        None => EntrySource::Bytes(
                            fetched
                                .get(&(item.shard, off))
                                .map(Vec::as_slice)
                                .ok_or_else(|| format!("record {:?}: its bytes were not fetched", item.name))?,
                        ),
                    },
                    (None, Loc::Decoded(off)) => {
                        // The copy is looked up per entry and held (not the slot's lock) while it is copied:
                        // it may be spilled to a file or released meanwhile.
                        let copy = ctx.sources.decoded.get(item.shard as usize).and_then(|s| {
                            match &*s.copy.read().unwrap_or_else(|p| p.into_inner()) {
                                Some(Decoded::Mem(buf, _)) => Some(Ok(buf.clone())),
                                Some(Decoded::File(p)) => Some(Err(p.clone())),
                                None => None,
                            }
                        });
                        match copy {
                            Some(Ok(buf)) => {
                                let buf = held_mem.insert(buf);
                                let start = usize::try_from(off).map_err(|_| "offset overflow".to_string())?;
                                let end = usize::try_from(e.size)
                                    .ok()
                                    .and_then(|n| start.checked_add(n))
                                    .ok_or_else(|| "offset overflow".to_string())?;
                                let slice = buf
                                    .get(start..end)
                                    .ok_or_else(|| format!("record {:?}: decoded bytes out of range", item.name))?;
                                EntrySource::Bytes(slice)
                            }
                            Some(Err(path)) => EntrySource::FileRange {
                                file: held.insert(ctx.sources.spilled(item.shard, &path)?),
                                offset: off,
                            },
                            None => {
                                return Err(format!("record {:?}: its decoded bytes are gone", item.name).into());
                            }
                        }
                    }
                };
                w.append(&e.name, e.size, src).map_err(|err| {
                    let object = ctx.sources.objects.get(item.shard as usize).map_or("?", String::as_str);
                    format!("writing {name}: record {:?} from {object:?}: {err}", item.name)
                })?;
                bytes += e.size;
            }
            ctx.sources.consumed(&item);
            records += 1;
        }
    }
    w.finish().map_err(|e| e.to_string())?;
    Ok((records, bytes))
}

/// Pool bytes one entry name costs while its output shard is checked (hash, input shard, table slack).
const NAME_CHECK_COST: u64 = 48;

/// Before a zip output is written: walk the sorted stream once, cut it exactly as [`cut_and_create`]
/// will (same groups, same rule), and refuse the job when two records of one output shard hold the same
/// entry name (a zip holds each name once), naming the output shard, the entry and both input shards.
/// The stream is spooled meanwhile (its encoded metadata, in an unnamed file in `spool_dir`) and handed
/// back for creation. `route` must decide as creation's will (without its warnings, which creation
/// gives). Names are checked by 128-bit hash under the pool's budget; a shard whose names do not fit is
/// left to the writer's own check (still before anything is published).
#[allow(clippy::too_many_arguments)]
pub fn check_zip_names<I>(
    sorted: I,
    codec: Arc<crate::key::RecordCodec>,
    objects: &[String],
    groups: &[Group],
    cut: &Cut,
    mut route: impl FnMut(&RecordItem) -> Result<Option<usize>, String>,
    spool_dir: &Path,
    pool: &Arc<MemoryPool>,
    cancel: &AtomicBool,
) -> Result<Spooled, CreateError>
where
    I: Iterator<Item = Result<RecordItem, String>>,
{
    use crate::extsort::SortCodec;
    struct Names {
        index: u64,
        bytes: u64,
        records: u64,
        seen: Option<HashMap<u128, u32>>,
        charged: u64,
    }
    let spool_err =
        |e: io::Error| CreateError::Failed(format!("spooling record metadata in {}: {e}", spool_dir.display()));
    let mut out = io::BufWriter::with_capacity(1 << 16, tempfile::tempfile_in(spool_dir).map_err(spool_err)?);
    let res = pool.reservation("zip entry names");
    let mut next: Vec<u64> = groups.iter().map(|g| g.next).collect();
    let mut open: HashMap<usize, Names> = HashMap::new();
    let (mut count, mut scratch) = (0u64, Vec::new());
    for item in sorted {
        if count.is_multiple_of(4096) && cancel.load(Ordering::Relaxed) {
            return Err(CreateError::Cancelled);
        }
        let item = item?;
        scratch.clear();
        codec.encode(&item, &mut scratch);
        let len = u32::try_from(scratch.len()).map_err(|_| format!("record {:?}: metadata too large", item.name))?;
        out.write_all(&len.to_le_bytes()).and_then(|()| out.write_all(&scratch)).map_err(spool_err)?;
        count += 1;
        let Some(g) = route(&item)? else { continue };
        let o = open.entry(g).or_insert_with(|| {
            let index = next.get(g).copied().unwrap_or(0);
            if let Some(n) = next.get_mut(g) {
                *n += 1;
            }
            Names { index, bytes: 0, records: 0, seen: Some(HashMap::new()), charged: 0 }
        });
        o.bytes += item.size();
        o.records += 1;
        let cost = NAME_CHECK_COST * item.entries.len() as u64;
        if o.seen.is_some() && res.try_grow(cost).is_err() {
            o.seen = None;
            res.shrink(std::mem::take(&mut o.charged));
        }
        if let Some(seen) = &mut o.seen {
            o.charged += cost;
            for e in &item.entries {
                let hash = xxhash_rust::xxh3::xxh3_128(e.name.as_bytes());
                if let Some(&first) = seen.get(&hash) {
                    let object = |s: u32| objects.get(s as usize).map_or("?", String::as_str).to_string();
                    let shard = groups.get(g).map_or_else(
                        || format!("#{}", o.index),
                        |gr| gr.name_at(o.index).unwrap_or_else(|_| format!("#{}", o.index)),
                    );
                    return Err(CreateError::Failed(format!(
                        "output shard {shard:?} would hold entry {:?} twice: from input shard {:?} and from input \
                         shard {:?} (a zip holds each name once); nothing was written",
                        e.name,
                        object(first),
                        object(item.shard)
                    )));
                }
                seen.insert(hash, item.shard);
            }
        }
        if cut.closes(o.bytes, o.records)
            && let Some(o) = open.remove(&g)
        {
            res.shrink(o.charged.min(res.size()));
        }
    }
    let mut file = out.into_inner().map_err(|e| spool_err(e.into_error()))?;
    file.rewind().map_err(spool_err)?;
    Ok(Spooled { reader: io::BufReader::with_capacity(1 << 16, file), codec, left: count, buf: Vec::new() })
}

/// The sorted stream as [`check_zip_names`] spooled it, read back in order.
pub struct Spooled {
    reader: io::BufReader<File>,
    codec: Arc<crate::key::RecordCodec>,
    left: u64,
    buf: Vec<u8>,
}

impl Iterator for Spooled {
    type Item = Result<RecordItem, String>;

    fn next(&mut self) -> Option<Self::Item> {
        use crate::extsort::SortCodec;
        use std::io::Read;
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut len = [0u8; 4];
        let read = self.reader.read_exact(&mut len).and_then(|()| {
            self.buf.resize(u32::from_le_bytes(len) as usize, 0);
            self.reader.read_exact(&mut self.buf)
        });
        Some(
            read.and_then(|()| self.codec.decode(&self.buf))
                .map_err(|e| format!("reading back spooled record metadata: {e}")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{ItemEntry, Key, RecordCodec};

    fn item(seq: u64, shard: u32, name: &str) -> RecordItem {
        let entries = [".cls", ".jpg"]
            .iter()
            .map(|ext| ItemEntry { name: format!("{name}{ext}"), size: 10, loc: Loc::Input(0) })
            .collect();
        RecordItem { key: Key::Seq(seq), shard, name: name.to_string(), entries }
    }

    /// Records `(shard, name, group)` through the pre-check, cut by 2 records per shard.
    fn check(records: &[(u32, &str, usize)]) -> Result<Vec<String>, CreateError> {
        let dir = tempfile::tempdir().unwrap();
        let objects = vec!["a.tar".to_string(), "b.tar".to_string()];
        let codec = Arc::new(RecordCodec::new(Arc::new(objects.clone()), false));
        let groups: Vec<Group> =
            ["g-{0..9}.zip", "h-{0..9}.zip"].iter().map(|t| Group::new(Template::parse(t).unwrap(), None)).collect();
        let items: Vec<_> = records.iter().enumerate().map(|(i, &(s, n, _))| item(i as u64, s, n)).collect();
        let group_of: HashMap<String, usize> = records.iter().map(|&(s, n, g)| (format!("{s}{n}"), g)).collect();
        let route = |it: &RecordItem| Ok(group_of.get(&format!("{}{}", it.shard, it.name)).copied());
        let pool = MemoryPool::new(64 << 20);
        let spooled = check_zip_names(
            items.into_iter().map(Ok),
            codec,
            &objects,
            &groups,
            &Cut::Records(2),
            route,
            dir.path(),
            &pool,
            &AtomicBool::new(false),
        )?;
        Ok(spooled.map(|r| r.map(|it| format!("{}{}", it.shard, it.name))).collect::<Result<_, _>>()?)
    }

    /// Sources over two decoded copies (`a`: 1000 bytes, `b`: 3000 bytes), each paid from `pool`.
    fn decoded_sources(pool: &Arc<MemoryPool>, dir: &Path) -> Sources {
        let copy = |n: usize, byte: u8| {
            let res = pool.reservation("decoded");
            res.try_grow(n as u64).unwrap();
            Some(Decoded::Mem(Arc::new(vec![byte; n]), res))
        };
        let objects = Arc::new(vec!["a.tar.gz".to_string(), "b.tar.gz".to_string()]);
        Sources::new(Arc::new(shardio::LocalBucket::new(dir)), objects, vec![copy(1000, 1), copy(3000, 2)])
    }

    fn decoded_item(shard: u32) -> RecordItem {
        let entries = vec![ItemEntry { name: "x.jpg".into(), size: 10, loc: Loc::Decoded(0) }];
        RecordItem { key: Key::Seq(0), shard, name: "x".into(), entries }
    }

    #[test]
    fn a_decoded_copy_goes_with_its_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let pool = MemoryPool::new(1 << 20);
        let mut sources = decoded_sources(&pool, dir.path());
        sources.consumed(&decoded_item(0));
        assert_eq!(pool.reserved(), 4000, "uses not counted: copies stay");
        sources.release_after_use(&[2, 1], dir.path());
        sources.consumed(&decoded_item(0));
        assert_eq!((pool.reserved(), sources.decoded_in_memory()), (4000, 4000), "one use of a left");
        sources.consumed(&item(0, 0, "in-place")); // reads no decoded bytes: not a use
        assert_eq!(pool.reserved(), 4000);
        sources.consumed(&decoded_item(0));
        assert_eq!((pool.reserved(), sources.decoded_in_memory()), (3000, 3000), "a's last record: a is freed");
        sources.consumed(&decoded_item(0));
        assert_eq!(pool.reserved(), 3000, "more uses than counted change nothing");
        sources.consumed(&decoded_item(1));
        assert_eq!((pool.reserved(), sources.decoded_in_memory()), (0, 0));
    }

    #[test]
    fn short_of_memory_the_largest_decoded_copy_moves_to_a_file_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let pool = MemoryPool::new(1 << 20);
        let mut sources = decoded_sources(&pool, dir.path());
        assert!(!sources.spill_largest().unwrap(), "no spill folder: nothing spilled");
        sources.release_after_use(&[1, 1], dir.path());
        assert!(sources.spill_largest().unwrap());
        assert_eq!((pool.reserved(), sources.decoded_in_memory()), (1000, 1000), "b (the largest) is spilled");
        let spilled: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(spilled.len(), 1);
        assert_eq!(std::fs::read(&spilled[0]).unwrap(), vec![2u8; 3000]);
        assert!(sources.spill_largest().unwrap());
        assert!(!sources.spill_largest().unwrap(), "nothing left in memory");
        assert_eq!(pool.reserved(), 0);
    }

    /// Peak of a pool of 1 MiB, 7/8 of it and a little more held elsewhere (an in-memory sorted run), after
    /// creating 4 shards of 50 records (a dry run) from a stream fed as `feed`.
    fn peak_creating_beside_a_full_pool(feed: Feed) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.tar"), vec![5u8; 4096]).unwrap();
        let pool = MemoryPool::new(1 << 20);
        let sorted_run = pool.reservation("sorted run");
        sorted_run.try_grow((1 << 20) - (1 << 20) / 8 + 1000).unwrap();
        let objects = Arc::new(vec!["a.tar".to_string()]);
        let sources = Sources::new(Arc::new(shardio::LocalBucket::new(dir.path())), objects, vec![None]);
        let cancel = AtomicBool::new(false);
        let ctx = CreateCtx {
            sources: &sources,
            out: &shardio::LocalBucket::new(dir.path()),
            staging: dir.path(),
            format: Format::Tar,
            options: WriteOptions::default(),
            dry_run: true,
            concurrency: 2,
            pool: &pool,
            cancel: &cancel,
            on_shard: &|_, _| {},
        };
        let mut groups = vec![Group::new(Template::parse("o-{0..9}.tar").unwrap(), None)];
        let items = (0..200u64).map(|i| Ok(item(i, 0, &format!("r{i:03}"))));
        let (stats, _) = cut_and_create(&ctx, items, &mut groups, &Cut::Records(50), feed, |_| Ok(Some(0))).unwrap();
        assert_eq!((stats.shards, stats.records), (4, 200));
        pool.peak() - sorted_run.size()
    }

    #[test]
    fn an_in_memory_sorted_run_is_not_counted_again_by_creation() {
        assert_eq!(peak_creating_beside_a_full_pool(Feed::Merging), 0, "a merge keeps an eighth free: no buffering");
        assert!(peak_creating_beside_a_full_pool(Feed::Reserved) > 0, "shards are buffered in what is free");
    }

    #[test]
    fn a_zip_shard_holding_a_name_twice_is_found_in_its_group_only() {
        // x from both inputs, cut apart (shards g-0 and g-1): fine, and the stream comes back whole.
        let fine = check(&[(0, "x", 0), (0, "y", 0), (1, "x", 0), (1, "z", 0)]).unwrap();
        assert_eq!(fine, ["0x", "0y", "1x", "1z"]);
        // x from both inputs in one group's second shard, with another group's shards in between.
        let err = check(&[(0, "w", 0), (0, "v", 0), (0, "x", 0), (0, "q", 1), (1, "x", 0)]).unwrap_err();
        let CreateError::Failed(m) = err else { panic!("{err:?}") };
        assert!(m.contains("\"g-1.zip\"") && m.contains("x.cls") && m.contains("a.tar") && m.contains("b.tar"), "{m}");
        // The same names in different groups never meet.
        assert!(check(&[(0, "x", 0), (1, "x", 1)]).is_ok());
    }
}
