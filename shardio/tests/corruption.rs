//! Damaged shards: every class of damage gives its own error kind, and the error names the shard, the
//! byte offset and (where there is one) the entry, so that one bad shard among a million can be found.
//! Random mutations of valid shards of every format never panic.

mod common;

use common::{assert_error, compress, payload, raw_member, read_all, read_all_stream, small_entries, tmpdir, variants};
use shardio::{EntrySource, ErrorKind, Format, ShardWriter, WriteOptions};
use std::fs;
use std::io::{self, Cursor, Read, Write};

/// (name, header offset, data offset, size) of an entry.
type Placed = (String, u64, u64, u64);

/// A plain tar of three entries with known offsets.
fn plain_tar() -> (Vec<u8>, Vec<Placed>) {
    let entries: Vec<(String, Vec<u8>)> = vec![
        ("s1.cls".into(), b"1\n".to_vec()),
        (format!("{}/s1.bin", "d".repeat(120)), payload(7, 3000)),
        ("s2.cls".into(), b"2\n".to_vec()),
    ];
    let tar = common::write_shard(Format::Tar, WriteOptions::default(), &entries);
    let index = shardio::index_reader("t", Format::Tar, Cursor::new(&tar)).expect("valid");
    let offs =
        index.entries().map(|e| (e.name.clone(), e.header_offset, e.data_offset.expect("offset"), e.size)).collect();
    (tar, offs)
}

/// Read `data` named `shard` with every reader: index by path, full read by path, and a forward-only
/// stream. Each must fail; the errors are returned for inspection.
fn all_errors(dir: &std::path::Path, shard_file: &str, format: Format, data: &[u8]) -> Vec<shardio::Error> {
    let path = dir.join(shard_file);
    fs::write(&path, data).expect("write shard");
    let shard = path.display().to_string();
    let mut errs = Vec::new();
    errs.push(shardio::index_file(&path).expect_err("index_file must fail"));
    let (file, f) = shardio::open_shard(&path).expect("magic is fine");
    assert_eq!(f, format);
    errs.push(read_all(&shard, format, file).map(|_| ()).expect_err("read_entries must fail"));
    errs.push(read_all_stream(&shard, format, data).map(|_| ()).expect_err("read_entries_stream must fail"));
    errs
}

#[test]
fn truncated_plain_tar_names_the_header_and_entry() {
    let (tar, offs) = plain_tar();
    let dir = tmpdir();
    let shard = dir.path().join("cut.tar").display().to_string();
    // Cut inside the third header block.
    let (_, third_at, _, _) = &offs[2];
    for err in all_errors(dir.path(), "cut.tar", Format::Tar, &tar[..*third_at as usize + 100]) {
        assert_error(&err, ErrorKind::Truncated, &shard, Some(*third_at), None);
        assert!(err.to_string().contains("header"), "{err}");
    }
    // Cut inside the second entry's data: the entry is named, at its first header (the PAX header).
    let (second, second_at, second_data, _) = &offs[1];
    for err in all_errors(dir.path(), "cut.tar", Format::Tar, &tar[..*second_data as usize + 50]) {
        assert_error(&err, ErrorKind::Truncated, &shard, Some(*second_at), Some(second));
    }
    // Cut inside the PAX header's records (the long name).
    for err in all_errors(dir.path(), "cut.tar", Format::Tar, &tar[..*second_at as usize + 512 + 20]) {
        assert_error(&err, ErrorKind::Truncated, &shard, Some(*second_at), None);
    }
    // An empty file is not an empty archive.
    for err in all_errors(dir.path(), "cut.tar", Format::Tar, &[]) {
        assert_error(&err, ErrorKind::Truncated, &shard, Some(0), None);
    }
}

#[test]
fn truncated_tar_inside_a_valid_codec_stream_names_the_header_and_entry() {
    let (tar, offs) = plain_tar();
    let dir = tmpdir();
    for format in [Format::TarGz, Format::TarZst, Format::TarLz4] {
        let file = format!("cut{}", format.extension());
        let shard = dir.path().join(&file).display().to_string();
        let (_, third_at, _, _) = &offs[2];
        let data = compress(format, &tar[..*third_at as usize + 100]);
        for err in all_errors(dir.path(), &file, format, &data) {
            assert_error(&err, ErrorKind::Truncated, &shard, Some(*third_at), None);
        }
        let (second, second_at, second_data, _) = &offs[1];
        let data = compress(format, &tar[..*second_data as usize + 50]);
        for err in all_errors(dir.path(), &file, format, &data) {
            assert_error(&err, ErrorKind::Truncated, &shard, Some(*second_at), Some(second));
        }
    }
}

/// Every strict prefix of a compressed shard is an error of kind Truncated: codecs end with a trailer, so
/// a cut is always detectable, even where the decoded bytes happen to end between two tar entries.
#[test]
fn every_cut_of_a_compressed_shard_is_reported_as_truncated() {
    let entries = small_entries(6, 700);
    for format in [Format::TarGz, Format::TarZst, Format::TarLz4] {
        let full = common::write_shard(format, WriteOptions::default(), &entries);
        let shard = format!("s{}", format.extension());
        for cut in 0..full.len() {
            let data = &full[..cut];
            let errs = [
                read_all(&shard, format, Cursor::new(data)).map(|_| ()).expect_err("seekable"),
                read_all_stream(&shard, format, data).map(|_| ()).expect_err("stream"),
                shardio::index_reader(&shard, format, Cursor::new(data)).map(|_| ()).expect_err("index"),
            ];
            for err in errs {
                assert_eq!(err.kind(), ErrorKind::Truncated, "{format} cut at {cut} of {}: {err}", full.len());
                let loc = err.location().expect("location");
                assert_eq!(loc.shard, shard);
                assert!(loc.offset.is_some(), "{err}");
            }
        }
        // And the codec names the compressed byte where it stopped, for a cut in the middle.
        let err = read_all_stream(&shard, format, &full[..full.len() / 2]).map(|_| ()).expect_err("cut");
        assert!(err.to_string().contains("compressed byte"), "{format}: {err}");
    }
}

#[test]
fn bad_header_checksum_names_that_header() {
    let (tar, offs) = plain_tar();
    let dir = tmpdir();
    let (_, third_at, _, _) = &offs[2];
    let mut bad = tar.clone();
    bad[*third_at as usize + 3] ^= 0x20; // a letter of the name changes case
    let shard = dir.path().join("sum.tar").display().to_string();
    for err in all_errors(dir.path(), "sum.tar", Format::Tar, &bad) {
        assert_error(&err, ErrorKind::Checksum, &shard, Some(*third_at), None);
        assert!(err.to_string().contains("checksum"), "{err}");
    }
    for format in [Format::TarGz, Format::TarZst, Format::TarLz4] {
        let file = format!("sum{}", format.extension());
        let shard = dir.path().join(&file).display().to_string();
        for err in all_errors(dir.path(), &file, format, &compress(format, &bad)) {
            assert_error(&err, ErrorKind::Checksum, &shard, Some(*third_at), None);
        }
    }
    // A PAX header's own checksum.
    let (_, second_at, _, _) = &offs[1];
    let mut bad = tar.clone();
    bad[*second_at as usize + 10] ^= 1;
    for err in all_errors(dir.path(), "sum.tar", Format::Tar, &bad) {
        assert_error(&err, ErrorKind::Checksum, &shard, Some(*second_at), None);
    }
}

/// Flip bytes in the middle of the compressed stream: the codec's damage is reported as such, naming the
/// codec and the compressed byte, whether the decoder trips at once or only the final checksum notices.
#[test]
fn damaged_codec_streams_are_corrupt_not_truncated() {
    let dir = tmpdir();
    for (compressible, seed) in [(false, 1u64), (true, 3u64)] {
        assert_eq!(seed.is_multiple_of(3), compressible);
        let entries: Vec<(String, Vec<u8>)> =
            vec![("big.bin".into(), payload(seed, 200_000)), ("small.cls".into(), b"9\n".to_vec())];
        for (format, codec) in [(Format::TarGz, "gzip"), (Format::TarZst, "zstd"), (Format::TarLz4, "lz4")] {
            let mut data = common::write_shard(format, WriteOptions::default(), &entries);
            let mid = data.len() / 2;
            for b in &mut data[mid..mid + 4] {
                *b ^= 0x5a;
            }
            let file = format!("dmg{}", format.extension());
            let shard = dir.path().join(&file).display().to_string();
            for err in all_errors(dir.path(), &file, format, &data) {
                if compressible {
                    // Garbage may reach a tar header before the codec notices: any corruption kind.
                    assert!(err.is_corruption(), "{format}: {err}");
                    continue;
                }
                assert_eq!(err.kind(), ErrorKind::Corrupt, "{format}: {err}");
                let msg = err.to_string();
                assert!(msg.contains(codec) && msg.contains("compressed byte"), "{msg}");
                assert_error(&err, ErrorKind::Corrupt, &shard, None, None);
            }
        }
    }
}

/// The bytes of a zip of two stored members and the offsets of its parts.
fn small_zip(opts: WriteOptions) -> Vec<u8> {
    common::write_shard(Format::Zip, opts, &[("a.cls".into(), b"1\n".to_vec()), ("a.bin".into(), payload(1, 5000))])
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

#[test]
fn damaged_zip_central_directory_names_its_offset() {
    let zip = small_zip(WriteOptions::default());
    let cd = find(&zip, b"PK\x01\x02");
    let dir = tmpdir();
    let shard = dir.path().join("cd.zip").display().to_string();
    // Damage the first central directory header's signature, then its name length.
    for (at, label) in [(cd, "signature"), (cd + 28, "name length")] {
        let mut bad = zip.clone();
        bad[at] ^= 0xff;
        bad[at + 1] ^= 0x10;
        for err in all_errors(dir.path(), "cd.zip", Format::Zip, &bad) {
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{label}: {err}");
            assert!(err.to_string().contains("zip"), "{err}");
            assert_error(&err, ErrorKind::Corrupt, &shard, Some(cd as u64), None);
        }
    }
    // No end-of-central-directory record at all.
    let eocd = find(&zip, b"PK\x05\x06");
    let mut bad = zip.clone();
    bad[eocd..eocd + 4].copy_from_slice(b"XXXX");
    for err in all_errors(dir.path(), "cd.zip", Format::Zip, &bad) {
        // Nothing to point at but the end of the shard, where the record should be.
        assert_error(&err, ErrorKind::Corrupt, &shard, Some(bad.len() as u64), None);
    }
}

#[test]
fn zip_member_with_bad_crc_names_the_member() {
    let dir = tmpdir();
    for deflate in [false, true] {
        let zip = small_zip(WriteOptions { zip_deflate: deflate, ..WriteOptions::default() });
        let index = shardio::index_reader("z", Format::Zip, Cursor::new(&zip)).expect("valid");
        let member = index.entries().find(|e| e.name == "a.bin").expect("member").clone();
        let mut bad = zip.clone();
        // A byte in the middle of the member's stored/compressed data.
        let second_local = find(&zip[1..], b"PK\x03\x04") + 1;
        assert_eq!(second_local as u64, member.header_offset);
        let at = second_local + 30 + "a.bin".len() + 2000;
        bad[at] ^= 0x01;
        let path = dir.path().join("crc.zip");
        fs::write(&path, &bad).expect("write");
        let shard = path.display().to_string();
        let (file, _) = shardio::open_shard(&path).expect("open");
        let err = read_all(&shard, Format::Zip, file).map(|_| ()).expect_err("bad crc");
        assert_error(&err, ErrorKind::Corrupt, &shard, Some(member.header_offset), Some("a.bin"));
        let err = read_all_stream(&shard, Format::Zip, &bad[..]).map(|_| ()).expect_err("bad crc");
        assert_error(&err, ErrorKind::Corrupt, &shard, Some(member.header_offset), Some("a.bin"));
    }
}

/// A member whose directory entry declares another size than its data holds (the CRC still matching):
/// found by fuzzing. The declared size is what records and output headers are built from, so the
/// mismatch is damage, named with the member.
#[test]
fn zip_member_shorter_or_longer_than_declared_is_corrupt() {
    let dir = tmpdir();
    for deflate in [false, true] {
        let zip = small_zip(WriteOptions { zip_deflate: deflate, ..WriteOptions::default() });
        let member = shardio::index_reader("z", Format::Zip, Cursor::new(&zip))
            .expect("valid")
            .entries()
            .find(|e| e.name == "a.bin")
            .expect("member")
            .clone();
        let cd = find(&zip, b"PK\x01\x02");
        let cd_bin = cd + 1 + find(&zip[cd + 1..], b"PK\x01\x02");
        for declared in [member.size + 1000, member.size - 1000] {
            let mut bad = zip.clone();
            for at in [member.header_offset as usize + 22, cd_bin + 24] {
                bad[at..at + 4].copy_from_slice(&(declared as u32).to_le_bytes());
            }
            let path = dir.path().join("size.zip");
            fs::write(&path, &bad).expect("write");
            let shard = path.display().to_string();
            let (file, _) = shardio::open_shard(&path).expect("open");
            let err = read_all(&shard, Format::Zip, file).map(|_| ()).expect_err("size mismatch");
            assert_error(&err, ErrorKind::Corrupt, &shard, Some(member.header_offset), Some("a.bin"));
            assert!(err.to_string().contains("declare"), "deflate {deflate}, declared {declared}: {err}");
            if !deflate {
                // A stored member is addressed by offset and size: even the index refuses the mismatch.
                let err = shardio::index_file(&path).expect_err("size mismatch");
                assert_error(&err, ErrorKind::Corrupt, &shard, Some(member.header_offset), Some("a.bin"));
            }
        }
    }
}

#[test]
fn traversal_and_empty_names_are_refused_in_tar() {
    let dir = tmpdir();
    let shard = dir.path().join("names.tar").display().to_string();
    for bad in ["../x.jpg", "/abs.jpg", "a/../../x.jpg", ""] {
        let mut tar = Vec::new();
        raw_member(&mut tar, "ok.cls", b'0', b"1", false);
        let at = tar.len() as u64;
        raw_member(&mut tar, bad, b'0', b"data", false);
        tar.extend_from_slice(&[0u8; 1024]);
        for err in all_errors(dir.path(), "names.tar", Format::Tar, &tar) {
            assert_error(&err, ErrorKind::BadName, &shard, Some(at), Some(bad));
        }
    }
    // The same through a PAX path record and a GNU long name.
    for flavor in [shardio::TarFlavor::Pax, shardio::TarFlavor::Gnu] {
        let long_ok = format!("{}/x.jpg", "d".repeat(120));
        let good = common::write_shard(
            Format::Tar,
            WriteOptions { tar_flavor: flavor, ..WriteOptions::default() },
            &[(long_ok.clone(), b"data".to_vec())],
        );
        // Turn "dddd..." into "../d..." inside the extension data (not covered by any header checksum).
        let mut bad = good.clone();
        let pos = find(&bad[512..], long_ok.as_bytes()) + 512;
        bad[pos..pos + 3].copy_from_slice(b"../");
        let want = format!("../{}", &long_ok[3..]);
        for err in all_errors(dir.path(), "names.tar", Format::Tar, &bad) {
            assert_error(&err, ErrorKind::BadName, &shard, Some(0), Some(&want));
        }
    }
}

#[test]
fn traversal_and_empty_names_are_refused_in_zip() {
    let dir = tmpdir();
    let shard = dir.path().join("names.zip").display().to_string();
    for bad in ["../x.jpg", "/abs.jpg", "a/../../x.jpg", ""] {
        let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("ok.cls", opts).expect("start");
        z.write_all(b"1").expect("write");
        let at = z.get_ref().expect("writer open").get_ref().len() as u64;
        z.start_file(bad, opts).expect("start");
        z.write_all(b"data").expect("write");
        let data = z.finish().expect("finish").into_inner();
        for err in all_errors(dir.path(), "names.zip", Format::Zip, &data) {
            assert_error(&err, ErrorKind::BadName, &shard, Some(at), Some(bad));
        }
    }
}

#[test]
fn unsupported_entry_types_name_the_entry() {
    let dir = tmpdir();
    let shard = dir.path().join("types.tar").display().to_string();
    for (kind, what) in [
        (b'2', "symbolic link"),
        (b'1', "hard link"),
        (b'3', "character device"),
        (b'4', "block device"),
        (b'6', "FIFO"),
    ] {
        let mut tar = Vec::new();
        raw_member(&mut tar, "ok.cls", b'0', b"1", false);
        let at = tar.len() as u64;
        raw_member(&mut tar, "odd.jpg", kind, b"", false);
        tar.extend_from_slice(&[0u8; 1024]);
        for err in all_errors(dir.path(), "types.tar", Format::Tar, &tar) {
            assert_error(&err, ErrorKind::UnsupportedEntry, &shard, Some(at), Some("odd.jpg"));
            assert!(err.to_string().contains(what), "{err}");
        }
    }
    // Made by GNU tar: a symlink and a hard link.
    let src = dir.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    fs::write(src.join("a.txt"), b"a").expect("write");
    std::os::unix::fs::symlink("a.txt", src.join("b.link")).expect("symlink");
    fs::hard_link(src.join("a.txt"), src.join("c.txt")).expect("hard link");
    let out = dir.path().join("gnu.tar");
    common::run(
        "tar",
        &["-cf", &out.display().to_string(), "-C", &src.display().to_string(), "a.txt", "b.link", "c.txt"],
        None,
    );
    let err = shardio::index_file(&out).expect_err("symlink");
    assert_error(&err, ErrorKind::UnsupportedEntry, &out.display().to_string(), Some(1024), Some("b.link"));
    // A symlink in a zip.
    let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    z.start_file("a.txt", opts).expect("start");
    z.write_all(b"a").expect("write");
    z.add_symlink("b.link", "a.txt", opts).expect("symlink");
    let data = z.finish().expect("finish").into_inner();
    let at = (find(&data[1..], b"PK\x03\x04") + 1) as u64;
    let zshard = dir.path().join("types.zip").display().to_string();
    for err in all_errors(dir.path(), "types.zip", Format::Zip, &data) {
        assert_error(&err, ErrorKind::UnsupportedEntry, &zshard, Some(at), Some("b.link"));
    }
}

#[test]
fn extension_and_magic_mismatch_names_both_formats() {
    let dir = tmpdir();
    let entries = small_entries(2, 10);
    let cases: &[(Format, &str, &str, &str)] = &[
        (Format::TarGz, "x.tar", "tar", "gzip"),
        (Format::Tar, "x.zip", "zip", "tar"),
        (Format::TarZst, "x.tar.gz", "tar.gz", "zstd"),
        (Format::Zip, "x.tar", "tar", "zip"),
        (Format::TarLz4, "x.tar.zst", "tar.zst", "lz4"),
        (Format::Tar, "x.tar.lz4", "tar.lz4", "tar"),
    ];
    for &(real, name, expected, found) in cases {
        let path = dir.path().join(name);
        fs::write(&path, common::write_shard(real, WriteOptions::default(), &entries)).expect("write");
        let shard = path.display().to_string();
        for err in [
            shardio::index_file(&path).expect_err("mismatch"),
            shardio::open_shard(&path).map(|_| ()).expect_err("mismatch"),
        ] {
            assert_error(&err, ErrorKind::FormatMismatch, &shard, Some(0), None);
            let msg = err.to_string();
            assert!(msg.contains(&format!("says {expected} ")) && msg.contains(found), "{msg}");
        }
    }
    let path = dir.path().join("x.rar");
    fs::write(&path, b"Rar!").expect("write");
    let err = shardio::index_file(&path).expect_err("unknown");
    assert_eq!(err.kind(), ErrorKind::UnknownFormat, "{err}");
    assert!(err.to_string().contains("x.rar"), "{err}");
    let err = shardio::index_file(&dir.path().join("missing.tar")).expect_err("missing");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// A reader whose storage fails after `ok` bytes.
struct FailingStorage<'a> {
    data: &'a [u8],
    ok: usize,
}
impl Read for FailingStorage<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ok == 0 {
            return Err(io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.ok).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.ok -= n;
        Ok(n)
    }
}

/// A seekable reader whose storage fails for reads that start inside `bad`.
struct FailingSeekable {
    inner: Cursor<Vec<u8>>,
    bad: std::ops::Range<u64>,
}
impl Read for FailingSeekable {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let pos = self.inner.position();
        if self.bad.contains(&pos) {
            return Err(io::Error::other("disk on fire"));
        }
        let room = if pos < self.bad.start { (self.bad.start - pos) as usize } else { buf.len() };
        let n = buf.len().min(room);
        self.inner.read(&mut buf[..n])
    }
}
impl io::Seek for FailingSeekable {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(to)
    }
}

#[test]
fn storage_and_visitor_failures_are_io_not_corruption() {
    let entries = small_entries(20, 3000);
    for format in [Format::Tar, Format::TarGz, Format::TarZst, Format::TarLz4, Format::Zip] {
        let data = common::write_shard(format, WriteOptions::default(), &entries);
        let src = FailingStorage { data: &data, ok: data.len() / 2 };
        let err = read_all_stream("s", format, src).map(|_| ()).expect_err("storage fails");
        assert_eq!(err.kind(), ErrorKind::Io, "{format}: {err}");
        assert!(!err.is_corruption() && err.to_string().contains("disk on fire"), "{format}: {err}");
        // The same through the seekable readers (a zip's directory at the end stays readable, so the
        // failure hits a member's data).
        let mid = data.len() as u64 / 2;
        let src = FailingSeekable { inner: Cursor::new(data.clone()), bad: mid..mid + 4096 };
        let err = read_all("s", format, src).map(|_| ()).expect_err("storage fails");
        assert_eq!(err.kind(), ErrorKind::Io, "{format} seekable: {err}");
        assert!(err.to_string().contains("disk on fire"), "{format}: {err}");
        // The visitor's own failure is its own, naming the entry it was given.
        let err = shardio::read_entries("s", format, Cursor::new(&data), |meta, _| {
            if meta.name.ends_with("s0003.bin") { Err(io::Error::other("visitor gave up")) } else { Ok(()) }
        })
        .expect_err("visitor fails");
        assert_eq!(err.kind(), ErrorKind::Io, "{format}: {err}");
        assert_eq!(err.location().and_then(|l| l.entry.as_deref()), Some("dir/s0003.bin"), "{format}: {err}");
    }
}

/// Small deterministic generator for the mutation loop.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut d = base.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(5) {
            0 => {
                let i = rng.below(d.len());
                if let Some(b) = d.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(d.len());
                if let Some(b) = d.get_mut(i) {
                    *b = rng.next() as u8;
                }
            }
            2 => d.truncate(rng.below(d.len())),
            3 => {
                let i = rng.below(d.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(i..i, bytes);
            }
            _ => {
                // Overwrite a run with a "number": damages size fields in plausible ways.
                let i = rng.below(d.len());
                for (k, b) in b"77777777777".iter().enumerate().take(rng.below(12)) {
                    if let Some(x) = d.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
        }
    }
    d
}

#[test]
fn random_mutations_never_panic() {
    let entries: Vec<(String, Vec<u8>)> = vec![
        ("a/s1.cls".into(), b"1\n".to_vec()),
        (format!("{}/s1.seg.png", "d".repeat(110)), payload(2, 900)),
        ("a/s2.cls".into(), b"2\n".to_vec()),
        ("a/s2.seg.png".into(), payload(3, 600)),
    ];
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for (label, format, opts) in variants() {
        let base = common::write_shard(format, opts, &entries);
        let mut ok = 0;
        for _ in 0..2000 {
            let data = mutate(&mut rng, &base);
            let results = [
                read_all(label, format, Cursor::new(&data)).map(|_| ()),
                read_all_stream(label, format, &data[..]).map(|_| ()),
                shardio::index_reader(label, format, Cursor::new(&data)).map(|_| ()),
            ];
            for r in results {
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        // Every error names the shard.
                        let loc = e.location().unwrap_or_else(|| panic!("{label}: no location: {e}"));
                        assert_eq!(loc.shard, label, "{e}");
                    }
                }
            }
        }
        eprintln!("{label}: {ok} of 6000 mutated reads succeeded");
    }
}

#[test]
fn writer_errors_name_the_shard_and_entry() {
    let mut w =
        ShardWriter::new("out.tar", Format::Tar, Cursor::new(Vec::new()), WriteOptions::default()).expect("writer");
    let err = w.append("x.bin", 10, EntrySource::Reader(&mut &b"short"[..])).expect_err("short source");
    let loc = err.location().expect("location");
    assert_eq!((loc.shard.as_str(), loc.entry.as_deref()), ("out.tar", Some("x.bin")), "{err}");
    let long = format!("{}.jpg", "n".repeat(120));
    let mut w = ShardWriter::new(
        "out.tar",
        Format::Tar,
        Cursor::new(Vec::new()),
        WriteOptions { tar_flavor: shardio::TarFlavor::Ustar, ..WriteOptions::default() },
    )
    .expect("writer");
    let err = w.append(&long, 1, EntrySource::Bytes(b"x")).expect_err("too long for ustar");
    assert_eq!(err.kind(), ErrorKind::BadName, "{err}");
    assert!(err.to_string().contains(&long), "{err}");
}

/// The same damage classes in a tar large enough for `index_file`'s read-ahead path, past its first 8 MiB.
#[test]
fn damage_late_in_a_large_tar_is_reported_the_same_by_every_reader() {
    let tar = common::write_shard(Format::Tar, WriteOptions::default(), &common::large_entries());
    let index = shardio::index_reader("t", Format::Tar, Cursor::new(&tar)).expect("valid");
    let late: Vec<_> = index.entries().filter(|e| e.header_offset > 9 << 20).cloned().collect();
    let big = late.iter().find(|e| e.size > 1 << 20).expect("a large late entry");
    let small = late.iter().rev().nth(3).expect("a late small entry");
    let dir = tmpdir();
    let shard = dir.path().join("late.tar").display().to_string();
    // Cut inside the large entry's data: the error names it without its bytes being read.
    let cut = &tar[..(big.data_offset.expect("offset") + big.size / 2) as usize];
    assert!(cut.len() > 8 << 20);
    for err in all_errors(dir.path(), "late.tar", Format::Tar, cut) {
        assert_error(&err, ErrorKind::Truncated, &shard, Some(big.header_offset), Some(&big.name));
    }
    // Cut inside a late header.
    for err in all_errors(dir.path(), "late.tar", Format::Tar, &tar[..small.header_offset as usize + 300]) {
        assert_error(&err, ErrorKind::Truncated, &shard, Some(small.header_offset), None);
    }
    // A late header with a bad checksum.
    let mut bad = tar.clone();
    bad[small.header_offset as usize + 5] ^= 0x20;
    for err in all_errors(dir.path(), "late.tar", Format::Tar, &bad) {
        assert_error(&err, ErrorKind::Checksum, &shard, Some(small.header_offset), None);
    }
}

/// A ustar header for a regular file `name` whose size field is `size` in base-256 (GNU's binary form for
/// sizes past 8 GiB), with a valid checksum, followed by `data`.
fn tar_with_base256_size(name: &str, size: u64, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("short name");
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    let field = &mut h.as_mut_bytes()[124..136];
    field.fill(0);
    field[0] = 0x80;
    field[4..].copy_from_slice(&size.to_be_bytes());
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512) + 1024, 0);
    out
}

/// A tar whose PAX extended header says `size=<size>` for the regular entry `name` that follows.
fn tar_with_pax_size(name: &str, size: u64, data: &[u8]) -> Vec<u8> {
    let record = |k: &str, v: &str| {
        let body = format!(" {k}={v}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    };
    let pax = record("size", &size.to_string());
    let mut x = tar::Header::new_ustar();
    x.set_path("PaxHeader").expect("short name");
    x.set_entry_type(tar::EntryType::XHeader);
    x.set_size(pax.len() as u64);
    x.set_cksum();
    let mut out = x.as_bytes().to_vec();
    out.extend_from_slice(pax.as_bytes());
    out.resize(out.len().next_multiple_of(512), 0);
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("short name");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512) + 1024, 0);
    out
}

proptest::proptest! {
    /// Sizes near `u64::MAX` (base-256 or PAX) are an error naming the shard, never a wrapped sum or a
    /// panic (overflow checks are on in test builds, so a wrap would panic here), for files and
    /// directories, through every reader and behind every codec.
    #[test]
    fn header_sizes_near_u64_max_are_errors(back in 0u64..4096, pax in proptest::bool::ANY, dir in proptest::bool::ANY) {
        let size = u64::MAX - back;
        let name = if dir { "d/" } else { "s1.bin" };
        let tar = if pax { tar_with_pax_size(name, size, b"abc") } else { tar_with_base256_size(name, size, b"abc") };
        let mut results = vec![
            ("index", shardio::index_reader("big.tar", Format::Tar, Cursor::new(&tar)).map(|_| ())),
            ("read", read_all("big.tar", Format::Tar, Cursor::new(&tar)).map(|_| ())),
            ("stream", read_all_stream("big.tar", Format::Tar, &tar[..]).map(|_| ())),
        ];
        for format in [Format::TarGz, Format::TarZst, Format::TarLz4] {
            let packed = compress(format, &tar);
            results.push(("codec", read_all_stream("big.tar", format, &packed[..]).map(|_| ())));
        }
        for (how, r) in results {
            let e = r.expect_err("a size past the archive cannot be read");
            proptest::prop_assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Truncated),
                "{how}: {e}"
            );
            proptest::prop_assert_eq!(&e.location().expect("names the shard").shard, "big.tar");
        }
    }
}
