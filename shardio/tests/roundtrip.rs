//! Round trips: records written in every format from every kind of source read back identical (names,
//! order, sizes, bytes, grouping into records); output is deterministic; uncompressed tar offsets point at
//! the exact bytes.

mod common;

use common::{payload, read_all, read_all_stream, tmpdir, variants};
use proptest::prelude::*;
use shardio::{EntrySource, ErrorKind, Format, ShardIndex, ShardWriter, TarFlavor, WriteOptions};
use std::fs::File;
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::FileExt;

/// A record as generated: its name and its entries' (extension, size).
type GenRecord = (String, Vec<(String, usize)>);

fn dir_segment() -> impl Strategy<Value = String> {
    // Folder names may hold dots (they must not start the extension) but are never "." or "..".
    "[a-zA-Z0-9_é中ß-][a-zA-Z0-9_é中ß.-]{0,10}"
}

fn long_segment() -> impl Strategy<Value = String> {
    // Pushes names past 100 bytes (ustar name field), some up to ~250 bytes.
    (60usize..170, any::<bool>()).prop_map(|(n, uni)| if uni { "ü".repeat(n / 2) } else { "L".repeat(n) })
}

fn record_name() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(dir_segment(), 0..3),
        proptest::option::weighted(0.35, long_segment()),
        "[a-zA-Z0-9_é中ß-]{1,12}",
    )
        .prop_map(|(mut dirs, long, base)| {
            if let Some(l) = long {
                dirs.push(l);
            }
            dirs.push(base);
            dirs.join("/")
        })
}

fn extension() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "\\.[a-z0-9]{1,4}", "\\.[a-z]{1,3}\\.[a-z0-9]{1,4}"]
}

fn entry_size() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..1100, 1 => Just(0usize), 1 => 0usize..=(1 << 20)]
}

fn records() -> impl Strategy<Value = (Vec<GenRecord>, Vec<u8>)> {
    let record = (record_name(), proptest::collection::vec((extension(), entry_size()), 1..4));
    (proptest::collection::vec(record, 1..7), proptest::collection::vec(any::<u8>(), 24)).prop_map(
        |(mut recs, order)| {
            // Record names unique, extensions unique within a record.
            let mut seen = std::collections::HashSet::new();
            recs.retain(|(name, _)| seen.insert(name.clone()));
            for (_, entries) in &mut recs {
                let mut exts = std::collections::HashSet::new();
                entries.retain(|(ext, _)| exts.insert(ext.clone()));
            }
            (recs, order)
        },
    )
}

/// The record name of an entry per design §1: cut at the first dot of the basename.
fn record_of(name: &str) -> &str {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    match name[base..].find('.') {
        Some(d) => &name[..base + d],
        None => name,
    }
}

/// Entries in archive order: records' entries interleaved by `order` (a stable sort on random keys), so
/// that records are often not adjacent.
fn layout(recs: &[GenRecord], order: &[u8], seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut flat = Vec::new();
    for (name, entries) in recs {
        for (ext, size) in entries {
            flat.push((format!("{name}{ext}"), *size));
        }
    }
    let mut keyed: Vec<_> = flat.into_iter().enumerate().map(|(i, e)| (order[i % order.len()] / 64, i, e)).collect();
    keyed.sort_by_key(|(k, i, _)| (*k, *i));
    keyed.into_iter().map(|(_, i, (name, size))| (name, payload(seed ^ (i as u64 * 7919), size))).collect()
}

/// Expected records: (record name, entry names) in order of first appearance.
fn expected_records(entries: &[(String, Vec<u8>)]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (name, _) in entries {
        let rec = record_of(name);
        match out.iter_mut().find(|(r, _)| r == rec) {
            Some((_, names)) => names.push(name.clone()),
            None => out.push((rec.to_string(), vec![name.clone()])),
        }
    }
    out
}

fn ustar_fits(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() <= 100 || (1..b.len()).any(|i| b[i] == b'/' && i <= 155 && b.len() - i - 1 <= 100)
}

/// A reader that hands out at most 4093 bytes per call, like a socket.
struct Chunky<'a>(&'a [u8]);
impl Read for Chunky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.0.len()).min(4093);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[derive(Clone, Copy, Debug)]
enum Src {
    Bytes,
    FileRange,
    Reader,
}

/// Write `entries` from one kind of source into `sink`; `blob` holds every payload back to back.
fn write_from<W: shardio::Sink>(
    src: Src,
    format: Format,
    opts: WriteOptions,
    entries: &[(String, Vec<u8>)],
    blob: &File,
    sink: W,
) -> shardio::Result<W> {
    let mut w = ShardWriter::new("out", format, sink, opts)?;
    let mut offset = 0u64;
    for (name, data) in entries {
        let size = data.len() as u64;
        match src {
            Src::Bytes => w.append(name, size, EntrySource::Bytes(data))?,
            Src::FileRange => w.append(name, size, EntrySource::FileRange { file: blob, offset })?,
            Src::Reader => w.append(name, size, EntrySource::Reader(&mut Chunky(data)))?,
        }
        offset += size;
    }
    assert_eq!(w.entries(), entries.len() as u64);
    assert_eq!(w.content_bytes(), offset);
    w.finish()
}

/// Everything a reader returns must match what was written.
fn check_index(label: &str, index: &ShardIndex, format: Format, entries: &[(String, Vec<u8>)]) {
    assert_eq!(index.format, format, "{label}");
    let got: Vec<(String, u64)> = index.entries().map(|e| (e.name.clone(), e.size)).collect();
    // Records list entries grouped, so compare per record, then the total count.
    let want = expected_records(entries);
    let got_recs: Vec<(String, Vec<String>)> =
        index.records.iter().map(|r| (r.name.clone(), r.entries.iter().map(|e| e.name.clone()).collect())).collect();
    assert_eq!(got_recs, want, "{label}: records");
    assert_eq!(got.len(), entries.len(), "{label}: entry count");
    for (name, size) in &got {
        let data = &entries.iter().find(|(n, _)| n == name).expect("written").1;
        assert_eq!(*size, data.len() as u64, "{label}: size of {name}");
    }
    assert!(index.duplicates.is_empty(), "{label}: {:?}", index.duplicates);
    assert_eq!(index.content_bytes(), entries.iter().map(|(_, d)| d.len() as u64).sum::<u64>(), "{label}");
    // Header offsets follow archive order.
    let mut offsets: Vec<u64> = index.entries().map(|e| e.header_offset).collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), entries.len(), "{label}: header offsets are distinct");
}

fn check_shard(label: &str, format: Format, opts: WriteOptions, shard: &[u8], entries: &[(String, Vec<u8>)]) {
    // Full read with bytes, seekable and streaming: every entry in archive order with its bytes.
    let (index, got) = read_all(label, format, Cursor::new(shard)).unwrap_or_else(|e| panic!("{label}: {e}"));
    let got_pairs: Vec<(String, Vec<u8>)> = got.iter().map(|(m, b)| (m.name.clone(), b.clone())).collect();
    assert!(got_pairs == entries, "{label}: read_entries returned different names, order or bytes");
    check_index(label, &index, format, entries);
    let (sindex, sgot) =
        read_all_stream(label, format, Chunky(shard)).unwrap_or_else(|e| panic!("{label} (stream): {e}"));
    assert!(sgot.into_iter().map(|(m, b)| (m.name, b)).eq(entries.iter().cloned()), "{label}: stream read differs");
    check_index(label, &sindex, format, entries);

    // Index only: from a reader and from a named file.
    let rindex = shardio::index_reader(label, format, Cursor::new(shard)).unwrap_or_else(|e| panic!("{label}: {e}"));
    check_index(label, &rindex, format, entries);
    let dir = tmpdir();
    let path = dir.path().join(format!("shard{}", format.extension()));
    std::fs::write(&path, shard).expect("write shard");
    let findex = shardio::index_file(&path).unwrap_or_else(|e| panic!("{label}: {e}"));
    check_index(label, &findex, format, entries);
    assert_eq!(findex.shard, path.display().to_string());
    assert_eq!(
        findex.entries().collect::<Vec<_>>(),
        index.entries().collect::<Vec<_>>(),
        "{label}: index_file and read_entries agree on every entry"
    );

    // Where bytes sit verbatim, data_offset points at them: read them with pread, and copy them out.
    let verbatim = format == Format::Tar || (format == Format::Zip && !opts.zip_deflate);
    let file = File::open(&path).expect("open shard");
    for meta in findex.entries() {
        let data = &entries.iter().find(|(n, _)| *n == meta.name).expect("written").1;
        let Some(off) = meta.data_offset else {
            assert!(!verbatim, "{label}: {} has no data offset", meta.name);
            continue;
        };
        assert!(verbatim, "{label}: {} has a data offset in a format that encodes its bytes", meta.name);
        assert!(off > meta.header_offset, "{label}: data after header");
        let mut buf = vec![0u8; data.len()];
        file.read_exact_at(&mut buf, off).expect("pread entry bytes");
        assert!(buf == *data, "{label}: bytes at data_offset {off} of {} differ", meta.name);
        let mut out = tempfile::tempfile().expect("temp file");
        out.write_all(b"head").expect("write");
        shardio::copy::copy_range(&file, off, meta.size, &mut out).expect("copy_range");
        std::io::Seek::rewind(&mut out).expect("rewind");
        let mut all = Vec::new();
        out.read_to_end(&mut all).expect("read back");
        assert!(all.starts_with(b"head") && all[4..] == data[..], "{label}: copy_range of {} differs", meta.name);
    }
}

fn roundtrip_case(recs: &[GenRecord], order: &[u8], seed: u64) {
    let entries = layout(recs, order, seed);
    let dir = tmpdir();
    let blob_path = dir.path().join("payloads.bin");
    let mut blob = File::create(&blob_path).expect("create blob");
    for (_, data) in &entries {
        blob.write_all(data).expect("write blob");
    }
    drop(blob);
    let blob = File::open(&blob_path).expect("open blob");

    for (label, format, opts) in variants() {
        if opts.tar_flavor == TarFlavor::Ustar
            && format == Format::Tar
            && let Some((bad, _)) = entries.iter().find(|(n, _)| !ustar_fits(n))
        {
            // A name that no ustar header can hold is refused, naming the entry, not silently cut.
            let err = write_from(Src::Bytes, format, opts, &entries, &blob, Cursor::new(Vec::new()))
                .err()
                .unwrap_or_else(|| panic!("ustar accepted a name of {} bytes: {bad}", bad.len()));
            assert_eq!(err.kind(), ErrorKind::BadName, "{err}");
            assert_eq!(err.location().and_then(|l| l.entry.as_deref()), Some(bad.as_str()), "{err}");
            continue;
        }
        let first = write_from(Src::Bytes, format, opts, &entries, &blob, Cursor::new(Vec::new()))
            .unwrap_or_else(|e| panic!("{label}: {e}"))
            .into_inner();
        // Determinism: again, from every source, and into a real file (the zero-copy path for tar).
        for src in [Src::Bytes, Src::FileRange, Src::Reader] {
            let again = write_from(src, format, opts, &entries, &blob, Cursor::new(Vec::new()))
                .unwrap_or_else(|e| panic!("{label} {src:?}: {e}"))
                .into_inner();
            assert!(again == first, "{label}: writing from {src:?} gave different bytes");
            let path = dir.path().join(format!("out-{label}-{src:?}"));
            let out = File::create(&path).expect("create out");
            write_from(src, format, opts, &entries, &blob, out).unwrap_or_else(|e| panic!("{label} {src:?}: {e}"));
            let on_disk = std::fs::read(&path).expect("read out");
            assert!(on_disk == first, "{label}: writing from {src:?} into a file gave different bytes");
        }
        check_shard(label, format, opts, &first, &entries);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn records_round_trip_in_every_format((recs, order) in records(), seed in any::<u64>()) {
        roundtrip_case(&recs, &order, seed);
    }
}

#[test]
fn fixed_case_with_long_unicode_and_multi_dot_names() {
    let long_dir = "d".repeat(120);
    let recs: Vec<GenRecord> = vec![
        ("a.b/c/s001".into(), vec![(".seg.png".into(), 70_000), (".cls".into(), 3), (String::new(), 0)]),
        (format!("{long_dir}/naïve-中文-{}", "x".repeat(60)), vec![(".jpg".into(), 1 << 20), (".json".into(), 17)]),
        ("ü".repeat(40), vec![(".txt".into(), 513)]),
        (format!("{}/{}", "p".repeat(150), "q".repeat(95)), vec![(".x".into(), 512)]),
    ];
    roundtrip_case(&recs, &[0, 200, 100, 50, 250, 10, 130], 42);
}

#[test]
fn empty_shards_have_no_records() {
    for (label, format, opts) in variants() {
        let shard = common::write_shard(format, opts, &[]);
        let (index, got) = read_all(label, format, Cursor::new(&shard)).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(index.records.is_empty() && got.is_empty(), "{label}");
        let index =
            shardio::index_reader(label, format, Cursor::new(&shard)).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(index.records.is_empty(), "{label}");
    }
}

#[test]
fn repeated_names_are_reported_as_duplicates_not_records() {
    let entries: Vec<(String, Vec<u8>)> = vec![
        ("s1.jpg".into(), b"first".to_vec()),
        ("s2.jpg".into(), b"other".to_vec()),
        ("s1.jpg".into(), b"second".to_vec()),
    ];
    for (label, format, opts) in variants() {
        if format == Format::Zip {
            // A zip holds each name once: the writer refuses the repeat, naming it.
            let mut w = ShardWriter::new("out.zip", format, Cursor::new(Vec::new()), opts).expect("writer");
            w.append("s1.jpg", 5, EntrySource::Bytes(b"first")).expect("first");
            let err = w.append("s1.jpg", 6, EntrySource::Bytes(b"second")).expect_err("repeat");
            assert_eq!(err.kind(), ErrorKind::BadName, "{err}");
            assert_eq!(err.location().and_then(|l| l.entry.as_deref()), Some("s1.jpg"));
            continue;
        }
        let shard = common::write_shard(format, opts, &entries);
        let index = match shardio::index_reader(label, format, Cursor::new(&shard)) {
            Ok(index) => index,
            Err(e) => panic!("{label}: {e}"),
        };
        let names: Vec<_> = index.entries().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["s1.jpg", "s2.jpg"], "{label}");
        assert_eq!(index.duplicates.len(), 1, "{label}");
        assert_eq!(index.duplicates[0].name, "s1.jpg", "{label}");
        assert!(index.duplicates[0].offset > index.duplicates[0].first_offset, "{label}");
    }
}

#[test]
fn writer_refuses_bad_names_and_wrong_sizes() {
    for (label, format, opts) in variants() {
        for bad in ["", "../x.jpg", "/abs.jpg", "a/../../x", "dir/"] {
            let mut w = ShardWriter::new("out.shard", format, Cursor::new(Vec::new()), opts).expect("writer");
            let err = w.append(bad, 1, EntrySource::Bytes(b"x")).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::BadName, "{label} {bad:?}: {err}");
            assert!(err.to_string().contains("out.shard"), "{err}");
        }
        let mut w = ShardWriter::new("out.shard", format, Cursor::new(Vec::new()), opts).expect("writer");
        let err = w.append("a.bin", 5, EntrySource::Bytes(b"abc")).expect_err("short bytes");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{label}: {err}");
        let err = w.append("b.bin", 5, EntrySource::Reader(&mut &b"abc"[..])).expect_err("short reader");
        assert!(err.to_string().contains("b.bin"), "{label}: {err}");
    }
}

/// `index_file` walks large tars with a read-ahead thread: it must agree with the plain seekable walk and
/// with a full read, entry for entry, and its offsets must point at the bytes.
#[test]
fn large_tar_index_by_path_matches_the_seekable_walk() {
    let entries = common::large_entries();
    let dir = tmpdir();
    let path = common::write_shard_file(dir.path(), "large", Format::Tar, WriteOptions::default(), &entries);
    assert!(std::fs::metadata(&path).expect("stat").len() > 8 << 20, "big enough for the read-ahead path");
    let by_path = shardio::index_file(&path).expect("index_file");
    let by_reader =
        shardio::index_reader("large", Format::Tar, File::open(&path).expect("open")).expect("index_reader");
    assert_eq!(by_path.entries().collect::<Vec<_>>(), by_reader.entries().collect::<Vec<_>>());
    check_index("large", &by_path, Format::Tar, &entries);
    let file = File::open(&path).expect("open");
    for meta in by_path.entries() {
        let data = &entries.iter().find(|(n, _)| *n == meta.name).expect("written").1;
        let mut buf = vec![0u8; data.len()];
        file.read_exact_at(&mut buf, meta.data_offset.expect("offset")).expect("pread");
        assert!(buf == *data, "bytes of {}", meta.name);
    }
}
