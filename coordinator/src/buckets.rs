//! Resolving buckets to [`Bucket`] handles: the spec's `{name, provider}` and the command line's
//! `s3://bucket/prefix/...` URLs. Local (`ais`) buckets are folders chosen by the caller (offline: under
//! `--root`; a target: on its mountpaths); `s3` buckets are S3 or S3-compatible stores configured by the
//! environment (`shardio::s3::S3Settings::from_env`).

use dsort::spec::BucketRef;
use shardio::s3::{S3Bucket, S3Settings};
use shardio::{Bucket, LocalBucket};
use std::path::PathBuf;
use std::sync::Arc;

/// Why a bucket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("{field}: provider {provider:?} is not supported (use \"ais\" for local buckets or \"s3\")")]
    Unsupported { field: String, provider: String },
    #[error("{field}: bucket {bucket}: {source}")]
    Store {
        field: String,
        bucket: String,
        #[source]
        source: Box<shardio::Error>,
    },
}

/// A spec bucket as a handle: `ais` (or empty) → the folder `local(name)`; `s3`/`aws` → an S3 bucket
/// under the key prefix `prefix` (empty for a spec's bucket). `field` names the spec field in errors.
pub fn resolve(
    b: &BucketRef,
    prefix: &str,
    field: &str,
    local: &dyn Fn(&str) -> PathBuf,
) -> Result<Arc<dyn Bucket>, BucketError> {
    match b.provider.as_str() {
        "" | "ais" => Ok(Arc::new(LocalBucket::new(local(&b.name)))),
        "s3" | "aws" => {
            let store = |source| BucketError::Store {
                field: field.to_string(),
                bucket: format!("s3://{}", b.name),
                source: Box::new(source),
            };
            let settings = S3Settings::from_env().map_err(store)?;
            Ok(Arc::new(S3Bucket::new(&b.name, prefix, &settings).map_err(store)?))
        }
        other => Err(BucketError::Unsupported { field: field.to_string(), provider: other.to_string() }),
    }
}

/// The bucket is an object store (`s3`/`aws`), not the local storage of the targets (`ais`).
pub fn is_s3(b: &BucketRef) -> bool {
    matches!(b.provider.as_str(), "s3" | "aws")
}

/// `s3://bucket/rest` → (`bucket`, `rest`); `None` for anything else (a local path).
pub fn split_s3_url(arg: &str) -> Option<(&str, &str)> {
    let rest = arg.strip_prefix("s3://")?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_split_into_bucket_and_key() {
        assert_eq!(split_s3_url("s3://b/p/q-{0..3}.tar"), Some(("b", "p/q-{0..3}.tar")));
        assert_eq!(split_s3_url("s3://b"), Some(("b", "")));
        assert_eq!(split_s3_url("/data/x.tar"), None);
    }
}
