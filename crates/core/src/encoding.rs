//! Versioned encodings for everything that is stored or replicated.
//!
//! Every stored value and every log entry is one format-version byte followed by postcard.
//! A reader that meets a version it does not know refuses it with a clear error instead of
//! misreading it; a later format adds a new version and keeps the old decoder.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version byte written in front of every encoded value.
pub const FORMAT_VERSION: u8 = 1;

/// A stored or replicated value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty value")]
    Empty,
    #[error("unsupported format version {found} (this build reads version {FORMAT_VERSION})")]
    Version { found: u8 },
    #[error("malformed value: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Encodes `value` as the version byte followed by postcard.
pub fn encode_versioned<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // postcard only fails on writer errors, and a Vec never refuses bytes; an empty body
    // would then fail to decode, loudly, rather than be misread.
    if let Ok(body) = postcard::to_stdvec(value) {
        out.extend_from_slice(&body);
    }
    out
}

/// Decodes a value written by [`encode_versioned`].
pub fn decode_versioned<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&FORMAT_VERSION, body)) => Ok(postcard::from_bytes(body)?),
        Some((&found, _)) => Err(DecodeError::Version { found }),
    }
}
