//! Buckets: named sets of objects behind one small trait, so the engine reads and writes local folders and
//! object stores (S3, behind the `s3` feature) through the same calls. Publishing is atomic: an object is
//! written under a temporary name, then renamed into place (local) or uploaded by one request whose
//! completion makes it visible (object stores), so a reader never sees a half-written shard.

use crate::error::{Error, Location, Result};
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of temporary object names; listings skip them and a restart may remove stale ones.
pub const TMP_PREFIX: &str = ".dsort-tmp-";

/// A readable object: sequential reads and seeks (the shard readers need both).
pub trait ObjectRead: Read + Seek + Send {}
impl<T: Read + Seek + Send> ObjectRead for T {}

/// A bucket of objects (shards and other files).
pub trait Bucket: Send + Sync {
    /// The bucket's display name (`s3://name`, or a folder path); messages use it.
    fn name(&self) -> &str;
    /// What makes two handles the same bucket (a canonical folder, or endpoint and bucket name): an output
    /// template that could name an input object of the same bucket is refused.
    fn identity(&self) -> String;
    /// The object's local path when it is a local file (enables the zero-copy path).
    fn local_path(&self, object: &str) -> Option<PathBuf>;
    /// For an object store: whether a job may read records where they lie, by ranged requests in output
    /// order, rather than stream each input object once. Local files are always read in place.
    fn ranged_reads(&self) -> bool {
        false
    }
    /// The object's size; `None` when it does not exist.
    fn stat(&self, object: &str) -> Result<Option<u64>>;
    fn exists(&self, object: &str) -> Result<bool> {
        Ok(self.stat(object)?.is_some())
    }
    /// Open an object for reading (seekable).
    fn open(&self, object: &str) -> Result<Box<dyn ObjectRead>>;
    /// The bytes of `ranges` of one object, in order (an object store coalesces neighbouring ranges into
    /// fewer requests and fetches them concurrently).
    fn read_ranges(&self, object: &str, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>>;
    /// [`Bucket::read_ranges`] of several objects at once: `result[i][j]` is range `j` of `wants[i]` (an
    /// object store runs all the requests concurrently).
    fn read_many(&self, wants: &[(&str, Vec<Range<u64>>)]) -> Result<Vec<Vec<Vec<u8>>>> {
        wants.iter().map(|(object, ranges)| self.read_ranges(object, ranges)).collect()
    }
    /// Object names starting with `prefix` (a plain string prefix), sorted; temporary objects are not
    /// listed.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Check that the bucket can be reached and exists (an object store's bucket; a local folder is created
    /// on first write), so that a job fails before any work rather than at its first upload.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Publish a finished local file as `object`, atomically (a local bucket renames it into place, so it
    /// must be on the bucket's file system; an object store uploads it and leaves the file). For callers
    /// that stage outputs first and publish them all later (the cluster's commit step).
    fn put_file(&self, object: &str, file: &Path) -> Result<()>;
    /// Remove an object (an abort taking back what it published); a missing object is not an error.
    fn delete(&self, object: &str) -> Result<()>;
    /// Start writing an object; it becomes visible only on [`PendingObject::commit`]. Buckets that are
    /// not local folders stage the bytes in a temporary file under `staging` (the job's temp folder).
    fn create(&self, object: &str, staging: &Path) -> Result<PendingObject>;
    /// For an object store: the store's bucket name (without scheme or key prefix) and the requests this
    /// handle has made so far; `None` for a local folder (it makes no requests).
    fn requests(&self) -> Option<(String, RequestCounts)> {
        None
    }
}

/// Requests an object-store bucket handle made, by kind, and their body bytes (the `s3` map of `dsort
/// reshard --json`). Every attempt of a retried request counts as one request, with the bytes it moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    /// Object GETs (ranged or whole).
    pub get_requests: u64,
    /// Body bytes received by successful (2xx) object GETs.
    pub get_bytes: u64,
    /// PUTs: whole objects and multipart parts.
    pub put_requests: u64,
    /// Body bytes those PUTs sent.
    pub put_bytes: u64,
    /// Listings (a GET with `list-type`).
    pub list_requests: u64,
    /// Everything else: HEAD, multipart create/complete (POST), aborts and deletes (DELETE), and the
    /// credential fetches of the client (instance metadata, web identity) if any.
    pub other_requests: u64,
}

impl RequestCounts {
    /// The sum of two counts (one bucket used through two handles, e.g. as input and as output).
    pub fn plus(self, o: RequestCounts) -> RequestCounts {
        RequestCounts {
            get_requests: self.get_requests + o.get_requests,
            get_bytes: self.get_bytes + o.get_bytes,
            put_requests: self.put_requests + o.put_requests,
            put_bytes: self.put_bytes + o.put_bytes,
            list_requests: self.list_requests + o.list_requests,
            other_requests: self.other_requests + o.other_requests,
        }
    }
}

/// A local folder as a bucket.
#[derive(Debug, Clone)]
pub struct LocalBucket {
    root: PathBuf,
    name: String,
}

impl LocalBucket {
    /// A bucket rooted at `root` (created on first write if missing).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let name = root.display().to_string();
        LocalBucket { root, name }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, object: &str) -> Result<PathBuf> {
        check_object_name(object)?;
        Ok(self.root.join(object))
    }
}

/// Object names are relative paths without `..`, empty or `.` segments.
pub fn check_object_name(object: &str) -> Result<()> {
    let bad = object.is_empty()
        || object.starts_with('/')
        || object.contains('\0')
        || object.split('/').any(|s| s.is_empty() || s == "." || s == "..");
    if bad {
        return Err(Error::BadName {
            loc: Location::shard(object),
            reason: "object names must be relative paths without empty, '.' or '..' segments".into(),
        });
    }
    Ok(())
}

impl Bucket for LocalBucket {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> String {
        let root = fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        format!("file://{}", root.display())
    }

    fn local_path(&self, object: &str) -> Option<PathBuf> {
        self.path_of(object).ok()
    }

    fn stat(&self, object: &str) -> Result<Option<u64>> {
        let path = self.path_of(object)?;
        let loc = || Location::shard(path.display().to_string());
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Err(Error::Io { loc: loc(), source: io::Error::other("not a regular file") }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { loc: loc(), source: e }),
        }
    }

    fn open(&self, object: &str) -> Result<Box<dyn ObjectRead>> {
        let path = self.path_of(object)?;
        let file = File::open(&path).map_err(|e| Error::io(Location::shard(path.display().to_string()), e))?;
        Ok(Box::new(file))
    }

    fn read_ranges(&self, object: &str, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>> {
        let path = self.path_of(object)?;
        let shown = path.display().to_string();
        let file = File::open(&path).map_err(|e| Error::io(Location::shard(&shown), e))?;
        ranges
            .iter()
            .map(|r| {
                let mut buf = vec![0u8; r.end.saturating_sub(r.start) as usize];
                file.read_exact_at(&mut buf, r.start).map_err(|e| Error::io(Location::at(&shown, r.start), e))?;
                Ok(buf)
            })
            .collect()
    }

    fn exists(&self, object: &str) -> Result<bool> {
        let path = self.path_of(object)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(Location::shard(path.display().to_string()), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound && dir == self.root => {
                    return Ok(out);
                }
                Err(e) => return Err(Error::io(Location::shard(dir.display().to_string()), e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| Error::io(Location::shard(dir.display().to_string()), e))?;
                let path = ent.path();
                let ft = ent.file_type().map_err(|e| Error::io(Location::shard(path.display().to_string()), e))?;
                if ft.is_dir() {
                    stack.push(path);
                    continue;
                }
                if ent.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    continue;
                }
                if let Ok(rel) = path.strip_prefix(&self.root)
                    && let Some(rel) = rel.to_str()
                    && rel.starts_with(prefix)
                {
                    out.push(rel.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn put_file(&self, object: &str, file: &Path) -> Result<()> {
        let dest = self.path_of(object)?;
        let loc = || Location::shard(dest.display().to_string());
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io(loc(), e))?;
        }
        fs::rename(file, &dest).map_err(|e| Error::io(loc(), e))?;
        if let Some(dir) = dest.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn delete(&self, object: &str) -> Result<()> {
        let path = self.path_of(object)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io(Location::shard(path.display().to_string()), e))
            }
            _ => Ok(()),
        }
    }

    fn create(&self, object: &str, _staging: &Path) -> Result<PendingObject> {
        let path = self.path_of(object)?;
        PendingObject::create(path)
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Publishes a staged file into an object store in one step: the object becomes visible only when the
/// upload completes, and a failed upload leaves nothing behind (a multipart upload is aborted).
pub trait Publish: Send {
    /// Upload the `len` bytes of `file` (positioned at its start).
    fn publish(&self, file: &mut File, len: u64) -> Result<()>;
    /// Upload the `len` bytes of `file` without making the object visible yet (every part of a multipart
    /// upload sent, the completion held back): [`StagedUpload::complete`] shows it, dropping the
    /// handle (or [`StagedUpload::abort`]) leaves nothing, and an object of the same name that existed
    /// before stays untouched until completion.
    fn stage(&self, file: &mut File, len: u64) -> Result<Box<dyn StagedUpload>>;
}

/// An upload whose bytes are all in the store, waiting to be made visible (see [`Publish::stage`]).
pub trait StagedUpload: Send {
    /// Make the object visible.
    fn complete(self: Box<Self>) -> Result<()>;
    /// Drop the uploaded bytes; the object (and any older one of the same name) is left as it was.
    fn abort(self: Box<Self>);
}

/// An object written whole and made durable, not yet visible under its name: a local file synced under
/// its temporary name in the destination folder (publish = rename), or an object store's upload with its
/// completion held back. [`StagedObject::publish`] shows it; dropped unpublished, it is removed, so a job
/// can stage every output and publish them all at the end, or none.
pub struct StagedObject {
    state: Option<StagedState>,
    /// The destination (local path, or the object's display name).
    dest: PathBuf,
}

enum StagedState {
    Local { tmp: PathBuf },
    Remote(Box<dyn StagedUpload>),
}

impl std::fmt::Debug for StagedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedObject").field("dest", &self.dest).finish_non_exhaustive()
    }
}

impl StagedObject {
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Make the object visible under its name (a rename into place, or the upload's completion).
    pub fn publish(mut self) -> Result<()> {
        let loc = || Location::shard(self.dest.display().to_string());
        match self.state.take() {
            Some(StagedState::Local { tmp }) => {
                if let Err(e) = fs::rename(&tmp, &self.dest) {
                    let _ = fs::remove_file(&tmp);
                    return Err(Error::io(loc(), e));
                }
                if let Some(dir) = self.dest.parent()
                    && let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })
                {
                    let _ = d.sync_all();
                }
                Ok(())
            }
            Some(StagedState::Remote(upload)) => upload.complete(),
            None => Err(Error::invalid(format!("{}: published twice", loc()))),
        }
    }
}

impl Drop for StagedObject {
    fn drop(&mut self) {
        match self.state.take() {
            Some(StagedState::Local { tmp }) => {
                let _ = fs::remove_file(tmp);
            }
            Some(StagedState::Remote(upload)) => upload.abort(),
            None => {}
        }
    }
}

/// An object being written under a temporary name. Dropped without `commit`, it is removed.
pub struct PendingObject {
    file: Option<File>,
    tmp: PathBuf,
    /// The local destination, or the object's display name (`s3://bucket/key`) when `upload` is set.
    dest: PathBuf,
    upload: Option<Box<dyn Publish>>,
}

impl std::fmt::Debug for PendingObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingObject").field("tmp", &self.tmp).field("dest", &self.dest).finish_non_exhaustive()
    }
}

impl PendingObject {
    /// Start writing `dest` through a temporary file in the same folder.
    pub fn create(dest: PathBuf) -> Result<Self> {
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let base = dest.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let (file, tmp) = Self::temp_file(&dir, &base, &dest.display().to_string())?;
        Ok(PendingObject { file: Some(file), tmp, dest, upload: None })
    }

    /// Start writing an object of a remote store: the bytes are staged in a temporary file under `staging`
    /// and handed to `upload` on commit. `shown` names the object in messages (`s3://bucket/key`).
    pub fn staged(staging: &Path, shown: &str, upload: Box<dyn Publish>) -> Result<Self> {
        let base: String = shown
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
            .collect();
        let (file, tmp) = Self::temp_file(staging, &format!("upload-{base}"), shown)?;
        Ok(PendingObject { file: Some(file), tmp, dest: PathBuf::from(shown), upload: Some(upload) })
    }

    /// A new temporary file `<TMP_PREFIX><pid>-<n>-<base>` in `dir` (created if missing); errors name `shown`.
    fn temp_file(dir: &Path, base: &str, shown: &str) -> Result<(File, PathBuf)> {
        let loc = || Location::shard(shown);
        fs::create_dir_all(dir).map_err(|e| Error::io(loc(), e))?;
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{n}-{base}", std::process::id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(loc(), e))?;
        Ok((file, tmp))
    }

    /// The file to write to.
    pub fn file(&mut self) -> &mut File {
        // Invariant: `file` is Some until commit or drop consume self.
        self.file.as_mut().expect("pending object file present until commit")
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Sync and rename into place; the object appears whole or not at all.
    pub fn commit(self) -> Result<()> {
        self.finish(true)
    }

    /// Like [`commit`](Self::commit) for a local destination, without syncing the data first: for a
    /// staging folder whose files are synced before they are published (the cluster's creators sync each
    /// staged shard on another thread while they write the next). The file is whole at its final name
    /// either way; only durability is deferred.
    pub fn commit_unsynced(self) -> Result<()> {
        self.finish(false)
    }

    /// Make the object whole and durable without showing it: synced under its temporary name (local), or
    /// uploaded with the completion held back (object stores; the staged local copy is removed). The
    /// returned [`StagedObject`] publishes it, or removes it when dropped.
    pub fn stage(mut self) -> Result<StagedObject> {
        let loc = Location::shard(self.dest.display().to_string());
        let Some(mut file) = self.file.take() else {
            return Err(Error::invalid(format!("{loc}: staged twice")));
        };
        let dest = std::mem::take(&mut self.dest);
        if let Some(upload) = self.upload.take() {
            let sent = rewound_len(&mut file, loc).and_then(|len| upload.stage(&mut file, len));
            drop(file);
            let _ = fs::remove_file(&self.tmp);
            return Ok(StagedObject { state: Some(StagedState::Remote(sent?)), dest });
        }
        let synced = file.flush().and_then(|()| file.sync_all()).map_err(|e| Error::io(loc, e));
        drop(file);
        let tmp = std::mem::take(&mut self.tmp);
        // From here the staged object owns the file: it removes it if it is never published.
        let staged = StagedObject { state: Some(StagedState::Local { tmp }), dest };
        synced.map(|()| staged)
    }

    fn finish(mut self, sync: bool) -> Result<()> {
        let loc = Location::shard(self.dest.display().to_string());
        let Some(mut file) = self.file.take() else {
            return Err(Error::invalid(format!("{loc}: committed twice")));
        };
        if let Some(upload) = self.upload.take() {
            // The staged copy goes whatever the upload's outcome: only the remote object may remain.
            let sent = rewound_len(&mut file, loc).and_then(|len| upload.publish(&mut file, len));
            drop(file);
            let _ = fs::remove_file(&self.tmp);
            return sent;
        }
        let published = file
            .flush()
            .and_then(|()| if sync { file.sync_all() } else { Ok(()) })
            .and_then(|()| {
                drop(file);
                fs::rename(&self.tmp, &self.dest)
            })
            .map_err(|e| Error::io(loc, e));
        if published.is_err() {
            // Nothing half-written may stay behind, whatever step failed.
            let _ = fs::remove_file(&self.tmp);
            return published;
        }
        if sync
            && let Some(dir) = self.dest.parent()
            && let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Flush a staged file and rewind it for its upload; its length.
fn rewound_len(file: &mut File, loc: Location) -> Result<u64> {
    file.flush()
        .and_then(|()| file.metadata())
        .and_then(|m| file.rewind().map(|()| m.len()))
        .map_err(|e| Error::io(loc, e))
}

impl Drop for PendingObject {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_is_atomic_and_abandoned_writes_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBucket::new(dir.path());
        let mut p = b.create("sub/a.tar", dir.path()).unwrap();
        p.file().write_all(b"hello").unwrap();
        assert!(!b.exists("sub/a.tar").unwrap());
        assert!(b.list("").unwrap().is_empty(), "temporary objects are not listed");
        p.commit().unwrap();
        assert_eq!(fs::read(dir.path().join("sub/a.tar")).unwrap(), b"hello");
        {
            let mut q = b.create("b.tar", dir.path()).unwrap();
            q.file().write_all(b"partial").unwrap();
        }
        assert_eq!(b.list("").unwrap(), vec!["sub/a.tar".to_string()]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        assert!(b.create("../x.tar", dir.path()).is_err());
        let staged = dir.path().join("staged");
        fs::write(&staged, b"whole").unwrap();
        b.put_file("c/d.tar", &staged).unwrap();
        assert_eq!(fs::read(dir.path().join("c/d.tar")).unwrap(), b"whole");
        assert!(!staged.exists(), "a local publish is a rename");
        b.delete("c/d.tar").unwrap();
        b.delete("c/d.tar").unwrap();
        assert!(!b.exists("c/d.tar").unwrap(), "deleted, and deleting again is no error");
    }

    #[test]
    fn staged_objects_are_invisible_until_published_and_vanish_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBucket::new(dir.path());
        fs::write(dir.path().join("old.tar"), b"earlier").unwrap();
        let stage = |name: &str, bytes: &[u8]| {
            let mut p = b.create(name, dir.path()).unwrap();
            p.file().write_all(bytes).unwrap();
            p.stage().unwrap()
        };
        let kept = stage("new.tar", b"new");
        let dropped = stage("old.tar", b"replacement");
        assert_eq!(b.list("").unwrap(), vec!["old.tar".to_string()], "staged objects are not listed");
        assert_eq!(fs::read(dir.path().join("old.tar")).unwrap(), b"earlier");
        drop(dropped);
        assert_eq!(fs::read(dir.path().join("old.tar")).unwrap(), b"earlier", "an older object is untouched");
        kept.publish().unwrap();
        assert_eq!(fs::read(dir.path().join("new.tar")).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary file left");
    }
}
