//! The redb tables, their keys, and how raw values are encoded in them.
//!
//! `raft_log` maps an index to a protobuf `Entry`; `raft_meta` holds the hard state and
//! configuration (protobuf), the compaction point and applied index (two big-endian u64s:
//! index, term) and the node record (versioned postcard); `state` holds the state
//! machine's rows by (table, key).

use redb::TableDefinition;

use crate::error::{corrupt, StoreError};

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
pub(crate) const STATE: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("state");

pub(crate) const HARD_STATE: &str = "hard_state";
pub(crate) const CONF_STATE: &str = "conf_state";
/// The index and term of the last entry discarded by compaction (or of the installed snapshot).
pub(crate) const LOG_START: &str = "log_start";
pub(crate) const APPLIED: &str = "applied";
pub(crate) const NODE: &str = "node";

pub(crate) fn pb_decode<M: protobuf::Message>(
    what: &'static str,
    bytes: &[u8],
) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|e| corrupt(what, e))
}

pub(crate) fn pb_encode<M: protobuf::Message>(m: &M) -> Result<Vec<u8>, StoreError> {
    m.write_to_bytes()
        .map_err(|e| StoreError::Raft(raft::Error::CodecError(e)))
}

pub(crate) fn encode_pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

pub(crate) fn decode_pair(what: &'static str, bytes: &[u8]) -> Result<(u64, u64), StoreError> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| corrupt(what, format!("expected 16 bytes, found {}", bytes.len())))?;
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&arr[..8]);
    b.copy_from_slice(&arr[8..]);
    Ok((u64::from_be_bytes(a), u64::from_be_bytes(b)))
}
