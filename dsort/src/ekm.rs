//! External key map (EKM): which output shard each record goes to.
//!
//! Two forms, as AIStore reads them:
//! - JSON: `{ "<output shard template>": ["<record name | regex | template>", ...], ... }` (a single string
//!   is accepted in place of the list);
//! - text: one `<record name | regex | template><sep><output shard template>` per line. Blank lines are
//!   skipped; both parts are trimmed of surrounding whitespace; a line that does not split into exactly two
//!   non-empty parts is malformed and follows the `ekm_malformed_line` reaction (ignore: skipped; warn:
//!   skipped with a warning; abort: an error naming the line number and text).
//!
//! The text is taken as JSON when its first non-space character is `{`; if it then fails to parse as JSON
//! but its first line contains the separator, it is read as text (a text EKM may start with a `{0..9}`
//! template), otherwise the JSON error is reported.
//!
//! How a value is read (AIStore treats every value as a regex; plain names are the common case, so we
//! match them exactly, which also avoids AIStore's "multiple matches" when one name is a prefix of another):
//! - a value with a regex metacharacter other than braces (`^ $ * + ? ( ) [ ] | \`) is a regex, matched
//!   unanchored against the record's key like AIStore (`.` alone does not make a regex: `cat_1.txt` is a name);
//! - else a value with braces that parses as a bash template (`img-{000..099}.jpg`) is expanded to names
//!   (at most 10M); braces that do not form a template (`a{2}`) make it a regex. `@` and `%` in values are
//!   literal, since they are common in names;
//! - else it is a literal name, matched exactly against the record name or the key (the key of name
//!   orders is the first entry's path with its extension, so AIStore maps listing `cat_1.txt` still work).
//!
//! Exactly one output shard must match a record: rules that agree on the shard are not ambiguous. A name
//! mapped to two shards, or one regex given for two shards, is an error at parse time.
//!
//! Output shard names are templates (bash, at, fmt) used as written (no extension appended); each may
//! expand to several shards cut by size. A text without range syntax names exactly one shard. Output names
//! must be relative paths without `..` segments.

use crate::spec::{Reaction, object_name_problem};
use crate::template::{Template, TemplateKind};
use regex::{Regex, RegexSet};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

/// Record names that the templates of one map may expand to, in all: each costs ~80 B (name, table slot),
/// so this bounds a map's expanded names near 800 MiB, and the job pays them from its pool
/// ([`Ekm::mem_size`]) before any work.
pub const MAX_EXPANDED_NAMES: u64 = 10_000_000;

/// Characters that make a value a regex (braces are handled separately: they may form a template).
const REGEX_META: &[char] = &['^', '$', '*', '+', '?', '(', ')', '[', ']', '|', '\\'];

/// Why an EKM could not be parsed. `line` is 1-based, for the text form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EkmError {
    pub line: Option<usize>,
    pub message: String,
}

/// Why a record has no output shard.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EkmLookupError {
    /// No rule matches (reaction `ekm_missing_key`).
    #[error("no match found in external key map for record {record:?} (key {key:?})")]
    Missing { record: String, key: String },
    /// Rules for different output shards match.
    #[error("multiple matches found in external key map for record {record:?} (key {key:?}): output shards {shards:?}")]
    Ambiguous { record: String, key: String, shards: Vec<String> },
}

/// One output shard template, as written and parsed.
#[derive(Clone, Debug)]
struct Shard {
    text: String,
    template: Template,
}

/// A parsed external key map. Invariant: every rule points into `shards`; a literal name maps to one shard;
/// `regex_shard[i]` is the shard of pattern `i` of `set`.
#[derive(Clone, Debug)]
pub struct Ekm {
    shards: Vec<Shard>,
    shard_index: HashMap<String, usize>,
    literals: HashMap<String, usize>,
    regex_patterns: Vec<String>,
    regex_shard: Vec<usize>,
    set: RegexSet,
}

/// Parses an EKM from its text (JSON or lines split by `separator`); malformed text lines follow `malformed`.
pub fn parse_ekm(text: &str, separator: &str, malformed: Reaction) -> Result<(Ekm, Vec<String>), EkmError> {
    parse_ekm_bounded(text, separator, malformed, MAX_EXPANDED_NAMES)
}

/// [`parse_ekm`] with templates expanding to at most `max_names` record names in all.
fn parse_ekm_bounded(
    text: &str,
    separator: &str,
    malformed: Reaction,
    max_names: u64,
) -> Result<(Ekm, Vec<String>), EkmError> {
    if separator.is_empty() {
        return Err(EkmError { line: None, message: "external key map separator is empty".to_string() });
    }
    let mut b = Builder { max_expanded: max_names, ..Builder::default() };
    let mut warnings = Vec::new();
    if text.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        match OrderedMap::deserialize(&mut de).and_then(|m| de.end().map(|()| m)) {
            Ok(OrderedMap(entries)) => {
                for (shard, values) in entries {
                    b.json_entry(&shard, values)?;
                }
                return b.build();
            }
            Err(e) => {
                let first_line = text.trim_start().lines().next().unwrap_or("");
                if !first_line.contains(separator) {
                    return Err(EkmError { line: None, message: format!("invalid JSON external key map: {e}") });
                }
            }
        }
    }
    for (i, raw) in text.split('\n').enumerate() {
        let line_no = i + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(separator).map(str::trim).collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            let message = format!("malformed line ({line_no}) in external key map: {line}");
            match malformed {
                Reaction::Ignore => continue,
                Reaction::Warn => {
                    warnings.push(message);
                    continue;
                }
                Reaction::Abort => return Err(EkmError { line: Some(line_no), message }),
            }
        }
        let shard = b.shard(parts[1], Some(line_no))?;
        b.rule(parts[0], shard, Some(line_no))?;
    }
    let ekm = b.build()?.0;
    Ok((ekm, warnings))
}

impl Ekm {
    /// The output shard name for a record. `record_name` is the record's name (without the shard), `key` is
    /// the algorithm key rendered as text (first entry path for name orders, content value for content sort).
    /// Literal names match `record_name` or `key` exactly; regexes match unanchored against `key`; templates
    /// were expanded to literal names. Exactly one output shard must match.
    pub fn lookup(&self, record_name: &str, key: &str) -> Result<&str, EkmLookupError> {
        self.lookup_index(record_name, key).map(|i| self.shards[i].text.as_str())
    }

    /// Like [`Ekm::lookup`], but the output shard's position in [`Ekm::shard_templates`] (no string search).
    pub fn lookup_index(&self, record_name: &str, key: &str) -> Result<usize, EkmLookupError> {
        let mut matched: Vec<usize> = Vec::with_capacity(1);
        let mut add = |shard: usize| {
            if !matched.contains(&shard) {
                matched.push(shard);
            }
        };
        if let Some(&s) = self.literals.get(record_name) {
            add(s);
        }
        if key != record_name
            && let Some(&s) = self.literals.get(key)
        {
            add(s);
        }
        if !self.regex_shard.is_empty() {
            for i in self.set.matches(key).iter() {
                add(self.regex_shard[i]);
            }
        }
        match matched.as_slice() {
            [one] => Ok(*one),
            [] => Err(EkmLookupError::Missing { record: record_name.to_string(), key: key.to_string() }),
            many => {
                let mut sorted = many.to_vec();
                sorted.sort_unstable();
                Err(EkmLookupError::Ambiguous {
                    record: record_name.to_string(),
                    key: key.to_string(),
                    shards: sorted.into_iter().map(|i| self.shards[i].text.clone()).collect(),
                })
            }
        }
    }

    /// The output shard templates in first-seen order.
    pub fn shard_templates(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.text.as_str()).collect()
    }

    /// The parsed template of an output shard name as returned by [`Ekm::lookup`].
    pub fn template(&self, shard: &str) -> Option<&Template> {
        self.shard_index.get(shard).map(|&i| &self.shards[i].template)
    }

    /// Number of literal names (templates expanded) and regexes.
    pub fn rule_count(&self) -> usize {
        self.literals.len() + self.regex_patterns.len()
    }

    /// The regex patterns, in the order given.
    pub fn regexes(&self) -> &[String] {
        &self.regex_patterns
    }

    /// Bytes the map holds, as the allocator sizes them (literal names, expanded templates included, and
    /// their table; patterns; shard templates counted by text): what the job pays from its pool, since it
    /// grows with the map's rules. The compiled regex set is not counted (bounded by regex's size limit).
    pub fn mem_size(&self) -> u64 {
        use crate::key::heap_block;
        let slot = size_of::<(String, usize)>() + 1;
        let literals =
            self.literals.capacity() * slot + self.literals.keys().map(|k| heap_block(k.len())).sum::<usize>();
        let patterns = self.regex_patterns.iter().map(|p| heap_block(p.len()) + size_of::<String>() + 8).sum::<usize>();
        let shards =
            self.shards.iter().map(|s| 2 * heap_block(s.text.len()) + size_of::<Shard>() + slot).sum::<usize>();
        (literals + patterns + shards) as u64
    }
}

/// Accumulates rules while parsing; checks duplicates as they arrive.
#[derive(Default)]
struct Builder {
    shards: Vec<Shard>,
    shard_index: HashMap<String, usize>,
    literals: HashMap<String, usize>,
    regex_patterns: Vec<String>,
    regex_shard: Vec<usize>,
    regex_index: HashMap<String, usize>,
    /// Names expanded from templates so far, and their bound ([`MAX_EXPANDED_NAMES`] but in tests).
    expanded: u64,
    max_expanded: u64,
}

fn at_line(line: Option<usize>, message: String) -> EkmError {
    let message = match line {
        Some(n) => format!("line {n} of external key map: {message}"),
        None => format!("external key map: {message}"),
    };
    EkmError { line, message }
}

impl Builder {
    /// One JSON entry: an output shard template and its names/regexes/templates.
    fn json_entry(&mut self, shard_text: &str, values: Value) -> Result<(), EkmError> {
        let shard = self.shard(shard_text, None)?;
        let items = match values {
            Value::String(s) => vec![Value::String(s)],
            Value::Array(items) => items,
            other => {
                return Err(at_line(
                    None,
                    format!("the value of {shard_text:?} must be a list of record names or regexes, got {other}"),
                ));
            }
        };
        for item in items {
            match item {
                Value::String(s) => self.rule(s.trim(), shard, None)?,
                other => {
                    return Err(at_line(None, format!("in {shard_text:?}: {other} is not a record name or regex")));
                }
            }
        }
        Ok(())
    }

    /// The index of an output shard template, parsing and checking it the first time.
    fn shard(&mut self, text: &str, line: Option<usize>) -> Result<usize, EkmError> {
        if let Some(&i) = self.shard_index.get(text) {
            return Ok(i);
        }
        let template =
            Template::parse(text).map_err(|e| at_line(line, format!("invalid output shard name {text:?}: {e}")))?;
        let first = match template.kind() {
            TemplateKind::PrefixOnly => Some(text.to_string()),
            _ => template.name_at(0),
        };
        if let Some(problem) = first.as_deref().and_then(object_name_problem) {
            return Err(at_line(line, format!("output shard name {text:?}: names {problem}")));
        }
        let i = self.shards.len();
        self.shards.push(Shard { text: text.to_string(), template });
        self.shard_index.insert(text.to_string(), i);
        Ok(i)
    }

    /// One record rule for `shard`: a literal name, a bash template (expanded), or a regex.
    fn rule(&mut self, value: &str, shard: usize, line: Option<usize>) -> Result<(), EkmError> {
        if value.is_empty() {
            return Err(at_line(line, "empty record name".to_string()));
        }
        if value.contains(REGEX_META) {
            return self.regex(value, shard, line);
        }
        if value.contains(['{', '}']) {
            return match Template::parse(value) {
                Ok(t) if t.kind() == TemplateKind::Bash => {
                    // A template too large by itself is refused by `expand_input` (its own message).
                    let count = t.count().unwrap_or(u64::MAX);
                    self.expanded = self.expanded.saturating_add(count);
                    if count <= self.max_expanded && self.expanded > self.max_expanded {
                        return Err(at_line(
                            line,
                            format!(
                                "record name template {value:?}: the map's templates expand to more than {} \
                                 record names in all; use a regex for large ranges",
                                self.max_expanded
                            ),
                        ));
                    }
                    let names =
                        t.expand_input().map_err(|e| at_line(line, format!("record name template {value:?}: {e}")))?;
                    names.into_iter().try_for_each(|name| self.literal(name, shard, line))
                }
                _ => self.regex(value, shard, line),
            };
        }
        self.literal(value.to_string(), shard, line)
    }

    fn literal(&mut self, name: String, shard: usize, line: Option<usize>) -> Result<(), EkmError> {
        match self.literals.entry(name) {
            Entry::Vacant(v) => {
                v.insert(shard);
                Ok(())
            }
            Entry::Occupied(o) if *o.get() == shard => Ok(()),
            Entry::Occupied(o) => {
                let (a, b) = (&self.shards[*o.get()].text, &self.shards[shard].text);
                Err(at_line(line, format!("record name {:?} is mapped to two output shards: {a:?} and {b:?}", o.key())))
            }
        }
    }

    fn regex(&mut self, pattern: &str, shard: usize, line: Option<usize>) -> Result<(), EkmError> {
        match self.regex_index.get(pattern) {
            Some(&s) if s == shard => return Ok(()),
            Some(&s) => {
                let (a, b) = (&self.shards[s].text, &self.shards[shard].text);
                return Err(at_line(
                    line,
                    format!("duplicated regex keys: {pattern:?} is mapped to two output shards: {a:?} and {b:?}"),
                ));
            }
            None => {}
        }
        Regex::new(pattern).map_err(|e| at_line(line, format!("invalid regex {pattern:?}: {e}")))?;
        self.regex_index.insert(pattern.to_string(), shard);
        self.regex_patterns.push(pattern.to_string());
        self.regex_shard.push(shard);
        Ok(())
    }

    fn build(self) -> Result<(Ekm, Vec<String>), EkmError> {
        if self.shards.is_empty() {
            return Err(EkmError { line: None, message: "external key map is empty".to_string() });
        }
        let set = RegexSet::new(&self.regex_patterns)
            .map_err(|e| EkmError { line: None, message: format!("external key map regexes: {e}") })?;
        let ekm = Ekm {
            shards: self.shards,
            shard_index: self.shard_index,
            literals: self.literals,
            regex_patterns: self.regex_patterns,
            regex_shard: self.regex_shard,
            set,
        };
        Ok((ekm, Vec::new()))
    }
}

/// A JSON object read in document order (serde_json's `Map` sorts keys), so shards keep first-seen order.
struct OrderedMap(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of output shard templates to lists of record names or regexes")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedMap, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    entries.push((k, v));
                }
                Ok(OrderedMap(entries))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Ekm {
        match parse_ekm(text, "\t", Reaction::Abort) {
            Ok((ekm, warnings)) => {
                assert!(warnings.is_empty(), "{warnings:?}");
                ekm
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn err(text: &str, sep: &str) -> EkmError {
        match parse_ekm(text, sep, Reaction::Abort) {
            Ok((ekm, _)) => panic!("expected an error, got {ekm:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn expanded_names_are_counted_in_its_size_and_bounded_in_all() {
        let small = parse("a-{0..9}\tout-0.tar\n");
        let large = parse("a-{0..99999}\tout-0.tar\n");
        assert_eq!(large.rule_count(), 100_000);
        assert!(small.mem_size() > 10 * 32, "{}", small.mem_size());
        assert!(large.mem_size() > 100_000 * 50, "every expanded name is counted: {}", large.mem_size());
        // Each template under the per-template cap, but together above the map's.
        let text = "a-{1..80}\tout-0.tar\nb-{1..80}\tout-1.tar\n";
        assert!(parse_ekm_bounded(text, "\t", Reaction::Abort, 160).is_ok());
        let err = parse_ekm_bounded(text, "\t", Reaction::Abort, 150).unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("more than 150 record names in all"), "{err}");
    }

    #[test]
    fn text_form_with_tab() {
        let ekm = parse("cat_1.txt\tcats-%d.tar\n\ndog_1.txt\tdogs-%d.tar\r\ncat_2.txt\tcats-%d.tar\n  \n");
        assert_eq!(ekm.shard_templates(), ["cats-%d.tar", "dogs-%d.tar"]);
        // Matched by key (AIStore maps list file names) or by record name.
        assert_eq!(ekm.lookup("cat_1", "cat_1.txt"), Ok("cats-%d.tar"));
        assert_eq!(ekm.lookup("dog_1.txt", "x"), Ok("dogs-%d.tar"));
        assert_eq!(ekm.lookup("cat_2", "cat_2.txt"), Ok("cats-%d.tar"));
        assert_eq!(ekm.lookup_index("dog_1", "dog_1.txt"), Ok(1));
        // Literal names match exactly, not as prefixes (AIStore would say "multiple matches" or match).
        assert!(matches!(ekm.lookup("cat_10", "cat_1.txt.bak"), Err(EkmLookupError::Missing { .. })));
        assert_eq!(ekm.template("cats-%d.tar").map(|t| t.kind()), Some(TemplateKind::Fmt));
        assert_eq!(ekm.rule_count(), 3);
    }

    #[test]
    fn other_separators() {
        let (ekm, _) = parse_ekm("a.jpg,shard-{0..9}\nb.jpg , other-%03d\n", ",", Reaction::Abort).unwrap();
        assert_eq!(ekm.lookup("a", "a.jpg"), Ok("shard-{0..9}"));
        assert_eq!(ekm.lookup("b", "b.jpg"), Ok("other-%03d"));
        let (ekm, _) = parse_ekm("a.jpg :: s-%d\n", "::", Reaction::Abort).unwrap();
        assert_eq!(ekm.lookup("a", "a.jpg"), Ok("s-%d"));
        assert_eq!(err("a\tb", "").message, "external key map separator is empty");
    }

    #[test]
    fn malformed_line_reactions() {
        let text = "a.jpg\ts-%d\nno separator here\nb.jpg\ts-%d\tx\nc.jpg\t\n";
        let e = err(text, "\t");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.message, "malformed line (2) in external key map: no separator here");
        let (ekm, warnings) = parse_ekm(text, "\t", Reaction::Warn).unwrap();
        assert_eq!(
            warnings,
            [
                "malformed line (2) in external key map: no separator here",
                "malformed line (3) in external key map: b.jpg\ts-%d\tx",
                "malformed line (4) in external key map: c.jpg\t",
            ]
        );
        assert_eq!(ekm.lookup("a", "a.jpg"), Ok("s-%d"));
        let (ekm, warnings) = parse_ekm(text, "\t", Reaction::Ignore).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(ekm.rule_count(), 1);
    }

    #[test]
    fn json_form_keeps_first_seen_order() {
        let ekm = parse(
            r#"{
                "zebra-%d.tar": ["z1.jpg", "z2.jpg"],
                "ant-{00..99}.tar": "a1.jpg",
                "mid-@0009.tar": []
            }"#,
        );
        assert_eq!(ekm.shard_templates(), ["zebra-%d.tar", "ant-{00..99}.tar", "mid-@0009.tar"]);
        assert_eq!(ekm.lookup("z2", "z2.jpg"), Ok("zebra-%d.tar"));
        assert_eq!(ekm.lookup("a1", "a1.jpg"), Ok("ant-{00..99}.tar"));
        assert_eq!(ekm.template("mid-@0009.tar").and_then(|t| t.count()), Some(10));
    }

    #[test]
    fn regexes_match_unanchored_against_the_key() {
        let ekm = parse(
            r#"{
                "n01440764-shard-%d.tar": ["n01440764_.*"],
                "n01443537-shard-%d.tar": ["^n01443537"],
                "jpegs-%d.tar": ["\\.JPEG$"]
            }"#,
        );
        assert_eq!(ekm.regexes().len(), 3);
        assert_eq!(ekm.lookup("x", "train/n01440764_10026.txt"), Ok("n01440764-shard-%d.tar"));
        assert_eq!(ekm.lookup("x", "n01443537_1.txt"), Ok("n01443537-shard-%d.tar"));
        // The record name is not used for regexes.
        assert!(matches!(ekm.lookup("n01443537_1", "other"), Err(EkmLookupError::Missing { .. })));
        match ekm.lookup("r", "n01440764_1.JPEG") {
            Err(EkmLookupError::Ambiguous { record, key, shards }) => {
                assert_eq!((record.as_str(), key.as_str()), ("r", "n01440764_1.JPEG"));
                assert_eq!(shards, ["n01440764-shard-%d.tar", "jpegs-%d.tar"]);
            }
            other => panic!("{other:?}"),
        }
        let e = ekm.lookup("r", "nothing").unwrap_err();
        assert_eq!(e.to_string(), "no match found in external key map for record \"r\" (key \"nothing\")");
    }

    #[test]
    fn rules_for_the_same_shard_are_not_ambiguous() {
        let ekm = parse("^cat\ts-%d\n_1\\.\ts-%d\ncat_1.txt\ts-%d\n");
        assert_eq!(ekm.lookup("cat_1", "cat_1.txt"), Ok("s-%d"));
    }

    #[test]
    fn templates_in_values_expand_to_names() {
        let ekm = parse(
            r#"{"even-%d.tar": ["img-{000..010..2}.jpg"], "odd-%d.tar": ["img-{001..009..2}.jpg"], "rx-%d": ["x{2}"]}"#,
        );
        assert_eq!(ekm.lookup("img-004", "img-004.jpg"), Ok("even-%d.tar"));
        assert_eq!(ekm.lookup("img-007", "img-007.jpg"), Ok("odd-%d.tar"));
        assert!(ekm.lookup("img-011", "img-011.jpg").is_err());
        // Braces that are not a template make a regex.
        assert_eq!(ekm.lookup("r", "axxb"), Ok("rx-%d"));
        assert_eq!(ekm.rule_count(), 6 + 5 + 1);
        // '@' and '%' in values are literal.
        let ekm = parse("user@0001.jpg\ts-%d\n100%.jpg\tt-%d\n");
        assert_eq!(ekm.lookup("x", "user@0001.jpg"), Ok("s-%d"));
        assert_eq!(ekm.lookup("x", "100%.jpg"), Ok("t-%d"));
    }

    #[test]
    fn content_keys_match_literally() {
        let ekm = parse("3\tclass3-%d.tar\n4\tclass4-%d.tar\n");
        assert_eq!(ekm.lookup("rec", "3"), Ok("class3-%d.tar"));
    }

    #[test]
    fn text_may_start_with_a_template() {
        let (ekm, _) = parse_ekm("{0..2}.jpg\ts-%d\n", "\t", Reaction::Abort).unwrap();
        assert_eq!(ekm.lookup("1", "1.jpg"), Ok("s-%d"));
    }

    #[test]
    fn bad_maps() {
        let cases: &[(&str, Option<usize>, &str)] = &[
            ("{\"s-%d\": [\"a\"", None, "invalid JSON external key map"),
            ("{\"s-%d\": 5}", None, "must be a list of record names or regexes"),
            ("{\"s-%d\": [5]}", None, "5 is not a record name or regex"),
            ("{\"s-%d\": [\"\"]}", None, "empty record name"),
            ("", None, "external key map is empty"),
            ("a\ts-{3..1}\n", Some(1), "invalid output shard name \"s-{3..1}\""),
            ("a\t../s-%d\n", Some(1), "'..' path segments"),
            ("a\t/abs-%d\n", Some(1), "relative path"),
            ("a\ts-%d\nb\tt-%d\na\tt-%d\n", Some(3), "record name \"a\" is mapped to two output shards"),
            ("^a\ts-%d\n^a\tt-%d\n", Some(2), "duplicated regex keys"),
            ("a(\ts-%d\n", Some(1), "invalid regex \"a(\""),
            ("img-{0..99999999}\ts-%d\n", Some(1), "too many values"),
        ];
        for &(text, line, needle) in cases {
            let e = err(text, "\t");
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(needle), "{text:?}: expected {needle:?} in {:?}", e.message);
        }
        // Duplicates mapping to the same shard are harmless.
        let ekm = parse("a\ts-%d\na\ts-%d\n^b\ts-%d\n^b\ts-%d\n");
        assert_eq!(ekm.rule_count(), 2);
    }

    #[test]
    fn literal_output_name_is_one_shard() {
        let ekm = parse("a.jpg\tall.tar\n");
        assert_eq!(ekm.template("all.tar").map(|t| t.kind()), Some(TemplateKind::PrefixOnly));
    }
}
