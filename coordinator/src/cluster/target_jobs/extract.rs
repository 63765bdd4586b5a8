//! `init`: plan the job, extract the input shards this target holds for it into the local sorter, sample.

use super::*;

pub(super) async fn init(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Reply {
    if s.target.is_draining() {
        return Err(s.err(ClusterError::ShuttingDown {
            what: format!("target {}", s.target.id()),
            reason: format!("it takes no new job (dsort job {id})"),
        }));
    }
    let msg: InitMsg = serde_json::from_slice(&body).map_err(|e| s.failed(&id, format!("bad init message: {e}")))?;
    let id2 = id.clone();
    let out = s.blocking(&id, move |s, _| s.do_init(&id2, msg)).await?;
    Ok(out.into())
}

impl TargetJobs {
    pub(super) fn do_init(self: &Arc<Self>, id: &str, msg: InitMsg) -> StepResult<Vec<u8>> {
        let mut spec = dsort::spec::parse_spec(&msg.spec, false)?.spec;
        if let AlgorithmKind::Shuffle { seed } = &mut spec.algorithm.kind {
            *seed = msg.seed.or(*seed);
        }
        if let Some(list) = msg.objects.clone() {
            spec.input = dsort::spec::InputSelection::Objnames(list);
        }
        let (input_s3, out_s3) = (crate::buckets::is_s3(&spec.input_bck), crate::buckets::is_s3(&spec.output_bck));
        let me = msg
            .targets
            .iter()
            .position(|t| t.id == self.target.id())
            .ok_or_else(|| StepError::protocol("this target is not in the job"))?;
        let parent = self.target.tmp_dir.join("jobs");
        let warnings = Mutex::new(Vec::<String>::new());
        let warn = |m: String| warnings.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        let mk_env = |input: Arc<dyn shardio::Bucket>, output: Arc<dyn shardio::Bucket>| JobEnv {
            input,
            output,
            tmp_dir: Some(parent.clone()),
            concurrency: 2,
            ekm_text: msg.ekm_text.clone(),
            progress: Arc::new(dsort::progress::NoProgress),
            cancel: Arc::new(AtomicBool::new(false)),
            tar_flavor: shardio::TarFlavor::Pax,
        };
        let nowhere = || -> Arc<dyn shardio::Bucket> { Arc::new(shardio::LocalBucket::new(PathBuf::new())) };
        let tmp = job_temp_dir(&mk_env(nowhere(), nowhere()))?;
        let farm = tmp.path().join("input");
        let empty_out = tmp.path().join("out-check");
        std::fs::create_dir_all(&empty_out).map_err(StepError::path(&empty_out))?;
        let input = crate::buckets::resolve(&spec.input_bck, "", "input_bck", &|_| farm.clone())?;
        let output = crate::buckets::resolve(&spec.output_bck, "", "output_bck", &|_| empty_out.clone())?;
        let env = mk_env(input.clone(), output.clone());
        let plan = plan_job(&spec, &env, &warn)?;
        let objects = plan.objects.clone();
        // Names that reach this target's folders: bucket and object names as the store accepts them.
        if !input_s3 {
            check_bucket(&spec.input_bck.name).map_err(|source| StepError::Name { field: "input_bck", source })?;
            objects
                .iter()
                .try_for_each(|o| check_object(o))
                .map_err(|source| StepError::Name { field: "input", source })?;
        }
        if !out_s3 {
            check_bucket(&spec.output_bck.name).map_err(|source| StepError::Name { field: "output_bck", source })?;
        }
        let ids: Vec<&str> = msg.targets.iter().map(|t| t.id.as_str()).collect();
        let bucket = spec.input_bck.name.clone();
        let holders = msg.holders.clone().filter(|h| h.len() == objects.len() && !input_s3);
        let mut owned = Vec::new();
        let mut off_owner = 0u64;
        for (i, o) in objects.iter().enumerate() {
            let owner = placement::owner_index(&placement::object_key(&bucket, o), &ids);
            let mine = match &holders {
                Some(h) => h[i] as usize == me,
                None => owner == Some(me),
            };
            if !mine {
                continue;
            }
            off_owner += u64::from(owner != Some(me));
            owned.push(i as u32);
            if input_s3 {
                continue;
            }
            if let Ok((path, _)) = self.target.store.locate(&bucket, o) {
                let link = farm.join(o);
                if let Some(parent) = link.parent() {
                    std::fs::create_dir_all(parent).map_err(StepError::path(parent))?;
                }
                std::os::unix::fs::symlink(&path, &link).map_err(StepError::path(&link))?;
            }
        }
        std::fs::create_dir_all(&farm).map_err(StepError::path(&farm))?;
        let pool = self.pool.clone();
        let codec = Arc::new(RecordCodec::new(objects.clone(), spec.algorithm.decreasing));
        let cancel = Arc::new(AtomicBool::new(false));
        let mut info =
            JobInfo::new(id, Bck::from_ref(&spec.input_bck), Bck::from_ref(&spec.output_bck), &spec.description);
        let now = SystemTime::now();
        info.started_time = rfc3339(Some(now));
        info.metrics.local_extraction.phase.begin(now);
        info.metrics.local_extraction.total_count = objects.len() as i64;
        let job = Arc::new(TJob {
            id: id.to_string(),
            objects: objects.clone(),
            codec: codec.clone(),
            targets: msg.targets.clone(),
            me,
            holders,
            groups: plan.groups,
            ekm: plan.ekm,
            algorithm: plan.algorithm.clone(),
            cancel: cancel.clone(),
            tmp_path: tmp.path().to_path_buf(),
            tmp: Mutex::new(Some(tmp)),
            farm: farm.clone(),
            input: input.clone(),
            input_s3,
            output_s3: out_s3.then(|| output.clone()),
            pool: pool.clone(),
            local: Mutex::new(None),
            decoded: Mutex::new(Vec::new()),
            range: Mutex::new(None),
            sizes: Mutex::new(RangeSizes::default()),
            spans: Mutex::new(HashMap::new()),
            serving: Mutex::new(None),
            serving_floor: Mutex::new(None),
            maps: Mutex::new(HashMap::new()),
            info: Mutex::new(info),
            phase_start: Mutex::new(Instant::now()),
            staged: Mutex::new(Vec::new()),
            published: Mutex::new(Vec::new()),
            abort_reason: Mutex::new(None),
            held: owned.iter().copied().collect(),
            ticks: AtomicU64::new(0),
            commit_started: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            spec,
        });
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), job.clone());
        if self.aborted_early.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            self.abort_job(id);
            return Err(StepError::Aborted("aborted".into()));
        }
        let spill = job.tmp_path.join("local");
        let rdir = job.tmp_path.join("range");
        std::fs::create_dir_all(&spill).map_err(StepError::path(&spill))?;
        std::fs::create_dir_all(&rdir).map_err(StepError::path(&rdir))?;
        *job.range.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(sorter(ExternalSorter::new(codec.clone(), pool.reservation("range metadata"), rdir, cancel.clone()))?);
        *job.serving_floor.lock().unwrap_or_else(|p| p.into_inner()) = Some(streams::serving_floor(&pool)?);
        hold(&job, "extraction")?;
        let ectx = ExtractCtx {
            objects: &objects,
            bucket: job.input.as_ref(),
            input_format: job.spec.input_extension,
            algorithm: &plan.algorithm,
            pool: &pool,
            spill_dir: &spill,
            reactions: job.spec.reactions,
            warn: &warn,
        };
        let started = Instant::now();
        let (totals, decoded, sorter, sample) = extract_local(
            &ectx,
            &owned,
            concurrency(job.spec.extract_concurrency_max_limit),
            &cancel,
            &Ticks(&job.ticks),
            sorter(ExternalSorter::new(
                codec.clone(),
                pool.reservation("local metadata"),
                spill.clone(),
                cancel.clone(),
            ))?,
            Reservoir::new(SAMPLES_PER_TARGET, me as u64 + 1),
        )?;
        *job.decoded.lock().unwrap_or_else(|p| p.into_inner()) = decoded;
        *job.local.lock().unwrap_or_else(|p| p.into_inner()) = Some(sorter);
        {
            let mut info = job.info();
            let e = &mut info.metrics.local_extraction;
            e.phase.end(SystemTime::now(), started.elapsed());
            e.extracted_count = totals.input_shards as i64;
            e.extracted_size = totals.bytes as i64;
            e.extracted_record_count = totals.records as i64;
            e.extracted_to_disk_size = totals.spilled_bytes as i64;
            info.loc_objs = totals.input_shards as i64;
            info.loc_bytes = totals.bytes as i64;
            info.started_meta_sorting = started.elapsed().as_nanos() as i64;
            info.metrics.warnings.extend(warnings.into_inner().unwrap_or_else(|p| p.into_inner()));
        }
        self.metrics.extracted(Work { shards: totals.input_shards, records: totals.records, bytes: totals.bytes });
        self.metrics.extracted_off_owner(off_owner);
        self.metrics.spilled(totals.spilled_bytes);
        self.metrics.phase("extraction", started.elapsed().as_secs_f64());
        let (items, seen) = sample.into_parts();
        let mut out = Vec::new();
        out.extend_from_slice(&seen.to_le_bytes());
        out.extend_from_slice(&totals.bytes.to_le_bytes());
        for it in &items {
            push_frame(&codec, it, &mut out);
        }
        Ok(out)
    }
}
