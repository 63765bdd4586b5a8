//! Cutting and creation: the sorted records stream in, are cut into output shards by the rule (minimum
//! size, record count, or an external key map's groups), and each output shard is written by its own
//! worker while the next one is being cut. At most `concurrency` shards are open at once and each
//! worker's queue is bounded, so memory stays bounded whatever the dataset size. Every shard is
//! published atomically (temporary name, sync, rename) or, in a dry run, written nowhere.

use crate::extract::Decoded;
use crate::key::{Loc, RecordItem};
use crate::memory::MemoryPool;
use crate::template::Template;
use shardio::{EntrySource, Format, PendingObject, ShardWriter, Sink, WriteOptions};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};

/// Records queued to one output shard's worker.
const QUEUE: usize = 256;
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

/// Where creation reads record bytes from.
pub struct Sources {
    pub dir: PathBuf,
    pub objects: Arc<Vec<String>>,
    pub decoded: Vec<Option<Decoded>>,
    files: Vec<OnceLock<Result<File, String>>>,
    spill_files: Vec<OnceLock<Result<File, String>>>,
}

impl Sources {
    pub fn new(dir: PathBuf, objects: Arc<Vec<String>>, decoded: Vec<Option<Decoded>>) -> Self {
        let n = objects.len();
        Sources {
            dir,
            objects,
            decoded,
            files: (0..n).map(|_| OnceLock::new()).collect(),
            spill_files: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    fn input(&self, shard: u32) -> Result<&File, String> {
        let i = shard as usize;
        let object = self.objects.get(i).map_or("?", String::as_str);
        let path = self.dir.join(object);
        self.files[i]
            .get_or_init(|| File::open(&path).map_err(|e| format!("input shard {object:?}: {e}")))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn spilled(&self, shard: u32, path: &Path) -> Result<&File, String> {
        self.spill_files[shard as usize]
            .get_or_init(|| File::open(path).map_err(|e| format!("spill file {}: {e}", path.display())))
            .as_ref()
            .map_err(Clone::clone)
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
    pub out_dir: &'a Path,
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

/// An output shard being cut: streamed to its worker, or (with several groups, where open shards could
/// outnumber workers) buffered until it closes.
struct Open {
    tx: Option<SyncSender<RecordItem>>,
    buffered: Vec<RecordItem>,
    bytes: u64,
    records: u64,
}

/// Cut the sorted stream and create every output shard. `route` picks a record's group (0 without an
/// external key map); `Ok(None)` drops the record (a reaction decided so).
pub fn cut_and_create<I>(
    ctx: &CreateCtx<'_>,
    sorted: I,
    groups: &mut [Group],
    cut: &Cut,
    mut route: impl FnMut(&RecordItem) -> Result<Option<usize>, String>,
) -> Result<CreateStats, String>
where
    I: Iterator<Item = Result<RecordItem, String>>,
{
    let stats = Mutex::new(CreateStats::default());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let output_bytes = AtomicU64::new(0);
    let workers = ctx.concurrency.max(1);
    let (token_tx, token_rx) = sync_channel::<()>(workers);
    for _ in 0..workers {
        let _ = token_tx.send(());
    }
    let fail = |m: String| {
        let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(m);
        ctx.cancel.store(true, Ordering::Relaxed);
    };
    let streaming = groups.len() == 1;
    let buffer_res = ctx.pool.reservation("output groups");
    let codec_size =
        |it: &RecordItem| (std::mem::size_of::<RecordItem>() + it.name.len() + it.entries.len() * 64) as u64;
    std::thread::scope(|scope| {
        // Start a worker for the next name of group `g` (waits for a free slot).
        let spawn = |g: usize, groups: &mut [Group]| -> Result<SyncSender<RecordItem>, String> {
            loop {
                match token_rx.recv_timeout(std::time::Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(_) if ctx.cancel.load(Ordering::Relaxed) => return Err(failure_text(&failure)),
                    Err(_) => {}
                }
            }
            let name = groups[g].next_name()?;
            let (tx, rx) = sync_channel::<RecordItem>(QUEUE);
            let token_tx = token_tx.clone();
            let (stats, fail, output_bytes) = (&stats, &fail, &output_bytes);
            scope.spawn(move || {
                match write_shard(ctx, &name, rx) {
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
                let _ = token_tx.send(());
            });
            Ok(tx)
        };
        let mut open: HashMap<usize, Open> = HashMap::new();
        let close = |o: Open, g: usize, groups: &mut [Group]| -> Result<(), String> {
            if o.tx.is_some() {
                return Ok(()); // dropping the sender ends the worker's shard
            }
            let freed: u64 = o.buffered.iter().map(codec_size).sum();
            let tx = spawn(g, groups)?;
            for it in o.buffered {
                tx.send(it).map_err(|_| failure_text(&failure))?;
            }
            buffer_res.shrink(freed);
            Ok(())
        };
        let result: Result<(), String> = (|| {
            for item in sorted {
                if ctx.cancel.load(Ordering::Relaxed) {
                    return Err(failure_text(&failure));
                }
                let item = item?;
                let Some(g) = route(&item)? else { continue };
                let o = match open.entry(g) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let tx = if streaming { Some(spawn(g, groups)?) } else { None };
                        v.insert(Open { tx, buffered: Vec::new(), bytes: 0, records: 0 })
                    }
                };
                o.bytes += item.size();
                o.records += 1;
                match &o.tx {
                    Some(tx) => tx.send(item).map_err(|_| failure_text(&failure))?,
                    None => {
                        buffer_res.try_grow(codec_size(&item)).map_err(|e| {
                            format!("records of the external key map's open output shards do not fit in memory: {e}")
                        })?;
                        o.buffered.push(item);
                    }
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
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut s = stats.into_inner().unwrap_or_else(|p| p.into_inner());
    s.output_bytes = output_bytes.into_inner();
    s.names.sort();
    Ok(s)
}

fn failure_text(f: &Mutex<Option<String>>) -> String {
    f.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| "cancelled".into())
}

/// Write one output shard from its queue; returns (records, content bytes, bytes written).
/// Write one output shard named `name` from its records, in order, and publish it (or, in a dry run,
/// count it); returns (records, content bytes, bytes written). Used by the streaming cutter here and by
/// the distributed creator, which receives a shard's records from the targets that cut it.
pub fn write_shard(
    ctx: &CreateCtx<'_>,
    name: &str,
    items: impl IntoIterator<Item = RecordItem>,
) -> Result<(u64, u64, u64), String> {
    let items = items.into_iter();
    if ctx.dry_run {
        let mut sink = NullSink::default();
        let (r, b) = fill(ctx, name, &mut sink, items)?;
        return Ok((r, b, sink.len));
    }
    let mut pending = PendingObject::create(ctx.out_dir.join(name)).map_err(|e| e.to_string())?;
    let (r, b) = fill(ctx, name, pending.file(), items)?;
    let out = pending.file().stream_position().map_err(|e| format!("output {name}: {e}"))?;
    pending.commit().map_err(|e| e.to_string())?;
    Ok((r, b, out))
}

fn fill<S: Sink>(
    ctx: &CreateCtx<'_>,
    name: &str,
    sink: S,
    items: impl Iterator<Item = RecordItem>,
) -> Result<(u64, u64), String> {
    let mut w = ShardWriter::new(name, ctx.format, sink, ctx.options).map_err(|e| e.to_string())?;
    let (mut records, mut bytes) = (0u64, 0u64);
    for item in items {
        if ctx.cancel.load(Ordering::Relaxed) {
            return Err("cancelled".into());
        }
        for e in &item.entries {
            let src = match e.loc {
                Loc::Input(off) => EntrySource::FileRange { file: ctx.sources.input(item.shard)?, offset: off },
                Loc::Decoded(off) => match ctx.sources.decoded.get(item.shard as usize).and_then(Option::as_ref) {
                    Some(Decoded::Mem(buf, _)) => {
                        let start = usize::try_from(off).map_err(|_| "offset overflow".to_string())?;
                        let end = start + e.size as usize;
                        let slice = buf
                            .get(start..end)
                            .ok_or_else(|| format!("record {:?}: decoded bytes out of range", item.name))?;
                        EntrySource::Bytes(slice)
                    }
                    Some(Decoded::File(path)) => {
                        EntrySource::FileRange { file: ctx.sources.spilled(item.shard, path)?, offset: off }
                    }
                    None => return Err(format!("record {:?}: its decoded bytes are gone", item.name)),
                },
            };
            w.append(&e.name, e.size, src).map_err(|err| {
                let object = ctx.sources.objects.get(item.shard as usize).map_or("?", String::as_str);
                format!("writing {name}: record {:?} from {object:?}: {err}", item.name)
            })?;
            bytes += e.size;
        }
        records += 1;
    }
    w.finish().map_err(|e| e.to_string())?;
    Ok((records, bytes))
}
