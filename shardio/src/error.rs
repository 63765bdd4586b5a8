//! The one error type of `shardio`: every variant names the shard, and where it can, the entry and the
//! byte offset, so that a user with a million shards can find the bad one.

use std::fmt;
use std::io;

/// Where in a shard something went wrong. `offset` is a byte offset in the archive stream (the decoded
/// stream for compressed tars: a tar header's position), `entry` the entry name when known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    pub shard: String,
    pub entry: Option<String>,
    pub offset: Option<u64>,
}

impl Location {
    pub fn shard(shard: impl Into<String>) -> Self {
        Location { shard: shard.into(), entry: None, offset: None }
    }
    pub fn at(shard: impl Into<String>, offset: u64) -> Self {
        Location { shard: shard.into(), entry: None, offset: Some(offset) }
    }
    pub fn entry(mut self, entry: impl Into<String>) -> Self {
        self.entry = Some(entry.into());
        self
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {:?}", self.shard)?;
        if let Some(e) = &self.entry {
            write!(f, ", entry {e:?}")?;
        }
        if let Some(o) = self.offset {
            write!(f, ", offset {o}")?;
        }
        Ok(())
    }
}

/// A coarse class of [`Error`], for callers that react per class (skip corrupt shards, retry I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Io,
    NotFound,
    Truncated,
    Checksum,
    Corrupt,
    FormatMismatch,
    UnknownFormat,
    UnsupportedEntry,
    BadName,
    InvalidArgument,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{loc}: I/O error: {source}")]
    Io {
        loc: Location,
        #[source]
        source: io::Error,
    },
    #[error("{loc}: not found")]
    NotFound { loc: Location },
    #[error("{loc}: truncated archive: {detail}")]
    Truncated { loc: Location, detail: String },
    #[error("{loc}: bad tar header checksum (stored {stored}, computed {computed})")]
    Checksum { loc: Location, stored: String, computed: u32 },
    #[error("{loc}: damaged {codec} data: {detail}")]
    Corrupt { loc: Location, codec: &'static str, detail: String },
    #[error("{loc}: the name says {expected} but the content is {found}")]
    FormatMismatch { loc: Location, expected: &'static str, found: &'static str },
    #[error("{loc}: unknown shard format (expected one of .tar, .tgz, .tar.gz, .tar.zst, .tar.lz4, .zip)")]
    UnknownFormat { loc: Location },
    #[error("{loc}: unsupported entry type {kind} (only regular files and directories are allowed)")]
    UnsupportedEntry { loc: Location, kind: String },
    #[error("{loc}: invalid entry name: {reason}")]
    BadName { loc: Location, reason: String },
    #[error("{what}")]
    InvalidArgument { what: String },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Truncated { .. } => ErrorKind::Truncated,
            Error::Checksum { .. } => ErrorKind::Checksum,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::FormatMismatch { .. } => ErrorKind::FormatMismatch,
            Error::UnknownFormat { .. } => ErrorKind::UnknownFormat,
            Error::UnsupportedEntry { .. } => ErrorKind::UnsupportedEntry,
            Error::BadName { .. } => ErrorKind::BadName,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
        }
    }

    /// The location the error names, if it names one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::Io { loc, .. }
            | Error::NotFound { loc }
            | Error::Truncated { loc, .. }
            | Error::Checksum { loc, .. }
            | Error::Corrupt { loc, .. }
            | Error::FormatMismatch { loc, .. }
            | Error::UnknownFormat { loc }
            | Error::UnsupportedEntry { loc, .. }
            | Error::BadName { loc, .. } => Some(loc),
            Error::InvalidArgument { .. } => None,
        }
    }

    /// True for damage to the shard's bytes (as opposed to an I/O failure or a caller mistake): the
    /// class that a `corrupted_shards` reaction may skip.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Truncated
                | ErrorKind::Checksum
                | ErrorKind::Corrupt
                | ErrorKind::FormatMismatch
                | ErrorKind::UnsupportedEntry
                | ErrorKind::BadName
        )
    }

    pub(crate) fn io(loc: Location, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound {
            return Error::NotFound { loc };
        }
        Error::Io { loc, source }
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
