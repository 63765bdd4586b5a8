//! `shardio`: shard formats, records and byte ranges for dsort.
//!
//! A *shard* is one archive (`.tar`, `.tar.gz`/`.tgz`, `.tar.zst`, `.tar.lz4`, `.zip`); an *entry* is a
//! file inside it; a *record* is the entries of one shard that share a name once the extension (from the
//! first dot of the basename) is cut off. This crate reads any shard into an index of records (knowing,
//! for uncompressed tars on local disk, where every entry's bytes sit so they can be copied without
//! passing through user space), writes shards of every format deterministically, and publishes objects
//! into buckets atomically.

pub mod bucket;
pub mod copy;
pub mod error;
pub mod format;
pub mod prefetch;
pub mod reader;
pub mod record;
#[cfg(feature = "s3")]
pub mod s3;
pub mod source;
pub mod tar_read;
pub mod writer;

pub use bucket::{Bucket, LocalBucket, ObjectRead, PendingObject, Publish, RequestCounts, StagedObject, StagedUpload};
pub use error::{Error, ErrorKind, Location, Result};
pub use format::Format;
pub use reader::{
    ShardIndex, index_file, index_file_observed, index_reader, open_shard, read_entries, read_entries_stream,
};
pub use record::{Duplicate, EntryMeta, Record, split_name};
pub use writer::{EntrySource, ShardWriter, Sink, TarFlavor, WriteOptions};
