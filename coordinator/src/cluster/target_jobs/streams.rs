//! `bytes`: record bytes between targets, served by a holder (only shards it holds for the job) and read by a
//! creator over one stream per holder at a time, split into its shards' segments, each read as a blocking
//! reader with bounded buffering; and the creator's end of `shardrecs` streams.

use super::*;
use std::collections::VecDeque;

/// Chunks of a `bytes` reply, and the most a creator buffers per stream (backpressure: a creator that writes
/// slowly slows the holder's reads down); the creator pays the buffer from the pool.
pub(super) const BYTES_CHUNK: usize = 256 << 10;
pub(super) const STREAM_BUFFER: u64 = 16 * BYTES_CHUNK as u64;

/// A read-only memory map of a whole file, as `Bytes` (slices share the map; unmapped with the last one).
pub(super) fn map_file(path: &std::path::Path) -> StepResult<Bytes> {
    let f = std::fs::File::open(path).map_err(StepError::path(path))?;
    if f.metadata().map_err(StepError::path(path))?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the file is an input shard in this target's store or a spill file of this job. Objects are
    // only ever replaced by rename (a new inode), never truncated or rewritten in place, so the mapped
    // pages stay valid for the map's life.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(StepError::path(path))?;
    Ok(Bytes::from_owner(map))
}

/// The memory a job's outgoing streams (`bytes`, `shardrecs`) may hold in flight on this target: reserved
/// from the pool once, handed out as permits of a byte each. A permit travels with its buffer and comes back
/// when the buffer is dropped (written to the socket), so readers that stall stop their holder at this
/// budget instead of growing its memory.
pub(super) struct Serving {
    permits: Arc<tokio::sync::Semaphore>,
    limit: u64,
    _mem: dsort::memory::MemoryReservation,
}

/// A buffer of an outgoing stream with the permits that pay for it (see [`Serving`]).
struct Charged<T> {
    buf: T,
    _ticket: Ticket,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Charged<T> {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref()
    }
}

/// Permits of a [`Serving`] budget for `bytes` of a buffer; counted in the metrics while held.
pub(super) struct Ticket {
    _permit: tokio::sync::OwnedSemaphorePermit,
    bytes: u64,
    metrics: Arc<NodeMetrics>,
}

impl Ticket {
    /// `buf` in flight, paid by this ticket (returned when the last slice of it is dropped).
    pub(super) fn carry<T: AsRef<[u8]> + Send + 'static>(self, buf: T) -> Bytes {
        Bytes::from_owner(Charged { buf, _ticket: self })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.metrics.buffered(self.bytes, false);
    }
}

impl TargetJobs {
    /// The job's serving budget: a sixteenth of the pool's budget, at most [`SERVING_MAX`], at least the
    /// floor reserved at the job's start ([`serving_floor`]), grown past the floor at the first outgoing
    /// stream only while a quarter of the pool stays free (halved until it fits, else the floor alone), so a
    /// busy pool slows the job's streams down instead of failing them.
    pub(super) fn serving(&self, job: &TJob) -> StepResult<Arc<Serving>> {
        let mut g = job.serving.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = g.as_ref() {
            return Ok(s.clone());
        }
        let floor = job.serving_floor.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mem = match floor {
            Some(mem) => mem,
            None => serving_floor(&job.pool)?,
        };
        let want = (job.pool.limit() / 16).clamp(SERVING_MIN, SERVING_MAX);
        let mut more = want.saturating_sub(mem.size());
        while more >= BYTES_CHUNK as u64 && mem.try_grow_leaving(more, job.pool.limit() / 4).is_err() {
            more /= 2;
        }
        let limit = mem.size();
        let permits = Arc::new(tokio::sync::Semaphore::new(limit as usize));
        let s = Arc::new(Serving { permits, limit, _mem: mem });
        *g = Some(s.clone());
        Ok(s)
    }

    /// Permits for a buffer of `bytes` (all of the budget for one larger than it), waited for on the
    /// runtime: the stream's task waits, no thread does.
    pub(super) async fn ticket(&self, serving: &Serving, bytes: u64) -> StepResult<Ticket> {
        let n = bytes.clamp(1, serving.limit) as u32;
        let permit = serving
            .permits
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|e| StepError::protocol(format!("outgoing stream budget: {e}")))?;
        self.metrics.buffered(bytes, true);
        Ok(Ticket { _permit: permit, bytes, metrics: self.metrics.clone() })
    }
}

/// The most one job's outgoing streams hold in flight on a target.
const SERVING_MAX: u64 = 64 << 20;
/// The least: two chunks, reserved when the job starts on a target ([`serving_floor`]).
const SERVING_MIN: u64 = 2 * BYTES_CHUNK as u64;

/// The floor of a job's serving budget, reserved at its start with its sorters' headroom: a job the pool
/// cannot serve is refused before it works, never failed mid-stream by the jobs running beside it.
pub(super) fn serving_floor(pool: &Arc<MemoryPool>) -> StepResult<dsort::memory::MemoryReservation> {
    let mem = pool.reservation("outgoing streams");
    mem.try_grow(SERVING_MIN).map_err(|source| {
        StepError::NoMemory(dsort::extsort::SortError::Memory {
            context: format!("needs {} for the buffers of its outgoing streams", dsort::format_size(SERVING_MIN)),
            source,
        })
    })?;
    Ok(mem)
}

pub(super) type BytesSender = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// The creator's end of a `bytes` stream, as a blocking reader (called from creation threads, never from
/// the async runtime). Counts the entry bytes received (`metrics`: a `bytes` stream).
pub(super) struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
    metrics: Option<Arc<NodeMetrics>>,
    /// The runtime (for a timed wait) and the job's cancel flag: a reader waiting on a peer that stopped
    /// answering notices the job's abort within [`CANCEL_POLL`], not at the stream's idle deadline.
    wait: (tokio::runtime::Handle, Arc<AtomicBool>),
}

/// How often a waiting [`StreamReader`] looks at its job's cancel flag.
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(200);

impl StreamReader {
    /// A reader of chunks sent into the returned sender, at most `queued` of them ahead of it, counted as
    /// received entry bytes in `metrics` when given (a `bytes` stream's).
    pub(super) fn channel(
        queued: usize,
        metrics: Option<&Arc<NodeMetrics>>,
        rt: &tokio::runtime::Handle,
        cancel: &Arc<AtomicBool>,
    ) -> (tokio::sync::mpsc::Sender<Result<Bytes, String>>, StreamReader) {
        let (tx, rx) = tokio::sync::mpsc::channel(queued.max(1));
        let wait = (rt.clone(), cancel.clone());
        (tx, StreamReader { rx, cur: Bytes::new(), metrics: metrics.cloned(), wait })
    }

    /// The next chunk: at once when one is queued, else waited for in steps of [`CANCEL_POLL`] until it
    /// comes, the stream ends (`None`) or the job is cancelled (an error).
    fn next_chunk(&mut self) -> std::io::Result<Option<Result<Bytes, String>>> {
        use tokio::sync::mpsc::error::TryRecvError;
        match self.rx.try_recv() {
            Ok(chunk) => return Ok(Some(chunk)),
            Err(TryRecvError::Disconnected) => return Ok(None),
            Err(TryRecvError::Empty) => {}
        }
        let (rt, cancel) = (&self.wait.0, &self.wait.1);
        loop {
            // The timer is made inside the runtime (a `timeout` built out here would find no reactor).
            let rx = &mut self.rx;
            if let Ok(got) = rt.block_on(async { tokio::time::timeout(CANCEL_POLL, rx.recv()).await }) {
                return Ok(got);
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("the job was aborted"));
            }
        }
    }
}

impl BufRead for StreamReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.cur.is_empty() {
            match self.next_chunk()? {
                Some(Ok(b)) => {
                    if let Some(m) = &self.metrics {
                        m.received(b.len() as u64);
                    }
                    self.cur = b;
                }
                Some(Err(m)) => return Err(std::io::Error::other(m)),
                None => break,
            }
        }
        Ok(&self.cur)
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.cur.len());
        bytes::Buf::advance(&mut self.cur, n);
    }
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_buffered(self, buf)
    }
}

/// `Read::read` of a reader whose buffer is its [`BufRead`] (the streams' readers): copies what is buffered.
pub(super) fn read_buffered(r: &mut impl BufRead, buf: &mut [u8]) -> std::io::Result<usize> {
    let avail = r.fill_buf()?;
    let n = buf.len().min(avail.len());
    buf[..n].copy_from_slice(&avail[..n]);
    r.consume(n);
    Ok(n)
}

/// Entry bytes for a creator, streamed as they are read (see [`TargetJobs::stream_bytes`]); an error cuts
/// the stream short, which the creator reports naming this target.
pub(super) async fn bytes_route(
    State(s): State<Arc<TargetJobs>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let job = s.job(&id)?;
    check_wanted(&job, &body).map_err(|e| s.err(e))?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let s2 = s.clone();
    // A task on the runtime, not a thread: it waits for the creator without holding one.
    tokio::spawn(async move {
        if let Err(e) = s2.stream_bytes(&job, &body, &tx).await {
            let m = format!("target {}: serving record bytes: {e}", s2.target.id());
            if !job.cancel.load(Ordering::Relaxed) {
                job.info().metrics.errors.push(m.clone());
            }
            let _ = tx.send(Err(std::io::Error::other(m))).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok(axum::body::Body::from_stream(stream).into_response())
}

/// A `bytes` request may name only input shards this target holds for the job (extracted here), and entries
/// of an S3 input shard only from its decoded copy (the creator reads the rest from S3 itself): 403 otherwise,
/// before a byte is sent.
pub(super) fn check_wanted(job: &TJob, want: &[u8]) -> Result<(), ClusterError> {
    let what = || format!("dsort job {} bytes", job.id);
    if !want.len().is_multiple_of(WANT_LEN) {
        return Err(ClusterError::BadRequest {
            what: what(),
            reason: format!("{} bytes is not a list of {WANT_LEN}-byte entries", want.len()),
        });
    }
    for w in want.chunks(WANT_LEN) {
        let shard = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let name = job.objects.get(shard as usize).map_or("(none)", String::as_str);
        if !job.held.contains(&shard) {
            return Err(ClusterError::Forbidden {
                what: what(),
                reason: format!("input shard {shard} ({name}) is not held by this target"),
            });
        }
        if w[4] == 0 && job.input_s3 {
            return Err(ClusterError::Forbidden {
                what: what(),
                reason: format!("input shard {shard} ({name}) is in S3: read it there"),
            });
        }
    }
    Ok(())
}

/// An in-memory decoded copy as the owner of `Bytes` slices (its memory stays paid by the job's reservation
/// of it, which outlives the streams).
struct SharedVec(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedVec {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Entries smaller than this are copied into a chunk with their neighbours instead of going out as slices of
/// their own: a small entry costs its stream a hand-off (a channel send, a wake-up on both ends) whose price
/// is far above copying a few KiB, while a large one costs one per [`BYTES_CHUNK`] however it is sent.
const COALESCE_BELOW: u64 = 64 << 10;

/// The most files a job keeps mapped for `bytes` requests (well under the kernel's 65,530 maps per process).
pub(super) const MAX_MAPS: usize = 4096;

/// Small entries gathered into one chunk of a `bytes` reply, paid by its ticket before it is filled.
struct Gather {
    ticket: Ticket,
    buf: Vec<u8>,
}

impl TargetJobs {
    /// Serve a `bytes` request: the wanted entries' bytes, in the order asked, into `tx`. Every source (input
    /// shard, spilled decoded copy) is a memory map of its file, or the in-memory decoded copy itself, so a
    /// large entry goes out as slices of it (the page cache is copied once, into the socket); small entries
    /// are gathered into chunks ([`COALESCE_BELOW`]). Every chunk carries permits of the job's serving budget
    /// for its size ([`Serving`]), taken before it is made. Runs on the runtime; only mapping a file takes a
    /// slot of the I/O pool.
    pub(super) async fn stream_bytes(
        self: &Arc<Self>,
        job: &Arc<TJob>,
        want: &[u8],
        tx: &BytesSender,
    ) -> StepResult<()> {
        if !want.len().is_multiple_of(WANT_LEN) {
            return Err(StepError::protocol(format!("a bytes request of {} bytes", want.len())));
        }
        let serving = self.serving(job)?;
        // Per (kind, shard): the whole source as `Bytes`.
        let mut sources: HashMap<(u8, usize), Bytes> = HashMap::new();
        let mut gather: Option<Gather> = None;
        let send = |b: Bytes| async move {
            let n = b.len() as u64;
            tx.send(Ok(b)).await.map_err(|_| StepError::protocol("the creator went away"))?;
            self.metrics.sent(n);
            Ok::<(), StepError>(())
        };
        for w in want.chunks(WANT_LEN) {
            job.check()?;
            let shard = u32::from_le_bytes(w[0..4].try_into().unwrap_or_default()) as usize;
            let kind = w[4];
            let off = u64::from_le_bytes(w[5..13].try_into().unwrap_or_default());
            let size = u64::from_le_bytes(w[13..21].try_into().unwrap_or_default());
            let source = match sources.get(&(kind, shard)) {
                Some(source) => source.clone(),
                None => {
                    let source = self.byte_source(job, kind, shard).await?;
                    sources.insert((kind, shard), source.clone());
                    source
                }
            };
            let end = off.checked_add(size).filter(|&e| e <= source.len() as u64).ok_or_else(|| {
                StepError::protocol(format!(
                    "input shard {shard}: {size} bytes at {off} are past the end of its {} (it shrank?)",
                    if kind == 1 { "decoded copy" } else { "file" }
                ))
            })?;
            let (start, end) = (off as usize, end as usize);
            if size < COALESCE_BELOW {
                if gather.as_ref().is_some_and(|g| g.buf.len() + size as usize > BYTES_CHUNK) {
                    let g = gather.take().expect("checked above");
                    send(g.ticket.carry(g.buf)).await?;
                }
                if gather.is_none() {
                    let ticket = self.ticket(&serving, BYTES_CHUNK as u64).await?;
                    gather = Some(Gather { ticket, buf: Vec::with_capacity(BYTES_CHUNK) });
                }
                if let Some(g) = gather.as_mut() {
                    g.buf.extend_from_slice(&source[start..end]);
                }
                continue;
            }
            if let Some(g) = gather.take() {
                send(g.ticket.carry(g.buf)).await?;
            }
            // Large entries go in pieces so that the stream's backpressure stays fine-grained.
            let mut at = start;
            while at < end {
                let next = (at + BYTES_CHUNK).min(end);
                let ticket = self.ticket(&serving, (next - at) as u64).await?;
                send(ticket.carry(source.slice(at..next))).await?;
                at = next;
            }
        }
        if let Some(g) = gather.take() {
            send(g.ticket.carry(g.buf)).await?;
        }
        Ok(())
    }

    /// The bytes of input shard `shard` as a `bytes` request reads them (`kind` 0: its file; 1: its decoded
    /// copy, in memory or spilled), whole, as one `Bytes` that slices share. Files are mapped once per job
    /// (`TJob::maps`).
    async fn byte_source(&self, job: &TJob, kind: u8, shard: usize) -> StepResult<Bytes> {
        if let Some(map) = job.maps.lock().unwrap_or_else(|p| p.into_inner()).get(&(kind, shard)) {
            return Ok(map.clone());
        }
        let path = {
            let decoded = job.decoded.lock().unwrap_or_else(|p| p.into_inner());
            match (kind, decoded.get(shard).and_then(Option::as_ref)) {
                (1, Some(Decoded::Mem(buf, _))) => return Ok(Bytes::from_owner(SharedVec(buf.clone()))),
                (1, Some(Decoded::File(p))) => p.clone(),
                (1, None) => return Err(StepError::protocol(format!("decoded copy of input shard {shard} is gone"))),
                _ => job.farm.join(
                    job.objects.get(shard).ok_or_else(|| StepError::protocol(format!("no input shard {shard}")))?,
                ),
            }
        };
        let map = self.io_read(move || map_file(&path)).await?;
        let mut maps = job.maps.lock().unwrap_or_else(|p| p.into_inner());
        if maps.len() >= MAX_MAPS
            && let Some(&old) = maps.keys().next()
        {
            maps.remove(&old);
        }
        maps.insert((kind, shard), map.clone());
        Ok(map)
    }

    /// Pull a shard's records from the range `peer` owns (`shardrecs`): a request whose reply streams into a
    /// blocking reader, at most `queued` chunks ahead of it.
    pub(super) fn pull_records(
        &self,
        rt: &tokio::runtime::Handle,
        peer: &TargetInfo,
        job: &str,
        cancel: &Arc<AtomicBool>,
        query: &[(&str, String)],
        queued: usize,
    ) -> StepResult<StreamReader> {
        use futures_util::StreamExt;
        let client = self.peer(peer)?;
        let (tx, reader) = StreamReader::channel(queued, None, rt, cancel);
        let job = job.to_string();
        let query: Vec<(String, String)> = query.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        rt.spawn(async move {
            let query: Vec<(&str, String)> = query.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            match client.job_stream(Method::POST, &job, "shardrecs", &query, Vec::new()).await {
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                }
                Ok(stream) => {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(chunk) = stream.next().await {
                        let failed = chunk.is_err();
                        if tx.send(chunk.map_err(|e| e.to_string())).await.is_err() || failed {
                            break;
                        }
                    }
                }
            }
        });
        Ok(reader)
    }
}

/// One output shard window's part of a creator's byte stream to a holder: the entries it wants (in the
/// order its writer reads them), their total size, and where their bytes go.
pub(super) struct Segment {
    pub(super) want: Vec<u8>,
    pub(super) size: u64,
    pub(super) tx: tokio::sync::mpsc::Sender<Result<Bytes, String>>,
}

/// The sending end of a creator's byte stream to one holder (see [`TargetJobs::byte_stream`]).
pub(super) type SegmentQueue = tokio::sync::mpsc::UnboundedSender<Segment>;

impl TargetJobs {
    /// A creator's byte stream to `peer` for `job`: at most one `bytes` request at a time, each carrying the
    /// wants of every segment queued since the last one was sent, whose reply is split into the segments by
    /// their sizes. Segments are served in queue order. Runs as a task on the runtime (it holds no thread)
    /// until the queue's sender is dropped.
    pub(super) fn byte_stream(
        &self,
        rt: &tokio::runtime::Handle,
        peer: &TargetInfo,
        job: &Arc<TJob>,
    ) -> StepResult<SegmentQueue> {
        let client = self.peer(peer)?;
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<Segment>();
        let job = job.clone();
        let holder = peer.id.clone();
        rt.spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = VecDeque::from([first]);
                while let Ok(seg) = rx.try_recv() {
                    batch.push_back(seg);
                }
                let body: Vec<u8> = batch.iter().flat_map(|s| s.want.iter().copied()).collect();
                let failed = match client.job_stream(Method::POST, &job.id, "bytes", &[], body).await {
                    Err(e) => Some(e.to_string()),
                    Ok(reply) => demux(reply, &mut batch, &job.cancel)
                        .await
                        .err()
                        .map(|m| format!("record bytes from target {holder}: {m}")),
                };
                // The segments not served whole learn why (after what they already got).
                if let Some(m) = failed {
                    for seg in batch {
                        let _ = seg.tx.send(Err(m.clone())).await;
                    }
                }
            }
        });
        Ok(queue)
    }
}

/// Split a `bytes` reply into the segments it serves, in order, each chunk's bytes going to the segment
/// they belong to (slices of the chunk: no copy). A segment's sender is dropped once it has all its bytes
/// (its reader sees its end). A segment whose reader is gone (its shard failed) has its bytes dropped; the
/// others still get theirs. Served segments leave `batch`; an error leaves the rest in it.
async fn demux<S>(reply: S, batch: &mut VecDeque<Segment>, cancel: &AtomicBool) -> Result<(), String>
where
    S: futures_util::Stream<Item = Result<Bytes, ClusterError>>,
{
    use futures_util::StreamExt;
    let mut reply = std::pin::pin!(reply);
    // Bytes of the front segment already forwarded.
    let mut sent = 0u64;
    let settle = |batch: &mut VecDeque<Segment>, sent: &mut u64| {
        while batch.front().is_some_and(|s| s.size == *sent) {
            batch.pop_front();
            *sent = 0;
        }
    };
    settle(batch, &mut sent);
    while let Some(chunk) = reply.next().await {
        let mut chunk = chunk.map_err(|e| e.to_string())?;
        while !chunk.is_empty() {
            let Some(seg) = batch.front() else {
                return Err(format!("{} bytes more than were asked for", chunk.len()));
            };
            let n = (seg.size - sent).min(chunk.len() as u64) as usize;
            let piece = chunk.split_to(n);
            sent += n as u64;
            if seg.tx.send(Ok(piece)).await.is_err() && cancel.load(Ordering::Relaxed) {
                return Err("the job stopped".into());
            }
            settle(batch, &mut sent);
        }
    }
    match batch.front() {
        None => Ok(()),
        Some(seg) => Err(format!("the reply ended {} bytes early", seg.size - sent)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments of `sizes`, each with the receiver its bytes go to.
    fn segments(sizes: &[u64]) -> (VecDeque<Segment>, Vec<tokio::sync::mpsc::Receiver<Result<Bytes, String>>>) {
        let mut batch = VecDeque::new();
        let mut rxs = Vec::new();
        for &size in sizes {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            batch.push_back(Segment { want: Vec::new(), size, tx });
            rxs.push(rx);
        }
        (batch, rxs)
    }

    fn reply(chunks: &[&'static [u8]]) -> impl futures_util::Stream<Item = Result<Bytes, ClusterError>> {
        futures_util::stream::iter(chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect::<Vec<_>>())
    }

    /// Everything a segment's receiver got, until its sender was dropped.
    async fn got(rx: &mut tokio::sync::mpsc::Receiver<Result<Bytes, String>>) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = rx.recv().await {
            all.extend_from_slice(&chunk.expect("no error"));
        }
        all
    }

    #[tokio::test]
    async fn a_reply_is_split_into_its_segments_by_size_whatever_its_chunks() {
        let (mut batch, mut rxs) = segments(&[3, 0, 5, 1]);
        let stop = AtomicBool::new(false);
        demux(reply(&[b"ab", b"cdefgh", b"", b"i"]), &mut batch, &stop).await.expect("served");
        assert!(batch.is_empty());
        let mut each = Vec::new();
        for rx in &mut rxs {
            each.push(got(rx).await);
        }
        assert_eq!(each, [b"abc".to_vec(), b"".to_vec(), b"defgh".to_vec(), b"i".to_vec()]);
    }

    #[tokio::test]
    async fn a_short_or_long_reply_is_an_error_and_a_gone_reader_does_not_stop_the_others() {
        let (mut batch, mut rxs) = segments(&[2, 4]);
        let stop = AtomicBool::new(false);
        let e = demux(reply(&[b"abc"]), &mut batch, &stop).await.expect_err("short");
        assert!(e.contains("ended 3 bytes early"), "{e}");
        assert_eq!(batch.len(), 1, "the unserved segment stays to be told why");
        drop(batch);
        assert_eq!(got(&mut rxs[0]).await, b"ab");

        let (mut batch, _) = segments(&[2]);
        let e = demux(reply(&[b"abcd"]), &mut batch, &stop).await.expect_err("long");
        assert!(e.contains("2 bytes more than were asked for"), "{e}");

        let (mut batch, mut rxs) = segments(&[2, 2]);
        drop(rxs.remove(0));
        demux(reply(&[b"abcd"]), &mut batch, &stop).await.expect("the other segment is served");
        assert_eq!(got(&mut rxs[0]).await, b"cd");
    }
}
