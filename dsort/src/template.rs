//! Object-name templates (AIStore-compatible): `bash` (`pre{0000..0999..2}suf`), `at` (`pre@0099`),
//! `fmt` (`pre%06d`) and prefix-only text.
//!
//! A template is a prefix followed by one or more numeric ranges, each followed by a literal gap. The
//! ranges form an odometer: the right-most range varies fastest, so name index order is the order a
//! user reads the sequence in. Names are computed from an index, never materialised unless asked for
//! ([`Template::expand_input`] caps that at [`MAX_INPUT_NAMES`]).
//!
//! Choices beyond AIStore (all stricter, none accepts less than AIStore for sane input):
//! - any `{` or `}` selects the bash grammar, so a stray `}` is an error rather than a literal;
//! - range numbers are plain digits (no `+`/`-` sign), at most 64 digits and at most `i64::MAX`;
//! - the zero-pad width is `min(len(START), len(END))` as written, always (a width of 1 pads nothing);
//! - the empty template and `*` are errors ("empty range template"); callers that treat an empty
//!   input template as "match all" must check for it before parsing;
//! - a prefix-only template names no objects by itself: `count()` is `None`, `iter()` is empty.

use std::fmt::{self, Write as _};
use std::str::FromStr;

/// The most names an input template may expand to (AIStore's limit).
pub const MAX_INPUT_NAMES: u64 = 10_000_000;

/// Archive extensions dsort reads and writes, as they appear at the end of object names.
pub const ARCHIVE_EXTENSIONS: &[&str] = &[".tar", ".tgz", ".tar.gz", ".tar.zst", ".tar.lz4", ".zip"];

/// Longest number or zero-pad width we accept as written; keeps names from becoming absurd.
const MAX_DIGITS: usize = 64;

/// The last value of a `fmt` range: AIStore uses 0..=(2^63 - 2), so the count is exactly `i64::MAX`.
const FMT_END: u64 = i64::MAX as u64 - 1;

/// Which grammar a template was parsed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TemplateKind {
    /// `prefix{START..END[..STEP]}gap{..}suffix`.
    Bash,
    /// `prefix@NNNN`: the range 0..=NNNN padded to the digits written.
    At,
    /// `prefix%0Nd suffix`: unbounded (0..=2^63-2); for output only.
    Fmt,
    /// No range syntax at all; parses, but callers should refuse it where a range is required.
    PrefixOnly,
}

impl TemplateKind {
    /// A valid example of the grammar, quoted in error messages.
    fn example(self) -> &'static str {
        match self {
            TemplateKind::Bash => "'prefix-{0001..0010..1}-suffix' or 'shard-{000..999}.tar'",
            TemplateKind::At => "'prefix-@00100-suffix' for 00000 to 00100",
            TemplateKind::Fmt => "'prefix-%06d-suffix' or 'prefix-%d'",
            TemplateKind::PrefixOnly => "'shard-{0000..0999}', 'shard-@0999' or 'shard-%06d'",
        }
    }
}

impl fmt::Display for TemplateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TemplateKind::Bash => "bash",
            TemplateKind::At => "at",
            TemplateKind::Fmt => "fmt",
            TemplateKind::PrefixOnly => "prefix-only",
        })
    }
}

/// The rule a template broke; shown inside [`TemplateError::Invalid`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateRule {
    /// A `}` with no `{` before it.
    UnmatchedClose { at: usize },
    /// A `{` that is never closed.
    Unclosed { at: usize },
    /// A `{` inside another range.
    Nested { at: usize },
    /// A range that is not `START..END` or `START..END..STEP`.
    RangeShape { inner: String },
    /// A number that is empty or not made of decimal digits.
    NotANumber { what: &'static str, value: String },
    /// A number written with a minus sign.
    Negative { what: &'static str, value: String },
    /// A number above `i64::MAX`.
    TooLarge { what: &'static str, value: String },
    /// A number or width with more than 64 digits.
    TooManyDigits { what: &'static str, len: usize },
    /// `START > END`.
    StartAfterEnd { start: u64, end: u64 },
    /// `STEP <= 0`.
    StepNotPositive { value: String },
    /// An `@` that is not followed by digits.
    AtWithoutDigits { at: usize },
    /// More than one `%` in a fmt template.
    MultiplePercent,
    /// A `%` not followed by `d` or `0Nd`.
    PercentWithoutD,
    /// `%6d`: space padding, which names cannot use.
    WidthWithoutZero { width: String },
    /// `%0Nd` with N above 64.
    WidthTooLarge { width: u64 },
}

impl fmt::Display for TemplateRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateRule::UnmatchedClose { at } => {
                write!(f, "'}}' at byte {at} has no matching '{{'")
            }
            TemplateRule::Unclosed { at } => write!(f, "'{{' at byte {at} is never closed"),
            TemplateRule::Nested { at } => {
                write!(f, "'{{' at byte {at} opens inside another range (ranges cannot nest)")
            }
            TemplateRule::RangeShape { inner } => write!(f, "range {{{inner}}} must be START..END or START..END..STEP"),
            TemplateRule::NotANumber { what, value } => {
                write!(f, "{what} {value:?} is not a number (only the digits 0-9 are allowed)")
            }
            TemplateRule::Negative { what, value } => {
                write!(f, "{what} {value} is negative (ranges start at 0 or more)")
            }
            TemplateRule::TooLarge { what, value } => {
                write!(f, "{what} {value} is larger than {}", i64::MAX)
            }
            TemplateRule::TooManyDigits { what, len } => {
                write!(f, "{what} has {len} digits (at most {MAX_DIGITS})")
            }
            TemplateRule::StartAfterEnd { start, end } => {
                write!(f, "start {start} is greater than end {end}")
            }
            TemplateRule::StepNotPositive { value } => {
                write!(f, "step {value} must be greater than 0")
            }
            TemplateRule::AtWithoutDigits { at } => {
                write!(f, "'@' at byte {at} must be followed by the digits of the last number")
            }
            TemplateRule::MultiplePercent => f.write_str("only one '%' conversion is allowed"),
            TemplateRule::PercentWithoutD => {
                f.write_str("'%' must be followed by 'd' or by a zero-padded width and 'd'")
            }
            TemplateRule::WidthWithoutZero { width } => {
                write!(f, "'%{width}d' pads with spaces, which names cannot use; write '%0{width}d'")
            }
            TemplateRule::WidthTooLarge { width } => {
                write!(f, "width {width} is larger than {MAX_DIGITS}")
            }
        }
    }
}

/// Why a template could not be parsed or expanded. Every message names the template.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `""` or `"*"`.
    #[error("empty range template {template:?} (expecting e.g. {})", TemplateKind::PrefixOnly.example())]
    Empty { template: String },
    /// The text looks like a `kind` template but breaks one of its rules.
    #[error("invalid '{kind}' template {template:?}: {rule} (expecting e.g. {})", .kind.example())]
    Invalid { kind: TemplateKind, template: String, rule: TemplateRule },
    /// Input expansion of a bounded template with more than [`MAX_INPUT_NAMES`] names
    /// (`count` is `None` when it does not even fit in a `u64`).
    #[error(
        "parsed-template {template:?}: too many values (more than {MAX_INPUT_NAMES} max){}",
        count_suffix(*.count)
    )]
    TooManyValues { template: String, count: Option<u64> },
    /// Input expansion of a `fmt` template, which has no end.
    #[error(
        "parsed-template {template:?}: too many values (more than {MAX_INPUT_NAMES} max): a 'fmt' \
         template is unbounded and can only name output shards; for input use e.g. {}",
        TemplateKind::Bash.example()
    )]
    Unbounded { template: String },
    /// Input expansion of a prefix-only template.
    #[error(
        "prefix-only template not supported (prefix: {template:?}); expecting a range template, e.g. {}",
        TemplateKind::PrefixOnly.example()
    )]
    PrefixOnly { template: String },
}

fn count_suffix(count: Option<u64>) -> String {
    match count {
        Some(n) => format!(": the template names {n}"),
        None => ": the template names more than 2^64".to_string(),
    }
}

/// One numeric range and the literal text after it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Range {
    start: u64,
    end: u64,
    step: u64,
    width: usize,
    gap: String,
}

impl Range {
    /// Number of values; at least 1 and at most 2^63 because `start <= end <= i64::MAX`, `step >= 1`.
    fn len(&self) -> u64 {
        (self.end - self.start) / self.step + 1
    }

    /// The `i`-th value; `i < len()` keeps it `<= end`, so no overflow.
    fn value(&self, i: u64) -> u64 {
        self.start + i * self.step
    }
}

/// A parsed object-name template. Invariant: every range is non-empty, so a bounded template names
/// at least one object; `text` is exactly what was parsed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Template {
    text: String,
    kind: TemplateKind,
    prefix: String,
    ranges: Vec<Range>,
}

impl Template {
    /// Parses `s`, trying bash, then at, then fmt, then prefix-only (AIStore's order).
    pub fn parse(s: &str) -> Result<Template, TemplateError> {
        if s.is_empty() || s == "*" {
            return Err(TemplateError::Empty { template: s.to_string() });
        }
        let (kind, parsed) = if s.contains(['{', '}']) {
            (TemplateKind::Bash, parse_bash(s))
        } else if s.contains('@') {
            (TemplateKind::At, parse_at(s))
        } else if s.contains('%') {
            (TemplateKind::Fmt, parse_fmt(s))
        } else {
            (TemplateKind::PrefixOnly, Ok((s.to_string(), Vec::new())))
        };
        let (prefix, ranges) = parsed.map_err(|rule| TemplateError::Invalid { kind, template: s.to_string(), rule })?;
        Ok(Template { text: s.to_string(), kind, prefix, ranges })
    }

    /// The grammar this template was written in.
    pub fn kind(&self) -> TemplateKind {
        self.kind
    }

    /// The original text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal text before the first range (the whole text for prefix-only).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many names the template gives: `None` for fmt (unbounded), prefix-only (a listing
    /// prefix, not a name), and odometers whose product does not fit in a `u64`.
    pub fn count(&self) -> Option<u64> {
        match self.kind {
            TemplateKind::Fmt | TemplateKind::PrefixOnly => None,
            TemplateKind::Bash | TemplateKind::At => {
                self.ranges.iter().try_fold(1u64, |acc, r| acc.checked_mul(r.len()))
            }
        }
    }

    /// True for bash and at templates: a finite list of names (which may still be too many to count).
    pub fn is_bounded(&self) -> bool {
        matches!(self.kind, TemplateKind::Bash | TemplateKind::At)
    }

    /// The name at `index` in odometer order (right-most range fastest); `None` past the end and
    /// always for prefix-only. Equal to `self.iter().nth(index)`, in O(number of ranges).
    pub fn name_at(&self, index: u64) -> Option<String> {
        if self.ranges.is_empty() {
            return None;
        }
        let mut digits = vec![0u64; self.ranges.len()];
        let mut rest = index;
        for (digit, range) in digits.iter_mut().zip(&self.ranges).rev() {
            let len = range.len();
            *digit = rest % len;
            rest /= len;
        }
        if rest != 0 {
            return None;
        }
        Some(self.render(&digits))
    }

    /// All names, lazily, in odometer order. Empty for prefix-only; effectively endless for fmt.
    pub fn iter(&self) -> Names<'_> {
        Names { template: self, digits: vec![0; self.ranges.len()], done: self.ranges.is_empty() }
    }

    /// Every name, for use as an input shard list: refuses fmt and prefix-only templates, and
    /// bounded ones with more than [`MAX_INPUT_NAMES`] names (checked by count, before expanding).
    pub fn expand_input(&self) -> Result<Vec<String>, TemplateError> {
        let template = self.text.clone();
        match self.kind {
            TemplateKind::Fmt => return Err(TemplateError::Unbounded { template }),
            TemplateKind::PrefixOnly => return Err(TemplateError::PrefixOnly { template }),
            TemplateKind::Bash | TemplateKind::At => {}
        }
        let count = self.count();
        match count {
            Some(n) if n <= MAX_INPUT_NAMES => {
                let mut names = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
                names.extend(self.iter());
                Ok(names)
            }
            _ => Err(TemplateError::TooManyValues { template, count }),
        }
    }

    /// The known archive extension the template's names end with, if any (from the literal text
    /// after the last range, or the whole prefix-only text).
    pub fn template_extension(&self) -> Option<&'static str> {
        let tail = self.ranges.last().map_or(self.prefix.as_str(), |r| &r.gap);
        known_archive_extension(tail)
    }

    /// Builds the name for one odometer position; `digits[i] < ranges[i].len()` is the caller's duty.
    /// True when some name of this template equals `name` (for any grammar, fmt included): used to
    /// refuse an output template that could overwrite an input object.
    pub fn could_name(&self, name: &str) -> bool {
        if self.ranges.is_empty() {
            return false;
        }
        match name.strip_prefix(self.prefix.as_str()) {
            Some(rest) => matches_ranges(&self.ranges, rest),
            None => false,
        }
    }

    fn render(&self, digits: &[u64]) -> String {
        let mut name = String::with_capacity(self.text.len() + 8 * self.ranges.len());
        name.push_str(&self.prefix);
        for (range, &digit) in self.ranges.iter().zip(digits) {
            // Writing into a String cannot fail.
            let _ = write!(name, "{:0width$}", range.value(digit), width = range.width);
            name.push_str(&range.gap);
        }
        name
    }
}

/// Does `rest` match the ranges (value in range, on a step, rendered with the range's padding) and gaps?
fn matches_ranges(ranges: &[Range], rest: &str) -> bool {
    let Some((range, more)) = ranges.split_first() else {
        return rest.is_empty();
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    // Try every length of the digit run: a gap may itself start with digits.
    (1..=digits).any(|len| {
        let text = &rest[..len];
        let Ok(v) = text.parse::<u64>() else { return false };
        let padded_ok = text.len() == range.width.max(v.to_string().len());
        let in_range = v >= range.start && v <= range.end && (v - range.start) % range.step == 0;
        padded_ok
            && in_range
            && rest[len..].strip_prefix(range.gap.as_str()).is_some_and(|after| matches_ranges(more, after))
    })
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Template {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Template::parse(s)
    }
}

impl<'a> IntoIterator for &'a Template {
    type Item = String;
    type IntoIter = Names<'a>;

    fn into_iter(self) -> Names<'a> {
        self.iter()
    }
}

/// Lazy iterator over a template's names, in odometer order.
#[derive(Clone, Debug)]
pub struct Names<'a> {
    template: &'a Template,
    /// Current position of each range; always `< len()` of that range while not done.
    digits: Vec<u64>,
    done: bool,
}

impl Iterator for Names<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.done {
            return None;
        }
        let name = self.template.render(&self.digits);
        // Advance the odometer; a carry out of the left-most range means we are past the end.
        self.done = true;
        for (digit, range) in self.digits.iter_mut().zip(&self.template.ranges).rev() {
            *digit += 1;
            if *digit < range.len() {
                self.done = false;
                break;
            }
            *digit = 0;
        }
        Some(name)
    }
}

/// Splits bash syntax into the prefix and ranges.
fn parse_bash(s: &str) -> Result<(String, Vec<Range>), TemplateRule> {
    let mut literals: Vec<&str> = Vec::new();
    let mut ranges = Vec::new();
    let mut pos = 0;
    while let Some(off) = s[pos..].find(['{', '}']) {
        let open = pos + off;
        if s.as_bytes()[open] == b'}' {
            return Err(TemplateRule::UnmatchedClose { at: open });
        }
        let close = match s[open + 1..].find(['{', '}']) {
            Some(o) if s.as_bytes()[open + 1 + o] == b'}' => open + 1 + o,
            Some(o) => return Err(TemplateRule::Nested { at: open + 1 + o }),
            None => return Err(TemplateRule::Unclosed { at: open }),
        };
        literals.push(&s[pos..open]);
        ranges.push(parse_bash_range(&s[open + 1..close])?);
        pos = close + 1;
    }
    literals.push(&s[pos..]);
    // One more literal than ranges: the prefix, then each range's trailing gap.
    let prefix = literals[0].to_string();
    for (range, gap) in ranges.iter_mut().zip(&literals[1..]) {
        range.gap = (*gap).to_string();
    }
    Ok((prefix, ranges))
}

/// Parses the inside of `{START..END[..STEP]}`.
fn parse_bash_range(inner: &str) -> Result<Range, TemplateRule> {
    let parts: Vec<&str> = inner.split("..").collect();
    let (start_text, end_text, step_text) = match parts.as_slice() {
        [start, end] => (*start, *end, None),
        [start, end, step] => (*start, *end, Some(*step)),
        _ => {
            return Err(TemplateRule::RangeShape { inner: inner.to_string() });
        }
    };
    let start = parse_number("start", start_text)?;
    let end = parse_number("end", end_text)?;
    let step = match step_text {
        None => 1,
        Some(text) => {
            let not_positive = || TemplateRule::StepNotPositive { value: text.to_string() };
            if text.starts_with('-') && text.len() > 1 {
                return Err(not_positive());
            }
            match parse_number("step", text)? {
                0 => return Err(not_positive()),
                step => step,
            }
        }
    };
    if start > end {
        return Err(TemplateRule::StartAfterEnd { start, end });
    }
    Ok(Range { start, end, step, width: start_text.len().min(end_text.len()), gap: String::new() })
}

/// Splits at syntax (`@NNNN`, possibly several) into the prefix and ranges.
fn parse_at(s: &str) -> Result<(String, Vec<Range>), TemplateRule> {
    let mut prefix = None;
    let mut ranges: Vec<Range> = Vec::new();
    let mut pos = 0;
    while let Some(off) = s[pos..].find('@') {
        let at = pos + off;
        let literal = s[pos..at].to_string();
        match ranges.last_mut() {
            Some(last) => last.gap = literal,
            None => prefix = Some(literal),
        }
        let digits_len = s[at + 1..].bytes().take_while(u8::is_ascii_digit).count();
        if digits_len == 0 {
            return Err(TemplateRule::AtWithoutDigits { at });
        }
        let digits = &s[at + 1..at + 1 + digits_len];
        ranges.push(Range {
            start: 0,
            end: parse_number("'@' number", digits)?,
            step: 1,
            width: digits_len,
            gap: String::new(),
        });
        pos = at + 1 + digits_len;
    }
    if let Some(last) = ranges.last_mut() {
        last.gap = s[pos..].to_string();
    }
    Ok((prefix.unwrap_or_default(), ranges))
}

/// Splits fmt syntax (`pre%d suf`, `pre%0Nd suf`) into the prefix and its one unbounded range.
fn parse_fmt(s: &str) -> Result<(String, Vec<Range>), TemplateRule> {
    if s.matches('%').count() > 1 {
        return Err(TemplateRule::MultiplePercent);
    }
    let Some(pct) = s.find('%') else {
        return Err(TemplateRule::PercentWithoutD);
    };
    let rest = &s[pct + 1..];
    let width_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    let width_text = &rest[..width_len];
    let Some(gap) = rest[width_len..].strip_prefix('d') else {
        return Err(TemplateRule::PercentWithoutD);
    };
    if !width_text.is_empty() && !width_text.starts_with('0') {
        return Err(TemplateRule::WidthWithoutZero { width: width_text.to_string() });
    }
    let width = if width_text.is_empty() {
        0
    } else {
        let w = parse_number("width", width_text)?;
        if w > MAX_DIGITS as u64 {
            return Err(TemplateRule::WidthTooLarge { width: w });
        }
        w as usize
    };
    Ok((s[..pct].to_string(), vec![Range { start: 0, end: FMT_END, step: 1, width, gap: gap.to_string() }]))
}

/// Parses a written range number: digits only, at most [`MAX_DIGITS`] of them, at most `i64::MAX`.
fn parse_number(what: &'static str, text: &str) -> Result<u64, TemplateRule> {
    if let Some(digits) = text.strip_prefix('-')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(TemplateRule::Negative { what, value: text.to_string() });
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TemplateRule::NotANumber { what, value: text.to_string() });
    }
    if text.len() > MAX_DIGITS {
        return Err(TemplateRule::TooManyDigits { what, len: text.len() });
    }
    let too_large = || TemplateRule::TooLarge { what, value: text.to_string() };
    match text.parse::<u64>() {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        _ => Err(too_large()),
    }
}

/// The known archive extension `name` ends with; the longest one when several match.
pub fn known_archive_extension(name: &str) -> Option<&'static str> {
    ARCHIVE_EXTENSIONS.iter().copied().filter(|ext| name.ends_with(ext)).max_by_key(|ext| ext.len())
}

/// `name` with `ext` appended, unless `name` already ends with a known archive extension
/// (AIStore: template names without an extension get the input/output extension).
pub fn with_extension(name: &str, ext: &str) -> String {
    if known_archive_extension(name).is_some() { name.to_string() } else { format!("{name}{ext}") }
}

#[cfg(test)]
mod could_name_tests {
    use super::*;

    #[test]
    fn recognises_its_own_names_only() {
        let t = Template::parse("out-{000..099..2}.tar").unwrap();
        assert!(t.could_name("out-004.tar"));
        assert!(!t.could_name("out-005.tar"), "off step");
        assert!(!t.could_name("out-4.tar"), "unpadded");
        assert!(!t.could_name("out-100.tar"), "past the end");
        let f = Template::parse("s-%04d.tar").unwrap();
        assert!(f.could_name("s-0012.tar") && f.could_name("s-123456.tar"));
        assert!(!f.could_name("s-12.tar") && !f.could_name("x-0012.tar"));
        let odo = Template::parse("a{0..1}b{0..2}").unwrap();
        assert!(odo.iter().all(|n| odo.could_name(&n)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(t: &str) -> Vec<String> {
        Template::parse(t).unwrap().iter().collect()
    }

    fn rule(t: &str) -> TemplateRule {
        match Template::parse(t) {
            Err(TemplateError::Invalid { rule, .. }) => rule,
            other => panic!("{t:?}: expected an invalid-template error, got {other:?}"),
        }
    }

    #[test]
    fn bash_simple_and_padding() {
        assert_eq!(names("s-{0..3}"), ["s-0", "s-1", "s-2", "s-3"]);
        assert_eq!(names("{8..11}"), ["8", "9", "10", "11"]);
        let t = Template::parse("out-{0000..1000}.tar").unwrap();
        assert_eq!(t.kind(), TemplateKind::Bash);
        assert_eq!(t.count(), Some(1001));
        assert_eq!(t.name_at(0).unwrap(), "out-0000.tar");
        assert_eq!(t.name_at(1000).unwrap(), "out-1000.tar");
        assert_eq!(t.name_at(1001), None);
        // min(len(start), len(end)): {0..100000} has width 1, i.e. no padding.
        let t = Template::parse("x{0..100000}").unwrap();
        assert_eq!(t.name_at(7).unwrap(), "x7");
        assert_eq!(t.name_at(100000).unwrap(), "x100000");
        assert_eq!(names("{000..099}")[..2], ["000", "001"]);
        assert_eq!(Template::parse("{000..099}").unwrap().name_at(99).unwrap(), "099");
        // Width 3 from the start, end written longer.
        assert_eq!(names("{008..0010}"), ["008", "009", "010"]);
    }

    #[test]
    fn bash_steps() {
        assert_eq!(names("{0..10..3}"), ["0", "3", "6", "9"]);
        let t = Template::parse("prefix-{0010..0111..2}-suffix").unwrap();
        assert_eq!(t.count(), Some(51));
        assert_eq!(t.name_at(0).unwrap(), "prefix-0010-suffix");
        assert_eq!(t.name_at(50).unwrap(), "prefix-0110-suffix");
        assert_eq!(names("{5..5..100}"), ["5"]);
    }

    #[test]
    fn bash_odometer() {
        assert_eq!(names("a{0..1}b{0..2}"), ["a0b0", "a0b1", "a0b2", "a1b0", "a1b1", "a1b2"]);
        let t = Template::parse("p{0..1}-{00..10..5}@%.tar").unwrap();
        assert_eq!(t.count(), Some(6));
        assert_eq!(t.name_at(5).unwrap(), "p1-10@%.tar");
        assert_eq!(t.template_extension(), Some(".tar"));
    }

    #[test]
    fn at_grammar() {
        assert_eq!(names("@00001"), ["00000", "00001"]);
        let t = Template::parse("prefix@0099").unwrap();
        assert_eq!(t.kind(), TemplateKind::At);
        assert_eq!(t.count(), Some(100));
        assert_eq!(t.name_at(0).unwrap(), "prefix0000");
        assert_eq!(t.name_at(99).unwrap(), "prefix0099");
        assert_eq!(names("a@1-b@01.tar"), ["a0-b00.tar", "a0-b01.tar", "a1-b00.tar", "a1-b01.tar"]);
        assert_eq!(Template::parse("prefix-@0111-suffix").unwrap().count(), Some(112));
    }

    #[test]
    fn fmt_grammar() {
        let t = Template::parse("out-%06d.tar").unwrap();
        assert_eq!(t.kind(), TemplateKind::Fmt);
        assert!(!t.is_bounded());
        assert_eq!(t.count(), None);
        assert_eq!(t.name_at(0).unwrap(), "out-000000.tar");
        assert_eq!(t.name_at(1234567).unwrap(), "out-1234567.tar");
        assert_eq!(t.name_at(FMT_END).unwrap(), format!("out-{FMT_END}.tar"));
        assert_eq!(t.name_at(FMT_END + 1), None);
        let first: Vec<_> = t.iter().take(3).collect();
        assert_eq!(first, ["out-000000.tar", "out-000001.tar", "out-000002.tar"]);
        let t = Template::parse("smth-%d").unwrap();
        assert_eq!(t.name_at(12).unwrap(), "smth-12");
        assert_eq!(t.template_extension(), None);
    }

    #[test]
    fn prefix_only_and_empty() {
        let t = Template::parse("shard-").unwrap();
        assert_eq!(t.kind(), TemplateKind::PrefixOnly);
        assert_eq!(t.prefix(), "shard-");
        assert_eq!(t.count(), None);
        assert!(!t.is_bounded());
        assert_eq!(t.name_at(0), None);
        assert_eq!(t.iter().next(), None);
        let err = t.expand_input().unwrap_err();
        assert!(matches!(err, TemplateError::PrefixOnly { .. }));
        assert!(err.to_string().contains("prefix-only template not supported"));
        for s in ["", "*"] {
            let err = Template::parse(s).unwrap_err();
            assert!(err.to_string().contains("empty range template"), "{err}");
        }
    }

    #[test]
    fn bash_errors_name_the_rule() {
        assert_eq!(rule("a{5..3}"), TemplateRule::StartAfterEnd { start: 5, end: 3 });
        assert!(matches!(rule("{0..9..0}"), TemplateRule::StepNotPositive { .. }));
        assert!(matches!(rule("{0..9..-2}"), TemplateRule::StepNotPositive { .. }));
        assert!(matches!(rule("{-1..9}"), TemplateRule::Negative { what: "start", .. }));
        assert!(matches!(rule("{a..z}"), TemplateRule::NotANumber { what: "start", .. }));
        assert!(matches!(rule("{0..z}"), TemplateRule::NotANumber { what: "end", .. }));
        assert!(matches!(rule("{0..9..x}"), TemplateRule::NotANumber { what: "step", .. }));
        assert!(matches!(rule("{+1..9}"), TemplateRule::NotANumber { .. }));
        assert!(matches!(rule("{}"), TemplateRule::RangeShape { .. }));
        assert!(matches!(rule("{5}"), TemplateRule::RangeShape { .. }));
        assert!(matches!(rule("{1..2..3..4}"), TemplateRule::RangeShape { .. }));
        assert!(matches!(rule("{1...5}"), TemplateRule::NotANumber { .. }));
        assert_eq!(rule("a}{0..1}"), TemplateRule::UnmatchedClose { at: 1 });
        assert_eq!(rule("a{0..1"), TemplateRule::Unclosed { at: 1 });
        assert_eq!(rule("a{0..{1}}"), TemplateRule::Nested { at: 5 });
        assert_eq!(rule("a{0..1}}"), TemplateRule::UnmatchedClose { at: 7 });
        assert!(matches!(rule("{0..9223372036854775808}"), TemplateRule::TooLarge { .. }));
        assert!(matches!(rule(&format!("{{{}..1}}", "0".repeat(65))), TemplateRule::TooManyDigits { .. }));

        let msg = Template::parse("shard-{9..1}").unwrap_err().to_string();
        assert!(msg.contains("invalid 'bash' template \"shard-{9..1}\""), "{msg}");
        assert!(msg.contains("start 9 is greater than end 1"), "{msg}");
        assert!(msg.contains("prefix-{0001..0010..1}-suffix"), "{msg}");
        let msg = Template::parse("{0..9..0}").unwrap_err().to_string();
        assert!(msg.contains("step 0 must be greater than 0"), "{msg}");
        let msg = Template::parse("{-3..9}").unwrap_err().to_string();
        assert!(msg.contains("start -3 is negative"), "{msg}");
    }

    #[test]
    fn at_and_fmt_errors() {
        assert_eq!(rule("user@host"), TemplateRule::AtWithoutDigits { at: 4 });
        assert!(matches!(rule("@99999999999999999999"), TemplateRule::TooLarge { .. }));
        let msg = Template::parse("a@").unwrap_err().to_string();
        assert!(msg.contains("invalid 'at' template") && msg.contains("prefix-@00100-suffix"), "{msg}");

        assert_eq!(rule("a%6d"), TemplateRule::WidthWithoutZero { width: "6".into() });
        assert_eq!(rule("a%d-%d"), TemplateRule::MultiplePercent);
        assert_eq!(rule("a%s"), TemplateRule::PercentWithoutD);
        assert_eq!(rule("a%"), TemplateRule::PercentWithoutD);
        assert_eq!(rule("a%099d"), TemplateRule::WidthTooLarge { width: 99 });
        let msg = Template::parse("a%6d").unwrap_err().to_string();
        assert!(msg.contains("invalid 'fmt' template") && msg.contains("'%06d'"), "{msg}");
    }

    #[test]
    fn name_at_matches_iter() {
        for t in ["a{0..3}b{00..10..3}c@01", "x@003", "{7..7}", "f%03d", "{0..9..4}-{1..2}"] {
            let t = Template::parse(t).unwrap();
            let all: Vec<String> = t.iter().take(200).collect();
            if let Some(n) = t.count() {
                assert_eq!(all.len() as u64, n);
            }
            for (i, name) in all.iter().enumerate() {
                assert_eq!(t.name_at(i as u64).as_ref(), Some(name), "{t} at {i}");
            }
            assert_eq!(t.iter().nth(all.len()), t.name_at(all.len() as u64));
        }
    }

    #[test]
    fn huge_odometer_does_not_overflow() {
        let t = Template::parse("{0..9223372036854775807}{0..9223372036854775807}{0..1}").unwrap();
        assert!(t.is_bounded());
        assert_eq!(t.count(), None);
        assert_eq!(t.name_at(0).unwrap(), "000");
        assert_eq!(t.name_at(3).unwrap(), "011");
        assert_eq!(t.name_at(u64::MAX).unwrap(), "092233720368547758071");
        let err = t.expand_input().unwrap_err();
        assert_eq!(err, TemplateError::TooManyValues { template: t.to_string(), count: None });
    }

    #[test]
    fn input_cap() {
        let t = Template::parse("s-{0..9999999}").unwrap();
        assert_eq!(t.count(), Some(MAX_INPUT_NAMES));
        let t = Template::parse("s-{0..10000000}").unwrap();
        assert_eq!(t.count(), Some(MAX_INPUT_NAMES + 1));
        let msg = t.expand_input().unwrap_err().to_string();
        assert!(msg.contains("too many values (more than 10000000 max)"), "{msg}");
        let t = Template::parse("s-{0..9999}-{0..9999}").unwrap();
        assert!(matches!(t.expand_input(), Err(TemplateError::TooManyValues { count: Some(100_000_000), .. })));
        let err = Template::parse("s-%d").unwrap().expand_input().unwrap_err();
        assert!(matches!(err, TemplateError::Unbounded { .. }));
        assert!(err.to_string().contains("too many values"));
        assert_eq!(Template::parse("s-{0..2}").unwrap().expand_input().unwrap(), ["s-0", "s-1", "s-2"]);
    }

    #[test]
    fn extensions() {
        assert_eq!(known_archive_extension("x.tar.gz"), Some(".tar.gz"));
        assert_eq!(known_archive_extension("x.tgz"), Some(".tgz"));
        assert_eq!(known_archive_extension("x.tar.lz4"), Some(".tar.lz4"));
        assert_eq!(known_archive_extension("x.gz"), None);
        assert_eq!(known_archive_extension("x.tar.bz2"), None);
        assert_eq!(known_archive_extension("x"), None);
        let t = Template::parse("shard-{0..9}").unwrap();
        assert_eq!(t.template_extension(), None);
        assert_eq!(with_extension(&t.name_at(0).unwrap(), ".tar"), "shard-0.tar");
        assert_eq!(with_extension("x.tgz", ".tar"), "x.tgz");
        assert_eq!(with_extension("x.gz", ".tar"), "x.gz.tar");
        assert_eq!(Template::parse("s-{0..9}.tar.zst").unwrap().template_extension(), Some(".tar.zst"));
        assert_eq!(Template::parse("s-@09.zip").unwrap().template_extension(), Some(".zip"));
        assert_eq!(Template::parse("s-%d.tgz").unwrap().template_extension(), Some(".tgz"));
        assert_eq!(Template::parse("s.tar").unwrap().template_extension(), Some(".tar"));
        assert_eq!(Template::parse("s.tar{0..1}").unwrap().template_extension(), None);
    }

    #[test]
    fn display_and_from_str() {
        for s in ["a{0..1}b", "x@01", "y%05d.tar", "plain"] {
            let t: Template = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
            assert_eq!(t.as_str(), s);
        }
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parse_never_panics(s in "\\PC*") {
                if let Ok(t) = Template::parse(&s) {
                    prop_assert_eq!(t.to_string(), s);
                    let _ = t.count();
                    let _ = t.name_at(u64::MAX);
                    let _ = t.iter().take(3).count();
                }
            }

            #[test]
            fn template_like_strings(s in "[a-c{}.@%0-9d-]{0,24}") {
                if let Ok(t) = Template::parse(&s) {
                    let first: Vec<String> = t.iter().take(50).collect();
                    for (i, name) in first.iter().enumerate() {
                        prop_assert_eq!(t.name_at(i as u64), Some(name.clone()));
                    }
                    if let Some(n) = t.count() {
                        prop_assert!(n >= 1);
                        if n <= 50 {
                            prop_assert_eq!(first.len() as u64, n);
                            prop_assert_eq!(t.name_at(n), None);
                        }
                    }
                }
            }

            #[test]
            fn generated_bash_ranges(
                ranges in proptest::collection::vec((0u64..50, 0u64..20, 1u64..5), 1..4),
            ) {
                let text: String = ranges
                    .iter()
                    .map(|(start, len, step)| format!("r{{{start}..{}..{step}}}", start + len))
                    .collect();
                let t = Template::parse(&text).unwrap();
                let expected: u64 = ranges.iter().map(|(_, len, step)| len / step + 1).product();
                prop_assert_eq!(t.count(), Some(expected));
                prop_assert_eq!(t.iter().count() as u64, expected);
                let last = t.iter().last();
                prop_assert_eq!(t.name_at(expected - 1), last);
            }
        }
    }
}
