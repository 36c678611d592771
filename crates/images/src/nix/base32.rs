//! Nix's base32: the alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `u`, `t`),
//! least significant bits printed last. Used for store path digests (20 bytes, 32 chars) and
//! sha256 hashes (32 bytes, 52 chars).
//!
//! Thin wrappers around the `nix-base32` crate that check lengths first, since that crate
//! indexes out of bounds on empty input and on strings whose length does not fit a byte count.

/// Number of base32 characters Nix uses for `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// Encodes bytes in Nix's base32.
pub fn encode(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    nix_base32::to_nix_base32(bytes)
}

/// Decodes exactly `N` bytes from Nix's base32; `None` if `s` has the wrong length, a
/// character outside the alphabet, or non-zero bits beyond `N` bytes.
pub fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    if N == 0 || s.len() != encoded_len(N) || !s.is_ascii() {
        return None;
    }
    let bytes = nix_base32::from_nix_base32(s)?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // From the nix-base32 crate's own tests (store path digest of nix-2.8.1).
        let digest: [u8; 20] = [
            0x1f, 0x74, 0xd7, 0x47, 0x29, 0xab, 0xdc, 0x08, 0xf4, 0xf8, 0x4e, 0x8f, 0x7f, 0x8c,
            0x80, 0x8c, 0x8e, 0xd9, 0x2e, 0xe5,
        ];
        assert_eq!(encode(&digest), "wlpdk3lch267z3sfz3s0ip5b553xfx0z");
        assert_eq!(
            decode::<20>("wlpdk3lch267z3sfz3s0ip5b553xfx0z"),
            Some(digest)
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode::<20>(""), None);
        assert_eq!(decode::<20>("a"), None);
        assert_eq!(decode::<20>("wlpdk3lch267z3sfz3s0ip5b553xfx0e"), None);
        assert_eq!(decode::<20>("wlpdk3lch267z3sfz3s0ip5b553xfx0zz"), None);
        assert_eq!(decode::<20>("wlpdk3lch267z3sfz3s0ip5b553xfx0é"), None);
        // 52 chars carry 260 bits; the top 4 must be zero for 32 bytes.
        assert_eq!(decode::<32>(&"z".repeat(52)), None);
        assert!(decode::<32>(&"0".repeat(52)).is_some());
        assert_eq!(encode(&[]), "");
    }
}
