//! Byte sizes and memory quantities, parsed the way AIStore's spec does.
//!
//! Sizes are IEC whatever the spelling: `10KB` = `10KiB` = `10K` = 10240. Fractions are allowed and
//! rounded down (`1.5GiB`). Arithmetic is exact integer math, never floats, so `0.1KiB` is 102 bytes
//! on every machine. Choices beyond AIStore: the empty string is an error (callers treat an empty
//! spec field as absent before parsing), exponents (`1e3`) are refused, at most 18 fractional digits,
//! and a memory quantity of 0 bytes is refused.

use std::fmt;
use std::str::FromStr;

/// Why a size, size range or memory quantity was refused. Every message names the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with an optional unit.
    #[error(
        "invalid size {input:?}: {reason} (expecting a non-negative number with an optional IEC \
         unit, e.g. '10240', '10KB', '10KiB', '1MiB', '1.5GiB')"
    )]
    Invalid { input: String, reason: &'static str },
    /// Written with a minus sign.
    #[error("invalid size {input:?}: must be >= 0")]
    Negative { input: String },
    /// More than `u64::MAX` bytes.
    #[error("invalid size {input:?}: larger than {} bytes", u64::MAX)]
    TooLarge { input: String },
    /// Not `MIN..MAX`.
    #[error("invalid size range {input:?}: expecting MIN..MAX or a single size, e.g. '10KiB..100KiB'")]
    InvalidRange { input: String },
    /// `MIN..MAX` with `MIN > MAX`.
    #[error("invalid size range {input:?}: min {min} is greater than max {max}")]
    RangeMinAfterMax { input: String, min: u64, max: u64 },
    /// Neither `NN%` nor a size with a unit.
    #[error("invalid quantity, format should be '81%' or '1GB' (got {input:?})")]
    InvalidQuantity { input: String },
    /// `NN%` outside (0, 100).
    #[error("percent must be in the range (0, 100) (got {input:?})")]
    PercentOutOfRange { input: String },
    /// A byte quantity of 0.
    #[error("invalid quantity {input:?}: must be more than 0 bytes")]
    ZeroQuantity { input: String },
}

/// IEC units, largest first, used for formatting.
const UNITS: &[(&str, u64)] =
    &[("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];

/// Most fractional digits kept exact: 10^18 * 2^60 still fits in a u128.
const MAX_FRACTION_DIGITS: usize = 18;

/// Bytes per unit for a (case-insensitive) unit suffix: `""` and `B` are bytes; `X`, `XB` and `XiB`
/// are all 1024^n for `X` in `K M G T P E`.
fn unit_multiplier(unit: &str) -> Option<u64> {
    let unit = unit.to_ascii_uppercase();
    if unit.is_empty() || unit == "B" {
        return Some(1);
    }
    let mut chars = unit.chars();
    let letter = chars.next()?;
    if !matches!(chars.as_str(), "" | "B" | "IB") {
        return None;
    }
    let power = "KMGTPE".find(letter)? + 1;
    Some(1u64 << (10 * power))
}

/// Parses an IEC size into bytes: raw bytes (`10240`), `10KB` = `10KiB` = `10K`, `1.5GiB` (rounded
/// down); units `B K M G T P E` with optional `B`/`iB`, any case; spaces around and before the unit
/// are allowed.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let invalid = |reason| SizeError::Invalid { input: s.to_string(), reason };
    let t = s.trim();
    if t.is_empty() {
        return Err(invalid("empty"));
    }
    if t.starts_with('-') {
        return Err(SizeError::Negative { input: s.to_string() });
    }
    let number_len = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(invalid("missing number"));
    }
    let multiplier = unit_multiplier(unit.trim_start())
        .ok_or_else(|| invalid("unknown unit (use B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB, P/PB/PiB, E/EB/EiB)"))?;
    if fraction.contains('.') {
        return Err(invalid("more than one '.'"));
    }
    if fraction.len() > MAX_FRACTION_DIGITS {
        return Err(invalid("more than 18 digits after '.'"));
    }
    let too_large = || SizeError::TooLarge { input: s.to_string() };
    let whole = whole.trim_start_matches('0');
    // More than 20 significant digits is above u64::MAX bytes whatever the unit.
    if whole.len() > 20 {
        return Err(too_large());
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_large())? };
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        let numerator: u128 = fraction.parse().map_err(|_| invalid("bad fraction"))?;
        numerator * u128::from(multiplier) / 10u128.pow(fraction.len() as u32)
    };
    let bytes = whole * u128::from(multiplier) + fraction_value;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// Human-readable size with an IEC unit and up to two decimals, rounded down: `1.5 GiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    for &(name, unit) in UNITS {
        if bytes >= unit {
            let hundredths = u128::from(bytes) * 100 / u128::from(unit);
            let (whole, frac) = (hundredths / 100, hundredths % 100);
            return match frac {
                0 => format!("{whole} {name}"),
                f if f % 10 == 0 => format!("{whole}.{} {name}", f / 10),
                f => format!("{whole}.{f:02} {name}"),
            };
        }
    }
    format!("{bytes} B")
}

/// Parses `MIN..MAX` (e.g. `10KiB..100KiB`) or a single size `V` as `(V, V)`; `MIN > MAX` is an error.
pub fn parse_size_range(s: &str) -> Result<(u64, u64), SizeError> {
    match s.split_once("..") {
        None => parse_size(s).map(|v| (v, v)),
        Some((min, max)) => {
            if min.trim().is_empty() || max.trim().is_empty() {
                return Err(SizeError::InvalidRange { input: s.to_string() });
            }
            let (min, max) = (parse_size(min)?, parse_size(max)?);
            if min > max {
                return Err(SizeError::RangeMinAfterMax { input: s.to_string(), min, max });
            }
            Ok((min, max))
        }
    }
}

/// A memory budget as written in `max_mem_usage`: a share of the memory limit or a byte count.
/// Invariants: the percent is in 1..=99; the byte count is more than 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemQuantity {
    /// `NN%` of the memory limit, 0 < NN < 100.
    Percent(u8),
    /// An absolute size, capped at the memory limit when resolved.
    Bytes(u64),
}

impl MemQuantity {
    /// AIStore's default `max_mem_usage`.
    pub const DEFAULT: MemQuantity = MemQuantity::Percent(80);

    /// The budget in bytes for a machine or pod whose memory limit is `limit_bytes`; a byte count
    /// is capped at the limit (as AIStore caps it at total RAM).
    pub fn resolve(&self, limit_bytes: u64) -> u64 {
        match *self {
            // p < 100, so the result is below limit_bytes and fits.
            MemQuantity::Percent(p) => (u128::from(limit_bytes) * u128::from(p) / 100) as u64,
            MemQuantity::Bytes(b) => b.min(limit_bytes),
        }
    }
}

impl Default for MemQuantity {
    fn default() -> Self {
        MemQuantity::DEFAULT
    }
}

impl fmt::Display for MemQuantity {
    /// Writes text that [`parse_mem_quantity`] reads back to the same value: `80%`, `1GiB`, `1536B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MemQuantity::Percent(p) => write!(f, "{p}%"),
            MemQuantity::Bytes(b) => match UNITS.iter().find(|&&(_, unit)| b >= unit && b % unit == 0) {
                Some(&(name, unit)) => write!(f, "{}{name}", b / unit),
                None => write!(f, "{b}B"),
            },
        }
    }
}

impl FromStr for MemQuantity {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_mem_quantity(s)
    }
}

/// Parses `max_mem_usage`: `NN%` with a whole NN in (0, 100), or a size with a unit (`80GB`, `1KB`,
/// `1B`, `1.5GiB`); a bare number such as `80` is refused, as in AIStore. Whitespace is ignored.
pub fn parse_mem_quantity(s: &str) -> Result<MemQuantity, SizeError> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let invalid = || SizeError::InvalidQuantity { input: s.to_string() };
    let digits_len = compact.bytes().take_while(u8::is_ascii_digit).count();
    if digits_len == 0 {
        return Err(invalid());
    }
    let (digits, suffix) = compact.split_at(digits_len);
    if suffix == "%" {
        let percent = digits.trim_start_matches('0').parse::<u8>().ok().filter(|p| (1..100).contains(p));
        return percent.map(MemQuantity::Percent).ok_or_else(|| SizeError::PercentOutOfRange { input: s.to_string() });
    }
    // A size needs a unit: something other than digits and '.', and not a fractional percent.
    let has_unit = suffix.contains(|c: char| !(c.is_ascii_digit() || c == '.'));
    if !has_unit || suffix.ends_with('%') {
        return Err(invalid());
    }
    match parse_size(&compact) {
        Ok(0) => Err(SizeError::ZeroQuantity { input: s.to_string() }),
        Ok(bytes) => Ok(MemQuantity::Bytes(bytes)),
        Err(SizeError::Invalid { reason, .. }) => Err(SizeError::Invalid { input: s.to_string(), reason }),
        Err(SizeError::TooLarge { .. }) => Err(SizeError::TooLarge { input: s.to_string() }),
        Err(other) => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10240").unwrap(), 10240);
        assert_eq!(parse_size("0").unwrap(), 0);
        for s in ["10KB", "10KiB", "10K", "10kb", "10kib", "10k", " 10 KB ", "10 KiB"] {
            assert_eq!(parse_size(s).unwrap(), 10240, "{s}");
        }
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("3T").unwrap(), 3 << 40);
        assert_eq!(parse_size("100B").unwrap(), 100);
        assert_eq!(parse_size("1.5").unwrap(), 1);
        assert_eq!(parse_size("0.1KiB").unwrap(), 102);
        assert_eq!(parse_size(".5K").unwrap(), 512);
        assert_eq!(parse_size("15EiB").unwrap(), 15 << 60);
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
    }

    #[test]
    fn size_errors_name_the_input() {
        let err = parse_size("-5KB").unwrap_err();
        assert_eq!(err, SizeError::Negative { input: "-5KB".into() });
        assert!(err.to_string().contains("\"-5KB\"") && err.to_string().contains(">= 0"));
        for s in ["", "  ", "abc", "10XB", "KB", "1e3", "1.2.3K", "10 K B", "1IB", "1I", "1KIBB", ".", "5%"] {
            let err = parse_size(s).unwrap_err();
            assert!(matches!(err, SizeError::Invalid { .. }), "{s:?}: {err:?}");
            assert!(err.to_string().contains(&format!("{s:?}")), "{err}");
        }
        assert!(parse_size("abc").unwrap_err().to_string().contains("missing number"));
        assert!(parse_size("10XB").unwrap_err().to_string().contains("unknown unit"));
        for s in ["16EiB", "18446744073709551616", "100000000000000000000000000TB"] {
            assert!(matches!(parse_size(s), Err(SizeError::TooLarge { .. })), "{s}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size((1 << 20) + (1 << 20) / 4), "1.25 MiB");
        assert_eq!(format_size((1 << 20) - 1), "1023.99 KiB");
        assert_eq!(format_size(u64::MAX), "15.99 EiB");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_size_range("10KiB..100KiB").unwrap(), (10240, 102400));
        assert_eq!(parse_size_range("1.5KiB..2KiB").unwrap(), (1536, 2048));
        assert_eq!(parse_size_range("7MB").unwrap(), (7 << 20, 7 << 20));
        assert_eq!(parse_size_range(" 1K .. 1K ").unwrap(), (1024, 1024));
        assert_eq!(
            parse_size_range("2KiB..1KiB").unwrap_err(),
            SizeError::RangeMinAfterMax { input: "2KiB..1KiB".into(), min: 2048, max: 1024 }
        );
        assert!(matches!(parse_size_range("..1K"), Err(SizeError::InvalidRange { .. })));
        assert!(matches!(parse_size_range("1K.."), Err(SizeError::InvalidRange { .. })));
        assert!(matches!(parse_size_range("1K..x"), Err(SizeError::Invalid { .. })));
    }

    #[test]
    fn mem_quantities() {
        assert_eq!(parse_mem_quantity("80%").unwrap(), MemQuantity::Percent(80));
        assert_eq!(parse_mem_quantity(" 8 1 % ").unwrap(), MemQuantity::Percent(81));
        assert_eq!(parse_mem_quantity("1%").unwrap(), MemQuantity::Percent(1));
        assert_eq!(parse_mem_quantity("99%").unwrap(), MemQuantity::Percent(99));
        assert_eq!(parse_mem_quantity("1GB").unwrap(), MemQuantity::Bytes(1 << 30));
        assert_eq!(parse_mem_quantity("1 KB").unwrap(), MemQuantity::Bytes(1024));
        assert_eq!(parse_mem_quantity("1B").unwrap(), MemQuantity::Bytes(1));
        assert_eq!(parse_mem_quantity("1.5GiB").unwrap(), MemQuantity::Bytes(3 << 29));
        assert_eq!("80GB".parse::<MemQuantity>().unwrap(), MemQuantity::Bytes(80 << 30));
        assert_eq!(MemQuantity::default(), MemQuantity::Percent(80));
    }

    #[test]
    fn mem_quantity_errors() {
        for s in ["80", "", " ", "%", "GB", "-5%", "-1GB", "50.5%", "1.5", "abc", "x80%"] {
            let err = parse_mem_quantity(s).unwrap_err();
            assert!(matches!(err, SizeError::InvalidQuantity { .. }), "{s:?}: {err:?}");
            assert!(err.to_string().contains("invalid quantity, format should be '81%' or '1GB'"));
        }
        for s in ["0%", "100%", "250%", "00%", "99999999999999999999%"] {
            let err = parse_mem_quantity(s).unwrap_err();
            assert!(matches!(err, SizeError::PercentOutOfRange { .. }), "{s:?}: {err:?}");
            assert!(err.to_string().contains("percent must be in the range (0, 100)"));
        }
        assert!(matches!(parse_mem_quantity("10XB"), Err(SizeError::Invalid { .. })));
        assert!(matches!(parse_mem_quantity("0GB"), Err(SizeError::ZeroQuantity { .. })));
        assert!(matches!(parse_mem_quantity("99EB"), Err(SizeError::TooLarge { .. })));
    }

    #[test]
    fn resolve_and_display() {
        let limit = 10 << 30;
        assert_eq!(MemQuantity::Percent(80).resolve(limit), 8 << 30);
        assert_eq!(MemQuantity::Percent(50).resolve(u64::MAX), u64::MAX / 2);
        assert_eq!(MemQuantity::Bytes(1 << 30).resolve(limit), 1 << 30);
        assert_eq!(MemQuantity::Bytes(20 << 30).resolve(limit), limit);
        for q in [
            MemQuantity::Percent(80),
            MemQuantity::Bytes(1 << 30),
            MemQuantity::Bytes(1536),
            MemQuantity::Bytes(3 << 20),
            MemQuantity::Bytes(u64::MAX),
        ] {
            assert_eq!(parse_mem_quantity(&q.to_string()).unwrap(), q, "{q}");
        }
        assert_eq!(MemQuantity::Bytes(1 << 30).to_string(), "1GiB");
        assert_eq!(MemQuantity::Bytes(1536).to_string(), "1536B");
    }
}
