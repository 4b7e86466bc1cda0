//! Byte sizes as runc's flags take them ("64m", "1g", "512k", "1048576").

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {0:?}: want a number with an optional k, m, g or t suffix")]
pub struct SizeError(pub String);

/// Parses a RAM size in bytes; binary multiples as docker's `RAMInBytes`.
/// `-1` means unlimited and is passed through.
pub fn parse_ram(s: &str) -> Result<i64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    if t == "-1" {
        return Ok(-1);
    }
    let lower = t.to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let lower = lower.strip_suffix('i').unwrap_or(lower);
    let (num, mult): (&str, i64) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        Some('t') => (&lower[..lower.len() - 1], 1 << 40),
        Some(c) if c.is_ascii_digit() => (lower, 1),
        _ => return Err(err()),
    };
    let value: f64 = num.trim().parse().map_err(|_| err())?;
    if value.is_nan() || value < 0.0 {
        return Err(err());
    }
    let bytes = value * mult as f64;
    if bytes > i64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_ram("1048576"), Ok(1 << 20));
        assert_eq!(parse_ram("64m"), Ok(64 << 20));
        assert_eq!(parse_ram("64M"), Ok(64 << 20));
        assert_eq!(parse_ram("1g"), Ok(1 << 30));
        assert_eq!(parse_ram("512KiB"), Ok(512 << 10));
        assert_eq!(parse_ram("1.5k"), Ok(1536));
        assert_eq!(parse_ram("-1"), Ok(-1));
        assert!(parse_ram("ten").is_err());
        assert!(parse_ram("-5").is_err());
        assert!(parse_ram("").is_err());
    }
}
