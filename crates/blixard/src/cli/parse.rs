//! Reading the CLI's arguments: sizes, durations, `KEY=VALUE` pairs.

use std::time::Duration;

use blixard_node::exit::{self, Failure};

pub fn parse_scaled(
    s: &str,
    bad: impl Fn() -> Failure,
    factor: impl Fn(&str) -> Option<u64>,
) -> Result<u64, Failure> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    factor(unit).and_then(|f| n.checked_mul(f)).ok_or_else(bad)
}

/// Parses 30s, 10m, 2h, 1d or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, Failure> {
    let bad = || {
        Failure::new(
            exit::USAGE,
            format!("invalid duration {s:?}: use e.g. 30s, 10m, 2h"),
        )
    };
    let secs = parse_scaled(s, bad, |unit| match unit {
        "" | "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        "d" => Some(86400),
        _ => None,
    })?;
    Ok(Duration::from_secs(secs))
}

/// Parses 8GiB, 512MiB, 1TiB or plain MiB.
pub fn parse_mib(s: &str) -> Result<u64, Failure> {
    let bad = || {
        Failure::new(
            exit::USAGE,
            format!("invalid size {s:?}: use e.g. 512MiB, 8GiB"),
        )
    };
    parse_scaled(s, bad, |unit| match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mib" => Some(1),
        "g" | "gib" => Some(1024),
        "t" | "tib" => Some(1024 * 1024),
        _ => None,
    })
}

/// `KEY=VALUE` (labels, constraints).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}
