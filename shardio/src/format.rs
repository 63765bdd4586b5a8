//! Shard formats: chosen from the object name's extension, then checked against the first bytes, so a
//! `.tar` that is really gzip is refused with both names instead of being misread.

use crate::error::{Error, Location, Result};
use std::fmt;

/// Every archive format dsort reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Tar,
    TarGz,
    TarZst,
    TarLz4,
    Zip,
}

/// Extensions, longest first so that suffix matching picks `.tar.gz` before `.tar`.
const EXTENSIONS: &[(&str, Format)] = &[
    (".tar.gz", Format::TarGz),
    (".tar.zst", Format::TarZst),
    (".tar.lz4", Format::TarLz4),
    (".tgz", Format::TarGz),
    (".tar", Format::Tar),
    (".zip", Format::Zip),
];

impl Format {
    pub const ALL: [Format; 5] = [Format::Tar, Format::TarGz, Format::TarZst, Format::TarLz4, Format::Zip];

    /// The format named by a file or object name's extension (case-insensitive), if any.
    pub fn from_name(name: &str) -> Option<Format> {
        let lower = name.to_ascii_lowercase();
        EXTENSIONS.iter().find(|(ext, _)| lower.ends_with(ext)).map(|&(_, f)| f)
    }

    /// The format an extension string (`.tar`, `tgz`, `.tar.zst`, ...) names.
    pub fn from_extension(ext: &str) -> Option<Format> {
        let ext = ext.trim();
        let with_dot = if ext.starts_with('.') { ext.to_string() } else { format!(".{ext}") };
        let lower = with_dot.to_ascii_lowercase();
        EXTENSIONS.iter().find(|(e, _)| *e == lower).map(|&(_, f)| f)
    }

    /// The canonical extension written for this format.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Tar => ".tar",
            Format::TarGz => ".tar.gz",
            Format::TarZst => ".tar.zst",
            Format::TarLz4 => ".tar.lz4",
            Format::Zip => ".zip",
        }
    }

    /// A short name for messages and JSON (`tar`, `tar.gz`, ...).
    pub fn name(self) -> &'static str {
        &self.extension()[1..]
    }

    /// True for the tar family (every format but zip).
    pub fn is_tar(self) -> bool {
        !matches!(self, Format::Zip)
    }

    /// True when entry bytes sit verbatim in the shard, so they can be addressed by offset.
    pub fn is_uncompressed_tar(self) -> bool {
        matches!(self, Format::Tar)
    }

    /// Check the first bytes of a shard (up to 512) against this format; a mismatch names both.
    pub fn check_magic(self, shard: &str, head: &[u8]) -> Result<()> {
        let found = sniff(head);
        let ok = match (self, found) {
            (_, Sniffed::Empty) => true, // emptiness is judged by the reader (truncation)
            (Format::Tar, Sniffed::Tar) | (Format::Tar, Sniffed::Unknown) => true,
            (Format::TarGz, Sniffed::Gzip) => true,
            (Format::TarZst, Sniffed::Zstd) => true,
            (Format::TarLz4, Sniffed::Lz4) => true,
            (Format::Zip, Sniffed::Zip) => true,
            _ => false,
        };
        if ok {
            return Ok(());
        }
        let found_name = match found {
            Sniffed::Unknown if self == Format::Zip => "not a zip archive",
            other => other.name(),
        };
        Err(Error::FormatMismatch { loc: Location::at(shard, 0), expected: self.name(), found: found_name })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the first bytes of a file look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Empty,
    Tar,
    Gzip,
    Zstd,
    Lz4,
    Zip,
    Unknown,
}

impl Sniffed {
    pub fn name(self) -> &'static str {
        match self {
            Sniffed::Empty => "empty",
            Sniffed::Tar => "tar",
            Sniffed::Gzip => "gzip",
            Sniffed::Zstd => "zstd",
            Sniffed::Lz4 => "lz4",
            Sniffed::Zip => "zip",
            Sniffed::Unknown => "unrecognised data",
        }
    }
}

/// Identify a format by magic bytes. A v7 tar has no magic; it is reported as `Unknown`, and the tar
/// reader's checksum check decides.
pub fn sniff(head: &[u8]) -> Sniffed {
    if head.is_empty() {
        return Sniffed::Empty;
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return Sniffed::Gzip;
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Sniffed::Zstd;
    }
    if head.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
        return Sniffed::Lz4;
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") || head.starts_with(b"PK\x07\x08") {
        return Sniffed::Zip;
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Sniffed::Tar;
    }
    Sniffed::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_name_prefers_longest_extension() {
        assert_eq!(Format::from_name("a/b.tar.gz"), Some(Format::TarGz));
        assert_eq!(Format::from_name("x.TGZ"), Some(Format::TarGz));
        assert_eq!(Format::from_name("x.tar"), Some(Format::Tar));
        assert_eq!(Format::from_name("x.tar.zst"), Some(Format::TarZst));
        assert_eq!(Format::from_name("x.tar.lz4"), Some(Format::TarLz4));
        assert_eq!(Format::from_name("x.zip"), Some(Format::Zip));
        assert_eq!(Format::from_name("x.gz"), None);
        assert_eq!(Format::from_extension("tgz"), Some(Format::TarGz));
    }

    #[test]
    fn mismatch_names_both() {
        let err = Format::Tar.check_magic("s.tar", &[0x1f, 0x8b, 8, 0]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tar") && msg.contains("gzip") && msg.contains("s.tar"), "{msg}");
        assert!(Format::TarGz.check_magic("s.tgz", &[0x1f, 0x8b]).is_ok());
        let err = Format::Zip.check_magic("s.zip", &[0x28, 0xb5, 0x2f, 0xfd]).unwrap_err();
        assert!(err.to_string().contains("zstd"));
    }
}
