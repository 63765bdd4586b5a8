//! `verify`: an independent proof that a reshard's output is right.
//!
//! Given the input shards, the output template, the ordering algorithm and the cut rule, [`verify`]
//! checks that:
//!
//! 1. **Permutation.** The output holds every input record exactly once, whole (same entry names, in the
//!    same order, with the same content: xxh3-128 of every entry), and nothing else. Records are matched
//!    by value (record name, entry names and sizes, entry hashes), as a multiset, so two input shards may
//!    both hold a record `x`. In the output a record is a run of *adjacent* entries: a record whose
//!    entries are scattered inside a shard, or split across two shards, is a violation.
//! 2. **Order.** The output records, shard by shard and in archive order, follow the algorithm's total
//!    order. The order is computed here from scratch (this module shares no ordering code with the
//!    reshard engine, only parsing of templates, sizes and locations):
//!    - `alphanumeric`: the full name of the record's first entry (with its extension), as bytes;
//!    - `content`: the content of the record's first entry whose extension (from the first dot of the
//!      basename) is the key extension, trimmed of surrounding ASCII whitespace, parsed as `i64`, `f64`
//!      (compared with `f64::total_cmp`, so `-0.0 < 0.0`; NaN is refused) or taken as bytes; a record
//!      without one, or whose key does not parse, is a violation;
//!    - `shuffle`: `xxh3_64_with_seed(unique name, seed)`, ascending as `u64`;
//!    - `none`: input order (position of the shard in the `--input` list, then of the record in its shard,
//!      by first appearance).
//!
//!    `decreasing` reverses the key comparison only. Ties are always broken by the record's unique name
//!    `<input object name>|<record name>`, ascending as bytes, also when decreasing (for `none`, whose keys
//!    never tie, `decreasing` is the exact reverse of input order).
//! 3. **Cut.** With a size rule every output shard but the last reaches the size (sum of its entries'
//!    content bytes), and no shard (the last included) reached it before its last record: a shard closes
//!    as soon as it reaches the size. With a record-count rule every shard but the last has exactly that
//!    many records and the last between one and that many. No output shard is empty.
//!
//! Output shards are the template's names in order, up to the first name that does not exist. A name
//! without a known archive extension gets the input's extension (that of the first input shard), as
//! the reshard does when the output template carries none.
//!
//! Inputs are read as the reshard reads them: an input shard that does not exist is skipped with a
//! warning (reshard's default `missing_shards: ignore`); a repeated entry name inside one input shard
//! keeps its first occurrence (the repeat belongs to no record; a warning says so); an input shard that
//! cannot be read is an error, not a violation. An output shard that cannot be read is a violation, as is
//! a zip output holding one entry name twice (zip readers see only one of them). The shuffle seed must
//! be given (reshard picks and reports one when it is not given).
//!
//! Only fingerprints are held in memory (names, sizes and 128-bit hashes; content keys), never content.
//! Shards are read in parallel, each once.
//!
//! When several things are wrong, the one reported is the first of the highest class, in this order:
//! output records that are not input records (unreadable output, extra, altered, split or duplicated
//! records, in output order), then input records missing from the output (input order), then content
//! keys, then order, then cut. Every violation is counted.

use crate::location::ShardSet;
use crate::template::{Template, known_archive_extension, with_extension};
use serde::Serialize;
use shardio::{ShardIndex, open_shard, read_entries, split_name};
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::{Xxh3Default, xxh3_64_with_seed, xxh3_128};

/// How records are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Alphanumeric,
    Shuffle,
    Content,
    None,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Algorithm> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "alphanumeric" => Some(Algorithm::Alphanumeric),
            "shuffle" => Some(Algorithm::Shuffle),
            "content" => Some(Algorithm::Content),
            "none" => Some(Algorithm::None),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Alphanumeric => "alphanumeric",
            Algorithm::Shuffle => "shuffle",
            Algorithm::Content => "content",
            Algorithm::None => "none",
        }
    }
}

/// How a content key is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    Int,
    Float,
    String,
}

impl KeyType {
    pub fn parse(s: &str) -> Option<KeyType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "int" => Some(KeyType::Int),
            "float" => Some(KeyType::Float),
            "string" => Some(KeyType::String),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyType::Int => "int",
            KeyType::Float => "float",
            KeyType::String => "string",
        }
    }
}

/// The content key of the `content` algorithm: the extension of the entry that holds it (`.cls`) and
/// how it is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentKey {
    pub ext: String,
    pub key_type: KeyType,
}

/// The order the output must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub algorithm: Algorithm,
    pub decreasing: bool,
    /// Shuffle seed (other algorithms ignore it).
    pub seed: u64,
    /// Required by (and only used by) [`Algorithm::Content`].
    pub content: Option<ContentKey>,
}

/// How output shards are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutRule {
    /// A shard closes as soon as its content bytes reach this size.
    Size(u64),
    /// Every shard but the last has exactly this many records.
    Records(u64),
}

impl fmt::Display for CutRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CutRule::Size(n) => write!(f, "--shard-size {n}"),
            CutRule::Records(n) => write!(f, "--shard-records {n}"),
        }
    }
}

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifySpec {
    /// The input shards, in input order (as `--input` lists them).
    pub input: ShardSet,
    /// Folder of the output shards.
    pub output_dir: PathBuf,
    /// Output template; shards are its names in order, up to the first one that does not exist.
    pub output: Template,
    pub order: Order,
    /// `None`: the cut is not checked (only that no output shard is empty).
    pub cut: Option<CutRule>,
    /// Shards read at once.
    pub concurrency: usize,
}

/// Verification could not run (bad arguments, unreadable input). Violations are not errors: they are
/// in [`Report::violation`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Invalid(String),
    #[error("input: {0}")]
    Input(#[from] shardio::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// The class of a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// An output shard could not be read.
    UnreadableOutput,
    /// An output record with no input record of its name.
    ExtraRecord,
    /// An output record that differs from the input record(s) of its name (content, entries, their order).
    AlteredRecord,
    /// A record cut across two output shards.
    SplitRecord,
    /// An output record matching an input record already seen in the output.
    DuplicatedRecord,
    /// An input record not in the output.
    MissingRecord,
    /// A content key missing or not parsable.
    Key,
    /// Two consecutive output records out of order.
    Order,
    /// An output shard cut against the rule, or empty.
    Cut,
}

/// One violation: what and where. `message` names the shard, the record and the entry when they apply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    pub kind: ViolationKind,
    /// Output shard (object name), or the input shard for missing records and keys.
    pub shard: Option<String>,
    pub record: Option<String>,
    pub entry: Option<String>,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The outcome: totals and the first violation (`None`: verified).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    /// Input records, entries and content bytes.
    pub records: u64,
    pub entries: u64,
    pub bytes: u64,
    /// Input shards read (missing ones are skipped, see `missing_inputs`).
    pub input_shards: u64,
    pub output_shards: u64,
    /// Records found in the output.
    pub output_records: u64,
    pub algorithm: Algorithm,
    pub decreasing: bool,
    /// Shuffle only: the seed.
    pub seed: Option<u64>,
    /// Content only: the key entry's extension and type, e.g. `.cls int`.
    pub content_key: Option<String>,
    /// The cut rule checked, e.g. `--shard-size 4096`; `None` when not checked.
    pub cut: Option<String>,
    /// Output shard object names, in order.
    pub outputs: Vec<String>,
    pub missing_inputs: Vec<String>,
    pub warnings: Vec<String>,
    /// Violations found in all.
    pub violations: u64,
    pub violation: Option<Violation>,
}

/// The output shards of `tpl` in `dir`: its names in order (each with `input_ext` appended when it has
/// no known archive extension), up to the first that does not exist.
pub fn output_names(dir: &Path, tpl: &Template, input_ext: &str) -> Result<Vec<String>, VerifyError> {
    let mut names = Vec::new();
    for name in tpl.iter() {
        let name = with_extension(&name, input_ext);
        let path = dir.join(&name);
        let exists = path
            .try_exists()
            .map_err(|source| VerifyError::Io { what: format!("output shard {}", path.display()), source })?;
        if !exists {
            break;
        }
        names.push(name);
    }
    Ok(names)
}

/// Run every check; see the module docs.
pub fn verify(spec: &VerifySpec) -> Result<Report, VerifyError> {
    let order = &spec.order;
    if order.algorithm == Algorithm::Content && order.content.is_none() {
        return Err(VerifyError::Invalid(
            "--algorithm content needs the key entry's extension and type (--key-ext .cls --key-type int)".into(),
        ));
    }
    match spec.cut {
        Some(CutRule::Size(0)) | Some(CutRule::Records(0)) => {
            return Err(VerifyError::Invalid("the cut rule needs a size or record count above 0".into()));
        }
        _ => {}
    }
    if spec.input.names.is_empty() {
        return Err(VerifyError::Invalid("--input: no shards given".into()));
    }
    let input_ext = known_archive_extension(&spec.input.names[0]).ok_or_else(|| {
        VerifyError::Invalid(format!("--input: {:?} has no known archive extension", spec.input.names[0]))
    })?;
    let outputs = output_names(&spec.output_dir, &spec.output, input_ext)?;
    if outputs.is_empty() {
        let first = spec.output.iter().next().map(|n| with_extension(&n, input_ext)).unwrap_or_default();
        return Err(VerifyError::Invalid(format!(
            "--output: no output shard: the first name, {}, does not exist",
            spec.output_dir.join(first).display()
        )));
    }
    let input_paths: HashSet<PathBuf> = spec.input.names.iter().map(|n| spec.input.path(n)).collect();
    if let Some(clash) = outputs.iter().find(|n| input_paths.contains(&spec.output_dir.join(n))) {
        return Err(VerifyError::Invalid(format!("--output: {clash} is also an input shard")));
    }
    let conc = spec.concurrency.max(1);
    let mut warnings = Vec::new();

    // Inputs: fingerprints and keys of every record.
    let key_ext = order.content.as_ref().filter(|_| order.algorithm == Algorithm::Content).map(|c| c.ext.as_str());
    let read = crate::parallel::map(&spec.input.names, conc, |i, name| -> Result<Option<InShard>, VerifyError> {
        let path = spec.input.path(name);
        let exists = path
            .try_exists()
            .map_err(|source| VerifyError::Io { what: format!("input shard {}", path.display()), source })?;
        if !exists {
            return Ok(None);
        }
        let (index, seen) = scan_shard(&path, false, key_ext)?;
        InShard::build(u32_of(i)?, name, &index, &seen, order).map(Some)
    });
    let mut shards = Vec::new();
    let mut missing_inputs = Vec::new();
    for (name, r) in spec.input.names.iter().zip(read) {
        match r? {
            Some(s) => shards.push(s),
            None => missing_inputs.push(name.clone()),
        }
    }
    if shards.is_empty() {
        return Err(VerifyError::Invalid(format!(
            "--input: none of the {} input shards exists (first: {})",
            spec.input.names.len(),
            spec.input.path(&spec.input.names[0]).display()
        )));
    }
    for m in &missing_inputs {
        warnings.push(format!("input shard {m} does not exist; verified without it"));
    }
    for s in &shards {
        for d in &s.duplicates {
            warnings.push(format!(
                "input shard {}: entry {d:?} repeated; the repeat is not part of any record (as in reshard)",
                s.name
            ));
        }
    }
    let inputs = Inputs::new(order.clone(), shards)?;

    // Outputs, in order; shards are read `conc` at a time and checked in order.
    let mut check = Checker::new(inputs, spec.cut, &outputs);
    for (c, chunk) in outputs.chunks(conc).enumerate() {
        let read = crate::parallel::map(chunk, conc, |_, name| OutShard::read(&spec.output_dir.join(name), name));
        for (k, shard) in read.into_iter().enumerate() {
            check.shard(u32_of(c * conc + k)?, &shard);
        }
    }
    Ok(check.finish(spec, missing_inputs, warnings))
}

fn u32_of(n: usize) -> Result<u32, VerifyError> {
    u32::try_from(n).map_err(|_| VerifyError::Invalid(format!("too many shards or records ({n})")))
}

// ---------------------------------------------------------------------------------------------------
// Hashing

/// Read size for hashing entries.
const CHUNK: usize = 256 * 1024;

/// Fill `buf` from `r` as far as it goes; returns the bytes read (fewer than `buf.len()` at the end).
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// xxh3-128 of everything `r` yields; small entries are hashed in one call, big ones streamed. With
/// `keep`, the content is also kept there (content keys).
fn hash_entry(r: &mut dyn Read, buf: &mut [u8], keep: Option<&mut Vec<u8>>) -> io::Result<u128> {
    if let Some(k) = keep {
        k.clear();
        r.read_to_end(k)?;
        return Ok(xxh3_128(k));
    }
    let first = fill(r, buf)?;
    if first < buf.len() {
        return Ok(xxh3_128(&buf[..first]));
    }
    let mut h = Xxh3Default::new();
    h.update(buf);
    loop {
        let n = fill(r, buf)?;
        h.update(&buf[..n]);
        if n < buf.len() {
            return Ok(h.digest128());
        }
    }
}

/// Hash of a record's identity: its name, and the name, size and content hash of each entry in order.
struct FpHasher(Xxh3Default);

impl FpHasher {
    fn new(record: &str) -> Self {
        let mut h = Xxh3Default::new();
        h.update(&(record.len() as u64).to_le_bytes());
        h.update(record.as_bytes());
        FpHasher(h)
    }
    fn push(&mut self, name: &str, size: u64, hash: u128) {
        self.0.update(&(name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update(&size.to_le_bytes());
        self.0.update(&hash.to_le_bytes());
    }
    fn digest(&self) -> u128 {
        self.0.digest128()
    }
}

/// One entry as seen while streaming a shard.
struct Seen {
    offset: u64,
    name: Option<String>,
    size: u64,
    hash: u128,
    key: Option<Vec<u8>>,
}

/// Stream a shard, hashing every entry (in archive order). `keep_names` keeps each entry's name;
/// `key_ext` keeps the content of entries with that extension.
fn scan_shard(path: &Path, keep_names: bool, key_ext: Option<&str>) -> shardio::Result<(ShardIndex, Vec<Seen>)> {
    let (file, format) = open_shard(path)?;
    let label = path.display().to_string();
    let mut buf = vec![0u8; CHUNK];
    let mut seen = Vec::new();
    let index = read_entries(&label, format, file, |meta, data| {
        let mut key = key_ext.filter(|ext| split_name(&meta.name).1 == *ext).map(|_| Vec::new());
        let hash = hash_entry(data, &mut buf, key.as_mut())?;
        seen.push(Seen {
            offset: meta.header_offset,
            name: keep_names.then(|| meta.name.clone()),
            size: meta.size,
            hash,
            key,
        });
        Ok(())
    })?;
    Ok((index, seen))
}

// ---------------------------------------------------------------------------------------------------
// Inputs

/// A byte range in a shard's text arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

#[derive(Debug, Clone, Copy)]
struct EntryFp {
    name: Span,
    size: u64,
    hash: u128,
}

/// A record's ordering key. `Implicit`: computed from the record itself (alphanumeric: the first entry's
/// name; none: its position). `Bad`: the content key is missing or does not parse (reported, and the
/// record is left out of the order check).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Key {
    Implicit,
    Int(i64),
    Float(f64),
    Str(Span),
    Hash(u64),
    Bad,
}

const NOT_PLACED: u64 = u64::MAX;

#[derive(Debug, Clone)]
struct InRec {
    name: Span,
    first: u32,
    count: u32,
    key: Key,
    /// Where the record was found in the output (`out shard << 32 | record`), or `NOT_PLACED`.
    placed: u64,
}

struct InShard {
    /// Position in the `--input` list (the `none` order).
    list_index: u32,
    /// Object name (the first half of unique names).
    name: String,
    text: String,
    keys: Vec<u8>,
    entries: Vec<EntryFp>,
    recs: Vec<InRec>,
    /// Fingerprint of each record.
    fps: Vec<u128>,
    duplicates: Vec<String>,
    /// First key violation (record, message) and how many.
    key_error: Option<(u32, String)>,
    key_errors: u64,
}

/// Parse a content key: trimmed of ASCII whitespace; `i64`, `f64` (not NaN) or bytes.
fn parse_key(raw: &[u8], t: KeyType) -> Result<ParsedKey<'_>, String> {
    let v = raw.trim_ascii();
    let text = || std::str::from_utf8(v).map_err(|_| "is not UTF-8 text".to_string());
    match t {
        KeyType::Int => {
            let s = text()?;
            s.parse::<i64>().map(ParsedKey::Int).map_err(|e| format!("{s:?} is not an int ({e})"))
        }
        KeyType::Float => {
            let s = text()?;
            match s.parse::<f64>() {
                Ok(f) if f.is_nan() => Err(format!("{s:?} is NaN, which has no order")),
                Ok(f) => Ok(ParsedKey::Float(f)),
                Err(e) => Err(format!("{s:?} is not a float ({e})")),
            }
        }
        KeyType::String => Ok(ParsedKey::Str(v)),
    }
}

#[derive(Debug, PartialEq)]
enum ParsedKey<'a> {
    Int(i64),
    Float(f64),
    Str(&'a [u8]),
}

impl InShard {
    fn build(
        list_index: u32,
        name: &str,
        index: &ShardIndex,
        seen: &[Seen],
        order: &Order,
    ) -> Result<Self, VerifyError> {
        let by_offset: HashMap<u64, usize> = seen.iter().enumerate().map(|(i, s)| (s.offset, i)).collect();
        let mut s = InShard {
            list_index,
            name: name.to_string(),
            text: String::new(),
            keys: Vec::new(),
            entries: Vec::with_capacity(index.entry_count()),
            recs: Vec::with_capacity(index.records.len()),
            fps: Vec::with_capacity(index.records.len()),
            duplicates: index.duplicates.iter().map(|d| d.name.clone()).collect(),
            key_error: None,
            key_errors: 0,
        };
        let mut uname = String::new();
        for rec in &index.records {
            let rec_name = s.span(&rec.name)?;
            let first = u32_of(s.entries.len())?;
            let mut fp = FpHasher::new(&rec.name);
            for e in &rec.entries {
                let seen = by_offset.get(&e.header_offset).and_then(|&i| seen.get(i)).ok_or_else(|| {
                    VerifyError::Invalid(format!("input shard {name}: entry {:?} was indexed but not read", e.name))
                })?;
                fp.push(&e.name, e.size, seen.hash);
                let entry_name = s.span(&e.name)?;
                s.entries.push(EntryFp { name: entry_name, size: e.size, hash: seen.hash });
            }
            let pos = u32_of(s.recs.len())?;
            let key = match (order.algorithm, &order.content) {
                (Algorithm::Shuffle, _) => {
                    uname.clear();
                    uname.push_str(name);
                    uname.push('|');
                    uname.push_str(&rec.name);
                    Key::Hash(xxh3_64_with_seed(uname.as_bytes(), order.seed))
                }
                (Algorithm::Content, Some(ck)) => {
                    let raw = rec
                        .entry_with_ext(&ck.ext)
                        .and_then(|e| by_offset.get(&e.header_offset))
                        .and_then(|&i| seen.get(i))
                        .and_then(|x| x.key.as_deref());
                    let parsed = match raw {
                        None => Err(format!("has no entry with extension {} (the content key)", ck.ext)),
                        Some(raw) => parse_key(raw, ck.key_type)
                            .map_err(|why| format!("content key {}{}: {why}", rec.name, ck.ext)),
                    };
                    match parsed {
                        Ok(ParsedKey::Int(i)) => Key::Int(i),
                        Ok(ParsedKey::Float(f)) => Key::Float(f),
                        Ok(ParsedKey::Str(b)) => {
                            let start = u32_of(s.keys.len())?;
                            s.keys.extend_from_slice(b);
                            Key::Str(Span { start, len: u32_of(b.len())? })
                        }
                        Err(why) => {
                            s.key_errors += 1;
                            if s.key_error.is_none() {
                                s.key_error = Some((pos, format!("input record \"{name}|{}\" {why}", rec.name)));
                            }
                            Key::Bad
                        }
                    }
                }
                _ => Key::Implicit,
            };
            let count = u32_of(rec.entries.len())?;
            s.recs.push(InRec { name: rec_name, first, count, key, placed: NOT_PLACED });
            s.fps.push(fp.digest());
        }
        s.text.shrink_to_fit();
        s.keys.shrink_to_fit();
        Ok(s)
    }

    fn span(&mut self, t: &str) -> Result<Span, VerifyError> {
        let start = u32_of(self.text.len())?;
        self.text.push_str(t);
        Ok(Span { start, len: u32_of(t.len())? })
    }

    fn str(&self, s: Span) -> &str {
        self.text.get(s.start as usize..(s.start + s.len) as usize).unwrap_or("")
    }

    fn key_bytes(&self, s: Span) -> &[u8] {
        self.keys.get(s.start as usize..(s.start + s.len) as usize).unwrap_or(&[])
    }
}

/// An input record: (index in `Inputs::shards`, index in that shard's records).
type RecRef = (u32, u32);

/// All input fingerprints, and the order.
struct Inputs {
    order: Order,
    shards: Vec<InShard>,
    /// (fingerprint, record) sorted by fingerprint, then by the order (so that equal records are placed
    /// in order).
    by_fp: Vec<(u128, u32, u32)>,
}

impl Inputs {
    fn new(order: Order, shards: Vec<InShard>) -> Result<Self, VerifyError> {
        let mut by_fp = Vec::with_capacity(shards.iter().map(|s| s.recs.len()).sum());
        for (si, s) in shards.iter().enumerate() {
            let si = u32_of(si)?;
            for (ri, fp) in s.fps.iter().enumerate() {
                by_fp.push((*fp, si, u32_of(ri)?));
            }
        }
        let mut inputs = Inputs { order, shards, by_fp: Vec::new() };
        by_fp.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| inputs.cmp((a.1, a.2), (b.1, b.2))));
        inputs.by_fp = by_fp;
        for s in &mut inputs.shards {
            s.fps = Vec::new();
        }
        Ok(inputs)
    }

    fn shard(&self, r: RecRef) -> &InShard {
        &self.shards[r.0 as usize]
    }

    fn rec(&self, r: RecRef) -> &InRec {
        &self.shards[r.0 as usize].recs[r.1 as usize]
    }

    fn rec_name(&self, r: RecRef) -> &str {
        self.shard(r).str(self.rec(r).name)
    }

    fn entries(&self, r: RecRef) -> &[EntryFp] {
        let rec = self.rec(r);
        let first = rec.first as usize;
        &self.shard(r).entries[first..first + rec.count as usize]
    }

    fn entry_names(&self, r: RecRef) -> Vec<&str> {
        self.entries(r).iter().map(|e| self.shard(r).str(e.name)).collect()
    }

    fn uname(&self, r: RecRef) -> String {
        format!("{}|{}", self.shard(r).name, self.rec_name(r))
    }

    /// The records with this fingerprint (sorted in order).
    fn with_fp(&self, fp: u128) -> &[(u128, u32, u32)] {
        let lo = self.by_fp.partition_point(|x| x.0 < fp);
        let hi = lo + self.by_fp[lo..].partition_point(|x| x.0 == fp);
        &self.by_fp[lo..hi]
    }

    fn known(&self, fp: u128) -> bool {
        !self.with_fp(fp).is_empty()
    }

    /// Unique names compared as bytes, without building them.
    fn cmp_uname(&self, a: RecRef, b: RecRef) -> Ordering {
        let ua = self.shard(a).name.bytes().chain(std::iter::once(b'|')).chain(self.rec_name(a).bytes());
        let ub = self.shard(b).name.bytes().chain(std::iter::once(b'|')).chain(self.rec_name(b).bytes());
        ua.cmp(ub)
    }

    /// Keys compared, ascending (a bad key sorts first; such records are not order-checked).
    fn cmp_key(&self, a: RecRef, b: RecRef) -> Ordering {
        let (ka, kb) = (self.rec(a).key, self.rec(b).key);
        match (ka, kb) {
            (Key::Bad, Key::Bad) => Ordering::Equal,
            (Key::Bad, _) => Ordering::Less,
            (_, Key::Bad) => Ordering::Greater,
            (Key::Int(x), Key::Int(y)) => x.cmp(&y),
            (Key::Float(x), Key::Float(y)) => x.total_cmp(&y),
            (Key::Str(x), Key::Str(y)) => self.shard(a).key_bytes(x).cmp(self.shard(b).key_bytes(y)),
            (Key::Hash(x), Key::Hash(y)) => x.cmp(&y),
            _ => match self.order.algorithm {
                Algorithm::None => (self.shard(a).list_index, a.1).cmp(&(self.shard(b).list_index, b.1)),
                _ => {
                    let fa = self.entries(a).first().map_or("", |e| self.shard(a).str(e.name));
                    let fb = self.entries(b).first().map_or("", |e| self.shard(b).str(e.name));
                    fa.as_bytes().cmp(fb.as_bytes())
                }
            },
        }
    }

    /// The total order: key (reversed when decreasing), then unique name ascending.
    fn cmp(&self, a: RecRef, b: RecRef) -> Ordering {
        let k = self.cmp_key(a, b);
        let k = if self.order.decreasing { k.reverse() } else { k };
        k.then_with(|| self.cmp_uname(a, b))
    }

    /// A record's key, for messages.
    fn key_text(&self, r: RecRef) -> String {
        let s = self.shard(r);
        match self.rec(r).key {
            Key::Int(i) => i.to_string(),
            Key::Float(f) => format!("{f:?}"),
            Key::Str(b) => format!("{:?}", String::from_utf8_lossy(s.key_bytes(b))),
            Key::Hash(h) => format!("{h:#018x}"),
            Key::Bad => "(bad key)".into(),
            Key::Implicit => match self.order.algorithm {
                Algorithm::None => format!("[input shard {}, record {}]", s.list_index + 1, r.1 + 1),
                _ => format!("{:?}", self.entries(r).first().map_or("", |e| s.str(e.name))),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Outputs

#[derive(Debug, Clone, PartialEq, Eq)]
struct OutEntry {
    name: String,
    size: u64,
    hash: u128,
}

struct OutShard {
    name: String,
    entries: Vec<OutEntry>,
    error: Option<String>,
    /// Zip members hidden behind a later member of the same name.
    hidden: Vec<String>,
}

impl OutShard {
    fn read(path: &Path, name: &str) -> OutShard {
        match scan_shard(path, true, None) {
            Ok((index, seen)) => OutShard {
                name: name.to_string(),
                entries: seen
                    .into_iter()
                    .map(|s| OutEntry { name: s.name.unwrap_or_default(), size: s.size, hash: s.hash })
                    .collect(),
                error: None,
                hidden: if index.format == shardio::Format::Zip {
                    index.duplicates.into_iter().map(|d| d.name).collect()
                } else {
                    Vec::new()
                },
            },
            Err(e) => {
                OutShard { name: name.to_string(), entries: Vec::new(), error: Some(e.to_string()), hidden: vec![] }
            }
        }
    }
}

/// Longest run searched for the best split into records (longer runs split at repeated entry names).
const MAX_SEGMENT_SEARCH: usize = 64;

/// Split a run of adjacent output entries of one record name into records: the whole run when it is an
/// input record; else the split into the fewest input records, when one exists; else at each entry
/// name seen before in the current piece. Returns (entry range, fingerprint) of each piece.
fn segment(rec: &str, run: &[OutEntry], known: impl Fn(u128) -> bool) -> Vec<(Range<usize>, u128)> {
    let n = run.len();
    let fp_of = |r: Range<usize>| {
        let mut h = FpHasher::new(rec);
        for e in &run[r] {
            h.push(&e.name, e.size, e.hash);
        }
        h.digest()
    };
    let whole = fp_of(0..n);
    if known(whole) {
        return vec![(0..n, whole)];
    }
    if n <= MAX_SEGMENT_SEARCH {
        // best[j]: (start of the last piece, its fingerprint, pieces) of the fewest-pieces cover of 0..j.
        let mut best: Vec<Option<(usize, u128, usize)>> = vec![None; n + 1];
        best[0] = Some((0, 0, 0));
        for i in 0..n {
            let Some((_, _, pieces)) = best[i] else { continue };
            let mut h = FpHasher::new(rec);
            for j in i..n {
                if run[i..j].iter().any(|e| e.name == run[j].name) {
                    break;
                }
                h.push(&run[j].name, run[j].size, run[j].hash);
                let fp = h.digest();
                if known(fp) && best[j + 1].is_none_or(|(_, _, p)| p > pieces + 1) {
                    best[j + 1] = Some((i, fp, pieces + 1));
                }
            }
        }
        if best[n].is_some() {
            let mut out = Vec::new();
            let mut j = n;
            while j > 0 {
                let Some((i, fp, _)) = best[j] else { break };
                out.push((i..j, fp));
                j = i;
            }
            out.reverse();
            return out;
        }
    }
    let mut out = Vec::new();
    let mut start = 0;
    for j in 0..n {
        if run[start..j].iter().any(|e| e.name == run[j].name) {
            out.push((start..j, fp_of(start..j)));
            start = j;
        }
    }
    out.push((start..n, fp_of(start..n)));
    out
}

/// The cut rule on one shard's record sizes; the reason it is broken, if it is.
fn check_cut(rule: CutRule, sizes: &[u64], last: bool) -> Option<String> {
    let n = sizes.len() as u64;
    match rule {
        CutRule::Size(size) => {
            let total: u64 = sizes.iter().sum();
            let mut reached = 0u64;
            for (k, s) in sizes.iter().enumerate() {
                reached += s;
                if reached >= size && k + 1 < sizes.len() {
                    return Some(format!(
                        "cut too late: it reached {reached} bytes (>= {size}) at record {} but goes on to {n} records \
                         ({total} bytes); a shard closes as soon as it reaches the size",
                        k + 1
                    ));
                }
            }
            (!last && total < size).then(|| {
                format!("cut too early: {total} bytes in {n} records, below the shard size {size} (and it is not the last shard)")
            })
        }
        CutRule::Records(want) => {
            if n > want {
                Some(format!("cut too late: {n} records, more than {want}"))
            } else if !last && n < want {
                Some(format!("cut too early: {n} records, expected exactly {want} (it is not the last shard)"))
            } else {
                None
            }
        }
    }
}

/// The first violation of a class, and how many there were.
#[derive(Default)]
struct Found {
    first: Option<Violation>,
    count: u64,
}

impl Found {
    fn add(&mut self, v: impl FnOnce() -> Violation) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(v());
        }
    }
}

fn list(names: &[&str]) -> String {
    names.join(", ")
}

/// Why an output record matches no input record.
fn diagnose(
    inputs: &Inputs,
    here: &str,
    out: &OutShard,
    rec_name: &str,
    entries: &[OutEntry],
    first: bool,
    last: bool,
) -> Violation {
    let v = |kind, entry: Option<&str>, message: String| Violation {
        kind,
        shard: Some(out.name.clone()),
        record: Some(rec_name.to_string()),
        entry: entry.map(str::to_string),
        message: format!("{here}: {message}"),
    };
    let out_names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    // Input records of that name, unplaced ones first.
    let mut cands: Vec<RecRef> = Vec::new();
    for (si, s) in inputs.shards.iter().enumerate() {
        for (ri, r) in s.recs.iter().enumerate() {
            if s.str(r.name) == rec_name {
                cands.push((si as u32, ri as u32));
            }
        }
    }
    cands.sort_by_key(|&r| inputs.rec(r).placed != NOT_PLACED);
    if cands.is_empty() {
        return v(
            ViolationKind::ExtraRecord,
            None,
            format!("extra record: no input record is named {rec_name:?} (entries: {})", list(&out_names)),
        );
    }
    let matches = |r: RecRef, i: usize, e: &OutEntry| {
        inputs
            .entries(r)
            .get(i)
            .is_some_and(|x| inputs.shard(r).str(x.name) == e.name && x.size == e.size && x.hash == e.hash)
    };
    // Same entry names in the same order: content differs.
    for &r in &cands {
        let names = inputs.entry_names(r);
        let differs = entries.iter().enumerate().find(|&(i, e)| !matches(r, i, e));
        if let (true, Some((i, e))) = (names == out_names, differs) {
            let size = inputs.entries(r).get(i).map_or(0, |x| x.size);
            let detail = if size == e.size {
                format!("same size ({} bytes), different bytes", e.size)
            } else {
                format!("{} bytes, the input has {size}", e.size)
            };
            return v(
                ViolationKind::AlteredRecord,
                Some(&e.name),
                format!("content of entry {:?} differs from input record {:?} ({detail})", e.name, inputs.uname(r)),
            );
        }
    }
    // Part of a record cut at a shard boundary.
    for &r in &cands {
        let n = inputs.entries(r).len();
        if entries.len() >= n {
            continue;
        }
        let names = inputs.entry_names(r);
        let prefix = entries.iter().enumerate().all(|(i, e)| matches(r, i, e));
        let suffix = entries.iter().enumerate().all(|(i, e)| matches(r, n - entries.len() + i, e));
        if (prefix && last) || (suffix && first) {
            let (edge, part) = if prefix && last { ("ends", "first") } else { ("starts", "last") };
            return v(
                ViolationKind::SplitRecord,
                entries.first().map(|e| e.name.as_str()),
                format!(
                    "record split across output shards: {} {edge} with the {part} {} of the {n} entries of input record {:?} ({})",
                    out.name,
                    entries.len(),
                    inputs.uname(r),
                    list(&names)
                ),
            );
        }
    }
    // Same entries, another order.
    for &r in &cands {
        let mut a = inputs.entry_names(r);
        let mut b = out_names.clone();
        a.sort_unstable();
        b.sort_unstable();
        if a == b {
            return v(
                ViolationKind::AlteredRecord,
                None,
                format!(
                    "entries out of order: {} (input record {:?} has {})",
                    list(&out_names),
                    inputs.uname(r),
                    list(&inputs.entry_names(r))
                ),
            );
        }
    }
    let r = cands[0];
    let in_names = inputs.entry_names(r);
    let missing: Vec<&str> = in_names.iter().filter(|n| !out_names.contains(n)).copied().collect();
    let extra: Vec<&str> = out_names.iter().filter(|n| !in_names.contains(n)).copied().collect();
    let mut why = Vec::new();
    if !missing.is_empty() {
        why.push(format!("missing {}", list(&missing)));
    }
    if !extra.is_empty() {
        why.push(format!("extra {}", list(&extra)));
    }
    if why.is_empty() {
        why.push("different entries".into());
    }
    v(
        ViolationKind::AlteredRecord,
        extra.first().or(missing.first()).copied(),
        format!(
            "record differs from input record {:?}: {} (output has {}; input has {})",
            inputs.uname(r),
            why.join("; "),
            list(&out_names),
            list(&in_names)
        ),
    )
}

struct Checker<'a> {
    inputs: Inputs,
    cut: Option<CutRule>,
    outputs: &'a [String],
    /// The last output record that was order-checked: (input record, output shard, record in it).
    prev: Option<(RecRef, u32, u32)>,
    stream: Found,
    order: Found,
    cut_found: Found,
    output_records: u64,
}

impl<'a> Checker<'a> {
    fn new(inputs: Inputs, cut: Option<CutRule>, outputs: &'a [String]) -> Self {
        Checker {
            inputs,
            cut,
            outputs,
            prev: None,
            stream: Found::default(),
            order: Found::default(),
            cut_found: Found::default(),
            output_records: 0,
        }
    }

    fn shard(&mut self, index: u32, out: &OutShard) {
        let at = |kind, record: Option<&str>, entry: Option<&str>, message: String| Violation {
            kind,
            shard: Some(out.name.clone()),
            record: record.map(str::to_string),
            entry: entry.map(str::to_string),
            message,
        };
        if let Some(e) = &out.error {
            self.stream.add(|| {
                at(
                    ViolationKind::UnreadableOutput,
                    None,
                    None,
                    format!("output shard {} cannot be read: {e}", out.name),
                )
            });
            return;
        }
        for h in &out.hidden {
            self.stream.add(|| {
                at(
                    ViolationKind::DuplicatedRecord,
                    Some(split_name(h).0),
                    Some(h),
                    format!(
                        "output shard {}: entry {h:?} appears more than once in this zip; readers see only one of them",
                        out.name
                    ),
                )
            });
        }
        // Runs of adjacent entries of one record name, split into records.
        let mut pieces: Vec<(Range<usize>, u128)> = Vec::new();
        let mut start = 0;
        while start < out.entries.len() {
            let rec = split_name(&out.entries[start].name).0;
            let mut end = start + 1;
            while end < out.entries.len() && split_name(&out.entries[end].name).0 == rec {
                end += 1;
            }
            let run = &out.entries[start..end];
            pieces.extend(
                segment(rec, run, |fp| self.inputs.known(fp))
                    .into_iter()
                    .map(|(r, fp)| (r.start + start..r.end + start, fp)),
            );
            start = end;
        }
        if pieces.is_empty() {
            self.cut_found.add(|| at(ViolationKind::Cut, None, None, format!("output shard {} is empty", out.name)));
            return;
        }
        let count = pieces.len();
        for (k, (range, fp)) in pieces.iter().enumerate() {
            let entries = &out.entries[range.clone()];
            self.record(index, u32::try_from(k).unwrap_or(u32::MAX), k == 0, k + 1 == count, out, entries, *fp);
        }
        self.output_records += count as u64;
        if let Some(rule) = self.cut {
            let sizes: Vec<u64> =
                pieces.iter().map(|(r, _)| out.entries[r.clone()].iter().map(|e| e.size).sum()).collect();
            let last = index as usize + 1 == self.outputs.len();
            if let Some(why) = check_cut(rule, &sizes, last) {
                self.cut_found
                    .add(|| at(ViolationKind::Cut, None, None, format!("output shard {} ({rule}): {why}", out.name)));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(&mut self, shard: u32, k: u32, first: bool, last: bool, out: &OutShard, entries: &[OutEntry], fp: u128) {
        let rec_name = entries.first().map_or("", |e| split_name(&e.name).0);
        let here = format!("output shard {}, record {} {rec_name:?}", out.name, k + 1);
        let inputs = &self.inputs;
        let candidates = inputs.with_fp(fp);
        let same = |r: RecRef| {
            let ie = inputs.entries(r);
            inputs.rec_name(r) == rec_name
                && ie.len() == entries.len()
                && ie
                    .iter()
                    .zip(entries)
                    .all(|(a, b)| inputs.shard(r).str(a.name) == b.name && a.size == b.size && a.hash == b.hash)
        };
        let free = candidates.iter().map(|&(_, s, r)| (s, r)).find(|&r| inputs.rec(r).placed == NOT_PLACED && same(r));
        let Some(r) = free else {
            let placed = candidates.iter().map(|&(_, s, r)| (s, r)).find(|&r| same(r));
            let v = || match placed {
                Some(r) => {
                    let p = inputs.rec(r).placed;
                    let (ps, pk) = ((p >> 32) as usize, p & 0xffff_ffff);
                    let prev = self.outputs.get(ps).map_or("?", String::as_str);
                    Violation {
                        kind: ViolationKind::DuplicatedRecord,
                        shard: Some(out.name.clone()),
                        record: Some(rec_name.to_string()),
                        entry: None,
                        message: format!(
                            "{here}: duplicated record: input record {:?} is already in the output at {prev}, record {}",
                            inputs.uname(r),
                            pk + 1
                        ),
                    }
                }
                None => diagnose(inputs, &here, out, rec_name, entries, first, last),
            };
            self.stream.add(v);
            return;
        };
        self.inputs.shards[r.0 as usize].recs[r.1 as usize].placed = (u64::from(shard) << 32) | u64::from(k);
        if self.inputs.rec(r).key == Key::Bad {
            return;
        }
        if let Some((p, ps, pk)) = self.prev
            && self.inputs.cmp(p, r) != Ordering::Less
        {
            let inputs = &self.inputs;
            let outputs = self.outputs;
            self.order.add(|| {
                let dir = if inputs.order.decreasing { "decreasing " } else { "" };
                let alg = match inputs.order.algorithm {
                    Algorithm::None => "input",
                    other => other.name(),
                };
                let why = if inputs.cmp_key(p, r) == Ordering::Equal {
                    format!(
                        "its key {} ties with that of the previous record and its unique name {:?} sorts before {:?}",
                        inputs.key_text(r),
                        inputs.uname(r),
                        inputs.uname(p)
                    )
                } else {
                    format!(
                        "its key {} (input record {:?}) must not come after the key {} of the previous record (input record {:?})",
                        inputs.key_text(r),
                        inputs.uname(r),
                        inputs.key_text(p),
                        inputs.uname(p)
                    )
                };
                Violation {
                    kind: ViolationKind::Order,
                    shard: Some(out.name.clone()),
                    record: Some(rec_name.to_string()),
                    entry: None,
                    message: format!(
                        "{here}: out of {dir}{alg} order after {} record {} {:?}: {why}",
                        outputs.get(ps as usize).map_or("?", String::as_str),
                        pk + 1,
                        inputs.rec_name(p)
                    ),
                }
            });
        }
        self.prev = Some((r, shard, k));
    }

    fn finish(self, spec: &VerifySpec, missing_inputs: Vec<String>, warnings: Vec<String>) -> Report {
        let inputs = &self.inputs;
        let mut missing = Found::default();
        let mut keys = Found::default();
        let (mut records, mut entries, mut bytes) = (0u64, 0u64, 0u64);
        for (si, s) in inputs.shards.iter().enumerate() {
            records += s.recs.len() as u64;
            entries += s.entries.len() as u64;
            bytes += s.entries.iter().map(|e| e.size).sum::<u64>();
            for (ri, rec) in s.recs.iter().enumerate() {
                if rec.placed == NOT_PLACED {
                    let r = (si as u32, ri as u32);
                    missing.add(|| Violation {
                        kind: ViolationKind::MissingRecord,
                        shard: Some(s.name.clone()),
                        record: Some(s.str(rec.name).to_string()),
                        entry: None,
                        message: format!(
                            "input record {:?} ({} entries: {}; {} bytes) is missing from the output",
                            inputs.uname(r),
                            rec.count,
                            list(&inputs.entry_names(r)),
                            inputs.entries(r).iter().map(|e| e.size).sum::<u64>()
                        ),
                    });
                }
            }
            if let Some((ri, msg)) = &s.key_error {
                keys.count += s.key_errors - 1;
                keys.add(|| Violation {
                    kind: ViolationKind::Key,
                    shard: Some(s.name.clone()),
                    record: s.recs.get(*ri as usize).map(|r| s.str(r.name).to_string()),
                    entry: None,
                    message: msg.clone(),
                });
            }
        }
        let classes = [self.stream, missing, keys, self.order, self.cut_found];
        let violations = classes.iter().map(|c| c.count).sum();
        let violation = classes.into_iter().find_map(|c| c.first);
        Report {
            ok: violation.is_none(),
            records,
            entries,
            bytes,
            input_shards: inputs.shards.len() as u64,
            output_shards: self.outputs.len() as u64,
            output_records: self.output_records,
            algorithm: spec.order.algorithm,
            decreasing: spec.order.decreasing,
            seed: (spec.order.algorithm == Algorithm::Shuffle).then_some(spec.order.seed),
            content_key: spec
                .order
                .content
                .as_ref()
                .filter(|_| spec.order.algorithm == Algorithm::Content)
                .map(|c| format!("{} {}", c.ext, c.key_type.name())),
            cut: spec.cut.map(|c| c.to_string()),
            outputs: self.outputs.to_vec(),
            missing_inputs,
            warnings,
            violations,
            violation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, size: u64, hash: u128) -> OutEntry {
        OutEntry { name: name.into(), size, hash }
    }

    fn fp(rec: &str, entries: &[OutEntry]) -> u128 {
        let mut h = FpHasher::new(rec);
        for x in entries {
            h.push(&x.name, x.size, x.hash);
        }
        h.digest()
    }

    #[test]
    fn output_names_stop_at_the_first_missing_and_take_the_input_extension() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["part-0.tar", "part-1.tar", "part-3.tar", "z-0.zip"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let names = |t: &str, ext: &str| output_names(dir.path(), &Template::parse(t).unwrap(), ext).unwrap();
        assert_eq!(names("part-{0..9}", ".tar"), ["part-0.tar", "part-1.tar"], "stops at the gap");
        assert_eq!(names("part-{0..9}.tar", ".zip"), ["part-0.tar", "part-1.tar"], "the template's own extension");
        assert_eq!(names("z-{0..9}", ".zip"), ["z-0.zip"]);
        assert!(names("z-{0..9}", ".tar").is_empty());
        assert_eq!(names("part-%d", ".tar"), ["part-0.tar", "part-1.tar"], "fmt templates too");
    }

    #[test]
    fn streamed_and_one_shot_hashes_agree() {
        let data: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i * 7 % 251) as u8).collect();
        let mut buf = vec![0u8; CHUNK];
        for len in [0, 1, 240, CHUNK - 1, CHUNK, CHUNK + 1, data.len()] {
            let mut r: &[u8] = &data[..len];
            assert_eq!(hash_entry(&mut r, &mut buf, None).unwrap(), xxh3_128(&data[..len]), "len {len}");
            let mut r: &[u8] = &data[..len];
            let mut keep = Vec::new();
            assert_eq!(hash_entry(&mut r, &mut buf, Some(&mut keep)).unwrap(), xxh3_128(&data[..len]));
            assert_eq!(keep, &data[..len]);
        }
    }

    #[test]
    fn keys_are_trimmed_and_typed() {
        assert_eq!(parse_key(b" 42\n", KeyType::Int), Ok(ParsedKey::Int(42)));
        assert_eq!(parse_key(b"-7", KeyType::Int), Ok(ParsedKey::Int(-7)));
        assert!(parse_key(b"4.5", KeyType::Int).unwrap_err().contains("not an int"));
        assert_eq!(parse_key(b"\t2.5 ", KeyType::Float), Ok(ParsedKey::Float(2.5)));
        assert!(parse_key(b"NaN", KeyType::Float).unwrap_err().contains("NaN"));
        assert!(parse_key(b"x", KeyType::Float).is_err());
        assert_eq!(parse_key(b"  cat \r\n", KeyType::String), Ok(ParsedKey::Str(b"cat")));
        assert!(parse_key(b"\xff", KeyType::Int).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn size_cut_closes_as_soon_as_the_size_is_reached() {
        let rule = CutRule::Size(100);
        assert_eq!(check_cut(rule, &[60, 40], false), None);
        assert_eq!(check_cut(rule, &[60, 90], false), None);
        assert_eq!(check_cut(rule, &[150], false), None);
        assert!(check_cut(rule, &[60, 39], false).unwrap().contains("too early"));
        assert_eq!(check_cut(rule, &[60, 39], true), None, "the last shard may be small");
        assert!(check_cut(rule, &[60, 40, 1], false).unwrap().contains("too late"));
        assert!(check_cut(rule, &[100, 1], true).unwrap().contains("too late"), "also the last shard");
    }

    #[test]
    fn count_cut_is_exact_but_for_the_last_shard() {
        let rule = CutRule::Records(3);
        assert_eq!(check_cut(rule, &[1, 1, 1], false), None);
        assert!(check_cut(rule, &[1, 1], false).unwrap().contains("too early"));
        assert_eq!(check_cut(rule, &[1, 1], true), None);
        assert_eq!(check_cut(rule, &[1], true), None);
        assert!(check_cut(rule, &[1, 1, 1, 1], true).unwrap().contains("too late"));
    }

    #[test]
    fn runs_split_into_known_records() {
        let a = [e("x.jpg", 5, 1), e("x.cls", 1, 2)];
        let b = [e("x.jpg", 5, 3), e("x.cls", 1, 4)];
        let run: Vec<OutEntry> = a.iter().chain(&b).cloned().collect();
        let known = [fp("x", &a), fp("x", &b)];
        let got = segment("x", &run, |f| known.contains(&f));
        assert_eq!(got, vec![(0..2, known[0]), (2..4, known[1])]);
        // Two records of the same name, one with only a .jpg, one with only a .cls.
        let c = [e("x.jpg", 5, 1)];
        let d = [e("x.cls", 1, 2)];
        let known = [fp("x", &c), fp("x", &d)];
        let got = segment("x", &a, |f| known.contains(&f));
        assert_eq!(got.iter().map(|p| p.0.clone()).collect::<Vec<_>>(), [0..1, 1..2]);
        // Nothing known: split at repeated names only.
        let got = segment("x", &run, |_| false);
        assert_eq!(got.iter().map(|p| p.0.clone()).collect::<Vec<_>>(), [0..2, 2..4]);
        let got = segment("x", &a, |_| false);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 0..2);
    }

    /// (record name, [(entry name, content hash)], key)
    type TestRec<'a> = (&'a str, &'a [(&'a str, u64)], Key);

    fn shard(list_index: u32, name: &str, recs: &[TestRec<'_>]) -> InShard {
        let mut s = InShard {
            list_index,
            name: name.into(),
            text: String::new(),
            keys: Vec::new(),
            entries: Vec::new(),
            recs: Vec::new(),
            fps: Vec::new(),
            duplicates: Vec::new(),
            key_error: None,
            key_errors: 0,
        };
        for (rec, entries, key) in recs {
            let name = s.span(rec).unwrap();
            let first = s.entries.len() as u32;
            let mut h = FpHasher::new(rec);
            for (en, hash) in *entries {
                h.push(en, 1, u128::from(*hash));
                let span = s.span(en).unwrap();
                s.entries.push(EntryFp { name: span, size: 1, hash: u128::from(*hash) });
            }
            s.recs.push(InRec { name, first, count: entries.len() as u32, key: *key, placed: NOT_PLACED });
            s.fps.push(h.digest());
        }
        s
    }

    fn order(algorithm: Algorithm, decreasing: bool) -> Order {
        Order { algorithm, decreasing, seed: 0, content: None }
    }

    #[test]
    fn ties_break_by_unique_name_ascending_even_when_decreasing() {
        let mk = |decreasing| {
            let a = shard(0, "a.tar", &[("x", &[("x.jpg", 1)], Key::Int(5)), ("y", &[("y.jpg", 2)], Key::Int(7))]);
            let b = shard(1, "b.tar", &[("x", &[("x.jpg", 3)], Key::Int(5))]);
            Inputs::new(Order { content: None, ..order(Algorithm::Content, decreasing) }, vec![a, b]).unwrap()
        };
        let inc = mk(false);
        assert_eq!(inc.cmp((0, 0), (1, 0)), Ordering::Less, "a.tar|x before b.tar|x");
        assert_eq!(inc.cmp((0, 1), (1, 0)), Ordering::Greater, "7 after 5");
        let dec = mk(true);
        assert_eq!(dec.cmp((0, 0), (1, 0)), Ordering::Less, "ties still ascending by unique name");
        assert_eq!(dec.cmp((0, 1), (1, 0)), Ordering::Less, "7 before 5");
    }

    #[test]
    fn implicit_keys_alphanumeric_and_none() {
        let a = shard(0, "a.tar", &[("z", &[("z.cls", 1), ("z.jpg", 2)], Key::Implicit)]);
        let b = shard(1, "b.tar", &[("z", &[("z.jpg", 3)], Key::Implicit), ("b", &[("b.jpg", 4)], Key::Implicit)]);
        let alnum = Inputs::new(order(Algorithm::Alphanumeric, false), vec![a, b]).unwrap();
        assert_eq!(alnum.cmp((0, 0), (1, 0)), Ordering::Less, "z.cls < z.jpg: the first entry's full name");
        assert_eq!(alnum.cmp((1, 1), (0, 0)), Ordering::Less, "b.jpg < z.cls");
        let Inputs { shards, .. } = alnum;
        let none = Inputs::new(order(Algorithm::None, false), shards).unwrap();
        assert_eq!(none.cmp((0, 0), (1, 1)), Ordering::Less, "input order");
        assert_eq!(none.cmp((1, 1), (1, 0)), Ordering::Greater);
        let Inputs { shards, .. } = none;
        let rev = Inputs::new(order(Algorithm::None, true), shards).unwrap();
        assert_eq!(rev.cmp((0, 0), (1, 1)), Ordering::Greater, "none + decreasing: reverse input order");
    }

    #[test]
    fn equal_records_are_found_in_order() {
        // Two identical records (same name and content) in two shards: matched in the algorithm's order.
        let a = shard(0, "a.tar", &[("x", &[("x.jpg", 1)], Key::Hash(9))]);
        let b = shard(1, "b.tar", &[("x", &[("x.jpg", 1)], Key::Hash(2))]);
        let inputs = Inputs::new(order(Algorithm::Shuffle, false), vec![a, b]).unwrap();
        let f = fp("x", &[e("x.jpg", 1, 1)]);
        let got: Vec<(u32, u32)> = inputs.with_fp(f).iter().map(|&(_, s, r)| (s, r)).collect();
        assert_eq!(got, [(1, 0), (0, 0)], "hash 2 before hash 9");
        assert!(!inputs.known(f ^ 1));
    }
}
