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

/// The engine's codec: the compact byte form records rest in (the sorter's arena, spill runs, cluster
/// frames), and the total order, over items and over their encoded bytes alike.
///
/// Encoded record (integers are LEB128 varints unless said otherwise):
///
/// ```text
/// head u8           key kind (bits 0..3) | KEY_IS_FIRST_ENTRY (bit 3): a Bytes key equal to the first entry's name
/// key               Bytes: length, bytes (absent when flagged) | Int: zigzag | Float, Hash: 8 bytes LE | Seq
/// shard             input shard index
/// name              length, bytes
/// entries           count, then per entry: (length << 3 | loc tag << 2 | name mode), name bytes, size, offset
///                   name mode 0: `<record>.<bytes>`, 1: `<record><bytes>`, 2: the bytes are the whole name
/// ```
pub struct RecordCodec {
    /// Input object names, indexed by `RecordItem::shard`, for unique-name tie-breaks.
    pub objects: Arc<Vec<String>>,
    pub decreasing: bool,
    ranks: Ranks,
}

/// Where each input object's `<object>|` sorts among all of them, so unique names of different objects
/// compare as two integers. Exact only when no `<object>|` is a proper prefix of another (object names
/// holding `|`); otherwise ties fall back to comparing the unique names' bytes.
struct Ranks {
    /// Rank of `objects[i]`; a shard index past the list stands for the empty object name.
    rank: Vec<u32>,
    missing: u32,
    exact: bool,
}

impl Ranks {
    fn new(objects: &[String]) -> Self {
        let mut keyed: Vec<(Vec<u8>, usize)> =
            objects.iter().enumerate().map(|(i, o)| ([o.as_bytes(), b"|"].concat(), i)).collect();
        keyed.push((b"|".to_vec(), objects.len()));
        keyed.sort();
        let mut rank = vec![0u32; objects.len()];
        let (mut missing, mut exact, mut r) = (0u32, true, 0u32);
        for (k, pair) in keyed.iter().enumerate() {
            if k > 0 {
                let prev = &keyed[k - 1].0;
                if *prev != pair.0 {
                    r += 1;
                    exact &= !pair.0.starts_with(prev);
                }
            }
            match rank.get_mut(pair.1) {
                Some(slot) => *slot = r,
                None => missing = r,
            }
        }
        Ranks { rank, missing, exact }
    }

    /// The order of two different shards' object names, `None` when ranks cannot decide it.
    fn cmp(&self, a: u32, b: u32) -> Option<Ordering> {
        let of = |s: u32| self.rank.get(s as usize).copied().unwrap_or(self.missing);
        self.exact.then(|| of(a).cmp(&of(b)))
    }
}

impl RecordCodec {
    pub fn new(objects: Arc<Vec<String>>, decreasing: bool) -> Self {
        let ranks = Ranks::new(&objects);
        RecordCodec { objects, decreasing, ranks }
    }

    /// The total order over decoded items (the same as [`SortCodec::compare_encoded`] over their bytes).
    pub fn compare(&self, a: &RecordItem, b: &RecordItem) -> Ordering {
        let k = a.key.cmp_key(&b.key);
        let k = if self.decreasing { k.reverse() } else { k };
        k.then_with(|| self.unique_cmp(a.shard, a.name.as_bytes(), b.shard, b.name.as_bytes()))
    }

    /// Unique names `<object>|<record>` ascending: by object rank, the record names deciding within one
    /// object; by the whole byte strings only when ranks are not exact.
    fn unique_cmp(&self, sa: u32, na: &[u8], sb: u32, nb: &[u8]) -> Ordering {
        if sa != sb {
            match self.ranks.cmp(sa, sb) {
                Some(Ordering::Equal) => {}
                Some(o) => return o,
                None => {
                    let oa = self.objects.get(sa as usize).map_or("", String::as_str);
                    let ob = self.objects.get(sb as usize).map_or("", String::as_str);
                    return cmp_concat(&[oa.as_bytes(), b"|", na], &[ob.as_bytes(), b"|", nb]);
                }
            }
        }
        na.cmp(nb)
    }
}

/// Compares the concatenations of two lists of byte strings, without building them.
fn cmp_concat(a: &[&[u8]], b: &[&[u8]]) -> Ordering {
    let (mut a, mut b) = (a.iter().copied().filter(|s| !s.is_empty()), b.iter().copied().filter(|s| !s.is_empty()));
    let (mut x, mut y) = (a.next().unwrap_or_default(), b.next().unwrap_or_default());
    loop {
        if x.is_empty() || y.is_empty() {
            return (!x.is_empty()).cmp(&!y.is_empty());
        }
        let n = x.len().min(y.len());
        match x[..n].cmp(&y[..n]) {
            Ordering::Equal => {}
            o => return o,
        }
        (x, y) = (&x[n..], &y[n..]);
        if x.is_empty() {
            x = a.next().unwrap_or_default();
        }
        if y.is_empty() {
            y = b.next().unwrap_or_default();
        }
    }
}

/// What a heap allocation of `n` bytes really costs: the allocator adds a header and rounds up (glibc on
/// 64-bit: 8 bytes of header, 16-byte granules, 32 bytes at least). Records are millions of small
/// allocations, so counting only their capacities would undercount the metadata's memory by a quarter.
pub fn heap_block(n: usize) -> usize {
    if n == 0 { 0 } else { (n + 8).next_multiple_of(16).max(32) }
}

/// Appends `v` as a LEB128 varint (7 bits a byte, low first).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint at the start of `buf`: its value and its length, `None` if cut short or over 64 bits.
pub fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        if i == 9 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some((v, i + 1));
        }
    }
    None
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(invalid("record metadata cut short"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64_le(&mut self) -> io::Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn varint(&mut self) -> io::Result<u64> {
        let (v, n) = get_varint(self.buf).ok_or_else(|| invalid("bad or cut-short varint"))?;
        self.buf = &self.buf[n..];
        Ok(v)
    }
    fn len(&mut self) -> io::Result<usize> {
        usize::try_from(self.varint()?).map_err(|_| invalid("length"))
    }
    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
}

fn utf8(b: &[u8]) -> io::Result<&str> {
    std::str::from_utf8(b).map_err(|e| invalid(e.to_string()))
}

/// Head byte: key kind in the low 3 bits, and this flag.
const KEY_IS_FIRST_ENTRY: u8 = 0x08;
/// Entry name modes (the low 2 bits of an entry's first varint).
const NAME_DOT_EXT: u64 = 0;
const NAME_SUFFIX: u64 = 1;
const NAME_WHOLE: u64 = 2;

/// How an entry's name is stored: the mode and the bytes kept.
fn entry_name_form<'a>(record: &str, entry: &'a str) -> (u64, &'a [u8]) {
    match entry.strip_prefix(record) {
        Some(rest) => match rest.strip_prefix('.') {
            Some(ext) => (NAME_DOT_EXT, ext.as_bytes()),
            None => (NAME_SUFFIX, rest.as_bytes()),
        },
        None => (NAME_WHOLE, entry.as_bytes()),
    }
}

/// One entry's header as stored: its name as up to three parts (record name, separator, stored bytes).
struct EntryRef<'a> {
    name: [&'a [u8]; 3],
    size: u64,
    loc: Loc,
}

fn read_entry<'a>(c: &mut Cursor<'a>, record: &'a [u8]) -> io::Result<EntryRef<'a>> {
    let head = c.varint()?;
    let bytes = c.take(usize::try_from(head >> 3).map_err(|_| invalid("length"))?)?;
    let name = match head & 3 {
        NAME_DOT_EXT => [record, b".".as_slice(), bytes],
        NAME_SUFFIX => [record, b"".as_slice(), bytes],
        NAME_WHOLE => [b"".as_slice(), b"".as_slice(), bytes],
        m => return Err(invalid(format!("unknown entry name mode {m}"))),
    };
    let size = c.varint()?;
    let offset = c.varint()?;
    let loc = if head & 4 == 0 { Loc::Input(offset) } else { Loc::Decoded(offset) };
    Ok(EntryRef { name, size, loc })
}

/// A key as stored: Bytes as up to three parts (a flagged key is the first entry's name).
enum KeyRef<'a> {
    Bytes([&'a [u8]; 3]),
    Int(i64),
    Float(f64),
    Hash(u64),
    Seq(u64),
}

impl KeyRef<'_> {
    fn tag(&self) -> u8 {
        match self {
            KeyRef::Bytes(_) => 0,
            KeyRef::Int(_) => 1,
            KeyRef::Float(_) => 2,
            KeyRef::Hash(_) => 3,
            KeyRef::Seq(_) => 4,
        }
    }

    /// 29 bits of the key after its 3-bit kind, such that a smaller prefix is a smaller key (the
    /// normalised key's top bits: bytes as their first 8 big-endian, zero-padded; integers with the sign
    /// bit flipped; floats in `total_cmp` order).
    fn prefix(&self) -> u32 {
        let (tag, v) = match self {
            KeyRef::Bytes(parts) => {
                let mut first = [0u8; 8];
                let bytes = parts.iter().flat_map(|p| p.iter());
                for (slot, &b) in first.iter_mut().zip(bytes) {
                    *slot = b;
                }
                (0, u64::from_be_bytes(first))
            }
            KeyRef::Int(i) => (1, (*i as u64) ^ (1 << 63)),
            KeyRef::Float(f) => {
                let b = f.to_bits();
                (2, if b >> 63 == 1 { !b } else { b | 1 << 63 })
            }
            KeyRef::Hash(h) => (3, *h),
            KeyRef::Seq(s) => (4, *s),
        };
        (tag << 29) | (v >> 35) as u32
    }

    /// The same order as [`Key::cmp_key`].
    fn cmp_key(&self, other: &KeyRef<'_>) -> Ordering {
        match (self, other) {
            (KeyRef::Bytes(a), KeyRef::Bytes(b)) => cmp_concat(a, b),
            (KeyRef::Int(a), KeyRef::Int(b)) => a.cmp(b),
            (KeyRef::Float(a), KeyRef::Float(b)) => a.total_cmp(b),
            (KeyRef::Hash(a), KeyRef::Hash(b)) | (KeyRef::Seq(a), KeyRef::Seq(b)) => a.cmp(b),
            (a, b) => a.tag().cmp(&b.tag()),
        }
    }
}

/// What the order reads of an encoded record, borrowed from its bytes; the rest is the entries.
struct RecordRef<'a> {
    shard: u32,
    name: &'a [u8],
    key: KeyRef<'a>,
    count: u64,
    entries: Cursor<'a>,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Reads a key stored after the head byte `head` (not flagged as the first entry's name).
fn read_key<'a>(head: u8, c: &mut Cursor<'a>) -> io::Result<KeyRef<'a>> {
    Ok(match head & 7 {
        0 => KeyRef::Bytes([c.bytes()?, b"", b""]),
        1 => KeyRef::Int(unzigzag(c.varint()?)),
        2 => KeyRef::Float(f64::from_bits(c.u64_le()?)),
        3 => KeyRef::Hash(c.u64_le()?),
        4 => KeyRef::Seq(c.varint()?),
        t => return Err(invalid(format!("unknown key tag {t}"))),
    })
}

/// The key stored at the front of an encoded record, `None` when it is the first entry's name (or the
/// bytes are malformed): lets the comparator decide most pairs on the key alone.
fn stored_key(bytes: &[u8]) -> Option<KeyRef<'_>> {
    let (&head, rest) = bytes.split_first()?;
    if head & KEY_IS_FIRST_ENTRY != 0 {
        return None;
    }
    read_key(head, &mut Cursor { buf: rest }).ok()
}

impl<'a> RecordRef<'a> {
    /// Reads up to the key (and the first entry's header when the key is its name).
    fn parse(bytes: &'a [u8]) -> io::Result<Self> {
        let mut c = Cursor { buf: bytes };
        let head = c.u8()?;
        let flagged = head & KEY_IS_FIRST_ENTRY != 0;
        let key = if flagged {
            if head & 7 != 0 {
                return Err(invalid("only a bytes key can be the first entry's name"));
            }
            KeyRef::Bytes([b"", b"", b""])
        } else {
            read_key(head, &mut c)?
        };
        let shard = u32::try_from(c.varint()?).map_err(|_| invalid("shard index over 32 bits"))?;
        let name = c.bytes()?;
        let count = c.varint()?;
        let mut r = RecordRef { shard, name, key, count, entries: c };
        if flagged {
            let mut first = Cursor { buf: r.entries.buf };
            if r.count == 0 {
                return Err(invalid("a key flagged as the first entry's name, but no entry"));
            }
            r.key = KeyRef::Bytes(read_entry(&mut first, name)?.name);
        }
        Ok(r)
    }

    fn cmp(&self, other: &RecordRef<'_>, codec: &RecordCodec) -> Ordering {
        let k = self.key.cmp_key(&other.key);
        let k = if codec.decreasing { k.reverse() } else { k };
        k.then_with(|| codec.unique_cmp(self.shard, self.name, other.shard, other.name))
    }
}

impl SortCodec for RecordCodec {
    type Item = RecordItem;

    fn encode(&self, item: &RecordItem, out: &mut Vec<u8>) {
        let flagged = match (&item.key, item.entries.first()) {
            (Key::Bytes(k), Some(e)) => e.name.as_bytes() == k.as_slice(),
            _ => false,
        };
        out.push(item.key.tag() | if flagged { KEY_IS_FIRST_ENTRY } else { 0 });
        match &item.key {
            Key::Bytes(_) if flagged => {}
            Key::Bytes(b) => put_bytes(out, b),
            Key::Int(i) => put_varint(out, zigzag(*i)),
            Key::Float(f) => out.extend_from_slice(&f.to_bits().to_le_bytes()),
            Key::Hash(h) => out.extend_from_slice(&h.to_le_bytes()),
            Key::Seq(s) => put_varint(out, *s),
        }
        put_varint(out, u64::from(item.shard));
        put_bytes(out, item.name.as_bytes());
        put_varint(out, item.entries.len() as u64);
        for e in &item.entries {
            let (mode, bytes) = entry_name_form(&item.name, &e.name);
            let (tag, offset) = match e.loc {
                Loc::Input(o) => (0, o),
                Loc::Decoded(o) => (4, o),
            };
            put_varint(out, (bytes.len() as u64) << 3 | tag | mode);
            out.extend_from_slice(bytes);
            put_varint(out, e.size);
            put_varint(out, offset);
        }
    }

    fn decode(&self, bytes: &[u8]) -> io::Result<RecordItem> {
        let mut r = RecordRef::parse(bytes)?;
        let name = utf8(r.name)?.to_string();
        let mut entries = Vec::with_capacity(r.count.min(1024) as usize);
        for _ in 0..r.count {
            let e = read_entry(&mut r.entries, r.name)?;
            let name = utf8(&e.name.concat())?.to_string();
            entries.push(ItemEntry { name, size: e.size, loc: e.loc });
        }
        if !r.entries.buf.is_empty() {
            return Err(invalid("trailing bytes after the record's entries"));
        }
        let key = match r.key {
            KeyRef::Bytes(parts) => Key::Bytes(parts.concat()),
            KeyRef::Int(i) => Key::Int(i),
            KeyRef::Float(f) => Key::Float(f),
            KeyRef::Hash(h) => Key::Hash(h),
            KeyRef::Seq(s) => Key::Seq(s),
        };
        Ok(RecordItem { key, shard: r.shard, name, entries })
    }

    fn compare_encoded(&self, a: &[u8], b: &[u8]) -> Ordering {
        if let (Some(ka), Some(kb)) = (stored_key(a), stored_key(b)) {
            let k = ka.cmp_key(&kb);
            if k != Ordering::Equal {
                return if self.decreasing { k.reverse() } else { k };
            }
        }
        match (RecordRef::parse(a), RecordRef::parse(b)) {
            (Ok(x), Ok(y)) => x.cmp(&y, self),
            // Only checked bytes are compared; still, malformed ones get a total order, never a panic.
            (x, y) => x.is_ok().cmp(&y.is_ok()).then_with(|| a.cmp(b)),
        }
    }

    fn sort_prefix(&self, item: &[u8]) -> u32 {
        let key = match stored_key(item) {
            Some(key) => key,
            None => match RecordRef::parse(item) {
                Ok(r) => r.key,
                // Never for what `encode` wrote; a prefix that decides nothing keeps the order.
                Err(_) => return if self.decreasing { u32::MAX } else { 0 },
            },
        };
        if self.decreasing { !key.prefix() } else { key.prefix() }
    }

    fn check(&self, bytes: &[u8]) -> io::Result<()> {
        let mut r = RecordRef::parse(bytes)?;
        utf8(r.name)?;
        for _ in 0..r.count {
            let e = read_entry(&mut r.entries, r.name)?;
            for part in e.name {
                utf8(part)?;
            }
        }
        if r.entries.buf.is_empty() { Ok(()) } else { Err(invalid("trailing bytes after the record's entries")) }
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
    use proptest::prelude::*;

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

    /// The order before compact metadata (key, then the unique names' bytes as chained iterators), kept
    /// as the reference the rank tie-break and the encoded comparator must match exactly.
    fn reference_cmp(objects: &[String], decreasing: bool, a: &RecordItem, b: &RecordItem) -> Ordering {
        let k = a.key.cmp_key(&b.key);
        let k = if decreasing { k.reverse() } else { k };
        k.then_with(|| {
            if a.shard == b.shard {
                return a.name.as_bytes().cmp(b.name.as_bytes());
            }
            let oa = objects.get(a.shard as usize).map_or("", String::as_str);
            let ob = objects.get(b.shard as usize).map_or("", String::as_str);
            let ua = oa.bytes().chain(std::iter::once(b'|')).chain(a.name.bytes());
            let ub = ob.bytes().chain(std::iter::once(b'|')).chain(b.name.bytes());
            ua.cmp(ub)
        })
    }

    /// Short strings over a small alphabet holding the separators, so prefixes and ties are common.
    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop::sample::select(vec!['a', 'b', '.', '|', '/', 'é']), 0..5)
            .prop_map(|c| c.into_iter().collect())
    }

    fn key_strategy() -> impl Strategy<Value = Key> {
        prop_oneof![
            text().prop_map(|s| Key::Bytes(s.into_bytes())),
            prop_oneof![-3i64..3, any::<i64>()].prop_map(Key::Int),
            prop::sample::select(vec![-0.0, 0.0, 1.5, -2.0, -1e300, 1e-300, f64::INFINITY, f64::NEG_INFINITY])
                .prop_map(Key::Float),
            prop_oneof![0u64..4, any::<u64>()].prop_map(Key::Hash),
            prop_oneof![0u64..3, Just(u64::MAX)].prop_map(Key::Seq),
        ]
    }

    prop_compose! {
        fn record_strategy()(
            key in key_strategy(),
            key_is_first in any::<bool>(),
            shard in 0u32..6,
            name in text(),
            entries in proptest::collection::vec(
                (prop::sample::select(vec![".", "", "x", "/"]), text(), 0u64..u64::MAX, any::<bool>(), any::<u64>()),
                0..3,
            ),
        ) -> RecordItem {
            let entries: Vec<ItemEntry> = entries
                .into_iter()
                .map(|(sep, ext, size, input, at)| ItemEntry {
                    // "x" makes a name that does not start with the record's.
                    name: if sep == "x" { ext } else { format!("{name}{sep}{ext}") },
                    size,
                    loc: if input { Loc::Input(at) } else { Loc::Decoded(at) },
                })
                .collect();
            let key = match (key_is_first, entries.first()) {
                (true, Some(e)) => Key::Bytes(e.name.clone().into_bytes()),
                _ => key,
            };
            RecordItem { key, shard, name, entries }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Random object lists (duplicates, `|` and prefix relations included, shard indices past the
        /// list) and records: the item and the encoded comparators order exactly as the reference did,
        /// and every record round-trips and passes `check`.
        #[test]
        fn order_matches_the_reference(
            objects in proptest::collection::vec(text(), 0..5),
            decreasing in any::<bool>(),
            records in proptest::collection::vec(record_strategy(), 2..12),
        ) {
            let codec = RecordCodec::new(Arc::new(objects.clone()), decreasing);
            let encoded: Vec<Vec<u8>> = records
                .iter()
                .map(|r| {
                    let mut out = Vec::new();
                    codec.encode(r, &mut out);
                    out
                })
                .collect();
            for (r, e) in records.iter().zip(&encoded) {
                prop_assert_eq!(&codec.decode(e).unwrap(), r);
                prop_assert!(codec.check(e).is_ok());
                prop_assert!(codec.decode(&e[..e.len() - 1]).is_err());
            }
            for (a, ea) in records.iter().zip(&encoded) {
                for (b, eb) in records.iter().zip(&encoded) {
                    let want = reference_cmp(&objects, decreasing, a, b);
                    prop_assert_eq!(codec.compare(a, b), want, "{:?} vs {:?}", a, b);
                    prop_assert_eq!(codec.compare_encoded(ea, eb), want, "{:?} vs {:?}", a, b);
                    if codec.sort_prefix(ea) < codec.sort_prefix(eb) {
                        prop_assert_eq!(want, Ordering::Less, "prefix of {:?} vs {:?}", a, b);
                    }
                }
            }
        }
    }

    #[test]
    fn ranks_are_exact_unless_an_object_name_with_a_bar_extends_another() {
        let exact = Ranks::new(&["b.tar".into(), "a.tar".into(), "a.tar.x".into(), "a.tar".into()]);
        assert!(exact.exact);
        assert_eq!(exact.cmp(0, 1), Some(Ordering::Greater));
        assert_eq!(exact.cmp(1, 3), Some(Ordering::Equal), "the same object name listed twice");
        assert_eq!(exact.cmp(2, 1), Some(Ordering::Less), "a.tar.x| < a.tar|");
        assert_eq!(exact.cmp(9, 1), Some(Ordering::Greater), "a missing object is the empty name: `|` > `a.tar|`");
        assert!(!Ranks::new(&["a".into(), "a|b".into()]).exact);
    }

    #[test]
    fn a_two_entry_record_encodes_compactly() {
        let c = RecordCodec::new(Arc::new(vec!["a.tar".into()]), false);
        let name = "0123456789abcdef0123";
        let entries = [".jpg", ".cls"]
            .iter()
            .map(|ext| ItemEntry { name: format!("{name}{ext}"), size: 50_000, loc: Loc::Input(1 << 26) })
            .collect();
        let mut it = RecordItem { key: Key::Hash(u64::MAX), shard: 3, name: name.into(), entries };
        let mut buf = Vec::new();
        c.encode(&it, &mut buf);
        // head 1, key 8, shard 1, name 1 + 20, count 1, per entry: 1 + 3 + size 3 + offset 4.
        assert_eq!(buf.len(), 1 + 1 + 21 + 8 + 1 + 2 * 11);
        // An alphanumeric key is the first entry's name: not stored again.
        it.key = Key::Bytes(format!("{name}.jpg").into_bytes());
        buf.clear();
        c.encode(&it, &mut buf);
        assert_eq!(buf.len(), 1 + 1 + 21 + 1 + 2 * 11);
        assert_eq!(c.decode(&buf).unwrap(), it);
    }

    #[test]
    fn varints_round_trip_and_refuse_overlong() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(get_varint(&out), Some((v, out.len())));
            assert_eq!(get_varint(&out[..out.len() - 1]), None);
        }
        assert_eq!(get_varint(&[0xff; 10]), None);
        assert_eq!(get_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]), None);
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
