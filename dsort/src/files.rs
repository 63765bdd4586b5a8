//! Open-file limits: the process's soft `RLIMIT_NOFILE` is raised to its hard limit at start, and the
//! files creation reads (input shards, decoded spill files) are kept open in an LRU sized from that limit,
//! so a job over any number of input shards never runs out of file descriptors (EMFILE).

use lru::LruCache;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use std::fs::File;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Descriptors left for everything that is not an LRU entry: stdio, sockets, the extraction workers'
/// shards, the output shards being written, the sorter's merge (capped at a quarter of the limit, see
/// [`merge_fan_in`]).
const RESERVED: u64 = 64;
/// Never keep more inputs open than this, whatever the limit (a cache, not a hoard).
const MAX_OPEN: u64 = 4096;
/// Soft limit asked for when the hard limit is unlimited (the kernel's `nr_open` caps it anyway).
const UNLIMITED_TARGET: u64 = 1 << 20;

/// Raise the soft open-file limit to the hard limit; returns the soft limit now in force (the old one if
/// raising fails). Called once at start; harmless to call again.
pub fn raise_open_files_limit() -> u64 {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let target = maximum.unwrap_or(UNLIMITED_TARGET);
    let now = current.unwrap_or(u64::MAX);
    if now >= target {
        return now;
    }
    match setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum }) {
        Ok(()) => target,
        Err(_) => now,
    }
}

/// The soft open-file limit in force.
pub fn open_files_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Run files the sorter may merge at once under the current limit (at most `default`, at least 2).
pub fn merge_fan_in(default: usize) -> usize {
    usize::try_from(open_files_limit() / 4).unwrap_or(usize::MAX).clamp(2, default.max(2))
}

/// Input files an [`OpenFiles`] keeps open for `concurrency` writers under the current limit: half of
/// what the reserve and the writers leave (the other half for what this estimate misses), at least 4.
pub fn open_files_budget(concurrency: usize) -> usize {
    budget_for(open_files_limit(), concurrency)
}

fn budget_for(limit: u64, concurrency: usize) -> usize {
    let used = RESERVED + limit / 4 + 4 * concurrency as u64;
    usize::try_from((limit.saturating_sub(used) / 2).clamp(4, MAX_OPEN)).unwrap_or(4)
}

/// Which kind of file a cache key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// An input shard (read in place).
    Input,
    /// The spill file of an input shard's decoded copy.
    Spill,
}

/// Read-only files kept open by an LRU: at most `capacity` stay open between uses; a file evicted while a
/// writer still reads it closes when that writer lets it go (so at most `capacity` plus one per writer).
pub struct OpenFiles {
    cache: Mutex<LruCache<(FileKind, u32), Arc<File>>>,
}

impl OpenFiles {
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        OpenFiles { cache: Mutex::new(LruCache::new(capacity)) }
    }

    /// The file of `key`, opened from `path` if it is not open.
    pub fn get(&self, kind: FileKind, shard: u32, path: &Path) -> std::io::Result<Arc<File>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(&(kind, shard)) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(path)?);
        cache.put((kind, shard), f.clone());
        Ok(f)
    }

    /// Files open in the cache now.
    pub fn len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_capacity_files_stay_open_and_evicted_ones_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = (0..10)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, [i as u8]).unwrap();
                p
            })
            .collect();
        let files = OpenFiles::new(3);
        for round in 0..2 {
            for (i, p) in paths.iter().enumerate() {
                let f = files.get(FileKind::Input, i as u32, p).unwrap();
                let mut b = [0u8; 1];
                std::os::unix::fs::FileExt::read_exact_at(&*f, &mut b, 0).unwrap();
                assert_eq!(b[0], i as u8, "round {round}: the file of its own key");
                assert!(files.len() <= 3);
            }
        }
        let a = files.get(FileKind::Spill, 9, &paths[0]).unwrap();
        let b = files.get(FileKind::Spill, 9, &paths[5]).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "a file still cached is not opened again");
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let Rlimit { maximum, .. } = getrlimit(Resource::Nofile);
        let hard = maximum.unwrap_or(UNLIMITED_TARGET);
        // Start from a soft limit below the hard one (other tests of this binary keep running meanwhile).
        setrlimit(Resource::Nofile, Rlimit { current: Some(hard.min(512)), maximum }).unwrap();
        assert_eq!(raise_open_files_limit(), hard);
        assert_eq!(open_files_limit(), hard);
        assert_eq!(raise_open_files_limit(), hard, "raising again changes nothing");
    }

    #[test]
    fn budgets_leave_room_under_small_limits() {
        // Under `ulimit -n 256` with 2 writers: the LRU, the merge and the reserve fit in the limit.
        let lru = budget_for(256, 2) as u64;
        assert!(lru >= 16 && lru + 256 / 4 + RESERVED + 4 * 2 <= 256, "{lru}");
        assert_eq!(budget_for(100, 2), 4, "a tiny limit still keeps a few open");
        assert_eq!(budget_for(u64::MAX, 2), MAX_OPEN as usize);
    }
}
