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
    /// Name of the codec between the storage and the tar stream (`None` for a plain tar).
    fn codec(&self) -> Option<&'static str>;
    /// Offset in the stored (compressed) bytes, when that differs from `position`.
    fn raw_position(&self) -> Option<u64>;
    /// True when the last error came from the storage underneath rather than from a decoder.
    fn storage_failed(&self) -> bool;
}

/// A seekable input read through a large buffer.
pub struct SeekSource<R: Read + Seek> {
    inner: BufReader<R>,
    pos: u64,
    len: u64,
}

/// Buffer size for sequential reads of seekable shards: large enough that a header walk over small
/// entries is a handful of big reads, not one syscall per header.
pub const SEEK_BUF: usize = 1 << 20;

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
    fn codec(&self) -> Option<&'static str> {
        None
    }
    fn raw_position(&self) -> Option<u64> {
        None
    }
    fn storage_failed(&self) -> bool {
        true
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

/// A forward-only stream, optionally behind a decoder. `D` is the decoder over `Counting<R>`.
pub struct StreamSource<D> {
    inner: D,
    pos: u64,
    codec: Option<&'static str>,
    raw: Box<dyn Fn(&D) -> (u64, bool) + Send>,
}

impl<D: Read> StreamSource<D> {
    /// `raw` reports (stored bytes consumed, storage failed) from the decoder's inner `Counting`.
    pub fn new(inner: D, codec: Option<&'static str>, raw: Box<dyn Fn(&D) -> (u64, bool) + Send>) -> Self {
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
