//! Interoperability: shards written by other tools (GNU tar, Python's tarfile/zipfile/gzip, the zstd and
//! lz4 encoders, the WebDataset test shards) read exactly as those tools see them, and every format we
//! write reads back in GNU tar, Python and WebDataset with the same bytes.
//!
//! Needs: python3 and GNU tar (both required); zstd, lz4, gzip, unzip binaries and the Python `webdataset`
//! package are used when present (a case without its tool is skipped with a printed note).

mod common;

use common::{files_under, have, payload, python, python_has, read_all, read_file_entries, run, tmpdir, variants};
use shardio::{Format, TarFlavor};
use std::fs::{self, File};
use std::io::{Cursor, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Lists a tar (any compression Python knows) or zip the way Python sees it: one line per member,
/// `kind<TAB>size<TAB>crc32<TAB>name`. With a third argument `nodata`, file contents are not read.
const PY_LIST: &str = r#"
import sys, tarfile, zipfile, zlib
p = sys.argv[1]
nodata = len(sys.argv) > 2
out = sys.stdout.buffer
def emit(kind, size, crc, name):
    out.write(f"{kind}\t{size}\t{crc}\t".encode() + name.encode("utf-8", "surrogateescape") + b"\n")
if p.endswith(".zip"):
    with zipfile.ZipFile(p) as z:
        for i in z.infolist():
            if i.is_dir():
                emit("dir", 0, 0, i.filename)
            else:
                d = z.read(i)
                emit("file", len(d), zlib.crc32(d), i.filename)
else:
    with tarfile.open(p, "r:*") as t:
        for m in t:
            if m.isreg():
                if nodata:
                    emit("file", m.size, 0, m.name)
                else:
                    d = t.extractfile(m).read()
                    emit("file", len(d), zlib.crc32(d), m.name)
            elif m.isdir():
                emit("dir", 0, 0, m.name)
            else:
                emit("other", m.size, 0, m.name)
"#;

/// Writes a tar of `ROOT/d` with Python's tarfile: `OUT FORMAT ROOT`.
const PY_TAR: &str = r#"
import sys, tarfile, os
out, fmt, root = sys.argv[1:4]
fmt = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
with tarfile.open(out, "w", format=fmt) as t:
    t.add(os.path.join(root, "d"), arcname="d")
"#;

/// Writes a zip of `ROOT/d` with Python's zipfile, directories included: `OUT MODE ROOT`, MODE one of
/// stored, deflated, zip64 (every member forced to zip64 extra fields).
const PY_ZIP: &str = r#"
import sys, zipfile, os
out, mode, root = sys.argv[1:4]
comp = zipfile.ZIP_DEFLATED if mode == "deflated" else zipfile.ZIP_STORED
with zipfile.ZipFile(out, "w", compression=comp) as z:
    for dirpath, dirs, files in os.walk(os.path.join(root, "d")):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        z.writestr(zipfile.ZipInfo(rel + "/"), b"")
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            name = rel + "/" + f
            if mode == "zip64":
                with open(p, "rb") as src, z.open(zipfile.ZipInfo(name), "w", force_zip64=True) as w:
                    w.write(src.read())
            else:
                z.write(p, name)
"#;

/// Reads a tar with WebDataset: one line per sample, `key<TAB>ext,ext<TAB>len,len`.
const PY_WDS: &str = r#"
import sys, warnings
warnings.filterwarnings("ignore")
import webdataset as wds
try:
    ds = wds.WebDataset(sys.argv[1], shardshuffle=False)
except TypeError:
    ds = wds.WebDataset(sys.argv[1])
for s in ds:
    keys = sorted(k for k in s if not k.startswith("__"))
    print(s["__key__"] + "\t" + ",".join(keys) + "\t" + ",".join(str(len(s[k])) for k in keys))
"#;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    kind: String,
    size: u64,
    crc: u32,
    name: String,
}

fn python_list(path: &Path, nodata: bool) -> Vec<Listed> {
    let p = path.display().to_string();
    let mut args = vec![p.as_str()];
    if nodata {
        args.push("nodata");
    }
    python(PY_LIST, &args)
        .lines()
        .map(|l| {
            let mut it = l.splitn(4, '\t');
            let (kind, size, crc, name) = (it.next(), it.next(), it.next(), it.next());
            Listed {
                kind: kind.expect("kind").to_string(),
                size: size.expect("size").parse().expect("size number"),
                crc: crc.expect("crc").parse().expect("crc number"),
                name: name.expect("name").to_string(),
            }
        })
        .collect()
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// The regular files Python lists, in archive order, as (name, size, crc).
fn python_files(path: &Path) -> Vec<(String, u64, u32)> {
    python_list(path, false).into_iter().filter(|l| l.kind == "file").map(|l| (l.name, l.size, l.crc)).collect()
}

/// Our entries of a shard file, in archive order, as (name, size, crc).
fn our_files(path: &Path) -> Vec<(String, u64, u32)> {
    read_file_entries(path).into_iter().map(|(n, d)| (n, d.len() as u64, crc32(&d))).collect()
}

/// Names GNU tar lists (`tar -tf`), files only (directories end with '/').
fn gnu_tar_files(path: &Path, extra: &[&str]) -> Vec<String> {
    let p = path.display().to_string();
    let mut args = vec!["--quoting-style=literal"];
    args.extend_from_slice(extra);
    args.extend(["-tf", p.as_str()]);
    let out = run("tar", &args, None);
    String::from_utf8(out.stdout)
        .expect("utf-8 listing")
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(String::from)
        .collect()
}

#[track_caller]
fn assert_same_files(label: &str, mut ours: Vec<(String, Vec<u8>)>, mut want: Vec<(String, Vec<u8>)>) {
    ours.sort();
    want.sort();
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, d)| (n.clone(), d.len())).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&want), "{label}: names and sizes");
    for ((n, a), (_, b)) in ours.iter().zip(&want) {
        assert!(a == b, "{label}: bytes of {n} differ");
    }
}

/// What the source tree may hold: how long names get, to suit each tar format.
#[derive(Clone, Copy, PartialEq)]
enum Names {
    /// Under 100 bytes (v7).
    Short,
    /// Over 100 bytes, but splittable at a '/' into ustar's prefix and name.
    Splittable,
    /// Over 100 bytes in one path component.
    Long,
}

/// A tree under `root/d` to archive: a zero-length file, an empty folder, dotted folders, multi-dot and
/// unicode names, a block-sized file, a 70 KB file and optionally long names.
fn make_tree(root: &Path, names: Names) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("d/zero.txt".into(), Vec::new()),
        ("d/s0001.cls".into(), b"7\n".to_vec()),
        ("d/s0001.seg.png".into(), payload(1, 70_000)),
        ("d/sub.v2/s0002.jpg".into(), payload(2, 1000)),
        ("d/naïve-中文.txt".into(), "ünïcödé\n".as_bytes().to_vec()),
        ("d/block.bin".into(), payload(3, 1024)),
    ];
    match names {
        Names::Short => {}
        // The folder itself must fit a ustar name field too (GNU tar stores it as an entry).
        Names::Splittable => files.push((format!("d/{}/{}.bin", "p".repeat(95), "f".repeat(40)), payload(4, 777))),
        Names::Long => {
            files.push((format!("d/{}.bin", "L".repeat(110)), payload(5, 600)));
            files.push((format!("d/{}/{}.seg.png", "ü".repeat(60), "q".repeat(130)), payload(6, 5000)));
        }
    }
    fs::create_dir_all(root.join("d/empty")).expect("mkdir");
    for (name, data) in &files {
        let path = root.join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, data).expect("write");
    }
    files
}

/// Check one foreign archive: our entries equal the source tree and Python's listing of the archive.
fn check_foreign(label: &str, path: &Path, tree: &[(String, Vec<u8>)]) {
    let ours = read_file_entries(path);
    assert_same_files(label, ours.clone(), tree.to_vec());
    let ours_listed: Vec<_> = ours.iter().map(|(n, d)| (n.clone(), d.len() as u64, crc32(d))).collect();
    if !matches!(Format::from_name(&path.display().to_string()), Some(Format::TarZst | Format::TarLz4)) {
        assert_eq!(ours_listed, python_files(path), "{label}: same entries in the same order as Python");
    }
    // The index agrees with the full read.
    let index = shardio::index_file(path).unwrap_or_else(|e| panic!("{label}: {e}"));
    let indexed: Vec<_> = index.entries().map(|e| (e.name.clone(), e.size)).collect();
    let read: Vec<_> = ours.iter().map(|(n, d)| (n.clone(), d.len() as u64)).collect();
    assert_eq!(indexed, read, "{label}: index_file agrees with read_entries");
}

#[test]
fn webdataset_testdata_shards_have_the_right_records() {
    let dir = common::testdata_dir();
    assert!(dir.is_dir(), "test shards not found at {} (tests/fixtures/webdataset/ of the repository)", dir.display());
    let cases: &[(&str, usize, &[&str])] = &[
        ("sample.tgz", 90, &[".cls", ".png"]),
        ("tendata.tar", 100, &[".ten"]),
        ("mpdata.tar", 100, &[".mp"]),
        ("testgz.tar", 1000, &[".txt.gz"]),
        ("compressed.tar", 3, &[".txt.gz"]),
    ];
    for &(shard, records, exts) in cases {
        let path = dir.join(shard);
        let index = shardio::index_file(&path).unwrap_or_else(|e| panic!("{shard}: {e}"));
        assert_eq!(index.records.len(), records, "{shard}: records");
        assert!(index.duplicates.is_empty(), "{shard}");
        for rec in &index.records {
            let got: Vec<_> = rec.entries.iter().map(|e| shardio::split_name(&e.name).1).collect();
            assert_eq!(got, exts, "{shard}: extensions of record {}", rec.name);
            for e in &rec.entries {
                assert_eq!(shardio::split_name(&e.name).0, rec.name, "{shard}");
            }
        }
        // The same entries, in the same order, with the same bytes as Python and GNU tar see.
        let ours = our_files(&path);
        assert_eq!(ours, python_files(&path), "{shard}: entries as Python lists them");
        let names: Vec<_> = ours.iter().map(|(n, _, _)| n.clone()).collect();
        assert_eq!(names, gnu_tar_files(&path, &[]), "{shard}: entries as GNU tar lists them");
        assert_eq!(index.entries().map(|e| e.name.clone()).collect::<Vec<_>>(), names, "{shard}: index order");
        // Uncompressed: every data_offset points at the entry's bytes.
        if shard.ends_with(".tar") {
            let file = File::open(&path).expect("open");
            for (e, (_, _, crc)) in index.entries().zip(&ours) {
                let mut buf = vec![0u8; e.size as usize];
                file.read_exact_at(&mut buf, e.data_offset.expect("tar entries have offsets")).expect("pread");
                assert_eq!(crc32(&buf), *crc, "{shard}: bytes at the data offset of {}", e.name);
            }
        }
    }
    let ten = shardio::index_file(&dir.join("tendata.tar")).expect("tendata");
    assert!(ten.entries().all(|e| e.size == 12_736), "every .ten is 12,736 bytes");
    let comp = shardio::index_file(&dir.join("compressed.tar")).expect("compressed");
    assert!(comp.records.iter().all(|r| r.name.starts_with("compressed/0")), "records under the sub-folder");
    let listed = python_list(&dir.join("compressed.tar"), false);
    assert_eq!(listed[0].kind, "dir", "compressed.tar starts with a directory entry");
    assert_eq!(comp.entry_count(), listed.len() - 1, "the directory is not an entry of a record");
    let sample = shardio::index_file(&dir.join("sample.tgz")).expect("sample");
    assert!(sample.entries().all(|e| e.data_offset.is_none()), "compressed entries have no offset");
}

#[test]
fn gnu_tar_archives_read_correctly() {
    let formats: &[(&str, Names)] =
        &[("gnu", Names::Long), ("posix", Names::Long), ("ustar", Names::Splittable), ("v7", Names::Short)];
    for &(fmt, names) in formats {
        let dir = tmpdir();
        let tree = make_tree(dir.path(), names);
        let out = dir.path().join(format!("{fmt}.tar"));
        let out_s = out.display().to_string();
        run("tar", &[&format!("--format={fmt}"), "-cf", &out_s, "-C", &dir.path().display().to_string(), "d"], None);
        check_foreign(&format!("GNU tar --format={fmt}"), &out, &tree);
        let names: Vec<_> = read_file_entries(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, gnu_tar_files(&out, &[]), "{fmt}: same order as GNU tar lists");
    }
    // The same tree, compressed by tar's own filters.
    let dir = tmpdir();
    let tree = make_tree(dir.path(), Names::Long);
    let root = dir.path().display().to_string();
    let mut filters: Vec<(&str, Vec<&str>)> = vec![("tar.gz", vec!["-z"])];
    if have("zstd") {
        filters.push(("tar.zst", vec!["--zstd"]));
    } else {
        eprintln!("note: zstd binary not found, skipping GNU tar --zstd");
    }
    if have("lz4") {
        filters.push(("tar.lz4", vec!["-I", "lz4"]));
    } else {
        eprintln!("note: lz4 binary not found, skipping GNU tar -I lz4");
    }
    for (ext, flags) in filters {
        let out = dir.path().join(format!("c.{ext}"));
        let out_s = out.display().to_string();
        let mut args = vec!["--format=posix"];
        args.extend(flags);
        args.extend(["-cf", &out_s, "-C", &root, "d"]);
        run("tar", &args, None);
        check_foreign(&format!("GNU tar {ext}"), &out, &tree);
    }
}

#[test]
fn python_tarfile_and_zipfile_archives_read_correctly() {
    for (fmt, names) in [("gnu", Names::Long), ("pax", Names::Long), ("ustar", Names::Splittable)] {
        let dir = tmpdir();
        let tree = make_tree(dir.path(), names);
        let out = dir.path().join(format!("py-{fmt}.tar"));
        python(PY_TAR, &[&out.display().to_string(), fmt, &dir.path().display().to_string()]);
        check_foreign(&format!("tarfile {fmt}"), &out, &tree);
    }
    for mode in ["stored", "deflated", "zip64"] {
        let dir = tmpdir();
        let tree = make_tree(dir.path(), Names::Long);
        let out = dir.path().join(format!("py-{mode}.zip"));
        python(PY_ZIP, &[&out.display().to_string(), mode, &dir.path().display().to_string()]);
        check_foreign(&format!("zipfile {mode}"), &out, &tree);
        if mode != "deflated" {
            // Stored members: data_offset points at the bytes, zip64 extra fields or not.
            let index = shardio::index_file(&out).expect("index");
            let file = File::open(&out).expect("open");
            for e in index.entries() {
                let want = &tree.iter().find(|(n, _)| *n == e.name).expect("in tree").1;
                let mut buf = vec![0u8; want.len()];
                file.read_exact_at(&mut buf, e.data_offset.expect("stored")).expect("pread");
                assert!(buf == *want, "zipfile {mode}: bytes at the data offset of {}", e.name);
            }
        }
    }
}

#[test]
fn v7_and_gnu_style_directories_are_not_entries() {
    // Old tars mark a directory by a trailing slash on a regular-file header ('0' or NUL type).
    let mut out = Vec::new();
    common::raw_member(&mut out, "olddir/", 0, b"", true);
    common::raw_member(&mut out, "olddir/a.txt", 0, b"hello", true);
    common::raw_member(&mut out, "zerodir/", b'0', b"", true);
    common::raw_member(&mut out, "gnudir/", b'5', b"", false);
    common::raw_member(&mut out, "gnudir/b.txt", b'0', b"world", false);
    out.extend_from_slice(&[0u8; 1024]);
    let (index, got) = read_all("dirs.tar", Format::Tar, Cursor::new(&out)).expect("read");
    let names: Vec<_> = got.iter().map(|(m, _)| m.name.as_str()).collect();
    assert_eq!(names, ["olddir/a.txt", "gnudir/b.txt"]);
    assert_eq!(index.records.len(), 2);
    let dir = tmpdir();
    let path = dir.path().join("dirs.tar");
    fs::write(&path, &out).expect("write");
    // GNU tar agrees: it extracts two files and makes the rest folders.
    let x = dir.path().join("x");
    fs::create_dir(&x).expect("mkdir");
    run("tar", &["-xf", &path.display().to_string(), "-C", &x.display().to_string()], None);
    let files: Vec<_> = files_under(&x).into_iter().map(|(n, _)| n).collect();
    assert_eq!(files, ["gnudir/b.txt", "olddir/a.txt"]);
    assert!(x.join("zerodir").is_dir());
}

/// A tar split in three, each part gzipped on its own, concatenated: one multi-member gzip stream.
#[test]
fn multi_member_gzip_reads_as_one_stream() {
    let dir = tmpdir();
    let tree = make_tree(dir.path(), Names::Long);
    let tar_path = dir.path().join("whole.tar");
    run(
        "tar",
        &["--format=gnu", "-cf", &tar_path.display().to_string(), "-C", &dir.path().display().to_string(), "d"],
        None,
    );
    let whole = fs::read(&tar_path).expect("read tar");
    let cuts = [0, 700, whole.len() / 2 + 3, whole.len()];
    let mut gz = Vec::new();
    for w in cuts.windows(2) {
        let part = &whole[w[0]..w[1]];
        if have("gzip") {
            let p = dir.path().join("part");
            fs::write(&p, part).expect("write part");
            gz.extend(run("gzip", &["-c", "-n", &p.display().to_string()], None).stdout);
        } else {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(part).expect("gzip");
            gz.extend(e.finish().expect("gzip"));
        }
    }
    let path = dir.path().join("multi.tar.gz");
    fs::write(&path, &gz).expect("write");
    check_foreign("multi-member gzip", &path, &tree);
    // Zero padding after the last member (tape blocking) is ignored, as gzip -d ignores it.
    gz.resize(gz.len() + 10_000, 0);
    fs::write(&path, &gz).expect("write");
    check_foreign("zero-padded gzip", &path, &tree);
    // Anything else after it is damage.
    gz.extend_from_slice(b"junk");
    fs::write(&path, &gz).expect("write");
    let err = shardio::index_file(&path).expect_err("junk after the padding");
    assert_eq!(err.kind(), shardio::ErrorKind::Corrupt, "{err}");
}

#[test]
fn zstd_and_lz4_from_other_encoders_read_correctly() {
    let dir = tmpdir();
    let tree = make_tree(dir.path(), Names::Long);
    let tar_path = dir.path().join("whole.tar");
    run(
        "tar",
        &["--format=posix", "-cf", &tar_path.display().to_string(), "-C", &dir.path().display().to_string(), "d"],
        None,
    );
    let whole = fs::read(&tar_path).expect("read tar");
    let half = whole.len() / 2 + 11;

    // zstd crate: a high level, and two frames back to back.
    let mut zst = zstd::encode_all(&whole[..half], 19).expect("zstd");
    zst.extend(zstd::encode_all(&whole[half..], 1).expect("zstd"));
    let p = dir.path().join("frames.tar.zst");
    fs::write(&p, &zst).expect("write");
    check_foreign("zstd crate, two frames", &p, &tree);

    // lz4_flex: the default frame (no checksums, block size from the first write), and one with block
    // checksums, independent blocks and two frames.
    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
    let mut enc = FrameEncoder::new(Vec::new());
    enc.write_all(&whole).expect("lz4");
    let p = dir.path().join("default.tar.lz4");
    fs::write(&p, enc.finish().expect("lz4")).expect("write");
    check_foreign("lz4_flex default frame", &p, &tree);
    let info = FrameInfo::new()
        .block_size(BlockSize::Max64KB)
        .block_mode(BlockMode::Independent)
        .block_checksums(true)
        .content_checksum(true);
    let mut lz = Vec::new();
    for part in [&whole[..half], &whole[half..]] {
        let mut enc = FrameEncoder::with_frame_info(info.clone(), Vec::new());
        enc.write_all(part).expect("lz4");
        lz.extend(enc.finish().expect("lz4"));
    }
    let p = dir.path().join("frames.tar.lz4");
    fs::write(&p, lz).expect("write");
    check_foreign("lz4_flex checksummed frames", &p, &tree);

    // The reference command-line tools.
    let t = tar_path.display().to_string();
    for (tool, ext, args) in [("zstd", "tar.zst", vec!["-q", "-c", "-19"]), ("lz4", "tar.lz4", vec!["-q", "-c"])] {
        if !have(tool) {
            eprintln!("note: {tool} binary not found, skipping its case");
            continue;
        }
        let mut all = args.clone();
        all.push(&t);
        let out = run(tool, &all, None).stdout;
        let p = dir.path().join(format!("cli.{ext}"));
        fs::write(&p, out).expect("write");
        check_foreign(&format!("{tool} CLI"), &p, &tree);
    }
}

/// Entries that every writer flavor can hold (no names over 100 bytes unless `long`).
fn output_entries(flavor_long: bool) -> Vec<(String, Vec<u8>)> {
    let mut e: Vec<(String, Vec<u8>)> = vec![
        ("out/s0001.cls".into(), b"1\n".to_vec()),
        ("out/s0001.seg.png".into(), payload(10, 70_001)),
        ("out/s0002.cls".into(), b"2\n".to_vec()),
        ("out/s0002.seg.png".into(), Vec::new()),
        ("out/a.b/naïve-中文.txt".into(), "ünïcödé\n".as_bytes().to_vec()),
        ("top.json".into(), payload(11, 512)),
    ];
    if flavor_long {
        e.push((format!("out/{}/{}.jpg", "p".repeat(120), "f".repeat(40)), payload(12, 3000)));
        e.push((format!("out/{}.jpg", "L".repeat(140)), payload(13, 10)));
        e.push((format!("out/{}.json", "ü".repeat(100)), payload(14, 20)));
    }
    e
}

/// Decompress one of our compressed tars into a plain tar for tools that cannot read the codec.
fn decompressed_tar(dir: &Path, format: Format, shard: &[u8]) -> PathBuf {
    let plain = match format {
        Format::TarZst => zstd::decode_all(shard).expect("zstd decode"),
        Format::TarLz4 => {
            let mut out = Vec::new();
            std::io::copy(&mut lz4_flex::frame::FrameDecoder::new(shard), &mut out).expect("lz4 decode");
            out
        }
        _ => shard.to_vec(),
    };
    let p = dir.join("plain.tar");
    fs::write(&p, plain).expect("write");
    p
}

#[test]
fn our_output_reads_in_gnu_tar_python_and_unzip() {
    for (label, format, opts) in variants() {
        let long = !(format == Format::Tar && opts.tar_flavor == TarFlavor::Ustar);
        let mut entries = output_entries(long);
        if !long {
            entries.push((format!("out/{}/{}.jpg", "p".repeat(120), "f".repeat(40)), payload(12, 3000)));
        }
        let dir = tmpdir();
        let path = common::write_shard_file(dir.path(), "ours", format, opts, &entries);
        let path_s = path.display().to_string();

        // Python: same names, order, sizes and checksums (zip: Python checks each member's CRC).
        let want: Vec<_> = entries.iter().map(|(n, d)| (n.clone(), d.len() as u64, crc32(d))).collect();
        let py_path = if matches!(format, Format::TarZst | Format::TarLz4) {
            decompressed_tar(dir.path(), format, &fs::read(&path).expect("read"))
        } else {
            path.clone()
        };
        assert_eq!(python_files(&py_path), want, "{label}: Python reads our output");

        // GNU tar (or unzip): extract and compare byte for byte.
        let out = dir.path().join("x");
        fs::create_dir(&out).expect("mkdir");
        let out_s = out.display().to_string();
        let tool_args: Option<(&str, Vec<&str>)> = match format {
            Format::Tar => Some(("tar", vec!["-xf", &path_s, "-C", &out_s])),
            Format::TarGz => Some(("tar", vec!["-xzf", &path_s, "-C", &out_s])),
            Format::TarZst if have("zstd") => Some(("tar", vec!["--zstd", "-xf", &path_s, "-C", &out_s])),
            Format::TarLz4 if have("lz4") => Some(("tar", vec!["-I", "lz4", "-xf", &path_s, "-C", &out_s])),
            Format::Zip if have("unzip") => Some(("unzip", vec!["-q", &path_s, "-d", &out_s])),
            _ => None,
        };
        match tool_args {
            Some((tool, args)) => {
                run(tool, &args, None);
                assert_same_files(&format!("{label} via {tool}"), files_under(&out), entries.clone());
                if format.is_tar() {
                    let extra: &[&str] = match format {
                        Format::TarZst => &["--zstd"],
                        Format::TarLz4 => &["-I", "lz4"],
                        _ => &[],
                    };
                    let names: Vec<_> = entries.iter().map(|(n, _)| n.clone()).collect();
                    assert_eq!(gnu_tar_files(&path, extra), names, "{label}: GNU tar lists our entries in order");
                }
            }
            None => eprintln!("note: no external extractor for {label} (zstd/lz4/unzip binary missing), skipped"),
        }
    }
}

#[test]
fn webdataset_reads_our_tar_output() {
    if !python_has("webdataset") {
        eprintln!("note: Python package `webdataset` not importable, skipping (pip install webdataset)");
        return;
    }
    for (label, format, opts) in variants() {
        if !matches!(format, Format::Tar | Format::TarGz) {
            continue; // WebDataset opens tar and tar.gz shards by itself
        }
        let entries = output_entries(opts.tar_flavor != TarFlavor::Ustar || format != Format::Tar);
        let dir = tmpdir();
        let path = common::write_shard_file(dir.path(), "wds", format, opts, &entries);
        let index = shardio::index_file(&path).expect("index");
        let want: Vec<String> = index
            .records
            .iter()
            .map(|r| {
                let mut exts: Vec<_> =
                    r.entries.iter().map(|e| (shardio::split_name(&e.name).1[1..].to_string(), e.size)).collect();
                exts.sort();
                let keys: Vec<_> = exts.iter().map(|(k, _)| k.clone()).collect();
                let lens: Vec<_> = exts.iter().map(|(_, s)| s.to_string()).collect();
                format!("{}\t{}\t{}", r.name, keys.join(","), lens.join(","))
            })
            .collect();
        let got: Vec<String> = python(PY_WDS, &[&path.display().to_string()]).lines().map(String::from).collect();
        assert_eq!(got, want, "{label}: WebDataset samples equal our records");
    }
}

/// A tar whose one entry is 9 GiB by a PAX `size` record, its data a hole in a sparse file, followed by a
/// small entry: the index walks past the 9 GiB without reading it.
#[test]
fn pax_size_over_8_gib_is_indexed_without_reading_data() {
    const BIG: u64 = 9_663_676_416; // 9 GiB
    let pax = {
        let body = format!("size={BIG}\n");
        let mut len = body.len() + 3;
        while format!("{len} {body}").len() != len {
            len = format!("{len} {body}").len();
        }
        format!("{len} {body}")
    };
    let mut x = tar::Header::new_ustar();
    x.set_path("PaxHeaders/big.bin").expect("path");
    x.set_size(pax.len() as u64);
    x.set_entry_type(tar::EntryType::XHeader);
    x.set_mode(0o644);
    x.set_cksum();
    let mut h = tar::Header::new_ustar();
    h.set_path("big.bin").expect("path");
    h.set_size(0); // the PAX record wins, as in GNU tar's output for huge files
    h.set_mode(0o644);
    h.set_cksum();
    let mut head = Vec::new();
    head.extend_from_slice(x.as_bytes());
    head.extend_from_slice(pax.as_bytes());
    head.resize(1024, 0);
    head.extend_from_slice(h.as_bytes());
    let data_at = head.len() as u64;
    let mut tail = tar::Header::new_ustar();
    tail.set_path("after.txt").expect("path");
    tail.set_size(5);
    tail.set_mode(0o644);
    tail.set_cksum();

    let dir = tmpdir();
    let path = dir.path().join("huge.tar");
    let file = File::create(&path).expect("create");
    file.write_all_at(&head, 0).expect("write head");
    let after = data_at + BIG;
    file.write_all_at(tail.as_bytes(), after).expect("write tail header");
    let mut rest = b"hello".to_vec();
    rest.resize(512 + 1024, 0);
    file.write_all_at(&rest, after + 512).expect("write tail");
    drop(file);

    let started = std::time::Instant::now();
    let index = shardio::index_file(&path).expect("index");
    let took = started.elapsed();
    let entries: Vec<_> = index.entries().collect();
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0].name.as_str(), entries[0].size, entries[0].data_offset), ("big.bin", BIG, Some(data_at)));
    assert_eq!(entries[0].header_offset, 0);
    assert_eq!((entries[1].name.as_str(), entries[1].size), ("after.txt", 5));
    assert_eq!(entries[1].header_offset, after);
    assert_eq!(entries[1].data_offset, Some(after + 512));
    assert!(took.as_secs() < 5, "indexing took {took:?}: the data must be skipped, not read");
    let listed = python_list(&path, true);
    assert_eq!(
        listed.iter().map(|l| (l.name.as_str(), l.size)).collect::<Vec<_>>(),
        [("big.bin", BIG), ("after.txt", 5)],
        "Python agrees"
    );
    // Cut the file inside the hole: the index reports a truncated entry, still without reading.
    File::options().write(true).open(&path).expect("open").set_len(data_at + BIG / 2).expect("truncate");
    let err = shardio::index_file(&path).expect_err("truncated");
    common::assert_error(&err, shardio::ErrorKind::Truncated, &path.display().to_string(), Some(0), Some("big.bin"));
}

#[test]
fn stream_and_seek_readers_agree_on_foreign_archives() {
    // The forward-only reader (network path) sees what the seekable reader sees.
    let dir = tmpdir();
    let tree = make_tree(dir.path(), Names::Long);
    for fmt in ["gnu", "posix"] {
        let out = dir.path().join(format!("{fmt}.tar"));
        run(
            "tar",
            &[
                &format!("--format={fmt}"),
                "-cf",
                &out.display().to_string(),
                "-C",
                &dir.path().display().to_string(),
                "d",
            ],
            None,
        );
        let bytes = fs::read(&out).expect("read");
        let (_, seek) = read_all(fmt, Format::Tar, Cursor::new(&bytes)).expect("seek read");
        let (_, stream) = common::read_all_stream(fmt, Format::Tar, &bytes[..]).expect("stream read");
        let strip = |v: Vec<(shardio::EntryMeta, Vec<u8>)>| -> Vec<(String, u64, Vec<u8>)> {
            v.into_iter().map(|(m, d)| (m.name, m.header_offset, d)).collect()
        };
        let stream = strip(stream);
        assert_eq!(strip(seek), stream, "{fmt}");
        assert_same_files(fmt, stream.into_iter().map(|(n, _, d)| (n, d)).collect(), tree.clone());
    }
}

/// Old writers summed header bytes as signed chars; with non-ASCII names that sum differs. GNU tar and
/// Python accept both, and so must we.
#[test]
fn signed_checksum_headers_are_accepted() {
    let name = "naïve-中文.txt";
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(5);
    h.set_mode(0o644);
    h.set_mtime(0);
    let bytes = h.as_bytes();
    let signed: i64 = bytes[..148].iter().chain(&bytes[156..]).map(|&b| i64::from(b as i8)).sum::<i64>() + 8 * 32;
    let unsigned: i64 = bytes[..148].iter().chain(&bytes[156..]).map(|&b| i64::from(b)).sum::<i64>() + 8 * 32;
    assert_ne!(signed, unsigned, "the name has high-bit bytes");
    h.as_old_mut().cksum.copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(b"hello");
    tar.resize(1024 + 1024, 0);
    let dir = tmpdir();
    let path = dir.path().join("signed.tar");
    fs::write(&path, &tar).expect("write");
    assert_eq!(read_file_entries(&path), [(name.to_string(), b"hello".to_vec())]);
    assert_eq!(python_files(&path), [(name.to_string(), 5, crc32(b"hello"))], "Python agrees");
}

/// A zip may hold a name twice (Python's zipfile warns but writes it). Readers of zips take the last
/// member of a name (Python's `ZipFile.read(name)`, unzip's overwrite); we do the same and report the
/// hidden one as a duplicate instead of losing it silently.
#[test]
fn repeated_names_in_a_zip_are_reported() {
    const PY_DUP: &str = r#"
import sys, zipfile, warnings
warnings.filterwarnings("ignore")
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("s1.jpg", b"first")
    z.writestr("s2.jpg", b"other")
    z.writestr("s1.jpg", b"second!")
with zipfile.ZipFile(sys.argv[1]) as z:
    print(z.read("s1.jpg").decode())
"#;
    let dir = tmpdir();
    let path = dir.path().join("dup.zip");
    let python_reads = python(PY_DUP, &[&path.display().to_string()]);
    let bytes = fs::read(&path).expect("read");
    let locals: Vec<u64> =
        bytes.windows(4).enumerate().filter(|(_, w)| *w == b"PK\x03\x04").map(|(i, _)| i as u64).collect();
    assert_eq!(locals.len(), 3);
    let index = shardio::index_file(&path).expect("index");
    let got: Vec<_> = index.entries().map(|e| (e.name.as_str(), e.header_offset)).collect();
    assert_eq!(got, [("s1.jpg", locals[2]), ("s2.jpg", locals[1])]);
    assert_eq!(index.duplicates.len(), 1, "{:?}", index.duplicates);
    let d = &index.duplicates[0];
    assert_eq!((d.name.as_str(), d.first_offset, d.offset), ("s1.jpg", locals[2], locals[0]));
    let entries = read_file_entries(&path);
    let s1 = &entries.iter().find(|(n, _)| n == "s1.jpg").expect("s1").1;
    assert_eq!(String::from_utf8_lossy(s1), python_reads.trim(), "the same member as Python's read(name)");
}
