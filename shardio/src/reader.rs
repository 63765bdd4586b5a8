//! Reading shards of every format into an index of records, with or without their bytes.
//!
//! Two ways in: [`index_file`] reads only what is needed to know every entry (headers of an uncompressed
//! tar, the central directory of a zip; compressed tars are decoded once and their bytes dropped), and
//! [`read_entries`] streams every entry's bytes to a visitor, for any format.

use crate::error::{Error, Location, Result};
use crate::format::Format;
use crate::record::{Duplicate, EntryMeta, Record, group_records, validate_entry_name};
use crate::source::{Counting, SeekSource, StreamSource, TarSource};
use crate::tar_read::{TarWalker, classify_io};
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
    fn new(shard: &str, format: Format, entries: Vec<EntryMeta>) -> Self {
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
    let (file, format) = open_shard(path)?;
    index_reader(&path.display().to_string(), format, file)
}

/// Index a seekable shard: headers only for uncompressed tar and zip; compressed tars are decoded once.
pub fn index_reader<R: Read + Seek>(shard: &str, format: Format, reader: R) -> Result<ShardIndex> {
    match format {
        Format::Tar => {
            let src = SeekSource::new(reader).map_err(|e| Error::io(Location::shard(shard), e))?;
            let mut walker = TarWalker::new(shard, src);
            let mut entries = Vec::new();
            while let Some(e) = walker.next_entry()? {
                entries.push(e);
            }
            Ok(ShardIndex::new(shard, format, entries))
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
            let dec = flate2::read::MultiGzDecoder::new(counting);
            let src = StreamSource::new(
                dec,
                Some("gzip"),
                Box::new(|d: &flate2::read::MultiGzDecoder<Counting<R>>| (d.get_ref().count(), d.get_ref().failed())),
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
            let dec = lz4_flex::frame::FrameDecoder::new(counting);
            let src = StreamSource::new(
                dec,
                Some("lz4"),
                Box::new(|d: &lz4_flex::frame::FrameDecoder<Counting<R>>| (d.get_ref().count(), d.get_ref().failed())),
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

fn zip_err(shard: &str, offset: Option<u64>, e: zip::result::ZipError) -> Error {
    let loc = Location { shard: shard.to_string(), entry: None, offset };
    match e {
        zip::result::ZipError::Io(io) if io.kind() != io::ErrorKind::UnexpectedEof => Error::io(loc, io),
        other => Error::Corrupt { loc, codec: "zip", detail: other.to_string() },
    }
}

fn zip_entries<R: Read + Seek>(shard: &str, reader: R, visit: &mut Visit<'_>, with_data: bool) -> Result<ShardIndex> {
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| zip_err(shard, None, e))?;
    let mut entries = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let mut file = archive.by_index(i).map_err(|e| zip_err(shard, None, e))?;
        let at = file.header_start();
        let name = file.name().map_err(|e| zip_err(shard, Some(at), e))?.into_owned();
        if file.is_dir() {
            continue;
        }
        if file.is_symlink() || !file.is_file() {
            return Err(Error::UnsupportedEntry {
                loc: Location::at(shard, at).entry(&name),
                kind: "symbolic link or special file".into(),
            });
        }
        validate_entry_name(shard, &name, at)?;
        let stored = file.compression() == zip::CompressionMethod::Stored && !file.encrypted();
        let meta = EntryMeta {
            name,
            size: file.size(),
            header_offset: at,
            data_offset: if stored { file.data_start() } else { None },
        };
        if with_data {
            let mut data = Tracked { inner: &mut file, failed: false };
            if let Err(e) = visit(&meta, &mut data) {
                let loc = Location::at(shard, at).entry(&meta.name);
                return Err(if data.failed {
                    Error::Corrupt { loc, codec: "zip", detail: e.to_string() }
                } else {
                    Error::Io { loc, source: e }
                });
            }
        }
        entries.push(meta);
    }
    Ok(ShardIndex::new(shard, Format::Zip, entries))
}
