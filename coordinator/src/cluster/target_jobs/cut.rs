//! `cut`: place this range's records into output shards, the open shard of each group carried in from the
//! ranges before (the carry rule of [`dsort::dist`]).

use super::*;

pub(super) async fn cut(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Reply {
    let job = s.job(&id)?;
    let msg: CutMsg = serde_json::from_slice(&body).map_err(|e| s.failed(&id, format!("bad cut message: {e}")))?;
    let c = s.blocking(&id, move |_, _| TargetJobs::do_cut(&job, msg)).await?;
    Ok(serde_json::to_vec(&c).unwrap_or_default().into())
}

impl TargetJobs {
    /// Place this range's records: each group's open shard carried in from the ranges before, carried out.
    pub(super) fn do_cut(job: &Arc<TJob>, msg: CutMsg) -> StepResult<Vec<CarryMsg>> {
        let rule = cut_rule(&job.spec, &job.groups, msg.total_bytes);
        let mut carry: Vec<Carry> = msg.carry.into_iter().map(Carry::from).collect();
        carry.resize(job.groups.len(), Carry::default());
        let sizes = job.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let placed: Vec<u64> = sizes
            .iter()
            .map(|&(size, g)| carry.get_mut(g as usize).map_or(u64::MAX, |c| c.place(&rule, size)))
            .collect();
        *job.placed.lock().unwrap_or_else(|p| p.into_inner()) = placed;
        Ok(carry.into_iter().map(CarryMsg::from).collect())
    }
}
