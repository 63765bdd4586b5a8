//! The process-wide memory budget: one [`MemoryPool`] per process (or job), byte reservations drawn from
//! it, and detection of the memory limit the budget is a share of (design §6).
//!
//! The model is DataFusion's: only *large* consumers, whose memory grows with the input (record metadata,
//! decoded shard bytes, creation and network buffers, spill read/write buffers), are tracked. The
//! consumer that holds the data reserves for it, before allocating, through a [`MemoryReservation`]
//! that gives its bytes back when dropped. The pool is strict: the sum of all reservations never
//! exceeds its limit. A reservation that does not fit makes its owner spill ([`MemoryReservation::try_grow`])
//! or wait ([`MemoryReservation::grow_wait`]). Small fixed allocations are not tracked; the budget
//! (`max_mem_usage`, 80 % of the limit by default) leaves the headroom for them.
//!
//! The limit is the smallest of: `DSORT_MEMORY_LIMIT` (a size such as `2GiB`; in Kubernetes the
//! container's `limits.memory` through the downward API, which is the node's allocatable memory when no
//! limit is set), the smallest cgroup limit on the path from this process's cgroup up to the root of its
//! hierarchy (v2 `memory.max`, v1 `memory.limit_in_bytes`: the truth the kernel enforces), and physical
//! RAM (`MemTotal`). Detection reads `/proc/self/cgroup` (not PID 1's: correct for sidecars)
//! and `/proc/self/mountinfo`, as AIStore does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use crate::size::{MemQuantity, SizeError, format_size, parse_size};

/// The environment variable that overrides the detected memory limit.
pub const MEMORY_LIMIT_ENV: &str = "DSORT_MEMORY_LIMIT";

/// The limit assumed when neither a cgroup nor `/proc/meminfo` says anything (not Linux, or `/proc`
/// hidden): small enough to be safe on any machine that runs us.
pub const FALLBACK_MEMORY_LIMIT: u64 = 1 << 30;

/// cgroup v1 reports "no limit" as a huge page-aligned number (9223372036854771712 on x86-64); like
/// AIStore we treat anything above `i64::MAX / 2` as unlimited.
const CGROUP_V1_UNLIMITED: u64 = (i64::MAX / 2) as u64;

/// How often a blocked [`MemoryReservation::grow_wait`] rechecks its cancel flag when nobody frees memory.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// Why memory could not be reserved, or the limit could not be read. Messages name the owner and the
/// sizes involved, so that a user can tell which consumer ran out and what to raise.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// `try_grow` found the pool too full right now (the owner should spill, or wait).
    #[error(
        "{owner}: cannot reserve {} more memory: {} of the {} budget is reserved, {} free \
         (raise max_mem_usage / DSORT_MEMORY_LIMIT or lower the concurrency)",
        format_size(*.requested), format_size(*.reserved), format_size(*.limit),
        format_size(.limit.saturating_sub(*.reserved))
    )]
    ResourcesExhausted { owner: String, requested: u64, reserved: u64, limit: u64 },
    /// A request that could never fit, even with the whole pool free: waiting would deadlock.
    #[error(
        "{owner}: needs {} more memory while holding {}, more than the whole {} budget \
         (raise max_mem_usage / DSORT_MEMORY_LIMIT)",
        format_size(*.requested), format_size(*.held), format_size(*.limit)
    )]
    ExceedsLimit { owner: String, requested: u64, held: u64, limit: u64 },
    /// `grow_wait` was cancelled before the memory became free.
    #[error("{owner}: cancelled while waiting for {} of memory", format_size(*.requested))]
    Cancelled { owner: String, requested: u64 },
    /// `DSORT_MEMORY_LIMIT` is not a positive size.
    #[error("{MEMORY_LIMIT_ENV}={value:?}: {reason}")]
    InvalidEnv { value: String, reason: String },
}

/// Locked state of a pool: the sum of all reservations and its high-water mark.
#[derive(Debug, Default)]
struct PoolState {
    reserved: u64,
    peak: u64,
}

/// A byte budget shared by every large consumer of a process. Invariant: `reserved() <= limit()` at all
/// times, so `peak() <= limit()`.
///
/// Accounting is a mutex-protected counter: reservations are made per buffer or per chunk of items,
/// not per byte, so the lock is cheap and uncontended, and the same lock makes the wait/notify of
/// [`MemoryReservation::grow_wait`] free of lost wake-ups.
pub struct MemoryPool {
    limit: u64,
    state: Mutex<PoolState>,
    freed: Condvar,
    /// The consumer asked to give memory back when another one is short (see [`Spill`]).
    spiller: Mutex<Option<Weak<dyn Spill>>>,
}

/// A consumer that can give its memory back when another one is short: the sorter, by spilling its
/// buffer as a sorted run (Spark's `MemoryConsumer.spill` is the model). Registered with
/// [`MemoryPool::set_spiller`].
pub trait Spill: Send + Sync {
    /// Gives back what it can. An error is the spiller's own failure (a run that cannot be written).
    fn spill(&self) -> Result<(), String>;
}

impl MemoryPool {
    /// A pool of `limit` bytes, shared through an `Arc` by every reservation drawn from it.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(MemoryPool {
            limit,
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            spiller: Mutex::new(None),
        })
    }

    /// Names the consumer that [`request_spill`](Self::request_spill) asks (held weakly: the pool never
    /// keeps it alive). One per pool; a later call replaces it.
    pub fn set_spiller(&self, spiller: Weak<dyn Spill>) {
        *self.spiller.lock().unwrap_or_else(PoisonError::into_inner) = Some(spiller);
    }

    /// Asks the registered spiller to give its memory back; `Ok(false)` when there is none (or it is
    /// gone). Blocks while it spills. Must not be called by the spiller itself, nor while holding a lock
    /// its spill takes.
    pub fn request_spill(&self) -> Result<bool, String> {
        let spiller = self.spiller.lock().unwrap_or_else(PoisonError::into_inner).as_ref().and_then(Weak::upgrade);
        match spiller {
            Some(s) => s.spill().map(|()| true),
            None => Ok(false),
        }
    }

    /// The budget in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes currently reserved by all reservations.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved
    }

    /// Bytes that a `try_grow` could get right now.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.reserved())
    }

    /// The most bytes ever reserved at once (for summaries and tests); never above `limit()`.
    pub fn peak(&self) -> u64 {
        self.lock().peak
    }

    /// A new, empty reservation; `owner` names the consumer in errors (e.g. `extsort[target-1]`).
    pub fn reservation(self: &Arc<Self>, owner: &str) -> MemoryReservation {
        MemoryReservation { pool: Arc::clone(self), owner: owner.to_string(), size: AtomicU64::new(0) }
    }

    /// Wakes every reservation blocked in `grow_wait` so that it rechecks its cancel flag now rather
    /// than at its next poll. Call it after setting a job's cancel flag.
    pub fn notify_waiters(&self) {
        let _guard = self.lock();
        self.freed.notify_all();
    }

    /// The state lock. Nothing panics while holding it, so a poisoned lock still holds consistent
    /// numbers and is used as is.
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `n` to the state if it fits; the caller holds the lock.
    fn grant(&self, state: &mut PoolState, n: u64) -> bool {
        match state.reserved.checked_add(n) {
            Some(total) if total <= self.limit => {
                state.reserved = total;
                state.peak = state.peak.max(total);
                true
            }
            _ => false,
        }
    }
}

impl fmt::Debug for MemoryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryPool")
            .field("limit", &self.limit)
            .field("reserved", &state.reserved)
            .field("peak", &state.peak)
            .finish()
    }
}

/// Bytes held from a [`MemoryPool`] by one consumer. RAII: dropping it gives the bytes back. Its size
/// is what the owner *may* use; the owner keeps its actual use at or below it.
///
/// Methods take `&self` (the size is an atomic changed only under the pool's lock), so one reservation
/// can be shared by several closures or threads of the same consumer; each call is atomic.
pub struct MemoryReservation {
    pool: Arc<MemoryPool>,
    owner: String,
    size: AtomicU64,
}

impl MemoryReservation {
    /// Bytes held.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The consumer's name, as given to [`MemoryPool::reservation`].
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The pool this reservation draws from (to make sibling reservations).
    pub fn pool(&self) -> &Arc<MemoryPool> {
        &self.pool
    }

    /// Grows by `n` bytes if the pool has them now; never blocks. On failure nothing changes and the
    /// error names this owner, the request, and the pool's state.
    pub fn try_grow(&self, n: u64) -> Result<(), MemoryError> {
        let mut state = self.pool.lock();
        self.try_grow_locked(&mut state, n)
    }

    /// Grows by `n` bytes if `keep_free` bytes of the pool stay free afterwards (left for a consumer
    /// that has no other place to go, such as record metadata); never blocks.
    pub fn try_grow_leaving(&self, n: u64, keep_free: u64) -> Result<(), MemoryError> {
        let mut state = self.pool.lock();
        if state.reserved.saturating_add(n).saturating_add(keep_free) > self.pool.limit {
            return Err(MemoryError::ResourcesExhausted {
                owner: self.owner.clone(),
                requested: n,
                reserved: state.reserved,
                limit: self.pool.limit,
            });
        }
        self.try_grow_locked(&mut state, n)
    }

    /// Grows by `n` bytes, blocking until other reservations free enough or `cancel` is set. A request
    /// that cannot fit even if every *other* reservation were freed (`size() + n > limit`) fails at
    /// once instead of waiting forever. Waiters are not queued: a smaller request may be served first.
    /// (A consumer that waits while holding other reservations can still deadlock with another such
    /// consumer; prefer `try_grow` and spilling where possible.)
    pub fn grow_wait(&self, n: u64, cancel: &AtomicBool) -> Result<(), MemoryError> {
        self.grow_wait_leaving(n, 0, cancel)
    }

    /// [`grow_wait`](Self::grow_wait), but waits until `keep_free` bytes of the pool also stay free
    /// afterwards (for consumers of a shared pool that must always find a little room).
    pub fn grow_wait_leaving(&self, n: u64, keep_free: u64, cancel: &AtomicBool) -> Result<(), MemoryError> {
        if n == 0 {
            return Ok(());
        }
        let keep_free = keep_free.min(self.pool.limit.saturating_sub(self.size().saturating_add(n)));
        let mut state = self.pool.lock();
        loop {
            let held = self.size();
            if held.checked_add(n).is_none_or(|total| total > self.pool.limit) {
                return Err(MemoryError::ExceedsLimit {
                    owner: self.owner.clone(),
                    requested: n,
                    held,
                    limit: self.pool.limit,
                });
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(MemoryError::Cancelled { owner: self.owner.clone(), requested: n });
            }
            if state.reserved.saturating_add(n).saturating_add(keep_free) <= self.pool.limit
                && self.try_grow_locked(&mut state, n).is_ok()
            {
                return Ok(());
            }
            state = self.pool.freed.wait_timeout(state, WAIT_POLL).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Gives back `n` bytes (at most what is held; asking for more is a bug, caught in debug builds).
    pub fn shrink(&self, n: u64) {
        let mut state = self.pool.lock();
        self.shrink_locked(&mut state, n);
    }

    /// Sets the size to `n`, atomically: shrinking always succeeds, growing is a
    /// [`try_grow`](Self::try_grow) of the difference.
    pub fn resize(&self, n: u64) -> Result<(), MemoryError> {
        let mut state = self.pool.lock();
        let held = self.size();
        if n >= held {
            self.try_grow_locked(&mut state, n - held)
        } else {
            self.shrink_locked(&mut state, held - n);
            Ok(())
        }
    }

    /// Moves `n` of the bytes held (at most all of them) into a new reservation of the same owner and pool,
    /// under the pool's lock: the pool's total does not change, so no other consumer can take them in
    /// between (a buffer handed to another thread takes its memory along).
    pub fn split(&self, n: u64) -> MemoryReservation {
        let _state = self.pool.lock();
        let n = n.min(self.size());
        self.size.fetch_sub(n, Ordering::AcqRel);
        MemoryReservation { pool: Arc::clone(&self.pool), owner: self.owner.clone(), size: AtomicU64::new(n) }
    }

    /// Takes over the bytes `other` (of the same pool) holds, under the pool's lock: the reverse of
    /// [`split`](Self::split), for memory handed back by another thread.
    pub fn absorb(&self, other: MemoryReservation) {
        debug_assert!(Arc::ptr_eq(&self.pool, &other.pool), "{}: absorbing another pool's bytes", self.owner);
        let _state = self.pool.lock();
        let n = other.size.swap(0, Ordering::AcqRel);
        self.size.fetch_add(n, Ordering::AcqRel);
    }

    /// Gives back everything; returns how many bytes were held.
    pub fn free(&self) -> u64 {
        let mut state = self.pool.lock();
        let held = self.size();
        self.shrink_locked(&mut state, held);
        held
    }

    fn try_grow_locked(&self, state: &mut PoolState, n: u64) -> Result<(), MemoryError> {
        if n == 0 {
            return Ok(());
        }
        if self.pool.grant(state, n) {
            self.size.fetch_add(n, Ordering::AcqRel);
            Ok(())
        } else {
            Err(MemoryError::ResourcesExhausted {
                owner: self.owner.clone(),
                requested: n,
                reserved: state.reserved,
                limit: self.pool.limit,
            })
        }
    }

    fn shrink_locked(&self, state: &mut PoolState, n: u64) {
        let held = self.size();
        debug_assert!(n <= held, "{}: shrinking {n} bytes of a {held} byte reservation", self.owner);
        let n = n.min(held);
        if n == 0 {
            return;
        }
        self.size.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(state.reserved >= n, "memory pool underflow: releasing {n} of {}", state.reserved);
        state.reserved = state.reserved.saturating_sub(n);
        self.pool.freed.notify_all();
    }
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        self.free();
    }
}

impl fmt::Debug for MemoryReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryReservation").field("owner", &self.owner).field("size", &self.size()).finish()
    }
}

/// Where a [`MemoryLimit`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitSource {
    /// `DSORT_MEMORY_LIMIT`, below the cgroup limit and RAM.
    Env,
    /// A cgroup v2 `memory.max` below physical RAM.
    CgroupV2,
    /// A cgroup v1 `memory.limit_in_bytes` below physical RAM.
    CgroupV1,
    /// No (smaller) cgroup limit: `MemTotal`, or [`FALLBACK_MEMORY_LIMIT`] when even that is unknown.
    Physical,
}

impl fmt::Display for LimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitSource::Env => MEMORY_LIMIT_ENV,
            LimitSource::CgroupV2 => "cgroup v2 memory.max",
            LimitSource::CgroupV1 => "cgroup v1 memory.limit_in_bytes",
            LimitSource::Physical => "physical memory",
        })
    }
}

/// The memory this process may use, and why. Invariant: `bytes > 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub source: LimitSource,
}

/// The memory limit of this process: the smallest of `DSORT_MEMORY_LIMIT`, cgroups and RAM. An invalid
/// `DSORT_MEMORY_LIMIT` is ignored here; use [`try_detect_memory_limit`] to report it instead.
pub fn detect_memory_limit() -> MemoryLimit {
    detect_memory_limit_in(Path::new("/"), std::env::var(MEMORY_LIMIT_ENV).ok())
}

/// Like [`detect_memory_limit`], but an invalid `DSORT_MEMORY_LIMIT` is an error (for the CLI).
pub fn try_detect_memory_limit() -> Result<MemoryLimit, MemoryError> {
    try_detect_memory_limit_in(Path::new("/"), std::env::var(MEMORY_LIMIT_ENV).ok())
}

/// [`detect_memory_limit`] against a file-system root (a fake one in tests) and a given value of
/// `DSORT_MEMORY_LIMIT`. An invalid value is ignored.
pub fn detect_memory_limit_in(root: &Path, env: Option<String>) -> MemoryLimit {
    try_detect_memory_limit_in(root, env).unwrap_or_else(|_| detect_system_limit(root))
}

/// [`try_detect_memory_limit`] against a file-system root and a given value of `DSORT_MEMORY_LIMIT`
/// (empty = absent). The variable can only lower the limit: a value above the cgroup's is configuration
/// that the kernel would not honour.
pub fn try_detect_memory_limit_in(root: &Path, env: Option<String>) -> Result<MemoryLimit, MemoryError> {
    if let Some(value) = env.filter(|v| !v.trim().is_empty()) {
        let bytes = parse_size(&value)
            .map_err(|e: SizeError| MemoryError::InvalidEnv { value: value.clone(), reason: e.to_string() })?;
        if bytes == 0 {
            return Err(MemoryError::InvalidEnv { value, reason: "must be more than 0 bytes".to_string() });
        }
        let system = detect_system_limit(root);
        return Ok(if bytes < system.bytes { MemoryLimit { bytes, source: LimitSource::Env } } else { system });
    }
    Ok(detect_system_limit(root))
}

/// The budget in bytes for `max_mem_usage` = `q` under `limit`.
pub fn budget(limit: &MemoryLimit, q: &MemQuantity) -> u64 {
    q.resolve(limit.bytes)
}

/// The process's peak resident set size (`VmHWM`), for summaries; `None` where `/proc` is missing.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib(&std::fs::read_to_string("/proc/self/status").ok()?, "VmHWM:")
}

/// The process's current resident set size (`VmRSS`); `None` where `/proc` is missing.
pub fn current_rss_bytes() -> Option<u64> {
    status_kib(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS:")
}

/// A `Key:   1234 kB` line of `/proc/self/status` or `/proc/meminfo`, in bytes.
fn status_kib(text: &str, key: &str) -> Option<u64> {
    let rest = text.lines().find_map(|line| line.strip_prefix(key))?;
    let mut words = rest.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some(unit) if unit.eq_ignore_ascii_case("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// cgroup limits (v2 and v1, whichever are present) capped at `MemTotal`.
fn detect_system_limit(root: &Path) -> MemoryLimit {
    let physical = std::fs::read_to_string(root.join("proc/meminfo"))
        .ok()
        .and_then(|text| status_kib(&text, "MemTotal:"))
        .filter(|&b| b > 0);
    let cgroup = cgroup_limit(root);
    match (cgroup, physical) {
        (Some((bytes, source)), Some(ram)) if bytes < ram => MemoryLimit { bytes, source },
        (Some((bytes, source)), None) => MemoryLimit { bytes, source },
        (_, Some(ram)) => MemoryLimit { bytes: ram, source: LimitSource::Physical },
        (None, None) => MemoryLimit { bytes: FALLBACK_MEMORY_LIMIT, source: LimitSource::Physical },
    }
}

/// One line of `/proc/self/mountinfo` that mounts a cgroup hierarchy.
#[derive(Debug)]
struct CgroupMount {
    /// The cgroup path mounted there (`/` unless the mount is of a sub-tree).
    root: String,
    /// Where it is mounted, absolute in the (real) file system.
    mount_point: String,
    /// `cgroup2`, or `cgroup` for v1.
    fs_type: String,
    /// Super options; v1 lists its controllers there (`rw,memory`).
    super_options: String,
}

/// The smallest finite cgroup memory limit that applies to this process, v2 and v1 alike (a hybrid
/// host may have the memory controller in either hierarchy), with where it came from.
fn cgroup_limit(root: &Path) -> Option<(u64, LimitSource)> {
    let membership = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    let mounts = std::fs::read_to_string(root.join("proc/self/mountinfo"))
        .map(|text| parse_mountinfo(&text))
        .unwrap_or_default();

    let mut best: Option<(u64, LimitSource)> = None;
    let mut consider = |found: Option<u64>, source| {
        if let Some(bytes) = found.filter(|&b| b > 0)
            && best.is_none_or(|(b, _)| bytes < b)
        {
            best = Some((bytes, source));
        }
    };

    // v2: the `0::<path>` line.
    if let Some(path) = membership.lines().find_map(|l| l.strip_prefix("0::")) {
        let mount = mounts.iter().find(|m| m.fs_type == "cgroup2");
        let (mount_root, mount_point) = mount.map_or(("/", "/sys/fs/cgroup"), |m| (&m.root, &m.mount_point));
        consider(walk_up_min(root, mount_root, mount_point, path, "memory.max", parse_v2), LimitSource::CgroupV2);
    }
    // v1: the `N:...memory...:<path>` line.
    let v1_path = membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then_some(path)
    });
    if let Some(path) = v1_path {
        let mount = mounts.iter().find(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == "memory"));
        let (mount_root, mount_point) = mount.map_or(("/", "/sys/fs/cgroup/memory"), |m| (&m.root, &m.mount_point));
        consider(
            walk_up_min(root, mount_root, mount_point, path, "memory.limit_in_bytes", parse_v1),
            LimitSource::CgroupV1,
        );
    }
    best
}

/// `max` = unlimited, else bytes.
fn parse_v2(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" { None } else { t.parse().ok() }
}

/// Bytes, with huge values meaning unlimited.
fn parse_v1(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&b| b <= CGROUP_V1_UNLIMITED)
}

/// The minimum of `file` over the process's cgroup directory and each ancestor up to the mount point.
/// A cgroup path outside the mounted sub-tree (another cgroup namespace) falls back to the mount point.
fn walk_up_min(
    root: &Path,
    mount_root: &str,
    mount_point: &str,
    cgroup_path: &str,
    file: &str,
    parse: fn(&str) -> Option<u64>,
) -> Option<u64> {
    let base = root.join(mount_point.trim_start_matches('/'));
    let relative = relative_cgroup_path(mount_root, cgroup_path.trim());
    let dir = base.join(relative);
    let mut min: Option<u64> = None;
    for d in dir.ancestors().take_while(|d| d.starts_with(&base)) {
        if let Some(v) = std::fs::read_to_string(d.join(file)).ok().as_deref().and_then(parse) {
            min = Some(min.map_or(v, |m| m.min(v)));
        }
    }
    min
}

/// `cgroup_path` relative to the mount's root, or empty (the mount point itself) when it is not below it.
fn relative_cgroup_path(mount_root: &str, cgroup_path: &str) -> PathBuf {
    let path = Path::new(cgroup_path);
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return PathBuf::new();
    }
    match path.strip_prefix(mount_root) {
        Ok(rel) => rel.to_path_buf(),
        Err(_) => PathBuf::new(),
    }
}

/// The cgroup mounts of a `mountinfo` text (`id parent maj:min root mount-point options [optional...] -
/// fs-type source super-options`).
fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split_whitespace().collect();
            let mut right = right.split_whitespace();
            let fs_type = right.next()?;
            if fs_type != "cgroup" && fs_type != "cgroup2" {
                return None;
            }
            let _source = right.next()?;
            let super_options = right.next().unwrap_or("");
            Some(CgroupMount {
                root: unescape_mountinfo(left.get(3)?),
                mount_point: unescape_mountinfo(left.get(4)?),
                fs_type: fs_type.to_string(),
                super_options: super_options.to_string(),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let code = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(code as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::thread;
    use std::time::Instant;

    const GIB: u64 = 1 << 30;

    #[test]
    fn split_moves_bytes_without_changing_the_pool_total() {
        let pool = MemoryPool::new(1000);
        let r = pool.reservation("sorter");
        r.try_grow(700).unwrap();
        let part = r.split(400);
        assert_eq!((r.size(), part.size(), pool.reserved(), part.owner()), (300, 400, 700, "sorter"));
        let back = r.split(100);
        r.absorb(back);
        assert_eq!((r.size(), pool.reserved()), (300, 700), "absorbed back, the total unchanged");
        assert_eq!(r.split(5000).size(), 300, "at most what is held");
        assert_eq!((r.size(), pool.reserved()), (0, 400), "the dropped part gave its bytes back");
        drop(part);
        assert_eq!((pool.reserved(), pool.peak()), (0, 700));
    }

    #[test]
    fn try_grow_leaving_keeps_the_share_free_and_does_not_inflate_the_peak() {
        let pool = MemoryPool::new(1000);
        let other = pool.reservation("sorter");
        other.try_grow(500).unwrap();
        let r = pool.reservation("metadata of a.tar");
        r.try_grow_leaving(300, 200).unwrap();
        assert_eq!((r.size(), pool.reserved(), pool.peak()), (300, 800, 800));
        let err = r.try_grow_leaving(1, 200).unwrap_err();
        assert!(matches!(err, MemoryError::ResourcesExhausted { requested: 1, .. }), "{err}");
        assert_eq!(r.size(), 300, "a refused request changes nothing");
        r.try_grow(200).unwrap(); // plain growth may still take the share
        assert_eq!(pool.peak(), 1000);
    }

    struct FreeOnSpill(MemoryReservation, std::sync::atomic::AtomicUsize);
    impl Spill for FreeOnSpill {
        fn spill(&self) -> Result<(), String> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.free();
            Ok(())
        }
    }

    #[test]
    fn request_spill_asks_the_registered_spiller_while_it_lives() {
        let pool = MemoryPool::new(1000);
        assert_eq!(pool.request_spill(), Ok(false), "no spiller");
        let held = pool.reservation("sorter");
        held.try_grow(900).unwrap();
        let spiller = Arc::new(FreeOnSpill(held, std::sync::atomic::AtomicUsize::new(0)));
        let weak: Weak<dyn Spill> = Arc::downgrade(&spiller) as Weak<dyn Spill>;
        pool.set_spiller(weak);
        let r = pool.reservation("metadata");
        assert!(r.try_grow(500).is_err());
        assert_eq!(pool.request_spill(), Ok(true));
        assert_eq!(spiller.1.load(Ordering::Relaxed), 1);
        r.try_grow(500).unwrap();
        drop(spiller);
        assert_eq!(pool.request_spill(), Ok(false), "the pool does not keep its spiller alive");
    }

    #[test]
    fn try_grow_respects_limit_and_names_owner() {
        let pool = MemoryPool::new(1000);
        let a = pool.reservation("sorter[0]");
        let b = pool.reservation("creator");
        a.try_grow(600).unwrap();
        b.try_grow(400).unwrap();
        let err = b.try_grow(1).unwrap_err();
        assert_eq!(
            err,
            MemoryError::ResourcesExhausted { owner: "creator".into(), requested: 1, reserved: 1000, limit: 1000 }
        );
        let msg = err.to_string();
        assert!(msg.contains("creator") && msg.contains("1000 B") && msg.contains("0 B free"), "{msg}");
        assert_eq!(b.size(), 400);
        assert_eq!(pool.reserved(), 1000);
        assert_eq!(a.free(), 600);
        assert_eq!(pool.reserved(), 400);
        b.resize(900).unwrap();
        assert_eq!(pool.reserved(), 900);
        b.resize(100).unwrap();
        assert_eq!((b.size(), pool.reserved()), (100, 100));
        b.shrink(50);
        drop(b);
        assert_eq!(pool.reserved(), 0);
        assert_eq!(pool.peak(), 1000);
        assert!(a.try_grow(u64::MAX).is_err(), "overflowing request must fail, not wrap");
    }

    #[test]
    fn grow_wait_fails_at_once_when_it_can_never_fit() {
        let pool = MemoryPool::new(100);
        let r = pool.reservation("big");
        let cancel = AtomicBool::new(false);
        let start = Instant::now();
        assert!(matches!(r.grow_wait(101, &cancel), Err(MemoryError::ExceedsLimit { .. })));
        r.try_grow(60).unwrap();
        assert!(matches!(r.grow_wait(41, &cancel), Err(MemoryError::ExceedsLimit { held: 60, .. })));
        assert!(start.elapsed() < Duration::from_secs(1));
        r.grow_wait(40, &cancel).unwrap();
        assert_eq!(pool.reserved(), 100);
    }

    #[test]
    fn grow_wait_blocks_until_freed() {
        let pool = MemoryPool::new(100);
        let holder = pool.reservation("holder");
        holder.try_grow(80).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let waiter = {
            let pool = Arc::clone(&pool);
            let cancel = Arc::clone(&cancel);
            thread::spawn(move || {
                let r = pool.reservation("waiter");
                r.grow_wait(50, &cancel).map(|()| r.size())
            })
        };
        thread::sleep(Duration::from_millis(30));
        assert_eq!(pool.reserved(), 80, "the waiter must not get memory that is not free");
        holder.shrink(40);
        assert_eq!(waiter.join().unwrap(), Ok(50));
        assert_eq!(pool.reserved(), 40);
    }

    #[test]
    fn grow_wait_leaving_waits_until_the_rest_stays_free() {
        let pool = MemoryPool::new(100);
        let holder = pool.reservation("holder");
        holder.try_grow(60).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        // Fits (60 + 20 + 20 <= 100): granted at once.
        let now = pool.reservation("now");
        now.grow_wait_leaving(20, 20, &cancel).unwrap();
        now.free();
        let waiter = {
            let pool = Arc::clone(&pool);
            let cancel = Arc::clone(&cancel);
            thread::spawn(move || {
                let r = pool.reservation("waiter");
                r.grow_wait_leaving(20, 30, &cancel).map(|()| r.size())
            })
        };
        // 60 + 20 would fit, but not with 30 left free: the waiter gets nothing until the holder shrinks.
        holder.shrink(10);
        assert_eq!(waiter.join().unwrap(), Ok(20));
        assert_eq!(pool.reserved(), 50, "the waiter's reservation went back with it");
    }

    #[test]
    fn grow_wait_is_cancellable() {
        let pool = MemoryPool::new(100);
        let holder = pool.reservation("holder");
        holder.try_grow(100).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let waiter = {
            let pool = Arc::clone(&pool);
            let cancel = Arc::clone(&cancel);
            thread::spawn(move || pool.reservation("waiter").grow_wait(10, &cancel))
        };
        thread::sleep(Duration::from_millis(20));
        cancel.store(true, Ordering::Relaxed);
        pool.notify_waiters();
        let err = waiter.join().unwrap().unwrap_err();
        assert_eq!(err, MemoryError::Cancelled { owner: "waiter".into(), requested: 10 });
        assert_eq!(pool.reserved(), 100);
    }

    #[test]
    fn concurrent_use_never_exceeds_the_limit() {
        const LIMIT: u64 = 10_000;
        let pool = MemoryPool::new(LIMIT);
        let cancel = Arc::new(AtomicBool::new(false));
        let granted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let pool = Arc::clone(&pool);
                let cancel = Arc::clone(&cancel);
                let granted = Arc::clone(&granted);
                thread::spawn(move || {
                    let r = pool.reservation(&format!("worker[{t}]"));
                    let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for i in 0..3000u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let n = x % 1500 + 1;
                        // Waiting while holding memory could deadlock (every thread waiting on the others),
                        // so a waiter first gives back what it holds: the rule the engine follows too.
                        let ok = if i % 3 == 0 {
                            r.free();
                            r.grow_wait(n, &cancel).is_ok()
                        } else {
                            r.try_grow(n).is_ok()
                        };
                        if ok {
                            granted.fetch_add(n, Ordering::Relaxed);
                        }
                        assert!(pool.reserved() <= LIMIT);
                        if r.size() > 0 {
                            let back = x % r.size() + 1;
                            r.shrink(back);
                        }
                        if i % 7 == 0 {
                            r.free();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.reserved(), 0);
        assert!(pool.peak() <= LIMIT && pool.peak() > 0);
        assert!(granted.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn one_reservation_shared_by_threads() {
        let pool = MemoryPool::new(1000);
        let shared = Arc::new(pool.reservation("shared"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = Arc::clone(&shared);
                thread::spawn(move || {
                    for i in 0..2000u64 {
                        if r.try_grow(i % 7 + 1).is_ok() {
                            r.shrink(i % 7 + 1);
                        }
                    }
                    r.try_grow(100).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!((shared.size(), pool.reserved()), (400, 400));
        drop(shared);
        assert_eq!(pool.reserved(), 0);
    }

    /// Writes `files` (path relative to `root`, content) into `root`.
    fn fake_root(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        dir
    }

    const MEMINFO_8G: &str = "MemTotal:        8388608 kB\nMemFree:         1000 kB\n";

    #[test]
    fn cgroup_v2_walks_ancestors_taking_the_minimum() {
        let root = fake_root(&[
            ("proc/meminfo", MEMINFO_8G),
            ("proc/self/cgroup", "0::/kubepods/pod1/ctr\n"),
            ("proc/self/mountinfo", "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"),
            ("sys/fs/cgroup/kubepods/memory.max", "max\n"),
            ("sys/fs/cgroup/kubepods/pod1/memory.max", "2147483648\n"),
            ("sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n"),
        ]);
        let limit = detect_memory_limit_in(root.path(), None);
        assert_eq!(limit, MemoryLimit { bytes: 2 * GIB, source: LimitSource::CgroupV2 });

        // The container's own limit is smaller still.
        fs::write(root.path().join("sys/fs/cgroup/kubepods/pod1/ctr/memory.max"), "1073741824").unwrap();
        assert_eq!(detect_memory_limit_in(root.path(), None).bytes, GIB);
    }

    #[test]
    fn cgroup_v2_namespaced_and_conventional_layout() {
        // cgroupns=private: the process sees `0::/` and the limit sits at the mount point; no mountinfo.
        let root = fake_root(&[
            ("proc/meminfo", MEMINFO_8G),
            ("proc/self/cgroup", "0::/\n"),
            ("sys/fs/cgroup/memory.max", "536870912\n"),
        ]);
        assert_eq!(
            detect_memory_limit_in(root.path(), None),
            MemoryLimit { bytes: 512 << 20, source: LimitSource::CgroupV2 }
        );
    }

    #[test]
    fn cgroup_v2_unlimited_is_physical_and_large_limits_are_capped() {
        let root = fake_root(&[
            ("proc/meminfo", MEMINFO_8G),
            ("proc/self/cgroup", "0::/a\n"),
            ("sys/fs/cgroup/a/memory.max", "max\n"),
        ]);
        assert_eq!(
            detect_memory_limit_in(root.path(), None),
            MemoryLimit { bytes: 8 * GIB, source: LimitSource::Physical }
        );
        fs::write(root.path().join("sys/fs/cgroup/a/memory.max"), (64 * GIB).to_string()).unwrap();
        assert_eq!(
            detect_memory_limit_in(root.path(), None),
            MemoryLimit { bytes: 8 * GIB, source: LimitSource::Physical }
        );
    }

    #[test]
    fn cgroup_v1_hybrid_like_this_machine() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let root = fake_root(&[
            ("proc/meminfo", MEMINFO_8G),
            ("proc/self/cgroup", "4:memory:/process_api/abc\n1:cpu:/\n0::/\n"),
            ("proc/self/mountinfo", mountinfo),
            ("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("sys/fs/cgroup/memory/process_api/memory.limit_in_bytes", "3221225472\n"),
            ("sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes", "9223372036854771712\n"),
        ]);
        assert_eq!(
            detect_memory_limit_in(root.path(), None),
            MemoryLimit { bytes: 3 * GIB, source: LimitSource::CgroupV1 }
        );
        // Everything unlimited: physical RAM.
        fs::write(root.path().join("sys/fs/cgroup/memory/process_api/memory.limit_in_bytes"), "9223372036854771712")
            .unwrap();
        assert_eq!(
            detect_memory_limit_in(root.path(), None),
            MemoryLimit { bytes: 8 * GIB, source: LimitSource::Physical }
        );
    }

    #[test]
    fn cgroup_v1_mounted_subtree_and_escaped_mount_point() {
        // Docker-style: the hierarchy is mounted from the container's cgroup, so the process path
        // (`/docker/ctr`) equals the mount root and the limit is at the mount point.
        let root = fake_root(&[
            ("proc/meminfo", MEMINFO_8G),
            ("proc/self/cgroup", "9:memory:/docker/ctr\n"),
            ("proc/self/mountinfo", "50 40 0:44 /docker/ctr /sys/fs/cgroup/my\\040mem ro - cgroup cgroup rw,memory\n"),
            ("sys/fs/cgroup/my mem/memory.limit_in_bytes", "1073741824\n"),
        ]);
        assert_eq!(
            detect_memory_limit_in(root.path(), None),
            MemoryLimit { bytes: GIB, source: LimitSource::CgroupV1 }
        );
    }

    #[test]
    fn env_lowers_the_limit_and_invalid_env_is_reported() {
        let root = fake_root(&[
            ("proc/meminfo", MEMINFO_8G),
            ("proc/self/cgroup", "0::/\n"),
            ("sys/fs/cgroup/memory.max", "1073741824\n"),
        ]);
        // Above the cgroup limit (the kernel would kill us first): the cgroup wins.
        assert_eq!(
            detect_memory_limit_in(root.path(), Some("2GiB".into())),
            MemoryLimit { bytes: GIB, source: LimitSource::CgroupV2 }
        );
        assert_eq!(
            detect_memory_limit_in(root.path(), Some("12345".into())),
            MemoryLimit { bytes: 12345, source: LimitSource::Env }
        );
        assert_eq!(detect_memory_limit_in(root.path(), Some(" ".into())).source, LimitSource::CgroupV2);
        let err = try_detect_memory_limit_in(root.path(), Some("lots".into())).unwrap_err();
        assert!(err.to_string().starts_with("DSORT_MEMORY_LIMIT=\"lots\""), "{err}");
        assert!(try_detect_memory_limit_in(root.path(), Some("0".into())).is_err());
        // The infallible variant falls back to detection.
        assert_eq!(detect_memory_limit_in(root.path(), Some("lots".into())).source, LimitSource::CgroupV2);
    }

    #[test]
    fn nothing_readable_falls_back() {
        let root = fake_root(&[]);
        assert_eq!(
            detect_memory_limit_in(root.path(), None),
            MemoryLimit { bytes: FALLBACK_MEMORY_LIMIT, source: LimitSource::Physical }
        );
    }

    #[test]
    fn real_detection_and_rss() {
        let limit = detect_memory_limit_in(Path::new("/"), None);
        assert!(limit.bytes > 0, "{limit:?}");
        assert!(detect_memory_limit().bytes > 0);
        if Path::new("/proc/self/status").exists() {
            assert!(peak_rss_bytes().unwrap() > 0);
            assert!(current_rss_bytes().unwrap() > 0);
        }
    }

    #[test]
    fn budget_is_a_share_of_the_limit() {
        let limit = MemoryLimit { bytes: 10 * GIB, source: LimitSource::Physical };
        assert_eq!(budget(&limit, &MemQuantity::Percent(80)), 8 * GIB);
        assert_eq!(budget(&limit, &MemQuantity::Bytes(GIB)), GIB);
        assert_eq!(budget(&limit, &MemQuantity::Bytes(20 * GIB)), 10 * GIB);
    }

    #[test]
    fn status_parsing() {
        assert_eq!(status_kib("Name:\tx\nVmHWM:\t    2076 kB\n", "VmHWM:"), Some(2076 * 1024));
        assert_eq!(status_kib("VmHWM: 12\n", "VmHWM:"), Some(12));
        assert_eq!(status_kib("VmHWM: x kB\n", "VmHWM:"), None);
        assert_eq!(status_kib("", "VmHWM:"), None);
        assert_eq!(unescape_mountinfo("a\\040b\\"), "a b\\");
    }
}
