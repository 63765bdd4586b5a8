//! Helpers shared by the integration tests: temp dirs, external commands, payloads, writing and reading
//! shards in every format.
#![allow(dead_code)]

use shardio::{EntryMeta, EntrySource, Format, ShardIndex, ShardWriter, TarFlavor, WriteOptions};
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A fresh temporary folder, removed when dropped.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("shardio-test-").tempdir().expect("create temp dir")
}

/// The real WebDataset shards of the repository's `tests/fixtures/webdataset/` (origin and license in
/// `tests/fixtures/README.md`).
pub fn testdata_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/webdataset")
}

/// Deterministic pseudo-random bytes (splitmix64); every few seeds give a compressible payload instead, so
/// that codecs see both kinds of input.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let compressible = seed.is_multiple_of(3);
    let mut out = Vec::with_capacity(len + 8);
    if compressible {
        let word = next().to_le_bytes();
        let mut i = 0u64;
        while out.len() < len {
            out.extend_from_slice(&word[..(1 + (i % 8) as usize)]);
            out.extend_from_slice(format!("line {i}\n").as_bytes());
            i += 1;
        }
    } else {
        while out.len() < len {
            out.extend_from_slice(&next().to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// True when `cmd` can be run (looked up on PATH).
pub fn have(cmd: &str) -> bool {
    Command::new(cmd).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// True when python3 can import `module`.
pub fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run a command to success and return its output; a failure panics with the command's stderr.
pub fn run(cmd: &str, args: &[&str], cwd: Option<&Path>) -> Output {
    let mut c = Command::new(cmd);
    c.args(args).stdin(Stdio::null());
    if let Some(dir) = cwd {
        c.current_dir(dir);
    }
    let out = c.output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a Python script (`python3 -c SCRIPT ARGS...`) to success and return its stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    String::from_utf8(run("python3", &all, None).stdout).expect("python output is UTF-8")
}

/// Every output variant worth writing: (label, format, options).
pub fn variants() -> Vec<(&'static str, Format, WriteOptions)> {
    let tar = |flavor| WriteOptions { tar_flavor: flavor, ..WriteOptions::default() };
    vec![
        ("tar-pax", Format::Tar, tar(TarFlavor::Pax)),
        ("tar-gnu", Format::Tar, tar(TarFlavor::Gnu)),
        ("tar-ustar", Format::Tar, tar(TarFlavor::Ustar)),
        ("tar.gz", Format::TarGz, WriteOptions::default()),
        ("tar.zst", Format::TarZst, WriteOptions::default()),
        ("tar.lz4", Format::TarLz4, WriteOptions::default()),
        ("zip-stored", Format::Zip, WriteOptions::default()),
        ("zip-deflate", Format::Zip, WriteOptions { zip_deflate: true, ..WriteOptions::default() }),
    ]
}

/// Write `entries` (name, bytes) as one shard in memory.
pub fn write_shard(format: Format, opts: WriteOptions, entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = ShardWriter::new("mem", format, Cursor::new(Vec::new()), opts).expect("new writer");
    for (name, data) in entries {
        w.append(name, data.len() as u64, EntrySource::Bytes(data)).unwrap_or_else(|e| panic!("append {name}: {e}"));
    }
    w.finish().expect("finish").into_inner()
}

/// Write `entries` as a shard file `dir/<stem><canonical extension>`.
pub fn write_shard_file(
    dir: &Path,
    stem: &str,
    format: Format,
    opts: WriteOptions,
    entries: &[(String, Vec<u8>)],
) -> PathBuf {
    let path = dir.join(format!("{stem}{}", format.extension()));
    std::fs::write(&path, write_shard(format, opts, entries)).expect("write shard file");
    path
}

/// A small shard's worth of entries: `n` records of a `.cls` and a `.bin` each.
pub fn small_entries(n: usize, size: usize) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push((format!("dir/s{i:04}.cls"), format!("{i}\n").into_bytes()));
        out.push((format!("dir/s{i:04}.bin"), payload(i as u64 + 1, size)));
    }
    out
}

/// Append one hand-made tar member to `out`: `name` goes into the header's name field as is (no checks, at
/// most 100 bytes), `kind` is the type flag; `old` makes a v7 header (no magic), else a ustar one.
pub fn raw_member(out: &mut Vec<u8>, name: &str, kind: u8, data: &[u8], old: bool) {
    let mut h = if old { tar::Header::new_old() } else { tar::Header::new_ustar() };
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Compress a whole plain tar with the codec of `format` (plain for `Tar`).
pub fn compress(format: Format, tar: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match format {
        Format::Tar => tar.to_vec(),
        Format::TarGz => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(tar).expect("gzip");
            e.finish().expect("gzip")
        }
        Format::TarZst => {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
            e.include_checksum(true).expect("zstd");
            e.write_all(tar).expect("zstd");
            e.finish().expect("zstd")
        }
        Format::TarLz4 => {
            let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
            let mut e = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
            e.write_all(tar).expect("lz4");
            e.finish().expect("lz4")
        }
        Format::Zip => panic!("zip is not a tar codec"),
    }
}

/// One entry as read: its metadata and bytes.
pub type ReadEntry = (EntryMeta, Vec<u8>);

/// Every entry of a seekable shard with its bytes, through `read_entries`.
pub fn read_all<R: Read + Seek>(
    shard: &str,
    format: Format,
    reader: R,
) -> shardio::Result<(ShardIndex, Vec<ReadEntry>)> {
    let mut got = Vec::new();
    let index = shardio::read_entries(shard, format, reader, |meta, data| {
        let mut buf = Vec::new();
        data.read_to_end(&mut buf)?;
        got.push((meta.clone(), buf));
        Ok(())
    })?;
    Ok((index, got))
}

/// Every entry of a forward-only shard with its bytes, through `read_entries_stream`.
pub fn read_all_stream<R: Read>(
    shard: &str,
    format: Format,
    reader: R,
) -> shardio::Result<(ShardIndex, Vec<ReadEntry>)> {
    let mut got = Vec::new();
    let index = shardio::read_entries_stream(shard, format, reader, |meta, data| {
        let mut buf = Vec::new();
        data.read_to_end(&mut buf)?;
        got.push((meta.clone(), buf));
        Ok(())
    })?;
    Ok((index, got))
}

/// (name, bytes) pairs of a shard file, read by path.
pub fn read_file_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let (file, format) = shardio::open_shard(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let (_, got) = read_all(&path.display().to_string(), format, file).unwrap_or_else(|e| panic!("read: {e}"));
    got.into_iter().map(|(m, b)| (m.name, b)).collect()
}

/// (name, size) of every entry of an index, in archive order.
pub fn names_sizes(index: &ShardIndex) -> Vec<(String, u64)> {
    index.entries().map(|e| (e.name.clone(), e.size)).collect()
}

/// Every file under `dir` (recursively) as (relative path, bytes), sorted by path.
pub fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for ent in std::fs::read_dir(&d).expect("read dir") {
            let path = ent.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("under dir").to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&path).expect("read file")));
            }
        }
    }
    out.sort();
    out
}

/// Assert an error's kind and that its location names the shard and (when given) the offset and entry.
#[track_caller]
pub fn assert_error(
    err: &shardio::Error,
    kind: shardio::ErrorKind,
    shard: &str,
    offset: Option<u64>,
    entry: Option<&str>,
) {
    assert_eq!(err.kind(), kind, "wrong kind for error: {err}");
    let loc = err.location().unwrap_or_else(|| panic!("error names no location: {err}"));
    assert_eq!(loc.shard, shard, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(shard), "message does not name the shard: {msg}");
    if let Some(off) = offset {
        assert_eq!(loc.offset, Some(off), "wrong offset: {err}");
        assert!(msg.contains(&format!("offset {off}")), "message does not name the offset: {msg}");
    } else {
        assert!(loc.offset.is_some(), "error names no offset: {err}");
    }
    if let Some(entry) = entry {
        assert_eq!(loc.entry.as_deref(), Some(entry), "wrong entry: {err}");
        assert!(msg.contains(entry), "message does not name the entry: {msg}");
    }
}

/// Entries of a plain tar larger than the read-ahead threshold of `index_file` (8 MiB): many small entries
/// of awkward sizes around block and chunk boundaries, and a few larger than the read-ahead window.
pub fn large_entries() -> Vec<(String, Vec<u8>)> {
    let awkward = [0usize, 1, 511, 512, 513, 4096, 128 * 1024 - 512, 128 * 1024, 128 * 1024 + 1, 7000];
    (0..320)
        .map(|i| {
            let size = if i % 64 == 63 { (5 << 19) + i } else { awkward[i % awkward.len()] };
            let ext = if i % 2 == 0 { ".bin" } else { ".cls" };
            (format!("big/s{:04}{ext}", i / 2), payload(i as u64, size))
        })
        .collect()
}
