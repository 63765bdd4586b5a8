//! Where objects are, whatever placement says: which targets hold which of a job's input objects, and which
//! holder extracts each one.
//!
//! Before a job's extraction the coordinator asks every target of the job which of the input objects it
//! holds (`POST /v1/cluster/held/{bucket}`, body the names as JSON, reply the indices held; a target first
//! stops a rebalance pass it may still run, so that nothing moves under the job), then assigns
//! each object to one holder ([`assign`]): its HRW owner when the owner holds a copy (the data does not
//! cross the network, and after a rebalance that is every object), else the first holder in HRW order. An
//! object no target holds is assigned to its owner, where extraction finds it missing and applies the
//! spec's `missing_shards` reaction, exactly as `dsort reshard` does for a missing file. The assignment
//! travels in the job's `init` message ([`super::messages::InitMsg::holders`]); creators read record
//! bytes from the target that extracted the shard. Objects of S3 buckets are shared by every target and
//! keep their HRW assignment.

use super::api::TargetInfo;
use super::client::{Client, LIST_TIMEOUT};
use super::error::{ApiError, ClusterError, Result};
use super::names::check_bucket;
use super::target::{Target, blocking};
use crate::placement;
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::routing::post;
use std::sync::Arc;

/// A target's route (intra-cluster): `POST {HELD}/{bucket}` with the names → the indices it holds.
pub const HELD: &str = "/v1/cluster/held";

/// The most a `held` request may weigh: a job's input names (as many as an `init` carries).
const HELD_BODY: usize = 256 << 20;

/// The routes a target serves for it (merged into [`Target::routes`]).
pub fn target_routes() -> Router<Arc<Target>> {
    Router::new()
        .route(&format!("{HELD}/{{bucket}}"), post(held))
        .layer(axum::extract::DefaultBodyLimit::max(HELD_BODY))
}

/// Which of `names` this target holds (on any mountpath): their indices, ascending.
async fn held(
    State(t): State<Arc<Target>>,
    UrlPath(bucket): UrlPath<String>,
    axum::Json(names): axum::Json<Vec<String>>,
) -> Result<axum::Json<Vec<u32>>, ApiError> {
    let err = |e| ApiError { error: e, node: Some(format!("target {}", t.id())) };
    check_bucket(&bucket).map_err(err)?;
    // The answer must hold for the job's life: a pass still running here (one a coordinator that restarted
    // meanwhile did not stop) is stopped first. The coordinator starts no other while the job runs.
    if !t.rebalance.stop().await {
        return Err(err(ClusterError::ShuttingDown {
            what: "the rebalance pass on this target".into(),
            reason: "it did not stop for the job".into(),
        }));
    }
    let store = t.store.clone();
    let found = blocking(move || {
        Ok(names.iter().enumerate().filter(|(_, n)| store.locate(&bucket, n).is_ok()).map(|(i, _)| i as u32).collect())
    })
    .await
    .map_err(err)?;
    Ok(axum::Json(found))
}

impl Client {
    /// Which of `names` in `bucket` the target holds (indices into `names`).
    pub async fn held(&self, bucket: &str, names: &[String]) -> Result<Vec<u32>> {
        check_bucket(bucket)?;
        let url = self.url(["v1", "cluster", "held", bucket]);
        let r = self.send(self.request(reqwest::Method::POST, url).json(names).timeout(LIST_TIMEOUT)).await?;
        self.json(r).await
    }
}

/// The target (index into `ids`) that extracts each of `objects`: the HRW owner if it holds the object,
/// else the first holder in HRW order, else (held nowhere: a missing shard) the owner. `held[t]` lists
/// the indices of the objects target `t` holds.
pub fn assign(bucket: &str, objects: &[String], ids: &[&str], held: &[Vec<u32>]) -> Vec<u32> {
    let mut holds = vec![vec![false; ids.len()]; objects.len()];
    for (t, list) in held.iter().enumerate() {
        for &i in list {
            if let Some(row) = holds.get_mut(i as usize)
                && t < row.len()
            {
                row[t] = true;
            }
        }
    }
    let index: std::collections::HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    objects
        .iter()
        .zip(&holds)
        .map(|(name, row)| {
            let ranked = placement::rank(&placement::object_key(bucket, name), ids);
            let order = ranked.iter().map(|id| index[**id]);
            let chosen = order.clone().find(|&t| row[t]).or_else(|| order.clone().next()).unwrap_or(0);
            chosen as u32
        })
        .collect()
}

/// A job's inputs located: who extracts each, and how many no target of the job holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub holders: Vec<u32>,
    pub missing: usize,
}

/// Ask every target of a job which of its input `objects` (bucket `bucket`) it holds, and assign each to
/// one holder ([`assign`]). An error names the target that did not answer.
pub async fn assign_holders(
    clients: &[Client],
    targets: &[TargetInfo],
    bucket: &str,
    objects: &[String],
) -> Result<Located, ClusterError> {
    let replies = futures_util::future::join_all(clients.iter().map(|c| c.held(bucket, objects))).await;
    let held = replies.into_iter().collect::<Result<Vec<_>>>()?;
    let mut anywhere = vec![false; objects.len()];
    for &i in held.iter().flatten() {
        if let Some(x) = anywhere.get_mut(i as usize) {
            *x = true;
        }
    }
    let ids: Vec<&str> = targets.iter().map(|t| t.id.as_str()).collect();
    let missing = anywhere.iter().filter(|x| !**x).count();
    Ok(Located { holders: assign(bucket, objects, &ids, &held), missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_reads_what_it_holds_else_the_first_holder_in_hrw_order() {
        let ids = ["t-a", "t-b", "t-c"];
        let objects: Vec<String> = (0..60).map(|i| format!("shard-{i:03}.tar")).collect();
        let owner = |o: &str| placement::owner_index(&placement::object_key("b", o), &ids).unwrap() as u32;
        // Every target holds everything: each object goes to its owner.
        let all: Vec<u32> = (0..60).collect();
        let a = assign("b", &objects, &ids, &[all.clone(), all.clone(), all.clone()]);
        assert!(objects.iter().zip(&a).all(|(o, &t)| t == owner(o)));
        // Only target 1 holds anything: everything goes to it, held or not by the owner.
        let a = assign("b", &objects, &ids, &[vec![], all.clone(), vec![]]);
        assert!(a.iter().all(|&t| t == 1));
        // Object 0 is held by the two non-owners: the one ranked higher by HRW reads it.
        let o0 = &objects[0];
        let ranked = placement::rank(&placement::object_key("b", o0), &ids);
        let (second, third) = (ranked[1], ranked[2]);
        let pos = |id: &str| ids.iter().position(|x| *x == id).unwrap();
        let mut held = vec![vec![]; 3];
        held[pos(second)].push(0);
        held[pos(third)].push(0);
        assert_eq!(assign("b", &objects[..1], &ids, &held), vec![pos(second) as u32]);
        // Held nowhere: the owner (which reports it missing).
        assert_eq!(assign("b", &objects[..1], &ids, &[vec![], vec![], vec![]]), vec![owner(o0)]);
        // Indices out of range are ignored.
        assert_eq!(assign("b", &objects[..1], &ids, &[vec![7], vec![], vec![]]), vec![owner(o0)]);
    }
}
