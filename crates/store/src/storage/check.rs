//! What a data file must satisfy before raft-rs sees it. raft-rs asserts these (a
//! commit index past the log panics it), so a damaged file is refused here, naming what
//! does not hold, instead.

use blixard_core::decode_versioned;
use raft::eraftpb::{ConfState, Entry, HardState};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{NodeRecord, Store};
use crate::error::{corrupt, StoreError};
use crate::tables::{
    decode_pair, meta, pb_decode, unseal, Slot, APPLIED, CONF_STATE, FORMAT, HARD_STATE, LOG,
    LOG_START, NODE, RAFT, STATE,
};

/// What a check read: the figures `node check-data` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// The compaction point: the log holds the entries after it.
    pub first_index: u64,
    pub last_index: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub entries: u64,
    pub rows: u64,
    pub voters: Vec<u64>,
    /// A digest of the state machine (equal on members at the same applied index); only
    /// from [`Store::check_with_digest`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_digest: Option<u64>,
}

/// The keys `raft_meta` may hold.
const META_KEYS: [&str; 6] = [HARD_STATE, CONF_STATE, LOG_START, APPLIED, NODE, FORMAT];

fn bad(detail: String) -> StoreError {
    corrupt("raft log", detail)
}

impl Store {
    /// Reads the whole file and checks that log, hard state, configuration, applied
    /// index and state rows agree.
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        self.check_inner(false)
    }

    /// [`Self::check`], with a digest of the state (for `node check-data`; the daemon's
    /// start-up does not need one).
    pub fn check_with_digest(&self) -> Result<CheckReport, StoreError> {
        self.check_inner(true)
    }

    fn check_inner(&self, digest: bool) -> Result<CheckReport, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        for item in raft.iter()? {
            let (k, _) = item?;
            if !META_KEYS.contains(&k.value()) {
                return Err(corrupt(
                    "raft metadata",
                    format!("unknown key {:?}", k.value()),
                ));
            }
        }
        let get = |key: &str| meta(&raft, key);
        let hs: HardState = match get(HARD_STATE)? {
            Some(v) => pb_decode("hard state", &v)?,
            None => HardState::default(),
        };
        let cs: ConfState = match get(CONF_STATE)? {
            Some(v) => pb_decode("conf state", &v)?,
            None => ConfState::default(),
        };
        let (start_index, start_term) = match get(LOG_START)? {
            Some(v) => decode_pair("log start", &v)?,
            None => (0, 0),
        };
        let (applied, applied_term) = match get(APPLIED)? {
            Some(v) => decode_pair("applied index", &v)?,
            None => (0, 0),
        };
        if let Some(v) = get(NODE)? {
            decode_versioned::<NodeRecord>(&v).map_err(|e| corrupt("node record", e))?;
        }

        // The log: contiguous from the compaction point, each entry at its own index,
        // terms never falling and never above the hard state's.
        let log = txn.open_table(LOG)?;
        let mut last = (start_index, start_term);
        let mut entries = 0;
        let mut applied_seen = applied == start_index && applied_term == start_term;
        for item in log.iter()? {
            let (k, v) = item?;
            let index = k.value();
            let e: Entry = pb_decode("raft log entry", unseal(Slot::Log(index), v.value())?)?;
            if e.index != index {
                return Err(bad(format!(
                    "the entry stored at {index} says index {}",
                    e.index
                )));
            }
            if index != last.0 + 1 {
                return Err(bad(format!(
                    "entry {index} follows {}: the log has a gap or overlaps the compaction point",
                    last.0
                )));
            }
            if e.term < last.1 {
                return Err(bad(format!(
                    "entry {index} has term {} below the term {} before it",
                    e.term, last.1
                )));
            }
            if e.term > hs.term {
                return Err(bad(format!(
                    "entry {index} has term {} above the hard state's term {}",
                    e.term, hs.term
                )));
            }
            if index == applied {
                if e.term != applied_term {
                    return Err(bad(format!(
                        "the applied index {applied} is recorded with term {applied_term}, its entry has {}",
                        e.term
                    )));
                }
                applied_seen = true;
            }
            last = (index, e.term);
            entries += 1;
        }
        let last_index = last.0;
        let started = start_index > 0 || entries > 0;
        if started {
            if hs.commit < start_index || hs.commit > last_index {
                return Err(bad(format!(
                    "the commit index {} is outside the log [{start_index}, {last_index}]",
                    hs.commit
                )));
            }
            if applied < start_index || applied > hs.commit {
                return Err(bad(format!(
                    "the applied index {applied} is outside [{start_index}, commit {}]",
                    hs.commit
                )));
            }
            if !applied_seen {
                return Err(bad(format!(
                    "the applied index {applied} (term {applied_term}) is not in the log"
                )));
            }
            if hs.term < start_term {
                return Err(bad(format!(
                    "the hard state's term {} is below the compaction point's {start_term}",
                    hs.term
                )));
            }
            if cs.voters.is_empty() {
                return Err(corrupt("conf state", "a cluster without voters"));
            }
        } else if hs.commit != 0 || applied != 0 {
            return Err(bad(format!(
                "an empty log with commit {} and applied {applied}",
                hs.commit
            )));
        }
        drop(log);
        drop(raft);
        let rows = txn.open_table(STATE)?.len()?;
        drop(txn);
        let (state, _, _) = self.load_state()?;
        Ok(CheckReport {
            first_index: start_index,
            last_index,
            term: hs.term,
            commit: hs.commit,
            applied,
            entries,
            rows,
            voters: cs.voters,
            state_digest: digest.then(|| state.digest()),
        })
    }
}
