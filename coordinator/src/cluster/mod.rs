//! The cluster's first layer: processes, membership, placement of objects, and the object routes.
//!
//! - [`coordinator::Coordinator`]: the cluster map (targets register, heartbeat every second, are `down`
//!   after 3 s of silence and `up` again at the next heartbeat) and the object routes that find an object's
//!   owner by HRW over the healthy targets and stream to or from it (a read its owner cannot answer asks
//!   the other targets, in HRW order, before a 404).
//! - [`target::Target`]: serves the objects of its mountpaths ([`store::ObjectStore`]: bucket `X` is
//!   `<mountpath>/X/`, the mountpath picked by HRW, atomic writes, `Range` reads), registers and heartbeats.
//! - [`client::Client`]: the HTTP client of both (the object routes are the same on the coordinator and on
//!   a target, so the same calls read through the coordinator or straight from a target).
//! - [`crate::placement`]: the HRW functions.
//! - [`rebalance`]: after a membership change, objects move to their owners (copy, verify, then delete);
//!   [`reach`]: which target holds which of a job's inputs, and which holder extracts each.
//! - [`jobs::JobApi`]: the public job API on the coordinator (`/v1/sort`, AIStore-compatible) and the
//!   driver that runs a job's steps across its targets; [`target_jobs::TargetJobs`]: a target's side of a
//!   job (the intra-cluster routes `/v1/sort/jobs/{id}/...`); [`jobinfo`]: the JobInfo/Metrics JSON.
//!
//! Credentials ([`http::Credentials`], [`http::with_auth`]): the client token (`--token`) guards the public
//! API (the coordinator's `/v1/sort...` and `/v1/objects/...`); the cluster secret (`--cluster-secret`, on every
//! process) everything between the coordinator and the targets ([`coordinator::access`], [`target::access`]);
//! `/metrics` takes either, `GET /v1/health` none. Route tables are in the module docs of [`coordinator`] and
//! [`target`]; the messages are in [`api`].

pub mod api;
pub mod client;
pub mod coordinator;
pub mod error;
pub mod http;
pub mod jobinfo;
pub mod jobs;
pub mod messages;
pub mod metrics;
pub mod names;
pub mod reach;
pub mod rebalance;
pub mod store;
pub mod target;
pub mod target_jobs;

pub use client::{Client, Download, Listing};
pub use coordinator::{Coordinator, CoordinatorConfig};
pub use error::{ClusterError, Result};
pub use jobs::JobApi;
pub use names::AisUri;
pub use store::ObjectStore;
pub use target::{Target, TargetConfig};

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// A coordinator and a target in one process (how a job test can run a cluster without binaries):
    /// registration, an object's round trip, a byte range, and extra routes guarded by the token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_process_cluster() {
        let shutdown = CancellationToken::new();
        let token = Some("tok".to_string());
        let extra = || axum::Router::new().route("/v1/extra", axum::routing::get(|| async { "extra" }));
        let coordinator = Coordinator::new(CoordinatorConfig { token: token.clone(), ..Default::default() }).unwrap();
        let listener = http::bind("127.0.0.1:0").await.unwrap();
        let url = http::base_url(listener.local_addr().unwrap());
        tokio::spawn(coordinator.clone().run(listener, extra(), shutdown.clone()));
        let dir = tempfile::tempdir().unwrap();
        let config = TargetConfig {
            token: token.clone(),
            ..TargetConfig::new(url.clone(), vec![dir.path().join("a"), dir.path().join("b")])
        };
        let listener = http::bind("127.0.0.1:0").await.unwrap();
        let target = Target::open(config, listener.local_addr().unwrap()).unwrap();
        tokio::spawn(target.clone().run(listener, axum::Router::new(), shutdown.clone()));

        let client = Client::new(&url, token.clone()).unwrap();
        let mut waited = Duration::ZERO;
        while client.coordinator_health().await.unwrap().healthy_targets < 1 {
            assert!(waited < Duration::from_secs(10), "target never registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += Duration::from_millis(20);
        }
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let reply =
            client.put("b", "x/y.bin", reqwest::Body::from(data.clone()), Some(data.len() as u64)).await.unwrap();
        assert_eq!((reply.size, reply.target.as_str()), (data.len() as u64, target.id()));
        let range = client.get_range_bytes("b", "x/y.bin", 1000, 500).await.unwrap();
        assert_eq!(&range[..], &data[1000..1500]);
        // Straight from the target, the same route works.
        let direct = target.peer_client(&target.info).unwrap();
        assert_eq!(direct.list("b", "x/").await.unwrap().entries[0].size, data.len() as u64);
        let (path, size) = target.store.locate("b", "x/y.bin").unwrap();
        assert_eq!((std::fs::read(path).unwrap(), size), (data.clone(), data.len() as u64));

        // Extra routes are behind the token too.
        let http = reqwest::Client::new();
        assert_eq!(http.get(format!("{url}/v1/extra")).send().await.unwrap().status(), 401);
        let ok = http.get(format!("{url}/v1/extra")).bearer_auth("tok").send().await.unwrap();
        assert_eq!(ok.text().await.unwrap(), "extra");
        let e = Client::new(&url, None).unwrap().list("b", "").await.unwrap_err();
        assert_eq!(e.remote_status(), Some(401), "{e}");
        shutdown.cancel();
    }
}
