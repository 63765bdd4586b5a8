//! A target's local object store: buckets spread over its mountpaths.
//!
//! Object `O` of bucket `B` lives at `<mountpath>/B/O` on the mountpath that HRW picks for `B/O` (see
//! [`crate::placement::mountpath_index`]). Writes go through [`shardio::PendingObject`] (temporary name in the
//! destination folder, fsync, rename), so a reader sees a whole object or none. Reads look at the HRW
//! mountpath first, then at the others (an object placed before a mountpath was added is still found).
//! The store's methods are synchronous (plain file-system calls): async callers run them on the blocking
//! pool, the engine calls them directly.

use super::error::{ClusterError, Result};
use super::names::{check_bucket, check_object};
use crate::cluster::api::ObjectEntry;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The folder in a mountpath that belongs to dsort itself (target id, temp files), never a bucket.
pub const SYSTEM_DIR: &str = ".dsort";

/// The objects of one target, over its mountpaths.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    mountpaths: Vec<PathBuf>,
    /// The mountpaths as strings: the identities HRW hashes.
    ids: Vec<String>,
}

impl ObjectStore {
    /// A store over `mountpaths`: each is created when missing and made absolute and canonical (its
    /// identity for placement). Duplicates and mountpaths nested in one another are refused.
    pub fn open(mountpaths: &[PathBuf]) -> Result<Self> {
        if mountpaths.is_empty() {
            return Err(ClusterError::Config("a target needs at least one mountpath".into()));
        }
        let mut canon = Vec::with_capacity(mountpaths.len());
        for mp in mountpaths {
            fs::create_dir_all(mp).map_err(|e| ClusterError::io(format!("mountpath {}", mp.display()), e))?;
            let c = fs::canonicalize(mp).map_err(|e| ClusterError::io(format!("mountpath {}", mp.display()), e))?;
            if c.to_str().is_none() {
                return Err(ClusterError::Config(format!("mountpath {} is not valid UTF-8", c.display())));
            }
            canon.push(c);
        }
        for (i, a) in canon.iter().enumerate() {
            for b in &canon[i + 1..] {
                if a.starts_with(b) || b.starts_with(a) {
                    return Err(ClusterError::Config(format!(
                        "mountpaths {} and {} overlap (each must be its own folder)",
                        a.display(),
                        b.display()
                    )));
                }
            }
        }
        let ids = canon.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        Ok(ObjectStore { mountpaths: canon, ids })
    }

    pub fn mountpaths(&self) -> &[PathBuf] {
        &self.mountpaths
    }

    /// The mountpaths as the strings placement hashes (and the target reports when it registers).
    pub fn mountpath_ids(&self) -> &[String] {
        &self.ids
    }

    /// The mountpath HRW assigns to `bucket/object`.
    pub fn mountpath_of(&self, bucket: &str, object: &str) -> &Path {
        let i = crate::placement::mountpath_index(bucket, object, &self.ids).unwrap_or(0);
        &self.mountpaths[i]
    }

    /// The path where `bucket/object` is written (on its HRW mountpath); the names are validated.
    pub fn path_for_write(&self, bucket: &str, object: &str) -> Result<PathBuf> {
        check_bucket(bucket)?;
        check_object(object)?;
        Ok(self.mountpath_of(bucket, object).join(bucket).join(object))
    }

    /// The path and size of an existing object: HRW mountpath first, then the others.
    pub fn locate(&self, bucket: &str, object: &str) -> Result<(PathBuf, u64)> {
        let primary = self.path_for_write(bucket, object)?;
        let others = self.mountpaths.iter().map(|mp| mp.join(bucket).join(object)).filter(|p| *p != primary);
        for p in std::iter::once(primary.clone()).chain(others) {
            match fs::metadata(&p) {
                Ok(m) if m.is_file() => return Ok((p, m.len())),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {}
                Err(e) => return Err(ClusterError::io(format!("{bucket}/{object} ({})", p.display()), e)),
            }
        }
        Err(ClusterError::NotFound { what: format!("{bucket}/{object}") })
    }

    /// Start writing `bucket/object`: it appears (atomically) on [`shardio::PendingObject::commit`]. The
    /// caller should call [`ObjectStore::remove_stale_copies`] after the commit.
    pub fn create(&self, bucket: &str, object: &str) -> Result<shardio::PendingObject> {
        let path = self.path_for_write(bucket, object)?;
        shardio::PendingObject::create(path).map_err(|e| map_shardio(bucket, object, e))
    }

    /// Remove copies of `bucket/object` on mountpaths other than its HRW one (left by an older layout).
    pub fn remove_stale_copies(&self, bucket: &str, object: &str) {
        let primary = self.mountpath_of(bucket, object).to_path_buf();
        for mp in self.mountpaths.iter().filter(|mp| **mp != primary) {
            let p = mp.join(bucket).join(object);
            if fs::metadata(&p).is_ok_and(|m| m.is_file()) {
                let _ = fs::remove_file(&p);
                remove_empty_parents(&p, &mp.join(bucket));
            }
        }
    }

    /// Delete `bucket/object` (every copy); folders left empty are removed up to the bucket's folder.
    pub fn delete(&self, bucket: &str, object: &str) -> Result<()> {
        check_bucket(bucket)?;
        check_object(object)?;
        let mut found = false;
        for mp in &self.mountpaths {
            let p = mp.join(bucket).join(object);
            match fs::metadata(&p) {
                Ok(m) if m.is_file() => {
                    fs::remove_file(&p).map_err(|e| ClusterError::io(format!("{bucket}/{object}"), e))?;
                    remove_empty_parents(&p, &mp.join(bucket));
                    found = true;
                }
                _ => {}
            }
        }
        if found { Ok(()) } else { Err(ClusterError::NotFound { what: format!("{bucket}/{object}") }) }
    }

    /// The objects of `bucket` whose names start with `prefix`, sorted by name, with sizes (temporary files
    /// are skipped). A bucket with no folder on this target is empty.
    pub fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectEntry>> {
        check_bucket(bucket)?;
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        // Start the walk at the deepest folder the prefix names, not at the bucket root.
        let start_rel = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        if !start_rel.is_empty() && start_rel.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Ok(Vec::new()); // no valid object name has such a prefix
        }
        for mp in &self.mountpaths {
            let root = mp.join(bucket);
            let start = if start_rel.is_empty() { root.clone() } else { root.join(start_rel) };
            walk(&root, &start, prefix, &mut out).map_err(|e| ClusterError::io(format!("listing {bucket}"), e))?;
        }
        Ok(out.into_iter().map(|(name, size)| ObjectEntry { name, size }).collect())
    }

    /// Every copy of every object on every mountpath (an object on two mountpaths is listed twice), in no
    /// particular order: what a rebalance pass walks. Folders that are not valid bucket names and files
    /// whose names are not valid object names (temporary files among them) are skipped.
    pub fn all_copies(&self) -> Result<Vec<StoredCopy>> {
        let mut out = Vec::new();
        for (m, mp) in self.mountpaths.iter().enumerate() {
            let rd = match fs::read_dir(mp) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ClusterError::io(format!("mountpath {}", mp.display()), e)),
            };
            for ent in rd.flatten() {
                let Some(bucket) = ent.file_name().to_str().map(str::to_string) else { continue };
                if check_bucket(&bucket).is_err() || !ent.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let root = mp.join(&bucket);
                let mut found = BTreeMap::new();
                walk(&root, &root, "", &mut found).map_err(|e| ClusterError::io(format!("listing {bucket}"), e))?;
                for (name, size) in found {
                    if check_object(&name).is_ok() {
                        let path = root.join(&name);
                        out.push(StoredCopy { bucket: bucket.clone(), name, path, size, mountpath: m });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether `copy` sits on the mountpath HRW picks for it.
    pub fn is_on_its_mountpath(&self, copy: &StoredCopy) -> bool {
        self.mountpath_of(&copy.bucket, &copy.name) == self.mountpaths[copy.mountpath]
    }

    /// Remove one copy of an object (a file found by [`ObjectStore::all_copies`]) and the folders it
    /// leaves empty.
    pub fn remove_copy(&self, copy: &StoredCopy) -> Result<()> {
        match fs::remove_file(&copy.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ClusterError::io(format!("{}/{}", copy.bucket, copy.name), e)),
        }
        remove_empty_parents(&copy.path, &self.mountpaths[copy.mountpath].join(&copy.bucket));
        Ok(())
    }

    /// Remove temporary files (`.dsort-tmp-<pid>-...`) that processes no longer running left in the buckets
    /// of every mountpath (an interrupted upload). Returns how many were removed.
    pub fn remove_stale_temp_files(&self) -> usize {
        let me = std::process::id();
        let mut removed = 0;
        let mut stack: Vec<PathBuf> = Vec::new();
        for mp in &self.mountpaths {
            let Ok(rd) = fs::read_dir(mp) else { continue };
            for e in rd.flatten() {
                if e.file_name() != SYSTEM_DIR && e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        while let Some(dir) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    stack.push(e.path());
                    continue;
                }
                let name = e.file_name();
                let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(shardio::bucket::TMP_PREFIX)) else {
                    continue;
                };
                let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
                let dead = match pid {
                    Some(pid) if pid != me => !Path::new(&format!("/proc/{pid}")).exists(),
                    Some(_) => false,
                    None => true,
                };
                if dead && fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// One copy of an object on one mountpath (see [`ObjectStore::all_copies`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCopy {
    pub bucket: String,
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// Index of its mountpath in [`ObjectStore::mountpaths`].
    pub mountpath: usize,
}

/// Walk `dir` (inside the bucket folder `root`), adding regular files whose relative name starts with
/// `prefix`. A missing folder is empty.
fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut BTreeMap<String, u64>) -> io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => continue,
            Err(e) => return Err(e),
        };
        for ent in rd {
            let ent = ent?;
            let ft = ent.file_type()?;
            let path = ent.path();
            let Some(rel) = path.strip_prefix(root).ok().and_then(Path::to_str) else { continue };
            if ft.is_dir() {
                // Descend only where the prefix can still match.
                let as_dir = format!("{rel}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    stack.push(path);
                }
                continue;
            }
            if !ft.is_file() || ent.file_name().to_string_lossy().starts_with(shardio::bucket::TMP_PREFIX) {
                continue;
            }
            if rel.starts_with(prefix) {
                let size = ent.metadata()?.len();
                out.entry(rel.to_string()).or_insert(size);
            }
        }
    }
    Ok(())
}

/// Remove the empty folders from `file`'s parent up to (not including) `stop`.
fn remove_empty_parents(file: &Path, stop: &Path) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == stop || !d.starts_with(stop) || fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

/// Turn a shardio error while creating `bucket/object` into a cluster error (a folder/file clash is a
/// conflict, not a server fault).
fn map_shardio(bucket: &str, object: &str, e: shardio::Error) -> ClusterError {
    let what = format!("{bucket}/{object}");
    match e {
        shardio::Error::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists) =>
        {
            ClusterError::Conflict { what, reason: "a parent of the object is an object".into() }
        }
        shardio::Error::Io { source, .. } => ClusterError::io(what, source),
        other => ClusterError::BadRequest { what, reason: other.to_string() },
    }
}

/// Map an error of the final rename of an upload: a folder in the way is a conflict.
pub fn map_commit_error(bucket: &str, object: &str, e: shardio::Error) -> ClusterError {
    let what = format!("{bucket}/{object}");
    match e {
        shardio::Error::Io { source, .. }
            if matches!(
                source.kind(),
                io::ErrorKind::IsADirectory | io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::NotADirectory
            ) =>
        {
            ClusterError::Conflict { what, reason: "a folder of objects has this name".into() }
        }
        other => map_shardio(bucket, object, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn store(n: usize) -> (tempfile::TempDir, ObjectStore) {
        let dir = tempfile::tempdir().unwrap();
        let mps: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("mp{i}"))).collect();
        let s = ObjectStore::open(&mps).unwrap();
        (dir, s)
    }

    fn put(s: &ObjectStore, b: &str, o: &str, data: &[u8]) {
        let mut p = s.create(b, o).unwrap();
        p.file().write_all(data).unwrap();
        p.commit().unwrap();
        s.remove_stale_copies(b, o);
    }

    #[test]
    fn put_locate_list_delete() {
        let (_d, s) = store(3);
        let names: Vec<String> = (0..60).map(|i| format!("dir{}/obj-{i:03}.tar", i % 3)).collect();
        for (i, n) in names.iter().enumerate() {
            put(&s, "bkt", n, &vec![7u8; i]);
        }
        // Spread over mountpaths exactly as placement says.
        let mut used = std::collections::BTreeSet::new();
        for (i, n) in names.iter().enumerate() {
            let mp = s.mountpath_of("bkt", n);
            used.insert(mp.to_path_buf());
            assert_eq!(fs::metadata(mp.join("bkt").join(n)).unwrap().len(), i as u64);
            assert_eq!(s.locate("bkt", n).unwrap(), (mp.join("bkt").join(n), i as u64));
        }
        assert_eq!(used.len(), 3, "60 names use all 3 mountpaths");
        let all = s.list("bkt", "").unwrap();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(all.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), sorted);
        let d1 = s.list("bkt", "dir1/").unwrap();
        assert_eq!(d1.len(), 20);
        assert!(d1.iter().all(|e| e.name.starts_with("dir1/")));
        assert_eq!(s.list("bkt", "dir1/obj-00").unwrap().len(), 3); // 001, 004, 007
        assert_eq!(s.list("bkt", "di").unwrap().len(), 60);
        assert!(s.list("nobucket", "").unwrap().is_empty());
        assert!(s.list("bkt", "../x/").unwrap().is_empty());
        s.delete("bkt", "dir1/obj-001.tar").unwrap();
        assert!(matches!(s.locate("bkt", "dir1/obj-001.tar"), Err(ClusterError::NotFound { .. })));
        assert!(matches!(s.delete("bkt", "dir1/obj-001.tar"), Err(ClusterError::NotFound { .. })));
        for n in &names[..] {
            let _ = s.delete("bkt", n);
        }
        for mp in s.mountpaths() {
            assert!(dir_names(&mp.join("bkt")).is_empty(), "empty folders removed under {}", mp.display());
        }
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn names_are_validated_and_conflicts_reported() {
        let (_d, s) = store(2);
        assert!(matches!(s.create("bkt", "../escape"), Err(ClusterError::BadName { .. })));
        assert!(matches!(s.create(".dsort", "x"), Err(ClusterError::BadName { .. })));
        assert!(matches!(s.locate("bkt", "a/../../b"), Err(ClusterError::BadName { .. })));
        put(&s, "bkt", "a", b"file");
        // "a/b" needs "a" as a folder: on the mountpath holding "a" that is a conflict.
        let mp_a = s.mountpath_of("bkt", "a").to_path_buf();
        let clash = (0..200).map(|i| format!("a/x{i}")).find(|n| s.mountpath_of("bkt", n) == mp_a).unwrap();
        let e = s.create("bkt", &clash).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::CONFLICT, "{e}");
    }

    #[test]
    fn stale_copies_and_temp_files_are_cleaned() {
        let (_d, s) = store(2);
        let o = "x.tar";
        let primary = s.mountpath_of("b", o).to_path_buf();
        let other = s.mountpaths().iter().find(|m| **m != primary).unwrap().clone();
        fs::create_dir_all(other.join("b")).unwrap();
        fs::write(other.join("b").join(o), b"old").unwrap();
        assert_eq!(s.locate("b", o).unwrap().1, 3, "found on the other mountpath");
        put(&s, "b", o, b"newer");
        assert!(!other.join("b").join(o).exists());
        assert_eq!(s.locate("b", o).unwrap(), (primary.join("b").join(o), 5));
        // A temp file of a dead process is removed; ours is kept.
        let dead = other.join("b").join(format!("{}999999999-0-y.tar", shardio::bucket::TMP_PREFIX));
        let mine = other.join("b").join(format!("{}{}-0-z.tar", shardio::bucket::TMP_PREFIX, std::process::id()));
        fs::write(&dead, b"x").unwrap();
        fs::write(&mine, b"x").unwrap();
        assert_eq!(s.remove_stale_temp_files(), 1);
        assert!(!dead.exists() && mine.exists());
        assert_eq!(s.list("b", "").unwrap(), vec![ObjectEntry { name: o.into(), size: 5 }]);
    }

    #[test]
    fn overlapping_mountpaths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        assert!(ObjectStore::open(&[a.clone(), a.join("b")]).is_err());
        assert!(ObjectStore::open(&[a.clone(), a.clone()]).is_err());
        assert!(ObjectStore::open(&[]).is_err());
    }
}
