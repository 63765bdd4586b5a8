//! Streaming shard writers for every format. Output is deterministic: the same entries always give the
//! same bytes (mode 0644, owner 0:0, empty owner names, a fixed mtime, no gzip timestamp), so reruns and
//! distributed runs can be compared byte for byte.

use crate::copy::{copy_buffered, copy_range};
use crate::error::{Error, Location, Result};
use crate::format::Format;
use crate::tar_read::padding;
use std::fs::File;
use std::io::{self, BufRead, Cursor, Read, Seek, Write};

/// The fixed modification time written into every entry (the `tar` crate's deterministic timestamp,
/// 2006-07-24): not 0, which some tools flag as suspicious.
pub const FIXED_MTIME: u64 = tar::DETERMINISTIC_TIMESTAMP;
const FILE_MODE: u32 = 0o644;
/// Largest size a ustar octal size field holds.
const USTAR_MAX_SIZE: u64 = 0o77777777777;

/// How long names and huge sizes are written in tar output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TarFlavor {
    /// ustar headers, plus a PAX header for names over 100 bytes or sizes of 8 GiB and more (default).
    #[default]
    Pax,
    /// GNU headers with `././@LongLink` long names and base-256 sizes.
    Gnu,
    /// Plain ustar: names split into prefix/name (at most 255 bytes), sizes under 8 GiB; else an error.
    Ustar,
}

/// Options for [`ShardWriter`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    pub tar_flavor: TarFlavor,
    /// Codec level (gzip 0-9, default 6; zstd 1-22, default 3); lz4 has none.
    pub level: Option<i32>,
    /// Deflate zip members instead of storing them (stored is the default: shard payloads are usually
    /// already-compressed media, and stored members can be range-read).
    pub zip_deflate: bool,
}

/// Where an entry's bytes come from.
pub enum EntrySource<'a> {
    Bytes(&'a [u8]),
    /// `size` bytes at `offset` of a local file: moved with `copy_file_range` into an uncompressed tar
    /// written to a file.
    FileRange {
        file: &'a File,
        offset: u64,
    },
    /// Exactly `size` bytes read from a stream.
    Reader(&'a mut dyn Read),
    /// Exactly `size` bytes of a buffered stream, written from its own buffers (no intermediate copy;
    /// straight to the file for uncompressed tar): for record bytes arriving from the network.
    Buffered(&'a mut dyn BufRead),
}

/// What a shard is written to. A `File` enables the zero-copy path.
pub trait Sink: Write + Seek + Send {
    fn as_file_mut(&mut self) -> Option<&mut File> {
        None
    }
}

impl Sink for File {
    fn as_file_mut(&mut self) -> Option<&mut File> {
        Some(self)
    }
}
impl Sink for Cursor<Vec<u8>> {}
impl<S: Sink + ?Sized> Sink for &mut S {
    fn as_file_mut(&mut self) -> Option<&mut File> {
        (**self).as_file_mut()
    }
}

enum Enc<W: Write> {
    Plain(W),
    Gz(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Lz4(lz4_flex::frame::FrameEncoder<W>),
}

impl<W: Write> Write for Enc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Enc::Plain(w) => w.write(buf),
            Enc::Gz(w) => w.write(buf),
            Enc::Zstd(w) => w.write(buf),
            Enc::Lz4(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Enc::Plain(w) => w.flush(),
            Enc::Gz(w) => w.flush(),
            Enc::Zstd(w) => w.flush(),
            Enc::Lz4(w) => w.flush(),
        }
    }
}

impl<W: Write> Enc<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Enc::Plain(w) => Ok(w),
            Enc::Gz(w) => w.finish(),
            Enc::Zstd(w) => w.finish(),
            Enc::Lz4(w) => w.finish().map_err(io::Error::other),
        }
    }
}

/// Size of the blocks that [`Blocked`] hands to the layer below.
const FEED_BLOCK: usize = 256 * 1024;

/// A write buffer that hands its inner writer only whole blocks of [`FEED_BLOCK`] bytes (and one short
/// block at the end). Codecs' output depends on how their input is cut into writes (lz4 picks its block
/// size from the first write, deflate's output shifts with chunking), so feeding them in fixed blocks
/// makes compressed shards identical whatever the entry sources and their read sizes.
struct Blocked<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> Blocked<W> {
    fn new(inner: W) -> Self {
        Blocked { inner, buf: Vec::with_capacity(FEED_BLOCK) }
    }

    /// Hand over the buffered partial block. For a codec, only at the very end: a short block in the
    /// middle would change the output.
    fn drain(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn into_inner(mut self) -> io::Result<W> {
        self.drain()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Blocked<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.buf.is_empty() && data.len() >= FEED_BLOCK {
            self.inner.write_all(&data[..FEED_BLOCK])?;
            return Ok(FEED_BLOCK);
        }
        let n = (FEED_BLOCK - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FEED_BLOCK {
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(n)
    }

    /// Buffered bytes stay buffered: see [`Blocked::drain`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Inner<W: Sink> {
    Tar(Box<Blocked<Enc<W>>>),
    Zip(Box<zip::ZipWriter<W>>),
}

/// Writes one shard, entry by entry, in any format.
pub struct ShardWriter<W: Sink> {
    shard: String,
    format: Format,
    opts: WriteOptions,
    inner: Inner<W>,
    entries: u64,
    content_bytes: u64,
    /// Names written so far to a zip (a zip holds each name once; tar outputs keep none).
    zip_names: std::collections::HashSet<String>,
}

impl<W: Sink> ShardWriter<W> {
    /// `shard` names the output in errors.
    pub fn new(shard: &str, format: Format, sink: W, opts: WriteOptions) -> Result<Self> {
        let io_err = |e| Error::io(Location::shard(shard), e);
        let inner = match format {
            Format::Tar => Inner::Tar(Box::new(Blocked::new(Enc::Plain(sink)))),
            Format::TarGz => {
                let level = flate2::Compression::new(opts.level.unwrap_or(6).clamp(0, 9) as u32);
                let enc = flate2::GzBuilder::new().mtime(0).write(sink, level);
                Inner::Tar(Box::new(Blocked::new(Enc::Gz(enc))))
            }
            Format::TarZst => {
                let mut enc = zstd::stream::write::Encoder::new(sink, opts.level.unwrap_or(3)).map_err(io_err)?;
                // A content checksum, as the zstd CLI writes: damage to the data is then detected.
                enc.include_checksum(true).map_err(io_err)?;
                Inner::Tar(Box::new(Blocked::new(Enc::Zstd(enc))))
            }
            Format::TarLz4 => {
                // A fixed block size (the default picks one from the first write's length) and a content
                // checksum, as the lz4 CLI writes, so that damage to the data is detected.
                let info = lz4_flex::frame::FrameInfo::new()
                    .block_size(lz4_flex::frame::BlockSize::Max1MB)
                    .content_checksum(true);
                Inner::Tar(Box::new(Blocked::new(Enc::Lz4(lz4_flex::frame::FrameEncoder::with_frame_info(info, sink)))))
            }
            Format::Zip => Inner::Zip(Box::new(zip::ZipWriter::new(sink))),
        };
        Ok(ShardWriter {
            shard: shard.to_string(),
            format,
            opts,
            inner,
            entries: 0,
            content_bytes: 0,
            zip_names: Default::default(),
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }
    pub fn entries(&self) -> u64 {
        self.entries
    }
    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    fn loc(&self, entry: &str) -> Location {
        Location::shard(&self.shard).entry(entry)
    }

    /// Append one entry of exactly `size` bytes.
    pub fn append(&mut self, name: &str, size: u64, source: EntrySource<'_>) -> Result<()> {
        crate::record::validate_entry_name(&self.shard, name, 0).map_err(|e| match e {
            Error::BadName { reason, .. } => Error::BadName { loc: self.loc(name), reason },
            other => other,
        })?;
        let loc = self.loc(name);
        if name.ends_with('/') {
            // Every reader (ours, GNU tar, zip tools) takes such an entry for a directory.
            return Err(Error::BadName { loc, reason: "a file name cannot end with '/'".into() });
        }
        if let EntrySource::Bytes(b) = &source
            && b.len() as u64 != size
        {
            return Err(Error::invalid(format!(
                "{loc}: entry source holds {} bytes but {size} were declared",
                b.len()
            )));
        }
        match &mut self.inner {
            Inner::Tar(w) => {
                if self.opts.tar_flavor == TarFlavor::Ustar && size > USTAR_MAX_SIZE {
                    return Err(Error::invalid(format!(
                        "{loc}: size {size} does not fit a ustar header (use the pax or gnu flavor)"
                    )));
                }
                let headers = tar_headers(name, size, self.opts.tar_flavor)
                    .map_err(|reason| Error::BadName { loc: loc.clone(), reason })?;
                w.write_all(&headers).map_err(|e| Error::io(loc.clone(), e))?;
                write_data(w, size, source).map_err(|e| Error::io(loc.clone(), e))?;
                let pad = [0u8; 512];
                w.write_all(&pad[..padding(size) as usize]).map_err(|e| Error::io(loc.clone(), e))?;
            }
            Inner::Zip(z) => {
                if !self.zip_names.insert(name.to_string()) {
                    return Err(Error::BadName {
                        loc,
                        reason: "duplicate entry name (zip holds each name once)".into(),
                    });
                }
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(if self.opts.zip_deflate {
                        zip::CompressionMethod::Deflated
                    } else {
                        zip::CompressionMethod::Stored
                    })
                    .last_modified_time(zip::DateTime::default())
                    .unix_permissions(FILE_MODE)
                    .large_file(size >= u32::MAX as u64);
                z.start_file(name, options).map_err(|e| zip_write_err(loc.clone(), e))?;
                // Fixed blocks per entry: the deflate output must not depend on the source's read sizes.
                let mut blocked = Blocked::new(&mut *z);
                match source {
                    EntrySource::Bytes(b) => blocked.write_all(b),
                    EntrySource::FileRange { file, offset } => copy_buffered(file, offset, size, &mut blocked),
                    EntrySource::Reader(r) => copy_exact(r, &mut blocked, size),
                    EntrySource::Buffered(r) => copy_bufread(r, &mut blocked, size),
                }
                .and_then(|()| blocked.drain())
                .map_err(|e| Error::io(loc.clone(), e))?;
            }
        }
        self.entries += 1;
        self.content_bytes += size;
        Ok(())
    }

    /// Write the end of the archive and return the sink (not synced: publishing is the bucket's job).
    pub fn finish(self) -> Result<W> {
        let loc = Location::shard(&self.shard);
        match self.inner {
            Inner::Tar(mut w) => {
                w.write_all(&[0u8; 1024]).map_err(|e| Error::io(loc.clone(), e))?;
                let enc = w.into_inner().map_err(|e| Error::io(loc.clone(), e))?;
                let mut sink = enc.finish().map_err(|e| Error::io(loc.clone(), e))?;
                sink.flush().map_err(|e| Error::io(loc, e))?;
                Ok(sink)
            }
            Inner::Zip(z) => z.finish().map_err(|e| zip_write_err(loc, e)),
        }
    }
}

fn zip_write_err(loc: Location, e: zip::result::ZipError) -> Error {
    match e {
        zip::result::ZipError::Io(io) => Error::io(loc, io),
        other => Error::invalid(format!("{loc}: {other}")),
    }
}

fn write_data<W: Sink>(w: &mut Blocked<Enc<W>>, size: u64, source: EntrySource<'_>) -> io::Result<()> {
    match source {
        EntrySource::Bytes(b) => w.write_all(b),
        EntrySource::FileRange { file, offset } => {
            if let Enc::Plain(sink) = w.get_mut()
                && sink.as_file_mut().is_some()
                && size >= 16 * 1024
            {
                // Plain output: the buffered bytes go out first (block alignment does not matter without
                // a codec), then the kernel moves the range.
                w.drain()?;
                if let Enc::Plain(sink) = w.get_mut()
                    && let Some(out) = sink.as_file_mut()
                {
                    return copy_range(file, offset, size, out);
                }
            }
            copy_buffered(file, offset, size, w)
        }
        EntrySource::Reader(r) => copy_exact(r, w, size),
        EntrySource::Buffered(r) => {
            if matches!(w.get_mut(), Enc::Plain(_)) {
                // Without a codec the buffered bytes go out first, then the stream's buffers directly.
                w.drain()?;
                if let Enc::Plain(sink) = w.get_mut() {
                    return copy_bufread(r, sink, size);
                }
            }
            copy_bufread(r, w, size)
        }
    }
}

/// Copy exactly `size` bytes of `r` to `w` from `r`'s own buffers.
fn copy_bufread(r: &mut dyn BufRead, w: &mut dyn Write, size: u64) -> io::Result<()> {
    let mut left = size;
    while left > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("entry source ended after {} of {size} bytes", size - left),
            ));
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        w.write_all(&buf[..n])?;
        r.consume(n);
        left -= n as u64;
    }
    Ok(())
}

fn copy_exact(r: &mut dyn Read, w: &mut dyn Write, size: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(size), w)?;
    if copied != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("entry source ended after {copied} of {size} bytes"),
        ));
    }
    Ok(())
}

/// The header blocks (extension headers included) for one regular-file entry.
fn tar_headers(name: &str, size: u64, flavor: TarFlavor) -> std::result::Result<Vec<u8>, String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(512);
    let mut header = match flavor {
        TarFlavor::Gnu => tar::Header::new_gnu(),
        _ => tar::Header::new_ustar(),
    };
    match flavor {
        TarFlavor::Pax => {
            let mut records = Vec::new();
            if bytes.len() > 100 {
                records.push(pax_record("path", bytes));
            }
            if size > USTAR_MAX_SIZE {
                records.push(pax_record("size", size.to_string().as_bytes()));
            }
            if !records.is_empty() {
                let data: Vec<u8> = records.concat();
                let mut x = tar::Header::new_ustar();
                let short = truncate_name(name, 100 - "PaxHeaders/".len());
                let mut xname = b"PaxHeaders/".to_vec();
                xname.extend_from_slice(short.as_bytes());
                set_name_field(&mut x, &xname);
                normalise(&mut x, data.len() as u64, tar::EntryType::XHeader);
                out.extend_from_slice(x.as_bytes());
                out.extend_from_slice(&data);
                out.resize(out.len() + padding(data.len() as u64) as usize, 0);
            }
            set_name_field(&mut header, truncate_name(name, 100).as_bytes());
        }
        TarFlavor::Gnu => {
            if bytes.len() > 100 {
                let mut l = tar::Header::new_gnu();
                set_name_field(&mut l, b"././@LongLink");
                let len = bytes.len() as u64 + 1;
                normalise(&mut l, len, tar::EntryType::GNULongName);
                out.extend_from_slice(l.as_bytes());
                out.extend_from_slice(bytes);
                out.push(0);
                out.resize(out.len() + padding(len) as usize, 0);
            }
            set_name_field(&mut header, truncate_name(name, 100).as_bytes());
        }
        TarFlavor::Ustar => {
            if size > USTAR_MAX_SIZE {
                return Err(format!("size {size} does not fit a ustar header (use the pax or gnu flavor)"));
            }
            if bytes.len() <= 100 {
                set_name_field(&mut header, bytes);
            } else {
                let split = (0..bytes.len())
                    .rfind(|&i| bytes[i] == b'/' && i <= 155 && bytes.len() - i - 1 <= 100 && i > 0)
                    .ok_or_else(|| format!("name of {} bytes does not fit a ustar header", bytes.len()))?;
                set_name_field(&mut header, &bytes[split + 1..]);
                if let Some(ustar) = header.as_ustar_mut() {
                    ustar.prefix[..split].copy_from_slice(&bytes[..split]);
                }
            }
        }
    }
    normalise(&mut header, size, tar::EntryType::Regular);
    out.extend_from_slice(header.as_bytes());
    Ok(out)
}

fn set_name_field(header: &mut tar::Header, name: &[u8]) {
    let field = &mut header.as_old_mut().name;
    field.fill(0);
    let n = name.len().min(field.len());
    field[..n].copy_from_slice(&name[..n]);
}

fn normalise(header: &mut tar::Header, size: u64, kind: tar::EntryType) {
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(FILE_MODE);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(FIXED_MTIME);
    header.set_cksum();
}

/// The longest prefix of `name` of at most `max` bytes that ends on a character boundary.
fn truncate_name(name: &str, max: usize) -> &str {
    if name.len() <= max {
        return name;
    }
    let mut end = max;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// One PAX record: `"<len> <key>=<value>\n"`, where `len` counts the whole record including itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut rec = format!("{len} {key}=").into_bytes();
    rec.extend_from_slice(value);
    rec.push(b'\n');
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 9 GiB: over the 8 GiB a ustar octal size field holds.
    const HUGE: u64 = 9 * (1 << 30);

    #[test]
    fn huge_sizes_get_a_pax_record_or_base256() {
        let h = tar_headers("big.bin", HUGE, TarFlavor::Pax).unwrap();
        assert_eq!(h.len(), 3 * 512, "PAX header, its records, the entry header");
        let x = tar::Header::from_byte_slice(&h[..512]);
        assert_eq!(x.entry_type(), tar::EntryType::XHeader);
        let records = &h[512..512 + x.entry_size().unwrap() as usize];
        let size: Vec<_> = tar::PaxExtensions::new(records)
            .map(|e| e.unwrap())
            .filter(|e| e.key() == Ok("size"))
            .map(|e| e.value().unwrap().to_string())
            .collect();
        assert_eq!(size, [HUGE.to_string()]);
        let main = tar::Header::from_byte_slice(&h[1024..]);
        assert_eq!(main.path_bytes().as_ref(), b"big.bin");
        assert_eq!(main.entry_size().unwrap(), HUGE, "the ustar field holds it too, in base-256");
        main.cksum().unwrap();

        // A long name and a huge size share one PAX header.
        let long = format!("{}/big.bin", "d".repeat(150));
        let h = tar_headers(&long, HUGE, TarFlavor::Pax).unwrap();
        let x = tar::Header::from_byte_slice(&h[..512]);
        let len = x.entry_size().unwrap() as usize;
        let keys: Vec<_> = tar::PaxExtensions::new(&h[512..512 + len]).map(|e| e.unwrap().key().unwrap()).collect();
        assert_eq!(keys, ["path", "size"]);

        let gnu = tar_headers("big.bin", HUGE, TarFlavor::Gnu).unwrap();
        assert_eq!(gnu.len(), 512);
        let g = tar::Header::from_byte_slice(&gnu);
        assert_eq!(g.as_bytes()[124] & 0x80, 0x80, "base-256 size");
        assert_eq!(g.entry_size().unwrap(), HUGE);

        assert!(tar_headers("big.bin", HUGE, TarFlavor::Ustar).is_err());
        let mut w = ShardWriter::new(
            "s.tar",
            Format::Tar,
            Cursor::new(Vec::new()),
            WriteOptions { tar_flavor: TarFlavor::Ustar, ..WriteOptions::default() },
        )
        .unwrap();
        let err = w.append("big.bin", HUGE, EntrySource::Reader(&mut io::empty())).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{err}");
        assert_eq!(w.finish().unwrap().into_inner().len(), 1024, "nothing of the refused entry was written");
    }

    #[test]
    fn sizes_at_the_ustar_limit_need_no_extension() {
        let h = tar_headers("edge.bin", USTAR_MAX_SIZE, TarFlavor::Pax).unwrap();
        assert_eq!(h.len(), 512);
        assert_eq!(tar::Header::from_byte_slice(&h).entry_size().unwrap(), USTAR_MAX_SIZE);
        let h = tar_headers("edge.bin", USTAR_MAX_SIZE + 1, TarFlavor::Pax).unwrap();
        assert_eq!(h.len(), 3 * 512);
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let r = pax_record("path", b"abc");
        assert_eq!(r, b"12 path=abc\n");
        let long = vec![b'x'; 95];
        let r = pax_record("path", &long);
        assert_eq!(r.len(), String::from_utf8_lossy(&r).split(' ').next().unwrap().parse::<usize>().unwrap());
    }

    #[test]
    fn ustar_splits_long_names_at_a_slash() {
        let name = format!("{}/{}", "d".repeat(120), "f".repeat(60));
        let h = tar_headers(&name, 1, TarFlavor::Ustar).unwrap();
        assert_eq!(h.len(), 512);
        let header = tar::Header::from_byte_slice(&h);
        assert_eq!(header.path_bytes().as_ref(), name.as_bytes());
        assert!(tar_headers(&"x".repeat(300), 1, TarFlavor::Ustar).is_err());
    }
}
