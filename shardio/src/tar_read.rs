//! A tar walker for every dialect (v7, ustar, GNU long names, PAX paths and sizes): header fields are
//! decoded by the `tar` crate's `Header`; the walk itself is ours so that each entry's exact byte offsets
//! are known (the zero-copy path) and every error names the header offset where it happened.

use crate::error::{Error, Location, Result};
use crate::record::{EntryMeta, validate_entry_name};
use crate::source::TarSource;
use std::io::{self, Read};
use tar::{EntryType, Header, PaxExtensions};

const BLOCK: u64 = 512;
/// Longest GNU long-name or PAX header we accept; anything bigger is damage, not a name.
const MAX_META: u64 = 1 << 20;

/// Walks the headers of a tar stream, yielding regular-file entries positioned at their data.
pub struct TarWalker<S: TarSource> {
    src: S,
    shard: String,
    /// Bytes still to skip (rest of the current entry's data plus padding) before the next header.
    pending: u64,
    /// The entry last returned (first header offset, name): a short skip over its data names it.
    current: Option<(u64, String)>,
    done: bool,
}

impl<S: TarSource> TarWalker<S> {
    pub fn new(shard: &str, src: S) -> Self {
        TarWalker { src, shard: shard.to_string(), pending: 0, current: None, done: false }
    }

    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// Turn an I/O error at `offset` into a typed error: decoder damage, truncation or storage failure.
    pub fn classify(&self, e: io::Error, offset: u64, entry: Option<&str>) -> Error {
        let mut loc = Location::at(&self.shard, offset);
        if let Some(entry) = entry {
            loc = loc.entry(entry);
        }
        classify_io(&self.src, e, loc)
    }

    fn truncated(&self, offset: u64, entry: Option<&str>, detail: impl Into<String>) -> Error {
        let mut loc = Location::at(&self.shard, offset);
        if let Some(entry) = entry {
            loc = loc.entry(entry);
        }
        Error::Truncated { loc, detail: detail.into() }
    }

    fn skip_exact(&mut self, n: u64, at: u64, entry: Option<&str>) -> Result<()> {
        let got = self.src.skip(n).map_err(|e| self.classify(e, at, entry))?;
        if got < n {
            return Err(self.truncated(at, entry, format!("entry data ends {} bytes early", n - got)));
        }
        Ok(())
    }

    /// After the end of the archive in a compressed stream, decode the rest (the zero blocks and record
    /// padding that tar writers add) to the end: only there do codecs check their trailers (gzip's CRC
    /// and length, zstd's and lz4's content checksums), so damage or a cut would otherwise go unseen.
    fn drain_codec(&mut self, at: u64) -> Result<()> {
        if self.src.codec().is_none() {
            return Ok(());
        }
        self.src.skip(u64::MAX).map_err(|e| self.classify(e, at, None))?;
        Ok(())
    }

    /// An entry's data plus its padding to the next block: a size read from a header (octal, base-256 or
    /// PAX) may be anything up to `u64::MAX`, so the sum is checked rather than left to wrap.
    fn span(&self, size: u64, at: u64, entry: &str) -> Result<u64> {
        size.checked_add(padding(size)).ok_or_else(|| Error::Corrupt {
            loc: Location::at(&self.shard, at).entry(entry),
            codec: "tar",
            detail: format!("entry size {size} is past the largest possible archive"),
        })
    }

    /// Read a whole header block; `Ok(None)` at a clean end of input.
    fn read_block(&mut self, at: u64) -> Result<Option<[u8; 512]>> {
        let mut block = [0u8; 512];
        let mut filled = 0;
        while filled < block.len() {
            match self.src.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.classify(e, at, None)),
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        if filled < block.len() {
            return Err(self.truncated(at, None, format!("header block cut after {filled} of 512 bytes")));
        }
        Ok(Some(block))
    }

    fn read_meta(&mut self, size: u64, at: u64, what: &str) -> Result<Vec<u8>> {
        if size > MAX_META {
            return Err(Error::Corrupt {
                loc: Location::at(&self.shard, at),
                codec: "tar",
                detail: format!("{what} header of {size} bytes is implausibly large"),
            });
        }
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match self.src.read(&mut buf[filled..]) {
                Ok(0) => return Err(self.truncated(at, None, format!("{what} data cut short"))),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.classify(e, at, None)),
            }
        }
        let pad = padding(size);
        self.skip_exact(pad, at, None)?;
        Ok(buf)
    }

    /// The next regular-file entry, with the source positioned at its first data byte. Data not read by
    /// the caller through [`TarWalker::data`] is skipped on the next call.
    pub fn next_entry(&mut self) -> Result<Option<EntryMeta>> {
        if self.done {
            return Ok(None);
        }
        let current = self.current.take();
        if self.pending > 0 {
            let n = self.pending;
            self.pending = 0;
            let (at, entry) = match &current {
                Some((at, name)) => (*at, Some(name.as_str())),
                None => (self.src.position(), None),
            };
            self.skip_exact(n, at, entry)?;
        }
        let mut long_name: Option<Vec<u8>> = None;
        let mut pax_path: Option<Vec<u8>> = None;
        let mut pax_size: Option<u64> = None;
        let mut first_header: Option<u64> = None;
        loop {
            let at = self.src.position();
            let Some(block) = self.read_block(at)? else {
                if at == 0 {
                    return Err(self.truncated(0, None, "empty shard: no tar header"));
                }
                if first_header.is_some() {
                    return Err(self.truncated(at, None, "extension header without the entry it describes"));
                }
                // End of input without the two zero blocks: accepted, as GNU tar and Python do.
                self.done = true;
                self.drain_codec(at)?;
                return Ok(None);
            };
            if block.iter().all(|&b| b == 0) {
                if first_header.is_some() {
                    return Err(self.truncated(at, None, "extension header without the entry it describes"));
                }
                self.done = true;
                self.drain_codec(at)?;
                return Ok(None);
            }
            let header = Header::from_byte_slice(&block);
            check_checksum(&self.shard, header, at)?;
            let head_at = *first_header.get_or_insert(at);
            let size = match pax_size.take() {
                Some(s) => s,
                None => header.entry_size().map_err(|e| Error::Corrupt {
                    loc: Location::at(&self.shard, at),
                    codec: "tar",
                    detail: format!("bad size field: {e}"),
                })?,
            };
            let kind = header.entry_type();
            match kind {
                EntryType::GNULongName => {
                    let mut name = self.read_meta(size, at, "GNU long name")?;
                    while name.last() == Some(&0) {
                        name.pop();
                    }
                    long_name = Some(name);
                    continue;
                }
                EntryType::GNULongLink => {
                    self.read_meta(size, at, "GNU long link")?;
                    continue;
                }
                EntryType::XHeader => {
                    let data = self.read_meta(size, at, "PAX")?;
                    for ext in PaxExtensions::new(&data) {
                        let ext = ext.map_err(|e| Error::Corrupt {
                            loc: Location::at(&self.shard, at),
                            codec: "tar",
                            detail: format!("malformed PAX record: {e}"),
                        })?;
                        match ext.key_bytes() {
                            b"path" => pax_path = Some(ext.value_bytes().to_vec()),
                            b"size" => {
                                let v = std::str::from_utf8(ext.value_bytes())
                                    .ok()
                                    .and_then(|s| s.trim().parse::<u64>().ok())
                                    .ok_or_else(|| Error::Corrupt {
                                        loc: Location::at(&self.shard, at),
                                        codec: "tar",
                                        detail: "PAX size is not a number".into(),
                                    })?;
                                pax_size = Some(v);
                            }
                            _ => {}
                        }
                    }
                    continue;
                }
                EntryType::XGlobalHeader => {
                    self.read_meta(size, at, "PAX global")?;
                    first_header = None;
                    continue;
                }
                _ => {}
            }
            let raw_name = match (pax_path.take(), long_name.take()) {
                (Some(p), _) => p,
                (None, Some(l)) => l,
                (None, None) => header.path_bytes().into_owned(),
            };
            let name = String::from_utf8(raw_name).map_err(|e| Error::BadName {
                loc: Location::at(&self.shard, head_at).entry(String::from_utf8_lossy(e.as_bytes())),
                reason: "name is not valid UTF-8".into(),
            })?;
            let data_at = self.src.position();
            let is_dir = kind == EntryType::Directory
                || ((kind == EntryType::Regular || kind.as_byte() == 0) && name.ends_with('/'));
            let span = self.span(size, head_at, &name)?;
            if is_dir {
                self.skip_exact(span, at, Some(&name))?;
                first_header = None;
                continue;
            }
            let regular = matches!(kind, EntryType::Regular | EntryType::Continuous) || kind.as_byte() == 0;
            if !regular {
                return Err(Error::UnsupportedEntry {
                    loc: Location::at(&self.shard, head_at).entry(&name),
                    kind: describe(kind),
                });
            }
            validate_entry_name(&self.shard, &name, head_at)?;
            if let Some(len) = self.src.len_hint() {
                let end = data_at.saturating_add(size);
                if end > len {
                    return Err(self.truncated(
                        head_at,
                        Some(&name),
                        format!("entry of {size} bytes needs {end} bytes but the shard has {len}"),
                    ));
                }
            }
            self.pending = span;
            self.current = Some((head_at, name.clone()));
            let data_offset = if self.src.codec().is_none() { Some(data_at) } else { None };
            return Ok(Some(EntryMeta { name, size, header_offset: head_at, data_offset }));
        }
    }

    /// Read the current entry's data (at most `size` bytes, as returned by `next_entry`). Must be called
    /// right after `next_entry`; whatever is left unread is skipped later.
    pub fn data(&mut self, size: u64) -> EntryData<'_, S> {
        EntryData { walker: self, left: size }
    }

    pub fn source(&self) -> &S {
        &self.src
    }
}

/// Reader over one entry's data; keeps the walker's skip count in step with what was read.
pub struct EntryData<'a, S: TarSource> {
    walker: &'a mut TarWalker<S>,
    left: u64,
}

impl<S: TarSource> Read for EntryData<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = self.walker.src.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "entry data ends early"));
        }
        self.left -= n as u64;
        self.walker.pending -= n as u64;
        Ok(n)
    }
}

pub(crate) fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn check_checksum(shard: &str, header: &Header, at: u64) -> Result<()> {
    let bytes = header.as_bytes();
    // Sum of all bytes with the checksum field counted as spaces; a plain loop vectorises.
    let mut all = 0u32;
    for &b in bytes.iter() {
        all += u32::from(b);
    }
    let field: u32 = bytes[148..156].iter().map(|&b| u32::from(b)).sum();
    let computed = all - field + 8 * 32;
    match header.cksum() {
        Ok(stored) if stored == computed => Ok(()),
        // Some old writers summed the bytes as signed chars; GNU tar and Python accept either sum.
        Ok(stored) if i64::from(stored) == signed_checksum(bytes) => Ok(()),
        _ => {
            let field = &bytes[148..156];
            let stored = String::from_utf8_lossy(field).trim_matches(|c: char| c == '\0' || c == ' ').to_string();
            Err(Error::Checksum { loc: Location::at(shard, at), stored, computed })
        }
    }
}

/// The header checksum with bytes taken as signed chars (the checksum field counted as spaces).
#[cold]
fn signed_checksum(bytes: &[u8; 512]) -> i64 {
    bytes[..148].iter().chain(&bytes[156..]).map(|&b| i64::from(b as i8)).sum::<i64>() + 8 * 32
}

fn describe(kind: EntryType) -> String {
    let what = match kind {
        EntryType::Symlink => "symbolic link",
        EntryType::Link => "hard link",
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Fifo => "FIFO",
        EntryType::GNUSparse => "GNU sparse file",
        _ => "unknown",
    };
    format!("'{}' ({what})", kind.as_byte().escape_ascii())
}

/// Classify an I/O error from a source: storage failure, truncation, or decoder damage.
pub(crate) fn classify_io<S: TarSource + ?Sized>(src: &S, e: io::Error, mut loc: Location) -> Error {
    match src.codec() {
        Some(codec) if !src.storage_failed() => {
            if let Some(raw) = src.raw_position() {
                let detail = format!("{e} (near compressed byte {raw})");
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    return Error::Truncated { loc, detail: format!("{codec} stream ends early: {detail}") };
                }
                return Error::Corrupt { loc, codec, detail };
            }
            Error::Corrupt { loc, codec, detail: e.to_string() }
        }
        _ => {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Error::Truncated { loc, detail: e.to_string() };
            }
            if loc.offset.is_none() {
                loc.offset = Some(src.position());
            }
            Error::io(loc, e)
        }
    }
}
