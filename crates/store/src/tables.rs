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

/// The key under which `raft_meta` records the data file's format ([`DATA_FORMAT`]).
pub(crate) const FORMAT: &str = "format";
/// The data file format this build writes. Format 1 (no `format` key) held bare values;
/// format 2 seals every value with a checksum of its place and bytes (see [`seal`]). An
/// older file is migrated at open, after a copy of it is kept; a newer one is refused.
pub const DATA_FORMAT: u8 = 2;
pub(crate) const FORMAT_CHECKSUMMED: u8 = DATA_FORMAT;

/// Where a stored value lives: what its checksum covers besides its bytes, so a value
/// moved to another key (a damaged key) fails too.
#[derive(Clone, Copy, Debug)]
pub enum Slot<'a> {
    Log(u64),
    Meta(&'a str),
    Row(&'a str, &'a [u8]),
}

const SUM: usize = 8;

fn sum(slot: Slot<'_>, payload: &[u8]) -> [u8; SUM] {
    let mut h = blake3::Hasher::new();
    match slot {
        Slot::Log(i) => {
            h.update(b"raft_log\0");
            h.update(&i.to_be_bytes());
        }
        Slot::Meta(k) => {
            h.update(b"raft_meta\0");
            h.update(k.as_bytes());
        }
        Slot::Row(t, k) => {
            h.update(b"state\0");
            h.update(t.as_bytes());
            h.update(b"\0");
            h.update(k);
        }
    }
    h.update(b"\0");
    h.update(payload);
    let mut out = [0u8; SUM];
    out.copy_from_slice(&h.finalize().as_bytes()[..SUM]);
    out
}

/// A value as stored: an 8-byte checksum (BLAKE3 of its place and bytes), then the bytes.
/// redb checksums its pages only when it checks the file; this is checked on every read.
pub fn seal(slot: Slot<'_>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SUM + payload.len());
    out.extend_from_slice(&sum(slot, payload));
    out.extend_from_slice(payload);
    out
}

/// The bytes of a stored value whose checksum matches, or the error naming it.
pub fn unseal<'v>(slot: Slot<'_>, stored: &'v [u8]) -> Result<&'v [u8], StoreError> {
    let what = match slot {
        Slot::Log(_) => "raft log entry",
        Slot::Meta(_) => "raft metadata",
        Slot::Row(..) => "state row",
    };
    if stored.len() < SUM {
        return Err(corrupt(
            what,
            format!("{slot:?}: {} bytes, too short", stored.len()),
        ));
    }
    let (got, payload) = stored.split_at(SUM);
    if got != sum(slot, payload) {
        return Err(corrupt(what, format!("{slot:?}: checksum mismatch")));
    }
    Ok(payload)
}

/// `raft_meta[key]`, checked.
pub(crate) fn meta<T>(table: &T, key: &str) -> Result<Option<Vec<u8>>, StoreError>
where
    T: redb::ReadableTable<&'static str, &'static [u8]>,
{
    match table.get(key)? {
        Some(v) => Ok(Some(unseal(Slot::Meta(key), v.value())?.to_vec())),
        None => Ok(None),
    }
}

/// Inserts `raft_meta[key] = payload`, sealed.
pub(crate) fn put_meta(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    payload: &[u8],
) -> Result<(), StoreError> {
    table.insert(key, seal(Slot::Meta(key), payload).as_slice())?;
    Ok(())
}
