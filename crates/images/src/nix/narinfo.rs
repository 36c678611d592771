use super::{NarHash, ParseError, PublicKey, SigningKey, StoreDir, StorePath};

/// A binary cache's `<hash>.narinfo`: where the NAR of a store path is and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// The NAR file, relative to the cache root (Nix's own caches use `nar/<filehash>.nar`).
    pub url: String,
    /// `none` for the uncompressed NARs Blixard serves. A narinfo without the field means
    /// `bzip2` to Nix.
    pub compression: String,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    /// `<key name>:<base64 signature>` each.
    pub signatures: Vec<String>,
}

fn bad(msg: impl Into<String>) -> ParseError {
    ParseError::NarInfo(msg.into())
}

impl NarInfo {
    /// The string binary cache keys sign:
    /// `1;<store path>;sha256:<base32>;<nar size>;<references, comma separated>`, with
    /// absolute paths and references sorted and deduplicated as Nix does.
    pub fn fingerprint(&self, store_dir: &StoreDir) -> String {
        let refs: Vec<String> = self
            .sorted_references()
            .iter()
            .map(|r| r.to_absolute(store_dir))
            .collect();
        format!(
            "1;{};{};{};{}",
            self.store_path.to_absolute(store_dir),
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(",")
        )
    }

    fn sorted_references(&self) -> Vec<&StorePath> {
        let mut refs: Vec<&StorePath> = self.references.iter().collect();
        // Nix orders store paths by base name, i.e. by hash part first.
        refs.sort_by_key(|r| r.base_name());
        refs.dedup();
        refs
    }

    /// Adds `key`'s signature of this narinfo (replacing an older one under the same name).
    pub fn sign(&mut self, key: &SigningKey, store_dir: &StoreDir) {
        let sig = key.sign(&self.fingerprint(store_dir));
        let prefix = format!("{}:", key.name());
        self.signatures.retain(|s| !s.starts_with(&prefix));
        self.signatures.push(sig);
    }

    /// True if any signature is valid under any of `keys`.
    pub fn has_valid_signature(&self, store_dir: &StoreDir, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint(store_dir);
        self.signatures
            .iter()
            .any(|sig| keys.iter().any(|k| k.verify(&fp, sig)))
    }

    /// The text format, byte-identical to what Nix 2.8 writes for an uncompressed NAR.
    /// `FileHash`/`FileSize` are written only for `Compression: none`, where they equal
    /// `NarHash`/`NarSize`.
    pub fn render(&self, store_dir: &StoreDir) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "StorePath: {}\n",
            self.store_path.to_absolute(store_dir)
        ));
        s.push_str(&format!("URL: {}\n", self.url));
        s.push_str(&format!("Compression: {}\n", self.compression));
        if self.compression == "none" {
            s.push_str(&format!("FileHash: {}\n", self.nar_hash.to_nix_string()));
            s.push_str(&format!("FileSize: {}\n", self.nar_size));
        }
        s.push_str(&format!("NarHash: {}\n", self.nar_hash.to_nix_string()));
        s.push_str(&format!("NarSize: {}\n", self.nar_size));
        let refs: Vec<String> = self
            .sorted_references()
            .iter()
            .map(|r| r.base_name())
            .collect();
        s.push_str(&format!("References: {}\n", refs.join(" ")));
        if let Some(d) = &self.deriver {
            s.push_str(&format!("Deriver: {}\n", d.base_name()));
        }
        for sig in &self.signatures {
            s.push_str(&format!("Sig: {sig}\n"));
        }
        s
    }

    /// Parses the text format like Nix does: unknown keys (`FileHash`, `System`, `CA`, ...)
    /// are ignored, a missing `Compression` means `bzip2`, `StorePath`, `URL`, `NarHash` and
    /// a non-zero `NarSize` are required.
    pub fn parse(text: &str, store_dir: &StoreDir) -> Result<Self, ParseError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = Vec::new();
        let mut deriver = None;
        let mut signatures = Vec::new();
        for line in text.lines() {
            if line.trim().is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("line without `:`: {line:?}")))?;
            let value = value.trim();
            match key {
                "StorePath" => store_path = Some(StorePath::from_absolute(value, store_dir)?),
                "URL" => url = Some(value.to_owned()),
                "Compression" => compression = Some(value.to_owned()),
                "NarHash" => nar_hash = Some(NarHash::parse(value)?),
                "NarSize" => {
                    nar_size = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| bad(format!("bad NarSize {value:?}")))?,
                    )
                }
                "References" => {
                    references = value
                        .split_whitespace()
                        .map(StorePath::from_base_name)
                        .collect::<Result<_, _>>()?
                }
                "Deriver" => {
                    deriver = match value {
                        "" | "unknown-deriver" => None,
                        d => Some(StorePath::from_base_name(d)?),
                    }
                }
                "Sig" => {
                    if !value.contains(':') {
                        return Err(bad(format!("bad Sig {value:?}")));
                    }
                    signatures.push(value.to_owned())
                }
                _ => {}
            }
        }
        let nar_size = nar_size.ok_or_else(|| bad("no NarSize"))?;
        if nar_size == 0 {
            return Err(bad("NarSize is 0"));
        }
        let url = url.ok_or_else(|| bad("no URL"))?;
        if url.is_empty() {
            return Err(bad("empty URL"));
        }
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| bad("no StorePath"))?,
            url,
            compression: compression.unwrap_or_else(|| "bzip2".to_owned()),
            nar_hash: nar_hash.ok_or_else(|| bad("no NarHash"))?,
            nar_size,
            references,
            deriver,
            signatures,
        })
    }
}
