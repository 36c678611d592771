//! The manifest: what an image is, as a blob. It is the first child of the image's hash
//! sequence; the NARs follow in the manifest's order, so the sequence alone names every
//! byte of the image and the manifest says what each blob is.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::nix::{NarHash, StoreDir, StorePath};
use crate::ImageError;

/// The manifest format version written by this Blixard.
pub const MANIFEST_VERSION: u32 = 1;
/// The largest manifest accepted from a peer.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// One store path of the closure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The absolute store path.
    pub path: String,
    /// Nix's form, `sha256:<nix-base32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Absolute store paths this path refers to (each is in the manifest).
    pub references: Vec<String>,
    pub deriver: Option<String>,
    /// The NAR's BLAKE3 hash (hex), as in the hash sequence.
    pub blob: String,
}

/// A closure: its root and every store path it needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub store_dir: String,
    pub root: String,
    pub entries: Vec<Entry>,
}

/// A manifest entry after its fields were checked.
#[derive(Clone, Debug)]
pub struct CheckedEntry {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub blob: iroh_blobs::Hash,
}

impl Manifest {
    pub fn to_bytes(&self) -> Result<Vec<u8>, ImageError> {
        serde_json::to_vec(self).map_err(|e| ImageError::Manifest(e.to_string()))
    }

    /// Parses and checks a manifest from `bytes`; `children` is the rest of the hash
    /// sequence, which must list exactly the manifest's blobs in order.
    pub fn parse(bytes: &[u8], children: &[iroh_blobs::Hash]) -> Result<Self, ImageError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ImageError::Manifest(format!(
                "manifest of {} bytes is larger than the limit of {MAX_MANIFEST_BYTES}",
                bytes.len()
            )));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ImageError::Manifest(e.to_string()))?;
        if m.version != MANIFEST_VERSION {
            return Err(ImageError::Manifest(format!(
                "manifest version {} is not supported (this blixard reads {MANIFEST_VERSION})",
                m.version
            )));
        }
        let checked = m.check()?;
        if checked.len() != children.len()
            || checked.iter().zip(children).any(|(e, c)| e.blob != *c)
        {
            return Err(ImageError::Manifest(
                "the hash sequence does not list the manifest's NARs".into(),
            ));
        }
        Ok(m)
    }

    pub fn store_dir(&self) -> Result<StoreDir, ImageError> {
        StoreDir::new(&self.store_dir).map_err(|e| ImageError::Manifest(e.to_string()))
    }

    /// Checks every field: paths in the store dir, hashes well-formed, the root and every
    /// reference inside the closure, no path twice.
    pub fn check(&self) -> Result<Vec<CheckedEntry>, ImageError> {
        let bad = |m: String| ImageError::Manifest(m);
        let dir = self.store_dir()?;
        let parse = |p: &str| StorePath::from_absolute(p, &dir).map_err(|e| bad(e.to_string()));
        if self.entries.is_empty() {
            return Err(bad("the manifest lists no store paths".into()));
        }
        let paths: BTreeSet<&str> = self.entries.iter().map(|e| e.path.as_str()).collect();
        if paths.len() != self.entries.len() {
            return Err(bad("a store path is listed twice".into()));
        }
        if !paths.contains(self.root.as_str()) {
            return Err(bad(format!("the root {} is not in the closure", self.root)));
        }
        let mut out = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let references = e
                .references
                .iter()
                .map(|r| {
                    if paths.contains(r.as_str()) {
                        parse(r)
                    } else {
                        Err(bad(format!(
                            "{} refers to {r}, which is not in the closure",
                            e.path
                        )))
                    }
                })
                .collect::<Result<_, _>>()?;
            let blob: iroh_blobs::Hash = e
                .blob
                .parse()
                .map_err(|_| bad(format!("{}: bad blob hash {:?}", e.path, e.blob)))?;
            out.push(CheckedEntry {
                path: parse(&e.path)?,
                nar_hash: NarHash::parse(&e.nar_hash).map_err(|err| bad(err.to_string()))?,
                nar_size: e.nar_size,
                references,
                deriver: e.deriver.as_deref().map(parse).transpose()?,
                blob,
            });
        }
        Ok(out)
    }

    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.nar_size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, refs: &[&str], blob: u8) -> Entry {
        Entry {
            path: format!("/nix/store/{}-{name}", "0".repeat(32)).replacen(
                &"0".repeat(32),
                &format!("{:0>32}", blob),
                1,
            ),
            nar_hash: format!("sha256:{}", "0".repeat(52)),
            nar_size: 8,
            references: refs.iter().map(|r| r.to_string()).collect(),
            deriver: None,
            blob: iroh_blobs::Hash::new([blob]).to_hex().to_string(),
        }
    }

    #[test]
    fn manifests_must_be_closed_and_match_their_sequence() {
        let a = entry("a", &[], 1);
        let b = entry("b", &[&a.path], 2);
        let m = Manifest {
            version: MANIFEST_VERSION,
            store_dir: "/nix/store".into(),
            root: b.path.clone(),
            entries: vec![a.clone(), b.clone()],
        };
        let children = [iroh_blobs::Hash::new([1]), iroh_blobs::Hash::new([2])];
        let bytes = m.to_bytes().unwrap();
        assert_eq!(Manifest::parse(&bytes, &children).unwrap(), m);
        assert!(Manifest::parse(&bytes, &children[..1]).is_err());
        assert!(Manifest::parse(&bytes, &[children[1], children[0]]).is_err());

        let mut open = m.clone();
        open.entries.remove(0);
        assert!(open
            .check()
            .unwrap_err()
            .to_string()
            .contains("not in the closure"));
        let mut twice = m.clone();
        twice.entries.push(a.clone());
        assert!(twice.check().is_err());
        let mut rootless = m.clone();
        rootless.root = "/nix/store/zzz".into();
        assert!(rootless.check().is_err());
        let mut elsewhere = m.clone();
        elsewhere.entries[0].path = "/tmp/evil".into();
        assert!(elsewhere.check().is_err());
        let mut newer = m;
        newer.version = 2;
        assert!(Manifest::parse(&newer.to_bytes().unwrap(), &children).is_err());
        assert!(Manifest::parse(b"{", &children).is_err());
    }
}
