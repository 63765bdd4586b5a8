//! The job messages of the public API, exactly as AIStore's dSort serves them (reference §4.2–4.3):
//! [`JobInfo`] per target with its [`Metrics`]. AIStore's quirks are kept on purpose so its clients (the
//! Python SDK, `ais`) parse them unchanged: counters are JSON strings, durations are nanoseconds under
//! names that sound like timestamps (`started_meta_sorting` is the extraction *duration*), times are
//! RFC 3339 with the zero time `0001-01-01T00:00:00Z` when not reached, and bucket keys are `src-bck` /
//! `dst-bck`.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// AIStore's zero time (Go's `time.Time{}` in RFC 3339).
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Counters that AIStore serializes as JSON strings (`"12"`), read back from strings or numbers.
mod as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            S(String),
            I(i64),
        }
        match N::deserialize(d)? {
            N::I(i) => Ok(i),
            N::S(s) => s.trim().parse().map_err(serde::de::Error::custom),
        }
    }
}

/// An RFC 3339 UTC time with nanoseconds trimmed to what is there (Go's `time.RFC3339Nano` shape);
/// `None` is the zero time.
pub fn rfc3339(t: Option<SystemTime>) -> String {
    let Some(t) = t else { return ZERO_TIME.to_string() };
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let nanos = d.subsec_nanos();
    let frac = if nanos == 0 { String::new() } else { format!(".{}", format!("{nanos:09}").trim_end_matches('0')) };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}{frac}Z")
}

/// AIStore's bucket JSON: `{"name","provider","namespace":{"uuid","name"}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bck {
    pub name: String,
    pub provider: String,
    pub namespace: Namespace,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub uuid: String,
    pub name: String,
}

impl Bck {
    /// From a spec's bucket (namespace in string form: "", `#name` or `@uuid#name`).
    pub fn from_ref(b: &dsort::spec::BucketRef) -> Self {
        let ns = b.namespace.trim_start_matches('@');
        let (uuid, name) = match ns.split_once('#') {
            Some((u, n)) => (u.to_string(), n.to_string()),
            None => (String::new(), ns.to_string()),
        };
        Bck { name: b.name.clone(), provider: b.provider.clone(), namespace: Namespace { uuid, name } }
    }
}

/// The fields every phase has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseCommon {
    pub started_time: String,
    pub end_time: String,
    /// Nanoseconds (live while running).
    pub elapsed: i64,
    pub running: bool,
    pub finished: bool,
}

impl Default for PhaseCommon {
    fn default() -> Self {
        PhaseCommon {
            started_time: ZERO_TIME.into(),
            end_time: ZERO_TIME.into(),
            elapsed: 0,
            running: false,
            finished: false,
        }
    }
}

impl PhaseCommon {
    pub fn begin(&mut self, now: SystemTime) {
        self.started_time = rfc3339(Some(now));
        self.running = true;
    }

    pub fn end(&mut self, now: SystemTime, elapsed: Duration) {
        self.end_time = rfc3339(Some(now));
        self.elapsed = elapsed.as_nanos() as i64;
        self.running = false;
        self.finished = true;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalExtraction {
    #[serde(flatten)]
    pub phase: PhaseCommon,
    #[serde(with = "as_string")]
    pub total_count: i64,
    #[serde(with = "as_string")]
    pub extracted_count: i64,
    #[serde(with = "as_string")]
    pub extracted_size: i64,
    #[serde(with = "as_string")]
    pub extracted_record_count: i64,
    #[serde(with = "as_string")]
    pub extracted_to_disk_count: i64,
    #[serde(with = "as_string")]
    pub extracted_to_disk_size: i64,
}

/// `{total_ms, count, min_ms, max_ms, avg_ms}`, strings; `min_ms` is `i64::MAX` until updated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeStats {
    #[serde(with = "as_string")]
    pub total_ms: i64,
    #[serde(with = "as_string")]
    pub count: i64,
    #[serde(with = "as_string")]
    pub min_ms: i64,
    #[serde(with = "as_string")]
    pub max_ms: i64,
    #[serde(with = "as_string")]
    pub avg_ms: i64,
}

impl Default for TimeStats {
    fn default() -> Self {
        TimeStats { total_ms: 0, count: 0, min_ms: i64::MAX, max_ms: 0, avg_ms: 0 }
    }
}

impl TimeStats {
    pub fn add(&mut self, d: Duration) {
        let ms = d.as_millis() as i64;
        self.total_ms += ms;
        self.count += 1;
        self.min_ms = self.min_ms.min(ms);
        self.max_ms = self.max_ms.max(ms);
        self.avg_ms = self.total_ms / self.count;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaSorting {
    #[serde(flatten)]
    pub phase: PhaseCommon,
    pub sent_stats: TimeStats,
    pub recv_stats: TimeStats,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCreation {
    #[serde(flatten)]
    pub phase: PhaseCommon,
    #[serde(with = "as_string")]
    pub to_create: i64,
    #[serde(with = "as_string")]
    pub created_count: i64,
    #[serde(with = "as_string")]
    pub moved_shard_count: i64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub local_extraction: LocalExtraction,
    pub meta_sorting: MetaSorting,
    pub shard_creation: ShardCreation,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub aborted: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub archived: bool,
}

/// One target's view of a job (`GET /v1/sort?uuid=` maps target ids to these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "src-bck")]
    pub src_bck: Bck,
    #[serde(rename = "dst-bck")]
    pub dst_bck: Bck,
    /// Start of extraction.
    pub started_time: String,
    /// End of creation; the zero time while not finished.
    pub finish_time: String,
    /// The extraction duration in ns (AIStore's name).
    pub started_meta_sorting: i64,
    /// The sorting duration in ns (AIStore's name).
    pub started_shard_creation: i64,
    /// The creation duration in ns (AIStore's name).
    pub finished_shard_creation: i64,
    /// Input shards extracted on this target.
    #[serde(rename = "loc-objs", with = "as_string")]
    pub loc_objs: i64,
    /// Uncompressed bytes extracted on this target.
    #[serde(rename = "loc-bytes", with = "as_string")]
    pub loc_bytes: i64,
    #[serde(rename = "Metrics")]
    pub metrics: Metrics,
    pub aborted: bool,
    pub archived: bool,
}

impl JobInfo {
    pub fn new(id: &str, src: Bck, dst: Bck, description: &str) -> Self {
        JobInfo {
            id: id.to_string(),
            src_bck: src,
            dst_bck: dst,
            started_time: ZERO_TIME.into(),
            finish_time: ZERO_TIME.into(),
            started_meta_sorting: 0,
            started_shard_creation: 0,
            finished_shard_creation: 0,
            loc_objs: 0,
            loc_bytes: 0,
            metrics: Metrics { description: description.to_string(), ..Metrics::default() },
            aborted: false,
            archived: false,
        }
    }

    /// Finished as clients see it: creation finished.
    pub fn finished(&self) -> bool {
        self.metrics.shard_creation.phase.finished
    }

    /// Still active (not archived: neither finished nor aborted).
    pub fn active(&self) -> bool {
        !self.archived
    }

    /// Aggregate per-target infos of one job as AIStore's list does: earliest start, latest finish (zero
    /// while any target is unfinished), longest phases, aborted = OR, archived = AND, local counts summed,
    /// metrics of the first target.
    pub fn aggregate<'a>(infos: impl IntoIterator<Item = &'a JobInfo>) -> Option<JobInfo> {
        let mut it = infos.into_iter();
        let mut acc = it.next()?.clone();
        let mut unfinished = acc.finish_time == ZERO_TIME;
        for i in it {
            if i.started_time != ZERO_TIME && (acc.started_time == ZERO_TIME || i.started_time < acc.started_time) {
                acc.started_time = i.started_time.clone();
            }
            unfinished |= i.finish_time == ZERO_TIME;
            if i.finish_time > acc.finish_time {
                acc.finish_time = i.finish_time.clone();
            }
            acc.started_meta_sorting = acc.started_meta_sorting.max(i.started_meta_sorting);
            acc.started_shard_creation = acc.started_shard_creation.max(i.started_shard_creation);
            acc.finished_shard_creation = acc.finished_shard_creation.max(i.finished_shard_creation);
            acc.loc_objs += i.loc_objs;
            acc.loc_bytes += i.loc_bytes;
            acc.aborted |= i.aborted;
            acc.archived &= i.archived;
        }
        if unfinished {
            acc.finish_time = ZERO_TIME.into();
        }
        Some(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_like_go() {
        assert_eq!(rfc3339(None), ZERO_TIME);
        assert_eq!(rfc3339(Some(UNIX_EPOCH)), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 120_000_000);
        assert_eq!(rfc3339(Some(t)), "2024-02-29T23:59:59.12Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_868_800); // 2000-03-01
        assert_eq!(rfc3339(Some(t)), "2000-03-01T00:00:00Z");
    }

    #[test]
    fn job_info_json_has_aistore_shape() {
        let src = Bck::from_ref(&dsort::spec::BucketRef {
            name: "in".into(),
            provider: "ais".into(),
            namespace: "@u1#ns".into(),
        });
        let mut info = JobInfo::new("srt-abc", src, Bck::default(), "d");
        info.loc_objs = 3;
        info.loc_bytes = 4096;
        info.started_meta_sorting = 1_500_000_000;
        info.metrics.local_extraction.total_count = 10;
        info.metrics.meta_sorting.sent_stats.add(Duration::from_millis(7));
        let v = serde_json::to_value(&info).unwrap();
        let expected = serde_json::json!({
            "id": "srt-abc",
            "src-bck": {"name": "in", "provider": "ais", "namespace": {"uuid": "u1", "name": "ns"}},
            "dst-bck": {"name": "", "provider": "", "namespace": {"uuid": "", "name": ""}},
            "started_time": ZERO_TIME, "finish_time": ZERO_TIME,
            "started_meta_sorting": 1_500_000_000i64, "started_shard_creation": 0, "finished_shard_creation": 0,
            "loc-objs": "3", "loc-bytes": "4096",
            "Metrics": {
                "local_extraction": {
                    "started_time": ZERO_TIME, "end_time": ZERO_TIME, "elapsed": 0, "running": false, "finished": false,
                    "total_count": "10", "extracted_count": "0", "extracted_size": "0",
                    "extracted_record_count": "0", "extracted_to_disk_count": "0", "extracted_to_disk_size": "0"
                },
                "meta_sorting": {
                    "started_time": ZERO_TIME, "end_time": ZERO_TIME, "elapsed": 0, "running": false, "finished": false,
                    "sent_stats": {"total_ms": "7", "count": "1", "min_ms": "7", "max_ms": "7", "avg_ms": "7"},
                    "recv_stats": {"total_ms": "0", "count": "0", "min_ms": "9223372036854775807", "max_ms": "0", "avg_ms": "0"}
                },
                "shard_creation": {
                    "started_time": ZERO_TIME, "end_time": ZERO_TIME, "elapsed": 0, "running": false, "finished": false,
                    "to_create": "0", "created_count": "0", "moved_shard_count": "0"
                },
                "description": "d", "warnings": [], "errors": []
            },
            "aborted": false, "archived": false
        });
        assert_eq!(v, expected);
        let back: JobInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, info);
        // Aborted metrics say so.
        info.metrics.aborted = true;
        assert_eq!(serde_json::to_value(&info.metrics).unwrap()["aborted"], true);
    }

    #[test]
    fn aggregate_follows_aistore() {
        let mut a = JobInfo::new("j", Bck::default(), Bck::default(), "");
        a.started_time = "2024-01-01T00:00:02Z".into();
        a.finish_time = "2024-01-01T00:00:09Z".into();
        a.loc_objs = 2;
        a.archived = true;
        a.started_meta_sorting = 5;
        let mut b = a.clone();
        b.started_time = "2024-01-01T00:00:01Z".into();
        b.finish_time = "2024-01-01T00:00:10Z".into();
        b.started_meta_sorting = 7;
        b.aborted = true;
        let g = JobInfo::aggregate([&a, &b]).unwrap();
        assert_eq!(
            (
                g.started_time.as_str(),
                g.finish_time.as_str(),
                g.loc_objs,
                g.started_meta_sorting,
                g.aborted,
                g.archived
            ),
            ("2024-01-01T00:00:01Z", "2024-01-01T00:00:10Z", 4, 7, true, true)
        );
        b.finish_time = ZERO_TIME.into();
        b.archived = false;
        let g = JobInfo::aggregate([&a, &b]).unwrap();
        assert_eq!((g.finish_time.as_str(), g.archived), (ZERO_TIME, false));
    }
}
