//! `cut`: place this range's records into output shards, the open shard of each group carried in from the
//! ranges before (the carry rule of [`dsort::dist`]), and index where each shard's records lie in `range.bin`.

use super::range::Span;
use super::*;

pub(super) async fn cut(State(s): State<Arc<TargetJobs>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Reply {
    let job = s.job(&id)?;
    let msg: CutMsg = serde_json::from_slice(&body).map_err(|e| s.failed(&id, format!("bad cut message: {e}")))?;
    let started = Instant::now();
    let (c, records) = s
        .blocking(&id, move |_, _| {
            let c = TargetJobs::do_cut(&job, msg)?;
            Ok((c, job.sizes.lock().unwrap_or_else(|p| p.into_inner()).rows.len()))
        })
        .await?;
    // The cut runs range after range (each needs the carry of the one before): its time adds up over the
    // targets, so it is logged.
    s.target
        .log(format!("job {id}: cut {records} record(s) of this range in {:.3} s", started.elapsed().as_secs_f64()));
    Ok(serde_json::to_vec(&c).unwrap_or_default().into())
}

impl TargetJobs {
    /// Place this range's records: each group's open shard carried in from the ranges before, carried out;
    /// each output shard's records are indexed ([`Span`]) for `shardrecs`, and the reply names, per group,
    /// the first and last shard this range placed records in.
    pub(super) fn do_cut(job: &Arc<TJob>, msg: CutMsg) -> StepResult<CutReply> {
        let rule = cut_rule(&job.spec, &job.groups, msg.total_bytes);
        let mut carry: Vec<Carry> = msg.carry.into_iter().map(Carry::from).collect();
        carry.resize(job.groups.len(), Carry::default());
        let sizes = job.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let mut spans: HashMap<(u32, u64), Span> = HashMap::new();
        let mut first_last: Vec<Option<(u64, u64)>> = vec![None; job.groups.len()];
        let mut at = 0u64;
        for (i, &(size, g, n)) in sizes.rows.iter().enumerate() {
            let frame = 4 + u64::from(n);
            if let Some(c) = carry.get_mut(g as usize) {
                let k = c.place(&rule, size);
                let span = spans.entry((g, k)).or_insert(Span { first: i, end: i, at });
                span.end = i + 1;
                let fl = &mut first_last[g as usize];
                *fl = Some(fl.map_or((k, k), |(a, _)| (a, k)));
            }
            at += frame;
        }
        drop(sizes);
        *job.spans.lock().unwrap_or_else(|p| p.into_inner()) = spans;
        Ok(CutReply { carry: carry.into_iter().map(CarryMsg::from).collect(), spans: first_last })
    }
}
