//! `bytes`: record bytes between targets, served by a holder (only shards it holds for the job) and read by a
//! creator as a blocking reader with bounded buffering.

use super::*;

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

pub(super) type BytesSender = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// The creator's end of a `bytes` stream, as a blocking reader (called from creation threads, never from
/// the async runtime). Counts the entry bytes received (`metrics`: a `bytes` stream).
pub(super) struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
    metrics: Option<Arc<NodeMetrics>>,
}

impl BufRead for StreamReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
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
        let avail = self.fill_buf()?;
        let n = buf.len().min(avail.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
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

impl TargetJobs {
    /// Serve a `bytes` request: the wanted entries' bytes, in the order asked, into `tx`. Entries of files
    /// (input shards, spilled decoded copies) go out as slices of a memory map of the file: the page cache
    /// is copied once, into the socket, not first into a buffer. In-memory decoded copies are copied into
    /// chunks. Runs on the runtime; only mapping a file takes a slot of the I/O pool.
    pub(super) async fn stream_bytes(
        self: &Arc<Self>,
        job: &Arc<TJob>,
        want: &[u8],
        tx: &BytesSender,
    ) -> StepResult<()> {
        if !want.len().is_multiple_of(WANT_LEN) {
            return Err(StepError::protocol(format!("a bytes request of {} bytes", want.len())));
        }
        let mut maps: HashMap<PathBuf, Bytes> = HashMap::new();
        let mut out: Vec<u8> = Vec::new();
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
            let path = {
                let decoded = job.decoded.lock().unwrap_or_else(|p| p.into_inner());
                match (kind, decoded.get(shard).and_then(Option::as_ref)) {
                    (1, Some(Decoded::Mem(buf, _))) => {
                        let range = usize::try_from(off).ok().zip(usize::try_from(off.saturating_add(size)).ok());
                        let bytes = range.and_then(|(s, e)| buf.get(s..e)).ok_or_else(|| {
                            StepError::protocol(format!("input shard {shard}: decoded bytes {off}+{size} out of range"))
                        })?;
                        out.extend_from_slice(bytes);
                        None
                    }
                    (1, Some(Decoded::File(p))) => Some(p.clone()),
                    (1, None) => {
                        return Err(StepError::protocol(format!("decoded copy of input shard {shard} is gone")));
                    }
                    _ => Some(job.farm.join(
                        job.objects.get(shard).ok_or_else(|| StepError::protocol(format!("no input shard {shard}")))?,
                    )),
                }
            };
            let Some(path) = path else {
                if out.len() >= BYTES_CHUNK {
                    send(Bytes::from(std::mem::take(&mut out))).await?;
                }
                continue;
            };
            if !out.is_empty() {
                send(Bytes::from(std::mem::take(&mut out))).await?;
            }
            if !maps.contains_key(&path) {
                let p = path.clone();
                let map = self.io_read(move || map_file(&p)).await?;
                maps.insert(path.clone(), map);
            }
            let map = &maps[&path];
            let (start, end) = (off as usize, off.saturating_add(size) as usize);
            if end > map.len() || start > end {
                return Err(StepError::protocol(format!(
                    "input shard {shard}: {size} bytes at {off} are past its end (it shrank)"
                )));
            }
            // Large entries go in pieces so that the stream's backpressure stays fine-grained.
            let mut at = start;
            while at < end {
                let next = (at + BYTES_CHUNK).min(end);
                send(map.slice(at..next)).await?;
                at = next;
            }
        }
        if !out.is_empty() {
            send(Bytes::from(out)).await?;
        }
        Ok(())
    }

    /// Pull a stream from `peer`: a request (`op`: `bytes` for entry bytes, `shardrecs` for a shard's
    /// records) whose reply streams into a blocking reader, at most `queued` chunks ahead of it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pull(
        &self,
        rt: &tokio::runtime::Handle,
        peer: &TargetInfo,
        job: &str,
        op: &'static str,
        query: &[(&str, String)],
        body: Vec<u8>,
        queued: usize,
    ) -> StepResult<StreamReader> {
        use futures_util::StreamExt;
        let client = self.peer(peer)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(queued);
        let job = job.to_string();
        let query: Vec<(String, String)> = query.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        rt.spawn(async move {
            let query: Vec<(&str, String)> = query.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            match client.job_stream(Method::POST, &job, op, &query, body).await {
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
        let metrics = (op == "bytes").then(|| self.metrics.clone());
        Ok(StreamReader { rx, cur: Bytes::new(), metrics })
    }
}
