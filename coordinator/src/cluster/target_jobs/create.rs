//! `send`, `shard`, `create`: hand each output shard's records to its creator; as a creator, write the shards
//! into the staging folder, reading local record bytes here and pulling the others once (`bytes`).

use super::commit::{Plan, write_plan};
use super::streams::{BYTES_CHUNK, STREAM_BUFFER};
use super::*;

/// Records per message between targets.
pub(super) const BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, Default, Deserialize)]
pub(super) struct ShardQuery {
    #[serde(default)]
    g: u32,
    k: u64,
    r: u64,
}

pub(super) async fn send(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.job(&id)?;
    s.blocking(&id, move |s, rt| s.do_send(&job, rt)).await?;
    Ok(Bytes::new())
}

pub(super) async fn shard(
    State(s): State<Arc<TargetJobs>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ShardQuery>,
    body: Bytes,
) -> Reply {
    let job = s.job(&id)?;
    s.io(&id, move |_, _| {
        job.check()?;
        if q.g as usize >= job.groups.len() {
            return Err(StepError::protocol(format!("output group {} does not exist", q.g)));
        }
        let path = job.shard_file(q.g, q.k, q.r);
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(StepError::path(&path))?;
        f.write_all(&body).map_err(StepError::path(&path))?;
        job.received.lock().unwrap_or_else(|p| p.into_inner()).entry((q.g, q.k)).or_default().push(q.r);
        Ok(())
    })
    .await?;
    Ok(Bytes::new())
}

pub(super) async fn create(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = s.job(&id)?;
    let n = s.blocking(&id, move |s, rt| s.do_create(&job, rt)).await?;
    Ok(n.to_string().into())
}

impl TargetJobs {
    pub(super) fn do_send(self: &Arc<Self>, job: &Arc<TJob>, rt: &tokio::runtime::Handle) -> StepResult<()> {
        let placed = std::mem::take(&mut *job.placed.lock().unwrap_or_else(|p| p.into_inner()));
        let sizes = std::mem::take(&mut *job.sizes.lock().unwrap_or_else(|p| p.into_inner()));
        let items = Self::range_records(job)?;
        let ids: Vec<&str> = job.targets.iter().map(|t| t.id.as_str()).collect();
        let out_bucket = job.spec.output_bck.name.clone();
        // Per output group, the shard being filled: (index, creator, frames). In sorted order a group's
        // shard is complete when the next record of the group goes to the next shard.
        let mut cur: Vec<Option<(u64, usize, Vec<u8>)>> = vec![None; job.groups.len()];
        let send = |g: usize, k: u64, c: usize, buf: Vec<u8>| -> StepResult<()> {
            let client = self.peer(&job.targets[c])?;
            let q = [("g", g.to_string()), ("k", k.to_string()), ("r", job.me.to_string())];
            if c != job.me {
                self.metrics.metadata_sent(buf.len() as u64);
            }
            rt.block_on(client.job_call(Method::POST, &job.id, "shard", &q, buf))?;
            Ok(())
        };
        for ((item, k), (_, g)) in items.zip(placed).zip(sizes) {
            job.check()?;
            let item = &item?;
            let g = g as usize;
            let Some(slot) = cur.get_mut(g) else { continue }; // left out (no EKM group)
            if slot.as_ref().is_some_and(|(ck, _, _)| *ck != k)
                && let Some((ck, c, buf)) = slot.take()
            {
                send(g, ck, c, buf)?;
            }
            if slot.is_none() {
                let name = job.groups[g].name_at(k).map_err(JobError::Failed)?;
                let c = placement::owner_index(&placement::object_key(&out_bucket, &name), &ids).unwrap_or(0);
                *slot = Some((k, c, Vec::new()));
            }
            if let Some((ck, c, buf)) = slot.as_mut() {
                push_frame(&job.codec, item, buf);
                if buf.len() >= BATCH_BYTES {
                    let b = std::mem::take(buf);
                    send(g, *ck, *c, b)?;
                }
            }
        }
        for (g, slot) in cur.into_iter().enumerate() {
            if let Some((ck, c, buf)) = slot
                && !buf.is_empty()
            {
                send(g, ck, c, buf)?;
            }
        }
        let mut info = job.info();
        let start = *job.phase_start.lock().unwrap_or_else(|p| p.into_inner());
        info.metrics.meta_sorting.phase.end(SystemTime::now(), start.elapsed());
        info.started_shard_creation = start.elapsed().as_nanos() as i64;
        self.metrics.phase("sorting", start.elapsed().as_secs_f64());
        Ok(())
    }

    pub(super) fn do_create(self: &Arc<Self>, job: &Arc<TJob>, rt: &tokio::runtime::Handle) -> StepResult<u64> {
        let started = Instant::now();
        let received = job.received.lock().unwrap_or_else(|p| p.into_inner()).clone();
        {
            let mut info = job.info();
            info.metrics.shard_creation.phase.begin(SystemTime::now());
            info.metrics.shard_creation.to_create = received.len() as i64;
        }
        let out_bucket = job.spec.output_bck.name.clone();
        let created = std::sync::atomic::AtomicU64::new(0);
        let work: Vec<((u32, u64), Vec<u64>)> = received.into_iter().collect();
        // Staged shards are synced on another thread while the workers write the next ones (as `dsort
        // reshard` frees a writer before its shard's sync); at most `workers` wait for it.
        let workers = concurrency(job.spec.create_concurrency_max_limit);
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<PathBuf>(workers);
        let sync_tx = Mutex::new(Some(sync_tx));
        let create_one = |(g, k): (u32, u64), mut ranges: Vec<u64>| -> StepResult<()> {
            job.check()?;
            ranges.sort_unstable();
            ranges.dedup();
            let mut items = Vec::new();
            for r in ranges {
                let path = job.shard_file(g, k, r);
                let bytes = std::fs::read(&path).map_err(StepError::path(&path))?;
                items.extend(read_frames(&job.codec, &bytes)?);
            }
            // Sources of this shard: this target's inputs and decoded copies, and one byte stream per other
            // target holding some of its records (each record's bytes cross the network once, in order).
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
            let mut by_holder: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
            for (i, it) in items.iter().enumerate() {
                let h = job.holder(it.shard);
                // Entries of an S3 input shard read in place come from S3 directly, not through its holder.
                let direct = |j: &usize| job.input_s3 && matches!(it.entries[*j].loc, Loc::Input(_));
                if h != job.me && !(0..it.entries.len()).all(|j| direct(&j)) {
                    by_holder
                        .entry(h)
                        .or_default()
                        .extend((0..it.entries.len()).filter(|j| !direct(j)).map(|j| (i, j)));
                }
            }
            // The streams' buffers are paid from the pool first, all at once (a worker never holds some and
            // waits for more, which could deadlock with another worker), at most an eighth of the pool, and only
            // while a quarter of it stays free (the room sorters of jobs running at once count on).
            let streams = by_holder.len() as u64;
            let per_stream = (job.pool.limit() / 8 / streams.max(1)).clamp(BYTES_CHUNK as u64, STREAM_BUFFER);
            let buffers = job.pool.reservation("creation streams");
            buffers
                .grow_wait_leaving(per_stream * streams, job.pool.limit() / 4, &job.cancel)
                .map_err(|e| StepError::Job(JobError::Failed(format!("buffers of {streams} byte stream(s): {e}"))))?;
            let queued = (per_stream / BYTES_CHUNK as u64).max(1) as usize;
            for (h, list) in by_holder {
                let mut want = Vec::with_capacity(list.len() * WANT_LEN);
                for &(i, j) in &list {
                    let e = &items[i].entries[j];
                    want.extend_from_slice(&items[i].shard.to_le_bytes());
                    let (kind, off) = match e.loc {
                        Loc::Input(o) => (0u8, o),
                        Loc::Decoded(o) => (1u8, o),
                    };
                    want.push(kind);
                    want.extend_from_slice(&off.to_le_bytes());
                    want.extend_from_slice(&e.size.to_le_bytes());
                }
                let shards: std::collections::BTreeSet<u32> = list.iter().map(|&(i, _)| items[i].shard).collect();
                let reader = self.pull(rt, &job.targets[h], &job.id, want, queued)?;
                sources.add_stream(shards, Box::new(reader));
            }
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
            let (records, bytes, _) = write_shard_staged(&ctx, &name, items).map_err(JobError::Failed)?;
            self.metrics.created(Work { shards: 1, records, bytes });
            if !job.spec.dry_run {
                job.staged.lock().unwrap_or_else(|p| p.into_inner()).push(name.clone());
                let tx = sync_tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
                tx.ok_or_else(|| StepError::protocol("creation ended"))?
                    .send(out_dir.join(&name))
                    .map_err(|_| StepError::protocol("the staged-shard syncer stopped"))?;
            }
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
