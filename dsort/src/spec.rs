//! The job spec: AIStore dSort's `RequestSpec`, parsed from JSON or YAML into a validated [`JobSpec`].
//!
//! Parsing never stops at the first problem: every error found is collected and reported together
//! ([`SpecErrors`]), each naming its field (dotted for nested keys: `algorithm.seed`) and the rule broken.
//! Fields are checked in AIStore's order (input bucket, output bucket, input format and extension, shard
//! size, algorithm, EKM, output format and extension, memory, concurrency, config).
//!
//! Compatibility rules:
//! - the text is JSON when its first non-space character is `{`, else YAML;
//! - keys match case-insensitively at every level (`Input_Bck`, `Config`); a key given twice in different
//!   cases is an error;
//! - an empty string, `0`, `false`, `null`, and an empty list or object mean the same as an absent key;
//! - legacy keys are accepted with a warning: `bck` (= `input_bck`), `extension` (= `input_extension`),
//!   `order_file` (= `ekm_file`), `order_file_sep` (= `ekm_file_sep`), a string `input_format` (the
//!   pre-2023 template), and the four reaction keys at top level (now under `config`); `extended_metrics`
//!   and `stream_multiplier` are obsolete and ignored with a warning;
//! - AIStore's YAML spellings are accepted silently: `ext`, `contentkeytype` (in `algorithm`),
//!   `dsortertype`, `dryrun`;
//! - unknown keys (at any level) are errors when `strict` (the CLI) and warnings otherwise (REST).
//!
//! Choices beyond AIStore (all documented here because the spec is a contract):
//! - `algorithm.kind = md5` is refused: AIStore's md5 is in effect name order (use `alphanumeric`);
//! - `content_key_type` defaults to `string` for `content`; given with another kind it is ignored with a
//!   warning. Enum-like values (kind, key type, reactions, provider, dsorter type) are case-insensitive;
//! - `dsorter_type` is validated (AIStore crashes on unknown values); only `ais` and `s3` buckets are usable;
//! - bucket names follow AIStore's rule (letters, digits, `-`, `_`, `.`; not `.` or `..`); a bucket may also
//!   be written as a string, `name` or `provider://name`;
//! - object names (objnames, template names) must be relative paths without `..` segments;
//! - `output_shard_records` (additive) cuts by record count; it cannot be combined with `output_shard_size`,
//!   and it replaces the size requirement of unbounded templates and of EKM;
//! - `config.corrupted_shards` (additive): `abort` (default) or `skip`; `warn` and `ignore` are accepted as
//!   synonyms of `skip`, and a skipped shard is always reported as a warning (data is never dropped silently);
//! - `config` keys AIStore accepts but dsort does not use (`dsorter_mem_threshold`, `bundle_multiplier`,
//!   `default_max_mem_usage`, `call_timeout`, `compression`, `burst_buffer`) are validated where cheap and
//!   produce a warning when set;
//! - when `ekm_file` is set a non-empty `output_format` is ignored with a warning (AIStore ignores it);
//! - input objnames must not repeat; when `input_extension` is not given it is derived from the objnames if
//!   they all end in one archive format;
//! - `input_format.prefix` (additive) selects every object of the input bucket whose name starts with it and
//!   ends with `input_extension` (required then), in name order, by listing the bucket; it cannot be combined
//!   with a template or objnames.

use crate::size::{MemQuantity, parse_mem_quantity, parse_size};
use crate::template::{MAX_INPUT_NAMES, Template, TemplateError, TemplateKind};
use serde_json::{Map, Value, json};
use shardio::Format;
use std::fmt;

/// The largest output template that still counts as bounded (AIStore: more than 2^31-1 names is "unbounded",
/// so the shard size cannot be derived from the template count).
const MAX_BOUNDED_OUTPUT: u64 = i32::MAX as u64;

/// Archive extensions as they may end an object name, longest spelling first; matched case-insensitively.
const NAME_EXTENSIONS: &[(&str, Format)] = &[
    (".tar.gz", Format::TarGz),
    (".tar.zst", Format::TarZst),
    (".tar.lz4", Format::TarLz4),
    (".tgz", Format::TarGz),
    (".tar", Format::Tar),
    (".zip", Format::Zip),
];

/// The list of accepted extensions, for messages.
const EXTENSION_LIST: &str = ".tar, .tgz, .tar.gz, .tar.zst, .tar.lz4, .zip";

/// A bucket as a spec names it. Invariant (after parsing): `name` is a valid bucket name and `provider`
/// is normalized (`ais` or `s3`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BucketRef {
    pub name: String,
    /// Normalized: "ais" for ""/"ais"; "s3" for "s3"/"aws"; others kept lower-case.
    pub provider: String,
    /// AIStore's namespace in string form: "" (global), `#name`, or `@uuid#name`.
    pub namespace: String,
}

impl BucketRef {
    /// A local (`ais`) bucket in the global namespace.
    pub fn ais(name: &str) -> BucketRef {
        BucketRef { name: name.to_string(), provider: "ais".to_string(), namespace: String::new() }
    }

    /// AIStore's JSON shape: `{name, provider, namespace: {uuid, name}}`.
    pub fn to_json(&self) -> Value {
        let (uuid, ns_name) = split_namespace(&self.namespace);
        json!({ "name": self.name, "provider": self.provider, "namespace": { "uuid": uuid, "name": ns_name } })
    }
}

impl fmt::Display for BucketRef {
    /// `provider://[@uuid#ns/]name`, as AIStore prints buckets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}://{}", self.provider, self.name)
        } else {
            write!(f, "{}://{}/{}", self.provider, self.namespace, self.name)
        }
    }
}

/// Which input objects to read.
#[derive(Clone, Debug, PartialEq)]
pub enum InputSelection {
    /// A bounded range template (bash or at) naming at most [`MAX_INPUT_NAMES`] objects.
    Template(Template),
    /// An explicit list, used exactly as given (non-empty, no repeats).
    Objnames(Vec<String>),
    /// Additive `input_format.prefix`: every object of the input bucket whose name starts with this string
    /// and ends with the input extension, in name order (known only by listing the bucket).
    Prefix(String),
}

/// How the content of the key entry is parsed for `content` sorting.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ContentKeyType {
    Int,
    Float,
    String,
}

impl ContentKeyType {
    /// The spec spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentKeyType::Int => "int",
            ContentKeyType::Float => "float",
            ContentKeyType::String => "string",
        }
    }
}

/// The ordering algorithm.
#[derive(Clone, Debug, PartialEq)]
pub enum AlgorithmKind {
    Alphanumeric,
    /// `seed`: None = not given: the engine picks and reports one.
    Shuffle {
        seed: Option<u64>,
    },
    /// `extension` starts with '.'.
    Content {
        extension: String,
        key_type: ContentKeyType,
    },
    None,
}

impl AlgorithmKind {
    /// The spec spelling of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            AlgorithmKind::Alphanumeric => "alphanumeric",
            AlgorithmKind::Shuffle { .. } => "shuffle",
            AlgorithmKind::Content { .. } => "content",
            AlgorithmKind::None => "none",
        }
    }
}

/// The algorithm and its direction. `decreasing` is kept as given for every kind; the engine decides what
/// it means for shuffle and none.
#[derive(Clone, Debug, PartialEq)]
pub struct Algorithm {
    pub kind: AlgorithmKind,
    pub decreasing: bool,
}

impl Default for Algorithm {
    fn default() -> Self {
        Algorithm { kind: AlgorithmKind::Alphanumeric, decreasing: false }
    }
}

/// What to do when a condition is met (AIStore's reactions).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reaction {
    Ignore,
    Warn,
    Abort,
}

impl Reaction {
    /// The spec spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Reaction::Ignore => "ignore",
            Reaction::Warn => "warn",
            Reaction::Abort => "abort",
        }
    }
}

/// What to do with an input shard that cannot be read (additive to AIStore).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CorruptReaction {
    /// Skip the shard with a warning.
    Skip,
    Abort,
}

impl CorruptReaction {
    /// The spec spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CorruptReaction::Skip => "skip",
            CorruptReaction::Abort => "abort",
        }
    }
}

/// The per-job reactions (AIStore's `config` overrides plus `corrupted_shards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reactions {
    /// Default Ignore.
    pub duplicated_records: Reaction,
    /// Default Ignore.
    pub missing_shards: Reaction,
    /// Default Abort.
    pub ekm_malformed_line: Reaction,
    /// Default Abort.
    pub ekm_missing_key: Reaction,
    /// Default Abort.
    pub corrupted_shards: CorruptReaction,
}

impl Default for Reactions {
    fn default() -> Self {
        Reactions {
            duplicated_records: Reaction::Ignore,
            missing_shards: Reaction::Ignore,
            ekm_malformed_line: Reaction::Abort,
            ekm_missing_key: Reaction::Abort,
            corrupted_shards: CorruptReaction::Abort,
        }
    }
}

/// Where the external key map comes from; only its syntax is checked here, the engine loads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EkmSource {
    /// As given: a path, `ais://bucket/object`, or an http(s) URL.
    pub location: String,
    /// Separator of the text form; default "\t".
    pub separator: String,
}

/// A validated job spec. Invariants: every field passed the rules in the module doc; `output_format` is
/// `None` exactly when `ekm` is `Some`; at most one of `output_shard_size` and `output_shard_records` is set.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    pub input_bck: BucketRef,
    pub input: InputSelection,
    pub input_extension: shardio::Format,
    /// The input extension as written (lower-case, with the dot): `.tgz` and `.tar.gz` are the same format
    /// but name different objects, so this is what [`JobSpec::input_names`] appends.
    pub input_extension_text: String,
    /// = input_bck when absent.
    pub output_bck: BucketRef,
    /// None when ekm.
    pub output_format: Option<Template>,
    /// = input extension, or from the output template suffix.
    pub output_extension: shardio::Format,
    /// The output extension as written (lower-case, with the dot); what [`JobSpec::output_name`] appends.
    pub output_extension_text: String,
    pub output_shard_size: Option<u64>,
    /// Additive key "output_shard_records".
    pub output_shard_records: Option<u64>,
    pub algorithm: Algorithm,
    pub ekm: Option<EkmSource>,
    /// Default 80%.
    pub max_mem_usage: MemQuantity,
    /// 0 = auto.
    pub extract_concurrency_max_limit: usize,
    /// 0 = auto.
    pub create_concurrency_max_limit: usize,
    pub description: String,
    /// "", dsort_general, dsort_mem.
    pub dsorter_type: String,
    pub dry_run: bool,
    pub reactions: Reactions,
}

/// One broken rule. Display: `{field}: {message}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for SpecError {}

/// Every broken rule of one spec, in the order found. Display: one error per line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    fn one(field: &str, message: impl Into<String>) -> SpecErrors {
        SpecErrors(vec![SpecError { field: field.to_string(), message: message.into() }])
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// A parsed spec and the warnings to show the user (legacy keys, ignored values, unknown keys when lenient).
#[derive(Clone, Debug)]
pub struct Parsed {
    pub spec: JobSpec,
    pub warnings: Vec<String>,
}

/// Parses and validates a spec. `strict` (the CLI) refuses unknown keys; otherwise (REST) they are warnings.
pub fn parse_spec(text: &str, strict: bool) -> Result<Parsed, SpecErrors> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(SpecErrors::one("spec", "empty spec (expecting a JSON or YAML object)"));
    }
    let value: Value = if trimmed.starts_with('{') {
        serde_json::from_str(text).map_err(|e| SpecErrors::one("spec", format!("invalid JSON: {e}")))?
    } else {
        serde_yaml::from_str(text).map_err(|e| SpecErrors::one("spec", format!("invalid YAML: {e}")))?
    };
    let Value::Object(map) = value else {
        return Err(SpecErrors::one("spec", format!("must be an object of keys, got {}", type_name(&value))));
    };
    let mut p = Parser { strict, errors: Vec::new(), warnings: Vec::new() };
    let spec = p.spec(map);
    match spec {
        Some(spec) if p.errors.is_empty() => Ok(Parsed { spec, warnings: p.warnings }),
        _ if p.errors.is_empty() => Err(SpecErrors::one("spec", "invalid spec")),
        _ => Err(SpecErrors(p.errors)),
    }
}

impl JobSpec {
    /// Input object names in order: template expanded (≤10M) with input_extension appended where no known
    /// archive extension; names whose known extension differs from input_extension are skipped (AIStore);
    /// objnames used as given.
    pub fn input_names(&self) -> Result<Vec<String>, SpecErrors> {
        match &self.input {
            InputSelection::Objnames(names) => Ok(names.clone()),
            InputSelection::Prefix(p) => Err(SpecErrors::one(
                "input_format.prefix",
                format!("the objects under {p:?} are known only by listing the bucket (see JobSpec::select_listed)"),
            )),
            InputSelection::Template(t) => {
                let names = t.expand_input().map_err(|e| SpecErrors::one("input_format.template", e.to_string()))?;
                Ok(names
                    .into_iter()
                    .filter_map(|name| match name_extension(&name) {
                        Some((format, _)) if format == self.input_extension => Some(name),
                        Some(_) => None,
                        None => Some(format!("{name}{}", self.input_extension_text)),
                    })
                    .collect())
            }
        }
    }

    /// Output object name at index i (template order, output_extension appended when the name has no
    /// known archive extension); None past the end of a bounded template, and always with an EKM.
    pub fn output_name(&self, index: u64) -> Option<String> {
        let name = self.output_format.as_ref()?.name_at(index)?;
        Some(append_extension(name, &self.output_extension_text))
    }

    /// Of a bucket listing under `input_format.prefix` (sorted), the input objects: those whose archive
    /// extension is the input extension (as spelled: `.tgz` and `.tar.gz` name different objects).
    pub fn select_listed(&self, listed: Vec<String>) -> Vec<String> {
        let ext = self.input_extension_text.as_str();
        listed.into_iter().filter(|n| n.len() > ext.len() && n.to_ascii_lowercase().ends_with(ext)).collect()
    }

    /// The number of input objects the selection names (before extension filtering; 0 for a prefix).
    pub fn input_count(&self) -> u64 {
        match &self.input {
            InputSelection::Objnames(names) => names.len() as u64,
            InputSelection::Template(t) => t.count().unwrap_or(0),
            InputSelection::Prefix(_) => 0,
        }
    }

    /// Serialize back to AIStore-shaped JSON (for job info / REST); `parse_spec` reads it back to an equal
    /// spec. Every key is written, empty ones included, as AIStore's Go clients do.
    pub fn to_json(&self) -> Value {
        let input_format = match &self.input {
            InputSelection::Template(t) => json!({ "template": t.as_str(), "objnames": [] }),
            InputSelection::Objnames(names) => json!({ "template": "", "objnames": names }),
            InputSelection::Prefix(p) => json!({ "template": "", "objnames": [], "prefix": p }),
        };
        let (seed, extension, key_type) = match &self.algorithm.kind {
            AlgorithmKind::Shuffle { seed } => (seed.map(|s| s.to_string()).unwrap_or_default(), "", ""),
            AlgorithmKind::Content { extension, key_type } => (String::new(), extension.as_str(), key_type.as_str()),
            AlgorithmKind::Alphanumeric | AlgorithmKind::None => (String::new(), "", ""),
        };
        let (ekm_file, ekm_sep) = match &self.ekm {
            Some(e) => (e.location.as_str(), e.separator.as_str()),
            None => ("", "\t"),
        };
        let r = &self.reactions;
        json!({
            "input_bck": self.input_bck.to_json(),
            "input_format": input_format,
            "input_extension": self.input_extension_text,
            "output_bck": self.output_bck.to_json(),
            "output_format": self.output_format.as_ref().map(|t| t.as_str()).unwrap_or(""),
            "output_extension": self.output_extension_text,
            "output_shard_size": self.output_shard_size.map(|s| s.to_string()).unwrap_or_default(),
            "output_shard_records": self.output_shard_records.unwrap_or(0),
            "algorithm": {
                "kind": self.algorithm.kind.name(),
                "decreasing": self.algorithm.decreasing,
                "seed": seed,
                "extension": extension,
                "content_key_type": key_type,
            },
            "ekm_file": ekm_file,
            "ekm_file_sep": ekm_sep,
            "max_mem_usage": self.max_mem_usage.to_string(),
            "extract_concurrency_max_limit": self.extract_concurrency_max_limit,
            "create_concurrency_max_limit": self.create_concurrency_max_limit,
            "description": self.description,
            "dsorter_type": self.dsorter_type,
            "dry_run": self.dry_run,
            "config": {
                "duplicated_records": r.duplicated_records.as_str(),
                "missing_shards": r.missing_shards.as_str(),
                "ekm_malformed_line": r.ekm_malformed_line.as_str(),
                "ekm_missing_key": r.ekm_missing_key.as_str(),
                "corrupted_shards": r.corrupted_shards.as_str(),
            },
        })
    }
}

/// The archive format a name ends with (case-insensitive) and the extension as written in the name.
fn name_extension(name: &str) -> Option<(Format, &str)> {
    NAME_EXTENSIONS.iter().find_map(|&(ext, format)| {
        let start = name.len().checked_sub(ext.len())?;
        let tail = name.get(start..)?;
        tail.eq_ignore_ascii_case(ext).then_some((format, tail))
    })
}

/// `name` with `ext` appended unless it already ends with a known archive extension (any case).
fn append_extension(name: String, ext: &str) -> String {
    if name_extension(&name).is_some() { name } else { name + ext }
}

/// Parses an extension value (`.tar`, `tgz`, `.TAR.GZ`) into its format and its normalized text.
fn parse_extension(text: &str) -> Option<(Format, String)> {
    let format = Format::from_extension(text)?;
    let t = text.trim().to_ascii_lowercase();
    Some((format, if t.starts_with('.') { t } else { format!(".{t}") }))
}

/// Why an object name cannot be used: it must be a non-empty relative path without `..` segments (so it
/// stays inside its bucket folder), without a trailing `/` or NUL.
pub(crate) fn object_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.starts_with('/') {
        Some("must be a relative path (starts with '/')")
    } else if name.split('/').any(|seg| seg == "..") {
        Some("must not contain '..' path segments")
    } else if name.ends_with('/') {
        Some("must not end with '/'")
    } else if name.contains('\0') {
        Some("must not contain a NUL byte")
    } else {
        None
    }
}

/// Why a bucket name is invalid (AIStore's rule).
fn bucket_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("bucket name is empty".to_string())
    } else if name.contains('/') {
        Some(format!("invalid bucket name {name:?}: must not contain '/'"))
    } else if name == "." || name == ".." {
        Some(format!("invalid bucket name {name:?}"))
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        Some(format!(
            "invalid bucket name {name:?}: may only contain letters, numbers, dashes (-), underscores (_) and dots (.)"
        ))
    } else {
        None
    }
}

/// Normalizes a provider: `Ok` for usable ones, `Err(message)` for known-but-unsupported and unknown ones.
fn normalize_provider(provider: &str) -> Result<&'static str, String> {
    match provider.to_ascii_lowercase().as_str() {
        "" | "ais" => Ok("ais"),
        "s3" | "aws" => Ok("s3"),
        p @ ("gcp" | "gs" | "azure" | "az" | "oci" | "ht") => {
            Err(format!("provider {p:?} not supported (only \"ais\" and \"s3\" buckets can be sorted)"))
        }
        p => Err(format!("unknown provider {p:?} (expecting one of: ais, s3 (aws), gcp (gs), azure (az), oci, ht)")),
    }
}

/// Splits `@uuid#name` / `#name` / `name` into (uuid, name).
fn split_namespace(ns: &str) -> (&str, &str) {
    if let Some(rest) = ns.strip_prefix('@') {
        rest.split_once('#').unwrap_or((rest, ""))
    } else {
        ("", ns.strip_prefix('#').unwrap_or(ns))
    }
}

/// Joins (uuid, name) into the string form of [`BucketRef::namespace`].
fn join_namespace(uuid: &str, name: &str) -> String {
    match (uuid.is_empty(), name.is_empty()) {
        (true, true) => String::new(),
        (true, false) => format!("#{name}"),
        (false, _) => format!("@{uuid}#{name}"),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// True for values that mean "absent": null, "", 0, false, [] and objects whose values are all blank.
fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.values().all(is_blank),
    }
}

/// `path.key`, or `key` at the top level.
fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// Edit distance, for "did you mean" hints on unknown keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// One object level with lower-cased keys. Keys are removed as they are read, so what is left at
/// [`Parser::finish`] is unknown.
struct Obj {
    path: String,
    /// (lower-cased key, key as written, value)
    entries: Vec<(String, String, Value)>,
    /// Keys this level knows, for "did you mean" hints.
    known: &'static [&'static str],
}

impl Obj {
    /// The value of `key` unless absent or null.
    fn take(&mut self, key: &str) -> Option<Value> {
        let i = self.entries.iter().position(|(k, _, _)| k == key)?;
        let (_, _, v) = self.entries.remove(i);
        (!v.is_null()).then_some(v)
    }

    fn field(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

const TOP_KEYS: &[&str] = &[
    "input_bck",
    "input_format",
    "input_extension",
    "output_bck",
    "output_format",
    "output_extension",
    "output_shard_size",
    "output_shard_records",
    "algorithm",
    "ekm_file",
    "ekm_file_sep",
    "max_mem_usage",
    "extract_concurrency_max_limit",
    "create_concurrency_max_limit",
    "description",
    "dsorter_type",
    "dry_run",
    "config",
];
const BUCKET_KEYS: &[&str] = &["name", "provider", "namespace"];
const NAMESPACE_KEYS: &[&str] = &["uuid", "name"];
const INPUT_FORMAT_KEYS: &[&str] = &["template", "objnames", "prefix"];
const ALGORITHM_KEYS: &[&str] = &["kind", "decreasing", "seed", "extension", "content_key_type"];
const REACTION_KEYS: [&str; 4] = ["duplicated_records", "missing_shards", "ekm_malformed_line", "ekm_missing_key"];
const CONFIG_KEYS: &[&str] = &[
    "duplicated_records",
    "missing_shards",
    "ekm_malformed_line",
    "ekm_missing_key",
    "corrupted_shards",
    "dsorter_mem_threshold",
    "bundle_multiplier",
    "default_max_mem_usage",
    "call_timeout",
    "compression",
    "burst_buffer",
];

/// Collects errors and warnings while walking the spec.
struct Parser {
    strict: bool,
    errors: Vec<SpecError>,
    warnings: Vec<String>,
}

impl Parser {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(SpecError { field: field.into(), message: message.into() });
    }

    fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }

    /// Lower-cases the keys of one level; a key written twice in different cases is an error.
    fn obj(&mut self, path: &str, map: Map<String, Value>, known: &'static [&'static str]) -> Obj {
        let mut entries: Vec<(String, String, Value)> = Vec::with_capacity(map.len());
        for (written, value) in map {
            let lower = written.to_lowercase();
            if let Some((_, first, _)) = entries.iter().find(|(k, _, _)| *k == lower) {
                let message = format!("key given more than once (as {first:?} and {written:?})");
                self.err(join(path, &lower), message);
                continue;
            }
            entries.push((lower, written, value));
        }
        Obj { path: path.to_string(), entries, known }
    }

    /// A nested object value, or an error naming the field.
    fn nested(&mut self, field: &str, v: Value, known: &'static [&'static str], what: &str) -> Option<Obj> {
        match v {
            Value::Object(map) => Some(self.obj(field, map, known)),
            other => {
                self.err(field, format!("must be an object {what}, got {}", type_name(&other)));
                None
            }
        }
    }

    /// Reports what is left in `obj` as unknown: errors when strict, warnings otherwise.
    fn finish(&mut self, obj: Obj) {
        for (lower, written, _) in obj.entries {
            let field = join(&obj.path, &written);
            let hint = obj
                .known
                .iter()
                .map(|k| (edit_distance(&lower, k), k))
                .filter(|&(d, _)| d <= 2)
                .min()
                .map(|(_, k)| format!(" (did you mean {:?}?)", join(&obj.path, k)))
                .unwrap_or_default();
            if self.strict {
                self.err(field, format!("unknown key{hint}"));
            } else {
                self.warn(format!("{field}: unknown key ignored{hint}"));
            }
        }
    }

    /// Text of a string (or number) value; None when blank. Other types are errors.
    fn text(&mut self, field: &str, v: Option<Value>) -> Option<String> {
        match v? {
            Value::String(s) if s.is_empty() => None,
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            other => {
                self.err(field, format!("must be a string, got {}", type_name(&other)));
                None
            }
        }
    }

    /// A boolean, also written as "true"/"false" (any case); blank is false.
    fn boolean(&mut self, field: &str, v: Option<Value>) -> bool {
        match v {
            None => false,
            Some(Value::Bool(b)) => b,
            Some(Value::String(s)) if s.is_empty() || s.eq_ignore_ascii_case("false") => false,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
            Some(Value::Number(n)) if n.as_u64() == Some(0) => false,
            Some(Value::Number(n)) if n.as_u64() == Some(1) => true,
            Some(other) => {
                self.err(field, format!("must be true or false, got {other}"));
                false
            }
        }
    }

    /// An integer written as a number or a string of digits; None when blank.
    fn integer(&mut self, field: &str, v: Option<Value>) -> Option<i128> {
        let bad = |v: &Value| format!("must be an integer, got {v}");
        match v? {
            Value::Number(n) => match n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from)) {
                Some(i) => Some(i),
                None => {
                    self.err(field, bad(&Value::Number(n)));
                    None
                }
            },
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => match s.trim().parse::<i128>() {
                Ok(i) => Some(i),
                Err(_) => {
                    self.err(field, bad(&Value::String(s)));
                    None
                }
            },
            other => {
                self.err(field, bad(&other));
                None
            }
        }
    }

    /// Reads `key` from `canonical` and its alias from `alias_obj`: a legacy alias warns; both given with
    /// different values is an error. Returns the value to use.
    fn aliased(
        &mut self,
        canonical: &mut Obj,
        key: &str,
        alias_obj: &mut Obj,
        alias: &str,
        legacy: bool,
    ) -> Option<Value> {
        let main = canonical.take(key);
        let other = alias_obj.take(alias);
        let (main_blank, other_blank) = (main.as_ref().is_none_or(is_blank), other.as_ref().is_none_or(is_blank));
        if !other_blank && legacy {
            let (a, k) = (alias_obj.field(alias), canonical.field(key));
            self.warn(format!("{a}: legacy key, use {k:?} instead"));
        }
        match (main_blank, other_blank) {
            (false, false) if main != other => {
                let message = format!("given twice, as {:?} and as {:?}", canonical.field(key), alias_obj.field(alias));
                self.err(canonical.field(key), message);
                main
            }
            (true, false) => other,
            _ => main,
        }
    }

    /// Walks the whole spec in AIStore's validation order; None when a required part is missing or invalid
    /// (the errors say why).
    fn spec(&mut self, map: Map<String, Value>) -> Option<JobSpec> {
        let mut top = self.obj("", map, TOP_KEYS);
        // A second handle on the top level for legacy/YAML aliases, so `aliased` can borrow both.
        let mut alias_keys = Obj { path: String::new(), entries: Vec::new(), known: TOP_KEYS };
        for key in ["bck", "extension", "order_file", "order_file_sep", "dsortertype", "dryrun"]
            .into_iter()
            .chain(REACTION_KEYS)
        {
            if let Some(i) = top.entries.iter().position(|(k, _, _)| k == key) {
                alias_keys.entries.push(top.entries.remove(i));
            }
        }
        for obsolete in ["extended_metrics", "stream_multiplier"] {
            if let Some(i) = top.entries.iter().position(|(k, _, _)| k == obsolete) {
                let (_, written, _) = top.entries.remove(i);
                self.warn(format!("{written}: obsolete key ignored"));
            }
        }

        // 1-2. Buckets.
        let input_bck = match self.aliased(&mut top, "input_bck", &mut alias_keys, "bck", true) {
            Some(v) if !is_blank(&v) => self.bucket("input_bck", v),
            _ => {
                self.err("input_bck", "missing source bucket");
                None
            }
        };
        let output_bck = match top.take("output_bck") {
            Some(v) if !is_blank(&v) => self.bucket("output_bck", v),
            Some(Value::Object(map)) => {
                // An all-empty object (Go clients send one): check its keys, then default to input_bck.
                let mut obj = self.obj("output_bck", map, BUCKET_KEYS);
                for key in BUCKET_KEYS {
                    obj.take(key);
                }
                self.finish(obj);
                input_bck.clone()
            }
            _ => input_bck.clone(),
        };

        // 3. Input format.
        let input = self.input_format(top.take("input_format"));

        // 4-5. Input extension.
        let given_ext = self.aliased(&mut top, "input_extension", &mut alias_keys, "extension", true);
        let given_ext = self.text("input_extension", given_ext);
        let input_ext = self.input_extension(given_ext.as_deref(), input.as_ref());

        // 6. Output shard size and count.
        let size_value = top.take("output_shard_size");
        let output_shard_size = self.shard_size(size_value);
        let records_value = top.take("output_shard_records");
        let output_shard_records = match self.integer("output_shard_records", records_value) {
            Some(n) if n < 0 => {
                self.err("output_shard_records", format!("must be >= 0 (got {n})"));
                None
            }
            Some(0) | None => None,
            Some(n) => u64::try_from(n).ok(),
        };
        if output_shard_size.is_some() && output_shard_records.is_some() {
            self.err(
                "output_shard_records",
                "choose one: output_shard_size (cut by bytes) or output_shard_records (cut by record count), not both",
            );
        }

        // 7. Algorithm.
        let algorithm = match top.take("algorithm") {
            Some(v) => self.algorithm(v),
            None => Some(Algorithm::default()),
        };

        // 8. EKM.
        let ekm_file = self.aliased(&mut top, "ekm_file", &mut alias_keys, "order_file", true);
        let ekm_file = self.text("ekm_file", ekm_file);
        let ekm_sep = self.aliased(&mut top, "ekm_file_sep", &mut alias_keys, "order_file_sep", true);
        let ekm_sep = self.text("ekm_file_sep", ekm_sep);
        let ekm_given = ekm_file.is_some();
        let ekm = ekm_file.and_then(|location| self.ekm(location, ekm_sep));

        // 9-10. Output format, and the size rules that depend on it.
        let output_text = top.take("output_format");
        let output_text = self.text("output_format", output_text);
        let output_format = if ekm_given {
            if output_text.is_some() {
                self.warn("output_format: ignored because ekm_file is set (the EKM names the output shards)");
            }
            if output_shard_size.is_none() && output_shard_records.is_none() {
                self.err(
                    "output_shard_size",
                    "must be set when ekm_file is set (cannot be 0 and cannot be omitted), or set output_shard_records",
                );
            }
            None
        } else {
            self.output_format(output_text.as_deref(), output_shard_size.is_some() || output_shard_records.is_some())
        };

        // 11. Output extension.
        let out_ext_value = top.take("output_extension");
        let given_out_ext = self.text("output_extension", out_ext_value);
        let output_ext = self.output_extension(given_out_ext.as_deref(), output_format.as_ref(), input_ext.as_ref());

        // 12. Memory.
        let mem_value = top.take("max_mem_usage");
        let max_mem_usage = match self.text("max_mem_usage", mem_value) {
            None => MemQuantity::DEFAULT,
            Some(s) => parse_mem_quantity(&s).unwrap_or_else(|e| {
                self.err("max_mem_usage", e.to_string());
                MemQuantity::DEFAULT
            }),
        };

        // 13. Concurrency.
        let extract = top.take("extract_concurrency_max_limit");
        let extract_concurrency_max_limit = self.concurrency("extract_concurrency_max_limit", "extract", extract);
        let create = top.take("create_concurrency_max_limit");
        let create_concurrency_max_limit = self.concurrency("create_concurrency_max_limit", "create", create);

        // 14. Config (reactions), with the legacy top-level reaction keys.
        let config = top.take("config");
        let reactions = self.config(config, &mut alias_keys);

        // The rest.
        let description = top.take("description");
        let description = self.text("description", description).unwrap_or_default();
        let dsorter = self.aliased(&mut top, "dsorter_type", &mut alias_keys, "dsortertype", false);
        let dsorter_type = match self.text("dsorter_type", dsorter) {
            None => String::new(),
            Some(s) => match s.to_ascii_lowercase().as_str() {
                t @ ("dsort_general" | "dsort_mem") => t.to_string(),
                _ => {
                    let message =
                        format!("invalid dsorter type {s:?} (expecting one of: dsort_general, dsort_mem, or empty)");
                    self.err("dsorter_type", message);
                    String::new()
                }
            },
        };
        let dry_run = self.aliased(&mut top, "dry_run", &mut alias_keys, "dryrun", false);
        let dry_run = self.boolean("dry_run", dry_run);

        self.finish(alias_keys);
        self.finish(top);

        let (input_extension, input_extension_text) = input_ext?;
        let (output_extension, output_extension_text) = output_ext?;
        Some(JobSpec {
            input_bck: input_bck?,
            input: input?,
            input_extension,
            input_extension_text,
            output_bck: output_bck?,
            output_format: if ekm_given { None } else { Some(output_format?) },
            output_extension,
            output_extension_text,
            output_shard_size,
            output_shard_records,
            algorithm: algorithm?,
            ekm,
            max_mem_usage,
            extract_concurrency_max_limit,
            create_concurrency_max_limit,
            description,
            dsorter_type,
            dry_run,
            reactions,
        })
    }

    /// A bucket: `{name, provider, namespace}` or a string `name` / `provider://name`.
    fn bucket(&mut self, field: &str, v: Value) -> Option<BucketRef> {
        let (name, provider, namespace) = match v {
            Value::String(s) => match s.split_once("://") {
                Some((provider, name)) => (name.to_string(), provider.to_string(), String::new()),
                None => (s, String::new(), String::new()),
            },
            other => {
                let mut obj = self.nested(field, other, BUCKET_KEYS, "{name, provider, namespace}")?;
                let name = obj.take("name");
                let name = self.text(&obj.field("name"), name).unwrap_or_default();
                let provider = obj.take("provider");
                let provider = self.text(&obj.field("provider"), provider).unwrap_or_default();
                let namespace = match obj.take("namespace") {
                    None => String::new(),
                    Some(Value::String(s)) => s,
                    Some(v) => {
                        let ns_field = obj.field("namespace");
                        match self.nested(&ns_field, v, NAMESPACE_KEYS, "{uuid, name}") {
                            Some(mut ns) => {
                                let uuid = ns.take("uuid");
                                let uuid = self.text(&ns.field("uuid"), uuid).unwrap_or_default();
                                let ns_name = ns.take("name");
                                let ns_name = self.text(&ns.field("name"), ns_name).unwrap_or_default();
                                self.finish(ns);
                                join_namespace(&uuid, &ns_name)
                            }
                            None => String::new(),
                        }
                    }
                };
                self.finish(obj);
                (name, provider, namespace)
            }
        };
        let mut ok = true;
        let provider = match normalize_provider(&provider) {
            Ok(p) => p.to_string(),
            Err(message) => {
                self.err(format!("{field}.provider"), message);
                ok = false;
                String::new()
            }
        };
        if name.is_empty() && field == "input_bck" {
            self.err(field, "missing source bucket");
            ok = false;
        } else if let Some(problem) = bucket_name_problem(&name) {
            self.err(format!("{field}.name"), problem);
            ok = false;
        }
        ok.then_some(BucketRef { name, provider, namespace })
    }

    /// `input_format`: `{template}` or `{objnames}` (objnames wins when non-empty), or a legacy string.
    fn input_format(&mut self, v: Option<Value>) -> Option<InputSelection> {
        let mut prefix = None;
        let (template, objnames) = match v {
            None => (None, Vec::new()),
            Some(Value::String(s)) => {
                if !s.is_empty() {
                    self.warn("input_format: a string is the legacy (pre-2023) shape, use {\"template\": \"...\"}");
                }
                (Some(s).filter(|s| !s.is_empty()), Vec::new())
            }
            Some(other) => {
                let mut obj = self.nested("input_format", other, INPUT_FORMAT_KEYS, "{template} or {objnames}")?;
                let template = obj.take("template");
                let template = self.text("input_format.template", template);
                let given_prefix = obj.take("prefix");
                prefix = self.text("input_format.prefix", given_prefix).filter(|p| !p.is_empty());
                let objnames = match obj.take("objnames") {
                    None => Vec::new(),
                    Some(Value::Array(items)) => {
                        let mut names = Vec::with_capacity(items.len());
                        for (i, item) in items.into_iter().enumerate() {
                            match item {
                                Value::String(s) => names.push(s),
                                other => self.err(
                                    format!("input_format.objnames[{i}]"),
                                    format!("must be a string, got {}", type_name(&other)),
                                ),
                            }
                        }
                        names
                    }
                    Some(other) => {
                        let message = format!("must be a list of object names, got {}", type_name(&other));
                        self.err("input_format.objnames", message);
                        Vec::new()
                    }
                };
                self.finish(obj);
                (template, objnames)
            }
        };
        if let Some(p) = prefix {
            if template.is_some() || !objnames.is_empty() {
                self.err("input_format.prefix", "cannot be combined with input_format.template or objnames");
                return None;
            }
            let problem = if p.starts_with('/') {
                Some("must be relative (starts with '/')")
            } else if p.split('/').any(|seg| seg == "..") {
                Some("must not contain '..' path segments")
            } else if p.contains('\0') {
                Some("must not contain a NUL byte")
            } else {
                None
            };
            if let Some(problem) = problem {
                self.err("input_format.prefix", problem);
                return None;
            }
            return Some(InputSelection::Prefix(p));
        }
        if !objnames.is_empty() {
            if template.is_some() {
                self.warn("input_format.template: ignored because input_format.objnames is set");
            }
            return self.objnames(objnames);
        }
        let Some(text) = template else {
            self.err(
                "input_format",
                "missing input: set input_format.template to a range template (e.g. 'shard-{000..999}.tar'), \
                 input_format.objnames to a list, or input_format.prefix (match-all input is not supported)",
            );
            return None;
        };
        let field = "input_format.template";
        let template = match Template::parse(&text) {
            Ok(t) => t,
            Err(e) => {
                self.err(field, e.to_string());
                return None;
            }
        };
        let problem = match template.kind() {
            TemplateKind::PrefixOnly => Some(TemplateError::PrefixOnly { template: text.clone() }),
            TemplateKind::Fmt => Some(TemplateError::Unbounded { template: text.clone() }),
            TemplateKind::Bash | TemplateKind::At => match template.count() {
                Some(n) if n <= MAX_INPUT_NAMES => None,
                count => Some(TemplateError::TooManyValues { template: text.clone(), count }),
            },
        };
        if let Some(e) = problem {
            self.err(field, e.to_string());
            return None;
        }
        if let Some(problem) = template.name_at(0).as_deref().and_then(object_name_problem) {
            self.err(field, format!("object names {problem}"));
            return None;
        }
        Some(InputSelection::Template(template))
    }

    /// Checks an explicit list: valid object names, no repeats.
    fn objnames(&mut self, names: Vec<String>) -> Option<InputSelection> {
        let before = self.errors.len();
        let mut seen = std::collections::HashSet::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let field = format!("input_format.objnames[{i}]");
            if let Some(problem) = object_name_problem(name) {
                self.err(field, format!("object name {name:?} {problem}"));
            } else if !seen.insert(name.as_str()) {
                self.err(field, format!("object name {name:?} is listed more than once"));
            }
        }
        (self.errors.len() == before).then_some(InputSelection::Objnames(names))
    }

    /// The input extension: given (checked against the template suffix) or derived.
    fn input_extension(&mut self, given: Option<&str>, input: Option<&InputSelection>) -> Option<(Format, String)> {
        let field = "input_extension";
        let derived: Option<(Format, String)> = match input {
            Some(InputSelection::Template(t)) => {
                t.name_at(0).and_then(|n| name_extension(&n).map(|(f, e)| (f, e.to_ascii_lowercase())))
            }
            _ => None,
        };
        match given {
            Some(text) => {
                let Some((format, ext)) = parse_extension(text) else {
                    self.err(field, format!("unknown archive extension {text:?} (expecting one of: {EXTENSION_LIST})"));
                    return None;
                };
                match derived {
                    Some((d, dtext)) if d != format => {
                        let message = format!("{ext:?} vs {dtext:?} (the input template ends with {dtext:?})");
                        self.err(field, message);
                        None
                    }
                    _ => Some((format, ext)),
                }
            }
            None => match input {
                None => None,
                Some(InputSelection::Prefix(_)) => {
                    self.err(field, format!("must be set with input_format.prefix ({EXTENSION_LIST})"));
                    None
                }
                Some(InputSelection::Template(_)) => {
                    if derived.is_none() {
                        let message = format!(
                            "must be set: the input template does not end with a known archive extension \
                             ({EXTENSION_LIST})"
                        );
                        self.err(field, message);
                    }
                    derived
                }
                Some(InputSelection::Objnames(names)) => {
                    let mut found: Option<(Format, String)> = None;
                    for name in names {
                        match (name_extension(name), &found) {
                            (None, _) => {
                                self.err(field, format!("must be set: object {name:?} has no known archive extension"));
                                return None;
                            }
                            (Some((f, _)), Some((first, _))) if f != *first => {
                                let message = format!(
                                    "must be set: the objnames have different archive formats ({} and {})",
                                    first.extension(),
                                    f.extension()
                                );
                                self.err(field, message);
                                return None;
                            }
                            (Some((f, e)), None) => found = Some((f, e.to_ascii_lowercase())),
                            _ => {}
                        }
                    }
                    found
                }
            },
        }
    }

    /// `output_shard_size`: an IEC size; blank or 0 is None.
    fn shard_size(&mut self, v: Option<Value>) -> Option<u64> {
        let field = "output_shard_size";
        let text = match v? {
            Value::Number(n) => match n.as_u64() {
                Some(b) => return Some(b).filter(|&b| b > 0),
                None if n.as_i64().is_some_and(|i| i < 0) => {
                    self.err(field, format!("output shard size must be >= 0 (got {n})"));
                    return None;
                }
                None => n.to_string(),
            },
            Value::String(s) => s,
            other => {
                self.err(field, format!("must be a size such as '256MiB', got {}", type_name(&other)));
                return None;
            }
        };
        if text.trim().is_empty() {
            return None;
        }
        match parse_size(&text) {
            Ok(0) => None,
            Ok(b) => Some(b),
            Err(crate::size::SizeError::Negative { .. }) => {
                self.err(field, format!("output shard size must be >= 0 (got {})", text.trim()));
                None
            }
            Err(e) => {
                self.err(field, e.to_string());
                None
            }
        }
    }

    /// `algorithm`: kind, decreasing, seed, extension (or `ext`), content_key_type (or `contentkeytype`).
    fn algorithm(&mut self, v: Value) -> Option<Algorithm> {
        let mut obj = self.nested("algorithm", v, ALGORITHM_KEYS, "{kind, decreasing, seed, extension, ...}")?;
        let mut aliases = Obj { path: "algorithm".to_string(), entries: Vec::new(), known: ALGORITHM_KEYS };
        for key in ["ext", "contentkeytype"] {
            if let Some(i) = obj.entries.iter().position(|(k, _, _)| k == key) {
                aliases.entries.push(obj.entries.remove(i));
            }
        }
        let kind = obj.take("kind");
        let kind = self.text("algorithm.kind", kind).unwrap_or_default().to_ascii_lowercase();
        let decreasing = obj.take("decreasing");
        let decreasing = self.boolean("algorithm.decreasing", decreasing);
        let seed = obj.take("seed");
        let seed = self.text("algorithm.seed", seed);
        let extension = self.aliased(&mut obj, "extension", &mut aliases, "ext", false);
        let extension = self.text("algorithm.extension", extension);
        let key_type = self.aliased(&mut obj, "content_key_type", &mut aliases, "contentkeytype", false);
        let key_type = self.text("algorithm.content_key_type", key_type);
        self.finish(aliases);
        self.finish(obj);

        let kind = match kind.as_str() {
            "" | "alphanumeric" => AlgorithmKind::Alphanumeric,
            "none" => AlgorithmKind::None,
            "shuffle" => {
                let seed = match seed.as_deref().map(str::trim) {
                    None | Some("") => None,
                    Some(s) => match s.parse::<i64>() {
                        Ok(n) if n >= 0 => Some(n as u64),
                        _ => {
                            let message = format!("invalid seed {s:?} (expecting a non-negative integer value)");
                            self.err("algorithm.seed", message);
                            return None;
                        }
                    },
                };
                AlgorithmKind::Shuffle { seed }
            }
            "content" => {
                let ext = extension.as_deref().unwrap_or("").trim().to_string();
                if !ext.starts_with('.') || ext.len() < 2 {
                    let message = format!(
                        "invalid extension {ext:?}: content sorting needs the extension of the key entry, starting \
                         with '.' (e.g. \".cls\")"
                    );
                    self.err("algorithm.extension", message);
                }
                let key_type = match key_type.as_deref().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                    None | Some("") | Some("string") => Some(ContentKeyType::String),
                    Some("int") => Some(ContentKeyType::Int),
                    Some("float") => Some(ContentKeyType::Float),
                    Some(_) => {
                        let message = format!(
                            "invalid content sorting key {:?}, expecting one of: 'int', 'float', 'string'",
                            key_type.as_deref().unwrap_or("")
                        );
                        self.err("algorithm.content_key_type", message);
                        None
                    }
                };
                if !ext.starts_with('.') || ext.len() < 2 {
                    return None;
                }
                AlgorithmKind::Content { extension: ext, key_type: key_type? }
            }
            "md5" => {
                self.err("algorithm.kind", "\"md5\" not supported: AIStore's md5 is name order; use alphanumeric");
                return None;
            }
            other => {
                let message = format!(
                    "invalid sorting algorithm {other:?} (expecting one of: alphanumeric, shuffle, content, none)"
                );
                self.err("algorithm.kind", message);
                return None;
            }
        };
        if !matches!(kind, AlgorithmKind::Shuffle { .. }) && seed.is_some() {
            self.warn(format!("algorithm.seed: ignored for algorithm {:?} (only shuffle uses a seed)", kind.name()));
        }
        if !matches!(kind, AlgorithmKind::Content { .. }) {
            if extension.is_some() {
                self.warn(format!(
                    "algorithm.extension: ignored for algorithm {:?} (only content uses it)",
                    kind.name()
                ));
            }
            if key_type.is_some() {
                let message = format!(
                    "algorithm.content_key_type: ignored for algorithm {:?} (only content uses it)",
                    kind.name()
                );
                self.warn(message);
            }
        }
        Some(Algorithm { kind, decreasing })
    }

    /// `ekm_file` syntax: a path, `ais://bucket/object`, or an http(s) URL with a host.
    fn ekm(&mut self, location: String, separator: Option<String>) -> Option<EkmSource> {
        let field = "ekm_file";
        let mut ok = true;
        if location.trim().is_empty() || location.contains(['\0', '\n', '\r']) {
            self.err(field, format!("failed to parse ekm file URL {location:?}: not a path or URL"));
            ok = false;
        } else if let Some((scheme, rest)) = location.split_once("://") {
            match scheme.to_ascii_lowercase().as_str() {
                "http" | "https" => {
                    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                    if host.is_empty() || rest.contains(char::is_whitespace) {
                        self.err(
                            field,
                            format!("failed to parse ekm file URL {location:?}: expecting http(s)://host/path"),
                        );
                        ok = false;
                    }
                }
                "ais" => match rest.split_once('/') {
                    Some((bucket, object)) if bucket_name_problem(bucket).is_none() && !object.is_empty() => {
                        if let Some(problem) = object_name_problem(object) {
                            self.err(field, format!("object name {object:?} in {location:?} {problem}"));
                            ok = false;
                        }
                    }
                    _ => {
                        self.err(
                            field,
                            format!("failed to parse ekm file URL {location:?}: expecting ais://bucket/object"),
                        );
                        ok = false;
                    }
                },
                other => {
                    let message = format!(
                        "unsupported scheme {other:?} in {location:?} (expecting a path, ais://bucket/object, or an \
                         http(s) URL)"
                    );
                    self.err(field, message);
                    ok = false;
                }
            }
        }
        let separator = separator.unwrap_or_else(|| "\t".to_string());
        if separator.contains(['\n', '\r']) {
            self.err("ekm_file_sep", "must not contain a line break (the text form has one mapping per line)");
            ok = false;
        }
        ok.then_some(EkmSource { location, separator })
    }

    /// `output_format` without an EKM: a range template; unbounded needs a size (or record count).
    fn output_format(&mut self, text: Option<&str>, has_cut: bool) -> Option<Template> {
        let field = "output_format";
        let Some(text) = text else {
            self.err(field, "must be set unless ekm_file is set (empty range template)");
            return None;
        };
        let template = match Template::parse(text) {
            Ok(t) => t,
            Err(e) => {
                self.err(field, e.to_string());
                return None;
            }
        };
        if template.kind() == TemplateKind::PrefixOnly {
            let e = TemplateError::PrefixOnly { template: text.to_string() };
            self.err(field, e.to_string());
            return None;
        }
        if let Some(problem) = template.name_at(0).as_deref().and_then(object_name_problem) {
            self.err(field, format!("output names {problem}"));
            return None;
        }
        let unbounded = template.count().is_none_or(|n| n > MAX_BOUNDED_OUTPUT);
        if unbounded && !has_cut {
            self.err(
                "output_shard_size",
                "must be set when output_format is unbounded (cannot be 0 and cannot be omitted), or set \
                 output_shard_records",
            );
        }
        Some(template)
    }

    /// The output extension: given (checked against the output template suffix), else from the suffix,
    /// else the input's.
    fn output_extension(
        &mut self,
        given: Option<&str>,
        output: Option<&Template>,
        input: Option<&(Format, String)>,
    ) -> Option<(Format, String)> {
        let field = "output_extension";
        let derived = output
            .and_then(|t| t.name_at(0))
            .and_then(|n| name_extension(&n).map(|(f, e)| (f, e.to_ascii_lowercase())));
        match given {
            Some(text) => {
                let Some((format, ext)) = parse_extension(text) else {
                    self.err(field, format!("unknown archive extension {text:?} (expecting one of: {EXTENSION_LIST})"));
                    return None;
                };
                match derived {
                    Some((d, dtext)) if d != format => {
                        self.err(field, format!("{ext:?} vs {dtext:?} (the output template ends with {dtext:?})"));
                        None
                    }
                    _ => Some((format, ext)),
                }
            }
            None => derived.or_else(|| input.cloned()),
        }
    }

    /// A concurrency limit: an integer >= 0 (0 = auto).
    fn concurrency(&mut self, field: &str, what: &str, v: Option<Value>) -> usize {
        match self.integer(field, v) {
            None => 0,
            Some(n) if n < 0 => {
                self.err(field, format!("negative concurrency limit ('{what}', {n})"));
                0
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        }
    }

    /// `config` (any case), merged with the legacy top-level reaction keys in `legacy`.
    fn config(&mut self, v: Option<Value>, legacy: &mut Obj) -> Reactions {
        let mut obj = match v {
            None => Obj { path: "config".to_string(), entries: Vec::new(), known: CONFIG_KEYS },
            Some(v) => match self.nested("config", v, CONFIG_KEYS, "of reactions") {
                Some(obj) => obj,
                None => Obj { path: "config".to_string(), entries: Vec::new(), known: CONFIG_KEYS },
            },
        };
        let mut r = Reactions::default();
        let defaults = [r.duplicated_records, r.missing_shards, r.ekm_malformed_line, r.ekm_missing_key];
        let mut values = defaults;
        for ((key, default), slot) in REACTION_KEYS.iter().zip(defaults).zip(values.iter_mut()) {
            let v = self.aliased(&mut obj, key, legacy, key, true);
            *slot = self.reaction(&format!("config.{key}"), key, v, default);
        }
        [r.duplicated_records, r.missing_shards, r.ekm_malformed_line, r.ekm_missing_key] = values;
        let corrupted = obj.take("corrupted_shards");
        if let Some(s) = self.text("config.corrupted_shards", corrupted) {
            match s.trim().to_ascii_lowercase().as_str() {
                "" | "abort" => r.corrupted_shards = CorruptReaction::Abort,
                "skip" | "warn" | "ignore" => r.corrupted_shards = CorruptReaction::Skip,
                _ => self.err(
                    "config.corrupted_shards",
                    format!("invalid distributed_sort.corrupted_shards: {s:?} (expecting one of: [skip abort])"),
                ),
            }
        }
        self.unused_config(&mut obj);
        self.finish(obj);
        r
    }

    /// AIStore config keys dsort accepts but does not use: validated where cheap, a warning when set.
    fn unused_config(&mut self, obj: &mut Obj) {
        for key in [
            "dsorter_mem_threshold",
            "bundle_multiplier",
            "default_max_mem_usage",
            "call_timeout",
            "compression",
            "burst_buffer",
        ] {
            let field = obj.field(key);
            let Some(v) = obj.take(key) else { continue };
            if is_blank(&v) {
                continue;
            }
            let before = self.errors.len();
            match key {
                "dsorter_mem_threshold" => {
                    if let Some(s) = self.text(&field, Some(v))
                        && let Err(e) = parse_size(&s)
                    {
                        self.err(&field, e.to_string());
                    }
                }
                "bundle_multiplier" => {
                    if let Some(n) = self.integer(&field, Some(v))
                        && !(0..=16).contains(&n)
                    {
                        self.err(&field, format!("must be in the range [0, 16] (got {n})"));
                    }
                }
                "default_max_mem_usage" => {
                    if let Some(s) = self.text(&field, Some(v))
                        && let Err(e) = parse_mem_quantity(&s)
                    {
                        self.err(&field, e.to_string());
                    }
                }
                "compression" => {
                    if let Some(s) = self.text(&field, Some(v))
                        && !matches!(s.to_ascii_lowercase().as_str(), "never" | "always")
                    {
                        self.err(&field, format!("invalid compression {s:?} (expecting one of: never, always)"));
                    }
                }
                "burst_buffer" => {
                    if let Some(n) = self.integer(&field, Some(v))
                        && n < 0
                    {
                        self.err(&field, format!("must be >= 0 (got {n})"));
                    }
                }
                _ => {
                    self.text(&field, Some(v));
                }
            }
            if self.errors.len() == before {
                self.warn(format!("{field}: accepted for compatibility with AIStore; it has no effect in dsort"));
            }
        }
    }

    /// One reaction: ignore | warn | abort (any case); blank is the default.
    fn reaction(&mut self, field: &str, key: &str, v: Option<Value>, default: Reaction) -> Reaction {
        match self.text(field, v).map(|s| (s.trim().to_ascii_lowercase(), s)) {
            None => default,
            Some((lower, written)) => match lower.as_str() {
                "ignore" => Reaction::Ignore,
                "warn" => Reaction::Warn,
                "abort" => Reaction::Abort,
                _ => {
                    let message =
                        format!("invalid distributed_sort.{key}: {written:?} (expecting one of: [ignore warn abort])");
                    self.err(field, message);
                    default
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid minimal spec; tests patch it.
    fn base() -> Value {
        json!({
            "input_bck": {"name": "src"},
            "input_format": {"template": "shard-{0..9}"},
            "input_extension": ".tar",
            "output_format": "out-{0000..1000}",
            "output_shard_size": "10KB",
        })
    }

    /// `base()` with top-level keys set; the value "<remove>" deletes the key.
    fn with(patch: Value) -> String {
        let mut v = base();
        let (Value::Object(map), Value::Object(patch)) = (&mut v, patch) else { panic!("objects expected") };
        for (k, val) in patch {
            if val == json!("<remove>") {
                map.remove(&k);
            } else {
                map.insert(k, val);
            }
        }
        v.to_string()
    }

    fn ok(text: &str) -> Parsed {
        match parse_spec(text, true) {
            Ok(p) => p,
            Err(e) => panic!("expected a valid spec, got:\n{e}\nspec: {text}"),
        }
    }

    fn errors(text: &str) -> Vec<SpecError> {
        match parse_spec(text, true) {
            Ok(p) => panic!("expected errors, got a valid spec {:?}\nspec: {text}", p.spec),
            Err(e) => e.0,
        }
    }

    #[test]
    fn input_prefix_is_listed_with_an_explicit_extension() {
        let spec = |input_format: Value, ext: Value| {
            parse_spec(&with(json!({"input_format": input_format, "input_extension": ext})), true)
        };
        let p = spec(json!({"prefix": "train/"}), json!(".tar.gz")).unwrap().spec;
        assert_eq!(p.input, InputSelection::Prefix("train/".into()));
        assert!(p.input_names().is_err(), "a prefix is known only by listing");
        let listed = ["train/a.tar.gz", "train/b.tar", "train/c.TAR.GZ", "train/d.tgz", "train/.tar.gz"];
        let picked = p.select_listed(listed.iter().map(|s| s.to_string()).collect());
        assert_eq!(picked, ["train/a.tar.gz", "train/c.TAR.GZ", "train/.tar.gz"]);
        let again = parse_spec(&p.to_json().to_string(), true).unwrap().spec;
        assert_eq!(again.input, p.input, "to_json keeps the prefix");
        for (input_format, ext, needle) in [
            (json!({"prefix": "train/"}), json!("<remove>"), "input_extension: must be set with input_format.prefix"),
            (
                json!({"prefix": "t/", "template": "s-{0..3}.tar"}),
                json!(".tar"),
                "input_format.prefix: cannot be combined",
            ),
            (json!({"prefix": "../up"}), json!(".tar"), "input_format.prefix: must not contain '..'"),
        ] {
            let mut v: Value = serde_json::from_str(&with(json!({"input_format": input_format}))).unwrap();
            if ext == json!("<remove>") {
                v.as_object_mut().unwrap().remove("input_extension");
            } else {
                v["input_extension"] = ext;
            }
            let err = parse_spec(&v.to_string(), true).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }

    #[test]
    fn bad_specs_table() {
        let cases: Vec<(String, &str, &str)> = vec![
            (with(json!({"input_bck": "<remove>"})), "input_bck", "missing source bucket"),
            (with(json!({"input_bck": {"name": ""}})), "input_bck", "missing source bucket"),
            (with(json!({"input_bck": {"name": "a/b"}})), "input_bck.name", "must not contain '/'"),
            (
                with(json!({"input_bck": {"name": "src", "provider": "gcp"}})),
                "input_bck.provider",
                "provider \"gcp\" not supported",
            ),
            (with(json!({"input_bck": {"name": "src", "provider": "foo"}})), "input_bck.provider", "unknown provider"),
            (
                with(json!({"output_bck": {"name": "dst", "provider": "azure"}})),
                "output_bck.provider",
                "provider \"azure\" not supported",
            ),
            (with(json!({"output_bck": {"name": ".."}})), "output_bck.name", "invalid bucket name"),
            (with(json!({"output_bck": {"name": "a b"}})), "output_bck.name", "may only contain"),
            (with(json!({"input_format": "<remove>"})), "input_format", "missing input"),
            (
                with(json!({"input_format": {"template": "shard-{9..0}"}})),
                "input_format.template",
                "start 9 is greater than end 0",
            ),
            (
                with(json!({"input_format": {"template": "shard-}{"}})),
                "input_format.template",
                "invalid 'bash' template",
            ),
            (
                with(json!({"input_format": {"template": "shard-"}})),
                "input_format.template",
                "prefix-only template not supported",
            ),
            (with(json!({"input_format": {"template": "shard-%06d"}})), "input_format.template", "too many values"),
            (
                with(json!({"input_format": {"template": "s-{0..99999}-{0..999}"}})),
                "input_format.template",
                "too many values (more than 10000000 max)",
            ),
            (with(json!({"input_format": {"template": "../s-{0..9}"}})), "input_format.template", "'..' path segments"),
            (with(json!({"input_format": 7})), "input_format", "must be an object"),
            (
                with(json!({"input_format": {"objnames": ["a.tar", "a.tar"]}})),
                "input_format.objnames[1]",
                "listed more than once",
            ),
            (with(json!({"input_format": {"objnames": ["/etc/a.tar"]}})), "input_format.objnames[0]", "relative path"),
            (with(json!({"input_format": {"objnames": ["a.tar", 3]}})), "input_format.objnames[1]", "must be a string"),
            (with(json!({"input_extension": ".jpg"})), "input_extension", "unknown archive extension \".jpg\""),
            (
                with(json!({"input_format": {"template": "shard-{0..9}.tgz"}})),
                "input_extension",
                "\".tar\" vs \".tgz\"",
            ),
            (with(json!({"input_extension": "<remove>"})), "input_extension", "must be set"),
            (
                with(json!({"input_extension": "<remove>", "input_format": {"objnames": ["a.tar", "b.zip"]}})),
                "input_extension",
                "different archive formats",
            ),
            (with(json!({"output_shard_size": "-1"})), "output_shard_size", "output shard size must be >= 0"),
            (with(json!({"output_shard_size": -5})), "output_shard_size", "output shard size must be >= 0"),
            (with(json!({"output_shard_size": "10XB"})), "output_shard_size", "invalid size"),
            (with(json!({"output_shard_records": 100})), "output_shard_records", "choose one"),
            (
                with(json!({"output_shard_records": -5, "output_shard_size": "<remove>"})),
                "output_shard_records",
                "must be >= 0",
            ),
            (with(json!({"output_shard_records": "many"})), "output_shard_records", "must be an integer"),
            (
                with(json!({"algorithm": {"kind": "md5"}})),
                "algorithm.kind",
                "not supported: AIStore's md5 is name order",
            ),
            (with(json!({"algorithm": {"kind": "random"}})), "algorithm.kind", "invalid sorting algorithm \"random\""),
            (with(json!({"algorithm": {"kind": "shuffle", "seed": "abc"}})), "algorithm.seed", "invalid seed \"abc\""),
            (with(json!({"algorithm": {"kind": "shuffle", "seed": "-1"}})), "algorithm.seed", "invalid seed \"-1\""),
            (with(json!({"algorithm": {"kind": "content"}})), "algorithm.extension", "invalid extension \"\""),
            (
                with(json!({"algorithm": {"kind": "content", "extension": "cls"}})),
                "algorithm.extension",
                "starting with '.'",
            ),
            (
                with(json!({"algorithm": {"kind": "content", "extension": ".cls", "content_key_type": "bool"}})),
                "algorithm.content_key_type",
                "invalid content sorting key \"bool\"",
            ),
            (with(json!({"algorithm": "shuffle"})), "algorithm", "must be an object"),
            (with(json!({"ekm_file": "ftp://host/x"})), "ekm_file", "unsupported scheme \"ftp\""),
            (with(json!({"ekm_file": "http:///nohost"})), "ekm_file", "expecting http(s)://host/path"),
            (with(json!({"ekm_file": "ais://bucket"})), "ekm_file", "expecting ais://bucket/object"),
            (with(json!({"ekm_file": "ais://b/../x"})), "ekm_file", "'..' path segments"),
            (
                with(json!({"ekm_file": "ekm.txt", "output_shard_size": "<remove>"})),
                "output_shard_size",
                "must be set when ekm_file is set",
            ),
            (with(json!({"ekm_file": "ekm.txt", "ekm_file_sep": "\n"})), "ekm_file_sep", "line break"),
            (with(json!({"output_format": "<remove>"})), "output_format", "must be set unless ekm_file is set"),
            (with(json!({"output_format": "out-"})), "output_format", "prefix-only template not supported"),
            (with(json!({"output_format": "out-{5..1}"})), "output_format", "start 5 is greater than end 1"),
            (
                with(json!({"output_format": "out-%06d", "output_shard_size": "<remove>"})),
                "output_shard_size",
                "must be set when output_format is unbounded",
            ),
            (
                with(json!({"output_format": "out-{0..9}.tar", "output_extension": ".zip"})),
                "output_extension",
                "\".zip\" vs \".tar\"",
            ),
            (with(json!({"output_extension": ".rar"})), "output_extension", "unknown archive extension \".rar\""),
            (with(json!({"output_format": "../out-{0..9}"})), "output_format", "'..' path segments"),
            (with(json!({"output_format": "/abs/out-{0..9}"})), "output_format", "relative path"),
            (with(json!({"max_mem_usage": "80"})), "max_mem_usage", "invalid quantity"),
            (with(json!({"max_mem_usage": "120%"})), "max_mem_usage", "percent must be in the range (0, 100)"),
            (with(json!({"max_mem_usage": "-1 GB"})), "max_mem_usage", "invalid quantity"),
            (
                with(json!({"extract_concurrency_max_limit": -1})),
                "extract_concurrency_max_limit",
                "negative concurrency limit ('extract', -1)",
            ),
            (
                with(json!({"create_concurrency_max_limit": "-3"})),
                "create_concurrency_max_limit",
                "negative concurrency limit ('create', -3)",
            ),
            (
                with(json!({"config": {"missing_shards": "explode"}})),
                "config.missing_shards",
                "invalid distributed_sort.missing_shards: \"explode\" (expecting one of: [ignore warn abort])",
            ),
            (
                with(json!({"config": {"ekm_missing_key": "skip"}})),
                "config.ekm_missing_key",
                "invalid distributed_sort.ekm_missing_key",
            ),
            (with(json!({"config": {"corrupted_shards": "retry"}})), "config.corrupted_shards", "[skip abort]"),
            (with(json!({"config": {"bundle_multiplier": 20}})), "config.bundle_multiplier", "[0, 16]"),
            (with(json!({"config": {"compression": "ratio=1.2"}})), "config.compression", "invalid compression"),
            (with(json!({"config": "abort"})), "config", "must be an object"),
            (with(json!({"dsorter_type": "dsort_fast"})), "dsorter_type", "invalid dsorter type \"dsort_fast\""),
            (with(json!({"dry_run": "maybe"})), "dry_run", "must be true or false"),
            (with(json!({"description": ["x"]})), "description", "must be a string"),
            (
                with(json!({"output_shard_sise": "1KiB"})),
                "output_shard_sise",
                "unknown key (did you mean \"output_shard_size\"?)",
            ),
            (with(json!({"algorithm": {"kind": "shuffle", "sed": "1"}})), "algorithm.sed", "unknown key"),
            (with(json!({"input_bck": {"name": "src", "region": "x"}})), "input_bck.region", "unknown key"),
            (with(json!({"input_bck": 5})), "input_bck", "must be an object"),
            (with(json!({"Description": "a", "description": "b"})), "description", "given more than once"),
            (with(json!({"bck": {"name": "other"}})), "input_bck", "given twice"),
            ("{".to_string(), "spec", "invalid JSON"),
            ("[1, 2]".to_string(), "spec", "must be an object"),
            ("   ".to_string(), "spec", "empty spec"),
            ("a: [b".to_string(), "spec", "invalid YAML"),
        ];
        assert!(cases.len() >= 30);
        for (text, field, needle) in &cases {
            let errs = errors(text);
            assert!(
                errs.iter().any(|e| e.field == *field && e.message.contains(needle)),
                "spec {text}\nexpected `{field}: ...{needle}...`, got:\n{}",
                SpecErrors(errs.clone())
            );
        }
    }

    #[test]
    fn all_errors_reported_together() {
        let text = with(json!({
            "input_extension": ".jpg",
            "algorithm": {"kind": "shuffle", "seed": "x"},
            "max_mem_usage": "80",
        }));
        let errs = errors(&text);
        assert_eq!(errs.len(), 3, "{}", SpecErrors(errs.clone()));
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["input_extension", "algorithm.seed", "max_mem_usage"]);
        let shown = SpecErrors(errs).to_string();
        assert_eq!(shown.lines().count(), 3);
        assert!(shown.starts_with("input_extension: unknown archive extension"), "{shown}");
    }

    #[test]
    fn defaults() {
        let p = ok(&base().to_string());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let s = p.spec;
        assert_eq!(s.input_bck, BucketRef::ais("src"));
        assert_eq!(s.output_bck, s.input_bck);
        assert_eq!(s.input_extension, Format::Tar);
        assert_eq!(s.output_extension, Format::Tar);
        assert_eq!(s.output_shard_size, Some(10240));
        assert_eq!(s.output_shard_records, None);
        assert_eq!(s.algorithm, Algorithm { kind: AlgorithmKind::Alphanumeric, decreasing: false });
        assert_eq!(s.ekm, None);
        assert_eq!(s.max_mem_usage, MemQuantity::Percent(80));
        assert_eq!((s.extract_concurrency_max_limit, s.create_concurrency_max_limit), (0, 0));
        assert_eq!(s.dsorter_type, "");
        assert!(!s.dry_run);
        assert_eq!(s.reactions, Reactions::default());
        assert_eq!(s.reactions.duplicated_records, Reaction::Ignore);
        assert_eq!(s.reactions.missing_shards, Reaction::Ignore);
        assert_eq!(s.reactions.ekm_malformed_line, Reaction::Abort);
        assert_eq!(s.reactions.ekm_missing_key, Reaction::Abort);
        assert_eq!(s.reactions.corrupted_shards, CorruptReaction::Abort);
        assert_eq!(s.output_format.as_ref().map(|t| t.as_str()), Some("out-{0000..1000}"));
    }

    #[test]
    fn empty_zero_and_absent_are_the_same() {
        // What a Go client sends: every key, empty ones included.
        let text = json!({
            "input_bck": {"name": "src", "provider": "", "namespace": {"uuid": "", "name": ""}},
            "input_format": {"template": "shard-{0..9}.tar", "objnames": []},
            "input_extension": "",
            "output_bck": {"name": "", "provider": "", "namespace": {"uuid": "", "name": ""}},
            "output_format": "out-{0..9}",
            "output_extension": "",
            "output_shard_size": "",
            "output_shard_records": 0,
            "algorithm": {"kind": "", "decreasing": false, "seed": "", "extension": "", "content_key_type": ""},
            "ekm_file": "",
            "ekm_file_sep": "",
            "max_mem_usage": "",
            "extract_concurrency_max_limit": 0,
            "create_concurrency_max_limit": 0,
            "description": "",
            "dsorter_type": "",
            "dry_run": false,
            "Config": {"duplicated_records": "", "missing_shards": "", "ekm_malformed_line": "", "ekm_missing_key": "",
                       "dsorter_mem_threshold": "", "compression": "", "call_timeout": "", "bundle_multiplier": 0},
        });
        let p = ok(&text.to_string());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.spec.output_bck, BucketRef::ais("src"));
        assert_eq!(p.spec.output_shard_size, None);
        assert_eq!(p.spec.input_extension_text, ".tar");
        assert_eq!(p.spec.reactions, Reactions::default());
        // 0 means absent for the size too, and a bounded output template needs none.
        assert_eq!(ok(&with(json!({"output_shard_size": "0"}))).spec.output_shard_size, None);
        assert_eq!(ok(&with(json!({"output_shard_size": 0}))).spec.output_shard_size, None);
        assert_eq!(ok(&with(json!({"output_shard_size": 4096}))).spec.output_shard_size, Some(4096));
        assert_eq!(ok(&with(json!({"output_shard_size": null}))).spec.output_shard_size, None);
    }

    #[test]
    fn keys_match_case_insensitively_at_every_level() {
        let text = r#"{
            "Input_Bck": {"Name": "src", "PROVIDER": "AWS"},
            "INPUT_FORMAT": {"Template": "shard-{00..19}.tgz"},
            "Output_Format": "out-{000..999}",
            "Output_Extension": ".TAR.LZ4",
            "Output_Shard_Size": "1MiB",
            "Algorithm": {"Kind": "Content", "Extension": ".cls", "Content_Key_Type": "INT", "Decreasing": true},
            "Max_Mem_Usage": "2GiB",
            "Dsorter_Type": "DSORT_MEM",
            "Dry_Run": "true",
            "Config": {"Missing_Shards": "WARN", "Duplicated_Records": "Abort", "Corrupted_Shards": "Skip"}
        }"#;
        let p = ok(text);
        let s = p.spec;
        assert_eq!(s.input_bck.provider, "s3");
        assert_eq!(s.input_extension, Format::TarGz);
        assert_eq!(s.input_extension_text, ".tgz");
        assert_eq!(s.output_extension, Format::TarLz4);
        assert_eq!(s.output_extension_text, ".tar.lz4");
        assert_eq!(
            s.algorithm,
            Algorithm {
                kind: AlgorithmKind::Content { extension: ".cls".into(), key_type: ContentKeyType::Int },
                decreasing: true
            }
        );
        assert_eq!(s.max_mem_usage, MemQuantity::Bytes(2 << 30));
        assert_eq!(s.dsorter_type, "dsort_mem");
        assert!(s.dry_run);
        assert_eq!(s.reactions.missing_shards, Reaction::Warn);
        assert_eq!(s.reactions.duplicated_records, Reaction::Abort);
        assert_eq!(s.reactions.corrupted_shards, CorruptReaction::Skip);
    }

    #[test]
    fn yaml_form_with_aistore_spellings() {
        let text = "\
input_bck:
  name: src
  provider: ais
input_format:
  template: shard-{0..9}
input_extension: .tar
output_bck: {name: dst}
output_format: out-%06d
output_shard_size: 256MiB
algorithm:
  kind: content
  ext: .cls
  contentkeytype: float
dsortertype: dsort_general
dryrun: true
extract_concurrency_max_limit: 4
description: yaml spec
config:
  ekm_missing_key: warn
";
        let p = ok(text);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let s = p.spec;
        assert_eq!(s.output_bck, BucketRef::ais("dst"));
        assert_eq!(s.output_format.as_ref().map(|t| t.kind()), Some(TemplateKind::Fmt));
        assert_eq!(s.output_shard_size, Some(256 << 20));
        assert_eq!(
            s.algorithm.kind,
            AlgorithmKind::Content { extension: ".cls".into(), key_type: ContentKeyType::Float }
        );
        assert_eq!(s.dsorter_type, "dsort_general");
        assert!(s.dry_run);
        assert_eq!(s.extract_concurrency_max_limit, 4);
        assert_eq!(s.description, "yaml spec");
        assert_eq!(s.reactions.ekm_missing_key, Reaction::Warn);
        // A YAML seed written as a number is fine.
        let y = "input_bck: {name: s}\ninput_format: {template: 'a-{0..1}.tar'}\noutput_format: 'b-{0..1}'\n\
                 algorithm: {kind: shuffle, seed: 42}\n";
        assert_eq!(ok(y).spec.algorithm.kind, AlgorithmKind::Shuffle { seed: Some(42) });
    }

    #[test]
    fn legacy_keys_are_accepted_with_warnings() {
        let text = json!({
            "bck": {"name": "src"},
            "extension": ".tar",
            "input_format": "samples-{00..18}",
            "output_format": "shuffled-shard-%d",
            "output_shard_size": "100MB",
            "order_file": "https://example.com/ekm.txt",
            "order_file_sep": " ",
            "missing_shards": "warn",
            "extended_metrics": true,
        });
        let p = ok(&text.to_string());
        let s = &p.spec;
        assert_eq!(s.input_bck, BucketRef::ais("src"));
        assert_eq!(s.input_extension, Format::Tar);
        assert_eq!(s.input_names().unwrap()[0], "samples-00.tar");
        assert_eq!(s.ekm, Some(EkmSource { location: "https://example.com/ekm.txt".into(), separator: " ".into() }));
        assert_eq!(s.output_format, None);
        assert_eq!(s.reactions.missing_shards, Reaction::Warn);
        let w = p.warnings.join("\n");
        for needle in [
            "bck: legacy key, use \"input_bck\"",
            "extension: legacy key, use \"input_extension\"",
            "order_file: legacy key, use \"ekm_file\"",
            "order_file_sep: legacy key, use \"ekm_file_sep\"",
            "missing_shards: legacy key, use \"config.missing_shards\"",
            "input_format: a string is the legacy",
            "extended_metrics: obsolete key ignored",
            "output_format: ignored because ekm_file is set",
        ] {
            assert!(w.contains(needle), "missing warning {needle:?} in:\n{w}");
        }
        // The same value under both names is fine; different values are an error (in the table).
        let both = with(json!({"bck": {"name": "src"}}));
        assert_eq!(ok(&both).spec.input_bck.name, "src");
    }

    #[test]
    fn unknown_keys_strict_vs_lenient() {
        let text = with(json!({"colour": "blue", "algorithm": {"kind": "none", "speed": 3}}));
        let errs = errors(&text);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["algorithm.speed", "colour"]);
        let p = parse_spec(&text, false).unwrap();
        assert_eq!(p.spec.algorithm.kind, AlgorithmKind::None);
        assert_eq!(
            p.warnings,
            ["algorithm.speed: unknown key ignored (did you mean \"algorithm.seed\"?)", "colour: unknown key ignored"]
        );
    }

    #[test]
    fn buckets_and_providers() {
        let s = ok(&with(json!({
            "input_bck": {"name": "src", "provider": "aws", "namespace": {"uuid": "", "name": "ns1"}},
            "output_bck": "s3://dst",
        })))
        .spec;
        assert_eq!(s.input_bck.provider, "s3");
        assert_eq!(s.input_bck.namespace, "#ns1");
        assert_eq!(s.input_bck.to_string(), "s3://#ns1/src");
        assert_eq!(s.output_bck, BucketRef { name: "dst".into(), provider: "s3".into(), namespace: String::new() });
        let s = ok(&with(json!({"input_bck": "src"}))).spec;
        assert_eq!(s.input_bck, BucketRef::ais("src"));
    }

    #[test]
    fn algorithms() {
        let kind = |alg: Value| ok(&with(json!({ "algorithm": alg }))).spec.algorithm.kind;
        assert_eq!(kind(json!({"kind": "shuffle"})), AlgorithmKind::Shuffle { seed: None });
        assert_eq!(kind(json!({"kind": "shuffle", "seed": "1010102"})), AlgorithmKind::Shuffle { seed: Some(1010102) });
        assert_eq!(kind(json!({"kind": "shuffle", "seed": "0"})), AlgorithmKind::Shuffle { seed: Some(0) });
        assert_eq!(kind(json!({"kind": "none"})), AlgorithmKind::None);
        assert_eq!(
            kind(json!({"kind": "content", "extension": " .cls "})),
            AlgorithmKind::Content { extension: ".cls".into(), key_type: ContentKeyType::String }
        );
        let p = ok(&with(json!({"algorithm": {"kind": "alphanumeric", "content_key_type": "int", "seed": "5"}})));
        let w = p.warnings.join("\n");
        assert!(w.contains("algorithm.content_key_type: ignored"), "{w}");
        assert!(w.contains("algorithm.seed: ignored"), "{w}");
    }

    #[test]
    fn ekm_locations_and_output() {
        for loc in ["ekm.txt", "/abs/dir/ekm.json", "ais://bucket/dir/ekm.json", "https://host:8080/x?y=1", "http://h"]
        {
            let p = ok(&with(json!({"ekm_file": loc, "output_format": "<remove>"})));
            let ekm = p.spec.ekm.clone().unwrap();
            assert_eq!((ekm.location.as_str(), ekm.separator.as_str()), (loc, "\t"));
            assert_eq!(p.spec.output_format, None);
            assert_eq!(p.spec.output_name(0), None);
        }
        // EKM with a record count instead of a size.
        let s = ok(&with(json!({"ekm_file": "e.txt", "output_shard_size": "<remove>", "output_shard_records": 10})));
        assert_eq!(s.spec.output_shard_records, Some(10));
        assert_eq!(s.spec.output_shard_size, None);
    }

    #[test]
    fn record_count_cut() {
        let s = ok(&with(
            json!({"output_format": "out-%05d", "output_shard_size": "<remove>", "output_shard_records": "500"}),
        ));
        assert_eq!(s.spec.output_shard_records, Some(500));
        assert_eq!(s.spec.output_shard_size, None);
    }

    #[test]
    fn corrupted_shards_synonyms() {
        for (v, want) in [
            ("skip", CorruptReaction::Skip),
            ("warn", CorruptReaction::Skip),
            ("ignore", CorruptReaction::Skip),
            ("abort", CorruptReaction::Abort),
        ] {
            let s = ok(&with(json!({"config": {"corrupted_shards": v}}))).spec;
            assert_eq!(s.reactions.corrupted_shards, want, "{v}");
        }
    }

    #[test]
    fn unused_config_keys_warn() {
        let p = ok(&with(json!({"config": {"dsorter_mem_threshold": "100GB", "call_timeout": "10m"}})));
        let w = p.warnings.join("\n");
        assert!(w.contains("config.dsorter_mem_threshold: accepted for compatibility"), "{w}");
        assert!(w.contains("config.call_timeout: accepted for compatibility"), "{w}");
    }

    #[test]
    fn input_names_extension_rules() {
        let s = ok(&with(json!({"input_format": {"template": "shard-{0..2}"}}))).spec;
        assert_eq!(s.input_names().unwrap(), ["shard-0.tar", "shard-1.tar", "shard-2.tar"]);
        // The extension as written is what gets appended.
        let s = ok(&with(json!({"input_format": {"template": "s-{0..1}"}, "input_extension": "tgz"}))).spec;
        assert_eq!(s.input_extension, Format::TarGz);
        assert_eq!(s.input_names().unwrap(), ["s-0.tgz", "s-1.tgz"]);
        // .tgz and .tar.gz are one format: no conflict, names kept.
        let s = ok(&with(json!({"input_format": {"template": "s-{0..1}.tgz"}, "input_extension": ".tar.gz"}))).spec;
        assert_eq!(s.input_names().unwrap(), ["s-0.tgz", "s-1.tgz"]);
        // Derived from the template suffix.
        let s = ok(&with(json!({"input_format": {"template": "s-@1.zip"}, "input_extension": "<remove>"}))).spec;
        assert_eq!((s.input_extension, s.output_extension), (Format::Zip, Format::Zip));
        assert_eq!(s.input_names().unwrap(), ["s-0.zip", "s-1.zip"]);
        assert_eq!(s.output_name(0).as_deref(), Some("out-0000.zip"));
        // Names whose known extension differs from input_extension are skipped.
        let mut s = ok(&with(json!({"input_format": {"template": "s-{0..1}.tar"}}))).spec;
        s.input_extension = Format::Zip;
        assert_eq!(s.input_names().unwrap(), Vec::<String>::new());
        // Objnames as given; the extension derived when they agree.
        let s = ok(&with(
            json!({"input_format": {"objnames": ["b.tar.zst", "dir/a.tar.zst"]}, "input_extension": "<remove>"}),
        ))
        .spec;
        assert_eq!(s.input_extension, Format::TarZst);
        assert_eq!(s.input_names().unwrap(), ["b.tar.zst", "dir/a.tar.zst"]);
        assert_eq!(s.input_count(), 2);
        // objnames wins over the template, with a warning.
        let p = ok(&with(json!({"input_format": {"template": "x-{0..3}", "objnames": ["a.tar"]}})));
        assert_eq!(p.spec.input_names().unwrap(), ["a.tar"]);
        assert!(p.warnings[0].contains("input_format.template: ignored"));
    }

    #[test]
    fn output_name_appending() {
        let s = ok(&with(json!({"output_format": "out-{00..02}", "output_extension": ".tar.lz4"}))).spec;
        assert_eq!(s.output_extension, Format::TarLz4);
        let names: Vec<_> = (0..4).map(|i| s.output_name(i)).collect();
        assert_eq!(
            names,
            [Some("out-00.tar.lz4".to_string()), Some("out-01.tar.lz4".into()), Some("out-02.tar.lz4".into()), None]
        );
        // The output template's suffix picks the format; nothing is appended.
        let s = ok(&with(json!({"output_format": "dir/o-{0..9}.TGZ"}))).spec;
        assert_eq!(s.output_extension, Format::TarGz);
        assert_eq!(s.output_name(3).as_deref(), Some("dir/o-3.TGZ"));
        // Unbounded output with a size.
        let s = ok(&with(json!({"output_format": "o-%03d"}))).spec;
        assert_eq!(s.output_name(12345).as_deref(), Some("o-12345.tar"));
        // Default: the input extension.
        let s = ok(&with(json!({"input_format": {"template": "s-{0..1}.zip"}, "input_extension": "<remove>"}))).spec;
        assert_eq!(s.output_name(1).as_deref(), Some("out-0001.zip"));
    }

    #[test]
    fn to_json_round_trips() {
        let specs = [
            base().to_string(),
            with(json!({
                "input_bck": {"name": "src", "provider": "s3", "namespace": {"uuid": "u1", "name": "n1"}},
                "output_bck": {"name": "dst"},
                "input_format": {"objnames": ["a.tgz", "b.tgz"]},
                "input_extension": ".tgz",
                "output_format": "o-%06d",
                "output_extension": ".tar.zst",
                "algorithm": {"kind": "shuffle", "seed": "7", "decreasing": true},
                "max_mem_usage": "1GiB",
                "extract_concurrency_max_limit": 3,
                "create_concurrency_max_limit": 5,
                "description": "d",
                "dsorter_type": "dsort_mem",
                "dry_run": true,
                "config": {"duplicated_records": "warn", "missing_shards": "abort", "ekm_malformed_line": "ignore",
                           "ekm_missing_key": "warn", "corrupted_shards": "skip"},
            })),
            with(json!({
                "ekm_file": "ais://b/ekm.json", "ekm_file_sep": ",", "output_format": "<remove>",
                "output_shard_size": "<remove>", "output_shard_records": 9,
                "algorithm": {"kind": "content", "extension": ".key", "content_key_type": "float"},
            })),
        ];
        for text in specs {
            let first = ok(&text).spec;
            let json = first.to_json();
            let again = parse_spec(&json.to_string(), true).unwrap_or_else(|e| panic!("{e}\n{json}"));
            assert!(again.warnings.is_empty(), "{:?}", again.warnings);
            assert_eq!(again.spec, first, "{json}");
            assert_eq!(again.spec.to_json(), json);
        }
    }

    #[test]
    fn extension_and_name_helpers() {
        assert_eq!(name_extension("a.TAR.GZ"), Some((Format::TarGz, ".TAR.GZ")));
        assert_eq!(name_extension("a.tgz"), Some((Format::TarGz, ".tgz")));
        assert_eq!(name_extension("a.tar"), Some((Format::Tar, ".tar")));
        assert_eq!(name_extension("a"), None);
        assert_eq!(name_extension("é"), None);
        assert_eq!(object_name_problem("a/../b"), Some("must not contain '..' path segments"));
        assert_eq!(object_name_problem("a/..b/c"), None);
        assert_eq!(object_name_problem("a/"), Some("must not end with '/'"));
        assert_eq!(split_namespace("@u#n"), ("u", "n"));
        assert_eq!(join_namespace("u", "n"), "@u#n");
        assert_eq!(edit_distance("output_shard_sise", "output_shard_size"), 1);
    }
}
