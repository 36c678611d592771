//! Identifiers: nodes, clusters, endpoint keys and blobs, and the rule for names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's raft id. Allocated by the state machine when a node joins; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix('n').unwrap_or(s);
        s.parse::<u64>()
            .ok()
            .filter(|id| *id != 0)
            .map(NodeId)
            .ok_or_else(|| ParseIdError::NodeId(s.to_string()))
    }
}

/// Errors parsing an identifier from text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseIdError {
    #[error("invalid node id {0:?}: expected a positive integer such as 2 or n2")]
    NodeId(String),
    #[error("invalid key {0:?}: expected 64 hex characters")]
    Key(String),
    #[error("invalid cluster id {0:?}: expected 32 hex characters")]
    Cluster(String),
    #[error("invalid blob hash {0:?}: expected 64 hex characters")]
    Blob(String),
    #[error("invalid request id {0:?}: expected 32 hex characters")]
    Request(String),
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    // Hex digits only: `from_str_radix` alone would also take a sign (`+f`).
    if s.len() != N * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// The public half of an ed25519 key: a node's Iroh endpoint id, or a user's key.
/// Displayed as lowercase hex, the way Iroh displays endpoint ids.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey(pub [u8; 32]);

/// 32-byte ids shown as lowercase hex (`Debug` shows the first 5 bytes) and parsed from it.
macro_rules! hex32 {
    ($t:ident, $err:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "("))?;
                write_hex(f, &self.0[..5])?;
                write!(f, ")")
            }
        }

        impl FromStr for $t {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                decode_hex::<32>(s)
                    .map($t)
                    .ok_or_else(|| ParseIdError::$err(s.to_string()))
            }
        }
    };
}
hex32!(EndpointKey, Key);
hex32!(BlobHash, Blob);

/// A cluster's identity: chosen at random by `--init`, carried in join tickets and in every
/// node's data dir so that a node never talks to (or joins) the wrong cluster.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ClusterId(pub [u8; 16]);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl FromStr for ClusterId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_hex::<16>(s)
            .map(ClusterId)
            .ok_or_else(|| ParseIdError::Cluster(s.to_string()))
    }
}

/// A client's id for one write: a retry of the write carries the same id, and the state
/// machine applies a command under a given id once (see `Command::Once`). 16 random
/// bytes, displayed as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    /// The id of the `n`th command a request with this id proposes: the request's own id
    /// for the first, a derivation for the others, so a retried request names each of
    /// its commands as the first attempt did.
    pub fn nth(&self, n: u32) -> RequestId {
        if n == 0 {
            return *self;
        }
        let mut out = self.0;
        for (i, b) in n.to_le_bytes().iter().enumerate() {
            out[i] ^= b.rotate_left(3) ^ 0xa5;
        }
        out[15] ^= 0x5a;
        RequestId(out)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl FromStr for RequestId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_hex::<16>(s)
            .map(RequestId)
            .ok_or_else(|| ParseIdError::Request(s.to_string()))
    }
}

/// The BLAKE3 hash of a blob in the iroh-blobs store (an image's manifest, a NAR).
/// Displayed as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobHash(pub [u8; 32]);

/// Hex text in human-readable formats (JSON), raw bytes in binary ones (postcard).
macro_rules! hex_serde {
    ($t:ident, $n:literal) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; $n]>::deserialize(d).map($t)
                }
            }
        }
    };
}
hex_serde!(EndpointKey, 32);
hex_serde!(ClusterId, 16);
hex_serde!(RequestId, 16);
hex_serde!(BlobHash, 32);

/// Names of users, roles, tenants and images (and of VMs created before VM names became
/// host names): 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let key = EndpointKey([0xab; 32]);
        assert_eq!(key.to_string().parse::<EndpointKey>(), Ok(key));
        let cluster = ClusterId([7; 16]);
        assert_eq!(cluster.to_string().parse::<ClusterId>(), Ok(cluster));
        assert_eq!("n3".parse::<NodeId>(), Ok(NodeId(3)));
        assert_eq!("3".parse::<NodeId>(), Ok(NodeId(3)));
        assert!("0".parse::<NodeId>().is_err());
        assert!("zz".parse::<EndpointKey>().is_err());
        assert!("é".repeat(32).parse::<EndpointKey>().is_err());
    }

    // Found by the join_ticket fuzz target: a `+` passed for a hex digit.
    #[test]
    fn only_hex_digits_make_an_id() {
        let signed = "755555555505555555+5555555555550";
        assert!(signed.parse::<ClusterId>().is_err());
        assert!("+f".repeat(32).parse::<EndpointKey>().is_err());
        assert!("+f".repeat(16).parse::<RequestId>().is_err());
        assert!("+f".repeat(32).parse::<BlobHash>().is_err());
        assert_eq!(
            "0123456789abcdefABCDEF0123456789".parse::<ClusterId>(),
            Ok(ClusterId([
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45,
                0x67, 0x89
            ]))
        );
    }
}
