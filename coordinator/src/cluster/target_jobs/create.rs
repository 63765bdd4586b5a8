//! `create`: as a creator, write the output shards this target owns into the staging folder as their records
//! arrive from the ranges that cut them (`shardrecs`, streamed: no file, no whole shard in memory), reading
//! local record bytes here and pulling the others a window of records at a time (`bytes`).

use super::commit::{Plan, write_plan};
use super::range::{QUEUED, RUN_BATCH, Span, span_batch};
use super::streams::{BYTES_CHUNK, STREAM_BUFFER, Segment, SegmentQueue, StreamReader, read_buffered};
use super::*;
use std::collections::VecDeque;

/// A window of a shard's records: read ahead of the writer (at most this many records or content bytes),
/// their bytes asked of their holders in one `bytes` request per holder. Bounds the metadata a creator
/// holds per shard whatever the shard's size. As large as the writer's own fetch window of object-store
/// records (4096 records, 64 MiB), so that the writer, reading ahead by its window, spans at most two of
/// these: at most two replies per holder are in flight, as the creator's stream buffers are paid for.
const WINDOW_RECORDS: usize = 4096;
const WINDOW_BYTES: u64 = 64 << 20;
/// The most record metadata (as held in memory) a window holds: a sixty-fourth of the pool, 64 KiB to
/// 1 MiB. With the window the writer reads ahead into, a shard's creator holds two, paid from the pool with
/// the shard's stream buffers.
fn window_meta(pool: &MemoryPool) -> usize {
    (pool.limit() / 64).clamp(64 << 10, 1 << 20) as usize
}

pub(super) async fn create(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Reply {
    let job = s.job(&id)?;
    let msg: CreateMsg =
        serde_json::from_slice(&body).map_err(|e| s.failed(&id, format!("bad create message: {e}")))?;
    let n = s.blocking(&id, move |s, rt| s.do_create(&job, rt, &msg)).await?;
    Ok(n.to_string().into())
}

/// One range's part of a shard's records, read in order: this target's own range from `range.bin`, another
/// range's as a `shardrecs` stream.
enum RangePart<'a> {
    Local { job: &'a TJob, g: u32, span: Span, cursor: (usize, u64), cur: Bytes },
    Remote(StreamReader),
}

impl BufRead for RangePart<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        match self {
            RangePart::Remote(r) => r.fill_buf(),
            RangePart::Local { job, g, span, cursor, cur } => {
                if cur.is_empty() {
                    *cur = span_batch(job, *g, span, cursor).map_err(std::io::Error::other)?.into();
                }
                Ok(cur)
            }
        }
    }

    fn consume(&mut self, n: usize) {
        match self {
            RangePart::Remote(r) => r.consume(n),
            RangePart::Local { cur, .. } => bytes::Buf::advance(cur, n.min(cur.len())),
        }
    }
}

impl Read for RangePart<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_buffered(self, buf)
    }
}

/// The next record frame of `r`, decoded; `None` at its end (between frames).
fn next_frame(codec: &RecordCodec, r: &mut impl BufRead, buf: &mut Vec<u8>) -> StepResult<Option<RecordItem>> {
    let what = |e| StepError::io("record stream", e);
    if r.fill_buf().map_err(what)?.is_empty() {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|_| FrameError::Truncated)?;
    buf.resize(frame_len(&len)?, 0);
    r.read_exact(buf).map_err(|_| FrameError::Truncated)?;
    Ok(Some(codec.decode(buf).map_err(FrameError::Bad)?))
}

/// A holder's record bytes for one shard, as one reader: the shard's segments of the byte stream to the
/// holder (one per window), read one after the other. A window's segment is queued before its records are
/// handed to the writer, so the writer never waits for bytes that were not asked for.
struct Replies {
    queue: std::sync::mpsc::Receiver<StreamReader>,
    cur: Option<StreamReader>,
}

impl BufRead for Replies {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        loop {
            let done = match self.cur.as_mut() {
                Some(r) => r.fill_buf()?.is_empty(),
                None => true,
            };
            if !done {
                break;
            }
            match self.queue.try_recv() {
                Ok(r) => self.cur = Some(r),
                Err(_) => {
                    self.cur = None;
                    break;
                }
            }
        }
        match self.cur.as_mut() {
            Some(r) => r.fill_buf(),
            None => Ok(&[]),
        }
    }

    fn consume(&mut self, n: usize) {
        if let Some(r) = self.cur.as_mut() {
            r.consume(n);
        }
    }
}

impl Read for Replies {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_buffered(self, buf)
    }
}

/// A shard's records as the writer takes them: read from its ranges in order, a window ahead, each
/// window's bytes asked of their holders before its first record is handed out. An error ends the
/// records early and is kept in `error` (the caller fails the shard with it).
struct ShardFeed<'a> {
    s: &'a Arc<TargetJobs>,
    job: &'a TJob,
    rt: &'a tokio::runtime::Handle,
    g: u32,
    k: u64,
    /// The ranges still to read, in order, and the one being read.
    ranges: VecDeque<u64>,
    part: Option<RangePart<'a>>,
    window: VecDeque<RecordItem>,
    /// Per holder, where its segments go (the reader in the shard's sources).
    replies: BTreeMap<usize, std::sync::mpsc::Sender<StreamReader>>,
    /// The creator's byte streams, one per holder.
    streams: &'a ByteStreams,
    queued: usize,
    frame: Vec<u8>,
    error: Option<StepError>,
}

impl ShardFeed<'_> {
    /// The next record of the shard's ranges, in order; `None` at the end of the last.
    fn next_record(&mut self) -> StepResult<Option<RecordItem>> {
        loop {
            if let Some(part) = self.part.as_mut() {
                if let Some(item) = next_frame(&self.job.codec, part, &mut self.frame)? {
                    return Ok(Some(item));
                }
                self.part = None;
            }
            let Some(r) = self.ranges.pop_front() else { return Ok(None) };
            let r = r as usize;
            self.part = Some(if r == self.job.me {
                let span = self.job.spans.lock().unwrap_or_else(|p| p.into_inner()).get(&(self.g, self.k)).copied();
                let span = span.ok_or_else(|| {
                    StepError::protocol(format!("output shard {} of group {}: no record of it here", self.k, self.g))
                })?;
                RangePart::Local { job: self.job, g: self.g, span, cursor: (span.first, span.at), cur: Bytes::new() }
            } else {
                let t = self.job.targets.get(r).ok_or_else(|| StepError::protocol(format!("no range {r}")))?;
                let q = [("g", self.g.to_string()), ("k", self.k.to_string())];
                RangePart::Remote(self.s.pull_records(self.rt, t, &self.job.id, &self.job.cancel, &q, QUEUED)?)
            });
        }
    }

    /// Read the next window of records and ask their holders for their bytes.
    fn fill(&mut self) -> StepResult<()> {
        let (mut content, mut meta) = (0u64, 0usize);
        let most_meta = window_meta(&self.job.pool);
        while self.window.len() < WINDOW_RECORDS && content < WINDOW_BYTES && meta < most_meta {
            self.job.check()?;
            let Some(item) = self.next_record()? else { break };
            content += item.size();
            meta += item.mem_size();
            self.window.push_back(item);
        }
        let mut wants: BTreeMap<usize, (Vec<u8>, u64)> = BTreeMap::new();
        for it in &self.window {
            let h = self.job.holder(it.shard);
            if h == self.job.me {
                continue;
            }
            for e in &it.entries {
                let (kind, off) = match e.loc {
                    // Entries of an S3 input shard read in place come from S3 directly, not through its holder.
                    Loc::Input(_) if self.job.input_s3 => continue,
                    Loc::Input(o) => (0u8, o),
                    Loc::Decoded(o) => (1u8, o),
                };
                let (want, size) = wants.entry(h).or_default();
                want.extend_from_slice(&it.shard.to_le_bytes());
                want.push(kind);
                want.extend_from_slice(&off.to_le_bytes());
                want.extend_from_slice(&e.size.to_le_bytes());
                *size += e.size;
            }
        }
        let mut segments = Vec::with_capacity(wants.len());
        for (h, (want, size)) in wants {
            let queue = self.replies.get(&h).ok_or_else(|| StepError::protocol(format!("no byte stream to {h}")))?;
            let (tx, reader) = StreamReader::channel(self.queued, Some(&self.s.metrics), self.rt, &self.job.cancel);
            queue.send(reader).map_err(|_| StepError::protocol("the shard's sources are gone"))?;
            segments.push((h, Segment { want, size, tx }));
        }
        self.streams.queue(segments)
    }
}

/// A creator's byte streams for a job, one per holder ([`TargetJobs::byte_stream`]). A window's segments
/// are queued to all their holders at once, under one lock, so every holder's stream serves windows in
/// the same order. That is what keeps the bounded per-segment buffers from deadlocking: the earliest window
/// still being read is ahead of every other window in every stream, so its writer always gets its bytes,
/// and once it is done the next earliest is.
struct ByteStreams {
    queues: Mutex<BTreeMap<usize, SegmentQueue>>,
}

impl ByteStreams {
    fn queue(&self, segments: Vec<(usize, Segment)>) -> StepResult<()> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for (h, seg) in segments {
            let q = queues.get(&h).ok_or_else(|| StepError::protocol(format!("no byte stream to target {h}")))?;
            q.send(seg).map_err(|_| StepError::protocol(format!("the byte stream to target {h} stopped")))?;
        }
        Ok(())
    }
}

impl Iterator for ShardFeed<'_> {
    type Item = RecordItem;

    fn next(&mut self) -> Option<RecordItem> {
        if self.window.is_empty()
            && self.error.is_none()
            && let Err(e) = self.fill()
        {
            self.error = Some(e);
        }
        self.window.pop_front()
    }
}

impl TargetJobs {
    /// The output shards this target creates: those whose name's HRW owner it is, each with the ranges that
    /// placed records in it (in order), from every range's cut spans.
    fn my_shards(job: &TJob, msg: &CreateMsg) -> StepResult<BTreeMap<(u32, u64), Vec<u64>>> {
        let ids: Vec<&str> = job.targets.iter().map(|t| t.id.as_str()).collect();
        let out_bucket = &job.spec.output_bck.name;
        let mut all: BTreeMap<(u32, u64), Vec<u64>> = BTreeMap::new();
        for (r, groups) in msg.spans.iter().enumerate() {
            for (g, span) in groups.iter().enumerate() {
                let Some((a, b)) = *span else { continue };
                if g >= job.groups.len() || a > b {
                    return Err(StepError::protocol(format!("range {r}: bad span {a}..={b} of group {g}")));
                }
                for k in a..=b {
                    all.entry((g as u32, k)).or_default().push(r as u64);
                }
            }
        }
        let mut mine = BTreeMap::new();
        for ((g, k), ranges) in all {
            let name = job.groups[g as usize].name_at(k).map_err(JobError::Failed)?;
            if placement::owner_index(&placement::object_key(out_bucket, &name), &ids).unwrap_or(0) == job.me {
                mine.insert((g, k), ranges);
            }
        }
        Ok(mine)
    }

    pub(super) fn do_create(
        self: &Arc<Self>,
        job: &Arc<TJob>,
        rt: &tokio::runtime::Handle,
        msg: &CreateMsg,
    ) -> StepResult<u64> {
        {
            // The sorting phase ends with the cut: the records go to their creators as they write.
            let mut info = job.info();
            let start = *job.phase_start.lock().unwrap_or_else(|p| p.into_inner());
            info.metrics.meta_sorting.phase.end(SystemTime::now(), start.elapsed());
            info.started_shard_creation = start.elapsed().as_nanos() as i64;
            self.metrics.phase("sorting", start.elapsed().as_secs_f64());
        }
        let started = Instant::now();
        let work: Vec<((u32, u64), Vec<u64>)> = Self::my_shards(job, msg)?.into_iter().collect();
        {
            let mut info = job.info();
            info.metrics.shard_creation.phase.begin(SystemTime::now());
            info.metrics.shard_creation.to_create = work.len() as i64;
        }
        // The other targets holding input shards of the job, with their shards: a shard's sources read
        // those shards' bytes from a stream of the holder's replies.
        let mut held_by: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for s in 0..job.objects.len() as u32 {
            let h = job.holder(s);
            if h != job.me {
                held_by.entry(h).or_default().push(s);
            }
        }
        // One byte stream per holder, shared by every shard written here (each at most one request at a time).
        let mut queues = BTreeMap::new();
        for &h in held_by.keys() {
            queues.insert(h, self.byte_stream(rt, &job.targets[h], job)?);
        }
        let streams = ByteStreams { queues: Mutex::new(queues) };
        let out_bucket = job.spec.output_bck.name.clone();
        let created = std::sync::atomic::AtomicU64::new(0);
        // Staged shards are synced on another thread while the workers write the next ones (as `dsort
        // reshard` frees a writer before its shard's sync); at most `workers` wait for it.
        let workers = concurrency(job.spec.create_concurrency_max_limit);
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<PathBuf>(workers);
        let sync_tx = Mutex::new(Some(sync_tx));
        let create_one = |(g, k): (u32, u64), ranges: Vec<u64>| -> StepResult<()> {
            job.check()?;
            // Sources of this shard: this target's inputs and decoded copies, and one stream of replies per
            // other target holding input shards (each record's bytes cross the network once, in order).
            let decoded: Vec<Option<Decoded>> = {
                let local = job.decoded.lock().unwrap_or_else(|p| p.into_inner());
                let zero = MemoryPool::new(0);
                (0..job.objects.len())
                    .map(|s| match local.get(s).and_then(Option::as_ref) {
                        Some(Decoded::Mem(buf, _)) => Some(Decoded::Mem(buf.clone(), zero.reservation("shared"))),
                        Some(Decoded::File(p)) => Some(Decoded::File(p.clone())),
                        None => None,
                    })
                    .collect()
            };
            let mut sources = Sources::new(job.input.clone(), job.objects.clone(), decoded);
            // The shard's buffers are paid from the pool first, all at once (a worker never holds some and
            // waits for more, which could deadlock with another worker), at most an eighth of the pool, and
            // only while a quarter of it stays free (the room sorters of jobs running at once count on):
            // per holder two windows' segments, the record streams of the shard's ranges, and two windows'
            // record metadata.
            let holders = held_by.len() as u64;
            let per_stream = (job.pool.limit() / 8 / holders.max(1)).clamp(2 * BYTES_CHUNK as u64, STREAM_BUFFER);
            let records = (QUEUED * RUN_BATCH) as u64 + 2 * window_meta(&job.pool) as u64;
            let buffers = job.pool.reservation("creation streams");
            buffers
                .grow_wait_leaving(per_stream * holders + records, job.pool.limit() / 4, &job.cancel)
                .map_err(|e| StepError::Job(JobError::Failed(format!("buffers of {holders} byte stream(s): {e}"))))?;
            let queued = (per_stream / 2 / BYTES_CHUNK as u64).max(1) as usize;
            let mut replies = BTreeMap::new();
            for (&h, shards) in &held_by {
                let (tx, rx) = std::sync::mpsc::channel();
                replies.insert(h, tx);
                let stream = Replies { queue: rx, cur: None };
                sources.add_stream_of(shards.iter().copied(), Box::new(stream), job.input_s3);
            }
            let mut items = ShardFeed {
                s: self,
                job,
                rt,
                g,
                k,
                ranges: ranges.into(),
                part: None,
                window: VecDeque::new(),
                replies,
                streams: &streams,
                queued,
                frame: Vec::new(),
                error: None,
            };
            let group =
                job.groups.get(g as usize).ok_or_else(|| StepError::protocol(format!("no output group {g}")))?;
            let name = group.name_at(k).map_err(JobError::Failed)?;
            // Staged under the staging folder whatever the output bucket: a name must not leave it.
            check_object(&name).map_err(|source| StepError::Name { field: "output", source })?;
            // Written whole into the staging folder; published by `commit` once every creator is done.
            let out_dir = staging_dir(self.target.store.mountpath_of(&out_bucket, &name), &job.id);
            std::fs::create_dir_all(&out_dir).map_err(StepError::path(&out_dir))?;
            let on_shard = |_: &str, _: u64| {};
            let ctx = CreateCtx {
                sources: &sources,
                out: &shardio::LocalBucket::new(&out_dir),
                staging: &job.tmp_path,
                format: job.spec.output_extension,
                options: shardio::WriteOptions { tar_flavor: shardio::TarFlavor::Pax, ..Default::default() },
                dry_run: job.spec.dry_run,
                concurrency: 1,
                pool: &job.pool,
                cancel: &job.cancel,
                on_shard: &on_shard,
            };
            let written = write_shard_staged(&ctx, &name, &mut items);
            // The records ended early: the reason (a broken stream, an abort) is the shard's error.
            if let Some(e) = items.error.take() {
                return Err(e);
            }
            let (records, bytes, _) = written.map_err(JobError::Failed)?;
            self.metrics.created(Work { shards: 1, records, bytes });
            if !job.spec.dry_run {
                job.staged.lock().unwrap_or_else(|p| p.into_inner()).push(name.clone());
                let tx = sync_tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
                tx.ok_or_else(|| StepError::protocol("creation ended"))?
                    .send(out_dir.join(&name))
                    .map_err(|_| StepError::protocol("the staged-shard syncer stopped"))?;
            }
            drop(items);
            drop(sources);
            drop(buffers);
            let n = created.fetch_add(1, Ordering::Relaxed) + 1;
            {
                let mut info = job.info();
                let c = &mut info.metrics.shard_creation.created_count;
                *c = (*c).max(n as i64);
            }
            if n == 1 {
                hold(job, "creation")?;
            }
            Ok(())
        };
        // Shards are independent: as many at once as this machine has cores (as `dsort reshard`), at most
        // the spec's create limit.
        let created_all = std::thread::scope(|scope| {
            let syncer = scope.spawn(|| {
                for path in sync_rx {
                    if let Err(e) = std::fs::File::open(&path).and_then(|f| f.sync_all()) {
                        job.cancel.store(true, Ordering::Relaxed);
                        return Err(StepError::io(format!("syncing {}", path.display()), e));
                    }
                }
                Ok(())
            });
            let created =
                dsort::parallel::try_for_each(workers, &work, |_, (k, ranges)| create_one(*k, ranges.clone()));
            // Every worker is done: the syncer drains what is left and stops.
            sync_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
            let synced = syncer.join().unwrap_or_else(|_| Err(StepError::protocol("the staged-shard syncer panicked")));
            // A failed sync cancels the job: its error, not the workers' "aborted", is the cause.
            synced.and(created)
        });
        created_all?;
        if !job.spec.dry_run {
            let names = job.staged.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let provider = job.spec.output_bck.provider.clone();
            let plan = Plan { bucket: out_bucket.clone(), names, provider };
            write_plan(&self.target.store, &job.id, &plan)?;
        }
        *job.phase_start.lock().unwrap_or_else(|p| p.into_inner()) = started;
        // Temp files stay until every creator is done (peers may still pull bytes): `cleanup`.
        Ok(created.into_inner())
    }
}
