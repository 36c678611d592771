use std::fmt;

use data_encoding::BASE64;
use ed25519_dalek::{Signature, Signer};

use super::ParseError;

/// An ed25519 binary cache signing key with its name, in the format of
/// `nix-store --generate-binary-cache-key`: `<name>:<base64 of secret seed || public key>`.
#[derive(Clone)]
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

/// A binary cache public key: `<name>:<base64 of 32 bytes>`, as in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

fn check_key_name(name: &str) -> Result<(), ParseError> {
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(ParseError::Key {
            name: name.to_owned(),
            reason: "key name must be non-empty without `:` or whitespace",
        });
    }
    Ok(())
}

fn split_key(s: &str) -> Result<(&str, Vec<u8>), ParseError> {
    let (name, b64) = s.split_once(':').ok_or_else(|| ParseError::Key {
        name: String::new(),
        reason: "no `:` between name and key",
    })?;
    check_key_name(name)?;
    let bytes = BASE64
        .decode(b64.trim_end().as_bytes())
        .map_err(|_| ParseError::Key {
            name: name.to_owned(),
            reason: "bad base64",
        })?;
    Ok((name, bytes))
}

impl SigningKey {
    /// A fresh random key.
    pub fn generate(name: &str) -> Result<Self, ParseError> {
        check_key_name(name)?;
        let seed: [u8; 32] = rand::random();
        Ok(SigningKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// Parses Nix's secret key format; the embedded public key must match the secret.
    pub fn from_nix_secret(s: &str) -> Result<Self, ParseError> {
        let (name, bytes) = split_key(s.trim())?;
        let bad = |reason| ParseError::Key {
            name: name.to_owned(),
            reason,
        };
        let pair: [u8; 64] = bytes
            .try_into()
            .map_err(|_| bad("secret key is not 64 bytes"))?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&pair)
            .map_err(|_| bad("public half does not match the secret"))?;
        Ok(SigningKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Nix's secret key format, for a file `nix` reads with `secret-key-files`.
    pub fn to_nix_secret(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.key.to_keypair_bytes())
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// `<name>:<base64 signature>` over `fingerprint` (see `NarInfo::fingerprint`).
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(&sig.to_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    /// Shows the name and public key, never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public_key().to_nix_string())
    }
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let (name, bytes) = split_key(s.trim())?;
        let bad = |reason| ParseError::Key {
            name: name.to_owned(),
            reason,
        };
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("public key is not 32 bytes"))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| bad("not an ed25519 public key"))?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }

    /// True if `sig` (`<name>:<base64>`) is this key's valid signature of `fingerprint`.
    /// A signature under another key name is not valid.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = BASE64.decode(b64.as_bytes()) else {
            return false;
        };
        let Ok(raw) = <[u8; 64]>::try_from(bytes) else {
            return false;
        };
        self.key
            .verify_strict(fingerprint.as_bytes(), &Signature::from_bytes(&raw))
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_nix_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `nix-store --generate-binary-cache-key blixard-test-1` (Nix 2.8).
    const SEC: &str = "blixard-test-1:SJmbVDSpFWvYc105yhRcsBUHgTWgZunlhpv1b9zA7xsauBwPdNY/P+CaDw2kLmzurCGSe1swBNl9t9MSWDhl5Q==";
    const PUB: &str = "blixard-test-1:GrgcD3TWPz/gmg8NpC5s7qwhkntbMATZfbfTElg4ZeU=";

    #[test]
    fn nix_key_formats() {
        let k = SigningKey::from_nix_secret(SEC).unwrap();
        assert_eq!(k.to_nix_secret(), SEC);
        assert_eq!(k.public_key().to_nix_string(), PUB);
        assert_eq!(PublicKey::parse(PUB).unwrap(), k.public_key());
        let sig = k.sign("hello");
        assert!(k.public_key().verify("hello", &sig));
        assert!(!k.public_key().verify("hellO", &sig));
        let other = SigningKey::generate("blixard-test-1").unwrap();
        assert!(!other.public_key().verify("hello", &sig));
        assert!(!format!("{k:?}").contains("SJmbV"));
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(SigningKey::from_nix_secret(PUB).is_err());
        assert!(SigningKey::from_nix_secret("nocolon").is_err());
        assert!(SigningKey::from_nix_secret(":SJmbVDSp").is_err());
        // Secret whose public half was tampered with.
        let tampered = SEC.replace("GSe1sw", "GSe1sx");
        assert!(SigningKey::from_nix_secret(&tampered).is_err());
        assert!(PublicKey::parse(SEC).is_err());
        assert!(SigningKey::generate("a:b").is_err());
    }
}
