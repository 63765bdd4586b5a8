//! Entries and records. A record is the entries of one shard whose names are equal once the extension
//! (from the FIRST dot of the basename) is cut off; records keep archive order and never span shards.

use crate::error::{Error, Location, Result};
use std::collections::HashMap;
use xxhash_rust::xxh3::xxh3_64;

/// One file inside a shard, as read from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// Full entry name inside the archive (`a/b/s001.seg.png`).
    pub name: String,
    /// Uncompressed content size in bytes.
    pub size: u64,
    /// Offset of the entry's first header in the archive stream (decoded stream for compressed tars; the
    /// local header for zip). Used in messages.
    pub header_offset: u64,
    /// Offset of the content in the shard file when the bytes sit there verbatim (uncompressed tar, stored
    /// zip member): the zero-copy path reads `size` bytes from here. `None` when they must be decoded.
    pub data_offset: Option<u64>,
}

/// A record: its name and its entries, in archive order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub entries: Vec<EntryMeta>,
}

impl Record {
    /// Sum of the entries' content bytes (the size that cuts output shards).
    pub fn size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// The entry whose extension (from the first dot of the basename) equals `ext` (e.g. `.cls`).
    pub fn entry_with_ext(&self, ext: &str) -> Option<&EntryMeta> {
        self.entries.iter().find(|e| split_name(&e.name).1 == ext)
    }
}

/// An entry name seen twice in one shard. The second occurrence is left out of the records; the caller
/// applies its `duplicated_records` reaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub name: String,
    pub first_offset: u64,
    pub offset: u64,
}

/// Split an entry name into (record name, extension): the extension starts at the first dot of the
/// basename (`a/b/s001.seg.png` → (`a/b/s001`, `.seg.png`)); no dot → empty extension.
pub fn split_name(name: &str) -> (&str, &str) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].find('.') {
        Some(dot) => name.split_at(base_start + dot),
        None => (name, ""),
    }
}

/// Refuse names a user could be hurt by: empty, absolute, or with a `..` segment (traversal), or with NUL.
pub fn validate_entry_name(shard: &str, name: &str, offset: u64) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty name")
    } else if name.starts_with('/') {
        Some("absolute path")
    } else if name.split('/').any(|seg| seg == "..") {
        Some("path climbs out of the archive with '..'")
    } else if name.contains('\0') {
        Some("NUL byte in name")
    } else {
        None
    };
    match reason {
        Some(reason) => {
            Err(Error::BadName { loc: Location::at(shard, offset).entry(name), reason: reason.to_string() })
        }
        None => Ok(()),
    }
}

/// Group entries (archive order) into records (order of first appearance), reporting repeated names.
///
/// Runs once per shard over every entry, so it avoids per-entry allocations: records are found by a hash
/// of their name (xxh3) with collision chains, and a repeated entry name (which always falls in the same
/// record) is found by scanning that record (or a map of its names, for very large records).
pub fn group_records(entries: impl IntoIterator<Item = EntryMeta>) -> (Vec<Record>, Vec<Duplicate>) {
    let entries = entries.into_iter();
    let mut records: Vec<Record> = Vec::with_capacity(entries.size_hint().0 / 2 + 1);
    // hash of record name -> first record with that hash; `chain[i]` is the next record with i's hash.
    let mut by_hash: HashMap<u64, usize, IdentityHash> = HashMap::default();
    let mut chain: Vec<usize> = Vec::new();
    // Entry names of records too big to scan, built on first need.
    let mut big: HashMap<usize, HashMap<String, u64>> = HashMap::new();
    let mut dups = Vec::new();
    for e in entries {
        let rec = split_name(&e.name).0;
        let idx = match records.last() {
            Some(last) if last.name == rec => Some(records.len() - 1),
            _ => {
                let h = xxh3_64(rec.as_bytes());
                let mut at = by_hash.get(&h).copied();
                while let Some(i) = at {
                    if records[i].name == rec {
                        break;
                    }
                    at = (chain[i] != NONE).then_some(chain[i]);
                }
                if at.is_none() {
                    let i = records.len();
                    chain.push(by_hash.insert(h, i).unwrap_or(NONE));
                }
                at
            }
        };
        let Some(i) = idx else {
            let name = rec.to_string();
            let mut entries = Vec::with_capacity(2);
            entries.push(e);
            records.push(Record { name, entries });
            continue;
        };
        // A repeated entry name always falls in the same record: look there only.
        let rec = &mut records[i];
        let first = if rec.entries.len() < SCAN_LIMIT {
            rec.entries.iter().find(|x| x.name == e.name).map(|x| x.header_offset)
        } else {
            let names =
                big.entry(i).or_insert_with(|| rec.entries.iter().map(|x| (x.name.clone(), x.header_offset)).collect());
            match names.get(&e.name) {
                Some(&first) => Some(first),
                None => {
                    names.insert(e.name.clone(), e.header_offset);
                    None
                }
            }
        };
        match first {
            Some(first_offset) => {
                dups.push(Duplicate { name: e.name.clone(), first_offset, offset: e.header_offset });
            }
            None => rec.entries.push(e),
        }
    }
    (records, dups)
}

const NONE: usize = usize::MAX;
/// Records with fewer entries than this are scanned for repeated names; bigger ones get a map.
const SCAN_LIMIT: usize = 16;

/// Hasher for keys that already are hashes (xxh3 of a name).
#[derive(Default, Clone, Copy)]
struct IdentityHash;

impl std::hash::BuildHasher for IdentityHash {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, off: u64) -> EntryMeta {
        EntryMeta { name: name.into(), size: 1, header_offset: off, data_offset: None }
    }

    #[test]
    fn split_uses_first_dot_of_basename() {
        assert_eq!(split_name("a/b/s001.seg.png"), ("a/b/s001", ".seg.png"));
        assert_eq!(split_name("a.b/s001.png"), ("a.b/s001", ".png"));
        assert_eq!(split_name("noext"), ("noext", ""));
        assert_eq!(split_name("d.x/noext"), ("d.x/noext", ""));
    }

    #[test]
    fn groups_non_adjacent_entries_and_reports_duplicates() {
        let (recs, dups) =
            group_records(vec![e("a.jpg", 0), e("b.jpg", 1), e("a.cls", 2), e("a.jpg", 3), e("b.cls", 4)]);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].name, "a");
        let names: Vec<_> = recs[0].entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a.jpg", "a.cls"]);
        assert_eq!(dups, vec![Duplicate { name: "a.jpg".into(), first_offset: 0, offset: 3 }]);
        assert_eq!(recs[1].entry_with_ext(".cls").map(|e| e.header_offset), Some(4));
    }

    #[test]
    fn refuses_traversal_names() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/.."] {
            let err = validate_entry_name("s.tar", bad, 512).unwrap_err();
            assert!(err.to_string().contains("s.tar"));
            assert!(err.to_string().contains("offset 512"));
        }
        assert!(validate_entry_name("s.tar", "a/..b/c.jpg", 0).is_ok());
    }
}
