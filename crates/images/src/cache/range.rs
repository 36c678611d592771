//! `Range: bytes=…` on NARs (RFC 9110, section 14): one range, the way Nix asks to resume
//! a download that was cut (`bytes=N-`), as harmonia and nix-serve answer it.

use std::ops::Range;

/// What a request's `Range` header asks of a body of `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// The whole body (no header, a unit other than bytes, several ranges, or a header
    /// that does not parse: RFC 9110 lets a server ignore those).
    Full,
    /// These bytes (start < end ≤ size): `206 Partial Content`.
    Part(Range<u64>),
    /// A range that starts at or past the end, a last byte before the first, or an empty
    /// suffix: `416 Range Not Satisfiable`.
    Unsatisfiable,
}

/// Reads a `Range` header value for a body of `size` bytes.
pub fn wanted(header: Option<&[u8]>, size: u64) -> Wanted {
    let Some(spec) = header
        .and_then(|h| std::str::from_utf8(h).ok())
        .map(str::trim)
        .and_then(|h| strip_prefix_ignore_case(h, "bytes="))
        .map(str::trim)
    else {
        return Wanted::Full;
    };
    if spec.contains(',') {
        return Wanted::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Wanted::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    match (first.is_empty(), last.is_empty()) {
        // `-n`: the last n bytes (more than a u64 holds is more than the body).
        (true, false) => {
            if !digits(last) {
                return Wanted::Full;
            }
            let n = number(last).unwrap_or(u64::MAX);
            if n == 0 || size == 0 {
                Wanted::Unsatisfiable
            } else {
                Wanted::Part(size.saturating_sub(n)..size)
            }
        }
        // `a-`: from a to the end.
        (false, true) => {
            if !digits(first) {
                return Wanted::Full;
            }
            match number(first) {
                Some(a) if a < size => Wanted::Part(a..size),
                _ => Wanted::Unsatisfiable,
            }
        }
        // `a-b`: a to b inclusive, b clipped to the last byte.
        (false, false) => {
            if !digits(first) || !digits(last) {
                return Wanted::Full;
            }
            let Some(a) = number(first) else {
                return Wanted::Unsatisfiable;
            };
            let b = number(last).unwrap_or(u64::MAX);
            if b < a || a >= size {
                Wanted::Unsatisfiable
            } else {
                Wanted::Part(a..b.saturating_add(1).min(size))
            }
        }
        (true, true) => Wanted::Full,
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A decimal number; `None` if it is not one or does not fit a u64.
fn number(s: &str) -> Option<u64> {
    if !digits(s) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(h: &str, size: u64) -> Wanted {
        wanted(Some(h.as_bytes()), size)
    }

    #[test]
    fn single_ranges_of_each_form() {
        assert_eq!(w("bytes=0-99", 1000), Wanted::Part(0..100));
        assert_eq!(w("bytes=10-10", 1000), Wanted::Part(10..11));
        assert_eq!(w("bytes=900-5000", 1000), Wanted::Part(900..1000));
        assert_eq!(w("bytes=999-", 1000), Wanted::Part(999..1000));
        assert_eq!(w("bytes=0-", 1000), Wanted::Part(0..1000));
        assert_eq!(w("bytes=-1", 1000), Wanted::Part(999..1000));
        assert_eq!(w("bytes=-5000", 1000), Wanted::Part(0..1000));
        assert_eq!(w(" Bytes=5-9 ", 1000), Wanted::Part(5..10));
        assert_eq!(
            w("bytes=1-99999999999999999999999", 1000),
            Wanted::Part(1..1000)
        );
        assert_eq!(
            w("bytes=-99999999999999999999999", 1000),
            Wanted::Part(0..1000)
        );
    }

    #[test]
    fn unsatisfiable_ranges_are_416() {
        assert_eq!(w("bytes=1000-", 1000), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=1000-2000", 1000), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=5-4", 1000), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=-0", 1000), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=0-", 0), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=-5", 0), Wanted::Unsatisfiable);
        assert_eq!(
            w("bytes=99999999999999999999999-", 1000),
            Wanted::Unsatisfiable
        );
    }

    #[test]
    fn what_a_server_may_ignore_is_the_full_body() {
        assert_eq!(wanted(None, 1000), Wanted::Full);
        for h in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=1-b",
            "bytes=+1-2",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=0x10-",
            "bytes=-x",
        ] {
            assert_eq!(w(h, 1000), Wanted::Full, "{h:?}");
        }
        assert_eq!(wanted(Some(b"bytes=\xff-1"), 1000), Wanted::Full);
    }

    proptest::proptest! {
        /// A satisfiable range lies inside the body and is never empty.
        #[test]
        fn parts_lie_inside_the_body(a in 0u64..2000, b in 0u64..2000, size in 0u64..1500, form in 0u8..3) {
            let h = match form {
                0 => format!("bytes={a}-{b}"),
                1 => format!("bytes={a}-"),
                _ => format!("bytes=-{b}"),
            };
            if let Wanted::Part(r) = w(&h, size) {
                proptest::prop_assert!(r.start < r.end && r.end <= size, "{h} of {size}: {r:?}");
            }
        }
    }
}
