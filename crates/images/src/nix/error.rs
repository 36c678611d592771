use std::path::PathBuf;

use super::hash::NarHash;

/// A Nix text value (store path, hash, key, narinfo, path-info JSON) that could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("invalid store dir {0:?}: {1}")]
    StoreDir(String, &'static str),
    #[error("invalid store path {0:?}: {1}")]
    StorePath(String, &'static str),
    #[error("invalid NAR hash {0:?}: {1}")]
    Hash(String, &'static str),
    #[error("invalid key {name:?}: {reason}")]
    Key { name: String, reason: &'static str },
    #[error("invalid narinfo: {0}")]
    NarInfo(String),
    #[error("invalid path-info JSON: {0}")]
    PathInfo(String),
}

/// Why a NAR was rejected, or why it could not be written or unpacked.
///
/// `path` fields name the entry inside the archive: `/` is the root, `/a/b` an entry below it.
/// `offset` fields are byte offsets into the NAR.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("reading NAR")]
    Read(#[source] std::io::Error),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("destination {0} already exists")]
    DestinationExists(PathBuf),
    #[error("NAR truncated at byte {offset} (in {path})")]
    Truncated { path: String, offset: u64 },
    #[error("not a NAR: bad magic")]
    BadMagic,
    #[error("at {path} (byte {offset}): expected {expected}, found {found:?}")]
    UnexpectedToken {
        path: String,
        offset: u64,
        expected: &'static str,
        found: String,
    },
    #[error("at {path} (byte {offset}): string of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        path: String,
        offset: u64,
        len: u64,
        max: u64,
    },
    #[error("at {path} (byte {offset}): non-zero padding")]
    BadPadding { path: String, offset: u64 },
    #[error("invalid entry name {name:?} in {path}: {reason}")]
    BadName {
        path: String,
        name: String,
        reason: &'static str,
    },
    #[error("entry {name:?} in {path} is not strictly after the previous entry")]
    NotSorted { path: String, name: String },
    #[error("NAR nests deeper than {max} directories at {path}")]
    TooDeep { path: String, max: usize },
    #[error("symlink {path} has a disallowed target {target:?}: {reason}")]
    BadSymlink {
        path: String,
        target: String,
        reason: &'static str,
    },
    #[error("trailing data after the NAR at byte {offset}")]
    TrailingData { offset: u64 },
    #[error("NAR size mismatch: expected {expected} bytes, got {actual}{}", if *.more { " or more" } else { "" })]
    SizeMismatch {
        expected: u64,
        actual: u64,
        more: bool,
    },
    #[error("NAR hash mismatch: expected {expected}, got {actual}")]
    HashMismatch { expected: NarHash, actual: NarHash },
}
