//! Names that reach the file system or a URL: buckets, objects, target ids, and `ais://` URIs.
//!
//! - A **bucket** name is 1..=255 ASCII letters, digits, `-`, `_` or `.`, not starting with `.` (so no bucket
//!   can be `.dsort`, the target's own folder in a mountpath, or `.`/`..`).
//! - An **object** name is a relative path: [`shardio::bucket::check_object_name`] (no empty, `.` or `..`
//!   segments, no leading `/`, no NUL), and no segment starting with the temporary-file prefix
//!   (`.dsort-tmp-`), which listings hide and restarts remove.
//! - A **target id** is 1..=64 ASCII letters, digits, `-` or `_` (it appears in URLs, file names and logs).
//! - A **job id** likewise ([`check_job_id`]): a target names a job's staging and temp folders after it, so
//!   an id such as `..%2F..%2Fvictim` (decoded: two parent steps, then `victim`) must never reach a path. The coordinator makes `srt-` + 10 of those.

use super::error::{ClusterError, Result};

/// The longest bucket name accepted.
pub const MAX_BUCKET_LEN: usize = 255;
/// The longest target id accepted.
pub const MAX_TARGET_ID_LEN: usize = 64;

pub fn check_bucket(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(ClusterError::BadName { what: "bucket name", value: name.to_string(), reason: reason.to_string() })
    };
    if name.is_empty() || name.len() > MAX_BUCKET_LEN {
        return bad("must be 1 to 255 characters");
    }
    if name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return bad("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

pub fn check_object(name: &str) -> Result<()> {
    let bad = |reason: String| Err(ClusterError::BadName { what: "object name", value: name.to_string(), reason });
    if let Err(e) = shardio::bucket::check_object_name(name) {
        return bad(match e {
            shardio::Error::BadName { reason, .. } => reason,
            other => other.to_string(),
        });
    }
    if name.split('/').any(|s| s.starts_with(shardio::bucket::TMP_PREFIX)) {
        return bad(format!(
            "no segment may start with {:?} (reserved for temporary files)",
            shardio::bucket::TMP_PREFIX
        ));
    }
    Ok(())
}

/// The longest job id accepted.
pub const MAX_JOB_ID_LEN: usize = 64;

pub fn check_target_id(id: &str) -> Result<()> {
    check_id("target id", id, MAX_TARGET_ID_LEN)
}

pub fn check_job_id(id: &str) -> Result<()> {
    check_id("job id", id, MAX_JOB_ID_LEN)
}

/// 1..=`max` ASCII letters, digits, `-` or `_`.
fn check_id(what: &'static str, id: &str, max: usize) -> Result<()> {
    let ok =
        !id.is_empty() && id.len() <= max && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ClusterError::BadName {
            what,
            value: id.chars().take(2 * max).collect(),
            reason: format!("must be 1 to {max} ASCII letters, digits, '-' or '_'"),
        })
    }
}

/// A parsed `ais://BUCKET[/REST]` URI; `rest` is the object name or prefix (possibly empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AisUri {
    pub bucket: String,
    pub rest: String,
}

impl AisUri {
    /// Parses `ais://BUCKET`, `ais://BUCKET/` or `ais://BUCKET/REST`; the bucket name is checked, `rest` is
    /// not (it may be a prefix such as `train/`).
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = |reason: &str| {
            Err(ClusterError::BadName { what: "bucket URI", value: uri.to_string(), reason: reason.to_string() })
        };
        let Some(after) = uri.strip_prefix("ais://") else {
            return bad("expected ais://BUCKET[/OBJECT or PREFIX] (only the 'ais' provider is served by the cluster)");
        };
        let (bucket, rest) = after.split_once('/').unwrap_or((after, ""));
        if bucket.is_empty() {
            return bad("the bucket name is missing");
        }
        check_bucket(bucket)?;
        Ok(AisUri { bucket: bucket.to_string(), rest: rest.to_string() })
    }

    /// Like [`AisUri::parse`], but the rest must be a valid object name.
    pub fn parse_object(uri: &str) -> Result<Self> {
        let u = Self::parse(uri)?;
        if u.rest.is_empty() {
            return Err(ClusterError::BadName {
                what: "object URI",
                value: uri.to_string(),
                reason: "expected ais://BUCKET/OBJECT".into(),
            });
        }
        check_object(&u.rest)?;
        Ok(u)
    }
}

impl std::fmt::Display for AisUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ais://{}/{}", self.bucket, self.rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        for ok in ["a", "train-2024", "my_bucket.v2", &"x".repeat(255)] {
            assert!(check_bucket(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".dsort", ".", "..", "a/b", "a b", "é", &"x".repeat(256), "a\0"] {
            assert!(check_bucket(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn object_names() {
        for ok in ["a.tar", "train/shard-000.tar", "a/b/c.d.e", ".hidden", "x..y"] {
            assert!(check_object(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", "/abs", "a//b", "a/./b", "../up", "a/..", "a/", "a\0b", ".dsort-tmp-1-2-x", "dir/.dsort-tmp-x/y"]
        {
            let e = check_object(bad).unwrap_err();
            assert!(e.to_string().contains("object name"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn target_ids() {
        assert!(check_target_id("t-0123abcd").is_ok());
        assert!(check_target_id("T_1").is_ok());
        for bad in ["", "a/b", "a b", "..", &"x".repeat(65)] {
            assert!(check_target_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_job_id("srt-AZaz09_-xy").is_ok());
        for bad in ["", concat!("..", "/", "..", "/", "victim"), "..", "a/b", "a%2Fb", "a\0", "é", &"x".repeat(65)] {
            let e = check_job_id(bad).unwrap_err();
            assert!(e.to_string().contains("job id"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn ais_uris() {
        assert_eq!(AisUri::parse("ais://b").unwrap(), AisUri { bucket: "b".into(), rest: "".into() });
        assert_eq!(AisUri::parse("ais://b/").unwrap(), AisUri { bucket: "b".into(), rest: "".into() });
        assert_eq!(AisUri::parse("ais://b/p/q").unwrap(), AisUri { bucket: "b".into(), rest: "p/q".into() });
        assert!(AisUri::parse("s3://b/x").is_err());
        assert!(AisUri::parse("ais:///x").is_err());
        assert!(AisUri::parse("ais://.dsort/x").is_err());
        assert!(AisUri::parse_object("ais://b").is_err());
        assert!(AisUri::parse_object("ais://b/../x").is_err());
        assert_eq!(AisUri::parse_object("ais://b/a/x.tar").unwrap().rest, "a/x.tar");
        assert_eq!(AisUri::parse("ais://b/p").unwrap().to_string(), "ais://b/p");
    }
}
