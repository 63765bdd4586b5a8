//! Moving a byte range from one file to another without passing it through user space.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Copy `len` bytes at `offset` of `src` to the current position of `dst`, in the kernel
/// (`copy_file_range`, which also lets filesystems share extents) where possible, else through a buffer.
/// Neither file's shared position is used for `src`, so many threads may read one input at once.
/// Returns an `UnexpectedEof` error when `src` is shorter than `offset + len` (a shard that shrank).
pub fn copy_range(src: &File, offset: u64, len: u64, dst: &mut File) -> io::Result<()> {
    let mut off_in = i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the duration of the call; off_in is a valid pointer and
        // the output offset is NULL (the file's own position is used and advanced).
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), std::ptr::null_mut(), chunk, 0)
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM) => {
                    return copy_buffered(src, off_in as u64, left, dst);
                }
                _ => return Err(err),
            }
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source file ends before the range does"));
        }
        left -= n as u64;
    }
    Ok(())
}

/// The portable fallback: `pread` into a buffer, then write.
pub fn copy_buffered(src: &File, mut offset: u64, mut left: u64, dst: &mut dyn Write) -> io::Result<()> {
    let mut buf = vec![0u8; left.min(1 << 20) as usize];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match src.read_at(&mut buf[..want], offset) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source file ends before the range does"));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    #[test]
    fn copies_a_range_and_reports_a_short_source() {
        let mut src = tempfile::tempfile().unwrap();
        src.write_all(b"0123456789").unwrap();
        let mut dst = tempfile::tempfile().unwrap();
        dst.write_all(b">").unwrap();
        copy_range(&src, 2, 5, &mut dst).unwrap();
        copy_range(&src, 0, 1, &mut dst).unwrap();
        let mut out = String::new();
        dst.rewind().unwrap();
        dst.read_to_string(&mut out).unwrap();
        assert_eq!(out, ">234560");
        let err = copy_range(&src, 8, 5, &mut dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
