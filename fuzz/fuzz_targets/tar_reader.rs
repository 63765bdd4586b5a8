//! Arbitrary bytes through every tar reader: as a plain tar (seekable walk, index, forward-only stream),
//! as the raw bytes of a .tar.gz/.tar.zst/.tar.lz4, and wrapped in each codec so that the tar walker behind
//! a decoder sees them too. Errors are fine; a panic, a hang or an oversized allocation is a bug. On
//! success, every entry's reader must yield exactly the entry's size.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardio::{EntryMeta, Format};
use std::io::{self, Cursor, Read, Write};

fn visit(meta: &EntryMeta, data: &mut dyn Read) -> io::Result<()> {
    let n = io::copy(data, &mut io::sink())?;
    assert_eq!(n, meta.size, "entry {} yielded {n} of {} bytes", meta.name, meta.size);
    Ok(())
}

fn check<T>(shard: &str, r: shardio::Result<T>) {
    if let Err(e) = r {
        // Every error names the shard it happened in.
        let loc = e.location().expect("shard errors carry a location");
        assert_eq!(loc.shard, shard);
        let _ = e.to_string();
    }
}

fn compressed(format: Format, data: &[u8]) -> Vec<u8> {
    match format {
        Format::TarGz => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Format::TarZst => zstd::encode_all(data, 1).unwrap(),
        Format::TarLz4 => {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        _ => data.to_vec(),
    }
}

fuzz_target!(|data: &[u8]| {
    check("f.tar", shardio::read_entries("f.tar", Format::Tar, Cursor::new(data), visit));
    check("f.tar", shardio::index_reader("f.tar", Format::Tar, Cursor::new(data)));
    check("f.tar", shardio::read_entries_stream("f.tar", Format::Tar, data, visit));
    for format in [Format::TarGz, Format::TarZst, Format::TarLz4] {
        check("raw", shardio::read_entries_stream("raw", format, data, visit));
        let wrapped = compressed(format, data);
        check("wrapped", shardio::read_entries("wrapped", format, Cursor::new(&wrapped), visit));
    }
});
