//! Prometheus metrics of one node (coordinator or target), served as text at `GET /metrics`. One explicit
//! registry per node (no globals), every series prefixed `dsort_` and labelled with the node's id
//! (`node_id`, the AIStore-style join key). Counters only grow; "jobs by state" and the memory pool are
//! gauges set at scrape time from the node's live state. Job ids are never labels (unbounded cardinality).
//!
//! | series | kind | meaning |
//! |---|---|---|
//! | `dsort_jobs{state}` | gauge | jobs this node knows, by `running` / `finished` / `aborted` |
//! | `dsort_phase_seconds_total{phase}` | counter | time spent in `extraction` / `sorting` / `creation` |
//! | `dsort_extracted_{shards,records,bytes}_total` | counter | input shards, records and content bytes extracted |
//! | `dsort_created_{shards,records,bytes}_total` | counter | output shards, records and content bytes created |
//! | `dsort_spilled_bytes_total` | counter | bytes written to spill files (sorted runs, decoded copies) |
//! | `dsort_network_bytes_{sent,received}_total` | counter | record bytes moved between targets for creation (targets) |
//! | `dsort_extracted_off_owner_shards_total` | counter | input shards a target extracted as their holder while their HRW owner lacked them (read locally all the same; targets) |
//! | `dsort_memory_pool_{reserved,limit,peak}_bytes` | gauge | memory reserved by jobs now / the budget all jobs share / the most reserved at once (targets) |
//! | `dsort_stream_buffered_{bytes,peak_bytes}` | gauge | buffers of outgoing streams (`bytes`, `shardrecs`) in flight now / the most at once, each paid by permits of its job's serving budget (targets) |
//!
//! On the coordinator the counters are the cluster's totals, added when a job ends (from every target's
//! final job info); on a target they count that target's own work as it happens.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

/// Job counts by state, as a node sees them at scrape time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JobStates {
    pub running: i64,
    pub finished: i64,
    pub aborted: i64,
}

/// Totals of one phase of work, added to the counters at once.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Work {
    pub shards: u64,
    pub records: u64,
    pub bytes: u64,
}

/// A node's metrics; cheap to share (`Arc`), every handle is internally synchronized.
pub struct NodeMetrics {
    registry: Registry,
    jobs: Family<StateLabel, Gauge>,
    phase_seconds: Family<PhaseLabel, Counter<f64, AtomicU64>>,
    extracted: [Counter; 3],
    created: [Counter; 3],
    spilled: Counter,
    net_sent: Counter,
    net_received: Counter,
    meta_sent: Counter,
    off_owner: Counter,
    pool_reserved: Gauge,
    pool_limit: Gauge,
    pool_peak: Gauge,
    buffered: Gauge,
    buffered_peak: Gauge,
}

/// The `Content-Type` of [`NodeMetrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The phases, as label values (AIStore's phase names, shortened).
pub const PHASES: [&str; 3] = ["extraction", "sorting", "creation"];

impl NodeMetrics {
    /// Metrics of node `node_id`; `target` adds the series only a target has (network, memory pool).
    pub fn new(node_id: &str, target: bool) -> NodeMetrics {
        let labels = std::iter::once((Cow::Borrowed("node_id"), Cow::Owned(node_id.to_string())));
        let mut registry = Registry::with_prefix_and_labels("dsort", labels);
        let m = NodeMetrics {
            registry: Registry::default(),
            jobs: Family::default(),
            phase_seconds: Family::default(),
            extracted: Default::default(),
            created: Default::default(),
            spilled: Counter::default(),
            net_sent: Counter::default(),
            net_received: Counter::default(),
            meta_sent: Counter::default(),
            off_owner: Counter::default(),
            pool_reserved: Gauge::default(),
            pool_limit: Gauge::default(),
            pool_peak: Gauge::default(),
            buffered: Gauge::default(),
            buffered_peak: Gauge::default(),
        };
        registry.register("jobs", "Jobs by state", m.jobs.clone());
        registry.register("phase_seconds", "Seconds spent in each job phase", m.phase_seconds.clone());
        for (what, c) in ["shards", "records", "bytes"].iter().zip(&m.extracted) {
            registry.register(format!("extracted_{what}"), format!("Input {what} extracted"), c.clone());
        }
        for (what, c) in ["shards", "records", "bytes"].iter().zip(&m.created) {
            registry.register(format!("created_{what}"), format!("Output {what} created"), c.clone());
        }
        registry.register("spilled_bytes", "Bytes written to spill files", m.spilled.clone());
        if target {
            registry.register(
                "network_bytes_sent",
                "Record bytes sent to other targets for shard creation",
                m.net_sent.clone(),
            );
            registry.register(
                "network_bytes_received",
                "Record bytes received from other targets for shard creation",
                m.net_received.clone(),
            );
            registry.register(
                "metadata_bytes_sent",
                "Record metadata bytes sent to other targets (records to range owners, shards' records to creators)",
                m.meta_sent.clone(),
            );
            registry.register(
                "extracted_off_owner_shards",
                "Input shards extracted by a holder that is not their HRW owner",
                m.off_owner.clone(),
            );
            registry.register("memory_pool_reserved_bytes", "Memory reserved by running jobs", m.pool_reserved.clone());
            registry.register("memory_pool_limit_bytes", "Memory budget of all jobs together", m.pool_limit.clone());
            registry.register("memory_pool_peak_bytes", "The most memory jobs reserved at once", m.pool_peak.clone());
            registry.register("stream_buffered_bytes", "Buffers of outgoing streams in flight", m.buffered.clone());
            registry.register(
                "stream_buffered_peak_bytes",
                "The most buffers of outgoing streams in flight at once",
                m.buffered_peak.clone(),
            );
        }
        // Every phase and state is present from the start (a scrape sees zeros, not missing series).
        for p in PHASES {
            m.phase_seconds.get_or_create(&PhaseLabel { phase: p }).inc_by(0.0);
        }
        m.set_jobs(JobStates::default());
        NodeMetrics { registry, ..m }
    }

    pub fn set_jobs(&self, s: JobStates) {
        for (state, n) in [("running", s.running), ("finished", s.finished), ("aborted", s.aborted)] {
            self.jobs.get_or_create(&StateLabel { state }).set(n);
        }
    }

    /// Add `seconds` to a phase (`PHASES`).
    pub fn phase(&self, phase: &'static str, seconds: f64) {
        self.phase_seconds.get_or_create(&PhaseLabel { phase }).inc_by(seconds.max(0.0));
    }

    /// Input shards extracted where they were found, not on their HRW owner.
    pub fn extracted_off_owner(&self, shards: u64) {
        self.off_owner.inc_by(shards);
    }

    pub fn extracted(&self, w: Work) {
        self.extracted[0].inc_by(w.shards);
        self.extracted[1].inc_by(w.records);
        self.extracted[2].inc_by(w.bytes);
    }

    pub fn created(&self, w: Work) {
        self.created[0].inc_by(w.shards);
        self.created[1].inc_by(w.records);
        self.created[2].inc_by(w.bytes);
    }

    pub fn spilled(&self, bytes: u64) {
        self.spilled.inc_by(bytes);
    }

    pub fn sent(&self, bytes: u64) {
        self.net_sent.inc_by(bytes);
    }

    /// Record metadata (frames) sent to another target.
    pub fn metadata_sent(&self, bytes: u64) {
        self.meta_sent.inc_by(bytes);
    }

    pub fn received(&self, bytes: u64) {
        self.net_received.inc_by(bytes);
    }

    /// A buffer of `bytes` of an outgoing stream is in flight (`in_flight`) or gone (`!in_flight`).
    pub fn buffered(&self, bytes: u64, in_flight: bool) {
        let n = i64::try_from(bytes).unwrap_or(i64::MAX);
        if in_flight {
            let now = self.buffered.inc_by(n) + n;
            self.buffered_peak.inner().fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.buffered.dec_by(n);
        }
    }

    pub fn set_pool(&self, reserved: u64, limit: u64, peak: u64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.pool_reserved.set(g(reserved));
        self.pool_limit.set(g(limit));
        self.pool_peak.set(g(peak));
    }

    /// The registry as Prometheus/OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error would only come from a broken metric, never input.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out.push_str(&format!("# encoding error: {e}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of series `name` with labels `labels` (exactly as encoded, e.g. `{node_id="t1"}`).
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(labels)?.strip_prefix(' ')?.trim().parse().ok())
    }

    #[test]
    fn series_are_named_labelled_and_counted() {
        let m = NodeMetrics::new("t1", true);
        m.extracted(Work { shards: 2, records: 10, bytes: 1000 });
        m.extracted(Work { shards: 1, records: 5, bytes: 500 });
        m.created(Work { shards: 3, records: 15, bytes: 1500 });
        m.phase("sorting", 1.5);
        m.sent(7);
        m.received(9);
        m.set_pool(100, 1000, 500);
        m.set_jobs(JobStates { running: 1, finished: 2, aborted: 0 });
        let t = m.encode();
        let id = r#"node_id="t1""#;
        assert_eq!(sample(&t, "dsort_extracted_records_total", &format!("{{{id}}}")), Some(15.0), "{t}");
        assert_eq!(sample(&t, "dsort_extracted_bytes_total", &format!("{{{id}}}")), Some(1500.0));
        assert_eq!(sample(&t, "dsort_created_shards_total", &format!("{{{id}}}")), Some(3.0));
        assert_eq!(sample(&t, "dsort_phase_seconds_total", &format!("{{{id},phase=\"sorting\"}}")), Some(1.5), "{t}");
        assert_eq!(sample(&t, "dsort_phase_seconds_total", &format!("{{{id},phase=\"creation\"}}")), Some(0.0));
        assert_eq!(sample(&t, "dsort_network_bytes_sent_total", &format!("{{{id}}}")), Some(7.0));
        assert_eq!(sample(&t, "dsort_network_bytes_received_total", &format!("{{{id}}}")), Some(9.0));
        assert_eq!(sample(&t, "dsort_memory_pool_limit_bytes", &format!("{{{id}}}")), Some(1000.0));
        assert_eq!(sample(&t, "dsort_jobs", &format!("{{{id},state=\"finished\"}}")), Some(2.0), "{t}");
        assert!(t.ends_with("# EOF\n"), "OpenMetrics text: {t}");
    }

    #[test]
    fn the_coordinator_has_no_target_only_series() {
        let t = NodeMetrics::new("coordinator", false).encode();
        assert!(!t.contains("network_bytes") && !t.contains("memory_pool"), "{t}");
        assert!(t.contains("dsort_jobs{node_id=\"coordinator\",state=\"running\"} 0"), "{t}");
    }
}
