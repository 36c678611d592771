use std::fmt;

use sha2::{Digest, Sha256};

use super::{base32, NarHash, ParseError};

/// Longest store path name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;
/// Length of a store path's hash part in characters.
pub const HASH_PART_LEN: usize = 32;

/// A Nix store directory such as `/nix/store`: absolute, no trailing slash, no `.`/`..` or
/// empty components.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl StoreDir {
    pub fn new(dir: &str) -> Result<Self, ParseError> {
        let bad = |why| ParseError::StoreDir(dir.to_owned(), why);
        let rest = dir.strip_prefix('/').ok_or_else(|| bad("not absolute"))?;
        if rest.is_empty() {
            return Err(bad("is the root directory"));
        }
        if dir.contains('\0') {
            return Err(bad("contains NUL"));
        }
        if rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("has an empty, `.` or `..` component"));
        }
        Ok(StoreDir(dir.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for StoreDir {
    /// `/nix/store`.
    fn default() -> Self {
        StoreDir("/nix/store".to_owned())
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreDir({:?})", self.0)
    }
}

/// A store path without its store dir: a 20-byte digest and a name, written
/// `<32 chars nix-base32>-<name>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    pub digest: [u8; 20],
    pub name: String,
}

impl StorePath {
    /// Builds a store path, checking the name like Nix does.
    pub fn new(digest: [u8; 20], name: &str) -> Result<Self, ParseError> {
        check_name(name).map_err(|why| ParseError::StorePath(name.to_owned(), why))?;
        Ok(StorePath {
            digest,
            name: name.to_owned(),
        })
    }

    /// Parses a base name `<hash>-<name>`.
    pub fn from_base_name(s: &str) -> Result<Self, ParseError> {
        let bad = |why| ParseError::StorePath(s.to_owned(), why);
        let (hash, rest) = s
            .split_at_checked(HASH_PART_LEN)
            .ok_or_else(|| bad("too short"))?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| bad("no `-` after the hash"))?;
        let digest = base32::decode::<20>(hash).ok_or_else(|| bad("bad hash part"))?;
        check_name(name).map_err(bad)?;
        Ok(StorePath {
            digest,
            name: name.to_owned(),
        })
    }

    /// Parses an absolute path `<store dir>/<hash>-<name>` (nothing below it).
    pub fn from_absolute(s: &str, store_dir: &StoreDir) -> Result<Self, ParseError> {
        let base = s
            .strip_prefix(store_dir.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| ParseError::StorePath(s.to_owned(), "not in the store dir"))?;
        if base.contains('/') {
            return Err(ParseError::StorePath(
                s.to_owned(),
                "is below a store path, not a store path",
            ));
        }
        Self::from_base_name(base)
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> String {
        base32::encode(&self.digest)
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }

    /// `<store dir>/<hash>-<name>`.
    pub fn to_absolute(&self, store_dir: &StoreDir) -> String {
        format!("{}/{}", store_dir.as_str(), self.base_name())
    }
}

impl fmt::Display for StorePath {
    /// The base name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base_name())
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base_name())
    }
}

/// Nix's name rules: 1..=211 chars from `[A-Za-z0-9+-._?=]`, not starting with `.`.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name longer than 211 characters");
    }
    if name.starts_with('.') {
        return Err("name starts with `.`");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
    {
        return Err("name has a character outside [A-Za-z0-9+-._?=]");
    }
    Ok(())
}

/// The store path that `nix-store --add` (or `builtins.path { recursive = true; }`) gives a
/// file tree whose NAR has sha256 `nar_hash`, when it has no references.
///
/// Nix computes `sha256("source:sha256:<hex>:<store dir>:<name>")`, folds it to 20 bytes by
/// xor-ing byte `i` into byte `i % 20`, and prints that in base32.
pub fn make_source_path(
    store_dir: &StoreDir,
    name: &str,
    nar_hash: &NarHash,
) -> Result<StorePath, ParseError> {
    check_name(name).map_err(|why| ParseError::StorePath(name.to_owned(), why))?;
    let fingerprint = format!(
        "source:sha256:{}:{}:{}",
        nar_hash.to_hex(),
        store_dir.as_str(),
        name
    );
    let full: [u8; 32] = Sha256::digest(fingerprint.as_bytes()).into();
    let mut digest = [0u8; 20];
    for (i, b) in full.iter().enumerate() {
        digest[i % 20] ^= b;
    }
    StorePath::new(digest, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-blixard-fixture-dep";

    #[test]
    fn parse_and_print() {
        let dir = StoreDir::default();
        let p = StorePath::from_absolute(DEP, &dir).unwrap();
        assert_eq!(p.name, "blixard-fixture-dep");
        assert_eq!(p.hash_part(), "9piy22i3gmh1lamfrkhwf38z6bbswzvm");
        assert_eq!(p.to_absolute(&dir), DEP);
        assert_eq!(StorePath::from_base_name(&p.base_name()).unwrap(), p);
        let other = StoreDir::new("/tmp/store").unwrap();
        assert_eq!(
            p.to_absolute(&other),
            "/tmp/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-blixard-fixture-dep"
        );
        assert!(StorePath::from_absolute(DEP, &other).is_err());
    }

    #[test]
    fn rejects_bad_paths() {
        let dir = StoreDir::default();
        for s in [
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm",
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-",
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-.hidden",
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-a b",
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-a/b",
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzve-a",
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzv-ab",
            "/nix/storex/9piy22i3gmh1lamfrkhwf38z6bbswzvm-a",
            "nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-a",
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvmé-a",
        ] {
            assert!(StorePath::from_absolute(s, &dir).is_err(), "{s}");
        }
        let long = format!("9piy22i3gmh1lamfrkhwf38z6bbswzvm-{}", "a".repeat(212));
        assert!(StorePath::from_base_name(&long).is_err());
        let ok = format!("9piy22i3gmh1lamfrkhwf38z6bbswzvm-{}", "a".repeat(211));
        assert!(StorePath::from_base_name(&ok).is_ok());
        assert!(StorePath::from_base_name("9piy22i3gmh1lamfrkhwf38z6bbswzvm-aZ09+-._?=").is_ok());
    }

    #[test]
    fn store_dirs() {
        assert!(StoreDir::new("/nix/store").is_ok());
        for bad in [
            "",
            "/",
            "nix/store",
            "/nix/store/",
            "/nix//store",
            "/nix/../store",
        ] {
            assert!(StoreDir::new(bad).is_err(), "{bad}");
        }
    }
}
