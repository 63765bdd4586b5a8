//! Reading shards of every format into an index of records, with or without their bytes.
//!
//! Two ways in: [`index_file`] reads only what is needed to know every entry (headers of an uncompressed
//! tar, the central directory of a zip; compressed tars are decoded once and their bytes dropped), and
//! [`read_entries`] streams every entry's bytes to a visitor, for any format.

use crate::error::{Error, Location, Result};
use crate::format::Format;
use crate::prefetch::{PREFETCH_MIN_LEN, PrefetchSource};
use crate::record::{Duplicate, EntryMeta, Record, group_records, validate_entry_name};
use crate::source::{Counting, GzMembers, Lz4Stream, SeekSource, StreamSource, TarSource};
use crate::tar_read::{TarWalker, classify_io};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::Path;

/// Everything known about one shard's contents: its records in archive order.
#[derive(Debug, Clone)]
pub struct ShardIndex {
    /// The shard's name (object name or path) as given by the caller; errors and outputs use it.
    pub shard: String,
    pub format: Format,
    pub records: Vec<Record>,
    /// Entry names seen more than once; later occurrences are not in `records`.
    pub duplicates: Vec<Duplicate>,
}

impl ShardIndex {
    fn new(shard: &str, format: Format, entries: impl IntoIterator<Item = EntryMeta>) -> Self {
        let (records, duplicates) = group_records(entries);
        ShardIndex { shard: shard.to_string(), format, records, duplicates }
    }
    pub fn entry_count(&self) -> usize {
        self.records.iter().map(|r| r.entries.len()).sum()
    }
    /// Sum of the content bytes of every entry kept in records.
    pub fn content_bytes(&self) -> u64 {
        self.records.iter().map(Record::size).sum()
    }
    pub fn entries(&self) -> impl Iterator<Item = &EntryMeta> {
        self.records.iter().flat_map(|r| r.entries.iter())
    }
}

/// Open a shard file, taking its format from its name and checking it against its first bytes.
pub fn open_shard(path: &Path) -> Result<(File, Format)> {
    let shard = path.display().to_string();
    let format = Format::from_name(&shard).ok_or_else(|| Error::UnknownFormat { loc: Location::shard(&shard) })?;
    let file = File::open(path).map_err(|e| Error::io(Location::shard(&shard), e))?;
    check_head(&shard, format, &file)?;
    Ok((file, format))
}

fn check_head(shard: &str, format: Format, file: &File) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(Location::at(shard, 0), e)),
        }
    }
    format.check_magic(shard, &head[..n])
}

/// Index a shard file by path (format from the extension, checked against magic bytes).
pub fn index_file(path: &Path) -> Result<ShardIndex> {
    index_file_observed(path, &mut |_| {})
}

/// [`index_file`], showing `observe` each entry as it is indexed (an uncompressed tar's entries as their
/// headers are read, other formats' once the index is built), so that a caller can pay for the index's
/// memory while it grows.
pub fn index_file_observed(path: &Path, observe: &mut dyn FnMut(&EntryMeta)) -> Result<ShardIndex> {
    let (file, format) = open_shard(path)?;
    let shard = path.display().to_string();
    let len = file.metadata().map_err(|e| Error::io(Location::shard(&shard), e))?.len();
    if format == Format::Tar && len >= PREFETCH_MIN_LEN {
        let src = PrefetchSource::new(file).map_err(|e| Error::io(Location::shard(&shard), e))?;
        return index_tar(&shard, src, observe);
    }
    if format == Format::Tar {
        let src = SeekSource::new(file).map_err(|e| Error::io(Location::shard(&shard), e))?;
        return index_tar(&shard, src, observe);
    }
    let index = index_reader(&shard, format, file)?;
    index.entries().for_each(observe);
    Ok(index)
}

/// Walk a tar's headers, grouping entries into records as they come (no intermediate list).
fn index_tar<S: TarSource>(shard: &str, src: S, observe: &mut dyn FnMut(&EntryMeta)) -> Result<ShardIndex> {
    let mut walker = TarWalker::new(shard, src);
    let mut failure = None;
    let entries = std::iter::from_fn(|| {
        let entry = walker.next_entry().unwrap_or_else(|e| {
            failure = Some(e);
            None
        });
        if let Some(e) = &entry {
            observe(e);
        }
        entry
    });
    let index = ShardIndex::new(shard, Format::Tar, entries);
    match failure {
        Some(e) => Err(e),
        None => Ok(index),
    }
}

/// Index a seekable shard: headers only for uncompressed tar and zip; compressed tars are decoded once.
pub fn index_reader<R: Read + Seek>(shard: &str, format: Format, reader: R) -> Result<ShardIndex> {
    match format {
        Format::Tar => {
            let src = SeekSource::new(reader).map_err(|e| Error::io(Location::shard(shard), e))?;
            index_tar(shard, src, &mut |_| {})
        }
        Format::Zip => zip_entries(shard, reader, &mut |_, _| Ok(()), false),
        _ => read_entries_stream(shard, format, reader, |_, _| Ok(())),
    }
}

/// A visitor gets each entry's metadata and a reader over its bytes (which it may leave unread).
pub type Visit<'a> = dyn FnMut(&EntryMeta, &mut dyn Read) -> io::Result<()> + 'a;

/// Stream every entry of a seekable shard with its bytes, in archive order.
pub fn read_entries<R: Read + Seek>(
    shard: &str,
    format: Format,
    reader: R,
    mut visit: impl FnMut(&EntryMeta, &mut dyn Read) -> io::Result<()>,
) -> Result<ShardIndex> {
    match format {
        Format::Zip => zip_entries(shard, reader, &mut visit, true),
        Format::Tar => {
            let src = SeekSource::new(reader).map_err(|e| Error::io(Location::shard(shard), e))?;
            walk_tar(shard, format, src, &mut visit)
        }
        _ => read_entries_stream(shard, format, reader, visit),
    }
}

/// Stream every entry of a forward-only shard (network, pipe). A zip needs its central directory at the
/// end, so a zip stream is first read into memory.
pub fn read_entries_stream<R: Read>(
    shard: &str,
    format: Format,
    reader: R,
    mut visit: impl FnMut(&EntryMeta, &mut dyn Read) -> io::Result<()>,
) -> Result<ShardIndex> {
    let counting = Counting::new(reader);
    match format {
        Format::Tar => {
            let src = StreamSource::new(counting, None, Box::new(|c: &Counting<R>| (c.count(), c.failed())));
            walk_tar(shard, format, src, &mut visit)
        }
        Format::TarGz => {
            let dec = GzMembers::new(counting);
            let src = StreamSource::new(
                dec,
                Some("gzip"),
                Box::new(|d: &GzMembers<Counting<R>>| d.get_ref().map_or((0, false), |c| (c.count(), c.failed()))),
            );
            walk_tar(shard, format, src, &mut visit)
        }
        Format::TarZst => {
            let dec = zstd::stream::read::Decoder::new(counting).map_err(|e| Error::io(Location::shard(shard), e))?;
            let src = StreamSource::new(
                dec,
                Some("zstd"),
                Box::new(|d: &zstd::stream::read::Decoder<'static, io::BufReader<Counting<R>>>| {
                    (d.get_ref().get_ref().count(), d.get_ref().get_ref().failed())
                }),
            );
            walk_tar(shard, format, src, &mut visit)
        }
        Format::TarLz4 => {
            let dec = Lz4Stream::new(counting);
            let src = StreamSource::new(
                dec,
                Some("lz4"),
                Box::new(|d: &Lz4Stream<Counting<R>>| (d.get_ref().count(), d.get_ref().failed())),
            );
            walk_tar(shard, format, src, &mut visit)
        }
        Format::Zip => {
            let mut counting = counting;
            let mut buf = Vec::new();
            counting.read_to_end(&mut buf).map_err(|e| Error::io(Location::shard(shard), e))?;
            zip_entries(shard, io::Cursor::new(buf), &mut visit, true)
        }
    }
}

fn walk_tar<S: TarSource>(shard: &str, format: Format, src: S, visit: &mut Visit<'_>) -> Result<ShardIndex> {
    let mut walker = TarWalker::new(shard, src);
    let mut entries = Vec::new();
    while let Some(meta) = walker.next_entry()? {
        let size = meta.size;
        let mut data = Tracked { inner: walker.data(size), failed: false };
        if let Err(e) = visit(&meta, &mut data) {
            let from_source = data.failed;
            let at = walker.source().position();
            let loc = Location::at(shard, meta.header_offset).entry(&meta.name);
            return Err(if from_source {
                let mut err = classify_io(walker.source(), e, loc);
                if let Error::Truncated { detail, .. } = &mut err {
                    detail.push_str(&format!(" (at stream byte {at})"));
                }
                err
            } else {
                Error::Io { loc, source: e }
            });
        }
        entries.push(meta);
    }
    Ok(ShardIndex::new(shard, format, entries))
}

/// Holds a zip member's data to the size its directory entry declares (the size every record and output
/// header is built from): the zip reader checks the CRC, but not that the data has that length.
struct Exact<R> {
    inner: R,
    left: u64,
    checked: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            if !self.checked {
                // One more read reaches the member's end, where its CRC is checked, and finds any excess.
                self.checked = true;
                let mut probe = [0u8; 1];
                if self.inner.read(&mut probe)? != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "member data longer than its declared size",
                    ));
                }
            }
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("member data ends {} bytes short of its declared size", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Remembers whether a read from the shard failed, to tell shard damage from a visitor's own failure.
struct Tracked<R> {
    inner: R,
    failed: bool,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| self.failed = true)
    }
}

fn zip_err(shard: &str, offset: Option<u64>, entry: Option<&str>, e: zip::result::ZipError) -> Error {
    let mut loc = Location { shard: shard.to_string(), entry: None, offset };
    if let Some(entry) = entry {
        loc = loc.entry(entry);
    }
    match e {
        zip::result::ZipError::Io(io) if io.kind() != io::ErrorKind::UnexpectedEof => Error::io(loc, io),
        zip::result::ZipError::UnsupportedArchive(what) => {
            Error::UnsupportedEntry { loc, kind: format!("zip feature not supported: {what}") }
        }
        zip::result::ZipError::CompressionMethodNotSupported(m) => {
            Error::UnsupportedEntry { loc, kind: format!("zip compression method {m}") }
        }
        other => Error::Corrupt { loc, codec: "zip", detail: other.to_string() },
    }
}

/// Where a zip's central directory starts, read from its end record, for messages about a directory the
/// zip reader refused: the damage is there or in the end record. Falls back to the end record's own
/// offset, and to the file's length when no end record is found at all.
fn zip_directory_offset<R: Read + Seek>(r: &mut R) -> Option<u64> {
    const EOCD: usize = 22;
    let len = r.seek(io::SeekFrom::End(0)).ok()?;
    let tail_len = len.min((EOCD + 0xFFFF) as u64);
    r.seek(io::SeekFrom::Start(len - tail_len)).ok()?;
    let mut tail = vec![0u8; tail_len as usize];
    r.read_exact(&mut tail).ok()?;
    let Some(pos) = (0..=tail.len().saturating_sub(EOCD)).rev().find(|&i| tail[i..].starts_with(b"PK\x05\x06")) else {
        return Some(len);
    };
    let eocd_at = len - tail_len + pos as u64;
    let field = tail.get(pos + 16..pos + 20).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    match field {
        Some(cd) if cd != u32::MAX && u64::from(cd) <= eocd_at => Some(u64::from(cd)),
        Some(_) if pos >= 20 && tail[pos - 20..].starts_with(b"PK\x06\x07") => {
            // Zip64: the locator points at the zip64 end record, which holds the directory offset.
            let z64_at = u64::from_le_bytes(tail[pos - 12..pos - 4].try_into().ok()?);
            let mut rec = [0u8; 56];
            r.seek(io::SeekFrom::Start(z64_at)).ok()?;
            r.read_exact(&mut rec).ok()?;
            let cd = u64::from_le_bytes(rec[48..56].try_into().ok()?);
            Some(if rec.starts_with(b"PK\x06\x06") && cd <= eocd_at { cd } else { eocd_at })
        }
        _ => Some(eocd_at),
    }
}

/// Unix file-type bits of a zip member's mode.
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;

fn describe_unix_type(mode: u32) -> &'static str {
    match mode & S_IFMT {
        0o120000 => "symbolic link",
        0o020000 => "character device",
        0o060000 => "block device",
        0o010000 => "FIFO",
        0o140000 => "socket",
        _ => "special file",
    }
}

fn zip_entries<R: Read + Seek>(
    shard: &str,
    mut reader: R,
    visit: &mut Visit<'_>,
    with_data: bool,
) -> Result<ShardIndex> {
    let mut archive = match zip::ZipArchive::new(&mut reader) {
        Ok(a) => a,
        Err(e) => {
            let at = zip_directory_offset(&mut reader);
            return Err(zip_err(shard, at, None, e));
        }
    };
    let dir_at = archive.central_directory_start();
    let mut entries = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        // What the central directory says, before the member's local header is read.
        let (name, at, is_dir, mode, encrypted) = {
            let cd = archive.by_index_data(i).map_err(|e| zip_err(shard, Some(dir_at), None, e))?;
            let at = cd.header_start();
            let name = cd.name().map_err(|e| zip_err(shard, Some(at), None, e))?.into_owned();
            (name, at, cd.is_dir(), cd.unix_mode(), cd.encrypted())
        };
        if let Some(mode) = mode
            && !matches!(mode & S_IFMT, 0 | S_IFREG | S_IFDIR)
        {
            return Err(Error::UnsupportedEntry {
                loc: Location::at(shard, at).entry(&name),
                kind: describe_unix_type(mode).into(),
            });
        }
        if is_dir {
            continue;
        }
        validate_entry_name(shard, &name, at)?;
        if encrypted {
            return Err(Error::UnsupportedEntry {
                loc: Location::at(shard, at).entry(&name),
                kind: "encrypted zip member".into(),
            });
        }
        let mut file = archive.by_index(i).map_err(|e| zip_err(shard, Some(at), Some(&name), e))?;
        let stored = file.compression() == zip::CompressionMethod::Stored;
        if stored && file.compressed_size() != file.size() {
            // A stored member's bytes are addressed by offset and size: a size past its stored bytes would
            // reach into the next member.
            return Err(Error::Corrupt {
                loc: Location::at(shard, at).entry(&name),
                codec: "zip",
                detail: format!("stored member declares {} bytes but stores {}", file.size(), file.compressed_size()),
            });
        }
        if let Some(start) = file.data_start().filter(|_| stored)
            && start.checked_add(file.size()).is_none()
        {
            return Err(Error::Corrupt {
                loc: Location::at(shard, at).entry(&name),
                codec: "zip",
                detail: format!(
                    "member of {} bytes at offset {start} is past the largest possible archive",
                    file.size()
                ),
            });
        }
        let meta = EntryMeta {
            name,
            size: file.size(),
            header_offset: at,
            data_offset: if stored { file.data_start() } else { None },
        };
        if with_data {
            let mut data =
                Tracked { inner: Exact { inner: &mut file, left: meta.size, checked: false }, failed: false };
            if let Err(e) = visit(&meta, &mut data) {
                let loc = Location::at(shard, at).entry(&meta.name);
                // The zip reader reports a bad CRC or undecodable data as invalid data; any other failure
                // of a read comes from the storage underneath.
                let damage = matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof
                );
                return Err(if data.failed && damage {
                    Error::Corrupt { loc, codec: "zip", detail: e.to_string() }
                } else {
                    Error::io(loc, e)
                });
            }
        }
        entries.push(meta);
    }
    let duplicated = archive.has_duplicate_names();
    drop(archive);
    let mut index = ShardIndex::new(shard, Format::Zip, entries);
    if duplicated {
        // The zip reader keys members by name: of a repeated name it keeps the last member (as Python's
        // zipfile and unzip do) and hides the others. Find those in the central directory and report them.
        let records = zip_directory_records(&mut reader, dir_at).map_err(|e| Error::Corrupt {
            loc: Location::at(shard, dir_at),
            codec: "zip",
            detail: e.to_string(),
        })?;
        let kept: HashMap<u64, &EntryMeta> = index.entries().map(|e| (e.header_offset, e)).collect();
        let mut by_raw: HashMap<&[u8], (&str, u64)> = HashMap::new();
        for (raw, offset) in &records {
            if let Some(e) = kept.get(offset) {
                by_raw.insert(raw.as_slice(), (e.name.as_str(), *offset));
            }
        }
        let mut dups: Vec<Duplicate> = records
            .iter()
            .filter(|(_, offset)| !kept.contains_key(offset))
            .filter_map(|(raw, offset)| {
                by_raw.get(raw.as_slice()).map(|&(name, first)| Duplicate {
                    name: name.to_string(),
                    first_offset: first,
                    offset: *offset,
                })
            })
            .collect();
        dups.sort_by_key(|d| d.offset);
        index.duplicates = dups;
    }
    Ok(index)
}

/// (raw name, local header offset) of every central directory record, in directory order (records follow
/// each other up to the end records). Only used for archives with repeated names, which the zip reader
/// cannot list.
fn zip_directory_records<R: Read + Seek>(r: &mut R, start: u64) -> io::Result<Vec<(Vec<u8>, u64)>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("central directory: {what}"));
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    r.seek(io::SeekFrom::Start(start))?;
    let mut r = io::BufReader::new(r);
    let mut out = Vec::new();
    loop {
        let mut sig = [0u8; 4];
        r.read_exact(&mut sig)?;
        if &sig != b"PK\x01\x02" {
            break;
        }
        let mut head = [0u8; 46];
        head[..4].copy_from_slice(&sig);
        r.read_exact(&mut head[4..])?;
        let (name_len, extra_len, comment_len) =
            (usize::from(u16_at(&head, 28)), usize::from(u16_at(&head, 30)), usize::from(u16_at(&head, 32)));
        let mut name = vec![0u8; name_len];
        r.read_exact(&mut name)?;
        let mut extra = vec![0u8; extra_len];
        r.read_exact(&mut extra)?;
        io::copy(&mut (&mut r).take(comment_len as u64), &mut io::sink())?;
        let mut offset = u64::from(u32_at(&head, 42));
        if offset == u64::from(u32::MAX) {
            // Zip64 extra field: the 8-byte values present are those whose 32-bit field is all ones, in
            // the order uncompressed size, compressed size, local header offset.
            let mut i = 0;
            while i + 4 <= extra.len() {
                let (id, len) = (u16_at(&extra, i), usize::from(u16_at(&extra, i + 2)));
                let body = extra.get(i + 4..i + 4 + len).ok_or_else(|| bad("extra field overruns"))?;
                if id == 1 {
                    let skip = [24, 20].iter().filter(|&&f| u32_at(&head, f) == u32::MAX).count() * 8;
                    let v = body.get(skip..skip + 8).ok_or_else(|| bad("zip64 field too short"))?;
                    offset = u64::from_le_bytes(v.try_into().map_err(|_| bad("zip64 field"))?);
                    break;
                }
                i += 4 + len;
            }
        }
        out.push((name, offset));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One central directory record; `zip64` moves the uncompressed size and the local header offset into
    /// a zip64 extra field, as writers do past 4 GiB.
    fn cd_record(name: &str, offset: u64, zip64: bool) -> Vec<u8> {
        let mut h = vec![0u8; 46];
        h[..4].copy_from_slice(b"PK\x01\x02");
        h[20..24].copy_from_slice(&7u32.to_le_bytes()); // compressed size, kept 32-bit
        let mut extra = Vec::new();
        if zip64 {
            h[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
            h[42..46].copy_from_slice(&u32::MAX.to_le_bytes());
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&(5u64 << 32).to_le_bytes());
            extra.extend_from_slice(&offset.to_le_bytes());
        } else {
            h[42..46].copy_from_slice(&(offset as u32).to_le_bytes());
        }
        h[28..30].copy_from_slice(&(name.len() as u16).to_le_bytes());
        h[30..32].copy_from_slice(&(extra.len() as u16).to_le_bytes());
        h[32..34].copy_from_slice(&3u16.to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&extra);
        h.extend_from_slice(b"abc");
        h
    }

    #[test]
    fn directory_records_read_plain_and_zip64_offsets() {
        let mut cd = b"junk".to_vec();
        cd.extend(cd_record("a.jpg", 0, false));
        cd.extend(cd_record("a.jpg", 6 << 30, true));
        cd.extend(cd_record("b.jpg", 77, false));
        cd.extend_from_slice(b"PK\x05\x06rest of the end record");
        let got = zip_directory_records(&mut io::Cursor::new(&cd), 4).unwrap();
        let got: Vec<_> = got.iter().map(|(n, o)| (String::from_utf8_lossy(n).into_owned(), *o)).collect();
        assert_eq!(got, [("a.jpg".to_string(), 0), ("a.jpg".to_string(), 6 << 30), ("b.jpg".to_string(), 77)]);
        assert!(zip_directory_records(&mut io::Cursor::new(&cd[..60]), 4).is_err(), "a cut record is an error");
    }
}
