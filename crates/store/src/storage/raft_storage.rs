//! raft-rs's `Storage` over the store: log reads consult the in-memory tail before the
//! database, and snapshots are built on demand from the state rows at the applied index.

use blixard_core::{encode_versioned, Row};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use redb::{ReadableDatabase, ReadableTable};

use super::Store;
use crate::error::{corrupt, StoreError};
use crate::tables::{
    decode_pair, meta, pb_decode, unseal, Slot, APPLIED, CONF_STATE, LOG, RAFT, STATE,
};

impl Store {
    pub(super) fn read_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut out = Vec::new();
        let mut size = 0u64;
        for item in log.range(low..high)? {
            let (k, v) = item?;
            let entry: Entry = pb_decode("log entry", unseal(Slot::Log(k.value()), v.value())?)?;
            if entry.index != k.value() {
                return Err(corrupt(
                    "log entry",
                    format!("key {} holds entry {}", k.value(), entry.index),
                ));
            }
            size += u64::from(entry.compute_size());
            // Always return at least one entry, as raft expects.
            if let Some(limit) = max_size {
                if !out.is_empty() && size > limit {
                    break;
                }
            }
            out.push(entry);
        }
        if out.len() as u64 != high - low && max_size.is_none_or(|l| size <= l) {
            return Err(corrupt(
                "log",
                format!("entries {low}..{high} are not all present"),
            ));
        }
        Ok(out)
    }

    fn build_snapshot(&self) -> Result<Snapshot, StoreError> {
        // One read transaction: rows, applied index and configuration agree.
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        let (index, term) = match meta(&raft, APPLIED)? {
            Some(v) => decode_pair("applied index", &v)?,
            None => (0, 0),
        };
        let conf: ConfState = match meta(&raft, CONF_STATE)? {
            Some(v) => pb_decode("conf state", &v)?,
            None => ConfState::default(),
        };
        let table = txn.open_table(STATE)?;
        let mut rows = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let (t, key) = k.value();
            rows.push(Row {
                table: t.to_string(),
                key: key.to_vec(),
                value: Some(unseal(Slot::Row(t, key), v.value())?.to_vec()),
            });
        }
        let mut snap = Snapshot::default();
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf);
        snap.set_metadata(meta);
        snap.data = encode_versioned(&rows).into();
        Ok(snap)
    }
}

impl raft::Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state()?,
            conf_state: self.conf_state()?,
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let tail = self.tail();
        let b = self.bounds();
        if low <= b.start_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        let last = self.last_index_in(&tail);
        if high > last + 1 || low > high {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        // Below the tail from the database, the rest from the tail.
        let tail_first = tail.first_index().unwrap_or(last + 1);
        let mut out = Vec::new();
        let mut size = 0u64;
        if low < tail_first {
            out = self.read_entries(low, high.min(tail_first), max_size)?;
            size = out.iter().map(|e| u64::from(e.compute_size())).sum();
            if (out.len() as u64) < high.min(tail_first) - low {
                return Ok(out);
            }
        }
        for index in low.max(tail_first)..high {
            let Some(e) = tail.get(index) else {
                return Err(
                    StoreError::Raft(raft::Error::Store(RaftStorageError::Unavailable)).into(),
                );
            };
            size += u64::from(e.compute_size());
            // Always return at least one entry, as raft expects.
            if max_size.is_some_and(|l| !out.is_empty() && size > l) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let tail = self.tail();
        let b = self.bounds();
        if idx == b.start_index {
            return Ok(b.start_term);
        }
        if idx < b.start_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if let Some(e) = tail.get(idx) {
            return Ok(e.term);
        }
        if idx > self.last_index_in(&tail) {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let entries = self.read_entries(idx, idx + 1, None)?;
        entries
            .first()
            .map(|e| e.term)
            .ok_or(raft::Error::Store(RaftStorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.bounds().start_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        let tail = self.tail();
        Ok(self.last_index_in(&tail))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snap = self.build_snapshot()?;
        if snap.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}
