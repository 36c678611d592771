//! What one step of the raft loop writes, and how queued batches fold into one.

use blixard_core::Row;
use raft::eraftpb::{ConfState, Entry, HardState};

/// Everything one step of the raft loop writes, committed in one transaction.
#[derive(Default, Debug)]
pub struct WriteBatch {
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub rows: Vec<Row>,
    /// The applied index and the term of that entry.
    pub applied: Option<(u64, u64)>,
    pub conf_state: Option<ConfState>,
    /// Whether the commit must reach the disk before `write` returns. Raft requires it for
    /// new entries, term and vote (`Ready::must_sync`); a commit index or applied state
    /// that is lost in a crash is recovered from the log.
    pub sync: bool,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.hard_state.is_none()
            && self.rows.is_empty()
            && self.applied.is_none()
            && self.conf_state.is_none()
    }

    /// Folds `next` into this batch, as if this one had been written first.
    pub(crate) fn merge(&mut self, next: WriteBatch) {
        if let Some(first) = next.entries.first().map(|e| e.index) {
            self.entries.retain(|e| e.index < first);
        }
        self.entries.extend(next.entries);
        if next.hard_state.is_some() {
            self.hard_state = next.hard_state;
        }
        self.rows.extend(next.rows);
        if next.applied.is_some() {
            self.applied = next.applied;
        }
        if next.conf_state.is_some() {
            self.conf_state = next.conf_state;
        }
        self.sync |= next.sync;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn merged_batches_keep_the_later_entries_and_state() {
        let mut a = WriteBatch {
            entries: vec![entry(1, 1), entry(2, 1), entry(3, 1)],
            applied: Some((1, 1)),
            ..Default::default()
        };
        let b = WriteBatch {
            entries: vec![entry(3, 2), entry(4, 2)],
            applied: Some((2, 1)),
            sync: true,
            ..Default::default()
        };
        a.merge(b);
        let got: Vec<(u64, u64)> = a.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(a.applied, Some((2, 1)));
        assert!(a.sync);
    }
}
