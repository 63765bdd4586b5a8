//! Byte sources for the shard readers: a seekable file read through one large buffer (so walking
//! headers costs about what `cat` costs, and long entries are skipped with a seek), and a forward-only
//! stream (decoders, network) that counts what it has consumed so errors can name an offset.

use std::io::{self, BufRead, BufReader, Read, Seek};

/// What the tar walker needs from its input: reads, a skip, the current position, and a way to tell
/// damage in a decoder from a failure of the storage underneath.
pub trait TarSource: Read {
    /// Advance by `n` bytes; returns how many were skipped (fewer means the input ended).
    fn skip(&mut self, n: u64) -> io::Result<u64>;
    /// Bytes consumed so far, in the (decoded) archive stream.
    fn position(&self) -> u64;
    /// Total length of the archive stream when known (seekable files): lets the walker detect a
    /// truncated entry without reading it.
    fn len_hint(&self) -> Option<u64>;
    /// Name of the codec between the storage and the tar stream (`None`, the default, for a plain tar).
    fn codec(&self) -> Option<&'static str> {
        None
    }
    /// Offset in the stored (compressed) bytes, when that differs from `position`.
    fn raw_position(&self) -> Option<u64> {
        None
    }
    /// True when the last error came from the storage underneath rather than from a decoder (always,
    /// by default: a source without a decoder has nothing else to fail).
    fn storage_failed(&self) -> bool {
        true
    }
}

/// A seekable input read through a large buffer.
pub struct SeekSource<R: Read + Seek> {
    inner: BufReader<R>,
    pos: u64,
    len: u64,
}

/// Buffer size for sequential reads of seekable shards: large enough that a header walk over small
/// entries is a handful of big reads, not one syscall per header.
pub const SEEK_BUF: usize = 1 << 15;

impl<R: Read + Seek> SeekSource<R> {
    pub fn new(mut inner: R) -> io::Result<Self> {
        let start = inner.stream_position()?;
        let end = inner.seek(io::SeekFrom::End(0))?;
        inner.seek(io::SeekFrom::Start(start))?;
        Ok(SeekSource { inner: BufReader::with_capacity(SEEK_BUF, inner), pos: start, len: end })
    }
}

impl<R: Read + Seek> Read for SeekSource<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> TarSource for SeekSource<R> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let n = n.min(self.len.saturating_sub(self.pos));
        if n == 0 {
            return Ok(0);
        }
        let buffered = self.inner.buffer().len() as u64;
        if n <= buffered {
            self.inner.consume(n as usize);
        } else {
            let delta = i64::try_from(n).map_err(|_| io::Error::other("skip too large"))?;
            self.inner.seek_relative(delta)?;
        }
        self.pos += n;
        Ok(n)
    }
    fn position(&self) -> u64 {
        self.pos
    }
    fn len_hint(&self) -> Option<u64> {
        Some(self.len)
    }
}

/// Counts bytes read from the storage and remembers whether the storage itself failed.
pub struct Counting<R> {
    inner: R,
    count: u64,
    failed: bool,
}

impl<R> Counting<R> {
    pub fn new(inner: R) -> Self {
        Counting { inner, count: 0, failed: false }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.count += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed = true;
                }
                Err(e)
            }
        }
    }
}

/// Reports (stored bytes consumed, storage failed) from a decoder's inner `Counting`.
pub type RawProbe<D> = Box<dyn Fn(&D) -> (u64, bool) + Send>;

/// A forward-only stream, optionally behind a decoder. `D` is the decoder over `Counting<R>`.
pub struct StreamSource<D> {
    inner: D,
    pos: u64,
    codec: Option<&'static str>,
    raw: RawProbe<D>,
}

impl<D: Read> StreamSource<D> {
    /// `raw` reports (stored bytes consumed, storage failed) from the decoder's inner `Counting`.
    pub fn new(inner: D, codec: Option<&'static str>, raw: RawProbe<D>) -> Self {
        StreamSource { inner, pos: 0, codec, raw }
    }
}

impl<D: Read> Read for StreamSource<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: Read> TarSource for StreamSource<D> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let mut scratch = [0u8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let want = left.min(scratch.len() as u64) as usize;
            let got = match self.read(&mut scratch[..want]) {
                Ok(0) => break,
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            left -= got as u64;
        }
        Ok(n - left)
    }
    fn position(&self) -> u64 {
        self.pos
    }
    fn len_hint(&self) -> Option<u64> {
        None
    }
    fn codec(&self) -> Option<&'static str> {
        self.codec
    }
    fn raw_position(&self) -> Option<u64> {
        self.codec.map(|_| (self.raw)(&self.inner).0)
    }
    fn storage_failed(&self) -> bool {
        (self.raw)(&self.inner).1
    }
}

/// Accessors used by the decoders' `raw` closures.
impl<R> Counting<R> {
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn failed(&self) -> bool {
        self.failed
    }
}

/// Follows the lz4 frame format over the stored bytes as they pass, to tell a stream that ends between
/// frames from one cut inside a frame: the `lz4_flex` decoder reports both as a clean end of input (it
/// takes a missing block header for the end), which would let a cut at a block boundary pass unseen.
pub struct Lz4Tracker<R> {
    inner: R,
    pos: Lz4Pos,
    field: [u8; 4],
    got: usize,
    flags: u8,
    eof: bool,
    seen: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lz4Field {
    Magic,
    Descriptor,
    SkippableSize,
    BlockSize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lz4Pos {
    /// Collecting the bytes of a fixed-size field.
    Field(Lz4Field),
    /// Passing over `n` opaque bytes, then collecting a field.
    Skip(u64, Lz4Field),
    /// A frame kind this tracker does not follow (legacy frames, garbage): it judges nothing, the decoder
    /// reports what it finds.
    Unknown,
}

const LZ4_MAGIC: u32 = 0x184D_2204;
const LZ4_SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const LZ4_SKIPPABLE: u32 = 0x184D_2A50;
const LZ4_FLG_DICT_ID: u8 = 0x01;
const LZ4_FLG_CONTENT_CHECKSUM: u8 = 0x04;
const LZ4_FLG_CONTENT_SIZE: u8 = 0x08;
const LZ4_FLG_BLOCK_CHECKSUM: u8 = 0x10;

impl<R> Lz4Tracker<R> {
    pub fn new(inner: R) -> Self {
        Lz4Tracker { inner, pos: Lz4Pos::Field(Lz4Field::Magic), field: [0; 4], got: 0, flags: 0, eof: false, seen: 0 }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// True once the stored bytes have ended.
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// True when the bytes seen so far end on a frame boundary (or in a part this tracker cannot judge).
    pub fn between_frames(&self) -> bool {
        match self.pos {
            Lz4Pos::Field(Lz4Field::Magic) => self.got == 0,
            Lz4Pos::Unknown => true,
            _ => false,
        }
    }

    fn skip_then(n: u64, next: Lz4Field) -> Lz4Pos {
        if n == 0 { Lz4Pos::Field(next) } else { Lz4Pos::Skip(n, next) }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.pos {
                Lz4Pos::Unknown => return,
                Lz4Pos::Skip(n, next) => {
                    let k = n.min(data.len() as u64);
                    data = &data[k as usize..];
                    self.pos = Self::skip_then(n - k, next);
                }
                Lz4Pos::Field(f) => {
                    let need = if f == Lz4Field::Descriptor { 2 } else { 4 };
                    let k = (need - self.got).min(data.len());
                    self.field[self.got..self.got + k].copy_from_slice(&data[..k]);
                    self.got += k;
                    data = &data[k..];
                    if self.got == need {
                        self.got = 0;
                        self.pos = self.field_done(f);
                    }
                }
            }
        }
    }

    fn field_done(&mut self, f: Lz4Field) -> Lz4Pos {
        let value = u32::from_le_bytes(self.field);
        match f {
            Lz4Field::Magic if value == LZ4_MAGIC => Lz4Pos::Field(Lz4Field::Descriptor),
            Lz4Field::Magic if value & LZ4_SKIPPABLE_MASK == LZ4_SKIPPABLE => Lz4Pos::Field(Lz4Field::SkippableSize),
            Lz4Field::Magic => Lz4Pos::Unknown,
            Lz4Field::Descriptor => {
                self.flags = self.field[0];
                let mut rest = 1; // header checksum
                if self.flags & LZ4_FLG_CONTENT_SIZE != 0 {
                    rest += 8;
                }
                if self.flags & LZ4_FLG_DICT_ID != 0 {
                    rest += 4;
                }
                Self::skip_then(rest, Lz4Field::BlockSize)
            }
            Lz4Field::SkippableSize => Self::skip_then(u64::from(value), Lz4Field::Magic),
            Lz4Field::BlockSize if value == 0 => {
                let checksum = if self.flags & LZ4_FLG_CONTENT_CHECKSUM != 0 { 4 } else { 0 };
                Self::skip_then(checksum, Lz4Field::Magic)
            }
            Lz4Field::BlockSize => {
                let checksum = if self.flags & LZ4_FLG_BLOCK_CHECKSUM != 0 { 4 } else { 0 };
                Self::skip_then(u64::from(value & 0x7FFF_FFFF) + checksum, Lz4Field::BlockSize)
            }
        }
    }
}

impl<R: Read> Read for Lz4Tracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        self.seen += n as u64;
        self.feed(&buf[..n]);
        Ok(n)
    }
}

/// An lz4 stream of one or more frames. The `lz4_flex` decoder stops at the end of each frame; this goes
/// on to the next one, and turns an end of input inside a frame into an `UnexpectedEof` error.
pub struct Lz4Stream<R: Read> {
    dec: lz4_flex::frame::FrameDecoder<Lz4Tracker<R>>,
}

impl<R: Read> Lz4Stream<R> {
    pub fn new(inner: R) -> Self {
        Lz4Stream { dec: lz4_flex::frame::FrameDecoder::new(Lz4Tracker::new(inner)) }
    }

    /// The stored-bytes reader underneath.
    pub fn get_ref(&self) -> &R {
        self.dec.get_ref().get_ref()
    }
}

impl<R: Read> Read for Lz4Stream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let before = self.dec.get_ref().seen;
            let n = self.dec.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            let tracker = self.dec.get_ref();
            if tracker.at_eof() {
                if tracker.between_frames() {
                    return Ok(0);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "lz4 stream ends inside a frame"));
            }
            if tracker.seen == before {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "lz4 decoder made no progress"));
            }
            // The end of one frame (or an empty block): the next read goes on with the next frame or finds
            // the end of input.
        }
    }
}

/// A gzip stream of one or more members (`cat a.gz b.gz`, pigz's output), each checked against its
/// trailer. Zero bytes after the last member are ignored, as `gzip -d` does (tape blocking pads archives
/// with zeros); anything else there is damage.
pub struct GzMembers<R: Read> {
    /// `None` only for the moment between two members.
    dec: Option<flate2::bufread::GzDecoder<io::BufReader<R>>>,
    eof: bool,
}

impl<R: Read> GzMembers<R> {
    pub fn new(inner: R) -> Self {
        GzMembers { dec: Some(flate2::bufread::GzDecoder::new(io::BufReader::new(inner))), eof: false }
    }

    /// The stored-bytes reader underneath.
    pub fn get_ref(&self) -> Option<&R> {
        self.dec.as_ref().map(|d| d.get_ref().get_ref())
    }
}

impl<R: Read> Read for GzMembers<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.eof {
            return Ok(0);
        }
        loop {
            let Some(dec) = self.dec.as_mut() else { return Ok(0) };
            let n = dec.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            // One member ended, its trailer checked. More input is another member, or zero padding.
            let Some(dec) = self.dec.take() else { return Ok(0) };
            let mut input = dec.into_inner();
            let next = input.fill_buf();
            let first = match next {
                Ok(rest) => rest.first().copied(),
                Err(e) => {
                    self.dec = Some(flate2::bufread::GzDecoder::new(input));
                    return Err(e);
                }
            };
            let padded = first == Some(0);
            let result = if padded { skip_zeros(&mut input) } else { Ok(()) };
            self.eof = first.is_none() || padded;
            self.dec = Some(flate2::bufread::GzDecoder::new(input));
            result?;
            if self.eof {
                return Ok(0);
            }
        }
    }
}

/// Consume the rest of the input, which must be zero bytes.
fn skip_zeros<R: BufRead>(input: &mut R) -> io::Result<()> {
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok(());
        }
        if chunk.iter().any(|&b| b != 0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "data after the zero padding that ends the gzip stream",
            ));
        }
        let n = chunk.len();
        input.consume(n);
    }
}
