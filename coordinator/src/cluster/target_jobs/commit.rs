//! `commit` and its plan: a job's staged shards are published from a synced plan once the coordinator decided,
//! and a target that restarts mid-commit settles its plans from that decision ([`TargetJobs::recover`]).

use super::*;

/// Where a job's finished output shards wait, on the mountpath they will be published to (so publishing
/// is a rename): `<mountpath>/.dsort/staging/<job>/`. A target removes every staging folder when it starts:
/// a job it ran before a crash is gone, and its shards must never appear.
pub fn staging_dir(mountpath: &std::path::Path, job: &str) -> PathBuf {
    mountpath.join(SYSTEM_DIR).join(STAGING).join(job)
}

/// The folder under `<mountpath>/.dsort/` that holds every job's staging folder.
pub const STAGING: &str = "staging";

/// Where a target keeps the commit plans of its jobs (`<first mountpath>/.dsort/plans/<job>.json`): written
/// (synced) when a job's shards are all staged, removed when they are published or discarded. A target that
/// restarts keeps the staging of a job with a plan and asks the coordinator's decision ([`TargetJobs::recover`]).
pub fn plans_dir(store: &ObjectStore) -> PathBuf {
    store.mountpaths()[0].join(SYSTEM_DIR).join("plans")
}

/// A job's commit plan: the output bucket and the names staged for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Plan {
    pub(super) bucket: String,
    pub(super) names: Vec<String>,
    /// The output bucket's provider: `ais` (this target's store: publish by rename) or `s3` (publish by
    /// upload, with the target's S3 settings).
    #[serde(default)]
    pub(super) provider: String,
}

impl Plan {
    fn output_s3(&self) -> StepResult<Option<Arc<dyn shardio::Bucket>>> {
        let b =
            dsort::spec::BucketRef { name: self.bucket.clone(), provider: self.provider.clone(), namespace: "".into() };
        if !crate::buckets::is_s3(&b) {
            return Ok(None);
        }
        Ok(Some(crate::buckets::resolve(&b, "", "output_bck", &|_| PathBuf::new())?))
    }
}

pub(super) fn plan_path(store: &ObjectStore, job: &str) -> PathBuf {
    plans_dir(store).join(format!("{job}.json"))
}

pub(super) fn read_plan(store: &ObjectStore, job: &str) -> Option<Plan> {
    serde_json::from_slice(&std::fs::read(plan_path(store, job)).ok()?).ok()
}

/// Write the plan atomically and durably.
pub(super) fn write_plan(store: &ObjectStore, job: &str, plan: &Plan) -> StepResult<()> {
    let dir = plans_dir(store);
    std::fs::create_dir_all(&dir).map_err(StepError::path(&dir))?;
    let path = plan_path(store, job);
    let text = serde_json::to_vec(plan).map_err(|e| StepError::io(path.display(), e.into()))?;
    let shard = |source| StepError::Shard { what: format!("commit plan {}", path.display()), source: Box::new(source) };
    let mut f = shardio::PendingObject::create(path.clone()).map_err(shard)?;
    f.file().write_all(&text).map_err(StepError::path(&path))?;
    f.commit().map_err(shard)
}

/// Publish what the plan of `job` names (renames of its staged shards, or uploads for an S3 output; a name
/// already published is skipped), then remove its staging and the plan. Idempotent: a publish cut short is
/// finished by the next call.
pub(super) fn publish_plan(
    store: &ObjectStore,
    job: &str,
    plan: &Plan,
    on_published: &dyn Fn(&str) -> StepResult<()>,
) -> StepResult<()> {
    if let Some(out) = plan.output_s3()? {
        for name in &plan.names {
            upload_one(store, job, &plan.bucket, out.as_ref(), name)?.then(|| on_published(name)).transpose()?;
        }
        discard_plan(store, job);
        return Ok(());
    }
    let mut dirs = std::collections::BTreeSet::new();
    for name in &plan.names {
        check_object(name)?;
        let from = staging_dir(store.mountpath_of(&plan.bucket, name), job).join(name);
        if !from.exists() {
            continue;
        }
        let to = store.path_for_write(&plan.bucket, name)?;
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(StepError::path(dir))?;
            dirs.insert(dir.to_path_buf());
        }
        std::fs::rename(&from, &to).map_err(|e| StepError::io(format!("publishing {}/{name}", plan.bucket), e))?;
        store.remove_stale_copies(&plan.bucket, name);
        on_published(name)?;
    }
    for dir in dirs {
        if let Ok(d) = std::fs::File::open(&dir) {
            d.sync_all().map_err(StepError::path(&dir))?;
        }
    }
    discard_plan(store, job);
    Ok(())
}

/// Upload the staged shard `name` to `out`, then remove the staged file (so a publish resumed after a crash
/// skips it: an S3 object appears whole when its upload completes). False when nothing is staged under that
/// name (uploaded already).
fn upload_one(store: &ObjectStore, job: &str, bucket: &str, out: &dyn shardio::Bucket, name: &str) -> StepResult<bool> {
    check_object(name)?;
    let from = staging_dir(store.mountpath_of(bucket, name), job).join(name);
    if !from.exists() {
        return Ok(false);
    }
    out.put_file(name, &from).map_err(|source| StepError::Shard {
        what: format!("uploading s3://{bucket}/{name}"),
        source: Box::new(source),
    })?;
    std::fs::remove_file(&from).map_err(StepError::path(&from))?;
    Ok(true)
}

/// Remove a job's staging folders and its plan.
pub(super) fn discard_plan(store: &ObjectStore, job: &str) {
    for mp in store.mountpaths() {
        let _ = std::fs::remove_dir_all(staging_dir(mp, job));
    }
    let _ = std::fs::remove_file(plan_path(store, job));
}

/// Publish the job's staged shards. A job this target does not know (it restarted during the commit) is
/// published from its plan; without a plan there is nothing left to publish here (done, or nothing staged).
pub(super) async fn commit(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>) -> Reply {
    let job = match s.job(&id) {
        Ok(job) => job,
        Err(_) => {
            let id2 = id.clone();
            s.blocking(&id, move |s, _| s.publish_recovered(&id2)).await?;
            return Ok(Bytes::new());
        }
    };
    s.blocking(&id, move |s, _| s.do_commit(&job)).await?;
    Ok(Bytes::new())
}

impl TargetJobs {
    /// Publish the plan of a job this target no longer runs (it restarted during the commit), if any.
    pub(super) fn publish_recovered(&self, id: &str) -> StepResult<()> {
        let _one = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        match read_plan(&self.target.store, id) {
            Some(plan) => {
                publish_plan(&self.target.store, id, &plan, &|_| Ok(()))?;
                self.target.log(format!("published the {} staged shard(s) of job {id} (recovered)", plan.names.len()));
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// After a restart: for each job with a commit plan (its shards staged before the crash), ask the
    /// coordinator's decision until it answers: `commit` publishes them, `abort` or a job it does not know
    /// discards them. Runs until every plan is settled or `shutdown`.
    pub async fn recover(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let Ok(entries) = std::fs::read_dir(plans_dir(&self.target.store)) else { return };
        let mut pending: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(String::from))
            .filter(|id| crate::cluster::names::check_job_id(id).is_ok())
            .collect();
        let Ok(client) = self.target.coordinator_client() else { return };
        while !pending.is_empty() {
            let mut left = Vec::new();
            for id in pending {
                let decision = client.job_decision(&id).await;
                let me = self.clone();
                let (id2, store) = (id.clone(), self.target.store.clone());
                match decision.as_deref() {
                    Ok("commit") => {
                        let r = tokio::task::spawn_blocking(move || me.publish_recovered(&id2)).await;
                        if !matches!(r, Ok(Ok(()))) {
                            left.push(id);
                        }
                    }
                    Ok("abort") | Ok("unknown") => {
                        let _one = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
                        discard_plan(&store, &id);
                        self.target.log(format!(
                            "discarded the staged output of job {id} (coordinator: {})",
                            decision.as_deref().unwrap_or("")
                        ));
                    }
                    _ => left.push(id),
                }
            }
            pending = left;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Publish the staged output shards (renames on their mountpaths), once every target created its
    /// shards: no output of a job that fails before this point is ever visible.
    pub(super) fn do_commit(&self, job: &TJob) -> StepResult<()> {
        // Aborted here before its commit began (its lease on the coordinator ran out, say): its staging and
        // plan are gone, so publishing "the plan" would publish nothing and report success. Fail instead.
        if !job.commit_started.load(Ordering::Relaxed) {
            job.check().map_err(|e| {
                StepError::Aborted(format!("job {} was aborted on this target before its commit: {e}", job.id))
            })?;
        }
        // From here the coordinator has decided: this job's output is published, even across a crash (the
        // plan written at creation lets a restarted target finish), and nothing may abort it here.
        job.commit_started.store(true, Ordering::Relaxed);
        let _one = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        // A commit asked again (the coordinator retries) finds the names published already and skips them.
        let bucket = job.spec.output_bck.name.clone();
        let provider = job.spec.output_bck.provider.clone();
        let plan = read_plan(&self.target.store, &job.id).unwrap_or(Plan { bucket, names: Vec::new(), provider });
        if let Some(out) = &job.output_s3 {
            return self.upload_staged(job, out.as_ref(), plan.names);
        }
        publish_plan(&self.target.store, &job.id, &plan, &|name| {
            let mut published = job.published.lock().unwrap_or_else(|p| p.into_inner());
            published.push(name.to_string());
            let first = published.len() == 1;
            drop(published);
            if first { hold(job, "commit") } else { Ok(()) }
        })?;
        self.committed(job);
        Ok(())
    }

    /// Commit to an object store: upload each staged shard of the plan (a few at once); each is visible only
    /// when its upload completed. The plan stays until every upload is done, so a target killed here uploads
    /// the rest when it comes back ([`TargetJobs::recover`]).
    pub(super) fn upload_staged(&self, job: &TJob, out: &dyn shardio::Bucket, staged: Vec<String>) -> StepResult<()> {
        let bucket = &job.spec.output_bck.name;
        let workers = concurrency(job.spec.create_concurrency_max_limit);
        let publish = |name: &String| -> StepResult<bool> {
            let done = upload_one(&self.target.store, &job.id, bucket, out, name)?;
            if done {
                job.published.lock().unwrap_or_else(|p| p.into_inner()).push(name.clone());
            }
            Ok(done)
        };
        // Up to the first upload one at a time (the `commit` failpoint holds there, with the rest staged).
        let mut rest = staged.as_slice();
        while let Some((name, more)) = rest.split_first() {
            rest = more;
            if publish(name)? {
                hold(job, "commit")?;
                break;
            }
        }
        dsort::parallel::try_for_each(workers, rest, |_, name| publish(name).map(|_| ()))?;
        self.committed(job);
        Ok(())
    }

    /// The end of a successful commit: staging and plan gone, creation finished.
    pub(super) fn committed(&self, job: &TJob) {
        job.remove_staging(&self.target.store);
        let started = *job.phase_start.lock().unwrap_or_else(|p| p.into_inner());
        let mut info = job.info();
        let now = SystemTime::now();
        info.metrics.shard_creation.phase.end(now, started.elapsed());
        info.finished_shard_creation = started.elapsed().as_nanos() as i64;
        info.finish_time = rfc3339(Some(now));
        self.metrics.phase("creation", started.elapsed().as_secs_f64());
    }
}
