use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use sha2::{Digest, Sha256};

use super::{base32, ParseError};

/// The sha256 of a NAR serialisation, the only NAR hash Blixard handles.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NarHash(pub [u8; 32]);

impl NarHash {
    /// sha256 of `data`.
    pub fn digest(data: &[u8]) -> Self {
        NarHash(Sha256::digest(data).into())
    }

    /// `sha256:<nix-base32>`, as in narinfo files and Nix 2.8's fingerprints.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", base32::encode(&self.0))
    }

    /// The bare 52-character Nix base32, as in binary cache NAR file names.
    pub fn to_base32(&self) -> String {
        base32::encode(&self.0)
    }

    /// `sha256-<base64>` (SRI), as printed by Nix's `--json` output.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(&self.0))
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// Parses `sha256:<nix-base32>`, `sha256:<hex>` or SRI `sha256-<base64>`.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let bad = |why| ParseError::Hash(s.to_owned(), why);
        if let Some(rest) = s.strip_prefix("sha256:") {
            if rest.len() == base32::encoded_len(32) {
                return base32::decode::<32>(rest)
                    .map(NarHash)
                    .ok_or_else(|| bad("bad base32"));
            }
            if rest.len() == 64 {
                let bytes = HEXLOWER_PERMISSIVE
                    .decode(rest.as_bytes())
                    .map_err(|_| bad("bad hex"))?;
                return bytes.try_into().map(NarHash).map_err(|_| bad("bad hex"));
            }
            return Err(bad("wrong length for base32 or hex"));
        }
        if let Some(rest) = s.strip_prefix("sha256-") {
            let bytes = BASE64
                .decode(rest.as_bytes())
                .map_err(|_| bad("bad base64"))?;
            return bytes
                .try_into()
                .map(NarHash)
                .map_err(|_| bad("base64 is not 32 bytes"));
        }
        Err(bad("not a sha256 hash"))
    }
}

impl FromStr for NarHash {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        NarHash::parse(s)
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({})", self.to_nix_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        // Nix 2.8: `nix path-info --json` printed the SRI form, the narinfo the base32 form.
        let sri = "sha256-/kB8ZzW+huQZDUfrZpifJ4leF8r/bPB30zS6Ih8TNfg=";
        let b32 = "sha256:1y1m2cgj5filsdvz0v7zr8bmx297kyc6dss71lcy91my6mkpqh7y";
        let a = NarHash::parse(sri).unwrap();
        let b = NarHash::parse(b32).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_nix_string(), b32);
        assert_eq!(a.to_sri(), sri);
        let hex = format!("sha256:{}", a.to_hex());
        assert_eq!(NarHash::parse(&hex).unwrap(), a);
        assert_eq!(
            NarHash::parse(&hex.to_uppercase().replace("SHA256", "sha256")).unwrap(),
            a
        );
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "sha256:",
            "sha512:1y1m2cgj5filsdvz0v7zr8bmx297kyc6dss71lcy91my6mkpqh7y",
            "sha256:1y1m2cgj5filsdvz0v7zr8bmx297kyc6dss71lcy91my6mkpqh7e",
            "sha256-AAAA",
            "md5-AAAA",
        ] {
            assert!(NarHash::parse(s).is_err(), "{s}");
        }
    }
}
