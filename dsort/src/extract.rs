//! Extraction: one input shard in, its records' metadata out (keys computed), and, for shards whose
//! bytes are not addressable in place (compressed tars, deflated zip members), one decoded copy kept in
//! memory while the pool allows, else in a spill file. Uncompressed tars and stored zip members are never
//! copied: records point at offsets in the input file.

use crate::key::{ItemEntry, Loc, RecordItem, heap_block, name_key, parse_content_key};
use crate::memory::{MemoryPool, MemoryReservation};
use crate::spec::{AlgorithmKind, CorruptReaction, Reaction, Reactions};
use shardio::{Bucket, EntryMeta, ErrorKind, Format, ObjectRead, Record, ShardIndex};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest content-key entry we read (a key is a label, not a payload).
pub const MAX_KEY_BYTES: u64 = 1 << 20;

/// The decoded bytes of one input shard, addressed by `Loc::Decoded` offsets.
pub enum Decoded {
    /// Held in memory, paid for by the reservation; creation drops it after its last record is written,
    /// or turns it into [`Decoded::File`] when the pool is short (`create::Sources`).
    Mem(Arc<Vec<u8>>, MemoryReservation),
    /// Spilled to a file in the job's temp folder.
    File(PathBuf),
}

/// What extraction of one shard produced.
pub struct ShardExtract {
    pub records: Vec<RecordItem>,
    pub decoded: Option<Decoded>,
    /// Content bytes of the records.
    pub bytes: u64,
    /// Bytes of the shard file.
    pub file_bytes: u64,
    pub entries: u64,
    /// Bytes written to spill files for this shard's decoded copy.
    pub spilled: u64,
    /// True when the shard was missing or skipped by a reaction.
    pub skipped: bool,
    /// Pool memory paid for `records` (the list and each record's heap bytes): the job hands each
    /// record's share to the sorter as it pushes it, and drops the rest.
    pub memory: Option<MemoryReservation>,
}

impl ShardExtract {
    /// A shard left out (missing, or skipped by a reaction): no records.
    fn skipped() -> Self {
        ShardExtract {
            records: Vec::new(),
            decoded: None,
            bytes: 0,
            file_bytes: 0,
            entries: 0,
            spilled: 0,
            skipped: true,
            memory: None,
        }
    }
}

/// Errors and warnings are returned as text naming the shard (the job wraps them).
pub enum Outcome {
    Done(ShardExtract),
    Failed(String),
}

/// Everything extraction needs to know about the job.
pub struct ExtractCtx<'a> {
    pub objects: &'a [String],
    /// The input bucket: local shards are indexed in place; an object store's are streamed once into
    /// decoded copies, or read by ranged GETs where the bucket allows it ([`Bucket::ranged_reads`]).
    pub bucket: &'a dyn Bucket,
    pub input_format: Format,
    /// Algorithm with the shuffle seed resolved.
    pub algorithm: &'a AlgorithmKind,
    pub pool: &'a Arc<MemoryPool>,
    pub spill_dir: &'a Path,
    pub reactions: Reactions,
    pub warn: &'a (dyn Fn(String) + Sync),
}

impl ExtractCtx<'_> {
    /// Extract input shard `index`.
    pub fn extract(&self, index: u32) -> Outcome {
        let object = &self.objects[index as usize];
        let local = self.bucket.local_path(object);
        let shown =
            local.as_ref().map_or_else(|| format!("{}/{object}", self.bucket.name()), |p| p.display().to_string());
        let empty = ShardExtract::skipped;
        let missing = |what: String| {
            let msg = format!("input shard {object:?} is missing ({what})");
            match self.reactions.missing_shards {
                Reaction::Ignore => Outcome::Done(empty()),
                Reaction::Warn => {
                    (self.warn)(msg);
                    Outcome::Done(empty())
                }
                Reaction::Abort => Outcome::Failed(msg),
            }
        };
        let file_bytes = match self.bucket.stat(object) {
            Ok(Some(n)) => n,
            Ok(None) => return missing(shown),
            Err(e) if local.is_none() => return self.unreadable(e),
            Err(e) if local.as_ref().is_some_and(|p| p.exists()) => {
                return Outcome::Failed(format!("input shard {object:?} is not a file ({e})"));
            }
            Err(e) => return Outcome::Failed(format!("input shard {object:?}: {e}")),
        };
        match self.extract_file(index, object, &shown, local.as_deref()) {
            Ok(mut x) => {
                x.file_bytes = file_bytes;
                Outcome::Done(x)
            }
            // Deleted between the listing (or stat) and the read.
            Err(ExtractError::Shard(e)) if e.kind() == ErrorKind::NotFound => missing(e.to_string()),
            Err(ExtractError::Shard(e)) if e.is_corruption() || (local.is_none() && e.kind() == ErrorKind::Io) => {
                self.unreadable(e)
            }
            Err(ExtractError::Shard(e)) => Outcome::Failed(e.to_string()),
            Err(ExtractError::Other(m)) => Outcome::Failed(m),
        }
    }

    /// A damaged shard, or an object store's shard that stays unreadable after the client's retries:
    /// skipped with a warning or fatal, as `corrupted_shards` says.
    fn unreadable(&self, e: shardio::Error) -> Outcome {
        let what = if e.is_corruption() { "corrupted" } else { "unreadable" };
        match self.reactions.corrupted_shards {
            CorruptReaction::Skip => {
                (self.warn)(format!("skipping {what} input shard: {e}"));
                Outcome::Done(ShardExtract::skipped())
            }
            CorruptReaction::Abort => Outcome::Failed(format!("{what} input shard: {e}")),
        }
    }

    fn extract_file(
        &self,
        index: u32,
        object: &str,
        shown: &str,
        local: Option<&Path>,
    ) -> Result<ShardExtract, ExtractError> {
        let format = Format::from_name(object).unwrap_or(self.input_format);
        let mut memory = MetaMemory::new(self, object);
        let key_ext = match self.algorithm {
            AlgorithmKind::Content { extension, key_type } => Some((extension.as_str(), *key_type)),
            _ => None,
        };
        let open = || -> Result<Box<dyn ObjectRead>, ExtractError> {
            let mut r = self.bucket.open(object).map_err(ExtractError::Shard)?;
            check_head(shown, format, &mut r)?;
            Ok(r)
        };
        // Bytes addressable in place (uncompressed tar, stored zip members) of a local file, or of an object
        // store read by ranges: index only. Otherwise (compressed, or an object store's object, streamed
        // once so that every byte is read from the store once) decode once into a store.
        let (idx, decoded, spilled, key_bytes) = match (format, local) {
            (Format::Tar, Some(path)) => {
                let (file, _) = open_with_format(path, format)?;
                let mut last_record = String::new();
                let idx = shardio::index_file_observed(path, &mut |e| memory.indexing(e, &mut last_record));
                memory.check()?;
                let idx = idx.map_err(ExtractError::Shard)?;
                let keys = record_keys(&idx, key_ext, |e| read_key_in_place(&file, e, shown).map(Some))?;
                (idx, None, 0, keys)
            }
            (Format::Tar, None) if self.bucket.ranged_reads() => {
                // One walk over the object: headers by ranged reads (long entries are skipped, not fetched),
                // content keys read as they pass.
                let mut last_record = String::new();
                let mut keys_by_entry: std::collections::HashMap<u64, Vec<u8>> = std::collections::HashMap::new();
                let idx = shardio::read_entries(shown, format, open()?, |meta: &EntryMeta, data: &mut dyn Read| {
                    memory.indexing(meta, &mut last_record);
                    if key_ext.is_some_and(|(ext, _)| shardio::split_name(&meta.name).1 == ext) {
                        keys_by_entry.insert(meta.header_offset, read_key(data, meta, shown)?);
                    }
                    Ok(())
                });
                memory.check()?;
                let idx = idx.map_err(ExtractError::Shard)?;
                let keys = record_keys(&idx, key_ext, |e| Ok(keys_by_entry.remove(&e.header_offset)))?;
                (idx, None, 0, keys)
            }
            (Format::Zip, _) if local.is_some() || self.bucket.ranged_reads() => {
                let idx = shardio::index_reader(shown, format, open()?).map_err(ExtractError::Shard)?;
                if idx.entries().all(|e| e.data_offset.is_some()) {
                    let keys = match key_ext {
                        Some((ext, _)) => self.keys_in_place(object, shown, &idx, ext)?,
                        None => Vec::new(),
                    };
                    (idx, None, 0, keys)
                } else {
                    self.decode(object, format, shown, open()?, key_ext.map(|(e, _)| e))?
                }
            }
            _ => self.decode(object, format, shown, open()?, key_ext.map(|(e, _)| e))?,
        };
        self.check_duplicates(&idx)?;
        // Pay for the index as built, the keys read, and the records about to be made.
        let keys_mem: usize = key_bytes.capacity() * size_of::<Option<Vec<u8>>>()
            + key_bytes.iter().flatten().map(|k| heap_block(k.capacity())).sum::<usize>();
        let name_keys: usize = match self.algorithm {
            AlgorithmKind::Alphanumeric => {
                idx.records.iter().map(|r| r.entries.first().map_or(0, |e| heap_block(e.name.len()))).sum()
            }
            _ => 0,
        };
        memory.settle(index_bytes(&idx) + keys_mem + name_keys + idx.records.len() * size_of::<RecordItem>())?;
        let in_place = decoded.is_none();
        let mut records = Vec::with_capacity(idx.records.len());
        let mut bytes = 0u64;
        let mut entries = 0u64;
        // The index is consumed as the records are made (names moved, not copied), so a shard's metadata
        // is not held twice.
        let ShardIndex { records: index_records, .. } = idx;
        for (seq, r) in index_records.into_iter().enumerate() {
            let first = r.entries.first().map_or("", |e| e.name.as_str());
            let key = match key_ext {
                Some((ext, kt)) => match key_bytes.get(seq).and_then(Option::as_ref) {
                    Some(raw) => parse_content_key(raw, kt).map_err(|m| {
                        ExtractError::Other(format!("shard {object:?}, record {:?}: content key {ext}: {m}", r.name))
                    })?,
                    None => {
                        return Err(ExtractError::Other(format!(
                            "shard {object:?}, record {:?}: no {ext} entry to take the content key from",
                            r.name
                        )));
                    }
                },
                None => name_key(self.algorithm, object, &r.name, first, index, seq as u64),
            };
            bytes += r.size();
            let item_entries: Vec<ItemEntry> = r
                .entries
                .into_iter()
                .map(|e| ItemEntry {
                    size: e.size,
                    loc: if in_place { Loc::Input(e.data_offset.unwrap_or(0)) } else { Loc::Decoded(e.header_offset) },
                    name: e.name,
                })
                .collect();
            entries += item_entries.len() as u64;
            records.push(RecordItem { key, shard: index, name: r.name, entries: item_entries });
        }
        let inline = size_of::<RecordItem>();
        memory.settle(records.capacity() * inline + records.iter().map(|r| r.mem_size() - inline).sum::<usize>())?;
        Ok(ShardExtract {
            records,
            decoded,
            bytes,
            file_bytes: 0,
            entries,
            spilled,
            skipped: false,
            memory: Some(memory.res),
        })
    }

    fn check_duplicates(&self, idx: &ShardIndex) -> Result<(), ExtractError> {
        for d in &idx.duplicates {
            let msg = format!(
                "shard {:?}: entry {:?} is duplicated (offsets {} and {}); the repeat is dropped",
                idx.shard, d.name, d.first_offset, d.offset
            );
            match self.reactions.duplicated_records {
                Reaction::Ignore => {}
                Reaction::Warn => (self.warn)(msg),
                Reaction::Abort => return Err(ExtractError::Other(msg)),
            }
        }
        Ok(())
    }

    /// Decode a shard once, storing every entry's bytes; `Loc::Decoded` offsets are recorded in each
    /// entry's `header_offset` slot of the returned index (the decoded store's offset).
    #[allow(clippy::type_complexity)]
    fn decode(
        &self,
        object: &str,
        format: Format,
        shown: &str,
        file: Box<dyn ObjectRead>,
        key_ext: Option<&str>,
    ) -> Result<(ShardIndex, Option<Decoded>, u64, Vec<Option<Vec<u8>>>), ExtractError> {
        let mut store = DecodedWriter::new(self.pool.reservation(&format!("decoded {object}")), self.spill_dir, object);
        let mut offsets: Vec<(String, u64, u64)> = Vec::new(); // (entry name, header offset, store offset)
        let mut keys_by_entry: Vec<(String, Vec<u8>)> = Vec::new();
        let idx = shardio::read_entries(shown, format, file, |meta: &EntryMeta, data: &mut dyn Read| {
            let is_key = key_ext.is_some_and(|ext| shardio::split_name(&meta.name).1 == ext);
            let at = if is_key && meta.size <= MAX_KEY_BYTES {
                let mut buf = Vec::with_capacity(meta.size as usize);
                data.take(meta.size).read_to_end(&mut buf)?;
                let at = store.append(&mut buf.as_slice(), meta.size)?;
                keys_by_entry.push((meta.name.clone(), buf));
                at
            } else {
                store.append(data, meta.size)?
            };
            offsets.push((meta.name.clone(), meta.header_offset, at));
            Ok(())
        })
        .map_err(ExtractError::Shard)?;
        let (decoded, spilled) = store.finish().map_err(|e| ExtractError::Other(format!("shard {object:?}: {e}")))?;
        // Re-point each entry at its place in the store (matched by header offset, unique per entry).
        let by_header: std::collections::HashMap<u64, u64> = offsets.iter().map(|(_, h, at)| (*h, *at)).collect();
        let mut idx = idx;
        for r in &mut idx.records {
            for e in &mut r.entries {
                e.header_offset = by_header.get(&e.header_offset).copied().unwrap_or(0);
                e.data_offset = None;
            }
        }
        let keys_map: std::collections::HashMap<String, Vec<u8>> = keys_by_entry.into_iter().collect();
        let keys = match key_ext {
            Some(ext) => {
                idx.records.iter().map(|r| r.entry_with_ext(ext).and_then(|e| keys_map.get(&e.name).cloned())).collect()
            }
            None => Vec::new(),
        };
        Ok((idx, Some(decoded), spilled, keys))
    }
}

/// Pool bytes paid at once while a shard is indexed.
const META_CHUNK: u64 = 256 << 10;

/// Pays the pool for one shard's metadata while it is indexed and turned into records, so that the
/// sorter's buffer plus every extraction in flight stay within the budget (a 100k-record shard's index
/// is ~30 MiB; unpaid, two of them in flight put the resident size that much over the budget). When
/// the pool is short, the pool's spiller (the sorter) is asked once per shard to spill; if even that
/// does not free enough, the rest of the shard goes unpaid (a budget too small for a shard's index: the
/// job still runs, as before). Payments leave the same share of the pool free as decoded copies do
/// (an eighth), so the sorter always finds room for its items after a spill.
struct MetaMemory {
    res: MemoryReservation,
    floor: u64,
    /// Bytes indexed but not yet paid (paid by chunks).
    pending: u64,
    gave_up: bool,
    error: Option<String>,
}

impl MetaMemory {
    fn new(ctx: &ExtractCtx<'_>, object: &str) -> Self {
        MetaMemory {
            res: ctx.pool.reservation(&format!("metadata of {object}")),
            floor: ctx.pool.limit() / METADATA_FLOOR_DIVISOR,
            pending: 0,
            gave_up: false,
            error: None,
        }
    }

    /// One entry indexed: its `EntryMeta` and name, and, when it starts a record, the record (struct,
    /// name, a list of two entries, the index's lookup slots). Mirrors [`index_bytes`].
    fn indexing(&mut self, e: &EntryMeta, last_record: &mut String) {
        let record = shardio::split_name(&e.name).0;
        let mut n = heap_block(e.name.len());
        if record == last_record.as_str() {
            n += size_of::<EntryMeta>();
        } else {
            n += size_of::<Record>() + heap_block(record.len()) + heap_block(2 * size_of::<EntryMeta>()) + 24;
            last_record.clear();
            last_record.push_str(record);
        }
        self.pending += n as u64;
        if self.pending >= META_CHUNK {
            let n = std::mem::take(&mut self.pending);
            self.pay(n);
        }
    }

    fn pay(&mut self, n: u64) {
        if self.gave_up || self.error.is_some() || self.res.try_grow_leaving(n, self.floor).is_ok() {
            return;
        }
        match self.res.pool().request_spill() {
            Ok(true) => self.gave_up = self.res.try_grow_leaving(n, self.floor).is_err(),
            Ok(false) => self.gave_up = true,
            Err(e) => self.error = Some(e),
        }
    }

    /// The metadata now holds `bytes`: give back the difference, or pay it.
    fn settle(&mut self, bytes: usize) -> Result<(), ExtractError> {
        self.pending = 0;
        let (now, want) = (self.res.size(), bytes as u64);
        if want <= now {
            self.res.shrink(now - want);
        } else {
            self.pay(want - now);
        }
        self.check()
    }

    fn check(&mut self) -> Result<(), ExtractError> {
        self.error.take().map_or(Ok(()), |e| Err(ExtractError::Other(e)))
    }
}

/// Bytes a shard's index holds (records list, names, entry lists), as the allocator sizes them.
fn index_bytes(idx: &ShardIndex) -> usize {
    idx.records.capacity() * size_of::<Record>()
        + idx
            .records
            .iter()
            .map(|r| {
                heap_block(r.name.capacity())
                    + heap_block(r.entries.capacity() * size_of::<EntryMeta>())
                    + r.entries.iter().map(|e| heap_block(e.name.capacity())).sum::<usize>()
            })
            .sum::<usize>()
}

enum ExtractError {
    Shard(shardio::Error),
    Other(String),
}

fn open_with_format(path: &Path, format: Format) -> Result<(File, Format), ExtractError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| ExtractError::Other(format!("input shard {shown}: {e}")))?;
    let mut head = [0u8; 512];
    let n = file.read_at(&mut head, 0).map_err(|e| ExtractError::Other(format!("input shard {shown}: {e}")))?;
    format.check_magic(&shown, &head[..n]).map_err(ExtractError::Shard)?;
    Ok((file, format))
}

/// Each record's content key bytes (`None` without a key entry), from `read` applied to its key entry;
/// empty when the order takes no content key.
fn record_keys(
    idx: &ShardIndex,
    key_ext: Option<(&str, crate::spec::ContentKeyType)>,
    mut read: impl FnMut(&EntryMeta) -> Result<Option<Vec<u8>>, ExtractError>,
) -> Result<Vec<Option<Vec<u8>>>, ExtractError> {
    let Some((ext, _)) = key_ext else { return Ok(Vec::new()) };
    idx.records.iter().map(|r| r.entry_with_ext(ext).map_or(Ok(None), &mut read)).collect()
}

/// Check an object's first bytes against the format its name says, then rewind.
fn check_head(shown: &str, format: Format, r: &mut Box<dyn ObjectRead>) -> Result<(), ExtractError> {
    let mut head = Vec::with_capacity(512);
    let read = r.by_ref().take(512).read_to_end(&mut head).and_then(|_| r.rewind());
    read.map_err(|e| ExtractError::Shard(shardio::Error::Io { loc: shardio::Location::at(shown, 0), source: e }))?;
    format.check_magic(shown, &head).map_err(ExtractError::Shard)
}

/// A content key entry's bytes from a stream (refused above [`MAX_KEY_BYTES`]).
fn read_key(data: &mut dyn Read, meta: &EntryMeta, shard: &str) -> io::Result<Vec<u8>> {
    if meta.size > MAX_KEY_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "shard {shard:?}, entry {:?}: content key of {} bytes is too large (max {MAX_KEY_BYTES})",
                meta.name, meta.size
            ),
        ));
    }
    let mut buf = Vec::with_capacity(meta.size as usize);
    data.take(meta.size).read_to_end(&mut buf)?;
    Ok(buf)
}

impl ExtractCtx<'_> {
    /// Content keys of an index whose bytes sit in place, fetched together (an object store coalesces
    /// them into a few ranged requests).
    fn keys_in_place(
        &self,
        object: &str,
        shown: &str,
        idx: &ShardIndex,
        ext: &str,
    ) -> Result<Vec<Option<Vec<u8>>>, ExtractError> {
        let mut want = Vec::new();
        for r in &idx.records {
            if let Some(e) = r.entry_with_ext(ext) {
                if e.size > MAX_KEY_BYTES {
                    return Err(ExtractError::Other(format!(
                        "shard {shown:?}, entry {:?}: content key of {} bytes is too large (max {MAX_KEY_BYTES})",
                        e.name, e.size
                    )));
                }
                let at = e.data_offset.unwrap_or(0);
                let end = at.checked_add(e.size).ok_or_else(|| {
                    ExtractError::Other(format!("shard {shown:?}, entry {:?}: offset and size overflow", e.name))
                })?;
                want.push(at..end);
            }
        }
        let mut got = self.bucket.read_ranges(object, &want).map_err(ExtractError::Shard)?.into_iter();
        Ok(idx.records.iter().map(|r| r.entry_with_ext(ext).and_then(|_| got.next())).collect())
    }
}

fn read_key_in_place(file: &File, e: &EntryMeta, shard: &str) -> Result<Vec<u8>, ExtractError> {
    if e.size > MAX_KEY_BYTES {
        return Err(ExtractError::Other(format!(
            "shard {shard:?}, entry {:?}: content key of {} bytes is too large (max {MAX_KEY_BYTES})",
            e.name, e.size
        )));
    }
    let mut buf = vec![0u8; e.size as usize];
    let off = e.data_offset.unwrap_or(0);
    file.read_exact_at(&mut buf, off).map_err(|err| {
        ExtractError::Shard(shardio::Error::Truncated {
            loc: shardio::Location::at(shard, e.header_offset).entry(&e.name),
            detail: format!("cannot read the content key: {err}"),
        })
    })?;
    Ok(buf)
}

/// Decoded copies stay in memory only while they leave this share of the pool free (an eighth): record
/// metadata has nowhere else to go but sorted runs, and a sorter that finds the pool full of decoded
/// bytes cannot even buffer the items it would spill. Decoded entries beyond it go to the spill file.
const METADATA_FLOOR_DIVISOR: u64 = 8;

/// A decoded buffer's smallest growth step (each step reserved from the pool before the buffer grows).
const DECODE_CHUNK: u64 = 1 << 20;

/// Appends decoded entries to memory while the pool allows, then to a spill file (memory part first,
/// so offsets stay valid).
struct DecodedWriter {
    mem: Vec<u8>,
    res: MemoryReservation,
    /// Bytes of the pool left free for record metadata (see [`METADATA_FLOOR_DIVISOR`]).
    floor: u64,
    file: Option<(PathBuf, BufWriter<File>)>,
    dir: PathBuf,
    object: String,
    len: u64,
}

impl DecodedWriter {
    fn new(res: MemoryReservation, dir: &Path, object: &str) -> Self {
        let floor = res.pool().limit() / METADATA_FLOOR_DIVISOR;
        DecodedWriter {
            mem: Vec::new(),
            res,
            floor,
            file: None,
            dir: dir.to_path_buf(),
            object: object.to_string(),
            len: 0,
        }
    }

    /// Reserves `size` more bytes only if the floor stays free afterwards. Atomic against other decoders:
    /// the floor is reserved together with `size`, then given back.
    fn grow_leaving_floor(&self, size: u64) -> bool {
        if self.res.try_grow(size.saturating_add(self.floor)).is_err() {
            return false;
        }
        self.res.shrink(self.floor);
        true
    }

    /// Makes room for `size` more bytes in memory, the capacity paid before it grows: by chunks of
    /// [`DECODE_CHUNK`] or an eighth of what is held (whichever is larger, so copies stay linear in
    /// total), then, when the pool is short, by exactly what is missing. Invariant: the buffer's capacity
    /// never exceeds the reservation. `false`: the pool cannot pay (the caller spills).
    fn make_room(&mut self, size: u64) -> bool {
        let Some(need) = (self.mem.len() as u64).checked_add(size) else { return false };
        let cap = self.mem.capacity() as u64;
        if need <= cap {
            return true;
        }
        let step = DECODE_CHUNK.max(cap / 8);
        for target in [need.max(cap.saturating_add(step)), need] {
            let extra = target.saturating_sub(self.res.size());
            if self.grow_leaving_floor(extra) {
                let Ok(more) = usize::try_from(target - self.mem.len() as u64) else { return false };
                self.mem.reserve_exact(more);
                return true;
            }
        }
        false
    }

    fn append(&mut self, data: &mut dyn Read, size: u64) -> io::Result<u64> {
        let at = self.len;
        if self.file.is_none() && self.make_room(size) {
            let start = self.mem.len();
            self.mem.resize(start + size as usize, 0);
            data.read_exact(&mut self.mem[start..])?;
        } else {
            if self.file.is_none() {
                self.spill()?;
            }
            if let Some((_, w)) = &mut self.file {
                let copied = io::copy(&mut data.take(size), w)?;
                if copied != size {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "entry data ends early"));
                }
            }
        }
        self.len += size;
        Ok(at)
    }

    fn spill(&mut self) -> io::Result<()> {
        let (file, path) = decoded_spill_file(&self.dir, &self.object)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&self.mem)?;
        self.mem = Vec::new();
        self.res.free();
        self.file = Some((path, w));
        Ok(())
    }

    /// The store and the bytes spilled to disk.
    fn finish(self) -> io::Result<(Decoded, u64)> {
        match self.file {
            Some((path, mut w)) => {
                w.flush()?;
                Ok((Decoded::File(path), self.len))
            }
            None => {
                let res = self.res;
                let mut mem = self.mem;
                mem.shrink_to_fit();
                // Capacity never exceeds the reservation (see `make_room`): this only shrinks.
                res.shrink(res.size().saturating_sub(mem.capacity() as u64));
                Ok((Decoded::Mem(Arc::new(mem), res), 0))
            }
        }
    }
}

/// A new spill file for the decoded copy of `object` in `dir` (kept: the job's temp folder removes it).
fn decoded_spill_file(dir: &Path, object: &str) -> io::Result<(File, PathBuf)> {
    let name: String =
        object.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    let file = tempfile::Builder::new().prefix(&format!("decoded-{name}-")).tempfile_in(dir)?;
    file.keep().map_err(|e| e.error)
}

/// Writes an in-memory decoded copy of `object` to a new file in `dir` (creation, when the pool asks for
/// memory back): the file holds the same bytes at the same offsets, so records read it unchanged.
pub fn spill_decoded(dir: &Path, object: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let (mut file, path) = decoded_spill_file(dir, object)?;
    file.write_all(bytes)?;
    Ok(path)
}

/// Keys of records only need the first entry's name for name orders; content orders need bytes.
pub fn key_needs_content(kind: &AlgorithmKind) -> bool {
    matches!(kind, AlgorithmKind::Content { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoded_buffer_never_holds_more_capacity_than_it_paid_for() {
        let dir = tempfile::tempdir().unwrap();
        let pool = MemoryPool::new(64 << 20);
        let mut w = DecodedWriter::new(pool.reservation("decoded t"), dir.path(), "t.tar.gz");
        let mut total = 0u64;
        for i in 0..3000u64 {
            let size = 700 + i % 5000;
            let data = vec![(i % 251) as u8; size as usize];
            assert_eq!(w.append(&mut data.as_slice(), size).unwrap(), total);
            total += size;
            assert!(w.mem.capacity() as u64 <= w.res.size(), "capacity {} > paid {}", w.mem.capacity(), w.res.size());
            assert!(w.res.size() <= total + (total / 8).max(DECODE_CHUNK), "paid {} for {total}", w.res.size());
        }
        let (decoded, spilled) = w.finish().unwrap();
        let Decoded::Mem(buf, res) = decoded else { panic!("spilled with an ample pool") };
        assert_eq!((spilled, buf.len() as u64), (0, total));
        assert!(res.size() >= buf.capacity() as u64 && res.size() == pool.reserved());
    }

    #[test]
    fn a_decoded_buffer_short_of_memory_grows_by_what_it_needs_then_spills() {
        let dir = tempfile::tempdir().unwrap();
        // An eighth (the floor) of 2 MiB stays free: 1.75 MiB for the buffer, less than one chunk more.
        let pool = MemoryPool::new(2 << 20);
        let mut w = DecodedWriter::new(pool.reservation("decoded t"), dir.path(), "t.tar.gz");
        let entry = vec![7u8; 300 << 10];
        for _ in 0..5 {
            w.append(&mut entry.as_slice(), entry.len() as u64).unwrap();
            assert!(w.file.is_none() && w.mem.capacity() as u64 <= w.res.size());
        }
        assert!(pool.reserved() <= (2 << 20) - (2 << 20) / 8);
        w.append(&mut entry.as_slice(), entry.len() as u64).unwrap();
        w.append(&mut entry.as_slice(), entry.len() as u64).unwrap();
        assert!(w.file.is_some(), "past the floor, the copy goes to a file");
        assert_eq!(pool.reserved(), 0);
        let (decoded, spilled) = w.finish().unwrap();
        let Decoded::File(path) = decoded else { panic!("not spilled") };
        assert_eq!(spilled, 7 * entry.len() as u64);
        assert_eq!(std::fs::read(path).unwrap(), [entry.as_slice(); 7].concat());
    }
}
