//! `distribute`, `records`, `sortrange`: send each locally sorted record to its range owner; as a range owner,
//! keep each sender's stream (and this target's own part) as one sorted run, then merge the runs (never
//! sorting again) into `range.bin`.

use super::*;

/// Where one output shard's records lie in `range.bin`: records `first..end` of this range, the first at
/// byte `at`. Records of other output groups may lie between them (a group's records are placed in order,
/// so every record of the shard's group in the span belongs to the shard).
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub first: usize,
    pub end: usize,
    pub at: u64,
}

/// The next batch (up to [`RUN_BATCH`] bytes, at least one record) of output shard `g`'s records in `span`
/// from `cursor` (record index, byte offset in `range.bin`) on, as frames; advances the cursor. Empty at
/// the span's end. Short blocking work: a read of `range.bin`.
pub(super) fn span_batch(job: &TJob, g: u32, span: &Span, cursor: &mut (usize, u64)) -> StepResult<Vec<u8>> {
    let batch = Batch::plan(job, g, span, cursor.0)?;
    batch.read(job, cursor)
}

/// The records of the next batch of a span: (frame length, kept) of each, whole records only, and the
/// bytes they take in `range.bin`.
pub(super) struct Batch {
    picked: Vec<(usize, bool)>,
    pub len: usize,
}

impl Batch {
    /// The batch from record `start` on (empty at the span's end); reads no file.
    pub(super) fn plan(job: &TJob, g: u32, span: &Span, start: usize) -> StepResult<Batch> {
        job.check()?;
        let mut picked: Vec<(usize, bool)> = Vec::new();
        let mut len = 0usize;
        if start < span.end {
            let sizes = job.sizes.lock().unwrap_or_else(|p| p.into_inner());
            let rows =
                sizes.rows.get(start..span.end).ok_or_else(|| StepError::protocol("range span past its records"))?;
            for &(_, group, n) in rows {
                if !picked.is_empty() && len + 4 + n as usize > RUN_BATCH {
                    break;
                }
                len += 4 + n as usize;
                picked.push((n as usize, group == g));
            }
        }
        Ok(Batch { picked, len })
    }

    /// Read the batch at `cursor` (record index, byte offset): its kept frames; advances the cursor.
    pub(super) fn read(&self, job: &TJob, cursor: &mut (usize, u64)) -> StepResult<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (picked, len, (start, at)) = (&self.picked, self.len, *cursor);
        if picked.is_empty() {
            return Ok(Vec::new());
        }
        let path = job.tmp_path.join("range.bin");
        let f = std::fs::File::open(&path).map_err(StepError::path(&path))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, at).map_err(StepError::path(&path))?;
        let mut p = 0;
        let mut out = 0;
        for (n, keep) in picked {
            if frame_len(&buf[p..p + 4])? != *n {
                let m = format!("{}: a record frame is not where its length says", path.display());
                return Err(StepError::protocol(m));
            }
            // Kept frames move to the front, in order (the buffer is the batch's, paid for whole).
            if *keep {
                buf.copy_within(p..p + 4 + n, out);
                out += 4 + n;
            }
            p += 4 + n;
        }
        buf.truncate(out);
        *cursor = (start + picked.len(), at + len as u64);
        Ok(buf)
    }
}

/// Output shard `(g, k)`'s records of this range, for its creator: frames in order, read a batch at a time
/// on the I/O pool by a task on the runtime (no thread waits for a slow creator; at most [`QUEUED`] batches
/// wait per stream), each batch paid by permits of the job's serving budget before it is read. A shard with no record here is a protocol error (the creator asks only the ranges whose
/// span holds it).
pub(super) async fn shardrecs(
    State(s): State<Arc<TargetJobs>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ShardQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let job = s.job(&id)?;
    let span = job.spans.lock().unwrap_or_else(|p| p.into_inner()).get(&(q.g, q.k)).copied();
    let span = span.ok_or_else(|| {
        s.failed(&id, format!("output shard {} of group {}: no record of it in this range (or no cut yet)", q.k, q.g))
    })?;
    let serving = s.serving(&job).map_err(|e| s.failed(&id, e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(QUEUED);
    let s2 = s.clone();
    tokio::spawn(async move {
        let mut cursor = (span.first, span.at);
        loop {
            let next = async {
                let batch = Batch::plan(&job, q.g, &span, cursor.0)?;
                if batch.len == 0 {
                    return Ok(None);
                }
                let ticket = s2.ticket(&serving, batch.len as u64).await?;
                let j = job.clone();
                let (frames, c) = s2
                    .io_read(move || {
                        let mut c = cursor;
                        batch.read(&j, &mut c).map(|b| (b, c))
                    })
                    .await?;
                cursor = c;
                Ok::<_, StepError>(Some((frames, ticket)))
            };
            match next.await {
                Ok(None) => return,
                Ok(Some((frames, ticket))) => {
                    s2.metrics.metadata_sent(frames.len() as u64);
                    if tx.send(Ok(ticket.carry(frames))).await.is_err() {
                        return; // the creator went away
                    }
                }
                Err(e) => {
                    let m = format!("target {}: serving the records of output shard {}: {e}", s2.target.id(), q.k);
                    let _ = tx.send(Err(std::io::Error::other(m))).await;
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok(axum::body::Body::from_stream(stream).into_response())
}

/// Which output shard a `shardrecs` request wants: shard `k` of group `g`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ShardQuery {
    #[serde(default)]
    g: u32,
    k: u64,
}

/// Chunks of a record stream (`records`), and how many may wait per destination.
pub(super) const STREAM_CHUNK: usize = 1 << 20;
/// Bytes of a record stream written to its run at a time, on the I/O pool.
pub(super) const RUN_BATCH: usize = 256 << 10;
pub(super) const QUEUED: usize = 4;

pub(super) async fn distribute(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Reply {
    let job = s.job(&id)?;
    s.blocking(&id, move |s, rt| s.do_distribute(&job, rt, &body)).await?;
    Ok(Bytes::new())
}

/// A record stream from a peer, in the order of the sort: frames may straddle chunks; the records are written
/// as one sorted run of the range sorter, which merges the runs of all senders without sorting them again.
/// The stream holds no thread: it is read here, on the runtime, and each batch of [`RUN_BATCH`] bytes is
/// written on the bounded I/O pool ([`TargetJobs::io`]) before the next is read (a slow disk slows the sender
/// down), so any number of peers can stream at once.
pub(super) async fn records(
    State(s): State<Arc<TargetJobs>>,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Body,
) -> Reply {
    use futures_util::StreamExt;
    let job = s.job(&id)?;
    let t0 = Instant::now();
    // The sender's records come in order: they make one run, merged with the others at `sortrange`.
    let j = job.clone();
    let mut run = s.io(&id, move |_, _| Ok(j.with_range(|s| s.run_writer())??)).await?;
    let mut pending: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    loop {
        let chunk = stream.next().await;
        let end = chunk.is_none();
        if let Some(chunk) = chunk {
            let chunk = chunk.map_err(|e| s.failed(&id, format!("record stream: {e}")))?;
            pending.extend_from_slice(&chunk);
            if pending.len() < RUN_BATCH {
                continue;
            }
        }
        let j = job.clone();
        let batch = std::mem::take(&mut pending);
        let (r, rest) = s
            .io(&id, move |_, _| {
                j.check()?;
                let mut at = 0;
                while batch.len() - at >= 4 {
                    let n = frame_len(&batch[at..at + 4])?;
                    if batch.len() - at - 4 < n {
                        break;
                    }
                    run.push_encoded(&batch[at + 4..at + 4 + n])?;
                    at += 4 + n;
                }
                Ok((run, batch[at..].to_vec()))
            })
            .await?;
        run = r;
        pending = rest;
        if end {
            break;
        }
    }
    if !pending.is_empty() {
        return Err(s.failed(&id, FrameError::Truncated.to_string()));
    }
    let j = job.clone();
    s.io(&id, move |_, _| {
        let run = run.into_run()?;
        j.with_range(|s| s.add_run(run))
    })
    .await?;
    job.info().metrics.meta_sorting.recv_stats.add(t0.elapsed());
    Ok(Bytes::new())
}

pub(super) async fn sortrange(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.job(&id)?;
    let n = s.blocking(&id, move |s, _| s.do_sortrange(&job)).await?;
    Ok(n.to_string().into())
}

impl TargetJobs {
    pub(super) fn do_distribute(
        self: &Arc<Self>,
        job: &Arc<TJob>,
        rt: &tokio::runtime::Handle,
        body: &[u8],
    ) -> StepResult<()> {
        {
            let mut info = job.info();
            info.metrics.meta_sorting.phase.begin(SystemTime::now());
        }
        *job.phase_start.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        hold(job, "sorting")?;
        let splitters = read_frames(&job.codec, body)?;
        let sorter = job.local.lock().unwrap_or_else(|p| p.into_inner()).take();
        let sorter = sorter.ok_or_else(|| StepError::protocol("distribute before init, or twice"))?;
        let (sorted, stats) = sorter.finish()?;
        self.metrics.spilled(stats.spilled_bytes);
        // One streaming request per other target, fed through a small bounded channel (backpressure:
        // at most QUEUED chunks of STREAM_CHUNK bytes in flight per destination).
        let mut senders: Vec<Option<tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>>> = Vec::new();
        let mut calls = Vec::new();
        for (r, t) in job.targets.iter().enumerate() {
            if r == job.me {
                senders.push(None);
                continue;
            }
            let client = self.peer(t)?;
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(QUEUED);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
            let id = job.id.clone();
            calls.push(rt.spawn(async move {
                client
                    .job_call(Method::POST, &id, "records", &[], reqwest::Body::wrap_stream(stream))
                    .await
                    .map_err(StepError::from)
            }));
            senders.push(Some(tx));
        }
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); job.targets.len()];
        // This target's own range: one sorted run, as each peer's stream is on its side.
        let mut own = job.with_range(|s| s.run_writer())??;
        let flush = |r: usize, buf: Vec<u8>| -> StepResult<()> {
            let t0 = Instant::now();
            let tx =
                senders[r].as_ref().ok_or_else(|| StepError::protocol("no record stream to this target itself"))?;
            self.metrics.metadata_sent(buf.len() as u64);
            tx.blocking_send(Ok(Bytes::from(buf))).map_err(|_| {
                StepError::Cluster(ClusterError::Unreachable {
                    peer: format!("target {}", job.targets[r].id),
                    reason: "the record stream broke".into(),
                })
            })?;
            job.info().metrics.meta_sorting.sent_stats.add(t0.elapsed());
            Ok(())
        };
        let sent: StepResult<()> = (|| {
            for item in sorted {
                job.check()?;
                let item = item?;
                let r = range_of(&job.codec, &splitters, &item);
                if r == job.me {
                    own.push(item)?;
                    continue;
                }
                push_frame(&job.codec, &item, &mut bufs[r]);
                if bufs[r].len() >= STREAM_CHUNK {
                    flush(r, std::mem::take(&mut bufs[r]))?;
                }
            }
            for (r, buf) in std::mem::take(&mut bufs).into_iter().enumerate() {
                if !buf.is_empty() {
                    flush(r, buf)?;
                }
            }
            let own = own.into_run()?;
            job.with_range(|s| s.add_run(own))?;
            Ok(())
        })();
        // End the streams (or, on an error, cut them short: the receivers see a broken body).
        drop(senders);
        let mut first: Option<StepError> = None;
        for call in calls {
            let r =
                rt.block_on(call).map_err(|e| StepError::protocol(format!("record stream task: {e}"))).and_then(|r| r);
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        // A broken stream is reported by the call's own error, which names the peer.
        match (first, sent) {
            (Some(e), _) => Err(e),
            (None, r) => r,
        }
    }

    pub(super) fn do_sortrange(&self, job: &Arc<TJob>) -> StepResult<u64> {
        let sorter = job.range.lock().unwrap_or_else(|p| p.into_inner()).take();
        let sorter = sorter.ok_or_else(|| StepError::protocol("sortrange before init, or twice"))?;
        let (sorted, stats) = sorter.finish()?;
        self.metrics.spilled(stats.spilled_bytes);
        let path = job.tmp_path.join("range.bin");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(StepError::path(&path))?);
        let mut sizes = Vec::new();
        let mut buf = Vec::new();
        let router = EkmRouter {
            ekm: job.ekm.as_ref(),
            algorithm: &job.algorithm,
            objects: &job.objects,
            reaction: job.spec.reactions.ekm_missing_key,
        };
        let warn = |m: String| job.info().metrics.warnings.push(m);
        // The cut reads every record's size from memory: paid from the pool as the list grows (a block of
        // records at a time), held until the job is released.
        let row = std::mem::size_of::<(u64, u32, u32)>() as u64;
        let paid = job.pool.reservation("range record sizes");
        for item in sorted {
            job.check()?;
            if sizes.len() == sizes.capacity() {
                let more = (sizes.capacity().max(SIZES_FIRST)) as u64 * row;
                // Mid-job, not at its start: a sort error, not the refusal of another job.
                paid.try_grow(more).map_err(|source| {
                    StepError::Sort(dsort::extsort::SortError::Memory {
                        context: format!(
                            "the sizes of this range's records for the cut ({} B each, {} records so far)",
                            row,
                            sizes.len()
                        ),
                        source,
                    })
                })?;
                sizes.reserve_exact(more as usize / row as usize);
            }
            let item = item?;
            let group =
                router.route(&item, &warn).map_err(dsort::job::JobError::Failed)?.map_or(u32::MAX, |g| g as u32);
            buf.clear();
            push_frame(&job.codec, &item, &mut buf);
            sizes.push((item.size(), group, (buf.len() - 4) as u32));
            f.write_all(&buf).map_err(StepError::path(&path))?;
        }
        f.flush().map_err(StepError::path(&path))?;
        let n = sizes.len() as u64;
        *job.sizes.lock().unwrap_or_else(|p| p.into_inner()) = RangeSizes { rows: sizes, _paid: Some(paid) };
        Ok(n)
    }
}

/// Rows of the range's size list paid for first (16 KiB); the list then doubles, each step paid before it
/// is allocated (see `do_sortrange`).
const SIZES_FIRST: usize = 1 << 10;
