//! Arbitrary bytes through the zip reader: seekable full read, index (central directory and local
//! headers), and the forward-only path. Errors are fine; a panic, a hang or an oversized allocation is a
//! bug. On success, every entry's reader must yield exactly the entry's size.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardio::{EntryMeta, Format};
use std::io::{self, Cursor, Read};

fn visit(meta: &EntryMeta, data: &mut dyn Read) -> io::Result<()> {
    let n = io::copy(data, &mut io::sink())?;
    assert_eq!(n, meta.size, "entry {} yielded {n} of {} bytes", meta.name, meta.size);
    Ok(())
}

fn check<T>(r: shardio::Result<T>) {
    if let Err(e) = r {
        let loc = e.location().expect("shard errors carry a location");
        assert_eq!(loc.shard, "f.zip");
        let _ = e.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    check(shardio::read_entries("f.zip", Format::Zip, Cursor::new(data), visit));
    check(shardio::index_reader("f.zip", Format::Zip, Cursor::new(data)));
    check(shardio::read_entries_stream("f.zip", Format::Zip, data, visit));
});
