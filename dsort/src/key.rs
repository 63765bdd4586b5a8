//! Record metadata as the engine sorts it, the keys of every algorithm, and the one total order:
//! key (reversed when `decreasing`), then the record's unique name `<input object>|<record>` ascending.
//! The order never depends on concurrency, memory budget or (later) the number of targets.

use crate::extsort::SortCodec;
use crate::spec::{AlgorithmKind, ContentKeyType};
use std::cmp::Ordering;
use std::io;
use std::sync::Arc;

/// A record's sort key.
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    /// Alphanumeric (first entry's full path) and string content keys: compared as bytes.
    Bytes(Vec<u8>),
    Int(i64),
    /// Compared with `f64::total_cmp`; NaN is refused when parsing.
    Float(f64),
    /// Shuffle: `xxh3_64_with_seed(unique name, seed)`.
    Hash(u64),
    /// `none`: (input shard index, record position in the shard).
    Seq(u64),
}

impl Key {
    fn tag(&self) -> u8 {
        match self {
            Key::Bytes(_) => 0,
            Key::Int(_) => 1,
            Key::Float(_) => 2,
            Key::Hash(_) => 3,
            Key::Seq(_) => 4,
        }
    }

    fn cmp_key(&self, other: &Key) -> Ordering {
        match (self, other) {
            (Key::Bytes(a), Key::Bytes(b)) => a.cmp(b),
            (Key::Int(a), Key::Int(b)) => a.cmp(b),
            (Key::Float(a), Key::Float(b)) => a.total_cmp(b),
            (Key::Hash(a), Key::Hash(b)) | (Key::Seq(a), Key::Seq(b)) => a.cmp(b),
            (a, b) => a.tag().cmp(&b.tag()),
        }
    }

    /// The key as text, for EKM regex matching (AIStore matches `fmt("%v", key)`).
    pub fn to_text(&self) -> String {
        match self {
            Key::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            Key::Int(i) => i.to_string(),
            Key::Float(f) => f.to_string(),
            Key::Hash(h) => h.to_string(),
            Key::Seq(s) => s.to_string(),
        }
    }
}

/// Parse a content key: surrounding whitespace trimmed, then int / float / string per the spec.
pub fn parse_content_key(raw: &[u8], key_type: ContentKeyType) -> Result<Key, String> {
    let text = raw.trim_ascii();
    match key_type {
        ContentKeyType::String => Ok(Key::Bytes(text.to_vec())),
        ContentKeyType::Int => std::str::from_utf8(text)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .map(Key::Int)
            .ok_or_else(|| format!("{:?} is not an integer", String::from_utf8_lossy(text))),
        ContentKeyType::Float => std::str::from_utf8(text)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|f| !f.is_nan())
            .map(Key::Float)
            .ok_or_else(|| format!("{:?} is not a number", String::from_utf8_lossy(text))),
    }
}

/// Shuffle key of a record: a keyed hash of its unique name, the same on any machine and concurrency.
pub fn shuffle_key(object: &str, record: &str, seed: u64) -> Key {
    let mut unique = Vec::with_capacity(object.len() + 1 + record.len());
    unique.extend_from_slice(object.as_bytes());
    unique.push(b'|');
    unique.extend_from_slice(record.as_bytes());
    Key::Hash(xxhash_rust::xxh3::xxh3_64_with_seed(&unique, seed))
}

/// Where an entry's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Verbatim in the input shard file at this offset (uncompressed tar, stored zip member).
    Input(u64),
    /// In the decoded copy of the input shard (memory or spill file) at this offset.
    Decoded(u64),
}

/// One entry of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemEntry {
    pub name: String,
    pub size: u64,
    pub loc: Loc,
}

/// A record as sorted: its key, where it came from, and where its entries' bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordItem {
    pub key: Key,
    /// Index of the input shard in the job's input list.
    pub shard: u32,
    pub name: String,
    pub entries: Vec<ItemEntry>,
}

impl RecordItem {
    pub fn size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Bytes the record holds in memory: inline, plus its heap blocks as the allocator sizes them.
    pub fn mem_size(&self) -> usize {
        let key = match &self.key {
            Key::Bytes(b) => heap_block(b.capacity()),
            _ => 0,
        };
        std::mem::size_of::<RecordItem>()
            + key
            + heap_block(self.name.capacity())
            + heap_block(self.entries.capacity() * std::mem::size_of::<ItemEntry>())
            + self.entries.iter().map(|e| heap_block(e.name.capacity())).sum::<usize>()
    }
}

/// The engine's codec: compact binary for spill runs, and the total order.
pub struct RecordCodec {
    /// Input object names, indexed by `RecordItem::shard`, for unique-name tie-breaks.
    pub objects: Arc<Vec<String>>,
    pub decreasing: bool,
}

impl RecordCodec {
    pub fn new(objects: Arc<Vec<String>>, decreasing: bool) -> Self {
        RecordCodec { objects, decreasing }
    }

    fn unique_cmp(&self, a: &RecordItem, b: &RecordItem) -> Ordering {
        if a.shard == b.shard {
            return a.name.as_bytes().cmp(b.name.as_bytes());
        }
        let oa = self.objects.get(a.shard as usize).map_or("", String::as_str);
        let ob = self.objects.get(b.shard as usize).map_or("", String::as_str);
        let ua = oa.bytes().chain(std::iter::once(b'|')).chain(a.name.bytes());
        let ub = ob.bytes().chain(std::iter::once(b'|')).chain(b.name.bytes());
        ua.cmp(ub)
    }
}

/// What a heap allocation of `n` bytes really costs: the allocator adds a header and rounds up (glibc on
/// 64-bit: 8 bytes of header, 16-byte granules, 32 bytes at least). Records are millions of small
/// allocations, so counting only their capacities would undercount the metadata's memory by a quarter.
pub fn heap_block(n: usize) -> usize {
    if n == 0 { 0 } else { (n + 8).next_multiple_of(16).max(32) }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u64(out, b.len() as u64);
    out.extend_from_slice(b);
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "record metadata cut short"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> io::Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = usize::try_from(self.u64()?).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "length"))?;
        self.take(n)
    }
    fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

impl SortCodec for RecordCodec {
    type Item = RecordItem;

    fn encode(&self, item: &RecordItem, out: &mut Vec<u8>) {
        out.push(item.key.tag());
        match &item.key {
            Key::Bytes(b) => put_bytes(out, b),
            Key::Int(i) => put_u64(out, *i as u64),
            Key::Float(f) => put_u64(out, f.to_bits()),
            Key::Hash(h) | Key::Seq(h) => put_u64(out, *h),
        }
        out.extend_from_slice(&item.shard.to_le_bytes());
        put_bytes(out, item.name.as_bytes());
        put_u64(out, item.entries.len() as u64);
        for e in &item.entries {
            put_bytes(out, e.name.as_bytes());
            put_u64(out, e.size);
            match e.loc {
                Loc::Input(o) => {
                    out.push(0);
                    put_u64(out, o);
                }
                Loc::Decoded(o) => {
                    out.push(1);
                    put_u64(out, o);
                }
            }
        }
    }

    fn decode(&self, bytes: &[u8]) -> io::Result<RecordItem> {
        let mut c = Cursor { buf: bytes };
        let key = match c.u8()? {
            0 => Key::Bytes(c.bytes()?.to_vec()),
            1 => Key::Int(c.u64()? as i64),
            2 => Key::Float(f64::from_bits(c.u64()?)),
            3 => Key::Hash(c.u64()?),
            4 => Key::Seq(c.u64()?),
            t => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown key tag {t}"))),
        };
        let mut s = [0u8; 4];
        s.copy_from_slice(c.take(4)?);
        let shard = u32::from_le_bytes(s);
        let name = c.string()?;
        let n = c.u64()?;
        let mut entries = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            let name = c.string()?;
            let size = c.u64()?;
            let loc = match c.u8()? {
                0 => Loc::Input(c.u64()?),
                1 => Loc::Decoded(c.u64()?),
                t => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown location tag {t}"))),
            };
            entries.push(ItemEntry { name, size, loc });
        }
        Ok(RecordItem { key, shard, name, entries })
    }

    fn compare(&self, a: &RecordItem, b: &RecordItem) -> Ordering {
        let k = a.key.cmp_key(&b.key);
        let k = if self.decreasing { k.reverse() } else { k };
        k.then_with(|| self.unique_cmp(a, b))
    }

    fn mem_size(&self, item: &RecordItem) -> usize {
        item.mem_size()
    }
}

/// The key an algorithm gives a record whose first entry is `first_entry` (content keys are parsed by
/// the caller, which has the bytes).
pub fn name_key(kind: &AlgorithmKind, object: &str, record: &str, first_entry: &str, shard: u32, seq: u64) -> Key {
    match kind {
        AlgorithmKind::Alphanumeric | AlgorithmKind::Content { .. } => Key::Bytes(first_entry.as_bytes().to_vec()),
        AlgorithmKind::Shuffle { seed } => shuffle_key(object, record, seed.unwrap_or(0)),
        AlgorithmKind::None => Key::Seq((u64::from(shard) << 32) | seq.min(u64::from(u32::MAX))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: Key, shard: u32, name: &str) -> RecordItem {
        RecordItem {
            key,
            shard,
            name: name.into(),
            entries: vec![ItemEntry { name: format!("{name}.jpg"), size: 3, loc: Loc::Decoded(9) }],
        }
    }

    #[test]
    fn codec_round_trips_every_key_kind() {
        let c = RecordCodec::new(Arc::new(vec!["a.tar".into()]), false);
        for key in [Key::Bytes(b"x/y.jpg".to_vec()), Key::Int(-5), Key::Float(2.5), Key::Hash(7), Key::Seq(1 << 33)] {
            let it = item(key, 0, "rec");
            let mut buf = Vec::new();
            c.encode(&it, &mut buf);
            assert_eq!(c.decode(&buf).unwrap(), it);
            assert!(c.decode(&buf[..buf.len() - 1]).is_err());
        }
    }

    #[test]
    fn ties_break_by_unique_name_and_decreasing_reverses_keys_only() {
        let c = RecordCodec::new(Arc::new(vec!["b.tar".into(), "a.tar".into(), "a.tar.x".into()]), true);
        let x = item(Key::Int(1), 0, "r");
        let y = item(Key::Int(1), 1, "r");
        let z = item(Key::Int(2), 0, "r");
        assert_eq!(c.compare(&y, &x), Ordering::Less, "a.tar|r < b.tar|r");
        assert_eq!(c.compare(&z, &x), Ordering::Less, "decreasing: 2 before 1");
        // Unique names compare as whole byte strings: "a.tar|r" vs "a.tar.x|r" ('|' > '.').
        let w = item(Key::Int(1), 2, "r");
        assert_eq!(c.compare(&w, &y), Ordering::Less);
    }

    #[test]
    fn content_keys_are_trimmed_and_typed() {
        assert_eq!(parse_content_key(b" 42\n", ContentKeyType::Int), Ok(Key::Int(42)));
        assert_eq!(parse_content_key(b"1.5", ContentKeyType::Float), Ok(Key::Float(1.5)));
        assert!(parse_content_key(b"nan", ContentKeyType::Float).is_err());
        assert!(parse_content_key(b"4x", ContentKeyType::Int).is_err());
        assert_eq!(parse_content_key(b" cat ", ContentKeyType::String), Ok(Key::Bytes(b"cat".to_vec())));
    }
}
